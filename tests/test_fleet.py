"""A serving fleet with real processes on 127.0.0.1: the daemon (`lorad run`) and two `lorad serve` replicas.

Tiny random Llama and three tiny adapters registered in the daemon's state; the replicas start with empty
state folders and get every adapter from the daemon's /fleet/adapters route (replica A may also read the
daemon's adapters/ folder directly: fleet.local_adapter_roots). Nothing is mocked: the daemon drives the
replicas over HTTP with vLLM's runtime LoRA API and POST /admin/champion.

The tests share the processes and run in file order (each leaves the fleet on a known champion).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_engine import make_world

from bench import fleet as fleet_bench

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "fleet-test-admin-token-0123456789"


def call(url: str, body: dict | None = None, *, token: str | None = TOKEN, timeout: float = 60.0) -> tuple[int, str]:
    """GET (body None) or POST JSON; returns (status, text)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_until(predicate, timeout: float, what: str, logs: list[Path] = ()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.2)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


class Proc(fleet_bench.Proc):
    """bench/fleet.py's lorad process (its own port and state folder, restartable), with the checks the tests use."""

    def __init__(self, name: str, state: Path, env: dict, command: str = "serve"):
        super().__init__(name, command, state, env)

    def ready(self) -> bool:
        return call(self.url + "/readyz", token=None, timeout=5)[0] == 200

    def champion(self) -> dict:
        status, text = call(self.url + "/admin/champion")
        assert status == 200, text
        return json.loads(text)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    world = make_world(root, n_adapters=3)
    world["store"].close()
    base = {"LORAD_MODEL__BASE_MODEL": str(world["model_dir"]), "LORAD_SERVE__ADMIN_TOKEN": TOKEN,
            "LORAD_METRICS__LOG_FORMAT": "json", "LORAD_SERVE__KV_CACHE_TOKENS": "4096",
            "LORAD_SERVE__MAX_PROMPT_TOKENS": "64", "LORAD_SERVE__MAX_NEW_TOKENS": "32"}
    daemon = Proc("daemon", world["state"], {**base, "LORAD_PROMOTE__ROLLBACK_WINDOW_SECONDS": "0"}, command="run")
    a = Proc("replica-a", root / "replica-a", {**base, "LORAD_FLEET__CONTROL_PLANE": daemon.url,
                                               "LORAD_FLEET__LOCAL_ADAPTER_ROOTS": str(world["state"] / "adapters")})
    b = Proc("replica-b", root / "replica-b", {**base, "LORAD_FLEET__CONTROL_PLANE": daemon.url})
    daemon.env.update({"LORAD_FLEET__REPLICAS": f"{a.url},{b.url}", "LORAD_FLEET__ADAPTER_URL": daemon.url,
                       "LORAD_FLEET__RECONCILE_SECONDS": "0.5", "LORAD_FLEET__REQUEST_TIMEOUT_SECONDS": "30"})
    procs = [daemon.start(), a.start(), b.start()]
    try:
        wait_until(lambda: all(p.ready() for p in procs), 240, "the daemon and both replicas to be ready",
                   [p.log for p in procs])
        yield {"world": world, "daemon": daemon, "a": a, "b": b, "versions": world["versions"], "procs": procs}
    finally:
        for p in procs:
            p.stop()


