"""The OpenAI chat.completions protocol as this server speaks it: limits, errors in OpenAI's
shape, request parsing (every mistake is a 400 naming it) and the response bodies."""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

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
    body_timeout_s: float = 30.0    # to send a whole request body once its head is in (then 408)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: Optional[str] = None, headers: Optional[dict] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers
        self.param = param                 # the request field at fault, as OpenAI names it


def error_body(e: ApiError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


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
    check_unsupported(body)
    query, history, urls = _conversation(msgs, limits)
    image, remote = _image_source(urls, limits, allow_remote)
    gen, max_tokens, stop = _generation(body, limits)
    stream = False if body.get("stream") is None else body["stream"]
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    opts = {} if body.get("stream_options") is None else body["stream_options"]
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), (bool, type(None))):
        raise ApiError(400, "stream_options must be an object like {\"include_usage\": true}", param="stream_options")
    for text in [t for pair in history for t in pair] + [query] + stop:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "message text is not valid Unicode (a lone surrogate \\ud8xx?)") from None
    return ChatRequest(query, history, image, remote, gen, max_tokens, stop, stream, bool(opts.get("include_usage")))


# OpenAI fields this server takes but does not use: their type is checked, nothing more.
IGNORED = {"model": str, "user": str, "metadata": dict, "store": bool, "service_tier": str,
           "parallel_tool_calls": bool, "reasoning_effort": str, "verbosity": str, "prompt_cache_key": str,
           "prompt_cache_retention": str, "safety_identifier": str}
# OpenAI features this server does not implement: accepted only at their neutral value (which
# changes nothing), otherwise a 400 naming the field. Field: (types, neutral?, what the type is).
NEUTRAL_ONLY = {
    "frequency_penalty": ((int, float), lambda v: v == 0, "a number"),
    "presence_penalty": ((int, float), lambda v: v == 0, "a number"),
    "logit_bias": (dict, lambda v: not v, "an object"),
    "logprobs": (bool, lambda v: not v, "true or false"),
    "top_logprobs": (int, lambda v: v == 0, "an integer"),
    "tools": (list, lambda v: not v, "a list"),
    "functions": (list, lambda v: not v, "a list"),
    "tool_choice": ((str, dict), lambda v: v in ("none", "auto"), "a string or an object"),
    "function_call": ((str, dict), lambda v: v in ("none", "auto"), "a string or an object"),
    "response_format": (dict, lambda v: v.get("type") == "text", "an object"),
    "modalities": (list, lambda v: v == ["text"], "a list"),
    "audio": (dict, lambda v: False, "an object"),
    "prediction": (dict, lambda v: False, "an object"),
    "web_search_options": (dict, lambda v: False, "an object"),
}


def check_unsupported(body: dict) -> None:
    """A 400 for an OpenAI field of the wrong type, or asking for what this server does not do
    (tool calls, JSON mode, logprobs, penalties, logit bias, audio ...). null is leaving it out."""
    for key, kind in IGNORED.items():
        if body.get(key) is not None and not _is(body[key], kind):
            raise ApiError(400, f"{key} must be {'an object' if kind is dict else kind.__name__}",
                           code="invalid_type", param=key)
    for key, (kind, neutral, name) in NEUTRAL_ONLY.items():
        v = body.get(key)
        if v is None:
            continue
        if not _is(v, kind):
            raise ApiError(400, f"{key} must be {name}", code="invalid_type", param=key)
        if not neutral(v):
            shown = json.dumps(v)[:60]
            raise ApiError(400, f"{key}={shown} is not supported by this server (no tool calls, JSON mode, "
                                f"logprobs, penalties or logit bias); leave {key} out",
                           code="unsupported_parameter", param=key)


def _is(value, kind) -> bool:
    """isinstance, except that true and false are not numbers."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


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
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, f"{key} must be a positive integer", param=key)
        if max_tokens > limits.max_tokens:
            raise ApiError(400, f"{key} {max_tokens} is over this server's limit of {limits.max_tokens}", param=key)
    stop = [] if body.get("stop") is None else body["stop"]
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
    if "" in stop:
        raise ApiError(400, "stop strings must not be empty (an empty string would stop before any text)",
                       param="stop")
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
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
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


# ----- the published schema (/openapi.json) ---------------------------------------------
# What clients and fuzzers read. The parser above does the checking (its messages name each
# mistake); these models only describe the same request and response bodies.
class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Doc):
    type: Literal["text"]
    text: str


class ImageUrl(_Doc):
    url: str = Field(description="data:image/png|jpeg|webp|gif;base64,... (http(s) only with --allow-remote-images)")
    detail: Optional[str] = None


class ImagePart(_Doc):
    type: Literal["image_url"]
    image_url: Union[ImageUrl, str]


class Message(_Doc):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Union[TextPart, ImagePart]], None] = None


class StreamOptions(_Doc):
    include_usage: Optional[bool] = None


class ResponseFormat(_Doc):
    type: Literal["text"] = Field(description="only text: JSON mode and JSON schemas are refused (400)")


class ChatCompletionRequest(_Doc):
    """The request; the last message must be the user's, and the server's limits apply
    (messages, images, max_tokens, prompt length): past them the answer is a 400."""
    messages: list[Message] = Field(min_length=1)
    model: Optional[str] = Field(None, description="not checked: the one served model answers")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="default 1; 0 decodes greedily")
    top_p: Optional[float] = Field(None, ge=0, le=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    stop: Union[str, Annotated[list[str], Field(max_length=4)], None] = Field(None, description="none empty")
    seed: Optional[int] = Field(None, ge=-2**63, le=2**64 - 1)
    n: Optional[Literal[1]] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    # accepted at their neutral value only (see NEUTRAL_ONLY); anything else is a 400
    frequency_penalty: Optional[Literal[0]] = None
    presence_penalty: Optional[Literal[0]] = None
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=0)
    logprobs: Optional[Literal[False]] = None
    top_logprobs: Optional[Literal[0]] = None
    tools: Optional[list[dict]] = Field(None, max_length=0, description="no tool calls: only []")
    tool_choice: Optional[Literal["none", "auto"]] = None
    response_format: Optional[ResponseFormat] = None
    user: Optional[str] = None


class Usage(_Doc):
    prompt_tokens: int = Field(description="image slots included")
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Doc):
    role: Literal["assistant"]
    content: str


class Choice(_Doc):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(_Doc):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(_Doc):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(_Doc):
    index: int
    delta: Delta
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionChunk(_Doc):
    """One server-sent event of a stream (`data: {...}`); the stream ends with `data: [DONE]`.
    With stream_options.include_usage the last chunk before it has no choices and the usage."""
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class ErrorDetail(_Doc):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(_Doc):
    error: ErrorDetail
