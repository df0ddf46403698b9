"""Shared fixtures: a tiny SentencePiece tokenizer and tiny random checkpoints written to disk
in the released SAT format."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))

CORPUS = """Question: What is in the image? Answer: A red circle and a blue square.
[INST] Describe the picture. [/INST] There is a cat on a mat near the window.
What color is the car? Short answer: green. How many dogs are there? Two dogs.
Can you point out the person in the image and provide the bounding boxes [[086,540,400,760]]
Grounded Operation:[button] Submit -> CLICK at the box [[212,498,787,564]] Plan: Next Action:
The quick brown fox jumps over the lazy dog 0123456789 ,.;:!?'"()[]{}<>/\\|-_=+*&^%$#@~`
"""


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("tokenizer")
    corpus = d / "corpus.txt"
    corpus.write_text(CORPUS * 20)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        add_dummy_prefix=True, minloglevel=2, num_threads=1)
    corpus.unlink()
    (d / "tokenizer.vocab").unlink()
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from utils.tokenizer import Tokenizer
    return Tokenizer(tokenizer_dir)


def make_checkpoint(path: Path, name: str, seed: int = 0) -> Path:
    from models import build_model, get_config, save_sat_checkpoint
    torch.manual_seed(seed)
    cfg = get_config(name)
    model = build_model(cfg)
    save_sat_checkpoint(model, cfg, path)
    return path


@pytest.fixture(scope="session")
def cogvlm_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-cogvlm", "tiny-test-cogvlm")


@pytest.fixture(scope="session")
def cogagent_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-cogagent", "tiny-test-cogagent", 1)


@pytest.fixture(scope="session")
def image_file(tmp_path_factory) -> Path:
    from PIL import Image, ImageDraw
    p = tmp_path_factory.mktemp("img") / "shapes.png"
    img = Image.new("RGB", (160, 120), (240, 240, 230))
    d = ImageDraw.Draw(img)
    d.ellipse((10, 10, 60, 60), fill=(220, 30, 30))
    d.rectangle((90, 50, 150, 110), fill=(30, 30, 220))
    img.save(p)
    return p
