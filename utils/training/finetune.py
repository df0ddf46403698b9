"""Finetuning CogVLM / CogAgent with DeepSpeed: LoRA (default), QLoRA, or full parameters.

Launch with `torchrun --nproc-per-node N` or `deepspeed --num_gpus N` (finetune_demo/*.sh):
data parallel over N / model_parallel_size groups, tensor parallel inside each group
(models/tp.py). ZeRO-2, bf16 on CUDA, fp32 on CPU (gloo).

Checkpoints (`--save DIR`, every --save_interval steps and at the end), in the SAT layout:
    DIR/model_config.json        (with "lora": the adapter settings, when LoRA is on)
    DIR/<step>/mp_rank_XX_model_states.pt   {'module': SAT-named weights, 'iteration': step}
    DIR/ds_state/<step>/...      DeepSpeed's optimizer / scheduler state (ZeRO partitions)
    DIR/latest                   written last, after every rank finished: a run killed while
                                 saving resumes from the previous complete checkpoint.
`--resume` continues from DIR/latest with the same data order (the order is a function of
--seed and the step), so a killed and resumed run ends where an uninterrupted one does.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from models.checkpoint import atomic_write, read_sat_state_dict, remove_stale_temporaries, sat_key
from models.loading import load_model, resolve_pretrained
from models.lora import LoRAConfig, apply_lora
import utils.apps.args as common
from utils.apps.flags import ArgumentParser
from utils.training.dataset import FinetuneDataset, collate_train, packed_attention_mask
from utils.chat.tokenizer import Tokenizer, resolve_tokenizer

log = logging.getLogger("finetune")


def add_finetune_args(p: argparse.ArgumentParser, default_model: str) -> None:
    common.add_model_args(p, default_model)
    g = p.add_argument_group("data")
    g.add_argument("--train_data", default=None, help="captcha folder or images/ + labels/ folder")
    g.add_argument("--valid_data", default=None)
    g.add_argument("--test_data", default=None, help="evaluated once at the end")
    g.add_argument("--max_length", type=int, default=400, help="training row length cap (tokens)")
    g.add_argument("--aux_object_loss", type=float, default=0.0, metavar="WEIGHT",
                   help="with object labels (utils/data/synthetic.py): also train small heads on the "
                        "low-res ViT's patches to predict the kind, colour and box of the object under "
                        "each patch (training only; the heads are not saved in the model)")
    g.add_argument("--aux_warmup_iters", type=int, default=0, metavar="N",
                   help="with --aux_object_loss: the first N of the --train_iters steps run only the image "
                        "encoder(s) and train them on the per-patch loss (the language model is not run, so "
                        "a step costs a fraction of a full one)")
    g.add_argument("--pack_questions", action="store_true",
                   help="train the single-turn questions of one image together in one row "
                        "(image encoded once; each question masked from the others)")
    g = p.add_argument_group("training")
    g.add_argument("--train_iters", type=int, default=2000, help="optimizer steps")
    g.add_argument("--batch_size", type=int, default=4, help="rows per process per micro-step")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--min_lr_ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    g.add_argument("--warmup", type=float, default=0.02, help="warm-up steps, as a fraction of train_iters")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--clip_grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--checkpoint_activations", action="store_true", help="recompute layers in backward")
    g.add_argument("--model_parallel_size", type=int, default=1)
    g.add_argument("--deepspeed_config", default=None, help="JSON file overriding our ZeRO-2 config")
    g.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher
    g = p.add_argument_group("what trains")
    g.add_argument("--lora_rank", type=int, default=10, help="0 = no LoRA")
    g.add_argument("--lora_alpha", type=float, default=None, help="default: lora_rank (scaling 1)")
    g.add_argument("--layer_range", type=int, nargs=2, default=None, metavar=("FIRST", "END"),
                   help="decoder layers [FIRST, END) that get adapters (default: all)")
    g.add_argument("--lora_vision_expert", action="store_true", help="adapters on the vision experts too")
    g.add_argument("--lora_vit", action="store_true", help="adapters on the low-res ViT's attention too")
    g.add_argument("--use_qlora", action="store_true", help="4-bit frozen base (bitsandbytes nf4) + LoRA")
    g.add_argument("--full", action="store_true", help="train every parameter (no LoRA)")
    g.add_argument("--train_params", default=None,
                   help="regex: parameters (our names, e.g. 'model.vision.linear_proj') that train too")
    g = p.add_argument_group("checkpoints, logs, evaluation")
    g.add_argument("--save", default=None, help="checkpoint directory (required unless --eval_only)")
    g.add_argument("--eval_only", action="store_true",
                   help="no training: score --from_pretrained on --valid_data / --test_data")
    g.add_argument("--save_interval", type=int, default=200)
    g.add_argument("--resume", action="store_true", help="continue from --save's latest checkpoint")
    g.add_argument("--log_interval", type=int, default=10)
    g.add_argument("--eval_interval", type=int, default=200)
    g.add_argument("--eval_samples", type=int, default=64, help="validation samples per evaluation")
    g.add_argument("--eval_max_new_tokens", type=int, default=32)
    p.add_argument("--preflight", action="store_true",
                   help="only check the model, data and --save directory, then exit (the launchers "
                        "run this before starting any process)")


def preflight(args) -> None:
    """Seconds-cheap checks of everything a run needs before any process group, DeepSpeed op
    build or model load: raises with one line naming what is wrong."""
    from models.checkpoint import CheckpointError
    if args.use_qlora and args.model_parallel_size > 1:
        raise ValueError("--use_qlora with --model_parallel_size > 1 is not supported (bitsandbytes cannot "
                         "re-pack a 4-bit weight split across ranks for evaluation); use "
                         "--model_parallel_size 1 (a QLoRA run fits one GPU), or LoRA with model parallel")
    src = resolve_pretrained(args.from_pretrained)           # ModelNotFound names where it looked
    if not (src / "model_config.json").is_file() and not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: neither model_config.json (SAT format) nor config.json (HF format)")
    if args.use_qlora and not (src / "model_config.json").is_file():
        raise CheckpointError(f"{src}: --use_qlora reads SAT checkpoints; convert this HF one first "
                              f"(utils/convert_checkpoint.py hf2sat)")
    for flag in ("train_data", "valid_data", "test_data"):
        d = getattr(args, flag)
        if d and not Path(d).is_dir():
            raise FileNotFoundError(f"--{flag} {d} is not a directory")
    if args.eval_only:
        return
    save = Path(args.save)
    if save.exists() and not save.is_dir():
        raise FileExistsError(f"--save {save} is a file, not a directory")
    if args.resume:
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
def ds_config(args, cuda: bool) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_clipping": args.clip_grad,
        "zero_optimization": {"stage": 2, "contiguous_gradients": False, "overlap_comm": False,
                              "reduce_scatter": True, "allgather_bucket_size": 5e7,
                              "reduce_bucket_size": 5e7},
        "zero_allow_untested_optimizer": True,         # torch AdamW (DeepSpeed's needs CUDA)
        "bf16": {"enabled": bool(cuda and getattr(args, "train_dtype", None) == torch.bfloat16)},
        "fp16": {"enabled": bool(cuda and getattr(args, "train_dtype", None) == torch.float16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if args.deepspeed_config:
        with open(args.deepspeed_config) as f:
            cfg.update(json.load(f))
    return cfg


def cosine_with_warmup(step: int, total: int, warmup: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def batch_indices(n: int, step: int, micro: int, global_batch: int, accum: int, dp_rank: int,
                  batch: int, seed: int) -> list[int]:
    """Sample indices of micro-batch `micro` of optimizer step `step` for one data-parallel
    rank: a stream of per-epoch permutations (seeded by seed and epoch), cut in order. A pure
    function of its arguments, so a resumed run reads exactly what it would have read."""
    start = (step * accum + micro) * global_batch + dp_rank * batch
    out = []
    for pos in range(start, start + batch):
        epoch, i = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[i]))
    return out


# ----------------------------------------------------------------------------------------
def freeze_for_training(model, args) -> tuple[int, int]:
    """requires_grad only on what trains. Returns (trainable, total) parameter counts."""
    extra = re.compile(args.train_params) if args.train_params else None
    for name, p in model.named_parameters():
        p.requires_grad = bool(args.full or name.endswith((".lora_A", ".lora_B")) or name.startswith("aux_heads.")
                               or (extra is not None and extra.search(name))) and p.is_floating_point()
    from models.tp import shard_spec
    for name, p in model.named_parameters():
        # DeepSpeed counts a model-parallel piece on every rank and a replicated tensor once
        # (on model-parallel rank 0) when it takes the gradient norm for clipping.
        p.model_parallel = p.tensor_model_parallel = getattr(model, "tp_world", 1) > 1 and shard_spec(name) is not None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # a 4-bit weight holds two values per byte: count the weights it stands for
    total = sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
                for p in model.parameters())
    from models.quantize import QUANTIZED              # weights kept as buffers
    total += sum(m.weight_count for m in model.modules() if isinstance(m, QUANTIZED))
    return trainable, total


def checkpoint_layers(model) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations."""
    from torch.utils.checkpoint import checkpoint
    for layer in model.model.layers:
        inner = layer.forward
        layer.forward = lambda *a, _f=inner: checkpoint(_f, *a, use_reentrant=False)


