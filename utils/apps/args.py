"""Command-line flags shared by every entry point, declared once, and the one function that
turns them into a loaded model + tokenizer."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

import torch

from models import LoadOptions, QuantConfig, load_model
from models.config import ALIASES, MODEL_CONFIGS
from models.kernels import CHOICES as KERNEL_CHOICES
from models.quantize import BITS, GROUP, GROUPS, VISION_BIT_CHOICES, VISION_BITS
from models.generate import GenerationConfig
from utils.chat.tokenizer import DEFAULT_TOKENIZER, Tokenizer, resolve_tokenizer


# The generation defaults of every UI (CLI demos, web and composite demos, evaluation): the
# GenerationConfig dataclass's own, declared once in models/generate.py.
GEN_DEFAULTS = GenerationConfig()
UI_MAX_NEW_TOKENS = 512      # where the UIs' "max new tokens" slider starts (GEN_DEFAULTS sets no cap)


def add_model_args(p: argparse.ArgumentParser, default_model: str = "cogvlm-chat-v1.1",
                   pretrained_help: Optional[str] = None, single_stream: bool = False) -> None:
    """--from_pretrained, --version and every loading flag (add_loading_args)."""
    g = p.add_argument_group("model")
    g.add_argument("--from_pretrained", default=default_model, help=pretrained_help or
                   f"SAT checkpoint directory, or a model name looked up under $SAT_HOME "
                   f"(default ~/.sat_models): {', '.join(list(MODEL_CONFIGS)[:7] + list(ALIASES))}")
    g.add_argument("--version", default=None, choices=["base", "chat", "chat_old", "vqa"],
                   help="prompt template (default: the checkpoint's own)")
    add_loading_args(g, single_stream)


def add_loading_args(g, single_stream: bool = False) -> None:
    """The flags options_from_args reads, and --local_tokenizer: every app that loads a model
    takes them (the composite demo names its checkpoints by other flags). single_stream: the
    app decodes one row per step, never more (LoadOptions.single_stream)."""
    g.set_defaults(single_stream=single_stream)
    g.add_argument("--local_tokenizer", default=DEFAULT_TOKENIZER,
                   help="tokenizer directory (tokenizer.model or tokenizer.json); default: the "
                        "checkpoint's own tokenizer/ folder, else lmsys/vicuna-7b-v1.5 from the HF cache")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_dtype_args(g)
    add_quant_args(g)
    g.add_argument("--cpu_weights", default="auto", choices=["auto", "packed", "plain"],
                   help="CPU inference: auto = the layouts --kernels chooses (measured on this CPU); "
                        "packed = oneDNN-blocked everywhere (= --kernels packed); plain = PyTorch's own "
                        "layout (fp32 column-major where out > in), nothing measured")
    g.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES,
                   help="CPU linear layers: auto = each layer shape in the layout measured fastest on "
                        "this CPU (timed once at load, a few seconds; cached in "
                        "$XDG_CACHE_HOME/cogvlm/kernels.json); packed / packed_many / plain / colmajor / gemv / upcast / "
                        "half = that layout everywhere (oneDNN-blocked for one or many rows; row-major or "
                        "column-major F.linear; "
                        "row-major with single rows through ATen's GEMV; bf16 on CPUs without native bf16, "
                        "prompts' products in fp32: there any other but half means it; weights fp16 holds "
                        "exactly as fp16, FBGEMM's fp16-weight GEMM), nothing measured; overrides --cpu_weights")
    g.add_argument("--remeasure_kernels", action="store_true",
                   help="time the --kernels auto candidates again instead of reading the cache")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU: the decode step compiled by inductor (needs a C++ compiler). Default in the "
                        "single-stream apps (CLI, web and composite demos): compiled in the background "
                        "where the eager step is slow enough to repay it and memory allows, then timed "
                        "against eager and used if faster; --compile: compiled by the first step (about "
                        "a minute); --no-compile: never. bf16/int8: one more copy of the language "
                        "weights in memory. The OpenAI server's --compile compiles only its batch "
                        "engine's attention (seconds; 16 rows decode 1.3-1.5x faster). bench/RESULTS.md")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="batch-invariant greedy decoding: each request's answer is the one it gets "
                        "alone, whatever else runs in the batch (default: on for CPU without --compile "
                        "where rows are batched: the OpenAI server, the evaluation runner; off in the "
                        "single-stream demos, which never batch, and on CUDA; cost measured in "
                        "bench/RESULTS.md, 'Batch invariance')")
    g.add_argument("--trust-checkpoint", "--trust_checkpoint", dest="trust_checkpoint",
                   action="store_true", help="allow checkpoint files that need full unpickling "
                                             "(training checkpoints); only for files you trust")


def add_quant_args(g) -> None:
    g.add_argument("--quant", type=int, choices=BITS, default=None,
                   help="quantize the weights to 4 or 8 bits while loading (CPU: PyTorch's "
                        "weight-only kernels; CUDA: bitsandbytes)")
    g.add_argument("--quant_vision", type=int, choices=VISION_BIT_CHOICES, default=None,
                   help=f"bits of the image encoders under --quant (default: {VISION_BITS}; 16 = unquantized)")
    g.add_argument("--quant_group", type=int, choices=GROUPS, default=None,
                   help=f"inputs per scale of --quant 4 weights (default {GROUP}; 128 takes 0.25 bit per "
                        "weight less, 0.4 GB of CogVLM-17B, for a larger error: bench/RESULTS.md)")


def add_dtype_args(g) -> None:
    """--dtype (default auto, or $COGVLM_DTYPE), with --bf16 / --fp16 as its short forms."""
    g.add_argument("--dtype", default=os.environ.get("COGVLM_DTYPE", "auto"),
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations: auto = bfloat16 on CUDA and on CPUs with AMX or "
                        "AVX-512 BF16, else float32 (default: auto, or $COGVLM_DTYPE)")
    g.add_argument("--fp16", action="store_true", help="same as --dtype float16")
    g.add_argument("--bf16", action="store_true", help="same as --dtype bfloat16")


def dtype_from_args(args) -> torch.dtype:
    from models.loading import resolve_dtype
    name = "float16" if args.fp16 else "bfloat16" if args.bf16 else args.dtype
    return resolve_dtype(name, args.device)


def ranged(cast, lo, hi=None, above: bool = False):
    """An argparse type: a number of type `cast` from lo (or above it) to hi, finite."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if cast is int else ''}number") from None
        if v != v or v in (float("inf"), float("-inf")) or v < lo or (above and v == lo) \
                or (hi is not None and v > hi):
            span = f"{'above' if above else 'from'} {lo}" + (f" to {hi}" if hi is not None else "")
            raise argparse.ArgumentTypeError(f"{text} is out of range ({span})")
        return v
    return parse


