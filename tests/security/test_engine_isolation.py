"""Engine isolation (issue 28): values that cannot be computed never fail a request, and one row's failure
never fails the others in its batch (the old engine answered 500 to the whole batch)."""

from __future__ import annotations

import math

import pytest

from test_engine import PROMPTS, Blocker, make_engine, make_world, prompt_ids


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = make_world(tmp_path_factory.mktemp("isolation"), n_adapters=1)
    yield w
    w["store"].close()


def test_tiny_temperature_and_top_p_behave_as_greedy_and_never_nan(world):
    from daemon.engine import SamplingParams

    engine = make_engine(world, max_batch_size=4)
    try:
        ids = prompt_ids(world, PROMPTS[0])
        greedy = engine.generate(ids, max_tokens=8, temperature=0).tokens
        cases = [dict(temperature=1e-30), dict(temperature=5e-324), dict(temperature=1e-6, top_p=1e-30),
                 dict(temperature=1.0, top_p=5e-324), dict(temperature=2.0, top_p=math.ulp(0.0))]
        with Blocker(engine):  # all in one batch, beside a normal sampling row
            handles = [engine.submit(ids, params=SamplingParams(max_tokens=8, **kw)) for kw in cases]
            normal = engine.submit(ids, params=SamplingParams(max_tokens=8, temperature=1.0, seed=3))
        for kw, h in zip(cases, handles):
            assert h.wait(30) and h.finish_reason in ("length", "stop"), (kw, h.error)
            assert h.tokens == greedy, kw
        assert normal.wait(30) and normal.finish_reason in ("length", "stop") and normal.tokens
    finally:
        engine.stop(timeout=5)


def test_a_row_with_non_finite_values_ends_alone(world):
    """A request whose computation turns NaN ends with an error; its batch neighbours finish normally."""
    import torch

    from daemon.engine import SamplingParams

    engine = make_engine(world, max_batch_size=4)
    poison = world["tokenizer"].convert_tokens_to_ids("judge")

    def hook(module, inputs, output):  # NaN for every row whose prompt holds the poison token
        rows = (inputs[0] == poison).any(dim=-1) & (inputs[0].shape[1] > 1)  # prefill only: decode may pick it
        return torch.where(rows[:, None, None], torch.full_like(output, float("nan")), output)

    handle = engine.model.get_input_embeddings().register_forward_hook(hook)
    try:
        clean = [t for t in PROMPTS if "judge" not in t][:3]
        ref = {t: engine.generate(prompt_ids(world, t), max_tokens=8, temperature=0).tokens for t in clean}
        params = SamplingParams(max_tokens=8, temperature=0)
        with Blocker(engine):
            good = [engine.submit(prompt_ids(world, t), params=params) for t in clean]
            bad = engine.submit(prompt_ids(world, "a judge must not"), params=params)
        assert bad.wait(30) and bad.finish_reason == "error" and "non-finite" in bad.error
        for t, h in zip(clean, good):
            assert h.wait(30) and h.finish_reason in ("length", "stop") and h.tokens == ref[t]
        # The poisoned slot is cleared: the next request in it is unaffected.
        after = engine.generate(prompt_ids(world, clean[0]), max_tokens=8, temperature=0)
        assert after.tokens == ref[clean[0]]
    finally:
        handle.remove()
        engine.stop(timeout=5)
