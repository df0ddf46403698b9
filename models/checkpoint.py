"""SAT checkpoint format: read and write it exactly as the released SAT code does.

A SAT checkpoint is a directory: `model_config.json`, `latest` (the iteration as text) and
`<iter>/mp_rank_XX_model_states.pt` holding `{'module': state_dict}` with SAT's key names.
Our modules use the HF release's names; `sat_key()` is the whole rename table.
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from .config import ModelConfig


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file, key and shapes."""


# (our name regex, SAT name template). First match wins; \1 etc. refer to groups.
_SAT_RENAMES = [
    (r"embed_tokens\.weight", "transformer.word_embeddings.weight"),
    (r"norm\.weight", "transformer.final_layernorm.weight"),
    (r"lm_head\.weight", "mixins.lm.lm_head.weight"),
    (r"rotary\.inv_freq", "mixins.rotary.rotary_emb.inv_freq"),
    (r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm|post_cross_attention_layernorm)\.weight",
     r"transformer.layers.\1.\2.weight"),
    (r"layers\.(\d+)\.self_attn\.language_expert_query_key_value\.weight",
     r"transformer.layers.\1.attention.query_key_value.weight"),
    (r"layers\.(\d+)\.self_attn\.language_expert_dense\.weight",
     r"transformer.layers.\1.attention.dense.weight"),
    (r"layers\.(\d+)\.self_attn\.vision_expert_query_key_value\.weight",
     r"mixins.rotary.vision_query_key_value_list.\1.weight"),
    (r"layers\.(\d+)\.self_attn\.vision_expert_dense\.weight", r"mixins.rotary.vision_dense_list.\1.weight"),
    (r"layers\.(\d+)\.mlp\.language_mlp\.up_proj\.weight", r"transformer.layers.\1.mlp.dense_h_to_4h.weight"),
    (r"layers\.(\d+)\.mlp\.language_mlp\.down_proj\.weight", r"transformer.layers.\1.mlp.dense_4h_to_h.weight"),
    (r"layers\.(\d+)\.mlp\.language_mlp\.gate_proj\.weight", r"mixins.mlp.gate_proj.\1.weight"),
    (r"layers\.(\d+)\.mlp\.vision_mlp\.up_proj\.weight", r"mixins.mlp.vision_dense_h_to_4h_list.\1.weight"),
    (r"layers\.(\d+)\.mlp\.vision_mlp\.down_proj\.weight", r"mixins.mlp.vision_dense_4h_to_h_list.\1.weight"),
    (r"layers\.(\d+)\.mlp\.vision_mlp\.gate_proj\.weight", r"mixins.mlp.vision_gate_proj.\1.weight"),
    (r"layers\.(\d+)\.cross_attn\.(query|key_value|dense)\.weight", r"transformer.layers.\1.cross_attention.\2.weight"),
    # Low-res EVA2-CLIP-E and the adapter.
    (r"vision\.patch_embedding\.proj\.(weight|bias)", r"mixins.eva.vit_model.mixins.patch_embedding.proj.\1"),
    (r"vision\.patch_embedding\.cls_embedding", "mixins.eva.vit_model.transformer.word_embeddings.weight"),
    (r"vision\.patch_embedding\.position_embedding\.weight",
     "mixins.eva.vit_model.transformer.position_embeddings.weight"),
    (r"vision\.transformer\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)",
     r"mixins.eva.vit_model.transformer.layers.\1.mlp.dense_h_to_4h.\2"),
    (r"vision\.transformer\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)",
     r"mixins.eva.vit_model.transformer.layers.\1.mlp.dense_4h_to_h.\2"),
    (r"vision\.transformer\.layers\.(.*)", r"mixins.eva.vit_model.transformer.layers.\1"),
    (r"vision\.linear_proj\.(.*)", r"mixins.eva.linear_proj.\1"),
    (r"vision\.(boi|eoi|pos_embed)", r"mixins.eva.\1"),
    # CogAgent high-res encoder (timm-style names kept).
    (r"cross_vision\.vit\.model\.(.*)", r"mixins.encoder.vit.model.\1"),
    (r"cross_vision\.pos_embed", "mixins.encoder.pos_embed"),
]
# Every name but the LM head lives under the backbone, `model.` (as in the HF release).
_SAT_RENAMES = [(re.compile(("" if p.startswith("lm_head") else r"model\.") + p + "$"), t)
                for p, t in _SAT_RENAMES]