def served_by(replica: Proc, model: str = "lorad") -> str:
    """The version a replica's completion names (x-lorad-adapter, as bench/serve_swap.py reads it)."""
    req = urllib.request.Request(replica.url + "/v1/completions", method="POST",
                                 data=json.dumps({"model": model, "prompt": "the court", "max_tokens": 2,
                                                  "temperature": 0}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.headers["x-lorad-adapter"]


def events(daemon: Proc, kind: str = "fleet") -> list[dict]:
    status, text = call(daemon.url + "/status")
    assert status == 200, text
    return [e for e in json.loads(text)["events"] if e["kind"] == kind]


def test_promotion_reaches_every_replica_before_the_champion_moves(fleet):
    d, a, b, (v1, _, _) = fleet["daemon"], fleet["a"], fleet["b"], fleet["versions"]
    status, text = call(d.url + "/admin/promote", {"version": v1, "reason": "fleet test"})
    assert status == 200, text
    result = json.loads(text)
    assert result["to"] == v1 and result["fleet"]["replicas"] == 2 and result["fleet"]["unsynced"] == {}
    assert {"load_s", "apply_s", "flip_s"} <= set(result["fleet"])
    for replica in (a, b):
        state = replica.champion()
        assert state["champion"] == v1 and v1 in state["loaded"] and v1 in state["pinned"]
        assert served_by(replica) == v1
        # fetched from the daemon and registered under the same immutable name, with its sha256
        lineage = json.loads((replica.state / "adapters" / v1 / "lineage.json").read_text())
        daemon_lineage = json.loads((d.state / "adapters" / v1 / "lineage.json").read_text())
        assert lineage["files"] == daemon_lineage["files"]
    ok = events(d)[0]
    assert ok["ok"] is True and ok["subject"] == v1 and "on all 2 replicas" in ok["reason"]

    # fleet state in lorad status and /metrics
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--json", "--state", str(d.state)],
                         cwd=ROOT, env={**os.environ, **d.env}, capture_output=True, text=True, timeout=60)
    doc = json.loads(out.stdout)
    by_url = {r["url"]: r for r in doc["fleet"]}
    assert set(by_url) == {a.url, b.url}
    assert all(r["up"] and r["champion"] == v1 and v1 in r["loaded"] and r["last_contact"] for r in by_url.values())
    text_out = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--state", str(d.state)], cwd=ROOT,
                              env={**os.environ, **d.env}, capture_output=True, text=True, timeout=60).stdout
    assert f"replica    {a.url} up, serving {v1}" in text_out
    metrics = call(d.url + "/metrics", token=None)[1]
    for replica in (a, b):
        assert f'lorad_fleet_replica_up{{replica="{replica.url}"}} 1.0' in metrics
        assert f'lorad_fleet_replica_in_sync{{replica="{replica.url}"}} 1.0' in metrics
        assert f'lorad_fleet_replica_champion_info{{replica="{replica.url}",version="{v1}"}} 1.0' in metrics
    assert 'lorad_fleet_changes_total{action="promote",result="ok"} 1.0' in metrics


def test_sha256_mismatch_is_refused_and_nothing_moves(fleet):
    d, a, b, (v1, v2, _) = fleet["daemon"], fleet["a"], fleet["b"], fleet["versions"]
    weights = d.state / "adapters" / v2 / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-8] + bytes(8))  # same size, other bytes: only the hash can tell
    try:
        status, text = call(d.url + "/admin/promote", {"version": v2})
    finally:
        weights.write_bytes(good)
    assert status == 409, text
    message = json.loads(text)["error"]["message"]
    assert "could not load it" in message and "sha256" in message
    assert b.url in message  # replica b fetched over HTTP and refused the bytes
    for replica in (a, b):
        state = replica.champion()
        assert state["champion"] == v1 and v2 not in state["loaded"]
        assert not (replica.state / "adapters" / v2).exists()
    refused = events(d)[0]
    assert refused["ok"] is False and refused["subject"] == v2 and "held back" in refused["reason"]
    assert json.loads(call(d.url + "/readyz", token=None)[1])["champion"] == v1


def test_bad_names_paths_and_credentials_are_refused(fleet):
    d, a, (v1, v2, _) = fleet["daemon"], fleet["a"], fleet["versions"]
    load = a.url + "/v1/load_lora_adapter"
    url = f"{d.url}/fleet/adapters"
    for name in ("", "../etc", "V1", "-x", "a" * 65, "a/b", None, 7):
        status, text = call(load, {"lora_name": name, "lora_path": f"{url}/{name}"})
        assert status == 400, (name, text)
    cases = [
        ({"lora_name": v2, "lora_path": f"http://127.0.0.1:9/fleet/adapters/{v2}"}, 400, "control plane"),
        ({"lora_name": v2, "lora_path": f"{url}/{v1}"}, 400, "must be"),
        ({"lora_name": v2, "lora_path": "/etc"}, 400, "outside fleet.local_adapter_roots"),
        ({"lora_name": v2, "lora_path": "relative/path"}, 400, "absolute"),
        ({"lora_name": v2, "lora_path": "x" * 5000}, 400, "lora_path"),
        ({"lora_name": "v9999-deadbeef", "lora_path": f"{url}/v9999-deadbeef"}, 404, "404"),
        # immutable names: v1's name with v2's folder (shared storage) is another content under an old name
        ({"lora_name": v1, "lora_path": str(d.state / "adapters" / v2)}, 400, "immutable"),
    ]
    linked = d.state / "adapters" / "linked"  # under the allowed root, but its files are links (to anywhere)
    linked.mkdir()
    shutil.copy(d.state / "adapters" / v2 / "lineage.json", linked / "lineage.json")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (linked / f).symlink_to(d.state / "adapters" / v2 / f)
    cases.append(({"lora_name": "v0042-11111111", "lora_path": str(linked)}, 400, "not a regular file"))
    for body, expected, words in cases:
        status, text = call(load, body)
        assert status == expected and words in text, (body, status, text)
    assert call(load, {"lora_name": v2, "lora_path": f"{url}/{v2}"}, token=None)[0] == 401
    assert call(load, {"lora_name": v2, "lora_path": f"{url}/{v2}"}, token="wrong-token-0123456789")[0] == 401
    # the daemon's file route wants the fleet token; replica b has no local roots
    assert call(f"{url}/{v2}", token=None)[0] == 401
    assert call(f"{url}/{v2}/lineage.json")[0] == 404 and call(f"{url}/{v2}/..%2F..%2Florad.db")[0] == 404
    status, text = call(fleet["b"].url + "/v1/load_lora_adapter",
                        {"lora_name": v2, "lora_path": str(d.state / "adapters" / v2)})
    assert status == 400 and "local_adapter_roots" in text
    # unloading: never the champion; unknown names are 404 (vLLM's NotFoundError)
    status, text = call(a.url + "/v1/unload_lora_adapter", {"lora_name": v1})
    assert status == 400 and "champion" in text
    assert call(a.url + "/v1/unload_lora_adapter", {"lora_name": "v0042-00000000"})[0] == 404
    assert a.champion()["champion"] == v1


