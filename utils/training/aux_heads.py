"""--aux_object_loss: training-only heads on the image encoders' patch features that predict
the kind, colour and box of the object under each patch (utils/data/synthetic.py labels).
They push the encoders to keep where each object is and what it looks like, which the
language model alone learns slowly; they are never saved with the model."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class AuxObjectHeads(torch.nn.Module):
    """Kind and colour of the object under each patch (0 = background) and its box."""
    def __init__(self, width: int, n_kinds: int, n_colours: int):
        super().__init__()
        self.kind = torch.nn.Linear(width, n_kinds + 1)
        self.colour = torch.nn.Linear(width, n_colours + 1)
        self.box = torch.nn.Linear(width, 4)

    def loss(self, feats: torch.Tensor, b: dict) -> torch.Tensor:
        """feats: B,N,C patch features (no CLS); b: obj_kind, obj_colour (B,N), obj_box (B,N,4)."""
        f = feats.float()
        loss = F.cross_entropy(self.kind(f).flatten(0, 1), b["obj_kind"].flatten(), ignore_index=-100)
        if (b["obj_colour"] >= 0).any():
            loss = loss + F.cross_entropy(self.colour(f).flatten(0, 1), b["obj_colour"].flatten(), ignore_index=-100)
        on = b["obj_kind"] > 0
        if on.any():
            loss = loss + 5.0 * F.smooth_l1_loss(self.box(f)[on].sigmoid(), b["obj_box"][on], beta=0.05)
        return torch.nan_to_num(loss)


class AuxHeads(torch.nn.ModuleDict):
    """The heads by encoder ("low": the low-res ViT, "cross": CogAgent's high-res encoder) and
    the encoders' outputs of the last forward, which the forward hooks keep in `features`."""
    def __init__(self, heads: dict):
        super().__init__(heads)
        self.features: dict = {}

    def keep(self, name: str, drop_cls: bool):
        """A forward hook that stores its module's output as features[name]."""
        def hook(_module, _inputs, out):
            self.features[name] = out[:, 1:] if drop_cls else out
        return hook


def attach_aux_heads(model, train_set) -> tuple:
    """Heads + hooks that keep the encoders' outputs of the last forward: the low-res ViT's
    patches and, for CogAgent, the high-res encoder's (whose features the cross attention
    reads when it locates GUI elements). Returns the object vocabulary (low-res grid, kinds,
    colours, high-res grid or None) for collate_train."""
    objs = [o for s in train_set.samples for o in s.objects]
    kinds = sorted({o["kind"] for o in objs})
    colours = sorted({o["colour"] for o in objs if o.get("colour")})
    if not kinds:
        raise ValueError("--aux_object_loss: the training labels hold no \"objects\"")
    cfg = model.config
    heads = {"low": AuxObjectHeads(cfg.eva.hidden_size, len(kinds), len(colours))}
    cross_grid = None
    if cfg.cross is not None:
        heads["cross"] = AuxObjectHeads(cfg.cross.hidden_size, len(kinds), len(colours))
        cross_grid = cfg.cross.image_size // cfg.cross.patch_size
    model.aux_heads = AuxHeads(heads).to(model.model.device, model.model.compute_dtype)
    model.model.vision.transformer.register_forward_hook(model.aux_heads.keep("low", drop_cls=True))
    if cfg.cross is not None:
        model.model.cross_vision.register_forward_hook(model.aux_heads.keep("cross", drop_cls=False))
    return cfg.eva.image_size // cfg.eva.patch_size, kinds, colours, cross_grid


def object_loss(model, b: dict) -> torch.Tensor:
    """The per-patch object loss on the encoder outputs the hooks kept from the last forward
    (low-res ViT, and the high-res encoder when the batch has its targets)."""
    heads = model.aux_heads
    loss = heads["low"].loss(heads.features["low"], b)
    if "cross_obj_kind" in b:
        cross = {k[len("cross_"):]: v for k, v in b.items() if k.startswith("cross_obj_")}
        loss = loss + heads["cross"].loss(heads.features["cross"], cross)
    return loss


def encoders_only_loss(model, b: dict) -> torch.Tensor:
    """Run only the image encoder(s) (the hooks keep their outputs) and return the per-patch loss."""
    dtype = model.model.compute_dtype
    model.model.vision.encode_patches(b["images"].to(dtype))
    if "cross_obj_kind" in b:
        model.model.cross_vision(b["cross_images"].to(dtype))
    return object_loss(model, b)