# Buffers that are derived from the config, never trained: rotary tables. Released files
# may carry them (SAT: once; HF: `rotary_emb.inv_freq` in every layer, CogAgent's rope tables
# once or per block) or not: loaders accept them present or absent, shape-check them when
# present, and always regenerate them in fp32.
DERIVED = re.compile(r"(^|\.)(rotary(_emb)?\.inv_freq|rope\.freqs_(cos|sin))$")


def is_derived(key: str) -> bool:
    return DERIVED.search(key) is not None


def sat_key(name: str) -> str:
    if name.endswith((".lora_A", ".lora_B")):          # LoRA adapters sit beside their base weight
        base, _, ab = name.rpartition(".")
        return sat_key(base + ".weight")[: -len(".weight")] + "." + ab
    for pat, tmpl in _SAT_RENAMES:
        m = pat.match(name)
        if m:
            return m.expand(tmpl)
    raise KeyError(f"no SAT name for parameter {name!r}")


def sat_key_map(model: nn.Module, keys=None) -> dict[str, str]:
    """SAT key -> our key, for every entry of the model's state dict."""
    return {sat_key(k): k for k in (keys if keys is not None else model.state_dict().keys())}


# ----------------------------------------------------------------------------------------
def _torch_load(path: Path, trust: bool) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust, mmap=True)
    except pickle.UnpicklingError as e:
        if trust:
            raise CheckpointError(f"{path}: cannot unpickle: {e}") from None
        raise CheckpointError(
            f"{path} needs full unpickling (it stores Python objects beyond tensors, e.g. "
            f"optimizer or RNG state), which can run arbitrary code. If you trust this file, "
            f"pass --trust-checkpoint (trust_checkpoint=True).") from None
    except RuntimeError as e:
        if "mmap" in str(e) or "zip" in str(e).lower():   # legacy (non-zip) torch.save format
            try:
                return torch.load(path, map_location="cpu", weights_only=not trust)
            except Exception as e2:  # noqa: BLE001 - reported with the file name
                raise CheckpointError(f"{path}: not a readable torch checkpoint (neither a torch "
                                      f"zip archive nor a legacy pickle: {type(e2).__name__} {e2})") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from None
    except (EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from None


def checkpoint_files(ckpt_dir: Path) -> tuple[str, list[Path]]:
    """The iteration named by `latest` and its model-state files, one per model-parallel rank."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        raise CheckpointError(f"{ckpt_dir}: no 'latest' file (not a SAT checkpoint directory)")
    it = latest.read_text().strip()
    files = sorted((ckpt_dir / it).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{ckpt_dir / it}: no mp_rank_XX_model_states.pt files "
                              f"('latest' says iteration {it!r})")
    ranks = sorted(int(m.group(1)) for f in files if (m := re.fullmatch(r"mp_rank_(\d+)_model_states\.pt", f.name)))
    if ranks != list(range(len(files))):
        raise CheckpointError(f"{ckpt_dir / it}: model-parallel shard files are for ranks "
                              f"{', '.join(map(str, ranks))}; expected 0 to {len(files) - 1}, each once")
    return it, files


def read_shard(path: Path, trust: bool = False) -> dict:
    obj = _torch_load(path, trust)
    if not isinstance(obj, dict) or "module" not in obj:
        raise CheckpointError(f"{path}: expected a dict with a 'module' state dict")
    return obj["module"]


def load_sat_config(ckpt_dir: Path, sd: dict) -> ModelConfig:
    """`model_config.json` of a SAT checkpoint, completed from its state dict `sd` (CogAgent's
    high-res encoder sizes) and, when it names no template, the model table's template for
    the directory's name (a released checkpoint unpacked under its own name)."""
    from .config import ALIASES, MODEL_CONFIGS
    f = Path(ckpt_dir) / "model_config.json"
    if not f.is_file():
        raise CheckpointError(f"{ckpt_dir}: no model_config.json (not a SAT checkpoint directory)")
    known = MODEL_CONFIGS.get(ALIASES.get(Path(ckpt_dir).name, Path(ckpt_dir).name))
    try:
        cfg = ModelConfig.load(f, {k: tuple(v.shape) for k, v in sd.items()},
                               known.version if known else None)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f}: {e}") from None
    it, files = checkpoint_files(Path(ckpt_dir))
    if cfg.model_parallel_size > 1 and len(files) != cfg.model_parallel_size:
        raise CheckpointError(f"{Path(ckpt_dir) / it}: model_config.json says model_parallel_size "
                              f"{cfg.model_parallel_size} but there are {len(files)} mp_rank_XX files "
                              f"(a rank file is missing)")
    return cfg


