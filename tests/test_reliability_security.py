"""Security: admin needs the token (compared in constant time), 127.0.0.1 by default, names cannot escape the
state folder (path traversal, symlinks in the inbox), a private state folder, only safetensors are loaded,
secrets never reach logs, job folders or command output."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from daemon import registry
from daemon.config import build_config
from daemon.inbox import InboxWatcher, is_candidate
from daemon.store import ensure_state_dir, open_store

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-token-that-must-never-be-logged"


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    from test_fuzz_api import start_serve

    root = tmp_path_factory.mktemp("security")
    proc, url, world = start_serve(root, token=SECRET)
    yield proc, url, world, root
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)


@pytest.mark.integration
def test_admin_endpoints_need_the_token(serve):
    _, url, world, _ = serve
    version = world["versions"][0]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {SECRET}"},
                    {"Authorization": f"Bearer {SECRET[:-1]}"}, {"Authorization": f"Bearer {SECRET}x"},
                    {"Authorization": "Bearer"}):
        for route in ("/admin/promote", "/admin/rollback", "/admin/reload"):
            r = httpx.post(url + route, json={"version": version}, headers=headers, timeout=30)
            assert r.status_code == 401, (route, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(url + "/admin/promote", json={"version": version}, timeout=30,
                   headers={"Authorization": f"Bearer {SECRET}"})
    assert r.status_code == 200 and r.json()["ok"] is True, r.text


@pytest.mark.integration
def test_names_cannot_escape_the_state_folder(serve, tmp_path):
    _, url, world, _ = serve
    auth = {"Authorization": f"Bearer {SECRET}"}
    for bad in ("../../etc/passwd", "/etc/passwd", "v0001/../../x", "..", "V0001-ABC", "a" * 65, "-rf", "x\x00y"):
        r = httpx.post(url + "/admin/promote", json={"version": bad}, headers=auth, timeout=30)
        assert r.status_code in (400, 404, 409), r.text
        assert "invalid adapter version" in r.text or "not in the registry" in r.text, r.text
        r = httpx.post(url + "/v1/chat/completions", timeout=30,
                       json={"model": bad, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code in (400, 404), r.text
    for bad in ("../x", "a/b", "", "UPPER", "x" * 65):
        with pytest.raises(registry.AdapterError, match="invalid adapter version"):
            registry.validate_version_name(bad)


def test_an_adapter_row_pointing_outside_the_registry_is_not_loaded(tmp_path):
    from test_engine import make_engine, make_world

    from daemon.engine import AdapterUnavailable

    world = make_world(tmp_path, n_adapters=2)
    store, (_, v2) = world["store"], world["versions"]
    outside = tmp_path / "elsewhere"
    os.replace(registry.get_adapter(store, v2)["path"], outside)  # same files, same hashes, wrong place
    with store.transaction() as tx:
        tx.execute("UPDATE adapters SET path = ? WHERE version = ?", (str(outside), v2))
    (Path(world["state"]) / "adapters" / v2).symlink_to(outside, target_is_directory=True)
    engine = make_engine(world, max_batch_size=1)
    try:
        with pytest.raises(AdapterUnavailable, match="outside the registry folder"):
            engine.preload(v2)
    finally:
        engine.stop(timeout=5)
        store.close()


def test_symlinks_in_the_inbox_are_never_followed(tmp_path):
    inbox, secret_dir = tmp_path / "inbox", tmp_path / "private"
    inbox.mkdir()
    secret_dir.mkdir()
    (secret_dir / "keys.jsonl").write_text('{"input": "secret", "output": "value"}\n')
    (inbox / "link.jsonl").symlink_to(secret_dir / "keys.jsonl")
    (inbox / "linked-dir").symlink_to(secret_dir, target_is_directory=True)
    (inbox / "real.jsonl").write_text('{"input": "q", "output": "a"}\n')
    offered = []
    watcher = InboxWatcher(inbox, offered.append, settle_seconds=0.0, clock=lambda: 0.0)
    watcher.scan()
    assert watcher.due() == [inbox.resolve() / "real.jsonl"]
    assert not is_candidate(inbox, inbox / "link.jsonl")
    assert not is_candidate(inbox, inbox / "linked-dir" / "keys.jsonl")
    assert not is_candidate(inbox, inbox / ".." / "private" / "keys.jsonl")
    assert (secret_dir / "keys.jsonl").exists(), "the link target is never moved or touched"


def test_state_folder_and_lock_are_private(tmp_path):
    old = os.umask(0o022)
    try:
        state = ensure_state_dir(tmp_path / "deep" / "state")
        open_store(state).close()
        from daemon.service import StateLock

        lock = StateLock(state)
        lock.acquire({"pid": os.getpid()})
        lock.release()
    finally:
        os.umask(old)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "lorad.lock").stat().st_mode) == 0o600


def test_default_bind_is_loopback():
    cfg = build_config({})
    assert cfg.serve.host == "127.0.0.1"
    res = subprocess.run([sys.executable, "-m", "daemon.cli", "config", "show", "--json", "--defaults"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert '"host": "127.0.0.1"' in res.stdout


def test_only_safetensors_are_loaded(tmp_path, tiny_llama_dir):
    import shutil

    import torch

    from pipelines.models import ModelLoadError, load_base_model

    pickled = tmp_path / "pickled-model"
    shutil.copytree(tiny_llama_dir, pickled)
    from safetensors.torch import load_file

    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="never loads pickled weights"):
        load_base_model(str(pickled), tmp_path / "cache")
    # Adapters: a pickle beside the weights makes the version unloadable.
    store = open_store(tmp_path / "state")
    from test_reliability_faults import make_adapter

    v = registry.register_adapter(store, tmp_path / "state", make_adapter(tiny_llama_dir, tmp_path / "a", 0),
                                  base_model=str(tiny_llama_dir))
    (Path(registry.get_adapter(store, v)["path"]) / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(registry.AdapterError, match="refusing pickle files"):
        registry.verify_adapter(store, v)
    src = tmp_path / "only-bin"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    (src / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(registry.AdapterError, match="only safetensors adapters are accepted"):
        registry.register_adapter(store, tmp_path / "state", src, base_model=str(tiny_llama_dir))
    store.close()


@pytest.mark.integration
def test_secrets_are_never_logged_or_written(serve, tmp_path):
    proc, url, world, root = serve
    auth = {"Authorization": f"Bearer {SECRET}"}
    httpx.post(url + "/admin/reload", headers=auth, timeout=30)
    httpx.post(url + "/admin/reload", headers={"Authorization": f"Bearer {SECRET}-wrong"}, timeout=30)
    httpx.post(url + "/v1/chat/completions", headers=auth, timeout=30,
               json={"messages": [{"role": "user", "content": SECRET}], "max_tokens": 2})
    httpx.get(url + "/status", headers=auth, timeout=30)
    status = httpx.get(url + "/status", timeout=30).text
    metrics = httpx.get(url + "/metrics", timeout=30).text
    env = {**os.environ, "LORAD_SERVE__ADMIN_TOKEN": SECRET}
    shown = subprocess.run([sys.executable, "-m", "daemon.cli", "config", "show", "--json", "-c",
                            str(root / "config.yaml")], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert shown.returncode == 0 and SECRET not in shown.stdout + shown.stderr
    from daemon.jobs import write_job_config

    cfg = build_config({"serve": {"admin_token": SECRET}, "paths": {"state_dir": str(tmp_path / "state")}})
    job = write_job_config(cfg, tmp_path / "job")
    assert SECRET not in job.read_text(), "job folders (read by training subprocesses) never hold the token"
    assert SECRET not in status and SECRET not in metrics
    log = (root / "serve.log").read_text(errors="replace")
    assert "lorad" in log, "the server did write a log"
    assert SECRET not in log
    for path in Path(world["state"]).rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"{path} holds the secret"
