"""Vision encoders: EVA2-CLIP-E (low-res, every model) with the GLU adapter, and CogAgent's
EVA2-CLIP-L high-resolution encoder (timm-style names, 2-D rotary, SwiGLU with sub-LN).

Module attribute names follow the checkpoint key names so that the SAT rename table in
checkpoint.py stays a short list of prefixes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CrossConfig, EVAConfig, ModelConfig


# ----------------------------------------------------------------------------------------
# EVA2-CLIP-E: sub-LN post-norm layers, learned absolute positions, CLS dropped.
# ----------------------------------------------------------------------------------------
class EVAAttention(nn.Module):
    def __init__(self, cfg: EVAConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.query_key_value(x).view(B, N, 3, self.num_heads, -1)  # B,N,3,H,D
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                    # each B,H,N,D
        out = F.scaled_dot_product_attention(q, k, v)                     # bidirectional
        # -1, not C: under tensor parallelism a rank holds num_heads of the heads only.
        return self.dense(out.transpose(1, 2).reshape(B, N, -1))


class EVAMLP(nn.Module):
    def __init__(self, cfg: EVAConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.inner_hidden_size)
        self.fc2 = nn.Linear(cfg.inner_hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EVALayer(nn.Module):
    def __init__(self, cfg: EVAConfig):
        super().__init__()
        # The names say "input"/"post attention" (SAT's), but both norms are applied to the
        # branch outputs: h = h + LN1(attn(h)); h = h + LN2(mlp(h)).
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.attention = EVAAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = EVAMLP(cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.input_layernorm(self.attention(h))
        return h + self.post_attention_layernorm(self.mlp(h))


class PatchEmbedding(nn.Module):
    """Conv patchify + learned CLS + learned absolute positions (1 + N entries)."""
    def __init__(self, cfg: EVAConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size,
                              kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_embedding = nn.Parameter(torch.zeros(1, cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)                          # B,N,C
        cls = self.cls_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight         # B,1+N,C


class EVATransformer(nn.Module):
    def __init__(self, cfg: EVAConfig):
        super().__init__()
        self.layers = nn.ModuleList(EVALayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class GLU(nn.Module):
    """Adapter from ViT width to the language model width (SAT `linear_proj`)."""
    def __init__(self, in_features: int, hidden: int, inner: int):
        super().__init__()
        self.linear_proj = nn.Linear(in_features, hidden, bias=False)
        self.norm1 = nn.LayerNorm(hidden)  # eps 1e-5 (torch default), not the ViT's 1e-6
        self.dense_h_to_4h = nn.Linear(hidden, inner, bias=False)
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.dense_4h_to_h = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class ImageEncoder(nn.Module):
    """Low-res image -> [boi, image tokens..., eoi] embeddings for the language model."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e = cfg.eva
        self.patch_embedding = PatchEmbedding(e)
        self.transformer = EVATransformer(e)
        self.linear_proj = GLU(e.hidden_size, cfg.hidden_size, cfg.inner_hidden_size)
        self.boi = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        # CogAgent only: a learned position table added to the ViT output.
        self.pos_embed = (nn.Parameter(torch.zeros(e.num_patches, e.hidden_size))
                          if cfg.adapter_has_pos_embed else None)

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        """images: B,3,S,S -> the ViT's output, B, 1 + N, C (CLS first), before the adapter."""
        return self.transformer(self.patch_embedding(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: B,3,S,S -> B, 1 + image_length + 1, hidden."""
        x = self.encode_patches(images)[:, 1:]                       # CLS dropped: B,N,C
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.linear_proj(x)
        B = x.shape[0]
        return torch.cat([self.boi.expand(B, 1, -1).to(x.dtype), x,
                          self.eoi.expand(B, 1, -1).to(x.dtype)], dim=1)


# ----------------------------------------------------------------------------------------
# EVA2-CLIP-L (CogAgent high-res branch): pre-norm blocks, 2-D interleaved rotary.
# ----------------------------------------------------------------------------------------
def rope_2d_tables(head_dim: int, grid: int, pretrain_grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables, grid*grid x head_dim. The first half of each head is rotated by the
    row position, the second half by the column position; positions arange(g)/g*pretrain_grid
    (the encoder was pre-trained on a 16x16 grid); frequencies repeat for interleaved pairs."""
    half = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # half/2
    t = torch.arange(grid, dtype=torch.float32) / grid * pretrain_grid
    f = torch.outer(t, freqs).repeat_interleave(2, dim=-1)                        # g, half
    rows = f[:, None, :].expand(grid, grid, half)
    cols = f[None, :, :].expand(grid, grid, half)
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)        # g*g, D
    return table.cos(), table.sin()


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    x = x.unflatten(-1, (-1, 2))                                                  # ..., D/2, 2
    return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)


