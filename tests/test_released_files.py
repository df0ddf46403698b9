"""Released files as the original code wrote them: the HF key set with its derived buffers,
each front end's prompt template taken from the checkpoint, CogAgent sizes taken from the
checkpoint, and the HF API (hidden states, positions of padded rows).

Every file here is laid out by this test from the released formats' documented layout (key names,
shapes, config fields), never by our converter, and read through the real loaders and scripts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models import CheckpointError, load_model
from models.generate import ModelInputs
from models.hf_io import hf_to_sat, load_hf_model, sat_to_hf

ROOT = Path(__file__).resolve().parent.parent

# Tiny sizes. The CogAgent one has a non-released high-res branch: width 24, 3 blocks, head
# size 12, cross attention 4 heads of 8 (the released code: inner = LM heads x per-head size).
LM = dict(V=400, H=64, heads=4, layers=2, I=128)
EVA = dict(E=32, eheads=2, elayers=2, EI=64)
COGVLM = dict(LM, **EVA, px=56)                                   # 16 image tokens
COGAGENT = dict(LM, **EVA, px=28, W=24, blocks=3, head=12, MI=40, hpx=56, head_out=16, chd=8)
# With the released head size (64) the original's config.json describes the branch fully.
COGAGENT_HF = dict(COGAGENT, W=128, head=64)


def patches(px):
    return (px // 14) ** 2


# ---------------------------------------------------------------- the original's layouts
def hf_layout(d: dict, rope_copies: str = "once") -> dict:
    """key -> shape of a file written by the original remote code's save_pretrained
    (as the original wrote it): weights, `rotary_emb.inv_freq` in every layer, and for
    CogAgent the rope tables (once, per block too, or not at all)."""
    H, I, E, EI = d["H"], d["I"], d["E"], d["EI"]
    k = {"model.embed_tokens.weight": (d["V"], H), "model.norm.weight": (H,), "lm_head.weight": (d["V"], H)}
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        k.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                  p + "self_attn.rotary_emb.inv_freq": (H // d["heads"] // 2,)})
        for e in ("language", "vision"):
            k[p + f"self_attn.{e}_expert_query_key_value.weight"] = (3 * H, H)
            k[p + f"self_attn.{e}_expert_dense.weight"] = (H, H)
            k.update({p + f"mlp.{e}_mlp.gate_proj.weight": (I, H), p + f"mlp.{e}_mlp.up_proj.weight": (I, H),
                      p + f"mlp.{e}_mlp.down_proj.weight": (H, I)})
        if "W" in d:
            C = d["heads"] * d["chd"]
            k.update({p + "post_cross_attention_layernorm.weight": (H,), p + "cross_attn.query.weight": (C, H),
                      p + "cross_attn.key_value.weight": (2 * C, d["W"]), p + "cross_attn.dense.weight": (H, C)})
    v = "model.vision."
    n = patches(d["px"])
    k.update({v + "patch_embedding.proj.weight": (E, 3, 14, 14), v + "patch_embedding.proj.bias": (E,),
              v + "patch_embedding.cls_embedding": (1, E), v + "patch_embedding.position_embedding.weight": (n + 1, E),
              v + "linear_proj.linear_proj.weight": (H, E), v + "linear_proj.norm1.weight": (H,),
              v + "linear_proj.norm1.bias": (H,), v + "linear_proj.dense_h_to_4h.weight": (I, H),
              v + "linear_proj.gate_proj.weight": (I, H), v + "linear_proj.dense_4h_to_h.weight": (H, I),
              v + "boi": (1, 1, H), v + "eoi": (1, 1, H)})
    for j in range(d["elayers"]):
        p = f"{v}transformer.layers.{j}."
        for name, shape in (("input_layernorm", (E,)), ("post_attention_layernorm", (E,)),
                            ("attention.query_key_value", (3 * E, E)), ("attention.dense", (E, E)),
                            ("mlp.fc1", (EI, E)), ("mlp.fc2", (E, EI))):
            k[p + name + ".weight"], k[p + name + ".bias"] = shape, shape[:1]
    if "W" in d:
        k[v + "pos_embed"] = (n, E)
        k.update(cross_layout(d, "model.cross_vision.", rope_copies))
    return k


def cross_layout(d: dict, prefix: str, rope_copies: str) -> dict:
    """CogAgent's EVA2-CLIP-L (timm names, as released)."""
    W, MI, m = d["W"], d["MI"], patches(d["hpx"])
    vit = prefix + "vit.model."
    k = {prefix + "pos_embed": (m, W), vit + "cls_token": (1, 1, W), vit + "pos_embed": (1, m + 1, W),
         vit + "patch_embed.proj.weight": (W, 3, 14, 14), vit + "patch_embed.proj.bias": (W,),
         vit + "norm.weight": (W,), vit + "norm.bias": (W,), vit + "head.weight": (d["head_out"], W),
         vit + "head.bias": (d["head_out"],)}
    rope = {"freqs_cos": (m, d["head"]), "freqs_sin": (m, d["head"])}
    if rope_copies in ("once", "per_block"):
        k.update({vit + "rope." + r: s for r, s in rope.items()})
    for j in range(d["blocks"]):
        p = f"{vit}blocks.{j}."
        k.update({p + "attn.q_proj.weight": (W, W), p + "attn.k_proj.weight": (W, W), p + "attn.v_proj.weight": (W, W),
                  p + "attn.q_bias": (W,), p + "attn.v_bias": (W,), p + "mlp.w1.weight": (MI, W), p + "mlp.w1.bias": (MI,),
                  p + "mlp.w2.weight": (MI, W), p + "mlp.w2.bias": (MI,), p + "mlp.w3.weight": (W, MI),
                  p + "mlp.w3.bias": (W,)})
        for ln, width in (("norm1", W), ("norm2", W), ("attn.inner_attn_ln", W), ("mlp.ffn_ln", MI)):
            k[p + ln + ".weight"], k[p + ln + ".bias"] = (width,), (width,)
        k[p + "attn.proj.weight"], k[p + "attn.proj.bias"] = (W, W), (W,)
        if rope_copies == "per_block":
            k.update({p + "attn.rope." + r: s for r, s in rope.items()})
    return k


