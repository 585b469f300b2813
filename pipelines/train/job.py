"""The job form: ``python -m pipelines.train RUN_DIR`` runs (or resumes) the run frozen in ``RUN_DIR/job.json``.

This is what the daemon's job runner supervises in a subprocess: exit 0 with result.json, 1 with error.json
(the reason), 75 (``EXIT_INTERRUPTED``) after a checkpointed stop; running it again on the same folder resumes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import pipelines.train.distributed as distributed
from pipelines.data import IGNORE_INDEX
from pipelines.files import atomic_file
from pipelines.train.loop import train
from pipelines.train.loss import chunked_loss_sum
from pipelines.train.protocol import (EXIT_INTERRUPTED, INTERRUPTED_MARKER, DistributedError, Interrupted,
                                      TrainingError, TrainOutcome)


def tokenize_payloads(payloads: Iterable[dict], tokenizer: Any, max_seq_len: int) -> list[dict]:
    """Chat-template and label each record (completion-only for chat, all tokens for text)."""
    from pipelines.data import tokenize_record

    out = []
    for p in payloads:
        ex = tokenize_record(p, tokenizer, max_seq_len)
        if ex is not None and any(lab != IGNORE_INDEX for lab in ex["labels"]):
            ex["category"], ex["text"] = p.get("category"), "text" in p   # for the training options
            out.append(ex)
    return out


def champion_losses(model: Any, examples: list[dict], parent_adapter: Path | None, run_dir: Path,
                    chunk_tokens: int = 2048) -> tuple[list[float], Any]:
    """Each example's mean response loss under the champion (base + parent adapter), for the curriculum.

    Scored once per run and kept in ``run_dir/curriculum.json``, so a resumed run orders its data
    exactly as before. Returns (losses, the base model without the parent adapter attached).
    """
    import torch

    cache = run_dir / "curriculum.json"
    lengths = [len(ex["input_ids"]) for ex in examples]
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("lengths") == lengths:
            return [float(x) for x in saved["losses"]], model
    scorer = model
    if parent_adapter is not None:
        from peft import PeftModel

        scorer = PeftModel.from_pretrained(model, str(parent_adapter))
    device = next(model.parameters()).device
    scorer.eval()
    losses = []
    with torch.no_grad():
        for ex in examples:   # one at a time: chunked loss keeps memory flat whatever the vocabulary
            ids = torch.tensor([ex["input_ids"]], device=device)
            labels = torch.tensor([ex["labels"]], device=device)
            pos = torch.arange(ids.shape[1], device=device)[None]
            n = int((labels[0, 1:] != IGNORE_INDEX).sum())
            total = chunked_loss_sum(scorer, ids, labels, pos, chunk_tokens=chunk_tokens)
            losses.append(float(total) / n if n else float("nan"))
    if parent_adapter is not None:
        model = scorer.unload()   # LoRA layers out again: attach_lora wraps the plain base
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp-{os.getpid()}")   # one per process: every distributed rank scores and writes
    tmp.write_text(json.dumps({"lengths": lengths, "losses": losses}))
    os.replace(tmp, cache)
    return losses, model


def apply_training_options(examples: list[dict], cfg: Any, model: Any, parent_adapter: Path | None,
                           run_dir: Path) -> tuple[list[dict], Any]:
    """Mark examples for train.category_weights, train.continued_pretraining and train.curriculum."""
    from daemon.config import parse_category_weights
    from pipelines.data import annotate_examples

    t = cfg.train
    weights = parse_category_weights(t.category_weights)
    text_first = t.continued_pretraining == "first"
    difficulty = None
    if t.curriculum == "easy_to_hard":
        difficulty, model = champion_losses(model, examples, parent_adapter, run_dir)
    if not weights and not text_first and difficulty is None:
        return examples, model
    marked = annotate_examples(examples, category_weights=weights, text_first=text_first, difficulty=difficulty,
                               stages=t.curriculum_stages)
    if not marked:
        raise TrainingError(f"train.category_weights {t.category_weights} leave no training example (weight 0)")
    return marked, model


def write_job(run_dir: Path, *, payloads: Iterable[dict], config: dict, parent_adapter: str | None,
              max_steps: int | None = None) -> Path:
    """Freeze a run: its data (JSONL of payloads) and its full config, so any process can run or resume it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = run_dir / "data.jsonl"
    if not data.exists():
        with atomic_file(data) as f:
            for p in payloads:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
    job = {"config": config, "parent_adapter": parent_adapter, "max_steps": max_steps, "data": data.name}
    (run_dir / "job.json").write_text(json.dumps(job, indent=2))
    return run_dir / "job.json"


