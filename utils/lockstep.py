"""Apps under `torchrun` with tensor parallelism: rank 0 reads input (terminal, web page, HTTP)
and every other rank follows it. Each model-touching call rank 0 makes is first broadcast
(name + arguments, pickled by torch.distributed), so all ranks run the same call on the same
data and meet in the same collectives. Without torchrun (world size 1) calls run directly.

    step = Lockstep({"set_image": set_image, "answer": answer})
    if step.rank != 0:
        return step.follow()          # returns when rank 0 stops
    with step:                        # on exit (even by exception) the followers are released
        step.call("answer", query, history)
"""
from __future__ import annotations

import logging
import random
from typing import Callable

import torch
import torch.distributed as dist

from models.tp import tp_rank_world

log = logging.getLogger(__name__)
_STOP = "__stop__"


class Lockstep:
    def __init__(self, functions: dict[str, Callable]):
        self.functions = functions
        self.rank, self.world = tp_rank_world()
        # Sampling draws from torch's global RNG: give every rank the same seed, so that
        # every rank picks the same token (the logits are already identical).
        seed = [random.randrange(2**31) if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(seed, src=0)
        torch.manual_seed(seed[0])

    def call(self, name: str, *args):
        if self.world > 1:
            dist.broadcast_object_list([(name, args)], src=0)
        return self.functions[name](*args)

    def follow(self) -> int:
        """Non-zero ranks: run what rank 0 runs until it stops. An error that rank 0 also
        meets (a prompt too long) is logged and the loop goes on."""
        while True:
            msg = [None]
            dist.broadcast_object_list(msg, src=0)
            name, args = msg[0]
            if name == _STOP:
                return 0
            try:
                result = self.functions[name](*args)
                if hasattr(result, "__next__"):          # a generator: run it to the end
                    for _ in result:
                        pass
            except (ValueError, OSError) as e:
                log.debug("rank %d: %s failed as on rank 0: %s", self.rank, name, e)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.world > 1 and self.rank == 0:
            dist.broadcast_object_list([(_STOP, ())], src=0)
        return False


def agree(error: str | None) -> list[tuple[int, str]]:
    """Every rank reports its error (or None); all ranks get the list of (rank, error), so
    that all of them stop together when any one failed (instead of the others hanging)."""
    _, world = tp_rank_world()
    if world == 1:
        return [(0, error)] if error else []
    errors = [None] * world
    dist.all_gather_object(errors, error)
    return [(r, e) for r, e in enumerate(errors) if e]
