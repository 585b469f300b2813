"""Per-row LoRA: every adapter slot's A and B stacked in one table per layer; each row picks its slot.

``SlotLoRA`` wraps one Linear. Its tables are ``A [slots * r_max, in]`` and ``B [slots * r_max, out]``
(the adapter's scale folded into B, ranks below ``r_max`` zero-padded). A forward computes
``base(x) + ((x @ A^T) * select) @ B`` where ``select [rows, 1, slots * r_max]`` is 1 on the columns of the
row's slot and 0 elsewhere (row index 0 = no adapter = the base model): every version in the batch in
two small matmuls, fixed shapes, so the step can be captured once as a CUDA graph. Loading a version is
a copy into its slot's columns: no module changes, no recompilation, no new capture.

Punica and S-LoRA gather each row's A and B (BGMV); the masked dense product reads every slot once
instead of once per row, which is cheaper while slots are few (a handful of versions live at a time).

Sibling Linears that read the same input (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``) are
grouped as vLLM's merged QKV and gate-up layers are: one tensor holds every member's weight and A table, one
block-diagonal table holds their B, and the first member's call computes the whole group in one matmul
for the base outputs and A products and one for the B products; the other members return their slices.
A step then launches a third of the projection kernels. A member called with another input (or before the
first) computes alone from views of the same tensors, so grouping never changes a result.

On a GPU the joint tensor is stored transposed, ``[in, out + columns]`` with the columns padded to a multiple of
128: at decode shapes cuBLAS streams that layout faster (7B shape, one H100, 32 rows: 155 against 162 µs of
projection matmuls per layer, ``bench/results/profile_step_7b_h100.json`` at 5ee7bc0 and at 4afef28;
``bench/serve_speed.py --part 7b --joint-layout rows`` measures the engine both ways). Elsewhere it is
``[out + columns, in]``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class _Selection:
    """The current forward's ``select`` tensor (set by the step, read by every SlotLoRA)."""

    mask: Any = None


SELECTION = _Selection()


# Sibling projections a decoder layer calls on the same input, in call order (Llama, Qwen2, Mistral, DeepSeek
# dense layers; Phi-3 and GPT-style models already hold them merged and have no such siblings).
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


PAD = 128  # the transposed joint tensor's width is a multiple of this
# The joint tensors' layout on a GPU: transposed (bench/serve_speed.py --joint-layout rows turns it off to compare),
# but for the Linears named here, which keep the row layout (bench/serve_speed.py --rows-leaves).
GPU_TRANSPOSED = True
GPU_ROWS_LEAVES: tuple[str, ...] = ()


def add_lora(y: Any, h: Any, select: Any, lora_b: Any, kernel: bool, splits: list[int] | None = None) -> Any:
    """``y + (h * select) @ lora_b``; ``select`` repeats over ``h``'s columns (one block per group member;
    ``splits``: the members' output widths, for the kernel to skip the zero blocks)."""
    if kernel:
        from daemon.engine import kernels

        return kernels.lora_b_add(y, h, select, lora_b, splits)
    repeat = h.shape[-1] // select.shape[-1]
    if repeat > 1:
        select = select.repeat(1, 1, repeat)
    return y + ((h * select) @ lora_b).to(y.dtype)


