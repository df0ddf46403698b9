"""Model configurations: dataclasses, the released models by name, tiny configs for tests.

The architecture of a checkpoint always comes from its `model_config.json` (SAT format);
the named configs below describe the released checkpoints so that a full-size model can be
built (e.g. on the meta device to count parameters) without any file.
"""
from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

# Weight dtypes by name: the long names (`--dtype`) and the short ones (convert_checkpoint's).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EVAConfig:
    """Low-resolution EVA2-CLIP-E encoder (SAT `eva_args`)."""
    num_layers: int = 63
    hidden_size: int = 1792
    num_attention_heads: int = 16
    inner_hidden_size: int = 15360
    image_size: int = 490
    patch_size: int = 14
    layernorm_epsilon: float = 1e-6
    in_channels: int = 3

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class CrossConfig:
    """CogAgent's high-resolution EVA2-CLIP-L encoder and the cross attention that reads it."""
    image_size: int = 1120
    patch_size: int = 14
    hidden_size: int = 1024          # encoder width = cross_attn_hidden_size in SAT
    num_layers: int = 24             # blocks stored; the last one is skipped in forward
    num_attention_heads: int = 16
    inner_hidden_size: int = 2730    # int(1024 * 2.6667)
    head_out_dim: int = 768          # stored, unused CLIP head
    rope_pretrain_grid: int = 16     # 2-D rotary built for a 16x16 grid, interpolated
    layernorm_epsilon: float = 1e-6
    attn_hidden_size: int = 1024     # cross attention inner size (heads x head dim)
    attn_head_dim: int = 32          # cross_hidden_size_per_attention_head

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ModelConfig:
    model_class: str = "CogVLMModel"          # or "CogAgentModel"
    num_layers: int = 32
    hidden_size: int = 4096
    num_attention_heads: int = 32
    inner_hidden_size: int = 11008
    vocab_size: int = 32000
    max_sequence_length: int = 4096
    layernorm_epsilon: float = 1e-5
    rope_base: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    version: str = "chat_old"                 # default prompt template (`--version`)
    eva: EVAConfig = field(default_factory=EVAConfig)
    cross: Optional[CrossConfig] = None       # CogAgent only
    adapter_has_pos_embed: bool = False       # CogAgent adds a learned pos_embed before the adapter
    model_parallel_size: int = 1              # mp_rank_XX files of the checkpoint it was read from
    extra: dict = field(default_factory=dict)  # unknown model_config.json fields, written back unchanged

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def image_length(self) -> int:
        """Image patch tokens fed to the language model (CLS dropped)."""
        return self.eva.num_patches

    @property
    def is_cogagent(self) -> bool:
        return self.cross is not None

    # ----- SAT model_config.json ------------------------------------------------------
    def to_sat_json(self) -> dict:
        d = dict(self.extra)
        d.update({f: getattr(self, f) for f in SAT_FIELDS})
        d.update(SAT_CONSTANTS)
        d.update({"model_class": self.model_class, "image_length": self.image_length,
                  "text_processor_version": self.version, "eva_args": eva_to_sat(self.eva)})
        if self.cross is not None:
            d.update(cross_to_sat(self.cross, self.num_layers))
        return d

    @classmethod
    def from_sat_json(cls, d: dict, shapes: Optional[dict] = None,
                      default_version: Optional[str] = None) -> "ModelConfig":
        """shapes: SAT key -> shape of the checkpoint's tensors; CogAgent's high-res encoder
        sizes that the file does not state are read from them (released configs state none).
        default_version: the template when the file has no `text_processor_version`.
        A field the file lacks takes the dataclass default."""
        check_sat_json(d, shapes)
        is_agent = "CogAgent" in d["model_class"] or "cross_image_pix" in d
        lm = {f: d.get(f, _default(cls, f)) for f in SAT_FIELDS}
        lm["inner_hidden_size"] = d.get("inner_hidden_size") or 4 * d["hidden_size"]
        lm["model_parallel_size"] = int(lm["model_parallel_size"])
        cfg = cls(
            model_class="CogAgentModel" if is_agent else "CogVLMModel", **lm,
            version=d.get("text_processor_version") or default_version or ("chat" if is_agent else "chat_old"),
            eva=eva_from_sat(d["eva_args"]), cross=cross_from_sat(d, shapes) if is_agent else None,
            adapter_has_pos_embed=is_agent, extra={k: v for k, v in d.items() if k not in SAT_KNOWN})
        cfg.check("model_config.json")
        if "image_length" in d and d["image_length"] != cfg.image_length:
            raise ValueError(f"model_config.json: image_length {d['image_length']} does not match "
                             f"eva_args ({cfg.eva.image_size}px / patch {cfg.eva.patch_size} = "
                             f"{cfg.image_length} patches)")
        return cfg

    def check(self, source: str) -> None:
        """Sizes are whole numbers in a sane range and divide as the architecture needs;
        checked before anything is built, so a broken config fails in one line, at once."""
        def size(where, name, value, hi, lo=1):
            if type(value) is not int or not lo <= value <= hi:
                raise ValueError(f"{source}: {where}{name} is {value!r}; expected a whole number "
                                 f"from {lo} to {hi}")
        for name, hi in (("num_layers", 512), ("hidden_size", 65536), ("num_attention_heads", 1024),
                         ("inner_hidden_size", 1 << 19), ("vocab_size", 1 << 21),
                         ("max_sequence_length", 1 << 20)):
            size("", name, getattr(self, name), hi)
        for name, hi in (("num_layers", 512), ("hidden_size", 65536), ("num_attention_heads", 1024),
                         ("inner_hidden_size", 1 << 19), ("image_size", 8192), ("patch_size", 1024),
                         ("in_channels", 16)):
            size("eva_args.", name, getattr(self.eva, name), hi)
        if self.eva.patch_size > self.eva.image_size:
            raise ValueError(f"{source}: eva_args.patch_size {self.eva.patch_size} is larger than "
                             f"image_size {self.eva.image_size}")
        for where, width, heads in (("", self.hidden_size, self.num_attention_heads),
                                    ("eva_args.", self.eva.hidden_size, self.eva.num_attention_heads)):
            if width % heads:
                raise ValueError(f"{source}: {where}hidden_size {width} is not divisible by "
                                 f"num_attention_heads {heads}")
        if self.head_dim % 2:
            raise ValueError(f"{source}: the head size {self.head_dim} must be even (rotary embedding)")
        if self.cross is not None:
            c = self.cross
            for name, hi in (("num_layers", 512), ("hidden_size", 65536), ("inner_hidden_size", 1 << 19),
                             ("image_size", 8192), ("patch_size", 1024), ("attn_hidden_size", 1 << 17)):
                size("cross ", name, getattr(c, name), hi)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_sat_json(), f, indent=2)

    @classmethod
    def load(cls, path: str, shapes: Optional[dict] = None, default_version: Optional[str] = None) -> "ModelConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_sat_json(d, shapes, default_version)


