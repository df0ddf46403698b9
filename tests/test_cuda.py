"""CUDA checks (skipped without a GPU; `bench/gpu_check.sh` runs them on one): the model in
bf16 on the GPU against fp32 on the CPU, greedy answers, bitsandbytes 8/4-bit while loading,
the batch engine."""
from __future__ import annotations

import pytest
import torch

from models import LoadOptions, QuantConfig, load_model
from models.generate import GenerationConfig, ModelInputs
from utils.chat import ImageContext, batch_chat, chat, prepare

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _logits(model, tokenizer, image_file, cfg, device):
    inp = prepare(model, tokenizer, "What is in the image?", [], ImageContext(image_file, cfg))
    with torch.no_grad():
        out = model(ModelInputs(*(t.to(device) for t in (inp.input_ids, inp.position_ids, inp.vision_mask,
                                                         inp.image_mask)),
                                image_embeds=inp.image_embeds.to(device),
                                cross_kv=None if inp.cross_kv is None else
                                [tuple(t.to(device) for t in kv) for kv in inp.cross_kv]))
    return out[0, -1].float().cpu()


@pytest.mark.parametrize("which", ["cogvlm", "cogagent"])
def test_bf16_on_cuda_matches_fp32_on_cpu(which, cogvlm_ckpt, cogagent_ckpt, tokenizer, image_file):
    ckpt = cogvlm_ckpt if which == "cogvlm" else cogagent_ckpt
    cpu, cfg = load_model(str(ckpt))
    gpu, _ = load_model(str(ckpt), LoadOptions(device="cuda", dtype=torch.bfloat16))
    a, b = _logits(cpu, tokenizer, image_file, cfg, "cpu"), _logits(gpu, tokenizer, image_file, cfg, "cuda")
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    gen = GenerationConfig(max_new_tokens=8)
    answer = chat(gpu, tokenizer, "Describe it.", [], image_file, gen=gen)[0]
    assert isinstance(answer, str)


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_quantized_while_loading_on_cuda(bits, cogagent_ckpt, tokenizer, image_file):
    pytest.importorskip("bitsandbytes")
    torch.cuda.reset_peak_memory_stats()
    model, cfg = load_model(str(cogagent_ckpt), LoadOptions(device="cuda", dtype=torch.bfloat16, quant=QuantConfig(bits=bits)))
    ref, _ = load_model(str(cogagent_ckpt), LoadOptions(device="cuda", dtype=torch.bfloat16))
    a = _logits(ref, tokenizer, image_file, cfg, "cuda")
    b = _logits(model, tokenizer, image_file, cfg, "cuda")
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > (0.98 if bits == 8 else 0.9)
    chat(model, tokenizer, "hi", [], image_file, gen=GenerationConfig(max_new_tokens=4))


def test_batch_on_cuda_equals_rows_alone(cogvlm_ckpt, tokenizer, image_file):
    model, _ = load_model(str(cogvlm_ckpt), LoadOptions(device="cuda", dtype=torch.float32))
    gen = GenerationConfig(max_new_tokens=6)
    rows = [("Describe it.", [], image_file), ("hello", [], None)]
    together = batch_chat(model, tokenizer, rows, gen=gen)
    alone = [chat(model, tokenizer, q, h, img, gen=gen)[0] for q, h, img in rows]
    assert together == alone
