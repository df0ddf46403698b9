"""Continuous batching for serving: requests that arrive while others decode join the batch at
the next decode step. One worker thread owns the model.

    engine = BatchEngine(model, tokenizer, max_batch=8)
    engine.submit(Request(inputs, gen, max_new_tokens=64, emit=events.put))

`emit` receives, from the worker thread: {"type": "first_token"} once, {"type": "delta",
"text": ...} as the answer grows, and last {"type": "done", "finish_reason": "stop" |
"length" | "cancelled" | "error", "error", "prompt_tokens", "completion_tokens"}.
The K/V rows live in utils.serving.slots.KVSlots; text and stop strings in
utils.chat.text_stream.TextStream; sampling in models.generate.SamplingState. Under
tensor parallelism (`step`: a Lockstep) the slots' calls reach every rank (utils.serving.mirror).
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from models.cogvlm import CogVLM
from models.generate import GenerationConfig, ModelInputs
from models.machine import release_free_memory
from utils.chat.text_stream import TextStream
from utils.chat.tokenizer import Tokenizer
from utils.serving.lockstep import Lockstep
from utils.serving.mirror import MirroredSlots
from models.generate import SamplingState
from utils.serving.slots import KVSlots

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
    # worker state, set when the request is admitted into a row
    row: int = -1
    text: Optional[TextStream] = None
    sampling: Optional[SamplingState] = None

    @property
    def prompt_tokens(self) -> int:
        return self.inputs.input_ids.shape[1] if self.inputs is not None else 0

    @property
    def completion_tokens(self) -> int:
        return len(self.text.ids) if self.text is not None else 0

    def done(self, reason: str, error: Optional[str] = None) -> None:
        self.emit({"type": "done", "finish_reason": reason, "error": error,
                   "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens})


class BatchEngine:
    """The queue of waiting requests and the worker that admits them into free rows and
    decodes every row in use one token per step."""

    def __init__(self, model: CogVLM, tokenizer: Tokenizer, max_batch: int = 16, max_queue: int = 64,
                 max_len: Optional[int] = None, step: Optional[Lockstep] = None):
        """step: under tensor parallelism on rank 0, the Lockstep the followers follow."""
        self.tok, self.step = tokenizer, step
        self.eos = model.config.eos_token_id
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = max_len or model.config.max_sequence_length
        if step is None:
            self.slots = KVSlots(model, max_batch, self.max_len)
        else:
            self.slots = MirroredSlots(model, max_batch, self.max_len, step.send)
        self.rows: list[Optional[Request]] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self.cv = threading.Condition()
        self.closed = False
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)
        self.thread.start()

    # ----- any thread -------------------------------------------------------------------
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

    # ----- the worker thread ------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while (admit := self._wait_for_work()) is not None:
            with torch.inference_mode():
                for req in admit:
                    if self._prepare(req):
                        self._admit(req)
                if any(self.rows):
                    self._step()

    def _wait_for_work(self) -> Optional[list]:
        """Block until there is something to do -> the requests to admit now (None: closed)."""
        with self.cv:
            if not self.closed and not self.waiting and not any(self.rows):
                release_free_memory()
            while not self.closed and not self.waiting and not any(self.rows):
                self.cv.wait()
            if self.closed:
                return None
            admit = []
            while self.waiting and len(admit) + sum(r is not None for r in self.rows) < self.max_batch:
                admit.append(self.waiting.popleft())
            return admit

    def _prepare(self, req: Request) -> bool:
        """Build the request's inputs (image encoding runs here, in the worker). False, with
        its `done` event sent, for a request that was cancelled or cannot be prepared."""
        if req.cancelled.is_set():                     # the client left while waiting
            req.done("cancelled")
            return False
        try:
            if req.inputs is None:
                req.inputs = req.prepare()
            if req.prompt_tokens > self.max_len:
                raise ValueError(f"prompt of {req.prompt_tokens} tokens is longer than the "
                                 f"engine's max_len {self.max_len}")
        except Exception as e:  # noqa: BLE001 - reported to this request only
            log.exception("preparing a request failed")
            req.done("error", str(e))
            return False
        return True

    def _admit(self, req: Request) -> None:
        """Prefill the request into a free row and take its first token."""
        try:
            row = self.slots.free_row()
            logits = self.slots.admit(row, req.inputs)
            req.row, self.rows[row] = row, req
            req.sampling = SamplingState.start(req.inputs, req.gen)
            req.text = TextStream(self.tok, req.stop)
            self._accept(row, logits)
        except Exception as e:  # noqa: BLE001 - fails this request, not the server
            log.exception("admitting a request failed")
            if req.row < 0:
                req.done("error", str(e))
            elif self.rows[req.row] is req:
                self._finish(req.row, "error", str(e))

    def _step(self) -> None:
        """One decode step of every row in use; a failed step fails its requests only."""
        n = max(i for i, r in enumerate(self.rows) if r is not None) + 1
        live = [i for i in range(n) if self.rows[i] is not None]
        tokens = [self.rows[i].text.ids[-1] if self.rows[i] is not None else 0 for i in range(n)]
        try:
            logits = self.slots.step(tokens, live)
        except Exception as e:  # noqa: BLE001
            log.exception("engine step failed")
            for i in live:
                self._finish(i, "error", str(e))
            return
        self.steps += 1
        for i in live:
            try:
                self._accept(i, logits[i: i + 1])
            except Exception as e:  # noqa: BLE001 - one row's failure ends that row only
                log.exception("sampling row %d failed", i)
                self._finish(i, "error", str(e))

    def _accept(self, row: int, logits: torch.Tensor) -> None:
        """Sample this row's next token, stream its text, finish it if it is done."""
        req = self.rows[row]
        if req.cancelled.is_set():
            self._finish(row, "cancelled")
            return
        tok = int(req.sampling.next_token(logits)[0])
        if tok == self.eos:
            self._emit_text(req, req.text.flush())
            self._finish(row, "stop")
            return
        if not req.text.ids:
            req.emit({"type": "first_token"})          # for time-to-first-token accounting
        self._emit_text(req, req.text.push(tok))
        if req.text.stopped:
            self._finish(row, "stop")
        elif len(req.text.ids) >= req.max_new_tokens:
            self._emit_text(req, req.text.flush())
            self._finish(row, "length")

    @staticmethod
    def _emit_text(req: Request, delta: str) -> None:
        if delta:
            req.emit({"type": "delta", "text": delta})

    def _finish(self, row: int, reason: str, error: Optional[str] = None) -> None:
        req = self.rows[row]
        self.slots.free(row)
        self.rows[row] = None
        if req is not None:
            try:                                   # a failing listener must not end the worker thread
                req.done(reason, error)
            except Exception:  # noqa: BLE001
                log.exception("reporting the end of row %d failed", row)
