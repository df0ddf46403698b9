"""`load_model`: the one loader every demo, test and script uses."""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch

from .checkpoint import (CheckpointError, load_sat_config, load_state_into, read_sat_state_dict,
                         regenerate_derived)
from .cogvlm import CogVLM
from .config import ALIASES, MODEL_CONFIGS, ModelConfig
from .layout import use_fast_cpu_layout

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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_flags() -> set:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_dtype(name: str, device: Union[str, torch.device]) -> torch.dtype:
    """`--dtype`: float32 / bfloat16 / float16, or auto: bf16 on CUDA; on a CPU bf16 when it
    has AMX or AVX-512 BF16 (bf16 matrix products several times fp32's there, half the bytes
    per token), else fp32 (without them bf16 is slower than fp32). The choice is logged."""
    if name != "auto":
        return DTYPES[name]
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    fast = sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"})
    log.info("--dtype auto: %s", f"bfloat16 (this CPU has {', '.join(fast)})" if fast
             else "float32 (this CPU has neither AMX nor AVX-512 BF16)")
    return torch.bfloat16 if fast else torch.float32


def default_dtype(device: Union[str, torch.device], fp16: bool = False, bf16: bool = False) -> torch.dtype:
    """fp32 on CPU (no fast bf16 there), bf16 on CUDA; --fp16/--bf16 override."""
    if fp16:
        return torch.float16
    if bf16:
        return torch.bfloat16
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them after transient buffers: a
    burst of prefills, a compilation), so RSS tracks live memory. No-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def memory_returned_to_os():
    """While loading: glibc serves allocations above 1 MB with mmap, so the full-precision
    temporaries of each quantized layer go back to the OS when freed. Glibc's default (a
    threshold that grows with use) kept up to 210 MB of them in its heap and doubled the
    measured peak in half the runs of tests/test_quantize.py. After loading the threshold is
    set to 32 MB (glibc's own ceiling, so prefill activations reuse heap memory) and the heap
    is trimmed. No-op where glibc is absent."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        yield
        return
    libc.mallopt(-3, 1 << 20)                           # M_MMAP_THRESHOLD
    try:
        yield
    finally:
        libc.mallopt(-3, 32 << 20)
        release_free_memory()


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


def load_model(from_pretrained: str, device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = None, trust_checkpoint: bool = False,
               cpu_layout: bool = True, rank: int = 0, world: int = 1, quant: Optional[int] = None,
               quant_vision: Optional[int] = None, quant_backend: Optional[str] = None,
               quant_group: Optional[int] = None):
    """Build the model from `model_config.json` (or an HF `config.json`) on the meta device, then load the weights
    tensor by tensor from a memory-mapped file: one copy of the weights in memory.
    cpu_layout=False skips the column-major re-layout (callers that pack or quantize the
    weights next would only copy them twice). world > 1: tensor parallel, this process holds
    rank `rank`'s piece (read from its own MP shard file, or cut from a single-rank file).
    quant=4|8: each linear layer is quantized as soon as its weights are read (quantize.py),
    so memory peaks near the quantized size, never the full-precision one; quant_vision: the
    image encoders' bits (default 8; 16 = unquantized); quant_group: int4 inputs per scale
    (default 64). Returns (model, config)."""
    ckpt = resolve_pretrained(from_pretrained)
    if (ckpt / "model_config.json").is_file():
        sd = read_sat_state_dict(ckpt, trust=trust_checkpoint, rank=rank, world=world)   # memory-mapped
        cfg = load_sat_config(ckpt, sd)
    elif (ckpt / "config.json").is_file():             # HF format (e.g. THUDM/cogvlm-chat-hf)
        from .hf_io import read_hf_as_sat
        cfg, sd = read_hf_as_sat(ckpt)
    else:
        raise CheckpointError(f"{ckpt}: neither model_config.json (SAT format) nor config.json "
                              f"(Hugging Face format): not a checkpoint directory")
    dtype = dtype or default_dtype(device)
    log.info("loading %s (%s, %d layers, hidden %d) on %s as %s", ckpt, cfg.model_class,
             cfg.num_layers, cfg.hidden_size, device, dtype)
    with torch.device("meta"):
        model = CogVLM(cfg)
    if world > 1:
        from .tp import apply_tensor_parallel
        apply_tensor_parallel(model, rank, world)      # on meta: shapes and forwards only
    if "lora" in cfg.extra:                            # a LoRA finetuning checkpoint
        from .lora import LoRAConfig, apply_lora
        apply_lora(model, LoRAConfig.from_json(cfg.extra["lora"]))
    plan, backend = None, None
    if quant:
        from .quantize import default_backend, quant_plan
        backend = quant_backend or default_backend(device)
        plan = quant_plan(model, quant, quant_vision, backend, quant_group)
    with memory_returned_to_os() if quant else contextlib.nullcontext():
        load_state_into(model, sd, str(ckpt), dtype=dtype, device=device, rank=rank, world=world,
                        quant_plan=plan, quant_backend=backend, quant_group=quant_group)
    if quant:
        model.quantized_bits = quant
    return (use_fast_cpu_layout(model) if cpu_layout else model).eval(), cfg
