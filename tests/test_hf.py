"""Transformers front end: released HF layout, conversion round trips, agreement with the SAT
front end, generate() with the standard cache and streamers, malformed checkpoints."""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from models import CheckpointError, load_model
from models.checkpoint import read_sat_state_dict
from models.generate import GenerationConfig
from models.hf_io import hf_to_sat, load_hf_model, sat_to_hf
from utils.chat import ImageContext, build_hf_inputs, build_row, chat, collate, prepare
from utils.chat.templates import hf_prompt


@pytest.fixture(scope="module", params=["cogvlm", "cogagent"])
def pair(request, cogvlm_ckpt, cogagent_ckpt, tmp_path_factory):
    sat = cogvlm_ckpt if request.param == "cogvlm" else cogagent_ckpt
    hf = sat_to_hf(sat, tmp_path_factory.mktemp("hf") / request.param, shard_bytes=100_000)
    return sat, hf


def test_round_trip_bit_identical(pair, tmp_path):
    sat, hf = pair
    back = hf_to_sat(hf, tmp_path / "back")
    a, b = read_sat_state_dict(sat), read_sat_state_dict(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((back / "model_config.json").read_text()) == json.loads((sat / "model_config.json").read_text())


def test_hf_layout_is_the_released_one(pair):
    _, hf = pair
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    for k in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.0.self_attn.language_expert_query_key_value.weight",
              "model.layers.1.self_attn.vision_expert_dense.weight",
              "model.layers.0.mlp.vision_mlp.gate_proj.weight", "model.layers.1.mlp.language_mlp.down_proj.weight",
              "model.vision.patch_embedding.cls_embedding", "model.vision.patch_embedding.position_embedding.weight",
              "model.vision.transformer.layers.0.mlp.fc1.weight", "model.vision.linear_proj.norm1.weight",
              "model.vision.boi"]:
        assert k in index, k
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["vision_config"]["num_positions"] == cfg["vision_config"]["num_hidden_layers"] * 0 + \
        (cfg["vision_config"]["image_size"] // 14) ** 2 + 1
    if "cross_image_size" in cfg:
        assert "model.layers.0.cross_attn.key_value.weight" in index
        assert "model.cross_vision.vit.model.blocks.0.attn.q_bias" in index
        assert "model.vision.pos_embed" in index and "model.cross_vision.pos_embed" in index


# HF templates whose prompt is a SAT template's (the original's names differ per front end).
SAT_EQUIVALENT = {"cogvlm": {"base": "base", "chat": "chat_old", "chat_old": "chat_old"},
                  "cogagent": {"base": "base", "chat": "chat"}}


@pytest.mark.parametrize("version", ["base", "chat", "chat_old", "vqa"])
@pytest.mark.parametrize("with_image", [True, False])
def test_logits_agree_with_sat(pair, tokenizer, image_file, version, with_image):
    sat, hf = pair
    ours, cfg = load_model(str(sat))
    theirs = load_hf_model(hf)
    img = ImageContext(image_file, cfg) if with_image else None
    history = [("What is it?", "A circle.")]
    hf_in = build_hf_inputs(theirs, tokenizer, [("And the colour?", history, img)], version)
    # The same prompt through the SAT front end's row builder and model.
    inp = collate([build_row(tokenizer, cfg, hf_prompt("And the colour?", history, version, cfg.cross is not None),
                             with_image)])
    if img is not None:
        inp.image_embeds, inp.cross_kv = img.encode(ours)
    assert torch.equal(hf_in["input_ids"], inp.input_ids)
    sat_version = SAT_EQUIVALENT["cogagent" if cfg.cross else "cogvlm"].get(version)
    if sat_version:
        assert torch.equal(prepare(ours, tokenizer, "And the colour?", history, img, sat_version).input_ids,
                           inp.input_ids)
    with torch.no_grad():
        a = ours(inp)
        b = theirs(**hf_in).logits
    assert (a - b).abs().max() < 1e-4


def test_generate_equals_chat_and_streams(pair, tokenizer, image_file):
    from transformers import TextIteratorStreamer
    sat, hf = pair
    ours, cfg = load_model(str(sat))
    theirs = load_hf_model(hf)
    img = ImageContext(image_file, cfg)
    expected = chat(ours, tokenizer, "Describe the image.", [], img, gen=GenerationConfig(max_new_tokens=12))[0]
    inputs = build_hf_inputs(theirs, tokenizer, [("Describe the image.", [], img)])
    out = theirs.generate(**inputs, max_new_tokens=12, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    new = new[: new.index(cfg.eos_token_id)] if cfg.eos_token_id in new else new
    assert tokenizer.decode(new).rstrip("\ufffd").strip() == expected
    no_cache = theirs.generate(**inputs, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(no_cache, out)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    th = threading.Thread(target=theirs.generate, kwargs=dict(**inputs, max_new_tokens=12, do_sample=False,
                                                              streamer=streamer))
    th.start()
    streamed = "".join(streamer)
    th.join(timeout=60)
    assert streamed.strip().rstrip("\ufffd") == tokenizer.decode(new).strip().rstrip("\ufffd")


def assert_generate_batched_equals_alone(model, tokenizer, reqs, new_tokens: int):
    """HF generate() of the requests left-padded together: each row's greedy tokens as alone
    (up to where the alone answer stopped)."""
    batch = build_hf_inputs(model, tokenizer, reqs)
    out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    T = batch["input_ids"].shape[1]
    for i, r in enumerate(reqs):
        single = build_hf_inputs(model, tokenizer, [r])
        alone = model.generate(**single, max_new_tokens=new_tokens, do_sample=False)[0, single["input_ids"].shape[1]:]
        assert out[i, T:].tolist()[:len(alone)] == alone.tolist(), f"row {i}"


def test_generate_batched_mixed_rows(pair, tokenizer, image_file):
    sat, hf = pair
    reqs = [("Describe the image.", [], image_file), ("A long text-only question, please?", [], None)]
    assert_generate_batched_equals_alone(load_hf_model(hf), tokenizer, reqs, 8)


def test_malformed_hf_checkpoints(pair, tmp_path):
    _, hf = pair
    bad = shutil.copytree(hf, tmp_path / "missing")
    next(bad.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard file.*missing: model-00002"):
        load_hf_model(bad)
    bad = shutil.copytree(hf, tmp_path / "trunc")
    f = next(bad.glob("model-00001-*.safetensors"))
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf_model(bad)
    bad = shutil.copytree(hf, tmp_path / "dtype")
    f = next(bad.glob("model-00001-*.safetensors"))
    from safetensors.torch import load_file, save_file
    t = load_file(str(f))
    k = next(iter(t))
    t[k] = t[k].to(torch.int32)
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match="dtype I32"):
        load_hf_model(bad)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_model(tmp_path)


def test_converter_refuses_overwrite(pair, tmp_path):
    sat, hf = pair
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        sat_to_hf(sat, out)
    assert (out / "keep.txt").exists()


def test_auto_classes(pair):
    from transformers import AutoModelForCausalLM
    _, hf = pair
    m = AutoModelForCausalLM.from_pretrained(hf)
    assert type(m).__name__ in ("CogVLMForCausalLM", "CogAgentForCausalLM")


def test_an_hf_checkpoint_streams_half_layers_like_a_sat_one(tmp_path):
    """The bundled model (bf16 values) written in the released HF layout, sharded, loaded in
    fp32 with every layer `half`: each layer takes its fp16 weight as the shards are read, and
    the logits are the SAT directory's, bit for bit."""
    from models import LoadOptions
    from models.layout import HalfLinear, can_half
    from tests.test_kernels import image_logits
    if not can_half():
        pytest.skip("PyTorch without FBGEMM's fp16-weight linear")
    sat = Path(__file__).resolve().parent.parent / "assets" / "checkpoints" / "tiny-cogvlm"
    hf = sat_to_hf(sat, tmp_path / "hf", shard_bytes=200_000)
    opts = LoadOptions(dtype=torch.float32, kernels="half", deterministic=False)
    a, cfg = load_model(str(sat), opts)
    b, _ = load_model(str(hf), opts)
    halves = [n for n, m in b.named_modules() if isinstance(m, HalfLinear)]
    assert halves and halves == [n for n, m in a.named_modules() if isinstance(m, HalfLinear)]
    assert torch.equal(image_logits(a, cfg), image_logits(b, cfg))
