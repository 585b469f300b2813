"""The micro-batch halving after an out-of-memory error, as CUDA raises it (``torch.OutOfMemoryError`` from the
loss of a micro-batch). A CPU cannot be made to raise that exception on cue (its allocator raises RuntimeError
under a real memory limit: tests/test_reliability_faults.py), so the exception is injected here; this tests the
retry logic, not a resource fault."""

from __future__ import annotations

import json

import pytest

from test_loop import config, write_data


def test_out_of_memory_in_training_retries_smaller_then_fails_cleanly(tmp_path, tiny_llama_dir, monkeypatch):
    import torch

    from pipelines import train as tr
    from pipelines.models import load_base_model
    from pipelines.train import loop   # train() looks the loss function up here

    cfg = config(tmp_path, tiny_llama_dir, train={"max_steps": 2, "micro_batch_size": 4})
    payloads = [json.loads(line) for line in write_data(tmp_path / "d.jsonl", 40, 5).read_text().splitlines()]
    model, tok = load_base_model(str(tiny_llama_dir), tmp_path / "cache", for_training=True)
    from pipelines.ingest import Normaliser

    norm = Normaliser(cfg.data)
    examples = tr.tokenize_payloads([norm(p).payload for p in payloads], tok, cfg.data.max_seq_len)
    real = tr.chunked_loss_sum
    seen: list[int] = []

    def fits_one_sequence(model, ids, *args, **kwargs):  # memory for one sequence at a time, as a small GPU
        seen.append(ids.shape[0])
        if ids.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(loop, "chunked_loss_sum", fits_one_sequence)
    out = tr.train(examples, run_dir=tmp_path / "run1", model=model, tokenizer=tok, cfg=cfg.train,
                   max_seq_len=cfg.data.max_seq_len, packing=False, progress=False)
    assert out.steps == 2 and out.micro_batch_splits == 4, out  # halved until one sequence per forward
    assert max(seen) > 1 and seen[-1] == 1

    def never_fits(model, ids, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(loop, "chunked_loss_sum", never_fits)
    model, tok = load_base_model(str(tiny_llama_dir), tmp_path / "cache", for_training=True)
    with pytest.raises(tr.TrainingError, match="out of GPU memory at step 0 even with micro-batches of 1"):
        tr.train(examples, run_dir=tmp_path / "run2", model=model, tokenizer=tok, cfg=cfg.train,
                 max_seq_len=cfg.data.max_seq_len, packing=False, progress=False)
    assert not (tmp_path / "run2" / "adapter").exists()
