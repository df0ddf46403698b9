"""Serving under torchrun with tensor parallelism (one model split across devices): rank 0
runs the engine and every other rank follows it through a utils.serving.lockstep.Lockstep.
Rank 0 sends each model-touching call (encode an image, admit a prompt into row r, decode a
step with these tokens, free row r) before making it, and the followers make the same call on
their own share of the weights and of the K/V buffers, meeting rank 0 in the same collectives.
Sampling, text, stop strings and HTTP stay on rank 0.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from models.cogvlm import CogVLM
from models.generate import ModelInputs
from utils.serving.slots import KVSlots


def shareable(inputs: ModelInputs) -> ModelInputs:
    """A request's inputs as sent to the followers: on the CPU, without CogAgent's cross K/V
    (each rank holds its own heads of them: the follower keeps the ones it computed)."""
    cpu = {k: v.cpu() for k, v in vars(inputs).items() if isinstance(v, torch.Tensor)}
    return replace(inputs, **cpu, cross_kv=inputs.cross_kv is not None)     # only whether there are any


class MirroredSlots(KVSlots):
    """Rank 0's K/V slots: every call is sent to the followers first (`send`: Lockstep.send)."""

    def __init__(self, model: CogVLM, max_batch: int, max_len: int, send: Callable):
        super().__init__(model, max_batch, max_len)
        self.send = send

    def admit(self, row: int, inputs: ModelInputs) -> torch.Tensor:
        self.send("admit", row, shareable(inputs))
        return super().admit(row, inputs)

    def step(self, tokens: list, live: list) -> torch.Tensor:
        self.send("step", tokens, live)
        return super().step(tokens, live)

    def free(self, row: int) -> None:
        self.send("free", row)
        super().free(row)


class MirroredModel:
    """Rank 0's model as the server's request code sees it: image encoding (run while a
    request is prepared) is sent to the followers first, so that they run it too. Everything
    else is the model itself (`local`: the model without the mirroring)."""

    def __init__(self, model: CogVLM, send: Callable):
        self.local, self._send = model, send

    def __getattr__(self, name):
        return getattr(self.local, name)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self._send("encode_images", images.cpu())
        return self.local.encode_images(images)

    def cross_kv(self, images: torch.Tensor) -> list:
        self._send("cross_kv", images.cpu())
        return self.local.cross_kv(images)


class Follower:
    """A follower rank's side of the calls rank 0 sends (`calls()` for Lockstep): the same
    model work on this rank's share of the weights and of the K/V slots."""

    def __init__(self, model: CogVLM, slots: KVSlots):
        self.model, self.slots = model, slots
        self.device = slots.device
        self.last_cross = None                        # this rank's cross K/V of the last image

    def calls(self) -> dict:
        return {"encode_images": self.encode_images, "cross_kv": self.cross_kv, "admit": self.admit,
                "step": self.slots.step, "free": self.slots.free}

    def encode_images(self, images: torch.Tensor) -> None:
        self.model.encode_images(images.to(self.device))

    def cross_kv(self, images: torch.Tensor) -> None:
        self.last_cross = self.model.cross_kv(images.to(self.device))

    def admit(self, row: int, inputs: ModelInputs) -> None:
        moved = {k: v.to(self.device) for k, v in vars(inputs).items() if isinstance(v, torch.Tensor)}
        self.slots.admit(row, replace(inputs, **moved, cross_kv=self.last_cross if inputs.cross_kv else None))
