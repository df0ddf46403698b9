"""Everything a finetuning run builds before its first step: the seconds-cheap preflight
checks, the process groups (data parallel over tensor-parallel groups, models/tp.py), the
model (LoRA / QLoRA / full, what trains), and the DeepSpeed engine (ZeRO-2, AdamW, cosine)."""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from models.checkpoint import CheckpointError, read_sat_state_dict
from models.loading import LoadOptions, QuantConfig, load_model, resolve_pretrained
from models.lora import LoRAConfig, apply_lora
from utils.training.nodes import check_mp_per_node, collective_timeout, start_process_group
from utils.training.options import DataOptions, FinetuneOptions, ModelSource, OptimOptions, RunOptions, TrainedParams

log = logging.getLogger("finetune")


def preflight(opts: FinetuneOptions) -> None:
    """Seconds-cheap checks of everything a run needs before any process group, DeepSpeed op
    build or model load: raises with one line naming what is wrong."""
    check_model(opts.model.from_pretrained, opts.params.use_qlora, opts.optim.model_parallel_size)
    for flag in ("train_data", "valid_data", "test_data"):
        d = getattr(opts.data, flag)
        if d and not Path(d).is_dir():
            raise FileNotFoundError(f"--{flag} {d} is not a directory")
    if not opts.run.eval_only:
        check_save_dir(opts.run)


def check_model(source: str, qlora: bool, mp_size: int) -> None:
    if qlora and mp_size > 1:
        raise ValueError("--use_qlora with --model_parallel_size > 1 is not supported (bitsandbytes cannot "
                         "re-pack a 4-bit weight split across ranks for evaluation); use "
                         "--model_parallel_size 1 (a QLoRA run fits one GPU), or LoRA with model parallel")
    src = resolve_pretrained(source)                         # ModelNotFound names where it looked
    if not (src / "model_config.json").is_file() and not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: neither model_config.json (SAT format) nor config.json (HF format)")
    if qlora and not (src / "model_config.json").is_file():
        raise CheckpointError(f"{src}: --use_qlora reads SAT checkpoints; convert this HF one first "
                              f"(utils/convert_checkpoint.py hf2sat)")


def check_save_dir(run: RunOptions) -> None:
    """--save: a writable directory, holding a complete checkpoint exactly when --resume."""
    save = Path(run.save)
    if save.exists() and not save.is_dir():
        raise FileExistsError(f"--save {save} is a file, not a directory")
    if run.resume:
        if not (save / "latest").is_file():
            raise FileNotFoundError(f"--resume: {save} holds no checkpoint ('latest' missing)")
        step = (save / "latest").read_text().strip()
        if not (save / "ds_state" / step).is_dir():
            raise FileNotFoundError(f"--resume: {save / 'ds_state' / step} (the optimizer and scheduler "
                                    f"state of step {step}) is missing; continue without it by finetuning "
                                    f"from {save} with a new --save")
    elif (save / "latest").exists():
        raise FileExistsError(f"{save} already holds a checkpoint: pass --resume to continue it, "
                              f"or choose another --save directory")
    probe = save if save.exists() else next(p for p in save.absolute().parents if p.exists())
    if not os.access(probe, os.W_OK):
        raise PermissionError(f"--save {save}: {probe} is not writable")


# ----------------------------------------------------------------------------------------
@dataclass
class Worker:
    """This process: its ranks (data parallel over model-parallel groups), device and training dtype."""
    rank: int
    mp_rank: int
    dp_rank: int
    dp: int                                   # data-parallel size
    groups: object                            # models.tp.ModelParallelGroups (DeepSpeed's mpu)
    device: str                               # "cpu" or this rank's "cuda:N"
    dtype: torch.dtype                        # the weights' dtype
    autocast_bf16: bool                       # CPU with bfloat16: autocast over fp32 weights

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    @property
    def dp_group(self):
        return self.groups.dp_group


def init_distributed(model: ModelSource, mp_size: int, opts: Optional[FinetuneOptions] = None) -> Worker:
    """The process group (nccl on CUDA, gloo on CPU), the model/data-parallel groups and the
    training dtype: on CUDA the weights' dtype (DeepSpeed's bf16/fp16 mode); on a CPU fp32
    weights, and bfloat16 means autocast (bf16 matrix products, fp32 master weights and optimizer).
    Across nodes: model parallel stays inside a node, every node must run the same configuration
    (`opts`, checked before anything else is built), and a lost node ends the run with one line."""
    from models.loading import resolve_dtype
    from models.tp import ModelParallelGroups, set_group
    check_mp_per_node(mp_size)
    device = model.device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = f"cuda:{torch.cuda.current_device()}"
    start_process_group("nccl" if cuda else "gloo", opts)
    groups = ModelParallelGroups(mp_size)
    for g in {groups.mp_group, groups.dp_group} - {None}:          # new groups default to 30 minutes
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=collective_timeout()), g)
    set_group(groups.mp_group)
    wanted = resolve_dtype(model.dtype, device)
    worker = Worker(dist.get_rank(), groups.get_model_parallel_rank(), groups.get_data_parallel_rank(), groups.dp,
                  groups, device, wanted if cuda else torch.float32, not cuda and wanted == torch.bfloat16)
    if worker.is_main and worker.autocast_bf16:
        log.info("training with bf16 autocast on CPU (fp32 weights)")
    return worker


