"""Every ``from <our package> import name`` in the repository names something that exists.

Most of lorad's imports sit inside functions (to keep ``lorad --help`` and the daemon's start light), so a
name that a refactor moved or merged away fails only when that one path runs, e.g. a benchmark on a GPU
machine. This reads every import statement of the project and resolves it here.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("daemon", "pipelines", "monitors", "bench")
FOLDERS = PACKAGES + ("tests", "docs", "deploy")


def project_imports() -> list[tuple[str, int, str, str]]:
    """(file, line, module, name) for each ``from daemon|pipelines|monitors|bench... import name``."""
    found = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                        and node.module.split(".")[0] in PACKAGES):
                    for alias in node.names:
                        if alias.name != "*":
                            found.append((str(path.relative_to(ROOT)), node.lineno, node.module, alias.name))
    return found


def test_the_scan_finds_the_function_local_imports():
    sites = project_imports()
    assert len(sites) > 200
    # a known function-local import (inside drift_check.check_files) is among them
    assert any(f == "daemon/drift_check.py" and m == "monitors.features" and n == "featurize" for f, _, m, n in sites)


def test_every_project_import_resolves():
    missing = []
    modules: dict[str, object] = {}
    for path, line, module, name in project_imports():
        if module not in modules:
            try:
                modules[module] = importlib.import_module(module)
            except ImportError as e:
                if getattr(e, "name", None) and e.name.split(".")[0] not in PACKAGES:
                    continue  # an optional third-party dependency (e.g. a GPU-only package) missing here
                missing.append(f"{path}:{line}: module {module} ({e})")
                modules[module] = None
                continue
        mod = modules[module]
        if mod is None or hasattr(mod, name):
            continue
        try:
            importlib.import_module(f"{module}.{name}")
        except ImportError:
            missing.append(f"{path}:{line}: from {module} import {name}")
    assert not missing, "imports of names that do not exist:\n" + "\n".join(missing)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
