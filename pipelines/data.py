"""Training snapshots, and the token sequences a run trains on.

A snapshot is the frozen set of records one training run sees, written once and never
changed, with one role per record:
  new      train-split records that were not yet in any snapshot as 'new'
  replay   a seeded sample of older train records (those already learned), so the adapter
           does not forget them; replay / (new + replay) = replay_fraction, counted in records
           or (data.replay_unit = chars) in characters of text
  holdout  holdout-split records not yet in any snapshot as 'holdout': the new-data evaluation
           set (never trained on; the split is a stable hash, so a record never moves)
Its id is the sha256 of the sorted (record_id, role) pairs: the same set always gets the same
id, and writing it again returns the existing snapshot. Choosing the records is pure
(``select_snapshot``, on plain values); daemon/runs.py reads them from the state and writes it.

Tokenisation renders chat records with pipelines.chat (the model's chat template, else ChatML)
and labels only the assistant turns (prompt tokens are -100). Packing puts several records in one sequence with
position ids restarting at 0 for each, so varlen attention (flash/sdpa with position ids)
keeps them apart; the first label of each packed record is -100 so no loss crosses a boundary.

Only the stdlib is imported at module level; tokenizers are passed in.
"""

from __future__ import annotations

import hashlib
import random
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from daemon.config import DataConfig
from pipelines.chat import render_chat

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding, record boundaries)
ROLES = ("new", "replay", "holdout")

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
    """Keep at most ratio x (the median category's count) records per category (seeded sample).

    The median, not the smallest: one small category (a few dozen raw text records beside a few hundred
    per task) would otherwise cap every other category near its own size and leave most of a batch pending.
    """
    kept: list[int] = []
    dropped: dict[str, int] = {}
    cap = max(1, int(ratio * statistics.median(len(v) for v in ids_by_category.values()))) if ratio > 0 else None
    for category in sorted(ids_by_category, key=lambda c: (c is not None, c or "")):
        ids = ids_by_category[category]
        if cap is not None and len(ids) > cap:
            dropped[category or "(none)"] = len(ids) - cap
            ids = sorted(rng.sample(ids, cap))
        kept.extend(ids)
    return sorted(kept), dropped


