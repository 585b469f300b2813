"""Hardware-aware defaults: a table of machines and models -> dtype, quantization, micro-batch."""

from __future__ import annotations

import json
import struct

import pytest

from daemon.config import build_config
from pipelines.hardware import GiB, Hardware, ModelShape, choose_defaults, model_shape, resolve_config

CPU = Hardware("cpu")
CPU_24G = Hardware("cpu", bf16=True, memory_bytes=23 * GiB)
CPU_128G = Hardware("cpu", bf16=True, memory_bytes=120 * GiB)
CPU_8G = Hardware("cpu", bf16=True, memory_bytes=8 * GiB)
H200 = Hardware("cuda", "NVIDIA H200", 141 * GiB, 1, bf16=True)
A100_80 = Hardware("cuda", "NVIDIA A100-SXM4-80GB", 80 * GiB, 1, bf16=True)
L4 = Hardware("cuda", "NVIDIA L4", 24 * GiB, 1, bf16=True)
T4 = Hardware("cuda", "Tesla T4", 16 * GiB, 1, bf16=False)
SMOL_135M = ModelShape(134_515_008, 576, 30)
DEEPSEEK_7B = ModelShape(6_910_365_696, 4096, 30)
DEEPSEEK_67B = ModelShape(67_000_000_000, 8192, 95)


@pytest.mark.parametrize("hw, shape, seq, expected", [
    # CPU with unknown memory: float32, micro-batch 4 of up to 1024 tokens (4096 tokens a micro-batch).
    (CPU, SMOL_135M, 1024, ("float32", "none", 4)),
    (CPU, SMOL_135M, 4096, ("float32", "none", 1)),
    (CPU, DEEPSEEK_7B, 2048, ("float32", "none", 2)),
    (CPU, None, 512, ("float32", "none", 4)),
    # CPU with known memory: also what it holds (the 24 GiB dev machine ran out of memory at 4 x 4096 tokens).
    (CPU_24G, SMOL_135M, 4096, ("float32", "none", 1)),
    (CPU_24G, SMOL_135M, 1024, ("float32", "none", 4)),
    (CPU_8G, SMOL_135M, 1024, ("float32", "none", 1)),
    (CPU_128G, SMOL_135M, 1024, ("float32", "none", 4)),
    (CPU_24G, DEEPSEEK_7B, 4096, ("float32", "none", 1)),    # + gradient checkpointing (next test)
    # A small model fits everywhere in 16 bits; the batch is capped at 16.
    (H200, SMOL_135M, 4096, ("bfloat16", "none", 16)),
    (T4, SMOL_135M, 4096, ("float16", "none", 4)),
    # 7B: 16-bit on big cards (batch from the free memory), NF4 on a 24 GiB card.
    (H200, DEEPSEEK_7B, 4096, ("bfloat16", "none", 4)),
    (A100_80, DEEPSEEK_7B, 4096, ("bfloat16", "none", 2)),
    (L4, DEEPSEEK_7B, 4096, ("bfloat16", "4bit", 8)),
    (L4, DEEPSEEK_7B, 1024, ("bfloat16", "none", 1)),     # short sequences: 16-bit fits, one at a time
    (T4, DEEPSEEK_7B, 4096, ("float16", "4bit", 4)),
    # 67B: NF4 even on an H200.
    (H200, DEEPSEEK_67B, 4096, ("bfloat16", "4bit", 8)),
    # Unknown model size (a hub id): no quantization, batch by card size.
    (H200, None, 4096, ("bfloat16", "none", 8)),
    (L4, ModelShape(), 4096, ("bfloat16", "none", 2)),
])
def test_choose_defaults_table(hw, shape, seq, expected):
    plan = choose_defaults(hw, shape, max_seq_len=seq)
    assert (plan.dtype, plan.quantization, plan.micro_batch_size) == expected, plan.reason
    assert plan.reason


