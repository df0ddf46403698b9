"""Model core: math against the naive reference, KV cache, routing, positions, CogAgent's
once-per-image encoders, generation budget and streaming."""
from __future__ import annotations

import pytest
import torch

from models import load_model
from models.checkpoint import read_sat_state_dict
from models.generate import GenerationConfig, ModelInputs, PromptTooLong, generate_tokens
from tests import reference
from utils.chat import ImageContext, build_row, chat, prepare, stream_text
from utils.chat.templates import build_prompt


def _inputs(model, tokenizer, image_file, query="What is in the image?", history=()):
    img = ImageContext(image_file, model.config) if image_file else None
    return prepare(model, tokenizer, query, history, img), img


@pytest.mark.parametrize("which", ["cogvlm", "cogagent"])
def test_matches_naive_reference(which, cogvlm_ckpt, cogagent_ckpt, tokenizer, image_file):
    ckpt = cogvlm_ckpt if which == "cogvlm" else cogagent_ckpt
    model, cfg = load_model(str(ckpt))
    sd = read_sat_state_dict(ckpt)
    inputs, img = _inputs(model, tokenizer, image_file)
    with torch.no_grad():
        ours = model(inputs)[0]
        emb = reference.eva_e(sd, cfg, img.low)
        cross = reference.eva_l(sd, cfg, img.high) if cfg.cross else None
        text_ids = inputs.input_ids[0, cfg.image_length + 3:].tolist()
        ref = reference.lm(sd, cfg, text_ids, emb, cross)
        # text only
        ours_t = model(prepare(model, tokenizer, "Describe it."))[0]
        ref_t = reference.lm(sd, cfg, prepare(model, tokenizer, "Describe it.").input_ids[0, 1:].tolist())
    assert (ours - ref).abs().max() < 1e-4
    assert (ours_t - ref_t).abs().max() < 1e-4


@pytest.mark.parametrize("which", ["cogvlm", "cogagent"])
def test_cached_decoding_equals_full_forward(which, cogvlm_ckpt, cogagent_ckpt, tokenizer, image_file):
    model, cfg = load_model(str(cogvlm_ckpt if which == "cogvlm" else cogagent_ckpt))
    inputs, _ = _inputs(model, tokenizer, image_file)
    gen = GenerationConfig(max_new_tokens=12)
    steps = [], []
    # Greedy with the cache, recording each step's logits through the sampler input.
    import models.generate as G
    real_sample = G.sample
    def spy(logits, g, generator=None):
        steps[0].append(logits.clone())
        return real_sample(logits, g, generator)
    G.sample = spy
    try:
        cached = [int(t) for t in generate_tokens(model, inputs, gen, eos_token_id=-1, max_new_tokens=12)]
    finally:
        G.sample = real_sample
    # Greedy without a cache: the whole sequence re-run at every step.
    ids, pos, vis, slots = (inputs.input_ids, inputs.position_ids, inputs.vision_mask, inputs.image_mask)
    full = []
    with torch.no_grad():
        for _ in range(12):
            logits = model(ModelInputs(ids, pos, vis, slots, image_embeds=inputs.image_embeds,
                                       cross_kv=inputs.cross_kv))[:, -1]
            steps[1].append(logits)
            nxt = logits.argmax(-1)
            full.append(int(nxt))
            ids = torch.cat([ids, nxt[:, None]], 1)
            pos = torch.cat([pos, pos[:, -1:] + 1], 1)
            vis = torch.cat([vis, torch.zeros_like(vis[:, :1])], 1)
            slots = torch.cat([slots, torch.zeros_like(slots[:, :1])], 1)
    assert cached == full
    diff = max(float((a - b).abs().max()) for a, b in zip(*steps))
    assert diff < 1e-4, diff


def test_positions_and_masks(tokenizer):
    from models import get_config
    cfg = get_config("tiny-test-cogvlm")
    L = cfg.image_length
    row = build_row(tokenizer, cfg, build_prompt("hi", (), "chat_old"), has_image=True)
    assert row.positions[: L + 4] == [0, 1] + [2] * L + [3] + [4]
    # L+2 slots take only 3 positions: last = (len - 1) - (L + 2) + 3
    assert row.positions[-1] == len(row) - L
    assert row.vision == [False] + [True] * (L + 1) + [False] * (len(row) - L - 2)
    assert row.image_slots == [False] + [True] * (L + 2) + [False] * (len(row) - L - 3)
    text = build_row(tokenizer, cfg, build_prompt("hi", (), "chat_old"), has_image=False)
    assert text.positions == list(range(len(text))) and not any(text.vision)
    assert text.ids[1:] == row.ids[L + 3:]


def test_templates_exact():
    h = [("q1", "a1")]
    assert build_prompt("Q", h, "base") == "<EOI>Q"
    assert build_prompt("Q", h, "chat") == "<EOI> [INST] q1 [/INST] a1 [INST] Q [/INST] "
    assert build_prompt("Q", (), "chat") == "<EOI> [INST] Q [/INST] "
    assert build_prompt("Q", h, "chat_old") == "<EOI>Question: q1 Answer: a1\nQuestion: Q Answer:"
    assert build_prompt("Q", h, "vqa") == "<EOI>Question: Q Short answer:"
    with pytest.raises(ValueError, match="unknown --version"):
        build_prompt("Q", (), "nope")