class AuxObjectHeads(torch.nn.Module):
    """Training-only heads on the low-res ViT's patch features: kind and colour of the object
    under each patch (0 = background) and its box. They push the encoder to keep where each
    object is and what it looks like, which the language model alone learns slowly."""
    def __init__(self, width: int, n_kinds: int, n_colours: int):
        super().__init__()
        self.kind = torch.nn.Linear(width, n_kinds + 1)
        self.colour = torch.nn.Linear(width, n_colours + 1)
        self.box = torch.nn.Linear(width, 4)

    def loss(self, feats: torch.Tensor, b: dict) -> torch.Tensor:
        """feats: B,N,C patch features (no CLS); b: obj_kind, obj_colour (B,N), obj_box (B,N,4)."""
        f = feats.float()
        loss = F.cross_entropy(self.kind(f).flatten(0, 1), b["obj_kind"].flatten(), ignore_index=-100)
        if (b["obj_colour"] >= 0).any():
            loss = loss + F.cross_entropy(self.colour(f).flatten(0, 1), b["obj_colour"].flatten(), ignore_index=-100)
        on = b["obj_kind"] > 0
        if on.any():
            loss = loss + 5.0 * F.smooth_l1_loss(self.box(f)[on].sigmoid(), b["obj_box"][on], beta=0.05)
        return torch.nan_to_num(loss)


