"""Tokenized examples -> training sequences (packed or not) -> micro-batches of sequence indices -> padded tensors."""

from __future__ import annotations

from typing import Any

from pipelines.data import IGNORE_INDEX as IGNORE  # the one ignore index


def make_sequences(examples: list[dict], max_seq_len: int, packing: bool) -> list[dict]:
    """Turn tokenized examples into training sequences with input_ids, labels and position_ids."""
    from pipelines.data import pack

    if packing:
        packs = pack(examples, max_seq_len)
        seqs = [{"input_ids": list(p["input_ids"]), "labels": list(p["labels"]), "position_ids": list(p["position_ids"])}
                for p in packs]
        members = [list(zip(p["example_ids"], p["seq_lens"])) for p in packs]
    else:
        seqs = [{"input_ids": ex["input_ids"][:max_seq_len], "labels": list(ex["labels"][:max_seq_len]),
                 "position_ids": list(range(min(len(ex["input_ids"]), max_seq_len)))} for ex in examples]
        members = [[(i, len(seq["input_ids"]))] for i, seq in enumerate(seqs)]
    if any(ex.get("weight", 1.0) != 1.0 for ex in examples):   # train.category_weights: per-token loss weights
        for seq, parts in zip(seqs, members):
            seq["weights"] = [examples[i].get("weight", 1.0) for i, n in parts for _ in range(n)]
    # The first token of every example is never a target: in a pack, it would be "predicted" from the end of
    # the previous example, a cross-example signal that packing must not create.
    for s in seqs:
        for t, p in enumerate(s["position_ids"]):
            if p == 0:
                s["labels"][t] = IGNORE
    return seqs


def make_batches(sequences: list[dict], micro_batch_size: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of similar length (less padding), in a fixed order."""
    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i]["input_ids"]), i))
    return [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


def make_staged_batches(examples: list[dict], max_seq_len: int, packing: bool, micro_batch_size: int
                        ) -> tuple[list[dict], list[list[int]], list[list[list[int]]] | None]:
    """Sequences and micro-batches, kept apart by the examples' ``phase`` and curriculum ``stage``.

    Returns (sequences, batches, groups): ``groups[p][s]`` lists the batches of stage s in phase p (see
    ``pipelines.data.stage_schedule``), or None when no example carries a phase or stage, in which case
    this is exactly ``make_sequences`` + ``make_batches``.
    """
    if not any(ex.get("phase") or ex.get("stage") for ex in examples):
        sequences = make_sequences(examples, max_seq_len, packing)
        return sequences, make_batches(sequences, micro_batch_size), None
    keys = sorted({(ex.get("phase", 0), ex.get("stage", 0)) for ex in examples})
    sequences: list[dict] = []
    batches: list[list[int]] = []
    groups: dict[int, list[list[int]]] = {}
    for phase, stage in keys:
        part = make_sequences([ex for ex in examples if (ex.get("phase", 0), ex.get("stage", 0)) == (phase, stage)],
                              max_seq_len, packing)
        first = len(batches)
        batches.extend([[len(sequences) + i for i in b] for b in make_batches(part, micro_batch_size)])
        sequences.extend(part)
        groups.setdefault(phase, []).append(list(range(first, len(batches))))
    return sequences, batches, [groups[p] for p in sorted(groups)]


def labelled_weight(sequence: dict) -> float:
    """The loss weight of a sequence's targets: its labelled tokens, each counted with its loss weight."""
    weights = sequence.get("weights")
    if weights is None:
        return float(sum(1 for lab in sequence["labels"][1:] if lab != IGNORE))
    return float(sum(w for lab, w in zip(sequence["labels"][1:], weights[1:]) if lab != IGNORE))


def collate_weights(sequences: list[dict], idx: list[int], width: int):
    """[rows, width] float32 per-token loss weights of a micro-batch (pads weigh 0; their labels are -100)."""
    import torch

    out = torch.zeros((len(idx), width), dtype=torch.float32)
    for j, i in enumerate(idx):
        w = sequences[i].get("weights") or [1.0] * len(sequences[i]["input_ids"])
        out[j, :len(w)] = torch.tensor(w, dtype=torch.float32)
    return out


def collate_cpu(sequences: list[dict], idx: list[int], pad_id: int):
    import torch

    rows = [sequences[i] for i in idx]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    real = 0
    for j, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[j, :n] = torch.tensor(r["input_ids"])
        labels[j, :n] = torch.tensor(r["labels"])
        pos[j, :n] = torch.tensor(r["position_ids"])
        pos[j, n:] = torch.arange(width - n)
        real += n
    return ids, labels, pos, real


def collate(sequences: list[dict], idx: list[int], pad_id: int, device: Any):
    """Pad a micro-batch; pads get label -100 and their own position run (a separate 'packed' segment)."""
    ids, labels, pos, real = collate_cpu(sequences, idx, pad_id)
    return ids.to(device), labels.to(device), pos.to(device), real


def segment_bounds(pos) -> list[int]:
    """Offsets where each packed example (or pad run) starts in the flattened micro-batch, plus the total.

    Every position run restarts at 0 (make_sequences and collate guarantee it), so the starts are
    exactly the zeros of ``pos``; this is the ``cu_seqlens`` of varlen attention.
    """
    flat = pos.reshape(-1)
    starts = (flat == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return starts + [flat.numel()]