def sat_layout(d: dict) -> dict:
    """key -> shape of a released SAT checkpoint (as released), without the derived
    rotary buffer of the language model (optional) and with CogAgent's rope tables per block
    and once more, as SAT saves them."""
    H, I, E, EI = d["H"], d["I"], d["E"], d["EI"]
    k = {"transformer.word_embeddings.weight": (d["V"], H), "transformer.final_layernorm.weight": (H,),
         "mixins.lm.lm_head.weight": (d["V"], H)}
    for i in range(d["layers"]):
        t = f"transformer.layers.{i}."
        k.update({t + "input_layernorm.weight": (H,), t + "post_attention_layernorm.weight": (H,),
                  t + "attention.query_key_value.weight": (3 * H, H), t + "attention.dense.weight": (H, H),
                  t + "mlp.dense_h_to_4h.weight": (I, H), t + "mlp.dense_4h_to_h.weight": (H, I),
                  f"mixins.mlp.gate_proj.{i}.weight": (I, H), f"mixins.mlp.vision_dense_h_to_4h_list.{i}.weight": (I, H),
                  f"mixins.mlp.vision_dense_4h_to_h_list.{i}.weight": (H, I),
                  f"mixins.mlp.vision_gate_proj.{i}.weight": (I, H),
                  f"mixins.rotary.vision_query_key_value_list.{i}.weight": (3 * H, H),
                  f"mixins.rotary.vision_dense_list.{i}.weight": (H, H)})
        if "W" in d:
            C = d["heads"] * d["chd"]
            k.update({t + "post_cross_attention_layernorm.weight": (H,), t + "cross_attention.query.weight": (C, H),
                      t + "cross_attention.key_value.weight": (2 * C, d["W"]), t + "cross_attention.dense.weight": (H, C)})
    e = "mixins.eva.vit_model."
    n = patches(d["px"])
    k.update({e + "transformer.word_embeddings.weight": (1, E), e + "transformer.position_embeddings.weight": (n + 1, E),
              e + "mixins.patch_embedding.proj.weight": (E, 3, 14, 14), e + "mixins.patch_embedding.proj.bias": (E,),
              "mixins.eva.linear_proj.linear_proj.weight": (H, E), "mixins.eva.linear_proj.norm1.weight": (H,),
              "mixins.eva.linear_proj.norm1.bias": (H,), "mixins.eva.linear_proj.dense_h_to_4h.weight": (I, H),
              "mixins.eva.linear_proj.gate_proj.weight": (I, H), "mixins.eva.linear_proj.dense_4h_to_h.weight": (H, I),
              "mixins.eva.boi": (1, 1, H), "mixins.eva.eoi": (1, 1, H)})
    for j in range(d["elayers"]):
        p = f"{e}transformer.layers.{j}."
        for name, shape in (("input_layernorm", (E,)), ("post_attention_layernorm", (E,)),
                            ("attention.query_key_value", (3 * E, E)), ("attention.dense", (E, E)),
                            ("mlp.dense_h_to_4h", (EI, E)), ("mlp.dense_4h_to_h", (E, EI))):
            k[p + name + ".weight"], k[p + name + ".bias"] = shape, shape[:1]
    if "W" in d:
        k["mixins.eva.pos_embed"] = (n, E)
        k.update(cross_layout(d, "mixins.encoder.", "per_block"))
    return k


