"""OpenAI-compatible chat server for CogVLM / CogAgent (FastAPI + uvicorn).

    python openai_demo/openai_api.py --from_pretrained cogvlm-chat-v1.1 --port 8000
    # then any OpenAI client with base_url=http://127.0.0.1:8000/v1
    torchrun --nproc-per-node 2 openai_demo/openai_api.py ...   # one model split over 2 GPUs

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (OpenAI vision format:
`content` is a string or a list of `text` / `image_url` parts; image URLs are `data:` URLs of
png, jpeg, webp or gif (first frame); http(s) URLs only with --allow-remote-images).
The model sees ONE image per conversation: the most recent one in the messages. A request with
more images than --max-images is refused. `system` messages are prepended to the first user
turn (the prompt templates have no system slot). Requests are decoded together with continuous
batching (utils/serving/engine.py); when the queue is full the answer is 429 with Retry-After.
Binds 127.0.0.1 unless --host is given; optional API key; CORS off unless origins are given.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from any directory
from utils.apps.flags import ArgumentParser  # noqa: E402
# oneDNN caches one compiled kernel per GEMM shape (1024 by default); a server sees endless
# prompt-length x batch-size shapes, and the cache showed up as steady RSS growth. Set before
# torch is imported.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from models.generate import GenerationConfig  # noqa: E402
from utils.chat import ImageContext, build_row, prepare  # noqa: E402
from utils.chat.image import WEB_FORMATS, ImageError  # noqa: E402
from utils.chat.templates import build_prompt  # noqa: E402

log = logging.getLogger("openai_api")
IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"}
IGNORED_PARAMS = {"frequency_penalty", "presence_penalty", "logit_bias", "user", "logprobs",
                  "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls",
                  "service_tier", "store", "metadata", "stream_options", "modalities", "reasoning_effort"}


@dataclass
class Limits:
    max_body_bytes: int = 20 << 20
    max_image_bytes: int = 10 << 20
    max_image_pixels: int = 16_000_000
    max_images: int = 4
    max_messages: int = 64
    max_tokens: int = 1024          # largest max_tokens a request may ask for
    default_max_tokens: int = 512
    remote_timeout_s: float = 10.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


def error_body(e: ApiError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "code": e.code}}


# ----- request parsing ------------------------------------------------------------------
def decode_data_url(url: str, limits: Limits) -> bytes:
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or ";base64" not in head:
        raise ApiError(400, "image_url must be a base64 data: URL (data:image/png;base64,...)", code="invalid_image_url")
    mime = head[5:].split(";")[0].strip().lower()
    if mime not in IMAGE_TYPES:
        raise ApiError(400, f"unsupported image type {mime!r}; use png, jpeg, webp or gif", code="invalid_image_format")
    if len(data) * 3 // 4 > limits.max_image_bytes:
        raise ApiError(413, f"image is larger than {limits.max_image_bytes} bytes", code="image_too_large")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image_url data is not valid base64", code="invalid_image_url") from None


def _checked_address(host: str) -> str:
    """The address to connect to: the host's first address, every one of which must be
    global (no private, loopback, link-local, shared 100.64/10, reserved or multicast)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        raise ApiError(400, f"image host {host!r} cannot be resolved", code="invalid_image_url") from None
    ips = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for ip in ips:
        mapped = getattr(ip, "ipv4_mapped", None)
        if not ip.is_global or (mapped is not None and not mapped.is_global):
            raise ApiError(400, f"image host {host!r} is not a public address", code="invalid_image_url")
    return str(ips[0])


