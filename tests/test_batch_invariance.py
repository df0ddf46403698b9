"""Batch-invariant greedy decoding (models/invariant.py) in bf16, the dtype users run: each row of
a batch gets, bit for bit, the logits it gets alone, whatever else is in the batch (other
prompts' lengths, images, text-only rows), so long greedy answers are identical alone and
batched: batch_chat, the server's batch engine (requests joining mid-answer), HF generate.

Why bitwise, in bf16: a batched product's rows depend on the row count (on the 2-core AMD EPYC
of the CI, bf16 oneDNN gives 1 row and 2+ rows different roundings; fp32 MKL has three classes),
and a random tiny model's logits are close enough that one rounding flips a greedy token
within 100 tokens (batch_chat without invariance: 1 of 4 rows differed over 120 tokens)."""
from __future__ import annotations

import json

from pathlib import Path

import pytest
import torch
from PIL import Image

from models import LoadOptions, load_model
from models.cogvlm import Cache, single_query_attention
from models.generate import GenerationConfig, decode_one_token, prefill
from models.hf_io import hf_architecture, sat_to_hf
from models.invariant import ROWS, attention_by_row, make_batch_invariant
from utils.chat import ImageContext, batch_chat, chat, prepare, prepare_batch
from utils.serving.engine import BatchEngine
from tests.test_engine import run_requests
from tests.test_hf import assert_generate_batched_equals_alone

BF16 = LoadOptions(dtype=torch.bfloat16)


def _requests(cfg, image_file):
    other = Image.new("RGB", (90, 60), (20, 200, 90))
    return [("What is in the image?", [], ImageContext(image_file, cfg)),
            ("Tell me a long story about a fox.", [], None),
            ("Colour?", [("What is it?", "A square.")], ImageContext(other, cfg)),
            ("hi", [], None)]


@pytest.fixture(scope="module", params=["cogvlm", "cogagent"])
def bf16_model(request, cogvlm_ckpt, cogagent_ckpt):
    model, cfg = load_model(str(cogvlm_ckpt if request.param == "cogvlm" else cogagent_ckpt), BF16)
    assert model.runtime.batch_invariant == ROWS            # the CPU default
    return model, cfg


def test_default_is_on_for_cpu_and_off_when_asked(cogvlm_ckpt):
    model, _ = load_model(str(cogvlm_ckpt), LoadOptions(dtype=torch.bfloat16, deterministic=False))
    assert model.runtime.batch_invariant == 0 and not model.runtime.invariant_hooks


@pytest.mark.parametrize("app,batches", [("basic_demo.cli_demo_sat", False), ("basic_demo.cli_demo_hf", False),
                                         ("basic_demo.web_demo", False), ("composite_demo.registry", False),
                                         ("openai_demo.openai_api", True), ("evaluation.evaluate", True)])
def test_invariance_is_the_default_where_an_app_batches_rows(app, batches):
    """The server and the evaluation runner batch requests: invariant by default on CPU. The
    CLIs and the web and composite demos decode one row a step: nothing to be invariant against,
    so their single rows run unpadded (the fastest one-row kernels); --deterministic still asks."""
    import importlib
    from models.invariant import deterministic_on
    from utils.apps.args import options_from_args
    mod = importlib.import_module(app)
    parse = getattr(mod, "parse", None) or mod.parse_args
    extra = ["--task", "refcoco:val", "--data", "d", "--output_dir", "o"] if app.startswith("evaluation") else []

    def default(*flags):
        o = options_from_args(parse(["--device", "cpu", *extra, *flags]))
        return deterministic_on(o.deterministic, o.device, o.compile, o.single_stream)
    assert default() is batches
    assert default("--deterministic") is True and default("--no-deterministic") is False
    assert default("--compile") is False


def test_each_row_gets_its_logits_alone_bit_for_bit(bf16_model, tokenizer, image_file):
    assert_rows_get_their_logits_alone(*bf16_model, tokenizer, image_file)