def random_tensors(layout: dict, dtype=torch.float32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout.items():
        if key.endswith(("norm.weight", "layernorm.weight", "norm1.weight", "norm2.weight", "_ln.weight")):
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=g) * 0.02
        out[key] = t.to(dtype)
    return out


def hf_config(d: dict, template: str) -> dict:
    """config.json as the original remote code wrote it (no model_type; CogAgent adds the
    cross sizes; nothing about the high-res encoder's depth or width beyond those)."""
    cfg = {"architectures": ["CogAgentForCausalLM" if "W" in d else "CogVLMForCausalLM"],
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
           "hidden_size": d["H"], "initializer_range": 0.02, "intermediate_size": d["I"],
           "max_position_embeddings": 512, "num_attention_heads": d["heads"], "num_hidden_layers": d["layers"],
           "rms_norm_eps": 1e-5, "template_version": template, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", "transformers_version": "4.35.0", "use_cache": True, "vocab_size": d["V"],
           "vision_config": {"dropout_prob": 0.0, "hidden_act": "gelu", "hidden_size": d["E"],
                             "image_size": d["px"], "in_channels": 3, "intermediate_size": d["EI"],
                             "layer_norm_eps": 1e-6, "num_heads": d["eheads"], "num_hidden_layers": d["elayers"],
                             "num_positions": patches(d["px"]) + 1, "patch_size": 14}}
    if "W" in d:
        assert d["head"] == 64, "the original's config.json has no field for another head size"
        cfg.update(cross_hidden_size=d["W"], cross_compute_hidden_size=d["heads"] * d["chd"],
                   cross_image_size=d["hpx"])
    return cfg


def sat_config(d: dict, **extra) -> dict:
    """model_config.json with the fields SAT writes."""
    cfg = {"model_class": "CogAgentModel" if "W" in d else "CogVLMModel", "num_layers": d["layers"],
           "hidden_size": d["H"], "num_attention_heads": d["heads"], "vocab_size": d["V"],
           "inner_hidden_size": d["I"], "layernorm_order": "pre", "use_bias": False,
           "max_sequence_length": 512, "model_parallel_size": 1, "image_length": patches(d["px"]),
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "skip_init": True,
           "eva_args": {"model_class": "EVA2CLIPModel", "num_layers": d["elayers"], "hidden_size": d["E"],
                        "num_attention_heads": d["eheads"], "vocab_size": 1, "layernorm_order": "post",
                        "model_parallel_size": 1, "max_sequence_length": patches(d["px"]) + 1,
                        "inner_hidden_size": d["EI"], "use_final_layernorm": False, "layernorm_epsilon": 1e-6,
                        "image_size": [d["px"], d["px"]], "pre_len": 1, "post_len": 0, "in_channels": 3,
                        "num_classes": 0, "patch_size": 14}}
    if "W" in d:
        cfg.update(is_decoder=[True] * d["layers"], cross_attn_hidden_size=d["W"],
                   cross_hidden_size_per_attention_head=d["chd"], cross_image_pix=d["hpx"])
    cfg.update(extra)
    return cfg


