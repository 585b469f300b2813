"""The serving engine's GPU paths: the Triton decode attention against a float32 reference, and whole greedy
generations with the kernel, compiled layers, grouped projections and CUDA graphs against the PyTorch path."""

from __future__ import annotations

import pytest

from gpu_common import GPU

pytestmark = GPU


# The launch shapes to check: each geometry's tuned one (kernels.tuning_for), and both loop bodies (CUDA cores,
# tensor cores) at other splits, blocks and warps.
TUNINGS = [None, {"dot": True, "early_v": True, "positions_per_split": 128, "block": 32, "num_warps": 2},
           {"dot": False, "early_v": True, "positions_per_split": 32, "block": 16, "num_warps": 2, "num_stages": 2}]


@pytest.mark.parametrize("cache_dtype", ["bfloat16", "float8_e4m3fn"])
@pytest.mark.parametrize("tuning", TUNINGS, ids=["tuned", "dot", "cuda-cores"])
@pytest.mark.parametrize("q_heads,kv_heads,dim", [(9, 3, 64), (8, 8, 128), (4, 1, 96)])
def test_decode_kernel_appends_and_attends_like_a_float32_reference(q_heads, kv_heads, dim, tuning, cache_dtype):
    """Also with a float8 cache (serve.kv_cache_dtype): the new key and value are stored rounded to float8, and the
    reference attends over the cache's float8 values widened to float32."""
    import torch

    from daemon.engine import kernels
    from daemon.engine.cache import stored

    assert kernels.available()
    torch.manual_seed(0)
    dtype = getattr(torch, cache_dtype)
    slots, context, rows, first = 8, 300, 5, 2
    k_cache = torch.randn(slots, kv_heads, context, dim, device="cuda", dtype=torch.bfloat16).to(dtype)
    v_cache = torch.randn(slots, kv_heads, context, dim, device="cuda", dtype=torch.bfloat16).to(dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    # [rows, T=1, heads, dim] transposed to [rows, heads, 1, dim]: the strided layout transformers passes
    query = torch.randn(rows, 1, q_heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    key = torch.randn(rows, 1, kv_heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    value = torch.randn(rows, 1, kv_heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    positions = torch.tensor([[0], [1], [17], [128], [299]], device="cuda")
    scale = dim ** -0.5
    out = kernels.decode_attention(query, key, value, k_cache, v_cache, positions, first, scale, tuning=tuning)
    assert out.shape == (rows, 1, q_heads, dim) and out.dtype == torch.bfloat16
    group = q_heads // kv_heads
    for r in range(rows):
        slot, p = first + r, int(positions[r])
        # the new token landed at its position (in the cache's dtype); nothing else in the cache changed
        torch.testing.assert_close(k_cache[slot, :, p].float(), key[r, :, 0].to(dtype).float())
        torch.testing.assert_close(v_cache[slot, :, p].float(), value[r, :, 0].to(dtype).float())
        changed = (stored(k_cache) != stored(k_before)).any(-1)
        assert int(changed.sum()) <= rows * kv_heads
        keys = k_cache[slot, :, :p + 1].float().repeat_interleave(group, 0)      # [Hq, p+1, D]
        values = v_cache[slot, :, :p + 1].float().repeat_interleave(group, 0)
        scores = (query[r, :, 0].float()[:, None, :] * keys).sum(-1) * scale    # [Hq, p+1]
        expected = (scores.softmax(-1)[:, :, None] * values).sum(1)              # [Hq, D]
        torch.testing.assert_close(out[r, 0].float(), expected, rtol=2e-2, atol=2e-2)
    untouched = [s for s in range(slots) if not first <= s < first + rows]
    assert torch.equal(stored(k_cache[untouched]), stored(k_before[untouched]))
    assert torch.equal(stored(v_cache[untouched]), stored(v_before[untouched]))


def test_engine_greedy_tokens_match_with_and_without_the_gpu_fast_paths(tmp_path):
    """bf16 engine on the GPU: the kernel + compiled layers + CUDA graphs give the PyTorch eager path's greedy
    tokens for base and adapter rows batched together (bf16 rounding may flip a late near-tie: compare prefixes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from daemon.engine import Engine, SamplingParams

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")

    def engine(**kw):
        model = LlamaForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).cuda().eval()
        e = Engine(model, None, max_batch_size=8, max_context=256, **kw).start()
        e.eos_ids = set()
        e.load_champion()
        return e

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (5, 40, 77, 120)]
    results = []
    blas_before = torch.backends.cuda.preferred_blas_library()
    for kw in ({"cuda_graphs": False, "compile": False, "decode_kernel": False},
               {"cuda_graphs": True, "compile": True, "decode_kernel": True}):
        e = engine(**kw)
        assert e.stepper.decode_kernel == kw["decode_kernel"]
        seen = []
        if not kw["compile"]:
            e.model.model.layers[0].register_forward_pre_hook(
                lambda m, a: seen.append(torch.backends.cuda.preferred_blas_library()))
        # the host reads step N while step N+1 runs: tokens come back through pinned buffers and events
        assert len(e._readback_buffers) == 4 and all(b.is_pinned() for b in e._readback_buffers)
        handles = [e.submit(p, params=SamplingParams(max_tokens=24, temperature=0)) for p in prompts]
        assert all(h.wait(120) for h in handles)
        results.append([h.tokens for h in handles])
        e.stop(timeout=10)
        # the engine's forwards prefer cuBLASLt (step.BLAS) and give the process its own choice back
        assert all(b == torch._C._BlasBackend.Cublaslt for b in seen) and (seen or kw["compile"])
        assert torch.backends.cuda.preferred_blas_library() == blas_before
    for slow, fast in zip(*results):
        assert len(slow) == len(fast) == 24
        agree = next((i for i, (a, b) in enumerate(zip(slow, fast)) if a != b), 24)
        assert agree >= 12, (slow, fast)


@pytest.mark.parametrize("rows,tokens,members,columns,n", [(32, 1, 1, 64, 4096), (5, 1, 3, 48, 200),
                                                          (3, 7, 2, 256, 1000), (1, 1, 1, 16, 64)])
def test_lora_b_kernel_matches_a_float32_reference_and_is_batch_invariant(rows, tokens, members, columns, n):
    """kernels.lora_b_add: y + (h * select) @ B for decode (T=1) and prefill rows (T>1), a projection group's
    repeated selection, a strided y (a slice of the joint product); a row alone gets the bits it gets in a batch."""
    import torch

    from daemon.engine import kernels, lora

    torch.manual_seed(0)
    slots, r_max = 4, columns // 4
    k = members * columns
    joint = torch.randn(rows, tokens, n + k + 8, device="cuda", dtype=torch.bfloat16)
    y, h = joint[..., :n], joint[..., n:n + k]  # strided views, as SlotLoRA passes them
    # a group's B is block-diagonal: member i's output columns read only its rows (splits: uneven on purpose,
    # so tiles straddle members); the kernel skips the zero blocks
    splits = [n - (members - 1) * (n // (members + 1))] + [n // (members + 1)] * (members - 1)
    lora_b = torch.zeros(k, n, device="cuda", dtype=torch.bfloat16)
    offset = 0
    for i, width in enumerate(splits):
        lora_b[i * columns:(i + 1) * columns, offset:offset + width] = torch.randn(columns, width) * 0.1
        offset += width
    index = torch.tensor([i % (slots + 1) for i in range(rows)], device="cuda")
    select = lora.selection(index, slots, r_max, torch.bfloat16)
    out = kernels.lora_b_add(y, h, select, lora_b, splits)
    every_row = kernels.lora_b_add(y, h, select, lora_b)
    if columns % kernels.LORA_B_TUNING["block_k"] == 0:  # the same chunks of K: skipping zero blocks changes no bit
        assert torch.equal(out, every_row)
    torch.testing.assert_close(out, every_row, rtol=1e-2, atol=1e-2)
    assert out.shape == (rows, tokens, n) and out.dtype == torch.bfloat16
    ref = y.float() + (h.float() * select.float().repeat(1, 1, members)) @ lora_b.float()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    assert torch.equal(out[index == 0], y[index == 0]), "rows without an adapter keep the base output exactly"
    alone = kernels.lora_b_add(y[-1:], h[-1:], select[-1:], lora_b, splits)
    assert torch.equal(alone[0], out[-1])
    # the PyTorch path lora.add_lora takes elsewhere agrees within bf16 rounding
    torch.testing.assert_close(lora.add_lora(y, h, select, lora_b, False).float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gpu_projection_layout_and_b_kernel_give_the_cpu_layouts_logits(arch):
    """On the GPU the joint tensors are stored transposed and padded and B goes through the Triton kernel. For rows
    on different slots, bf16 logits that way are as close to a float32 run of the row layout as the bf16 row layout
    with PyTorch's B product is (the kernel rounds once where PyTorch rounds twice)."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from daemon.engine import lora

    torch.manual_seed(0)
    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    model = (LlamaForCausalLM(LlamaConfig(**shape)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**shape)))
    model = model.to("cuda").eval()
    reference = model                                              # float32, row layout, PyTorch B product
    rows_bf16 = copy.deepcopy(model).to(torch.bfloat16)            # bf16, row layout, PyTorch B product
    fast_bf16 = copy.deepcopy(model).to(torch.bfloat16)            # bf16, the GPU defaults
    slots, r_max = 3, 16
    wrapped = {"ref": lora.wrap_linears(reference, slots=slots, r_max=r_max, transposed=False),
               "rows": lora.wrap_linears(rows_bf16, slots=slots, r_max=r_max, transposed=False),
               "fast": lora.wrap_linears(fast_bf16, slots=slots, r_max=r_max)}
    for name in ("ref", "rows"):
        for m in wrapped[name].values():
            m.kernel = False
            if m.group is not None:
                m.group.kernel = False
    assert all(m.transposed and m.kernel for m in wrapped["fast"].values())
    gen = torch.Generator().manual_seed(1)
    for slot in range(slots):
        weights = {name: (torch.randn(r_max, m.in_features, generator=gen) * 0.3,
                          torch.randn(r_max, m.out_features, generator=gen) * 0.3)
                   for name, m in wrapped["ref"].items()}
        for w in wrapped.values():
            lora.write_slot(w, slot, weights, r_max)
    ids = torch.randint(0, 128, (4, 6), generator=gen).cuda()
    rows_slot = torch.tensor([0, 1, 2, 3], device="cuda")
    outs = {}
    with torch.no_grad():
        for name, m in (("ref", reference), ("rows", rows_bf16), ("fast", fast_bf16)):
            lora.SELECTION.mask = lora.selection(rows_slot, slots, r_max, next(m.parameters()).dtype)
            try:
                outs[name] = m(input_ids=ids).logits.float()
            finally:
                lora.SELECTION.mask = None
        plain = reference(input_ids=ids).logits.float()
    err_rows = (outs["rows"] - outs["ref"]).abs().max()
    err_fast = (outs["fast"] - outs["ref"]).abs().max()
    assert err_fast <= 1.5 * err_rows + 1e-3, (err_fast, err_rows)
    assert (outs["ref"][1:] - plain[1:]).abs().max() > 10 * err_fast, "the adapters must change the output"
