"""Records -> feature arrays for the drift test.

One forward pass of the champion over each record gives two features: the mean-pooled last
hidden state (the record's embedding) and the mean per-token loss of the response (how novel
the record is to the champion). Cheap descriptors that need no model (token lengths, turns,
character classes / script shares) and the record's category complete the picture.

Records are ingest's normalised payloads, ``{"messages": [{"role", "content"}, ...]}`` or
``{"text": ...}``; the raw shapes ingest accepts (``{query, response, system?}``,
``{input, output}``, ``{instruction, input, output}``, ``{prompt, completion}``) are
normalised here too, so a JSONL file can be featurized directly.

The embeddings are kept at full width: the drift test reduces them by PCA itself, fitted
inside each test (see monitors/drift.py), so no projection learned elsewhere leaks in.

numpy, torch and transformers are imported inside functions only: importing this module (and
monitors.drift, which uses ``Features``) stays cheap.
"""

from __future__ import annotations

import json
import unicodedata
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from pipelines.chat import render_chat

if TYPE_CHECKING:  # numpy is imported inside the functions that compute (STYLE rule 3)
    import numpy as np

DESCRIPTOR_NAMES: tuple[str, ...] = (
    "prompt_tokens",        # templated prompt length, before truncation
    "response_tokens",      # response length (with end-of-turn), before truncation
    "turns",                # messages in the record (1 for plain text)
    "share_cjk",            # Han, kana and hangul characters / all characters
    "share_latin",          # Latin-script letters
    "share_other_letters",  # letters of any other script (Cyrillic, Arabic, Greek, ...)
    "share_digit",
    "share_punct",          # punctuation and symbols, ASCII, CJK and full-width alike
    "share_space",
)
# Bumped whenever a feature's definition changes, so old cached features are refused.
FEATURES_VERSION = 2
PREVIEW_CHARS = 160


class FeatureMismatchError(ValueError):
    """Two feature sets were computed differently and cannot be compared."""


@dataclass
class Features:
    """Per-record feature arrays; row i of every array belongs to record i.

    Attributes:
        embeddings: (n, hidden) float32, mean-pooled last hidden state over the record's tokens.
        descriptors: (n, len(descriptor_names)) float64, see DESCRIPTOR_NAMES.
        descriptor_names: column names of ``descriptors``.
        loss: (n,) float64 mean response-token loss (nats) under the model; NaN = no response token.
        categories: (n,) str array of the records' ``category`` ("" = none), or None when no record had one.
        previews: short human-readable excerpt of each record, for drift explanations.
        meta: how the features were computed (model, max_tokens, compute dtype, version);
            features with different meta are not comparable.
    """

    embeddings: np.ndarray
    descriptors: np.ndarray
    descriptor_names: tuple[str, ...]
    loss: np.ndarray
    categories: np.ndarray | None = None
    previews: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import numpy as np

        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        if self.embeddings.ndim != 2:
            raise ValueError(f"embeddings must be 2-D (n, hidden), got shape {self.embeddings.shape}")
        n = self.embeddings.shape[0]
        self.descriptor_names = tuple(self.descriptor_names)
        self.descriptors = np.asarray(self.descriptors, dtype=np.float64).reshape(n, len(self.descriptor_names))
        self.loss = np.asarray(self.loss, dtype=np.float64).reshape(n)
        if self.categories is not None:
            self.categories = np.asarray(self.categories, dtype=str).reshape(n)
        self.previews = list(self.previews) if self.previews else [""] * n
        if len(self.previews) != n:
            raise ValueError(f"previews has {len(self.previews)} entries for {n} records")

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def take(self, index: Sequence[int] | np.ndarray) -> "Features":
        """The rows ``index`` (in that order) as a new Features."""
        import numpy as np

        idx = np.asarray(index, dtype=np.int64)
        return Features(
            embeddings=self.embeddings[idx], descriptors=self.descriptors[idx],
            descriptor_names=self.descriptor_names, loss=self.loss[idx],
            categories=None if self.categories is None else self.categories[idx],
            previews=[self.previews[i] for i in idx], meta=dict(self.meta),
        )

    @classmethod
    def concat(cls, parts: Sequence["Features"]) -> "Features":
        """Stack feature sets computed the same way (raises FeatureMismatchError otherwise)."""
        import numpy as np

        if not parts:
            raise ValueError("concat needs at least one Features")
        first = parts[0]
        for p in parts[1:]:
            check_comparable(first, p)
        cats = None
        if any(p.categories is not None for p in parts):
            cats = np.concatenate([p.categories if p.categories is not None else np.full(len(p), "")
                                   for p in parts])
        return cls(
            embeddings=np.concatenate([p.embeddings for p in parts]),
            descriptors=np.concatenate([p.descriptors for p in parts]),
            descriptor_names=first.descriptor_names,
            loss=np.concatenate([p.loss for p in parts]),
            categories=cats, previews=[s for p in parts for s in p.previews], meta=dict(first.meta),
        )

    @classmethod
    def empty(cls, hidden: int = 0, meta: dict | None = None) -> "Features":
        import numpy as np

        return cls(np.zeros((0, hidden), np.float32), np.zeros((0, len(DESCRIPTOR_NAMES))),
                   DESCRIPTOR_NAMES, np.zeros(0), None, [], dict(meta or {}))

    def save(self, path: str | Path) -> None:
        """Write an .npz atomically (whole or not at all); no pickles."""
        import numpy as np
        from pipelines.files import atomic_file

        with atomic_file(path, "wb") as fh:
            np.savez(
                fh, embeddings=self.embeddings, descriptors=self.descriptors,
                descriptor_names=np.array(self.descriptor_names, dtype=str), loss=self.loss,
                categories=self.categories if self.categories is not None else np.zeros(0, dtype=str),
                has_categories=np.array(self.categories is not None),
                previews=np.array(self.previews, dtype=str), meta=np.array(json.dumps(self.meta)),
            )

    @classmethod
    def load(cls, path: str | Path) -> "Features":
        import numpy as np

        with np.load(Path(path), allow_pickle=False) as z:
            return cls(
                embeddings=z["embeddings"], descriptors=z["descriptors"],
                descriptor_names=tuple(str(s) for s in z["descriptor_names"]), loss=z["loss"],
                categories=z["categories"] if bool(z["has_categories"]) else None,
                previews=[str(s) for s in z["previews"]], meta=json.loads(str(z["meta"])),
            )


