"""Continuous batching for serving: requests that arrive while others decode join the batch at
the next decode step. One worker thread owns the model.

Layout: a batch K/V buffer of `max_batch` rows. All active rows write their next token at the
same slot S; a new request is prefilled alone (B=1), then its K/V is copied into a free row so
that it ends at slot S (its earlier slots are masked out for it). When S reaches the end of
the buffer, every row is shifted left at once. A finished or cancelled row is simply freed.

Under torchrun with tensor parallelism (the server split across devices) rank 0 runs this
engine and every other rank follows it (`follower_calls` under utils.serving.lockstep.Lockstep): rank 0
sends each model-touching decision (admit a prompt into row r, decode a step with these tokens,
free row r, encode an image) before making it, and the followers make the same one on their
own share of the weights and of the K/V buffers, meeting rank 0 in the same collectives. Sampling, text, stop
strings and HTTP stay on rank 0.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from models.cogvlm import Cache, CogVLM
from models.generate import (GenerationConfig, ModelInputs, apply_repetition_penalty, forward_one_token, prefill,
                             sample)
from models.loading import release_free_memory
from utils.chat.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


@dataclass
class Request:
    inputs: Optional[ModelInputs]             # one row (utils.chat.prepare), or None and ...
    gen: GenerationConfig
    max_new_tokens: int
    emit: Callable                            # emit(event: dict), called from the worker thread
    stop: list = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    prepare: Optional[Callable] = None        # ... built by the worker (image encoding runs there)
    # worker state
    row: int = -1
    ids: list = field(default_factory=list)
    sent: str = ""
    generator: Optional[torch.Generator] = None
    seen: Optional[torch.Tensor] = None

    @property
    def prompt_tokens(self) -> int:
        return self.inputs.input_ids.shape[1] if self.inputs is not None else 0


class _BatchCache:
    """What the model's attention sees during a batched decode step (see module doc)."""

    def __init__(self, engine: "BatchEngine"):
        self.e = engine

    def get_seq_length(self) -> int:
        return self.e.S

    def update(self, k, v, layer):
        e = self.e
        e.k[layer][: e.n, :, e.S] = k[:, :, 0]
        e.v[layer][: e.n, :, e.S] = v[:, :, 0]
        return e.k[layer][: e.n, :, e.w0: e.S + 1], e.v[layer][: e.n, :, e.w0: e.S + 1]


