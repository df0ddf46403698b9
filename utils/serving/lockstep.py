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
    """functions: name -> callable, the calls followers may be asked to make. group / leader:
    a sub-group of ranks led by global rank `leader` (default: every rank, led by rank 0)."""

    def __init__(self, functions: dict[str, Callable], group=None, leader: int = 0):
        self.functions, self.group, self.leader = functions, group, leader
        split = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if split else 0
        self.world = dist.get_world_size(group) if split else 1
        # Sampling draws from torch's global RNG: give every rank the same seed, so that
        # every rank picks the same token (the logits are already identical).
        seed = [random.randrange(2**31) if self.rank == leader else None]
        if self.world > 1:
            dist.broadcast_object_list(seed, src=leader, group=group)
        torch.manual_seed(seed[0])

    def send(self, name: str, *args) -> None:
        """Tell the followers to make this call (the leader makes it itself)."""
        if self.world > 1:
            dist.broadcast_object_list([(name, args)], src=self.leader, group=self.group)

    def call(self, name: str, *args):
        self.send(name, *args)
        return self.functions[name](*args)

    def stop(self) -> None:
        """Release the followers (their follow() returns)."""
        self.send(_STOP)

    def follow(self) -> int:
        """Followers: run what the leader runs until it stops. An error that the leader also
        meets (a prompt too long, a failed batch) is logged and the loop goes on; a leader that
        is gone ends it with the collective's error."""
        while True:
            msg = [None]
            dist.broadcast_object_list(msg, src=self.leader, group=self.group)
            name, args = msg[0]
            if name == _STOP:
                return 0
            try:
                result = self.functions[name](*args)
                if hasattr(result, "__next__"):          # a generator: run it to the end
                    for _ in result:
                        pass
            except Exception as e:  # noqa: BLE001 - the leader met it too and went on
                log.debug("rank %d: %s failed as on the leader: %s", self.rank, name, e)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.world > 1 and self.rank == self.leader:
            self.stop()
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
