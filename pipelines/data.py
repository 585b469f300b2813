"""Training snapshots, and the token sequences a run trains on.

A snapshot is the frozen set of records one training run sees, written once and never
changed, with one role per record:
  new      train-split records that were not yet in any snapshot as 'new'
  replay   a seeded sample of older train records (those already learned), so the adapter
           does not forget them; replay / (new + replay) = replay_fraction
  holdout  holdout-split records not yet in any snapshot as 'holdout': the new-data evaluation
           set (never trained on; the split is a stable hash, so a record never moves)
Its id is the sha256 of the sorted (record_id, role) pairs: the same set always gets the same
id, and writing it again returns the existing snapshot.

Tokenisation renders chat records with the model's chat template and labels only the
assistant turns (prompt tokens are -100). Packing puts several records in one sequence with
position ids restarting at 0 for each, so varlen attention (flash/sdpa with position ids)
keeps them apart; the first label of each packed record is -100 so no loss crosses a boundary.

Only the stdlib is imported at module level; tokenizers are passed in.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from daemon.config import DataConfig
from daemon.store import FAILED_SNAPSHOTS

if TYPE_CHECKING:  # pragma: no cover
    import sqlite3

    from daemon.store import Store

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding, record boundaries)
ROLES = ("new", "replay", "holdout")

# ChatML, used only for tokenizers that have no chat template of their own (base models).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class NothingToSnapshot(ValueError):
    """No pending train record: every one is already in a snapshot as 'new'."""


# ----------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class Snapshot:
    """A frozen, content-addressed set of record ids for one training run."""

    id: str
    new: tuple[int, ...]
    replay: tuple[int, ...]
    holdout: tuple[int, ...]
    manifest: dict
    created: bool = False  # True only for the call that wrote it

    @property
    def train_ids(self) -> tuple[int, ...]:
        return self.new + self.replay

    def to_dict(self) -> dict:
        return asdict(self)


def snapshot_id(pairs: Sequence[tuple[int, str]]) -> str:
    """sha256 of the sorted (record_id, role) pairs, one 'id:role' per line."""
    text = "\n".join(f"{rid}:{role}" for rid, role in sorted(pairs))
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _capped(ids_by_category: dict[str | None, list[int]], ratio: float, rng: random.Random
            ) -> tuple[list[int], dict[str, int]]:
    """Keep at most ratio x (the smallest category's count) records per category (seeded sample)."""
    kept: list[int] = []
    dropped: dict[str, int] = {}
    smallest = min(len(v) for v in ids_by_category.values())
    cap = max(1, int(ratio * smallest)) if ratio > 0 else None
    for category in sorted(ids_by_category, key=lambda c: (c is not None, c or "")):
        ids = ids_by_category[category]
        if cap is not None and len(ids) > cap:
            dropped[category or "(none)"] = len(ids) - cap
            ids = sorted(rng.sample(ids, cap))
        kept.extend(ids)
    return sorted(kept), dropped


def _plan(db: "sqlite3.Connection", cfg: DataConfig, *, seed: int, since: float | None,
          replay_fraction: float | None, category_cap_ratio: float | None) -> Snapshot:
    """Choose the snapshot's records from the current state (read-only)."""
    replay_fraction = cfg.replay_fraction if replay_fraction is None else replay_fraction
    cap_ratio = cfg.category_cap_ratio if category_cap_ratio is None else category_cap_ratio
    if not 0.0 <= replay_fraction < 1.0:
        raise ValueError(f"replay_fraction must be in [0, 1), got {replay_fraction}")
    if cap_ratio < 0:
        raise ValueError(f"category_cap_ratio must be >= 0 (0 = no cap), got {cap_ratio}")
    since_sql, since_args = ("AND r.ingested_at >= ?", (since,)) if since is not None else ("", ())

    def pending(split: str, role: str) -> list[tuple[int, str | None]]:
        return db.execute(
            f"SELECT r.id, r.category FROM records r WHERE r.split = ? {since_sql} AND NOT EXISTS "
            f"(SELECT 1 FROM snapshot_records s WHERE s.record_id = r.id AND s.role = ? "
            f"AND s.snapshot_id NOT IN ({FAILED_SNAPSHOTS})) ORDER BY r.id",
            (split, *since_args, role)).fetchall()

    new_rows = pending("train", "new")
    if not new_rows:
        raise NothingToSnapshot("no pending train records: every train record is already in a snapshot as "
                                "'new'; ingest new data first" + (f" (since={since})" if since is not None else ""))
    holdout = tuple(rid for rid, _ in pending("holdout", "holdout"))

    rng = random.Random(seed)
    by_category: dict[str | None, list[int]] = {}
    for rid, category in new_rows:
        by_category.setdefault(category, []).append(rid)
    new, dropped = _capped(by_category, cap_ratio, rng)

    older = [rid for (rid,) in db.execute(
        "SELECT r.id FROM records r WHERE r.split = 'train' AND EXISTS "
        "(SELECT 1 FROM snapshot_records s WHERE s.record_id = r.id AND s.role = 'new' "
        f"AND s.snapshot_id NOT IN ({FAILED_SNAPSHOTS})) ORDER BY r.id")]
    wanted = round(replay_fraction / (1.0 - replay_fraction) * len(new))
    replay = tuple(sorted(rng.sample(older, min(wanted, len(older)))))

    pairs = [(r, "new") for r in new] + [(r, "replay") for r in replay] + [(r, "holdout") for r in holdout]
    manifest = {
        "seed": seed, "since": since, "replay_fraction": replay_fraction, "category_cap_ratio": cap_ratio,
        "holdout_fraction": cfg.holdout_fraction,
        "max_record_id": max(r for r, _ in pairs),
        "categories": {c or "(none)": len(v) for c, v in sorted(by_category.items(), key=lambda kv: kv[0] or "")},
        "capped": dropped, "replay_wanted": wanted, "replay_available": len(older),
    }
    return Snapshot(snapshot_id(pairs), tuple(new), replay, holdout, manifest)


def plan_snapshot(store: "Store", cfg: DataConfig, *, seed: int, since: float | None = None,
                  replay_fraction: float | None = None, category_cap_ratio: float | None = None) -> Snapshot:
    """What ``build_snapshot`` would write now, without writing it."""
    with store.transaction() as tx:
        return _plan(tx, cfg, seed=seed, since=since, replay_fraction=replay_fraction,
                     category_cap_ratio=category_cap_ratio)


def write_snapshot(store: "Store", snapshot: Snapshot, *, db: "sqlite3.Connection | None" = None) -> Snapshot:
    """Store a planned snapshot; if one with the same id exists, return it unchanged (created=False)."""
    def write(tx: "sqlite3.Connection") -> Snapshot:
        if tx.execute("SELECT 1 FROM snapshots WHERE id = ?", (snapshot.id,)).fetchone():
            return _load(tx, snapshot.id)
        tx.execute("INSERT INTO snapshots (id, created_at, n_new, n_replay, n_holdout, manifest) "
                   "VALUES (?, ?, ?, ?, ?, ?)",
                   (snapshot.id, store.clock(), len(snapshot.new), len(snapshot.replay), len(snapshot.holdout),
                    json.dumps(snapshot.manifest, ensure_ascii=False, sort_keys=True)))
        tx.executemany("INSERT INTO snapshot_records (snapshot_id, record_id, role) VALUES (?, ?, ?)",
                       [(snapshot.id, rid, role) for role in ROLES for rid in getattr(snapshot, role)])
        return Snapshot(snapshot.id, snapshot.new, snapshot.replay, snapshot.holdout, snapshot.manifest,
                        created=True)
    if db is not None:
        return write(db)
    with store.transaction() as tx:
        return write(tx)


def build_snapshot(store: "Store", cfg: DataConfig, *, seed: int, since: float | None = None,
                   replay_fraction: float | None = None, category_cap_ratio: float | None = None) -> Snapshot:
    """Choose and write the next training snapshot in ONE transaction.

    Args:
        seed: seeds the replay sample and the category cap; same state + same seed = same snapshot.
        since: only records ingested at or after this timestamp count as new / holdout.
        replay_fraction: share of replay records among the training records; default data.replay_fraction.
        category_cap_ratio: no category of new records may exceed this multiple of the smallest one
            (the surplus stays pending for a later snapshot); 0 = no cap; default data.category_cap_ratio.

    Raises:
        NothingToSnapshot: no pending train record.
    """
    with store.transaction() as tx:
        planned = _plan(tx, cfg, seed=seed, since=since, replay_fraction=replay_fraction,
                        category_cap_ratio=category_cap_ratio)
        return write_snapshot(store, planned, db=tx)


def _load(db: "sqlite3.Connection", sid: str) -> Snapshot:
    row = db.execute("SELECT manifest FROM snapshots WHERE id = ?", (sid,)).fetchone()
    if row is None:
        raise KeyError(f"no snapshot {sid!r}")
    ids: dict[str, list[int]] = {role: [] for role in ROLES}
    for rid, role in db.execute("SELECT record_id, role FROM snapshot_records WHERE snapshot_id = ? "
                                "ORDER BY record_id", (sid,)):
        ids[role].append(rid)
    return Snapshot(sid, tuple(ids["new"]), tuple(ids["replay"]), tuple(ids["holdout"]), json.loads(row[0]))


def load_snapshot(store: "Store", snapshot_id: str) -> Snapshot:
    """Read a stored snapshot back. Raises KeyError if there is none with that id."""
    with store.transaction() as tx:
        return _load(tx, snapshot_id)


def snapshot_payloads(store: "Store", snapshot_id: str, roles: Sequence[str] = ("new", "replay")
                      ) -> Iterator[tuple[int, str, dict]]:
    """(record_id, role, payload) of a snapshot's records with the given roles, by record id."""
    marks = ",".join("?" * len(roles))
    rows = store.query(f"SELECT r.id, s.role, r.payload FROM snapshot_records s JOIN records r ON r.id = s.record_id "
                       f"WHERE s.snapshot_id = ? AND s.role IN ({marks}) ORDER BY r.id", (snapshot_id, *roles))
    for row in rows:
        yield row[0], row[1], json.loads(row[2])


# ----------------------------------------------------------------------------- tokenisation


def _render(tokenizer: Any, messages: list[dict], template: str | None, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=template)


def _assistant_spans(tokenizer: Any, messages: list[dict], template: str | None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns to learn.

    A span runs from the end of the prompt rendered with the generation prompt to the end of
    the conversation rendered up to that turn (so it includes the end-of-turn token). Turns
    where the template is not prefix-consistent (some templates drop earlier reasoning) are
    left unlabelled; the last turn must be consistent.
    """
    full = _render(tokenizer, messages, template, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], template, True)
        upto = full if i == len(messages) - 1 else _render(tokenizer, messages[:i + 1], template, False)
        if upto.startswith(prefix) and full.startswith(upto) and len(upto) > len(prefix):
            spans.append((len(prefix), len(upto)))
        elif i == len(messages) - 1:
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation, "
                             "so the assistant's tokens cannot be told apart from the prompt's")
    return full, spans


def tokenize_record(payload: dict, tokenizer: Any, max_seq_len: int) -> dict:
    """Token ids and labels of one stored record, truncated to max_seq_len.

    Chat records are rendered with the tokenizer's chat template (ChatML when it has none) and
    only assistant turns are labelled: prompt tokens get -100. Each segment is tokenised on its
    own, exactly as at inference where the prompt is tokenised and the answer generated after
    it. Text records are tokenised whole (with the tokenizer's special tokens, plus EOS) and
    every token is labelled.

    Returns:
        {"input_ids": [...], "labels": [...]} of equal length.
    """
    if "text" in payload:
        ids = list(tokenizer(payload["text"], add_special_tokens=True)["input_ids"])
        eos = tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return {"input_ids": ids[:max_seq_len], "labels": ids[:max_seq_len]}
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    text, spans = _assistant_spans(tokenizer, payload["messages"], template)
    input_ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for start, end in spans + [(len(text), len(text))]:
        for piece, learn in ((text[pos:start], False), (text[start:end], True)):
            if not piece:
                continue
            ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            input_ids.extend(ids)
            labels.extend(ids if learn else [IGNORE_INDEX] * len(ids))
        pos = end
    return {"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len]}


# ----------------------------------------------------------------------------- packing


def pack(examples: Sequence[dict], max_seq_len: int) -> list[dict]:
    """Pack examples into sequences of at most max_seq_len tokens, first-fit-decreasing.

    Each pack holds whole examples (longer ones are truncated to max_seq_len first): their
    ``input_ids`` and ``labels`` concatenated, ``position_ids`` restarting at 0 for each, the
    first label of each example set to -100 (no loss across a boundary), ``seq_lens`` (the
    lengths, for cu_seqlens) and ``example_ids`` (indices into ``examples``). Empty examples
    are skipped. Deterministic: ties keep input order.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    lengths = [min(len(e["input_ids"]), max_seq_len) for e in examples]
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    # A max-segment-tree over bins finds the first bin with room in O(log n); unopened bins
    # start full, so "first fit" opens a new bin exactly when no open one has room.
    size = 1
    while size < max(1, len(order)):
        size *= 2
    tree = [0] * size + [max_seq_len if i < len(order) else 0 for i in range(size)]
    for node in range(size - 1, 0, -1):
        tree[node] = max(tree[2 * node], tree[2 * node + 1])
    bins: list[list[int]] = []
    for i in order:
        n, node = lengths[i], 1
        while node < size:
            node = 2 * node if tree[2 * node] >= n else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        tree[node] -= n
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    packs = []
    for members in bins:
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for i in members:
            n = lengths[i]
            input_ids.extend(examples[i]["input_ids"][:n])
            labels.append(IGNORE_INDEX)
            labels.extend(examples[i]["labels"][1:n])
            position_ids.extend(range(n))
        packs.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                      "seq_lens": [lengths[i] for i in members], "example_ids": list(members)})
    return packs
