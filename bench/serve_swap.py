"""Serving under hot-swaps, time to first token, batching throughput; writes bench/results/serve_swap.json.

    .venv/bin/python bench/serve_swap.py [--quick] [--cache DIR] [--device cpu|cuda] [--dtype float32]
                                         [--threads N] [--swaps 100] [--out PATH]

Everything goes through a real uvicorn server on 127.0.0.1 and HTTP clients, with the default base
model (SmolLM2-135M-Instruct from the prepared cache) and three LoRA adapters (all-linear, r=16,
lora_B perturbed so each version answers differently) registered in a temporary state folder.

  references  each (version, prompt) decoded alone, greedy: what every later response must equal exactly
  ttft        one client, 200-token prompts, streaming: time to first token (float32, the CPU default, and
              bfloat16 for comparison)
  swaps       8 clients stream greedy requests back to back (64-token prompts, 16 new tokens, model "lorad"
              = whatever is champion when the request arrives) while the champion is changed --swaps times
              through the admin API: POST /admin/promote to a random other adapter of the three (a preload
              whenever it is not loaded), and every 10th change a POST /admin/rollback (instant: the previous
              champion stays loaded). Counts failed requests, and responses that differ from the reference
              of the version they name (and whether such a response equals another version's reference: a
              mixed version). Swap = the pointer flip after preload (engine-measured); preload = verify +
              load (in place into a free slot, or a new slot).
  throughput  requests/s and generated tokens/s at 1, 8 and 32 clients (64-token prompts, 32 new tokens,
              greedy; a fixed 16 requests per point shared by the clients, at least one each) for: one
              request at a time (max_batch_size 1), dynamic batching with the default batch-invariant
              decode (max_batch_size 8, fixed-shape steps), and dynamic batching in fast mode
              (batch_invariant=False: only the running rows, versions mixed in one forward).

The machine is usually shared: the load average before and after each phase is recorded with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import _common  # noqa: E402

BASE_MODEL = "embedded:SmolLM2-135M-Instruct"
TOKEN = "bench-admin-token"
SENTENCES = [
    "The court held that the contract was void because one party lacked capacity.",
    "Under the statute, a landlord must return the deposit within thirty days unless damage is shown.",
    "The judge explained the difference between negligence and strict liability to the jury.",
    "An appeal may be filed when the lower court misapplied the law or ignored material evidence.",
    "Witnesses described a red car leaving the intersection shortly before midnight.",
    "The company argued that its terms of service limited any damages to the price paid.",
    "A tenant who withholds rent must usually place the money in escrow with the court.",
    "The prosecutor asked for a continuance because a key expert had fallen ill.",
    "Copyright protects the expression of an idea, not the idea itself.",
    "The merger was blocked after regulators concluded it would raise prices for consumers.",
    "In many jurisdictions, a verbal agreement to sell land cannot be enforced.",
    "The defendant claimed self-defense, but the evidence showed he had pursued the victim.",
]


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """``n`` different prompts of exactly ``length`` tokens: the sentences in rotated orders, cut at ``length``."""
    out = []
    for i in range(n):
        text = " ".join(SENTENCES[i * 3:] + SENTENCES[:i * 3]) + " Question: what follows from these facts? Answer:"
        ids = tokenizer(text)["input_ids"]
        while len(ids) < length:
            ids = ids + ids
        out.append(ids[-length:])  # keep the end: the question is what the model continues from
    return out


# ----------------------------------------------------------------------------- machine


def machine_info(args: argparse.Namespace) -> dict:
    import peft
    import torch
    import transformers

    cpu = _common.cpu_name()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def git_commit() -> dict:
    return {"commit": _common.commit(), "dirty": _common.dirty(),
            "serving_code_dirty": _common.dirty("daemon/engine", "daemon/server", "bench/serve_swap.py")}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def summary(values: list[float], unit_scale: float = 1000.0) -> dict:
    """p50/p90/p99/max/mean in milliseconds (unit_scale 1000) of values given in seconds."""
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50_ms": round(pct(values, 50) * unit_scale, 3),
            "p90_ms": round(pct(values, 90) * unit_scale, 3), "p99_ms": round(pct(values, 99) * unit_scale, 3),
            "max_ms": round(max(values) * unit_scale, 3), "mean_ms": round(statistics.fmean(values) * unit_scale, 3)}


# ----------------------------------------------------------------------------- world


def make_adapters(state: Path, store, cache: Path, args: argparse.Namespace, n: int = 3) -> list[str]:
    """Register ``n`` LoRA adapters for the base model, each with lora_B perturbed by its own seed."""
    import torch
    from peft import get_peft_model

    from daemon import registry
    from pipelines.models import load_base_model, lora_config

    base, _ = load_base_model(BASE_MODEL, cache, dtype="float32", device="cpu")
    torch.manual_seed(0)  # lora_A is initialised randomly: the same adapters on every run
    model = get_peft_model(base, lora_config(base, r=16, alpha=32, dropout=0.0, targets="all-linear"))
    versions = []
    for i in range(n):
        gen = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:  # zero at init: perturb so every version answers differently
                    param.copy_(torch.randn(param.shape, generator=gen) * args.adapter_scale)
        out = state.parent / f"adapter-{i}"
        model.save_pretrained(out)
        versions.append(registry.register_adapter(store, state, out, base_model=BASE_MODEL))
    del model, base
    return versions


class Server:
    """uvicorn in a thread on a free port of 127.0.0.1."""

    def __init__(self, app):
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                                    access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve(engine, store, args: argparse.Namespace) -> Server:
    from types import SimpleNamespace

    from daemon.config import build_config
    from daemon.server import create_app

    cfg = build_config({"model": {"base_model": BASE_MODEL},
                        "serve": {"admin_token": TOKEN, "max_queue": 256, "max_prompt_tokens": 2048,
                                  "max_new_tokens": 512, "request_timeout_seconds": 600}})
    ready = threading.Event()
    ready.set()
    daemon = SimpleNamespace(cfg=cfg, store=store, metrics=engine.metrics, ready=ready, model_error=None,
                             engine=engine, started_at=time.time(), status=lambda: {})
    return Server(create_app(daemon))


def stream_completion(http, prompt: list[int], max_tokens: int, model: str = "lorad") -> dict:
    """POST /v1/completions with stream=true; returns model, text, ttft, total seconds, error."""
    t0 = time.perf_counter()
    out = {"model": None, "text": "", "ttft": None, "error": None, "tokens": None}
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    try:
        with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                out["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
                return out
            out["model"] = r.headers.get("x-lorad-adapter")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["error"] = f"stream error: {chunk['error']}"
                    break
                if out["ttft"] is None:
                    out["ttft"] = time.perf_counter() - t0
                if chunk.get("model") != out["model"]:
                    out["error"] = f"chunk model {chunk.get('model')} != header {out['model']}"
                for choice in chunk.get("choices", []):
                    out["text"] += choice.get("text") or ""
                if chunk.get("usage"):
                    out["tokens"] = chunk["usage"]["completion_tokens"]
    except Exception as e:  # a failed request is counted, not fatal
        out["error"] = f"{type(e).__name__}: {e}"
    out["seconds"] = time.perf_counter() - t0
    return out


def reference_text(engine, tokenizer, model: str, prompt: list[int], max_tokens: int) -> str:
    from daemon.server import Detokenizer

    detok = Detokenizer(tokenizer)
    for t in engine.generate(prompt, model=model, max_tokens=max_tokens, temperature=0).tokens:
        detok.push(t)
    detok.flush()
    return detok.text


def make_engine(model, tokenizer, store, state: Path, **kw):
    from daemon.engine import Engine
    from monitors.metrics import LoradMetrics

    return Engine(model, tokenizer, store=store, state_dir=state, base_model=BASE_MODEL, metrics=LoradMetrics(),
                  request_timeout=600, max_queue=256, **kw).start()


# ----------------------------------------------------------------------------- phases


def phase_ttft(server: Server, prompts: list[list[int]], n: int) -> dict:
    import httpx

    ttfts, errors = [], []
    with httpx.Client(base_url=server.url, timeout=600) as http:
        stream_completion(http, prompts[0], 2)  # warm-up
        for i in range(n):
            r = stream_completion(http, prompts[i % len(prompts)], 4)
            (errors.append(r["error"]) if r["error"] else ttfts.append(r["ttft"]))
    return {"prompt_tokens": len(prompts[0]), "clients": 1, "ttft": summary(ttfts), "errors": errors,
            "target": "p50 < 500 ms", "met": bool(ttfts) and pct(ttfts, 50) < 0.5}


def phase_swaps(server: Server, engine, versions: list[str], prompts: list[list[int]], refs: dict,
                args: argparse.Namespace) -> dict:
    import httpx

    results, swaps, swap_errors = [], [], []
    done = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=600) as http:
            k = i
            while not done.is_set():
                p = k % len(prompts)
                r = stream_completion(http, prompts[p], args.swap_max_tokens)
                r["prompt"] = p
                results.append(r)
                k += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=600, headers=headers) as http:
        rng = random.Random(0)
        for i in range(args.swaps):
            time.sleep(args.swap_interval)
            if i % 10 == 9:
                r = http.post("/admin/rollback", json={"reason": f"bench rollback {i}"})
            else:
                current = engine.champion
                target = rng.choice([v for v in versions if v != current])
                r = http.post("/admin/promote", json={"version": target, "reason": f"bench swap {i}"})
            if r.status_code == 200:
                swaps.append(r.json() | {"kind": "rollback" if i % 10 == 9 else "promote"})
            else:
                swap_errors.append(f"{r.status_code}: {r.text[:200]}")
    done.set()
    for t in threads:
        t.join(600)
    elapsed = time.perf_counter() - t_start

    failed = [r for r in results if r["error"]]
    ok = [r for r in results if not r["error"]]
    mismatched, mixed = [], []
    for r in ok:
        if r["text"] != refs[(r["model"], r["prompt"])]:
            mismatched.append(r)
            if any(r["text"] == refs[(m, r["prompt"])] for m in ["base", *versions] if m != r["model"]):
                mixed.append(r)
    flips = [s["swap_seconds"] for s in swaps]
    preloads = [s["preload_seconds"] for s in swaps if s["kind"] == "promote" and s["preload_seconds"] > 0]
    by_model: dict = {}
    for r in ok:
        by_model[r["model"]] = by_model.get(r["model"], 0) + 1
    return {
        "clients": args.clients, "swaps_requested": args.swaps, "swaps_ok": len(swaps), "swap_errors": swap_errors,
        "rollbacks": sum(s["kind"] == "rollback" for s in swaps), "seconds": round(elapsed, 1),
        "requests": len(results), "failed_requests": len(failed), "failures": [r["error"] for r in failed][:10],
        "responses_not_equal_to_their_version_reference": len(mismatched),
        "responses_with_mixed_versions": len(mixed), "responses_by_version": by_model,
        "swap_pointer_flip": summary(flips), "swap_target": "p99 <= 50 ms",
        "swap_met": bool(flips) and pct(flips, 99) <= 0.05,
        "preload_when_loading": summary(preloads), "preload_loads": len(preloads),
        "ttft_under_load": summary([r["ttft"] for r in ok if r["ttft"] is not None]),
        "prompt_tokens": len(prompts[0]), "max_tokens": args.swap_max_tokens,
        "_mismatched": [(r["model"], r["prompt"], r["text"]) for r in mismatched],
    }


def phase_throughput(tokenizer, store, state: Path, prompts: list[list[int]], args: argparse.Namespace,
                     out: dict | None = None, on_point: Any = None) -> dict:
    import httpx

    from pipelines.models import load_base_model

    configs = {"one_at_a_time": {"max_batch_size": 1},
               "batched_invariant": {"max_batch_size": 8},
               "batched_fast": {"max_batch_size": 8, "batch_invariant": False}}
    out = out if out is not None else {}
    out.update({"prompt_tokens": len(prompts[0]), "max_tokens": args.tp_max_tokens,
                "requests_per_point": "max(1, %d // clients) per client" % args.tp_requests, "results": {}})
    # Configurations alternate within each client count, so a neighbour's load drifts over all of them alike.
    for clients in args.tp_clients:
        for name, kw in configs.items():
            model, _ = load_base_model(BASE_MODEL, args.cache, dtype=args.dtype, device=args.device)  # a fresh copy
            engine = make_engine(model, tokenizer, store, state, **kw)
            engine.load_champion()
            server = serve(engine, store, args)
            try:
                # Fixed work per point (closed loop): every client sends its share of requests back to back.
                per_client = max(1, args.tp_requests // clients)
                reqs, errors = [], []

                def client(i: int) -> None:
                    with httpx.Client(base_url=server.url, timeout=1200) as http:
                        for k in range(per_client):
                            r = stream_completion(http, prompts[(i + k) % len(prompts)], args.tp_max_tokens)
                            (errors.append(r["error"]) if r["error"] else reqs.append(r))

                threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(1800)
                elapsed = time.perf_counter() - t0
                tokens = sum(r["tokens"] or 0 for r in reqs)
                out["results"].setdefault(name, {})[str(clients)] = {
                    "requests_per_s": round(len(reqs) / elapsed, 3), "tokens_per_s": round(tokens / elapsed, 2),
                    "requests": len(reqs), "errors": len(errors), "seconds": round(elapsed, 1),
                    "latency": summary([r["seconds"] for r in reqs]), "load_avg": load()}
                print(f"  {name:18s} clients={clients:3d}: {len(reqs) / elapsed:6.2f} req/s "
                      f"{tokens / elapsed:7.1f} tok/s", flush=True)
                if on_point is not None:
                    on_point()
            finally:
                server.stop()
                engine.stop(timeout=30)
                del model, engine
    return out


# ----------------------------------------------------------------------------- main


def save(result: dict, out: Path) -> None:
    """Write the result JSON atomically (also after each phase: a run stopped later keeps what it measured)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer swaps, shorter throughput points")
    ap.add_argument("--cache", type=Path, default=None,
                    help="lorad cache folder holding the converted base model (default /tmp/lorad-s1/cache if it "
                         "exists, else ./lorad-state/cache)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="float32 is what model.dtype=auto gives on CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--swaps", type=int, default=None, help="champion changes in the swap phase (default 100)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent streaming clients in the swap phase")
    ap.add_argument("--swap-interval", type=float, default=1.0, help="seconds between two champion changes")
    ap.add_argument("--swap-prompt-tokens", type=int, default=64, help="prompt length in the swap phase")
    ap.add_argument("--swap-max-tokens", type=int, default=16)
    ap.add_argument("--adapter-scale", type=float, default=0.1,
                    help="std of the random lora_B weights (0.1: versions answer differently, still fluently)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--tp-requests", type=int, default=None,
                    help="requests per throughput point, spread over the clients (at least one each; default 16)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_swap.json")
    args = ap.parse_args()
    args.swaps = args.swaps or (20 if args.quick else 100)
    args.tp_clients = [1, 8, 32]
    args.tp_requests = args.tp_requests or (4 if args.quick else 16)  # per point, spread over the clients
    args.tp_max_tokens = 32
    if args.cache is None:
        prepared = Path("/tmp/lorad-s1/cache")
        args.cache = prepared if prepared.is_dir() else ROOT / "lorad-state" / "cache"

    import logging

    import torch

    from daemon.store import open_store
    from pipelines.models import load_base_model

    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="lorad-bench-"))
    result: dict = {"benchmark": "serve_swap", "quick": args.quick, "machine": machine_info(args), "git": git_commit(),
                    "base_model": BASE_MODEL, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "load_avg_start": load()}
    try:
        state = tmp / "state"
        store = open_store(state)
        versions = make_adapters(state, store, args.cache, args)
        model, tokenizer = load_base_model(BASE_MODEL, args.cache, dtype=args.dtype, device=args.device)
        long_prompts = prompts(tokenizer, 4, 200)
        short_prompts = prompts(tokenizer, 4, 64)
        assert all(len(p) == 200 for p in long_prompts) and all(len(p) == 64 for p in short_prompts)

        engine = make_engine(model, tokenizer, store, state, max_batch_size=8)
        engine.load_champion()
        server = serve(engine, store, args)
        swap_prompts = prompts(tokenizer, 4, args.swap_prompt_tokens)
        print(f"references: {len(versions) + 1} versions x {len(swap_prompts)} prompts", flush=True)
        t0 = time.perf_counter()

        def decode_references() -> dict[tuple[str, int], str]:
            """Every (version, prompt index) decoded alone, greedy."""
            return {(m, p): reference_text(engine, tokenizer, m, prompt, args.swap_max_tokens)
                    for m in ["base", *versions] for p, prompt in enumerate(swap_prompts)}

        refs = decode_references()
        distinct = sum(len({refs[(m, p)] for m in ["base", *versions]}) for p in range(len(swap_prompts)))
        result["references"] = {"seconds": round(time.perf_counter() - t0, 1), "versions": ["base", *versions],
                                "prompt_tokens": args.swap_prompt_tokens, "max_tokens": args.swap_max_tokens,
                                "distinct_outputs_per_prompt": distinct / len(swap_prompts),
                                "note": "how many of the 4 versions answer each prompt differently (4 = all)"}

        print("ttft", flush=True)
        result["ttft"] = phase_ttft(server, long_prompts, 5 if args.quick else 10) | {"load_avg": load()}
        print(f"  p50 {result['ttft']['ttft'].get('p50_ms')} ms", flush=True)
        save(result, args.out)
        if args.device == "cpu" and args.dtype == "float32":
            # The same measurement with bfloat16 weights (model.dtype: bfloat16), which CPUs with AMX or
            # AVX512-BF16 run about twice as fast: what the target needs on a busy machine.
            bf16_model, _ = load_base_model(BASE_MODEL, args.cache, dtype="bfloat16", device="cpu")
            bf16_engine = make_engine(bf16_model, tokenizer, store, state, max_batch_size=8)
            bf16_engine.load_champion()
            bf16_server = serve(bf16_engine, store, args)
            try:
                result["ttft_bfloat16"] = phase_ttft(bf16_server, long_prompts, 5 if args.quick else 10) | {
                    "load_avg": load()}
            finally:
                bf16_server.stop()
                bf16_engine.stop(timeout=30)
                del bf16_model, bf16_engine
            print(f"  bfloat16 p50 {result['ttft_bfloat16']['ttft'].get('p50_ms')} ms", flush=True)

        print(f"swaps: {args.swaps} while {args.clients} clients stream", flush=True)
        engine.swap(versions[0])
        result["swaps"] = phase_swaps(server, engine, versions, swap_prompts, refs, args) | {"load_avg": load()}
        s = result["swaps"]
        # Diagnosis of mismatches: decode every reference again, alone, after the swaps. A solo answer that
        # changed by itself means the kernels are not reproducible call to call (bf16 on CUDA was
        # measured so with the earlier engine), so a batched answer that differs is no evidence of a mixed-up version.
        mism = s.pop("_mismatched")
        refs_after = decode_references()
        changed = sorted(f"{m}/{p}" for (m, p) in refs if refs[(m, p)] != refs_after[(m, p)])
        s["references_after_swaps"] = {
            "changed": changed, "changed_count": len(changed), "of": len(refs),
            "mismatched_equal_to_reference_after": sum(t == refs_after[(m, p)] for m, p, t in mism),
            "mismatched_first_diff_char": [next((i for i, (a, b) in enumerate(zip(t, refs[(m, p)])) if a != b),
                                                min(len(t), len(refs[(m, p)]))) for m, p, t in mism][:40]}
        print(f"  requests {s['requests']}, failed {s['failed_requests']}, mismatched "
              f"{s['responses_not_equal_to_their_version_reference']}, mixed {s['responses_with_mixed_versions']}, "
              f"flip p99 {s['swap_pointer_flip'].get('p99_ms')} ms, preload p50 "
              f"{s['preload_when_loading'].get('p50_ms')} ms", flush=True)
        save(result, args.out)
        server.stop()
        engine.stop(timeout=30)

        if not args.skip_throughput:
            print("throughput", flush=True)
            del model, engine
            result["throughput"] = {}
            phase_throughput(tokenizer, store, state, short_prompts, args, out=result["throughput"],
                             on_point=lambda: save(result, args.out))
        result["load_avg_end"] = load()
        result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["complete"] = True
    save(result, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
