"""Shared fixtures: a tiny SentencePiece tokenizer and tiny random checkpoints written to disk
in the released SAT format."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Under pytest-xdist (`make test` runs a worker per core, at most TEST_WORKERS) the workers share
# the cores: each process, and each subprocess it starts, gets its share of threads.
_CORES = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(min(2, _CORES)))
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The entry points' --dtype default is auto (bf16 on CPUs with AMX / AVX-512 BF16); the suite
# compares against fp32 references, so its processes run fp32 unless a test says otherwise.
os.environ.setdefault("COGVLM_DTYPE", "float32")
# The kernel choices measured by the entry points go to a cache of the suite's own, never the
# user's (~/.cache/cogvlm/kernels.json); the Hugging Face cache stays where it was.
os.environ.setdefault("HF_HOME", str(Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface"))
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="cogvlm-test-cache-")
torch.set_num_threads(min(2, _CORES))

from utils.tiny.create_test_model import CORPUS  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from utils.chat.tokenizer import train_sentencepiece
    return train_sentencepiece(CORPUS * 20, tmp_path_factory.mktemp("tokenizer"), vocab_size=400)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from utils.chat.tokenizer import Tokenizer
    return Tokenizer(tokenizer_dir)


def make_checkpoint(path: Path, name: str, seed: int = 0) -> Path:
    """A random model of a named config in the SAT layout, tokenizer/ folder included."""
    from utils.tiny.create_test_model import create
    return create(name, path, seed)


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
