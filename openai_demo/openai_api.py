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
A request head has --header-timeout and its body --body-timeout seconds (then 408); Ctrl-C or
SIGTERM give running requests --shutdown-timeout seconds, then the engine is closed. Without
an API key, /openapi.json describes the chat route (request, answers, errors).
(protocol.py: request parsing and response bodies; images.py: image URLs; serving.py: from a
request to its answer; this file: the HTTP app and the command line.)
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import signal
import sys
import time
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

from openai_demo import protocol  # noqa: E402
from openai_demo.protocol import ApiError, Limits, error_body  # noqa: E402
from openai_demo.serving import ChatServing, stream_events, whole_answer  # noqa: E402

log = logging.getLogger("openai_api")


# ----- errors in OpenAI's shape ------------------------------------------------------------
async def api_error(_, e: ApiError):
    return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)


async def http_error(_, e: StarletteHTTPException):          # unknown routes, 405s: OpenAI's shape
    kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(error_body(ApiError(e.status_code, str(e.detail), "invalid_request_error", kind)),
                        status_code=e.status_code, headers=e.headers)


async def invalid_request(_, e: RequestValidationError):
    return JSONResponse(error_body(ApiError(400, "invalid request")), status_code=400)


async def unexpected_error(_, e: Exception):
    log.exception("unexpected error")
    return JSONResponse(error_body(ApiError(500, f"internal error: {type(e).__name__}", "server_error")),
                        status_code=500)


ERROR_HANDLERS = {ApiError: api_error, StarletteHTTPException: http_error,
                  RequestValidationError: invalid_request, Exception: unexpected_error}