def test_rows_through_half_weights_get_their_logits_alone(image_file):
    """fp32 with every layer in the `half` layout (FBGEMM rounds 1, 2, 7 and 14 rows otherwise
    than 16 on the AVX2 EPYC: those counts are padded to the next that rounds alike)."""
    from models.layout import HalfLinear, can_half
    from utils.chat.tokenizer import Tokenizer
    if not can_half():
        pytest.skip("PyTorch without FBGEMM's fp16-weight linear")
    model, cfg = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32, kernels="half", deterministic=True))
    assert model.runtime.batch_invariant == ROWS and isinstance(model.lm_head, HalfLinear)
    tok = Tokenizer(Path(__file__).resolve().parent.parent / "assets" / "checkpoints" / "tiny-cogvlm" / "tokenizer")
    assert_rows_get_their_logits_alone(model, cfg, tok, image_file)


def assert_rows_get_their_logits_alone(model, cfg, tokenizer, image_file):
    """Four requests prefilled and decoded as one batch: each row's logits at every step are
    those it gets alone, bit for bit."""
    reqs = _requests(cfg, image_file)
    dtype = model.model.compute_dtype
    batch = prepare_batch(model, tokenizer, reqs)
    B, T = batch.input_ids.shape
    cache = Cache.allocate(cfg, B, T + 4, dtype, "cpu")
    with torch.inference_mode():
        logits = [prefill(model, batch, cache)]
        forced = torch.tensor([5, 17, 42, 99])                  # the same next tokens either way
        for _ in range(3):
            logits.append(decode_one_token(model, forced, cache))
        for i, (q, h, img) in enumerate(reqs):
            one = prepare(model, tokenizer, q, h, img)
            c1 = Cache.allocate(cfg, 1, one.input_ids.shape[1] + 4, dtype, "cpu")
            alone = [prefill(model, one, c1)] + [decode_one_token(model, forced[i:i + 1], c1) for _ in range(3)]
            for step, (b, a) in enumerate(zip(logits, alone)):
                assert torch.equal(b[i], a[0]), f"row {i}, step {step}: max diff {(b[i] - a[0]).abs().max()}"


def test_batch_chat_long_answers_equal_alone(bf16_model, tokenizer, image_file):
    model, cfg = bf16_model
    reqs = _requests(cfg, image_file)
    gen = GenerationConfig(max_new_tokens=150)
    batched = batch_chat(model, tokenizer, reqs, gen=gen)
    alone = [chat(model, tokenizer, q, h, img, gen=gen)[0] for q, h, img in reqs]
    assert batched == alone
    assert max(len(tokenizer.encode(a)) for a in alone) > 100          # long answers, not short ones


def test_engine_streams_alone_and_concurrently_equal(bf16_model, tokenizer, image_file):
    """Requests joining the batch at different steps (rows of different history lengths)
    against the same requests one at a time, through the server's engine: same text, same
    finish reason, and the same as chat() alone."""
    model, cfg = bf16_model
    specs = [(q, img, 150, None) for q, h, img in _requests(cfg, image_file) if not h]
    specs.append(("Another text question, a little longer than the others", None, 120, None))
    engine = BatchEngine(model, tokenizer, max_batch=8, max_len=400)
    try:
        together = run_requests(engine, model, tokenizer, specs, [0, 0.05, 0.2, 0.1], timeout=120)
        one_by_one = [run_requests(engine, model, tokenizer, [s], [0], timeout=120)[0] for s in specs]
    finally:
        engine.close()
    for (text, ev), (text1, ev1), (q, img, n, _) in zip(together, one_by_one, specs):
        assert (text, ev["finish_reason"]) == (text1, ev1["finish_reason"])
        assert text.strip() == chat(model, tokenizer, q, [], img, gen=GenerationConfig(max_new_tokens=n))[0]


def test_hf_generate_batched_equals_alone(cogagent_ckpt, tokenizer, image_file, tmp_path):
    hf = sat_to_hf(cogagent_ckpt, tmp_path / "hf", shard_bytes=200_000)
    model, _ = load_model(str(hf), BF16, arch=hf_architecture)
    assert model.runtime.batch_invariant == ROWS
    reqs = [("Describe the image.", [], image_file), ("A long text-only question, please?", [], None),
            ("What colour?", [], image_file)]
    assert_generate_batched_equals_alone(model, tokenizer, reqs, 120)


def test_row_attention_reads_only_each_rows_slots():
    """Rows with different starts (left padding, the server's window) against each row alone
    on exactly its slots; the padding slots hold garbage that must not matter."""
    g = torch.Generator().manual_seed(0)
    B, H, S, D = 3, 2, 9, 8
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(torch.bfloat16) for n in (1, S, S))
    starts = [0, 4, 8]
    mask = torch.arange(S)[None, :] >= torch.tensor(starts)[:, None]           # B,S
    k[1, :, :4] = 1e4                                                           # garbage in padding
    out = attention_by_row(q, k, v, mask[:, None, None, :])
    for i, s in enumerate(starts):
        assert torch.equal(out[i], attention_by_row(q[i:i + 1], k[i:i + 1, :, s:], v[i:i + 1, :, s:])[0])