def _default(cls, name: str):
    """The dataclass default of field `name`: every architecture default is declared there once."""
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if callable(f.default_factory) else f.default


# ----- model_config.json <-> the dataclasses --------------------------------------------------
# Fields of model_config.json (and of its `eva_args`) that are dataclass fields of the same name.
SAT_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "inner_hidden_size",
              "layernorm_epsilon", "max_sequence_length", "model_parallel_size", "bos_token_id",
              "eos_token_id", "pad_token_id")
SAT_EVA_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size",
                  "layernorm_epsilon", "patch_size", "in_channels")
# What SAT writes for every model of this architecture (read back and ignored).
SAT_CONSTANTS = {"layernorm_order": "pre", "use_bias": False}
SAT_EVA_CONSTANTS = {"model_class": "EVA2CLIPModel", "vocab_size": 1, "layernorm_order": "post",
                     "model_parallel_size": 1, "use_final_layernorm": False, "pre_len": 1, "post_len": 0,
                     "num_classes": 0}
# Every field this code reads; others are kept in ModelConfig.extra and written back.
SAT_KNOWN = {*SAT_FIELDS, *SAT_CONSTANTS, "model_class", "image_length", "text_processor_version",
             "eva_args", "is_decoder", "cross_attn_hidden_size", "cross_hidden_size_per_attention_head",
             "cross_image_pix", "cross_encoder_args"}
SAT_MODEL_CLASSES = ("CogVLMModel", "CogAgentModel", "FineTuneTrainCogVLMModel", "FineTuneTestCogVLMModel",
                     "FineTuneTrainCogAgentModel", "FineTuneTestCogAgentModel")