class BatchEngine:
    def __init__(self, model: CogVLM, tokenizer: Tokenizer, max_batch: int = 16, max_queue: int = 64,
                 max_len: Optional[int] = None, step=None, worker: bool = True):
        """step: under tensor parallelism on rank 0, the utils.serving.lockstep.Lockstep that sends each
        decision to the followers (see the module doc); worker=False: a follower's engine."""
        self.model, self.tok = model, tokenizer
        self.step = step
        self.mirror = step.send if step is not None else (lambda *args: None)
        cfg = model.config
        self.cfg, self.max_batch, self.max_queue = cfg, max_batch, max_queue
        self.max_len = max_len or cfg.max_sequence_length
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.cap = self.max_len + max(64, self.max_len // 4)   # slots per row; full = shift left
        shape = (max_batch, model.num_kv_heads, self.cap, cfg.head_dim)     # this rank's heads
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_layers)]
        self.cross = None                              # per layer (k, v) buffers, CogAgent only
        self.start = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.next_pos = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.has_image = torch.zeros(max_batch, dtype=torch.bool, device=self.device)
        self.rows: list[Optional[Request]] = [None] * max_batch
        self.S, self.w0, self.n = self.max_len, self.max_len, 0
        self.waiting: deque[Request] = deque()
        self.cv = threading.Condition()
        self.closed = False
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)
        if worker:
            self.thread.start()

    # ----- public ---------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        with self.cv:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(req)
            self.cv.notify()

    def load(self) -> dict:
        return {"active": sum(r is not None for r in self.rows), "waiting": len(self.waiting),
                "max_batch": self.max_batch, "max_queue": self.max_queue}

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        if self.step is not None and not self.thread.is_alive():   # the worker has stopped sending
            # Release the followers; if one is already gone the send may never complete: give
            # it a few seconds, then leave anyway.
            t = threading.Thread(target=self.step.stop, daemon=True)
            t.start()
            t.join(timeout=5)

    # ----- worker ---------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cv:
                if not self.closed and not self.waiting and not any(self.rows):
                    release_free_memory()
                while not self.closed and not self.waiting and not any(self.rows):
                    self.cv.wait()
                if self.closed:
                    return
                admit = []
                while self.waiting and len(admit) + sum(r is not None for r in self.rows) < self.max_batch:
                    admit.append(self.waiting.popleft())
            with torch.inference_mode():
                for req in admit:
                    if not self._prepare(req):
                        continue
                    try:
                        self._admit(req)
                    except Exception as e:  # noqa: BLE001 - fails this request, not the server
                        log.exception("admitting a request failed")
                        if req.row >= 0 and self.rows[req.row] is req:
                            self._finish(req.row, "error", error=str(e))
                        elif req.row < 0:
                            req.emit({"type": "done", "finish_reason": "error", "error": str(e),
                                      "prompt_tokens": req.prompt_tokens, "completion_tokens": 0})
                try:
                    if any(self.rows):
                        self._step()
                except Exception as e:  # noqa: BLE001 - a failed step fails its requests only
                    log.exception("engine step failed")
                    for i, r in enumerate(self.rows):
                        if r is not None:
                            self._finish(i, "error", error=str(e))

    def _prepare(self, req: Request) -> bool:
        """Build the request's inputs (image encoding runs here, in the worker). False, with
        its `done` event sent, for a request that was cancelled or cannot be prepared."""
        reason, error = None, None
        if req.cancelled.is_set():                     # the client left while waiting
            reason = "cancelled"
        else:
            try:
                if req.inputs is None:
                    req.inputs = req.prepare()
                if req.prompt_tokens > self.max_len:
                    raise ValueError(f"prompt of {req.prompt_tokens} tokens is longer than the "
                                     f"engine's max_len {self.max_len}")
            except Exception as e:  # noqa: BLE001 - reported to this request only
                log.exception("preparing a request failed")
                reason, error = "error", str(e)
        if reason is None:
            return True
        req.emit({"type": "done", "finish_reason": reason, "error": error,
                  "prompt_tokens": req.prompt_tokens, "completion_tokens": 0})
        return False

    def _admit(self, req: Request) -> None:
        """Prefill one request alone (B=1), then copy its K/V into a free row so that it ends
        at slot S. (Prefilling the requests admitted together as one batch was measured too:
        on the 2-core CPU it was no faster in total and every stream's first token waited for
        the whole group: 16 streams' TTFT p50 5.3 s -> 10.6 s.)"""
        row = self.rows.index(None)
        self.mirror("admit", row, _shareable(req.inputs))
        logits = self._admit_model(row, req.inputs)
        req.row = row
        self.rows[row] = req
        if req.gen.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(req.gen.seed)
        req.seen = req.inputs.input_ids.masked_fill(req.inputs.image_mask, self.cfg.bos_token_id)
        self._accept(row, logits)

    def _admit_model(self, row: int, inputs: ModelInputs) -> torch.Tensor:
        """The model's part of admitting a prompt into `row` (every rank runs it)."""
        P = inputs.input_ids.shape[1]
        self._make_room(P)
        cache = Cache.allocate(self.cfg, 1, P, self.dtype, self.device, heads=self.model.num_kv_heads)
        logits = prefill(self.model, inputs, cache)
        for layer in range(self.cfg.num_layers):
            self.k[layer][row, :, self.S - P: self.S] = cache.k[layer][0]
            self.v[layer][row, :, self.S - P: self.S] = cache.v[layer][0]
        if inputs.cross_kv is not None:
            self._set_cross(row, inputs.cross_kv)
        else:
            self.has_image[row] = False
        self.start[row] = self.S - P
        self.next_pos[row] = cache.next_position[0]
        return logits

    def _set_cross(self, row: int, kv: list) -> None:
        if self.cross is None:
            self.cross = [tuple(torch.zeros((self.max_batch, *t.shape[1:]), dtype=t.dtype, device=t.device)
                                for t in layer) for layer in kv]
        for (bk, bv), (k, v) in zip(self.cross, kv):
            bk[row], bv[row] = k[0], v[0]
        self.has_image[row] = True

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
        live = [int(self.start[i]) for i, r in enumerate(self.rows) if r is not None]
        if not live:
            self.S = self.max_len
            return
        if self.S + 1 > self.cap:
            self._move(min(live))
        if prompt_len > self.S:
            self._move(self.S - prompt_len)

    def _step(self) -> None:
        n = max(i for i, r in enumerate(self.rows) if r is not None) + 1
        live = [i for i in range(n) if self.rows[i] is not None]
        tokens = [self.rows[i].ids[-1] if self.rows[i] is not None else 0 for i in range(n)]
        self.mirror("step", n, tokens, live)
        logits = self._step_model(n, tokens, live)
        self.steps += 1
        for i in live:
            try:
                self._accept(i, logits[i: i + 1])
            except Exception as e:  # noqa: BLE001 - one row's failure ends that row only
                log.exception("sampling row %d failed", i)
                self._finish(i, "error", error=str(e))

    def _step_model(self, n: int, tokens: list, live: list) -> torch.Tensor:
        """One decode step of rows [0, n) (every rank runs it) -> logits n,V. The linear layers
        always run eagerly (compiled, the step measured no faster here than the oneDNN-packed
        weights); openai_api.py --compile compiles only the attention (models.compile
        .compile_attention; bench/RESULTS.md, "--compile")."""
        if self.S + 1 > self.cap:
            self._move(int(min(self.start[i] for i in live)))
        self.n = n
        self.w0 = int(min(self.start[i] for i in live))
        tokens = torch.tensor(tokens, device=self.device)
        slots = torch.arange(self.w0, self.S + 1, device=self.device)
        alive = torch.zeros(n, dtype=torch.bool, device=self.device)
        alive[live] = True
        mask = (slots[None, :] >= self.start[:n, None]) & alive[:, None]
        mask[:, -1] = True                            # every row sees its own new token
        cross_kv = cross_rows = None
        if self.cross is not None and bool(self.has_image[:n].any()):
            cross_kv = [(k[:n], v[:n]) for k, v in self.cross]
            cross_rows = self.has_image[:n] & alive
        logits = forward_one_token(self.model, tokens, self.next_pos[:n, None], _BatchCache(self),
                                   cross_kv, cross_rows, None, mask[:, None, None, :])
        self.S += 1
        self.next_pos[:n] += 1
        return logits

    def _accept(self, row: int, logits: torch.Tensor) -> None:
        """Sample this row's next token, stream its text, finish it if it is done."""
        req = self.rows[row]
        if req.cancelled.is_set():
            self._finish(row, "cancelled")
            return
        logits = apply_repetition_penalty(logits, req.seen, req.gen.repetition_penalty)
        tok = int(sample(logits, req.gen, req.generator)[0])
        if req.gen.repetition_penalty != 1.0:
            req.seen = torch.cat([req.seen, torch.tensor([[tok]], device=self.device)], 1)
        if tok == self.cfg.eos_token_id:
            self._flush(req)
            self._finish(row, "stop")
            return
        req.ids.append(tok)
        if len(req.ids) == 1:
            req.emit({"type": "first_token"})          # for time-to-first-token accounting
        text = self.tok.decode(req.ids)
        for s in req.stop:
            if s and s in text:
                self._emit_delta(req, text[: text.index(s)])
                self._finish(row, "stop")
                return
        if not text.endswith("\ufffd"):
            # hold back what could be the start of a stop string
            hold = max((len(s) - 1 for s in req.stop if s), default=0)
            safe = text[: len(text) - hold] if hold else text
            self._emit_delta(req, safe)
        if len(req.ids) >= req.max_new_tokens:
            self._flush(req)
            self._finish(row, "length")

    def _emit_delta(self, req: Request, text: str) -> None:
        if len(text) > len(req.sent) and text.startswith(req.sent):
            req.emit({"type": "delta", "text": text[len(req.sent):]})
            req.sent = text

    def _flush(self, req: Request) -> None:
        self._emit_delta(req, self.tok.decode(req.ids).rstrip("\ufffd"))

    def _finish(self, row: int, reason: str, error: Optional[str] = None) -> None:
        req = self.rows[row]
        self.mirror("finish", row)
        self.rows[row] = None
        self.has_image[row] = False
        if req is None:
            return
        req.emit({"type": "done", "finish_reason": reason, "error": error,
                  "prompt_tokens": req.prompt_tokens, "completion_tokens": len(req.ids)})


