"""Tensor (model) parallelism, applied to a built model by parameter name (never inside the
model classes), with torch.distributed: gloo on CPU, NCCL on CUDA.

The split is SAT's (the layout of its MP=N checkpoint files): column-parallel weights are cut along their
output dimension (QKV with stride 3, cross key_value with stride 2: each of the q/k/v blocks is
cut, so every rank holds whole heads of each), row-parallel weights along their input
dimension with the output summed across ranks. The token embedding and the LM head are cut
along the vocabulary. Every other tensor (norms, biases of row-parallel layers, the patch
embeddings, the adapter, boi/eoi) is replicated.

EVA2-CLIP-L (CogAgent's high-res encoder) normalises over all heads inside attention and over
the whole inner MLP width (`inner_attn_ln`, `ffn_ln`); those LayerNorms are cut with their
inputs and take their mean and variance across ranks (two small all-reduces).

`SHARD_RULES` is also the file format of MP=N checkpoints (utils/merge_model.py).
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import sys
import time
from typing import NoReturn, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# (regex on our parameter names, dim, stride). First match wins; no match = replicated.
_L = r"model\.layers\.\d+\."
_V = r"model\.vision\.transformer\.layers\.\d+\."
_X = r"model\.cross_vision\.vit\.model\.blocks\.\d+\."
SHARD_RULES = [(re.compile(p + "$"), dim, stride) for p, dim, stride in [
    (r"model\.embed_tokens\.weight", 0, 1),
    (r"lm_head\.weight", 0, 1),
    (_L + r"self_attn\.(language|vision)_expert_query_key_value\.weight", 0, 3),
    (_L + r"self_attn\.(language|vision)_expert_dense\.weight", 1, 1),
    (_L + r"mlp\.(language|vision)_mlp\.(gate|up)_proj\.weight", 0, 1),
    (_L + r"mlp\.(language|vision)_mlp\.down_proj\.weight", 1, 1),
    (_L + r"cross_attn\.query\.weight", 0, 1),
    (_L + r"cross_attn\.key_value\.weight", 0, 2),
    (_L + r"cross_attn\.dense\.weight", 1, 1),
    (_V + r"attention\.query_key_value\.(weight|bias)", 0, 3),
    (_V + r"attention\.dense\.weight", 1, 1),
    (_V + r"mlp\.fc1\.(weight|bias)", 0, 1),
    (_V + r"mlp\.fc2\.weight", 1, 1),
    (_X + r"attn\.(q_proj|k_proj|v_proj)\.weight", 0, 1),
    (_X + r"attn\.(q_bias|v_bias)", 0, 1),
    (_X + r"attn\.inner_attn_ln\.(weight|bias)", 0, 1),
    (_X + r"attn\.proj\.weight", 1, 1),
    (_X + r"mlp\.(w1|w2)\.(weight|bias)", 0, 1),
    (_X + r"mlp\.ffn_ln\.(weight|bias)", 0, 1),
    (_X + r"mlp\.w3\.weight", 1, 1),
]]


def shard_spec(name: str) -> Optional[tuple[int, int]]:
    """(dim, stride) for a parameter cut across ranks, None for a replicated one.
    LoRA adapters follow their base weight: B [out, r] is cut like a column-parallel weight,
    A [r, in] like a row-parallel one; the other matrix is replicated."""
    if name.endswith((".lora_A", ".lora_B")):
        base = shard_spec(name[: -len(".lora_A")] + ".weight")
        if base is None or (base[0] == 0) != name.endswith("B"):
            return None
        return base
    for pat, dim, stride in SHARD_RULES:
        if pat.match(name):
            return dim, stride
    return None


def shard_tensor(t: torch.Tensor, dim: int, stride: int, rank: int, world: int, name: str = "") -> torch.Tensor:
    """Rank `rank`'s piece: each of the `stride` blocks along `dim` is cut into `world` parts."""
    if t.shape[dim] % (stride * world):
        raise ValueError(f"{name}: dimension {dim} of shape {tuple(t.shape)} does not split into "
                         f"{stride} block(s) x {world} ranks")
    blocks = t.chunk(stride, dim)
    return torch.cat([b.chunk(world, dim)[rank] for b in blocks], dim).contiguous()


