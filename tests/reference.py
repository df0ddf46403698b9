"""An independent, deliberately naive forward pass written from the released code's documented behaviour, reading
the SAT checkpoint's own key names. Tests compare the model against it, which checks both the
math and the SAT rename table. Everything here is explicit loops and full-size masks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _attn(q, k, v, mask=None):
    """q,k,v: H,N,D (one image / sequence); mask: N,M bool (True = may attend)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v


def eva_e(sd, cfg, image):
    e = cfg.eva
    p = "mixins.eva.vit_model."
    x = F.conv2d(image[None], sd[p + "mixins.patch_embedding.proj.weight"],
                 sd[p + "mixins.patch_embedding.proj.bias"], stride=e.patch_size)
    x = x.flatten(2)[0].T                                                          # N,C
    x = torch.cat([sd[p + "transformer.word_embeddings.weight"], x], 0)
    x = x + sd[p + "transformer.position_embeddings.weight"]
    H = e.num_attention_heads
    for j in range(e.num_layers):
        lp = f"{p}transformer.layers.{j}."
        qkv = x @ sd[lp + "attention.query_key_value.weight"].T + sd[lp + "attention.query_key_value.bias"]
        q, k, v = (t.reshape(len(x), H, -1).transpose(0, 1) for t in qkv.chunk(3, -1))
        a = _attn(q, k, v).transpose(0, 1).reshape(len(x), -1)
        a = a @ sd[lp + "attention.dense.weight"].T + sd[lp + "attention.dense.bias"]
        x = x + _ln(a, sd, lp + "input_layernorm", e.layernorm_epsilon)
        m = F.gelu(x @ sd[lp + "mlp.dense_h_to_4h.weight"].T + sd[lp + "mlp.dense_h_to_4h.bias"])
        m = m @ sd[lp + "mlp.dense_4h_to_h.weight"].T + sd[lp + "mlp.dense_4h_to_h.bias"]
        x = x + _ln(m, sd, lp + "post_attention_layernorm", e.layernorm_epsilon)
    x = x[1:]
    if "mixins.eva.pos_embed" in sd:
        x = x + sd["mixins.eva.pos_embed"]
    g = "mixins.eva.linear_proj."
    x = x @ sd[g + "linear_proj.weight"].T
    x = F.gelu(_ln(x, sd, g + "norm1", 1e-5))
    x = F.silu(x @ sd[g + "gate_proj.weight"].T) * (x @ sd[g + "dense_h_to_4h.weight"].T)
    x = x @ sd[g + "dense_4h_to_h.weight"].T
    return torch.cat([sd["mixins.eva.boi"][0], x, sd["mixins.eva.eoi"][0]], 0)     # L+2,hidden


