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

        # Serving (daemon/engine/, daemon/server/). Latency buckets span CPU (seconds) to GPU (milliseconds).
        from prometheus_client import Histogram

        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
        self.serve_requests = Counter("lorad_serve_requests_total", "inference and admin HTTP requests, by route and status code",
                                      ["route", "code"], registry=r)
        self.serve_request_seconds = Histogram("lorad_serve_request_duration_seconds",
                                               "time from request arrival to the last byte of the response, by route",
                                               ["route"], buckets=latency, registry=r)
        self.serve_ttft_seconds = Histogram("lorad_serve_time_to_first_token_seconds",
                                            "time from submission to the first generated token (queue + prefill)",
                                            buckets=latency, registry=r)
        self.serve_prompt_tokens = Counter("lorad_serve_prompt_tokens_total", "prompt tokens prefilled", registry=r)
        self.serve_generated_tokens = Counter("lorad_serve_generated_tokens_total", "tokens generated", registry=r)
        self.serve_finished = Counter("lorad_serve_generations_total", "finished generations, by finish reason",
                                      ["reason"], registry=r)
        self.serve_queue_depth = Gauge("lorad_serve_queue_depth", "requests waiting for a batch slot", registry=r)
        self.serve_active = Gauge("lorad_serve_active_requests", "requests being decoded now", registry=r)
        self.serve_decode_step_seconds = Histogram("lorad_serve_decode_step_seconds",
                                                   "time of one decode step over all running requests",
                                                   buckets=(0.001, 0.002, 0.004) + latency, registry=r)
        self.serve_batch_rows = Histogram("lorad_serve_batch_rows", "running requests decoded together in one step",
                                          buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.adapter_swap_seconds = Histogram("lorad_adapter_swap_seconds",
                                              "champion pointer flip after preload (what new requests wait for)",
                                              buckets=(0.0001, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0), registry=r)
        self.adapter_preload_seconds = Histogram("lorad_adapter_preload_seconds",
                                                 "verify + load of an adapter version into the engine",
                                                 buckets=latency, registry=r)
        self.adapter_swaps = Counter("lorad_adapter_swaps_total", "champion swaps in the engine, by result",
                                     ["result"], registry=r)
        self.adapters_loaded = Gauge("lorad_adapters_loaded", "adapter versions held in memory by the engine", registry=r)
        self.serve_champion = Info("lorad_serve_champion", "adapter version new requests are pinned to ('base' = none)",
                                   registry=r)
        self.serve_kv_cache_capacity = Gauge("lorad_serve_kv_cache_capacity_tokens",
                                             "positions the preallocated KV cache holds, all slots together", registry=r)
        self.serve_kv_cache_used = Gauge("lorad_serve_kv_cache_used_tokens", "positions cached by running requests",
                                         registry=r)
        self.serve_batch_occupancy = Gauge("lorad_serve_batch_occupancy_ratio",
                                           "running requests / KV cache slots (max batch)", registry=r)
        self.serve_prefill_seconds = Histogram("lorad_serve_prefill_seconds", "time of one batched prefill forward",
                                               buckets=latency, registry=r)
        self.serve_graph_captures = Counter("lorad_serve_graph_captures_total",
                                            "CUDA graphs captured by the engine (flat across adapter swaps)", registry=r)
        self.serve_compilations = Counter("lorad_serve_compilations_total",
                                          "torch.compile graphs built by the engine (flat across adapter swaps)",
                                          registry=r)

        # The learning loop (daemon/service.py, daemon/jobs.py). Label values are short codes, never free text.
        from prometheus_client import Histogram as _Histogram

        self.inbox_files = Counter("lorad_inbox_files_total", "inbox files processed, by outcome (done | rejected)",
                                   ["outcome"], registry=r)
        self.ingest_records = Counter("lorad_ingest_records_total",
                                      "input records by outcome (accepted | duplicate | rejected)", ["outcome"],
                                      registry=r)
        self.records_pending = Gauge("lorad_records_pending", "train-split records not yet trained on", registry=r)
        self.drift_checks = Counter("lorad_drift_checks_total", "drift checks by result (drift | no_drift | "
                                    "insufficient_data | failed)", ["result"], registry=r)
        self.drift_p_value = Gauge("lorad_drift_p_value", "combined p-value of the last drift check", registry=r)
        self.drift_effect = Gauge("lorad_drift_effect", "effect size of the last drift check", registry=r)
        self.drift_alpha = Gauge("lorad_drift_alpha", "configured family-wise alpha (drift.alpha)", registry=r)
        self.drift_effect_floor = Gauge("lorad_drift_effect_floor", "configured effect-size floor", registry=r)
        self.drift_last_detected = Gauge("lorad_drift_last_detected_timestamp_seconds",
                                         "when drift was last detected (0 = never)", registry=r)
        self.train_decisions = Counter("lorad_train_decisions_total", "should_train outcomes by decision and reason code",
                                       ["decision", "reason"], registry=r)
        self.training_runs = Counter("lorad_training_runs_total", "finished training runs by outcome "
                                     "(succeeded | failed | interrupted)", ["outcome"], registry=r)
        self.training_duration = _Histogram("lorad_training_run_duration_seconds", "wall time of a training run",
                                            buckets=(60, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400), registry=r)
        self.training_tokens = Counter("lorad_training_tokens_total", "real (non-padding) tokens trained on", registry=r)
        self.training_tokens_per_second = Gauge("lorad_training_tokens_per_second", "throughput of the running run",
                                                registry=r)
        self.training_loss = Gauge("lorad_training_loss", "last step loss of the running (or last) run", registry=r)
        self.training_gpu_peak = Gauge("lorad_training_gpu_peak_bytes", "peak GPU memory of the running (or last) "
                                       "training process, by kind (allocated, reserved); rank 0 under DDP/FSDP",
                                       ["kind"], registry=r)
        self.training_step = Gauge("lorad_training_step", "optimizer step of the running run", registry=r)
        self.training_total_steps = Gauge("lorad_training_total_steps", "optimizer steps the running run will take",
                                          registry=r)
        self.training_running = Gauge("lorad_training_running", "1 while a training run is in progress", registry=r)
        self.training_last_start = Gauge("lorad_training_last_start_timestamp_seconds",
                                         "when the last training run started (0 = never)", registry=r)
        self.eval_loss = Gauge("lorad_eval_loss", "mean response loss of the last evaluation, by role and set",
                               ["role", "set"], registry=r)
        self.eval_score = Gauge("lorad_eval_score", "answer score of the last evaluation in [0, 1], by metric "
                                "(accuracy, f1, rouge_l), role (candidate, incumbent) and set (holdout or a "
                                "regression set's name)", ["metric", "role", "set"], registry=r)
        self.records_parked = Counter("lorad_records_parked_total", "train records parked after promote.max_refusals "
                                      "refused candidates (no longer pending; `lorad status` lists them)", registry=r)
        self.promotions = Counter("lorad_promotions_total", "promotions by reason code", ["reason"], registry=r)
        self.promotion_rejections = Counter("lorad_promotion_rejections_total", "candidates refused by reason code",
                                            ["reason"], registry=r)
        self.rollbacks = Counter("lorad_rollbacks_total", "rollbacks by reason code", ["reason"], registry=r)
        self.adapter_info = Gauge("lorad_adapter_info", "the champion adapter (value 1; 'base' = no adapter)",
                                  ["version", "parent", "sha256"], registry=r)
        self.gpu_memory = Gauge("lorad_gpu_memory_bytes", "GPU memory of this process by device and kind "
                                "(allocated, reserved; total = the card's capacity)", ["device", "kind"], registry=r)
        # The serving fleet (daemon/fleet.py): one series per replica URL in fleet.replicas (a bounded set).
        self.fleet_replica_up = Gauge("lorad_fleet_replica_up", "1 when the replica answered the control plane's "
                                      "last check", ["replica"], registry=r)
        self.fleet_replica_last_contact = Gauge("lorad_fleet_replica_last_contact_timestamp_seconds",
                                                "Unix time of the replica's last answer", ["replica"], registry=r)
        self.fleet_replica_in_sync = Gauge("lorad_fleet_replica_in_sync", "1 when the replica serves the "
                                           "control plane's champion", ["replica"], registry=r)
        self.fleet_replica_champion = Gauge("lorad_fleet_replica_champion_info", "the version the replica serves "
                                            "(value 1; 'base' = no adapter)", ["replica", "version"], registry=r)
        self.fleet_replica_loaded = Gauge("lorad_fleet_replica_loaded_adapters", "adapter versions the replica "
                                          "holds in memory", ["replica"], registry=r)
        self.fleet_changes = Counter("lorad_fleet_changes_total", "fleet promotions and rollbacks by action "
                                     "(promote | rollback | catch_up) and result (ok | refused)",
                                     ["action", "result"], registry=r)
        self.hardware_plan = Info("lorad_hardware_plan", "device, dtype, quantization and micro-batch chosen at "
                                  "startup for the GPU found (or CPU)", registry=r)
        # Export every labelled series at zero from the start: dashboards and alerts see 0, not "no data".
        for action in ("promote", "rollback", "catch_up"):
            for result in ("ok", "refused"):
                self.fleet_changes.labels(action, result)
        for outcome in ("done", "rejected"):
            self.inbox_files.labels(outcome)
        for outcome in ("accepted", "duplicate", "rejected"):
            self.ingest_records.labels(outcome)
        for result in ("drift", "no_drift", "insufficient_data", "failed"):
            self.drift_checks.labels(result)
        for outcome in ("succeeded", "failed", "interrupted"):
            self.training_runs.labels(outcome)
        for decision in ("start", "skip"):
            self.train_decisions.labels(decision, "none")
        self.promotions.labels("none")
        self.promotion_rejections.labels("none")
        self.rollbacks.labels("none")
        for role in ("candidate", "incumbent"):
            self.eval_loss.labels(role, "holdout").set(float("nan"))
            for metric in ("accuracy", "f1"):
                self.eval_score.labels(metric, role, "holdout").set(float("nan"))
        self.set_champion(None)
        for result in ("ok", "failed"):
            self.adapter_swaps.labels(result)
        for code in ("200", "429"):
            self.serve_requests.labels("/v1/chat/completions", code)
        self.drift_p_value.set(float("nan"))
        self.drift_effect.set(float("nan"))
        self.training_loss.set(float("nan"))
        for kind in ("allocated", "reserved"):
            self.gpu_memory.labels("none", kind)
            self.training_gpu_peak.labels(kind)
        from prometheus_client import PlatformCollector, ProcessCollector

        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    def set_champion(self, version: str | None, parent: str | None = None, sha256: str | None = None) -> None:
        """Make lorad_adapter_info name exactly one adapter (the champion), value 1."""
        self.adapter_info.clear()
        self.adapter_info.labels(version or "base", parent or "", sha256 or "").set(1)

    def sample_gpu_memory(self) -> None:
        """Refresh lorad_gpu_memory_bytes when CUDA is present (cheap; called at scrape time)."""
        import sys

        torch = sys.modules.get("torch")  # never import torch just to report that there is no GPU
        if torch is None or not torch.cuda.is_available():
            return
        for i in range(torch.cuda.device_count()):
            self.gpu_memory.labels(f"cuda:{i}", "allocated").set(torch.cuda.memory_allocated(i))
            self.gpu_memory.labels(f"cuda:{i}", "reserved").set(torch.cuda.memory_reserved(i))
            self.gpu_memory.labels(f"cuda:{i}", "total").set(torch.cuda.get_device_properties(i).total_memory)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format and its content type, for /metrics."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.sample_gpu_memory()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def catalogue_markdown() -> str:
    """The README's metrics table: every lorad metric with its type, labels and help."""
    from prometheus_client.metrics import MetricWrapperBase

    m = LoradMetrics()
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for metric in vars(m).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        kind = metric._type  # prometheus_client keeps these on the object; stable since 0.4
        name = metric._name + {"counter": "_total", "info": "_info"}.get(kind, "")
        labels = ", ".join(metric._labelnames) or "-"
        rows.append(f"| `{name}` | {kind} | {labels} | {metric._documentation} |")
    return "\n".join(rows)
