"""What a smaller KV cache (serve.kv_cache_dtype) or bf16 weights (serve.cpu_weights_dtype) do to answers: greedy
answers against the model dtype's.

    .venv/bin/python bench/kv_cache_quality.py --out bench/results/kv_cache_quality_cpu.json
    python3 bench/kv_cache_quality.py --device cuda --out kv_cache_quality_h100.json   # bf16 on a GPU

The default SmolLM2-135M-Instruct (real weights) answers the first user turns of the built-in regression sets
(chatterbot-corpus, English and Chinese) greedily through the serving engine, once with each cache dtype (the
model's, bfloat16 where that is a change, float8_e4m3) and, on a CPU, once with bf16 weights (what lorad serve loads
where the CPU's bf16 products are faster; its cache is bf16 too), in batches as the server runs them. Reported per set and
smaller dtype against the model's: the share of answers identical token for token, the share whose first 8
tokens agree, the mean length of the agreeing prefix; and each cache's bytes per position.
A greedy answer is a hard test: one near-tie that rounds the other way changes every later token.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import _common  # noqa: E402

SETS = ("chatterbot-en", "chatterbot-zh")


def prompts(tokenizer, per_set: int) -> dict[str, list[list[int]]]:
    """The first user turn of the first ``per_set`` conversations of each set, chat-templated, as token ids."""
    from pipelines.evaluate import builtin_regression_set

    out = {}
    for name in SETS:
        rows = builtin_regression_set(name)[:per_set]
        texts = [tokenizer.apply_chat_template([r["messages"][0]], add_generation_prompt=True, tokenize=False)
                 for r in rows]
        out[name] = [tokenizer(t)["input_ids"] for t in texts]
    return out


def answers(kv_cache_dtype: str, device: str, cache: Path, ids: dict[str, list[list[int]]], new_tokens: int,
            batch: int, weights: str = "auto") -> tuple[dict[str, list[list[int]]], dict]:
    """Greedy answers of every prompt through an engine with the given cache dtype (and weights' dtype), ``batch``
    at a time."""
    from daemon.engine import Engine, SamplingParams
    from pipelines.models import EMBEDDED_DEFAULT, load_base_model

    model, tokenizer = load_base_model(EMBEDDED_DEFAULT, cache, device=device, dtype=weights)
    engine = Engine(model, tokenizer, max_batch_size=batch, max_context=256, kv_cache_dtype=kv_cache_dtype).start()
    engine.load_champion()
    info = {"cache_bytes_per_position": engine.cache.nbytes / engine.cache.capacity_tokens,
            "cache_dtype": str(engine.cache.keys[0].dtype)}
    t0 = time.perf_counter()
    out = {}
    try:
        for name, rows in ids.items():
            got = []
            for i in range(0, len(rows), batch):
                handles = [engine.submit(p, params=SamplingParams(max_tokens=new_tokens, temperature=0))
                           for p in rows[i:i + batch]]
                for h in handles:
                    if not h.wait(600):
                        raise RuntimeError("an answer took over 600 s")
                    got.append(list(h.tokens))
            out[name] = got
    finally:
        engine.stop(timeout=10)
    info["seconds"] = time.perf_counter() - t0
    return out, info


def compare(reference: list[list[int]], other: list[list[int]]) -> dict:
    prefixes = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                for x, y in zip(reference, other)]
    return {"answers": len(reference), "identical": sum(x == y for x, y in zip(reference, other)) / len(reference),
            "first_8_tokens_agree": sum(p >= min(8, len(x)) for p, x in zip(prefixes, reference)) / len(reference),
            "mean_agreeing_prefix_tokens": statistics.mean(prefixes),
            "mean_answer_tokens": statistics.mean(len(x) for x in reference)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--per-set", type=int, default=32, help="prompts from each regression set")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="requests decoded together (the engine's batch)")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "lorad-test"), help="model cache folder")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kv_cache_quality_cpu.json"))
    args = ap.parse_args()
    import torch

    from pipelines.models import EMBEDDED_DEFAULT, load_base_model

    _, tokenizer = load_base_model(EMBEDDED_DEFAULT, Path(args.cache), device="cpu")
    ids = prompts(tokenizer, args.per_set)
    ref, ref_info = answers("auto", args.device, Path(args.cache), ids, args.new_tokens, args.batch)
    arms = {}
    for dtype in ("bfloat16", "float8_e4m3"):
        if dtype == "bfloat16" and ref_info["cache_dtype"] == "torch.bfloat16":
            continue  # the model's own dtype: nothing to compare
        arms[dtype] = answers(dtype, args.device, Path(args.cache), ids, args.new_tokens, args.batch)
    if args.device == "cpu":
        arms["bf16_weights"] = answers("auto", args.device, Path(args.cache), ids, args.new_tokens, args.batch,
                                       weights="bfloat16")
    result = {
        "commit": _common.commit(), "dirty": _common.dirty("daemon", "pipelines", "bench/kv_cache_quality.py"),
        "machine": torch.cuda.get_device_name() if args.device == "cuda" else _common.cpu_name(),
        "load_end": _common.host_load(),
        "torch": torch.__version__, "python": platform.python_version(), "model": EMBEDDED_DEFAULT,
        "settings": {"per_set": args.per_set, "new_tokens": args.new_tokens, "batch": args.batch,
                     "device": args.device, "greedy": True},
        "auto": ref_info, **{dtype: info for dtype, (_, info) in arms.items()},
        **{f"{dtype}_vs_auto": {name: compare(ref[name], got[name]) for name in ids}
           for dtype, (got, _) in arms.items()},
        "examples": {name: {"auto": tokenizer.decode(ref[name][0]),
                            **{dtype: tokenizer.decode(got[name][0]) for dtype, (got, _) in arms.items()}}
                     for name in ids},
    }
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(json.dumps({k: v for k, v in result.items() if k.endswith("_vs_auto")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
