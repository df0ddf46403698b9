"""4- and 8-bit quantization (bitsandbytes) on CPU, both front ends, CogVLM and CogAgent."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from models import build_model, get_config, load_model, save_sat_checkpoint
from models.generate import GenerationConfig
from models.quantize import quantize, weight_bytes
from utils.chat import ImageContext, chat, prepare

pytest.importorskip("bitsandbytes")


def _config(which):
    # Proportions like the released models: the decoder holds nearly all the weights.
    base = get_config("tiny-test-cogvlm" if which == "cogvlm" else "tiny-test-cogagent")
    return dataclasses.replace(base, num_layers=4, hidden_size=256, num_attention_heads=4,
                               inner_hidden_size=688)


@pytest.fixture(scope="module", params=["cogvlm", "cogagent"])
def ckpt(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = _config(request.param)
    d = tmp_path_factory.mktemp("q") / request.param
    save_sat_checkpoint(build_model(cfg), cfg, d)
    return d


@pytest.mark.parametrize("bits,limit,min_cos", [(8, 0.55, 0.99), (4, 0.35, 0.9)])
def test_quantized_sat_model(ckpt, tokenizer, image_file, bits, limit, min_cos):
    ref, cfg = load_model(str(ckpt), dtype=torch.bfloat16)
    model, _ = load_model(str(ckpt), dtype=torch.bfloat16)
    bf16_bytes = weight_bytes(model)
    quantize(model, bits)
    ratio = weight_bytes(model) / bf16_bytes
    assert ratio < limit, ratio
    img = ImageContext(image_file, cfg)
    inp = prepare(ref, tokenizer, "What is in the image?", [], img)
    with torch.no_grad():
        a = ref(inp.input_ids, inp.position_ids, inp.vision_mask, image_embeds=inp.image_embeds,
                image_mask=inp.image_mask, cross_kv=inp.cross_kv)[0, -1].float()
        qi = prepare(model, tokenizer, "What is in the image?", [], ImageContext(image_file, cfg))
        b = model(qi.input_ids, qi.position_ids, qi.vision_mask, image_embeds=qi.image_embeds,
                  image_mask=qi.image_mask, cross_kv=qi.cross_kv)[0, -1].float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0)
    assert cos > min_cos, float(cos)
    answer, _, _ = chat(model, tokenizer, "Describe it.", [], image_file, gen=GenerationConfig(max_new_tokens=6))
    assert isinstance(answer, str)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_fp32_and_hf(ckpt, tokenizer, image_file, bits, tmp_path):
    from models.hf_io import load_hf_model, sat_to_hf
    model, cfg = load_model(str(ckpt))                 # fp32: any load dtype works
    quantize(model, bits)
    chat(model, tokenizer, "hi", [], image_file, gen=GenerationConfig(max_new_tokens=4))
    hf = load_hf_model(sat_to_hf(ckpt, tmp_path / "hf"), dtype=torch.bfloat16)
    quantize(hf, bits)
    from utils.chat import build_hf_inputs
    out = hf.generate(**build_hf_inputs(hf, tokenizer, [("hi", [], image_file)]), max_new_tokens=4,
                      do_sample=False)
    assert out.shape[1] > 4


def test_bad_bits(ckpt):
    model, _ = load_model(str(ckpt))
    with pytest.raises(ValueError, match="4 or 8"):
        quantize(model, 3)
