"""The training loss of one collated batch (utils/training/dataset.py: collate_train)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.cogvlm import ModelInputs
from utils.training.aux_heads import encoders_only_loss, object_loss
from utils.training.dataset import packed_attention_mask


def forward_batch(model, b: dict) -> torch.Tensor:
    """Logits B,T,V of a training batch already on the model's device: padded rows (pad_mask),
    or packed rows whose questions are masked from each other (segments -> attn_mask)."""
    attn_mask = packed_attention_mask(b["segments"], b["pad_mask"]) if "segments" in b else None
    inputs = ModelInputs(b["input_ids"], b["position_ids"], b["vision_mask"], b["image_mask"],
                         images=b["images"], cross_images=b.get("cross_images"),
                         pad_mask=None if attn_mask is not None else b["pad_mask"])
    return model(inputs, attn_mask=attn_mask)


def compute_loss(model, batch: dict, device, aux_weight: float = 0.0, encoders_only: bool = False) -> torch.Tensor:
    """The language-model loss on the answers (+ aux_weight x the per-patch object loss).
    encoders_only: run only the image encoder(s) and return the per-patch loss alone."""
    b = {k: v.to(device) for k, v in batch.items()}
    if encoders_only:
        return encoders_only_loss(model, b)
    logits = forward_batch(model, b)
    target = b["input_ids"][:, 1:]                 # token t+1 is what position t predicts
    mask = b["loss_mask"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1][mask].float(), target[mask])
    if aux_weight and "obj_kind" in b:
        loss = loss + aux_weight * object_loss(model, b)
    return loss