def attach_aux_heads(model, train_set) -> tuple:
    """Heads + hooks that keep the encoders' outputs of the last forward: the low-res ViT's
    patches and, for CogAgent, the high-res encoder's (whose features the cross attention
    reads when it locates GUI elements). Returns the object vocabulary (low-res grid, kinds,
    colours, high-res grid or None) for collate_train."""
    objs = [o for s in train_set.samples for o in s.objects]
    kinds = sorted({o["kind"] for o in objs})
    colours = sorted({o["colour"] for o in objs if o.get("colour")})
    if not kinds:
        raise ValueError("--aux_object_loss: the training labels hold no \"objects\"")
    cfg = model.config
    heads = {"low": AuxObjectHeads(cfg.eva.hidden_size, len(kinds), len(colours))}
    model.model.vision.transformer.register_forward_hook(
        lambda _m, _i, out: setattr(model, "_vit_out", out[:, 1:]))          # CLS dropped
    cross_grid = None
    if cfg.cross is not None:
        heads["cross"] = AuxObjectHeads(cfg.cross.hidden_size, len(kinds), len(colours))
        model.model.cross_vision.register_forward_hook(
            lambda _m, _i, out: setattr(model, "_cross_out", out))
        cross_grid = cfg.cross.image_size // cfg.cross.patch_size
    model.aux_heads = torch.nn.ModuleDict(heads).to(model.model.device, model.model.compute_dtype)
    return cfg.eva.image_size // cfg.eva.patch_size, kinds, colours, cross_grid