class BodyDeadline:
    """ASGI middleware: a request's body must have arrived `seconds` after its head. A stalled
    or trickling upload is answered 408, or 503 as soon as the server begins to shut down
    (`stopping` is set), and its connection closed. (uvicorn has no such limit: one byte every
    half second held a connection, and the shutdown, for minutes.)"""

    def __init__(self, app, seconds: float, stopping: asyncio.Event):
        self.app, self.seconds, self.stopping = app, seconds, stopping

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline, body_done = loop.time() + self.seconds, False

        async def receive_by_deadline():
            nonlocal body_done
            if body_done:                               # later reads wait for a disconnect: no deadline
                return await receive()
            message = await self._first(receive(), max(deadline - loop.time(), 0))
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message
        await self.app(scope, receive_by_deadline, send)

    async def _first(self, receiving, timeout: float) -> dict:
        """The next message, unless the deadline passes or the server stops first."""
        got, stop = asyncio.ensure_future(receiving), asyncio.ensure_future(self.stopping.wait())
        try:
            done, _ = await asyncio.wait({got, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not got.done():
                got.cancel()
        if got in done:
            return got.result()
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down", "server_error", "shutting_down",
                           headers={"Connection": "close"})
        raise ApiError(408, f"the request body did not arrive within {self.seconds:g} s",
                       code="request_timeout", headers={"Connection": "close"})


# ----- routes ------------------------------------------------------------------------------
async def read_body(request: Request, limits: Limits) -> bytes:
    """The request body, refused with 413 once it is over limits.max_body_bytes."""
    too_big = ApiError(413, f"request body is over {limits.max_body_bytes} bytes", code="body_too_large",
                       headers={"Connection": "close"})       # the rest of the body is not read
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > limits.max_body_bytes:
        raise too_big
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > limits.max_body_bytes:
            raise too_big
    return bytes(raw)


class Routes:
    """The endpoints. With an API key, nothing but liveness is shown to callers without it."""

    def __init__(self, serving: ChatServing, api_key: Optional[str]):
        self.serving, self.api_key = serving, api_key
        self.created = int(time.time())

    def authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        return hmac.compare_digest(token.encode("utf-8", "replace"), self.api_key.encode())

    def check_auth(self, request: Request) -> None:
        if not self.authorized(request):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)",
                           "authentication_error", "invalid_api_key")

    async def health(self, request: Request):
        if not self.authorized(request):
            return {"status": "ok"}
        return {"status": "ok", "model": self.serving.model_name, **self.serving.engine.load()}

    async def models(self, request: Request):
        self.check_auth(request)
        return {"object": "list", "data": [{"id": self.serving.model_name, "object": "model",
                                            "created": self.created, "owned_by": "local"}]}

    async def chat_completions(self, request: Request):
        self.check_auth(request)
        sub = await self.serving.submit(await read_body(request, self.serving.limits))
        if sub.chat.stream:
            return StreamingResponse(stream_events(sub), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        body = await whole_answer(sub, request.is_disconnected)
        return JSONResponse({}, status_code=499) if body is None else body


# ----- the published schema ----------------------------------------------------------------
def _ref(model) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


ERRORS = {400: "a mistake in the request (the message names it), or an unsupported feature",
          401: "a missing or wrong API key", 408: "the request body did not arrive in time",
          413: "the body or an image is too large", 429: "the queue is full: retry after Retry-After seconds",
          500: "generation failed"}
CHAT_DOC = {
    "summary": "Create a chat completion (OpenAI format, text and image_url parts)",
    "openapi_extra": {"requestBody": {"required": True, "content": {
        "application/json": {"schema": _ref(protocol.ChatCompletionRequest)}}}},
    "responses": {
        200: {"description": "the answer: one chat.completion, or with stream=true server-sent events, "
                             "each `data: <ChatCompletionChunk>`, then `data: [DONE]`",
              "content": {"application/json": {"schema": _ref(protocol.ChatCompletion)},
                          "text/event-stream": {"schema": {"type": "string"},
                                                "x-event-schema": _ref(protocol.ChatCompletionChunk)}}},
        **{code: {"description": text, "model": protocol.ErrorResponse} for code, text in ERRORS.items()},
        503: {"description": "the server is shutting down (JSON), or too many open connections "
                             "(--max-connections; plain text from the HTTP layer)", "model": protocol.ErrorResponse,
              "content": {"text/plain": {"schema": {"type": "string"}}}}},
}


def published_schema(app: FastAPI) -> dict:
    """FastAPI's schema plus the request and chunk models, which no route signature names
    (the route parses its body by hand, for the exact error messages)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi
        from pydantic.json_schema import models_json_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema([(protocol.ChatCompletionRequest, "validation"),
                                      (protocol.ChatCompletion, "serialization"),
                                      (protocol.ChatCompletionChunk, "serialization")],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        app.openapi_schema = schema
    return app.openapi_schema


# ----- the app -----------------------------------------------------------------------------
def create_app(model, tokenizer, model_name: str, engine, limits: Limits = Limits(),
               api_key: Optional[str] = None, cors_origins=(), allow_remote_images: bool = False,
               version: Optional[str] = None) -> FastAPI:
    """model: what prepares requests (under tensor parallelism the mirrored model); engine: the
    utils.serving.engine.BatchEngine that decodes them."""
    app = FastAPI(title="CogVLM OpenAI-compatible API", docs_url=None, redoc_url=None,
                  openapi_url=None if api_key else "/openapi.json")      # no schema without the key
    app.openapi = lambda: published_schema(app)
    app.state.stopping = asyncio.Event()                # set when the server begins to shut down
    app.add_middleware(BodyDeadline, seconds=limits.body_timeout_s, stopping=app.state.stopping)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    for kind, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(kind, handler)
    routes = Routes(ChatServing(model, tokenizer, engine, model_name, limits, allow_remote_images, version), api_key)
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"], **CHAT_DOC)
    return app


# ----- the command line ----------------------------------------------------------------------
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
    p.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                   help="seconds a request has to send its whole body after its head (then 408)")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds running requests get to finish after Ctrl-C / SIGTERM; then they are cut")
    p.add_argument("--access-log", action="store_true", help="log every request (off by default)")
    return p.parse_args(argv)


def limits_from_args(args) -> Limits:
    return Limits(max_body_bytes=args.max_body_bytes, max_image_bytes=args.max_image_bytes,
                  max_image_pixels=args.max_image_pixels, max_images=args.max_images,
                  max_messages=args.max_messages, max_tokens=args.max_tokens, body_timeout_s=args.body_timeout,
                  default_max_tokens=min(Limits.default_max_tokens, args.max_tokens))


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


def run_http(app, args) -> bool:
    """Serve until Ctrl-C or SIGTERM; False if the server could not start (port taken).
    Shutting down, requests still running get --shutdown-timeout seconds, then are cut."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.stopping.set()                    # uploads still in progress: 503 now
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self):
            """uvicorn's, but the signal is not raised again afterwards: that ended the process
            (SIGTERM) before main() could close the engine."""
            before = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in before.items():
                    signal.signal(sig, handler)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                   access_log=args.access_log, http=guarded_h11(args.header_timeout),
                                   limit_concurrency=args.max_connections, timeout_keep_alive=5,
                                   timeout_graceful_shutdown=args.shutdown_timeout))
    server.run()
    return server.started


