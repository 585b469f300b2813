"""Regenerate the generated blocks of docs/: the configuration reference and the metrics table.

Run ``make docs`` (or ``python docs/generate.py`` from the repository root). The text between each
pair of markers is replaced by what the code says; everything around the markers is hand-written.
tests/test_config.py and tests/test_deploy.py fail when a block is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # run as a script from anywhere: import this checkout's modules


def blocks() -> list[tuple[Path, str, str]]:
    """(file, marker name, generated text) for every generated block."""
    from daemon.config import render_markdown
    from monitors.metrics import catalogue_markdown

    return [(DOCS / "configuration.md", "config-reference", render_markdown()),
            (DOCS / "metrics.md", "metrics-catalogue", catalogue_markdown())]


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the lines between ``<!-- name:start -->`` and ``<!-- name:end -->`` set to ``body``."""
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"markers {start.strip()} ... {end} not found; put them back where the block belongs")
    head, rest = text.split(start, 1)
    return head + start + body.strip() + "\n" + end + rest.split(end, 1)[1]


def main() -> int:
    for path, name, body in blocks():
        old = path.read_text(encoding="utf-8")
        new = replace_block(old, name, body)
        if new != old:
            path.write_text(new, encoding="utf-8")
            print(f"updated {path.relative_to(DOCS.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