class RopeTables(nn.Module):
    """Holds the 2-D rotary tables. They are derived (never trained) but the released
    checkpoints store them, once per block and once on the model, so they are buffers."""
    def __init__(self, cfg: CrossConfig):
        super().__init__()
        self.shape_args = (cfg.hidden_size // cfg.num_attention_heads,
                           cfg.image_size // cfg.patch_size, cfg.rope_pretrain_grid)
        cos, sin = rope_2d_tables(*self.shape_args)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)


class EVALargeAttention(nn.Module):
    def __init__(self, cfg: CrossConfig):
        super().__init__()
        w = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(w, w, bias=False)
        self.k_proj = nn.Linear(w, w, bias=False)
        self.v_proj = nn.Linear(w, w, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(w))
        self.v_bias = nn.Parameter(torch.zeros(w))
        self.rope = RopeTables(cfg)
        self.inner_attn_ln = nn.LayerNorm(w, eps=cfg.layernorm_epsilon)
        self.proj = nn.Linear(w, w)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q = (self.q_proj(x) + self.q_bias).view(B, N, self.num_heads, -1)   # biases on q and v only
        k = self.k_proj(x).view(B, N, self.num_heads, -1)
        v = (self.v_proj(x) + self.v_bias).view(B, N, self.num_heads, -1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                          # B,H,N,D
        # Rotary on patch tokens only; the CLS token (index 0) gets none.
        q = torch.cat([q[:, :, :1], q[:, :, 1:] * cos + rotate_interleaved(q[:, :, 1:]) * sin], 2)
        k = torch.cat([k[:, :, :1], k[:, :, 1:] * cos + rotate_interleaved(k[:, :, 1:]) * sin], 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)  # B,N,H*D
        return self.proj(self.inner_attn_ln(out))


class EVALargeMLP(nn.Module):
    def __init__(self, cfg: CrossConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.inner_hidden_size)
        self.w2 = nn.Linear(cfg.hidden_size, cfg.inner_hidden_size)
        self.ffn_ln = nn.LayerNorm(cfg.inner_hidden_size, eps=cfg.layernorm_epsilon)
        self.w3 = nn.Linear(cfg.inner_hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EVALargeBlock(nn.Module):
    def __init__(self, cfg: CrossConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.attn = EVALargeAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = EVALargeMLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: CrossConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)


class EVA2CLIPLarge(nn.Module):
    def __init__(self, cfg: CrossConfig):
        super().__init__()
        w = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, w))
        self.rope = RopeTables(cfg)
        self.blocks = nn.ModuleList(EVALargeBlock(cfg) for _ in range(cfg.num_layers))
        # Stored in the released checkpoints but unused by CogAgent (features are taken
        # before them): kept so that checkpoints round-trip exactly.
        self.norm = nn.LayerNorm(w, eps=cfg.layernorm_epsilon)
        self.head = nn.Linear(w, cfg.head_out_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)             # B,N,C
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        # Tables are regenerated in fp32 at build time; cast once per forward.
        cos, sin = self.rope.freqs_cos.to(x.dtype), self.rope.freqs_sin.to(x.dtype)
        for blk in self.blocks[:-1]:                        # the last block is skipped
            x = blk(x, cos, sin)
        return x[:, 1:]


class LargeEncoderWrapper(nn.Module):
    """Only here so that parameter names read `vit.model.*` as in both released formats."""
    def __init__(self, cfg: CrossConfig):
        super().__init__()
        self.model = EVA2CLIPLarge(cfg)


class CrossVisionEncoder(nn.Module):
    """High-res image -> B, num_patches, width: features the cross attention reads."""
    def __init__(self, cfg: CrossConfig):
        super().__init__()
        self.vit = LargeEncoderWrapper(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.num_patches, cfg.hidden_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.model(images) + self.pos_embed