def compute_loss(model, batch: dict, device, aux_weight: float = 0.0, encoders_only: bool = False) -> torch.Tensor:
    """The language-model loss on the answers (+ aux_weight x the per-patch object loss).
    encoders_only: run only the image encoder(s) and return the per-patch loss alone."""
    b = {k: v.to(device) for k, v in batch.items()}
    dtype = model.model.compute_dtype
    if encoders_only:                              # the hooks keep both encoders' outputs
        model.model.vision.encode_patches(b["images"].to(dtype))
        if "cross_obj_kind" in b:
            model.model.cross_vision(b["cross_images"].to(dtype))
        return object_loss(model, b)
    cross_kv = model.cross_kv(b["cross_images"].to(dtype)) if "cross_images" in b else None
    attn_mask = packed_attention_mask(b["segments"], b["pad_mask"]) if "segments" in b else None
    logits = model(b["input_ids"], b["position_ids"], vision_mask=b["vision_mask"],
                   images=b["images"].to(dtype), image_mask=b["image_mask"], cross_kv=cross_kv,
                   pad_mask=None if attn_mask is not None else b["pad_mask"], attn_mask=attn_mask)
    target = b["input_ids"][:, 1:]
    mask = b["loss_mask"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1][mask].float(), target[mask])
    if aux_weight and "obj_kind" in b:
        loss = loss + aux_weight * object_loss(model, b)
    return loss


def object_loss(model, b: dict) -> torch.Tensor:
    """The per-patch object loss on the encoder outputs the hooks kept from the last forward
    (low-res ViT, and the high-res encoder when the batch has its targets)."""
    loss = model.aux_heads["low"].loss(model._vit_out, b)
    if "cross_obj_kind" in b:
        cross = {k[len("cross_"):]: v for k, v in b.items() if k.startswith("cross_obj_")}
        loss = loss + model.aux_heads["cross"].loss(model._cross_out, cross)
    return loss


def sat_state_for_saving(model, base_sd: Optional[dict]) -> dict:
    """SAT-named weights; quantized (QLoRA) base weights come from the checkpoint they were
    loaded from (they never change), everything else from the model."""
    from models.quantize import QUANTIZED
    quantized = {n for n, m in model.named_modules() if isinstance(m, QUANTIZED)}
    out = {}
    for name in sorted(quantized):                    # PyTorch int4/int8: qweight + scales buffers
        key = sat_key(name + ".weight")
        out[key] = base_sd[key].detach().cpu().contiguous()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        mod, _, attr = name.rpartition(".")
        if name.startswith("aux_heads.") or mod in quantized and attr in ("qweight", "scales"):
            continue                                  # training-only heads; quantized weights (above)
        key = sat_key(name)
        if not t.is_floating_point():                 # bitsandbytes' packed weights
            t = base_sd[key]
        out[key] = t.detach().cpu().contiguous()
    return out


