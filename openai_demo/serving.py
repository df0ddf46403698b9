"""Serving chat completions: a request body becomes a tokenized prompt (built once), an engine
request (utils.serving.engine), and the answer, whole or as server-sent events.

Everything that grows with the request (JSON, base64, image decoding, tokenizing) runs in
worker threads: a big body never stalls /health or the running streams. Remote fetches have
their own threads, so slow servers cannot starve data: requests.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import AsyncIterator, Awaitable, Callable, Optional

from openai_demo.images import decode_image, fetch_remote_image
from openai_demo.protocol import (SSE_DONE, ApiError, ChatRequest, Limits, chunk, completion, error_body, parse_body,
                                  sse, usage_chunk)
from utils.chat import ImageContext, Row, build_row
from utils.chat.conversation import row_inputs
from utils.chat.templates import build_prompt
from utils.serving.engine import BatchEngine, QueueFull, Request


@dataclass
class Prompt:
    row: Row                                # the prompt tokenized, image slots included
    image: Optional[ImageContext]


class Submission:
    """One request in the engine: its events as they arrive, and the fields every response
    body starts with (id, created, model)."""

    def __init__(self, chat: ChatRequest, model_name: str):
        self.chat = chat
        self.base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_name}
        self.events: asyncio.Queue = asyncio.Queue()
        self.engine_request: Optional[Request] = None
        self._loop = asyncio.get_running_loop()

    def emit(self, event: dict) -> None:
        """The engine's callback (its worker thread): hand the event to the event loop."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:            # the event loop is closed (shutting down): nobody is waiting
            pass

    async def next_event(self, timeout: Optional[float] = None) -> dict:
        """The next delta or done event (asyncio.TimeoutError after `timeout` seconds)."""
        while (ev := await asyncio.wait_for(self.events.get(), timeout))["type"] == "first_token":
            pass
        return ev

    def cancel(self) -> None:
        """A client that left (or a response that ended) frees its row."""
        self.engine_request.cancelled.set()


class ChatServing:
    def __init__(self, model, tokenizer, engine: BatchEngine, model_name: str, limits: Limits,
                 allow_remote_images: bool = False, version: Optional[str] = None):
        """model: what prepares requests (under tensor parallelism the mirrored model)."""
        self.model, self.tokenizer, self.engine, self.model_name = model, tokenizer, engine, model_name
        self.limits, self.allow_remote_images, self.version = limits, allow_remote_images, version
        self.work = ThreadPoolExecutor(2, thread_name_prefix="parse")     # also bounds decodes in flight
        self.remote = ThreadPoolExecutor(8, thread_name_prefix="fetch")

    async def submit(self, raw: bytes) -> Submission:
        """A request body -> its request queued in the engine (ApiError for a bad one, 429 when
        the queue is full)."""
        loop = asyncio.get_running_loop()
        chat = await loop.run_in_executor(self.work, parse_body, raw, self.limits, self.allow_remote_images)
        del raw                                   # the body is not needed any more
        if chat.image_url is not None:
            chat.image = await loop.run_in_executor(self.remote, fetch_remote_image, chat.image_url, self.limits)
        prompt = await loop.run_in_executor(self.work, self.tokenize, chat)
        room = self.engine.max_len - len(prompt.row)
        if room < 1:
            raise ApiError(400, f"the prompt is {len(prompt.row)} tokens (image included); this server's "
                                f"context is {self.engine.max_len}", code="context_length_exceeded")
        sub = Submission(chat, self.model_name)
        sub.engine_request = Request(None, chat.gen, min(chat.max_tokens or self.limits.default_max_tokens, room),
                                     sub.emit, stop=chat.stop,
                                     prepare=partial(row_inputs, self.model, prompt.row, prompt.image))
        try:
            self.engine.submit(sub.engine_request)
        except QueueFull:
            raise ApiError(429, "the server is busy; retry shortly", "rate_limit_error", "queue_full",
                           headers={"Retry-After": "2"}) from None
        return sub

    def tokenize(self, chat: ChatRequest) -> Prompt:
        """The request's prompt, built and tokenized (the only time), and its image decoded."""
        cfg, max_len = self.model.config, self.engine.max_len
        chars = len(chat.query) + sum(len(q) + len(a) for q, a in chat.history)
        if chars > 64 * max_len:        # no token covers 64 characters: too long without tokenizing it
            raise ApiError(400, f"the prompt is {chars} characters; this server's context is {max_len} tokens",
                           code="context_length_exceeded")
        image = None
        if chat.image is not None:
            image = decode_image(chat.image, cfg, self.limits)
            chat.image = None                     # the compressed bytes are not needed any more
        prompt = build_prompt(chat.query, chat.history, self.version or cfg.version)
        return Prompt(build_row(self.tokenizer, cfg, prompt, image is not None), image)


async def stream_events(sub: Submission) -> AsyncIterator[str]:
    """The answer as server-sent events: the role, text deltas, the finish reason (or the
    error), usage if asked for, [DONE]."""
    try:
        yield sse(chunk(sub.base, {"role": "assistant", "content": ""}))
        while (ev := await sub.next_event())["type"] == "delta":
            yield sse(chunk(sub.base, {"content": ev["text"]}))
        if ev["finish_reason"] == "error":
            yield sse(error_body(ApiError(500, ev["error"], "server_error")))
        else:
            yield sse(chunk(sub.base, {}, ev["finish_reason"]))
            if sub.chat.include_usage:
                yield sse(usage_chunk(sub.base, ev))
        yield SSE_DONE
    finally:
        sub.cancel()


async def whole_answer(sub: Submission, disconnected: Callable[[], Awaitable[bool]]) -> Optional[dict]:
    """The answer as one chat.completion body; None when the client left before it was done
    (checked every half second)."""
    text = ""
    try:
        while True:
            try:
                ev = await sub.next_event(timeout=0.5)
            except asyncio.TimeoutError:
                if await disconnected():
                    return None
                continue
            if ev["type"] == "delta":
                text += ev["text"]
                continue
            if ev["finish_reason"] == "error":
                raise ApiError(500, f"generation failed: {ev['error']}", "server_error")
            return completion(sub.base, text, ev)
    finally:
        sub.cancel()
