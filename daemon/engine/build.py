"""The engine for a running daemon: built from its config, champion loaded, attached."""

from __future__ import annotations

from typing import Any

from daemon.engine.scheduler import Engine


def build_engine(daemon: Any) -> Any:
    """Build the engine for a running Daemon (model and tokenizer loaded), load the champion, attach it.

    Raises:
        AdapterUnavailable: the champion cannot be loaded. ``daemon.engine`` is set but not ready: inference
            answers 503 until ``/admin/reload`` (or a promotion) succeeds.
    """
    from pipelines.hardware import serve_prefill_autocast

    s = daemon.cfg.serve
    engine = Engine(daemon.model, daemon.tokenizer, store=daemon.store, state_dir=daemon.state_dir,
                    base_model=daemon.cfg.model.base_model, max_batch_size=s.max_batch_size, max_queue=s.max_queue,
                    request_timeout=s.request_timeout_seconds, metrics=daemon.metrics,
                    live=getattr(daemon, "live", None), batch_invariant=s.batch_invariant,
                    max_context=s.max_prompt_tokens + s.max_new_tokens, kv_cache_fraction=s.kv_cache_fraction,
                    kv_cache_tokens=s.kv_cache_tokens, adapter_slots=s.adapter_slots, lora_max_rank=s.lora_max_rank,
                    cuda_graphs=s.cuda_graphs, compile=s.compile, decode_kernel=s.decode_kernel,
                    lora_kernel=s.lora_kernel, kv_cache_dtype=s.kv_cache_dtype,
                    prefill_dtype=serve_prefill_autocast(daemon.model, s.cpu_prefill_dtype))
    listener = getattr(daemon, "_champion_changed", None)
    if listener is not None:
        engine.champion_listeners.append(listener)
    daemon.engine = engine.start()
    engine.load_champion()
    return engine
