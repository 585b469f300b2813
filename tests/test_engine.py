"""Engine: per-request version pinning, per-row LoRA in one batch, KV cache bounds, hot-swap with drain, limits.

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


def test_a_cpu_engine_decodes_on_one_thread_while_a_job_computes_and_answers_the_same(world, engine):
    """share_cpu(True): the decode thread's next step runs on one torch thread (no OpenMP peer to wait for while a
    job computes on the cores); share_cpu(False) gives it every thread back. The tokens do not change."""
    import torch

    threads = engine.call(torch.get_num_threads)
    if threads < 2:
        pytest.skip("one CPU thread: nothing to share")
    ids = prompt_ids(world, PROMPTS[1])
    before = engine.generate(ids, model="base", max_tokens=8, temperature=0).tokens
    engine.share_cpu(True)
    during = engine.generate(ids, model="base", max_tokens=8, temperature=0).tokens
    assert engine.call(torch.get_num_threads) == 1
    engine.share_cpu(False)
    after = engine.generate(ids, model="base", max_tokens=8, temperature=0).tokens
    assert engine.call(torch.get_num_threads) == threads
    assert before == during == after and before


def test_a_lone_cpu_decode_attends_to_exactly_its_positions_without_a_mask(world, engine, monkeypatch):
    """One running row on a CPU writes its key/value by slicing and attends to its own positions only, so SDPA
    runs without a mask (its faster kernel); the output is the masked path's (the greedy test above)."""
    import torch
    import torch.nn.functional as F

    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        if query.shape[2] == 1:
            seen.append((attn_mask is None, key.shape[2]))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = prompt_ids(world, PROMPTS[1])
    got = engine.generate(ids, model="base", max_tokens=4, temperature=0)
    lengths = sorted({n for _, n in seen})
    assert seen and all(unmasked for unmasked, _ in seen), seen[:4]
    assert lengths == list(range(len(ids) + 1, len(ids) + len(got.tokens))), lengths


def test_on_a_cpu_a_first_token_is_delivered_before_the_next_decode_step(world, engine, monkeypatch):
    """A CPU computes a launch when it is made, so the prefill's token reaches the client at once, not after the
    next decode step (which would add a whole step to the time to first token); the same for each decode step."""
    from daemon.engine.scheduler import Engine

    seen, decode_step = [], Engine._decode_step

    def spy(self):
        seen.append([(len(s.handle.tokens), s.pending) for s in self._running])
        return decode_step(self)

    monkeypatch.setattr(Engine, "_decode_step", spy)
    got = engine.generate(prompt_ids(world, PROMPTS[0]), model="base", max_tokens=4, temperature=0)
    steps = [rows for rows in seen if rows]
    assert len(got.tokens) == 4 and len(steps) == 3, steps
    assert steps == [[(1, 0)], [(2, 0)], [(3, 0)]], steps


def test_batch_invariant_mode_equals_lone_requests_bit_for_bit(world):
    from daemon.engine import SamplingParams

    engine = make_engine(world, max_batch_size=4, max_queue=8, batch_invariant=True)
    try:
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
    finally:
        engine.stop(timeout=5)


def test_mixed_version_batch_gives_each_row_its_own_versions_output(world):
    """Default mode: every version in ONE forward per step; each row equals its version alone (float tolerance)."""
    from daemon.engine import SamplingParams

    engine = make_engine(world, max_batch_size=8)
    try:
        models = ["base", *world["versions"]]
        ref = references(engine, world, models, max_tokens=10)
        for v in world["versions"]:
            engine.preload(v, stage=True)
        steps = []
        launch = engine.stepper.launch_decode
        engine.stepper.launch_decode = lambda n, *a, **k: steps.append(n) or launch(n, *a, **k)
        handles = []
        with Blocker(engine):
            for i in range(8):
                h = engine.submit(prompt_ids(world, PROMPTS[i]), model=models[i % 4],
                                  params=SamplingParams(max_tokens=10, temperature=0))
                handles.append((models[i % 4], PROMPTS[i], h))
        for model, text, h in handles:
            assert h.wait(30) and h.label == (model if model != "base" else "base")
            assert h.tokens == ref[(h.label, text)], (model, text)
        assert steps[0] == 8, "all eight rows, four versions, decode in one forward"
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


