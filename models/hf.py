"""Transformers-native front end: CogVLM / CogAgent as `PreTrainedModel` + `GenerationMixin`,
loading the released HF checkpoints (THUDM/cogvlm-chat-hf, THUDM/cogagent-chat-hf, ...)
with `from_pretrained(path)` and no remote code. The math is models/cogvlm.py's: this file
only adapts configs, inputs (`token_type_ids`, `images`, `cross_images`) and the cache.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from transformers import (AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationMixin,
                          PretrainedConfig, PreTrainedModel)
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cogvlm import CogVLM, CogVLMModel, ModelInputs, Rotary, RuntimeState
from .config import (CROSS_ENCODER_FIELDS, HF_FIELDS, HF_MAX_POSITIONS, ModelConfig, cross_config,
                     eva_from_hf, get_config, hf_fields, hf_vision_config)
from .eva import RopeTables, rope_2d_tables

VISION_TOKEN = 1      # token_type_ids: 0 language, 1 vision (boi, patches, eoi)

# config.json's `template_version` (the original HF code's names) <-> the SAT `--version` of
# the same prompt. CogVLM-HF's "chat" is `Question: ... Answer:`, SAT's chat_old; CogAgent-HF
# uses SAT's names (its chat_old/vqa differ in that `<EOI>` is text there: utils/chat/templates.py).
COGVLM_HF_TO_SAT = {"base": "base", "chat": "chat_old", "chat_old": "chat_old", "vqa": "vqa"}
COGVLM_SAT_TO_HF = {"base": "base", "chat_old": "chat", "chat": "chat", "vqa": "vqa"}


_LM = ModelConfig()                       # the dataclass defaults: CogVLM-17B's language model
_AGENT = get_config("cogagent-chat")       # CogAgent's (224-px low-res encoder, EVA2-CLIP-L cross branch)


class CogVLMConfig(PretrainedConfig):
    model_type = "cogvlm"

    def __init__(self, vocab_size=_LM.vocab_size, hidden_size=_LM.hidden_size,
                 intermediate_size=_LM.inner_hidden_size, num_hidden_layers=_LM.num_layers,
                 num_attention_heads=_LM.num_attention_heads, hidden_act="silu",
                 max_position_embeddings=HF_MAX_POSITIONS, initializer_range=0.02,
                 rms_norm_eps=_LM.layernorm_epsilon, template_version="chat",
                 pad_token_id=_LM.pad_token_id, bos_token_id=_LM.bos_token_id,
                 eos_token_id=_LM.eos_token_id, tie_word_embeddings=False, use_cache=True,
                 vision_config=None, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.intermediate_size, self.num_hidden_layers = intermediate_size, num_hidden_layers
        self.num_attention_heads, self.hidden_act = num_attention_heads, hidden_act
        self.max_position_embeddings, self.initializer_range = max_position_embeddings, initializer_range
        self.rms_norm_eps, self.template_version, self.use_cache = rms_norm_eps, template_version, use_cache
        self.vision_config = vision_config or hf_vision_config(_LM.eva)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_model_config(self) -> ModelConfig:
        lm = {f: getattr(self, k) for k, f in HF_FIELDS.items()}
        lm["pad_token_id"] = lm["pad_token_id"] or 0
        return ModelConfig(**lm, version=self.sat_version(), eva=eva_from_hf(self.vision_config))

    def sat_version(self) -> str:
        """The SAT template that writes the same prompt as `template_version` here."""
        return COGVLM_HF_TO_SAT.get(self.template_version, "chat_old")

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> "CogVLMConfig":
        if cfg.cross is not None:
            return CogAgentConfig.from_model_config(cfg)
        return cls(**_common_fields(cfg))


class CogAgentConfig(CogVLMConfig):
    model_type = "cogagent"

    def __init__(self, cross_hidden_size=_AGENT.cross.hidden_size,
                 cross_compute_hidden_size=_AGENT.cross.attn_hidden_size,
                 cross_image_size=_AGENT.cross.image_size, cross_vision_config=None, **kwargs):
        self.cross_hidden_size = cross_hidden_size
        self.cross_compute_hidden_size = cross_compute_hidden_size
        self.cross_image_size = cross_image_size
        # Not in the released configs (their high-res encoder is fixed EVA2-CLIP-L): the size
        # of the encoder, so that smaller CogAgents can be described. Absent = released size.
        self.cross_vision_config = cross_vision_config or {}
        kwargs.setdefault("vision_config", hf_vision_config(_AGENT.eva))
        super().__init__(**kwargs)

    def sat_version(self) -> str:
        return self.template_version if self.template_version in ("base", "chat", "chat_old", "vqa") else "chat"

    def to_model_config(self) -> ModelConfig:
        cfg = super().to_model_config()
        cfg.model_class, cfg.adapter_has_pos_embed = "CogAgentModel", True
        if self.cross_compute_hidden_size % self.num_attention_heads:
            raise ValueError(f"cross_compute_hidden_size {self.cross_compute_hidden_size} is not a multiple "
                             f"of num_attention_heads {self.num_attention_heads}")
        c = self.cross_vision_config
        cfg.cross = cross_config({**c, "hidden_size": c.get("hidden_size", self.cross_hidden_size)},
                                 self.num_attention_heads, {}, image_size=self.cross_image_size,
                                 attn_head_dim=self.cross_compute_hidden_size // self.num_attention_heads)
        return cfg

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> "CogAgentConfig":
        c = cfg.cross
        encoder = {f: getattr(c, f) for f in CROSS_ENCODER_FIELDS if f != "attn_hidden_size"}
        return cls(cross_hidden_size=c.hidden_size, cross_compute_hidden_size=c.attn_hidden_size,
                   cross_image_size=c.image_size, cross_vision_config=encoder, **_common_fields(cfg))


def _common_fields(cfg: ModelConfig) -> dict:
    if cfg.cross is not None and cfg.cross.attn_head_dim * cfg.num_attention_heads != cfg.cross.attn_hidden_size:
        raise ValueError("the HF format derives the cross-attention head size from the number of "
                         "heads; this config does not fit it")
    return dict(**hf_fields(cfg), vision_config=hf_vision_config(cfg.eva),
                template_version=cfg.version if cfg.cross is not None else COGVLM_SAT_TO_HF[cfg.version])


# ----------------------------------------------------------------------------------------
def masks_from_token_types(token_type_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
    """HF inputs -> (image slots, vision-expert mask, position ids), all B,T.
    The last vision-typed token of each image (eoi) uses the language expert; patches (vision
    tokens between boi and eoi) share one position."""
    tt = token_type_ids == VISION_TOKEN
    nxt = torch.zeros_like(tt)
    nxt[:, :-1] = tt[:, 1:]
    prv = torch.zeros_like(tt)
    prv[:, 1:] = tt[:, :-1]
    vision = tt & nxt                                   # boi + patches
    patch = tt & nxt & prv                              # strictly inside an image
    prev_patch = torch.zeros_like(patch)
    prev_patch[:, 1:] = patch[:, :-1]
    step = (~(patch & prev_patch)).long()              # a patch after a patch: same position
    if attention_mask is not None:
        step = step * attention_mask.long()
    # As the original's build_position_ids: slot 0 is position 0 whatever it holds, and each
    # later counted token adds one. So a row without padding starts `<s>` at 0, while in a
    # left-padded row every padding slot is 0 and `<s>` is 1 (rotary is relative: same logits).
    positions = step.cumsum(1) - step[:, :1]
    return tt, vision, positions


def _stack_images(images) -> Optional[torch.Tensor]:
    """`images`: a tensor n,3,S,S, or the HF layout: one list per row, each [] or [tensor]."""
    if images is None or isinstance(images, torch.Tensor):
        return images
    flat = [img for row in images for img in (row if isinstance(row, (list, tuple)) else [row])]
    return torch.stack(flat) if flat else None


class CogVLMCache(DynamicCache):
    """transformers' DynamicCache plus the sequence state our model reads from a cache (as
    models.cogvlm.Cache): the next rotary position of each row, CogAgent's cross K/V
    (computed at the first step, kept), and this step's padding mask."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.next_position: Optional[torch.Tensor] = None   # B
        self.cross_kv: Optional[list] = None                # per layer (k, v): B,H,N,D
        self.cross_rows: Optional[torch.Tensor] = None      # B bool: rows with an image
        self.pad_mask: Optional[torch.Tensor] = None        # B,past+T bool, False = padding


