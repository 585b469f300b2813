"""Check that every relative link in README.md, CHANGELOG.md and docs/*.md resolves inside the repository.

Links to files must exist, ``#anchors`` must name a heading of the target page, and nothing may point outside
the repository. Run from anywhere: ``python docs/check_links.py``; exit code 1 lists every broken link.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"```.*?```", re.S)   # links inside code blocks are examples, not links


def pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def problems(page: Path) -> list[str]:
    found = []
    for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}: {target}"
        if ROOT != dest and ROOT not in dest.parents:
            found.append(f"{where} points outside the repository")
        elif not dest.exists():
            found.append(f"{where} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            found.append(f"{where} names no heading of {dest.name}")
    return found


def main() -> int:
    found = [p for page in pages() for p in problems(page)]
    print("\n".join(found) or f"{len(pages())} pages, every link resolves")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