def test_submit_without_loading_never_blocks(world, engine):
    """load=False (what the event loop calls): queued when the version is loaded, None when it is not."""
    from daemon.engine import SamplingParams

    v3 = world["versions"][2]
    params = SamplingParams(max_tokens=2, temperature=0)
    assert engine.submit(prompt_ids(world, PROMPTS[0]), model=v3, params=params, load=False) is None
    assert v3 not in engine.loaded_versions(), "load=False must not load"
    for name in ("lorad", "base", "v0099-deadbeef"):  # unknown names too: the loading path refuses them
        h = engine.submit(prompt_ids(world, PROMPTS[0]), model=name, params=params, load=False)
        assert (h is None) == (name == "v0099-deadbeef")
        if h is not None:
            assert h.wait(30) and h.finish_reason == "length"


def test_events_reach_an_asyncio_consumer_in_batches_and_interrupt_ends_them():
    """Everything emitted in one decode step (batched_events) arrives as one list; interrupt() ends the
    iteration at once, without the engine's end event."""
    import asyncio

    from daemon.engine import GenerationHandle, SamplingParams
    from daemon.engine.api import batched_events

    async def run():
        loop = asyncio.get_running_loop()
        a, b = (GenerationHandle([1], None, SamplingParams(), loop=loop) for _ in range(2))

        def engine_thread():
            for step in range(3):
                with batched_events():
                    for h in (a, b):
                        h._token(10 + step)
            a._finish("length")

        batches_a = []
        await loop.run_in_executor(None, engine_thread)  # all three steps land before a looks
        async for batch in a.abatches():
            batches_a.append(batch)
        got_b = []

        async def consume_b():
            async for batch in b.abatches():
                got_b.append(batch)

        task = asyncio.create_task(consume_b())
        await asyncio.sleep(0.01)
        b.interrupt()
        await asyncio.wait_for(task, 5)
        return batches_a, got_b, b

    batches_a, got_b, b = asyncio.run(run())
    assert batches_a == [[("token", 10), ("token", 11), ("token", 12), ("end", "length")]]
    assert got_b == [[("token", 10), ("token", 11), ("token", 12)]]
    assert b.interrupted and b.cancelled and not b.done


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
    modules = {name: id(m) for name, m in engine.model.named_modules()}
    tables = {name: m.lora_a.data_ptr() for name, m in engine._wrapped.items()}
    engine.swap(v1)
    engine.swap(v2)  # v1 previous, v2 champion: v3's slot is free again
    deadline = time.monotonic() + 5
    while v3 in engine.loaded_versions() and time.monotonic() < deadline:
        time.sleep(0.01)
    with Blocker(engine):  # the decode thread is busy: a load must not need it
        t0 = time.monotonic()
        engine.preload(v3, stage=True)
        assert time.monotonic() - t0 < 5
    for _ in range(4):  # cycle the champion: every load copies into a free slot
        for v in (v3, v1, v2):
            engine.swap(v)
    engine.unstage(v3)
    # Nothing was rebuilt: same modules, same table storage, no graph captured, slots within the configured count.
    assert {name: id(m) for name, m in engine.model.named_modules()} == modules
    assert {name: m.lora_a.data_ptr() for name, m in engine._wrapped.items()} == tables
    assert engine.stepper.captures == 0 and len(engine.loaded_versions()) <= engine.adapter_slots
    for v in (v1, v2, v3):  # weights copied into reused slots give the very same tokens
        for text in PROMPTS:
            got = engine.generate(prompt_ids(world, text), model=v, max_tokens=8, temperature=0)
            assert got.tokens == ref[(v, text)]


def test_swap_into_a_slot_changes_outputs_without_a_rebuild(world):
    """A version copied into the slot another version held answers as itself; modules and tables stay put."""
    v1, v2, _ = world["versions"]
    engine = make_engine(world, adapter_slots=2)  # champion + previous: every new version reuses a slot
    try:
        ids = prompt_ids(world, PROMPTS[2])
        alone = {}
        for v in (v1, v2):
            engine.swap(v)
            alone[v] = engine.generate(ids, max_tokens=10, temperature=0).tokens
        assert alone[v1] != alone[v2], "the adapters must differ, or the test proves nothing"
        modules = {name: id(m) for name, m in engine.model.named_modules()}
        slot_of = {v: engine.snapshot()["loaded"][v]["slot"] for v in (v1, v2)}
        for _ in range(3):
            for v in (v1, v2):
                engine.swap(v)
                assert engine.generate(ids, max_tokens=10, temperature=0).tokens == alone[v]
        assert {name: id(m) for name, m in engine.model.named_modules()} == modules
        assert {v: engine.snapshot()["loaded"][v]["slot"] for v in (v1, v2)} == slot_of
        assert engine.stepper.captures == 0
    finally:
        engine.stop(timeout=5)


