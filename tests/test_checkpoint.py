"""SAT checkpoint format: exact round trip, released key names, and clear errors."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models import CheckpointError, LoadOptions, ModelNotFound, get_config, load_model, save_sat_checkpoint
from models.checkpoint import checkpoint_files, read_sat_state_dict
from models.config import MODEL_CONFIGS


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _module(ckpt: Path):
    _, files = checkpoint_files(ckpt)
    return files[0], torch.load(files[0], weights_only=True)


@pytest.mark.parametrize("which", ["cogvlm", "cogagent"])
def test_save_load_bit_identical(which, cogvlm_ckpt, cogagent_ckpt, tmp_path):
    ckpt = cogvlm_ckpt if which == "cogvlm" else cogagent_ckpt
    model, cfg = load_model(str(ckpt))
    out = save_sat_checkpoint(model, cfg, tmp_path / "again")
    a, b = read_sat_state_dict(ckpt), read_sat_state_dict(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert json.loads((out / "model_config.json").read_text()) == \
        json.loads((ckpt / "model_config.json").read_text())
    assert (out / "latest").read_text() == "1"


def test_released_key_names(cogvlm_ckpt, cogagent_ckpt):
    vlm = read_sat_state_dict(cogvlm_ckpt)
    for k in ["transformer.word_embeddings.weight", "transformer.final_layernorm.weight",
              "mixins.lm.lm_head.weight", "transformer.layers.1.attention.query_key_value.weight",
              "transformer.layers.0.mlp.dense_h_to_4h.weight", "mixins.mlp.gate_proj.1.weight",
              "mixins.mlp.vision_dense_h_to_4h_list.0.weight", "mixins.mlp.vision_gate_proj.1.weight",
              "mixins.rotary.vision_query_key_value_list.0.weight", "mixins.rotary.vision_dense_list.1.weight",
              "mixins.rotary.rotary_emb.inv_freq",
              "mixins.eva.vit_model.transformer.word_embeddings.weight",
              "mixins.eva.vit_model.transformer.position_embeddings.weight",
              "mixins.eva.vit_model.mixins.patch_embedding.proj.weight",
              "mixins.eva.vit_model.transformer.layers.1.mlp.dense_4h_to_h.bias",
              "mixins.eva.linear_proj.norm1.bias", "mixins.eva.boi", "mixins.eva.eoi"]:
        assert k in vlm, k
    assert not any("cross" in k or "encoder" in k or k == "mixins.eva.pos_embed" for k in vlm)
    agent = read_sat_state_dict(cogagent_ckpt)
    for k in ["transformer.layers.0.cross_attention.key_value.weight",
              "transformer.layers.1.post_cross_attention_layernorm.weight", "mixins.eva.pos_embed",
              "mixins.encoder.pos_embed", "mixins.encoder.vit.model.cls_token",
              "mixins.encoder.vit.model.blocks.2.attn.q_bias", "mixins.encoder.vit.model.blocks.0.mlp.ffn_ln.weight",
              "mixins.encoder.vit.model.blocks.0.attn.rope.freqs_cos", "mixins.encoder.vit.model.rope.freqs_sin",
              "mixins.encoder.vit.model.head.weight", "mixins.encoder.vit.model.norm.bias"]:
        assert k in agent, k
    cfg = get_config("tiny-test-cogagent")
    assert agent["mixins.encoder.vit.model.rope.freqs_cos"].shape == (cfg.cross.num_patches, 16)
    assert agent["mixins.encoder.pos_embed"].shape == (cfg.cross.num_patches, cfg.cross.hidden_size)


def test_wrong_shape_names_key_and_shapes(cogvlm_ckpt, tmp_path):
    ck = _copy(cogvlm_ckpt, tmp_path / "c")
    f, state = _module(ck)
    state["module"]["mixins.eva.boi"] = torch.zeros(1, 1, 7)
    torch.save(state, f)
    with pytest.raises(CheckpointError, match=r"mixins\.eva\.boi has shape \(1, 1, 7\).*\(1, 1, 64\)"):
        load_model(str(ck))


def test_missing_and_extra_keys(cogvlm_ckpt, tmp_path):
    ck = _copy(cogvlm_ckpt, tmp_path / "m")
    f, state = _module(ck)
    del state["module"]["mixins.mlp.vision_gate_proj.1.weight"]
    torch.save(state, f)
    with pytest.raises(CheckpointError, match=r"missing key\(s\): mixins\.mlp\.vision_gate_proj\.1\.weight"):
        load_model(str(ck))
    ck2 = _copy(cogvlm_ckpt, tmp_path / "e")
    f, state = _module(ck2)
    state["module"]["mixins.lora.something"] = torch.zeros(2)
    torch.save(state, f)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\).*mixins\.lora\.something"):
        load_model(str(ck2))


def test_pickle_needing_code_is_refused_then_trusted(cogvlm_ckpt, tmp_path):
    ck = _copy(cogvlm_ckpt, tmp_path / "p")
    f, state = _module(ck)
    state["rng"] = np.random.RandomState(0).get_state()     # as SAT training checkpoints do
    state["args"] = argparse.Namespace(lr=1e-4)              # a Python object, as SAT saves
    torch.save(state, f)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_model(str(ck))
    model, _ = load_model(str(ck), LoadOptions(trust_checkpoint=True))
    assert model is not None


def test_bad_directories(tmp_path, cogvlm_ckpt, monkeypatch):
    monkeypatch.setenv("SAT_HOME", str(tmp_path / "sat_home"))
    with pytest.raises(ModelNotFound, match=r"cogvlm-chat.*not on disk.*sat_home/cogvlm-chat-v1\.1"):
        load_model("cogvlm-chat")                            # alias resolves to the full name
    with pytest.raises(ModelNotFound, match="no such checkpoint directory"):
        load_model(str(tmp_path / "nowhere" / "x"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="neither model_config.json"):
        load_model(str(empty))
    ck = _copy(cogvlm_ckpt, tmp_path / "nolatest")
    (ck / "latest").unlink()
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        load_model(str(ck))
    ck = _copy(cogvlm_ckpt, tmp_path / "trunc")
    f, _ = _module(ck)
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_model(str(ck))
    ck = _copy(cogvlm_ckpt, tmp_path / "badjson")
    (ck / "model_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(str(ck))


def test_sat_home_lookup(cogvlm_ckpt, tmp_path, monkeypatch):
    home = tmp_path / "home"
    _copy(cogvlm_ckpt, home / "cogvlm-grounding-generalist-v1.1")
    monkeypatch.setenv("SAT_HOME", str(home))
    model, cfg = load_model("cogvlm-grounding-generalist")
    assert cfg.model_class == "CogVLMModel"


def test_unknown_config_fields_tolerated(cogvlm_ckpt, tmp_path):
    ck = _copy(cogvlm_ckpt, tmp_path / "x")
    d = json.loads((ck / "model_config.json").read_text())
    d.update({"tokenizer_type": "lmsys/vicuna-7b-v1.5", "some_future_field": [1, 2]})
    (ck / "model_config.json").write_text(json.dumps(d))
    model, cfg = load_model(str(ck))
    assert cfg.extra["some_future_field"] == [1, 2]
    assert cfg.to_sat_json()["tokenizer_type"] == "lmsys/vicuna-7b-v1.5"


def test_loaded_dtype(cogvlm_ckpt):
    model, _ = load_model(str(cogvlm_ckpt), LoadOptions(dtype=torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.rotary.inv_freq.dtype == torch.float32      # derived tables stay fp32


def _count(model, pred):
    return sum(p.numel() for n, p in model.named_parameters() if pred(n))


def _is_language(n):
    return n.startswith(("model.embed_tokens", "model.norm.", "lm_head")) or "language" in n or \
        (n.startswith("model.layers.") and n.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")))


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_full_size_parameter_counts(name):
    """Built on the meta device (no memory). Language = LLaMA-2-7B exactly; totals against
    the released checkpoints' sizes (17.6B / 18.3B, whose names round them down to 17B/18B)."""
    from models import CogVLM
    cfg = get_config(name)
    with torch.device("meta"):
        model = CogVLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    if name.startswith("tiny-test"):
        assert total < 1e6
        return
    if name.startswith("tiny-"):             # the bundled models: both under 40 MB in bf16
        assert total * 2 < 20e6
        return
    lang = _count(model, _is_language)
    assert lang == 6_738_415_616                                 # LLaMA-2-7B, exactly
    eva_e = _count(model, lambda n: n.startswith(("model.vision.patch_embedding", "model.vision.transformer")))
    assert abs(eva_e / 4.4e9 - 1) < 0.03                       # EVA2-CLIP-E minus its last layer
    vision = total - lang
    if cfg.cross is None:
        assert abs(total / 17.6e9 - 1) < 0.03 and abs(vision / 10.9e9 - 1) < 0.03
    else:
        assert abs(total / 18.3e9 - 1) < 0.03 and abs(vision / 11.5e9 - 1) < 0.03
        cross_module = _count(model, lambda n: n.startswith("model.cross_vision.") or ".cross_attn." in n
                              or "post_cross" in n)
        assert abs(cross_module / 646e6 - 1) < 0.03, cross_module   # CogAgent paper: 646M