def eva_l(sd, cfg, image):
    c = cfg.cross
    p = "mixins.encoder.vit.model."
    x = F.conv2d(image[None], sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"],
                 stride=c.patch_size).flatten(2)[0].T
    x = torch.cat([sd[p + "cls_token"][0], x], 0) + sd[p + "pos_embed"][0]
    # 2-D rotary written from the description: grid g, positions arange(g)/g*16, half the head
    # dims for rows, half for columns, interleaved pairs.
    H, D = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    g = c.image_size // c.patch_size
    inv = 1.0 / (10000 ** (torch.arange(0, D // 2, 2).float() / (D // 2)))
    t = torch.arange(g).float() / g * c.rope_pretrain_grid
    ang = torch.zeros(g, g, D)
    for r in range(g):
        for col in range(g):
            for i, f in enumerate(inv):
                ang[r, col, 2 * i] = ang[r, col, 2 * i + 1] = t[r] * f
                ang[r, col, D // 2 + 2 * i] = ang[r, col, D // 2 + 2 * i + 1] = t[col] * f
    ang = ang.reshape(g * g, D)

    def rope(z):                                     # H,1+N,D; CLS untouched
        body = z[:, 1:]
        pairs = body.reshape(*body.shape[:-1], D // 2, 2)
        rot = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(body.shape)
        return torch.cat([z[:, :1], body * ang.cos() + rot * ang.sin()], 1)

    eps = c.layernorm_epsilon
    for j in range(c.num_layers - 1):                # last block skipped
        bp = f"{p}blocks.{j}."
        y = _ln(x, sd, bp + "norm1", eps)
        q = y @ sd[bp + "attn.q_proj.weight"].T + sd[bp + "attn.q_bias"]
        k = y @ sd[bp + "attn.k_proj.weight"].T
        v = y @ sd[bp + "attn.v_proj.weight"].T + sd[bp + "attn.v_bias"]
        q, k, v = (z.reshape(len(x), H, D).transpose(0, 1) for z in (q, k, v))
        a = _attn(rope(q), rope(k), v).transpose(0, 1).reshape(len(x), -1)
        a = _ln(a, sd, bp + "attn.inner_attn_ln", eps)
        x = x + a @ sd[bp + "attn.proj.weight"].T + sd[bp + "attn.proj.bias"]
        y = _ln(x, sd, bp + "norm2", eps)
        m = F.silu(y @ sd[bp + "mlp.w1.weight"].T + sd[bp + "mlp.w1.bias"]) * \
            (y @ sd[bp + "mlp.w2.weight"].T + sd[bp + "mlp.w2.bias"])
        m = _ln(m, sd, bp + "mlp.ffn_ln", eps)
        x = x + m @ sd[bp + "mlp.w3.weight"].T + sd[bp + "mlp.w3.bias"]
    return x[1:] + sd["mixins.encoder.pos_embed"]


def lm(sd, cfg, ids, image_embeds=None, cross=None):
    """ids: list of text token ids AFTER the image (the row is <s> [image] text).
    Returns logits for every slot, N,V."""
    L = cfg.image_length
    tok = [cfg.bos_token_id] + ([0] * (L + 2) if image_embeds is not None else []) + list(ids)
    x = sd["transformer.word_embeddings.weight"][torch.tensor(tok)].clone()
    if image_embeds is not None:
        x[1:L + 3] = image_embeds
        pos = [0, 1] + [2] * L + [3] + list(range(4, 4 + len(ids)))
        vis = torch.tensor([False] + [True] * (L + 1) + [False] * (1 + len(ids)))
    else:
        pos = list(range(len(tok)))
        vis = torch.zeros(len(tok), dtype=torch.bool)
    N, H = len(tok), cfg.num_attention_heads
    D = cfg.hidden_size // H
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.tensor(pos).float()[:, None] * inv                               # N,D/2
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rot(z):                                      # H,N,D, half rotation
        z1, z2 = z[..., : D // 2], z[..., D // 2:]
        return z * cos + torch.cat([-z2, z1], -1) * sin

    def pick(y_lang, y_vis):                         # both computed for all tokens, then chosen
        return torch.where(vis[:, None], y_vis, y_lang)

    causal = torch.tril(torch.ones(N, N, dtype=torch.bool))
    for i in range(cfg.num_layers):
        lp = f"transformer.layers.{i}."
        y = _rms(x, sd[lp + "input_layernorm.weight"])
        qkv = pick(y @ sd[lp + "attention.query_key_value.weight"].T,
                   y @ sd[f"mixins.rotary.vision_query_key_value_list.{i}.weight"].T)
        q, k, v = (z.reshape(N, H, D).transpose(0, 1) for z in qkv.chunk(3, -1))
        a = _attn(rot(q), rot(k), v, causal).transpose(0, 1).reshape(N, -1)
        x = x + pick(a @ sd[lp + "attention.dense.weight"].T,
                     a @ sd[f"mixins.rotary.vision_dense_list.{i}.weight"].T)
        if cross is not None:
            y = _rms(x, sd[lp + "post_cross_attention_layernorm.weight"])
            hd = cfg.cross.attn_head_dim
            q = (y @ sd[lp + "cross_attention.query.weight"].T).reshape(N, -1, hd).transpose(0, 1)
            kv = cross @ sd[lp + "cross_attention.key_value.weight"].T
            kk, vv = (z.reshape(len(cross), -1, hd).transpose(0, 1) for z in kv.chunk(2, -1))
            a = _attn(q, kk, vv).transpose(0, 1).reshape(N, -1)
            x = x + a @ sd[lp + "cross_attention.dense.weight"].T
        y = _rms(x, sd[lp + "post_attention_layernorm.weight"])
        lang = (F.silu(y @ sd[f"mixins.mlp.gate_proj.{i}.weight"].T) * (y @ sd[lp + "mlp.dense_h_to_4h.weight"].T)) \
            @ sd[lp + "mlp.dense_4h_to_h.weight"].T
        visn = (F.silu(y @ sd[f"mixins.mlp.vision_gate_proj.{i}.weight"].T)
                * (y @ sd[f"mixins.mlp.vision_dense_h_to_4h_list.{i}.weight"].T)) \
            @ sd[f"mixins.mlp.vision_dense_4h_to_h_list.{i}.weight"].T
        x = x + pick(lang, visn)
    x = _rms(x, sd["transformer.final_layernorm.weight"])
    return x @ sd["mixins.lm.lm_head.weight"].T