# ----- tensor parallel serving --------------------------------------------------------------
def _shareable(inputs: ModelInputs) -> ModelInputs:
    """A request's inputs as sent to the followers: on the CPU, without CogAgent's cross K/V
    (each rank holds its own heads of them: the follower keeps the ones it computed)."""
    from dataclasses import replace
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(inputs).items()}
    cpu["cross_kv"] = inputs.cross_kv is not None          # only whether there are any
    return replace(inputs, **cpu)


class MirroredModel:
    """Rank 0's model as the server's request code sees it: image encoding (run while a
    request is prepared) is sent to the followers first, so that they run it too. Everything
    else is the model itself."""

    def __init__(self, model: CogVLM, send: Callable):
        self._model, self._send = model, send

    def __getattr__(self, name):
        return getattr(self._model, name)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self._send("encode_images", images.cpu())
        return self._model.encode_images(images)

    def cross_kv(self, images: torch.Tensor) -> list:
        self._send("cross_kv", images.cpu())
        return self._model.cross_kv(images)


def follower_calls(engine: BatchEngine) -> dict:
    """A follower rank's side of the decisions rank 0 sends (utils.serving.lockstep.Lockstep.follow):
    the same model work on this rank's share of the weights and of the K/V buffers."""
    from dataclasses import replace
    model, dev = engine.model, engine.device
    last = {"cross": None}                             # this rank's K/V of the last image

    def admit(row: int, inputs: ModelInputs) -> None:
        inputs = replace(inputs, **{k: v.to(dev) for k, v in vars(inputs).items() if isinstance(v, torch.Tensor)})
        inputs.cross_kv = last["cross"] if inputs.cross_kv else None
        engine._admit_model(row, inputs)
        engine.rows[row] = True                        # occupied (rank 0 holds the request)

    def finish(row: int) -> None:
        engine.rows[row] = None
        engine.has_image[row] = False

    def cross_kv(images: torch.Tensor) -> None:
        last["cross"] = model.cross_kv(images.to(dev))

    return {"encode_images": lambda images: model.encode_images(images.to(dev)), "cross_kv": cross_kv,
            "admit": admit, "step": engine._step_model, "finish": finish}
