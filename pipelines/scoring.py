"""Task metrics on answers: which kind a record is, and how its answer is scored.

Pure Python (no model, no numpy), so every metric is tested with known answers:

- *choice* records (a prompt listing options "A. ..", "B. .." up to "Z. .." and a one-letter answer): accuracy, the
  option with the highest log-likelihood being the model's answer (as lm-evaluation-harness scores
  multiple choice; the likelihoods come from pipelines/evaluate.py);
- *label* records (a short answer: "正确", a class name): accuracy, exact match of the normalised
  generated answer;
- *extraction* records (a list of spans, entities or keywords): token-level F1;
- *free* text: ROUGE-L F1.

Tokens are words for alphabetic scripts and single characters for Chinese (and other CJK) text, so F1
and ROUGE-L are character-level on Chinese. They are written here (SQuAD's F1 and ROUGE-L's LCS are
a few lines each) because rouge-score's tokenizer drops every non-ASCII character (a Chinese answer
would score 0 against anything) and would bring nltk and absl along.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

KINDS = ("choice", "label", "extraction", "free")
METRIC_OF_KIND = {"choice": "accuracy", "label": "accuracy", "extraction": "f1", "free": "rouge_l"}
METRICS = ("accuracy", "f1", "rouge_l")

# Option lines: "A. text", "(B) text", "C、text", "D：text" at the start of a line.
_OPTION = re.compile(r"^\s*[(（]?([A-Z])[)）]?\s*[.．、:：)]\s*(\S.*)$", re.M)
_LETTER = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")
_ITEM_SPLIT = re.compile(r"[\n;；,，、|]+")
_LIST_MARK = re.compile(r"[\n;；、|]")
_SENTENCE_END = re.compile(r"[.!?。！？]\s*\S")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]|[^\W_]+")


def prompt_and_answer(payload: dict) -> tuple[list[dict], str] | None:
    """(the messages before the last assistant turn, that turn's text), or None for a text record."""
    messages = payload.get("messages")
    if not messages:
        return None
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        return None
    return messages[:last], str(messages[last].get("content") or "")


def options_of(prompt: str) -> list[str]:
    """The option letters a prompt lists, consecutive from A (or from B: LawBench lost some A options), or []
    when it lists fewer than two."""
    letters = {m.group(1) for m in _OPTION.finditer(prompt)}
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    start = 0 if "A" in letters else 1
    out = []
    for want in alphabet[start:]:
        if want not in letters:
            break
        out.append(want)
    return out if len(out) >= 2 else []


def _gold_letter(gold: str) -> str | None:
    """The option letter a gold answer is ("B", "(B)", "b."), or None."""
    m = re.fullmatch(r"\s*[(（]?([A-Z])[)）.．]?\s*", unicodedata.normalize("NFKC", gold))
    return m.group(1) if m else None


def answer_letter(text: str) -> str | None:
    """The first standalone option letter of an answer ("答案：B", "(C)", "A. 合同无效" -> B, C, A)."""
    m = _LETTER.search(unicodedata.normalize("NFKC", text))
    return m.group(1) if m else None


def repeated_answers(payloads: list[dict]) -> set[str]:
    """The normalised final answers that occur more than once in a set: class labels repeat, replies in a
    conversation rarely do (``record_kind``'s ``labels``)."""
    seen: dict[str, int] = {}
    for p in payloads:
        pa = prompt_and_answer(p)
        if pa is not None:
            key = normalize(pa[1])
            seen[key] = seen.get(key, 0) + 1
    return {k for k, n in seen.items() if n > 1}


def record_kind(payload: dict, override: str | None = None, labels: set[str] | None = None) -> str | None:
    """How a record's answer is scored: one of KINDS, or None when it has no answer to score (text records).

    Args:
        override: a kind forced for the record's category (eval.score_kinds); "choice" still needs options.
        labels: the answers that repeat in the record's set (``repeated_answers``); when given, a short answer
            is a label only if it is one of them (so "hi there" in a chat set is free text, "positive" is not).
    """
    pa = prompt_and_answer(payload)
    if pa is None:
        return None
    prompt, answer = pa
    prompt_text = "\n".join(str(m.get("content") or "") for m in prompt)
    opts = options_of(prompt_text)
    is_choice = bool(opts) and _gold_letter(answer) in opts
    if override:
        return "label" if override == "choice" and not is_choice else override
    if is_choice:
        return "choice"
    words = tokens(answer)
    if not words:
        return "label" if _gold_letter(answer) else "free"
    if _SENTENCE_END.search(answer):
        return "free"
    items = [s for s in (x.strip() for x in _ITEM_SPLIT.split(answer)) if s]
    # a list: spans separated by 、 ; | or lines, or at least three comma-separated ones ("yes, I am" is a reply)
    listed = len(items) >= 3 or (len(items) == 2 and _LIST_MARK.search(answer.strip()) is not None)
    if listed and all(len(tokens(s)) <= 8 for s in items):
        return "extraction"
    cjk = sum(1 for w in words if _CJK.fullmatch(w))
    short = len(words) - cjk <= 4 and cjk <= 8   # a few words, or a short Chinese phrase
    if short and (labels is None or normalize(answer) in labels):
        return "label"
    return "free"


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation and symbols dropped, English articles dropped, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c)[0] in "PSZC" else c for c in text)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def tokens(text: str) -> list[str]:
    """Normalised tokens: a word per run of letters/digits, a character per CJK character."""
    return _TOKEN.findall(normalize(text))


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised answers are equal; a one-letter gold (an option) matches the answer's letter.

    Only the first line of a generated answer counts, so "正确\n因为..." matches the label "正确".
    """
    first = prediction.strip().splitlines()[0] if prediction.strip() else ""
    letter = _gold_letter(gold)
    if letter:
        return float(answer_letter(first) == letter)
    g, p = normalize(gold), normalize(first)
    return float(p == g or (bool(g) and _CJK.search(g) is not None and p.startswith(g) and len(p) <= len(g) + 2))


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD-style F1 of the shared tokens (bags, with counts); 1.0 when both are empty."""
    p, g = tokens(prediction), tokens(gold)
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (one row of the dynamic programme at a time)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F1: the longest common subsequence of tokens over the prediction's and the gold's lengths."""
    p, g = tokens(prediction), tokens(gold)
    if not p or not g:
        return float(p == g)
    lcs = _lcs(p, g)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(g)
    return 2 * precision * recall / (precision + recall)


def score_answer(kind: str, prediction: str, gold: str) -> float:
    """The score in [0, 1] of a generated answer for a record of ``kind`` (choice and label: exact match)."""
    if kind in ("choice", "label"):
        return exact_match(prediction, gold)
    if kind == "extraction":
        return token_f1(prediction, gold)
    if kind == "free":
        return rouge_l(prediction, gold)
    raise ValueError(f"unknown record kind {kind!r}; kinds: {', '.join(KINDS)}")


def choose_option(log_likelihoods: dict[str, float]) -> str:
    """The option with the highest log-likelihood (the first of equals, in letter order)."""
    return max(sorted(log_likelihoods), key=lambda k: log_likelihoods[k])