def test_switching_off_restores_the_batched_kernels(cogvlm_ckpt):
    model, _ = load_model(str(cogvlm_ckpt), LoadOptions(dtype=torch.float32, deterministic=False))
    make_batch_invariant(model, rows=ROWS, measure=False)           # every product padded
    assert len(model.runtime.invariant_hooks) > 0
    assert model.model.layers[0].self_attn.decode_attention.func is attention_by_row
    make_batch_invariant(model, 0)
    assert model.runtime.batch_invariant == 0 and not model.runtime.invariant_hooks
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert getattr(model.model.layers[0].self_attn.decode_attention, "func", None) is not attention_by_row


# ----- long contexts: each row's attention compiled where that is faster here ------------------
def _long_rows(n_rows=3, S=40):
    """One-token attention inputs as the model passes them: B,H,1,D and strided cache views."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(n_rows, 4, 1, 16, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(n_rows, 4, S + 8, 16, generator=g).to(torch.bfloat16)[:, :, :S] for _ in range(2))
    return q, k, v


KERNELS = ("eager", "fused", "compiled")


def _timed_cache(cache_dir, timings: dict):
    """attention.json as LongContextAttention writes it: {shape kind: (eager s, fused s, compiled s)}."""
    from models.kernels import CACHE_VERSION, machine_id
    n = torch.get_num_threads()
    entries = {f"{w} {kind} threads={n}": t for kind, times in timings.items() for w, t in zip(KERNELS, times)}
    (cache_dir / "cogvlm").mkdir(parents=True, exist_ok=True)
    (cache_dir / "cogvlm" / "attention.json").write_text(json.dumps(
        {"version": CACHE_VERSION, "machine": machine_id(), "timings": entries}))


def _winning(faster: str) -> tuple:
    """Timings (eager, fused, compiled) in which `faster` wins."""
    return tuple(1.0 if w == faster else 2.0 + i for i, w in enumerate(KERNELS))


@pytest.mark.parametrize("faster", KERNELS)
def test_long_rows_follow_the_cached_timings(faster, cogvlm_ckpt, monkeypatch, tmp_path):
    """Injected timings decide; eager or fused winning compiles nothing; short rows never ask."""
    import models.compile as mc
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(mc, "LONG_CONTEXT", 32)
    q, k, v = _long_rows()
    _timed_cache(tmp_path, {mc._attention_kind(q[:1], k[:1], v[:1]): _winning(faster)})
    model, _ = load_model(str(cogvlm_ckpt), BF16)
    one = model.model.layers[0].self_attn.decode_attention.keywords["one"]
    assert isinstance(one, mc.LongContextAttention) and one.possible
    one(q[:1], k[:1, :, :8], v[:1, :, :8])                                  # short: nothing decided
    assert one.choice == {} and one.compiled is None
    out = attention_by_row(q, k, v, one=one)
    assert list(one.choice.values()) == [faster] and (one.compiled is None) == (faster != "compiled")
    assert torch.allclose(out.float(), attention_by_row(q, k, v).float(), atol=2e-2)


@pytest.mark.parametrize("faster", KERNELS)
def test_a_server_decides_short_rows_on_their_own_timings(faster, cogvlm_ckpt, monkeypatch, tmp_path):
    """compile_every_row (what the server calls): short rows decide too, from the timings of
    their own length class (the long class's, injected the other way round, are not read)."""
    import models.compile as mc
    from models.invariant import compile_every_row
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(mc, "LONG_CONTEXT", 32)
    q, k, v = _long_rows()
    short, long = (q[:1], k[:1, :, :8], v[:1, :, :8]), (q[:1], k[:1], v[:1])
    _timed_cache(tmp_path, {mc._attention_kind(*short): _winning(faster), mc._attention_kind(*long): (3.0, 2.0, 1.0)
                            if faster == "eager" else (1.0, 2.0, 3.0)})
    model, _ = load_model(str(cogvlm_ckpt), BF16)
    one = model.model.layers[0].self_attn.decode_attention.keywords["one"]
    one(*short)
    assert one.choice == {}                                                   # not yet asked
    assert compile_every_row(model) and one.from_tokens == 1
    out = one(*short)
    assert list(one.choice.values()) == [faster] and (one.compiled is None) == (faster != "compiled")
    assert torch.allclose(out.float(), single_query_attention(*short).float(), atol=2e-2)
    make_batch_invariant(model, 0)
    assert not compile_every_row(model)                                       # invariance off


def test_a_single_stream_without_invariance_runs_the_measured_row_attention(cogvlm_ckpt, monkeypatch, tmp_path):
    """--no-deterministic on CPU: a step of one row (a single stream) runs the one-row attention
    measured on this machine, as each row does with invariance; several rows stay batched."""
    import models.compile as mc
    from models.cogvlm import decode_attention
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(mc, "LONG_CONTEXT", 32)
    q, k, v = _long_rows()
    _timed_cache(tmp_path, {mc._attention_kind(q[:1], k[:1], v[:1]): _winning("eager")})
    model, _ = load_model(str(cogvlm_ckpt), LoadOptions(dtype=torch.bfloat16, deterministic=False))
    fn = model.model.layers[0].self_attn.decode_attention
    one = fn.keywords["one"]
    assert fn.func is decode_attention and one is model.runtime.row_attention and one.from_tokens == 32
    assert torch.equal(fn(q[:1], k[:1], v[:1]), single_query_attention(q[:1], k[:1], v[:1]))
    assert list(one.choice.values()) == ["eager"]                         # the single row asked it
    one.choice.clear()
    assert torch.equal(fn(q, k, v), decode_attention(q, k, v)) and one.choice == {}   # batched


def test_long_rows_measured_once_and_exact_batched(monkeypatch, tmp_path, cogvlm_ckpt, caplog):
    """No timings cached: the first long row compiles and times the three (cached, one log
    line); rows batched get the bits they get alone whichever wins. Without a compiler the
    eager and fused kernels are still timed."""
    import logging
    import models.compile as mc
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(mc, "LONG_CONTEXT", 32)
    model, _ = load_model(str(cogvlm_ckpt), BF16)
    one = mc.LongContextAttention(model)
    q, k, v = _long_rows()
    starts = [0, 3, 1]
    mask = torch.arange(k.shape[2])[None, :] >= torch.tensor(starts)[:, None]              # B,S
    with caplog.at_level(logging.INFO, logger="models.compile"):
        out = attention_by_row(q, k, v, mask[:, None, None, :], one=one)
    timings = json.loads((tmp_path / "cogvlm" / "attention.json").read_text())["timings"]
    assert sorted(w.split()[0] for w in timings) == ["compiled", "eager", "fused"]
    assert sum("one-row attention (" in r.message for r in caplog.records) == 1
    for i, s in enumerate(starts):
        assert torch.equal(out[i], one(q[i:i + 1], k[i:i + 1, :, s:], v[i:i + 1, :, s:])[0])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "none"))
    monkeypatch.setattr(mc.shutil, "which", lambda name: None)                   # no C++ compiler
    monkeypatch.delenv("CXX", raising=False)
    plain = mc.LongContextAttention(model)
    assert not plain.possible and plain(q[:1], k[:1], v[:1]) is not None and plain.compiled is None
    timings = json.loads((tmp_path / "none" / "cogvlm" / "attention.json").read_text())["timings"]
    assert sorted(w.split()[0] for w in timings) == ["eager", "fused"]


