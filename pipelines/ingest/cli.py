"""Several files, one transaction each, summed counts and a readable summary (``lorad ingest`` opens the store)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable

from daemon.config import DataConfig
from pipelines.ingest.write import ingest_file, summary_line

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps the import light
    from daemon.store import Store


def ingest_files(paths: Iterable[str | os.PathLike], store: "Store", cfg: DataConfig, **kw: Any) -> dict:
    """Ingest several files (one transaction each) and sum the outcomes: the CLI's JSON.

    Returns:
        {"files": [per-file counts and file_error], "records_total", "accepted", "duplicates",
         "rejected", "rejects": [{"file", "line", "outcome", "reason"}], "dry_run"}
    """
    out: dict[str, Any] = {"files": [], "records_total": 0, "accepted": 0, "duplicates": 0, "rejected": 0,
                           "rejects": [], "dry_run": bool(kw.get("dry_run", False))}
    for p in paths:
        r = ingest_file(p, store, cfg, **kw)
        out["files"].append({"file": r.file, **r.counts(), "file_error": r.file_error, "file_id": r.file_id,
                             "rejects_truncated": r.rejects_truncated})
        for key in ("records_total", "accepted", "duplicates", "rejected"):
            out[key] += getattr(r, key)
        out["rejects"].extend(r.rejects)
    return out


def format_ingest_summary(result: dict, *, max_rejects_per_file: int = 20) -> str:
    """Human-readable summary of ``ingest_files`` output, one block per file."""
    by_file: dict[str, list[dict]] = {}
    for r in result.get("rejects", []):
        by_file.setdefault(r["file"], []).append(r)
    lines = []
    for f in result.get("files", []):
        if f.get("file_error"):
            lines.append(f"{f['file']}: REJECTED: {f['file_error']}")
            continue
        lines.append(f"{f['file']}: {summary_line(f)}")
        entries = [r for r in by_file.get(f["file"], []) if r["line"] != 0]
        for r in entries[:max_rejects_per_file]:
            lines.append(f"  line {r['line']}: {r.get('outcome', 'rejected')}: {r['reason']}")
        hidden = f["duplicates"] + f["rejected"] - min(len(entries), max_rejects_per_file)
        if hidden > 0:
            lines.append(f"  ... and {hidden} more (all are in the rejects table of lorad.db)")
    n = len(result.get("files", []))
    lines.append(f"total: {n} file{'s' if n != 1 else ''}, {summary_line(result)}")
    if result.get("dry_run"):
        lines.append("dry run: nothing was written")
    return "\n".join(lines)