def test_kv_cache_bounds_queue_and_429(world):
    """More requests than cache slots wait for a slot; beyond max_queue they are refused (HTTP 429)."""
    from daemon.engine import EngineError, QueueFull, SamplingParams

    engine = make_engine(world, max_batch_size=2, max_queue=3, max_context=64)
    try:
        assert engine.cache.slots == 2 and engine.cache.context == 64
        params = SamplingParams(max_tokens=5, temperature=0)
        with Blocker(engine):
            handles = [engine.submit(prompt_ids(world, PROMPTS[i]), params=params) for i in range(3)]
            with pytest.raises(QueueFull) as refused:
                engine.submit(prompt_ids(world, PROMPTS[3]), params=params)
            assert refused.value.status == 429
        peak = 0
        while not all(h.done for h in handles):
            peak = max(peak, engine.snapshot()["running"])
            time.sleep(0.001)
        assert peak <= 2 and all(h.finish_reason in ("length", "stop") for h in handles)
        with pytest.raises(EngineError, match="context"):
            engine.submit([5] * 64)  # the per-request context (max_context) bounds the prompt too
    finally:
        engine.stop(timeout=5)
    # A cache budget that cannot hold one request is a clear startup error.
    with pytest.raises(EngineError, match="kv_cache_tokens"):
        make_engine(world, kv_cache_tokens=100, max_context=128)


def test_the_default_cpu_cache_holds_max_batch_size_requests_of_the_default_context():
    """`lorad run` with no config must not start with the "fewer slots than serve.max_batch_size" warning."""
    from daemon.config import build_config
    from daemon.engine.cache import plan_slots

    s = build_config({}).serve
    slots = plan_slots(bytes_per_token=1, context=s.max_prompt_tokens + s.max_new_tokens,
                       max_batch_size=s.max_batch_size, device_type="cpu", free_bytes=None,
                       kv_cache_fraction=s.kv_cache_fraction, kv_cache_tokens=s.kv_cache_tokens)
    assert slots == s.max_batch_size


def test_cancellation_frees_the_rows_cache_slot(world, engine):
    from daemon.engine import SamplingParams

    long = SamplingParams(max_tokens=100, temperature=0)
    handles = [engine.submit(prompt_ids(world, PROMPTS[i]), params=long) for i in range(4)]
    deadline = time.monotonic() + 10
    while engine.snapshot()["running"] < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.snapshot()["running"] == 4  # every slot taken
    t0 = time.monotonic()
    handles[1].cancel()
    assert handles[1].wait(1.0) and handles[1].finish_reason == "cancelled"
    assert time.monotonic() - t0 < 1.0
    # The freed slot admits a new request at once, and the moved row still decodes its own text.
    extra = engine.submit(prompt_ids(world, PROMPTS[5]), params=SamplingParams(max_tokens=6, temperature=0))
    assert extra.wait(10) and extra.finish_reason in ("length", "stop")
    for h in handles:
        h.cancel()
    for h in handles:
        assert h.wait(5)
    assert engine.snapshot()["running"] == 0 and engine.snapshot()["kv_cache"]["used_tokens"] == 0
    alone = engine.generate(prompt_ids(world, PROMPTS[5]), max_tokens=6, temperature=0).tokens
    assert extra.tokens == alone