def joint_tensor(rows: int, in_features: int, *, transposed: bool, dtype: Any, device: Any) -> Any:
    """Zeros for ``rows`` joint rows (weights, then A tables): ``[in, rows rounded up to PAD]`` when transposed,
    else ``[rows, in]``."""
    import torch

    if transposed:
        return torch.zeros(in_features, -(-rows // PAD) * PAD, dtype=dtype, device=device)
    return torch.zeros(rows, in_features, dtype=dtype, device=device)


def joint_rows(joint: Any, transposed: bool, start: int, stop: int) -> Any:
    """Rows ``[start, stop)`` of a joint tensor as a Linear weight ``[stop - start, in]`` (a view)."""
    return joint[:, start:stop].t() if transposed else joint[start:stop]


def joint_product(x: Any, joint: Any, transposed: bool) -> Any:
    """``x`` times every row of the joint tensor: ``[..., width]`` (padding columns included, all zero)."""
    import torch.nn.functional as F

    return x @ joint if transposed else F.linear(x, joint)


def joint_shape(joint: Any, transposed: bool) -> tuple[int, int]:
    """(rows incl. padding, in) of a joint tensor."""
    return (joint.shape[1], joint.shape[0]) if transposed else (joint.shape[0], joint.shape[1])


class AdapterFormatError(ValueError):
    """An adapter the slot tables cannot hold; the message says what and why."""


def _slot_lora_class():
    import torch
    import torch.nn.functional as F

    class SlotLoRA(torch.nn.Module):
        """A Linear plus per-row LoRA from stacked slot tables (see the module docstring).

        Where the Linear holds a plain floating-point weight, its weight and the A table are one tensor
        ``[out + slots * r_max, in]`` (the weight a view of its first rows): one matmul gives the base output
        and every slot's ``x @ A`` together, which halves the matmuls a step launches.
        """

        def __init__(self, base: Any, slots: int, r_max: int, transposed: bool = False):
            super().__init__()
            self.base = base
            self.in_features, self.out_features = base.in_features, base.out_features
            weight = base.weight
            self.fused = type(base) is torch.nn.Linear and weight.dtype.is_floating_point
            self.transposed = transposed and self.fused
            self.kernel = False  # y + (h * select) @ B by kernels.lora_b_add (set by wrap_linears)
            dtype = weight.dtype if weight.dtype.is_floating_point else torch.bfloat16
            columns = slots * r_max
            out = self.out_features
            with torch.no_grad():
                if self.fused:
                    joint = joint_tensor(out + columns, self.in_features, transposed=self.transposed, dtype=dtype,
                                         device=weight.device)
                    weight_rows = joint_rows(joint, self.transposed, 0, out)
                    weight_rows.copy_(weight)
                    base.weight = torch.nn.Parameter(weight_rows, requires_grad=False)
                    self.register_buffer("joint", joint, persistent=False)
                    lora_a = joint_rows(joint, self.transposed, out, out + columns)
                else:
                    self.register_buffer("joint", None, persistent=False)
                    lora_a = torch.zeros(columns, self.in_features, dtype=dtype, device=weight.device)
            self.register_buffer("lora_a", lora_a, persistent=False)  # [slots * r_max, in]: A per slot
            self.register_buffer("lora_b", torch.zeros(columns, self.out_features, dtype=dtype,
                                                       device=weight.device), persistent=False)

        group: Any = None  # the _Group this Linear belongs to (set by group_linears), or None
        member = 0  # its index in the group

        @property
        def weight(self):  # code that inspects the wrapped Linear (dtype, device) keeps working
            return self.base.weight

        def forward(self, x):
            group = self.group
            if group is not None:
                if self.member == 0:
                    outs = group.forward(x, SELECTION.mask)
                    group.pending = (x, outs)
                    return outs[0]
                pending = group.pending
                if pending is not None and pending[0] is x:
                    if self.member == len(group.members) - 1:
                        group.pending = None
                    return pending[1][self.member]
            select = SELECTION.mask
            if select is None:
                return self.base(x)
            if self.joint is not None:
                out = self.out_features
                joint = joint_product(x, self.joint, self.transposed)
                y, h = joint[..., :out], joint[..., out:out + self.lora_a.shape[0]]
                if self.base.bias is not None:
                    y = y + self.base.bias
            else:
                y = self.base(x)
                h = F.linear(x.to(self.lora_a.dtype), self.lora_a)
            return add_lora(y, h, select, self.lora_b, self.kernel)

    return SlotLoRA


class _Group:
    """Sibling SlotLoRAs on one input: one joint ``[sum(out) + n * columns, in]`` tensor (every member's weight,
    then every member's A table) and one block-diagonal B ``[n * columns, sum(out)]``."""

    def __init__(self, members: list[Any]):
        import torch

        self.members = members
        self.pending: Any = None  # (input, outputs) between the first member's call and the last's
        first = members[0]
        outs = [m.out_features for m in members]
        columns = first.lora_a.shape[0]
        total = sum(outs)
        self.total_out, self.columns = total, columns
        self.transposed = t = first.transposed
        self.kernel = first.kernel
        dtype, device = first.joint.dtype, first.joint.device
        with torch.no_grad():
            joint = joint_tensor(total + len(members) * columns, first.in_features, transposed=t, dtype=dtype,
                                 device=device)
            lora_b = torch.zeros(len(members) * columns, total, dtype=dtype, device=device)
            offset = 0
            for i, (m, out) in enumerate(zip(members, outs)):
                joint_rows(joint, t, offset, offset + out).copy_(m.base.weight)
                a_rows = joint_rows(joint, t, total + i * columns, total + (i + 1) * columns)
                a_rows.copy_(m.lora_a)
                block = lora_b[i * columns:(i + 1) * columns, offset:offset + out]
                block.copy_(m.lora_b)
                # The member's own tensors become views of the group's: adapters written into a member's
                # slot land in the group's tables, and a member computing alone reads the same numbers.
                m.base.weight = torch.nn.Parameter(joint_rows(joint, t, offset, offset + out), requires_grad=False)
                m.joint = None
                m.lora_a = a_rows
                m.lora_b = block
                m.group, m.member = self, i
                offset += out
            biases = [m.base.bias for m in members]
            self.bias = torch.cat([b.to(dtype) for b in biases]) if all(b is not None for b in biases) else None
            if any(b is not None for b in biases) and self.bias is None:
                raise ValueError("a projection group mixes Linears with and without bias")
        self.joint, self.lora_b = joint, lora_b
        self.splits = outs

    def forward(self, x: Any, select: Any) -> tuple:
        """Every member's output for input ``x`` (``select``: the rows' slot columns, or None for no adapter)."""
        import torch.nn.functional as F

        total = self.total_out
        if select is None:
            y = F.linear(x, joint_rows(self.joint, self.transposed, 0, total), self.bias)
        else:
            both = joint_product(x, self.joint, self.transposed)
            y, h = both[..., :total], both[..., total:total + len(self.members) * self.columns]
            if self.bias is not None:
                y = y + self.bias
            y = add_lora(y, h, select, self.lora_b, self.kernel, self.splits)
        return tuple(y.split(self.splits, dim=-1))


def group_linears(model: Any, wrapped: dict[str, Any]) -> int:
    """Group sibling projections that read the same input (``GROUPS``); returns the number of groups made.

    Only fused SlotLoRAs (plain floating-point Linears) of one parent with one input size, dtype and device group.
    """
    made = 0
    by_name = dict(wrapped)
    parents = {name.rpartition(".")[0] for name in wrapped}
    for parent in sorted(parents):
        for names in GROUPS:
            members = [by_name.get(f"{parent}.{leaf}" if parent else leaf) for leaf in names]
            if any(m is None or not m.fused or m.group is not None for m in members):
                continue
            if len({(m.in_features, m.joint.dtype, m.joint.device, m.base.bias is None, m.transposed, m.kernel)
                    for m in members}) != 1:
                continue
            _Group(members)
            made += 1
    return made


def wrap_linears(model: Any, *, slots: int, r_max: int, group: bool = True,
                 transposed: bool | None = None, kernel: bool = True) -> dict[str, Any]:
    """Replace every Linear inside the model's layers (not the output head) by a SlotLoRA; return them by name.

    ``group``: merge sibling projections on one input (see ``group_linears``). ``transposed``: store the joint
    tensors ``[in, out + columns]`` (default: ``GPU_TRANSPOSED`` where the Linear's weight is on a GPU; see the
    module docstring). ``kernel``: on a GPU with Triton, bf16/fp16 fused Linears add their B product through
    ``kernels.lora_b_add`` (``serve.lora_kernel``).
    """
    import torch

    from daemon.engine import kernels

    cls = _slot_lora_class()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head and ".layers." in f".{name}"]
    wrapped = {}
    for name, module in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        on_gpu = module.weight.device.type == "cuda"
        t = (on_gpu and GPU_TRANSPOSED and leaf not in GPU_ROWS_LEAVES) if transposed is None else transposed
        lora = cls(module, slots, r_max, t)
        half = module.weight.dtype in (torch.bfloat16, torch.float16)
        lora.kernel = kernel and on_gpu and lora.fused and half and kernels.available()
        if lora.kernel:
            kernels.register_lora_b()  # here, not first inside a compiled layer
        setattr(parent, leaf, lora)
        wrapped[name] = lora
    if group:
        group_linears(model, wrapped)
    return wrapped


def read_adapter(path: Path, wrapped: dict[str, Any], r_max: int) -> dict[str, tuple[Any, Any]]:
    """Read a PEFT LoRA adapter folder into ``{module name: (A [r, in], scaled B^T [r, out])}`` (CPU tensors).

    Raises:
        AdapterFormatError: a feature the slot tables cannot hold (DoRA, LoRA bias, modules_to_save, rank
            above ``r_max``, a target that is not a wrapped Linear, shapes that do not match, non-finite values).
    """
    from safetensors.torch import load_file

    config = json.loads((path / "adapter_config.json").read_text())
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; only LORA adapters can be served")
    if config.get("use_dora"):
        problems.append("DoRA (use_dora) adapters are not supported by the serving engine; train without DoRA")
    if config.get("lora_bias"):
        problems.append("lora_bias adapters are not supported by the serving engine")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} cannot be served per row; train without it")
    if problems:
        raise AdapterFormatError("; ".join(problems))
    alpha_default, alpha_pattern = float(config.get("lora_alpha", 8)), config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    tensors = load_file(str(path / "adapter_model.safetensors"), device="cpu")
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0]
                module = module[len("base_model.model."):] if module.startswith("base_model.model.") else module
                pairs.setdefault(module, {})[part] = value
                break
        else:
            raise AdapterFormatError(f"tensor {key!r} is not a LoRA A/B matrix; only plain LoRA adapters can be served")
    out = {}
    for module, ab in sorted(pairs.items()):
        if module not in wrapped:
            raise AdapterFormatError(f"the adapter targets {module!r}, which is not a Linear layer of this model's "
                                     f"decoder layers; the engine serves LoRA on those only")
        if set(ab) != {"lora_A", "lora_B"}:
            raise AdapterFormatError(f"{module}: lora_A or lora_B is missing")
        a, b = ab["lora_A"].float(), ab["lora_B"].float()
        r = a.shape[0]
        layer = wrapped[module]
        if a.shape != (r, layer.in_features) or b.shape != (layer.out_features, r):
            raise AdapterFormatError(f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a "
                                     f"{layer.in_features}->{layer.out_features} Linear")
        if r > r_max:
            raise AdapterFormatError(f"{module}: rank {r} exceeds serve.lora_max_rank={r_max}; raise it")
        if not (a.isfinite().all() and b.isfinite().all()):
            raise AdapterFormatError(f"{module}: the adapter holds NaN or infinite values")
        alpha = _pattern_value(module, alpha_pattern, alpha_default)
        scale = alpha / math.sqrt(r) if rslora else alpha / r  # PEFT's scaling, from the module's own rank
        out[module] = (a.contiguous(), (b * scale).t().contiguous())
    if not out:
        raise AdapterFormatError("the adapter holds no LoRA weights")
    return out