@torch.no_grad()
def evaluate(model, tok, examples, args, dp_rank: int, dp: int, dp_group=None) -> dict:
    """Greedy answers for the first --eval_samples examples (spread over the data-parallel
    ranks), scored by the benchmark runner (evaluation/evaluate.py, task finetune): acc
    (exact match) and acc_w/o_case, in percent."""
    from utils.scoring.tasks import model_answers, score_in_memory
    from models.generate import GenerationConfig
    model.eval()
    gen = GenerationConfig(max_new_tokens=args.eval_max_new_tokens, top_k=1)
    metrics = score_in_memory(model_answers(model, tok, gen), "finetune:", examples[: args.eval_samples],
                              args.version or "auto", args.batch_size, dp_rank, dp, dp_group)
    model.train()
    return metrics


def eval_examples(dataset) -> list:
    """A finetuning dataset's samples (the ones that fit) as the runner's examples."""
    from utils.scoring.tasks import Example
    return [Example(f"{s.image.name}#{i}", s.image, s.turns[-1][0], [s.turns[-1][1]], history=list(s.turns[:-1]))
            for i, s in enumerate(dataset.samples)]


def evaluate_sets(model, tok, cfg, args, dp_rank, dp, is_main, dp_group=None) -> dict:
    """Score --valid_data and --test_data (every sample of the test set)."""
    out = {}
    for name, folder, limit in (("valid", args.valid_data, args.eval_samples), ("test", args.test_data, 10**9)):
        if not folder:
            continue
        data = FinetuneDataset(folder, cfg, tok, args.version, args.max_length)
        saved, args.eval_samples = args.eval_samples, limit
        metrics = evaluate(model, tok, eval_examples(data), args, dp_rank, dp, dp_group)
        args.eval_samples = saved
        out[name] = metrics
        if is_main:
            print(f"{name}: acc {metrics['acc']:.2f} acc_w/o_case {metrics['acc_w/o_case']:.2f} "
                  f"({metrics['n']} samples, skipped {len(data.skipped)})", flush=True)
    return out