def write_hf(path: Path, d: dict, template: str, rope_copies: str = "once", derived: bool = True) -> Path:
    layout = hf_layout(d, rope_copies)
    if not derived:
        layout = {k: s for k, s in layout.items() if "inv_freq" not in k and "freqs_" not in k}
    tensors = random_tensors(layout, torch.bfloat16)
    path.mkdir(parents=True)
    keys = sorted(tensors)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(hf_config(d, template)))
    return path


def write_sat(path: Path, d: dict, **config) -> Path:
    (path / "1").mkdir(parents=True)
    torch.save({"module": random_tensors(sat_layout(d), seed=1)}, path / "1" / "mp_rank_00_model_states.pt")
    (path / "latest").write_text("1")
    (path / "model_config.json").write_text(json.dumps(sat_config(d, **config)))
    return path


def text_row(model, ids):
    ids = torch.tensor([ids])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids))


KINDS = {"cogvlm": COGVLM, "cogagent": COGAGENT_HF}


# ---------------------------------------------------------------- 1. derived buffers
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rope_copies", ["once", "per_block", "absent"])
def test_hf_files_of_the_original_load(kind, rope_copies, tmp_path):
    d = KINDS[kind]
    path = write_hf(tmp_path / kind, d, "chat", rope_copies, derived=rope_copies != "absent")
    model = load_hf_model(path)
    inv = model.model.rotary.inv_freq
    head = d["H"] // d["heads"]
    assert torch.equal(inv, 1.0 / 10000 ** (torch.arange(0, head, 2).float() / head))   # regenerated, fp32
    logits = text_row(model, [1, 5, 6, 7]).logits
    assert logits.shape == (1, 4, d["V"]) and torch.isfinite(logits).all()


def test_hf_derived_buffer_of_the_wrong_shape_is_named(tmp_path):
    path = write_hf(tmp_path / "c", COGVLM, "chat")
    f = path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.1.self_attn.rotary_emb.inv_freq"]
    from safetensors.torch import load_file
    t = load_file(str(f))
    t["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.zeros(3)
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.rotary_emb\.inv_freq has shape \(3,\), expected \(8,\)"):
        load_hf_model(path)


@pytest.mark.parametrize("kind", KINDS)
def test_sat2hf_writes_the_original_key_set_and_hf2sat_reads_it(kind, tmp_path):
    d = KINDS[kind]
    sat = write_sat(tmp_path / "sat", d)
    hf = sat_to_hf(sat, tmp_path / "hf", shard_bytes=50_000)
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(hf_layout(d, "once"))
    # The other way: a file set of the original (per-block rope copies, bf16) -> SAT -> load.
    orig = write_hf(tmp_path / "orig", d, "chat", "per_block")
    back = hf_to_sat(orig, tmp_path / "back")
    ours, _ = load_model(str(back))
    theirs = load_hf_model(orig, dtype=torch.float32)
    ids = [1, 9, 8, 7, 6]
    a = ours(ModelInputs(torch.tensor([ids]), torch.arange(5)[None]))
    assert (a - text_row(theirs, ids).logits).abs().max() < 1e-5


def test_cli_demo_hf_on_the_original_files(tmp_path, tokenizer_dir, image_file):
    path = write_hf(tmp_path / "agent", COGAGENT_HF, "chat")
    env = {**os.environ, "LOGLEVEL": "WARNING", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "basic_demo" / "cli_demo_hf.py"), "--from_pretrained", str(path),
                        "--local_tokenizer", str(tokenizer_dir), "--image", str(image_file), "--query", "Describe it.",
                        "--max_new_tokens", "4", "--output_dir", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120, cwd="/", env=env)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr


