"""One batched forward per step: the attention function over the slot cache, prefill, decode, graphs, sampling.

The model's own modules run unchanged; only attention is ours, registered through transformers'
``AttentionInterface``. For each layer it writes the step's keys and values into the cache at each
row's positions (one ``scatter_``) and attends over the first ``context`` positions of the rows' slots
with one SDPA call, the mask built once per forward from each row's positions. A decode step is a fixed
shape for a (batch bucket, context bucket) pair, so on a GPU each pair is captured once as a CUDA graph
and replayed; adapters change only tensor contents (lora.py), never the graph.

Sampling runs on the device (greedy argmax in the graph; temperature / top-p by inverse CDF on one
uniform number per row, drawn on the CPU from the row's own generator when it has a seed): only token
ids and a per-row "finite" flag come back to the host. A row whose logits are not finite ends alone.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from daemon.engine import lora as lora_mod
from daemon.engine.cache import KVCache, LayerShape, bucket, stored
from daemon.engine.model_prep import weights_dtype

log = logging.getLogger("lorad.engine")

ATTN_IMPLEMENTATION = "lorad_engine"
# Temperatures below this sample like greedy decoding: dividing logits by them overflows float32.
MIN_TEMPERATURE = 1e-4
# The BLAS library of the engine's forwards on CUDA (torch.backends.cuda.preferred_blas_library, set for each
# forward and restored after it, so the rest of the process keeps its own; a captured graph keeps the kernels of
# its capture): cuBLASLt streams the 7B down projection at decode shapes with a split-K kernel cuBLAS does not
# pick (33.8 against 36.5 us on an H100, bench/results/profile_linears_7b_h100.json) and equals it elsewhere.
# None: the process's choice (bench/serve_speed.py --blas default compares).
BLAS: str | None = "cublaslt"


class _Plan:
    """What the attention function needs during one engine forward (only the decode thread runs them)."""

    cache: KVCache | None = None
    start = 0  # first cache slot of the forward's rows (decode: rows are slots start..start+rows-1)
    slots: Any = None  # [rows] cache slot of each row (prefill), instead of the contiguous range
    rows = 0
    context = 0  # positions attended (a bucket)
    positions: Any = None  # [rows, T] cache position of each new token
    mask: Any = None  # [rows, 1, T, context] True where a query may attend
    bias: Any = None  # decode: [rows, context] 0 where a row may attend, -inf elsewhere
    probe: dict | None = None  # layer index -> LayerShape, filled by a probing forward
    kernel = False  # decode: the Triton kernel appends and attends (kernels.py); no mask, bias or scatter
    length: int | None = None  # a one-row decode on a CPU: the positions it attends (0..length-1), no mask


PLAN = _Plan()


def engine_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                     scaling: float | None = None, dropout: float = 0.0, **kwargs: Any):
    """Attention over the slot cache during engine forwards; plain SDPA for any other caller."""
    import torch
    import torch.nn.functional as F

    plan = PLAN
    if plan.probe is not None:
        plan.probe[module.layer_idx] = LayerShape(key.shape[1], key.shape[-1], value.shape[-1],
                                                  kwargs.get("sliding_window"))
    if plan.cache is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    layer = module.layer_idx
    if plan.kernel:
        from daemon.engine import kernels

        return kernels.decode_attention(query, key, value, plan.cache.keys[layer], plan.cache.values[layer],
                                        plan.positions, plan.start,
                                        scaling if scaling is not None else query.shape[-1] ** -0.5), None
    window = kwargs.get("sliding_window")
    one = plan.length is not None and not window
    if plan.slots is None and one:
        # one row on a CPU: write its position by slicing (3 against 25 us a scatter) and attend to exactly its
        # positions, which needs no mask (SDPA's unmasked kernel, bf16, 9 query heads: 57 against 102 us a layer at
        # 65 of 128 positions, 349 against 590 at 600 of 1024)
        rows, at = slice(plan.start, plan.start + 1), slice(plan.length - 1, plan.length)
        k_cache, v_cache = plan.cache.keys[layer][rows], plan.cache.values[layer][rows]
        k_cache[:, :, at].copy_(key)
        v_cache[:, :, at].copy_(value)
        keys, values = k_cache[:, :, :plan.length], v_cache[:, :, :plan.length]
    elif plan.slots is None:  # decode: the running rows are one contiguous block of slots
        rows = slice(plan.start, plan.start + plan.rows)
        k_cache, v_cache = plan.cache.keys[layer][rows], plan.cache.values[layer][rows]
        index = plan.positions[:, None, :, None]  # [rows, 1, T, 1] -> broadcast over heads and dims
        stored(k_cache).scatter_(2, index.expand(-1, key.shape[1], -1, key.shape[-1]),
                                 stored(key.to(k_cache.dtype)))
        stored(v_cache).scatter_(2, index.expand(-1, value.shape[1], -1, value.shape[-1]),
                                 stored(value.to(v_cache.dtype)))
        keys, values = k_cache[:, :, :plan.context], v_cache[:, :, :plan.context]
    else:  # prefill: rows name their slots (a captured prefill serves any first slot)
        k_full, v_full = plan.cache.keys[layer], plan.cache.values[layer]
        heads = torch.arange(key.shape[1], device=key.device)
        where = (plan.slots[:, None, None], heads[None, :, None], plan.positions[:, None, :])
        stored(k_full).index_put_(where, stored(key.to(k_full.dtype)))
        stored(v_full).index_put_(where, stored(value.to(v_full.dtype)))
        keys, values = k_full[plan.slots, :, :plan.context], v_full[plan.slots, :, :plan.context]
    if keys.dtype != query.dtype:  # a float8 cache: attend in the model's dtype
        keys, values = keys.to(query.dtype), values.to(query.dtype)
    if one:
        out = F.scaled_dot_product_attention(query, keys, values, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    mask = plan.mask
    if window:
        k_pos = torch.arange(plan.context, device=query.device)
        mask = mask & (k_pos > plan.positions[:, None, :, None] - window)
    elif query.shape[2] == 1 and plan.bias is not None:
        if query.is_cuda:  # a decode step: few fused kernels instead of SDPA's
            return DECODE_ATTENTION.fn(query, keys, values, plan.bias, scaling if scaling is not None else
                                       query.shape[-1] ** -0.5), None
        # a CPU runs SDPA's one kernel with the additive mask faster than the separate products and softmax
        # (one row at 128 positions: 31 against 40 us a layer; 8 rows at 512: 260 against 288)
        mask = plan.bias[:, None, None, :]
        if query.dtype != torch.float32 and query.shape[0] > 1:
            # CPU SDPA over several bf16 rows is 3-6x slower than over float32 copies of them (8 rows at 128
            # positions: 543 against 161 us a layer; one row: 80 against 108, so one row stays in bf16)
            out = F.scaled_dot_product_attention(query.float(), keys.float(), values.float(), attn_mask=mask.float(),
                                                 scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
            return out.to(query.dtype).transpose(1, 2).contiguous(), None
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def decode_attention(query: Any, keys: Any, values: Any, bias: Any, scaling: float) -> Any:
    """One new token per row: query [B, Hq, 1, D] against keys/values [B, Hkv, L, D]; bias [B, L] is 0 where a
    row may attend and -inf elsewhere. Grouped heads share their KV head without copying it (GQA)."""
    import torch

    batch, q_heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    q = query.reshape(batch, kv_heads, q_heads // kv_heads, dim)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scaling + bias[:, None, None, :]
    out = torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)  # [B, Hkv, G, Dv]
    return out.reshape(batch, 1, q_heads, values.shape[-1])


class _DecodeAttention:
    """The decode attention in use: eager, or compiled once (dynamic shapes) on a GPU."""

    fn = staticmethod(decode_attention)


DECODE_ATTENTION = _DecodeAttention()


def register_attention() -> None:
    import torch
    from transformers import AttentionInterface

    # No mask function is registered: transformers then builds no mask for engine forwards (ours is built
    # from the rows' positions), and the fallback above uses SDPA's causal path for other callers.
    # Compiled layers break their graph here: the cache lookup by layer index would otherwise specialise
    # (and recompile) every layer; inside a CUDA graph the break costs nothing.
    AttentionInterface.register(ATTN_IMPLEMENTATION, torch._dynamo.disable(engine_attention))


def compile_layers(model: Any) -> int:
    """torch.compile each decoder layer in place (regional compilation: identical layers share the compiled
    code, dynamic shapes cover every bucket); returns the number of layers compiled. GPU only: inductor fuses
    the norms, rotary embedding, activations and LoRA products into few kernels, so a captured step launches
    far fewer of them."""
    import torch

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    layers = [m for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and
              name.endswith("layers")]
    if not layers:
        return 0
    for layer in layers[0]:
        layer.compile(dynamic=True)
    DECODE_ATTENTION.fn = torch.compile(decode_attention, dynamic=True)
    return len(layers[0])


def compilations() -> int:
    """Graphs torch.compile has built in this process (dynamo's own counter)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"].get("unique_graphs", 0))


def probe_layers(model: Any, device: Any) -> dict[int, LayerShape]:
    """Run one token through the model to learn each attention layer's KV shape (heads, key and value dims)."""
    import torch

    PLAN.probe = {}
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
        shapes = dict(PLAN.probe)
    finally:
        PLAN.probe = None
    if not shapes:
        raise RuntimeError(f"{type(model).__name__} ran no attention through AttentionInterface; the engine "
                           "cannot keep its KV cache")
    return shapes


class Stepper:
    """Runs prefill and decode forwards over the cache, with CUDA graphs for decode on a GPU.

    Args:
        model: the causal LM (its Linears already wrapped by lora.wrap_linears).
        cache: the KV cache.
        lora_slots / r_max: the LoRA table geometry.
        use_graphs: capture decode steps as CUDA graphs (GPU only).
        compile: torch.compile the decoder layers first (GPU only).
        decode_kernel: decode attention through the Triton kernel of ``kernels.py`` (GPU with Triton, no sliding
            window): each row reads only its own positions, so one decode graph per batch bucket serves every
            context.
        on_capture: called with the seconds each capture took (metrics).
    """

    def __init__(self, model: Any, cache: KVCache, *, lora_slots: int, r_max: int, use_graphs: bool,
                 compile: bool = False, decode_kernel: bool = True,
                 on_capture: Callable[[float], None] | None = None):
        import torch

        from daemon.engine import kernels

        self.model, self.cache = model, cache
        self.lora_slots, self.r_max = lora_slots, r_max
        self.device = cache.keys[next(iter(cache.keys))].device
        # the LoRA selection's dtype: the model's (the cache's may be float8)
        self.dtype = weights_dtype(model)
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.on_capture = on_capture
        s = cache.slots
        with torch.no_grad():
            self.ids = torch.zeros(s, 1, dtype=torch.long, device=self.device)
            self.positions = torch.zeros(s, 1, dtype=torch.long, device=self.device)
            self.lora_index = torch.zeros(s, dtype=torch.long, device=self.device)
        self.compiled = compile_layers(model) if compile and self.device.type == "cuda" else 0
        self.decode_kernel = (decode_kernel and self.device.type == "cuda" and kernels.available() and
                              not any(shape.sliding_window for shape in cache.layers.values()))
        self.graphs: dict[tuple, tuple[Any, tuple]] = {}
        # Prompts up to this many tokens (padded to a power of two) prefill through captured graphs too.
        self.prefill_graph_tokens = min(512, cache.context)
        self.prefill_widths = [w for w in cache.context_buckets if w <= self.prefill_graph_tokens] or [cache.context]
        self._prefill_buffers: dict[tuple[int, int], tuple] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.captures = 0

    # -- forwards -----------------------------------------------------------------------------

    def _forward(self, ids: Any, positions: Any, lora_index: Any, start: int, context: int,
                 slots: Any = None) -> tuple:
        """Model forward over rows in slots [start, start + len(ids)) (or ``slots``); returns
        (logits [rows, V] fp32, greedy tokens, finite flags)."""
        import torch

        k_pos = torch.arange(context, device=ids.device)
        PLAN.cache, PLAN.start, PLAN.rows, PLAN.context, PLAN.slots = self.cache, start, ids.shape[0], context, slots
        PLAN.positions = positions
        PLAN.kernel = self.decode_kernel and ids.shape[1] == 1 and slots is None
        PLAN.length = (int(positions[0, 0]) + 1 if ids.shape == (1, 1) and slots is None and not ids.is_cuda
                       else None)
        if not PLAN.kernel:
            PLAN.mask = k_pos[None, None, None, :] <= positions[:, None, :, None]
        if ids.shape[1] == 1 and not PLAN.kernel and PLAN.length is None:   # (a lone CPU row attends unmasked)
            # float32 for the GPU's decode attention, the model's dtype for SDPA on a CPU (see engine_attention)
            PLAN.bias = torch.zeros(PLAN.mask.shape[0], context, device=ids.device,
                                    dtype=torch.float32 if ids.is_cuda else self.dtype).masked_fill_(
                ~PLAN.mask[:, 0, 0, :], float("-inf"))
        if self.use_graphs or bool(lora_index.any()):
            lora_mod.SELECTION.mask = lora_mod.selection(lora_index, self.lora_slots, self.r_max, self.dtype)
        # else: eager, and no row uses an adapter: skip the LoRA products (a graph always runs them)
        blas = torch.backends.cuda.preferred_blas_library() if BLAS and ids.is_cuda else None
        try:
            if blas is not None:
                torch.backends.cuda.preferred_blas_library(BLAS)
            out = self.model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1)
        finally:
            if blas is not None:
                torch.backends.cuda.preferred_blas_library(blas)
            PLAN.cache = PLAN.positions = PLAN.mask = PLAN.slots = PLAN.bias = None
            PLAN.kernel = False
            lora_mod.SELECTION.mask = None
        logits = out.logits[:, -1].float()
        return logits, logits.argmax(-1), logits.isfinite().all(-1)

    def prefill(self, chunks: list[tuple[list[int], int, int]], start: int) -> tuple:
        """Prefill one chunk per row, rows in slots [start, start + len(chunks)).

        Args:
            chunks: ``(token ids, first position, lora index)`` per row; rows are left-padded to one length so
                that every row's last token is the last column (pads write to the last cache position, which
                no real token attends to before it is overwritten).
        Returns:
            (logits, greedy tokens, finite flags) of each row's last token, on the device.
        """
        import torch

        n = len(chunks)
        width = max(len(ids) for ids, _, _ in chunks)
        end = max(first + len(ids) for ids, first, _ in chunks)
        graphed = (self.use_graphs and end == width and width <= self.prefill_graph_tokens)
        if graphed:  # first chunks: one captured forward per (rows, width) bucket
            width = bucket(width, self.prefill_widths)
            rows = bucket(n, self.cache.batch_buckets)
        else:
            rows = n
        context = bucket(max(end, width), self.cache.context_buckets)
        pad = self.cache.context - 1
        ids_rows, pos_rows = [], []
        for ids, first, _ in chunks:
            k = width - len(ids)
            ids_rows.append([0] * k + list(ids))
            pos_rows.append([pad] * k + list(range(first, first + len(ids))))
        for _ in range(rows - n):  # padding rows: pads only, in the first row's slot at the last position
            ids_rows.append([0] * width)
            pos_rows.append([pad] * width)
        slots = [start + i for i in range(n)] + [start] * (rows - n)
        lora = [lo for _, _, lo in chunks] + [0] * (rows - n)
        with torch.no_grad():
            if not graphed:
                return self._forward(torch.tensor(ids_rows, device=self.device),
                                     torch.tensor(pos_rows, device=self.device),
                                     torch.tensor(lora, device=self.device), 0, context,
                                     slots=torch.tensor(slots, device=self.device))
            inputs = self._prefill_inputs(rows, width)
            for buf, host in zip(inputs, (ids_rows, pos_rows, slots, lora)):
                buf.copy_(torch.tensor(host), non_blocking=True)
            out = self._replay(("prefill", rows, width, context))
        return tuple(t[:n] for t in out)

    def _prefill_inputs(self, rows: int, width: int) -> tuple:
        import torch

        key = (rows, width)
        if key not in self._prefill_buffers:
            with torch.no_grad():
                self._prefill_buffers[key] = (
                    torch.zeros(rows, width, dtype=torch.long, device=self.device),
                    torch.full((rows, width), self.cache.context - 1, dtype=torch.long, device=self.device),
                    torch.zeros(rows, dtype=torch.long, device=self.device),
                    torch.zeros(rows, dtype=torch.long, device=self.device))
        return self._prefill_buffers[key]

    def decode(self, tokens: list[int], positions: list[int], lora_index: list[int], *, batch: int | None = None,
               context: int | None = None) -> tuple:
        """One decode step for rows in slots [0, len(tokens)) from host inputs: each row's token at its position
        (the engine keeps its inputs on the device and calls ``launch_decode``; benchmarks time this).

        Args:
            batch / context: fixed shapes (batch invariance); by default the smallest buckets that fit.
        """
        import torch

        self.admit_rows(0, torch.tensor(tokens, dtype=torch.long, device=self.device), positions, lora_index)
        return self.launch_decode(len(tokens), max(positions) + 1, batch=batch, context=context)

    def launch_decode(self, n: int, positions: int, *, batch: int | None = None, context: int | None = None) -> tuple:
        """One decode step for rows in slots [0, n) from the inputs already on the device (``advance``,
        ``admit_rows`` and ``move_row`` keep them), so the host need not know the previous step's tokens yet.

        Args:
            positions: the largest position a row holds, plus one (picks the context bucket).
            batch / context: fixed shapes (batch invariance); by default the smallest buckets that fit.
        Returns:
            (logits, greedy tokens, finite flags) on the device, rows [0, n).
        """
        import torch

        batch = batch or bucket(n, self.cache.batch_buckets)
        context = context or self._decode_context(positions)
        with torch.no_grad():
            if batch > n:  # padding rows decode in free slots at position 0; their output is dropped
                self.positions[n:batch].zero_()
            key = ("decode", batch, 1, context)
            out = self._replay(key) if self.use_graphs else self._body(key)
        return tuple(t[:n] for t in out)

    def advance(self, tokens: Any, n: int) -> None:
        """After a decode step of rows [0, n): each row's chosen token is its next input, one position on."""
        import torch

        with torch.no_grad():
            self.ids[:n, 0].copy_(tokens)
            self.positions[:n] += 1

    def admit_rows(self, start: int, tokens: Any, positions: list[int], lora_index: list[int]) -> None:
        """Rows just prefilled into slots [start, start + k): their first tokens (on the device), positions, slots."""
        import torch

        k = len(positions)
        host = torch.tensor([positions, lora_index], dtype=torch.long)
        with torch.no_grad():
            self.ids[start:start + k, 0].copy_(tokens)
            self.positions[start:start + k, 0].copy_(host[0], non_blocking=True)
            self.lora_index[start:start + k].copy_(host[1], non_blocking=True)

    def move_row(self, src: int, dst: int) -> None:
        """A row moved from slot ``src`` to ``dst`` (compaction): its device-side inputs move with it."""
        import torch

        with torch.no_grad():
            for t in (self.ids, self.positions, self.lora_index):
                t[dst].copy_(t[src])

    def _decode_context(self, positions: int) -> int:
        """The context bucket a decode step of rows holding up to ``positions`` runs at (the kernel: one for all)."""
        return self.cache.context if self.decode_kernel else bucket(positions, self.cache.context_buckets)

    def _body(self, key: tuple) -> tuple:
        """The forward a graph captures: ``("decode", rows, 1, context)`` or ``("prefill", rows, width, context)``."""
        kind, rows, width, context = key
        if kind == "decode":
            return self._forward(self.ids[:rows], self.positions[:rows], self.lora_index[:rows], 0, context)
        ids, positions, slots, lora = self._prefill_inputs(rows, width)
        return self._forward(ids, positions, lora, 0, context, slots=slots)

    # -- CUDA graphs ---------------------------------------------------------------------------

    def _replay(self, key: tuple) -> tuple:
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.capture(key)
        graph, outputs = entry
        graph.replay()
        return outputs

    def capture(self, key: tuple) -> tuple:
        """Capture one forward (see ``_body``) as a CUDA graph; the static buffers are its inputs."""
        import torch

        t0 = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside capture: lazy inits (cuBLAS handles, kernels) happen here
                self._body(key)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            outputs = self._body(key)
        self.graphs[key] = (graph, outputs)
        self.captures += 1
        if self.on_capture is not None:
            self.on_capture(time.perf_counter() - t0)
        return graph, outputs

    def warm_up(self, max_context: int | None = None, batches: list[int] | None = None) -> int:
        """Capture decode steps for every (batch, context) bucket up to ``max_context``, and first-chunk prefills
        for every (rows, width) bucket, now: serving never pauses to capture."""
        if not self.use_graphs:
            return 0
        before = self.captures
        limit = max_context or self.cache.context
        contexts = [c for c in self.cache.context_buckets if c <= limit] or self.cache.context_buckets[:1]
        if self.decode_kernel:
            contexts = [self.cache.context]
        for batch in batches or self.cache.batch_buckets:
            for context in contexts:
                if ("decode", batch, 1, context) not in self.graphs:
                    self.capture(("decode", batch, 1, context))
        for rows in self.cache.batch_buckets:
            for width in self.prefill_widths:
                key = ("prefill", rows, width, bucket(width, self.cache.context_buckets))
                if key not in self.graphs:
                    self.capture(key)
        return self.captures - before


