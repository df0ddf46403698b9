"""Weight memory layout for fast CPU inference, applied after the model is built or loaded
(which layout each layer takes: models/kernels.py measures it on the machine that runs).

On CPU, a matrix-vector product with a weight of more outputs than inputs (QKV, gate/up,
LM head) reads memory faster when the weight is stored column-major (measured on the 2-core
machine for the mid-size shapes, bench/RESULTS.md), and equal or better for prefill GEMMs. The tensor keeps its shape [out, in]; only its
strides change, so every caller (F.linear, state_dict, quantization) is unaffected.
"""
from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lora import carry_adapter, has_adapter


def use_fast_cpu_layout(model: nn.Module) -> nn.Module:
    """fp32 only: in bf16 the column-major GEMV measured slower than row-major (mid-size
    shapes, AMD EPYC with AVX-512 BF16)."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and mod.weight.device.type == "cpu" and mod.weight.dtype == torch.float32 \
                and mod.out_features > mod.in_features and mod.weight.is_contiguous():
            mod.weight.data = mod.weight.data.t().contiguous().t()
    return model


class PackedLinear(nn.Module):
    """A linear layer whose fp32 or bf16 weight is packed once into oneDNN's blocked layout, for
    CPU inference only (no training, no state_dict). Measured on the 2-core machine for the
    mid-size shapes (bench/RESULTS.md): fp32, against column-major F.linear, equal at 1 row,
    faster at 4-16 rows, equal or faster for prefill; bf16, against row-major F.linear, faster
    for single-row and few-row steps, prefill GEMMs equal."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.packed = pack_weight(lin.weight.detach())
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]).contiguous(), self.packed,
                                               self.bias, "none", [], "")
        return y.view(*shape[:-1], self.out_features)


_ONEDNN_SWITCH = threading.Lock()         # GemvLinear's process-wide oneDNN off / on


class GemvLinear(nn.Module):
    """A linear layer whose single-row products run PyTorch's own CPU matrix-vector kernel
    (ATen's, taken when oneDNN is switched off) and whose many-row products run F.linear as
    `plain` does, on the same row-major weight (shared with the nn.Linear it replaces: one
    storage, the same state_dict keys). In the torch 2.13 wheel a bf16 F.linear of one row
    goes to oneDNN, whose matrix-vector path is fp32-only (models/kernels.py times both).
    oneDNN is switched off process-wide for that one call, under a lock: concurrent calls (the
    composite demo's sessions run in threads) could otherwise restore each other's "off"."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        lin.weight.data = lin.weight.data.contiguous()
        self.weight, self.bias = lin.weight, lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1]:                   # more than one row
            return F.linear(x, self.weight, self.bias)
        with _ONEDNN_SWITCH:
            on = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
            try:
                return F.linear(x, self.weight, self.bias)
            finally:
                torch._C._set_mkldnn_enabled(on)


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """w [out, in] in oneDNN's blocked layout, laid out for a row count of 16 (fp32: batched
    decoding) or 1 (bf16: measured faster single-row, equal at 4-283 rows)."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 16 if w.dtype == torch.float32 else 1)


def can_pack(dtype: torch.dtype, device="cpu") -> bool:
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available() \
            or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@torch.no_grad()
def pack_for_cpu_inference(model: nn.Module) -> nn.Module:
    """Swap every fp32 / bf16 CPU nn.Linear for a PackedLinear (after any quantization). No-op
    elsewhere (CUDA, fp16, a CPU without bf16 support in oneDNN, a PyTorch without oneDNN)."""
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) is nn.Linear and can_pack(m.weight.dtype, m.weight.device)]
    for name, lin in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, relayout(lin, "packed"))
    model.runtime.packed = True
    return model


# The layouts a plain CPU linear layer can take (models/kernels.py chooses among them):
# oneDNN-packed, F.linear on a row-major weight, F.linear on a column-major weight, and a
# row-major weight whose single-row products skip oneDNN (GemvLinear).
LAYOUTS = ("packed", "plain", "colmajor", "gemv")


def relayout(lin: nn.Linear, layout: str) -> nn.Module:
    """`lin` computing with `layout`: the same module with its weight re-strided (plain,
    colmajor; no copy when it already has that layout), or a PackedLinear or GemvLinear in
    its place. One weight either way: the old one is released when the caller drops it."""
    if layout in ("packed", "gemv"):   # a new module: a LoRA adapter (a hook on `lin`) moves with it
        new = PackedLinear(lin) if layout == "packed" else GemvLinear(lin)
        return carry_adapter(lin, new) if has_adapter(lin) else new
    w = lin.weight.data
    if layout == "plain":
        lin.weight.data = w.contiguous()
    elif layout == "colmajor":
        lin.weight.data = w.t().contiguous().t()
    else:
        raise ValueError(f"weight layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    return lin


@torch.no_grad()
def apply_layouts(model: nn.Module, layouts: dict) -> nn.Module:
    """Give each named linear layer its layout (name -> one of LAYOUTS), one layer at a time
    (memory peaks one layer above the model)."""
    for name, layout in layouts.items():
        lin = model.get_submodule(name)
        new = relayout(lin, layout)
        if new is not lin:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    model.runtime.packed = model.runtime.packed or "packed" in layouts.values()
    return model
