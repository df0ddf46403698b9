"""HF checkpoint files: validate, load with our transformers classes, and convert to/from SAT.

Conversion streams tensor by tensor (SAT -> HF writes one shard at a time from a memory-mapped
SAT file; HF -> SAT reads shards lazily), checks every key and shape against the architecture
built on the meta device, and never overwrites an existing output unless told.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from .checkpoint import (DERIVED, CheckpointError, read_sat_state_dict, sat_key_map, save_sat_checkpoint)
from .cogvlm import CogVLM
from .config import ModelConfig

FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_hf_config(path: Path):
    from .hf import CogAgentConfig, CogVLMConfig
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None
    is_agent = d.get("model_type") == "cogagent" or "cross_image_size" in d
    cls = CogAgentConfig if is_agent else CogVLMConfig
    d.pop("model_type", None)
    try:
        return cls.from_dict(d)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{f}: {e}") from None


def hf_weight_files(path: Path) -> dict[str, Path]:
    """key -> file, from model.safetensors.index.json / a single model.safetensors /
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
    elif (path / "model.safetensors").is_file():
        files = {k: path / "model.safetensors" for k in _safetensors_keys(path / "model.safetensors")}
    elif (path / "pytorch_model.bin").is_file():
        files = {k: path / "pytorch_model.bin" for k in torch.load(path / "pytorch_model.bin",
                                                                  weights_only=True, mmap=True)}
    else:
        raise CheckpointError(f"{path}: no model.safetensors, shard index or pytorch_model.bin")
    for f in sorted(set(files.values())):
        if f.suffix == ".safetensors":
            _safetensors_keys(f)                       # validates header and size
    return files


def _safetensors_keys(f: Path) -> list[str]:
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
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{f}: corrupt safetensors header") from None
    end = 0
    for k, meta in header.items():
        if k == "__metadata__":
            continue
        if meta["dtype"] not in FLOAT_DTYPES:
            raise CheckpointError(f"{f}: tensor {k} has dtype {meta['dtype']}; weights must be "
                                  f"F32, F16 or BF16")
        end = max(end, meta["data_offsets"][1])
    if 8 + n + end > size:
        raise CheckpointError(f"{f}: truncated safetensors file ({size} bytes, tensors need {8 + n + end})")
    return [k for k in header if k != "__metadata__"]


def load_hf_model(path, dtype: Optional[torch.dtype] = None, device="cpu"):
    """A released (or converted) HF checkpoint directory -> our transformers model, no remote
    code. Files are validated first so that a broken download gives a clear error."""
    from .hf import CogAgentConfig, CogAgentForCausalLM, CogVLMForCausalLM
    from .layout import use_fast_cpu_layout
    from .loading import default_dtype
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"no such HF checkpoint directory: {path}")
    config = read_hf_config(path)
    files = hf_weight_files(path)
    check_keys(meta_model(config), files.keys(), str(path))
    cls = CogAgentForCausalLM if isinstance(config, CogAgentConfig) else CogVLMForCausalLM
    model = cls.from_pretrained(path, config=config, dtype=dtype or default_dtype(device))
    return use_fast_cpu_layout(model.to(device)).eval()


def meta_model(config) -> CogVLM:
    """The architecture of an HF config, built on the meta device (no memory)."""
    with torch.device("meta"):
        return CogVLM(config.to_model_config())


def check_keys(model: CogVLM, keys, source: str) -> None:
    own = {k: v for k, v in model.state_dict().items() if not DERIVED.match(k)}
    keys = set(keys)
    ignorable = ("rotary_emb.inv_freq", "rotary.inv_freq", "rope.freqs_cos", "rope.freqs_sin")
    missing = sorted(k for k in own if k not in keys)
    extra = sorted(k for k in keys if k not in own and not k.endswith(ignorable))
    if missing:
        raise CheckpointError(f"{source}: missing key(s): {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise CheckpointError(f"{source}: unexpected key(s) not in this architecture: "
                              f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out} exists and is not empty; refusing to overwrite (pass --overwrite)")
        shutil.rmtree(out)


