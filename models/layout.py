"""Weight memory layout for fast CPU inference, applied after the model is built or loaded
(which layout each layer takes: models/kernels.py measures it on the machine that runs).

On CPU, a matrix-vector product with a weight of more outputs than inputs (QKV, gate/up,
LM head) reads memory faster when the weight is stored column-major (measured on the 2-core
machine for the mid-size shapes, bench/RESULTS.md), and equal or better for prefill GEMMs. The tensor keeps its shape [out, in]; only its
strides change, so every caller (F.linear, state_dict, quantization) is unaffected.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import re
import threading
import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lora import carry_adapter, has_adapter
from .quantize import SCRATCH_BYTES, SplitInt4Linear, WeightOnlyLinear, _buffer, int4_row_block

log = logging.getLogger(__name__)


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
    CPU inference only (no training, no state_dict). oneDNN lays the weight out for a row count
    (`hint`, pack_weight): the `packed` layout for decode steps, `packed_many` (MANY_ROWS) for
    prefills. Measured on the 2-core machines for the mid-size shapes (bench/RESULTS.md): on an
    AMD EPYC (AVX-512 BF16) bf16 `packed` beat row-major F.linear for one and a few rows and
    matched it for prefill; on a Xeon with AMX, `packed` ran 257-288 rows at 0.7-0.85 TFLOP/s,
    `packed_many` at 1.7-1.9, row-major F.linear at 1.2-1.35."""

    row_step: Optional[int] = None       # rows per GEMM call where measured faster (kernels.choose_row_pieces)

    def __init__(self, lin: nn.Linear, hint: Optional[int] = None):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.hint, self.dtype = hint, lin.weight.dtype
        self.packed = pack_weight(lin.weight.detach(), hint)
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()                                     # T,in
        pieces = row_pieces(x2.shape[0], self.row_step)
        if len(pieces) == 1:
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        else:
            y = x2.new_empty(x2.shape[0], self.out_features)                           # T,out
            for p in pieces:
                y[p] = torch.ops.mkldnn._linear_pointwise(x2[p], self.packed, self.bias, "none", [], "")
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, oneDNN-packed for {self.hint or 'few'} rows"


def row_pieces(rows: int, step: Optional[int]) -> list:
    """The row slices a prefill's GEMM runs in: all at once, or `step` rows at a time (measured
    faster for some wide layers at an image's 1,226 rows: kernels.choose_row_pieces)."""
    if not step or rows <= step:
        return [slice(0, rows)]
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


class PackedInt8Linear(nn.Module):
    """An int8 layer used only by prefill (quantize.WeightOnlyLinear of bits 8: image encoders,
    vision experts, CogAgent's cross key/value) whose codes are kept in oneDNN's blocked weight
    layout. A prefill converts them to the compute dtype straight into a packed scratch weight
    (one sequential pass) and runs oneDNN's GEMM on it; the row-major path dequantizes into a
    plain buffer that oneDNN reorders again on every call. Same codes and bytes (1 per weight),
    the per-row scales applied to the outputs as before, the same products. The blocked order
    is found by packing the codes themselves (-128..127 are exact in bf16 and fp32) and checked
    once per shape by unpacking it. CPU inference only; no decode kernel reads this layout.
    hint: the row count oneDNN lays the weight out for (pack_weight; None: `packed`'s)."""

    row_step: Optional[int] = None       # rows per GEMM call where measured faster (kernels.choose_row_pieces)

    def __init__(self, q: WeightOnlyLinear, hint: Optional[int] = None):
        super().__init__()
        N, K = self.out_features, self.in_features = q.out_features, q.in_features
        self.dtype, self.hint = q.dtype, hint
        # Equal chunks of rows (the last padded with zero rows): one scratch weight per shape.
        chunks = -(-N * K * q.dtype.itemsize // SCRATCH_BYTES)
        self.rows = -(-N // chunks)
        self.register_buffer("scales", q.scales)
        self.bias = q.bias
        parts = [_blocked(q.qweight[r:r + self.rows], self.rows, self.dtype, hint) for r in range(0, N, self.rows)]
        self.register_buffer("codes", torch.cat(parts))                   # chunks x blocked size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()          # T,K
        N = self.out_features
        pieces = row_pieces(x2.shape[0], self.row_step)
        y = None if self.rows == N and len(pieces) == 1 else x2.new_empty(x2.shape[0], N)   # T,N
        with _SCRATCH_LOCK:                        # one scratch per shape in the process
            w, raw = _packed_scratch(self.rows, self.in_features, self.dtype, self.hint)
            for i, r0 in enumerate(range(0, N, self.rows)):
                raw.copy_(self.codes[i * raw.numel():(i + 1) * raw.numel()])   # int8 -> compute dtype
                for p in pieces:
                    part = torch.ops.mkldnn._linear_pointwise(x2[p], w, None, "none", [], "")  # rows of p,chunk
                    if y is None:                                           # one chunk, one piece: no copy
                        y = part
                    else:
                        y[p, r0:r0 + self.rows] = part[:, :N - r0]
        y.mul_(self.scales)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], N).to(x.dtype)

    @property
    def weight_count(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int8 in oneDNN's blocked layout for "
                f"{self.hint or 'few'} rows, {self.dtype}")


