"""Serving speed of daemon.engine against stock transformers/PEFT, same run; writes a results JSON (issue 27).

    python bench/serve_speed.py --part engine|http|7b|cpu [--rounds 3] [--out PATH]

Workload (GPU parts): the default model's shape (SmolLM2-135M: Llama, 30 layers, 576 wide) with random
bf16 weights, 64-token prompts of random ids, 32 new tokens, greedy, EOS ignored; LoRA adapters r16
all-linear (alpha 32, A and B random) registered in a temporary state folder.

  engine  requests submitted all at once, several interleaved rounds (median, min, max):
          ours (max_batch 32): 32 on one adapter, 32 pinned to 4 versions, 1 alone; decode step at batch 32
          (graph replays timed directly, and from 64 vs 32 new tokens); stock: HF generate with a static cache
          (transformers compiles the step: bare, and with one PEFT LoRA unmerged, 32 and 1), four PEFT adapters
          mixed per row through adapter_names (dynamic cache; --static-mixed adds the static-cache arm, ~4 min
          warm-up), HF dynamic cache batched, transformers' generate_batch. Then ready time (engine build +
          graph capture), and 100 swaps under load (batch-invariant engine, so every response can be checked
          exactly against its version's lone output): failed, mixed, captures and compilations before/after.
  http    the real server (daemon.server.create_app under lorad's uvicorn settings on 127.0.0.1), 32 streaming
          clients spread over several processes (bench/sse_load.py, raw asyncio HTTP/1.1): requests/s and time to
          first token, the same with clients pinned to 4 versions, interleaved rounds (median); the load
          generator's own ceiling against a trivial server, and the server thread's CPU per request.
          --shape tiny --device cpu runs it on a CPU with a 2-layer model, where the HTTP path dominates.
  7b      DeepSeek-LLM-7B shape (random bf16 weights), 32 concurrent, 256 new tokens: decode tokens/s against
          the memory bound (weight bytes / HBM bandwidth per step; bandwidth measured in the run by a device copy);
          the step is the 256-token run's time less the 64-token run's over 192 steps, median of --rounds pairs.
  step    only our decode step at 32 and 1 rows and the ready time (a short GPU check between full runs).
  cpu     the real SmolLM2-135M-Instruct (float32 weights) at engine level, rounds interleaved, load average
          recorded: first requests after ready in fresh processes (with and without the warm-up), TTFT of a
          200-token prompt, one stream against HF generate (float32 and bf16 weights), 8 concurrent clients
          against one at a time (requests/s), each for float32 prefill and (where the CPU has bf16 units) bf16-autocast
          prefill, and the greedy answers of both against HF's on 8 chat prompts.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import _common  # noqa: E402

SHAPE_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                  rope_theta=100000.0, bos_token_id=1, eos_token_id=None, pad_token_id=2, tie_word_embeddings=True)
SHAPE_7B = dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_theta=10000.0, bos_token_id=1, eos_token_id=None, pad_token_id=2, tie_word_embeddings=False)
# The engine's step costs little here (2 layers, 4096 words): what an HTTP request costs the host shows.
SHAPE_TINY = dict(SHAPE_135M, vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
SHAPES = {"135m": SHAPE_135M, "tiny": SHAPE_TINY}
BASE = "bench:random-135m"
PROMPT, NEW = 64, 32


# ----------------------------------------------------------------------------- helpers


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def prompts(n: int, length: int = PROMPT, seed: int = 1, vocab: int = 49152) -> list[list[int]]:
    r = random.Random(seed)
    return [[r.randrange(100, vocab - 152) for _ in range(length)] for _ in range(n)]


def model_(shape: dict = SHAPE_135M, device: str | None = None, dtype: str | None = None):
    """Random weights of ``shape``: bf16 on a GPU, fp32 on a CPU unless ``dtype`` says otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    torch.manual_seed(0)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=getattr(torch, dtype))
    m.generation_config.eos_token_id = None
    return m.eval()