class CogVLMPreTrainedModel(PreTrainedModel):
    config_class = CogVLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderLayer", "EVALayer", "EVALargeBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    # Derived tables: regenerated, never required (released HF files may store per-layer copies).
    _keys_to_ignore_on_load_missing = [r"rotary\.inv_freq", r"rope\.freqs_(cos|sin)"]
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, Rotary):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))
        elif isinstance(module, RopeTables):
            cos, sin = rope_2d_tables(*module.shape_args)
            init.copy_(module.freqs_cos, cos)
            init.copy_(module.freqs_sin, sin)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter) and module.weight.dim() == 1:
            init.ones_(module.weight)                   # RMSNorm
        for name, p in module.named_parameters(recurse=False):   # bare nn.Parameters
            if name in ("q_bias", "v_bias"):
                init.zeros_(p)
            elif name in ("boi", "eoi", "pos_embed", "cls_embedding", "cls_token"):
                init.normal_(p, mean=0.0, std=std)


class CogVLMForCausalLM(CogVLMPreTrainedModel, GenerationMixin):
    def __init__(self, config: CogVLMConfig):
        super().__init__(config)
        self.cfg = config.to_model_config()
        self.model = CogVLMModel(self.cfg)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.runtime = RuntimeState()
        self.post_init()

    # The same parameters as models.cogvlm.CogVLM, so its helpers apply unchanged.
    encode_images = CogVLM.encode_images
    cross_kv = CogVLM.cross_kv

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids: torch.LongTensor = None, images=None, cross_images=None,
                token_type_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, past_key_values=None,
                use_cache: Optional[bool] = None, labels: Optional[torch.LongTensor] = None,
                logits_to_keep: int = 0, output_hidden_states: Optional[bool] = None,
                cache=None, **kwargs) -> CausalLMOutputWithPast:
        """`cache` (`past_key_values` before transformers 5): a CogVLMCache, created here with
        use_cache=True; it keeps the positions and CogAgent's cross K/V between steps."""
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = CogVLMCache(config=self.config)
        if cache is not None and not isinstance(cache, CogVLMCache):
            raise TypeError(f"the cache must be a models.hf.CogVLMCache, not {type(cache).__name__} "
                            f"(it keeps the image positions and cross K/V between steps)")
        inputs = self._model_inputs(input_ids, images, cross_images, token_type_ids, attention_mask,
                                    position_ids, cache)
        if cache is not None:
            cache.pad_mask = inputs.pad_mask           # this step's mask covers every slot
            if cache.cross_kv is None:
                cache.cross_kv, cache.cross_rows = inputs.cross_kv, inputs.cross_rows
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden = [] if output_hidden_states else None
        h = self.model(inputs, cache, hidden_states=hidden, by_row=self.runtime.batch_invariant > 0)
        if cache is not None:
            cache.next_position = inputs.position_ids[:, -1] + 1
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                               labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache,
                                      hidden_states=tuple(hidden) if hidden is not None else None)

    def _model_inputs(self, input_ids, images, cross_images, token_type_ids, attention_mask,
                      position_ids, cache: Optional["CogVLMCache"]) -> ModelInputs:
        """HF inputs -> ModelInputs with images encoded (first step only; cross K/V once)."""
        T = input_ids.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        image_mask, vision_mask, pos = masks_from_token_types(
            token_type_ids, attention_mask[:, -T:] if attention_mask is not None else None)
        if past == 0 and self.runtime.batch_invariant and attention_mask is not None:
            # Batch invariance: each row's positions as it has them alone (`<s>` = 0), not the
            # original's `<s>` = 1 after left padding (same logits up to rotary's rounding).
            first = attention_mask[:, -T:].long().argmax(1, keepdim=True)            # B,1
            pos = (pos - pos.gather(1, first)).clamp(min=0)
        if past > 0:
            # Continue from the positions stored at the previous step (an image takes many
            # token slots but only 3 positions, so slot indices cannot be used).
            start = cache.next_position
            pos = start[:, None] + (pos - pos[:, :1]) if start is not None else pos + past
        image_embeds = None
        pixels = _stack_images(images)
        if pixels is not None and past == 0:
            image_embeds = self.encode_images(pixels.to(self.model.device))
        else:
            image_mask = None
        cross_kv, cross_rows = None, None
        hi = _stack_images(cross_images) if self.cfg.cross is not None else None
        if hi is not None and (cache is None or cache.cross_kv is None):
            cross_kv, cross_rows = self._batched_cross_kv(hi, cross_images, input_ids.shape[0])
        pad = attention_mask.bool() if attention_mask is not None and not bool(attention_mask.all()) else None
        return ModelInputs(input_ids, position_ids if position_ids is not None else pos, vision_mask,
                           image_mask, image_embeds=image_embeds, cross_kv=cross_kv,
                           cross_rows=cross_rows, pad_mask=pad)

    def _batched_cross_kv(self, hi: torch.Tensor, cross_images, B: int):
        """Cross K/V for a batch where some rows may have no image (zero K/V, row masked)."""
        kv = self.cross_kv(hi.to(self.model.device))
        rows = [True] * B
        if isinstance(cross_images, (list, tuple)):
            rows = [bool(r) for r in cross_images]
        if all(rows):
            return kv, None
        idx = torch.tensor([i for i, r in enumerate(rows) if r])
        full = []
        for k, v in kv:
            fk = k.new_zeros(B, *k.shape[1:])
            fv = v.new_zeros(B, *v.shape[1:])
            fk[idx], fv[idx] = k, v
            full.append((fk, fv))
        return full, torch.tensor(rows, device=hi.device)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """generate() must not make a plain DynamicCache: forward makes a CogVLMCache."""
        return False

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      images=None, cross_images=None, token_type_ids=None, **kwargs):
        """First step: the whole prompt with its images. Later steps: the last token only;
        positions and cross K/V come from the cache (see forward)."""
        cache = kwargs.get("cache", past_key_values)
        first = cache is None or cache.get_seq_length() == 0
        # generate() asks for the last position's logits only (logits_to_keep=1)
        keep = {"logits_to_keep": kwargs["logits_to_keep"]} if kwargs.get("logits_to_keep") else {}
        if first:
            return {"input_ids": input_ids, "images": images, "cross_images": cross_images,
                    "token_type_ids": token_type_ids, "attention_mask": attention_mask,
                    "cache": cache, "use_cache": kwargs.get("use_cache", True), **keep}
        return {"input_ids": input_ids[:, -1:], "attention_mask": attention_mask, "cache": cache,
                "use_cache": True, **keep}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        tt = model_kwargs.get("token_type_ids")
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if tt is not None:                             # every generated token is text (type 0)
            model_kwargs["token_type_ids"] = torch.cat([tt, tt.new_zeros(tt.shape[0], 1)], dim=1)
        return model_kwargs


class CogAgentForCausalLM(CogVLMForCausalLM):
    config_class = CogAgentConfig


def register_auto_classes() -> None:
    """Let AutoConfig / AutoModelForCausalLM resolve model_type cogvlm / cogagent to these
    classes (no trust_remote_code)."""
    for cfg_cls, model_cls in ((CogVLMConfig, CogVLMForCausalLM), (CogAgentConfig, CogAgentForCausalLM)):
        try:
            AutoConfig.register(cfg_cls.model_type, cfg_cls)
            AutoModelForCausalLM.register(cfg_cls, model_cls)
        except ValueError:
            pass                                        # already registered


register_auto_classes()