def _raw(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The memory of a oneDNN-packed weight as a flat CPU tensor of `dtype`: a view (writes
    reach `packed`), valid while `packed` lives."""
    n = torch.ops.mkldnn._nbytes(packed)
    return torch.frombuffer((ctypes.c_uint8 * n).from_address(torch.ops.mkldnn.data_ptr(packed)), dtype=dtype)


def _blocked(codes: torch.Tensor, rows: int, dtype: torch.dtype, hint: Optional[int]) -> torch.Tensor:
    """int8 codes [n <= rows, K] -> the same codes in the blocked order oneDNN packs a weight of
    [rows, K] in `dtype` for `hint` rows (flat int8, padding included; rows beyond n are zero)."""
    w = torch.zeros(rows, codes.shape[1], dtype=dtype)
    w[:codes.shape[0]] = codes
    packed = pack_weight(w, hint)
    flat = _raw(packed, dtype).to(torch.int8)              # (the view is valid while `packed` lives)
    key = (rows, codes.shape[1], dtype, hint)
    with _SCRATCH_LOCK:
        if key not in _CHECKED:                     # filled with these codes, the scratch unpacks to w
            scratch, raw = _packed_scratch(*key)
            if raw.numel() != flat.numel() or not torch.equal(_unpacked(scratch, raw, flat), w):
                raise RuntimeError(f"oneDNN's packed layout of a {rows}x{codes.shape[1]} {dtype} weight is "
                                   "not a permutation of its values here")
            _CHECKED.add(key)
    return flat


def _unpacked(scratch: torch.Tensor, raw: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    raw.copy_(flat)
    return scratch.to_dense()


_CHECKED = set()                               # shapes whose blocked order was checked
_SCRATCH = {}                                  # (rows, K, dtype, hint) -> (packed weight, its memory)
_SCRATCH_LOCK = threading.Lock()               # concurrent prefills (threads) take turns per layer


def _packed_scratch(rows: int, K: int, dtype: torch.dtype, hint: Optional[int]) -> tuple:
    """A packed weight of [rows, K] in `dtype` (laid out for `hint` rows) to convert codes into,
    and its memory as a flat tensor: one per shape in the process (at most SCRATCH_BYTES each),
    kept. Under _SCRATCH_LOCK."""
    key = (rows, K, dtype, hint)
    if key not in _SCRATCH:
        with torch.inference_mode(False):
            w = pack_weight(torch.zeros(rows, K, dtype=dtype), hint)
            _SCRATCH[key] = (w, _raw(w, dtype))
    return _SCRATCH[key]


_ONEDNN_SWITCH = threading.Lock()         # GemvLinear's process-wide oneDNN off / on


class _SharedRowMajor(nn.Module):
    """A layer computing on the row-major weight and bias of the nn.Linear it replaces (the
    same storage and state_dict keys)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        lin.weight.data = lin.weight.data.contiguous()
        self.weight, self.bias = lin.weight, lin.bias


class GemvLinear(_SharedRowMajor):
    """A linear layer whose single-row products run PyTorch's own CPU matrix-vector kernel
    (ATen's, taken when oneDNN is switched off) and whose many-row products run F.linear as
    `plain` does, on the same row-major weight (shared with the nn.Linear it replaces: one
    storage, the same state_dict keys). In the torch 2.13 wheel a bf16 F.linear of one row
    goes to oneDNN, whose matrix-vector path is fp32-only (models/kernels.py times both).
    oneDNN is switched off process-wide for that one call, under a lock: concurrent calls (the
    composite demo's sessions run in threads) could otherwise restore each other's "off"."""

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


# More rows than a decode step ever holds (16: the server's batch, invariant.ROWS) take the
# fp32 path: decode steps, padded or batched, keep bf16's faster matrix-vector products.
UPCAST_FROM_ROWS = 16


class UpcastLinear(_SharedRowMajor):
    """A bf16 linear layer for CPUs without native bf16 (AVX2 only: oneDNN has no bf16 there
    and a bf16 GEMM of 283 rows ran 3.6x slower than fp32, while a bf16 matrix-vector product
    read its weights 1.5x faster per weight than fp32, AMD EPYC Zen 3): products of more than
    UPCAST_FROM_ROWS rows convert the weight to fp32, a chunk of output rows at a time into one
    reused scratch buffer, and run the fp32 GEMM; fewer rows run F.linear in bf16 as `plain`.
    The weight stays bf16, row-major, shared with the nn.Linear it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)                                        # T,K
        if x2.shape[0] <= UPCAST_FROM_ROWS:
            return F.linear(x, self.weight, self.bias)
        x32, N, K = x2.float(), self.out_features, self.in_features
        y = x2.new_empty(x2.shape[0], N, dtype=torch.float32)                        # T,N
        step = max(16, SCRATCH_BYTES // (4 * K))
        for r0 in range(0, N, step):
            w = self.weight[r0:r0 + step]
            w32 = _buffer(w.shape, torch.float32).copy_(w)            # the chunk in fp32, reused
            torch.mm(x32, w32.t(), out=y[:, r0:r0 + w.shape[0]])
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).view(*x.shape[:-1], N)


FP16_MAX = 65504.0


class HalfLinear(nn.Module):
    """An fp32 or bf16 linear layer whose weight is held as fp16 in FBGEMM's packed layout and
    multiplied by the activations in fp32 (FBGEMM's fp16-weight GEMM; a bf16 layer's output is
    rounded to bf16 once): on an AMD EPYC Zen 3 without native bf16 one row read 27.9 GB/s of
    it, fp32 22.6 GB/s of twice the bytes, a bf16 F.linear 19.3; 283 rows ran 1.4x fp32's GEMM.
    Taken only by weights fp16 holds exactly (fp16_exact): released checkpoints are bf16, whose
    values fp16 holds but for tiny ones. CPU inference only (no training, no state_dict of the
    weight)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.half_packed = torch.ops.quantized.linear_prepack_fp16(lin.weight.detach().float(), None)
        self.bias = lin.bias
        self.key = next(_HALF_KEYS)             # how a compiled graph names the packed weight
        _HALF_WEIGHTS[self.key] = self.half_packed
        weakref.finalize(self, _HALF_WEIGHTS.pop, self.key, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float().contiguous()                          # T,K fp32
        if torch.compiler.is_dynamo_compiling():
            y = half_linear(x2, self.key, self.out_features)                                # T,N fp32
        else:
            y = torch.ops.quantized.linear_dynamic_fp16(x2, self.half_packed)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp16 weight packed by FBGEMM"


def half_from(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[HalfLinear]:
    """The `half` layout of a linear layer straight from the tensors a checkpoint gave it (weight
    [out, in]), so a load holds no full-precision copy of it; None where fp16 does not hold the
    weight (fp16_exact)."""
    if not fp16_exact(weight):
        return None
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return HalfLinear(lin)


# A compiled graph cannot take FBGEMM's packed weight (a TorchScript object) as an argument:
# the operator below, opaque to inductor, finds it by its layer's key.
_HALF_WEIGHTS = {}
_HALF_KEYS = itertools.count()


@torch.library.custom_op("cogvlm::half_linear", mutates_args=())
def half_linear(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    """x [T, K] fp32 times the fp16 weight of HalfLinear `key`: [T, out_features] fp32."""
    return torch.ops.quantized.linear_dynamic_fp16(x, _HALF_WEIGHTS[key])


@half_linear.register_fake
def _(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


@functools.lru_cache(maxsize=None)
def can_half() -> bool:
    """FBGEMM's fp16-weight linear works in this PyTorch (x86 builds)."""
    try:
        w = torch.ops.quantized.linear_prepack_fp16(torch.ones(8, 8), None)
        return torch.equal(torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 8), w), torch.full((1, 8), 8.0))
    except (RuntimeError, AttributeError):
        return False


@torch.no_grad()
def fp16_exact(w: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """Whether fp16 holds the fp32 or bf16 weight `w` (HalfLinear's case): within fp16's range,
    and each value exact or, below fp16's normal range (6.1e-5), within 2^-25 of it. True for
    every bf16 or fp16 checkpoint within that range (bf16 keeps 8 significant bits, fp16 11)."""
    lo, hi = torch.aminmax(w)
    if max(-lo.item(), hi.item()) > FP16_MAX:
        return False
    if w.dtype == torch.bfloat16:
        return True
    flat = w.reshape(-1)
    for i in range(0, flat.numel(), chunk):
        c = flat[i:i + chunk]
        # bf16 values (the low 16 bits clear) are fp16's; else check the rounding itself
        if torch.bitwise_and(c.view(torch.int32), 0xFFFF).any() and (c.half().float() - c).abs().max() > 2 ** -25:
            return False
    return True


# The row count a `packed_many` weight is laid out for: a prefill's. On a Xeon with AMX, layouts
# for 64-1024 rows ran 257-1300 rows alike (1.6-2.0 TFLOP/s), and one and four rows as fast as
# the one-row layout; the one-row layout ran 257-288 rows at 0.7-0.85 (exactly 256: 1.3).
MANY_ROWS = 256


def pack_weight(w: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
    """w [out, in] in oneDNN's blocked layout, laid out for `rows` rows; by default (`packed`)
    16 for fp32 (batched decoding) or 1 for bf16 (one row measured faster on an AMD EPYC)."""
    rows = rows or (16 if w.dtype == torch.float32 else 1)
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)


def can_upcast(dtype: torch.dtype) -> bool:
    """UpcastLinear's case: a bf16 weight on a CPU whose oneDNN has no bf16 kernels."""
    return dtype == torch.bfloat16 and torch.backends.mkldnn.is_available() \
        and not torch.ops.mkldnn._is_mkldnn_bf16_supported()


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
# oneDNN-packed for a decode step's rows or for a prefill's (MANY_ROWS), F.linear on a
# row-major weight, F.linear on a column-major weight, a
# row-major weight whose single-row products skip oneDNN (GemvLinear), for bf16 where
# oneDNN has no bf16 a row-major bf16 weight whose many-row products run in fp32 (UpcastLinear),
# and for weights fp16 holds exactly an fp16 copy packed by FBGEMM (HalfLinear).
LAYOUTS = ("packed", "packed_many", "plain", "colmajor", "gemv", "upcast", "half")
PACKED = {"packed": None, "packed_many": MANY_ROWS}        # oneDNN's layouts -> the rows they are laid out for

_MODULES = {"packed": PackedLinear, "packed_many": functools.partial(PackedLinear, hint=MANY_ROWS),
            "gemv": GemvLinear, "upcast": UpcastLinear, "half": HalfLinear}

# Layers only a prefill runs (image encoders and adapter, the vision experts, CogAgent's cross
# key/value) and the one only decode steps run in full (the LM head: a prefill computes its
# last row alone); every other layer runs in both.
_PREFILL_ONLY = re.compile(r"model\.(vision|cross_vision)\.|.*\.vision_expert_|.*\.vision_mlp\.|"
                           r".*\.cross_attn\.key_value$")
_DECODE_ONLY = re.compile(r"lm_head$")


def role(name: str) -> str:
    """"prefill", "decode" or "both": which products the linear layer `name` runs."""
    return "prefill" if _PREFILL_ONLY.match(name) else "decode" if _DECODE_ONLY.match(name) else "both"


def relayout(lin: nn.Linear, layout: str) -> nn.Module:
    """`lin` computing with `layout`: the same module with its weight re-strided (plain,
    colmajor; no copy when it already has that layout), or a PackedLinear, GemvLinear,
    UpcastLinear or HalfLinear in its place. One weight either way: the old one is released when the caller drops it.
    An int8 quantize.WeightOnlyLinear takes packed (a PackedInt8Linear) or stays as it is."""
    if isinstance(lin, WeightOnlyLinear):
        if layout not in PACKED:
            return lin
        try:
            return PackedInt8Linear(lin, PACKED[layout])
        except RuntimeError as e:                   # a layout this code cannot fill: keep row-major
            log.warning("%s; the int8 layer keeps its row-major codes", e)
            return lin
    if layout in _MODULES:                  # a new module: a LoRA adapter (a hook on `lin`) moves with it
        new = _MODULES[layout](lin)
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
    # oneDNN-packed weights are no parameters inductor can take (half ones it calls opaquely);
    # a compiled decode step never reads the layers only prefill runs
    model.runtime.packed = model.runtime.packed or any(x in PACKED and role(n) != "prefill" for n, x in layouts.items())
    return model


@torch.no_grad()
def split_prefill_int4(model: nn.Module) -> int:
    """Give every int4 CPU layer only prefill runs (role) the codes of quantize.SplitInt4Linear:
    its prefills dequantize the same weight in fewer passes. Returns how many layers changed
    (none where PyTorch's int4 block layout is unknown here, and none carrying an adapter)."""
    if not int4_row_block():
        return 0
    names = [n for n, m in model.named_modules() if type(m) is WeightOnlyLinear and m.bits == 4
             and role(n) == "prefill" and m.qweight.device.type == "cpu" and not has_adapter(m)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, SplitInt4Linear(getattr(owner, child)))
    return len(names)