def select_snapshot(new_rows: Sequence[tuple[int, str | None, int]], holdout: Sequence[int],
                    all_holdout: Sequence[tuple[int, str | None]], learned_chars: dict[int, int], cfg: DataConfig, *,
                    seed: int, since: float | None = None, replay_fraction: float | None = None,
                    category_cap_ratio: float | None = None) -> Snapshot:
    """Choose a snapshot's records from plain values: the pure part of ``daemon.runs.build_snapshot``.

    Args:
        new_rows: (id, category, characters) of the pending train records, by id.
        holdout: ids of the pending holdout records.
        all_holdout: (id, category) of every holdout record; read only when ``holdout`` is empty.
        learned_chars: {id: characters} of the train records already learned (the replay candidates).
        seed / since / replay_fraction / category_cap_ratio: as ``build_snapshot``'s.

    Raises:
        NothingToSnapshot: no pending train record.
    """
    replay_fraction = cfg.replay_fraction if replay_fraction is None else replay_fraction
    cap_ratio = cfg.category_cap_ratio if category_cap_ratio is None else category_cap_ratio
    if not 0.0 <= replay_fraction < 1.0:
        raise ValueError(f"replay_fraction must be in [0, 1), got {replay_fraction}")
    if cap_ratio < 0:
        raise ValueError(f"category_cap_ratio must be >= 0 (0 = no cap), got {cap_ratio}")
    if not new_rows:
        raise NothingToSnapshot("no pending train records: every train record is already in a snapshot as "
                                "'new'; ingest new data first" + (f" (since={since})" if since is not None else ""))
    holdout = tuple(holdout)

    rng = random.Random(seed)
    by_category: dict[str | None, list[int]] = {}
    new_chars_of: dict[int, int] = {}
    for rid, category, n_chars in new_rows:
        by_category.setdefault(category, []).append(rid)
        new_chars_of[rid] = n_chars
    new, dropped = _capped(by_category, cap_ratio, rng)
    reused = 0
    if not holdout:
        # Only train records are pending (left by a category cap or a failed run): their categories' holdout,
        # never trained on, judges this candidate too, so the evaluation has data.
        categories = set(by_category)
        holdout = tuple(rid for rid, category in all_holdout if category in categories)
        reused = len(holdout)

    older = sorted(learned_chars)
    new_chars = sum(new_chars_of[rid] for rid in new)
    replay_info: dict = {}
    if cfg.replay_unit == "chars":
        budget = round(replay_fraction / (1.0 - replay_fraction) * new_chars)
        replay = tuple(sorted(fill_budget([(rid, learned_chars[rid]) for rid in older], budget, rng)))
        wanted = len(replay)
        replay_info = {"replay_unit": "chars", "replay_chars_wanted": budget,
                       "replay_chars": sum(learned_chars[rid] for rid in replay), "new_chars": new_chars}
    else:
        wanted = round(replay_fraction / (1.0 - replay_fraction) * len(new))
        replay = tuple(sorted(rng.sample(older, min(wanted, len(older)))))
    floor_info: dict = {}
    if cfg.min_domain_fraction > 0 and replay:
        kept = domain_floor([(rid, learned_chars[rid]) for rid in replay], new_chars, cfg.min_domain_fraction, rng)
        replay_chars = sum(learned_chars[rid] for rid in kept)
        floor_info = {"min_domain_fraction": cfg.min_domain_fraction, "replay_dropped_by_floor": len(replay) - len(kept),
                      "domain_fraction_chars": round(new_chars / max(1, new_chars + replay_chars), 4)}
        replay = tuple(sorted(kept))

    pairs = [(r, "new") for r in new] + [(r, "replay") for r in replay] + [(r, "holdout") for r in holdout]
    manifest = {
        "seed": seed, "since": since, "replay_fraction": replay_fraction, "category_cap_ratio": cap_ratio,
        "holdout_fraction": cfg.holdout_fraction,
        "max_record_id": max(r for r, _ in pairs),
        "categories": {c or "(none)": len(v) for c, v in sorted(by_category.items(), key=lambda kv: kv[0] or "")},
        "capped": dropped, "replay_wanted": wanted, "replay_available": len(older), **replay_info, **floor_info,
        **({"holdout_reused": reused} if reused else {}),
    }
    return Snapshot(snapshot_id(pairs), tuple(new), replay, holdout, manifest)


def domain_floor(replay: Sequence[tuple[int, int]], new_chars: int, floor: float, rng: random.Random) -> list[int]:
    """Replay record ids kept so that new (domain) records make at least ``floor`` of the training text.

    The share counts characters, not records: a few long replayed documents can otherwise drown a batch
    of short new answers even when ``replay_fraction`` holds by count. Records are kept in a seeded
    random order while they fit in the replay budget ``new_chars * (1 - floor) / floor``; ones that do
    not fit are skipped, so shorter ones after them may still be kept.

    Args:
        replay: (record id, characters) of the sampled replay records.
        new_chars: characters of the snapshot's new records.
        floor: minimum share of new-record characters, in (0, 1]; 1 keeps no replay.
    """
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"min_domain_fraction must be in (0, 1], got {floor}")
    return fill_budget(replay, new_chars * (1.0 - floor) / floor, rng)


def fill_budget(items: Sequence[tuple[int, int]], budget: float, rng: random.Random) -> list[int]:
    """Ids of (id, size) items taken in a seeded random order while they fit in ``budget`` (total size);
    an item that does not fit is skipped, so smaller ones after it may still be taken."""
    order = list(items)
    rng.shuffle(order)
    kept, used = [], 0
    for rid, n in order:
        if used + n <= budget:
            kept.append(rid)
            used += n
    return kept


# ----------------------------------------------------------------------------- tokenisation


