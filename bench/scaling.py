"""Multi-GPU scaling and large-model memory: lorad's training loop under DDP / FSDP2, in one run per host.

    python -m bench.scaling gpu --out DIR [--budget-s 540]   # a CUDA host with >= 2 GPUs: every case below
    python -m bench.scaling case NAME --json F [...]          # one case (gpu runs each in its own process(es))
    python -m bench.scaling merge --raw DIR/scaling_raw.json --out bench/results/scaling.json --commit SHA --kind K

Cases (random weights, seeded; every case is lorad's own ``pipelines.train.train``):
  dp7b_1      DeepSeek-LLM-7B shape (hidden 4096, 30 layers, intermediate 11008, vocab 102400) on 1 GPU,
              lorad defaults (all-linear LoRA r16, packing to 2048, bf16 autocast, compiled layers),
              micro-batch 4 rows x 4 micro-batches = 32k tokens per optimizer step
  dp7b_2      the same run under torchrun on 2 GPUs, train.distributed = ddp: the same 4 micro-batches
              per step, 2 per GPU (global batch, loss and step count unchanged)
  qlora67b_1  DeepSeek-67B shape (hidden 8192, 95 layers, intermediate 22016, vocab 102400, 64 heads,
              8 KV heads) as NF4 QLoRA on 1 GPU capped at 80 GB (torch's per-process memory fraction);
              the 4-bit weights are quantized layer by layer from bf16 random tensors made on the GPU
              (the 134 GB bf16 model never exists)
  fsdp67b_2   the 67B shape in bf16 under FSDP2 across 2 GPUs: built on the meta device, sharded, then each
              rank fills only its own shards (67 GB of weights per GPU)
  fsdpq7b_2   FSDP-QLoRA smoke check: the 7B shape in NF4 with bf16 quant storage, sharded across 2 GPUs,
              against the same model on 1 GPU (first-step loss must agree)
Throughput counts real tokens of all GPUs per second, timed after warm-up steps (compilation and
allocator growth excluded), on rank 0's clock; each step ends in a collective, so ranks stay in step.
LORAD_BENCH_TINY=1 shrinks every shape to a toy one, to smoke-test the cases on a CPU (gloo).
NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends; pipelines.train.distributed sets them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_speed import SHAPE_7B, cuda_sync, device_info, rate, records  # noqa: E402

SHAPE_67B = dict(vocab_size=102400, hidden_size=8192, intermediate_size=22016, num_hidden_layers=95,
                 num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096,
                 rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=100000, eos_token_id=100001,
                 pad_token_id=100001, tie_word_embeddings=False)
if os.environ.get("LORAD_BENCH_TINY"):
    SHAPE_67B.update(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, bos_token_id=1000, eos_token_id=1001,
                     pad_token_id=1001)
SEQ = 2048 if not os.environ.get("LORAD_BENCH_TINY") else 256
CARD_80GB_GIB = 79.0   # usable memory of an 80 GB card (H100/A100 80GB report 79.1-79.6 GiB to torch)


def recs(n: int, vocab: int, seed: int = 0, lo: int = 64, hi: int = 512) -> list[dict]:
    """Seeded random records; the toy shapes get toy lengths."""
    if os.environ.get("LORAD_BENCH_TINY"):
        n, lo, hi = min(n, 200), max(8, lo // 8), max(16, hi // 8)
    return records(n, vocab, seed=seed, lo=lo, hi=hi)


class StubTokenizer:
    pad_token_id = 0


# ----------------------------------------------------------------------------- model builders


def _dev(dist) -> str:
    import torch

    if dist is not None:
        return str(dist.device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_dense(shape: dict, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    with torch.device(device):
        return LlamaForCausalLM(LlamaConfig(**shape)).to(dtype)


def build_meta(shape: dict, dtype):
    """The model on the meta device: shapes only, no memory (weights come after sharding)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**shape)).to(dtype)