def check_sat_json(d: dict, shapes: Optional[dict]) -> None:
    """The fields model_config.json must have, before any is read."""
    missing = [k for k in ("model_class", "num_layers", "hidden_size", "num_attention_heads",
                           "vocab_size", "eva_args") if k not in d]
    if missing:
        raise ValueError(f"model_config.json lacks required field(s): {', '.join(missing)}")
    if d["model_class"] not in SAT_MODEL_CLASSES:
        raise ValueError(f"model_config.json: unsupported model_class {d['model_class']!r}")
    if not isinstance(d["eva_args"], dict):
        raise ValueError(f"model_config.json: eva_args must be an object, not {type(d['eva_args']).__name__}")
    if shapes:
        layers = {int(m.group(1)) for k in shapes if (m := re.match(r"transformer\.layers\.(\d+)\.", k))}
        if layers and len(layers) != d["num_layers"]:
            raise ValueError(f"model_config.json: num_layers is {d['num_layers']!r} but the weights "
                             f"hold {len(layers)} layers")
    dec = d.get("is_decoder", True)
    if isinstance(dec, list) and not all(dec):
        raise ValueError("model_config.json: is_decoder must be true for every layer "
                         "(cross attention in a subset of layers is not supported)")


def eva_from_sat(ea: dict) -> EVAConfig:
    e = {f: ea.get(f, _default(EVAConfig, f)) for f in SAT_EVA_FIELDS}
    e["inner_hidden_size"] = ea.get("inner_hidden_size") or 4 * ea["hidden_size"]
    size = ea.get("image_size", _default(EVAConfig, "image_size"))          # [h, w] in SAT files
    return EVAConfig(image_size=size[0] if isinstance(size, (list, tuple)) else int(size), **e)


def eva_to_sat(e: EVAConfig) -> dict:
    return {**SAT_EVA_CONSTANTS, **{f: getattr(e, f) for f in SAT_EVA_FIELDS},
            "max_sequence_length": e.num_patches + 1, "image_size": [e.image_size, e.image_size]}


# CrossConfig fields written under `cross_encoder_args` (SAT has no such entry: released
# CogAgent configs lack it and get the released sizes; it lets small CogAgents be described).
CROSS_ENCODER_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size",
                        "head_out_dim", "patch_size", "rope_pretrain_grid", "attn_hidden_size")


def cross_to_sat(c: CrossConfig, num_layers: int) -> dict:
    return {"is_decoder": [True] * num_layers, "cross_attn_hidden_size": c.hidden_size,
            "cross_hidden_size_per_attention_head": c.attn_head_dim, "cross_image_pix": c.image_size,
            "cross_encoder_args": {f: getattr(c, f) for f in CROSS_ENCODER_FIELDS}}


def cross_from_sat(d: dict, shapes: Optional[dict]) -> CrossConfig:
    return cross_config(d.get("cross_encoder_args") or {}, d["num_attention_heads"],
                        cross_sizes_from_shapes(shapes or {}, "mixins.encoder."),
                        width=d.get("cross_attn_hidden_size"), image_size=d.get("cross_image_pix"),
                        attn_head_dim=d.get("cross_hidden_size_per_attention_head",
                                            _default(CrossConfig, "attn_head_dim")))


# ----- HF config.json <-> the dataclasses (models/hf.py) ---------------------------------------
# config.json name -> ModelConfig field, and vision_config name -> EVAConfig field.
HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "inner_hidden_size",
             "num_hidden_layers": "num_layers", "num_attention_heads": "num_attention_heads",
             "max_position_embeddings": "max_sequence_length", "rms_norm_eps": "layernorm_epsilon",
             "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id"}
HF_VISION_FIELDS = {"hidden_size": "hidden_size", "image_size": "image_size", "in_channels": "in_channels",
                    "intermediate_size": "inner_hidden_size", "layer_norm_eps": "layernorm_epsilon",
                    "num_heads": "num_attention_heads", "num_hidden_layers": "num_layers",
                    "patch_size": "patch_size"}
# The HF release's context length (its config.json states 2048; SAT's 4096).
HF_MAX_POSITIONS = 2048


def hf_vision_config(e: EVAConfig) -> dict:
    """An HF `vision_config` describing the low-res encoder `e`."""
    return {"dropout_prob": 0.0, "hidden_act": "gelu", "num_positions": e.num_patches + 1,
            **{k: getattr(e, f) for k, f in HF_VISION_FIELDS.items()}}