# ----- the server, as users start it (default flags but the dtype), one process and 2 TP ranks --
def _server_cases():
    from tests.test_openai_api import png_url
    return [("What is in the image?", png_url(color=(200, 30, 30))), ("Tell me a long story about a fox.", None),
            ("Describe it.", png_url(color=(9, 9, 200))), ("hello there, how are you today?", None)]


def _ask_stream(url: str, prompt: str, image, max_tokens: int) -> tuple:
    """(text, finish_reason) of one greedy streamed request."""
    import openai
    from tests.test_openai_api import _image_msg
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    msg = _image_msg(prompt, image) if image else {"role": "user", "content": prompt}
    text, finish = "", None
    for c in client.chat.completions.create(model="x", messages=[msg], temperature=0, max_tokens=max_tokens,
                                            stream=True):
        if c.choices:
            text += c.choices[0].delta.content or ""
            finish = c.choices[0].finish_reason or finish
    return text, finish


def _alone_then_together(url: str, max_tokens: int) -> tuple:
    from concurrent.futures import ThreadPoolExecutor
    cases = _server_cases()
    alone = [_ask_stream(url, p, img, max_tokens) for p, img in cases]
    with ThreadPoolExecutor(len(cases)) as ex:
        together = list(ex.map(lambda c: _ask_stream(url, c[0], c[1], max_tokens), cases))
    return alone, together


