"""Training speed the way a skeptic measures it (issue 22): every arm in the same run, interleaved rounds,
the strongest stock recipe found, FLOPs counted without the embedding lookup and with attention.

    python -m bench.train_speed rounds --out DIR [--gpus 0,1,2,3] [--rounds 3] [--arms ...]
    python -m bench.train_speed adapter-time ARM --json F [--tokens 6553600]   # one fresh process

Arms (DeepSeek-LLM-7B shape, random weights, the same seeded records of 64-512 tokens; each arm a fresh process):
  seed_8bit        the seed recipe as written: base loaded in 8 bits (bitsandbytes), HF Trainer + PEFT
                   LoRA r16/a32 on q_proj,v_proj, fp16, batch 2 x accumulation 8, padded batches
  seed_fp16        the same without the 8-bit loading (fp16 base)
  stock            HF Trainer + PEFT all-linear r16, bf16, group_by_length, batch 8 x accumulation 2
  stock_liger      stock with Liger kernels (TrainingArguments(use_liger_kernel=True))
  stock_flat       stock, padding-free (DataCollatorWithFlattening: a batch becomes one row with position_ids)
  stock_flat_liger padding-free and Liger
  stock_flat_flex  padding-free on transformers' flex_attention (torch's own kernel: the flattened batch's
                   records become a block mask that skips the blocks between records; SDPA takes a dense mask)
  stock_flat_flex_liger  the same with Liger kernels
  lorad_eager      pipelines.train.train with its defaults, torch.compile off
  lorad_compiled   pipelines.train.train with its defaults (per-layer torch.compile on CUDA)

Each (arm, round) times ``--timed-steps`` (default 30) optimizer steps after ``--warmup`` steps; the warm-up
(compilation included) is reported, not hidden. With several GPUs the arms run in parallel lanes, and round r
moves arm i to GPU (i + r) mod G, so every arm meets every card and a slow card biases no arm.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SEED_ARMS = ("seed_8bit", "seed_fp16")
STOCK_ARMS = ("stock", "stock_liger", "stock_flat", "stock_flat_liger", "stock_flat_flex", "stock_flat_flex_liger")
LORAD_ARMS = ("lorad_eager", "lorad_compiled")
ARMS = SEED_ARMS + STOCK_ARMS + LORAD_ARMS
SPEC_PEAK_BF16 = 989e12   # H100 / H200 SXM dense bf16, the vendor's figure (no sparsity)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- FLOPs


def linear_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of one Llama decoder layer."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    head = h // shape["num_attention_heads"]
    kv = shape.get("num_key_value_heads", shape["num_attention_heads"]) * head
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def mean_attended(lengths: list[int]) -> float:
    """Keys each token attends to on average under causal attention within its own record: sum l(l+1)/2 / sum l."""
    return sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)


def lora_flops_per_token(shape: dict, lengths: list[int], targets=ALL_LINEAR, rank: int = 16) -> float:
    """Useful FLOPs per trained token of LoRA on a frozen base (multiply-add = 2 FLOPs).

    Frozen matmuls (every decoder linear and the LM head; the input embedding is a lookup, no FLOPs):
    forward 2P + input-gradient backward 2P. LoRA matrices: forward 2, input gradient 2, weight gradient 2
    per parameter. Attention scores and values: 4 * hidden * attended keys per layer forward, twice that
    backward. Padding is not useful work: counted on the real records only, whatever an arm computes.
    """
    layers = shape["num_hidden_layers"]
    frozen = layers * sum(a * b for a, b in linear_shapes(shape).values())
    frozen += shape["hidden_size"] * shape["vocab_size"]          # LM head
    lora = layers * sum(rank * (a + b) for name, (a, b) in linear_shapes(shape).items() if name in targets)
    attention = 12 * layers * shape["hidden_size"] * mean_attended(lengths)
    return 4 * frozen + 6 * lora + attention


# ----------------------------------------------------------------------------- summary


def summarize(rows: list[dict], *, headline: str = "lorad_compiled", flops_per_token: dict | None = None,
              peak: float = SPEC_PEAK_BF16) -> dict:
    """Median and spread per arm over rounds, the strongest stock arm, and the speed-ups the issue asks for.

    Args:
        rows: one per (arm, round): {"arm", "round", "tokens_per_second"} (rows with an "error" are skipped).
        headline: the lorad arm whose speed-ups and MFU are the headline.
        flops_per_token: arm -> useful FLOPs per token (``lora_flops_per_token``), for MFU against ``peak``.
    """
    arms: dict[str, list[float]] = {}
    for r in rows:
        if r.get("tokens_per_second"):
            arms.setdefault(r["arm"], []).append(r["tokens_per_second"])
    per_arm = {}
    for arm, values in arms.items():
        med = statistics.median(values)
        per_arm[arm] = {"median_tokens_per_second": med, "min": min(values), "max": max(values),
                        "spread": (max(values) - min(values)) / med, "rounds": len(values), "all": values}
        if flops_per_token and arm in flops_per_token:
            per_arm[arm]["mfu_spec"] = med * flops_per_token[arm] / peak
    med = {arm: v["median_tokens_per_second"] for arm, v in per_arm.items()}
    stock = {a: med[a] for a in STOCK_ARMS if a in med}
    strongest = max(stock, key=stock.get) if stock else None

    speedups = {"speedup_vs_strongest_stock": strongest, "speedup_vs_seed_as_written": "seed_8bit",
                "speedup_vs_seed_fp16": "seed_fp16"}   # name -> the arm the headline is divided by

    def ratios(tps: dict) -> dict:
        return {name: tps[headline] / tps[den] if headline in tps and den in tps else None
                for name, den in speedups.items()}

    # The same ratios inside each round (every arm of a round ran on one card, or rotated over the lanes'), so a
    # round on a faster card moves both sides of its ratios: their range is the spread a reader should see.
    by_round: dict = {}
    for r in rows:
        if r.get("tokens_per_second"):
            by_round.setdefault(r.get("round", 0), {})[r["arm"]] = r["tokens_per_second"]
    per_round = {str(rnd): {k: v for k, v in ratios(tps).items() if v is not None}
                 for rnd, tps in sorted(by_round.items()) if headline in tps}
    ranges = {}
    for name in speedups:
        values = [v[name] for v in per_round.values() if name in v]
        if values:
            ranges[name] = [min(values), max(values)]
    return {"headline_arm": headline, "strongest_stock_arm": strongest, **ratios(med),
            "mfu_spec": per_arm.get(headline, {}).get("mfu_spec"),
            "mfu_peak_tflops": peak / 1e12, "rounds": max((v["rounds"] for v in per_arm.values()), default=0),
            "per_round": per_round, "per_round_range": ranges, "arms": per_arm}


# Top-level keys of bench/results/train_speed.json: issue 22's, which the rounds write, and those they
# replace, the single-run figures of the earlier protocol (speed-ups from one run of a few steps, MFU
# against the 790 TFLOP/s convention).
HEADLINE_KEYS = ("strongest_stock_arm", "speedup_vs_strongest_stock", "speedup_vs_seed_as_written",
                 "speedup_vs_seed_fp16", "mfu_spec", "rounds")
SUPERSEDED_KEYS = ("speedup_vs_seed", "speedup_vs_stock", "mfu")


def merge_rounds(docs: list[dict], results: dict, sources: list[str]) -> dict:
    """Join the rounds.json of one or more leases into the results JSON ``results`` (returned, updated).

    Every lease must have measured the same clean commit with the same protocol (timed and warm-up steps), and
    no (arm, round) may appear twice: rounds from separate leases are then one run of the code, each round all
    arms on one card. The issue's keys go to the top level; the rows, each lease's machine and the summary under
    ``gpu_rounds``.

    Raises:
        ValueError: commits differ, a lease was dirty or unknown, the protocols differ, or a round repeats.
    """
    commits = {d.get("commit") for d in docs}
    if len(commits) != 1 or None in commits:
        raise ValueError(f"the leases measured different or unknown commits: {sorted(map(str, commits))}")
    if any(d.get("dirty") is not False for d in docs):
        bad = [src for src, d in zip(sources, docs) if d.get("dirty") is not False]
        raise ValueError(f"not measured from a clean commit (dirty is not false): {', '.join(bad)}")
    protocol = {(d.get("timed_steps"), d.get("warmup_steps")) for d in docs}
    if len(protocol) != 1:
        raise ValueError(f"the leases timed different steps (timed, warm-up): {sorted(protocol)}")
    rows, seen = [], set()
    for lease, (src, d) in enumerate(zip(sources, docs)):
        for row in d.get("rows", []):
            key = (row["arm"], row.get("round"))
            if key in seen:
                raise ValueError(f"{src}: arm {key[0]} round {key[1]} is in more than one lease "
                                 f"(run later leases with --first-round)")
            seen.add(key)
            rows.append({**row, "lease": lease})
    flops = {r["arm"]: r["flops_per_token"] for r in rows if "flops_per_token" in r}
    headline = docs[0].get("summary", {}).get("headline_arm", "lorad_compiled")
    summary = summarize(rows, headline=headline, flops_per_token=flops)
    out = {k: v for k, v in results.items() if k not in SUPERSEDED_KEYS}
    out.update({k: summary[k] for k in HEADLINE_KEYS})
    # the cards of these figures (the top-level "card" names the earlier single-run cases' card, QLoRA's)
    out["rounds_cards"] = [(d.get("info") or {}).get("card") for d in docs]
    out["gpu_rounds"] = {"commit": commits.pop(), "dirty": False, "timed_steps": docs[0].get("timed_steps"),
                         "warmup_steps": docs[0].get("warmup_steps"),
                         "leases": [{"source": src, "info": d.get("info")} for src, d in zip(sources, docs)],
                         "summary": summary, "rows": rows}
    return out


QLORA_CASES = ("qlora_stock", "qlora_lorad", "qlora_lorad_noamp")


def merge_qlora(run: dict, results: dict, source: str) -> dict:
    """Replace the QLoRA figures of ``results`` (``qlora``, ``qlora_peak_gib``) with those of one
    ``python -m bench.train_speed gpu --cases qlora_stock,qlora_lorad`` run (its gpu.json), measured from a clean
    commit; the run's machine and commit go beside them (``qlora_run``).

    Raises:
        ValueError: the run names no commit or was not clean, or it has no successful qlora_lorad case.
    """
    info = run.get("info") or {}
    if not info.get("commit") or info.get("dirty") is not False:
        raise ValueError(f"{source}: not measured from a clean commit (commit {info.get('commit')!r}, "
                         f"dirty {info.get('dirty')!r})")
    cases = {k: v for k, v in (run.get("cases") or {}).items() if k in QLORA_CASES and "error" not in v}
    if "qlora_lorad" not in cases:
        raise ValueError(f"{source}: no successful qlora_lorad case")
    keys = ("peak_allocated_gib", "peak_reserved_gib", "allocated_after_load_gib", "tokens_per_second", "settings")
    out = dict(results)
    out["qlora"] = {k: {x: v.get(x) for x in keys} for k, v in cases.items()}
    out["qlora_peak_gib"] = cases["qlora_lorad"].get("peak_allocated_gib")
    out["qlora_run"] = {"source": source, "info": info}
    return out


def merge_rounds_main(args) -> None:
    docs = [json.loads(Path(p).read_text()) for p in args.rounds]
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.is_file() else {}
    try:
        merged = merge_rounds(docs, results, [str(p) for p in args.rounds])
        if args.qlora:
            merged = merge_qlora(json.loads(Path(args.qlora).read_text()), merged, str(args.qlora))
    except ValueError as e:
        raise SystemExit(f"merge-rounds: {e}")
    _write(path, merged)
    print(json.dumps({k: merged[k] for k in HEADLINE_KEYS}, indent=1))


def schedule(arms: list[str], rounds: int, gpus: list[str], first_round: int = 0) -> list[list[tuple[int, str]]]:
    """Per GPU lane, the (round, arm) runs in order: round r puts arm i on GPU (i + r) mod G.

    With one GPU every round is one lane, its order rotated by r (round r starts with arm r mod n), so no arm
    always runs first on a cold card or last on a hot one. ``first_round`` numbers the rounds on: rounds measured
    in separate leases (``--first-round``) continue the rotation and merge without clashing (``merge-rounds``).
    """
    lanes: list[list[tuple[int, str]]] = [[] for _ in gpus]
    for r in range(first_round, first_round + rounds):
        if len(gpus) == 1:
            k = r % len(arms)
            lanes[0].extend((r, arm) for arm in arms[k:] + arms[:k])
            continue
        for i, arm in enumerate(arms):
            lanes[(i + r) % len(gpus)].append((r, arm))
    return lanes


# ----------------------------------------------------------------------------- the arms (one process each)


def _hf_arm(arm: str, steps: int, warmup: int, ckpt_dir: Path) -> dict:
    """The HF Trainer arms: seed (8-bit or fp16 base) and the stock variants."""
    import torch

    from bench import train_speed as ts

    shape = ts.SHAPE_7B
    if arm == "seed_8bit":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        ckpt = ts.ensure_7b_checkpoint(ckpt_dir)
        model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                     dtype=torch.float16, device_map={"": ts.dev()})
    else:
        model = ts.build_random_llama(torch.float16 if arm.startswith("seed") else torch.bfloat16, ts.dev())
    if "flex" in arm:   # padding-free without flash-attn: torch's flex attention over the records' block mask
        model.set_attn_implementation("flex_attention")
    n_params = sum(p.numel() for p in model.parameters())
    data = ts.records(4000, shape["vocab_size"])
    if arm.startswith("seed"):
        settings = dict(targets=["q_proj", "v_proj"], batch=2, accum=8, fp16=True)
    else:
        settings = dict(targets=list(ALL_LINEAR), batch=8, accum=2, bf16=True, group_by_length="flat" not in arm,
                        liger="liger" in arm, flatten="flat" in arm)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        r = ts.hf_trainer_run(model, data, steps=warmup + steps, out_dir=tmp, cpu=ts.dev() == "cpu", **settings)
    settings["attention"] = model.config._attn_implementation
    return {"arm": arm, "settings": {**settings, "load_in_8bit": arm == "seed_8bit"}, "n_params": n_params,
            "lora_targets": settings["targets"], "warmup_steps": warmup,
            "warmup_seconds": r["marks"][warmup - 1][0] - r["start"], **ts.rate(r["marks"], warmup), **ts.memory(),
            "loss_last": r["losses"][-1] if r["losses"] else None}


def _lorad_arm(arm: str, steps: int, warmup: int) -> dict:
    import torch

    from bench import train_speed as ts

    model = ts.build_random_llama(torch.bfloat16, ts.dev())
    n_params = sum(p.numel() for p in model.parameters())
    data = ts.records(4000, ts.SHAPE_7B["vocab_size"])
    speed = {"compile_layers": arm != "lorad_eager"}   # forced: train.compile auto would skip a run this short
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        r = ts.lorad_run(model, ts.StubTokenizer(), data, cfg_overrides={}, steps=warmup + steps, max_seq_len=2048,
                         out_dir=tmp, **speed)
    out, cfg = r["outcome"], r["cfg"]
    return {"arm": arm, "settings": {"lora_r": cfg.lora_r, "lora_targets": cfg.lora_targets,
                                     "micro_batch_size": cfg.micro_batch_size, "grad_accum_steps": cfg.grad_accum_steps,
                                     "max_seq_len": 2048, "packing": True, "overrides": speed, "plan": out.speed},
            "n_params": n_params, "lora_targets": list(ALL_LINEAR), "warmup_steps": warmup,
            "warmup_seconds": r["marks"][warmup - 1][0] - r["start"], **ts.rate(r["marks"], warmup), **ts.memory(),
            "loss_last": out.loss_last}


def run_arm(arm: str, steps: int, warmup: int, ckpt_dir: Path) -> dict:
    """One arm in this process; the useful FLOPs per token of its LoRA come with it."""
    from bench import train_speed as ts

    if arm not in ARMS:
        raise SystemExit(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
    res = _lorad_arm(arm, steps, warmup) if arm in LORAD_ARMS else _hf_arm(arm, steps, warmup, ckpt_dir)
    lengths = [len(r["input_ids"]) for r in ts.records(4000, ts.SHAPE_7B["vocab_size"])]
    res["flops_per_token"] = lora_flops_per_token(ts.SHAPE_7B, lengths, targets=res["lora_targets"])
    import torch

    res["card"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return res


def adapter_time(arm: str, tokens: int, ckpt_dir: Path) -> dict:
    """Wall time of a daemon-like run in this fresh process: imports, model load from disk, warm-up or
    compilation, training on ``tokens`` real tokens, the adapter written. Counted from the process's start."""
    started = _process_start()
    import torch

    from bench import train_speed as ts

    ckpt = ts.ensure_7b_checkpoint(ckpt_dir)   # saved beforehand by the caller: not part of the time
    t_load = time.time()
    if arm in LORAD_ARMS:
        from pipelines.models import load_base_model

        model, tok = load_base_model(str(ckpt), ckpt.parent / "cache", dtype="bfloat16", device=ts.dev(),
                                     for_training=True)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map={"": ts.dev()})
        if "flex" in arm:
            model.set_attn_implementation("flex_attention")
    load_s = time.time() - t_load
    data = ts.records(max(200, tokens // 200), ts.SHAPE_7B["vocab_size"], seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        if arm in LORAD_ARMS:
            speed = {"compile_layers": arm != "lorad_eager"}
            rows = {"micro_batch_size": 4, "grad_accum_steps": 4}   # 16 packed rows of 2048: 32k tokens a step
            r = ts.lorad_run(model, tok, data, cfg_overrides=rows, steps=-(-tokens // (16 * 2048)), max_seq_len=2048,
                             out_dir=tmp, **speed)
        else:
            settings = dict(targets=list(ALL_LINEAR), batch=8, accum=2, bf16=True, group_by_length="flat" not in arm,
                            liger="liger" in arm, flatten="flat" in arm)
            mean_len = sum(len(x["input_ids"]) for x in data) / len(data)
            r = ts.hf_trainer_run(model, data, steps=int(tokens / (16 * mean_len)) + 1, out_dir=tmp,
                                  save_adapter=tmp + "/adapter", cpu=ts.dev() == "cpu", **settings)
        trained = r["marks"][-1][1]
    total = time.time() - started
    from bench import _common

    return {"arm": arm, "commit": _common.commit(), "dirty": _common.dirty(), "tokens_trained": trained, "steps": len(r["marks"]), "model_load_seconds": load_s,
            "first_step_seconds": r["marks"][0][0] - r["start"], "wall_seconds_from_process_start": total,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def _process_start() -> float:
    """This process's start as a Unix time (Linux /proc), so interpreter start-up and imports count too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(x.split()[1]) for x in Path("/proc/stat").read_text().splitlines() if x.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return time.time()


# ----------------------------------------------------------------------------- the driver


def _one(arm: str, r: int, gpu: str, out: Path, steps: int, warmup: int, ckpt_dir: str, timeout: int) -> dict:
    path = out / f"arm_{arm}_r{r}.json"
    cmd = [sys.executable, "-m", "bench.train_speed", "arm", arm, "--json", str(path), "--steps", str(steps),
           "--warmup", str(warmup), "--ckpt-dir", ckpt_dir]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu} if gpu else dict(os.environ)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)
        ok = proc.returncode == 0 and path.is_file()
        tail = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        ok, tail = False, f"timed out after {timeout} s"
    res = json.loads(path.read_text()) if ok else {"arm": arm, "error": tail}
    res.update(round=r, gpu=gpu, wall_seconds=time.perf_counter() - t0)
    print(f"[round {r} gpu {gpu or '-'}] {arm}: "
          + (f"{res['tokens_per_second']:.0f} tok/s" if ok else "FAILED\n" + tail), flush=True)
    return res


def rounds_main(args) -> dict:
    """All arms x rounds, lanes in parallel (one per GPU); rewrites DIR/rounds.json after every run."""
    from bench import _common
    from bench import train_speed as ts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = args.arms.split(",")
    gpus = args.gpus.split(",") if args.gpus else [""]
    if "seed_8bit" in arms:
        ts.ensure_7b_checkpoint(Path(args.ckpt_dir))   # once, before the lanes start
    changed = _common.changed_files()
    doc = {"benchmark": "train_speed rounds", "info": {**ts.device_info(), "gpus": gpus},
           "commit": _common.commit(), "dirty": None if changed is None else bool(changed),
           "timed_steps": args.steps, "warmup_steps": args.warmup, "rows": []}
    lock = threading.Lock()

    def lane(queue: list[tuple[int, str]], gpu: str) -> None:
        for r, arm in queue:
            res = _one(arm, r, gpu, out, args.steps, args.warmup, args.ckpt_dir, args.timeout)
            with lock:
                doc["rows"].append(res)
                flops = {x["arm"]: x["flops_per_token"] for x in doc["rows"] if "flops_per_token" in x}
                doc["summary"] = summarize(doc["rows"], headline=args.headline, flops_per_token=flops)
                _write(out / "rounds.json", doc)

    lanes = schedule(arms, args.rounds, gpus, args.first_round)
    threads = [threading.Thread(target=lane, args=(q, g)) for q, g in zip(lanes, gpus)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({k: v for k, v in doc.get("summary", {}).items() if k != "arms"}, indent=1))
    return doc


def _write(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def add_arguments(sub) -> None:
    """The ``rounds``, ``arm`` and ``adapter-time`` subcommands of ``python -m bench.train_speed``."""
    r = sub.add_parser("rounds", help="every arm in interleaved rounds (issue 22's protocol)")
    r.add_argument("--out", required=True)
    r.add_argument("--arms", default=",".join(ARMS))
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--first-round", type=int, default=0,
                   help="number of the first round (rounds measured in separate leases, merged by merge-rounds)")
    r.add_argument("--gpus", default="", help="comma-separated GPU indices, one lane each (default: one lane)")
    r.add_argument("--steps", type=int, default=30, help="timed optimizer steps per arm and round")
    r.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation included)")
    r.add_argument("--headline", default="lorad_compiled", choices=LORAD_ARMS)
    r.add_argument("--ckpt-dir", default="/tmp/lorad-bench-7b")
    r.add_argument("--timeout", type=int, default=900, help="seconds one arm may take")
    m = sub.add_parser("merge-rounds", help="join the rounds.json of one or more leases (same clean commit) into "
                                            "the results JSON")
    m.add_argument("rounds", nargs="+", help="rounds.json of each lease")
    m.add_argument("--results", default=str(ROOT / "bench/results/train_speed.json"))
    m.add_argument("--qlora", default="", metavar="GPU_JSON",
                   help="also replace the QLoRA figures with this run of "
                        "`train_speed gpu --cases qlora_stock,qlora_lorad` (its gpu.json)")
    a = sub.add_parser("arm", help="one arm in this process (what rounds runs)")
    a.add_argument("name", choices=ARMS)
    a.add_argument("--json", required=True)
    a.add_argument("--steps", type=int, default=30)
    a.add_argument("--warmup", type=int, default=3)
    a.add_argument("--ckpt-dir", default="/tmp/lorad-bench-7b")
    t = sub.add_parser("adapter-time", help="wall time to a trained adapter in a fresh process")
    t.add_argument("name", choices=STOCK_ARMS + LORAD_ARMS)
    t.add_argument("--json", required=True)
    t.add_argument("--tokens", type=int, default=200 * 32768, help="real tokens to train on (200 steps of 32k)")
    t.add_argument("--ckpt-dir", default="/tmp/lorad-bench-7b")


def arm_main(args) -> None:
    _write(Path(args.json), run_arm(args.name, args.steps, args.warmup, Path(args.ckpt_dir)))


def adapter_time_main(args) -> None:
    res = adapter_time(args.name, args.tokens, Path(args.ckpt_dir))
    _write(Path(args.json), res)
    print(json.dumps(res))
