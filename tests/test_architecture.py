"""The import contract: arrows point down and no two modules import each other.

Every module of daemon/, pipelines/ and monitors/ is parsed with ``ast`` (no import runs), and every
import counts, at module level or inside a function (only ``if TYPE_CHECKING:`` imports, which never run,
are left out):
  - no import circle between modules, of any length;
  - ``pipelines.*`` and ``monitors.*`` import nothing from ``daemon.*`` but ``daemon.config``;
  - ``daemon/config/`` imports nothing from lorad outside it (the leaf every stage reads its settings from).
Each test lists every violation it finds, not only the first.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("daemon", "pipelines", "monitors")
ALLOWED_UPWARD = {"daemon.config"}

# Violations that live in files other work is reshaping right now (pipelines/ingest*, pipelines/train* and the
# distributed module that joins pipelines/train/): each entry (importer, imported) also covers the submodules
# of both, so it holds once those files become packages. Empty it when they import only downwards; a NEW
# violation fails regardless, and an entry that matches no import any more fails too (delete it then).
PENDING_RESHAPE: set[tuple[str, str]] = set()  # empty: every room imports downwards


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lorad_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_names(path: Path, modules: set[str], name: str) -> set[str]:
    """The lorad modules the file of module ``name`` imports anywhere in it (``from pkg import mod`` is ``pkg.mod``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                 for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in type_only:   # `if TYPE_CHECKING:` imports never run
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: resolve against this module's package
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module; `from mod import name` imports mod.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            # The longest lorad module the dotted name starts with (a.b.c -> a.b when c is a function).
            parts = target.split(".")
            for cut in range(len(parts), 0, -1):
                if ".".join(parts[:cut]) in modules:
                    found.add(".".join(parts[:cut]))
                    break
    found.discard(name)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> dict[str, set[str]]:
    modules = lorad_modules()
    names = set(modules)
    # A package's __init__ imported only to reach its submodules is not an edge to the package itself.
    return {name: imported_names(path, names, name) - {p for p in PACKAGES if (ROOT / p / "__init__.py").exists()}
            for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _pending(edge: tuple[str, str], allowed: set[tuple[str, str]] = PENDING_RESHAPE) -> bool:
    return any(_within(edge[0], a) and _within(edge[1], b) for a, b in allowed)


def test_no_import_circles():
    graph = import_graph()
    # Edges allowed for now are taken out first, so a circle through them alone does not count.
    pruned = {a: {b for b in targets if not _pending((a, b))} for a, targets in graph.items()}
    found = circles(pruned)
    assert not found, "import circles (each module of a group imports another of it, directly or not):\n" + \
        "\n".join("  " + " <-> ".join(group) + "   via " + ", ".join(
            f"{a} -> {b}" for a in group for b in sorted(pruned[a]) if b in group) for group in found)


def test_pipelines_and_monitors_import_only_the_daemon_config():
    bad = [(a, b) for a, targets in import_graph().items() if a.split(".")[0] in ("pipelines", "monitors")
           for b in sorted(targets) if b.startswith("daemon") and not any(_within(b, u) for u in ALLOWED_UPWARD)
           and not _pending((a, b))]
    assert not bad, "upward imports (pipelines/ and monitors/ may import only daemon.config from daemon/):\n" + \
        "\n".join(f"  {a} -> {b}" for a, b in bad)


def test_config_is_a_leaf():
    bad = sorted(f"{a} -> {b}" for a, targets in import_graph().items() if _within(a, "daemon.config")
                 for b in targets if not _within(b, "daemon.config"))
    assert not bad, f"daemon/config/ must import nothing from lorad outside it, but: {', '.join(bad)}"


def test_pending_reshape_lists_only_real_violations():
    # An entry whose import is gone must leave the list, so the list shrinks to empty as the work lands.
    graph = import_graph()
    stale = sorted(entry for entry in PENDING_RESHAPE
                   if not any(_pending((a, b), {entry}) for a, targets in graph.items() for b in targets))
    assert not stale, "PENDING_RESHAPE entries with no such import any more (delete them): " + \
        ", ".join(f"{a} -> {b}" for a, b in stale)


def test_the_checker_sees_imports_inside_functions_and_circles(tmp_path):
    # The contract is only as good as the parser: a function-level import and a 3-module circle are found.
    src = tmp_path / "mod.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import monitors.drift\n"
                   "def f():\n    from daemon.store import Store\n    import pipelines.data\n"
                   "    from .data import pack\n")
    assert imported_names(src, {"daemon.store", "pipelines.data", "monitors.drift"}, "pipelines.mod") == {"daemon.store",
                                                                                         "pipelines.data"}
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_pure_modules_import_no_numpy_or_torch():
    # STYLE rule 3: importing the decisions, the statistics and the config costs only the stdlib.
    import subprocess
    import sys

    code = ("import sys, daemon.config, daemon.policy, monitors.drift, monitors.features, monitors.metrics\n"
            "print(' '.join(m for m in ('numpy', 'torch', 'scipy', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"heavy modules imported at module level: {out.stdout.strip()}"
