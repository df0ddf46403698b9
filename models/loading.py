"""`load_model`: the one loader every demo, test and script uses."""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from .checkpoint import (CheckpointError, load_sat_config, load_state_into, read_sat_state_dict,
                         regenerate_derived)
from .cogvlm import CogVLM
from .config import ALIASES, MODEL_CONFIGS, ModelConfig
from .layout import use_fast_cpu_layout
from .quantize import QuantConfig, QuantPlan, plan_quantization
from .machine import (cpu_flags, default_dtype, memory_returned_to_os, release_free_memory,  # noqa: F401
                      resolve_dtype)

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_DIR = REPO_ROOT / "assets" / "checkpoints"     # the bundled demo models (tiny-*)


class ModelNotFound(FileNotFoundError):
    pass


def sat_home() -> Path:
    return Path(os.environ.get("SAT_HOME", "~/.sat_models")).expanduser()


def resolve_pretrained(name_or_path: str) -> Path:
    """A directory path, or a released/bundled model name looked up under $SAT_HOME
    (default ~/.sat_models), then the repository's `checkpoints/` folder, then the bundled
    models (`assets/checkpoints/`)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    name = ALIASES.get(name_or_path, name_or_path)
    looked = [sat_home() / name, REPO_ROOT / "checkpoints" / name, BUNDLED_DIR / name]
    for cand in looked:
        if cand.is_dir():
            return cand
    if p.exists():
        raise ModelNotFound(f"{p} is a file; --from_pretrained takes a SAT checkpoint directory "
                            f"(model_config.json, latest, <iter>/mp_rank_00_model_states.pt)")
    where = " or ".join(str(c) for c in looked)
    if name in MODEL_CONFIGS or "/" not in name_or_path:
        raise ModelNotFound(
            f"model {name_or_path!r} is not on disk (looked in {where}).\n"
            f"Get the SAT weights of {name!r} from the THUDM release (the model table of the "
            f"original CogVLM README links each archive), unzip it so that "
            f"{sat_home() / name}/model_config.json exists, or set SAT_HOME, or pass the "
            f"directory itself. HF-format weights (THUDM/{name.replace('-v1.1', '')}-hf) load "
            f"with cli_demo_hf.py.")
    raise ModelNotFound(f"no such checkpoint directory: {p}")


def build_model(cfg: ModelConfig, device="cpu", dtype: torch.dtype = torch.float32) -> CogVLM:
    """A randomly initialised model (tests, benchmarks, training from scratch)."""
    with torch.device(device):
        model = CogVLM(cfg)
    init_weights(model)
    return use_fast_cpu_layout(model.to(dtype)).eval()


@torch.no_grad()
def init_weights(model: CogVLM, std: float = 0.02) -> None:
    for name, p in model.named_parameters():
        if p.dim() >= 2 or name.endswith(("boi", "eoi", "cls_embedding", "cls_token", "pos_embed")):
            p.normal_(0.0, std)
        elif name.endswith("bias"):
            p.zero_()
        else:                                   # norm weights
            p.fill_(1.0)
    regenerate_derived(model, next(model.parameters()).device)


@dataclass
class LoadOptions:
    """How load_model builds a model. dtype None: default_dtype(device). rank/world: this
    process's piece under tensor parallelism. cpu_layout: the CPU inference re-layouts (off for
    training): the column-major fp32 one (unless the weights are laid out for speed next), and
    the int4 layers only prefill runs split by rows (layout.split_prefill_int4). pack: lay each CPU linear layer out for
    speed: with kernels "auto", in the layout its shape runs fastest in on this machine
    (kernels.py: measured once, cached; remeasure_kernels: time again). kernels "packed" /
    "packed_many" / "plain" / "colmajor" / "gemv": that layout for every layer that can take it (pack or not), nothing
    measured. compile: an inductor-compiled decode step (compile.py; the weights stay plain):
    True, compiled by the first step; None, compiled in the background where it applies
    (background_compile) and used once measured faster; False, never.
    deterministic: batch-invariant decoding (invariant.py: each row's logits as alone); None:
    invariant.deterministic_on's default (on for CPU unless compiled or single_stream).
    single_stream: the caller decodes one row per step, never more (the CLIs, the web and
    composite demos), so batch invariance guards nothing there unless asked for."""
    device: Union[str, torch.device] = "cpu"
    dtype: Optional[torch.dtype] = None
    quant: QuantConfig = field(default_factory=QuantConfig)
    trust_checkpoint: bool = False
    rank: int = 0
    world: int = 1
    cpu_layout: bool = True
    pack: bool = False
    kernels: str = "auto"
    remeasure_kernels: bool = False
    compile: Optional[bool] = None
    deterministic: Optional[bool] = None
    single_stream: bool = False


def load_model(from_pretrained: str, opts: Optional[LoadOptions] = None,
               arch: Optional[Callable[[ModelConfig], nn.Module]] = None):
    """Build the model from `model_config.json` (or an HF `config.json`) on the meta device, then
    load the weights tensor by tensor from a memory-mapped file: one copy of the weights in
    memory. opts None: LoadOptions() (CPU, fp32, unquantized). world > 1: tensor parallel, this process holds rank `rank`'s piece (read from its
    own MP shard file, or cut from a single-rank file). quant.bits 4|8: each linear layer is
    quantized as soon as its weights are read (quantize.py), so memory peaks near the quantized
    size, never the full-precision one. arch(cfg): the module to build (default CogVLM; the
    transformers front end passes its own class, same parameter names). Returns (model, config)."""
    opts = opts or LoadOptions()                   # (a fresh default: the options are a mutable dataclass)
    ckpt = resolve_pretrained(from_pretrained)
    cfg, sd = read_checkpoint(ckpt, opts)
    dtype = opts.dtype or default_dtype(opts.device)
    split = f", tensor-parallel rank {opts.rank} of {opts.world} (this rank holds 1/{opts.world} of the " \
            f"split weights)" if opts.world > 1 else ""
    quant = f", quantized to {opts.quant.bits} bits while reading" if opts.quant.bits else ""
    log.info("loading %s (%s, %d layers, hidden %d) on %s as %s%s%s", ckpt, cfg.model_class,
             cfg.num_layers, cfg.hidden_size, opts.device, dtype, quant, split)
    model = build_on_meta(cfg, opts, arch or CogVLM)
    plan, chosen = stream_plans(model, dtype, opts)
    layouts = load_weights(model, sd, str(ckpt), dtype, opts, plan, chosen)
    return prepare_for_inference(model, opts, layouts), cfg


def read_checkpoint(ckpt: Path, opts: LoadOptions) -> tuple[ModelConfig, dict]:
    """(config, lazily read state dict in SAT names) of a SAT or Hugging Face directory."""
    if (ckpt / "model_config.json").is_file():
        sd = read_sat_state_dict(ckpt, trust=opts.trust_checkpoint, rank=opts.rank, world=opts.world)
        return load_sat_config(ckpt, sd), sd
    if (ckpt / "config.json").is_file():               # HF format (e.g. THUDM/cogvlm-chat-hf)
        from .hf_io import read_hf_as_sat
        return read_hf_as_sat(ckpt)
    raise CheckpointError(f"{ckpt}: neither model_config.json (SAT format) nor config.json "
                          f"(Hugging Face format): not a checkpoint directory")


def build_on_meta(cfg: ModelConfig, opts: LoadOptions, arch: Callable[[ModelConfig], nn.Module]) -> nn.Module:
    """The architecture without memory: cut for tensor parallelism, LoRA adapters added when
    the checkpoint has them."""
    with torch.device("meta"):
        model = arch(cfg)
    if opts.world > 1:
        from .tp import apply_tensor_parallel
        apply_tensor_parallel(model, opts.rank, opts.world)    # on meta: shapes and forwards only
    if "lora" in cfg.extra:                            # a LoRA finetuning checkpoint
        from .lora import LoRAConfig, apply_lora
        apply_lora(model, LoRAConfig.from_json(cfg.extra["lora"]))
    return model


def load_weights(model: nn.Module, sd: dict, source: str, dtype: torch.dtype, opts: LoadOptions,
                 plan: Optional[QuantPlan] = None, chosen: Optional[dict] = None) -> Optional[dict]:
    """Fill the meta model from `sd`, quantizing each layer of `plan` as it arrives; the layers
    whose layout is `chosen` (layouts_before_loading) to be `half` take it as they arrive.
    Returns the layouts left to give the loaded model (None: to be chosen on it, as a quantized
    one's are: its int8 layers take theirs then)."""
    with memory_returned_to_os():
        load_state_into(model, sd, source, dtype=dtype, device=opts.device, rank=opts.rank, world=opts.world,
                        quant=plan, half=half_layers(chosen))
    if plan is not None:
        model.runtime.quant_bits = opts.quant.bits
    return layouts_after_loading(model, chosen, dtype, plan)


def stream_plans(model: nn.Module, dtype: torch.dtype, opts: LoadOptions,
                 stream: bool = True) -> tuple[Optional[QuantPlan], Optional[dict]]:
    """What a load of the meta-built `model` converts as each layer is read: (the quantization
    plan or None, the layouts chosen before reading or None: layouts_before_loading; stream
    False: none, every layout is given after loading)."""
    plan = plan_quantization(model, opts.quant, opts.device) if opts.quant.bits else None
    skip = frozenset(plan.layers) if plan else frozenset()
    return plan, layouts_before_loading(model, dtype, opts, skip) if stream else None


def half_layers(chosen: Optional[dict]) -> frozenset:
    """The layers whose chosen layout is `half` (converted as their weights are read)."""
    return frozenset(name for name, x in (chosen or {}).items() if x == "half")


def layouts_after_loading(model: nn.Module, chosen: Optional[dict], dtype: torch.dtype,
                          plan: Optional[QuantPlan] = None) -> Optional[dict]:
    """What is left of the layouts chosen before loading once the `half` layers took theirs
    (logged); None where some weight fp16 does not hold refused it, or the load quantized (its
    int8 layers take theirs after loading): the loaded model's layouts are then chosen again."""
    half = half_layers(chosen)
    declined = [name for name in half if not hasattr(model.get_submodule(name), "half_packed")]
    if half:
        log.info("%d linear layers took the half layout (fp16 weights) as they were read, so their %s weights "
                 "were never all held%s", len(half) - len(declined), str(dtype).replace("torch.", ""),
                 f"; {len(declined)} hold values fp16 does not: their layout is chosen again" if declined else "")
    if chosen is None or declined or plan is not None:
        return None
    return {name: x for name, x in chosen.items() if name not in half}


def layouts_before_loading(model: nn.Module, dtype: torch.dtype, opts: LoadOptions,
                           quantized: frozenset = frozenset()) -> Optional[dict]:
    """planned_layouts of the meta-built `model` in `dtype` (less the layers the load
    quantizes), timed on random weights before any is read (the same cached timings), so that
    the `half` layers can be converted as they arrive: an fp32 load of a bf16 checkpoint then
    peaks near the fp16 size, never the fp32 one. None where no layer could take `half` (not
    CPU, no FBGEMM)."""
    from .kernels import random_weight
    from .layout import can_half
    if torch.device(opts.device).type != "cpu" or not can_half():
        return None
    model.to(dtype)                                    # on meta: what the classes are timed in
    return planned_layouts(model, opts, random_weight, quantized)


def modes(opts: LoadOptions) -> tuple[bool, bool]:
    """(deterministic, compiled): batch-invariant decoding, and the compiled step (never both)."""
    from .invariant import deterministic_on
    deterministic = deterministic_on(opts.deterministic, opts.device, bool(opts.compile), opts.single_stream)
    compiled = background_compile(opts) if opts.compile is None else opts.compile
    return deterministic, compiled and not deterministic       # batch-invariant steps run eagerly


def background_compile(opts: LoadOptions) -> bool:
    """Whether --compile left unset compiles the decode step in the background: the single-stream
    apps on CPU in one process, weights laid out by measurement (kernels auto, packed), where
    inductor can build C++ (compile.compile_in_background decides after loading whether a step
    reads enough weights to repay it and whether it fits in memory)."""
    from .compile import compiler_missing
    return torch.device(opts.device).type == "cpu" and opts.single_stream and opts.world == 1 \
        and opts.kernels == "auto" and opts.pack and compiler_missing() is None


def measured_layouts(opts: LoadOptions) -> bool:
    """Whether each CPU linear layer's layout is chosen (measured or forced) rather than fixed."""
    return torch.device(opts.device).type == "cpu" and not modes(opts)[1] and (opts.pack or opts.kernels != "auto")


def planned_layouts(model: nn.Module, opts: LoadOptions, weight_of: Optional[Callable] = None,
                    skip: frozenset = frozenset()) -> dict:
    """name -> layout of the CPU linear layers (kernels.py): measured with kernels auto and pack,
    forced by --kernels, a compiled model's `half` layers (kernels.compiled_layouts); {} where
    none is chosen. weight_of, skip: see kernels.shape_classes."""
    from .invariant import half_pads
    from .kernels import choose_layouts, compiled_layouts
    deterministic, compiled = modes(opts)
    if torch.device(opts.device).type == "cpu" and compiled and opts.kernels == "auto" and opts.world == 1:
        return compiled_layouts(model, opts.remeasure_kernels, weight_of, skip)   # fp16 weights inductor calls
    if not measured_layouts(opts):
        return {}
    # Tensor-parallel ranks would time each other's load and might lay their replicated layers
    # out differently: they keep the fixed choice (packed where it can be).
    kernels = "packed" if opts.world > 1 and opts.kernels == "auto" else opts.kernels
    return choose_layouts(model, kernels, opts.cpu_layout, opts.remeasure_kernels, single_row=not deterministic,
                          half_pads=half_pads, weight_of=weight_of, skip=skip)


def prepare_for_inference(model: nn.Module, opts: LoadOptions, layouts: Optional[dict] = None) -> nn.Module:
    """The CPU weight layout of every linear layer, then the compiled decode step. Layouts
    (kernels.py, planned_layouts, unless given): kernels auto with pack, measured on this
    machine; a forced layout; without pack (--cpu_weights plain), column-major fp32 where it has
    more outputs than inputs. Compiled: `half` where measured fastest, plain weights elsewhere."""
    from .invariant import make_batch_invariant
    from .kernels import choose_kernel_rows, choose_quantized_kernels, choose_row_pieces
    from .layout import apply_layouts, split_prefill_int4
    cpu = torch.device(opts.device).type == "cpu"
    deterministic, compiled = modes(opts)
    if compiled and opts.kernels != "auto":             # inductor lays out and packs its own copy
        log.info("--kernels %s is left to --compile, which lays the weights out itself", opts.kernels)
    layouts = planned_layouts(model, opts) if layouts is None else layouts
    if layouts:
        apply_layouts(model, layouts)
    if opts.cpu_layout and not measured_layouts(opts):
        use_fast_cpu_layout(model)
    if cpu and opts.kernels == "auto" and (opts.pack or compiled):
        # The compiled step calls the same weight-only kernels: fp32 ones are scalar (5x slower).
        choose_quantized_kernels(model, opts.remeasure_kernels)
    if cpu and opts.cpu_layout and split_prefill_int4(model):     # (training loads keep the kernel layout)
        log.info("int4 layers only prefill runs: codes split by rows, dequantized in fewer passes")
    if cpu and opts.kernels == "auto" and (opts.pack or compiled):
        choose_kernel_rows(model, opts.remeasure_kernels)     # where the few-row kernels stop (timed)
        choose_row_pieces(model, remeasure=opts.remeasure_kernels)     # an image's rows in one GEMM call or a few
    if cpu and opts.cpu_layout and opts.compile is not False:
        from .compile import expand_int4_in_background
        expand_int4_in_background(model)                  # (where int4 layers hold enough weights)
    if compiled:
        from .compile import compile_decode, compile_in_background
        if opts.compile:
            compile_decode(model)
        elif not compile_in_background(model, functools.partial(lay_out_for_eager, model, opts)):
            return lay_out_for_eager(model, opts).eval()     # (compiled steps are never batch-invariant)
    if deterministic:
        make_batch_invariant(model)
    elif cpu and not compiled:
        from .compile import measured_single_rows
        measured_single_rows(model)
    return model.eval()


def lay_out_for_eager(model: nn.Module, opts: LoadOptions) -> nn.Module:
    """A model laid out for a compiled step that will decode eagerly after all (the background
    compile did not apply, failed or measured slower): its plain layers take the layouts eager
    decoding measures fastest, its long rows the eager attention kernels."""
    from .compile import measured_single_rows
    from .layout import apply_layouts
    layouts = planned_layouts(model, replace(opts, compile=False, remeasure_kernels=False))   # (timed at load)
    if layouts:
        apply_layouts(model, layouts)
    measured_single_rows(model)
    return model
