"""CogVLM / CogAgent language model: LLaMA decoder with a visual expert in every layer, and for
CogAgent a cross-attention block per layer reading the high-resolution image features.

One implementation serves every front end (SAT checkpoints, HF checkpoints, tensor parallel,
quantized): those are weight conversions or module swaps applied after the model is built.
Parameter names follow the HF release (`model.` prefix dropped); checkpoint.py maps SAT keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .eva import CrossVisionEncoder, ImageEncoder


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class Rotary(nn.Module):
    """GPT-NeoX style rotary (the two halves of each head rotate together).
    `inv_freq` is a persistent buffer because SAT checkpoints store it."""
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.register_buffer("inv_freq", self.compute_inv_freq())

    def compute_inv_freq(self, device=None) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, device=device).float()
                                    / self.head_dim))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids: B,T -> cos, sin: B,1,T,D. Positions are computed in fp32 (the
        original rounded them in bf16 above 256)."""
        freqs = position_ids.float()[..., None] * self.inv_freq.float()            # B,T,D/2
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]                            # B,1,T,D
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# Decode attention on CPU takes this many bytes of one layer's K (or V) per batched product:
# oneDNN copies a strided cache view to contiguous memory first, and copies larger than the CPU's
# caches thrash (`bench/batch.py --compare_attention`; figures in bench/RESULTS.md, "Batching").
DECODE_CHUNK_BYTES = 6 << 20


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q: B,H,1,D; k, v: B,H,S,D; mask: B|1,1,1,S bool, True = may attend -> B,H,1,D.
    Two batched matrix-vector products that read K and V in their own layout: K (S,D per head,
    rows contiguous) times q is faster in bf16 than q @ K^T, and both beat the fused kernel for
    one query (bench/RESULTS.md, "Decode")."""
    s = torch.matmul(k, q.transpose(-1, -2)).transpose(-1, -2).mul_(q.shape[-1] ** -0.5)  # B,H,1,S
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(s.softmax(-1), v)                                         # B,H,1,D


def fused_single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """single_query_attention through PyTorch's fused kernel, same shapes. Where it wins depends
    on the CPU and the layout (fp32 on an AVX2-only AMD EPYC: 1.5x the two products on
    CogAgent's contiguous cross K/V, even on the cache views; bf16 on AVX-512 it lost), so
    compile.LongContextAttention times it there."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: Optional[torch.Tensor] = None, one=single_query_attention) -> torch.Tensor:
    """Attention of one new token per row (every decode step); shapes as single_query_attention.
    On CPU the rows of strided K/V views (the caches) go in groups of about DECODE_CHUNK_BYTES of
    K each (see there); contiguous K/V (CogAgent's cross K/V) are not copied, so they go whole.
    Compiled (models/compile.py) the whole batch is one kernel: inductor reads the views in place.
    one: the attention of a single row (compile.LongContextAttention where measured, on CPU)."""
    B = q.shape[0]
    contiguous = k.is_contiguous() and v.is_contiguous()
    if B == 1:
        return one(q, k, v, mask)
    if contiguous or k.device.type != "cpu" or torch.compiler.is_dynamo_compiling():
        return single_query_attention(q, k, v, mask)
    rows = max(1, DECODE_CHUNK_BYTES // max(1, k[0].numel() * k.element_size()))
    if rows >= B:
        return single_query_attention(q, k, v, mask)
    per_row_mask = mask is not None and mask.shape[0] == B
    return torch.cat([single_query_attention(q[i:i + rows], k[i:i + rows], v[i:i + rows],
                                             mask[i:i + rows] if per_row_mask else mask)
                      for i in range(0, B, rows)])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
    """Several new tokens (prefill): q: B,H,T,D; k, v: B,H,S,D (views into the cache); mask:
    bool, True = may attend. One-token steps go through decode_attention instead."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)


@dataclass
class Routing:
    """Which rows of a batch flattened to B*T go to the language expert and which to the vision
    expert: found once per forward from the B,T vision mask (a boolean index finds its rows
    again on every use: 6 times a layer). The vision rows as a slice where they are one run
    (one image in one row: no gather, and a plain copy back; mid-size, AMX Xeon: a layer's
    routing 0.90 -> 0.23 ms)."""
    language: torch.Tensor                          # n_lang row indices
    vision: Union[torch.Tensor, slice]              # n_vis row indices, or one run of rows

    @staticmethod
    def of(vision_mask: Optional[torch.Tensor]) -> Optional["Routing"]:
        """None where no token is a vision token (then only language weights are read)."""
        if vision_mask is None:
            return None
        flat = vision_mask.reshape(-1)                                           # B*T
        vis = flat.nonzero().view(-1)
        if vis.numel() == 0:
            return None
        lang = (~flat).nonzero().view(-1)
        first, last = int(vis[0]), int(vis[-1])
        return Routing(lang, slice(first, last + 1) if last - first + 1 == vis.numel() else vis)


def expert_linear(x: torch.Tensor, routing: Optional[Routing], language: nn.Module, vision: nn.Module) -> torch.Tensor:
    """Route each token to the language or the vision copy of a projection (routing None: every
    token is a language token, as in every decode step)."""
    if routing is None:
        return language(x)
    x2 = x.reshape(-1, x.shape[-1])                                              # B*T,in
    lang_out = language(x2.index_select(0, routing.language))                    # n_lang,out
    # The output's dtype is the projections' (under autocast, bf16 from fp32 inputs).
    out = lang_out.new_empty(x2.shape[0], lang_out.shape[-1])                     # B*T,out
    out.index_copy_(0, routing.language, lang_out)
    v = routing.vision
    if isinstance(v, slice):
        out[v] = vision(x2[v]).to(out.dtype)
    else:
        out.index_copy_(0, v, vision(x2.index_select(0, v)).to(out.dtype))
    return out.view(*x.shape[:-1], -1)                                           # B,T,out


@dataclass
class ModelInputs:
    """A batch ready for the model (rows left-padded to one length). Images may come as pixels
    (`images`, `cross_images`: CogVLM.forward encodes them) or already encoded (`image_embeds`,
    `cross_kv`: encoded once per image by the caller, e.g. a chat that keeps its image)."""
    input_ids: torch.Tensor                         # B,T
    position_ids: torch.Tensor                      # B,T
    vision_mask: Optional[torch.Tensor] = None      # B,T bool: vision expert (boi + patches)
    image_mask: Optional[torch.Tensor] = None       # B,T bool: image slots (boi + patches + eoi)
    image_embeds: Optional[torch.Tensor] = None     # n_img, L+2, hidden (rows with slots, in order)
    cross_kv: Optional[list] = None                 # CogAgent: per layer (k, v), B rows
    cross_rows: Optional[torch.Tensor] = None       # B bool: rows with an image (CogAgent)
    pad_mask: Optional[torch.Tensor] = None         # B,T bool, False = left padding
    images: Optional[torch.Tensor] = None           # n_img,3,S,S low-res pixels
    cross_images: Optional[torch.Tensor] = None     # B,3,S',S' CogAgent high-res pixels


@dataclass
class RuntimeState:
    """What was done to a built model that later steps must know (one declared place, no
    attributes set on the module from outside). Each field has one writer:
    quant_bits: the decoder's weight bits after quantize.quantize / load_model(quant=...);
        None = the load dtype. compile.compile_decode reads it (int8 runs wide steps eagerly).
    tp_world: ranks the weights are split over (tp.apply_tensor_parallel); 1 = whole model.
    packed: some linear weights packed into oneDNN's layout (layout.pack_for_cpu_inference or
        layout.apply_layouts); compile.compile_decode refuses such a model.
    lora: the LoRAConfig of the adapters added by lora.apply_lora; None = no adapters.
    decode_step: the compiled decode step (compile.compile_decode); None = the eager
        generate.forward_one_token. generate.decode_one_token calls whichever is set.
    batch_invariant: the rows every decode-time product is padded to
        (invariant.make_batch_invariant); 0 = off. With it, batched prompts are prefilled row
        by row and images encoded one at a time; invariant_hooks: its padding hooks;
        row_attention: the one-row attention (compile.LongContextAttention), shared by every
        layer: every row's with it, one-row steps' without it on CPU (compile.measured_single_rows);
        invariant.compile_every_row lowers the length it starts compiling at."""
    quant_bits: Optional[int] = None
    tp_world: int = 1
    packed: bool = False
    lora: Optional[object] = None
    decode_step: Optional[Callable] = None
    batch_invariant: int = 0
    invariant_hooks: list = field(default_factory=list)
    row_attention: Optional[object] = None


@dataclass
class Cache:
    """Preallocated per-layer K/V, written by slot index, and the state of the sequences it
    holds (the only place that state lives while generating). Slots are token indices; rotary
    positions are separate (an image occupies many slots but only 3 positions).
    For CogAgent, each layer's cross K/V are computed once per image and kept here.
    Any object with update(k, v, layer), get_seq_length() and the fields pad_mask, cross_kv and
    cross_rows can stand in for it (a transformers cache in models/hf.py, the server's batch)."""
    k: list
    v: list
    length: int = 0                                  # filled slots
    pad_mask: Optional[torch.Tensor] = None          # B,max_len bool, False = padding slot
    cross_kv: Optional[list] = None                  # per layer (k, v): B,H,N,D
    cross_rows: Optional[torch.Tensor] = None        # B bool: rows that have an image
    next_position: Optional[torch.Tensor] = None     # B: rotary position of the next token

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, dtype, device,
                 heads: Optional[int] = None) -> "Cache":
        """heads: this rank's heads under tensor parallelism (CogVLM.num_kv_heads)."""
        shape = (batch, heads or cfg.num_attention_heads, max_len, cfg.head_dim)
        return cls(k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
                   v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)])

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def get_seq_length(self) -> int:
        return self.length

    def begin(self, inputs: ModelInputs) -> None:
        """Take the prompt's sequence state: its padding (slots after the prompt are real
        tokens) and CogAgent's cross K/V."""
        self.pad_mask = None
        if inputs.pad_mask is not None:
            self.pad_mask = torch.ones(self.k[0].shape[0], self.max_len, dtype=torch.bool,
                                       device=inputs.pad_mask.device)
            self.pad_mask[:, : inputs.pad_mask.shape[1]] = inputs.pad_mask
        self.cross_kv, self.cross_rows = inputs.cross_kv, inputs.cross_rows

    def update(self, k: torch.Tensor, v: torch.Tensor, layer: int):
        """Write T new K/V at slots [length, length + T); return views of every filled slot.
        (Same call as transformers' Cache.update, so either cache can be passed.)"""
        s, T = self.length, k.shape[2]
        if s + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot add {T} after {s}")
        self.k[layer][:, :, s:s + T] = k
        self.v[layer][:, :, s:s + T] = v
        return self.k[layer][:, :, :s + T], self.v[layer][:, :, :s + T]


class VisionExpertAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        h = cfg.hidden_size
        self.layer_idx = layer_idx                    # this layer's K/V in the cache
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_attention_heads      # this rank's share under tensor parallelism
        self.language_expert_query_key_value = nn.Linear(h, 3 * h, bias=False)
        self.vision_expert_query_key_value = nn.Linear(h, 3 * h, bias=False)
        self.language_expert_dense = nn.Linear(h, h, bias=False)
        self.vision_expert_dense = nn.Linear(h, h, bias=False)
        # One-token steps call this (models/compile.compile_attention swaps in a compiled one).
        self.decode_attention = decode_attention

    def forward(self, x, routing, cos, sin, cache, attn_mask):
        B, T, _ = x.shape
        qkv = expert_linear(x, routing, self.language_expert_query_key_value,
                            self.vision_expert_query_key_value)
        # [q; k; v] blocks, heads contiguous inside each block.
        qkv = qkv.view(B, T, 3, self.num_heads, self.head_dim)                   # B,T,3,H,D
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                            # B,H,T,D
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # one token: decode_attention; several (prefill): one causal mask over every token
        out = self.decode_attention(q, k, v, attn_mask) if T == 1 else attention(q, k, v, attn_mask, causal=True)
        out = out.transpose(1, 2).reshape(B, T, -1)                               # B,T,H*D
        return expert_linear(out, routing, self.language_expert_dense, self.vision_expert_dense)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # Inference: one T x inner intermediate fewer alive at once (part of the peak memory
        # of a full-size prefill).
        return self.down_proj(F.silu(self.gate_proj(x), inplace=True).mul_(self.up_proj(x)))


class VisionExpertMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.language_mlp = SwiGLU(cfg.hidden_size, cfg.inner_hidden_size)
        self.vision_mlp = SwiGLU(cfg.hidden_size, cfg.inner_hidden_size)

    def forward(self, x, routing):
        return expert_linear(x, routing, self.language_mlp, self.vision_mlp)


class CrossAttention(nn.Module):
    """Every token attends, without mask or rotary, to all high-res image tokens."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.cross
        self.head_dim = c.attn_head_dim
        self.query = nn.Linear(cfg.hidden_size, c.attn_hidden_size, bias=False)
        self.key_value = nn.Linear(c.hidden_size, 2 * c.attn_hidden_size, bias=False)
        self.dense = nn.Linear(c.attn_hidden_size, cfg.hidden_size, bias=False)
        self.decode_attention = decode_attention        # as VisionExpertAttention's

    def compute_kv(self, enc: torch.Tensor):
        """enc: B,N,W -> (k, v), each B,H,N,D. Keys are the first half of key_value's output."""
        B, N, _ = enc.shape
        kv = self.key_value(enc).view(B, N, 2, -1, self.head_dim)                 # B,N,2,H,D
        # Contiguous once here, so that no decode step copies them again.
        return tuple(t.contiguous() for t in kv.permute(2, 0, 3, 1, 4).unbind(0))

    def forward(self, x: torch.Tensor, kv) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.query(x).view(B, T, -1, self.head_dim).transpose(1, 2)          # B,H,T,D
        out = self.decode_attention(q, kv[0], kv[1]) if T == 1 else attention(q, kv[0], kv[1])
        return self.dense(out.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        eps = cfg.layernorm_epsilon
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.self_attn = VisionExpertAttention(cfg, layer_idx)
        if cfg.cross is not None:
            # Named "post" in both releases, but it normalises the cross attention's input.
            self.post_cross_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
            self.cross_attn = CrossAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.mlp = VisionExpertMLP(cfg)

    def forward(self, h, routing, cos, sin, cache, attn_mask, cross_kv=None, cross_rows=None):
        """routing: the tokens' experts (Routing, None: all language); cross_kv: every layer's
        (k, v) (CogAgent with an image), this layer reads its own; cross_rows: B bool, rows of a
        batch that have an image (None: every row)."""
        h = h + self.self_attn(self.input_layernorm(h), routing, cos, sin, cache, attn_mask)
        if cross_kv is not None:
            c = self.cross_attn(self.post_cross_attention_layernorm(h), cross_kv[self.layer_idx])
            if cross_rows is not None:                 # rows of a batch without an image
                c = c * cross_rows[:, None, None].to(c.dtype)
            h = h + c
        return h + self.mlp(self.post_attention_layernorm(h), routing)


class CogVLMModel(nn.Module):
    """Everything but the LM head: token + image embedding, decoder layers, final norm.
    `vision` (and `cross_vision` for CogAgent) encode images."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)
        self.vision = ImageEncoder(cfg)
        self.cross_vision = CrossVisionEncoder(cfg.cross) if cfg.cross is not None else None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations run in: the final norm's (norms are never quantized, unlike
        the token embeddings)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def embed(self, input_ids: torch.Tensor, image_embeds: Optional[torch.Tensor] = None,
              image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings with each image row's slots (boi, patches, eoi) overwritten by the
        image embeddings (n_img rows, in the order of the rows that have slots)."""
        h = self.embed_tokens(input_ids)
        if image_embeds is not None:
            h = h.clone()
            h[image_mask] = image_embeds.to(h.dtype).reshape(-1, image_embeds.shape[-1])
        return h

    def forward(self, inputs: ModelInputs, cache=None, attn_mask: Optional[torch.Tensor] = None,
                hidden_states: Optional[list] = None, by_row: bool = False) -> torch.Tensor:
        """-> hidden states B,T,hidden, images already encoded (`inputs.image_embeds`).
        cache: ours or any stand-in (see Cache); with one, the sequence state (padding, cross
        K/V) is the cache's, without one (training) the inputs'. attn_mask: an explicit
        B,1,T,S bool mask matching what cache.update returns (packed training rows, the
        server's batch). hidden_states: a list that receives every layer's input and the normed
        output (num_layers + 1 tensors, as transformers' output_hidden_states). by_row: a
        batched prompt into an empty cache runs row by row (batch invariance)."""
        state = cache if cache is not None else inputs
        h = self.embed(inputs.input_ids, inputs.image_embeds, inputs.image_mask)
        B, T = inputs.input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        cos, sin = self.rotary(inputs.position_ids, h.dtype)
        if by_row and B > 1 and T > 1 and past == 0 and cache is not None and hidden_states is None:
            return self._prefill_by_row(h, inputs, cache, cos, sin)
        if attn_mask is None and (state.pad_mask is not None or (past > 0 and T > 1)):
            attn_mask = causal_mask(past, T, state.pad_mask, h.device)
        routing = Routing.of(inputs.vision_mask)
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(h)
            h = layer(h, routing, cos, sin, cache, attn_mask, state.cross_kv, state.cross_rows)
        h = self.norm(h)
        if hidden_states is not None:
            hidden_states.append(h)
        return h

    def _prefill_by_row(self, h, inputs: ModelInputs, cache, cos, sin) -> torch.Tensor:
        """A left-padded prompt batch into an empty cache, each row alone on its own tokens
        (no padding, no other row in any product): the K/V and hidden states it gets alone.
        Padding positions come out zero; the cache takes every layer's K/V in one update."""
        B, T, _ = h.shape
        pad = cache.pad_mask[:, :T] if cache.pad_mask is not None else None
        rows = []                                      # per row: (left padding, per layer (k, v))
        out = torch.zeros_like(h)
        for i in range(B):
            p = int((~pad[i]).sum()) if pad is not None else 0                   # left padding
            routing = Routing.of(inputs.vision_mask[i:i + 1, p:] if inputs.vision_mask is not None else None)
            cross = None
            if cache.cross_kv is not None and (cache.cross_rows is None or bool(cache.cross_rows[i])):
                cross = [(k[i:i + 1], v[i:i + 1]) for k, v in cache.cross_kv]
            kv = _RowKV([None] * len(self.layers))
            hi = h[i:i + 1, p:]                                                   # 1,T-p,hidden
            for layer in self.layers:
                hi = layer(hi, routing, cos[i:i + 1, :, p:], sin[i:i + 1, :, p:], kv, None, cross)
            out[i, p:] = self.norm(hi)[0]
            rows.append((p, kv.layers))
        for layer, (k0, _) in enumerate(rows[0][1]):
            k = k0.new_zeros(B, k0.shape[1], T, k0.shape[3])                      # B,H,T,D
            v = torch.zeros_like(k)
            for i, (p, kvs) in enumerate(rows):
                k[i, :, p:], v[i, :, p:] = kvs[layer][0][0], kvs[layer][1][0]
            cache.update(k, v, layer)
        return out


@dataclass
class _RowKV:
    """The cache one row's prefill sees (CogVLMModel._prefill_by_row): empty; keeps what each
    layer writes."""
    layers: list                                   # per layer (k, v), each 1,H,T_i,D

    def get_seq_length(self) -> int:
        return 0

    def update(self, k: torch.Tensor, v: torch.Tensor, layer: int):
        self.layers[layer] = (k, v)
        return k, v


def causal_mask(past: int, T: int, pad_mask: Optional[torch.Tensor], device) -> torch.Tensor:
    """Bool mask B|1,1,T,past+T for T new tokens after `past` cached ones: causal over slots,
    padding hidden, and every token sees itself (so a padding row stays finite, not NaN)."""
    q_slot = torch.arange(past, past + T, device=device)[:, None]                # T,1
    k_slot = torch.arange(past + T, device=device)[None, :]                       # 1,S
    mask = (k_slot <= q_slot)[None, None]                                         # 1,1,T,S
    if pad_mask is not None:
        mask = mask & pad_mask[:, None, None, : past + T].to(torch.bool)
    return mask | (k_slot == q_slot)[None, None]


class CogVLM(nn.Module):
    """Backbone + LM head. Parameter names are those of the HF release exactly
    (`model.*`, `lm_head.weight`); checkpoint.py maps SAT's names onto them."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = CogVLMModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.runtime = RuntimeState()

    @property
    def num_kv_heads(self) -> int:
        """Heads whose K/V this process caches (fewer than the config's under tensor parallelism)."""
        return self.model.layers[0].self_attn.num_heads

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images: n,3,S,S -> n, 1 + image_length + 1, hidden (boi, patches, eoi). Batch
        invariant: one image at a time (the encoder's products then never see another image)."""
        images = images.to(self.model.compute_dtype)
        if self.runtime.batch_invariant and images.shape[0] > 1:
            return torch.cat([self.model.vision(img[None]) for img in images])
        return self.model.vision(images)

    def cross_kv(self, cross_images: torch.Tensor) -> list:
        """Run the high-res encoder once and every layer's cross K/V projection (batch
        invariant: one image at a time, concatenated)."""
        cross_images = cross_images.to(self.model.compute_dtype)
        if self.runtime.batch_invariant and cross_images.shape[0] > 1:
            rows = [self.cross_kv(img[None]) for img in cross_images]
            return [tuple(torch.cat([r[layer][j] for r in rows]) for j in (0, 1))
                    for layer in range(len(self.model.layers))]
        enc = self.model.cross_vision(cross_images)
        return [layer.cross_attn.compute_kv(enc) for layer in self.model.layers]

    def encode_inputs(self, inputs: ModelInputs) -> ModelInputs:
        """`inputs` with its pixels encoded: images -> image_embeds, cross_images -> cross_kv."""
        if inputs.images is not None:
            inputs = replace(inputs, images=None, image_embeds=self.encode_images(inputs.images))
        if inputs.cross_images is not None:
            inputs = replace(inputs, cross_images=None, cross_kv=self.cross_kv(inputs.cross_images))
        return inputs

    def forward(self, inputs: ModelInputs, cache: Optional[Cache] = None, last_only: bool = False,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """-> logits B,T,V (B,1,V with last_only). With a cache, tokens are written from slot
        cache.length on; the first call on an empty cache (the prompt) hands it the
        sequence state (padding, cross K/V), and every call records the next position.
        Without a cache (training) inputs.pad_mask hides padding, or attn_mask (B,1,T,T
        bool) is the whole mask (packed rows)."""
        inputs = self.encode_inputs(inputs)
        if cache is not None and cache.length == 0:
            cache.begin(inputs)
        h = self.model(inputs, cache, attn_mask, by_row=self.runtime.batch_invariant > 0)
        if cache is not None:
            cache.length += inputs.input_ids.shape[1]
            cache.next_position = inputs.position_ids[:, -1] + 1
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)