def test_legacy_tokenization(tokenizer, tokenizer_dir):
    """Each piece is encoded on its own with SentencePiece's dummy prefix, as under
    transformers 4.x: ' [/INST] ' starts with two '▁' pieces' worth of spaces."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    for piece in [" [INST] hello [/INST] ", "Question: what? Answer:", " x"]:
        assert tokenizer.encode(piece) == sp.encode(piece)
        assert sp.id_to_piece(sp.encode(piece)[0]).startswith("▁")


def test_routing_vision_weights(cogvlm_ckpt, tokenizer, image_file):
    model, cfg = load_model(str(cogvlm_ckpt))
    inputs, _ = _inputs(model, tokenizer, image_file)
    text = prepare(model, tokenizer, "Describe it.")
    with torch.no_grad():
        before = model(inputs)[0]
        before_t = model(text)[0]
        for name, p in model.named_parameters():
            if "vision_expert" in name or "vision_mlp" in name:
                p.add_(torch.randn_like(p))
        after = model(inputs)[0]
        after_t = model(text)[0]
    # <s> comes before every vision token (causal): unchanged. Everything after depends on them.
    assert torch.equal(before[0], after[0])
    assert (before[1:] - after[1:]).abs().amax(-1).min() > 1e-6
    assert torch.equal(before_t, after_t)


def test_no_image_is_plain_llama(cogagent_ckpt, tokenizer):
    """With no image, NaN in every vision parameter leaves the logits finite and equal to the
    plain LLaMA path (the reference without vision)."""
    model, cfg = load_model(str(cogagent_ckpt))
    sd = read_sat_state_dict(cogagent_ckpt)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("model.vision.", "model.cross_vision.")) or "vision_" in name or "cross" in name:
                p.fill_(float("nan"))
        inp = prepare(model, tokenizer, "Tell me a story.")
        out = model(inp)[0]
        ref = reference.lm(sd, cfg, inp.input_ids[0, 1:].tolist())
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 1e-4
    response, _, _ = chat(model, tokenizer, "Hello", gen=GenerationConfig(max_new_tokens=5))
    assert isinstance(response, str)


def test_cogagent_encoders_run_once_per_image(cogagent_ckpt, tokenizer, image_file):
    model, cfg = load_model(str(cogagent_ckpt))
    calls = {"cross": 0, "low": 0}
    model.model.cross_vision.register_forward_hook(lambda *a: calls.__setitem__("cross", calls["cross"] + 1))
    model.model.vision.register_forward_hook(lambda *a: calls.__setitem__("low", calls["low"] + 1))
    gen = GenerationConfig(max_new_tokens=6)
    history, image = [], image_file
    for q in ["What is this?", "And the colour?", "Anything else?"]:
        _, history, image = chat(model, tokenizer, q, history, image, gen=gen)
    assert calls == {"cross": 1, "low": 1}
    assert len(history) == 3


def test_prompt_too_long_is_clear(cogvlm_ckpt, tokenizer, image_file):
    model, cfg = load_model(str(cogvlm_ckpt))
    with pytest.raises(PromptTooLong, match=r"image tokens.*total length limit \(max_length\) is 40.*raise "
                                            r"--max_length \(the model allows 512\)"):
        chat(model, tokenizer, "word " * 50, image=image_file, gen=GenerationConfig(max_length=40))
    with pytest.raises(PromptTooLong, match=r"the model's maximum length is 512 tokens; shorten") as e:
        chat(model, tokenizer, "word " * 600, gen=GenerationConfig(max_length=4096))
    assert "--max_length" not in str(e.value)                     # raising it would not help
    # budget counts image tokens: a tiny max_length leaves room for only a few new tokens
    n_prompt = prepare(model, tokenizer, "hi", (), ImageContext(image_file, cfg)).input_ids.shape[1]
    out = list(generate_tokens(model, prepare(model, tokenizer, "hi", (), ImageContext(image_file, cfg)),
                               GenerationConfig(), -1, max_new_tokens=(n_prompt + 3) - n_prompt))
    assert len(out) == 3


def test_stream_never_splits_utf8(tokenizer):
    """'é' and '猫' come out of byte-fallback tokens one byte at a time; deltas stay whole."""
    ids = []
    for ch in "é猫 ok":
        for b in ch.encode():
            ids.append(tokenizer.sp.piece_to_id(f"<0x{b:02X}>"))
    deltas = list(stream_text(iter(torch.tensor([[i]]) for i in ids), tokenizer, eos=2))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "é猫 ok"
    assert len(deltas) >= 3


def test_sampling_is_seeded_and_respects_top_k(cogvlm_ckpt, tokenizer):
    model, _ = load_model(str(cogvlm_ckpt))
    gen = GenerationConfig(max_new_tokens=8, top_k=50, top_p=0.9, temperature=1.0, seed=3)
    a = chat(model, tokenizer, "hello", gen=gen)[0]
    b = chat(model, tokenizer, "hello", gen=gen)[0]
    assert a == b
    greedy = GenerationConfig(max_new_tokens=8, top_k=1)
    assert chat(model, tokenizer, "hello", gen=greedy)[0] == chat(model, tokenizer, "hello", gen=greedy)[0]


def test_packed_cpu_inference_matches(cogagent_ckpt, tokenizer, image_file):
    """oneDNN-packed weights (what the demos and the server use on CPU) give the same logits
    and the same greedy answers as the plain model."""
    from models.layout import PackedLinear, can_pack, pack_for_cpu_inference
    model, cfg = load_model(str(cogagent_ckpt))
    if not can_pack(torch.float32):
        pytest.skip("PyTorch without oneDNN")
    packed, _ = load_model(str(cogagent_ckpt))
    pack_for_cpu_inference(packed)
    assert isinstance(packed.lm_head, PackedLinear)
    img = ImageContext(image_file, cfg)
    a_in = prepare(model, tokenizer, "What is this?", [], img)
    b_in = prepare(packed, tokenizer, "What is this?", [], ImageContext(image_file, cfg))
    with torch.no_grad():
        a = model(a_in)
        b = packed(b_in)
    assert (a - b).abs().max() < 1e-4
    gen = GenerationConfig(max_new_tokens=10)
    assert chat(model, tokenizer, "Hi", [], image_file, gen=gen)[0] == chat(packed, tokenizer, "Hi", [], image_file, gen=gen)[0]


def test_decode_attention_by_row_groups_is_exact(monkeypatch):
    """On CPU a batch's one-token attention runs in groups of rows (models.cogvlm
    DECODE_CHUNK_BYTES): the same result as one batched product, with a mask per row or one
    shared mask, over cache views (strided, as the engine's window is)."""
    from models import cogvlm
    g = torch.Generator().manual_seed(0)
    cache_k, cache_v = (torch.randn(5, 4, 40, 16, generator=g) for _ in range(2))     # B,H,L,D
    q = torch.randn(5, 4, 1, 16, generator=g)
    k, v = cache_k[:, :, 3:33], cache_v[:, :, 3:33]                                 # B,H,30,D views
    row_mask = torch.rand(5, 1, 1, 30, generator=g) > 0.3
    row_mask[..., -1] = True
    whole = {m is None: cogvlm.single_query_attention(q, k, v, m) for m in (None, row_mask)}
    monkeypatch.setattr(cogvlm, "DECODE_CHUNK_BYTES", 2 * k[0].numel() * k.element_size())  # 2 rows
    for m in (None, row_mask, row_mask[:1]):
        got = cogvlm.decode_attention(q, k, v, m)
        want = whole[True] if m is None else cogvlm.single_query_attention(q, k, v, m)
        assert got.shape == (5, 4, 1, 16) and torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(whole[True], whole[False])          # the mask matters in this test
    calls = []
    monkeypatch.setattr(cogvlm, "single_query_attention", lambda *a: calls.append(a[1].shape[0]) or a[0])
    cogvlm.decode_attention(q, k, v, row_mask)
    cogvlm.decode_attention(q, k.contiguous(), v.contiguous(), row_mask)  # no copy to avoid: one product
    assert calls == [2, 2, 1, 5]


@pytest.mark.parametrize("rows", ["one image", "two runs", "batch of two", "no image", "all vision"])
def test_each_token_takes_its_experts_projection_however_the_vision_tokens_lie(rows):
    """expert_linear against the definition, token by token: a vision token through the vision
    copy, every other through the language copy; one run of vision tokens is routed as a slice
    (no gather), other layouts by row indices."""
    from models.cogvlm import Routing, expert_linear
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(2 if rows == "batch of two" else 1, 9, dtype=torch.bool)
    if rows in ("one image", "batch of two"):
        mask[0, 2:6] = True
    if rows == "two runs":
        mask[0, 1:3] = mask[0, 5:8] = True
    if rows == "batch of two":
        mask[1, 0:4] = True
    if rows == "all vision":
        mask[:] = True
    language, vision = torch.nn.Linear(16, 12), torch.nn.Linear(16, 12)
    x = torch.randn(*mask.shape, 16, generator=g)
    routing = Routing.of(mask)
    assert (routing is None) == (rows == "no image")
    if routing is not None:
        assert isinstance(routing.vision, slice) == (rows in ("one image", "all vision")), routing
    with torch.no_grad():
        got = expert_linear(x, routing, language, vision)
        want = torch.stack([torch.stack([(vision if mask[b, t] else language)(x[b, t]) for t in range(mask.shape[1])])
                            for b in range(mask.shape[0])])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)
    x.requires_grad_(True)                        # training: the gradient reaches every token
    expert_linear(x, routing, language, vision).sum().backward()
    assert x.grad is not None and bool((x.grad != 0).all())
