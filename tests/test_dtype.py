"""--dtype on every entry point: auto picks bf16 only where the CPU has fast bf16 (AMX or
AVX-512 BF16) or on CUDA; bf16 answers agree with fp32 on the bundled models; bf16 autocast
training runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("flags,expected", [
    ({"avx2", "avx512f"}, torch.float32),                       # e.g. AMD Zen 3: no fast bf16
    (set(), torch.float32),
    ({"avx512f", "avx512_bf16"}, torch.bfloat16),               # Zen 4, Cooper Lake
    ({"avx512f", "amx_bf16", "amx_int8", "amx_tile"}, torch.bfloat16),   # Sapphire Rapids
])
def test_auto_dtype_follows_the_cpu_flags(flags, expected, monkeypatch, caplog):
    import logging
    from models import machine as loading              # resolve_dtype and cpu_flags live in models/machine.py
    monkeypatch.setattr(loading, "cpu_flags", lambda: flags)
    with caplog.at_level(logging.INFO, logger="models.machine"):
        assert loading.resolve_dtype("auto", "cpu") == expected
    assert "--dtype auto: " + ("bfloat16" if expected == torch.bfloat16 else "float32") in caplog.text
    assert loading.resolve_dtype("auto", "cuda") == torch.bfloat16
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        assert loading.resolve_dtype(name, "cpu") == dt


def test_every_entry_point_takes_dtype(tmp_path):
    env = {**os.environ, "LOGLEVEL": "WARNING", "HF_HUB_OFFLINE": "1"}
    env.pop("COGVLM_DTYPE", None)
    for script in ("basic_demo/cli_demo_sat.py", "basic_demo/cli_demo_hf.py"):
        p = subprocess.run([sys.executable, str(ROOT / script), "--from_pretrained", "tiny-cogvlm", "--dtype",
                            "bfloat16", "--image", str(ROOT / "assets" / "scene.png"), "--query",
                            "How many shapes are there?", "--output_dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=120, cwd="/", env=env)
        assert p.returncode == 0 and p.stdout.strip() == "3", p.stderr
    sys.path.insert(0, str(ROOT / "openai_demo"))
    from basic_demo.web_demo import parse_args as web_args
    from composite_demo.registry import parse as composite_args
    from openai_api import parse_args as server_args
    from utils.training.finetune import add_finetune_args
    from utils.apps.flags import ArgumentParser
    assert web_args(["--dtype", "float16"]).dtype == "float16"
    assert server_args(["--dtype", "bfloat16"]).dtype == "bfloat16"
    assert composite_args(["--dtype", "float32"]).dtype == "float32"
    for parse in (web_args, server_args, composite_args):       # the int4 group size, everywhere
        assert parse(["--quant", "4", "--quant_group", "128"]).quant_group == 128
    p = ArgumentParser()
    add_finetune_args(p, "tiny-cogvlm")
    assert p.parse_args(["--dtype", "bfloat16"]).dtype == "bfloat16"
    assert p.parse_args([]).dtype == os.environ.get("COGVLM_DTYPE", "auto")


_BUNDLED_CASES = [
    ("tiny-cogvlm", "scene.png", ["Describe the image.", "How many shapes are there?",
                                  "What shape is the blue object?", "Describe the image with boxes.",
                                  "What colour is the square?"]),
    ("tiny-cogagent", "gui.png", ['What steps do I need to take to "click the Open button"?(with grounding)',
                                  "Describe the image.", "What does the title say?"])]


def _bundled_answers(dtype, quant=None) -> list:
    from models import LoadOptions, QuantConfig, load_model
    from models.generate import GenerationConfig
    from utils.chat import ImageContext, chat
    from utils.chat.tokenizer import Tokenizer
    out = []
    for name, image, questions in _BUNDLED_CASES:
        model, cfg = load_model(name, LoadOptions(dtype=dtype, quant=QuantConfig(bits=quant)))
        tok = Tokenizer(ROOT / "assets" / "checkpoints" / name / "tokenizer")
        out += [chat(model, tok, q, [], ImageContext(ROOT / "assets" / image, cfg),
                     gen=GenerationConfig(max_new_tokens=64))[0] for q in questions]
    return out


@pytest.fixture(scope="module")
def bf16_answers():
    return _bundled_answers(torch.bfloat16)


def test_bf16_greedy_answers_agree_with_fp32_on_the_bundled_models(bf16_answers):
    """Measured on an AMD EPYC with AVX-512 BF16: 7 of 8 answers identical; the other
    differs in one box coordinate (330 vs 335 thousandths)."""
    fp32 = _bundled_answers(torch.float32)
    same = sum(a == b for a, b in zip(fp32, bf16_answers))
    assert same >= len(fp32) - 2, f"bf16 agrees with fp32 on only {same} of {len(fp32)} answers"


@pytest.mark.parametrize("bits,min_same", [(8, 6), (4, 3)])
def test_quantized_greedy_answers_against_bf16_on_the_bundled_models(bf16_answers, bits, min_same):
    """PyTorch weight-only int8 / int4 (image encoders int8), loaded with --quant, against bf16.
    Measured (AMD EPYC, AVX-512 BF16, bench/quant.py): int8 7 of 8 answers identical (logit
    error 0.9%), int4 6 of 8 (3.2%); bench/RESULTS.md has the random-model figures."""
    q = _bundled_answers(torch.bfloat16, quant=bits)
    same = sum(a == b for a, b in zip(q, bf16_answers))
    assert same >= min_same, f"int{bits} agrees with bf16 on only {same} of {len(q)} answers: {q}"


def test_bf16_autocast_training_step(cogvlm_ckpt, tokenizer, tmp_path):
    """A training step under torch.autocast('cpu', bfloat16) (it failed in expert_linear's
    index_put with mixed dtypes): finite loss, gradients on the fp32 weights."""
    from PIL import Image
    from models import LoadOptions, load_model
    from utils.training.dataset import FinetuneDataset, collate_train
    from utils.training.finetune import compute_loss
    data = tmp_path / "captcha"
    data.mkdir()
    for label in ("ab12", "cd34"):
        Image.new("RGB", (80, 40), (200, 100, 50)).save(data / f"{label}.png")
    model, cfg = load_model(str(cogvlm_ckpt), LoadOptions(cpu_layout=False))
    model.train()
    ds = FinetuneDataset(data, cfg, tokenizer)
    batch = collate_train([ds[0], ds[1]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compute_loss(model, batch, "cpu")
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