def fetch_remote_image(url: str, limits: Limits) -> bytes:
    """Only with --allow-remote-images: size cap, one total deadline, no redirects, and a
    connection to the very address that was checked (no second DNS look-up to rebind)."""
    import httpx
    from urllib.parse import urlsplit, urlunsplit
    parts = urlsplit(url)
    host = parts.hostname or ""
    ip = _checked_address(host)
    netloc = (f"[{ip}]" if ":" in ip else ip) + (f":{parts.port}" if parts.port else "")
    direct = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    deadline = time.monotonic() + limits.remote_timeout_s
    try:
        with httpx.Client(timeout=limits.remote_timeout_s, follow_redirects=False) as c:
            with c.stream("GET", direct, headers={"Host": parts.netloc.rpartition("@")[2]},
                          extensions={"sni_hostname": host}) as r:
                if r.status_code != 200:
                    raise ApiError(400, f"fetching the image gave HTTP {r.status_code}", code="invalid_image_url")
                data = bytearray()
                for chunk in r.iter_bytes():
                    data += chunk
                    if len(data) > limits.max_image_bytes:
                        raise ApiError(413, "remote image too large", code="image_too_large")
                    if time.monotonic() > deadline:
                        break
                if time.monotonic() > deadline:
                    raise ApiError(400, f"fetching the image took longer than {limits.remote_timeout_s:g} s",
                                   code="invalid_image_url")
                return bytes(data)
    except httpx.HTTPError as e:
        raise ApiError(400, f"cannot fetch the image: {e}", code="invalid_image_url") from None


@dataclass
class ChatRequest:
    query: str
    history: list
    image: Optional[bytes]                 # a data: URL's bytes, or fetched from image_url
    image_url: Optional[str]               # a remote URL still to fetch (--allow-remote-images)
    gen: GenerationConfig
    max_tokens: Optional[int]
    stop: list
    stream: bool
    include_usage: bool


def _content_parts(content, where: str) -> tuple[str, list]:
    if isinstance(content, str):
        return content, []
    if content is None:
        return "", []
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of parts")
    texts, images = [], []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
            raise ApiError(400, f"{where}.content[{j}] must be a text or image_url part")
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.content[{j}].text must be a string")
            texts.append(part["text"])
        else:
            iu = part.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            if not isinstance(url, str):
                raise ApiError(400, f"{where}.content[{j}].image_url.url must be a string")
            images.append(url)
    return "\n".join(texts), images


def parse_chat(body, limits: Limits, allow_remote: bool) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list", code="missing_messages")
    if len(msgs) > limits.max_messages:
        raise ApiError(400, f"{len(msgs)} messages is over the limit of {limits.max_messages}")
    n = body.get("n", 1)
    if n is not None and (type(n) is not int or n != 1):
        raise ApiError(400, "only n=1 is supported")
    system, turns, urls = [], [], []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant")
        text, imgs = _content_parts(m.get("content"), f"messages[{i}]")
        urls += imgs                                # every role's images count and are checked
        if m["role"] in ("system", "developer"):
            system.append(text)
            continue
        if turns and turns[-1][0] == m["role"]:
            turns[-1][1] += "\n" + text            # consecutive messages of one role merge
        else:
            turns.append([m["role"], text])
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must come from the user")
    if len(urls) > limits.max_images:
        raise ApiError(400, f"{len(urls)} images is over the limit of {limits.max_images}; the model "
                            f"sees only the most recent image of a conversation", code="too_many_images")
    if turns[0][0] == "assistant":
        turns.insert(0, ["user", ""])
    if system:
        turns[0][1] = "\n".join(system) + ("\n" + turns[0][1] if turns[0][1] else "")
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]
    image = remote = None
    for url in urls:                                # the model sees the last one
        if url.startswith("data:"):
            image, remote = decode_data_url(url, limits), None
        elif url.startswith(("http://", "https://")):
            if not allow_remote:
                raise ApiError(400, "remote image URLs are disabled on this server; send a data: URL",
                               code="invalid_image_url")
            image, remote = None, url
        else:
            raise ApiError(400, "image_url must be a data: URL", code="invalid_image_url")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, "max_tokens must be a positive integer")
        if max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens}")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 strings")
    seed = body.get("seed")
    if seed is not None and (type(seed) is not int or not -2**63 <= seed < 2**64):
        raise ApiError(400, "seed must be an integer from -2**63 to 2**64 - 1")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false")
    opts = body.get("stream_options") or {}
    gen = GenerationConfig(temperature=temperature, top_p=top_p, top_k=0 if temperature > 0 else 1,
                           seed=seed)
    for text in [t for _, t in turns] + stop:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "message text is not valid Unicode (a lone surrogate \\ud8xx?)") from None
    return ChatRequest(turns[-1][1], history, image, remote, gen, max_tokens, stop, stream,
                       bool(isinstance(opts, dict) and opts.get("include_usage")))


