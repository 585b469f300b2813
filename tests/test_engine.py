"""Engine: per-request version pinning, batch-invariant greedy decoding, hot-swap with drain, limits.

Tiny random Llama (vocabulary = the tiny tokenizer's, so every generated token decodes to text) with
tiny LoRA adapters made by perturbing lora_B, registered in a temporary state folder.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from conftest import build_tiny_tokenizer, tiny_llama_config

PROMPTS = ["the law court is", "hello world", "what is the contract of the party", "who shall be", "a judge must not",
           "question answer model", "where is the court", "the party shall"]


def make_world(root: Path, n_adapters: int = 3) -> dict:
    """A tiny base model folder, a state folder with ``n_adapters`` registered adapters, and their versions."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from daemon import registry
    from daemon.store import open_store

    tokenizer = build_tiny_tokenizer()
    model_dir = root / "tiny-model"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    state = root / "state"
    store = open_store(state)
    versions = []
    for i in range(n_adapters):
        base = LlamaForCausalLM.from_pretrained(model_dir)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
        peft_model = get_peft_model(base, config)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:  # lora_B starts at zero: perturb it so each adapter changes the output
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        out = root / f"adapter-{i}"
        peft_model.save_pretrained(out)
        versions.append(registry.register_adapter(store, state, out, base_model=str(model_dir)))
    return {"root": root, "model_dir": model_dir, "state": state, "store": store, "versions": versions,
            "tokenizer": tokenizer}


def make_engine(world: dict, **kwargs):
    from daemon.engine import Engine
    from pipelines.models import load_base_model

    model, tokenizer = load_base_model(str(world["model_dir"]), world["root"] / "cache")
    engine = Engine(model, tokenizer, store=world["store"], state_dir=world["state"],
                    base_model=str(world["model_dir"]), **kwargs)
    return engine.start()


def prompt_ids(world: dict, text: str) -> list[int]:
    return world["tokenizer"](text)["input_ids"]


def references(engine, world: dict, models: list, max_tokens: int) -> dict:
    """Greedy tokens of each (model, prompt) from lone requests: the ground truth batched runs must equal."""
    out = {}
    for model in models:
        for text in PROMPTS:
            h = engine.generate(prompt_ids(world, text), model=model, max_tokens=max_tokens, temperature=0)
            out[(h.label, text)] = h.tokens
    return out


class Blocker:
    """Holds the decode thread inside a command until released: makes queue states deterministic.

    Whatever needs the decode thread (loading an adapter) must happen before entering.
    """

    def __init__(self, engine):
        self.release = threading.Event()
        entered = threading.Event()

        def hold():
            entered.set()
            self.release.wait(10)

        self.thread = threading.Thread(target=engine.call, args=(hold,), daemon=True)
        self.thread.start()
        assert entered.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join(10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = make_world(tmp_path_factory.mktemp("engine"))
    yield w
    w["store"].close()


@pytest.fixture
def engine(world):
    e = make_engine(world, max_batch_size=4, max_queue=8)
    yield e
    e.stop(timeout=5)


def test_greedy_matches_transformers_generate_for_base_and_adapter(world, engine):
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    v1 = world["versions"][0]
    ids = prompt_ids(world, PROMPTS[2])
    engine.preload(v1)
    base_ref = LlamaForCausalLM.from_pretrained(world["model_dir"]).eval()
    with torch.no_grad():
        expected_base = base_ref.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                          pad_token_id=0)[0, len(ids):].tolist()
        with_adapter = PeftModel.from_pretrained(base_ref, world["state"] / "adapters" / v1).eval()
        expected_v1 = with_adapter.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                            pad_token_id=0)[0, len(ids):].tolist()
    got_base = engine.generate(ids, model="base", max_tokens=10, temperature=0)
    got_v1 = engine.generate(ids, model=v1, max_tokens=10, temperature=0)
    eos = 2  # generate() keeps the end-of-sequence token, the engine stops before it
    assert got_base.tokens == [t for t in expected_base if t != eos][:len(got_base.tokens)] and got_base.tokens
    assert got_v1.tokens == [t for t in expected_v1 if t != eos][:len(got_v1.tokens)] and got_v1.tokens
    assert got_base.tokens != got_v1.tokens, "the adapter must change the output, or the test proves nothing"
    assert (got_base.label, got_v1.label) == ("base", v1)