def add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    d = GEN_DEFAULTS
    g.add_argument("--max_length", type=ranged(int, 1), default=d.max_length,
                   help="total length limit, image tokens included")
    g.add_argument("--max_new_tokens", type=ranged(int, 1), default=d.max_new_tokens)
    g.add_argument("--top_p", type=ranged(float, 0, 1), default=d.top_p)
    g.add_argument("--top_k", type=ranged(int, 0), default=d.top_k, help="1 = greedy, 0 = no top-k cut")
    g.add_argument("--temperature", type=ranged(float, 0, 100), default=d.temperature,
                   help="below 1e-5 decoding is greedy")
    g.add_argument("--repetition_penalty", type=ranged(float, 0, above=True), default=d.repetition_penalty)
    g.add_argument("--seed", type=ranged(int, -2**63, 2**64 - 1), default=d.seed)


def generation_config(args) -> GenerationConfig:
    return GenerationConfig(max_length=args.max_length, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            repetition_penalty=args.repetition_penalty, seed=args.seed)


def setup_logging() -> None:
    """INFO on rank 0 (or LOGLEVEL); other torchrun ranks log warnings only."""
    quiet = int(os.environ.get("RANK", "0")) != 0
    logging.basicConfig(level="WARNING" if quiet else os.environ.get("LOGLEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def check_load_flags(args, world: int = 1) -> None:
    """Flag combinations the loader cannot honour, refused by flag name (models/ speaks of
    QuantConfig fields). Values from the environment (the composite demo) are checked too."""
    if args.quant not in (None,) + BITS:
        raise ValueError(f"--quant takes {' or '.join(map(str, BITS))}, not {args.quant}")
    if args.quant_group not in (None,) + GROUPS:
        raise ValueError(f"--quant_group takes {', '.join(map(str, GROUPS))}, not {args.quant_group}")
    if world > 1 and args.quant:
        raise ValueError("--quant is not supported with model parallelism yet; run it in one process")
    if (args.quant_vision or args.quant_group) and not args.quant:
        raise ValueError("--quant_vision and --quant_group apply to quantized weights: add --quant 4 or --quant 8")
    if args.quant_group and 4 not in (args.quant, args.quant_vision):
        raise ValueError("--quant_group sets the group size of 4-bit weights: it needs --quant 4 or --quant_vision 4")
    if world > 1 and args.compile:                  # (None, the default, stays eager there)
        raise ValueError("--compile is not supported with model parallelism yet; run it in one process")


def options_from_args(args, rank: int = 0, world: int = 1) -> LoadOptions:
    """The one bridge from the loading flags (add_loading_args) to LoadOptions. rank/world:
    this process's piece of a tensor-parallel model (under torchrun, on its own GPU)."""
    check_load_flags(args, world)
    device = args.device
    if world > 1 and torch.device(device).type == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    # --kernels where given; else --cpu_weights packed keeps its meaning (oneDNN-packed, not measured)
    kernels = "packed" if args.kernels == "auto" and args.cpu_weights == "packed" else args.kernels
    return LoadOptions(device=device, dtype=dtype_from_args(args),
                       quant=QuantConfig(bits=args.quant, vision_bits=args.quant_vision, group=args.quant_group),
                       trust_checkpoint=args.trust_checkpoint, rank=rank, world=world,
                       pack=args.cpu_weights != "plain", kernels=kernels,
                       remeasure_kernels=args.remeasure_kernels, compile=args.compile,
                       deterministic=args.deterministic, single_stream=args.single_stream)


def load_with_tokenizer(from_pretrained: str, opts: LoadOptions, local_tokenizer: str, arch=None):
    """(model, tokenizer): the checkpoint and its tokenizer, whose vocabulary must fit the model's."""
    from models.loading import resolve_pretrained
    model, cfg = load_model(from_pretrained, opts, arch)
    tok = Tokenizer(resolve_tokenizer(local_tokenizer, resolve_pretrained(from_pretrained)))
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's "
                         f"vocabulary is {cfg.vocab_size}: wrong --local_tokenizer?")
    return model, tok


def load_from_args(args):
    """(model, tokenizer). Every demo calls this. Under torchrun (WORLD_SIZE > 1) the model is
    tensor parallel over the ranks: each process loads its own piece."""
    from models.tp import init_distributed
    rank, world = init_distributed(args.device)
    opts = options_from_args(args, rank, world)
    args.device = str(opts.device)                   # the apps put their inputs where the model is
    return load_with_tokenizer(args.from_pretrained, opts, args.local_tokenizer)


def load_or_report(args, loader=None):
    """(model, tokenizer), or None after printing the reason as one line (no traceback).
    Under torchrun every rank learns whether any rank failed, and all stop together."""
    from models import CheckpointError, ModelNotFound
    from utils.serving.lockstep import agree
    from utils.chat.tokenizer import TokenizerError
    from models.tp import init_distributed
    init_distributed(args.device)                    # first: every rank must reach the rendezvous
    loaded, error = None, None
    try:
        loaded = (loader or load_from_args)(args)
    except (ModelNotFound, CheckpointError, TokenizerError, ValueError, ImportError, OSError) as e:
        error = str(e)
    failed = agree(error)
    if failed:
        if int(os.environ.get("RANK", "0")) == 0:
            for rank, msg in failed:
                print(f"error{f' (rank {rank})' if len(failed) > 1 or rank else ''}: {msg}", file=sys.stderr)
        return None
    return loaded