def limit_malloc_arenas(n: int = 2) -> None:
    """glibc gives each thread that allocates its own heap arena and rarely returns their
    pages; with many request threads that shows up as RSS creep. Two arenas keep RSS flat."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-8, n)        # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def follow_rank0(model, args, max_len: int) -> int:
    """A tensor-parallel follower: make rank 0's engine calls on this rank's share until it
    stops. Ctrl-C (and torchrun's forwarded SIGINT / SIGTERM) reach every rank at once: a
    follower leaves when rank 0, shutting down, releases it (or when rank 0 is gone), so that
    both end with matching collectives."""
    import torch
    from utils.serving.lockstep import Lockstep
    from utils.serving.mirror import Follower
    from utils.serving.slots import KVSlots
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    follower = Follower(model, KVSlots(model, args.max_batch, max_len))
    with torch.inference_mode():
        return Lockstep(follower.calls()).follow()


def serve(model, tok, args, max_len: int, world: int) -> int:
    """Rank 0 (or the only process): the engine and the HTTP server, until Ctrl-C or SIGTERM."""
    from models.loading import resolve_pretrained
    from utils.serving.engine import BatchEngine
    from utils.serving.lockstep import Lockstep
    from utils.serving.mirror import MirroredModel
    step = Lockstep({}) if world > 1 else None
    engine = BatchEngine(model, tok, max_batch=args.max_batch, max_queue=args.max_queue, max_len=max_len, step=step)
    # Requests are prepared with the mirrored model: their image encoding reaches every rank.
    requests_model = MirroredModel(model, step.send) if step else model
    name = args.model_name or resolve_pretrained(args.from_pretrained).name
    app = create_app(requests_model, tok, name, engine, limits_from_args(args), args.api_key, args.cors_origins,
                     args.allow_remote_images, args.version)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("listening on %s without an API key: anyone who can reach it can use it", args.host)
    try:
        started = run_http(app, args)
    finally:
        engine.close()
    log.info("server stopped")
    return 0 if started else 1


def main(argv=None) -> int:
    limit_malloc_arenas()
    from models.tp import tp_rank_world
    from utils.apps.args import load_or_report, setup_logging
    args = parse_args(argv)
    setup_logging()
    # --compile: the batch engine keeps its oneDNN-packed linear layers (as fast as compiled ones
    # there) and compiles only the decode attention (models.compile.compile_attention).
    want_compile, args.compile = args.compile, False
    from models.invariant import ROWS, deterministic_on
    args.deterministic = deterministic_on(args.deterministic, args.device, want_compile)
    if args.deterministic and args.max_batch > ROWS:
        print(f"error: --max-batch {args.max_batch}: batch-invariant decoding (--deterministic, the CPU "
              f"default) runs at most {ROWS} rows per step; lower --max-batch or add --no-deterministic",
              file=sys.stderr)
        return 2
    loaded = load_or_report(args)
    if loaded is None:
        return 1
    model, tok = loaded
    max_len = min(args.max_length, model.config.max_sequence_length)
    rank, world = tp_rank_world()
    if want_compile and world > 1:
        log.warning("--compile is not supported with model parallelism yet; decoding eagerly")
    elif want_compile and args.deterministic:
        log.warning("--compile: batch-invariant decoding (--deterministic) runs eagerly; not compiling")
    elif want_compile:
        from models.compile import compile_attention
        compile_attention(model)
    if world == 1:                               # ranks would time each other's attention
        from models.invariant import compile_every_row
        if compile_every_row(model):
            log.info("one-row attention: %s runs eager or compiled, whichever the first row measures "
                     "faster here", "every row's" if model.runtime.batch_invariant else "a single-row step's")
    if world > 1 and rank != 0:
        return follow_rank0(model, args, max_len)
    return serve(model, tok, args, max_len, world)


if __name__ == "__main__":
    from models.tp import exit_process
    exit_process(main())                        # under torchrun: every rank leaves together
