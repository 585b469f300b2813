"""Resource faults: a full disk during a checkpoint or an adapter write, corrupted checkpoint / adapter /
database page, out of memory in training. Each must fail cleanly with a reason that names the problem,
leave the champion untouched, and (where a server runs) keep serving.

Real components throughout: training subprocesses on a tiny random Llama, a real uvicorn server, a real
``lorad run`` process; the faults are real too (RLIMIT_FSIZE, a tiny tmpfs, bytes overwritten on disk,
RLIMIT_AS for out of memory). The micro-batch halving after a CUDA out-of-memory error is tested apart
(tests/test_reliability_oom_retry.py): a CPU cannot raise that exception on cue.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import registry
from daemon.jobs import JobRunner
from daemon.runs import create_run
from daemon.store import open_store
from pipelines.ingest import ingest_file
from test_loop import config, write_data

ROOT = Path(__file__).resolve().parents[1]


def make_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A small PEFT LoRA adapter for the tiny model (lora_B perturbed so it changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(out)
    return out


def with_champion(tmp_path: Path, model_dir: Path, **over):
    """Config, store with 120 ingested records, and a registered champion adapter."""
    cfg = config(tmp_path, model_dir, **over)
    store = open_store(cfg.paths.state_dir)
    ingest_file(write_data(tmp_path / "a.jsonl", 120, 3), store, cfg.data)
    champ = registry.register_adapter(store, Path(cfg.paths.state_dir), make_adapter(model_dir, tmp_path / "c", 1),
                                      base_model=cfg.model.base_model)
    registry.promote(store, champ, reason="test champion", base_model=cfg.model.base_model)
    return cfg, store, champ


def new_run(store, cfg) -> tuple[str, Path]:
    from daemon.runs import build_snapshot, snapshot_payloads

    snap = build_snapshot(store, cfg.data, seed=0)
    payloads = [p for _, _, p in snapshot_payloads(store, snap.id, roles=("new", "replay"))]
    return create_run(store, cfg, payloads, parent="none", trigger="manual", snapshot_id=snap.id)


def assert_champion_untouched(store, champ: str, n_adapters: int) -> None:
    assert registry.champion(store) == champ
    registry.verify_adapter(store, champ)  # complete, hashes match
    assert store.query_one("SELECT COUNT(*) FROM adapters")[0] == n_adapters
    leftovers = [p.name for p in (Path(store.path).parent / "adapters").iterdir()
                 if p.name.startswith(".tmp-") or (p.is_dir() and p.name not in
                                                   {r["version"] for r in store.query("SELECT version FROM adapters")})]
    assert leftovers == [], f"half-written adapter folders left behind: {leftovers}"


def fsize_limited_python(tmp_path: Path, limit_bytes: int) -> str:
    """An interpreter wrapper whose processes may not grow any file past ``limit_bytes`` (a full disk).

    SIGXFSZ is ignored, so the write fails with EFBIG (as a full disk fails with ENOSPC) instead of
    killing the process: the code under test sees the error.
    """
    wrapper = tmp_path / "python-fsize-limited"
    code = ("import os, resource, signal, sys; "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes})); "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -c '{code}' \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


@contextlib.contextmanager
def tiny_filesystem(path: Path, size: str):
    """Mount a tmpfs of ``size`` on ``path`` (a small, really full disk); skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); the RLIMIT_FSIZE tests still cover disk full")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ----------------------------------------------------------------------------- full disk


@pytest.mark.integration
def test_disk_full_during_a_checkpoint_fails_the_run_cleanly(tmp_path, tiny_llama_dir):
    cfg, store, champ = with_champion(tmp_path, tiny_llama_dir)
    run_id, run_dir = new_run(store, cfg)
    # 16 KB per file: the job files and metrics fit, the first checkpoint's LoRA weights (32 KB) do not.
    runner = JobRunner(cfg, store, python=fsize_limited_python(tmp_path, 16 * 1024))
    out = runner.train_eval_promote(run_id, run_dir)
    row = store.query_one("SELECT status, reason FROM runs WHERE id = ?", (run_id,))
    assert out["trained"] is False and row["status"] == "failed", (out, dict(row))
    assert "File too large" in row["reason"] or "os error 27" in row["reason"], row["reason"]
    assert not (run_dir / "adapter").exists() and not list((run_dir / "checkpoints").glob("step-*"))
    assert_champion_untouched(store, champ, 1)
    assert store.counts()["records_pending"] > 0, "the failed run's records are pending again"


