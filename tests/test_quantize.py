"""4- and 8-bit quantization on CPU (PyTorch weight-only kernels, and bitsandbytes), both front
ends, CogVLM and CogAgent."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from models import LoadOptions, QuantConfig, build_model, get_config, kernels, load_model, save_sat_checkpoint
from models.generate import GenerationConfig
from models.quantize import quantize, weight_bytes
from utils.chat import ImageContext, chat, prepare



def _config(which):
    # Proportions like the released models: the decoder holds nearly all the weights.
    base = get_config("tiny-test-cogvlm" if which == "cogvlm" else "tiny-test-cogagent")
    return dataclasses.replace(base, num_layers=4, hidden_size=256, num_attention_heads=4,
                               inner_hidden_size=704)   # int4 rows: multiples of 64


@pytest.fixture(scope="module", params=["cogvlm", "cogagent"])
def ckpt(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = _config(request.param)
    d = tmp_path_factory.mktemp("q") / request.param
    save_sat_checkpoint(build_model(cfg), cfg, d)
    return d


@pytest.mark.parametrize("backend", ["torch", "bitsandbytes"])
@pytest.mark.parametrize("bits,limit,min_cos", [(8, 0.55, 0.99), (4, 0.35, 0.9)])
def test_quantized_sat_model(ckpt, tokenizer, image_file, bits, limit, min_cos, backend):
    ref, cfg = load_model(str(ckpt), LoadOptions(dtype=torch.bfloat16))
    model, _ = load_model(str(ckpt), LoadOptions(dtype=torch.bfloat16))
    bf16_bytes = weight_bytes(model)
    quantize(model, bits, backend=backend)
    ratio = weight_bytes(model) / bf16_bytes
    assert ratio < limit, ratio
    img = ImageContext(image_file, cfg)
    inp = prepare(ref, tokenizer, "What is in the image?", [], img)
    with torch.no_grad():
        a = ref(inp)[0, -1].float()
        qi = prepare(model, tokenizer, "What is in the image?", [], ImageContext(image_file, cfg))
        b = model(qi)[0, -1].float()
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


# ---------------------------------------------------------------------------------------
# Quantizing while loading (models.checkpoint.materialize): the same model as loading and then
# quantizing, in both checkpoint formats, without ever holding the full-precision model.
@pytest.mark.parametrize("fmt", ["sat", "hf"])
@pytest.mark.parametrize("bits", [4, 8])
def test_streaming_quantized_load_equals_load_then_quantize(ckpt, tmp_path, fmt, bits):
    from models.hf_io import sat_to_hf
    from models.quantize import WeightOnlyLinear
    src = str(ckpt) if fmt == "sat" else str(sat_to_hf(ckpt, tmp_path / "hf"))
    streamed, cfg = load_model(src, LoadOptions(dtype=torch.bfloat16, quant=QuantConfig(bits=bits), cpu_layout=False))
    ref, _ = load_model(src, LoadOptions(dtype=torch.bfloat16, cpu_layout=False))
    quantize(ref, bits, vision_bits=8, backend="torch")
    a, b = streamed.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    n_q = sum(isinstance(m, WeightOnlyLinear) for m in streamed.modules())
    assert n_q > 4 * cfg.num_layers                   # every decoder linear at least
    assert isinstance(streamed.lm_head, WeightOnlyLinear) and streamed.lm_head.bits == 8
    bits_of = {m.bits for n, m in streamed.named_modules() if isinstance(m, WeightOnlyLinear)
               and n.startswith("model.layers.") and m.in_features % 64 == 0 and m.out_features % 64 == 0}
    assert bits_of == {bits}


_PEAK_SCRIPT = r"""
import sys, threading, time, torch
sys.path.insert(0, {root!r})
from models import CogVLM, LoadOptions, QuantConfig, get_config, load_model
from models.quantize import quantize
with torch.device("meta"):          # first meta build loads torch's meta kernels (~70 MB): before the baseline
    CogVLM(get_config("tiny-test-cogvlm"))
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024
peak, base, stop = [0], anon(), [False]
def watch():
    while not stop[0]:
        peak[0] = max(peak[0], anon()); time.sleep(0.002)
