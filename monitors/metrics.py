"""Every Prometheus metric lorad exports, in one place.

``LoradMetrics(registry)`` takes the registry as a parameter so tests can read any value
with ``registry.get_sample_value(...)`` and never touch the global default registry.
Names follow Prometheus conventions: ``lorad_`` prefix, base units, ``_total`` counters.
"""

from __future__ import annotations

from typing import Any


class LoradMetrics:
    """The metric objects, created on one registry."""

    def __init__(self, registry: Any = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Info

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.build_info = Info("lorad_build", "lorad version and base model", registry=r)
        self.up = Gauge("lorad_daemon_up", "1 while the daemon main loop runs", registry=r)
        self.start_time = Gauge("lorad_daemon_start_time_seconds", "Unix time the daemon started", registry=r)
        self.model_ready = Gauge("lorad_model_ready", "1 once the base model (and champion) is loaded", registry=r)
        self.model_load_seconds = Gauge("lorad_model_load_seconds", "time the last base-model load took", registry=r)
        self.events = Counter("lorad_events_total", "state events recorded, by kind", ["kind"], registry=r)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format and its content type, for /metrics."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