def read_sat_state_dict(ckpt_dir: Path, trust: bool = False, rank: int = 0, world: int = 1) -> dict:
    """The state dict this rank loads: the single file (sliced later if world > 1), or with
    an MP=world checkpoint this rank's own shard file only."""
    _, files = checkpoint_files(ckpt_dir)
    if len(files) > 1 and len(files) != world:
        raise CheckpointError(
            f"{ckpt_dir}: holds {len(files)} model-parallel shards but {world} process(es) "
            f"load it; run with `torchrun --nproc-per-node {len(files)}`, or re-split it with "
            f"`python utils/merge_model.py --mp {world}`")
    return read_shard(files[rank if len(files) > 1 else 0], trust)


class LazyStateDict(dict):
    """A state dict whose tensors are read from their files when asked for (each access reads
    again), with every shape known up front from the files' headers."""
    def __init__(self):
        super().__init__()
        self.shapes = {}

    def add(self, key: str, shape, read) -> None:
        dict.__setitem__(self, key, read)
        self.shapes[key] = tuple(shape)

    def __getitem__(self, key):
        v = dict.__getitem__(self, key)
        return v if isinstance(v, torch.Tensor) else v()

    def __setitem__(self, key, t: torch.Tensor) -> None:
        dict.__setitem__(self, key, t)
        self.shapes[key] = tuple(t.shape)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def items(self):
        return ((k, self[k]) for k in self)

    def values(self):
        return (self[k] for k in self)


def _shape(sd: dict, key: str) -> tuple:
    return sd.shapes[key] if isinstance(sd, LazyStateDict) else tuple(sd[key].shape)


def _listed(keys: list) -> str:
    return ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")


def check_key_sets(expected: dict, got: dict, where: str, origin: str = "the checkpoint's config",
                   optional=is_derived) -> None:
    """The one key check of every loader and converter: nothing unknown, every key present
    (except those `optional` accepts: derived rotary tables), every shape as expected.
    expected, got: key -> shape (None: not checked, e.g. one rank's piece); origin: where the
    expected shapes come from, for the message."""
    extra = [k for k in got if k not in expected]
    if extra:
        raise CheckpointError(f"{where}: unexpected key(s) not in this architecture: {_listed(extra)}")
    missing = [k for k in expected if k not in got and not optional(k)]
    if missing:
        raise CheckpointError(f"{where}: missing key(s): {_listed(missing)}")
    for k, shape in got.items():
        want = expected[k]
        if shape is not None and want is not None and tuple(shape) != tuple(want):
            raise CheckpointError(f"{where}: key {k} has shape {tuple(shape)}, expected {tuple(want)} "
                                  f"(from {origin})")


def cut_for_rank(sat_sd: dict, names: dict, own: dict, rank: int, world: int) -> None:
    """Under tensor parallelism, replace each full-size tensor of `sat_sd` (SAT key -> tensor)
    that this rank holds a piece of by that piece (names: SAT key -> our key; own: our state
    dict, already cut by tp.py)."""
    from .tp import shard_spec, shard_tensor
    for skey, okey in names.items():
        spec = shard_spec(okey)
        if spec and skey in sat_sd and _shape(sat_sd, skey) != tuple(own[okey].shape) \
                and _shape(sat_sd, skey)[spec[0]] == own[okey].shape[spec[0]] * world:
            sat_sd[skey] = shard_tensor(sat_sd[skey], *spec, rank, world, skey)