def word_tokenizer(vocab: int = 49152):
    """A word-level tokenizer over ``vocab`` synthetic words (w3, w4, ...): the server detokenizes every id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "<pad>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", pad_token="<pad>")


def make_world(root: Path, n_adapters: int = 4, shape: dict = SHAPE_135M) -> dict:
    """A state folder with ``n_adapters`` registered LoRA adapters (r16, all-linear, random A and B) for BASE."""
    import torch
    from peft import LoraConfig, get_peft_model

    from daemon import registry
    from daemon.store import open_store

    state = root / "state"
    store = open_store(state)
    base = model_(shape, device="cpu", dtype="float32")
    versions = []
    for i in range(n_adapters):
        torch.manual_seed(100 + i)
        pm = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                             init_lora_weights=False))
        out = root / f"adapter-{i}"
        pm.save_pretrained(out)
        versions.append(registry.register_adapter(store, state, out, base_model=BASE))
        base = pm.unload()
    return {"state": state, "store": store, "versions": versions}


# Engine options every engine of this run gets (--decode-kernel); --group-projections off empties lora.GROUPS.
ENGINE_OPTIONS: dict = {}


def engine_(world: dict, shape: dict = SHAPE_135M, device: str | None = None, **kw):
    from daemon.engine import Engine
    from monitors.metrics import LoradMetrics

    model = model_(shape, device)
    kw = {"max_batch_size": 32, "max_queue": 1024, "request_timeout": 600, "max_context": 512,
          "adapter_slots": 6, **ENGINE_OPTIONS, **kw}
    return Engine(model, word_tokenizer(shape["vocab_size"]), store=world["store"] if world else None,
                  state_dir=world["state"] if world else None, base_model=BASE, metrics=LoradMetrics(), **kw)


def run_engine(engine, ps: list[list[int]], models: list[str], new: int = NEW) -> dict:
    from daemon.engine import SamplingParams

    params = SamplingParams(max_tokens=new, temperature=0)
    t0 = time.perf_counter()
    hs = [engine.submit(p, model=m, params=params) for p, m in zip(ps, models)]
    for h in hs:
        h.wait(600)
    dt = time.perf_counter() - t0
    toks = sum(len(h.tokens) for h in hs)
    errors = [h.error for h in hs if h.finish_reason not in ("length", "stop")]
    return {"requests_per_s": len(ps) / dt, "tokens_per_s": toks / dt, "seconds": dt, "tokens": toks,
            "ttft_p50_ms": 1000 * pct([h.ttft_seconds for h in hs if h.ttft_seconds is not None], 50),
            "errors": errors[:3]}


def step_time_ms(engine, batch: int = 32, steps: int = 200, position: int = 95) -> float:
    """Decode steps at ``batch`` rows each holding ``position`` positions (graph replays), timed on the device."""
    import torch

    stepper = engine.stepper
    tokens, positions, lora = [5] * batch, [position] * batch, [1] * batch
    result = engine.call(lambda: _time_steps(stepper, tokens, positions, lora, steps))
    torch.cuda.synchronize()
    return result


def _time_steps(stepper, tokens, positions, lora, steps):
    import torch

    for _ in range(10):
        stepper.decode(tokens, positions, lora)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        stepper.decode(tokens, positions, lora)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1000


# ----------------------------------------------------------------------------- stock arms


class HFArm:
    """One stock transformers/PEFT configuration; ``run(n, new)`` times one generate of n prompts."""

    def __init__(self, kind: str):
        import torch

        self.kind = kind
        self.warmup_s = None
        if kind in ("hf_static", "hf_batched", "cb"):
            self.model = model_()
        else:
            from peft import LoraConfig, get_peft_model

            k = 4 if kind.startswith("hf_mixed4") else 1
            pm = get_peft_model(model_(), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                     init_lora_weights=False), adapter_name="v0")
            for i in range(1, k):
                pm.add_adapter(f"v{i}", LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                   init_lora_weights=False))
            self.model = pm.to(torch.bfloat16).eval()
        if kind in ("hf_static", "hf_static_lora", "hf_mixed4_static"):
            inner = self.model if kind == "hf_static" else self.model.base_model.model
            inner.generation_config.cache_implementation = "static"  # transformers compiles the step itself

    def run(self, n: int, new: int = NEW) -> dict:
        import torch

        ps = prompts(n)
        t0 = time.perf_counter()
        if self.kind == "cb":
            from transformers import GenerationConfig

            gc = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=2)
            res = self.model.generate_batch(inputs=ps, generation_config=gc)  # not under inference_mode
            torch.cuda.synchronize()
            toks = sum(len(r.generated_tokens) for r in res.values())
        else:
            kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=2)
            if self.kind.startswith("hf_mixed4"):
                kw["adapter_names"] = [f"v{i % 4}" for i in range(n)]
            if self.kind in ("hf_static_lora", "hf_mixed4_static"):
                kw["cache_implementation"] = "static"
            ids = torch.tensor(ps, device="cuda")
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
            torch.cuda.synchronize()
            toks = (out.shape[1] - PROMPT) * n
        dt = time.perf_counter() - t0
        return {"requests_per_s": n / dt, "tokens_per_s": toks / dt, "seconds": dt, "tokens": toks}

    def warm(self, sizes: list[int]) -> None:
        t0 = time.perf_counter()
        for n in sizes:
            self.run(n, 4 if self.kind == "cb" else NEW)
        if self.kind == "hf_static":  # a static cache of another length compiles again: warm it too
            self.run(32, 2 * NEW)
        self.warmup_s = time.perf_counter() - t0


# ----------------------------------------------------------------------------- parts


def part_engine(args, out: dict) -> None:
    import torch

    root = Path(tempfile.mkdtemp(prefix="serve-speed-"))
    world = make_world(root)
    v = world["versions"]
    t0 = time.perf_counter()
    eng = engine_(world).start()
    eng.load_champion()
    eng.swap(v[0])
    ready = time.perf_counter() - t0
    for x in v:
        eng.preload(x, stage=True)
    out["ready_s"] = ready
    out["engine_config"] = eng.snapshot()
    ps32 = prompts(32)
    arms = {
        "ours_lora/32": lambda: run_engine(eng, ps32, ["lorad"] * 32),
        "ours_4_versions/32": lambda: run_engine(eng, ps32, [v[i % 4] for i in range(32)]),
        "ours_lora/1": lambda: run_engine(eng, ps32[:1], ["lorad"]),
        "ours_base/32": lambda: run_engine(eng, ps32, ["base"] * 32),
        "ours_lora_64new/32": lambda: run_engine(eng, ps32, ["lorad"] * 32, new=64),
    }
    run_engine(eng, ps32, [v[i % 4] for i in range(32)])  # warm-up
    stock = {}
    kinds = [k for k in args.stock.split(",") if k]
    for kind in kinds:
        t1 = time.perf_counter()
        try:
            arm = HFArm(kind)
            arm.warm([32, 1] if kind in args.alone.split(",") else [32])
            stock[kind] = arm
            out.setdefault("stock_warmup_s", {})[kind] = arm.warmup_s
        except Exception as e:  # noqa: BLE001 - a failing stock arm is recorded, the run goes on
            out.setdefault("stock_errors", {})[kind] = f"{type(e).__name__}: {e}"[:400]
        print(f"stock {kind} ready in {time.perf_counter() - t1:.1f}s", flush=True)
    for kind, arm in stock.items():
        arms[f"{kind}/32"] = lambda arm=arm: arm.run(32)
        if kind in args.alone.split(","):
            arms[f"{kind}/1"] = lambda arm=arm: arm.run(1)
        if kind == "hf_static":
            arms[f"{kind}_64new/32"] = lambda arm=arm: arm.run(32, 2 * NEW)
    results: dict[str, list] = {k: [] for k in arms}
    for r in range(args.rounds):
        for key, fn in arms.items():
            if r > 0 and key.startswith(("hf_mixed4", "cb")) and args.quick_slow_arms:
                continue
            res = fn()
            results[key].append(res)
            print(f"round {r} {key}: {res['requests_per_s']:.1f} req/s", flush=True)
    out["arms"] = {k: {"requests_per_s": stats([x["requests_per_s"] for x in xs]),
                       "tokens_per_s": stats([x["tokens_per_s"] for x in xs]), "last": xs[-1]}
                   for k, xs in results.items() if xs}
    out["decode_step_ms_32_direct"] = step_time_ms(eng, 32)
    out["decode_step_ms_1_direct"] = step_time_ms(eng, 1)
    out["compilations"] = eng.compilations()
    if args.compare_eager:  # the same engine without torch.compile: graphs of eager kernels
        t0 = time.perf_counter()
        plain = engine_(world, compile=False).start()
        plain.load_champion()
        plain.swap(v[0])
        out["eager_graphs"] = {"ready_s": time.perf_counter() - t0, "step_ms_32": step_time_ms(plain, 32),
                               "step_ms_1": step_time_ms(plain, 1),
                               "ours_lora/32": run_engine(plain, ps32, ["lorad"] * 32)}
        out["eager_graphs"]["ours_lora/32"] = run_engine(plain, ps32, ["lorad"] * 32)
        plain.stop(timeout=10)

    def per_step(k64: str, k32: str) -> float | None:
        if k64 not in out["arms"] or k32 not in out["arms"]:
            return None
        t64 = 32 / out["arms"][k64]["requests_per_s"]["median"]
        t32 = 32 / out["arms"][k32]["requests_per_s"]["median"]
        return (t64 - t32) / 32 * 1000
    out["decode_step_ms_32_from_64_vs_32"] = per_step("ours_lora_64new/32", "ours_lora/32")
    out["hf_static_decode_step_ms_32"] = per_step("hf_static_64new/32", "hf_static/32")
    out["hf_static_lora_decode_step_ms_32"] = per_step("hf_static_lora_64new/32", "hf_static_lora/32")
    m = eng.metrics.registry
    out["engine_step_metric_mean_ms"] = 1000 * m.get_sample_value("lorad_serve_decode_step_seconds_sum") / max(
        1, m.get_sample_value("lorad_serve_decode_step_seconds_count"))
    eng.stop(timeout=10)
    stock = eng = arms = None   # free the GPU memory before the swap test (the arms hold the engine)
    torch.cuda.empty_cache()
    out["swaps"] = swaps_under_load(world, args.swaps)


def swaps_under_load(world: dict, n_swaps: int) -> dict:
    """``n_swaps`` champion swaps among 4 versions while 32 clients request 'lorad' back to back."""
    from daemon.engine import SamplingParams

    v = world["versions"]
    t0 = time.perf_counter()
    eng = engine_(world, batch_invariant=True, max_context=128).start()
    eng.load_champion()
    ready = time.perf_counter() - t0
    ps = prompts(8, seed=7)
    params = SamplingParams(max_tokens=16, temperature=0)
    refs = {(x, i): eng.generate(p, model=x, max_tokens=16, temperature=0).tokens for x in v for i, p in enumerate(ps)}
    eng.swap(v[0])
    captures0, comp0 = eng.stepper.captures, eng.compilations()
    stop = threading.Event()
    failed, mixed, done, ttft_swap = [], [], [0], []

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            p = i % len(ps)
            h = eng.submit(ps[p], model="lorad", params=params)
            h.wait(120)
            if h.finish_reason not in ("length", "stop"):
                failed.append(h.error or h.finish_reason)
            elif h.tokens != refs[(h.version, p)]:
                mixed.append(h.version)
            else:
                done[0] += 1
                ttft_swap.append(h.ttft_seconds)
            i += 1

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(32)]
    for t in threads:
        t.start()
    swap_ms, preload_ms = [], []
    rng = random.Random(0)
    for k in range(n_swaps):
        target = rng.choice([x for x in v if x != eng.champion])
        res = eng.swap(target)
        swap_ms.append(res.swap_seconds * 1000)
        preload_ms.append(res.preload_seconds * 1000)
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join(60)
    out = {"swaps": n_swaps, "requests_ok": done[0], "failed": len(failed), "mixed": len(mixed),
           "failed_examples": failed[:3], "graph_captures_during_swaps": eng.stepper.captures - captures0,
           "compilations_during_swaps": eng.compilations() - comp0,
           "swap_ms_p50": pct(swap_ms, 50), "swap_ms_p99": pct(swap_ms, 99),
           "preload_ms_p50": pct(preload_ms, 50), "preload_ms_p99": pct(preload_ms, 99),
           "ttft_during_swaps_ms_p50": 1000 * (pct(ttft_swap, 50) or 0), "ttft_during_swaps_ms_p99":
               1000 * (pct(ttft_swap, 99) or 0), "ready_s_batch_invariant": ready}
    eng.stop(timeout=10)
    return out


def part_step(args, out: dict) -> None:
    """Only our decode step (135M shape, LoRA tables live): ready time and graph replays at 32 and 1 rows."""
    t0 = time.perf_counter()
    eng = engine_(None).start()
    eng.load_champion()
    out["ready_s"] = time.perf_counter() - t0
    out["decode_step_ms_32_direct"] = step_time_ms(eng, 32)
    out["decode_step_ms_1_direct"] = step_time_ms(eng, 1)
    out["decode_step_ms_32_at_400_direct"] = step_time_ms(eng, 32, position=400)
    # a real generation too (prefill, sampling, the host loop): a launch shape that breaks the engine fails here
    out["run_32"] = run_engine(eng, prompts(32), ["base"] * 32)
    out["compilations"], out["graph_captures"] = eng.compilations(), eng.stepper.captures
    eng.stop(timeout=10)


def copy_bandwidth() -> float:
    """HBM bandwidth as read + write bytes per second of 1 GiB device copies (after warm-up)."""
    import torch

    a = torch.empty(256 * 2**20, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 4 * 20 / (time.perf_counter() - t0)


def part_7b(args, out: dict) -> None:
    bandwidth = copy_bandwidth()
    eng = engine_(None, SHAPE_7B, max_context=512, adapter_slots=4, lora_max_rank=16).start()
    eng.load_champion()
    weight_bytes = sum(p.numel() * p.element_size() for name, p in eng.model.named_parameters()
                       if "embed_tokens" not in name)
    ps = prompts(32)
    run_engine(eng, ps[:4], ["base"] * 4, new=8)
    steps, r256 = [], None
    for _ in range(max(1, args.rounds)):  # rounds: a 64- then a 256-token run, the step from their difference
        r64 = run_engine(eng, ps, ["base"] * 32, new=64)
        r256 = run_engine(eng, ps, ["base"] * 32, new=256)
        steps.append((r256["seconds"] - r64["seconds"]) / 192)
    step_s = statistics.median(steps)
    direct_ms = step_time_ms(eng, 32, 50)
    bound_s = weight_bytes / bandwidth
    # The keys and values a step must read too (the weights-only bound leaves them out): 32 rows at the mean
    # position of steps 64..256 after a 64-token prompt.
    kv_per_position = eng.cache.nbytes / eng.cache.capacity_tokens   # every layer's keys and values, one position
    mean_position = len(ps[0]) + (64 + 256) / 2
    kv_bytes = 32 * kv_per_position * mean_position
    out.update({"hbm_bandwidth_gb_s_measured": bandwidth / 1e9, "weight_bytes": weight_bytes,
                "memory_bound_step_ms": bound_s * 1000, "decode_step_ms_from_256_vs_64": step_s * 1000,
                "decode_step_ms_direct": direct_ms, "decode_tokens_per_s": 32 / step_s,
                "fraction_of_memory_bound": bound_s / step_s, "fraction_direct": bound_s / (direct_ms / 1000),
                "rounds": {"decode_step_ms": [x * 1000 for x in steps],
                           "fraction_of_memory_bound": stats([bound_s / x for x in steps])},
                "kv_bytes_read_per_step_mean": kv_bytes,
                "fraction_of_memory_bound_with_kv": (weight_bytes + kv_bytes) / bandwidth / step_s,
                "run_256": r256, "note": "weights exclude the input embedding (a gather, not streamed); LoRA tables "
                                          "(4 slots x r16) are extra bytes the bound does not count"})
    eng.stop(timeout=10)


def part_http(args, out: dict) -> None:
    """The real server (lorad's app and uvicorn settings) in this process, the load generator in others."""
    from bench import sse_load
    from daemon.config import build_config
    from daemon.server import create_app

    shape = SHAPES[args.shape]
    root = Path(tempfile.mkdtemp(prefix="serve-speed-http-"))
    world = make_world(root, shape=shape)
    v = world["versions"]
    t0 = time.perf_counter()
    eng = engine_(world, shape, device=args.device).start()
    eng.load_champion()
    out["ready_s"] = time.perf_counter() - t0
    eng.swap(v[0])
    for x in v:
        eng.preload(x, stage=True)
    cfg = build_config({"model": {"base_model": BASE},
                        "serve": {"max_queue": 1024, "max_prompt_tokens": 256, "max_new_tokens": 256,
                                  "request_timeout_seconds": 600}})
    ready = threading.Event()
    ready.set()
    daemon = SimpleNamespace(cfg=cfg, store=world["store"], metrics=eng.metrics, ready=ready, model_error=None,
                             engine=eng, started_at=time.time(), status=lambda: {})
    server = _Server(create_app(daemon), cfg.serve)
    out.update(shape=args.shape, device=str(eng.device), server=server.describe())
    out["client_ceiling"] = sse_load.ceiling(args.http_clients, 100, args.http_procs)
    print("load generator ceiling", out["client_ceiling"], flush=True)
    runs: dict[str, list] = {"http_32": [], "http_32_4_versions": []}
    vocab = shape["vocab_size"]
    ps32 = prompts(32, seed=3, vocab=vocab)
    engine_runs = []
    try:
        for r in range(args.rounds):
            engine_runs.append(run_engine(eng, ps32, ["lorad"] * 32))  # what the engine alone does, same round
            print(f"round {r} engine_32", engine_runs[-1], flush=True)
            for label, models in (("http_32", "lorad"), ("http_32_4_versions", ",".join(v))):
                cpu0, process0 = server.loop_cpu_s(), time.process_time()
                res = sse_load.run(server.url, clients=args.http_clients, requests=args.http_requests,
                                   procs=args.http_procs, models=models, vocab=vocab)
                # both include the warm-up requests (one per client): upper bounds
                cpu, process = server.loop_cpu_s() - cpu0, time.process_time() - process0
                res["server_loop_cpu_ms_per_request"] = 1000 * cpu / res["requests"] if cpu >= 0 else None
                res["server_process_cpu_ms_per_request"] = 1000 * process / res["requests"]
                runs[label].append(res)
                print(f"round {r} {label}", res, flush=True)
        for label, xs in runs.items():
            out[label] = dict(xs[-1], requests_per_s=statistics.median(x["requests_per_s"] for x in xs),
                              ttft_p50_ms=statistics.median(x["ttft_p50_ms"] for x in xs),
                              rounds={k: [x[k] for x in xs] for k in (
                                  "requests_per_s", "ttft_p50_ms", "ttft_p99_ms", "server_loop_cpu_ms_per_request",
                                  "server_process_cpu_ms_per_request")})
        out["engine_32"] = dict(engine_runs[-1], requests_per_s=stats([x["requests_per_s"] for x in engine_runs]))
        out["graph_captures"] = eng.stepper.captures
    finally:
        server.stop()
        eng.stop(timeout=10)


class _Server:
    """uvicorn with lorad's settings (daemon.server.uvicorn_config) in a thread on a free port of 127.0.0.1."""

    def __init__(self, app, serve):
        import socket

        import uvicorn

        from daemon.server import uvicorn_config

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        settings = SimpleNamespace(**{**vars(serve), "host": "127.0.0.1", "port": port})
        self.config = uvicorn_config(app, settings, log_config=None, access_log=False, lifespan="off", backlog=4096)
        self.server = uvicorn.Server(self.config)
        self.tid = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def _run(self) -> None:
        self.tid = threading.get_native_id()
        self.server.run()

    def describe(self) -> dict:
        """What serves: the event loop and HTTP protocol uvicorn picked."""
        http = self.config.http
        return {"loop": self.config.loop,
                "http": http if isinstance(http, str) else f"{http.__module__}.{http.__qualname__}"}

    def loop_cpu_s(self) -> float:
        """CPU seconds the server's thread (event loop, HTTP, detokenization) has used; -1 where unknown."""
        try:
            fields = Path(f"/proc/self/task/{self.tid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return -1.0

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


CPU_SPEC = "embedded:SmolLM2-135M-Instruct"
CPU_PROMPT, CPU_NEW = 200, 32  # TTFT prompt length; one-stream and 8-client arms: 64-token prompts, 32 new tokens
AGREEMENT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                     "Explain what a contract is in one sentence.", "List three prime numbers.",
                     "Who wrote Hamlet?", "Translate 'good morning' into French.", "What is 12 times 7?",
                     "Give one tip for sleeping better."]


def cpu_engine(args, prefill_dtype: str | None, warm_up: bool = True, weights: str = "float32"):
    """A fresh SmolLM2-135M-Instruct engine (``weights``: float32 or bfloat16) as ``lorad serve`` builds it on a
    CPU; returns (engine, tokenizer, seconds from model loaded to ready)."""
    from daemon.engine import Engine
    from pipelines.models import load_base_model

    model, tok = load_base_model(CPU_SPEC, Path(args.cache), dtype=weights, device="cpu")
    t0 = time.perf_counter()
    eng = Engine(model, tok, max_batch_size=8, max_context=1024, prefill_dtype=prefill_dtype).start()
    eng.load_champion(warm_up=warm_up)
    return eng, tok, time.perf_counter() - t0


def cpu_first_request(args) -> None:
    """Own process (``--cpu-first-request warm|cold``): ready time, then the TTFT of the first 200-token requests a
    fresh engine serves, with or without the warm-up. Prints one JSON line."""
    import torch

    from pipelines.hardware import serve_prefill_autocast, serve_weights_dtype

    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    weights = serve_weights_dtype("auto")  # as lorad serve loads the model here
    dtype = None if weights else serve_prefill_autocast(torch.nn.Linear(1, 1), args.cpu_prefill)
    eng, _, ready = cpu_engine(args, dtype, warm_up=args.cpu_first_request == "warm", weights=weights or "float32")
    # Wall time suffers from other processes; the CPU time the decode thread (and the whole process) spent on a
    # request shows the first-call costs even on a loaded machine.
    clock = time.pthread_getcpuclockid(eng._thread.ident)
    ttft, thread_cpu, process_cpu = [], [], []
    for p in prompts(3, CPU_PROMPT, seed=11 + os.getpid() % 1000):
        c0, p0 = time.clock_gettime(clock), time.process_time()
        ttft.append(eng.generate(p, max_tokens=1, temperature=0).ttft_seconds * 1000)
        thread_cpu.append((time.clock_gettime(clock) - c0) * 1000)
        process_cpu.append((time.process_time() - p0) * 1000)
    print(json.dumps({"ready_s": ready, "warm_up_s": eng.warm_up_seconds, "ttft_ms": ttft,
                      "decode_thread_cpu_ms": thread_cpu, "process_cpu_ms": process_cpu}))
    eng.stop(timeout=10)


def part_cpu(args, out: dict) -> None:
    """The default model on this CPU: TTFT, one stream against HF generate, 8 clients against one at a time.

    Engine variants: float32 throughout, and (where the hardware plan picks it) bf16-autocast prefill with float32
    decode, the ``lorad serve`` default on a CPU with bf16 units. Every arm runs once per round, rounds interleaved, so
    the load other processes put on the machine spreads over all arms; the load average is recorded per round.
    """
    import torch

    from pipelines.hardware import bf16_matvec_speedup, cpu_bf16_matmul, serve_prefill_autocast, serve_weights_dtype
    from pipelines.models import load_base_model

    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    out.update({"threads": torch.get_num_threads(), "cpu": _common.cpu_name(), "cpu_count": os.cpu_count(),
                "load_at_start": os.getloadavg()})
    out["first_requests"] = cpu_first_requests(args)
    auto = serve_prefill_autocast(torch.nn.Linear(1, 1), "auto")
    weights = serve_weights_dtype("auto")  # what lorad serve loads here (model.dtype auto)
    out["bf16_matvec_speedup"] = bf16_matvec_speedup() if cpu_bf16_matmul() else None
    # (prefill autocast, weights) per variant: float32 throughout; bf16 prefill over float32 weights; bf16 weights
    variants = {"fp32": (None, "float32"), **({"bf16_prefill": (auto, "float32")} if auto else {}),
                **({"bf16_weights": (None, "bfloat16")} if cpu_bf16_matmul() else {})}
    out["default_variant"] = d = "bf16_weights" if weights else "bf16_prefill" if auto else "fp32"
    engines, ready = {}, {}
    for name, (dtype, w) in variants.items():
        engines[name], tok, ready[name] = cpu_engine(args, dtype, weights=w)
    out["ready_s"] = ready
    out["warm_up_s"] = {name: e.warm_up_seconds for name, e in engines.items()}
    out["agreement"] = cpu_agreement(args, engines, tok)
    hf = {"hf_fp32": load_base_model(CPU_SPEC, Path(args.cache), dtype="float32", device="cpu")[0],
          "hf_bf16": load_base_model(CPU_SPEC, Path(args.cache), dtype="bfloat16", device="cpu")[0]}
    for eng in engines.values():
        eng.eos_ids = set()  # EOS ignored, as min_new_tokens does for HF generate
    p64 = prompts(8, 64, seed=6)
    with torch.no_grad():
        for model in hf.values():
            model.generate(torch.tensor([p64[0]]), max_new_tokens=4, do_sample=False, pad_token_id=2)
    results: dict[str, list] = collections.defaultdict(list)
    out["load_per_round"] = []
    for r in range(args.rounds):
        cpu_round(r, engines, hf, p64, results)
        out["load_per_round"].append(os.getloadavg())
        print(f"cpu round {r}: load {os.getloadavg()[0]:.1f}", {k: round(v[-1], 1) for k, v in results.items()},
              flush=True)
    out["arms"] = {k: {**stats(v), "all": v} for k, v in results.items()}
    out.update({"ttft_p50_ms_200_tokens": statistics.median(results[f"{d}/ttft_ms"]),
                "one_stream_tokens_per_s": statistics.median(results[f"{d}/one_stream_tokens_per_s"]),
                "hf_generate_one_stream_tokens_per_s":
                    max(statistics.median(results[f"{k}/one_stream_tokens_per_s"]) for k in hf),
                "rps_8_vs_1": statistics.median(results[f"{d}/rps_8_vs_1"])})
    for eng in engines.values():
        eng.stop(timeout=10)


def cpu_first_requests(args) -> dict:
    """First requests after ready, each engine in a fresh process (first-call costs are per process), with the
    warm-up and without, alternating."""
    import subprocess

    first: dict[str, list] = {"warm": [], "cold": []}
    for _ in range(args.cpu_cold_rounds):
        for kind in first:
            cmd = [sys.executable, __file__, "--cpu-first-request", kind, "--cache", args.cache,
                   "--cpu-threads", str(args.cpu_threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
            if res.returncode != 0:
                raise RuntimeError(res.stderr[-2000:])
            first[kind].append(json.loads(res.stdout.strip().splitlines()[-1]))
    return {kind: {"ready_s": stats([r["ready_s"] for r in rs]),
                   "warm_up_s": stats([r["warm_up_s"] for r in rs]) if kind == "warm" else None,
                   "ttft_first_ms": stats([r["ttft_ms"][0] for r in rs]),
                   "ttft_next_ms": stats([t for r in rs for t in r["ttft_ms"][1:]]),
                   "decode_thread_cpu_first_ms": stats([r["decode_thread_cpu_ms"][0] for r in rs]),
                   "decode_thread_cpu_next_ms": stats([t for r in rs for t in r["decode_thread_cpu_ms"][1:]]),
                   "runs": rs}
            for kind, rs in first.items() if rs}


def cpu_round(r: int, engines: dict, hf: dict, p64: list[list[int]], results: dict) -> None:
    """One round of every CPU arm: TTFT of a new 200-token prompt per engine variant; one stream of 32 new tokens
    (engines, then HF generate); eight 64-token requests one at a time, then all at once.

    Each arm computes with only its own thread's OpenMP workers: this (main) thread lets its workers go before the
    engines' arms (as ``lorad serve``'s threads do once they are done with torch, and the idle engines do
    themselves); GNU OpenMP stops spinning once the workers of all threads outnumber the cores, which slows
    whichever arm runs (``pipelines.hardware.release_openmp_workers``)."""
    import torch

    from pipelines.hardware import release_openmp_workers

    release_openmp_workers()
    for (name, eng), p in zip(engines.items(), prompts(len(engines), CPU_PROMPT, seed=100 + r)):
        results[f"{name}/ttft_ms"].append(eng.generate(p, max_tokens=1, temperature=0).ttft_seconds * 1000)
    p = p64[r % len(p64)]
    for name, eng in engines.items():
        t0 = time.perf_counter()
        h = eng.generate(p, max_tokens=CPU_NEW, temperature=0)
        results[f"{name}/one_stream_tokens_per_s"].append(len(h.tokens) / (time.perf_counter() - t0))
        results[f"{name}/decode_tokens_per_s"].append((len(h.tokens) - 1) / (h.finished_at - h.first_token_at))
    for name, model in hf.items():
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(torch.tensor([p]), max_new_tokens=CPU_NEW, min_new_tokens=CPU_NEW, do_sample=False,
                           pad_token_id=2)
        results[f"{name}/one_stream_tokens_per_s"].append(CPU_NEW / (time.perf_counter() - t0))
    release_openmp_workers()
    for name, eng in engines.items():
        t0 = time.perf_counter()
        for q in p64:
            eng.generate(q, max_tokens=CPU_NEW, temperature=0)
        one = len(p64) / (time.perf_counter() - t0)
        eight = run_engine(eng, p64, ["base"] * len(p64), CPU_NEW)["requests_per_s"]
        results[f"{name}/rps_1_at_a_time"].append(one)
        results[f"{name}/rps_8_concurrent"].append(eight)
        results[f"{name}/rps_8_vs_1"].append(eight / one)


def cpu_agreement(args, engines: dict, tok) -> dict:
    """Greedy answers (24 new tokens, chat template) of each engine variant against HF generate in float32 (and
    the bf16-weights engine against HF with bf16 weights)."""
    import torch

    from pipelines.models import load_base_model

    references = {"hf_fp32": load_base_model(CPU_SPEC, Path(args.cache), dtype="float32", device="cpu")[0]}
    if "bf16_weights" in engines:
        references["hf_bf16"] = load_base_model(CPU_SPEC, Path(args.cache), dtype="bfloat16", device="cpu")[0]
    answers: dict[str, list] = {name: [] for name in (*references, *engines)}
    for text in AGREEMENT_PROMPTS:
        ids = tok(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=False), add_special_tokens=False)["input_ids"]
        for name, reference in references.items():
            with torch.no_grad():
                out = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):]
            answers[name].append([t for t in out.tolist() if t not in engines["fp32"].eos_ids])
        for name, eng in engines.items():
            answers[name].append(eng.generate(ids, max_tokens=24, temperature=0).tokens)

    def common(a: list, b: list) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    result = {"prompts": len(AGREEMENT_PROMPTS), "new_tokens": 24,
              "texts": {name: [tok.decode(a) for a in ans] for name, ans in answers.items()}}
    for x, y in (("fp32", "hf_fp32"), *((n, "hf_fp32") for n in engines if n != "fp32"),
                 *((n, "fp32") for n in engines if n != "fp32"),
                 *((("bf16_weights", "hf_bf16"),) if "hf_bf16" in answers else ())):
        pairs = list(zip(answers[x], answers[y]))
        result[f"{x}_vs_{y}"] = {"identical": sum(a == b for a, b in pairs),
                                 "mean_common_prefix_tokens": statistics.mean(common(a, b) for a, b in pairs)}
    return result