def test_local_folder_load_and_vllm_messages(fleet):
    d, a, (_, v2, _) = fleet["daemon"], fleet["a"], fleet["versions"]
    body = {"lora_name": v2, "lora_path": str(d.state / "adapters" / v2)}
    status, text = call(a.url + "/v1/load_lora_adapter", body)
    assert (status, text) == (200, f"Success: LoRA adapter '{v2}' added successfully.")
    assert call(a.url + "/v1/load_lora_adapter", body) == (200, f"Success: LoRA adapter '{v2}' is already loaded.")
    assert v2 in a.champion()["pinned"] and served_by(a) != v2  # loaded, not served: the champion is unchanged
    assert served_by(a, model=v2) == v2  # a loaded version answers by name, as vLLM's adapters do
    status, text = call(a.url + "/v1/unload_lora_adapter", {"lora_name": v2})
    assert (status, text) == (200, f"Success: LoRA adapter '{v2}' removed successfully.")
    wait_until(lambda: v2 not in a.champion()["loaded"], 30, "the unloaded version to leave replica a's memory")


def test_a_replica_that_cannot_load_blocks_the_promotion_everywhere(fleet):
    d, a, b, (v1, v2, _) = fleet["daemon"], fleet["a"], fleet["b"], fleet["versions"]
    b.stop()
    status, text = call(d.url + "/admin/promote", {"version": v2})
    assert status == 409, text
    assert b.url in json.loads(text)["error"]["message"] and "unreachable" in json.loads(text)["error"]["message"]
    assert json.loads(call(d.url + "/readyz", token=None)[1])["champion"] == v1
    assert a.champion()["champion"] == v1
    wait_until(lambda: v2 not in a.champion()["pinned"], 10, "v2 unloaded again from replica a")
    assert events(d)[0]["ok"] is False
    doc = json.loads(call(d.url + "/status")[1])
    assert {r["url"]: r["up"] for r in doc["fleet"]} == {a.url: True, b.url: False}
    assert "lorad_fleet_replica_up{replica=\"%s\"} 0.0" % b.url in call(d.url + "/metrics", token=None)[1]


def test_a_replica_restarted_empty_catches_up_with_the_champion(fleet):
    d, b, (v1, _, _) = fleet["daemon"], fleet["b"], fleet["versions"]
    shutil.rmtree(b.state)  # a replaced host: nothing of the old replica left
    b.start()
    wait_until(b.ready, 240, "replica b to restart", [b.log])
    wait_until(lambda: b.champion()["champion"] == v1, 60, "replica b to catch up", [b.log, d.log])
    assert served_by(b) == v1
    catch_up = [e for e in events(d) if e["ok"] and "caught up" in (e["reason"] or "")]
    assert catch_up and b.url in catch_up[0]["reason"]


def test_rollback_moves_every_replica_back(fleet):
    d, a, b, (_, v2, v3) = fleet["daemon"], fleet["a"], fleet["b"], fleet["versions"]
    for version in (v2, v3):
        status, text = call(d.url + "/admin/promote", {"version": version})
        assert status == 200, text
    assert {a.champion()["champion"], b.champion()["champion"]} == {v3}
    status, text = call(d.url + "/admin/rollback", {"reason": "fleet test rollback"})
    assert status == 200, text
    assert json.loads(text)["to"] == v2 and json.loads(text)["fleet"]["unsynced"] == {}
    for replica in (a, b):
        assert replica.champion()["champion"] == v2 and served_by(replica) == v2
    # versions that are neither champion nor previous champion (now v1) leave the replicas once drained
    wait_until(lambda: all(v3 not in r.champion()["loaded"] for r in (a, b)), 30, "v3 unloaded everywhere")
    metrics = call(d.url + "/metrics", token=None)[1]
    assert 'lorad_fleet_changes_total{action="rollback",result="ok"} 1.0' in metrics
