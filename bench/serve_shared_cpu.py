"""Serving on a CPU whose cores another process computes on: the default model's stream and first token with the
engine on all its threads and with ``Engine.share_cpu`` (one decode thread), alone and beside a competitor.

The competitor stands for a lorad job (drift, training, evaluation): a separate process multiplying 512 x 512
float32 matrices on every core, ``schedule.job_nice`` (10) steps lower in priority, as the job runner starts jobs.
Arms run in interleaved rounds, their order rotated per round; median and range per arm.

    python -m bench.serve_shared_cpu --out bench/results/serve_shared_cpu.json [--rounds 3]

Results: ``arms`` {arm: {one_stream_tokens_per_s: [...], ttft_ms: [...]}} and ``summary`` (medians, ranges, and
the contended arms as fractions of the engine alone on every thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _common  # noqa: E402
from bench import serve_speed as ss  # noqa: E402

COMPETITORS = {"matmul": "import torch\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n",   # every core
               "spin": "while True:\n    pass\n"}                                               # one core
ARMS = ("alone_all_threads", "alone_shared", "contended_all_threads", "contended_shared")


def competitor(kind: str, nice: int) -> subprocess.Popen:
    """A process computing at ``nice`` steps lower priority (what a lorad job is to the server)."""
    return subprocess.Popen([sys.executable, "-c", COMPETITORS[kind]], preexec_fn=lambda: os.nice(nice),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(eng, prompt: list[int], stream_prompt: list[int]) -> tuple[float, float]:
    """(first token of a 200-token prompt in ms, tokens/s of one 32-token stream)."""
    ttft = eng.generate(prompt, max_tokens=1, temperature=0).ttft_seconds * 1000
    t0 = time.perf_counter()
    h = eng.generate(stream_prompt, max_tokens=ss.CPU_NEW, temperature=0)
    return ttft, len(h.tokens) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nice", type=int, default=10, help="the competitor's nice increment (schedule.job_nice)")
    ap.add_argument("--competitor", choices=sorted(COMPETITORS), default="matmul",
                    help="matmul: 512 x 512 float32 products on every core (torch's threads); spin: a Python loop")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "lorad-test"), help="converted default model cache")
    args = ap.parse_args(argv)

    import torch

    from pipelines.hardware import serve_prefill_autocast, serve_weights_dtype

    git = {"commit": _common.commit(), "dirty": _common.dirty()}
    load_start = _common.host_load()
    weights = serve_weights_dtype("auto")   # as lorad serve loads the model on this CPU
    prefill = None if weights else serve_prefill_autocast(torch.nn.Linear(1, 1), "auto")
    eng, _tok, ready = ss.cpu_engine(args, prefill, weights=weights or "float32")
    results = {arm: {"ttft_ms": [], "one_stream_tokens_per_s": []} for arm in ARMS}
    try:
        for r in range(args.rounds):
            order = ARMS[r % len(ARMS):] + ARMS[:r % len(ARMS)]
            prompts = ss.prompts(len(ARMS) * 2, ss.CPU_PROMPT, seed=200 + r)
            for i, arm in enumerate(order):
                eng.share_cpu(arm.endswith("_shared"))
                proc = competitor(args.competitor, args.nice) if arm.startswith("contended") else None
                try:
                    if proc is not None:
                        time.sleep(1.0)   # the competitor is computing
                    ttft, rate = measure(eng, prompts[2 * i], prompts[2 * i + 1][:64])
                finally:
                    if proc is not None:
                        proc.kill()
                        proc.wait()
                results[arm]["ttft_ms"].append(ttft)
                results[arm]["one_stream_tokens_per_s"].append(rate)
                print(f"round {r + 1} {arm}: first token {ttft:.0f} ms, {rate:.1f} tokens/s", flush=True)
    finally:
        eng.share_cpu(False)
        eng.stop(timeout=10)

    def med(arm: str, key: str) -> float:
        return statistics.median(results[arm][key])

    base = med("alone_all_threads", "one_stream_tokens_per_s")
    summary = {arm: {"one_stream_tokens_per_s": med(arm, "one_stream_tokens_per_s"),
                     "one_stream_range": [min(results[arm]["one_stream_tokens_per_s"]),
                                          max(results[arm]["one_stream_tokens_per_s"])],
                     "ttft_ms": med(arm, "ttft_ms"),
                     "ttft_range_ms": [min(results[arm]["ttft_ms"]), max(results[arm]["ttft_ms"])],
                     "stream_vs_alone_all_threads": med(arm, "one_stream_tokens_per_s") / base}
               for arm in ARMS}
    doc = {"benchmark": "serve_shared_cpu", "git": git, "machine": {"cpu": _common.cpu_name(), "cores": os.cpu_count(),
                                                                    "torch_threads": torch.get_num_threads()},
           "load": {"start": load_start, "end": _common.host_load()}, "model": ss.CPU_SPEC,
           "weights": weights or "float32", "ready_s": ready, "rounds": args.rounds, "competitor_nice": args.nice,
           "competitor": args.competitor, "arms": results,
           "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
