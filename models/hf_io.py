"""HF checkpoint files: validate, load with our transformers classes, and convert to/from SAT.

Conversion streams tensor by tensor (SAT -> HF writes one shard at a time from a memory-mapped
SAT file; HF -> SAT reads shards lazily), checks every key and shape against the architecture
built on the meta device, and never overwrites an existing output unless told.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from .checkpoint import (CheckpointError, check_finite, check_key_sets, is_derived, load_sat_config,
                         read_sat_state_dict, regenerate_derived, sat_key_map, save_sat_checkpoint,
                         write_checkpoint_dir)
from .cogvlm import CogVLM
from .config import ModelConfig, cross_sizes_from_shapes

FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_hf_config(path: Path, shapes: Optional[dict] = None):
    """config.json -> CogVLMConfig / CogAgentConfig. shapes (key -> shape of the weights):
    CogAgent's high-res encoder sizes that the file does not state (released configs state
    none) are read from them."""
    from .hf import CogAgentConfig, CogVLMConfig
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size", "vision_config") if k not in d]
    if missing:
        raise CheckpointError(f"{f}: lacks required field(s): {', '.join(missing)}")
    if not isinstance(d["vision_config"], dict):
        raise CheckpointError(f"{f}: vision_config must be an object")
    is_agent = d.get("model_type") == "cogagent" or "cross_image_size" in d
    cls = CogAgentConfig if is_agent else CogVLMConfig
    d.pop("model_type", None)
    if is_agent and shapes:
        seen = cross_sizes_from_shapes(shapes, "model.cross_vision.")
        seen = {k: v for k, v in seen.items() if k in ("num_layers", "inner_hidden_size", "head_out_dim", "patch_size")}
        d["cross_vision_config"] = {**seen, **(d.get("cross_vision_config") or {})}
    try:
        config = cls.from_dict(d)
        config.to_model_config().check("config.json")  # sizes checked before anything is built
        return config
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{f}: {e}") from None


def hf_weight_index(path: Path) -> dict[str, tuple[Path, tuple]]:
    """key -> (file, shape), from model.safetensors.index.json / a single model.safetensors /
    pytorch_model*.bin. Missing shards and unreadable headers are reported by name."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    bin_index = path / "pytorch_model.bin.index.json"
    if index.is_file() or bin_index.is_file():
        idx = index if index.is_file() else bin_index
        try:
            weight_map = json.loads(idx.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{idx}: not a valid shard index ({e})") from None
        files = {k: path / v for k, v in weight_map.items()}
        missing = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if missing:
            raise CheckpointError(f"{path}: shard file(s) listed in {idx.name} are missing: {', '.join(missing)}")
    else:
        single = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
        if single is None:
            raise CheckpointError(f"{path}: no model.safetensors, shard index or pytorch_model.bin")
        files = None                                   # every key of the one file
    shapes = {}
    for f in sorted(set(files.values())) if files is not None else [single]:
        shapes.update(_safetensors_shapes(f) if f.suffix == ".safetensors" else _bin_shapes(f))
    if files is None:
        files = dict.fromkeys(shapes, single)
    absent = [k for k in files if k not in shapes]
    if absent:
        raise CheckpointError(f"{path}: tensor(s) listed in the shard index are not in their file: "
                              f"{', '.join(absent[:5])}")
    return {k: (f, shapes[k]) for k, f in files.items()}


def _bin_shapes(f: Path) -> dict[str, tuple]:
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported with its name
        raise CheckpointError(f"{f}: not a readable torch weights file ({type(e).__name__}: {e})") from None
    return {k: tuple(v.shape) for k, v in sd.items()}


def _safetensors_shapes(f: Path) -> dict[str, tuple]:
    """Header check: JSON header readable, dtypes floating point, data fits in the file."""
    import struct
    size = f.stat().st_size
    with open(f, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{f}: truncated safetensors file (no header)")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8:
            raise CheckpointError(f"{f}: truncated or corrupt safetensors file (header says {n} bytes)")
        if n > 100 << 20:
            raise CheckpointError(f"{f}: safetensors header of {n} bytes (over 100 MB): corrupt file")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise CheckpointError(f"{f}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{f}: corrupt safetensors header (not a JSON object)")
    end, shapes = 0, {}
    for k, meta in header.items():
        if k == "__metadata__":
            continue
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
            raise CheckpointError(f"{f}: tensor {k} has no dtype, shape or data_offsets in the header")
        if meta["dtype"] not in FLOAT_DTYPES:
            raise CheckpointError(f"{f}: tensor {k} has dtype {meta['dtype']}; weights must be "
                                  f"F32, F16 or BF16")
        shape, offs = meta["shape"], meta["data_offsets"]
        if not (isinstance(shape, list) and all(type(x) is int and x >= 0 for x in shape)
                and isinstance(offs, list) and len(offs) == 2 and all(type(x) is int for x in offs)
                and 0 <= offs[0] <= offs[1]
                and offs[1] - offs[0] == math.prod(shape) * FLOAT_DTYPES[meta["dtype"]].itemsize):
            raise CheckpointError(f"{f}: tensor {k} has an inconsistent shape {shape} / data_offsets {offs}")
        end = max(end, offs[1])
        shapes[k] = tuple(shape)
    if 8 + n + end > size:
        raise CheckpointError(f"{f}: truncated safetensors file ({size} bytes, tensors need {8 + n + end})")
    return shapes


def load_hf_model(path, dtype: Optional[torch.dtype] = None, device="cpu"):
    """A released (or converted) HF checkpoint directory -> our transformers model, no remote
    code. Files are validated first so that a broken download gives a clear error."""
    from .hf import CogAgentConfig, CogAgentForCausalLM, CogVLMForCausalLM
    from .layout import use_fast_cpu_layout
    from .machine import default_dtype
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"no such HF checkpoint directory: {path}")
    if (path / "model_config.json").is_file() and not (path / "config.json").is_file():
        return _hf_model_from_sat(path, dtype, device)
    config, index = read_hf_checkpoint(path)
    cls = CogAgentForCausalLM if isinstance(config, CogAgentConfig) else CogVLMForCausalLM
    model = cls.from_pretrained(path, config=config, dtype=dtype or default_dtype(device))
    for name, t in model.state_dict().items():
        check_finite(t, name, str(path))
    regenerate_derived(model, device)                  # never the file's (possibly bf16) tables
    return use_fast_cpu_layout(model.to(device)).eval()


def hf_architecture(cfg: ModelConfig):
    """The transformers model class of `cfg` built from its derived config.json (load_model's
    `arch` for the HF front end)."""
    from .hf import CogAgentForCausalLM, CogVLMConfig, CogVLMForCausalLM
    return (CogAgentForCausalLM if cfg.cross else CogVLMForCausalLM)(CogVLMConfig.from_model_config(cfg))


def _hf_model_from_sat(path: Path, dtype, device):
    """A SAT checkpoint as the transformers model (same parameter names as ours), so that
    the HF front end takes both formats. Its config.json is derived as sat2hf writes it."""
    from .checkpoint import load_state_into
    from .layout import use_fast_cpu_layout
    from .machine import default_dtype
    sd = read_sat_state_dict(path)
    cfg = load_sat_config(path, sd)
    with torch.device("meta"):
        model = hf_architecture(cfg)
    load_state_into(model, sd, str(path), dtype=dtype or default_dtype(device), device=device)
    return use_fast_cpu_layout(model).eval()


def read_hf_checkpoint(path: Path):
    """(config, weight index) of an HF checkpoint directory, every key and shape checked
    against the architecture its config.json describes (nothing is read but headers)."""
    if not (Path(path) / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    index = hf_weight_index(path)
    config = read_hf_config(path, {k: shape for k, (_, shape) in index.items()})
    check_keys(meta_model(config), index, str(path))
    return config, index


def meta_model(config) -> CogVLM:
    """The architecture of an HF config, built on the meta device (no memory)."""
    with torch.device("meta"):
        return CogVLM(config.to_model_config())


def read_hf_as_sat(path) -> tuple[ModelConfig, dict]:
    """An HF checkpoint directory as (ModelConfig, SAT-named state dict), so that every entry
    point that loads SAT checkpoints (load_model) takes HF ones too, and hf2sat writes it. The
    derived rotary tables are left out (regenerated); each file is opened once and its tensors
    are read one by one."""
    from safetensors import safe_open
    from .checkpoint import sat_key
    config, index = read_hf_checkpoint(Path(path))
    opened = {}

    def open_file(f: Path):
        if f not in opened:
            opened[f] = (safe_open(str(f), framework="pt") if f.suffix == ".safetensors" else
                         torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        return opened[f]

    from .checkpoint import LazyStateDict
    sd = LazyStateDict()
    for key, (f, shape) in index.items():
        if not is_derived(key):
            # Read when asked for (load_model quantizes each tensor as it arrives), not now.
            sd.add(sat_key(key), shape, lambda f=f, key=key: (open_file(f).get_tensor(key) if f.suffix == ".safetensors"
                                                              else open_file(f)[key]))
    return config.to_model_config(), sd


def hf_derived_tensors(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The derived buffers that the original remote code's `save_pretrained` writes: its
    RotaryEmbedding's `inv_freq` in every layer and, for CogAgent, the high-res encoder's rope
    tables once (its blocks share one module, which safetensors stores once)."""
    from .cogvlm import Rotary
    from .eva import rope_2d_tables
    inv_freq = Rotary(cfg.head_dim, cfg.rope_base).inv_freq
    out = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for i in range(cfg.num_layers)}
    if cfg.cross is not None:
        c = cfg.cross
        cos, sin = rope_2d_tables(c.hidden_size // c.num_attention_heads, c.image_size // c.patch_size,
                                  c.rope_pretrain_grid)
        out["model.cross_vision.vit.model.rope.freqs_cos"] = cos
        out["model.cross_vision.vit.model.rope.freqs_sin"] = sin
    return out


def check_keys(model: CogVLM, index: dict, source: str) -> None:
    """Every weight of the architecture present with its shape, nothing unknown; derived
    buffers (rotary tables, in any of the layouts DERIVED matches) optional but shape-checked."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    derived_shape = {"inv_freq": (model.config.head_dim // 2,)}
    if model.config.cross is not None:
        derived_shape["rope"] = own["model.cross_vision.vit.model.rope.freqs_cos"]
    # The file's own layout of the derived tables (e.g. one inv_freq per layer) is expected too.
    expected = dict(own)
    for k in index:
        kind = "inv_freq" if k.endswith("inv_freq") else "rope"
        if k not in own and is_derived(k) and kind in derived_shape:
            expected[k] = derived_shape[kind]
    check_key_sets(expected, {k: shape for k, (_, shape) in index.items()}, source, "config.json")


def sat_to_hf(sat_dir, out_dir, shard_bytes: int = 2 << 30, dtype: Optional[torch.dtype] = None,
              overwrite: bool = False, trust: bool = False) -> Path:
    sat_dir, out = Path(sat_dir), Path(out_dir)
    sd = read_sat_state_dict(sat_dir, trust=trust)     # memory-mapped: nothing read yet
    cfg = load_sat_config(sat_dir, sd)
    with torch.device("meta"):
        meta = CogVLM(cfg)
    names = sat_key_map(meta)                          # SAT key -> HF key
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    check_key_sets({s: shapes[h] for s, h in names.items()}, {k: tuple(v.shape) for k, v in sd.items()},
                   str(sat_dir), "model_config.json")
    # The original's key set: every weight, plus its own layout of the derived tables
    # (per-layer rotary_emb.inv_freq; never our single model.rotary.inv_freq).
    sources = {}
    for skey, hkey in names.items():
        if is_derived(hkey):
            continue
        if not sd[skey].is_floating_point():
            raise CheckpointError(f"{sat_dir}: key {skey} has dtype {sd[skey].dtype}, expected floating point")
        sources[hkey] = sd[skey]
    sources.update(hf_derived_tensors(cfg))
    write_checkpoint_dir(out, lambda tmp: _write_hf(tmp, cfg, sources, shard_bytes, dtype, sat_dir),
                         [sat_dir], overwrite)
    return out


def _write_hf(out: Path, cfg: ModelConfig, sources: dict, shard_bytes: int, dtype, sat_dir: Path) -> None:
    """config.json + safetensors shards of at most shard_bytes, one shard in memory at a time."""
    from .hf import CogVLMConfig
    from safetensors.torch import save_file
    hf_cfg = CogVLMConfig.from_model_config(cfg)
    hf_cfg.architectures = ["CogAgentForCausalLM" if cfg.cross else "CogVLMForCausalLM"]
    hf_cfg.save_pretrained(out)
    plan, shard, size = [], [], 0
    for hkey, t in sources.items():
        n = t.numel() * (dtype or t.dtype).itemsize
        if shard and size + n > shard_bytes:
            plan.append(shard)
            shard, size = [], 0
        shard.append(hkey)
        size += n
    plan.append(shard)
    weight_map, total = {}, 0
    bar = tqdm(total=sum(len(s) for s in plan), desc="SAT -> HF", unit="tensor")
    for i, shard in enumerate(plan):
        fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for hkey in shard:
            t = sources[hkey]
            t = t.to(dtype) if dtype and not is_derived(hkey) else t
            tensors[hkey] = t.contiguous().clone()
            weight_map[hkey] = fname
            total += t.numel() * t.element_size()
            bar.update()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors                                    # one shard in memory at a time
    bar.close()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if (sat_dir / "tokenizer").is_dir():
        shutil.copytree(sat_dir / "tokenizer", out / "tokenizer")


def hf_to_sat(hf_dir, out_dir, dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> Path:
    from .checkpoint import load_state_into
    hf_dir = Path(hf_dir)
    cfg, sd = read_hf_as_sat(hf_dir)                   # every key and shape checked first
    with torch.device("meta"):
        model = CogVLM(cfg)
    load_state_into(model, sd, str(hf_dir), dtype=dtype)

    def write(tmp: Path) -> None:
        save_sat_checkpoint(model, cfg, tmp, overwrite=True)
        if (hf_dir / "tokenizer").is_dir():
            shutil.copytree(hf_dir / "tokenizer", tmp / "tokenizer")
    return write_checkpoint_dir(out_dir, write, [hf_dir], overwrite)
