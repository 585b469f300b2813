"""Parquet rows with bounded memory: a tiny compressed file must not decode into gigabytes.

Two defences, both before any Python string is built:
  * from the metadata: a column chunk whose uncompressed pages average more than
    ``ingest.max_cell_bytes`` per row holds an oversized cell, so its row group is not read,
    and the rows per batch are chosen so a batch stays under ``ingest.max_batch_bytes``;
  * while reading: every string column (nested ones too) is read as a dictionary, so a value
    repeated in many rows (the classic zstd/dictionary bomb) stays one copy; each row's decoded
    size is computed from the lengths, oversized cells are rejected, and rows are turned into
    Python objects in slices of at most ``ingest.max_batch_bytes``.
``ingest.max_file_bytes`` bounds the decoded bytes of the whole file the same two ways.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, BinaryIO, Iterator

from daemon.config import IngestConfig

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps the import light
    import numpy as np
    import pyarrow as pa

MAX_BATCH_ROWS = 1024


class ParquetRows:
    """The usable columns of one Parquet file, read batch by batch within ``limits``.

    Raises (at construction) ``ValueError`` with the reason when the file cannot be read at all.
    """

    def __init__(self, f: BinaryIO, wanted: set[str], limits: IngestConfig):
        import pyarrow.parquet as pq

        self.limits = limits
        meta_file = pq.ParquetFile(f)
        names = meta_file.schema_arrow.names
        self.names = names
        self.columns = [c for c in names if c.strip().lower() in wanted]
        leaves = [meta_file.schema.column(i) for i in range(len(meta_file.schema))]
        strings = [leaf.path for leaf in leaves if leaf.physical_type == "BYTE_ARRAY"
                   and leaf.path.split(".")[0] in self.columns]
        f.seek(0)
        self.file = pq.ParquetFile(f, read_dictionary=strings)  # a repeated value stays one copy
        self.meta = self.file.metadata
        self.num_rows = self.meta.num_rows
        self._decoded = 0
        self._plain: "pa.Schema | None" = None  # the batches' schema without dictionaries

    def decoded_bytes(self, group: int) -> dict[str, int]:
        """Uncompressed bytes per usable column in row group ``group``, from the metadata."""
        rg, out = self.meta.row_group(group), {}
        for j in range(rg.num_columns):
            chunk = rg.column(j)
            top = chunk.path_in_schema.split(".")[0]
            if top in self.columns:
                out[top] = out.get(top, 0) + chunk.total_uncompressed_size
        return out

    def whole_file_problem(self) -> str | None:
        """Why the file is rejected whole on its metadata alone, or None."""
        total = sum(sum(self.decoded_bytes(g).values()) for g in range(self.meta.num_row_groups))
        if total > self.limits.max_file_bytes:
            return (f"the Parquet file's columns decode to {total} bytes, over ingest.max_file_bytes="
                    f"{self.limits.max_file_bytes}: split it into smaller files")
        return None

    def rows(self, first_line: int = 1) -> Iterator[tuple[int, dict | None, str | None]]:
        """``(line, row, error)`` for every row, row groups in order; a row group too big to read yields
        one error per row."""
        line, cap = first_line, self.limits.max_file_bytes
        for group in range(self.meta.num_row_groups):
            n = self.meta.row_group(group).num_rows
            problem = self._group_problem(group, n)
            if problem is not None:
                for i in range(n):
                    yield line + i, None, problem
                line += n
                continue
            per_row = max(1, sum(self.decoded_bytes(group).values()) // max(1, n))
            batch_rows = max(1, min(MAX_BATCH_ROWS, self.limits.max_batch_bytes // per_row))
            for batch in self.file.iter_batches(batch_size=batch_rows, row_groups=[group], columns=self.columns):
                for start, stop, nbytes, error in self._plan(batch):
                    self._decoded += nbytes
                    if error is None and self._decoded > cap:
                        error = f"not read: the file's rows decode to over ingest.max_file_bytes={cap}"
                    if error is not None:
                        for i in range(start, stop):
                            yield line + i, None, error
                        continue
                    rows = self._decode(batch.slice(start, stop - start)).to_pylist()
                    for i, row in enumerate(rows, line + start):
                        yield i, row, None
                line += batch.num_rows

    def _decode(self, part: "pa.RecordBatch") -> "pa.RecordBatch":
        """The rows with their dictionaries expanded (checked to fit first): to_pylist is 5x faster on them."""
        import pyarrow as pa

        if self._plain is None:
            self._plain = pa.schema([pa.field(f.name, _plain_type(f.type), f.nullable) for f in part.schema])
        return part.cast(self._plain)

    def _group_problem(self, group: int, n: int) -> str | None:
        cap = self.limits.max_cell_bytes
        for column, size in self.decoded_bytes(group).items():
            if n and size / n > cap:
                return (f"not read: column {column!r} of Parquet row group {group} decodes to {size} bytes for "
                        f"{n} rows, so some cell is over ingest.max_cell_bytes={cap}")
        return None

    def _plan(self, batch: "pa.RecordBatch") -> list[tuple[int, int, int, str | None]]:
        """``(start, stop, decoded bytes, error)``: slices of rows to turn into Python objects, each under
        max_batch_bytes, and single rows rejected for an oversized cell; computed from lengths alone."""
        limits = self.limits
        sizes = {name: cell_bytes(batch.column(name)) for name in batch.schema.names}
        row_bytes = sum(sizes.values())
        too_big = {i: name for name, s in sizes.items() for i in (s > limits.max_cell_bytes).nonzero()[0].tolist()}
        total = int(row_bytes.sum())
        if not too_big and total <= limits.max_batch_bytes:  # the usual case: one slice
            return [(0, batch.num_rows, total, None)]
        plan, start, acc = [], 0, 0
        for i in range(batch.num_rows):
            name = too_big.get(i)
            size = int(row_bytes[i])
            if name is not None or (acc + size > limits.max_batch_bytes and i > start):
                if i > start:
                    plan.append((start, i, acc, None))
                start, acc = i, 0
            if name is not None:
                plan.append((i, i + 1, 0, f"column {name!r} is {int(sizes[name][i])} bytes, over "
                                          f"ingest.max_cell_bytes={limits.max_cell_bytes}"))
                start = i + 1
                continue
            acc += size
        if batch.num_rows > start:
            plan.append((start, batch.num_rows, acc, None))
        return plan


def cell_bytes(array: Any) -> "np.ndarray":
    """Decoded bytes of each row of an Arrow array (strings by length, nested values summed), without
    materialising it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(array, pa.ChunkedArray):
        parts = [cell_bytes(c) for c in array.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    t, n = array.type, len(array)
    if pa.types.is_dictionary(t):
        lengths = cell_bytes(array.dictionary)
        indices = array.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        out = lengths[indices] if len(lengths) else np.zeros(n, dtype=np.int64)
        return np.where(array.is_null().to_numpy(zero_copy_only=False), 0, out)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        values = cell_bytes(pc.list_flatten(array))
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        return np.bincount(parents, weights=values, minlength=n).astype(np.int64)
    if pa.types.is_struct(t):
        out = np.zeros(n, dtype=np.int64)
        for k in range(t.num_fields):
            out += cell_bytes(array.field(k))
        return out
    width = t.bit_width // 8 if pa.types.is_primitive(t) and t.bit_width >= 8 else 8
    return np.full(n, width, dtype=np.int64)


def _plain_type(t: Any) -> Any:
    """An Arrow type with every dictionary replaced by its value type (nested ones too)."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        return _plain_type(t.value_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        make = pa.list_ if pa.types.is_list(t) else pa.large_list
        return make(pa.field(t.value_field.name, _plain_type(t.value_type), t.value_field.nullable))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _plain_type(f.type), f.nullable) for f in t])
    return t
