"""Weight-only int8 / int4 quantization, applied by module name after the model is built, or
tensor by tensor while a checkpoint streams in (checkpoint.load_state_into), with the same
function either way.

Two back ends:
- "torch" (the CPU default): PyTorch's own weight-only kernels. int8 = one symmetric scale per
  output row (`torch._weight_int8pack_mm`); int4 = an asymmetric scale + zero per 64 inputs
  (4.5 bits per weight, the bytes of llama.cpp's Q4_0; other group sizes by `group`, e.g. 128:
  4.25 bits), in the blocked layout of `torch._weight_int4pack_mm_for_cpu`. Single-token
  steps (a few rows) run those kernels; steps of many rows (prefill, image encoders, QLoRA's
  backward) dequantize the layer 32 MB at a time into a reused bf16/fp32 buffer and run the
  dense oneDNN/MKL GEMM on each piece, which is several times faster there.
- "bitsandbytes" (the CUDA default, and what QLoRA on CUDA uses): LLM.int8 / nf4. Its fast CPU
  4-bit path needs the `kernels` hub package, which does not install here, so on CPU it is the
  slow fallback.

What is quantized: every linear layer of the decoder (language and vision experts, CogAgent's
cross attention) and of every block of the EVA encoders and the adapter MLP (`vision_bits`); with the
torch back end also the LM head and the token embeddings, to 8 bits. What stays in the load
dtype: patch embeddings, norms and the adapter's input projection.
"""
from __future__ import annotations

import logging
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

GROUP = 64            # int4 inputs per scale/zero pair (the default)
# Other group sizes users may choose (--quant_group): 128 saves 0.25 bit per weight (0.40 GB of
# CogVLM-17B) for a larger error (bench/RESULTS.md, quality per scheme).
GROUPS = (32, 64, 128, 256)
# Up to this many rows a step runs the weight-only kernel; more rows dequantize the layer and
# run the dense GEMM. The default until kernels.choose_kernel_rows has timed both paths for a
# layer's shape on the CPU that runs (and under a forced --kernels choice): the break-even first
# measured (4096 x 4096 and the mid-size shapes, eager dequantization: int8 16-24 rows, int4 64-96).
KERNEL_ROWS = {8: 16, 4: 80}
# Largest dequantized weight chunk of a many-row step (the scratch buffer's size).
SCRATCH_BYTES = 32 << 20
BACKENDS = ("torch", "bitsandbytes")
VISION_BITS = 8       # the image encoders' default under --quant (--quant_vision)
BITS = (4, 8)                       # the language model's choices
VISION_BIT_CHOICES = (4, 8, 16)     # the image encoders' (16 = unquantized)


@dataclass
class QuantConfig:
    """Weight quantization while loading (this module). None = not quantized (bits) or
    this module's default (VISION_BITS, GROUP, the device's back end)."""
    bits: Optional[int] = None              # 4 or 8: the language model's linear layers
    vision_bits: Optional[int] = None       # the image encoders: 4, 8 or 16 (= unquantized)
    group: Optional[int] = None             # int4 inputs per scale (GROUPS)
    backend: Optional[str] = None           # "torch" or "bitsandbytes"


@dataclass
class QuantPlan:
    """What one load quantizes: module name -> bits (quant_plan), and the back end and int4
    group every quantized layer of it uses."""
    layers: dict
    backend: str
    group: Optional[int] = None


def plan_quantization(model: nn.Module, q: QuantConfig, device) -> QuantPlan:
    """The plan for `model` under `q`, the back end defaulting to the device's."""
    backend = q.backend or default_backend(device)
    return QuantPlan(quant_plan(model, q.bits, q.vision_bits, backend, q.group), backend, q.group)


def _skip_patterns(head: bool) -> list[re.Pattern]:
    pats = [r".*patch_embed", r"model\.vision\.linear_proj\.linear_proj", r"model\.cross_vision\.vit\.model\.head"]
    if not head:                 # bitsandbytes: no int8 LM head, no int8 embeddings
        pats += [r"lm_head", r"model\.embed_tokens"]
    return [re.compile(p) for p in pats]


