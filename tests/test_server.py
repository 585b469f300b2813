"""OpenAI-compatible server: the official client (streaming and not), version pinning under concurrent
swaps, limits (429, 413, 400), admin authentication, errors in OpenAI's shape.

Real uvicorn servers on 127.0.0.1 around tiny random models and adapters (see test_engine.make_world).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable
from types import SimpleNamespace

import httpx
import pytest

from test_engine import PROMPTS, Blocker, make_engine, make_world, prompt_ids

TOKEN = "s3cret-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread on a free port of 127.0.0.1."""

    def __init__(self, app, config: Callable[[int], Any] | None = None):
        """``config(port)`` builds the uvicorn.Config (default: plain uvicorn settings)."""
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if config is None:
            def config(port: int) -> Any:
                return uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                      lifespan="off")
        self.server = uvicorn.Server(config(self.port))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def fake_daemon(world: dict, engine, **serve) -> SimpleNamespace:
    from daemon.config import build_config
    from monitors.metrics import LoradMetrics

    cfg = build_config({"model": {"base_model": str(world["model_dir"])},
                        "serve": {"admin_token": TOKEN, "max_prompt_tokens": 64, "max_new_tokens": 32,
                                  "max_body_bytes": 4096, **serve}})
    ready = threading.Event()
    ready.set()
    metrics = engine.metrics if engine is not None and engine.metrics is not None else LoradMetrics()
    return SimpleNamespace(cfg=cfg, store=world["store"], metrics=metrics, ready=ready, model_error=None,
                           engine=engine, started_at=time.time(), status=lambda: {"daemon": {"running": True}})


def client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=30)


def reference_text(world: dict, engine, model: str, text: str, max_tokens: int, *, chat: bool = False) -> str:
    from daemon.server import Detokenizer

    tok = world["tokenizer"]
    if chat:
        ids = tok(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=False), add_special_tokens=False)["input_ids"]
    else:
        ids = prompt_ids(world, text)
    d = Detokenizer(tok)
    for t in engine.generate(ids, model=model, max_tokens=max_tokens, temperature=0).tokens:
        d.push(t)
    d.flush()
    return d.text


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = make_world(tmp_path_factory.mktemp("server"))
    yield w
    w["store"].close()


@pytest.fixture(scope="module")
def served(world):
    """One engine + server for the module; tests that swap restore the champion to the base."""
    from monitors.metrics import LoradMetrics

    engine = make_engine(world, max_batch_size=4, max_queue=8, metrics=LoradMetrics())
    engine.load_champion()
    server = Server(__import__("daemon.server", fromlist=["create_app"]).create_app(fake_daemon(world, engine)))
    yield SimpleNamespace(engine=engine, server=server, world=world)
    server.stop()
    engine.stop(timeout=5)


