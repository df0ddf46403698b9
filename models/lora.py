"""LoRA adapters, applied to a built (optionally quantized or tensor-parallel) model by module
name: each target projection gets two small parameters, `lora_A` [r, in] and `lora_B` [out, r],
and a forward hook adding `scaling * x A^T B^T` to its output. The base weight is untouched
(and frozen by the trainer), so any base module works: nn.Linear, a tensor-parallel linear,
a bitsandbytes 4-bit linear (QLoRA).

Checkpoints store them beside the base weight in SAT naming: `<base key>.lora_A` /
`.lora_B` (base key without `.weight`); `model_config.json` records the adapter settings
under "lora" so that the checkpoint loads back with its adapters. `merge_lora_state` folds
them into the base weights (utils/merge_model.py --merge-lora).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LoRAConfig:
    rank: int = 10
    alpha: float = 10.0
    layer_range: Optional[list] = None      # decoder layers that get adapters; None = all
    vision_expert: bool = False             # also the vision experts' QKV / dense
    vit: bool = False                       # also the low-res ViT's attention (all its layers)
    targets: list = field(default_factory=list)   # filled by apply_lora: module names

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "LoRAConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def target_names(model: nn.Module, lcfg: LoRAConfig) -> list[str]:
    """Attention QKV and output projections of the language expert in `layer_range`,
    CogAgent's cross attention in those layers, and on request the vision experts and the ViT."""
    cfg = model.config
    layers = lcfg.layer_range if lcfg.layer_range is not None else range(cfg.num_layers)
    if any(not 0 <= i < cfg.num_layers for i in layers):
        raise ValueError(f"LoRA layer_range {min(layers)}..{max(layers)} is outside the model's "
                         f"{cfg.num_layers} layers (0..{cfg.num_layers - 1})")
    names = []
    for i in layers:
        p = f"model.layers.{i}."
        names += [p + "self_attn.language_expert_query_key_value", p + "self_attn.language_expert_dense"]
        if lcfg.vision_expert:
            names += [p + "self_attn.vision_expert_query_key_value", p + "self_attn.vision_expert_dense"]
        if cfg.cross is not None:
            names += [p + f"cross_attn.{n}" for n in ("query", "key_value", "dense")]
    if lcfg.vit:
        for j in range(cfg.eva.num_layers):
            p = f"model.vision.transformer.layers.{j}.attention."
            names += [p + "query_key_value", p + "dense"]
    return names


def _features(mod: nn.Module) -> tuple[int, int]:
    inner = getattr(mod, "inner", mod)               # quantize._Cast wraps the bnb linear
    return inner.in_features, inner.out_features


def _lora_hook(mod, inputs, out):
    from .tp import RowParallelLinear, all_reduce, copy_to_ranks
    x = inputs[0]
    A, B = mod.lora_A, mod.lora_B
    if isinstance(mod, RowParallelLinear):           # input cut across ranks: sum x A^T first
        delta = F.linear(all_reduce(F.linear(x.to(A.dtype), A)), B)
    else:   # A is replicated but feeds this rank's rows of B: sum its input gradient over ranks
        delta = F.linear(copy_to_ranks(F.linear(x.to(A.dtype), A)), B)
    return out + (delta * mod.lora_scaling).to(out.dtype)


def apply_lora(model: nn.Module, lcfg: LoRAConfig, dtype: Optional[torch.dtype] = None) -> list[str]:
    """Add adapters (A random as in the LoRA paper, B zero: the model starts unchanged).
    Returns the names of the adapted modules. Under tensor parallelism A of a row-parallel
    module and B of a column-parallel one are this rank's pieces (tp.py's rules)."""
    from .tp import RowParallelLinear, group_rank_world
    names = target_names(model, lcfg)
    ref = next(p for p in model.parameters() if p.is_floating_point())
    dtype = dtype or ref.dtype
    for name in names:
        mod = model.get_submodule(name)
        fin, fout = _features(mod)
        row = isinstance(mod, RowParallelLinear)
        rank, world = group_rank_world() if row else (0, 1)
        # Drawn at full size and cut, so that a tensor-parallel run starts where one process would.
        A = torch.empty(lcfg.rank, fin * world, device=ref.device, dtype=dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        A = A[:, rank * fin:(rank + 1) * fin].contiguous()
        mod.lora_A = nn.Parameter(A)
        mod.lora_B = nn.Parameter(torch.zeros(fout, lcfg.rank, device=ref.device, dtype=dtype))
        mod.lora_scaling = lcfg.scaling
        # First among the module's hooks: it then sees the inputs and output of the product
        # itself (batch-invariant padding, models/invariant.py, cuts the output after it).
        mod.register_forward_hook(_lora_hook, prepend=True)
    lcfg.targets = names
    model.runtime.lora = lcfg
    return names


def has_adapter(mod: nn.Module) -> bool:
    return hasattr(mod, "lora_A")


def carry_adapter(old: nn.Module, new: nn.Module, A: Optional[torch.Tensor] = None,
                  B: Optional[torch.Tensor] = None) -> nn.Module:
    """Put `old`'s adapter (or the given A, B) on `new`, the module replacing it (a packed or
    quantized form of the same product): the adapter is a hook on the module itself and would
    otherwise be dropped with it."""
    new.lora_A = nn.Parameter(old.lora_A if A is None else A, requires_grad=old.lora_A.requires_grad)
    new.lora_B = nn.Parameter(old.lora_B if B is None else B, requires_grad=old.lora_B.requires_grad)
    new.lora_scaling = old.lora_scaling
    new.register_forward_hook(_lora_hook, prepend=True)
    return new


def is_lora_key(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


_LORA_KEY = re.compile(r"(.*)\.lora_([AB])$")


@torch.no_grad()
def merge_lora_state(sd: dict, scaling: float) -> dict:
    """A state dict (any naming) with `X.weight`, `X.lora_A`, `X.lora_B` -> `X.weight` +
    scaling * B @ A, adapters dropped. Works on one tensor-parallel shard as well: a
    column-parallel shard holds its rows of B and W, a row-parallel one its columns of A and W."""
    out = {}
    for k, v in sd.items():
        m = _LORA_KEY.match(k)
        if m:
            continue
        base = k[: -len(".weight")] if k.endswith(".weight") else None
        if base is not None and base + ".lora_A" in sd:
            A, B = sd[base + ".lora_A"].float(), sd[base + ".lora_B"].float()
            v = (v.float() + scaling * (B @ A)).to(v.dtype)
        out[k] = v
    return out