def test_swap_invariants_under_concurrent_load(world):
    """Clients on 'lorad' while the champion flips: no failure, every answer is its version's lone answer."""
    from daemon.engine import SamplingParams

    v = world["versions"]
    engine = make_engine(world, max_batch_size=4, max_queue=64, batch_invariant=True)
    try:
        ref = references(engine, world, v, max_tokens=6)
        engine.swap(v[0])
        stop, bad, ok = threading.Event(), [], [0]

        def client(k):
            i = k
            while not stop.is_set():
                text = PROMPTS[i % len(PROMPTS)]
                h = engine.submit(prompt_ids(world, text), params=SamplingParams(max_tokens=6, temperature=0))
                h.wait(30)
                if h.finish_reason not in ("length", "stop") or h.tokens != ref[(h.label, text)]:
                    bad.append((h.label, text, h.finish_reason, h.error))
                else:
                    ok[0] += 1
                i += 1

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(6)]
        for t in threads:
            t.start()
        for k in range(12):
            engine.swap(v[k % 3])
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(30)
        assert not bad and ok[0] >= 6
        assert engine.stepper.captures == 0
    finally:
        engine.stop(timeout=5)


@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_grouped_projections_give_the_separate_linears_results(arch, transposed):
    """q/k/v and gate/up merged into one matmul each (with a block-diagonal B) change no number: same logits as
    the ungrouped SlotLoRAs for rows on different slots, with adapters on every projection (Qwen2: q/k/v bias).
    The same holds for the GPU's layout (joint tensors stored transposed and padded), tried here on the CPU."""
    import copy

    import torch
    from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from daemon.engine import lora

    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(tiny_llama_config()).eval()
    else:
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2)).eval()
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    separate, grouped = model, copy.deepcopy(model)
    slots, r_max = 3, 4
    wrapped_s = lora.wrap_linears(separate, slots=slots, r_max=r_max, group=False)
    wrapped_g = lora.wrap_linears(grouped, slots=slots, r_max=r_max, transposed=transposed)
    assert all(m.transposed == transposed for m in wrapped_g.values())
    if transposed:
        assert all(m.joint is None or m.joint.shape[1] % lora.PAD == 0 for m in wrapped_g.values())
    groups = {id(m.group) for m in wrapped_g.values() if m.group is not None}
    assert len(groups) == 2 * 2, "two groups (qkv, gate-up) per layer"
    gen = torch.Generator().manual_seed(1)
    for slot in range(slots):
        weights = {name: (torch.randn(r_max, m.in_features, generator=gen) * 0.3,
                          torch.randn(r_max, m.out_features, generator=gen) * 0.3) for name, m in wrapped_s.items()}
        lora.write_slot(wrapped_s, slot, weights, r_max)
        lora.write_slot(wrapped_g, slot, weights, r_max)
    ids = torch.randint(0, 128, (4, 6), generator=gen)
    rows_slot = torch.tensor([0, 1, 2, 3])  # 0 = base, 1..3 = the slots
    with torch.no_grad():
        outs = []
        for m in (separate, grouped):
            lora.SELECTION.mask = lora.selection(rows_slot, slots, r_max, torch.float32)
            try:
                outs.append(m(input_ids=ids).logits)
            finally:
                lora.SELECTION.mask = None
        plain = [m(input_ids=ids).logits for m in (separate, grouped)]  # no adapter: the base path
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain[1], plain[0], rtol=1e-5, atol=1e-5)
    assert (outs[0][1:] - plain[0][1:]).abs().max() > 1e-2, "the adapters must change the output"
    assert all(m.group.pending is None for m in wrapped_g.values() if m.group is not None)


def test_rows_ending_while_the_next_step_is_in_flight_leave_the_others_exact(world):
    """The host reads step N while step N+1 runs: a row that stops at step N (end-of-sequence) was already in
    N+1, and its slot is compacted under the launched step. Every other row must still equal its lone run."""
    from daemon.engine import SamplingParams

    engine = make_engine(world, max_batch_size=8)
    try:
        ref = references(engine, world, ["base"], max_tokens=12)
        # End-of-sequence = a token that some rows produce early and others never: those stop mid-batch
        stopper = ref[("base", PROMPTS[1])][2]
        engine.eos_ids = {stopper}
        stopping = [t for t in PROMPTS if stopper in ref[("base", t)]]
        assert 0 < len(stopping) < len(PROMPTS), "the chosen token must end some rows and not others"
        with Blocker(engine):
            handles = [(t, engine.submit(prompt_ids(world, t), model="base",
                                         params=SamplingParams(max_tokens=12, temperature=0))) for t in PROMPTS]
        for text, h in handles:
            assert h.wait(30)
            expected = ref[("base", text)]
            if stopper in expected:
                assert (h.finish_reason, h.tokens) == ("stop", expected[:expected.index(stopper)]), text
            else:
                assert (h.finish_reason, h.tokens) == ("length", expected), text
        assert engine.snapshot()["running"] == 0 and not engine._inflight
    finally:
        engine.stop(timeout=5)