# ---------------------------------------------------------------- 2. templates
# The original HF code: `<s>`, every image slot (pad id, token type 1), then the template text
# tokenized whole without special tokens. Texts from the original's behaviour / the issue.
HF_TEXT = {
    "cogvlm": {"base": "{q}", "chat": "Question: {q} Answer:", "vqa": "Question: {q} Short answer:"},
    "cogagent": {"base": "{q}", "chat": " [INST] {q} [/INST] ", "chat_old": "<EOI>Question: {q} Answer:",
                 "vqa": "<EOI>Question: {q} Short answer:"},
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tmpl")
    return {kind: load_hf_model(write_hf(root / kind, d, "chat")) for kind, d in KINDS.items()}


@pytest.mark.parametrize("kind,version", [(k, v) for k in HF_TEXT for v in HF_TEXT[k]])
def test_hf_front_end_ids_are_the_originals(kind, version, hf_models, tokenizer, image_file):
    from utils.chat import build_hf_inputs
    model, q = hf_models[kind], "What is the red shape?"
    slots = patches(KINDS[kind]["px"]) + 2
    text_ids = tokenizer.sp.encode(HF_TEXT[kind][version].format(q=q))
    inputs = build_hf_inputs(model, tokenizer, [(q, [], image_file)], version)
    assert inputs["input_ids"][0].tolist() == [1] + [0] * slots + text_ids
    assert inputs["token_type_ids"][0].tolist() == [0] + [1] * slots + [0] * len(text_ids)
    text_only = build_hf_inputs(model, tokenizer, [(q, [], None)], version)
    assert text_only["input_ids"][0].tolist() == [1] + text_ids


def test_hf_template_comes_from_config_json(tmp_path, tokenizer):
    from utils.chat import build_hf_inputs
    q = "Where is the button?"
    for kind, template in (("cogvlm", "base"), ("cogvlm", "vqa"), ("cogagent", "vqa"), ("cogagent", "chat_old")):
        model = load_hf_model(write_hf(tmp_path / f"{kind}-{template}", KINDS[kind], template))
        ids = build_hf_inputs(model, tokenizer, [(q, [], None)])["input_ids"][0].tolist()
        assert ids == [1] + tokenizer.sp.encode(HF_TEXT[kind][template].format(q=q)), (kind, template)
        forced = build_hf_inputs(model, tokenizer, [(q, [], None)], "base")["input_ids"][0].tolist()
        assert forced == [1] + tokenizer.sp.encode(q)                      # --version wins
    # CogVLM-HF chat with history: "Question: q Answer: a\nQuestion: q2 Answer:"
    model = load_hf_model(tmp_path / "cogvlm-base")
    ids = build_hf_inputs(model, tokenizer, [("And its colour?", [("What is it?", "A circle.")], None)], "chat")
    assert ids["input_ids"][0].tolist() == [1] + tokenizer.sp.encode(
        "Question: What is it? Answer: A circle.\nQuestion: And its colour? Answer:")


def test_sat_template_comes_from_model_config_then_the_model_table(tmp_path, tokenizer, image_file):
    from utils.chat import ImageContext, prepare
    # A released directory name whose config names no template: the table's (grounding: base).
    model, cfg = load_model(str(write_sat(tmp_path / "cogvlm-grounding-generalist-v1.1", COGVLM)))
    assert cfg.version == "base"
    model, cfg = load_model(str(write_sat(tmp_path / "mine", COGVLM, text_processor_version="vqa")))
    assert cfg.version == "vqa"
    # SAT-side CogAgent keeps SAT's templates: `<EOI>` is the image mark there.
    agent, acfg = load_model(str(write_sat(tmp_path / "cogagent-vqa", COGAGENT,
                                           cross_encoder_args={"head_dim": 12})))
    assert acfg.version == "chat_old"
    inp = prepare(agent, tokenizer, "What is it?", [], ImageContext(image_file, acfg))
    slots = patches(COGAGENT["px"]) + 2
    assert inp.input_ids[0].tolist() == [1] + [0] * slots + tokenizer.sp.encode("Question: What is it? Answer:")


# ---------------------------------------------------------------- 3. CogAgent sizes
def test_cogagent_sizes_come_from_the_checkpoint(tmp_path, image_file, tokenizer):
    from utils.chat import ImageContext, chat
    from models.generate import GenerationConfig
    path = write_sat(tmp_path / "agent", COGAGENT, cross_encoder_args={"head_dim": 12})
    model, cfg = load_model(str(path))
    c = cfg.cross
    assert (c.hidden_size, c.num_layers, c.num_attention_heads, c.inner_hidden_size, c.image_size) == (24, 3, 2, 40, 56)
    assert (c.attn_hidden_size, c.attn_head_dim, c.head_out_dim) == (32, 8, 16)
    answer, _, _ = chat(model, tokenizer, "What is it?", [], ImageContext(image_file, cfg),
                        gen=GenerationConfig(max_new_tokens=3))
    assert isinstance(answer, str)
    # Head size not stated: the released 64 does not divide 24, and the error says so.
    bad = write_sat(tmp_path / "bad", COGAGENT)
    with pytest.raises(CheckpointError, match=r"width 24 is not a multiple of its head size 64"):
        load_model(str(bad))


# ---------------------------------------------------------------- 4. HF API
def test_output_hidden_states(hf_models):
    model = hf_models["cogvlm"]
    ids = torch.tensor([[1, 11, 12, 13]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        plain = model(input_ids=ids)
    hs = out.hidden_states
    assert plain.hidden_states is None
    assert len(hs) == COGVLM["layers"] + 1 and all(h.shape == (1, 4, COGVLM["H"]) for h in hs)
    assert torch.equal(hs[0], model.model.embed_tokens(ids))
    assert torch.allclose(model.lm_head(hs[-1]), out.logits)


def test_left_padded_positions_are_the_originals(hf_models, tokenizer, image_file):
    from models.hf import masks_from_token_types
    from utils.chat import build_hf_inputs
    model = hf_models["cogvlm"]
    reqs = [("Describe the image in a few words, please.", [], image_file), ("Hi", [], image_file)]
    inputs = build_hf_inputs(model, tokenizer, reqs)
    L = patches(COGVLM["px"])
    long_text = len(inputs["input_ids"][0]) - (L + 3)
    short_text = len(tokenizer.sp.encode(HF_TEXT["cogvlm"]["chat"].format(q="Hi")))
    pad = long_text - short_text
    # Row without padding: <s> 0, boi 1, patches 2, eoi 3, text 4...
    assert masks_from_token_types(inputs["token_type_ids"], inputs["attention_mask"])[2][0].tolist() == \
        [0, 1] + [2] * L + [3] + list(range(4, 4 + long_text))
    # Left-padded row: every pad 0, <s> 1, boi 2, patches 3, eoi 4, text 5...
    expected = [0] * pad + [1, 2] + [3] * L + [4] + list(range(5, 5 + short_text))
    assert masks_from_token_types(inputs["token_type_ids"], inputs["attention_mask"])[2][1].tolist() == expected
    with torch.no_grad():
        implicit = model(**inputs).logits
        explicit = model(**inputs, position_ids=torch.tensor(
            [[0, 1] + [2] * L + [3] + list(range(4, 4 + long_text)), expected])).logits
    assert torch.equal(implicit, explicit)


# ---------------------------------------------------------------- both formats everywhere
def test_every_entry_point_takes_both_formats(cogvlm_ckpt, tmp_path, image_file):
    """--from_pretrained takes a SAT or an HF directory in both CLIs and the server: the same
    greedy answer from either."""
    import httpx
    from tests.test_hostile import post, start_server, user
    from tests.test_openai_api import png_url
    hf = sat_to_hf(cogvlm_ckpt, tmp_path / "hf")
    env = {**os.environ, "LOGLEVEL": "WARNING", "HF_HUB_OFFLINE": "1"}

    def cli(script, ckpt):
        p = subprocess.run([sys.executable, str(ROOT / "basic_demo" / script), "--from_pretrained", str(ckpt),
                            "--image", str(image_file), "--query", "What is it?", "--max_new_tokens", "6",
                            "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                           cwd="/", env=env)
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()
    answers = {cli(s, c) for s in ("cli_demo_sat.py", "cli_demo_hf.py") for c in (cogvlm_ckpt, hf)}
    assert len(answers) == 1, answers
    got = []
    for ckpt in (cogvlm_ckpt, hf):
        url, proc = start_server(ckpt, tmp_path / f"log-{ckpt.name}")
        try:
            code, js = post(url, {**user("What is it?", png_url()), "max_tokens": 6, "temperature": 0})
            assert code == 200, js
            got.append(js["choices"][0]["message"]["content"])
            assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer test-key-123"}).status_code == 200
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    assert got[0] == got[1]
