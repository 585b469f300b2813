"""Ingest: files -> validated, cleaned, deduplicated records, with a reason for every line not kept.

The room, one module per job (arrows point down the list; none imports one above it):
  ``cli.py``       several files, summed counts, the human-readable summary (``lorad ingest`` in daemon/cli.py).
  ``write.py``     one file in one transaction: the ``files`` row, records, rejects, the ``ingest``
                   event and the rejects report (``ingest_file``, ``IngestResult``).
  ``neardup.py``   near-duplicate detection: MinHash signatures, LSH banding, exact shingle Jaccard.
  ``formats.py``   the JSONL / JSON / CSV / TSV readers, the Parquet door, ``iter_records`` and ``read_payloads``.
  ``parquet.py``   Parquet rows with bounded memory (decoded bytes per cell, batch and file).
  ``opening.py``   open a file once (no symlinks, never blocking on a FIFO); read only through it.
  ``records.py``   the record normaliser (``normalize_record``, ``Normaliser``): shapes, cleaning,
                   limits, canonical payload JSON and its content hash; the stable train/holdout split.

Outcomes: every record-bearing line/row/element is exactly one of accepted, duplicate or
rejected, so ``records_total == accepted + duplicates + rejected``. Blank lines are not
records. Exact duplicates are found by the sha256 of the normalised payload against everything
ever stored (``records.content_hash UNIQUE``) and within the file; near-duplicates as
``neardup.py`` says (``data.near_dup_threshold``, 1.0 = off). A file that cannot be read at all
(nothing in it decodes or parses) gets one whole-file rejection (``file_error``, reported as
line 0) and zero counts.

Streaming: memory does not grow with the file (see ``formats.py``). Exact dedup asks the
database per batch, so it holds no per-file set; the near-duplicate index grows with the
number of stored records (about 1.8 KB each).
"""

from pipelines.ingest.cli import format_ingest_summary, ingest_files
from pipelines.ingest.formats import DEFAULT_MAX_LINE_BYTES, FileRejected, iter_records, read_payloads
from pipelines.ingest.opening import FileRefused, OpenedFile, name_problem, open_regular_file
from pipelines.ingest.neardup import MinHasher, NearDupIndex, NUM_PERM, lsh_params, near_dup_key, shingle_jaccard
from pipelines.ingest.records import (SPLIT_SALT, InvalidRecord, Normaliser, Parsed, Record, estimate_tokens,
                                      normalize_record, stable_split)
from pipelines.ingest.write import IngestResult, ingest_file, write_report_from_store

_Invalid = InvalidRecord  # the name bench/continual.py and older tests import

__all__ = ["DEFAULT_MAX_LINE_BYTES", "FileRefused", "FileRejected", "OpenedFile", "name_problem",
           "open_regular_file", "IngestResult", "InvalidRecord", "MinHasher", "NUM_PERM",
           "NearDupIndex", "Normaliser", "Parsed", "Record", "SPLIT_SALT", "estimate_tokens",
           "format_ingest_summary", "ingest_file", "ingest_files", "iter_records", "read_payloads", "lsh_params", "near_dup_key",
           "normalize_record", "shingle_jaccard", "stable_split", "write_report_from_store"]