def load_for_training(source: str, trust: bool, worker: Worker, mp_size: int, qlora: bool):
    """(model, cfg) for training: this rank's tensor-parallel piece in the training dtype, no
    CPU inference re-layout nor batch-invariant decoding (it pads few-row products and encodes
    images one at a time: inference only); QLoRA quantizes the base to 4 bits while it is read
    (the bf16 model is never held)."""
    return load_model(source, LoadOptions(device=worker.device, dtype=worker.dtype, trust_checkpoint=trust,
                                          cpu_layout=False, rank=worker.mp_rank, world=mp_size,
                                          quant=QuantConfig(bits=4 if qlora else None), deterministic=False))


def quantized_base(source: str, trust: bool, worker: Worker, mp_size: int) -> dict:
    """QLoRA: the checkpoint's own weights (memory-mapped), saved in place of the 4-bit ones."""
    return read_sat_state_dict(resolve_pretrained(source), trust, worker.mp_rank, mp_size)


def add_adapters(model, cfg, params: TrainedParams, seed: int) -> None:
    """LoRA adapters as the flags ask (none with --full, none over a LoRA checkpoint's own)."""
    if "lora" in cfg.extra or params.lora_rank <= 0 or params.full:
        return
    lcfg = LoRAConfig(rank=params.lora_rank, alpha=params.lora_alpha or params.lora_rank,
                      layer_range=list(range(*params.layer_range)) if params.layer_range else None,
                      vision_expert=params.lora_vision_expert, vit=params.lora_vit)
    torch.manual_seed(seed)                                  # identical adapters on every data rank
    apply_lora(model, lcfg)
    cfg.extra["lora"] = lcfg.to_json()


def freeze_for_training(model, params: TrainedParams) -> tuple[int, int]:
    """requires_grad only on what trains. Returns (trainable, total) parameter counts."""
    from models.quantize import QUANTIZED              # weights kept as buffers
    from models.tp import shard_spec
    extra = re.compile(params.train_params) if params.train_params else None
    for name, p in model.named_parameters():
        p.requires_grad = bool(params.full or name.endswith((".lora_A", ".lora_B")) or name.startswith("aux_heads.")
                               or (extra is not None and extra.search(name))) and p.is_floating_point()
    split = model.runtime.tp_world > 1            # tensor parallel
    for name, p in model.named_parameters():
        # DeepSpeed counts a model-parallel piece on every rank and a replicated tensor once
        # (on model-parallel rank 0) when it takes the gradient norm for clipping.
        p.model_parallel = p.tensor_model_parallel = split and shard_spec(name) is not None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # a 4-bit weight holds two values per byte: count the weights it stands for
    total = sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
                for p in model.parameters())
    total += sum(m.weight_count for m in model.modules() if isinstance(m, QUANTIZED))
    return trainable, total


def checkpoint_layers(model) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations."""
    from torch.utils.checkpoint import checkpoint
    for layer in model.model.layers:
        inner = layer.forward
        layer.forward = lambda *a, _f=inner: checkpoint(_f, *a, use_reentrant=False)


# ----------------------------------------------------------------------------------------
def ds_config(optim: OptimOptions, dtype: torch.dtype, cuda: bool) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": optim.batch_size,
        "gradient_accumulation_steps": optim.gradient_accumulation_steps,
        "gradient_clipping": optim.clip_grad,
        "zero_optimization": {"stage": 2, "contiguous_gradients": False, "overlap_comm": False,
                              "reduce_scatter": True, "allgather_bucket_size": 5e7,
                              "reduce_bucket_size": 5e7},
        "zero_allow_untested_optimizer": True,         # torch AdamW (DeepSpeed's needs CUDA)
        "bf16": {"enabled": bool(cuda and dtype == torch.bfloat16)},
        "fp16": {"enabled": bool(cuda and dtype == torch.float16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if optim.deepspeed_config:
        with open(optim.deepspeed_config) as f:
            cfg.update(json.load(f))
    return cfg


def cosine_with_warmup(step: int, total: int, warmup: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def lr_factor(step: int, optim: OptimOptions, aux_iters: int) -> float:
    """With --aux_warmup_iters the encoder-only steps get a warm-up then a constant rate, and the
    full steps their own warm-up and cosine (the language model starts at the full rate)."""
    full = optim.train_iters - aux_iters
    warmup = max(1, int(optim.warmup * full))
    if step < aux_iters:
        return cosine_with_warmup(step, aux_iters, warmup, 1.0)
    return cosine_with_warmup(step - aux_iters, full, warmup, optim.min_lr_ratio)


def build_engine(model, optim: OptimOptions, data: DataOptions, worker: Worker):
    """(DeepSpeed engine, LR scheduler): AdamW over the trainable parameters, ZeRO-2."""
    import deepspeed
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, optim, data.aux_warmup_iters))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config(optim, worker.dtype, worker.cuda), mpu=worker.groups,
                                           dist_init_required=False)
    return engine, scheduler


def resume_step(run: RunOptions, dp: int = 1) -> Optional[int]:
    """--resume: the step of --save's latest checkpoint (preflight checked the files), saved by
    `dp` data-parallel groups: ZeRO-2 cannot re-partition its optimizer state for another count."""
    if not run.resume:
        return None
    step = int((Path(run.save) / "latest").read_text().strip())
    saved = len(list((Path(run.save) / "ds_state" / str(step)).glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")))
    if saved and saved != dp:
        raise ValueError(f"--resume: step {step} of {run.save} was saved by {saved} data-parallel group(s), this run "
                         f"has {dp}; resume with {saved} x --model_parallel_size processes in all (nodes x processes "
                         f"per node; ZeRO-2 cannot re-partition its optimizer state)")
    return step