def train(args) -> dict:
    """The whole run. Returns {'step', 'loss' (last logged), 'eval': last metrics}."""
    import deepspeed
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        args.device = f"cuda:{torch.cuda.current_device()}"
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rank = dist.get_rank()
    from models.tp import ModelParallelGroups
    groups = ModelParallelGroups(args.model_parallel_size)
    from models.tp import set_group
    set_group(groups.mp_group)
    mp_rank, dp_rank = groups.get_model_parallel_rank(), groups.get_data_parallel_rank()
    is_main = rank == 0
    save = Path(args.save or ".")
    # --dtype: on CUDA the weights' dtype (DeepSpeed's bf16/fp16 mode); on a CPU fp32 weights,
    # and bfloat16 means autocast (bf16 matrix products, fp32 master weights and optimizer).
    wanted = common.dtype_from_args(args)
    autocast_bf16 = not cuda and wanted == torch.bfloat16
    dtype = wanted if cuda else torch.float32
    args.train_dtype = dtype
    if is_main and autocast_bf16:
        log.info("training with bf16 autocast on CPU (fp32 weights)")

    start_step = 0
    source = args.from_pretrained
    if args.resume:                                 # preflight() checked the files
        start_step = int((save / "latest").read_text().strip())
        source = str(save)
        log.info("resuming from %s at step %d", save, start_step)
    if is_main and remove_stale_temporaries(save):
        log.info("removed temporary files of an interrupted save in %s", save)
    # QLoRA: the base is quantized to 4 bits while it is read (the bf16 model is never held).
    model, cfg = load_model(source, device=args.device, dtype=dtype, trust_checkpoint=args.trust_checkpoint,
                            cpu_layout=False, rank=mp_rank, world=args.model_parallel_size,
                            quant=4 if args.use_qlora else None)
    lora_from_ckpt = "lora" in cfg.extra
    base_sd = None
    if args.use_qlora:
        base_sd = read_sat_state_dict(resolve_pretrained(source), args.trust_checkpoint,
                                      mp_rank, args.model_parallel_size)
    if args.full and args.lora_rank and not lora_from_ckpt:
        args.lora_rank = 0
    if args.lora_rank > 0 and not lora_from_ckpt:
        lcfg = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha or args.lora_rank,
                          layer_range=list(range(*args.layer_range)) if args.layer_range else None,
                          vision_expert=args.lora_vision_expert, vit=args.lora_vit)
        torch.manual_seed(args.seed)                    # identical adapters on every data rank
        apply_lora(model, lcfg)
        cfg.extra["lora"] = lcfg.to_json()
    tok = Tokenizer(resolve_tokenizer(args.local_tokenizer, resolve_pretrained(args.from_pretrained)))
    if args.eval_only:
        return evaluate_sets(model, tok, cfg, args, dp_rank, groups.dp, is_main, groups.dp_group)
    train_set = FinetuneDataset(args.train_data, cfg, tok, args.version, args.max_length, args.pack_questions)
    valid_set = FinetuneDataset(args.valid_data, cfg, tok, args.version, args.max_length) if args.valid_data else None
    if is_main:
        print(f"train samples: {len(train_set)} (skipped {len(train_set.skipped)})"
              + (f"; valid samples: {len(valid_set)} (skipped {len(valid_set.skipped)})" if valid_set else ""),
              flush=True)
    object_vocab = attach_aux_heads(model, train_set) if args.aux_object_loss else None
    trainable, total = freeze_for_training(model, args)
    if trainable == 0:
        raise ValueError("nothing to train: give --lora_rank > 0, --full or --train_params")
    if is_main:
        print(f"trainable parameters: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)", flush=True)
    if args.checkpoint_activations:
        checkpoint_layers(model)
    model.train()


    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    # With --aux_warmup_iters the encoder-only steps get a warm-up then a constant rate, and the
    # full steps their own warm-up and cosine (the language model starts at the full rate).
    aux, full = args.aux_warmup_iters, args.train_iters - args.aux_warmup_iters
    warmup = max(1, int(args.warmup * full))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, aux, warmup, 1.0) if s < aux
        else cosine_with_warmup(s - aux, full, warmup, args.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config(args, cuda), mpu=groups,
                                           dist_init_required=False)
    if args.resume:
        engine.load_checkpoint(str(save / "ds_state"), tag=str(start_step), load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=True)

    def save_checkpoint(step: int) -> None:
        engine.save_checkpoint(str(save / "ds_state"), tag=str(step), save_latest=False,
                               exclude_frozen_parameters=True)
        if dp_rank == 0:
            state = {"module": sat_state_for_saving(model, base_sd), "iteration": step}
            atomic_write(save / str(step) / f"mp_rank_{mp_rank:02d}_model_states.pt",
                          lambda p: torch.save(state, p))
        if is_main:
            cfg.model_parallel_size = args.model_parallel_size
            atomic_write(save / "model_config.json", lambda p: cfg.save(p))
            tokdir = save / "tokenizer"
            if not tokdir.exists() and tok.path.is_dir():
                import shutil
                shutil.copytree(tok.path, tokdir)
        dist.barrier()                              # every file of this step is on disk ...
        if is_main:                                 # ... before `latest` points at it
            atomic_write(save / "latest", lambda p: Path(p).write_text(str(step)))
            log.info("saved checkpoint %s/%d", save, step)
        dist.barrier()

    global_batch = args.batch_size * groups.dp
    result = {"step": start_step, "loss": None, "eval": None}
    bar = tqdm(total=args.train_iters, initial=start_step, desc="finetune", unit="step",
               disable=not is_main, dynamic_ncols=True)
    t0, seen, window, step_times = time.time(), 0, [], []
    device = torch.device(args.device)
    for step in range(start_step, args.train_iters):
        t_step = time.perf_counter()
        step_loss = torch.zeros((), dtype=torch.float64)
        for micro in range(args.gradient_accumulation_steps):
            idx = batch_indices(len(train_set), step, micro, global_batch, args.gradient_accumulation_steps,
                                dp_rank, args.batch_size, args.seed)
            batch = collate_train([train_set[i] for i in idx], object_vocab)
            if batch is None:
                continue
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
                loss = compute_loss(engine.module, batch, device, args.aux_object_loss,
                                    encoders_only=step < args.aux_warmup_iters)
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().double().cpu() / args.gradient_accumulation_steps
            seen += len(idx) * groups.dp
        if groups.dp > 1:
            dist.all_reduce(step_loss, group=groups.dp_group)
            step_loss /= groups.dp
        window.append(step_loss.item())
        step_times.append(time.perf_counter() - t_step)
        result.update(step=step + 1, loss=step_loss.item())
        bar.update(1)
        if step == start_step:
            result["first_loss"] = step_loss.item()
        if (step + 1) % args.log_interval == 0 or step + 1 == args.train_iters or step == start_step:
            rate = seen / max(1e-9, time.time() - t0)
            lr = scheduler.get_last_lr()[0]
            what = " (image encoders, per-patch loss)" if step < args.aux_warmup_iters else ""
            msg = (f"step {step + 1}/{args.train_iters} loss {sum(window) / len(window):.6f}{what} "
                   f"lr {lr:.3e} samples/s {rate:.2f}")
            if is_main:
                bar.write(msg)
            window.clear()
        if valid_set is not None and ((step + 1) % args.eval_interval == 0 or step + 1 == args.train_iters):
            metrics = evaluate(engine.module, tok, eval_examples(valid_set), args, dp_rank, groups.dp, groups.dp_group)
            result["eval"] = metrics
            if is_main:
                bar.write(f"eval step {step + 1}: acc {metrics['acc']:.2f} acc_w/o_case "
                          f"{metrics['acc_w/o_case']:.2f} ({metrics['n']} samples)")
        if (step + 1) % args.save_interval == 0 or step + 1 == args.train_iters:
            save_checkpoint(step + 1)
    bar.close()
    if args.test_data:
        args.valid_data = None
        result.update(evaluate_sets(engine.module, tok, cfg, args, dp_rank, groups.dp, is_main, groups.dp_group))
    if step_times:
        import resource
        import statistics
        result["step_time"] = statistics.median(step_times)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if is_main:
            cuda_peak = (f", CUDA peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MB" if cuda else "")
            print(f"median step time {result['step_time']:.4f} s, peak RSS {result['peak_rss_mb']:.0f} MB"
                  f"{cuda_peak} (rank 0)", flush=True)
    if is_main and result["loss"] is not None:
        print(f"final step {result['step']} loss {result['loss']:.8f}", flush=True)
    return result