def eva_from_hf(v: dict) -> EVAConfig:
    """An HF `vision_config` -> EVAConfig; the optional fields (eps, channels) default to the
    dataclass's, a missing other one is a KeyError."""
    optional = ("layer_norm_eps", "in_channels")
    return EVAConfig(**{f: v[k] if k in v or k not in optional else _default(EVAConfig, f)
                        for k, f in HF_VISION_FIELDS.items()})


def hf_fields(cfg: "ModelConfig") -> dict:
    """config.json's language-model fields of `cfg`."""
    return {k: getattr(cfg, f) for k, f in HF_FIELDS.items()}


# ----- CogAgent's high-resolution branch: sizes stated, else read from the weights' shapes -----
RELEASED = CrossConfig()           # the released EVA2-CLIP-L's sizes: the defaults below
RELEASED_CROSS_HEAD_DIM = RELEASED.hidden_size // RELEASED.num_attention_heads      # 64


def cross_sizes_from_shapes(shapes: dict, prefix: str) -> dict:
    """The high-res encoder's sizes visible in a state dict (key -> shape). prefix:
    "mixins.encoder." (SAT names) or "model.cross_vision." (HF names). Only tensors that
    model parallelism never splits are read (pos_embed, norms, block count, the CLIP head)."""
    vit = prefix + "vit.model."
    out = {}
    blocks = [int(m.group(1)) for k in shapes if (m := re.match(re.escape(vit) + r"blocks\.(\d+)\.", k))]
    if blocks:
        out["num_layers"] = max(blocks) + 1
    pos = shapes.get(prefix + "pos_embed")
    if pos is not None and len(pos) == 2:
        out["num_patches"], out["hidden_size"] = int(pos[0]), int(pos[1])
    patch = shapes.get(vit + "patch_embed.proj.weight")
    if patch is not None and len(patch) == 4:
        out["patch_size"] = int(patch[-1])
    for key, name in (("blocks.0.mlp.ffn_ln.weight", "inner_hidden_size"), ("head.weight", "head_out_dim")):
        if shapes.get(vit + key):
            out[name] = int(shapes[vit + key][0])
    return out


def cross_config(stated: dict, lm_heads: int, seen: dict, width: Optional[int] = None,
                 image_size: Optional[int] = None, attn_head_dim: int = RELEASED.attn_head_dim) -> CrossConfig:
    """CogAgent's CrossConfig: what the config states wins, then what the weights show, then
    the released sizes. The encoder's head size cannot be seen in the weights: it is stated
    (`head_dim` or `num_attention_heads`) or the released 64. The cross attention's inner
    size is the language model's heads x `cross_hidden_size_per_attention_head`."""
    width = int(width or stated.get("hidden_size") or seen.get("hidden_size") or RELEASED.hidden_size)
    patch = int(stated.get("patch_size") or seen.get("patch_size") or RELEASED.patch_size)
    if not image_size and seen.get("num_patches"):
        image_size = math.isqrt(seen["num_patches"]) * patch
    if stated.get("num_attention_heads"):
        heads = int(stated["num_attention_heads"])
        if heads <= 0 or width % heads:
            raise ValueError(f"model_config.json: the high-resolution encoder's width {width} is not "
                             f"divisible by its {heads} heads")
    else:
        head_dim = int(stated.get("head_dim") or RELEASED_CROSS_HEAD_DIM)
        if head_dim <= 0 or width % head_dim:
            raise ValueError(f"model_config.json: the high-resolution encoder's width {width} is not a "
                             f"multiple of its head size {head_dim}"
                             + ("" if stated.get("head_dim") else " (the released default); state the head "
                                "size as cross_encoder_args.head_dim"))
        heads = width // head_dim
    attn_hidden = lm_heads * int(attn_head_dim)
    if stated.get("attn_hidden_size") not in (None, attn_hidden):
        raise ValueError(f"model_config.json: cross_encoder_args.attn_hidden_size {stated['attn_hidden_size']} "
                         f"is not num_attention_heads x cross_hidden_size_per_attention_head "
                         f"({lm_heads} x {attn_head_dim} = {attn_hidden})")
    pick = lambda name, default: int(stated.get(name) or seen.get(name) or default)  # noqa: E731
    return CrossConfig(
        image_size=int(image_size or RELEASED.image_size), patch_size=patch, hidden_size=width,
        num_layers=pick("num_layers", RELEASED.num_layers), num_attention_heads=heads,
        inner_hidden_size=pick("inner_hidden_size", int(width * 2.6667)),     # EVA2-CLIP-L's MLP ratio
        head_out_dim=pick("head_out_dim", RELEASED.head_out_dim),
        rope_pretrain_grid=int(stated.get("rope_pretrain_grid") or RELEASED.rope_pretrain_grid),
        attn_hidden_size=attn_hidden, attn_head_dim=int(attn_head_dim))