def test_concurrent_mixed_versions_equal_lone_requests_bit_for_bit(world, engine):
    from daemon.engine import SamplingParams

    models = ["base", *world["versions"]]
    ref = references(engine, world, models, max_tokens=12)
    assert len({tuple(v) for v in ref.values()}) > len(PROMPTS), "versions must disagree somewhere"
    for v in world["versions"]:
        engine.preload(v, stage=True)
    handles = []
    with Blocker(engine):  # everything queues first, then decodes in full, mixed batches
        for i in range(8):
            model, text = models[i % len(models)], PROMPTS[i]
            handles.append((text, engine.submit(prompt_ids(world, text), model=model,
                                                params=SamplingParams(max_tokens=12, temperature=0))))
    for text, h in handles:
        assert h.wait(30)
        assert h.tokens == ref[(h.label, text)], (h.label, text)


def test_fast_mode_mixes_versions_in_one_forward_and_serves_each_row_its_own_adapter(world):
    from daemon.engine import SamplingParams

    engine = make_engine(world, max_batch_size=8, batch_invariant=False)
    try:
        models = ["base", *world["versions"]]
        for v in world["versions"]:
            engine.preload(v, stage=True)
        handles = []
        params = SamplingParams(max_tokens=6, temperature=0)
        with Blocker(engine):
            for i in range(8):
                h = engine.submit(prompt_ids(world, PROMPTS[i]), model=models[i % 4], params=params)
                handles.append((models[i % 4], PROMPTS[i], h))
        for model, text, h in handles:
            assert h.wait(30) and h.label == model
        # One forward for all versions: equal to lone requests up to float rounding, so compare the first token.
        for model, text, h in handles:
            assert h.tokens[:1] == engine.generate(prompt_ids(world, text), model=model, max_tokens=1,
                                                   temperature=0).tokens
    finally:
        engine.stop(timeout=5)


def test_swap_pins_in_flight_requests_and_keeps_previous_loaded(world, engine):
    from daemon.engine import SamplingParams

    v1, v2, v3 = world["versions"]
    ref = references(engine, world, [v1, v2], max_tokens=30)
    engine.swap(v1)
    engine.preload(v2, stage=True)
    assert engine.champion == v1
    params = SamplingParams(max_tokens=30, temperature=0)
    with Blocker(engine):
        old = engine.submit(prompt_ids(world, PROMPTS[0]), model="lorad", params=params)
        result = engine.swap(v2)
        new = engine.submit(prompt_ids(world, PROMPTS[0]), model="champion", params=params)
    assert (result.old, result.new) == (v1, v2) and result.swap_seconds < 0.05
    assert old.wait(30) and new.wait(30)
    assert (old.label, new.label) == (v1, v2)
    assert old.tokens == ref[(v1, PROMPTS[0])] and new.tokens == ref[(v2, PROMPTS[0])]
    assert engine.previous == v1 and set(engine.loaded_versions()) >= {v1, v2}
    engine.unstage(v2)
    # Rolling back to the kept previous champion needs no load at all.
    back = engine.swap(v1)
    assert back.preload_seconds == 0.0 and engine.champion == v1 and engine.previous == v2
    # v3 becomes champion: v2 is now neither champion nor previous and nothing holds it, so it is unloaded.
    engine.swap(v3)
    deadline = time.monotonic() + 5
    while v2 in engine.loaded_versions() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.loaded_versions() == sorted([v1, v3])


def test_old_version_is_unloaded_only_after_its_last_request_drains(world, engine):
    from daemon.engine import SamplingParams

    v1, v2, v3 = world["versions"]
    engine.swap(v1)
    engine.preload(v2, stage=True)
    engine.preload(v3, stage=True)
    with Blocker(engine):
        held = engine.submit(prompt_ids(world, PROMPTS[1]), params=SamplingParams(max_tokens=20, temperature=0))
        engine.swap(v2)
        engine.swap(v3)  # v1 is now neither champion nor previous, but `held` still runs on it
        assert v1 in engine.loaded_versions() and engine.snapshot()["loaded"][v1]["refs"] == 1
    assert held.wait(30) and held.label == v1 and held.finish_reason in ("stop", "length")
    deadline = time.monotonic() + 5
    while v1 in engine.loaded_versions() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert v1 not in engine.loaded_versions()


