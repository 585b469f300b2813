"""Training speed and memory: lorad's loop against the stock Hugging Face recipes, in one run per device.

    python -m bench.train_speed rounds --out DIR --gpus 0,1,2,3   # issue 22's protocol: every arm, 3 interleaved
                                                                  # rounds, strongest stock arm, MFU vs the spec
    python -m bench.train_speed adapter-time ARM --json F         # time to a trained adapter, fresh process
    (both in bench/train_speed_arms.py; bench/device/train_speed_gpu.sh runs them on the device tool)
    python -m bench.train_speed gpu --out DIR [--cases ...]   # CUDA machine: 7B-shaped random Llama
    python -m bench.train_speed cpu --out DIR --model-dir M     # 2-core CPU, the real 135M default
    python -m bench.train_speed check --out DIR       # each speed plan's loss/gradients vs the fp32 reference
    python -m bench.train_speed merge --gpu G1.json [G2.json ...] --cpu C.json --check K.json \
        --out bench/results/train_speed.json
    python -m bench.train_speed case NAME --json F [...]   # one case (what gpu/cpu run, each in a subprocess)

Every case runs in its own process (clean GPU memory, its own peak) on the same seeded data, and
times only steps after warm-up (compilation, allocator growth and the first optimizer step are
excluded and reported separately). Throughput counts real tokens: no padding.

GPU cases (DeepSeek-LLM-7B shape: hidden 4096, 30 layers, intermediate 11008, vocab 102400, 32 heads;
random weights; records of 64-512 tokens, seeded):
  seed         the recipe lorad replaced: HF Trainer + PEFT LoRA r16/a32 on q_proj,v_proj, fp16,
               per-device batch 2 x gradient accumulation 8, padded batches
  stock        the strongest stock setup a careful user would pick: HF Trainer + PEFT with lorad's
               all-linear LoRA, bf16, group_by_length (batch 8 x accumulation 2: little padding left)
  lorad        pipelines.train.train with its defaults (all-linear r16, packing to 2048, auto speed plan)
  lorad_eager, lorad_mask   ablations: no torch.compile; also transformers' block-mask attention
  qlora_stock  bitsandbytes NF4 + prepare_model_for_kbit_training + gradient checkpointing, 2048 tokens
  qlora_lorad  load_base_model(quantization="4bit") + train(), 2048 tokens (qlora_lorad_noamp: no autocast)
  parity_hf, parity_lorad   LawBench records, same LoRA targets, lr and schedule, one pass each
               (equal tokens), held-out loss; --model-dir holds config + tokenizer, with or without
               weights (without: a seeded random model of that shape)
CPU cases (135M SmolLM2 default, fp32 weights; the seed recipe's fp16 is not usable on CPU, so it runs fp32):
  cpu_seed        the seed recipe (HF Trainer + PEFT q/v, batch 2 x accumulation 8, padded), fp32: the baseline
  cpu_seed_bf16   the same with HF's bf16=True (autocast): what its user gets on a CPU with bf16 units
  cpu_lorad       lorad's defaults (all-linear LoRA, the CPU speed plan: bf16 autocast where the CPU has bf16
                  units, AMX or AVX512-BF16)
  cpu_lorad_qv    the same with the seed's q_proj,v_proj LoRA; cpu_lorad_fp32: lorad's defaults, no autocast;
                  cpu_lorad_bf16: lorad's defaults with bf16 autocast forced on
  Measure on 2 quiet pinned cores: taskset -c 0,1 python -m bench.train_speed cpu --out DIR --model-dir M
  --rounds 3 [--parity]; then `cpu-update --cpu DIR/cpu.json --note ...` writes only the CPU keys.
LORAD_BENCH_TINY=1 shrinks the 7B shape to a toy one, to smoke-test the GPU cases on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import _common  # noqa: E402

SHAPE_7B = dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=100000, eos_token_id=100001,
                pad_token_id=100001, tie_word_embeddings=False)
PEAK_790 = 790e12          # the convention of issue 5 (measured bf16 dense matmul rate on H100/H200 here)
SPEC_PEAK = {"H100": 989e12, "H200": 989e12}   # vendor dense bf16 spec (SXM)
if os.environ.get("LORAD_BENCH_TINY"):   # smoke-test the GPU cases' code on a CPU with a small model
    SHAPE_7B.update(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, bos_token_id=1000, eos_token_id=1001,
                    pad_token_id=1001)
IGNORE = -100


# ----------------------------------------------------------------------------- shared helpers


def records(n: int, vocab: int, seed: int = 0, lo: int = 64, hi: int = 512) -> list[dict]:
    """Text-like records of random lengths in [lo, hi], every token labelled."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(100, vocab - 100) for _ in range(rng.randint(lo, hi))]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def dev() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cuda_sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def rate(marks: list[tuple], warmup: int) -> dict:
    """Tokens/s between the end of step `warmup` and the last step; marks = (time, cumulative tokens[, CPU time]).

    The CPU time of the process (all its threads) is also reported where marked: on a CPU shared with
    other work, tokens per CPU-second is far steadier than wall-clock tokens/s.
    """
    a, b = marks[warmup - 1], marks[-1]
    out = {"tokens_per_second": (b[1] - a[1]) / (b[0] - a[0]), "timed_steps": len(marks) - warmup,
           "timed_tokens": b[1] - a[1], "timed_seconds": b[0] - a[0]}
    if len(a) > 2:
        out.update({"timed_cpu_seconds": b[2] - a[2], "tokens_per_cpu_second": (b[1] - a[1]) / (b[2] - a[2])})
    return out


