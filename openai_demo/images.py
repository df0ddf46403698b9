"""Images of requests: fetching http(s) image URLs (only with --allow-remote-images) and
decoding image bytes into the model's input."""
from __future__ import annotations

import ipaddress
import socket
import time

from models.config import ModelConfig
from openai_demo.protocol import ApiError, Limits
from utils.chat import ImageContext
from utils.chat.image import WEB_FORMATS, ImageError


def checked_address(host: str) -> str:
    """The address to connect to: the host's first address, every one of which must be
    global (no private, loopback, link-local, shared 100.64/10, reserved or multicast)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        raise ApiError(400, f"image host {host!r} cannot be resolved", code="invalid_image_url") from None
    ips = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for ip in ips:
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        if not ip.is_global or (mapped is not None and not mapped.is_global):
            raise ApiError(400, f"image host {host!r} is not a public address", code="invalid_image_url")
    return str(ips[0])


def fetch_remote_image(url: str, limits: Limits) -> bytes:
    """Size cap, one total deadline, no redirects, and a connection to the very address that
    was checked (no second DNS look-up to rebind)."""
    import httpx
    from urllib.parse import urlsplit, urlunsplit
    parts = urlsplit(url)
    host = parts.hostname or ""
    ip = checked_address(host)
    netloc = (f"[{ip}]" if ":" in ip else ip) + (f":{parts.port}" if parts.port else "")
    direct = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    deadline = time.monotonic() + limits.remote_timeout_s
    try:
        with httpx.Client(timeout=limits.remote_timeout_s, follow_redirects=False) as c:
            with c.stream("GET", direct, headers={"Host": parts.netloc.rpartition("@")[2]},
                          extensions={"sni_hostname": host}) as r:
                if r.status_code != 200:
                    raise ApiError(400, f"fetching the image gave HTTP {r.status_code}", code="invalid_image_url")
                return _read_capped(r, limits, deadline)
    except httpx.HTTPError as e:
        raise ApiError(400, f"cannot fetch the image: {e}", code="invalid_image_url") from None


def _read_capped(response, limits: Limits, deadline: float) -> bytes:
    """The body of a streamed httpx response, within the size cap and the deadline (a
    time.monotonic() value)."""
    data = bytearray()
    for piece in response.iter_bytes():
        data += piece
        if len(data) > limits.max_image_bytes:
            raise ApiError(413, "remote image too large", code="image_too_large")
        if time.monotonic() > deadline:
            break
    if time.monotonic() > deadline:
        raise ApiError(400, f"fetching the image took longer than {limits.remote_timeout_s:g} s",
                       code="invalid_image_url")
    return bytes(data)


def decode_image(data: bytes, cfg: ModelConfig, limits: Limits) -> ImageContext:
    """Decoded by content (PNG, JPEG, WebP or GIF only, whatever the data URL claims) and kept
    only at the model's input size, so a queued request holds a few MB whatever the picture's
    size."""
    try:
        return ImageContext(data, cfg, max_pixels=limits.max_image_pixels, formats=WEB_FORMATS, keep_image=False)
    except ImageError as e:
        raise ApiError(400, str(e), code="invalid_image") from None
