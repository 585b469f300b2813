"""A real engine around a tiny random model behind a real uvicorn server on 127.0.0.1, for the attack tests."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Iterator

from test_engine import make_engine, make_world
from test_server import TOKEN, Server, fake_daemon

API_KEY = "k-0123456789abcdef-api"
OTHER_KEY = "k-fedcba9876543210-api"


def live_server(app, serve) -> Server:
    """uvicorn in a thread with lorad's own settings (daemon.server.uvicorn_config)."""
    from daemon.server import uvicorn_config

    def config(port: int):
        settings = SimpleNamespace(**{**vars(serve), "port": port, "host": "127.0.0.1"})
        return uvicorn_config(app, settings, log_config=None, access_log=False, lifespan="off")

    return Server(app, config)


@contextlib.contextmanager
def live(root, *, max_batch_size: int = 4, **serve) -> Iterator[SimpleNamespace]:
    """world + engine + daemon stand-in + server; ``serve`` overrides serve.* settings."""
    from daemon.server import create_app
    from daemon.watch import LiveStats
    from monitors.metrics import LoradMetrics

    world = make_world(root, n_adapters=1)
    engine = make_engine(world, max_batch_size=max_batch_size, max_queue=16, metrics=LoradMetrics())
    engine.load_champion()
    daemon = fake_daemon(world, engine, **{"max_body_bytes": 1_000_000, **serve})
    daemon.live = LiveStats()
    server = live_server(create_app(daemon), daemon.cfg.serve)
    try:
        yield SimpleNamespace(world=world, engine=engine, daemon=daemon, server=server, url=server.url,
                              admin={"Authorization": f"Bearer {TOKEN}"})
    finally:
        server.stop()
        engine.stop(timeout=5)
        world["store"].close()


def requests_counted(daemon, route: str, code: int) -> float:
    value = daemon.metrics.registry.get_sample_value("lorad_serve_requests_total", {"route": route, "code": str(code)})
    return value or 0.0
