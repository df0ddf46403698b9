"""The finetuning options (small dataclasses, each default declared here once) and the one
bridge from the command line to them: `add_finetune_args` declares the flags,
`options_from_args` turns the parsed namespace into a `FinetuneOptions`."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Optional


@dataclass
class ModelSource:
    """What to load and how (the shared model flags, utils/apps/args.py, declare the defaults)."""
    from_pretrained: str
    local_tokenizer: Optional[str]
    version: Optional[str]                    # prompt template; None = the checkpoint's own
    device: str
    dtype: str                                # "auto", "float32", "bfloat16" or "float16"
    trust_checkpoint: bool


@dataclass
class DataOptions:
    train_data: Optional[str] = None          # captcha folder or images/ + labels/ folder
    valid_data: Optional[str] = None
    test_data: Optional[str] = None           # evaluated once at the end
    max_length: int = 400                     # training row length cap (tokens)
    pack_questions: bool = False              # one row per image, its questions masked apart
    aux_object_loss: float = 0.0              # weight of the per-patch object loss (0 = off)
    aux_warmup_iters: int = 0                 # first steps that train only the image encoders


@dataclass
class OptimOptions:
    train_iters: int = 2000                   # optimizer steps
    batch_size: int = 4                       # rows per process per micro-step
    gradient_accumulation_steps: int = 1
    lr: float = 1e-5
    min_lr_ratio: float = 0.0                 # cosine floor as a fraction of lr
    warmup: float = 0.02                      # warm-up steps, as a fraction of train_iters
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    seed: int = 1234
    checkpoint_activations: bool = False
    model_parallel_size: int = 1
    deepspeed_config: Optional[str] = None    # JSON file overriding our ZeRO-2 config


@dataclass
class TrainedParams:
    """What trains: LoRA adapters (default), every parameter (full), and/or a name regex."""
    lora_rank: int = 10                       # 0 = no LoRA
    lora_alpha: Optional[float] = None        # None: lora_rank (scaling 1)
    layer_range: Optional[list] = None        # decoder layers [FIRST, END) with adapters
    lora_vision_expert: bool = False
    lora_vit: bool = False
    use_qlora: bool = False
    full: bool = False
    train_params: Optional[str] = None


@dataclass
class RunOptions:
    """Checkpoints, logs and evaluation."""
    save: Optional[str] = None
    eval_only: bool = False
    save_interval: int = 200
    resume: bool = False
    log_interval: int = 10
    eval_interval: int = 200
    eval_samples: int = 64                    # validation samples per evaluation
    eval_max_new_tokens: int = 32


@dataclass
class FinetuneOptions:
    model: ModelSource
    data: DataOptions = field(default_factory=DataOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    params: TrainedParams = field(default_factory=TrainedParams)
    run: RunOptions = field(default_factory=RunOptions)


def add_finetune_args(p: argparse.ArgumentParser, default_model: str) -> None:
    import utils.apps.args as common
    common.add_model_args(p, default_model)
    _add_data_args(p.add_argument_group("data"))
    _add_optim_args(p.add_argument_group("training"))
    _add_param_args(p.add_argument_group("what trains"))
    _add_run_args(p.add_argument_group("checkpoints, logs, evaluation"))
    p.add_argument("--preflight", action="store_true",
                   help="only check the model, data and --save directory, then exit (the launchers "
                        "run this before starting any process)")


def _add_data_args(g) -> None:
    d = DataOptions
    g.add_argument("--train_data", default=d.train_data, help="captcha folder or images/ + labels/ folder")
    g.add_argument("--valid_data", default=d.valid_data)
    g.add_argument("--test_data", default=d.test_data, help="evaluated once at the end")
    g.add_argument("--max_length", type=int, default=d.max_length, help="training row length cap (tokens)")
    g.add_argument("--aux_object_loss", type=float, default=d.aux_object_loss, metavar="WEIGHT",
                   help="with object labels (utils/data/synthetic.py): also train small heads on the "
                        "low-res ViT's patches to predict the kind, colour and box of the object under "
                        "each patch (training only; the heads are not saved in the model)")
    g.add_argument("--aux_warmup_iters", type=int, default=d.aux_warmup_iters, metavar="N",
                   help="with --aux_object_loss: the first N of the --train_iters steps run only the image "
                        "encoder(s) and train them on the per-patch loss (the language model is not run, so "
                        "a step costs a fraction of a full one)")
    g.add_argument("--pack_questions", action="store_true",
                   help="train the single-turn questions of one image together in one row "
                        "(image encoded once; each question masked from the others)")


def _add_optim_args(g) -> None:
    o = OptimOptions
    g.add_argument("--train_iters", type=int, default=o.train_iters, help="optimizer steps")
    g.add_argument("--batch_size", type=int, default=o.batch_size, help="rows per process per micro-step")
    g.add_argument("--gradient_accumulation_steps", type=int, default=o.gradient_accumulation_steps)
    g.add_argument("--lr", type=float, default=o.lr)
    g.add_argument("--min_lr_ratio", type=float, default=o.min_lr_ratio, help="cosine floor as a fraction of --lr")
    g.add_argument("--warmup", type=float, default=o.warmup, help="warm-up steps, as a fraction of train_iters")
    g.add_argument("--weight_decay", type=float, default=o.weight_decay)
    g.add_argument("--clip_grad", type=float, default=o.clip_grad)
    g.add_argument("--seed", type=int, default=o.seed)
    g.add_argument("--checkpoint_activations", action="store_true", help="recompute layers in backward")
    g.add_argument("--model_parallel_size", type=int, default=o.model_parallel_size)
    g.add_argument("--deepspeed_config", default=o.deepspeed_config, help="JSON file overriding our ZeRO-2 config")
    g.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher


def _add_param_args(g) -> None:
    t = TrainedParams
    g.add_argument("--lora_rank", type=int, default=t.lora_rank, help="0 = no LoRA")
    g.add_argument("--lora_alpha", type=float, default=t.lora_alpha, help="default: lora_rank (scaling 1)")
    g.add_argument("--layer_range", type=int, nargs=2, default=t.layer_range, metavar=("FIRST", "END"),
                   help="decoder layers [FIRST, END) that get adapters (default: all)")
    g.add_argument("--lora_vision_expert", action="store_true", help="adapters on the vision experts too")
    g.add_argument("--lora_vit", action="store_true", help="adapters on the low-res ViT's attention too")
    g.add_argument("--use_qlora", action="store_true", help="4-bit frozen base (bitsandbytes nf4) + LoRA")
    g.add_argument("--full", action="store_true", help="train every parameter (no LoRA)")
    g.add_argument("--train_params", default=t.train_params,
                   help="regex: parameters (our names, e.g. 'model.vision.linear_proj') that train too")


def _add_run_args(g) -> None:
    r = RunOptions
    g.add_argument("--save", default=r.save, help="checkpoint directory (required unless --eval_only)")
    g.add_argument("--eval_only", action="store_true",
                   help="no training: score --from_pretrained on --valid_data / --test_data")
    g.add_argument("--save_interval", type=int, default=r.save_interval)
    g.add_argument("--resume", action="store_true", help="continue from --save's latest checkpoint")
    g.add_argument("--log_interval", type=int, default=r.log_interval)
    g.add_argument("--eval_interval", type=int, default=r.eval_interval)
    g.add_argument("--eval_samples", type=int, default=r.eval_samples, help="validation samples per evaluation")
    g.add_argument("--eval_max_new_tokens", type=int, default=r.eval_max_new_tokens)


def _pick(cls, args: argparse.Namespace):
    """cls built from the namespace entries named like its fields."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def options_from_args(args: argparse.Namespace) -> FinetuneOptions:
    """The only place the finetuning code reads an argparse namespace."""
    dtype = "float16" if args.fp16 else "bfloat16" if args.bf16 else args.dtype    # the short forms
    model = ModelSource(args.from_pretrained, args.local_tokenizer, args.version, args.device, dtype,
                        args.trust_checkpoint)
    return FinetuneOptions(model, _pick(DataOptions, args), _pick(OptimOptions, args),
                           _pick(TrainedParams, args), _pick(RunOptions, args))


def flag_problem(opts: FinetuneOptions) -> Optional[str]:
    """The first combination of flags that cannot run, as a one-line message (None: fine)."""
    data, run, iters = opts.data, opts.run, opts.optim.train_iters
    if not run.eval_only and not (run.save and data.train_data):
        return "--train_data and --save are required (unless --eval_only)"
    if run.eval_only and not (data.valid_data or data.test_data):
        return "--eval_only needs --valid_data and/or --test_data"
    if data.aux_warmup_iters and not data.aux_object_loss:
        return "--aux_warmup_iters needs --aux_object_loss (the per-patch loss it trains on)"
    if not run.eval_only and data.aux_warmup_iters >= iters:
        return (f"--aux_warmup_iters {data.aux_warmup_iters} leaves none of the {iters} "
                f"--train_iters steps to the language model")
    return None