@pytest.mark.timeout(600)
@pytest.mark.parametrize("ranks", [1, 2])
def test_server_greedy_streams_alone_and_concurrent_are_identical(ranks, cogvlm_ckpt, tmp_path, monkeypatch):
    """openai_api.py in bf16 with its default batching (--deterministic is the CPU default):
    four greedy streams (text-only and with images, up to 200 tokens) one at a time, then all
    at once: the same text and finish reasons; under torchrun with 2 tensor-parallel ranks too."""
    import os
    import signal
    from tests import test_tp_server
    monkeypatch.setitem(test_tp_server.ENV, "COGVLM_DTYPE", "bfloat16")
    monkeypatch.setitem(test_tp_server.ENV, "LOGLEVEL", "INFO")
    url, proc = test_tp_server._start(cogvlm_ckpt, tmp_path / "server.log", ranks, max_tokens=200)
    try:
        alone, together = _alone_then_together(url, 200)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=90)
    log = (tmp_path / "server.log").read_text()
    assert together == alone, log[-2000:]
    assert max(len(t) for t, _ in alone) > 200                        # long answers, not short ones
    assert "batch-invariant decoding" in log
    # how the model is placed, for an operator: dtype, the ranks' shares, the kernels
    assert "as torch.bfloat16" in log and "kernels" in log, log[:3000]
    if ranks > 1:
        assert "tensor-parallel rank 0 of 2 (this rank holds 1/2 of the split weights)" in log, log[:3000]
    else:   # one process: short rows too run the attention measured faster (compiled or eager)
        assert "every row's runs eager or compiled" in log and "one-row attention (" in log, log[-3000:]


@pytest.mark.parametrize("layout", ["plain", "colmajor", "packed", "packed_many", "gemv", "half"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_products_do_not_depend_on_the_row_count(dtype, layout):
    """A language-model-wide product (4096 inputs, where CPU libraries switch kernels by row
    count: fp32 MKL rounds alike at 4, 8 and 12-16 rows on the AVX2 EPYC, bf16 oneDNN from 2,
    FBGEMM's fp16 GEMM at all counts but 1, 2, 7 and 14), in each weight layout, each row count
    padded to the next count measured to round like ROWS rows here: every row count from 1 to
    ROWS gives each row the bits it gets among ROWS rows."""
    from models.invariant import _pad_rows, _safe_rows
    from models.layout import can_half, can_pack, relayout
    if layout.startswith("packed") and not can_pack(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} here")
    if layout == "half" and not can_half():
        pytest.skip("PyTorch without FBGEMM's fp16-weight linear")
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(4096, 1024, bias=False).to(torch.bfloat16).to(dtype)    # bf16 values: half takes them
    lin = relayout(lin, layout)
    x = torch.randn(ROWS, 4096, generator=g).to(dtype)
    safe = _safe_rows(lin, ROWS, dtype)
    assert safe[-1] == ROWS and safe == sorted(safe)
    _pad_rows(lin, safe)
    with torch.inference_mode():
        full = lin(x)
        for n in range(1, ROWS + 1):
            assert torch.equal(lin(x[:n]), full[:n]), (n, safe)
            assert torch.equal(lin(x[ROWS - n:]), full[ROWS - n:]), (n, safe)   # the rows at the end too
            assert torch.equal(lin(x[n - 1:n][None]), full[n - 1:n][None])     # any leading shape


def test_padding_is_described_by_the_counts_it_skips():
    from models.invariant import _padding
    assert _padding([3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 15, 16], 16) == "1-2 -> 3, 7 -> 8, 14 -> 15"
    assert _padding([4, 8, 12, 13, 14, 15, 16], 16) == "1-3 -> 4, 5-7 -> 8, 9-11 -> 12"
    assert _padding(list(range(1, 17)), 16) == "none" and _padding([16], 16) == "1-15 -> 16"