def parse_body(raw: bytes, limits: Limits, allow_remote: bool) -> ChatRequest:
    """JSON text -> ChatRequest; any malformed body is a 400 (deep nesting, huge numbers)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:          # JSONDecodeError is a ValueError
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:80]})") from None
    return parse_chat(body, limits, allow_remote)


def _number(body, key, default, lo, hi) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise ApiError(400, f"{key} must be a number between {lo} and {hi}")
    return float(v)


# ----- app --------------------------------------------------------------------------------
def create_app(model, tokenizer, model_name: str, engine, limits: Limits = Limits(),
               api_key: Optional[str] = None, cors_origins=(), allow_remote_images: bool = False,
               version: Optional[str] = None):

    # With a key, nothing but liveness is shown to callers without it (no schema either).
    app = FastAPI(title="CogVLM OpenAI-compatible API", docs_url=None, redoc_url=None,
                  openapi_url=None if api_key else "/openapi.json")
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    created = int(time.time())
    from concurrent.futures import ThreadPoolExecutor
    work = ThreadPoolExecutor(2, thread_name_prefix="parse")          # also bounds decodes in flight
    remote = ThreadPoolExecutor(8, thread_name_prefix="fetch")

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):      # unknown routes, 405s: OpenAI's shape
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(ApiError(e.status_code, str(e.detail), "invalid_request_error", kind)),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        return JSONResponse(error_body(ApiError(400, "invalid request")), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_, e: Exception):
        log.exception("unexpected error")
        return JSONResponse(error_body(ApiError(500, f"internal error: {type(e).__name__}", "server_error")),
                            status_code=500)

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        return hmac.compare_digest(token.encode("utf-8", "replace"), api_key.encode())

    def check_auth(request: Request) -> None:
        if not authorized(request):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)",
                           "authentication_error", "invalid_api_key")

    @app.get("/health")
    async def health(request: Request):
        if not authorized(request):
            return {"status": "ok"}
        return {"status": "ok", "model": model_name, **engine.load()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "local"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > limits.max_body_bytes:
            raise ApiError(413, f"request body is over {limits.max_body_bytes} bytes", code="body_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                raise ApiError(413, f"request body is over {limits.max_body_bytes} bytes", code="body_too_large")
        # Everything that grows with the request (JSON, base64, image decoding, tokenizing) runs
        # in worker threads: a big body never stalls /health or the running streams. Remote
        # fetches have their own threads, so slow servers cannot starve data: requests.
        loop = asyncio.get_running_loop()
        req = await loop.run_in_executor(work, parse_body, bytes(raw), limits, allow_remote_images)
        del raw
        if req.image_url is not None:
            req.image = await loop.run_in_executor(remote, fetch_remote_image, req.image_url, limits)
        image, n_prompt = await loop.run_in_executor(work, _prompt_inputs, req, model, tokenizer, limits,
                                                     version, engine.max_len)
        room = engine.max_len - n_prompt
        if room < 1:
            raise ApiError(400, f"the prompt is {n_prompt} tokens (image included); this server's "
                                f"context is {engine.max_len}", code="context_length_exceeded")
        max_new = min(req.max_tokens or limits.default_max_tokens, room)
        events: asyncio.Queue = asyncio.Queue()
        from utils.serving.engine import QueueFull, Request as EngineRequest
        ereq = EngineRequest(None, req.gen, max_new, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                             stop=req.stop,
                             prepare=lambda: prepare(model, tokenizer, req.query, req.history, image, version))
        try:
            engine.submit(ereq)
        except QueueFull:
            raise ApiError(429, "the server is busy; retry shortly", "rate_limit_error", "queue_full",
                           headers={"Retry-After": "2"}) from None
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        base = {"id": cid, "created": int(time.time()), "model": model_name}

        if req.stream:
            async def sse():
                try:
                    first = {**base, "object": "chat.completion.chunk",
                             "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]}
                    yield f"data: {json.dumps(first)}\n\n"
                    while True:
                        ev = await events.get()
                        if ev["type"] == "first_token":
                            continue
                        if ev["type"] == "delta":
                            chunk = {**base, "object": "chat.completion.chunk",
                                     "choices": [{"index": 0, "delta": {"content": ev["text"]}, "finish_reason": None}]}
                            yield f"data: {json.dumps(chunk)}\n\n"
                            continue
                        if ev["finish_reason"] == "error":
                            yield f"data: {json.dumps(error_body(ApiError(500, ev['error'], 'server_error')))}\n\n"
                        else:
                            last = {**base, "object": "chat.completion.chunk",
                                    "choices": [{"index": 0, "delta": {}, "finish_reason": ev["finish_reason"]}]}
                            yield f"data: {json.dumps(last)}\n\n"
                            if req.include_usage:
                                yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [], 'usage': _usage(ev)})}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                finally:
                    ereq.cancelled.set()                # a client that left frees its row

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        text = ""
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        ereq.cancelled.set()
                        return JSONResponse({}, status_code=499)
                    continue
                if ev["type"] == "first_token":
                    continue
                if ev["type"] == "delta":
                    text += ev["text"]
                    continue
                if ev["finish_reason"] == "error":
                    raise ApiError(500, f"generation failed: {ev['error']}", "server_error")
                return {**base, "object": "chat.completion",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text.strip()},
                                     "finish_reason": ev["finish_reason"], "logprobs": None}],
                        "usage": _usage(ev)}
        finally:
            ereq.cancelled.set()

    return app


def _usage(ev) -> dict:
    return {"prompt_tokens": ev["prompt_tokens"], "completion_tokens": ev["completion_tokens"],
            "total_tokens": ev["prompt_tokens"] + ev["completion_tokens"]}


def _prompt_inputs(req: ChatRequest, model, tokenizer, limits: Limits, version, max_len: int) -> tuple:
    """(image context, prompt length in tokens). The image is decoded by content (PNG, JPEG,
    WebP or GIF only, whatever the data URL claims) and kept only at the model's input size,
    so a queued request holds a few MB whatever the picture's size."""
    cfg = model.config
    chars = len(req.query) + sum(len(q) + len(a) for q, a in req.history)
    if chars > 64 * max_len:        # no token covers 64 characters: too long without tokenizing it
        raise ApiError(400, f"the prompt is {chars} characters; this server's context is {max_len} tokens",
                       code="context_length_exceeded")
    image = None
    if req.image is not None:
        try:
            image = ImageContext(req.image, cfg, max_pixels=limits.max_image_pixels, formats=WEB_FORMATS,
                                 keep_image=False)
        except ImageError as e:
            raise ApiError(400, str(e), code="invalid_image") from None
        req.image = None                               # the compressed bytes are not needed any more
    prompt = build_prompt(req.query, req.history, version or cfg.version)
    return image, len(build_row(tokenizer, cfg, prompt, image is not None))