def quant_plan(model: nn.Module, bits: int, vision_bits: Optional[int] = None,
               backend: str = "torch", group: Optional[int] = None) -> dict[str, int]:
    """Module name -> bits for every linear layer to quantize. vision_bits: the image encoders'
    (None: VISION_BITS; 16: keep them in the load dtype); group: int4 inputs per scale
    (None: GROUP)."""
    if bits not in BITS or vision_bits not in (None,) + VISION_BIT_CHOICES:
        raise ValueError(f"quant bits must be {' or '.join(map(str, BITS))} and vision bits "
                         f"{', '.join(map(str, VISION_BIT_CHOICES))}, not {bits}/{vision_bits}")
    if group not in (None,) + GROUPS:
        raise ValueError(f"--quant_group takes {', '.join(map(str, GROUPS))}, not {group}")
    if backend not in BACKENDS:
        raise ValueError(f"quantization back end {backend!r}: choose one of {', '.join(BACKENDS)}")
    skip = _skip_patterns(head=backend == "torch")
    vision_bits = VISION_BITS if vision_bits is None else vision_bits
    plan = {}
    for name, mod in model.named_modules():
        if any(p.match(name) for p in skip):
            continue
        if type(mod) is nn.Embedding and name == "model.embed_tokens":
            plan[name] = 8
        if type(mod) is not nn.Linear:
            continue
        b = 8 if name == "lm_head" else vision_bits if name.startswith(("model.vision.", "model.cross_vision.")) else bits
        if b == 4 and backend == "torch" and not int4_fits(mod.out_features, mod.in_features, group):
            b = 8                                     # shapes the int4 kernel's layout cannot hold
        if b != 16:
            plan[name] = b
    return plan


def int4_fits(n: int, k: int, group: Optional[int] = None) -> bool:
    return n % 64 == 0 and k % (group or GROUP) == 0


# ---------------------------------------------------------------------------------------
# The torch back end
_buffers = threading.local()                           # per thread: dtype, slot -> flat buffer


def _buffer(shape, dtype, slot: int = 0, device=None) -> torch.Tensor:
    """A reused scratch tensor of `shape`: one flat buffer per thread, dtype and slot, grown to
    the largest layer seen, so the scratch memory of a whole model is that of its largest
    layer (not one buffer per weight shape: 0.5 GB more at CogVLM-17B's size)."""
    cache = getattr(_buffers, "d", None)
    if cache is None:
        cache = _buffers.d = {}
    n = 1
    for d in shape:
        n *= d
    key = (dtype, slot, str(device or "cpu"))
    flat = cache.get(key)
    if flat is None or flat.numel() < n:
        with torch.inference_mode(False):             # usable inside and outside inference mode
            flat = cache[key] = torch.empty(n, dtype=dtype, device=device)
    return flat[:n].view(shape)


_INT4_BLOCK = None


def int4_row_block() -> int:
    """Rows interleaved per block by `_convert_weight_to_int4pack_for_cpu` on this CPU (the
    layout depends on the kernel PyTorch picked: 64 with AVX-512, 32 with AVX2), found once by
    packing a probe and reading it back; 0 if neither layout matches."""
    global _INT4_BLOCK
    if _INT4_BLOCK is None:
        q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        _INT4_BLOCK = next((b for b in (64, 32, 16) if torch.equal(_unpack_int4(packed, b).int() + 8, q)), 0)
    return _INT4_BLOCK