def check_comparable(a: Features, b: Features) -> None:
    """Raise FeatureMismatchError when ``a`` and ``b`` were not computed the same way."""
    problems = []
    if a.descriptor_names != b.descriptor_names:
        problems.append(f"descriptor names differ: {a.descriptor_names} vs {b.descriptor_names}")
    if len(a) and len(b) and a.embeddings.shape[1] != b.embeddings.shape[1]:
        problems.append(f"embedding width differs: {a.embeddings.shape[1]} vs {b.embeddings.shape[1]}")
    for key in ("model", "max_tokens", "compute_dtype", "version"):
        if key in a.meta and key in b.meta and a.meta[key] != b.meta[key]:
            problems.append(f"{key} differs: {a.meta[key]!r} vs {b.meta[key]!r}")
    if problems:
        raise FeatureMismatchError("features are not comparable (recompute both windows with the same "
                                   "model and settings): " + "; ".join(problems))


# ----------------------------------------------------------------------------- records


def as_payload(obj: Any) -> dict:
    """A record as a payload, ``{"messages": [...]}`` or ``{"text": ...}`` (with its ``category``, if any).

    A stored payload passes as it is; any other shape goes through ingest's normaliser, the one lorad has,
    so drift sees the text that ingest stores and training learns from.

    Raises:
        ValueError: the object is not a record ingest would accept; the message says why.
    """
    if isinstance(obj, dict) and set(obj) <= {"messages", "text", "category"} and (
            isinstance(obj.get("text"), str) or isinstance(obj.get("messages"), list)):
        return obj
    from pipelines.ingest.records import InvalidRecord, normalize_record

    try:
        record = normalize_record(obj)
    except InvalidRecord as e:
        raise ValueError(str(e)) from None
    return {**record.payload, "category": record.category} if record.category else dict(record.payload)


def _split_prompt_response(rec: dict) -> tuple[list[dict] | None, str, str]:
    """(prompt messages or None for plain text, full text for descriptors, preview)."""
    if "messages" in rec:
        msgs = rec["messages"]
        prompt = msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs
        text = "\n".join(m["content"] for m in msgs)
        users = [m["content"] for m in prompt if m["role"] == "user"]
        response = msgs[-1]["content"] if len(prompt) < len(msgs) else ""
        preview = (users[-1] if users else "")[:PREVIEW_CHARS - 40]
        preview = f"{preview} => {response}" if response else preview
        return prompt, text, " ".join(preview.split())[:PREVIEW_CHARS]
    text = rec["text"]
    return None, text, " ".join(text.split())[:PREVIEW_CHARS]