def main(argv=None, default_model: str = "cogvlm-base-490", description: str = __doc__) -> int:
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_finetune_args(p, default_model)
    args = p.parse_args(argv)
    if not args.eval_only and not (args.save and args.train_data):
        p.error("--train_data and --save are required (unless --eval_only)")
    if args.eval_only and not (args.valid_data or args.test_data):
        p.error("--eval_only needs --valid_data and/or --test_data")
    if args.aux_warmup_iters and not args.aux_object_loss:
        p.error("--aux_warmup_iters needs --aux_object_loss (the per-patch loss it trains on)")
    if not args.eval_only and args.aux_warmup_iters >= args.train_iters:
        p.error(f"--aux_warmup_iters {args.aux_warmup_iters} leaves none of the {args.train_iters} "
                f"--train_iters steps to the language model")
    common.setup_logging()
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    from models import CheckpointError, ModelNotFound
    from utils.chat.tokenizer import TokenizerError
    try:
        preflight(args)
        if args.preflight:
            return 0
        train(args)
    except (ModelNotFound, CheckpointError, TokenizerError, OSError, ValueError) as e:
        if os.environ.get("RANK", "0") == "0":           # one line, not one per rank
            print(f"error: {e}", flush=True, file=__import__("sys").stderr)
        return 1
    return 0                # the launchers end with models.tp.exit_process: all ranks together