def keep_freed_memory() -> bool:
    """Serve every allocation from the process heap and keep freed memory there (glibc malloc; Linux).

    A CPU training step allocates and frees the same large activations each step. glibc maps each
    allocation above its threshold fresh from the kernel and unmaps it when freed, so every step pays a
    page fault per 4 KiB again. With mmap and trimming off the pages stay in the process and are reused. For a process that exists to train
    on CPU (its memory then stays at its peak); returns whether glibc accepted the settings.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4   # glibc's mallopt parameter numbers (malloc.h)
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def run_job(run_dir: Path, *, progress: bool = True, on_step: Callable[[dict], None] | None = None,
            should_stop: Callable[[], bool] | None = None, dist: Any = None,
            own_process: bool = False) -> TrainOutcome:
    """Run (or resume) the job frozen in ``run_dir/job.json`` (``dist``: this process's torchrun rank).

    ``own_process``: this process exists for the job (``python -m pipelines.train``): on CPU its allocator
    then keeps freed memory for reuse (``keep_freed_memory``).
    """
    from daemon.config import build_config
    from pipelines.models import load_for
    from pipelines.train.distributed import load_kwargs

    run_dir = Path(run_dir)
    job = json.loads((run_dir / "job.json").read_text())
    cfg = build_config(job["config"])
    # An explicit float32 (or float16) model.dtype means matmuls in that dtype; "auto" lets the speed plan use
    # bf16 autocast over fp32 weights on a CPU with bf16 units (hardware plan's train_compute), as it does on GPUs.
    autocast = "auto" if cfg.model.dtype in ("auto", "bfloat16") else False
    # model.dtype/quantization "auto" and train.micro_batch_size 0 become this machine's plan (load_for's "train")
    base = load_for("train", cfg, placement=lambda m: load_kwargs(dist, device=m.device, dtype=m.dtype,
                                                                   quantization=m.quantization))
    model, tokenizer, cfg = base.model, base.tokenizer, base.cfg
    if own_process and next(model.parameters()).device.type == "cpu":
        keep_freed_memory()   # after loading: the weights' one-off buffers still go back to the system
    with open(run_dir / job["data"], encoding="utf-8") as f:
        payloads = [json.loads(line) for line in f if line.strip()]
    examples = tokenize_payloads(payloads, tokenizer, cfg.data.max_seq_len)
    if len(examples) < len(payloads):
        skipped = len(payloads) - len(examples)
        why = (f"{skipped} of {len(payloads)} records have no answer tokens within data.max_seq_len "
               f"({cfg.data.max_seq_len} tokens: the prompt fills it, or the answer is empty)")
        if not examples:
            raise TrainingError(f"no training examples: {why}; raise data.max_seq_len or lower "
                                f"data.max_prompt_tokens")
        print(f"lorad train: skipped {why}", file=sys.stderr, flush=True)
    parent = Path(job["parent_adapter"]) if job.get("parent_adapter") else None
    examples, model = apply_training_options(examples, cfg, model, parent, run_dir)
    return train(examples, run_dir=run_dir, model=model, tokenizer=tokenizer, cfg=cfg.train,
                 max_seq_len=cfg.data.max_seq_len, packing=cfg.data.packing, parent_adapter=parent,
                 max_steps=job.get("max_steps"), progress=progress, on_step=on_step, should_stop=should_stop,
                 autocast=autocast, dist=dist)


def job_nodes(run_dir: Path, args: Any) -> Any:
    """This host's ``distributed.Nodes`` for the run in ``run_dir``: the command line over the run's train.* config.

    Raises:
        DistributedError: the multi-node settings are incomplete or out of range.
    """
    try:
        train = json.loads((Path(run_dir) / "job.json").read_text()).get("config", {}).get("train", {})
    except (OSError, ValueError) as e:
        raise DistributedError(f"cannot read {Path(run_dir) / 'job.json'} ({e}): every node needs the run folder "
                               f"(shared storage, or a copy at the same path)") from None

    def pick(given: Any, key: str, default: Any) -> Any:
        return given if given is not None else train.get(key, default)

    return distributed.resolve_nodes(Path(run_dir).name, nnodes=pick(args.nnodes, "nnodes", 1),
                                     node_rank=args.node_rank, endpoint=pick(args.rdzv_endpoint, "rdzv_endpoint", ""),
                                     rdzv_id=pick(args.rdzv_id, "rdzv_id", ""),
                                     timeout_s=pick(args.rdzv_timeout, "rdzv_timeout_seconds", 600))


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.train RUN_DIR``: exit 0 with result.json, 1 with error.json (reason), 75 stopped."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipelines.train", description=main.__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--launch", choices=("ddp", "fsdp"), default=None,
                    help="start this job under torchrun, one process per GPU (pipelines.train.distributed.launch)")
    ap.add_argument("--nproc", type=int, default=0,
                    help="with --launch: processes on this node (GPUs, or CPU processes); 0 = every visible GPU")
    nodes = ap.add_argument_group("several nodes (with --launch; each defaults to the run's train.* config)")
    nodes.add_argument("--nnodes", type=int, default=None, help="hosts the run spans (train.nnodes)")
    nodes.add_argument("--node-rank", type=int, default=None,
                       help=f"this host's rank, 0 = the one hosting the rendezvous (else ${distributed.NODE_RANK_ENV}, "
                            f"else ${distributed.SLURM_NODE_RANK_ENV} under srun)")
    nodes.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT", help="node 0's rendezvous address "
                       "(train.rdzv_endpoint)")
    nodes.add_argument("--rdzv-id", default=None, help="rendezvous id (train.rdzv_id; empty = the run folder's name)")
    nodes.add_argument("--rdzv-timeout", type=int, default=None, metavar="S",
                       help="seconds the nodes wait for each other (train.rdzv_timeout_seconds)")
    ap.add_argument("--distributed", choices=("none", "ddp", "fsdp"), default="none",
                    help="set by --launch on each torchrun process: DDP or FSDP2 across ranks")
    ap.add_argument("--stop-at-step", type=int, default=0, metavar="N",
                    help="checkpoint and exit 75 (resumable) once N optimizer steps are done, e.g. to move a run "
                         "to another number of GPUs")
    args = ap.parse_args(argv)
    if args.launch:
        rank_args = (["--no-progress"] if args.no_progress else []) + (
            ["--stop-at-step", str(args.stop_at_step)] if args.stop_at_step else [])
        try:
            where = job_nodes(args.run_dir, args)
        except DistributedError as e:
            return _failed(args.run_dir, e)
        return distributed.launch(args.run_dir, args.launch, args.nproc, rank_args, nodes=where)
    import signal
    import threading

    # SIGTERM (the daemon shutting down) = checkpoint at the next step boundary and exit 75; resumable.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    done = [0]

    def on_step(record: dict) -> None:
        done[0] = record["step"]

    def should_stop() -> bool:
        return stop.is_set() or 0 < args.stop_at_step <= done[0]

    dist = None
    try:
        dist = distributed.init(args.distributed)
        main_rank = dist is None or dist.is_main
        if dist is not None and dist.is_main:
            distributed.close_announcement(args.run_dir)
        outcome = run_job(args.run_dir, progress=not args.no_progress, should_stop=should_stop, on_step=on_step,
                          dist=dist, own_process=True)
    except Interrupted as e:
        if dist is None:
            print(f"lorad train: {e}", file=sys.stderr)
            return EXIT_INTERRUPTED
        # Under torchrun a non-zero rank reads as a crash: exit 0 and leave the launcher a marker.
        if dist.is_main:
            print(f"lorad train: {e}", file=sys.stderr)
            (args.run_dir / INTERRUPTED_MARKER).write_text(json.dumps({"reason": str(e)}))
        return 0
    except (TrainingError, DistributedError) as e:
        return _failed(args.run_dir, e)
    finally:
        distributed.shutdown(dist)
    if main_rank:
        print(json.dumps(outcome.to_dict()))
    return 0


def _failed(run_dir: Path, error: Exception) -> int:
    """Exit 1 with the reason in ``error.json``. Any rank may be the one that failed (torchrun then stops the
    others): each writes atomically."""
    if run_dir.is_dir():
        tmp = run_dir / f".error-{os.getpid()}.json"
        tmp.write_text(json.dumps({"reason": str(error)}))
        os.replace(tmp, run_dir / "error.json")
    print(f"lorad train: {error}", file=sys.stderr)
    return 1
