"""A real engine around a tiny random model behind a real uvicorn server on 127.0.0.1, for the attack tests."""

from __future__ import annotations

import contextlib
import threading
import time
from types import SimpleNamespace
from typing import Iterator

from test_engine import make_engine, make_world
from test_server import TOKEN, fake_daemon, free_port

API_KEY = "k-0123456789abcdef-api"
OTHER_KEY = "k-fedcba9876543210-api"


class LiveServer:
    """uvicorn in a thread with lorad's own settings (daemon.server.uvicorn_config)."""

    def __init__(self, app, serve):
        import uvicorn

        from daemon.server import uvicorn_config

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        serve = SimpleNamespace(**{**vars(serve), "port": self.port, "host": "127.0.0.1"})
        self.server = uvicorn.Server(uvicorn_config(app, serve, log_config=None, access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


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
    server = LiveServer(create_app(daemon), daemon.cfg.serve)
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