def parse_args(argv=None):
    from utils.apps.args import add_model_args
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="name reported by /v1/models (default: the checkpoint's)")
    p.add_argument("--api-key", default=os.environ.get("COGVLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (or set COGVLM_API_KEY)")
    p.add_argument("--cors-origins", nargs="*", default=[], help="allowed CORS origins (default: none)")
    p.add_argument("--allow-remote-images", action="store_true", help="let image_url fetch http(s) URLs")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=32, help="waiting requests before 429")
    p.add_argument("--max-length", type=int, default=2048, help="context per request, image tokens included")
    d = Limits()
    p.add_argument("--max-images", type=int, default=d.max_images)
    p.add_argument("--max-messages", type=int, default=d.max_messages)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="largest max_tokens accepted")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    p.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes)
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections and requests at once; more are answered 503")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a new connection has to send its request head before it is closed")
    p.add_argument("--access-log", action="store_true", help="log every request (off by default)")
    return p.parse_args(argv)


def guarded_h11(header_timeout: float):
    """uvicorn's HTTP/1.1 protocol plus a header timeout: a connection that has sent no
    complete request head `header_timeout` seconds after connecting is closed (uvicorn has
    none, so half-open connections stayed open forever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self.loop.call_later(header_timeout, self._close_if_silent)

        def _close_if_silent(self):
            if self.cycle is None and self.timeout_keep_alive_task is None and not self.transport.is_closing():
                self.transport.close()
    return GuardedH11


def limit_malloc_arenas(n: int = 2) -> None:
    """glibc gives each thread that allocates its own heap arena and rarely returns their
    pages; with many request threads that shows up as RSS creep. Two arenas keep RSS flat."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-8, n)        # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def main(argv=None) -> int:
    limit_malloc_arenas()
    import uvicorn
    from models.loading import resolve_pretrained
    from utils.apps.args import load_or_report, setup_logging
    from models.tp import tp_rank_world
    from utils.serving.engine import BatchEngine, MirroredModel, follower_calls
    from utils.serving.lockstep import Lockstep
    args = parse_args(argv)
    setup_logging()
    # --compile: the batch engine keeps its oneDNN-packed linear layers (as fast as compiled ones
    # there) and compiles only the decode attention (models.compile.compile_attention).
    want_compile, args.compile = args.compile, False
    loaded = load_or_report(args)
    if loaded is None:
        return 1
    model, tok = loaded
    max_len = min(args.max_length, model.config.max_sequence_length)
    rank, world = tp_rank_world()
    if want_compile and world > 1:
        log.warning("--compile is not supported with model parallelism yet; decoding eagerly")
    elif want_compile:
        from models.compile import compile_attention
        compile_attention(model)
    if world > 1 and rank != 0:                        # tensor parallel: follow rank 0's engine
        # Ctrl-C (and torchrun's forwarded SIGINT / SIGTERM) reach every rank at once: a
        # follower leaves when rank 0, shutting down, releases it (or when rank 0 is gone), so
        # that both end with matching collectives.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        engine = BatchEngine(model, tok, max_batch=args.max_batch, max_len=max_len, worker=False)
        import torch
        with torch.inference_mode():
            return Lockstep(follower_calls(engine)).follow()
    step = Lockstep({}) if world > 1 else None
    if step:
        model = MirroredModel(model, step.send)        # image encoding reaches every rank
    name = args.model_name or resolve_pretrained(args.from_pretrained).name
    limits = Limits(max_body_bytes=args.max_body_bytes, max_image_bytes=args.max_image_bytes,
                    max_image_pixels=args.max_image_pixels, max_images=args.max_images,
                    max_messages=args.max_messages, max_tokens=args.max_tokens,
                    default_max_tokens=min(512, args.max_tokens))
    engine = BatchEngine(getattr(model, "_model", model), tok, max_batch=args.max_batch,
                         max_queue=args.max_queue, max_len=max_len, step=step)
    app = create_app(model, tok, name, engine, limits, args.api_key, args.cors_origins,
                     args.allow_remote_images, args.version)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("listening on %s without an API key: anyone who can reach it can use it", args.host)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=args.access_log,
                http=guarded_h11(args.header_timeout), limit_concurrency=args.max_connections,
                timeout_keep_alive=5)
    engine.close()
    return 0


if __name__ == "__main__":
    from models.tp import exit_process
    exit_process(main())                        # under torchrun: every rank leaves together
