"""The OpenAI chat.completions protocol as this server speaks it: limits, errors in OpenAI's
shape, request parsing (every mistake is a 400 naming it) and the response bodies."""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Optional

from models.generate import GenerationConfig

IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"}


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


# ----- request parsing ------------------------------------------------------------------
def parse_body(raw: bytes, limits: Limits, allow_remote: bool) -> ChatRequest:
    """JSON text -> ChatRequest; any malformed body is a 400 (deep nesting, huge numbers)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:          # JSONDecodeError is a ValueError
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:80]})") from None
    return parse_chat(body, limits, allow_remote)


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
    query, history, urls = _conversation(msgs, limits)
    image, remote = _image_source(urls, limits, allow_remote)
    gen, max_tokens, stop = _generation(body, limits)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false")
    opts = body.get("stream_options") or {}
    for text in [t for pair in history for t in pair] + [query] + stop:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "message text is not valid Unicode (a lone surrogate \\ud8xx?)") from None
    return ChatRequest(query, history, image, remote, gen, max_tokens, stop, stream,
                       bool(isinstance(opts, dict) and opts.get("include_usage")))


def _conversation(msgs: list, limits: Limits) -> tuple[str, list, list]:
    """messages -> (query, history pairs, image URLs of every role). Consecutive messages of
    one role merge; `system` messages are prepended to the first user turn."""
    system, turns, urls = [], [], []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant")
        text, imgs = _content_parts(m.get("content"), f"messages[{i}]")
        urls += imgs                                # every role's images count and are checked
        if m["role"] in ("system", "developer"):
            system.append(text)
        elif turns and turns[-1][0] == m["role"]:
            turns[-1][1] += "\n" + text
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
    return turns[-1][1], history, urls


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


def _image_source(urls: list, limits: Limits, allow_remote: bool) -> tuple[Optional[bytes], Optional[str]]:
    """(data: URL bytes, remote URL to fetch) of the image the model sees: the last one.
    Every URL is checked."""
    image = remote = None
    for url in urls:
        if url.startswith("data:"):
            image, remote = decode_data_url(url, limits), None
        elif url.startswith(("http://", "https://")):
            if not allow_remote:
                raise ApiError(400, "remote image URLs are disabled on this server; send a data: URL",
                               code="invalid_image_url")
            image, remote = None, url
        else:
            raise ApiError(400, "image_url must be a data: URL", code="invalid_image_url")
    return image, remote


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


def _generation(body: dict, limits: Limits) -> tuple[GenerationConfig, Optional[int], list]:
    """The sampling fields -> (GenerationConfig, max_tokens or None, stop strings)."""
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
    gen = GenerationConfig(temperature=temperature, top_p=top_p, top_k=0 if temperature > 0 else 1, seed=seed)
    return gen, max_tokens, stop


def _number(body, key, default, lo, hi) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise ApiError(400, f"{key} must be a number between {lo} and {hi}")
    return float(v)


# ----- response bodies ------------------------------------------------------------------
def usage(done: dict) -> dict:
    """The engine's `done` event -> OpenAI's usage object."""
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}


def completion(base: dict, text: str, done: dict) -> dict:
    return {**base, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text.strip()},
                         "finish_reason": done["finish_reason"], "logprobs": None}],
            "usage": usage(done)}


def chunk(base: dict, delta: dict, finish_reason: Optional[str] = None) -> dict:
    return {**base, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def usage_chunk(base: dict, done: dict) -> dict:
    return {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage(done)}


def sse(body: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(body)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