def _unpack_int4(packed: torch.Tensor, block: int, tmp: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Packed N,K/2 uint8 -> N,K int8 q - 8 (the kernel's centred nibbles) in row order.
    Byte (n block, k, j) holds row j of the block in its low nibble and row j + block/2 in its
    high nibble: the bytes are transposed first (half the data of transposing the nibbles, 4x
    faster measured), then split. Each nibble q xor 8, read as a signed 4-bit number, is q - 8:
    the arithmetic shifts of int8 bytes sign-extend it."""
    N, K = packed.shape[0], packed.shape[1] * 2
    t8 = _transposed_bytes(packed, block, tmp)
    out = out if out is not None else torch.empty(N, K, dtype=torch.uint8)
    o = out.view(torch.int8).view(N // block, 2, block // 2, K)                 # N/b,2,b/2,K
    torch.bitwise_left_shift(t8, 4, out=o[:, 0])
    o[:, 0].bitwise_right_shift_(4)
    torch.bitwise_right_shift(t8, 4, out=o[:, 1])
    return out.view(torch.int8)


def _transposed_bytes(packed: torch.Tensor, block: int, tmp: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The kernel's packed N,K/2 bytes, each block's transposed (N/b,b/2,K: row j's nibble low,
    row j + b/2's high), each nibble xor 8 so that, read as a signed 4-bit number, it is q - 8:
    as int8, into `tmp` (uint8) when given."""
    N, K = packed.shape[0], packed.shape[1] * 2
    tmp = tmp if tmp is not None else torch.empty(N // block, block // 2, K, dtype=torch.uint8)
    tmp.copy_(packed.view(N // block, K, block // 2).transpose(1, 2))           # N/b,b/2,K
    t8 = tmp.view(torch.int8)
    t8.view(-1).view(torch.int64).bitwise_xor_(_XOR_8)
    return t8


_XOR_8 = int.from_bytes(b"\x88" * 8, "little", signed=True)                  # 0x88 in every byte


def _int8_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 rows (overwritten) -> int8 codes and one symmetric scale per row (absmax / 127)."""
    scale = rows.abs().amax(1).clamp(min=1e-12) / 127                                      # n
    return rows.div_(scale[:, None]).round_().to(torch.int8), scale


class _DequantMatmul(torch.autograd.Function):
    """y = x W^T with W dequantized; backward gives the input's gradient only (frozen weights,
    QLoRA)."""
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer._matmul(x)

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        g = grad.to(layer.dtype)
        dx = None
        for r0, w in layer.dequantized_chunks():          # dx = sum over chunks of g[:, rows] W[rows]
            part = g[:, r0:r0 + w.shape[0]] @ w
            dx = part if dx is None else dx.float().add_(part)   # several chunks: summed in fp32
        return dx.to(grad.dtype), None


class WeightOnlyLinear(nn.Module):
    """int8 (per-row scales) or int4 (per-64 scale + zero) weights, computing in `dtype`."""
    few_row_kernel = True                    # few rows run PyTorch's weight-only kernel
    kernel_rows: Optional[int] = None        # up to how many (kernels.choose_kernel_rows); None: KERNEL_ROWS

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], bits: int, group: Optional[int] = None):
        super().__init__()
        self.out_features, self.in_features = N, K = weight.shape
        group = group or GROUP
        self.bits, self.dtype, self.group = bits, weight.dtype, group
        if bits == 4 and not int4_fits(N, K, group):
            raise ValueError(f"int4 needs rows % 64 == 0 and inputs % {group} == 0, not {(N, K)}")
        if bits == 4 and weight.device.type != "cpu":
            raise ValueError("int4 with the PyTorch back end runs on CPU only; on CUDA use bitsandbytes (the default)")
        w, dev = weight.detach(), weight.device
        q = torch.empty(N, K if bits == 8 else K // 2, dtype=torch.int8 if bits == 8 else torch.uint8, device=dev)
        scales = torch.empty((N,) if bits == 8 else (K // group, N, 2), dtype=w.dtype, device=dev)
        # A few million weights at a time: the fp32 temporaries stay small (an LM head of
        # 32000 x 4096 would otherwise take 3 x 0.5 GB of them while it is quantized).
        step = max(64, (1 << 22) // K // 64 * 64)
        for r in range(0, N, step):
            chunk = w[r:r + step].float()
            if bits == 8:
                q[r:r + step], scales[r:r + step] = _int8_rows(chunk)
            else:
                g = chunk.view(chunk.shape[0], -1, group)                                   # n,K/G,G
                lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
                scale = ((hi - lo) / 15).clamp(min=1e-12)
                qi = g.sub_(lo).div_(scale).round_().clamp_(0, 15).to(torch.int32).view(-1, K)
                # Rows are packed in blocks of 64, so chunks of 64 rows pack independently.
                q[r:r + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qi, 1)
                # The kernel computes (q - 8) * scale + zero, so zero is the value of q = 8.
                scales[:, r:r + step] = torch.cat([scale, lo + 8 * scale], -1).transpose(0, 1)  # K/G,n,2
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(w.dtype), requires_grad=False)
        self.kernel_dtype = w.dtype              # the activations' dtype in PyTorch's kernel (kernel_in)

    def kernel_in(self, dtype: torch.dtype) -> None:
        """Run the few-row kernel on activations in `dtype` (the scales stored in it too, and
        used by the many-row path as well): in the torch 2.13 wheel the fp32 kernels are not
        vectorized, bf16 ones are (models/kernels.py measures which is faster here)."""
        self.scales = self.scales.to(dtype)
        self.kernel_dtype = dtype

    def dequantize(self, out: Optional[torch.Tensor] = None, rows: Optional[slice] = None,
                   scaled: bool = True, offset: bool = True) -> torch.Tensor:
        """Output rows `rows` (default all; int4: multiples of 64) of the weight, N,K in the
        compute dtype (into `out` when given). The caller may apply part of it to its outputs
        instead, which is cheaper: scaled=False, int8 codes without their per-row scales;
        offset=False, int4 without its per-group zeros (add x summed per group @ zeros)."""
        rows = rows or slice(0, self.out_features)
        q, K = self.qweight[rows], self.in_features
        N = q.shape[0]
        out = out if out is not None else torch.empty(N, K, dtype=self.dtype, device=q.device)
        if self.bits == 8:
            return out.copy_(q).mul_(self.scales[rows, None]) if scaled else out.copy_(q)
        sz = self.scales[:, rows].transpose(0, 1)                                    # N,K/G,2
        block = int4_row_block()
        if not block:                                # unknown layout: ask the kernel (slow, exact)
            eye = torch.eye(K, dtype=self.scales.dtype)
            out.copy_(torch._weight_int4pack_mm_for_cpu(eye, q, self.group, self.scales[:, rows].contiguous()).t())
            if not offset:
                out.view(N, K // self.group, self.group).sub_(sz[..., 1:])
            return out
        out.copy_(_unpack_int4(q, block, _buffer((N // block, block // 2, K), torch.uint8, 1),
                               _buffer((N, K), torch.uint8)))
        o = out.view(N, K // self.group, self.group)                                 # N,K/G,G
        o.mul_(sz[..., :1])                              # the kernel's w = (q - 8) * scale + zero
        return o.add_(sz[..., 1:]).view(N, K) if offset else out

    def dequantized_chunks(self, scaled: bool = True, offset: bool = True):
        """(first row, W[rows]) for consecutive row chunks of at most SCRATCH_BYTES each, all
        dequantized into the same scratch buffer: a prefill's extra memory is one chunk (plus
        oneDNN's copy of it), not the whole layer (0.5 GB at CogVLM-17B's MLP)."""
        N, step = self.out_features, self.chunk_rows()
        K = self.in_features
        for r0 in range(0, N, step):
            n = min(step, N - r0)
            w = self.expanded_by(FusedExpand.kernel_fn, r0, n) if self.bits == 4 and scaled and not offset \
                and self.few_row_kernel else None
            if w is None:
                w = self.dequantize(_buffer((n, K), self.dtype, 0, self.qweight.device), slice(r0, r0 + n), scaled, offset)
            yield r0, w

    def chunk_rows(self) -> int:
        """Output rows per dequantized chunk (dequantized_chunks): at most SCRATCH_BYTES of weight."""
        return max(64, SCRATCH_BYTES // (self.in_features * self.dtype.itemsize) // 64 * 64)

    def expanded_by(self, fn: Optional[Callable], r0: int, n: int, strict: bool = True) -> Optional[torch.Tensor]:
        """int4 rows r0..r0+n of the weight, scaled, without the zeros, into the scratch: the bytes
        transposed eagerly, then expanded by the compiled `fn` (expand_kernel_int4) in one pass;
        None where fn is None or would compile again (strict; not strict: compile, as the
        background probe does)."""
        b, K, g = int4_row_block(), self.in_features, self.group
        if fn is None or not b or n % b:
            return None

        def args() -> tuple:
            codes = _transposed_bytes(self.qweight[r0:r0 + n], b, _buffer((n // b, b // 2, K), torch.uint8, 1))
            out = _buffer((n, K), self.dtype, 0, self.qweight.device)
            # the chunk's scales contiguous (1/32 of the weights' count): strides and offset alike for every chunk
            scales = _buffer((K // g, n, 2), self.scales.dtype, 2).copy_(self.scales[:, r0:r0 + n])
            return codes.view(n // b, b // 2, K // g, g), scales, out.view(n // b, 2, b // 2, K // g, g)
        called = _compiled_call(fn, args, strict)
        return None if called is None else called[2].view(n, K)

    def group_zeros(self, rows: slice) -> torch.Tensor:
        """int4: the per-group zeros of output rows `rows`, K/G,n."""
        return self.scales[:, rows, 1]

    def takes_kernel(self, rows: int) -> bool:
        """Whether a product of `rows` rows runs PyTorch's weight-only kernel (else: dequantized GEMMs)."""
        return self.few_row_kernel and rows <= (self.kernel_rows or KERNEL_ROWS[self.bits])

    def _matmul(self, x2: torch.Tensor, kernel: Optional[bool] = None) -> torch.Tensor:
        """x2 @ W^T; kernel: force the weight-only kernel (True) or the dequantized GEMMs (False)."""
        if self.takes_kernel(x2.shape[0]) if kernel is None else kernel:
            xk = x2.to(self.kernel_dtype)
            if self.bits == 8:
                return torch._weight_int8pack_mm(xk, self.qweight, self.scales).to(x2.dtype)
            return torch._weight_int4pack_mm_for_cpu(xk, self.qweight, self.group, self.scales).to(x2.dtype)
        # Many rows: dequantize a chunk of output rows at a time and run the dense GEMM on it.
        # What is cheaper on the outputs is left out of the weights: int8's row scales, and
        # int4's group zeros (x W^T = x ((q - 8) s)^T + (x summed per group) zeros: one pass
        # less over every dequantized weight for a product 1/group the size).
        int4 = self.bits == 4
        if int4:
            x_groups = x2.view(x2.shape[0], -1, self.group).sum(-1, dtype=torch.float32).to(x2.dtype)  # T,K/G

        def product(r0: int, w: torch.Tensor) -> torch.Tensor:
            y = F.linear(x2, w)
            return y.addmm_(x_groups, self.group_zeros(slice(r0, r0 + w.shape[0])).to(y.dtype)) if int4 else y
        chunks = self.dequantized_chunks(scaled=int4, offset=not int4)
        r0, w = next(chunks)
        if w.shape[0] == self.out_features:                                      # one chunk: no copy
            y = product(r0, w)
        else:
            y = x2.new_empty(x2.shape[0], self.out_features)
            y[:, :w.shape[0]] = product(r0, w)
            for r0, w in chunks:
                y[:, r0:r0 + w.shape[0]] = product(r0, w)
        return y * self.scales if self.bits == 8 else y   # int8: per-row scales applied to the outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
        y = _DequantMatmul.apply(x2, self) if x2.requires_grad else self._matmul(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    @property
    def weight_count(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        kernel = f" (one-token kernel in {self.kernel_dtype})" if self.kernel_dtype != self.dtype else ""
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}, {self.dtype}{kernel}"


def expand_split_int4(codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
    """SplitInt4Linear's codes expanded and scaled in one expression, for inductor to make one
    pass of (compile.expand_int4_in_background); the same products as the eager passes, so the
    same bits. codes: B,h,G,g int8 (B blocks of 2h rows, G groups of g inputs); scales: B,2,h,G,1;
    out: B,2,h,G,g."""
    left = torch.tensor([4, 0], dtype=torch.int8, device=codes.device).view(1, 2, 1, 1, 1)
    right = torch.tensor([0, 4], dtype=torch.int8, device=codes.device).view(1, 2, 1, 1, 1)
    q = (codes.unsqueeze(1) << left) >> right                                           # B,2,h,G,g
    out.copy_(q.to(out.dtype) * scales)


def expand_kernel_int4(codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
    """expand_split_int4 for the int4 layers in PyTorch's kernel layout, once their bytes are
    transposed (_transposed_bytes, an eager pass; a compiled transpose ran 50x slower): the low
    nibbles shifted back, the kernel's own scales. The products of WeightOnlyLinear.dequantize,
    so the same bits. codes: B,h,G,g int8; scales: G,n,2 (scale, zero; n = B 2h rows); out:
    B,2,h,G,g (the zeros are left to the outputs)."""
    B, h, G, g = codes.shape
    left = torch.tensor([4, 0], dtype=torch.int8, device=codes.device).view(1, 2, 1, 1, 1)
    q = (codes.unsqueeze(1) << left) >> 4                                               # B,2,h,G,g
    out.copy_(q.to(out.dtype) * scales[..., 0].t().reshape(B, 2, h, G, 1))


def _compiled_call(fn: Callable, args: Callable[[], tuple], strict: bool = True) -> Optional[tuple]:
    """fn(*args()), the arguments made in inference mode whatever the caller's (dynamo guards on
    the grad mode and on the kind of each view: one graph serves every caller), under
    fail_on_recompile where strict (a graph never compiles in the caller's thread; not strict:
    it compiles, as the background probe does). The arguments, or None where the graph would
    compile again: the caller then runs the eager passes."""
    try:
        with torch.compiler.set_stance("fail_on_recompile" if strict else "default"), torch.inference_mode():
            made = args()
            fn(*(_alias(t) for t in made))
    except Exception:  # noqa: BLE001 - a shape, dtype or view the graph does not take
        if not strict:
            raise
        log.debug("int4 expansion: eager passes for this product", exc_info=True)
        return None
    return made


def _alias(t: torch.Tensor) -> torch.Tensor:
    """`t`'s memory as a tensor that is no view: dynamo guards on a view's base too (a layer's
    chunk of rows is a view of the whole layer's codes, a scratch buffer of the largest layer's),
    so graphs compiled on a whole probe layer would compile again for every chunked one."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.shape,
                                                               t.stride())


class FusedExpand:
    """The compiled expand_split_int4 (fn) and expand_kernel_int4 (kernel_fn), once
    compile.expand_int4_in_background has built and checked them (None until then, or where they
    cannot be built: the eager passes run)."""
    fn: Optional[Callable] = None
    kernel_fn: Optional[Callable] = None


class SplitInt4Linear(WeightOnlyLinear):
    """An int4 layer only prefill runs (vision experts; image encoders under `--quant_vision 4`),
    its codes stored ready to expand: PyTorch's int4 kernel never reads them, so they need not be
    in its layout. Per block of b rows (int4_row_block) the kernel's bytes are transposed once,
    at load, to b/2 rows of K bytes (low nibble: row j, high nibble: row j + b/2), each nibble
    xor 8 (read as a signed 4-bit number: q - 8). Expanding is then two shifts of int8 bytes: the
    high nibbles by an arithmetic right shift, the low ones by a left shift alone, which leaves
    16 (q - 8), so those rows' scales are stored divided by 16 (exact, a power of two). The
    dequantized weight is bit for bit the one WeightOnlyLinear makes, with three passes over it
    fewer (the byte transpose, the xor, the shift back). Same bytes: the codes, one scale per
    group (N,K/G) and one zero per group (K/G,N, applied to the outputs). CPU inference only."""
    few_row_kernel = False

    def __init__(self, q: WeightOnlyLinear):
        nn.Module.__init__(self)
        N, K, b = q.out_features, q.in_features, int4_row_block()
        if q.bits != 4 or not b or N % b:
            raise ValueError(f"SplitInt4Linear takes an int4 layer in a known block layout, not int{q.bits} {N}x{K}")
        self.out_features, self.in_features, self.bits, self.dtype, self.group = N, K, 4, q.dtype, q.group
        self.kernel_dtype, self.block, self.bias = q.kernel_dtype, b, q.bias
        codes = _transposed_bytes(q.qweight, b)                                          # N/b,b/2,K
        scales = q.scales[..., 0].t().contiguous()                                       # N,K/G
        scales.view(N // b, 2, b // 2, -1)[:, 0].div_(16)                               # the low nibbles' rows
        self.register_buffer("qweight", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", q.scales[..., 1].contiguous())                    # K/G,N

    def kernel_in(self, dtype: torch.dtype) -> None:
        """No few-row kernel reads these codes: nothing to switch."""

    def group_zeros(self, rows: slice) -> torch.Tensor:
        return self.zeros[:, rows]

    def dequantize(self, out: Optional[torch.Tensor] = None, rows: Optional[slice] = None,
                   scaled: bool = True, offset: bool = True) -> torch.Tensor:
        rows = rows or slice(0, self.out_features)
        b, K = self.block, self.in_features
        N = rows.stop - rows.start
        codes = self.qweight[rows.start // b:rows.stop // b]                            # n/b,b/2,K
        out = out if out is not None else torch.empty(N, K, dtype=self.dtype, device=codes.device)
        if not offset and self._fused(codes, rows, out):
            return out
        expanded = _buffer((N, K), torch.int8)
        o = expanded.view(N // b, 2, b // 2, K)                                         # n/b,2,b/2,K
        torch.bitwise_left_shift(codes, 4, out=o[:, 0])                                 # 16 (q - 8)
        torch.bitwise_right_shift(codes, 4, out=o[:, 1])                                # q - 8
        w = out.copy_(expanded).view(N, K // self.group, self.group)                    # n,K/G,G
        w.mul_(self.scales[rows, :, None])
        return w.add_(self.zeros[:, rows].t()[..., None]).view(N, K) if offset else out

    def _fused(self, codes: torch.Tensor, rows: slice, out: torch.Tensor, fn: Optional[Callable] = None,
               strict: bool = True) -> bool:
        """out = the scaled weight of `rows` by the compiled single pass (fn, default
        FusedExpand.fn), if it is ready and takes these shapes without compiling again (strict;
        not strict: compile, as the background probe does); False: the caller runs the eager passes."""
        fn = fn or FusedExpand.fn
        if fn is None:
            return False
        B, h, G, g = codes.shape[0], self.block // 2, self.in_features // self.group, self.group
        return _compiled_call(fn, lambda: (codes.view(B, h, G, g), self.scales[rows].view(B, 2, h, G, 1),
                                           out.view(B, 2, h, G, g)), strict) is not None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 split by rows for prefill, {self.dtype}"


class Int8Embedding(nn.Module):
    """The token embedding table in int8 with one scale per token (row): a lookup reads a row
    and scales it, so decode costs nothing more, and CogVLM-17B's 32000 x 4096 table takes
    0.13 GB instead of 0.26 (torch back end; the error per value is at most half a step of
    its row's 255, far below the int4 layers')."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = weight.dtype
        w = weight.detach()
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)      # 128 KB: exact
        step = max(1, (1 << 22) // w.shape[1])         # fp32 temporaries of a few million values
        for r in range(0, w.shape[0], step):
            q[r:r + step], scales[r:r + step] = _int8_rows(w[r:r + step].float())
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (F.embedding(ids, self.qweight).float() * self.scales[ids][..., None]).to(self.dtype)  # ...,H

    @property
    def weight_count(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8, {self.dtype}"


# The torch back end's quantized modules: weights held as `qweight` + `scales` buffers.
QUANTIZED = (WeightOnlyLinear, Int8Embedding)


# ---------------------------------------------------------------------------------------
# The bitsandbytes back end
def _bnb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")               # bitsandbytes' jit deprecation warnings
        import bitsandbytes as bnb
    return bnb


def bnb_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], bits: int, group: Optional[int] = None) -> nn.Module:
    bnb = _bnb()
    dev, dtype = weight.device, weight.dtype
    # 8-bit matmuls run in fp16 on CUDA and in fp32 on CPU; 4-bit computes in the load dtype.
    compute = (torch.float16 if dev.type == "cuda" else torch.float32) if bits == 8 else dtype
    out_f, in_f = weight.shape
    w = weight.detach().contiguous()
    if bits == 8:
        q = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False,
                                threshold=6.0, device="meta")
        q.weight = bnb.nn.Int8Params(w.to(torch.float16 if dev.type == "cuda" else dtype),
                                     requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute,
                              quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=group or GROUP)
    if bias is not None:
        q.bias = nn.Parameter(bias.detach().to(compute), requires_grad=False)
    q = q.to(dev)                                       # bitsandbytes quantizes on the move
    return _Cast(q, compute) if compute != dtype else q


class _Cast(nn.Module):
    """Runs a quantized linear in its compute dtype and returns the caller's dtype (the
    original's 8-bit CogAgent failed on exactly this Half/Char mix)."""
    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype)).to(x.dtype)


# ---------------------------------------------------------------------------------------
def default_backend(device) -> str:
    return "bitsandbytes" if torch.device(device).type == "cuda" else "torch"


def quantized_module(weight: torch.Tensor, bias: Optional[torch.Tensor], bits: int, backend: str,
                     group: Optional[int] = None) -> nn.Module:
    """The quantized replacement of one linear layer, from its full-precision tensors (the one
    function both the in-place and the streaming path call). group: int4 inputs per scale
    (bitsandbytes: the nf4 block size)."""
    if backend == "torch":
        return WeightOnlyLinear(weight, bias, bits, group)
    return bnb_linear(weight, bias, bits, group)


def quantized_form(model: nn.Module, name: str, got: dict, plan: QuantPlan) -> nn.Module:
    """The quantized form the plan gives module `name`, from its tensors as read (weight, bias)."""
    if isinstance(model.get_submodule(name), nn.Embedding):
        return Int8Embedding(got["weight"])
    return quantized_module(got["weight"], got.get("bias"), plan.layers[name], plan.backend, plan.group)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def quantize(model: nn.Module, bits: int, vision_bits: Optional[int] = None,
             backend: Optional[str] = None, group: Optional[int] = None) -> nn.Module:
    """Quantize a loaded model in place (see the module docstring for what and how)."""
    backend = backend or default_backend(next(model.parameters()).device)
    plan = QuantPlan(quant_plan(model, bits, vision_bits, backend, group), backend, group)
    for name in plan.layers:
        mod = model.get_submodule(name)
        got = {"weight": mod.weight, "bias": getattr(mod, "bias", None)}
        replace_module(model, name, quantized_form(model, name, got, plan))
    model.runtime.quant_bits = bits
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by weights, quantization scales included (bitsandbytes keeps 4-bit scales
    in a quant_state beside the packed weight)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is not None and getattr(qs, "absmax", None) is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
        scb = getattr(t, "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total