def load_state_into(model: nn.Module, sat_sd: dict, source: str, dtype: Optional[torch.dtype] = None,
                    device="cpu", rank: int = 0, world: int = 1, quant=None, half: frozenset = frozenset()) -> None:
    """Load a SAT-named state dict into a model built on any device (meta included), one
    tensor at a time (assign, no second copy). Every key must match by name and shape.
    Under tensor parallelism (world > 1, the model already cut by tp.py) a full-size tensor
    is cut to this rank's piece as it is read. quant (a quantize.QuantPlan):
    those linear layers are replaced by their quantized form as soon as their tensors are read,
    and the full-precision copy is dropped; half (layer names): the same with the `half` layout."""
    own = model.state_dict(keep_vars=True)
    names = sat_key_map(model, own.keys())
    if world > 1:
        cut_for_rank(sat_sd, {s: o for s, o in names.items() if s in sat_sd}, own, rank, world)
    check_key_sets({s: tuple(own[o].shape) for s, o in names.items()},
                   {k: _shape(sat_sd, k) for k in sat_sd}, source)

    def tensors():
        for skey, okey in names.items():
            if is_derived(okey):
                continue
            t = sat_sd[skey]
            if not t.is_floating_point():
                raise CheckpointError(f"{source}: key {skey} has dtype {t.dtype}, expected floating point")
            t = t.to(device=device, dtype=dtype or t.dtype)
            check_finite(t, skey, source)
            yield okey, t
    materialize(model, tensors(), len(names), device, quant, show=rank == 0, half=half)


# FBGEMM packs an fp16 weight on one thread (about 10 ms per million weights, AVX2 EPYC) and
# releases the GIL: `half` layers are packed on this many threads while the next are read.
HALF_THREADS = 8


def materialize(model: nn.Module, tensors, total: int, device="cpu", quant=None, show: bool = True,
                half: frozenset = frozenset()) -> None:
    """Fill a model built on the meta device from (our key, tensor) pairs, one at a time: the
    linear layers named in the quant plan (quantize.QuantPlan) are replaced by their quantized
    form, those named in `half` by their `half` layout (layout.HalfLinear, where fp16 holds the
    weight; packed on a few threads), as soon as their tensors have arrived, so only a few
    full-precision layers of them exist at a time; everything else is assigned as is. Used by
    checkpoint loading and by the full-size benchmark's random-weight source alike."""
    from .layout import half_from
    from .quantize import quantized_form
    new_sd, pending, packing = {}, {}, deque()
    layers = quant.layers if quant is not None else {}
    threads = max(1, min(HALF_THREADS, torch.get_num_threads()))
    with ThreadPoolExecutor(threads) as pool:
        for okey, t in tqdm(tensors, total=total, desc="loading weights", unit="tensor",
                            disable=total < 200 or not show, leave=False):
            name, _, attr = okey.rpartition(".")
            if name not in layers and name not in half:
                new_sd[okey] = t
                continue
            got = collect_layer(model, name, attr, t, pending)
            if got is not None and name in layers:
                new_sd.update(put_layer(model, name, quantized_form(model, name, got, quant), got))
            elif got is not None:
                packing.append((name, got, pool.submit(half_from, got["weight"], got.get("bias"))))
            while len(packing) > threads or (packing and packing[0][2].done()):
                name, got, new = packing.popleft()
                new_sd.update(put_layer(model, name, new.result(), got))
        for name, got, new in packing:
            new_sd.update(put_layer(model, name, new.result(), got))
    model.load_state_dict(new_sd, strict=False, assign=True)
    regenerate_derived(model, device)


def collect_layer(model: nn.Module, name: str, attr: str, t: torch.Tensor, pending: dict) -> Optional[dict]:
    """Gather linear layer `name`'s tensors as they are read: all of them (weight, bias if it
    has one, LoRA adapter if it has one) once the last has arrived, else None."""
    from .lora import has_adapter
    got, mod = pending.setdefault(name, {}), model.get_submodule(name)
    got[attr] = t
    needs = ["weight"] + ["bias"] * (getattr(mod, "bias", None) is not None) + ["lora_A", "lora_B"] * has_adapter(mod)
    if not all(k in got for k in needs):
        return None
    return pending.pop(name)


def put_layer(model: nn.Module, name: str, new: Optional[nn.Module], got: dict) -> dict:
    """Put `new`, the quantized or `half` form of linear layer `name` made from its tensors
    `got`, in its place, LoRA adapter kept. Returns what is left to assign as read: the
    layer's tensors where there is no such form (new None: fp16 does not hold the weight)."""
    from .lora import carry_adapter, has_adapter
    from .quantize import replace_module
    if new is None:
        return {f"{name}.{k}": v for k, v in got.items()}
    old = model.get_submodule(name)
    replace_module(model, name, new)
    if has_adapter(old):
        carry_adapter(old, new, got["lora_A"], got["lora_B"])
    return {}