def sat_to_hf(sat_dir, out_dir, shard_bytes: int = 2 << 30, dtype: Optional[torch.dtype] = None,
              overwrite: bool = False, trust: bool = False) -> Path:
    from .hf import CogVLMConfig
    from safetensors.torch import save_file
    sat_dir, out = Path(sat_dir), Path(out_dir)
    cfg = ModelConfig.load(sat_dir / "model_config.json")
    with torch.device("meta"):
        meta = CogVLM(cfg)
    names = sat_key_map(meta)                          # SAT key -> HF key
    sd = read_sat_state_dict(sat_dir, trust=trust)     # memory-mapped: nothing read yet
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    unknown = [k for k in sd if k not in names]
    if unknown:
        raise CheckpointError(f"{sat_dir}: unexpected key(s) {', '.join(unknown[:5])}")
    _refuse_existing(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg = CogVLMConfig.from_model_config(cfg)
    hf_cfg.architectures = ["CogAgentForCausalLM" if cfg.cross else "CogVLMForCausalLM"]
    hf_cfg.save_pretrained(out)
    plan, shard, size = [], [], 0
    for skey, hkey in names.items():
        if DERIVED.match(hkey) and hkey.endswith("rotary.inv_freq"):
            continue                                   # derived, not in the HF release
        if skey not in sd:
            if DERIVED.match(hkey):
                continue
            raise CheckpointError(f"{sat_dir}: missing key {skey}")
        if tuple(sd[skey].shape) != shapes[hkey]:
            raise CheckpointError(f"{sat_dir}: key {skey} has shape {tuple(sd[skey].shape)}, "
                                  f"expected {shapes[hkey]}")
        n = sd[skey].numel() * (dtype or sd[skey].dtype).itemsize
        if shard and size + n > shard_bytes:
            plan.append(shard)
            shard, size = [], 0
        shard.append((skey, hkey))
        size += n
    plan.append(shard)
    weight_map, total = {}, 0
    bar = tqdm(total=sum(len(s) for s in plan), desc="SAT -> HF", unit="tensor")
    for i, shard in enumerate(plan):
        fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for skey, hkey in shard:
            t = sd[skey].to(dtype) if dtype else sd[skey]
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
    return out


def hf_to_sat(hf_dir, out_dir, dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> Path:
    from safetensors import safe_open
    hf_dir, out = Path(hf_dir), Path(out_dir)
    config = read_hf_config(hf_dir)
    cfg = config.to_model_config()
    files = hf_weight_files(hf_dir)
    meta = meta_model(config)
    check_keys(meta, files.keys(), str(hf_dir))
    _refuse_existing(out, overwrite)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    sd = {}
    handles = {}
    for key in tqdm(sorted(shapes), desc="HF -> SAT", unit="tensor"):
        if key not in files:                           # derived tables: regenerate below
            continue
        f = files[key]
        if f.suffix == ".safetensors":
            h = handles.setdefault(f, safe_open(str(f), framework="pt"))
            t = h.get_tensor(key)
        else:
            t = handles.setdefault(f, torch.load(f, weights_only=True, mmap=True))[key]
        if tuple(t.shape) != shapes[key]:
            raise CheckpointError(f"{f}: key {key} has shape {tuple(t.shape)}, expected {shapes[key]}")
        sd[key] = t.to(dtype) if dtype else t
    from .checkpoint import regenerate_derived
    with torch.device("meta"):
        model = CogVLM(cfg)
    model.load_state_dict(sd, strict=False, assign=True)
    regenerate_derived(model)
    save_sat_checkpoint(model, cfg, out, overwrite=True)
    if (hf_dir / "tokenizer").is_dir():
        shutil.copytree(hf_dir / "tokenizer", out / "tokenizer")
    return out