threading.Thread(target=watch, daemon=True).start()
if {stream}:
    model, _ = load_model({src!r}, LoadOptions(dtype=torch.bfloat16, quant=QuantConfig(bits=4), cpu_layout=False))
else:
    model, _ = load_model({src!r}, LoadOptions(dtype=torch.bfloat16, cpu_layout=False))
    quantize(model, 4, vision_bits=8, backend="torch")
time.sleep(0.05); stop[0] = True
print(max(peak[0], anon()) - base)
"""


@pytest.fixture(scope="module")
def mid_ckpt(tmp_path_factory):
    """A ~210M-parameter model saved in fp32 (its bf16 copy: ~420 MB), decoder-dominated like
    the released ones, where holding the whole model in bf16 is clearly visible."""
    from models import EVAConfig, ModelConfig
    cfg = ModelConfig(num_layers=8, hidden_size=1024, num_attention_heads=16, inner_hidden_size=2816,
                      vocab_size=4096, max_sequence_length=512,
                      eva=EVAConfig(num_layers=2, hidden_size=256, num_attention_heads=4,
                                    inner_hidden_size=1024, image_size=56))
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("mid") / "m"
    model = build_model(cfg)
    save_sat_checkpoint(model, cfg, d)
    bf16 = sum(p.numel() for p in model.parameters()) * 2
    return d, bf16


@pytest.mark.parametrize("fmt", ["sat", "hf"])
def test_streaming_quantized_load_peak_memory(mid_ckpt, tmp_path, fmt):
    """Peak anonymous memory while loading --quant 4 from an fp32 checkpoint stays well below
    the model's bf16 size (the file itself is memory-mapped page cache); loading first and
    quantizing after holds the whole bf16 model (checked, so the measure can tell)."""
    import subprocess
    import sys
    from pathlib import Path
    from models.hf_io import sat_to_hf
    ckpt, bf16 = mid_ckpt
    src = str(ckpt) if fmt == "sat" else str(sat_to_hf(ckpt, tmp_path / "hf"))
    root = str(Path(__file__).resolve().parent.parent)

    def peak(stream: bool) -> int:
        code = _PEAK_SCRIPT.format(root=root, src=src, stream=stream)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])
    streamed = peak(True)
    assert streamed < 0.6 * bf16, (streamed, bf16)
    if fmt == "sat":
        assert peak(False) > bf16, "the measure cannot see a whole bf16 model"


# ---------------------------------------------------------------------------------------
# int4 group size (--quant_group) and the chunked dequantization of many-row steps.
def test_int4_group_128_streams_like_quantize_after_load(tmp_path):
    """--quant_group 128: one scale + zero per 128 inputs (0.25 bit per weight less than 64),
    streamed exactly like quantizing after loading, every weight within half a step of its
    value; a group size the kernel does not take is refused by name."""
    from models.quantize import WeightOnlyLinear, quant_plan
    torch.manual_seed(0)
    cfg = dataclasses.replace(_config("cogvlm"), inner_hidden_size=768)   # every input a multiple of 128
    ckpt = tmp_path / "m"
    save_sat_checkpoint(build_model(cfg), cfg, ckpt)
    streamed, cfg = load_model(str(ckpt), LoadOptions(dtype=torch.bfloat16, quant=QuantConfig(bits=4, group=128), cpu_layout=False))
    ref, _ = load_model(str(ckpt), LoadOptions(dtype=torch.bfloat16, cpu_layout=False))
    full = {n: m.weight.detach().float() for n, m in ref.named_modules() if type(m) is torch.nn.Linear}
    with pytest.raises(ValueError, match="--quant_group"):
        quant_plan(ref, 4, group=100)
    quantize(ref, 4, vision_bits=8, backend="torch", group=128)
    a, b = streamed.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    g64, _ = load_model(str(ckpt), LoadOptions(dtype=torch.bfloat16, quant=QuantConfig(bits=4), cpu_layout=False))
    assert weight_bytes(streamed) < weight_bytes(g64)
    int4 = {n: m for n, m in streamed.named_modules() if isinstance(m, WeightOnlyLinear) and m.bits == 4}
    assert len(int4) >= 4 * cfg.num_layers
    for n, m in int4.items():
        assert m.group == 128 and m.scales.shape == (m.in_features // 128, m.out_features, 2)
        step = m.scales[..., 0].t().float().repeat_interleave(128, 1)            # N,K
        err = (m.dequantize().float() - full[n]).abs()
        assert (err <= 0.5 * step + 0.01 * full[n].abs() + 1e-3).all(), n


def test_many_row_steps_dequantize_in_chunks(monkeypatch):
    """A step of many rows (prefill, backward) dequantizes a chunk of output rows at a time into
    one scratch buffer of the chunk's size: the chunks are the whole weight's rows, and the
    outputs and input gradients equal those of the whole layer dequantized at once."""
    import threading
    import models.quantize as mq
    torch.manual_seed(0)
    w, x = torch.randn(448, 256).bfloat16(), torch.randn(100, 256).bfloat16()
    for bits in (8, 4):
        lin = mq.WeightOnlyLinear(w, None, bits)

        def run():
            xg = x.clone().requires_grad_()
            y = lin(xg)
            y.float().pow(2).sum().backward()
            return y.detach(), xg.grad, dict(mq._buffers.d)
        monkeypatch.setattr(mq, "SCRATCH_BYTES", 1 << 40)
        whole = run()
        monkeypatch.setattr(mq, "SCRATCH_BYTES", 64 * 256 * 2)                     # 64 rows a chunk
        chunks = [(r0, c.clone()) for r0, c in lin.dequantized_chunks()]
        assert [r0 for r0, _ in chunks] == list(range(0, 448, 64))
        assert torch.equal(torch.cat([c for _, c in chunks]), lin.dequantize())
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", run()))           # fresh scratch buffers
        t.start()
        t.join()
        y, gx, scratch = out["r"]
        assert torch.equal(y, whole[0])                   # each output column: the same dot products
        scale = whole[1].float().abs().max()              # partial sums each rounded to bf16 once
        assert ((gx.float() - whole[1].float()).abs() <= 1e-2 * scale).all()
        assert scratch[(torch.bfloat16, 0, "cpu")].numel() == 64 * 256              # one chunk, not 448 rows


def test_quant_group_is_the_nf4_block_size_with_bitsandbytes():
    from models.quantize import quantized_module
    w = torch.randn(128, 256, dtype=torch.bfloat16)
    for group in (None, 128):
        q = quantized_module(w, None, 4, "bitsandbytes", group)
        assert q.weight.quant_state.blocksize == (group or 64)
        x = torch.randn(3, 256, dtype=torch.bfloat16)
        cos = torch.nn.functional.cosine_similarity(q(x).float().flatten(), (x @ w.t()).float().flatten(), dim=0)
        assert cos > 0.95


def test_token_embeddings_int8_with_the_torch_back_end(ckpt):
    """--quant (torch back end) stores the token embedding table in int8, one scale per token:
    each value within half its row's step (row absmax / 127) of the bf16 value, half the bytes;
    the model still answers. bitsandbytes keeps the table in the load dtype."""
    from models.quantize import Int8Embedding, quant_plan
    ref, cfg = load_model(str(ckpt), LoadOptions(dtype=torch.bfloat16, cpu_layout=False))
    table = ref.model.embed_tokens.weight.detach().float()
    assert "model.embed_tokens" not in quant_plan(ref, 4, backend="bitsandbytes")
    model, _ = load_model(str(ckpt), LoadOptions(dtype=torch.bfloat16, quant=QuantConfig(bits=4), cpu_layout=False))
    emb = model.model.embed_tokens
    assert isinstance(emb, Int8Embedding) and emb.qweight.dtype == torch.int8
    assert emb.qweight.numel() + emb.scales.numel() * 4 < 0.51 * table.numel() * 2
    ids = torch.arange(cfg.vocab_size)[None]
    with torch.no_grad():
        got = emb(ids)[0].float()
    assert emb(ids).dtype == torch.bfloat16
    step = table.abs().amax(1, keepdim=True) / 127
    # half a step, plus the bf16 rounding of the rescaled value
    assert ((got - table).abs() <= 0.5 * step + 2 ** -8 * got.abs() + 1e-7).all()
    assert ((got - table).abs() > 0).any()            # it is quantized, not a copy
    assert model.model.compute_dtype == torch.bfloat16 and model.model.device.type == "cpu"


@pytest.mark.parametrize("split", [False, True], ids=["kernel-layout", "split-by-rows"])
@pytest.mark.parametrize("group", [64, 128])
def test_int4_many_rows_match_the_kernels_weights(group, split):
    """The weights are what PyTorch's int4 kernel multiplies by ((q - 8) * scale + zero, read
    back through it with an identity matrix); a step of many rows (dequantized, the zeros
    applied to x summed per group) gives x W^T of those weights within bf16 rounding, also for
    inputs far from zero mean, where the zeros matter most. Split by rows (the layout of the
    int4 layers only prefill runs), the same, and a few rows too (no kernel reads that layout)."""
    import models.quantize as mq
    torch.manual_seed(0)
    K = 512
    lin = mq.WeightOnlyLinear(torch.randn(448, K).bfloat16() * 0.02 + 0.01, None, 4, group)
    w = torch._weight_int4pack_mm_for_cpu(torch.eye(K, dtype=torch.bfloat16), lin.qweight, group,
                                          lin.scales).t().float()                        # N,K
    step = lin.scales[..., 0].t().float().repeat_interleave(group, 1)               # N,K
    if split:
        lin = mq.SplitInt4Linear(lin)
    assert ((lin.dequantize().float() - w).abs() <= step / 8).all()      # bf16 roundings, not steps
    for rows in (200, 3) if split else (200,):
        x = torch.randn(rows, K).bfloat16() + 0.5
        assert (rows > mq.KERNEL_ROWS[4]) or split
        exact = x.float() @ w.t()
        with torch.inference_mode():
            y = lin(x).float()
        assert float((y - exact).norm() / exact.norm()) < 3e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(448, 512, 64), (192, 256, 32), (128, 1024, 256)])
def test_int4_split_by_rows_dequantizes_the_same_bits(shape, dtype):
    """SplitInt4Linear (the codes of an int4 layer only prefill runs, transposed and xor-ed once
    at load, the low nibbles' scales divided by 16) dequantizes bit for bit the weight of the
    layer it was made from, with and without the group zeros, so a prefill's many-row product is
    unchanged to the bit; bias included, in both compute dtypes."""
    import models.quantize as mq
    torch.manual_seed(0)
    N, K, group = shape
    lin = mq.WeightOnlyLinear((torch.randn(N, K) * 0.02 + 0.003).to(dtype), torch.randn(N).to(dtype), 4, group)
    split = mq.SplitInt4Linear(lin)
    assert split.qweight.numel() == lin.qweight.numel()
    assert split.scales.numel() + split.zeros.numel() == lin.scales.numel()          # the same bytes
    for offset in (True, False):
        assert torch.equal(split.dequantize(offset=offset), lin.dequantize(offset=offset))
    x = torch.randn(2 * mq.KERNEL_ROWS[4], K).to(dtype)
    with torch.inference_mode():
        assert torch.equal(split(x), lin(x))


def test_int4_inference_loads_split_the_prefill_layers_and_answer_alike(ckpt, tokenizer, image_file, monkeypatch):
    """An int4 inference load gives the int4 layers only prefill runs (vision experts; image
    encoders under --quant_vision 4) the split-by-rows codes and no other layer; greedy answers
    and last logits as with every layer in PyTorch's kernel layout (fp32, both model kinds). A
    training load (cpu_layout off) keeps the kernel layout (QLoRA saves and trains on it)."""
    import models.layout as ml
    from models.quantize import SplitInt4Linear, WeightOnlyLinear
    opts = LoadOptions(dtype=torch.float32, quant=QuantConfig(bits=4, vision_bits=4))
    split, cfg = load_model(str(ckpt), opts)
    kinds = {n: type(m) for n, m in split.named_modules() if isinstance(m, WeightOnlyLinear) and m.bits == 4}
    assert {n for n, k in kinds.items() if k is SplitInt4Linear} == {n for n in kinds if ml.role(n) == "prefill"}
    assert any(".vision_expert_" in n for n in kinds) and any(n.startswith("model.vision.") for n in kinds)
    monkeypatch.setattr(ml, "split_prefill_int4", lambda model: 0)
    kernel, _ = load_model(str(ckpt), opts)
    assert not any(isinstance(m, SplitInt4Linear) for m in kernel.modules())
    gen = GenerationConfig(max_new_tokens=8)
    answers = [chat(m, tokenizer, "Describe it.", [], image_file, gen=gen)[0] for m in (split, kernel)]
    assert answers[0] == answers[1]
    with torch.no_grad():
        a, b = (m(prepare(m, tokenizer, "What is in it?", [], ImageContext(image_file, cfg)))[0, -1] for m in (split, kernel))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    trained, _ = load_model(str(ckpt), dataclasses.replace(opts, cpu_layout=False))
    assert not any(isinstance(m, SplitInt4Linear) for m in trained.modules())


def rows_timer(real):
    """A timer for models.kernels: the weight-only kernels' rows probes from lines (kernel 1 ms a
    row; dequantized 40 ms + 0.1 ms a row, crossing at 44 rows; compiled expansion 10 ms + 0.1 ms
    a row, crossing below 16), every other probe timed by `real`."""
    base = {"kernel": 0.0, "dequantized": 40e-3, "fused": 10e-3}

    def timer(probes, runs):
        if probes[0].regime != "rows":
            return real(probes, runs)
        path = [p.layout.rsplit("-", 1)[1] for p in probes]
        return [base[x] + p.rows * (1e-3 if x == "kernel" else 1e-4) for x, p in zip(path, probes)]
    return timer


@pytest.mark.parametrize("faster,dtype", [("compiled", torch.float32), ("compiled", torch.bfloat16),
                                          ("eager", torch.float32)])
def test_int4_layers_expand_in_one_compiled_pass_with_the_eager_bits(ckpt, tokenizer, image_file, monkeypatch, faster,
                                                                      dtype, tmp_path):
    """Where a C++ compiler exists, an inference load compiles the int4 expansions in the
    background (one graph each, dynamic shapes): the split layers' and, for products of more
    than KERNEL_ROWS rows, the kernel-layout layers'. Timed faster than the eager passes here
    (injected), every such product of a prefill runs them once ready (no shape compiles again)
    and the logits are those of the eager passes to the bit; timed slower, neither is used."""
    import models.compile as mc
    import models.quantize as mq
    if mc.compiler_missing():
        pytest.skip(mc.compiler_missing())
    monkeypatch.setattr(mc, "BACKGROUND_MIN_WEIGHTS", 0)               # the test model is small
    monkeypatch.setattr(mq.FusedExpand, "fn", None)
    monkeypatch.setattr(mq.FusedExpand, "kernel_fn", None)
    started, start = [], mc.expand_int4_in_background
    monkeypatch.setattr(mc, "expand_int4_in_background", lambda m: started.append(start(m)) or started[-1])
    monkeypatch.setattr(mc, "_expansion_seconds", lambda fn, layer: (1.0, 0.5) if faster == "compiled" else (0.5, 1.0))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))                 # the mock rows timings stay here
    monkeypatch.setattr(kernels, "median_seconds", rows_timer(kernels.median_seconds))
    model, cfg = load_model(str(ckpt), LoadOptions(dtype=dtype, quant=QuantConfig(bits=4, vision_bits=4), pack=True))
    assert len(started) == 1 and started[0] is not None
    started[0].join(300)
    fused = {k: getattr(mq.FusedExpand, k) for k in ("fn", "kernel_fn")}
    # The few-row kernels' rows: timed against the eager passes at load (44), again against the
    # compiled pass once it is used (16: the floor)
    rows = {m.kernel_rows for m in model.modules() if type(m) is mq.WeightOnlyLinear and m.bits == 4 and m.kernel_rows}
    assert rows == ({16} if faster == "compiled" else {44})
    if faster == "eager":
        assert not any(fused.values())
        return
    assert all(fused.values())
    calls = {k: [] for k in fused}
    for k, fn in fused.items():
        monkeypatch.setattr(mq.FusedExpand, k, lambda *a, k=k, fn=fn: (fn(*a), calls[k].append(1)))
    split = sum(isinstance(m, mq.SplitInt4Linear) for m in model.modules())
    question = "Describe every object in the picture, " * 12                  # over KERNEL_ROWS text rows
    inputs = prepare(model, tokenizer, question, [], ImageContext(image_file, cfg))
    assert int((~inputs.vision_mask).sum()) > mq.KERNEL_ROWS[4]
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    with torch.no_grad():
        a = model(inputs)[0, -1]
        assert len(calls["fn"]) == split > 0 and len(calls["kernel_fn"]) >= 4 * cfg.num_layers
        assert torch._dynamo.utils.counters["frames"]["ok"] == frames
        for k in fused:                                                  # the eager passes
            monkeypatch.setattr(mq.FusedExpand, k, None)
        b = model(inputs)[0, -1]
    assert torch.equal(a, b)


@pytest.mark.parametrize("split", [False, True], ids=["kernel-layout", "split-by-rows"])
def test_int4_expansions_compiled_on_the_probe_take_every_chunk_of_a_large_layer(split, monkeypatch):
    """The compiled expansions, checked on compile's probe layer, take the chunks a large layer
    is dequantized in (at CogVLM-17B's size 32 MB of weight at a time: views into the layer's
    codes and scales at an offset, beside the layer's own strides) without compiling again, with
    the eager passes' bits. Graphs compiled on a whole probe layer had been guarded on its bases,
    strides and offsets, so at full size most chunks had run the eager passes."""
    import models.compile as mc
    import models.quantize as mq
    if mc.compiler_missing():
        pytest.skip(mc.compiler_missing())
    torch.manual_seed(0)
    fn = torch.compile(mq.expand_split_int4 if split else mq.expand_kernel_int4, dynamic=True, fullgraph=True)
    assert mc._expands_alike(fn, split, torch.bfloat16, torch.bfloat16, 64)      # compiles, as the thread does
    layer = mq.WeightOnlyLinear(torch.randn(10 * 64, 320).bfloat16() * 0.02, None, 4)
    layer = mq.SplitInt4Linear(layer) if split else layer
    monkeypatch.setattr(mq, "SCRATCH_BYTES", 3 * 64 * 320 * 2)                   # chunks of 192, 192, 192, 64 rows
    calls = []
    monkeypatch.setattr(mq.FusedExpand, "fn" if split else "kernel_fn", lambda *a: (fn(*a), calls.append(1)))
    x = torch.randn(100, 320).bfloat16()
    with torch.inference_mode():
        fused = layer._matmul(x, False)
        chunks = len(calls)
        monkeypatch.setattr(mq.FusedExpand, "fn" if split else "kernel_fn", None)
        eager = layer._matmul(x, False)
    assert chunks == 3 and torch.equal(fused, eager)        # the last chunk of one block: eager (a size of 1)