def test_pinned_version_stays_loaded_until_unpinned_then_leaves_after_its_requests_drain(world, engine):
    """vLLM's load/unload_lora_adapter on a replica: load holds a slot; unload frees it only once drained."""
    from daemon.engine import SamplingParams, follow_champion

    v1, v2, v3 = world["versions"]
    engine.swap(v1)
    engine.pin(v2)
    engine.pin(v2)  # one pin, however often it is asked
    engine.swap(v3)
    engine.swap(v1)  # v2 is neither champion nor previous: only the pin keeps it
    engine._collect()
    assert v2 in engine.loaded_versions() and engine.pinned() == [v2]
    with Blocker(engine):
        held = engine.submit(prompt_ids(world, PROMPTS[0]), model=v2, params=SamplingParams(max_tokens=20,
                                                                                            temperature=0))
        assert engine.unpin(v2) and engine.pinned() == []
        assert v2 in engine.loaded_versions()  # `held` still decodes on it
    assert held.wait(30) and held.label == v2
    deadline = time.monotonic() + 5
    while v2 in engine.loaded_versions() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert v2 not in engine.loaded_versions()
    assert not engine.unpin("v0099-00000000")

    # follow_champion: exactly the version named (base included), idempotent, the old one kept as previous
    result = follow_champion(engine, world["store"], v3, reason="fleet")
    assert result["changed"] and engine.champion == v3 and engine.previous == v1
    assert not follow_champion(engine, world["store"], v3, reason="fleet")["changed"]
    assert follow_champion(engine, world["store"], None, reason="fleet")["to"] == "base" and engine.champion is None


def test_cpu_warm_up_runs_forwards_before_ready_and_changes_no_output(world):
    """The warm-up runs prefill and decode forwards in the decode thread, zeroes the cache after, and the first
    request's answer equals the answer of an engine that skipped it."""
    cold = make_engine(world, max_batch_size=4)
    warm = make_engine(world, max_batch_size=4)
    try:
        calls = []
        hook = warm.model.register_forward_hook(lambda m, args, out: calls.append(threading.get_ident()))
        warm.load_champion()
        hook.remove()
        cold.load_champion(warm_up=False)
        assert cold.warm_up_seconds is None and warm.warm_up_seconds > 0
        # a prefill and decode steps at batch 1 and 4 (the slots), base rows then adapter rows
        assert warm.cache.slots == 4 and len(calls) == 2 * 3 and set(calls) == {warm._thread_id}
        assert all(not bool(t.any()) for t in (*warm.cache.keys.values(), *warm.cache.values.values()))
        assert warm.warm_up() == 0  # once only
        ids = prompt_ids(world, PROMPTS[2])
        assert warm.generate(ids, max_tokens=8, temperature=0).tokens == \
            cold.generate(ids, max_tokens=8, temperature=0).tokens
    finally:
        cold.stop(timeout=5)
        warm.stop(timeout=5)


def test_bf16_prefill_runs_prompt_matmuls_in_bf16_and_decode_in_float32(world):
    import torch

    from daemon.engine import Engine

    engine = make_engine(world, max_batch_size=2, prefill_dtype="bfloat16")
    try:
        seen, logits = [], []  # (prompt tokens in the forward, output dtype of one decoder Linear); head outputs
        layer = engine.model.model.layers[0].mlp.down_proj
        hooks = [layer.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[1], out.dtype))),
                 engine.model.get_output_embeddings().register_forward_hook(lambda m, a, out: logits.append(out.dtype))]
        ids = prompt_ids(world, PROMPTS[2])
        h = engine.generate(ids, max_tokens=4, temperature=0)
        for hook in hooks:
            hook.remove()
        assert h.finish_reason in ("length", "stop") and h.tokens
        assert seen[0] == (len(ids), torch.bfloat16)  # the prompt
        assert seen[1:] and all(s == (1, torch.float32) for s in seen[1:])  # decode steps
        assert logits and set(logits) == {torch.float32}  # the head runs outside autocast, even for the prompt
        assert engine.cache.keys[0].dtype == torch.float32 and engine.snapshot()["prefill_dtype"] == "bfloat16"
    finally:
        engine.stop(timeout=5)
    with pytest.raises(ValueError, match="prefill_dtype"):
        Engine(engine.model, world["tokenizer"], prefill_dtype="float16")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="resident memory is read from /proc")
