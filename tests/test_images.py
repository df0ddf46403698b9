"""Image loading: every kind of bad input gives a clear ImageError, good ones become RGB."""
from __future__ import annotations

import struct
import zlib

import pytest
import torch
from PIL import Image

from utils.chat.image import CLIP_MEAN, CLIP_STD, ImageError, image_to_tensor, load_image


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels (a decompression bomb) without the pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bad_images(tmp_path, image_file):
    with pytest.raises(ImageError, match="image not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notimg.png").write_text("hello, I am text")
    with pytest.raises(ImageError, match="not an image"):
        load_image(tmp_path / "notimg.png")
    data = image_file.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated|cannot read"):
        load_image(tmp_path / "trunc.png")
    (tmp_path / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    with pytest.raises(ImageError, match="too large|megapixels"):
        load_image(tmp_path / "bomb.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="no pixels"):
        load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)


def test_modes_become_rgb(tmp_path):
    for mode, color in [("RGBA", (255, 0, 0, 0)), ("L", 128), ("CMYK", (0, 255, 0, 0)), ("P", 3), ("1", 1)]:
        p = tmp_path / f"img_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        Image.new(mode, (20, 10), color).save(p)
        img = load_image(p)
        assert img.mode == "RGB" and img.size == (20, 10)
    # fully transparent pixels composite on white
    assert load_image(tmp_path / "img_RGBA.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = img.getexif()
    exif[0x0112] = 6                                      # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_tensor_normalisation():
    t = image_to_tensor(Image.new("RGB", (30, 50), (255, 0, 0)), 28)
    assert t.shape == (3, 28, 28)
    expect = [(1 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], -CLIP_MEAN[2] / CLIP_STD[2]]
    assert torch.allclose(t[:, 5, 5], torch.tensor(expect), atol=1e-5)