def _fresh_rotary(model, device) -> None:
    """Rotary embeddings keep a computed buffer (inv_freq); a meta model has none, so build them anew."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], type(module)(config=module.config).to(device))


def _fill(t, name: str, generator=None) -> None:
    """Random-weight init by parameter role (norms 1, LoRA B 0, LoRA A small uniform, the rest N(0, 0.02))."""
    if name.endswith("norm.weight"):
        t.fill_(1.0)
    elif "lora_B" in name:
        t.zero_()
    elif "lora_A" in name:
        t.uniform_(-0.01, 0.01, generator=generator)
    else:
        t.normal_(0.0, 0.02, generator=generator)


def build_qlora(shape: dict, device: str, quant_storage=None):
    """NF4 model with random weights, quantized one linear layer at a time on ``device``.

    Equivalent to loading a bf16 checkpoint with ``BitsAndBytesConfig(load_in_4bit, nf4, double quant,
    bf16 compute)`` (what ``load_base_model(quantization="4bit")`` does), without the 134 GB file.
    """
    import bitsandbytes as bnb
    import torch

    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    storage = quant_storage or torch.uint8
    model = build_meta(shape, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    for mod_name, module in list(model.named_modules()):
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.device.type != "meta":
                continue
            full = f"{mod_name}.{pname}"
            if isinstance(module, torch.nn.Linear) and "layers." in mod_name:
                q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, compute_dtype=dtype,
                                      compress_statistics=True, quant_type="nf4", quant_storage=storage,
                                      device="meta")
                w = torch.empty(module.out_features, module.in_features, device=device, dtype=dtype)
                w.normal_(0.0, 0.02, generator=gen)
                q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                             quant_storage=storage, module=q)._quantize(device)
                del w
                parent = model.get_submodule(mod_name.rsplit(".", 1)[0])
                setattr(parent, mod_name.rsplit(".", 1)[-1], q)
                break
            t = torch.empty(p.shape, device=device, dtype=p.dtype)
            _fill(t, full, gen)
            setattr(module, pname, torch.nn.Parameter(t, requires_grad=False))
    _fresh_rotary(model, device)
    model.is_loaded_in_4bit = True   # what transformers sets on a bitsandbytes load; PEFT and lorad read it
    model.config.dtype = dtype
    return model


def materialize_after_sharding(engine, dist) -> None:
    """FSDP over a meta model: allocate each rank's shards on its GPU and fill them with random values."""
    import torch

    if not any(p.device.type == "meta" for p in engine.parameters()):
        return
    engine.to_empty(device=dist.device)
    gen = torch.Generator(device=dist.device).manual_seed(1000 + dist.rank)
    with torch.no_grad():
        for name, p in engine.named_parameters():
            _fill(p._local_tensor if hasattr(p, "_local_tensor") else p, name, gen)
    _fresh_rotary(engine, dist.device)


# ----------------------------------------------------------------------------- one case


def run_train(model, data, *, dist, steps: int, overrides: dict, seq: int = SEQ, speed: dict | None = None) -> dict:
    from daemon.config import TrainConfig
    from pipelines.train import train

    cfg = TrainConfig(**{"checkpoint_every_steps": 10**6, "max_wall_seconds": 10**6, **overrides})
    marks = []

    def on_step(record):
        cuda_sync()
        marks.append((time.perf_counter(), record["tokens"], record["loss"]))

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = train(data, run_dir=Path(tmp), model=model, tokenizer=StubTokenizer(), cfg=cfg, max_seq_len=seq,
                    max_steps=steps, progress=False, on_step=on_step, dist=dist, **(speed or {}))
    return {"marks": marks, "start": t0, "outcome": out, "cfg": cfg}


def memory_all_ranks(dist) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    mine = [torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30]
    if dist is None:
        per = [mine]
    else:
        import torch.distributed as td

        per = [None] * dist.world_size
        td.all_gather_object(per, mine)
    return {"peak_allocated_gib": max(p[0] for p in per), "peak_reserved_gib": max(p[1] for p in per),
            "peak_allocated_gib_per_rank": [p[0] for p in per]}