def merge_tensors(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of shard_tensor over all ranks' pieces."""
    per_rank = [p.chunk(stride, dim) for p in parts]                   # world x stride
    return torch.cat([torch.cat([r[s] for r in per_rank], dim) for s in range(stride)], dim)


# ----------------------------------------------------------------------------------------
# The process group the model is split over: every process (None) unless training combines
# data and model parallelism (utils/training/finetune.py makes groups of model_parallel_size ranks).
_GROUP = None


def set_group(group) -> None:
    global _GROUP
    _GROUP = group


class ModelParallelGroups:
    """Ranks [k*mp, (k+1)*mp) split one model (tensor parallel); ranks with the same
    model-parallel rank form a data-parallel group. (Also the `mpu` DeepSpeed asks for.)"""

    def __init__(self, mp: int):
        rank, world = dist.get_rank(), dist.get_world_size()
        if world % mp:
            raise ValueError(f"model-parallel size {mp} does not divide the {world} processes")
        self.mp, self.dp = mp, world // mp
        self.mp_group = self.dp_group = None
        for k in range(self.dp):                          # every rank creates every group
            g = dist.new_group(list(range(k * mp, (k + 1) * mp)))
            if rank // mp == k:
                self.mp_group = g
        for m in range(mp):
            g = dist.new_group(list(range(m, world, mp)))
            if rank % mp == m:
                self.dp_group = g

    def get_model_parallel_rank(self):
        return dist.get_rank(self.mp_group)

    def get_model_parallel_world_size(self):
        return self.mp

    def get_model_parallel_group(self):
        return self.mp_group

    def get_data_parallel_rank(self):
        return dist.get_rank(self.dp_group)

    def get_data_parallel_world_size(self):
        return self.dp

    def get_data_parallel_group(self):
        return self.dp_group


def group_rank_world() -> tuple[int, int]:
    return dist.get_rank(_GROUP), dist.get_world_size(_GROUP)


def from_group_leader(obj):
    """`obj` as the first rank of the model's group has it (a collective: every rank of the group
    calls it). For rank-local state that decides which collectives run, such as a cache file
    that another group's ranks may be writing while this group reads it."""
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(_GROUP, 0) if _GROUP is not None else 0, group=_GROUP)
    return box[0]


# Collectives with the gradients of Megatron's f/g operators, so that training works too.
class _AllReduce(torch.autograd.Function):
    """Forward: sum over ranks. Backward: identity (the output is replicated)."""
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        dist.all_reduce(x, group=_GROUP)
        return x

    @staticmethod
    def backward(ctx, g):
        return g


class _CopyToRanks(torch.autograd.Function):
    """Forward: identity. Backward: sum the gradient over ranks (the input is replicated)."""
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=_GROUP)
        return g


class _GatherLast(torch.autograd.Function):
    """Forward: concatenate every rank's piece along the last dim. Backward: own piece."""
    @staticmethod
    def forward(ctx, x):
        rank, world = group_rank_world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=_GROUP)
        ctx.rank, ctx.n = rank, x.shape[-1]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return g[..., ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n].contiguous()


class _AllReduceBoth(_AllReduce):
    """Forward and backward: sum over ranks (a replicated statistic that each rank then applies
    to its own piece, e.g. a sharded LayerNorm's mean)."""
    @staticmethod
    def backward(ctx, g):
        return _CopyToRanks.backward(ctx, g)


