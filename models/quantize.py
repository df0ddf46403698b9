"""4- and 8-bit weight quantization with bitsandbytes, applied after the model is loaded, by
module name. Works on CPU and CUDA and from any load dtype (the original needed fp16 + CUDA).

What is quantized: every linear layer of the decoder (language and vision experts, CogAgent's
cross attention), of the EVA encoders' inner blocks and of the adapter's MLP.
What stays in the load dtype: token embeddings, the LM head, the patch embeddings, every
norm, the adapter's input projection, and the first and last used block of each vision
encoder (their errors reach every image token).
"""
from __future__ import annotations

import re
import warnings

import torch
import torch.nn as nn


def _skip_patterns(model) -> list[re.Pattern]:
    cfg = model.cfg if hasattr(model, "cfg") else model.config
    last_eva = cfg.eva.num_layers - 1
    pats = [r"lm_head", r"model\.embed_tokens", r".*patch_embed", r"model\.vision\.linear_proj\.linear_proj",
            rf"model\.vision\.transformer\.layers\.(0|{last_eva})\.", r"model\.cross_vision\.vit\.model\.head"]
    if cfg.cross is not None:
        last_used = cfg.cross.num_layers - 2          # the last block is skipped in forward
        pats.append(rf"model\.cross_vision\.vit\.model\.blocks\.(0|{last_used}|{last_used + 1})\.")
    return [re.compile(p) for p in pats]


def _bnb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")               # bitsandbytes' jit deprecation warnings
        import bitsandbytes as bnb
    return bnb


def quantized_linear(lin: nn.Linear, bits: int, compute_dtype: torch.dtype) -> nn.Module:
    bnb = _bnb()
    dev = lin.weight.device
    w = lin.weight.data.contiguous()
    if bits == 8:
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                has_fp16_weights=False, threshold=6.0, device="meta")
        q.weight = bnb.nn.Int8Params(w.to(torch.float16 if dev.type == "cuda" else w.dtype),
                                     requires_grad=False, has_fp16_weights=False)
    elif bits == 4:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    else:
        raise ValueError(f"--quant takes 4 or 8, not {bits}")
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.to(compute_dtype), requires_grad=False)
    return q.to(dev)                                   # bitsandbytes quantizes on the move


class _Cast(nn.Module):
    """Runs a quantized linear in its compute dtype and returns the caller's dtype (the
    original's 8-bit CogAgent failed on exactly this Half/Char mix)."""
    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype)).to(x.dtype)


@torch.no_grad()
def quantize(model: nn.Module, bits: int) -> nn.Module:
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    # 8-bit matmuls run in fp16 on CUDA and in fp32 on CPU; 4-bit computes in the load dtype.
    on_cuda = next(model.parameters()).device.type == "cuda"
    compute = (torch.float16 if on_cuda else torch.float32) if bits == 8 else dtype
    skip = _skip_patterns(model)
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not any(p.match(n) for p in skip)]
    for name, lin in targets:
        parent, _, child = name.rpartition(".")
        q = quantized_linear(lin, bits, compute)
        setattr(model.get_submodule(parent), child, _Cast(q, compute) if compute != dtype else q)
    model.quantized_bits = bits
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