# ----------------------------------------------------------------------------- summary + main


def summarize(result: dict) -> dict:
    e, h, s7, c = (result.get(k, {}) for k in ("engine", "http", "7b", "cpu"))
    arms = e.get("arms", {})

    def med(key: str) -> float | None:
        return arms[key]["requests_per_s"]["median"] if key in arms else None

    def ratio(a: str, b: str) -> float | None:
        x, y = med(a), med(b)
        return x / y if x and y else None

    swaps = e.get("swaps", {})
    return {
        "card": result.get("card"), "commit": result.get("commit"), "dirty": result.get("dirty"),
        "gpu_http_rps_32": h.get("http_32", {}).get("requests_per_s"),
        "gpu_http_rps_32_4_versions": h.get("http_32_4_versions", {}).get("requests_per_s"),
        "gpu_ttft_p50_ms_32": h.get("http_32", {}).get("ttft_p50_ms"),
        "engine_rps_32_lora": med("ours_lora/32"),
        "engine_vs_hf_static_lora": ratio("ours_lora/32", "hf_static_lora/32"),
        "engine_vs_hf_static_base": ratio("ours_lora/32", "hf_static/32"),
        "engine_4_versions_vs_hf_static_lora": ratio("ours_4_versions/32", "hf_static_lora/32"),
        "engine_4_versions_vs_hf_mixed4": ratio("ours_4_versions/32", "hf_mixed4/32"),
        "engine_alone_vs_hf_static_lora_alone": ratio("ours_lora/1", "hf_static_lora/1"),
        "engine_vs_continuous_batching": ratio("ours_lora/32", "cb/32"),
        "decode_step_ms_32": e.get("decode_step_ms_32_direct"),
        "hf_static_decode_step_ms_32": e.get("hf_static_decode_step_ms_32"),
        "decode_fraction_of_memory_bound_7b": s7.get("fraction_of_memory_bound"),
        "ready_s": e.get("ready_s", h.get("ready_s")),
        "recompiles_in_swaps": (swaps.get("graph_captures_during_swaps", 0) + swaps.get("compilations_during_swaps", 0)
                                if swaps else None),
        "swaps_failed": swaps.get("failed"), "swaps_mixed": swaps.get("mixed"),
        "cpu_ttft_p50_ms": c.get("ttft_p50_ms_200_tokens"), "cpu_rps_8_vs_1": c.get("rps_8_vs_1"),
        "cpu_ready_s": (c.get("ready_s") or {}).get(c.get("default_variant")),
        "cpu_one_stream_vs_hf": (c["one_stream_tokens_per_s"] / c["hf_generate_one_stream_tokens_per_s"]
                                 if c.get("hf_generate_one_stream_tokens_per_s") else None),
    }