def case(name: str, steps: int, warmup: int) -> dict | None:
    import torch

    from pipelines.train import distributed

    mode = {"dp7b": "ddp", "fsdp7b": "fsdp", "fsdp67b": "fsdp", "fsdpq7b": "fsdp"}.get(name.rsplit("_", 1)[0], "none")
    dist = distributed.init(mode)
    world = 1 if dist is None else dist.world_size
    device = _dev(dist)
    speed: dict = {}
    t_build = time.perf_counter()
    if name.startswith("dp7b"):
        model = build_dense(SHAPE_7B, device)
        data = recs(4000, SHAPE_7B["vocab_size"])   # > 13 steps of 64k tokens: no epoch end in the timed window
        # 4 micro-batches per step on 1 and 2 GPUs; 8 on 4 GPUs, so each GPU still runs 2 per step
        overrides = {"micro_batch_size": 4, "grad_accum_steps": 8 if world >= 4 else 4}
    elif name.startswith("qlora67b"):
        if torch.cuda.is_available():   # prove the "80 GB card" claim on a bigger card
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            torch.cuda.set_per_process_memory_fraction(min(1.0, CARD_80GB_GIB / total))
        model = build_qlora(SHAPE_67B, device)
        data = recs(200, SHAPE_67B["vocab_size"], seed=2, lo=256, hi=1024)
        overrides = {"micro_batch_size": 1, "grad_accum_steps": 1}
    elif name.startswith(("fsdp67b", "fsdp7b")):
        if name.startswith("fsdp67b"):
            model = build_meta(SHAPE_67B, torch.bfloat16 if device != "cpu" else torch.float32)
            data = recs(400, SHAPE_67B["vocab_size"], seed=2, lo=256, hi=1024)
            # 2 rows per micro-batch, one micro-batch per GPU per step; activations checkpointed (95 layers)
            overrides = {"micro_batch_size": 2, "grad_accum_steps": world, "gradient_checkpointing": True}
        else:   # the 7B shape sharded: same work per GPU as dp7b (2 micro-batches of 4 rows per step)
            model = build_meta(SHAPE_7B, torch.bfloat16 if device != "cpu" else torch.float32)
            data = recs(4000, SHAPE_7B["vocab_size"])   # > 13 steps of 64k tokens: no epoch end in the timed window
            overrides = {"micro_batch_size": 4, "grad_accum_steps": 2 * world}
        original = distributed.wrap

        def wrap_then_materialize(*a, **k):   # random weights are made shard by shard, after sharding
            engine = original(*a, **k)
            materialize_after_sharding(engine, dist)
            return engine

        distributed.wrap = wrap_then_materialize
    elif name.startswith("fsdpq7b"):
        model = build_qlora(SHAPE_7B, device, quant_storage=torch.bfloat16 if device != "cpu" else torch.float32)
        data = recs(200, SHAPE_7B["vocab_size"], seed=3, lo=256, hi=1024)
        overrides = {"micro_batch_size": 1, "grad_accum_steps": 2, "lora_dropout": 0.0}
    else:
        raise SystemExit(f"unknown case {name}")
    build_s = time.perf_counter() - t_build
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    r = run_train(model, data, dist=dist, steps=steps, overrides=overrides, speed=speed)
    out = r["outcome"]
    res = {"case": name, "world_size": world, "mode": mode if dist is not None else "none", "build_seconds": build_s,
           "settings": {**overrides, "max_seq_len": SEQ, "lora": f"r{r['cfg'].lora_r} {r['cfg'].lora_targets}",
                        "plan": out.speed, "gradient_checkpointing": out.gradient_checkpointing},
           "losses": [m[2] for m in r["marks"]], "steps": len(r["marks"]), "warmup_steps": warmup,
           "step_seconds": [b[0] - a[0] for a, b in zip([(r["start"],)] + r["marks"], r["marks"])],
           "warmup_seconds": r["marks"][warmup - 1][0] - r["start"] if len(r["marks"]) >= warmup else None,
           **memory_all_ranks(dist)}
    if len(r["marks"]) > warmup:
        res.update(rate([(t, tok) for t, tok, _ in r["marks"]], warmup))
        res["tokens_per_second_per_gpu"] = res["tokens_per_second"] / world
        timed = r["marks"][warmup - 1:]
        per_step = sorted((b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(timed, timed[1:]))
        res["median_step_tokens_per_second"] = per_step[len(per_step) // 2]   # steady state, outlier steps aside
    distributed.shutdown(dist)
    return res if dist is None or dist.is_main else None


# ----------------------------------------------------------------------------- the GPU run


CASES = {   # name: (processes, steps, warm-up steps, timeout s)
    "dp7b_1": (1, 9, 4, 170),
    "dp7b_2": (2, 13, 4, 150),
    "qlora67b_1": (1, 5, 2, 150),
    "fsdp67b_2": (2, 6, 2, 140),
    "fsdpq7b_2": (2, 3, 1, 80),
    "fsdpq7b_1": (1, 3, 1, 60),
    # 4-GPU kind (nvidia-h200-x4): run with --cases dp7b_1,dp7b_2,dp7b_4,fsdp7b_4,fsdp67b_4
    "dp7b_4": (4, 13, 4, 170),
    "fsdp7b_4": (4, 13, 4, 170),
    "fsdp67b_4": (4, 6, 2, 150),
}


def run_case(name: str, out: Path, timeout: int) -> dict:
    nproc, steps, warm, _ = CASES[name]
    json_path = out / f"case_{name}.json"
    cmd = ["-m", "bench.scaling", "case", name, "--json", str(json_path), "--steps", str(steps), "--warmup", str(warm)]
    cmd = ([sys.executable, *cmd] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node",
            str(nproc), *cmd])
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)
        output, ok = proc.stdout + proc.stderr, proc.returncode == 0 and json_path.is_file()
        tail = output[-2500:]
    except subprocess.TimeoutExpired as e:
        tail, ok = f"timed out after {timeout} s: {(e.stderr or b'')[-2000:]!r}", False
        output = tail
    if os.environ.get("LORAD_SCALING_LOGDIR"):   # each case's whole output, for diagnosis
        Path(os.environ["LORAD_SCALING_LOGDIR"], f"{name}.log").write_text(output)
    res = json.loads(json_path.read_text()) if ok else {"case": name, "error": tail}
    res["wall_seconds"] = time.perf_counter() - t0
    print(f"[{name}] {'ok' if ok else 'FAILED'} {res['wall_seconds']:.0f} s "
          f"tok/s {res.get('tokens_per_second', float('nan')):.0f}" + ("" if ok else "\n" + tail), flush=True)
    return res