def test_failed_preload_leaves_champion_untouched(world, tmp_path):
    from daemon import registry
    from daemon.engine import AdapterUnavailable, UnknownModel
    from daemon.store import open_store

    # A private copy of the state: this test corrupts adapters.
    state = tmp_path / "state"
    shutil.copytree(world["state"], state)
    store = open_store(state)
    for row in store.query("SELECT version, path FROM adapters"):
        with store.transaction() as tx:
            tx.execute("UPDATE adapters SET path = ? WHERE version = ?",
                       (str(state / "adapters" / row["version"]), row["version"]))
    w = {**world, "state": state, "store": store}
    engine = make_engine(w)
    try:
        v1, v2, v3 = world["versions"]
        engine.swap(v1)
        weights = state / "adapters" / v2 / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-4] + b"oops")
        with pytest.raises(AdapterUnavailable, match="sha256"):
            engine.swap(v2)
        with pytest.raises(UnknownModel):
            engine.swap("v0099-deadbeef")
        # A verified adapter whose row points outside the registry folder is refused too.
        outside = tmp_path / "elsewhere"
        shutil.copytree(state / "adapters" / v3, outside / v3)
        with store.transaction() as tx:
            tx.execute("UPDATE adapters SET path = ? WHERE version = ?", (str(outside / v3), v3))
        with pytest.raises(AdapterUnavailable, match="outside the registry folder"):
            engine.swap(v3)
        assert engine.champion == v1 and engine.loaded_versions() == [v1]
        assert engine.generate(prompt_ids(w, PROMPTS[0]), max_tokens=3, temperature=0).label == v1
    finally:
        engine.stop(timeout=5)
    # A daemon restarting with a corrupt champion is not ready, and a good promotion makes it ready.
    from daemon.engine import promote_and_swap

    store.set_alias(registry.CHAMPION, v2, reason="test: corrupt champion")
    engine = make_engine(w)
    try:
        with pytest.raises(AdapterUnavailable, match="sha256"):
            engine.load_champion()
        assert not engine.ready
        promote_and_swap(engine, store, v1, reason="repair", base_model=str(world["model_dir"]))
        assert engine.ready and engine.champion == v1 == registry.champion(store)
    finally:
        engine.stop(timeout=5)
        store.close()
    assert registry.champion(world["store"]) is None  # the shared world was not touched


def test_named_version_loads_on_demand_and_unknown_names_are_refused(world, engine):
    from daemon.engine import UnknownModel

    v3 = world["versions"][2]
    assert v3 not in engine.loaded_versions()
    h = engine.generate(prompt_ids(world, PROMPTS[3]), model=v3, max_tokens=4, temperature=0)
    assert h.label == v3 and h.tokens
    deadline = time.monotonic() + 5
    while v3 in engine.loaded_versions() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert v3 not in engine.loaded_versions(), "a pinned version nobody holds any more is unloaded"
    for name in ("v0099-deadbeef", "gpt-4o", "../etc"):
        with pytest.raises(UnknownModel):
            engine.submit(prompt_ids(world, PROMPTS[0]), model=name)


def test_queue_full_timeout_and_cancel(world):
    from daemon.engine import QueueFull, SamplingParams

    now = [0.0]
    engine = make_engine(world, max_batch_size=1, max_queue=2, request_timeout=10.0, clock=lambda: now[0])
    try:
        params = SamplingParams(max_tokens=5, temperature=0)
        with Blocker(engine):
            a = engine.submit(prompt_ids(world, PROMPTS[0]), params=params)
            b = engine.submit(prompt_ids(world, PROMPTS[1]), params=params)
            with pytest.raises(QueueFull, match="max_queue"):
                engine.submit(prompt_ids(world, PROMPTS[2]), params=params)
            b.cancel()
            now[0] = 11.0  # past the deadline of both
        assert a.wait(10) and b.wait(10)
        assert (a.finish_reason, b.finish_reason) == ("timeout", "cancelled")
        assert engine.snapshot()["waiting"] == 0
        ok = engine.generate(prompt_ids(world, PROMPTS[0]), max_tokens=5, temperature=0)
        assert ok.finish_reason in ("stop", "length") and ok.tokens
    finally:
        engine.stop(timeout=5)


def test_sampling_is_reproducible_with_a_seed_and_limits_hold(world, engine):
    from daemon.engine import InvalidRequest, SamplingParams

    ids = prompt_ids(world, PROMPTS[4])
    a = engine.generate(ids, max_tokens=15, temperature=1.5, top_p=0.9, seed=7)
    b = engine.generate(ids, max_tokens=15, temperature=1.5, top_p=0.9, seed=7)
    c = engine.generate(ids, max_tokens=15, temperature=1.5, top_p=0.9, seed=8)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert len(engine.generate(ids, max_tokens=3, temperature=0).tokens) <= 3
    with pytest.raises(InvalidRequest, match="temperature"):
        SamplingParams(temperature=3.0)
    with pytest.raises(InvalidRequest, match="context"):
        engine.submit(list(range(5)) * 40)  # 200 tokens > the tiny model's 128 positions
    # A prompt near the end of the context stops with "length" instead of running past it.
    h = engine.generate([5] * 120, max_tokens=50, temperature=0)
    assert h.finish_reason in ("length", "stop") and len(h.tokens) <= 128 - 120