@pytest.mark.integration
def test_disk_full_during_the_adapter_write_fails_the_run_cleanly(tmp_path, tiny_llama_dir):
    state = tmp_path / "state"
    with tiny_filesystem(state / "adapters", "96k") as adapters:
        cfg, store, champ = with_champion(tmp_path, tiny_llama_dir)
        free = os.statvfs(adapters).f_bavail * os.statvfs(adapters).f_frsize
        (adapters / ".filler").write_bytes(b"\0" * max(0, free - 8192))  # leaves 8 KB: less than any adapter
        run_id, run_dir = new_run(store, cfg)
        out = JobRunner(cfg, store).train_eval_promote(run_id, run_dir)
        row = store.query_one("SELECT status, reason FROM runs WHERE id = ?", (run_id,))
        assert out["trained"] is False and row["status"] == "failed", (out, dict(row))
        assert "registering the trained adapter failed" in row["reason"] and "No space left" in row["reason"]
        (adapters / ".filler").unlink()
        assert_champion_untouched(store, champ, 1)
        store.close()


# ----------------------------------------------------------------------------- corruption


@pytest.mark.integration
def test_a_corrupted_checkpoint_is_refused_with_a_reason(tmp_path, tiny_llama_dir):
    from pipelines.train import latest_checkpoint, run_job

    cfg, store, champ = with_champion(tmp_path, tiny_llama_dir)
    run_id, run_dir = new_run(store, cfg)
    run_job(run_dir, progress=False)          # checkpoints every 4 steps, the last at step 12
    shutil.rmtree(run_dir / "adapter")
    (run_dir / "result.json").unlink()
    ckpt = latest_checkpoint(run_dir)
    weights = ckpt / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # torn write
    with store.transaction() as tx:  # as a daemon killed mid-run leaves it
        tx.execute("UPDATE runs SET status = 'interrupted' WHERE id = ?", (run_id,))
    runner = JobRunner(cfg, store)
    assert runner.resume_interrupted() == [run_id]
    row = store.query_one("SELECT status, reason FROM runs WHERE id = ?", (run_id,))
    assert row["status"] == "failed" and f"checkpoint {ckpt} is unreadable" in row["reason"], dict(row)
    assert_champion_untouched(store, champ, 1)


@pytest.mark.integration
def test_a_corrupted_adapter_is_refused_and_the_server_keeps_serving(tmp_path):
    import httpx

    from monitors.metrics import LoradMetrics
    from test_engine import make_engine, make_world
    from test_server import TOKEN, Server, fake_daemon

    world = make_world(tmp_path, n_adapters=2)
    store, (v1, v2) = world["store"], world["versions"]
    registry.promote(store, v1, reason="test", base_model=str(world["model_dir"]))
    engine = make_engine(world, max_batch_size=2, max_queue=4, metrics=LoradMetrics())
    engine.load_champion()
    from daemon.server import create_app

    server = Server(create_app(fake_daemon(world, engine)))
    try:
        weights = Path(registry.get_adapter(store, v2)["path"]) / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF  # one flipped bit pattern inside the tensor data: still loadable, but not what was trained
        weights.write_bytes(bytes(data))
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = httpx.post(f"{server.url}/admin/promote", json={"version": v2}, headers=auth, timeout=30)
        assert r.status_code == 409, r.text
        assert "sha256" in r.json()["error"]["message"] and "corrupted or modified" in r.json()["error"]["message"]
        assert registry.champion(store) == v1
        with pytest.raises(registry.AdapterError, match="sha256"):
            registry.promote(store, v2, reason="cli", base_model=str(world["model_dir"]))
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 4})
        assert r.status_code == 200 and r.headers["x-lorad-adapter"] == v1, r.text
        # A pickle dropped next to an adapter is refused too: only safetensors are ever loaded.
        registry.verify_adapter(store, v1)
        (Path(registry.get_adapter(store, v1)["path"]) / "adapter_model.bin").write_bytes(b"\x80\x04N.")
        with pytest.raises(registry.AdapterError, match="refusing pickle files"):
            registry.verify_adapter(store, v1)
    finally:
        server.stop()
        engine.stop(timeout=5)
        store.close()


def corrupt_table_root_page(db: Path, table: str) -> None:
    """Overwrite the root b-tree page of ``table`` with garbage, as a bad sector would."""
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the page must live in the main file, not the WAL
    page = con.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    size = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    with open(db, "r+b") as f:
        f.seek((page - 1) * size)
        f.write(bytes((i * 37 + 11) % 256 for i in range(size)))
        f.flush()
        os.fsync(f.fileno())