def test_a_cpu_turns_on_gradient_checkpointing_when_one_sequence_does_not_fit(tmp_path):
    assert not choose_defaults(CPU_24G, SMOL_135M, max_seq_len=4096).gradient_checkpointing
    assert choose_defaults(Hardware("cpu", memory_bytes=6 * GiB), SMOL_135M, max_seq_len=4096).gradient_checkpointing
    plan = choose_defaults(CPU_24G, DEEPSEEK_7B, max_seq_len=4096)
    assert plan.gradient_checkpointing and plan.micro_batch_size == 1
    assert "gradient checkpointing" in plan.reason and "GiB available" in plan.reason
    tight = choose_defaults(Hardware("cpu", memory_bytes=48 * GiB), DEEPSEEK_67B, max_seq_len=4096)
    assert tight.gradient_checkpointing and "lower data.max_seq_len" in tight.reason
    _fake_checkpoint(tmp_path / "m", {"w": [6_910_365_696 // 4096, 4096]}, 4096, 30)
    auto = build_config({"model": {"base_model": str(tmp_path / "m")}, "paths": {"state_dir": str(tmp_path / "s")}})
    cfg, _ = resolve_config(auto, hw=CPU_24G)
    assert (cfg.train.micro_batch_size, cfg.train.gradient_checkpointing) == (1, True)


def test_available_memory_is_read_from_the_machine():
    from pipelines.hardware import available_memory_bytes, detect_hardware

    avail = available_memory_bytes()
    assert avail is not None and 0 < avail < 1 << 50   # Linux: /proc/meminfo
    assert detect_hardware("cpu").memory_bytes is not None


def test_a_model_too_big_even_in_4bit_says_what_to_do():
    plan = choose_defaults(T4, DEEPSEEK_67B)
    assert plan.quantization == "4bit" and plan.micro_batch_size == 1
    assert "train.distributed fsdp" in plan.reason


def _fake_checkpoint(folder, shapes: dict[str, list[int]], hidden: int, layers: int) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": hidden, "num_hidden_layers": layers}))
    header = {name: {"dtype": "F16", "shape": shape, "data_offsets": [0, 0]} for name, shape in shapes.items()}
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_model_shape_reads_headers_without_loading(tmp_path):
    _fake_checkpoint(tmp_path / "m", {"a": [1000, 64], "b": [64], "c": [7, 8, 9]}, 64, 3)
    assert model_shape(tmp_path / "m") == ModelShape(1000 * 64 + 64 + 7 * 8 * 9, 64, 3)
    assert model_shape("org/not-local") == ModelShape()


def test_resolve_config_fills_only_auto_values(tmp_path):
    _fake_checkpoint(tmp_path / "m", {"w": [6_910_365_696 // 4096, 4096]}, 4096, 30)
    auto = build_config({"model": {"base_model": str(tmp_path / "m")}, "paths": {"state_dir": str(tmp_path / "s")}})
    assert (auto.model.dtype, auto.model.quantization, auto.train.micro_batch_size) == ("auto", "auto", 0)
    cfg, plan = resolve_config(auto, hw=L4)
    assert (cfg.model.dtype, cfg.model.quantization, cfg.train.micro_batch_size) == ("bfloat16", "4bit", 8)
    assert plan.quantization == "4bit"
    explicit = build_config({"model": {"base_model": str(tmp_path / "m"), "dtype": "float16", "quantization": "none"},
                             "train": {"micro_batch_size": 1}, "paths": {"state_dir": str(tmp_path / "s")}})
    cfg, _ = resolve_config(explicit, hw=L4)
    assert (cfg.model.dtype, cfg.model.quantization, cfg.train.micro_batch_size) == ("float16", "none", 1)
    cfg, _ = resolve_config(auto, hw=CPU)
    assert (cfg.model.dtype, cfg.model.quantization, cfg.train.micro_batch_size) == ("float32", "none", 1)   # 4096-token sequences


def test_the_daemon_logs_and_exports_its_hardware_plan(tmp_path, tiny_llama_dir, caplog):
    import dataclasses
    import logging

    from daemon.service import Daemon
    from monitors.metrics import LoradMetrics

    cfg = build_config({"paths": {"state_dir": str(tmp_path / "state"), "inbox": str(tmp_path / "inbox")},
                        "model": {"base_model": str(tiny_llama_dir), "device": "cpu"},
                        "serve": {"cpu_weights_dtype": "float32"}})   # float32 weights: the prefill choice shows
    daemon = Daemon(cfg)
    daemon.metrics = LoradMetrics()
    (tmp_path / "state").mkdir()
    with caplog.at_level(logging.INFO, logger="lorad.daemon"):
        daemon._load_model()
    plans = [r for r in caplog.records if r.getMessage() == "hardware plan"]
    assert len(plans) == 1
    assert (plans[0].device, plans[0].dtype, plans[0].quantization, plans[0].micro_batch_size) == \
        ("cpu", "float32", "none", 1)   # data.max_seq_len 4096: one sequence a micro-batch on a CPU
    assert plans[0].train_compute in ("bfloat16", "float32")   # bf16 autocast where the CPU has AMX
    labels = {"device": "cpu", "dtype": "float32", "quantization": "none", "micro_batch_size": "1",
              "train_compute": plans[0].train_compute, "gradient_checkpointing": "False",
              "serve_prefill": plans[0].train_compute}   # bf16 prompt prefill where training gets bf16 autocast
    assert daemon.metrics.registry.get_sample_value("lorad_hardware_plan_info", labels) == 1.0
    assert daemon.model is not None and next(daemon.model.parameters()).dtype.is_floating_point
    # the serving engine prefills as the plan says (bf16 autocast on an AMX CPU), unless the config overrides it
    assert daemon.engine.prefill_dtype == ("bfloat16" if plans[0].serve_prefill == "bfloat16" else None)
    daemon.engine.stop(timeout=5)
    override = "float32" if daemon.engine.prefill_dtype else "bfloat16"   # the opposite of the plan's choice
    forced = Daemon(dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, cpu_prefill_dtype=override)))
    forced.metrics = LoradMetrics()
    forced._load_model()
    assert forced.engine.prefill_dtype == (None if override == "float32" else "bfloat16")
    forced.engine.stop(timeout=5)
    # bf16 weights (serve.cpu_weights_dtype; "auto" where the probe finds bf16 products faster): the served model
    # is bf16, the plan says so, and nothing is autocast
    import torch

    bf16 = Daemon(dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, cpu_weights_dtype="bfloat16")))
    bf16.metrics = LoradMetrics()
    with caplog.at_level(logging.INFO, logger="lorad.daemon"):
        bf16._load_model()
    assert [r for r in caplog.records if r.getMessage() == "hardware plan"][-1].dtype == "bfloat16"
    assert next(bf16.model.parameters()).dtype == torch.bfloat16 and bf16.engine.prefill_dtype is None
    bf16.engine.stop(timeout=5)


def test_training_gpu_peak_reaches_the_metrics_from_the_run_records():
    """The job runner turns a training step record (metrics.jsonl) into gauges; GPU peaks only when present."""
    from prometheus_client import generate_latest

    from daemon.jobs import publish_step
    from monitors.metrics import LoradMetrics

    m = LoradMetrics()
    publish_step(m, {"step": 3, "total_steps": 10, "loss": 1.5, "tokens_per_second": 900.0})   # a CPU run
    text = generate_latest(m.registry).decode()
    assert 'lorad_training_gpu_peak_bytes{kind="allocated"} 0.0' in text
    assert "lorad_training_step 3.0" in text
    publish_step(m, {"step": 4, "total_steps": 10, "loss": 1.4, "tokens_per_second": 950.0,
                     "gpu_peak_allocated_bytes": 7 * 2**30, "gpu_peak_reserved_bytes": 8 * 2**30})
    value = m.registry.get_sample_value
    assert value("lorad_training_gpu_peak_bytes", {"kind": "allocated"}) == 7 * 2**30
    assert value("lorad_training_gpu_peak_bytes", {"kind": "reserved"}) == 8 * 2**30
    assert value("lorad_training_step") == 4


@pytest.mark.parametrize("amx,avx512_bf16,expected", [(True, False, True), (False, True, True), (False, False, False)])
def test_cpu_bf16_units_are_amx_or_avx512_bf16(monkeypatch, amx, avx512_bf16, expected):
    """AVX512-BF16 alone (AMD Zen 4) counts: there autocast trained 1.42x and prefilled 1.9x as fast as fp32."""
    import torch

    from pipelines import hardware

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert hardware.cpu_bf16_matmul() is expected


def test_cpu_autocast_is_bf16_only_for_unquantized_fp32_or_bf16_weights_on_amx(monkeypatch):
    import torch

    from pipelines import hardware

    model = torch.nn.Linear(4, 4)
    for amx in (True, False):
        monkeypatch.setattr(hardware, "cpu_bf16_matmul", lambda amx=amx: amx)
        assert hardware.cpu_autocast(model) == ("bfloat16" if amx else None)
        assert hardware.cpu_autocast(model.to(torch.bfloat16)) == ("bfloat16" if amx else None)
        assert hardware.cpu_autocast(model.to(torch.float16)) is None
        model = model.to(torch.float32)
    monkeypatch.setattr(hardware, "cpu_bf16_matmul", lambda: True)
    model.is_loaded_in_4bit = True   # what transformers sets on a bitsandbytes-quantized model
    assert hardware.is_quantized(model) and hardware.cpu_autocast(model) is None


@pytest.mark.parametrize("hw, expected", [
    (CPU, "float32"),            # no AMX: bf16 autocast would only add casts
    (CPU_24G, "bfloat16"),       # AMX: the prompt's matmuls on the bf16 units
    (H200, "bfloat16"),
    (T4, "float16"),             # a GPU prefills in the weights' own 16-bit dtype
])
def test_serving_prefill_dtype_follows_the_machine(hw, expected):
    plan = choose_defaults(hw, SMOL_135M, max_seq_len=1024)
    assert plan.serve_prefill == expected
    assert plan.dtype == ("float32" if hw.device == "cpu" else expected)   # decode keeps the weights' dtype


def test_serve_prefill_autocast_obeys_the_setting_and_the_weights(monkeypatch):
    import torch

    from pipelines import hardware

    model = torch.nn.Linear(4, 4)
    for amx in (True, False):
        monkeypatch.setattr(hardware, "cpu_bf16_matmul", lambda amx=amx: amx)
        assert hardware.serve_prefill_autocast(model, "auto") == ("bfloat16" if amx else None)
        assert hardware.serve_prefill_autocast(model, "bfloat16") == "bfloat16"    # the override wins
        assert hardware.serve_prefill_autocast(model, "float32") is None
        assert hardware.serve_prefill_autocast(model.to(torch.bfloat16), "bfloat16") is None   # already bf16
        model = model.to(torch.float32)
    model.is_loaded_in_4bit = True
    assert hardware.serve_prefill_autocast(model, "bfloat16") is None
    with pytest.raises(ValueError, match="serve.cpu_prefill_dtype"):
        hardware.serve_prefill_autocast(model, "fp8")


def test_a_thread_lets_its_openmp_workers_go():
    """release_openmp_workers frees the calling thread's OpenMP workers (they leave the process); the thread's next
    parallel op starts them again and computes the same."""
    import os
    import threading

    import torch

    from pipelines.hardware import release_openmp_workers

    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: no OpenMP workers to let go")
    a, b = torch.randn(600, 600), torch.randn(600, 600)
    ref = a @ b
    counts = {}

    def work():
        counts["before"] = len(os.listdir("/proc/self/task"))
        a @ b  # this thread's workers start
        counts["computing"] = len(os.listdir("/proc/self/task"))
        counts["called"] = release_openmp_workers()
        counts["released"] = len(os.listdir("/proc/self/task"))
        counts["again"] = torch.equal(a @ b, ref)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if not counts["called"]:
        pytest.skip("torch did not load GNU OpenMP here")
    assert counts["computing"] > counts["before"], counts
    assert counts["released"] < counts["computing"], counts
    assert counts["again"]


def test_serve_weights_are_bf16_only_where_this_cpus_bf16_products_are_faster(monkeypatch):
    """serve.cpu_weights_dtype: auto takes bf16 weights where the CPU has bf16 units and the probe finds bf16
    matrix-vector products >= BF16_DECODE_MIN_SPEEDUP x float32's; the overrides win; a GPU never."""
    from pipelines import hardware

    for units, speedup, expected in ((True, 1.5, "bfloat16"), (True, 1.1, None), (False, 9.0, None)):
        monkeypatch.setattr(hardware, "cpu_bf16_matmul", lambda units=units: units)
        monkeypatch.setattr(hardware, "bf16_matvec_speedup", lambda speedup=speedup: speedup)
        assert hardware.serve_weights_dtype("auto") == expected
        assert hardware.serve_weights_dtype("bfloat16") == "bfloat16"
        assert hardware.serve_weights_dtype("float32") is None
        assert hardware.serve_weights_dtype("auto", device="cuda") is None
    with pytest.raises(ValueError, match="serve.cpu_weights_dtype"):
        hardware.serve_weights_dtype("fp8")


def test_the_bf16_probe_measures_a_ratio():
    """bf16_matvec_speedup times real products (small footprint here): a positive, finite ratio."""
    import math

    from pipelines.hardware import bf16_matvec_speedup

    ratio = bf16_matvec_speedup.__wrapped__(rows=256, cols=128, footprint=1 << 20)
    assert ratio > 0 and math.isfinite(ratio)