def check_finite(t: torch.Tensor, key: str, source: str) -> None:
    """NaN or inf weights are reported at load, not discovered as `⁇ ⁇ ⁇` answers. One fp32
    sum per tensor (no copy): any NaN or inf makes it non-finite."""
    if t.is_floating_point() and t.device.type != "meta" and t.numel() \
            and not bool(torch.isfinite(t.sum(dtype=torch.float32))):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{source}: weight {key} holds {bad} NaN or infinite value(s) of "
                              f"{t.numel()}: the file is corrupt (or was saved after training diverged)")


def regenerate_derived(model: nn.Module, device="cpu") -> None:
    """(Re)build the derived rotary buffers on `device` in fp32 (never loaded)."""
    from .cogvlm import Rotary
    from .eva import RopeTables, rope_2d_tables
    for mod in model.modules():
        if isinstance(mod, Rotary):
            mod.inv_freq = mod.compute_inv_freq(device)
        elif isinstance(mod, RopeTables):
            mod.freqs_cos, mod.freqs_sin = (t.to(device) for t in rope_2d_tables(*mod.shape_args))


# ----------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """write(tmp) into a temporary beside `path`, then rename it over `path`. The file gets
    the permissions of a normal new file (mkstemp's are 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_TEMPORARY = re.compile(r"\.(latest|model_config\.json|mp_rank_\d+_model_states\.pt)\w{8}$")


def remove_stale_temporaries(ckpt_dir) -> int:
    """Delete the temporaries of atomic_write() that a killed save left in a checkpoint
    directory (and its iteration folders); returns how many."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return 0
    stale = [p for sub in [d, *[x for x in d.iterdir() if x.is_dir() and x.name.isdigit()]]
             for p in sub.iterdir() if p.is_file() and _TEMPORARY.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def to_sat_state_dict(model: nn.Module) -> dict:
    return {sat_key(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_sat_checkpoint(model: nn.Module, cfg: ModelConfig, out_dir, iteration: int = 1,
                        extra: Optional[dict] = None, overwrite: bool = False) -> Path:
    """Write `out_dir` in the SAT layout. Files are written to temporaries and renamed, and
    `latest` is written last, so a crash never leaves `latest` pointing at a partial save."""
    out = Path(out_dir)
    target = out / str(iteration) / "mp_rank_00_model_states.pt"
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target} exists; refusing to overwrite (pass overwrite=True)")
    state = {"module": to_sat_state_dict(model), **(extra or {})}
    atomic_write(out / "model_config.json", lambda p: cfg.save(p))
    atomic_write(target, lambda p: torch.save(state, p))
    atomic_write(out / "latest", lambda p: Path(p).write_text(str(iteration)))
    return out


# Files a checkpoint directory of either format may hold; anything else means the directory
# is someone's data, which --overwrite must never delete.
_CHECKPOINT_ENTRY = re.compile(r"(model_config\.json|latest|\d+|config\.json|generation_config\.json|"
                               r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
                               r"pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json|"
                               r"tokenizer|tokenizer.*\.(json|model)|special_tokens_map\.json|\..*)$")


def write_checkpoint_dir(out, write, sources=(), overwrite: bool = False) -> Path:
    """Write a whole checkpoint directory safely: write(tmp) fills a new sibling directory,
    which replaces `out` only after it succeeded. Refused before anything is written: `out`
    being a source, inside one or holding one; an existing non-empty `out` without
    `overwrite`; and, with it, an `out` that holds anything but checkpoint files."""
    out = Path(out).expanduser().absolute()
    for src in sources:
        src = Path(src).expanduser().resolve()
        o = out.resolve()
        if o == src or src in o.parents or o in src.parents:
            raise CheckpointError(f"the output {out} is the source {src}, inside it or holds it; "
                                  f"write to another directory")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out} exists and is not empty; refusing to overwrite (pass overwrite=True)")
        foreign = sorted(p.name for p in out.iterdir() if not _CHECKPOINT_ENTRY.match(p.name))
        if foreign or not ((out / "config.json").is_file() or (out / "model_config.json").is_file()):
            raise CheckpointError(f"refusing to replace {out}: it does not look like a checkpoint"
                                  + (f" (it holds {', '.join(foreign[:5])})" if foreign else
                                     " (no config.json or model_config.json)"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.writing-"))
    try:
        write(tmp)
        # Normal permissions for everything written (mkdtemp, mkstemp and safetensors give 0600).
        mask = _umask()
        for d, _, names in os.walk(tmp):
            os.chmod(d, 0o777 & ~mask)
            for n in names:
                os.chmod(os.path.join(d, n), 0o666 & ~mask)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "d")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