def test_openai_client_completions_and_chat_streaming_and_not(served):
    world, engine, server = served.world, served.engine, served.server
    oai = client(server)
    v1 = world["versions"][0]
    expected = reference_text(world, engine, v1, PROMPTS[0], 10)
    assert expected, "the reference must not be empty, or equality proves nothing"

    c = oai.completions.create(model=v1, prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert c.model == v1 and c.choices[0].text == expected and c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.prompt_tokens == len(prompt_ids(world, PROMPTS[0])) and c.usage.completion_tokens >= 1

    chunks = list(oai.completions.create(model=v1, prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == c.usage.completion_tokens
    assert {ch.model for ch in chunks} == {v1}

    chat_expected = reference_text(world, engine, "base", PROMPTS[1], 12, chat=True)
    r = oai.chat.completions.create(model="base", messages=[{"role": "user", "content": PROMPTS[1]}],
                                    max_tokens=12, temperature=0)
    assert r.model == "base" and r.choices[0].message.content == chat_expected
    assert r.choices[0].message.role == "assistant"

    stream = oai.chat.completions.create(model="base", messages=[{"role": "user", "content": PROMPTS[1]}],
                                         max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat_expected
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens
    assert any(ch.choices and ch.choices[0].finish_reason for ch in chunks)

    # The raw response names the version in a header; the default model is the champion ("base" here).
    raw = oai.completions.with_raw_response.create(model="lorad", prompt=PROMPTS[2], max_tokens=3, temperature=0)
    assert raw.headers["x-lorad-adapter"] == "base" and raw.parse().model == "base"
    models = {m.id for m in oai.models.list().data}
    assert {"lorad", "base", *world["versions"]} <= models


def test_stop_strings_and_seeded_sampling(served):
    world, engine, server = served.world, served.engine, served.server
    oai = client(server)
    full = reference_text(world, engine, "base", PROMPTS[3], 16)
    words = full.split()
    assert len(words) >= 3
    stop = " " + words[2]
    cut = full[:full.index(stop)]
    c = oai.completions.create(model="base", prompt=PROMPTS[3], max_tokens=16, temperature=0, stop=[stop])
    assert c.choices[0].text == cut and c.choices[0].finish_reason == "stop"
    streamed = oai.completions.create(model="base", prompt=PROMPTS[3], max_tokens=16, temperature=0, stop=stop,
                                      stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == cut
    a = oai.completions.create(model="base", prompt=PROMPTS[3], max_tokens=12, temperature=1.0, top_p=0.95, seed=3)
    b = oai.completions.create(model="base", prompt=PROMPTS[3], max_tokens=12, temperature=1.0, top_p=0.95, seed=3)
    assert a.choices[0].text == b.choices[0].text


def test_concurrent_clients_during_swaps_never_mix_versions(served):
    """8 client threads stream and non-stream greedy requests while the champion flips between versions."""
    world, engine, server = served.world, served.engine, served.server
    v1, v2, _ = world["versions"]
    versions = ["base", v1, v2]
    expected = {(m, p): reference_text(world, engine, m, p, 8) for m in versions for p in PROMPTS[:4]}
    errors, seen, done = [], [], threading.Event()

    def worker(i: int) -> None:
        oai = client(server)
        n = 0
        while not done.is_set() or n < 3:
            prompt = PROMPTS[(i + n) % 4]
            try:
                if n % 2:
                    chunks = list(oai.completions.create(model="lorad", prompt=prompt, max_tokens=8, temperature=0,
                                                         stream=True))
                    model, text = chunks[0].model, "".join(ch.choices[0].text for ch in chunks if ch.choices)
                else:
                    raw = oai.completions.with_raw_response.create(model="lorad", prompt=prompt, max_tokens=8,
                                                                   temperature=0)
                    c = raw.parse()
                    model, text = c.model, c.choices[0].text
                    assert raw.headers["x-lorad-adapter"] == model
                if text != expected[(model, prompt)]:
                    errors.append(f"{model} {prompt!r}: {text!r} != {expected[(model, prompt)]!r}")
                seen.append(model)
            except Exception as e:  # collected: a thread's exception would otherwise vanish
                errors.append(f"{type(e).__name__}: {e}")
            n += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
            # base -> v1 -> v2 -> (rollback) v1 -> v2 -> v1 -> (rollback) v2 -> v1, through the admin API
            for target in [v1, v2, None, v2, v1, None, v1]:
                if target is None:
                    r = http.post("/admin/rollback", json={"reason": "test rollback"})
                    assert r.status_code == 200 and r.json()["preload_seconds"] == 0.0, r.text
                else:
                    r = http.post("/admin/promote", json={"version": target, "reason": "test swap"})
                    assert r.status_code == 200 and r.json()["to"] == target, r.text
                time.sleep(0.15)
    finally:
        done.set()
        for t in threads:
            t.join(60)
        for alias in ("champion", "previous_champion"):  # restore the base as champion for the other tests
            world["store"].set_alias(alias, None, reason="test cleanup")
        engine.reload()
    assert not errors, errors[:5]
    assert len(seen) >= 24 and len(set(seen)) >= 2, seen


def test_queue_full_answers_429(served):
    engine, server = served.engine, served.server
    body = {"model": "base", "prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        responses = []
        with Blocker(engine):
            pending = [threading.Thread(target=lambda: responses.append(http.post("/v1/completions", json=body)))
                       for _ in range(engine.max_queue)]
            for t in pending:
                t.start()
            deadline = time.monotonic() + 10
            while engine.snapshot()["waiting"] < engine.max_queue:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = http.post("/v1/completions", json=body)
        for t in pending:
            t.join(30)
    assert r.status_code == 429 and r.headers["retry-after"]
    assert r.json()["error"]["code"] == "queue_full" and "max_queue" in r.json()["error"]["message"]
    assert [x.status_code for x in responses] == [200] * engine.max_queue


def test_limits_and_errors_in_openai_shape(served):
    import openai

    server = served.server
    oai = client(server)
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="v0099-deadbeef", prompt="hello", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "v0099-deadbeef" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="base", prompt="the " * 100, max_tokens=2)  # > serve.max_prompt_tokens (64)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="max_new_tokens"):
        oai.completions.create(model="base", prompt="hello", max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        oai.completions.create(model="base", prompt="hello", temperature=5)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        oai.completions.create(model="base", prompt="hello", logprobs=2)
    with httpx.Client(base_url=server.url) as http:
        big = {"model": "base", "prompt": "x" * 5000}  # > serve.max_body_bytes (4096)
        r = http.post("/v1/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        chunked = http.post("/v1/completions", content=iter([b'{"prompt": "', b"x" * 5000, b'"}']),
                            headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        assert http.post("/v1/completions", content=b"{not json").status_code == 400
        assert http.get("/v1/nothing").json()["error"]["message"] == "Not Found"


def test_admin_requires_the_bearer_token(served, world):
    from daemon.server import create_app

    server = served.server
    with httpx.Client(base_url=server.url) as http:
        r = http.post("/admin/reload")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert http.post("/admin/promote", json={"version": world["versions"][0]},
                         headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.post("/admin/rollback", headers={"Authorization": TOKEN}).status_code == 401  # no scheme
        ok = http.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["to"] == "base"
        bad = http.post("/admin/promote", json={"reason": "no version"}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "version"
        missing = http.post("/admin/promote", json={"version": "v0099-deadbeef"},
                            headers={"Authorization": f"Bearer {TOKEN}"})
        assert missing.status_code == 404 and served.engine.champion is None
    # An empty configured token disables admin: 403 with the way out, even with a token sent.
    disabled = Server(create_app(fake_daemon(world, served.engine, admin_token="")))
    try:
        r = httpx.post(f"{disabled.url}/admin/promote", json={"version": world["versions"][0]},
                       headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403 and "serve.admin_token" in r.json()["error"]["message"]
    finally:
        disabled.stop()


def test_readiness_follows_the_engine_and_metrics_are_exported(served, world):
    from daemon.server import create_app

    daemon = fake_daemon(world, None)
    app = create_app(daemon)
    transport = httpx.ASGITransport(app=app)

    async def run():
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            not_ready = await http.get("/readyz")
            refused = await http.post("/v1/completions", json={"model": "lorad", "prompt": "hi"})
            daemon.engine = served.engine
            ready = await http.get("/readyz")
            metrics = await http.get("/metrics")
            status = await http.get("/status")
            return not_ready, refused, ready, metrics, status

    import asyncio

    not_ready, refused, ready, metrics, status = asyncio.run(run())
    assert not_ready.status_code == 503 and refused.status_code == 503
    assert refused.json()["error"]["code"] == "model_not_ready"
    assert ready.status_code == 200 and ready.json()["champion"] == "base"
    assert status.json()["engine"]["champion"] == "base"
    text = served.engine.metrics.exposition()[0].decode()
    for name in ("lorad_adapter_swap_seconds_bucket", "lorad_serve_time_to_first_token_seconds_bucket",
                 'lorad_serve_requests_total{code="200",route="/v1/completions"}', "lorad_serve_queue_depth"):
        assert name in text, name
    assert metrics.status_code == 200


@pytest.mark.slow
def test_real_model_serves_the_openai_client(tmp_path):
    """SmolLM2-135M: streaming chat through the official client equals transformers' greedy generate."""
    import torch

    from daemon.engine import Engine
    from daemon.server import create_app
    from daemon.store import open_store
    from pipelines.models import load_base_model

    spec = "embedded:SmolLM2-135M-Instruct"
    cache = tmp_path / "cache"
    prepared = __import__("pathlib").Path("/tmp/lorad-s1/cache")
    model, tok = load_base_model(spec, prepared if prepared.is_dir() else cache)
    reference, _ = load_base_model(spec, prepared if prepared.is_dir() else cache)
    store = open_store(tmp_path / "state")
    engine = Engine(model, tok, store=store, state_dir=tmp_path / "state", base_model=spec).start()
    engine.load_champion()
    world = {"model_dir": spec, "store": store}
    server = Server(create_app(fake_daemon(world, engine, max_prompt_tokens=512)))
    try:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):]
        expected = tok.decode(out, skip_special_tokens=True)
        chunks = list(client(server).chat.completions.create(model="lorad", messages=messages, max_tokens=20,
                                                             temperature=0, stream=True))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == expected and "Paris" in text
    finally:
        server.stop()
        engine.stop(timeout=5)
        store.close()


def test_text_events_from_the_template_equal_the_generic_chunk():
    from daemon.server.protocol import Shape, sse

    for chat in (True, False):
        shape = Shape(chat=chat, id='cmpl-"quoted"', model="v0001-é", created=1)
        for text in ["a", ' say "hi" \\ \n\t', "é漢字😀", "\x00\x1f\u2028", ""]:
            assert shape.text_event(text) == sse(shape.chunk(text, None)).encode(), (chat, text)


class ByteTokenizer:
    """Token id = one UTF-8 byte, decoded as a byte-level tokenizer does: an unfinished character is U+FFFD."""

    def decode(self, ids, **_):
        return bytes(ids).decode("utf-8", errors="replace")


def test_push_many_releases_what_push_does_and_never_holds_complete_characters():
    from daemon.server import Detokenizer

    text = "aé漢 b😀c"
    ids = list(text.encode())
    one = Detokenizer(ByteTokenizer(), ["漢 "])
    by_one = "".join(one.push(t) for t in ids) + one.flush()
    for size in (2, 3, 5):
        many = Detokenizer(ByteTokenizer(), ["漢 "])
        pieces = [many.push_many(ids[i:i + size]) for i in range(0, len(ids), size)] + [many.flush()]
        assert "".join(pieces) == by_one == "aé" and many.stopped
    d = Detokenizer(ByteTokenizer())
    assert d.push_many(list("aé".encode()[:2])) == "a", "the complete character before a split one goes out"
    assert d.push_many(list("aé".encode()[2:])) == "é"


def test_detokenizer_uses_the_tokenizers_backend_only_where_decode_is_exactly_that(world):
    from daemon.server.text import fast_backend

    tok = world["tokenizer"]
    assert fast_backend(tok) is tok.backend_tokenizer
    ids = tok("the law court is hello world")["input_ids"] + [tok.eos_token_id]
    assert fast_backend(tok).decode(ids, skip_special_tokens=True) == tok.decode(
        ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    class Custom(type(tok)):
        def _decode(self, *a, **k):
            return "custom"

    tok.__class__ = Custom
    try:
        assert fast_backend(tok) is None, "a tokenizer with its own decode keeps it"
    finally:
        tok.__class__ = Custom.__mro__[1]
    assert fast_backend(ByteTokenizer()) is None


def test_a_bug_in_the_completion_path_is_a_counted_500_in_openai_shape(served, world, monkeypatch, caplog):
    """The completion routes are answered in front of FastAPI: its catch-all handler must still hold there."""
    import asyncio

    from daemon.server import create_app

    daemon = fake_daemon(world, served.engine)
    app = create_app(daemon)

    def broken(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(served.engine, "submit", broken)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return [await http.post(path, json={"model": "lorad", "prompt": "hi", "messages": [
                {"role": "user", "content": "hi"}]}) for path in ("/v1/completions", "/v1/chat/completions")]

    answers = asyncio.run(run())
    for r, route in zip(answers, ("/v1/completions", "/v1/chat/completions")):
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error", r.text
        value = daemon.metrics.registry.get_sample_value("lorad_serve_requests_total", {"route": route, "code": "500"})
        assert value and value >= 1
    assert any("unhandled error" in rec.getMessage() and rec.exc_info for rec in caplog.records)