def test_swap_metrics_are_exported(world):
    from monitors.metrics import LoradMetrics

    metrics = LoradMetrics()
    engine = make_engine(world, metrics=metrics)
    try:
        engine.swap(world["versions"][0])
        engine.generate(prompt_ids(world, PROMPTS[0]), max_tokens=3, temperature=0)
        r = metrics.registry
        assert r.get_sample_value("lorad_adapter_swap_seconds_count") == 1
        assert r.get_sample_value("lorad_adapter_preload_seconds_count") == 1
        assert r.get_sample_value("lorad_adapter_swaps_total", {"result": "ok"}) == 1
        assert r.get_sample_value("lorad_serve_time_to_first_token_seconds_count") == 1
        assert r.get_sample_value("lorad_adapters_loaded") == 1
        assert r.get_sample_value("lorad_serve_champion_info", {"version": world["versions"][0]}) == 1
    finally:
        engine.stop(timeout=5)


def test_registry_promote_and_rollback_drive_the_engine(world, tmp_path):
    from daemon import registry
    from daemon.engine import promote_and_swap, rollback_and_swap
    from daemon.store import open_store

    state = tmp_path / "state"
    shutil.copytree(world["state"], state)
    store = open_store(state)
    for row in store.query("SELECT version FROM adapters"):
        with store.transaction() as tx:
            tx.execute("UPDATE adapters SET path = ? WHERE version = ?",
                       (str(state / "adapters" / row["version"]), row["version"]))
    engine = make_engine({**world, "state": state, "store": store})
    try:
        v1, v2, v3 = world["versions"]
        engine.load_champion()
        assert engine.champion is None and engine.ready
        for v in (v1, v2, v3):
            out = promote_and_swap(engine, store, v, reason="test", base_model=str(world["model_dir"]))
            assert out["to"] == v and registry.champion(store) == v == engine.champion
        with pytest.raises(registry.AdapterError, match="already the champion"):
            promote_and_swap(engine, store, v3, reason="again", base_model=str(world["model_dir"]))
        out = rollback_and_swap(engine, store, reason="bad metrics")
        assert out == {**out, "from": v3, "to": v2} and out["preload_seconds"] == 0.0
        assert engine.champion == v2 == registry.champion(store)
        # The registry's new previous champion (v1) is what the engine keeps warm for the next rollback.
        assert engine.previous == v1 == store.get_alias(registry.PREVIOUS) and v1 in engine.loaded_versions()
        assert json.loads(json.dumps(engine.snapshot()))["champion"] == v2
    finally:
        engine.stop(timeout=5)
        store.close()


def test_free_slots_are_reused_in_place_without_pausing_the_decode_thread(world, engine):
    v1, v2, v3 = world["versions"]
    ref = references(engine, world, [v1, v2, v3], max_tokens=8)
    for v in (v1, v2, v3):  # all three loaded at once: three slots
        engine.preload(v, stage=True)
    slots_after_first_loads = len(engine.peft.peft_config)
    assert slots_after_first_loads >= 3
    for v in (v1, v2, v3):
        engine.unstage(v)
    engine.swap(v1)
    engine.swap(v2)  # v1 previous, v2 champion: v3's slot is freed by the decode thread
    deadline = time.monotonic() + 5
    while v3 in engine.loaded_versions() and time.monotonic() < deadline:
        time.sleep(0.01)
    with Blocker(engine):  # the decode thread is busy: an in-place load must not need it
        t0 = time.monotonic()
        engine.preload(v3, stage=True)
        assert time.monotonic() - t0 < 5
    for _ in range(4):  # cycle the champion: every load reuses a free slot
        for v in (v3, v1, v2):
            engine.swap(v)
    engine.unstage(v3)
    assert len(engine.peft.peft_config) == slots_after_first_loads
    for v in (v1, v2, v3):  # weights copied into reused slots give the very same tokens
        for text in PROMPTS:
            got = engine.generate(prompt_ids(world, text), model=v, max_tokens=8, temperature=0)
            assert got.tokens == ref[(v, text)]