def main() -> int:
    from daemon.engine.cache import KV_CACHE_DTYPES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("engine", "http", "7b", "cpu", "step"), action="append")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stock", default="hf_static,hf_static_lora,hf_mixed4,hf_batched,cb",
                    help="stock arms (add hf_mixed4_static for the static-cache mixed arm, ~4 min warm-up)")
    ap.add_argument("--alone", default="hf_static,hf_static_lora",
                    help="stock arms also timed with one request alone (each costs one more compile)")
    ap.add_argument("--quick-slow-arms", action="store_true", help="run hf_mixed4 and cb in the first round only")
    ap.add_argument("--swaps", type=int, default=100)
    ap.add_argument("--compare-eager", action="store_true", help="also time the engine without torch.compile")
    ap.add_argument("--http-requests", type=int, default=40, help="requests per HTTP client")
    ap.add_argument("--http-clients", type=int, default=32)
    ap.add_argument("--http-procs", type=int, default=None,
                    help="load generator processes (default min(4, clients); bench/sse_load.py)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="135m",
                    help="model shape of the http part (tiny: a 2-layer model, so the HTTP path dominates on a CPU)")
    ap.add_argument("--device", default=None, help="device of the http part's engine (default cuda if available)")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "lorad-test"), help="model cache for the CPU part")
    ap.add_argument("--cpu-threads", type=int, default=0, help="torch threads for the CPU part (0 = torch's default)")
    ap.add_argument("--cpu-cold-rounds", type=int, default=2,
                    help="CPU part: fresh processes timing the first requests, with and without the warm-up")
    ap.add_argument("--cpu-first-request", choices=("warm", "cold"), help=argparse.SUPPRESS)
    ap.add_argument("--cpu-prefill", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_speed.json"))
    ap.add_argument("--merge", action="store_true", help="keep the other parts already in --out")
    ap.add_argument("--decode-kernel", choices=("on", "off"), default="on",
                    help="the engine's Triton decode attention (serve.decode_kernel); off = the PyTorch path")
    ap.add_argument("--attention-tuning", default=None, metavar="JSON",
                    help="overrides of the decode kernel's launch shape for every head geometry "
                         "(daemon/engine/kernels.py TUNING keys), e.g. '{\"dot\": true}'")
    ap.add_argument("--group-projections", choices=("on", "off"), default="on",
                    help="merge q/k/v and gate/up into one matmul each (daemon/engine/lora.py GROUPS)")
    ap.add_argument("--joint-layout", choices=("transposed", "rows"), default="transposed",
                    help="how the GPU stores each projection's weight + A table (daemon/engine/lora.py "
                         "GPU_TRANSPOSED): [in, out + columns] (default) or [out + columns, in]")
    ap.add_argument("--rows-leaves", default="", metavar="NAMES",
                    help="comma-separated Linear names (o_proj,down_proj) kept in the row layout on the GPU "
                         "(lora.GPU_ROWS_LEAVES)")
    ap.add_argument("--lora-b-kernel", choices=("on", "off"), default="on",
                    help="y + (h * select) @ B in one Triton kernel on the GPU (serve.lora_kernel); off = PyTorch")
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                    help="serve.kv_cache_dtype of every engine in the run")
    ap.add_argument("--lora-b-skip", choices=("on", "off"), default="on",
                    help="the LoRA B kernel reads only each tile's members' rows of a group's block-diagonal B "
                         "(kernels.SKIP_ZERO_BLOCKS); off = every row")
    ap.add_argument("--blas", choices=("engine", "default", "cublaslt"), default="engine",
                    help="the engine's BLAS library (step.BLAS, cuBLASLt); default = the process's, as the stock arms; "
                         "cublaslt = for the whole run, stock arms included")
    args = ap.parse_args()
    if args.cpu_first_request:
        cpu_first_request(args)
        return 0
    ENGINE_OPTIONS["decode_kernel"] = args.decode_kernel == "on"
    if args.attention_tuning:
        from daemon.engine import kernels

        override = json.loads(args.attention_tuning)
        kernels.TUNING.update(override)
        for geometry in kernels.TUNED.values():
            geometry.update(override)
    from daemon.engine import lora

    if args.group_projections == "off":
        lora.GROUPS = ()
    lora.GPU_TRANSPOSED = args.joint_layout == "transposed"
    lora.GPU_ROWS_LEAVES = tuple(n for n in args.rows_leaves.split(",") if n)
    ENGINE_OPTIONS["lora_kernel"] = args.lora_b_kernel == "on"
    ENGINE_OPTIONS["kv_cache_dtype"] = args.kv_cache_dtype
    from daemon.engine import kernels as engine_kernels

    engine_kernels.SKIP_ZERO_BLOCKS = args.lora_b_skip == "on"
    import torch
    import transformers

    from daemon.engine import step as engine_step

    if args.blas == "default":
        engine_step.BLAS = None
    elif args.blas == "cublaslt":
        torch.backends.cuda.preferred_blas_library(args.blas)

    path = Path(args.out)
    result = json.loads(path.read_text()) if args.merge and path.exists() else {}
    here = {"commit": _common.commit(), "dirty": _common.dirty("daemon", "bench/serve_speed.py"),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
            "engine_options": {"decode_kernel": args.decode_kernel, "group_projections": args.group_projections,
                               "attention_tuning": args.attention_tuning, "joint_layout": args.joint_layout,
                               "rows_leaves": args.rows_leaves,
                               "lora_b_kernel": args.lora_b_kernel, "lora_b_skip": args.lora_b_skip,
                               "blas": args.blas, "kv_cache_dtype": args.kv_cache_dtype}}
    if torch.cuda.is_available():
        result.update(here, card=torch.cuda.get_device_name())
    else:  # a CPU run merged into a GPU result keeps the GPU run's card and commit at the top
        result["cpu_machine"] = _common.cpu_name()
        if "commit" not in result:
            result.update(here)
    fns = {"engine": part_engine, "http": part_http, "7b": part_7b, "cpu": part_cpu, "step": part_step}
    for part in args.part or ["engine"]:
        section: dict = {}
        t0 = time.perf_counter()
        load_start = _common.host_load()
        try:
            fns[part](args, section)
        except Exception as e:  # noqa: BLE001 - the parts measured so far are still written
            import traceback

            section["error"] = f"{type(e).__name__}: {e}"[:500]
            section["trace"] = traceback.format_exc()[-3000:]
            print(section["trace"], flush=True)
        section["wall_s"] = time.perf_counter() - t0
        section["load"] = {"start": load_start, "end": _common.host_load()}
        section.update(here)
        result[part] = section
        result["summary"] = summarize(result)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result["summary"], indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