@pytest.mark.integration
@pytest.mark.slow
def test_a_corrupted_database_page_is_refused_and_the_daemon_keeps_serving(tmp_path, tiny_llama_dir):
    from test_service import free_port, get, wait_for

    port = free_port()
    cfg_path = tmp_path / "config.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump({
        "paths": {"state_dir": str(tmp_path / "state"), "inbox": str(tmp_path / "inbox")},
        "model": {"base_model": str(tiny_llama_dir)}, "serve": {"port": port, "max_new_tokens": 8},
        "schedule": {"inbox_settle_seconds": 0.2}, "metrics": {"log_format": "json"}}))
    store = open_store(tmp_path / "state")
    ingest_file(write_data(tmp_path / "a.jsonl", 60, 3), store, config(tmp_path, tiny_llama_dir).data)
    store.close()
    log_path = tmp_path / "daemon.log"

    def start() -> subprocess.Popen:
        with open(log_path, "ab") as log:
            return subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "-c", str(cfg_path)], cwd=ROOT,
                                    stdout=log, stderr=log)

    proc = start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: get(url + "/readyz")[0] == 200, timeout=120)
        corrupt_table_root_page(tmp_path / "state" / "lorad.db", "records")
        dropped = write_data(tmp_path / "inbox" / "b.jsonl", 30, 4)
        wait_for(lambda: "malformed" in log_path.read_text(errors="replace"), timeout=60)
        assert dropped.exists(), "a file whose ingest failed stays in the inbox (nothing is lost)"
        import httpx

        r = httpx.post(url + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert get(url + "/healthz")[0] == 200 and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        # A restart refuses the damaged database with a reason and a way out, instead of serving from it.
        again = start()
        assert again.wait(timeout=120) == 1
        tail = log_path.read_text(errors="replace")[-3000:]
        assert "lorad.db" in tail and "corrupt" in tail and "backup" in tail, tail
    finally:
        for p in (proc, locals().get("again")):
            if p is not None and p.poll() is None:
                p.kill()


# ----------------------------------------------------------------------------- out of memory


def memory_limited_python(tmp_path: Path, headroom_bytes: int) -> str:
    """An interpreter wrapper whose process may map only ``headroom_bytes`` more address space than it holds
    once torch, transformers and peft are imported (RLIMIT_AS): a machine whose memory runs out mid-job.

    One allocator arena and one thread, so the limit is spent on tensors, not on per-thread reservations.
    """
    wrapper = tmp_path / "python-memory-limited"
    code = ("import resource, runpy, sys; import torch, transformers, peft; "
            "vm = next(int(x.split()[1]) * 1024 for x in open('/proc/self/status') if x.startswith('VmSize')); "
            f"resource.setrlimit(resource.RLIMIT_AS, (vm + {headroom_bytes}, resource.RLIM_INFINITY)); "
            "sys.argv = sys.argv[2:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")
    wrapper.write_text(f"#!/bin/sh\nexec env MALLOC_ARENA_MAX=1 OMP_NUM_THREADS=1 {sys.executable} -c \"{code}\" \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_out_of_memory_in_training_fails_the_run_cleanly(tmp_path):
    """A real memory limit, not an injected exception: the model (a 32k vocabulary) loads within it, the first
    step's LM-head work buffers ([labelled tokens x 32k] floats, 64 MB each) do not (with 4 GB of headroom the
    same run trains and is promoted). On a CPU the allocator raises RuntimeError, not torch.OutOfMemoryError,
    so the micro-batch halving does not apply: the run fails at once with the allocator's message."""
    import torch
    from transformers import LlamaForCausalLM

    from conftest import build_tiny_tokenizer, tiny_llama_config

    model_dir = tmp_path / "big-vocab"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=32768)).save_pretrained(model_dir)
    build_tiny_tokenizer().save_pretrained(model_dir)
    cfg, store, champ = with_champion(tmp_path, model_dir, train={"micro_batch_size": 16, "max_steps": 2})
    run_id, run_dir = new_run(store, cfg)
    runner = JobRunner(cfg, store, python=memory_limited_python(tmp_path, 128 * 2**20))
    out = runner.train_eval_promote(run_id, run_dir)
    row = store.query_one("SELECT status, reason FROM runs WHERE id = ?", (run_id,))
    log = (run_dir / "train.log").read_text(errors="replace")
    assert out["trained"] is False and row["status"] == "failed", (out, dict(row), log[-2000:])
    assert "allocate memory" in row["reason"] or "MemoryError" in row["reason"], (row["reason"], log[-2000:])
    assert not (run_dir / "adapter").exists()
    assert_champion_untouched(store, champ, 1)
    assert store.counts()["records_pending"] > 0, "the failed run's records are pending again"
