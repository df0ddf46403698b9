"""The batch K/V buffer of continuous batching: `max_batch` rows that requests are admitted
into, decoded together one token per step, and freed from.

All live rows write their next token at the same slot S; a new prompt is prefilled alone
(B=1), then its K/V is copied into a free row so that it ends at slot S (its earlier slots are
masked out for it). When S reaches the end of the buffer, every row is shifted left at once.
Under tensor parallelism each rank holds its own heads of it (utils.serving.mirror).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from models.cogvlm import Cache, CogVLM
from models.generate import ModelInputs, forward_one_token, prefill


class KVSlots:
    """admit(row, inputs) -> the prompt's last logits; step(tokens, live) -> every row's next
    logits; free(row). Which row a request gets is the caller's choice (`free_row`)."""

    def __init__(self, model: CogVLM, max_batch: int, max_len: int):
        cfg = model.config
        self.model, self.cfg, self.max_batch, self.max_len = model, cfg, max_batch, max_len
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.cap = max_len + max(64, max_len // 4)    # slots per row; full = shift left
        shape = (max_batch, model.num_kv_heads, self.cap, cfg.head_dim)     # this rank's heads
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_layers)]
        self.cross: Optional[list] = None             # per layer (k, v) buffers, CogAgent only
        self.start = torch.zeros(max_batch, dtype=torch.long, device=self.device)     # first slot
        self.next_pos = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # rotary
        self.has_image = torch.zeros(max_batch, dtype=torch.bool, device=self.device)
        self.used = [False] * max_batch
        self.S = max_len                              # the slot the next step writes

    def free_row(self) -> int:
        return self.used.index(False)

    def admit(self, row: int, inputs: ModelInputs) -> torch.Tensor:
        """Prefill one prompt alone and copy its K/V into `row`, ending at slot S -> logits 1,V.
        (Prefilling the prompts admitted together as one batch was measured too: on the 2-core
        CPU it was no faster in total and every stream's first token waited for the whole
        group: 16 streams' TTFT p50 5.3 s -> 10.6 s.)"""
        P = inputs.input_ids.shape[1]
        self._make_room(P)
        cache = Cache.allocate(self.cfg, 1, P, self.dtype, self.device, heads=self.model.num_kv_heads)
        logits = prefill(self.model, inputs, cache)
        for layer in range(self.cfg.num_layers):
            self.k[layer][row, :, self.S - P: self.S] = cache.k[layer][0]
            self.v[layer][row, :, self.S - P: self.S] = cache.v[layer][0]
        self.has_image[row] = inputs.cross_kv is not None
        if inputs.cross_kv is not None:
            self._set_cross(row, inputs.cross_kv)
        self.start[row] = self.S - P
        self.next_pos[row] = cache.next_position[0]
        self.used[row] = True
        return logits

    def step(self, tokens: list, live: list) -> torch.Tensor:
        """One decode step of rows [0, len(tokens)): tokens[i] is row i's last token (anything
        for a free row), live the rows in use -> logits n,V. The linear layers always run
        eagerly (compiled, the step measured no faster here than the oneDNN-packed weights);
        openai_api.py --compile compiles only the attention (models.compile.compile_attention;
        bench/RESULTS.md, "--compile")."""
        n = len(tokens)
        if self.S + 1 > self.cap:
            self._move(int(min(self.start[i] for i in live)))
        w0 = int(min(self.start[i] for i in live))
        slots = torch.arange(w0, self.S + 1, device=self.device)
        alive = torch.zeros(n, dtype=torch.bool, device=self.device)
        alive[live] = True
        mask = (slots[None, :] >= self.start[:n, None]) & alive[:, None]       # n,S+1-w0
        mask[:, -1] = True                            # every row sees its own new token
        view = _StepView(self, n, w0)
        if self.cross is not None and bool(self.has_image[:n].any()):
            view.cross_kv = [(k[:n], v[:n]) for k, v in self.cross]
            view.cross_rows = self.has_image[:n] & alive
        logits = forward_one_token(self.model, torch.tensor(tokens, device=self.device),
                                   self.next_pos[:n, None], view, mask[:, None, None, :])
        self.S += 1
        self.next_pos[:n] += 1
        return logits

    def free(self, row: int) -> None:
        self.used[row] = False
        self.has_image[row] = False

    def _set_cross(self, row: int, kv: list) -> None:
        if self.cross is None:
            self.cross = [tuple(torch.zeros((self.max_batch, *t.shape[1:]), dtype=t.dtype, device=t.device)
                                for t in layer) for layer in kv]
        for (bk, bv), (k, v) in zip(self.cross, kv):
            bk[row], bv[row] = k[0], v[0]

    def _move(self, d: int) -> None:
        """Shift every row's slots left by d (right when d < 0); S moves with them."""
        if d == 0:
            return
        for buf in self.k + self.v:
            if d > 0:
                buf[:, :, : self.S - d] = buf[:, :, d: self.S].clone()
            else:
                buf[:, :, -d: self.S - d] = buf[:, :, : self.S].clone()
        self.start -= d
        self.S -= d

    def _make_room(self, prompt_len: int) -> None:
        """Before admitting a prompt: it must fit before S, and S + 1 inside the buffer."""
        live = [int(self.start[i]) for i, used in enumerate(self.used) if used]
        if not live:
            self.S = self.max_len
            return
        if self.S + 1 > self.cap:
            self._move(min(live))
        if prompt_len > self.S:
            self._move(self.S - prompt_len)


@dataclass
class _StepView:
    """The buffer as one decode step's attention sees it: rows [0, n), slots [w0, S]. A stand-in
    for models.cogvlm.Cache (update, get_seq_length and the sequence state fields)."""
    slots: KVSlots
    n: int
    w0: int
    cross_kv: Optional[list] = None
    cross_rows: Optional[torch.Tensor] = None
    pad_mask: Optional[torch.Tensor] = None           # the step's explicit mask covers padding

    def get_seq_length(self) -> int:
        return self.slots.S

    def update(self, k: torch.Tensor, v: torch.Tensor, layer: int):
        s, n = self.slots, self.n
        s.k[layer][:n, :, s.S] = k[:, :, 0]
        s.v[layer][:n, :, s.S] = v[:, :, 0]
        return s.k[layer][:n, :, self.w0: s.S + 1], s.v[layer][:n, :, self.w0: s.S + 1]