def test_cpu_kv_cache_takes_memory_only_as_its_positions_are_written():
    import torch

    from daemon.engine.cache import KVCache, LayerShape

    def resident_bytes() -> int:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) * 1024

    before = resident_bytes()
    cache = KVCache({i: LayerShape(4, 64, 64) for i in range(8)}, slots=16, context=4096, dtype=torch.float32,
                    device="cpu")
    assert cache.nbytes == 2**30
    assert resident_bytes() - before < 64 * 2**20  # allocated, not yet touched
    cache.keys[3][5, :, :10] = 1.0
    cache.move(5, 0, 10)
    assert float(cache.keys[3][0].sum()) == 4 * 10 * 64 and float(cache.keys[3][1].abs().sum()) == 0.0
    assert cache.values[7].dtype == torch.float32 and cache.values[7].shape == (16, 4, 4096, 64)
    del cache


def test_a_fault_that_stops_the_decode_thread_ends_every_request_instead_of_hanging(world):
    """A fault outside any one request's step (on a GPU: a CUDA launch failure, which leaves the context unusable)
    ends the decode thread: running and waiting requests finish with the reason, new ones and commands are refused,
    readiness turns false. Nothing waits forever on a thread that is gone."""
    from daemon.engine import EngineClosed, SamplingParams

    engine = make_engine(world, max_batch_size=2, max_queue=8)
    try:
        engine.load_champion(warm_up=False)
        params = SamplingParams(max_tokens=40, temperature=0)
        first = engine.submit(prompt_ids(world, PROMPTS[0]), params=params)
        deadline = time.monotonic() + 30
        while not first.tokens and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.tokens and engine.ready
        with Blocker(engine):   # the thread waits between steps while the fault is armed and more requests queue
            handles = [first] + [engine.submit(prompt_ids(world, p), params=params) for p in PROMPTS[1:4]]

            def fault():
                raise RuntimeError("CUDA error: unspecified launch failure")

            engine._collect = fault   # runs after every step, outside any one request's handling
        for h in handles:
            assert h.wait(10), "a request still waits on a decode thread that is gone"
            assert h.finish_reason == "error" and "unspecified launch failure" in h.error
        assert not engine.ready and "unspecified launch failure" in engine.failure
        with pytest.raises(EngineClosed, match="unspecified launch failure"):
            engine.submit(prompt_ids(world, PROMPTS[0]), params=params)
        with pytest.raises(EngineClosed):
            engine.call(lambda: 1, timeout=5)
    finally:
        engine.stop(timeout=5)