def _pattern_value(module: str, pattern: dict, default: float) -> float:
    """PEFT's alpha_pattern: the value of the longest key the module name ends with."""
    hits = [k for k in pattern if module == k or module.endswith(f".{k}")]
    return float(pattern[max(hits, key=len)]) if hits else float(default)


def write_slot(wrapped: dict[str, Any], slot: int, weights: dict[str, tuple[Any, Any]], r_max: int) -> None:
    """Copy ``weights`` into table slot ``slot`` of every wrapped Linear (zeros where the adapter has none).

    The columns of a free slot are read by every forward but always multiplied by 0, so writing them
    while steps run is safe (values are checked finite on read).
    """
    import torch

    rows = slice(slot * r_max, (slot + 1) * r_max)
    with torch.no_grad():
        for name, layer in wrapped.items():
            a_rows, b_rows = layer.lora_a[rows], layer.lora_b[rows]
            pair = weights.get(name)
            if pair is None:
                a_rows.zero_()
                b_rows.zero_()
                continue
            a, b = pair
            r = a.shape[0]
            a_rows[:r].copy_(a)
            a_rows[r:].zero_()
            b_rows[:r].copy_(b)
            b_rows[r:].zero_()


def selection(lora_index: Any, slots: int, r_max: int, dtype: Any) -> Any:
    """``[rows, 1, slots * r_max]``: 1 on the columns of each row's slot (index 1..slots), 0 for index 0 (base)."""
    import torch

    column_slot = torch.arange(slots * r_max, device=lora_index.device) // r_max + 1
    return (column_slot[None, :] == lora_index[:, None]).to(dtype)[:, None, :]