# ----------------------------------------------------------------------------- descriptors

# Code-point ranges (inclusive). Anything not classified here falls back to unicodedata.
_CJK = [(0x3040, 0x30FF), (0x3100, 0x312F), (0x3130, 0x318F), (0x31A0, 0x31FF), (0x3400, 0x4DBF),
        (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0x1100, 0x11FF), (0xF900, 0xFAFF), (0xFF66, 0xFF9F),
        (0x20000, 0x3FFFF)]
_LATIN = [(0x41, 0x5A), (0x61, 0x7A), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x24F), (0x1E00, 0x1EFF),
          (0xFF21, 0xFF3A), (0xFF41, 0xFF5A)]
_DIGIT = [(0x30, 0x39), (0xFF10, 0xFF19)]
_PUNCT = [(0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E), (0xA1, 0xBF), (0xD7, 0xD7), (0xF7, 0xF7),
          (0x2010, 0x2027), (0x2030, 0x205E), (0x3001, 0x303F), (0xFF01, 0xFF0F), (0xFF1A, 0xFF20), (0xFF3B, 0xFF40),
          (0xFF5B, 0xFF65), (0xFE30, 0xFE4F)]
_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x2000, 0x200A), (0x2028, 0x2029),
          (0x3000, 0x3000)]


def _in_ranges(cp: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    import numpy as np

    mask = np.zeros(cp.shape, dtype=bool)
    for lo, hi in ranges:
        mask |= (cp >= lo) & (cp <= hi)
    return mask


def char_class_shares(text: str) -> dict[str, float]:
    """Share of CJK / Latin / other-script letters, digits, punctuation+symbols and whitespace.

    Vectorised over code points; the few characters outside the listed ranges are classified
    with unicodedata (letters -> other script, P*/S* -> punct, N* -> digit, Z* -> space).
    Empty text gives all zeros.
    """
    import numpy as np

    keys = ("share_cjk", "share_latin", "share_other_letters", "share_digit", "share_punct", "share_space")
    if not text:
        return dict.fromkeys(keys, 0.0)
    cp = np.frombuffer(text.encode("utf-32-le", errors="replace"), dtype=np.uint32).astype(np.int64)
    masks = [_in_ranges(cp, r) for r in (_CJK, _LATIN, _DIGIT, _PUNCT, _SPACE)]
    counts = {"share_cjk": int(masks[0].sum()), "share_latin": int(masks[1].sum()), "share_other_letters": 0,
              "share_digit": int(masks[2].sum()), "share_punct": int(masks[3].sum()),
              "share_space": int(masks[4].sum())}
    rest = ~np.logical_or.reduce(masks)
    for c in cp[rest]:
        cat = unicodedata.category(chr(int(c)))
        if cat[0] == "L":
            counts["share_other_letters"] += 1
        elif cat[0] in "PS":
            counts["share_punct"] += 1
        elif cat[0] == "N":
            counts["share_digit"] += 1
        elif cat[0] == "Z":
            counts["share_space"] += 1
        # marks, controls, private use: counted in the total only
    n = float(cp.size)
    return {k: counts[k] / n for k in keys}


# ----------------------------------------------------------------------------- tokenisation


def _truncate(prompt: list[int], response: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """Fit prompt + response into max_tokens, keeping what tells the most about the record.

    The response keeps at least half the budget (it is what the loss is about); the prompt
    keeps its head (system/task instructions) and its tail (the actual question and the
    generation prompt right before the response), dropping the middle.
    """
    if len(prompt) + len(response) <= max_tokens:
        return prompt, response
    r_keep = min(len(response), max(max_tokens // 2, max_tokens - len(prompt)))
    p_keep = max_tokens - r_keep
    if len(prompt) > p_keep:
        tail = p_keep // 2
        head = p_keep - tail
        prompt = prompt[:head] + (prompt[len(prompt) - tail:] if tail else [])
    return prompt, response[:r_keep]


@dataclass
class _Encoded:
    ids: list[int]        # prompt + response token ids, truncated
    response_start: int   # index of the first response token in ids
    prompt_tokens: int    # before truncation
    response_tokens: int  # before truncation


def encode_records(records: Sequence[dict], tokenizer: Any, max_tokens: int) -> list[_Encoded]:
    """Tokenise records the way the champion sees them (chat template, response after prompt)."""
    if max_tokens < 8:
        raise ValueError(f"max_tokens must be >= 8, got {max_tokens}")
    prompt_texts, response_texts, plain = [], [], []
    for rec in records:
        prompt_msgs, _, _ = _split_prompt_response(rec)
        if prompt_msgs is None:
            plain.append(True)
            prompt_texts.append("")
            response_texts.append(rec["text"])
            continue
        plain.append(False)
        p = render_chat(tokenizer, prompt_msgs, generation_prompt=True)
        has_response = len(prompt_msgs) < len(rec["messages"])
        full = render_chat(tokenizer, rec["messages"], generation_prompt=False) if has_response else p
        if full.startswith(p):
            prompt_texts.append(p)
            response_texts.append(full[len(p):])
        else:  # a template that rewrites earlier turns: fall back to response + end of sequence
            prompt_texts.append(p)
            response_texts.append(rec["messages"][-1]["content"] + (tokenizer.eos_token or ""))
    # Batched (fast, Rust-side) tokenisation; split points are string boundaries.
    p_ids = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"] if prompt_texts else []
    r_plain = [t for t, pl in zip(response_texts, plain) if pl]
    r_chat = [t for t, pl in zip(response_texts, plain) if not pl]
    plain_ids = iter(tokenizer(r_plain, add_special_tokens=True)["input_ids"] if r_plain else [])
    chat_ids = iter(tokenizer(r_chat, add_special_tokens=False)["input_ids"] if r_chat else [])
    out = []
    for i, pl in enumerate(plain):
        if pl:
            ids = list(next(plain_ids))
            # Plain text: the first token is the context, the rest is scored.
            prompt, response = ids[:1], ids[1:]
        else:
            prompt, response = list(p_ids[i]), list(next(chat_ids))
        n_p, n_r = len(prompt), len(response)
        if not prompt:  # an empty prompt would leave the first response token unpredicted
            prompt, response = response[:1], response[1:]
        prompt, response = _truncate(prompt, response, max_tokens)
        out.append(_Encoded(prompt + response, len(prompt), n_p, n_r))
    return out


# ----------------------------------------------------------------------------- model pass


def resolve_compute_dtype(model: Any, compute_dtype: str = "auto") -> str:
    """Name of the dtype the forward pass runs in ("float32", "bfloat16", ...).

    "auto" keeps the model's own dtype, except an fp32 model on a CPU with native bf16 (AMX /
    AVX512-BF16), which runs under bf16 autocast: about 3x faster there, and both windows are
    featurized the same way (the dtype is recorded in Features.meta and checked).
    """
    from pipelines.hardware import cpu_bf16_matmul

    param = next(model.parameters())
    model_dtype = str(param.dtype).removeprefix("torch.")
    if compute_dtype != "auto":
        return compute_dtype
    if param.device.type == "cpu" and model_dtype == "float32" and cpu_bf16_matmul():
        return "bfloat16"
    return model_dtype


def featurize(records: Sequence[dict] | Iterable[dict], model: Any, tokenizer: Any, *, batch_size: int = 8,
              max_tokens: int = 256, compute_dtype: str = "auto", num_threads: int | None = None,
              model_id: str | None = None) -> Features:
    """Compute drift features for records with one batched forward pass of ``model``.

    Args:
        records: normalised payloads (or any record shape ingest accepts: ``as_payload``).
        model: the champion (base model, with its adapter if any); it is not modified.
        tokenizer: its tokenizer; chats are rendered as training renders them (``pipelines.chat.render_chat``).
        batch_size: full-length (max_tokens) sequences per forward pass; records are sorted by
            length and batched by padded tokens (batch_size * max_tokens), so shorter records
            go more at a time and padding stays small.
        max_tokens: tokens per record seen by the model (see ``_truncate``); descriptors count
            the full lengths.
        compute_dtype: "auto" (see ``resolve_compute_dtype``), or "float32", "bfloat16", "float16".
        num_threads: torch CPU threads for this call (restored afterwards); None = leave as set.
            On a CPU shared with other busy processes, 1 thread can be several times faster
            than 2 (OpenMP threads wait for each other at every op).
        model_id: identity recorded in ``meta["model"]`` (e.g. "base@champion-v3"); features
            with different ids are refused as incomparable. Default: the model's name or path.

    Returns:
        Features with embeddings (mean-pooled last hidden state, float32) and the mean
        response-token loss, both from the same logits pass.
    """
    import numpy as np
    import torch

    recs = [as_payload(r) for r in records]
    n = len(recs)
    run_dtype = resolve_compute_dtype(model, compute_dtype)
    default_id = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    meta = {"model": model_id or default_id,
            "max_tokens": int(max_tokens), "compute_dtype": run_dtype, "version": FEATURES_VERSION}
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
    if n == 0:
        return Features.empty(hidden, meta)

    descriptors = np.zeros((n, len(DESCRIPTOR_NAMES)))
    previews, cats = [], []
    for i, rec in enumerate(recs):
        _, text, preview = _split_prompt_response(rec)
        shares = char_class_shares(text)
        descriptors[i, 2] = len(rec["messages"]) if "messages" in rec else 1
        descriptors[i, 3:] = [shares[k] for k in DESCRIPTOR_NAMES[3:]]
        previews.append(preview)
        cats.append(rec.get("category", ""))
    encoded = encode_records(recs, tokenizer, max_tokens)
    for i, enc in enumerate(encoded):
        descriptors[i, 0], descriptors[i, 1] = enc.prompt_tokens, enc.response_tokens

    param = next(model.parameters())
    device = param.device
    model_dtype = str(param.dtype).removeprefix("torch.")
    autocast = (torch.autocast(device_type=device.type, dtype=getattr(torch, run_dtype))
                if run_dtype != model_dtype else nullcontext())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    embeddings = np.zeros((n, hidden), dtype=np.float32) if hidden else None
    loss = np.full(n, np.nan)
    order = sorted(range(n), key=lambda i: len(encoded[i].ids))
    old_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast:
            for batch in _batches(order, [len(e.ids) for e in encoded], batch_size * max_tokens):
                emb, nll = _forward_batch(model, [encoded[i] for i in batch], pad_id, device)
                if embeddings is None:
                    embeddings = np.zeros((n, emb.shape[1]), dtype=np.float32)
                embeddings[batch] = emb
                loss[batch] = nll
    finally:
        if num_threads:
            torch.set_num_threads(old_threads)
        if was_training:
            model.train()
    return Features(embeddings=embeddings, descriptors=descriptors, descriptor_names=DESCRIPTOR_NAMES, loss=loss,
                    categories=np.array(cats, dtype=str) if any(cats) else None, previews=previews, meta=meta)


def _batches(order: list[int], lengths: list[int], token_budget: int) -> Iterator[list[int]]:
    """Consecutive runs of ``order`` (sorted by length) whose padded size fits ``token_budget``.

    Short records then share a forward pass many at a time (per-call overhead dominates for
    them on CPU) while memory stays bounded by the same budget as batch_size full-length rows.
    """
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) + 1) * max(lengths[i], lengths[batch[-1]]) > token_budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _forward_batch(model: Any, batch: list[_Encoded], pad_id: int, device: Any) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and mean response loss for one right-padded batch."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from pipelines.models import forward_keeping_logits

    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        mask[row, :len(e.ids)] = 1
    ids, mask = ids.to(device), mask.to(device)
    # Logits are only needed from the position before the earliest response token on: the
    # LM head over a 50k-150k vocabulary is a large share of the compute for long prompts.
    keep = width - (min(e.response_start for e in batch) - 1)
    # No attention mask in the forward: rows are padded on the right, so under the causal mask no real token sees
    # a pad (pipelines.evaluate.example_losses does the same); the causal attention kernel is the faster one. The
    # mask still picks the real tokens to pool below.
    kwargs = {"input_ids": ids, "output_hidden_states": True, "use_cache": False}
    out, _ = forward_keeping_logits(model, keep, **kwargs)  # without logits_to_keep: full logits
    logits = out.logits
    offset = width - logits.shape[1]  # logits[:, j] predicts token offset + j + 1
    last = out.hidden_states[-1].float()
    m = mask.unsqueeze(-1).to(last.dtype)
    emb = (last * m).sum(1) / m.sum(1).clamp_min(1.0)
    nll = np.full(len(batch), np.nan)
    for row, e in enumerate(batch):
        if e.response_start >= len(e.ids):
            continue
        lo, hi = e.response_start - 1 - offset, len(e.ids) - 1 - offset
        target = ids[row, e.response_start:len(e.ids)]
        nll[row] = float(F.cross_entropy(logits[row, lo:hi].float(), target, reduction="mean"))
    return emb.cpu().numpy(), nll