def build_random_llama(dtype, device: str):
    """The DeepSeek-LLM-7B shape with random weights, built directly on the device."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE_7B)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


class StubTokenizer:
    pad_token_id = SHAPE_7B["pad_token_id"]


class PadCollator:
    """Pads to the longest record of the batch (labels -100 on pads) and counts real tokens."""

    def __init__(self, pad_id: int):
        self.pad_id, self.real = pad_id, 0

    def __call__(self, feats):
        import torch

        width = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(feats), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(feats), width), dtype=torch.long)
        for j, f in enumerate(feats):
            n = len(f["input_ids"])
            ids[j, :n] = torch.tensor(f["input_ids"])
            labels[j, :n] = torch.tensor(f["labels"])
            mask[j, :n] = 1
            self.real += n
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class FlatCollator:
    """transformers' DataCollatorWithFlattening (padding-free), counting real tokens as PadCollator does."""

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        self.inner, self.real = DataCollatorWithFlattening(), 0

    def __call__(self, feats):
        self.real += sum(len(f["input_ids"]) for f in feats)
        return self.inner(feats)


def hf_trainer_run(model, data: list[dict], *, targets: list[str], batch: int, accum: int, steps: int,
                   fp16: bool = False, bf16: bool = False, group_by_length: bool = False, lr: float = 2e-4,
                   cpu: bool = False, warmup_ratio: float = 0.0, scheduler: str = "linear", out_dir: str,
                   dropout: float = 0.05, save_adapter: str | None = None, pad_id: int | None = None,
                   liger: bool = False, flatten: bool = False) -> dict:
    """HF Trainer + PEFT LoRA (r16, alpha32) as its documentation shows it; returns step marks and losses.

    ``liger``: TrainingArguments(use_liger_kernel=True) (the liger-kernel package). ``flatten``: padding-free
    batches (transformers' DataCollatorWithFlattening: one row per batch, position_ids restart per record).
    """
    import inspect

    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=targets,
                                             bias="none", task_type="CAUSAL_LM"))
    collator = PadCollator(pad_id if pad_id is not None else StubTokenizer.pad_token_id if not cpu
                           else (model.config.pad_token_id or 0))
    if flatten:
        collator = FlatCollator()
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            cuda_sync()
            marks.append((time.perf_counter(), collator.real, time.process_time()))

    params = inspect.signature(TrainingArguments).parameters
    extra = {}
    if group_by_length:   # transformers 5.x renamed the flag at some point; support both spellings
        extra.update({"group_by_length": True} if "group_by_length" in params
                     else {"train_sampling_strategy": "group_by_length"})
    if liger:
        extra["use_liger_kernel"] = True
    if warmup_ratio:
        extra.update({"warmup_ratio": warmup_ratio} if "warmup_ratio" in params else {"warmup_steps": warmup_ratio})
    if scheduler == "cosine_min10":
        extra.update({"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}})
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                             max_steps=steps, learning_rate=lr, fp16=fp16, bf16=bf16, logging_steps=1,
                             save_strategy="no", report_to="none", dataloader_num_workers=0,
                             remove_unused_columns=False, use_cpu=cpu, seed=0, disable_tqdm=True, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if save_adapter:
        model.save_pretrained(save_adapter)
    return {"marks": marks, "losses": losses, "start": t0, "model": model}


def lorad_run(model, tokenizer, data: list[dict], *, cfg_overrides: dict, steps: int, max_seq_len: int,
              out_dir: str, **speed) -> dict:
    from daemon.config import TrainConfig
    from pipelines.train import train

    cfg = TrainConfig(**{"checkpoint_every_steps": 10**6, "max_wall_seconds": 10**6, **cfg_overrides})
    marks: list[tuple[float, int]] = []

    def on_step(record):
        cuda_sync()
        marks.append((time.perf_counter(), record["tokens"], time.process_time()))

    t0 = time.perf_counter()
    out = train(data, run_dir=Path(out_dir), model=model, tokenizer=tokenizer, cfg=cfg, max_seq_len=max_seq_len,
                max_steps=steps, progress=False, on_step=on_step, **speed)
    return {"marks": marks, "losses": out.history, "start": t0, "outcome": out, "cfg": cfg}


def flops_per_token(n_params: float) -> float:
    """LoRA training FLOPs per token: forward 2P + input-gradient backward 2P (frozen base: no weight grads)."""
    return 4.0 * n_params


# ----------------------------------------------------------------------------- cases


def case_gpu_hf(kind: str, steps: int, warmup: int) -> dict:
    import torch

    fp16 = kind == "seed"
    model = build_random_llama(torch.float16 if fp16 else torch.bfloat16, dev())
    n_params = sum(p.numel() for p in model.parameters())
    data = records(2000, SHAPE_7B["vocab_size"])
    if kind == "seed":
        settings = dict(targets=["q_proj", "v_proj"], batch=2, accum=8, fp16=True)
    else:
        from pipelines.models import lora_target_modules

        settings = dict(targets=lora_target_modules(model, "all-linear"), batch=8, accum=2, bf16=True,
                        group_by_length=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        r = hf_trainer_run(model, data, steps=steps, out_dir=tmp, cpu=dev() == "cpu", **settings)
    res = rate(r["marks"], warmup)
    return {"case": kind, "settings": {k: v for k, v in settings.items()}, "n_params": n_params,
            "warmup_steps": warmup, "warmup_seconds": r["marks"][warmup - 1][0] - r["start"], **res, **memory(),
            "loss_last": r["losses"][-1] if r["losses"] else None}


def case_gpu_lorad(kind: str, steps: int, warmup: int) -> dict:
    import torch

    model = build_random_llama(torch.bfloat16, dev())
    n_params = sum(p.numel() for p in model.parameters())
    data = records(2000, SHAPE_7B["vocab_size"])
    speed = {"lorad": {"compile_layers": True}, "lorad_eager": {"compile_layers": False},
             "lorad_mask": {"compile_layers": False, "attention": "mask"}}[kind]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        r = lorad_run(model, StubTokenizer(), data, cfg_overrides={}, steps=steps, max_seq_len=2048, out_dir=tmp,
                      **speed)
    out, cfg = r["outcome"], r["cfg"]
    res = rate(r["marks"], warmup)
    return {"case": kind, "settings": {"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
                                       "lora_targets": cfg.lora_targets, "micro_batch_size": cfg.micro_batch_size,
                                       "grad_accum_steps": cfg.grad_accum_steps, "max_seq_len": 2048, "packing": True,
                                       "overrides": speed, "plan": out.speed, "micro_batch_splits": out.micro_batch_splits,
                                       "gradient_checkpointing": out.gradient_checkpointing},
            "n_params": n_params, "warmup_steps": warmup, "warmup_seconds": r["marks"][warmup - 1][0] - r["start"],
            **res, **memory(), "loss_last": out.loss_last}


def _tiny_tokenizer_dir(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(100)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(path)


def ensure_7b_checkpoint(path: Path) -> Path:
    """Save the random 7B-shaped model once (bf16 safetensors), so 4-bit loading goes the real from_pretrained way."""
    import torch

    if (path / "config.json").is_file():
        return path
    t0 = time.perf_counter()
    model = build_random_llama(torch.bfloat16, dev())
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="4GB")
    _tiny_tokenizer_dir(tmp)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    os.replace(tmp, path)
    print(f"saved random 7B checkpoint in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def case_qlora(kind: str, steps: int, warmup: int, ckpt_dir: Path, seq_len: int = 2048) -> dict:
    import torch

    ckpt = ensure_7b_checkpoint(ckpt_dir)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if kind == "qlora_stock":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from pipelines.models import lora_target_modules

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=bnb, dtype=torch.bfloat16,
                                                     device_map={"": dev()})
        load_s = time.perf_counter() - t0
        after_load = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
                                                 target_modules=lora_target_modules(model, "all-linear"),
                                                 task_type="CAUSAL_LM"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        g = torch.Generator().manual_seed(0)
        marks, start = [], time.perf_counter()
        for s in range(steps):
            ids = torch.randint(100, SHAPE_7B["vocab_size"] - 100, (1, seq_len), generator=g).to(dev())
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            cuda_sync()
            marks.append((time.perf_counter(), (s + 1) * seq_len))
        settings = {"quantization": "nf4 double-quant, bf16 compute", "prepare_model_for_kbit_training": True,
                    "gradient_checkpointing": True, "lora_targets": "all-linear", "seq_len": seq_len, "batch": 1}
    else:
        from pipelines.models import load_base_model

        model, tok = load_base_model(str(ckpt), ckpt.parent / "cache", dtype="bfloat16", quantization="4bit",
                                     device=dev(), for_training=True)
        load_s = time.perf_counter() - t0
        after_load = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
        data = records(400, SHAPE_7B["vocab_size"], seed=1)
        with tempfile.TemporaryDirectory() as tmp:
            speed = {"autocast": False} if kind == "qlora_lorad_noamp" else {}
            r = lorad_run(model, tok, data, cfg_overrides={"micro_batch_size": 1, "grad_accum_steps": 1}, steps=steps,
                          max_seq_len=seq_len, out_dir=tmp, **speed)
        marks, start = r["marks"], r["start"]
        out = r["outcome"]
        settings = {"quantization": "nf4 double-quant, bf16 compute (load_base_model)", "seq_len": seq_len,
                    "micro_batch_size": 1, "packing": True, "plan": out.speed,
                    "gradient_checkpointing": out.gradient_checkpointing, "lora_targets": "all-linear"}
    res = rate(marks, warmup)
    return {"case": kind, "settings": settings, "load_seconds": load_s, "allocated_after_load_gib": after_load,
            **res, **memory(), "warmup_seconds": marks[warmup - 1][0] - start}


def case_cpu(kind: str, steps: int, warmup: int, model_dir: str) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        if kind in ("cpu_seed", "cpu_seed_bf16"):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            n_params = sum(p.numel() for p in model.parameters())
            data = records(600, model.config.vocab_size)
            # cpu_seed_bf16: not the seed recipe (fp16, which a CPU cannot use, so fp32 stands in for it) but what
            # its user gets with HF's bf16=True (autocast) on a CPU with bf16 units: the fair yardstick for
            # lorad's bf16 plan on such a CPU.
            settings = dict(targets=["q_proj", "v_proj"], batch=2, accum=8, bf16=kind == "cpu_seed_bf16")
            r = hf_trainer_run(model, data, steps=steps, out_dir=tmp, cpu=True, **settings)
            settings["dtype"] = "float32 weights, bf16 autocast" if settings["bf16"] else "float32"
        else:
            from pipelines.models import load_base_model

            model, tok = load_base_model(model_dir, Path(tmp) / "cache", dtype="float32", device="cpu",
                                         for_training=True)
            n_params = sum(p.numel() for p in model.parameters())
            data = records(600, model.config.vocab_size)
            overrides = {"micro_batch_size": 1, "grad_accum_steps": 2}
            if kind == "cpu_lorad_qv":   # the seed recipe's LoRA (q_proj, v_proj): isolates the loop from the LoRA choice
                overrides["lora_targets"] = "q_proj,v_proj"
            # cpu_lorad_fp32: lorad's defaults with bf16 autocast off (what a CPU without bf16 units runs);
            # cpu_lorad_bf16: with bf16 autocast on whatever the CPU (is AVX512-BF16 alone worth it?)
            speed = {"cpu_lorad_fp32": {"autocast": False}, "cpu_lorad_bf16": {"autocast": True}}.get(kind, {})
            from pipelines.train import keep_freed_memory

            kept = keep_freed_memory()   # what lorad's training process (python -m pipelines.train) does on CPU
            r = lorad_run(model, tok, data, cfg_overrides=overrides, steps=steps, max_seq_len=2048, out_dir=tmp,
                          **speed)
            plan = r["outcome"].speed
            settings = {"lora_targets": "all-linear", **overrides, "max_seq_len": 2048, "packing": True,
                        "dtype": "float32 weights" + (", bf16 autocast" if plan.get("autocast") else ""),
                        "plan": plan, "allocator_keeps_freed_memory": kept}
    return {"case": kind, "settings": settings, "n_params": n_params, "threads": torch.get_num_threads(),
            **rate(r["marks"], warmup)}


def lawbench_payloads(name: str = "1-1法条背诵.jsonl") -> list[dict]:
    out = []
    folder = os.environ.get("LORAD_LAWBENCH_DIR") or _common.lawbench_dataset("qa", "bench/train_speed.py")
    with open(Path(folder) / name, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            msgs = ([{"role": "system", "content": r["system"]}] if r.get("system") else [])
            out.append({"messages": msgs + [{"role": "user", "content": r["query"]},
                                             {"role": "assistant", "content": r["response"]}]})
    return out


def heldout_loss(model, examples: list[dict]) -> float:
    """Token-mean next-token cross-entropy over the labelled tokens of held-out examples, one example at a time."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor(ex["labels"][1:])
            logits = model(input_ids=ids).logits[0, :-1].float()
            keep = labels != IGNORE
            total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def parity_base(model_dir: str, dtype) -> str:
    """The base model of the parity runs: the real checkpoint, or (no weights in model_dir) a seeded random
    model of its config, saved once so that both runs and the evaluation start from the same weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (Path(model_dir) / "model.safetensors").is_file():
        return model_dir
    path = Path(tempfile.gettempdir()) / f"lorad-parity-random-{str(dtype).split('.')[-1]}"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32).to(dtype)
        model.save_pretrained(path)
    return str(path)


def case_parity(kind: str, model_dir: str, n_train: int, n_holdout: int, max_seq_len: int, lr: float) -> dict:
    """Equal tokens (one pass over the same LawBench records), same LoRA targets, lr and schedule."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.models import lora_target_modules
    from pipelines.train import tokenize_payloads

    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    base_dir = parity_base(model_dir, dtype)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    examples = tokenize_payloads(lawbench_payloads(), tok, max_seq_len)
    train_ex, hold = examples[:n_train], examples[-n_holdout:]
    tokens = sum(len(e["input_ids"]) for e in train_ex)
    records_per_step = 8
    with tempfile.TemporaryDirectory() as tmp:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(dev())
        base.config.pad_token_id = tok.pad_token_id
        targets = lora_target_modules(base, "all-linear")
        t0 = time.perf_counter()
        if kind == "parity_hf":
            steps = n_train // records_per_step
            r = hf_trainer_run(base, train_ex, targets=targets, batch=4, accum=2, steps=steps, cpu=not gpu, bf16=gpu,
                               lr=lr, warmup_ratio=0.03, scheduler="cosine_min10", out_dir=tmp,
                               save_adapter=tmp + "/adapter", pad_id=tok.pad_token_id)
            adapter, losses, settings = tmp + "/adapter", r["losses"], {"batch": 4, "accum": 2, "bf16": gpu,
                                                                        "scheduler": "cosine, min 10 %, warm-up 3 %"}
        else:
            # Rows of max_seq_len (1024) hold about 3 of these records: 1 row x 3 micro-batches is about the
            # HF run's 8 records (4 x 2) per optimizer step.
            overrides = {"micro_batch_size": 1, "grad_accum_steps": 3, "learning_rate": lr, "warmup_ratio": 0.03,
                         "epochs": 1.0}
            r = lorad_run(base, tok, train_ex, cfg_overrides=overrides, steps=None, max_seq_len=max_seq_len, out_dir=tmp)
            adapter, losses, steps = r["outcome"].adapter_dir, r["losses"], r["outcome"].steps
            settings = {**overrides, "packing": True, "plan": r["outcome"].speed}
        seconds = time.perf_counter() - t0
        fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        before = heldout_loss(fresh, hold)
        loss = heldout_loss(PeftModel.from_pretrained(fresh, adapter), hold)
    return {"case": kind, "dataset": "LawBench 1-1法条背诵", "base_model": "real SmolLM2-135M" if base_dir == model_dir
            else "random-weight SmolLM2-135M shape (seeded)", "device": dev(), "train_records": len(train_ex),
            "train_tokens": tokens, "holdout_records": len(hold), "steps": steps, "lr": lr, "lora_targets": targets,
            "settings": settings, "heldout_loss_before": before, "heldout_loss": loss, "train_losses": losses,
            "seconds": seconds}


# ----------------------------------------------------------------------------- drivers


def run_case(name: str, json_path: str, extra: list[str], timeout: int) -> dict:
    cmd = [sys.executable, "-m", "bench.train_speed", "case", name, "--json", json_path, *extra]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
        tail = (proc.stdout + proc.stderr)[-3000:]
        ok = proc.returncode == 0 and Path(json_path).is_file()
    except subprocess.TimeoutExpired as e:
        tail, ok = f"timed out after {timeout} s: {str(e.stderr)[-2000:] if e.stderr else ''}", False
    res = json.loads(Path(json_path).read_text()) if ok else {"case": name, "error": tail}
    res["wall_seconds"] = time.perf_counter() - t0
    print(f"[{name}] {'ok' if ok else 'FAILED'} in {res['wall_seconds']:.0f} s"
          + ("" if ok else "\n" + tail), flush=True)
    return res


def device_info() -> dict:
    import torch
    import transformers
    import peft

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": sys.version.split()[0]}
    info["commit"] = _common.commit() or os.environ.get("LORAD_COMMIT", "unknown")
    info["dirty"] = _common.dirty()
    if torch.cuda.is_available():
        info["card"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        import platform

        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    try:
        import flash_attn  # noqa: F401

        info["flash_attn"] = True
    except Exception:  # noqa: BLE001
        info["flash_attn"] = False
    return info


def gpu_main(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    results = {"info": device_info(), "cases": {}}
    for name in args.cases.split(","):
        steps, warm, timeout = {"seed": (10, 3, 240), "stock": (10, 3, 240), "lorad": (10, 4, 420),
                                "lorad_eager": (7, 3, 240), "lorad_mask": (6, 3, 240),
                                "qlora_stock": (8, 3, 300), "qlora_lorad": (8, 3, 300),
                                "qlora_lorad_noamp": (8, 3, 300), "parity_hf": (0, 0, 300),
                                "parity_lorad": (0, 0, 300)}[name]
        left = int(deadline - time.monotonic())
        if left < 30:
            results["cases"][name] = {"case": name, "error": "skipped: out of time budget"}
            continue
        extra = ["--steps", str(steps), "--warmup", str(warm), "--ckpt-dir", args.ckpt_dir]
        if name.startswith("parity"):
            extra = ["--model-dir", str(Path(args.model_dir).resolve()), "--n-train", str(args.n_train),
                     "--n-holdout", str(args.n_holdout), "--lr", str(args.lr)]
        results["cases"][name] = run_case(name, str(out / f"case_{name}.json"), extra, min(timeout, left))
        (out / "gpu.json").write_text(json.dumps(results, indent=2))
    summarize_gpu(results)
    (out / "gpu.json").write_text(json.dumps(results, indent=2))
    return results


def summarize_gpu(results: dict) -> None:
    c = results["cases"]
    card = results["info"].get("card", "")
    spec = next((v for k, v in SPEC_PEAK.items() if k in card), None)
    tps = {k: v.get("tokens_per_second") for k, v in c.items()}
    n = next((v["n_params"] for v in c.values() if "n_params" in v), None)
    summary = {}
    if tps.get("lorad") and tps.get("seed"):
        summary["speedup_vs_seed"] = tps["lorad"] / tps["seed"]
    if tps.get("lorad") and tps.get("stock"):
        summary["speedup_vs_stock"] = tps["lorad"] / tps["stock"]
    if n:
        for k, v in tps.items():
            if v and not k.startswith("qlora"):
                c[k]["mfu_790"] = v * flops_per_token(n) / PEAK_790
                if spec:
                    c[k]["mfu_spec"] = v * flops_per_token(n) / spec
    results["summary"] = summary
    for k, v in c.items():
        print(f"{k:12s} tok/s {v.get('tokens_per_second', float('nan')):10.0f}  peak alloc "
              f"{v.get('peak_allocated_gib', float('nan')):6.1f} GiB  MFU(790) {v.get('mfu_790', float('nan')):.3f}")
    print(json.dumps(summary))


def cpu_main(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"info": device_info(), "cases": {}, "rounds": []}
    load_before = os.getloadavg()
    # Absolute: each case runs in its own process with the repository as its working directory.
    extra = ["--steps", str(args.steps), "--warmup", "1", "--model-dir", str(Path(args.model_dir).resolve())]
    names = tuple(args.cases.split(","))
    for r in range(args.rounds):   # alternate the cases, since the 2 cores are shared with other work
        for name in names:
            res = run_case(name, str(out / f"case_{name}_{r}.json"), extra, 3600)
            results["rounds"].append({**res, "round": r})
    for name in names:
        runs = [x for x in results["rounds"] if x.get("case") == name and "tokens_per_second" in x]
        if runs:
            best = sorted(runs, key=lambda x: x["tokens_per_second"])[len(runs) // 2]
            results["cases"][name] = {**best, "all_tokens_per_second": [x["tokens_per_second"] for x in runs]}
    if args.parity:
        pe = ["--model-dir", str(Path(args.model_dir).resolve()), "--n-train", str(args.n_train),
              "--n-holdout", str(args.n_holdout), "--max-seq-len", str(args.max_seq_len), "--lr", str(args.lr)]
        for name in ("parity_hf", "parity_lorad"):
            results["cases"][name] = run_case(name, str(out / f"case_{name}.json"), pe, 3600)
    (out / "cpu.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v.get("tokens_per_second", v.get("heldout_loss")) for k, v in results["cases"].items()}))
    summary = cpu_summary([str(out / "cpu.json")])
    print(json.dumps({k: v for k, v in summary.items() if k != "cpu_cases"}, indent=1))
    if args.results:
        doc = {"benchmark": "train_speed_cpu", **results["info"], "machine": _common.cpu_name(),
               "cores": os.cpu_count(), "load_before": list(load_before), "load_after": list(os.getloadavg()),
               "steps": args.steps, "rounds": args.rounds,
               "summary": {k: v for k, v in summary.items() if k not in ("cpu_cases", "cpu_speedup_per_round")},
               "speedup_per_round": summary["cpu_speedup_per_round"], "cases": summary["cpu_cases"],
               "runs": results["rounds"]}
        Path(args.results).write_text(json.dumps(doc, indent=2) + "\n")
    return results


def check_main(args) -> dict:
    """Loss and LoRA gradients of each speed plan against the fp32 block-mask reference, on this device."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from daemon.config import TrainConfig
    from pipelines import train as T

    device = dev()
    config = LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
    seqs = T.make_sequences(records(40, 2000, lo=20, hi=300), 1024, True)
    ids, labels, pos, _ = T.collate_cpu(seqs, [0, 1, 2], 0)

    def run(dtype, **speed):
        torch.manual_seed(0)
        # Built in fp32 then cast, so every variant starts from the same weights whatever the dtype.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device=device, dtype=dtype)
        model = T.attach_lora(model, TrainConfig(lora_dropout=0.0), None, gradient_checkpointing=False)
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        plan = T.plan_speed(model, device, **speed)
        with T.speed_setup(model, plan):
            kw = T.packed_attention_kwargs(plan, pos, device)
            amp = torch.autocast(device, dtype=torch.bfloat16) if plan.autocast else contextlib.nullcontext()
            with amp:
                loss = T.chunked_loss_sum(model, ids.to(device), labels.to(device), pos.to(device), decoder_kwargs=kw)
            loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad])
        return float(loss), grads, plan.to_dict()

    ref_loss, ref_grads, _ = run(torch.float32, attention="mask", compile_layers=False, autocast=False)
    out = {"reference": {"dtype": "float32", "attention": "mask", "loss": ref_loss}}
    variants = {"fp32_per_example": (torch.float32, dict(attention="per-example", compile_layers=False)),
                "bf16_mask": (torch.bfloat16, dict(attention="mask", compile_layers=False)),
                "bf16_per_example": (torch.bfloat16, dict(attention="per-example", compile_layers=False))}
    if device == "cuda":
        variants.update({"bf16_flash_varlen": (torch.bfloat16, dict(attention="flash-varlen", compile_layers=False)),
                         "bf16_flash_varlen_compiled": (torch.bfloat16, dict(attention="flash-varlen",
                                                                             compile_layers=True))})
    for name, (dtype, speed) in variants.items():
        try:
            t0 = time.perf_counter()
            loss, grads, plan = run(dtype, **speed)
            out[name] = {"loss_rel_err": abs(loss - ref_loss) / abs(ref_loss),
                         "grad_rel_err": float((grads - ref_grads).norm() / ref_grads.norm()), "plan": plan,
                         "seconds": time.perf_counter() - t0}
            if name == "bf16_mask":
                bf16_ref = grads
            elif dtype == torch.bfloat16:   # against stock bf16 (transformers' mask path): the fair yardstick
                out[name]["grad_rel_err_vs_bf16_mask"] = float((grads - bf16_ref).norm() / bf16_ref.norm())
        except Exception as e:  # noqa: BLE001 -- report and go on to the next variant
            out[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        print(name, json.dumps(out[name])[:300], flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "check.json").write_text(json.dumps({"info": device_info(), **out}, indent=2))
    return out


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def cpu_summary(paths: list[str]) -> dict:
    """The CPU keys of the results file from ``cpu`` runs: speed-ups per round (same-run baselines), then means.

    cpu_speedup_vs_hf is the headline: lorad's defaults (all-linear LoRA, the CPU speed plan) against the
    seed recipe (HF Trainer + PEFT q/v, fp32 on CPU); the others isolate the LoRA choice (same targets),
    bf16 (lorad without autocast) and HF's own bf16 autocast.
    """
    pairs = {"cpu_speedup_vs_hf": ("cpu_lorad", "cpu_seed"),
             "cpu_speedup_vs_hf_same_lora_targets": ("cpu_lorad_qv", "cpu_seed"),
             "cpu_speedup_vs_hf_lorad_fp32": ("cpu_lorad_fp32", "cpu_seed"),
             "cpu_speedup_vs_hf_bf16": ("cpu_lorad", "cpu_seed_bf16"),
             "cpu_speedup_vs_hf_bf16_same_lora_targets": ("cpu_lorad_qv", "cpu_seed_bf16")}
    cases, rounds = {}, []
    for path in paths:
        run = json.loads(Path(path).read_text())
        for name, case in (run.get("cases") or {run.get("case"): run}).items():
            cases[name] = case
        by_round: dict[int, dict] = {}
        for i, case in enumerate(run.get("rounds", [])):   # older runs: rounds of (seed, lorad, lorad_qv), no key
            by_round.setdefault(case.get("round", i // 3), {})[case.get("case")] = case
        for got in by_round.values():
            ratio = {}
            for key, (num, den) in pairs.items():
                for metric in ("tokens_per_second", "tokens_per_cpu_second"):
                    if metric in got.get(num, {}) and metric in got.get(den, {}):
                        ratio[f"{num}/{den}/{metric}"] = got[num][metric] / got[den][metric]
            rounds.append(ratio)
    out = {key: _mean([r.get(f"{num}/{den}/tokens_per_second") for r in rounds]) for key, (num, den) in pairs.items()}
    ph, pl = cases.get("parity_hf", {}), cases.get("parity_lorad", {})
    if "heldout_loss" in ph and "heldout_loss" in pl:
        out["cpu_quality_parity"] = {
            "metric": "held-out token-mean cross-entropy after one pass over the same LawBench records (equal tokens)",
            "hf_trainer": ph["heldout_loss"], "lorad": pl["heldout_loss"],
            "relative_difference": (pl["heldout_loss"] - ph["heldout_loss"]) / ph["heldout_loss"],
            "lorad_plan": pl.get("settings", {}).get("plan")}
    return {**out, "cpu_speedup_per_round": rounds, "cpu_cases": cases}


def cpu_update_main(args) -> None:
    """Replace only the CPU part of an existing results file (the GPU figures stay as measured)."""
    path = Path(args.results)
    doc = json.loads(path.read_text())
    cpu = cpu_summary(args.cpu)
    for key in [k for k in doc if k.startswith("cpu_")]:
        doc.pop(key)
    doc.update(cpu)
    doc["cpu_info"] = {**json.loads(Path(args.cpu[0]).read_text()).get("info", {}), "note": args.note}
    kept = {k: v for k, v in doc.get("tokens_per_second", {}).items() if not k.startswith("cpu")}
    doc["tokens_per_second"] = {**kept, **{k: round(v["tokens_per_second"], 1) for k, v in cpu["cpu_cases"].items()
                                           if "tokens_per_second" in v}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    print(json.dumps({k: v for k, v in cpu.items() if k.startswith("cpu_speedup_vs") or k == "cpu_quality_parity"},
                     indent=1))


def merge_main(args) -> None:
    """Combine the device runs (each with its baselines measured in the same run) into one results file."""
    gpu_cases, runs = {}, []
    for i, path in enumerate(args.gpu):   # later runs override earlier ones case by case
        run = json.loads(Path(path).read_text())
        runs.append({"run": i, "info": run["info"], "cases": sorted(run["cases"])})
        for name, case in run["cases"].items():
            if "error" not in case:
                gpu_cases[name] = {**case, "run": i}
    info = runs[0]["info"] if runs else {}
    wrapped = {"info": info, "cases": gpu_cases}
    summarize_gpu(wrapped)
    cpu = cpu_summary(args.cpu)
    cpu_cases = cpu.pop("cpu_cases")
    g, c = gpu_cases, cpu_cases
    ph, pl = g.get("parity_hf") or c.get("parity_hf") or {}, g.get("parity_lorad") or c.get("parity_lorad") or {}
    tps = {k: round(v["tokens_per_second"], 1) for k, v in {**g, **c}.items() if "tokens_per_second" in v}
    doc = {
        "speedup_vs_seed": wrapped["summary"].get("speedup_vs_seed"),
        "speedup_vs_stock": wrapped["summary"].get("speedup_vs_stock"),
        "mfu": {"convention_790_tflops": g.get("lorad", {}).get("mfu_790"),
                "card_spec_dense_bf16_989_tflops": g.get("lorad", {}).get("mfu_spec"),
                "flops_per_token": "4 x parameters (forward 2P + input-gradient backward 2P; frozen base, "
                                   "attention and LoRA FLOPs not counted)"},
        "qlora_peak_gib": g.get("qlora_lorad", {}).get("peak_allocated_gib"),
        "qlora": {k: {x: g[k].get(x) for x in ("peak_allocated_gib", "peak_reserved_gib", "allocated_after_load_gib",
                                                "tokens_per_second", "settings")}
                  for k in ("qlora_stock", "qlora_lorad", "qlora_lorad_noamp") if k in g},
        **cpu,
        "quality_parity": {
            "metric": "held-out token-mean cross-entropy after one pass over the same LawBench records (equal tokens)",
            "hf_trainer": ph.get("heldout_loss"), "lorad": pl.get("heldout_loss"),
            "relative_difference": (pl["heldout_loss"] - ph["heldout_loss"]) / ph["heldout_loss"]
            if "heldout_loss" in ph and "heldout_loss" in pl else None,
            "hf_trainer_run": ph, "lorad_run": pl},
        "card": info.get("card"), "commit": info.get("commit"),
        "tokens_per_second": tps,
        "notes": args.note,
        "runs": runs,
        "gpu_cases": g, "cpu_cases": c,
    }
    if args.check:
        doc["correctness_check"] = json.loads(Path(args.check).read_text())
    Path(args.out).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: doc[k] for k in ("speedup_vs_seed", "mfu", "qlora_peak_gib", "cpu_speedup_vs_hf", "card",
                                          "tokens_per_second")}, indent=1))


def case_main(args) -> None:
    name = args.name
    if name in ("seed", "stock"):
        res = case_gpu_hf(name, args.steps, args.warmup)
    elif name.startswith("lorad"):
        res = case_gpu_lorad(name, args.steps, args.warmup)
    elif name.startswith("qlora"):
        res = case_qlora(name, args.steps, args.warmup, Path(args.ckpt_dir))
    elif name.startswith("cpu"):
        res = case_cpu(name, args.steps, args.warmup, args.model_dir)
    elif name.startswith("parity"):
        res = case_parity(name, args.model_dir, args.n_train, args.n_holdout, args.max_seq_len, args.lr)
    else:
        raise SystemExit(f"unknown case {name!r}")
    Path(args.json).write_text(json.dumps(res, indent=2, ensure_ascii=False, default=str))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gpu")
    g.add_argument("--out", required=True)
    g.add_argument("--cases", default="seed,stock,lorad,lorad_eager,lorad_mask,qlora_stock,qlora_lorad")
    g.add_argument("--ckpt-dir", default="/tmp/lorad-bench-7b")
    g.add_argument("--budget-s", type=int, default=540, help="stop starting cases after this many seconds")
    g.add_argument("--model-dir", default="", help="parity cases: a model dir (config + tokenizer; weights optional)")
    g.add_argument("--n-train", type=int, default=400)
    g.add_argument("--n-holdout", type=int, default=80)
    g.add_argument("--lr", type=float, default=1e-3)
    c = sub.add_parser("cpu")
    c.add_argument("--out", required=True)
    c.add_argument("--model-dir", required=True)
    c.add_argument("--steps", type=int, default=4)
    c.add_argument("--rounds", type=int, default=1)
    c.add_argument("--cases", default="cpu_seed,cpu_seed_bf16,cpu_lorad,cpu_lorad_qv,cpu_lorad_fp32")
    c.add_argument("--parity", action="store_true")
    c.add_argument("--n-train", type=int, default=160)
    c.add_argument("--n-holdout", type=int, default=40)
    c.add_argument("--max-seq-len", type=int, default=1024)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--results", default="", help="also write the results file (commit, machine, load, "
                                                  "speed-ups per round and their means, parity) here")
    cu = sub.add_parser("cpu-update", help="replace only the CPU part of a results file with cpu runs")
    cu.add_argument("--cpu", nargs="+", required=True, help="cpu.json of each run")
    cu.add_argument("--results", default=str(ROOT / "bench/results/train_speed.json"))
    cu.add_argument("--note", default="", help="where and how the CPU runs were measured")
    ch = sub.add_parser("check")
    ch.add_argument("--out", default="")
    m = sub.add_parser("merge")
    m.add_argument("--gpu", nargs="+", required=True, help="gpu.json of each device run, in order")
    m.add_argument("--cpu", nargs="*", default=[], help="cpu.json runs or single case JSONs")
    m.add_argument("--check", default="", help="check.json of a device run")
    m.add_argument("--note", action="append", default=[])
    m.add_argument("--out", required=True)
    k = sub.add_parser("case")
    k.add_argument("name")
    k.add_argument("--json", required=True)
    k.add_argument("--steps", type=int, default=6)
    k.add_argument("--warmup", type=int, default=2)
    k.add_argument("--ckpt-dir", default="/tmp/lorad-bench-7b")
    k.add_argument("--model-dir", default="")
    k.add_argument("--n-train", type=int, default=160)
    k.add_argument("--n-holdout", type=int, default=40)
    k.add_argument("--max-seq-len", type=int, default=1024)
    k.add_argument("--lr", type=float, default=1e-3)
    from bench import train_speed_arms as arms

    arms.add_arguments(sub)
    args = ap.parse_args(argv)
    {"gpu": gpu_main, "cpu": cpu_main, "merge": merge_main, "case": case_main, "check": check_main,
     "cpu-update": cpu_update_main, "rounds": arms.rounds_main, "arm": arms.arm_main,
     "adapter-time": arms.adapter_time_main, "merge-rounds": arms.merge_rounds_main}[args.cmd](args)


if __name__ == "__main__":
    main()