def summarize(results: dict) -> dict:
    c = results["cases"]
    one, two = c.get("dp7b_1", {}).get("tokens_per_second"), c.get("dp7b_2", {}).get("tokens_per_second")
    s = {"tokens_per_second": {"1": one, "2": two}}
    four = c.get("dp7b_4", {}).get("tokens_per_second")
    if four:
        s["tokens_per_second"]["4"] = four
    if one and two:
        s["efficiency_2gpu"] = two / (2 * one)
    if one and four:
        s["efficiency_4gpu"] = four / (4 * one)
    f4 = c.get("fsdp7b_4", {}).get("tokens_per_second")
    if one and f4:
        s["fsdp_7b_4gpu"] = {"tokens_per_second": f4, "efficiency_vs_1gpu": f4 / (4 * one),
                             "peak_allocated_gib": c["fsdp7b_4"].get("peak_allocated_gib")}
    for key, case_name in (("qlora_1gpu_80gb", "qlora67b_1"), ("fsdp_2gpu", "fsdp67b_2"), ("fsdp_4gpu", "fsdp67b_4")):
        r = c.get(case_name, {})
        if not r:
            continue
        s.setdefault("deepseek_67b", {})[key] = {k: r.get(k) for k in (
            "tokens_per_second", "tokens_per_second_per_gpu", "peak_allocated_gib", "peak_reserved_gib",
            "peak_allocated_gib_per_rank", "build_seconds", "error") if r.get(k) is not None}
    q2, q1 = c.get("fsdpq7b_2", {}), c.get("fsdpq7b_1", {})
    if q2.get("losses") and q1.get("losses"):
        s["fsdp_qlora_check"] = {"first_loss_2gpu_fsdp": q2["losses"][0], "first_loss_1gpu": q1["losses"][0],
                                 "peak_allocated_gib_2gpu": q2.get("peak_allocated_gib"),
                                 "peak_allocated_gib_1gpu": q1.get("peak_allocated_gib")}
    return s


