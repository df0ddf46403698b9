"""Batch-invariant inference: each row of a batch gets the logits it gets alone, bit for bit,
whatever else is in the batch (greedy answers then never depend on other users' requests).

A batched product's row results depend on the row count on most CPUs and GPUs: the library
picks another kernel (or another split of the reduction) for 1 row than for several; fp32
MKL on an AMD EPYC has three classes of row counts (1; 2-3; 4, 8 and 12 on), bf16 oneDNN two
(1; 2 and more), FBGEMM's fp16 GEMM rounds a row by the size of the block of rows it falls in
(blocks of 1 and 2 rows differ from larger ones). So, once `make_batch_invariant` has run:
- every linear layer a decode step runs (language model, LM head) rounds each row as among
  ROWS rows: a call of a row count that does not round so is padded with zero rows to the next
  count that does, measured once per machine and kind of layer (bf16 oneDNN on the AMD EPYC:
  1 row runs as 2; fp32 MKL on the AVX2 one: 1-3 as 4, 5-7 as 8, 9-11 as 12; FBGEMM: 1-2 as 3,
  7 as 8, 14 as 15);
  more rows (a prompt) run as they are, and each prompt is prefilled alone;
- one-token attention runs row by row over exactly that row's own K/V slots (a batch holds
  other rows' padding and longer histories, which change the reductions' grouping);
- a batched prompt (HF generate, generate_tokens with several rows) is prefilled row by row
  on its own tokens, and images are encoded one at a time.
Steps may not have more than ROWS rows (the server's --max_batch, batch_chat's groups).
The cost per row count is measured by bench/batch.py (bench/RESULTS.md, "Batch invariance").
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn as nn

from .cogvlm import decode_attention, single_query_attention
from .compile import LongContextAttention, set_decode_attention

log = logging.getLogger(__name__)

ROWS = 16               # rows every decode-time linear product rounds like (the server's default batch)
TRIALS = 12             # random batches each row count is tried on (padding_rows)

# The linear layers a decode step runs (vision-expert and cross key/value layers only see
# prompts, which are prefilled alone).
_DECODE_LINEARS = ("language_expert_query_key_value", "language_expert_dense", "gate_proj",
                   "up_proj", "down_proj", "cross_attn.query", "cross_attn.dense")


def deterministic_on(flag: Optional[bool], device, compile: bool = False, single_stream: bool = False) -> bool:
    """--deterministic / --no-deterministic, or by default: on where it is cheap, CPU eager
    decoding of a model that may batch rows (the server, batch_chat, HF generate, a library
    user's model; bench/RESULTS.md, "Batch invariance"). Off on CUDA (row-by-row attention
    launches kernels per row; not measured yet), with --compile (the compiled step is the point
    of that flag; invariant steps run eagerly) and for single_stream callers: an app that never
    decodes two rows in one step has no batch to be invariant against, and its single rows are
    faster unpadded (1.3x a bf16 step on the AMD EPYC: ATen's GEMV, `gemv`)."""
    if flag is not None:
        return flag
    return torch.device(device).type == "cpu" and not compile and not single_stream


def make_batch_invariant(model: nn.Module, rows: int = ROWS, measure: bool = True) -> nn.Module:
    """Pad the decode-time linear layers' products and swap in row-by-row one-token attention
    (CogVLM and the HF classes alike); rows 0: back to the batched kernels. measure: find per
    layer kind the row counts that round like `rows` rows on this machine (padding_rows); else
    pad to `rows`."""
    for handle in model.runtime.invariant_hooks:
        handle.remove()
    model.runtime.invariant_hooks, model.runtime.batch_invariant = [], rows
    model.runtime.row_attention = None
    if not rows:
        set_decode_attention(model, decode_attention)
        return model
    names = [n for n, _ in model.named_modules()
             if n == "lm_head" or (n.startswith("model.layers.") and n.endswith(_DECODE_LINEARS))]
    safe = padding_rows(model, names, rows) if measure else {n: [rows] for n in names}
    for name, counts in safe.items():
        if counts[:rows - 1] != list(range(1, rows)):      # else every row count rounds alike
            model.runtime.invariant_hooks += _pad_rows(model.get_submodule(name), counts)
    model.runtime.row_attention = LongContextAttention(model)
    set_decode_attention(model, functools.partial(attention_by_row, one=model.runtime.row_attention))
    if model.runtime.decode_step is not None:
        log.info("batch-invariant decoding runs eagerly: the compiled decode step is not used")
        model.runtime.decode_step = None
    log.info("batch-invariant decoding: attention and prompts row by row; decode products of fewer "
             "rows padded to the next count that rounds like %d (%s)", rows, "; ".join(sorted(
                 {f"{_describe(model.get_submodule(n))}: {_padding(c, rows)}" for n, c in safe.items()})))
    return model


def padding_rows(model: nn.Module, names: list, rows: int = ROWS) -> dict:
    """name -> the row counts up to `rows` at which each row, at the start or at the end of
    the batch, gets the bits it gets among `rows` rows (safe_rows); a call of another count is
    padded to the next of them. Measured once per kind of layer (type, shape, dtype, layout,
    adapters) on this machine, cached beside the kernel timings (batch_invariance.json): the
    kernel a library picks depends on the shape, never on the values (on the AVX2 EPYC fp32
    MKL rounds alike at 4, 8 and 12-16 rows, FBGEMM's fp16 GEMM at all but 1, 2, 7 and 14). A
    layer whose rows depend on their place in the batch gets [rows] and a warning."""
    from .kernels import cache_path, machine_id, read_cache
    path, ident = cache_path().with_name("batch_invariance.json"), machine_id()
    cached = read_cache(path, ident)
    if model.runtime.tp_world > 1:
        # A split layer's products are collectives, so its ranks must measure the same layers:
        # one view of the cache (two model-parallel groups measuring at once deadlocked when a
        # rank read the file after the other group wrote a key and skipped it).
        from .tp import from_group_leader
        cached = from_group_leader(cached)
    dtype = model.model.compute_dtype
    return {name: safe_rows(model.get_submodule(name), dtype, rows, (path, ident, cached)) for name in names}


@torch.inference_mode()
def half_pads(dtype: torch.dtype, out: int, inp: int) -> bool:
    """Whether a single row through the `half` layout (FBGEMM, layout.HalfLinear) of this shape
    must be padded beyond the few rows (kernels.REGIMES["batch"]) its decode cost is timed at to
    round like ROWS rows (safe_rows: measured once, cached). On the AVX2 EPYC it pads to 3."""
    from .kernels import REGIMES
    from .layout import relayout
    lin = nn.Linear(inp, out, bias=False, device="meta")
    lin.weight = nn.Parameter(torch.randn(out, inp).to(torch.bfloat16).to(dtype), requires_grad=False)
    return safe_rows(relayout(lin, "half"), dtype)[0] > REGIMES["batch"]


def safe_rows(mod: nn.Module, dtype: torch.dtype, rows: int = ROWS, cache: Optional[tuple] = None) -> list:
    """padding_rows for one layer computing in `dtype`, from the cache (path, machine, read
    contents; default: this machine's file) or measured and written to it."""
    from .kernels import cache_path, machine_id, read_cache, write_cache
    if cache is None:
        path, ident = cache_path().with_name("batch_invariance.json"), machine_id()
        cache = (path, ident, read_cache(path, ident))
    path, ident, cached = cache
    key = f"row counts alike {_describe(mod)} as {rows} in {str(dtype).replace('torch.', '')} " \
          f"threads={torch.get_num_threads()}"
    if key not in cached:
        log.info("measuring which row counts round like %d rows for %s (once on this machine, seconds)",
                 rows, _describe(mod))
        cached[key] = _safe_rows(mod, rows, dtype)
        write_cache(path, ident, cached)
    return [int(n) for n in cached[key]]


@torch.inference_mode()
def _safe_rows(mod: nn.Module, rows: int, dtype: torch.dtype, trials: int = TRIALS) -> list:
    """padding_rows for one layer. Two kernels that accumulate in another order differ after
    rounding to bf16 in only a few outputs in a thousand, so each row count is tried on
    `trials` random batches, the rows at the start and at the end of the batch."""
    dev = _first_tensor(mod).device
    g = torch.Generator(device=dev).manual_seed(0)
    xs = [_probe_rows(rows, mod.in_features, g, dev).to(dtype) for _ in range(trials)]
    fulls = [mod(x) for x in xs]
    if not all(torch.equal(mod(x.flip(0)), full.flip(0)) for x, full in zip(xs, fulls)):
        log.warning("%s: a row's result depends on its place in the batch here; batch invariance "
                    "is not guaranteed for it", _describe(mod))
        return [rows]
    return [n for n in range(1, rows + 1)
            if all(torch.equal(mod(x[:n]), full[:n]) and torch.equal(mod(x[rows - n:]), full[rows - n:])
                   for x, full in zip(xs, fulls))]


def _padding(safe: list, rows: int) -> str:
    """How calls of fewer than `rows` rows are padded, e.g. "1-2 -> 3, 7 -> 8, 14 -> 15"."""
    parts, n = [], 1
    while n < rows:
        to = next(s for s in safe if s >= n)
        if to > n:
            parts.append(f"{n}-{to - 1} -> {to}" if to - 1 > n else f"{n} -> {to}")
        n = to + 1
    return ", ".join(parts) or "none"


def _probe_rows(rows: int, width: int, g: torch.Generator, dev) -> torch.Tensor:
    """Random rows whose entries span 2^-8..2^8: products of very different sizes make the
    float32 sums depend on their order far more often than uniform values do, so a different
    kernel shows after rounding."""
    scale = torch.exp2(torch.randint(-8, 9, (rows, width), generator=g, device=dev).float())
    return torch.randn(rows, width, generator=g, device=dev) * scale


def _describe(mod: nn.Module) -> str:
    """A layer's kind for padding_rows: what decides the kernel a product runs."""
    w = getattr(mod, "weight", None)
    layout = "" if not isinstance(w, torch.Tensor) else " col-major" if not w.is_contiguous() else " row-major"
    dtype = str(_first_tensor(mod).dtype).replace("torch.", "")
    lora = " +LoRA" if hasattr(mod, "lora_A") else ""
    extra = f" ({mod.extra_repr()})" if type(mod) is not nn.Linear and mod.extra_repr() else ""
    return f"{type(mod).__name__} {dtype} {mod.out_features}x{mod.in_features}{layout}{lora}{extra}"


def _first_tensor(mod: nn.Module) -> torch.Tensor:
    """The weight that decides the layer's dtype and device (a PackedLinear's is not a parameter)."""
    packed = getattr(mod, "packed", None)
    if isinstance(packed, torch.Tensor):
        return packed
    return next(iter(list(mod.parameters()) + list(mod.buffers())), torch.empty(0))


def compile_every_row(model: nn.Module) -> bool:
    """For long-running servers: every row's one-token attention, short rows too, runs whichever
    of eager and compiled measured faster here (the first row compiles for a few seconds; 16
    mixed rows of about 70 tokens: 3.2 ms a layer eager, 2.1 compiled on the AMD EPYC).
    False where neither is set (make_batch_invariant, compile.measured_single_rows)."""
    if model.runtime.row_attention is None:
        return False
    model.runtime.row_attention.from_tokens = 1
    return True


def _pad_rows(mod: nn.Module, safe: list) -> list:
    """Hooks around `mod` (no weight touched, state_dict keys unchanged): inputs of a row count
    not in `safe` (ascending) run padded with zero rows to the next count in it, and the output
    is cut back; more rows than its last run as they are. -> the hook handles."""
    real = []                                     # the shape of the call in flight (None: not padded)

    def before(_mod, args):
        x = args[0]
        width = x.shape[-1]
        n = x.numel() // width                    # rows = every dimension but the last
        to = next((s for s in safe if s >= n), n)
        if to == n:
            real.append(None)
            return None
        real.append(x.shape)
        return (torch.cat((x.reshape(n, width), x.new_zeros(to - n, width))), *args[1:])     # to,in

    def after(_mod, _args, out):
        shape = real.pop()
        if shape is None:
            return None
        return out[:shape.numel() // shape[-1]].view(*shape[:-1], out.shape[-1])      # ...,out

    return [mod.register_forward_pre_hook(before), mod.register_forward_hook(after)]


def row_starts(mask: Optional[torch.Tensor], B: int, S: int) -> tuple:
    """(first slot each row may attend to, whether every slot from there on is allowed), from
    mask: B|1,1,1,S bool, True = may attend (None = every slot). A row's slots after its first
    are its own (left padding, the server's batch window)."""
    if mask is None:
        return [0] * B, [True] * B
    m = mask.reshape(mask.shape[0], S).expand(B, S)
    first = m.int().argmax(-1)                   # first True (argmax returns the first maximum)
    whole = m.sum(-1) == S - first
    return first.tolist(), whole.tolist()


def attention_by_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: Optional[torch.Tensor] = None, one=single_query_attention) -> torch.Tensor:
    """One-token attention (as models.cogvlm.decode_attention: q B,H,1,D; k, v B,H,S,D) with
    each row over its own slots only: the same product, on the same shapes, as that row alone.
    one: the attention of one row (models.compile.LongContextAttention: compiled for long rows
    where that is faster here)."""
    B, S = q.shape[0], k.shape[2]
    starts, whole = row_starts(mask, B, S)
    out = []
    for i, s in enumerate(starts):
        m = None if whole[i] else mask[i if mask.shape[0] == B else 0, ..., s:][None]   # 1,1,1,S-s
        out.append(one(q[i:i + 1], k[i:i + 1, :, s:], v[i:i + 1, :, s:], m))
    return torch.cat(out) if B > 1 else out[0]                                    # B,H,1,D