def sample(logits: Any, greedy: Any, temperature: list[float], top_p: list[float], uniform: list[float]) -> Any:
    """Per-row tokens on the device: greedy where temperature < MIN_TEMPERATURE, else temperature + top-p.

    Sampling is the inverse CDF of the kept probabilities at ``uniform[row]``, so a row's choice depends on its
    own number only (reproducible with a seed). Never produces NaN for finite logits: the top token is always
    kept and the scaled logits are shifted so the largest is 0.
    """
    import torch

    temps = torch.tensor(temperature, dtype=torch.float32)
    sampled = temps >= MIN_TEMPERATURE
    if not bool(sampled.any()):
        return greedy
    device = logits.device
    temps_d = temps.clamp(min=MIN_TEMPERATURE).to(device, non_blocking=True)
    top_p_d = torch.tensor(top_p, dtype=torch.float32).to(device, non_blocking=True)
    u = torch.tensor(uniform, dtype=torch.float32).to(device, non_blocking=True)
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / temps_d[:, None]
    probs = torch.softmax(scaled, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    kept = torch.where(cumulative - sorted_probs < top_p_d[:, None], sorted_probs, torch.zeros_like(sorted_probs))
    kept_cum = kept.cumsum(dim=-1)
    target = u * kept_cum[:, -1]
    index = (kept_cum < target[:, None]).sum(dim=-1).clamp(max=logits.shape[-1] - 1)
    drawn = order.gather(1, index[:, None])[:, 0]
    return torch.where(sampled.to(device), drawn, greedy)