def gpu_main(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    results = {"info": device_info(), "cases": {}}
    try:
        import torch

        results["info"]["gpus"] = torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        pass
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="lorad-scaling-"))   # per-case files stay out of --out (one JSON comes back)
    for name in args.cases.split(","):
        left = int(deadline - time.monotonic())
        if left < 40:
            results["cases"][name] = {"case": name, "error": "skipped: out of time budget"}
            continue
        results["cases"][name] = run_case(name, work, min(CASES[name][3], left))
        results["summary"] = summarize(results)
        (out / "scaling_raw.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results["summary"], indent=1))
    return results


def resume_main(args) -> dict:
    """The production job path across GPU counts and engines, on this host's GPUs (or CPU with gloo).

    One job, run four ways from ``python -m pipelines.train`` (real checkpoint directory, load_base_model,
    hardware plan, checkpoints on disk): A) one process start to end (the reference); B) 2 processes under
    DDP, stopped with a checkpoint after step 3; C) the same run resumed by 2 processes under FSDP, stopped
    after step 5; D) finished by one process. B-C-D must reproduce A's losses and adapter (bf16 rounding aside).
    """
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.train_speed import _tiny_tokenizer_dir
    from daemon.config import build_config
    from pipelines.train import write_job

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="lorad-resume-"))
    gpu = torch.cuda.is_available()
    tiny = bool(os.environ.get("LORAD_BENCH_TINY"))
    base = work / "base"
    torch.manual_seed(0)
    shape = dict(vocab_size=128, hidden_size=64 if tiny else 1024, intermediate_size=128 if tiny else 2816,
                 num_hidden_layers=2 if tiny else 8, num_attention_heads=4 if tiny else 16,
                 num_key_value_heads=4 if tiny else 16,
                 max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16 if gpu else torch.float32).save_pretrained(base)
    _tiny_tokenizer_dir(base)
    import random

    rng = random.Random(5)
    payloads = [{"text": " ".join(f"w{rng.randrange(100)}" for _ in range(rng.randint(20, 300)))} for _ in range(300)]
    cfg = build_config({"paths": {"state_dir": str(work / "state")},
                        "model": {"base_model": str(base), "quantization": "none",
                                  "dtype": "bfloat16" if gpu else "float32", "device": "cuda" if gpu else "cpu"},
                        "data": {"max_seq_len": 1024, "max_prompt_tokens": 512, "max_response_tokens": 512},
                        "train": {"lora_dropout": 0.0, "micro_batch_size": 2, "grad_accum_steps": 4,
                                  "checkpoint_every_steps": 1, "learning_rate": 1e-3}})
    steps = 6
    runs = {"A": work / "A", "B": work / "B"}
    for r in runs.values():
        write_job(r, payloads=payloads, config=cfg.to_dict(mask_secrets=False), parent_adapter=None, max_steps=steps)
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    legs = [("A: 1 process", runs["A"], []),
            ("B: 2 x DDP, stop after 3", runs["B"], ["--stop-at-step", "3", "--launch", "ddp", "--nproc", "2"]),
            ("C: 2 x FSDP, resume, stop after 5", runs["B"], ["--stop-at-step", "5", "--launch", "fsdp", "--nproc", "2"]),
            ("D: 1 process, resume to the end", runs["B"], [])]
    result: dict = {"shape": shape, "steps": steps, "device": "cuda" if gpu else "cpu", "legs": []}
    for name, run_dir, extra in legs:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipelines.train", str(run_dir), "--no-progress", *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.leg_timeout)
        leg = {"leg": name, "exit": proc.returncode, "seconds": time.perf_counter() - t0}
        if proc.returncode not in (0, 75):
            leg["tail"] = (proc.stdout + proc.stderr)[-2500:]
        result["legs"].append(leg)
        print(f"[{name}] exit {proc.returncode} in {leg['seconds']:.0f} s", flush=True)
        (out / "resume_check.json").write_text(json.dumps(result, indent=2))

    def losses(run_dir):
        p = run_dir / "metrics.jsonl"
        return [json.loads(line)["loss"] for line in p.read_text().splitlines()] if p.is_file() else []

    result["losses_A"], result["losses_BCD"] = losses(runs["A"]), losses(runs["B"])
    a_file, b_file = (r / "adapter" / "adapter_model.safetensors" for r in (runs["A"], runs["B"]))
    if a_file.is_file() and b_file.is_file():
        a, b = load_file(str(a_file)), load_file(str(b_file))
        diffs = [float((a[k].float() - b[k].float()).abs().max()) for k in a]
        scale = max(float(a[k].float().abs().max()) for k in a)
        result["adapter_max_abs_diff"], result["adapter_max_abs"] = max(diffs), scale
        result["adapter_keys_equal"] = a.keys() == b.keys()
    la, lb = result["losses_A"], result["losses_BCD"]
    if len(la) == len(lb) == steps:
        result["loss_max_rel_diff"] = max(abs(x - y) / abs(x) for x, y in zip(la, lb))
    (out / "resume_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "shape"}, indent=1))
    return result


def merge_main(args) -> dict:
    """bench/results/scaling.json: the summary up front, every case's raw numbers below."""
    raw = json.loads(Path(args.raw).read_text())
    info = raw["info"]
    s = summarize(raw)
    out = {"card": info.get("card"), "card_kind": args.kind, "gpus": info.get("gpus"), "commit": args.commit,
           "tokens_per_second": s["tokens_per_second"], "efficiency_2gpu": s.get("efficiency_2gpu"),
           "efficiency_target": 0.85, "deepseek_67b": s.get("deepseek_67b"),
           "fsdp_qlora_check": s.get("fsdp_qlora_check"),
           "software": {k: info.get(k) for k in ("torch", "transformers", "peft", "python")},
           "notes": args.note or [], "cases": raw["cases"]}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gpu")
    g.add_argument("--out", required=True)
    g.add_argument("--budget-s", type=int, default=540)
    g.add_argument("--cases", default=",".join(CASES))
    c = sub.add_parser("case")
    c.add_argument("name")
    c.add_argument("--json", required=True)
    c.add_argument("--steps", type=int, default=4)
    c.add_argument("--warmup", type=int, default=1)
    rs = sub.add_parser("resume")
    rs.add_argument("--out", required=True)
    rs.add_argument("--work", default=None)
    rs.add_argument("--leg-timeout", type=int, default=150)
    m = sub.add_parser("merge")
    m.add_argument("--raw", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--commit", required=True)
    m.add_argument("--kind", required=True, help="the device kind the run used, e.g. nvidia-h200-x2")
    m.add_argument("--note", action="append")
    args = ap.parse_args()
    if args.cmd == "gpu":
        gpu_main(args)
    elif args.cmd == "resume":
        resume_main(args)
    elif args.cmd == "merge":
        merge_main(args)
    else:
        res = case(args.name, args.steps, args.warmup)
        if res is not None:
            Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