def _assistant_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns to learn.

    A span runs from the end of the prompt rendered with the generation prompt to the end of
    the conversation rendered up to that turn (so it includes the end-of-turn token). Turns
    where the template is not prefix-consistent (some templates drop earlier reasoning) are
    left unlabelled; the last turn must be consistent.
    """
    full = render_chat(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render_chat(tokenizer, messages[:i], generation_prompt=True)
        upto = full if i == len(messages) - 1 else render_chat(tokenizer, messages[:i + 1],
                                                               generation_prompt=False)
        if upto.startswith(prefix) and full.startswith(upto) and len(upto) > len(prefix):
            spans.append((len(prefix), len(upto)))
        elif i == len(messages) - 1:
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation, "
                             "so the assistant's tokens cannot be told apart from the prompt's")
    return full, spans


def tokenize_record(payload: dict, tokenizer: Any, max_seq_len: int) -> dict:
    """Token ids and labels of one stored record, truncated to max_seq_len.

    Chat records are rendered by ``pipelines.chat.render_chat`` (the tokenizer's template, else ChatML) and
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
    text, spans = _assistant_spans(tokenizer, payload["messages"])
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


# ----------------------------------------------------------------------------- training options


def difficulty_stages(losses: Sequence[float], stages: int) -> list[int]:
    """Stage (0 = easiest) of each example: equal-count quantiles of its loss; ties keep input order.

    Non-finite losses count as the hardest.
    """
    import math

    if stages < 1:
        raise ValueError(f"curriculum stages must be >= 1, got {stages}")
    n = len(losses)
    order = sorted(range(n), key=lambda i: (not math.isfinite(losses[i]), losses[i] if math.isfinite(losses[i])
                                            else 0.0, i))
    out = [0] * n
    for rank, i in enumerate(order):
        out[i] = rank * stages // max(1, n)
    return out


def annotate_examples(examples: list[dict], *, category_weights: dict[str, float] | None = None,
                      text_first: bool = False, difficulty: Sequence[float] | None = None,
                      stages: int = 1) -> list[dict]:
    """Mark tokenized examples with the keys the trainer reads: ``weight``, ``phase``, ``stage``.

    Args:
        examples: dicts from ``tokenize_record`` plus ``category`` and ``text`` (True for raw text records).
        category_weights: loss weight per category; examples of other categories weigh 1.
        text_first: raw text records form phase 0 (continued pre-training), chat records phase 1.
        difficulty: the champion's loss on each example; with it, ``stage`` is the example's quantile
            (``stages`` of them, computed within each phase).

    Examples with weight 0 are dropped (they could not contribute). Returns new dicts.
    """
    weights = category_weights or {}
    out = []
    for i, ex in enumerate(examples):
        ex = dict(ex)
        w = weights.get(ex.get("category") or "", 1.0)
        if w == 0:
            continue
        if w != 1.0:
            ex["weight"] = w
        ex["phase"] = (0 if ex.get("text") else 1) if text_first else 0
        if difficulty is not None:
            ex["_difficulty"] = difficulty[i]
        out.append(ex)
    if difficulty is not None:
        for phase in {ex["phase"] for ex in out}:
            members = [ex for ex in out if ex["phase"] == phase]
            for ex, stage in zip(members, difficulty_stages([ex["_difficulty"] for ex in members], stages)):
                ex["stage"] = stage
        for ex in out:
            del ex["_difficulty"]
    return out


def stage_schedule(groups: Sequence[Sequence[Sequence[int]]], n_micro: int, seed: int) -> list[int]:
    """The order of ``n_micro`` micro-batches over phases and curriculum stages.

    ``groups[p][s]`` lists the batch indices of stage ``s`` in phase ``p``. Phases run one after the
    other, each taking a share of the micro-batches proportional to its batches (so a short run still
    reaches the last phase); within a phase, each pass goes through its stages easiest first, in a
    seeded random order inside each stage, and passes repeat until the phase's share is used.
    """
    sizes = [sum(len(stage) for stage in phase) for phase in groups]
    total = sum(sizes)
    if total == 0 or n_micro <= 0:
        return []
    # Largest-remainder apportionment of n_micro over the phases.
    exact = [n_micro * size / total for size in sizes]
    share = [int(x) for x in exact]
    for p in sorted(range(len(groups)), key=lambda p: -(exact[p] - share[p]))[:n_micro - sum(share)]:
        share[p] += 1
    for p in range(len(groups)):   # a short run still reaches every phase: one micro-batch from the largest share
        if sizes[p] and not share[p] and max(share) > 1:
            share[share.index(max(share))] -= 1
            share[p] += 1
    order: list[int] = []
    for p, phase in enumerate(groups):
        taken, epoch = 0, 0
        while taken < share[p] and sizes[p]:
            rng = random.Random(seed * 1_000_003 + p * 7919 + epoch)
            for stage in phase:
                batch = list(stage)
                rng.shuffle(batch)
                take = batch[:share[p] - taken]
                order.extend(take)
                taken += len(take)
            epoch += 1
    return order
