"""Registry: immutable versions with lineage, verification, promotion and rollback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from daemon import registry
from daemon.registry import AdapterError
from daemon.store import open_store

BASE = "embedded:SmolLM2-135M-Instruct"


def make_adapter(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": rng.standard_normal((4, 8), dtype=np.float32)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                            "base_model_name_or_path": BASE}))
    return folder


@pytest.fixture
def env(tmp_path):
    store = open_store(tmp_path / "state")
    return store, tmp_path / "state", tmp_path


def test_register_writes_immutable_version_with_lineage(env):
    store, state, tmp = env
    v1 = registry.register_adapter(store, state, make_adapter(tmp / "a1", 1), base_model=BASE, run_id="r1",
                                   snapshot_id="s1", metrics={"loss_last": 1.5})
    assert v1.startswith("v0001-")
    lineage = json.loads((state / "adapters" / v1 / "lineage.json").read_text())
    assert lineage["parent"] is None and lineage["snapshot_id"] == "s1" and lineage["base_model"] == BASE
    assert lineage["files"]["adapter_model.safetensors"] == registry.sha256_file(
        state / "adapters" / v1 / "adapter_model.safetensors")
    v2 = registry.register_adapter(store, state, make_adapter(tmp / "a2", 2), base_model=BASE, parent=v1)
    assert v2.startswith("v0002-")
    rows = registry.list_adapters(store)
    assert [r["version"] for r in rows] == [v2, v1]
    assert rows[0]["parent"] == v1
    assert not list((state / "adapters").glob(".tmp-*"))


def test_register_refuses_incomplete_or_pickle_adapters(env):
    store, state, tmp = env
    bad = tmp / "bad"
    bad.mkdir()
    (bad / "adapter_model.bin").write_bytes(b"pickle")
    (bad / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        registry.register_adapter(store, state, bad, base_model=BASE)
    with pytest.raises(AdapterError, match="parent adapter 'v9' is not in the registry"):
        registry.register_adapter(store, state, make_adapter(tmp / "a", 1), base_model=BASE, parent="v9")
    assert registry.list_adapters(store) == []


def test_corrupted_adapter_is_refused_and_champion_untouched(env):
    store, state, tmp = env
    v1 = registry.register_adapter(store, state, make_adapter(tmp / "a1", 1), base_model=BASE)
    v2 = registry.register_adapter(store, state, make_adapter(tmp / "a2", 2), base_model=BASE)
    registry.promote(store, v1, reason="first")
    weights = state / "adapters" / v2 / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="sha256 .* does not match"):
        registry.promote(store, v2, reason="should fail")
    assert registry.champion(store) == v1


def test_verify_refuses_wrong_base_and_pickles(env):
    store, state, tmp = env
    v1 = registry.register_adapter(store, state, make_adapter(tmp / "a1", 1), base_model=BASE)
    with pytest.raises(AdapterError, match="trained on base model"):
        registry.verify_adapter(store, v1, base_model="deepseek-ai/deepseek-llm-7b-base")
    (state / "adapters" / v1 / "extra.bin").write_bytes(b"x")
    with pytest.raises(AdapterError, match="refusing pickle"):
        registry.verify_adapter(store, v1)
    with pytest.raises(AdapterError, match="invalid adapter version"):
        registry.verify_adapter(store, "../../etc")
    with pytest.raises(AdapterError, match="unknown adapter version"):
        registry.verify_adapter(store, "v0099-deadbeef")


def test_promote_and_rollback_walk_the_history(env):
    store, state, tmp = env
    vs = [registry.register_adapter(store, state, make_adapter(tmp / f"a{i}", i), base_model=BASE) for i in range(3)]
    with pytest.raises(AdapterError, match="nothing to roll back to"):
        registry.rollback(store, reason="too early")
    assert registry.promote(store, vs[0], reason="p0", actor="alice") == {"from": None, "to": vs[0]}
    registry.promote(store, vs[1], reason="p1")
    registry.promote(store, vs[2], reason="p2")
    with pytest.raises(AdapterError, match="already the champion"):
        registry.promote(store, vs[2], reason="again")
    assert store.get_alias("previous_champion") == vs[1]
    assert registry.rollback(store, reason="errors up") == {"from": vs[2], "to": vs[1]}
    assert registry.champion(store) == vs[1] and store.get_alias("previous_champion") == vs[0]
    assert registry.rollback(store, reason="again") == {"from": vs[1], "to": vs[0]}
    assert registry.rollback(store, reason="to base") == {"from": vs[0], "to": None}
    assert registry.champion(store) is None
    kinds = [e["kind"] for e in store.events(limit=100)]
    assert kinds.count("promote") == 3 and kinds.count("rollback") == 3
    promote_event = store.events(kind="promote", limit=10)[-1]
    assert promote_event["actor"] == "alice" and promote_event["reason"] == "p0"


def test_reconcile_sweeps_half_registered_folders(env):
    store, state, tmp = env
    v1 = registry.register_adapter(store, state, make_adapter(tmp / "a1", 1), base_model=BASE)
    (state / "adapters" / ".tmp-v0002-x-1").mkdir()
    (state / "adapters" / "v0002-orphan").mkdir()
    assert sorted(registry.reconcile(store, state)) == [".tmp-v0002-x-1", "v0002-orphan"]
    assert [p.name for p in (state / "adapters").iterdir()] == [v1]


def test_import_keeps_the_name_checks_every_hash_and_refuses_other_content_under_an_old_name(env, tmp_path):
    """A replica's registry takes its daemon's versions under the same immutable names."""
    store, state, tmp = env
    v1 = registry.register_adapter(store, state, make_adapter(tmp / "a1", 1), base_model=BASE)
    v2 = registry.register_adapter(store, state, make_adapter(tmp / "a2", 2), base_model=BASE)
    replica = open_store(tmp_path / "replica")
    rstate = tmp_path / "replica"
    m1, m2 = registry.manifest(store, v1), registry.manifest(store, v2)
    assert m1["files"]["adapter_model.safetensors"] == registry.get_adapter(store, v1)["sha256"]

    bad = {**m1["files"], "adapter_config.json": "0" * 64}
    with pytest.raises(AdapterError, match="sha256"):
        registry.import_adapter(replica, rstate, v1, state / "adapters" / v1, bad, lineage=m1["lineage"])
    assert not (rstate / "adapters" / v1).exists() and replica.query_one("SELECT 1 FROM adapters") is None

    assert registry.import_adapter(replica, rstate, v1, state / "adapters" / v1, m1["files"], lineage=m1["lineage"])
    assert registry.verify_adapter(replica, v1, base_model=BASE)["sha256"] == m1["files"]["adapter_model.safetensors"]
    assert not registry.import_adapter(replica, rstate, v1, state / "adapters" / v1, m1["files"],
                                       lineage=m1["lineage"])  # same name, same content: nothing to do
    with pytest.raises(registry.VersionConflict, match="immutable"):
        registry.import_adapter(replica, rstate, v1, state / "adapters" / v2, m2["files"], lineage=m2["lineage"])
    with pytest.raises(AdapterError, match="invalid adapter version"):
        registry.import_adapter(replica, rstate, "../x", state / "adapters" / v2, m2["files"], lineage=m2["lineage"])
    # a lineage from another machine is data: odd values never reach a column as they are
    odd = {**m2["lineage"], "created_at": "yesterday", "metrics": ["x"], "run_id": {"a": 1}, "parent": 5}
    assert registry.import_adapter(replica, rstate, "v0009-0dd", state / "adapters" / v2, m2["files"], lineage=odd)
    row = registry.get_adapter(replica, "v0009-0dd")
    assert row["run_id"] is None and row["parent"] is None and row["metrics"] == {} and row["created_at"] > 0


def test_set_champion_is_idempotent_and_follows_rollbacks_to_the_base(env):
    store, state, tmp = env
    v1 = registry.register_adapter(store, state, make_adapter(tmp / "a1", 1), base_model=BASE)
    v2 = registry.register_adapter(store, state, make_adapter(tmp / "a2", 2), base_model=BASE)
    assert registry.set_champion(store, v1, reason="r")["changed"]
    assert not registry.set_champion(store, v1, reason="r")["changed"]
    assert registry.set_champion(store, v2, reason="r") == {"from": v1, "to": v2, "changed": True}
    assert store.get_alias(registry.PREVIOUS) == v1
    assert registry.set_champion(store, None, reason="back to the base")["to"] is None
    assert registry.champion(store) is None and store.get_alias(registry.PREVIOUS) == v2
    with pytest.raises(AdapterError):
        registry.set_champion(store, v1, reason="r", base_model="another-base")


def test_lorad_promote_and_rollback_print_a_line_or_json(env, capsys):
    from daemon.cli import main

    store, state, tmp = env
    v = registry.register_adapter(store, state, make_adapter(tmp / "a", 0), base_model=BASE)
    store.close()
    assert main(["promote", v, "--state", str(state)]) == 0
    assert capsys.readouterr().out.startswith(f"champion: the base model -> {v} (recorded in the registry")
    assert main(["rollback", "--state", str(state), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"from": v, "to": None}


def test_lorad_rollback_without_a_registry_says_so_and_creates_nothing(tmp_path, capsys):
    from daemon.cli import main

    state = tmp_path / "no-state"
    assert main(["rollback", "--state", str(state)]) == 1
    assert f"no lorad state in {state}" in capsys.readouterr().err
    assert main(["promote", "v1", "--state", str(state)]) == 1
    assert not state.exists()