def _cogvlm(image_size: int, version: str) -> ModelConfig:
    return ModelConfig(version=version, eva=EVAConfig(image_size=image_size))


def _cogagent(version: str) -> ModelConfig:
    return ModelConfig(model_class="CogAgentModel", version=version,
                       eva=EVAConfig(image_size=224), cross=CrossConfig(),
                       adapter_has_pos_embed=True)


# The released checkpoints, looked up by exact name.
MODEL_CONFIGS: dict[str, ModelConfig] = {
    "cogvlm-chat-v1.1": _cogvlm(490, "chat_old"),
    "cogvlm-base-224": _cogvlm(224, "base"),
    "cogvlm-base-490": _cogvlm(490, "base"),
    "cogvlm-grounding-generalist-v1.1": _cogvlm(490, "base"),
    "cogvlm-grounding-base": _cogvlm(490, "base"),
    "cogagent-chat": _cogagent("chat"),
    "cogagent-vqa": _cogagent("chat_old"),
    # Tiny random models for tests: the same architecture at toy width.
    "tiny-test-cogvlm": ModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=128,
        vocab_size=400, max_sequence_length=512, version="chat_old",
        eva=EVAConfig(num_layers=2, hidden_size=32, num_attention_heads=2,
                      inner_hidden_size=64, image_size=56)),
    "tiny-test-cogagent": ModelConfig(
        model_class="CogAgentModel", num_layers=2, hidden_size=64, num_attention_heads=4,
        inner_hidden_size=128, vocab_size=400, max_sequence_length=512, version="chat",
        eva=EVAConfig(num_layers=2, hidden_size=32, num_attention_heads=2,
                      inner_hidden_size=64, image_size=28),
        cross=CrossConfig(image_size=112, hidden_size=32, num_layers=3, num_attention_heads=2,
                          inner_hidden_size=48, head_out_dim=16, rope_pretrain_grid=4,
                          attn_hidden_size=32, attn_head_dim=8),
        adapter_has_pos_embed=True),
    # The bundled demo models (assets/checkpoints/tiny-*, trained by `make tiny-models` on synthetic
    # data): the real architectures at small width. CogVLM reads 168-px images (144 image
    # tokens: a glyph of the text images spans more than one 14-px patch); the CogAgent one
    # reads 112 px (64 tokens) plus a 336-px high-res image (576 tokens) through its cross
    # attention (attn_hidden_size / attn_head_dim = the language model's heads, as the HF
    # layout requires).
    "tiny-cogvlm": ModelConfig(
        num_layers=4, hidden_size=256, num_attention_heads=8, inner_hidden_size=512,
        vocab_size=1024, max_sequence_length=640, version="chat_old",
        eva=EVAConfig(num_layers=4, hidden_size=192, num_attention_heads=6,
                      inner_hidden_size=768, image_size=168)),
    "tiny-cogagent": ModelConfig(
        model_class="CogAgentModel", num_layers=4, hidden_size=256, num_attention_heads=8,
        inner_hidden_size=512, vocab_size=1024, max_sequence_length=512, version="chat",
        eva=EVAConfig(num_layers=4, hidden_size=192, num_attention_heads=6,
                      inner_hidden_size=768, image_size=112),
        cross=CrossConfig(image_size=336, hidden_size=128, num_layers=3, num_attention_heads=4,
                          inner_hidden_size=344, head_out_dim=64, attn_hidden_size=128, attn_head_dim=16),
        adapter_has_pos_embed=True),
}
ALIASES = {"cogvlm-chat": "cogvlm-chat-v1.1",
           "cogvlm-grounding-generalist": "cogvlm-grounding-generalist-v1.1"}


def get_config(name: str) -> ModelConfig:
    name = ALIASES.get(name, name)
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown model name {name!r}; known: {', '.join(sorted(MODEL_CONFIGS))}")
    return copy.deepcopy(MODEL_CONFIGS[name])