def _split() -> bool:
    """Whether this process is one of several tensor-parallel ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(_GROUP) > 1


def all_reduce(x):
    return _AllReduce.apply(x) if _split() else x


def copy_to_ranks(x):
    return _CopyToRanks.apply(x) if torch.is_grad_enabled() and _split() else x


class ColumnParallelLinear(nn.Linear):
    """Output features cut across ranks; the (replicated) input's gradient is summed."""
    def forward(self, x):
        return F.linear(copy_to_ranks(x), self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """Input features cut across ranks; partial outputs summed, then the (replicated) bias."""
    def forward(self, x):
        y = all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


class GatheredLinear(ColumnParallelLinear):
    """The LM head: vocabulary cut across ranks, logits gathered (every rank samples alike)."""
    def forward(self, x):
        return _GatherLast.apply(super().forward(x))


class VocabParallelEmbedding(nn.Embedding):
    """Each rank holds rows [start, start + n) of the table; others contribute zeros."""
    def forward(self, ids):
        start = group_rank_world()[0] * self.num_embeddings
        local = ids - start
        outside = (local < 0) | (local >= self.num_embeddings)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(h.masked_fill(outside[..., None], 0.0))


class ShardedLayerNorm(nn.LayerNorm):
    """LayerNorm over a feature dimension cut across ranks: mean and variance are summed over
    ranks before normalising the local piece."""
    def forward(self, x):
        n = x.shape[-1] * group_rank_world()[1]
        xf = x.float()
        mean = _AllReduceBoth.apply(xf.sum(-1, keepdim=True)) / n
        var = _AllReduceBoth.apply((xf - mean).pow(2).sum(-1, keepdim=True)) / n
        y = ((xf - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)
        return y * self.weight + self.bias


# ----------------------------------------------------------------------------------------
def init_distributed(device: str = "cpu", timeout_s: float = None) -> tuple[int, int]:
    """Join the torchrun group (RANK/WORLD_SIZE set by torchrun): gloo on CPU, NCCL on CUDA.
    Collectives give up after `timeout_s` (env COGVLM_DIST_TIMEOUT, default 600 s) instead of
    hanging when a peer died. Returns (rank, world); (0, 1) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        timeout_s = timeout_s or float(os.environ.get("COGVLM_DIST_TIMEOUT", "600"))
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def exit_process(status: int = 0) -> NoReturn:
    """End a script's process with `status`. Under torchrun, after a successful run every rank
    first waits for the others: a gloo barrier, then a second one through the rendezvous store
    (a rank that leaves the gloo barrier first and closes its sockets while a peer has not yet
    read the barrier's last message makes that peer's gloo thread throw "Connection closed by
    peer", SIGABRT). Rank 0 leaves last: it may host the store the others still talk to. Then
    the process ends without tearing the process groups down or finalizing the interpreter: that
    teardown (gloo's C++ objects and threads, racing the peers' own) is the likely place where a
    rank of 4 aborted in one CI run ("terminate called without an active exception"). The kernel
    closes the sockets; Python's logs and streams are flushed first. Outside torchrun:
    sys.exit(status)."""
    if not (dist.is_available() and dist.is_initialized()):
        sys.exit(status)
    if status == 0:                      # after an error the peers may not reach the barriers
        try:
            dist.barrier()
            _store_barrier("cogvlm/exit")
            _leave_store("cogvlm/exit")
        except Exception as e:           # a peer died or timed out: say so, exit non-zero
            print(f"error: leaving the torchrun group: {e}", file=sys.stderr)
            status = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _store_barrier(key: str) -> None:
    """Wait until every rank has reached this point, through the key-value store (no sockets
    between ranks involved); gives up after the store's timeout."""
    store, world = dist.distributed_c10d._get_default_store(), dist.get_world_size()
    if store.add(key, 1) == world:             # the last rank to arrive opens the gate
        store.set(key + "/open", "1")
    store.wait([key + "/open"])


def _leave_store(key: str) -> None:
    """Rank 0 leaves last. Without torchrun's agent (DeepSpeed's launcher, env:// setups) rank 0
    hosts the store: leaving right after the gate opened could close it while a peer still waits
    for the gate's answer ("Failed to recv, got 0 bytes", seen once in CI). The other ranks say
    they are through; an error on that last message is harmless (everyone passed the gate)."""
    store, world = dist.distributed_c10d._get_default_store(), dist.get_world_size()
    if dist.get_rank() != 0:
        try:
            store.add(key + "/left", 1)
        except Exception:                       # rank 0 counted it and left before answering
            pass
        return
    deadline = time.monotonic() + store.timeout.total_seconds()
    while store.add(key + "/left", 0) < world - 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{world - 1 - store.add(key + '/left', 0)} rank(s) never left")
        time.sleep(0.01)


def tp_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _swap(module: nn.Module, cls: type) -> None:
    module.__class__ = cls


@torch.no_grad()
def apply_tensor_parallel(model: nn.Module, rank: int, world: int, sliced: bool = False) -> nn.Module:
    """Cut the model's weights for `rank` of `world` and swap in the parallel forwards.
    sliced=True: the weights already are this rank's pieces (loaded from an MP=N shard file);
    only the forwards change."""
    if world == 1:
        return model
    for name, p in list(model.named_parameters()):
        spec = shard_spec(name)
        if spec is not None and not sliced:
            p.data = shard_tensor(p.data, *spec, rank, world, name)
    for name, mod in model.named_modules():
        spec = shard_spec(name + ".weight")
        if spec is None:
            continue
        if isinstance(mod, nn.Embedding):
            mod.num_embeddings = mod.weight.shape[0]
            _swap(mod, VocabParallelEmbedding)
        elif isinstance(mod, nn.LayerNorm):
            mod.normalized_shape = tuple(mod.weight.shape)
            _swap(mod, ShardedLayerNorm)
        elif isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
            _swap(mod, GatheredLinear if name == "lm_head" else
                  RowParallelLinear if spec[0] == 1 else ColumnParallelLinear)
    for mod in model.modules():                       # attention modules read their head count
        if hasattr(mod, "num_heads"):
            if mod.num_heads % world:
                raise ValueError(f"{mod.num_heads} attention heads do not split across {world} ranks")
            mod.num_heads //= world
    model.runtime.tp_world = world
    return model
