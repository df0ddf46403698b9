"""Image loading and preprocessing with PIL + torch (no torchvision)."""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 64_000_000          # ~8000 x 8000; larger files are refused before decoding


class ImageError(ValueError):
    """An image that cannot be used; the message says why."""


WEB_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")     # what a server decodes (never EPS/PSD/...)


def load_image(src: Union[str, Path, bytes, Image.Image], max_pixels: int = MAX_PIXELS,
               formats: Optional[tuple] = None) -> Image.Image:
    """Open a path, bytes or PIL image as RGB, EXIF orientation applied. Refuses missing
    files, non-images, truncated files, empty images and decompression bombs. formats: the
    only Pillow formats tried, judged by content (e.g. WEB_FORMATS)."""
    name = "image" if isinstance(src, (bytes, Image.Image)) else str(src)
    img = src if isinstance(src, Image.Image) else _open(_read_bytes(src, name), name, formats)
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageError(f"{name}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} = {w * h / 1e6:.0f} megapixels is over the limit of "
                         f"{max_pixels / 1e6:.0f} megapixels")
    return _decode_rgb(img, name)


def _read_bytes(src: Union[str, Path, bytes], name: str) -> bytes:
    """A URL, a path or bytes -> the file's bytes (missing, non-file and empty refused)."""
    if isinstance(src, str) and src.startswith(("http://", "https://")):
        data = fetch_image(src)
    elif isinstance(src, (str, Path)):
        p = Path(src).expanduser()
        if not p.exists():
            raise ImageError(f"image not found: {p}")
        if not p.is_file():
            raise ImageError(f"not a file: {p}")
        data = p.read_bytes()
    else:
        data = src
    if not data:
        raise ImageError(f"{name}: empty file")
    return data


def _open(data: bytes, name: str, formats: Optional[tuple]) -> Image.Image:
    """Identify the format by content (pixels not decoded yet); bombs and non-images refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        allowed = f" (accepted: {', '.join(formats)})" if formats else ""
        raise ImageError(f"{name}: not an image file (format not recognised){allowed}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: image too large to decode safely ({e})") from None
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise many kinds on bad data
        raise ImageError(f"{name}: cannot read image ({type(e).__name__}: {e})") from None


def _decode_rgb(img: Image.Image, name: str) -> Image.Image:
    """Decode the pixels, apply EXIF orientation, and composite transparency on white."""
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            bg = Image.new("RGB", rgba.size, (255, 255, 255))
            bg.paste(rgba, mask=rgba.split()[-1])
            return bg
        return img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image too large to decode safely ({e})") from None
    except Exception as e:  # noqa: BLE001 - fuzzed files raise anything from inside the decoders
        raise ImageError(f"{name}: image data is corrupt or truncated ({type(e).__name__}: {e})") from None


MAX_FETCH_BYTES = 20 << 20


def fetch_image(url: str, timeout: float = 10.0, max_bytes: int = MAX_FETCH_BYTES) -> bytes:
    """An http(s) image for the command-line demos (as the original accepted URLs): one total
    deadline, a size cap, redirects followed (a user's own request, not a server's)."""
    import time
    import httpx
    deadline = time.monotonic() + timeout
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as r:
            if r.status_code != 200:
                raise ImageError(f"{url}: HTTP {r.status_code}")
            data = bytearray()
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > max_bytes:
                    raise ImageError(f"{url}: larger than {max_bytes >> 20} MB")
                if time.monotonic() > deadline:
                    raise ImageError(f"{url}: download took longer than {timeout:g} s")
            return bytes(data)
    except httpx.HTTPError as e:
        raise ImageError(f"{url}: cannot download ({type(e).__name__}: {e})") from None


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL -> 3,size,size float tensor: bicubic resize, [0,1], CLIP mean/std."""
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    x = x.view(size, size, 3).permute(2, 0, 1).float() / 255.0                   # 3,S,S
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std