def test_lora_b_op_traces_into_compiled_code_without_a_graph_break(monkeypatch):
    """kernels.lora_b_add is a torch.library op: a compiled layer calls it in one graph (fullgraph) for decode and
    prefill shapes, with strided inputs. The Triton launch (GPU only, tested in tests/gpu) is replaced here by
    the same arithmetic in PyTorch, so what is checked is the op's schema, fake and dynamo integration."""
    import torch

    from daemon.engine import kernels, lora

    def launch(y, h, select, b, tokens, b1, b2, cb):
        assert (b1, b2, cb) == (8, 8, 12), "one Linear: no member boundaries, every row of B"
        sel = select.repeat(1, h.shape[1] // select.shape[1]).repeat_interleave(tokens, 0)
        return y + (h * sel) @ b

    monkeypatch.setattr(kernels, "_lora_b_launch", launch)
    kernels.register_lora_b()  # as wrap_linears does, before any compiled code runs

    def layer(x, w, sel, b):
        joint = x @ w
        return lora.add_lora(joint[..., :8], joint[..., 8:20], sel, b, True) * 2

    w, b = torch.randn(5, 24), torch.randn(12, 8)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in [(3, 1, 5), (5, 1, 5), (2, 4, 5)]:
        x = torch.randn(*shape)
        sel = lora.selection(torch.arange(shape[0]) % 4, 3, 2, torch.float32)
        joint = x @ w
        expected = 2 * (joint[..., :8] + (joint[..., 8:20] * sel.repeat(1, 1, 2)) @ b)
        torch.testing.assert_close(compiled(x, w, sel, b), expected)
        torch.testing.assert_close(lora.add_lora(joint[..., :8], joint[..., 8:20], sel, b, False) * 2, expected)


def test_engine_with_the_gpu_joint_layout_gives_the_row_layouts_tokens(world, monkeypatch):
    """The GPU stores each joint weight + A tensor transposed and padded. Forced on the CPU, an engine serving every
    version gives the row layout's greedy tokens: prefill, decode and slot writes all go through the transposed
    views."""
    import functools

    from daemon.engine import lora

    models = ["base", *world["versions"]]
    rows = make_engine(world, max_batch_size=4, max_queue=8)
    try:
        assert not any(m.transposed for m in rows._wrapped.values())
        expected = references(rows, world, models, max_tokens=8)
    finally:
        rows.stop(timeout=5)
    monkeypatch.setattr(lora, "wrap_linears", functools.partial(lora.wrap_linears, transposed=True))
    transposed = make_engine(world, max_batch_size=4, max_queue=8)
    try:
        assert all(m.transposed for m in transposed._wrapped.values())
        got = references(transposed, world, models, max_tokens=8)
    finally:
        transposed.stop(timeout=5)
    assert len({tuple(v) for v in expected.values()}) > len(PROMPTS), "versions must disagree somewhere"
    assert got == expected


@pytest.mark.parametrize("kv_dtype,shrink", [("bfloat16", 2), ("float8_e4m3", 4)])
def test_smaller_kv_cache_dtypes_shrink_the_cache_and_keep_the_greedy_answers(world, kv_dtype, shrink):
    """serve.kv_cache_dtype: bfloat16 (2 bytes a value) or float8_e4m3 (1 byte) against this float32 model's 4;
    prefill and decode write and read it (PyTorch path), and greedy tokens stay those of the float32 cache for most
    requests (rounding moves a near-tie of this tiny random model now and then; garbage would agree with nothing)."""
    import torch

    from daemon.engine import EngineError

    models = ["base", *world["versions"]]
    full = make_engine(world, max_batch_size=4, max_queue=8)
    try:
        expected = references(full, world, models, max_tokens=8)
        full_bytes = full.cache.nbytes
    finally:
        full.stop(timeout=5)
    small = make_engine(world, max_batch_size=4, max_queue=8, kv_cache_dtype=kv_dtype)
    try:
        expected_dtype = torch.float8_e4m3fn if kv_dtype == "float8_e4m3" else torch.bfloat16
        assert all(t.dtype == expected_dtype for t in small.cache.keys.values())
        assert small.cache.nbytes * shrink == full_bytes
        got = references(small, world, models, max_tokens=8)
    finally:
        small.stop(timeout=5)
    first4 = sum(got[k][:4] == expected[k][:4] for k in expected)
    assert first4 >= 0.5 * len(expected), (first4, len(expected))  # 25 of 32 here; chance is ~0
    assert any(got[k] for k in got)
    with pytest.raises(EngineError, match="kv_cache_dtype"):
        make_engine(world, max_batch_size=4, kv_cache_dtype="int4")


def test_on_a_cpu_each_thread_lets_its_openmp_workers_go_when_done(world, monkeypatch):
    """GNU OpenMP slows every thread's small ops once all threads' workers outnumber the cores: the thread that
    starts the engine (it loaded the model) and one that loads an adapter let theirs go when done, and the decode
    thread when it goes idle after work."""
    import pipelines.hardware

    calls = []
    monkeypatch.setattr(pipelines.hardware, "release_openmp_workers",
                        lambda: calls.append(threading.current_thread().name))
    e = make_engine(world, max_batch_size=2)
    try:
        assert calls == [threading.current_thread().name], "start() lets the caller's workers go"
        e.preload(world["versions"][0])
        assert calls[-1] == threading.current_thread().name, "so does loading an adapter, in the caller's thread"
        n = len(calls)
        assert e.generate(prompt_ids(world, PROMPTS[0]), max_tokens=3, temperature=0).wait(30)
        deadline = time.monotonic() + 10
        while "lorad-engine" not in calls[n:] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "lorad-engine" in calls[n:], calls
        idle = len(calls)
        time.sleep(0.3)  # idle ticks with nothing computed: no further calls
        assert len(calls) == idle, calls
    finally:
        e.stop(timeout=5)
