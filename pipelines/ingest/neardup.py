"""Near-duplicates: MinHash signatures of character shingles, LSH banding, exact Jaccard to decide.

Near-duplicates (against stored records and the file itself; ``data.near_dup_threshold``,
1.0 = off) are shortlisted by MinHash signatures of 5-character shingles with LSH banding and
decided by the exact shingle Jaccard similarity; only records with the same system prompt are
compared (see ``near_dup_key``). The index is rebuilt lazily from stored payloads once per
``Store`` instance, then kept up to date.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps the import light
    import sqlite3

    import numpy as np

    from daemon.store import Store

NUM_PERM = 128       # MinHash values per signature (a power of two: one bin each)
SHINGLE_CHARS = 5    # character shingles; 5 keeps Chinese (1 char ~ 1 word) and Latin text discriminative
VERIFY_SLACK = 0.1   # signature estimates this far below the threshold are checked on the real texts
_MERSENNE_MULT = 0x9E3779B97F4A7C15


def near_dup_key(payload: dict) -> tuple[bytes, str]:
    """(scope, text) compared for near-duplicates.

    ``text`` is the user and assistant turns (or the text record), lower-cased with spaces
    collapsed. Only records with the same system prompt (``scope``, a hash of it) can be
    near-duplicates: a task template is shared by all its records, so comparing it would make
    every short record of a task look alike, while the same question under another task's
    instruction (LawBench 3-1 and 3-4 share their case facts) is a different example.
    """
    if "text" in payload:
        return b"", " ".join(payload["text"].lower().split())
    system = "\n".join(m["content"] for m in payload["messages"] if m["role"] == "system")
    text = "\n".join(m["content"] for m in payload["messages"] if m["role"] != "system")
    scope = hashlib.sha256(system.encode("utf-8")).digest()[:8] if system else b""
    return scope, " ".join(text.lower().split())


def shingle_jaccard(a: str, b: str, k: int = SHINGLE_CHARS) -> float:
    """Exact Jaccard similarity of the k-character shingle sets of two texts."""
    sa = {a[i:i + k] for i in range(max(1, len(a) - k + 1))}
    sb = {b[i:i + k] for i in range(max(1, len(b) - k + 1))}
    return len(sa & sb) / len(sa | sb)


class MinHasher:
    """MinHash signatures of character shingles, stable across processes (numpy, no Python hash()).

    One-permutation hashing: each shingle is hashed once; its top bits pick one of
    ``num_perm`` bins and the signature keeps the smallest low-32-bit value per bin. Empty bins
    (short texts) borrow the next non-empty bin's value, shifted by the distance
    ("rotation" densification), so two signatures still agree in a share of positions that
    estimates the Jaccard similarity of the shingle sets. O(shingles), not O(shingles x num_perm).
    """

    def __init__(self, num_perm: int = NUM_PERM, shingle: int = SHINGLE_CHARS):
        import numpy as np

        if num_perm < 2 or num_perm & (num_perm - 1):
            raise ValueError(f"num_perm must be a power of two >= 2, got {num_perm}")
        self.np = np
        self.k = shingle
        self.num_perm = num_perm
        self._bin_shift = np.uint64(64 - (num_perm.bit_length() - 1))

    def signature(self, text: str) -> "np.ndarray":
        np = self.np
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
        k = max(1, min(self.k, len(codes)))
        n = len(codes) - k + 1
        if n <= 0:
            codes, n = np.zeros(1, dtype=np.uint64), 1
        h = np.zeros(n, dtype=np.uint64)
        for j in range(k):  # polynomial hash of each shingle; uint64 arithmetic wraps on purpose
            h = h * np.uint64(1_000_003) + codes[j:j + n]
        # splitmix64 finaliser: every output bit depends on every input bit
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(_MERSENNE_MULT)
        h ^= h >> np.uint64(31)
        empty = np.uint64(1 << 32)
        sig = np.full(self.num_perm, empty, dtype=np.uint64)
        np.minimum.at(sig, (h >> self._bin_shift).astype(np.intp), h & np.uint64(0xFFFFFFFF))
        missing = sig == empty
        if missing.any():
            full = np.flatnonzero(~missing)
            idx = np.arange(self.num_perm)
            nxt = np.searchsorted(full, idx) % len(full)      # next non-empty bin, circularly
            src = full[nxt]
            shift = ((src - idx) % self.num_perm).astype(np.uint64)
            sig = (sig[src] + shift * np.uint64(0x9E3779B1)) & np.uint64(0xFFFFFFFF)
        return sig.astype(np.uint32)


def lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows): the most selective banding that still makes a pair AT the threshold a
    candidate with probability >= 0.99; candidates are then checked on the full signature."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= 0.99:
            return bands, rows
    return num_perm, 1


class NearDupIndex:
    """LSH index over MinHash signatures, keyed by content hash, with rollback to a mark.

    Each band of a signature is hashed to one integer, mixed with the record's scope (its
    system prompt's hash) so only records of the same scope meet. Buckets hold a bare slot
    number until a second record lands in them; signatures live in one growing uint32 array.
    About 1.8 KB of memory per indexed record (measured at threshold 0.9: 12 bands).
    """

    def __init__(self, threshold: float, hasher: MinHasher | None = None):
        self.threshold = threshold
        self.hasher = hasher or MinHasher()
        np = self.hasher.np
        self.bands, self.rows = lsh_params(threshold, self.hasher.num_perm)
        self.buckets: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self.keys: list[str] = []
        self.scopes: list[bytes] = []
        self._sigs = np.empty((1024, self.hasher.num_perm), dtype=np.uint32)
        self._mult = np.random.default_rng(0x15AD).integers(1, 2**63, size=self.rows, dtype=np.uint64) | np.uint64(1)
        self.built_upto = 0  # highest records.id already indexed

    def signature(self, payload: dict) -> tuple[bytes, str, Any]:
        """(scope, compared text, MinHash signature) of a stored payload."""
        scope, text = near_dup_key(payload)
        return scope, text, self.hasher.signature(text)

    def _band_keys(self, scope: bytes, sig) -> list[int]:
        np = self.hasher.np
        bands = sig[:self.bands * self.rows].reshape(self.bands, self.rows).astype(np.uint64)
        keys = (bands * self._mult).sum(axis=1, dtype=np.uint64)  # wraps: a hash, not a number
        return (keys ^ np.uint64(int.from_bytes(scope.ljust(8, b"\0"), "little"))).tolist()

    def candidates(self, scope: bytes, sig, prefer: str | None = None) -> list[tuple[str, float]]:
        """Indexed keys whose estimated similarity is within VERIFY_SLACK of the threshold, best first.

        A candidate whose key equals ``prefer`` (the record's own content hash: an exact
        duplicate) is returned alone, at once.
        """
        found: list[tuple[str, float]] = []
        seen: set[int] = set()
        floor = self.threshold - VERIFY_SLACK
        for bucket, band in zip(self.buckets, self._band_keys(scope, sig)):
            entry = bucket.get(band)
            if entry is None:
                continue
            for slot in (entry,) if isinstance(entry, int) else entry:
                if slot in seen or self.scopes[slot] != scope:
                    continue
                seen.add(slot)
                if self.keys[slot] == prefer:
                    return [(prefer, 1.0)]
                sim = float((self._sigs[slot] == sig).mean())
                if sim >= floor:
                    found.append((self.keys[slot], sim))
        return sorted(found, key=lambda c: -c[1])

    def add(self, key: str, scope: bytes, sig) -> None:
        slot = len(self.keys)
        if slot == len(self._sigs):
            self._sigs = self.hasher.np.concatenate([self._sigs, self.hasher.np.empty_like(self._sigs)])
        self._sigs[slot] = sig
        self.keys.append(key)
        self.scopes.append(scope)
        for bucket, band in zip(self.buckets, self._band_keys(scope, sig)):
            entry = bucket.get(band)
            if entry is None:
                bucket[band] = slot
            elif isinstance(entry, int):
                bucket[band] = [entry, slot]
            else:
                entry.append(slot)

    def mark(self) -> int:
        return len(self.keys)

    def rollback(self, mark: int) -> None:
        """Forget everything added after ``mark`` (a rolled-back or dry-run transaction)."""
        while len(self.keys) > mark:
            slot = len(self.keys) - 1
            for bucket, band in zip(self.buckets, self._band_keys(self.scopes[slot], self._sigs[slot])):
                entry = bucket[band]
                if isinstance(entry, int):
                    del bucket[band]
                else:
                    entry.pop()
                    if len(entry) == 1:
                        bucket[band] = entry[0]
            self.keys.pop()
            self.scopes.pop()

    def catch_up(self, db: "sqlite3.Connection") -> None:
        """Index stored records newer than ``built_upto`` (all of them the first time)."""
        cur = db.execute("SELECT id, content_hash, payload FROM records WHERE id > ? ORDER BY id",
                         (self.built_upto,))
        for rid, content_hash, payload in cur:
            scope, _, sig = self.signature(json.loads(payload))
            self.add(content_hash, scope, sig)
            self.built_upto = rid


# One index per (Store, threshold), rebuilt lazily from stored payloads; see module docstring.
_NEAR_DUP_INDEXES: "weakref.WeakKeyDictionary[Any, dict[float, NearDupIndex]]" = weakref.WeakKeyDictionary()


def near_dup_index(store: "Store", threshold: float) -> NearDupIndex:
    per_store = _NEAR_DUP_INDEXES.setdefault(store, {})
    if threshold not in per_store:
        hasher = next(iter(per_store.values())).hasher if per_store else None
        per_store[threshold] = NearDupIndex(threshold, hasher)
    return per_store[threshold]
