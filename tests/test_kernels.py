"""The linear kernels chosen by measuring the machine (models/kernels.py): the choice follows the
timings (a mocked timer here; nothing is timed for real), the timings are cached per CPU model,
CPU flags and torch version, a forced choice measures nothing, a layer holds one weight that its
single-row and many-row calls both read, and greedy answers do not depend on the layout.
bench/kernels.py measures the real choice on the mid-size shapes."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import LoadOptions, load_model
from models import kernels
from models.config import MODEL_CONFIGS
from models.kernels import REGIMES, choose_layouts, role
from models.layout import PACKED, GemvLinear, HalfLinear, PackedLinear, apply_layouts, can_half, can_pack, fp16_exact
from models.loading import build_model

ROOT = Path(__file__).resolve().parent.parent
needs_packing = pytest.mark.skipif(not can_pack(torch.float32), reason="PyTorch without oneDNN")
needs_fbgemm = pytest.mark.skipif(not can_half(), reason="PyTorch without FBGEMM's fp16-weight linear")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Every test's own cache directory (never the user's)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "cogvlm" / "kernels.json"


def regime_of(probe) -> str:
    return probe.regime


class MockTimer:
    """Seconds per call from a table: (layout, regime) -> seconds; counts the calls and runs
    nothing."""

    def __init__(self, table: dict):
        self.table, self.calls = table, []

    def __call__(self, probes, runs) -> list:
        self.calls += probes
        return [self.table[p.layout, regime_of(p)] for p in probes]


def winners(decode: str, batch: str, prefill: str, slow: float = 2.0) -> dict:
    """A table where the named layout of each regime takes 1 ms and the others `slow` ms."""
    best = {"decode": decode, "batch": batch, "prefill": prefill}
    return {(x, r): 1e-3 if best[r] == x else slow * 1e-3 for x in kernels.LAYOUTS for r in REGIMES}


def tiny(dtype=torch.float32) -> nn.Module:
    return build_model(MODEL_CONFIGS["tiny-test-cogvlm"], dtype=dtype)


def linear_layouts(model) -> dict:
    """name -> the layout each plain / packed linear layer holds its weight in."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):
            out[name] = "packed" if m.hint is None else "packed_many"
        elif isinstance(m, GemvLinear):
            out[name] = "gemv"
        elif isinstance(m, HalfLinear):
            out[name] = "half"
        elif type(m) is nn.Linear:
            w = m.weight
            out[name] = "plain" if w.is_contiguous() else "colmajor" if w.t().is_contiguous() else "other"
    return out


@needs_packing
def test_the_faster_mock_wins_each_regime(caplog):
    model = tiny()
    timer = MockTimer(winners(decode="packed", batch="plain", prefill="colmajor"))
    with caplog.at_level(logging.INFO, logger="models.kernels"):
        layouts = choose_layouts(model, timer=timer)
    classes = kernels.shape_classes(model)
    for cls in classes.values():                     # per regime, the fastest is the mock's winner
        secs = kernels.seconds_of(cls, kernels.read_cache(kernels.cache_path(), kernels.machine_id()))
        for r in cls.regimes():
            assert min(cls.layouts, key=lambda x: secs[x][r]) == {"decode": "packed", "batch": "plain",
                                                                  "prefill": "colmajor"}[r]
    # The single layout per layer: prefill-only layers take prefill's winner, the LM head
    # decode's; the rest the least cost over a typical request (here decode dominates).
    assert layouts["lm_head"] == "packed"
    assert layouts["model.layers.0.mlp.vision_mlp.up_proj"] == "colmajor"
    assert layouts["model.vision.transformer.layers.0.mlp.fc1"] == "colmajor"
    assert layouts["model.layers.0.self_attn.language_expert_query_key_value"] == "packed"
    assert {role(n) for n in layouts} == {"prefill", "decode", "both"}
    # Where prefill dominates the request's cost, the shared layers take prefill's winner.
    table = winners(decode="packed", batch="packed", prefill="colmajor", slow=1.01)
    table.update({(x, "prefill"): 1.0 for x in ("packed", "plain")})
    layouts = choose_layouts(model, remeasure=True, timer=MockTimer(table))
    assert layouts["model.layers.0.self_attn.language_expert_query_key_value"] == "colmajor"
    assert layouts["lm_head"] == "packed"
    records = [r for r in caplog.records if r.name == "models.kernels"]
    assert len(records) == 1 and "GB/s" in records[0].getMessage() and "TFLOP/s" in records[0].getMessage()
    apply_layouts(model, layouts)
    assert linear_layouts(model) == layouts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemv_runs_one_row_without_onednn_and_turns_it_back_on(dtype):
    """gemv's single row is ATen's product (what F.linear computes with oneDNN off), its many
    rows plain F.linear's, on the nn.Linear's own weight; oneDNN is as before after each call,
    an error included."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 160).to(dtype)
    gemv = GemvLinear(lin)
    assert gemv.weight is lin.weight and set(gemv.state_dict()) == {"weight", "bias"}
    one, many = torch.randn(1, 1, 96, dtype=dtype), torch.randn(2, 5, 96, dtype=dtype)
    with torch.inference_mode():
        with torch.backends.mkldnn.flags(enabled=False):
            want = nn.functional.linear(one, lin.weight, lin.bias)
        assert torch.equal(gemv(one), want) and torch._C._get_mkldnn_enabled()
        assert torch.equal(gemv(many), lin(many))
        with pytest.raises(RuntimeError):
            gemv(torch.randn(1, 95, dtype=dtype))
        assert torch._C._get_mkldnn_enabled()
        with torch.backends.mkldnn.flags(enabled=False):
            gemv(one)
            assert not torch._C._get_mkldnn_enabled()
    # Threads (the composite demo's sessions) calling at once leave oneDNN on, as they found it.
    from concurrent.futures import ThreadPoolExecutor

    def calls(_):
        with torch.inference_mode():
            for _ in range(200):
                gemv(one)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(calls, range(4)))
    assert torch._C._get_mkldnn_enabled()


def test_upcast_runs_many_rows_in_fp32_on_the_shared_bf16_weight(monkeypatch):
    """upcast (bf16 where oneDNN has no bf16): up to 16 rows plain bf16 F.linear; more rows the
    fp32 product of the weight converted chunk by chunk (4 chunks here), rounded to bf16 once."""
    import models.layout as layout
    monkeypatch.setattr(layout, "SCRATCH_BYTES", 96 * 4 * 64)          # 64 output rows a chunk
    torch.manual_seed(0)
    lin = nn.Linear(96, 200).to(torch.bfloat16)
    up = layout.UpcastLinear(lin)
    assert up.weight is lin.weight and set(up.state_dict()) == {"weight", "bias"}
    few, many = torch.randn(1, 16, 96, dtype=torch.bfloat16), torch.randn(2, 9, 96, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(up(few), lin(few))
        want = (many.float() @ lin.weight.float().t() + lin.bias.float()).to(torch.bfloat16)
        got = up(many)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=8e-3)   # at most an ulp apart


def test_bf16_layers_run_upcast_where_onednn_has_no_bf16(monkeypatch):
    """Where oneDNN has no bf16 (forced here, to run on any CPU) every bf16 linear layer takes
    upcast (half, the other candidate, is slower here), a forced layout too, and only upcast's
    and half's figures are timed (upcast's few-row ones are plain's); the bundled model still
    answers."""
    from models.layout import UpcastLinear
    from utils.chat import ImageContext, chat
    from utils.chat.tokenizer import Tokenizer
    from models.generate import GenerationConfig
    monkeypatch.setattr(kernels, "can_upcast", lambda dtype: dtype == torch.bfloat16)
    timer = MockTimer(winners("plain", "plain", "upcast"))
    monkeypatch.setattr(kernels, "median_seconds", timer)
    model, cfg = load_model("tiny-cogvlm", LoadOptions(dtype=torch.bfloat16, pack=True, deterministic=False))
    linears = {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, UpcastLinear))}
    assert "lm_head" in linears and set(linears.values()) == {UpcastLinear}
    half = {("half", r) for r in REGIMES} if can_half() else set()        # the other candidate there
    assert {(p.layout, p.regime) for p in timer.calls} == {("plain", "decode"), ("plain", "batch"),
                                                          ("upcast", "prefill")} | half
    tok = Tokenizer(ROOT / "assets" / "checkpoints" / "tiny-cogvlm" / "tokenizer")
    said = chat(model, tok, "How many shapes are there?", [], ImageContext(ROOT / "assets" / "scene.png", cfg),
                gen=GenerationConfig(max_new_tokens=8))[0]
    assert said == "3"
    forced, _ = load_model("tiny-cogvlm", LoadOptions(dtype=torch.bfloat16, kernels="colmajor"))
    assert isinstance(forced.get_submodule("lm_head"), UpcastLinear)


@pytest.mark.parametrize("deterministic", [False, True])
def test_gemv_is_no_candidate_where_decoding_pads_single_rows(deterministic, monkeypatch):
    """Batch-invariant decoding pads a single row to several, so gemv's one-row kernel would
    never run there: however fast the mock makes it, it is chosen only without invariance, and
    only by layers that decode (beyond one row gemv is plain, timed once as plain)."""
    monkeypatch.setattr(kernels, "median_seconds", MockTimer(winners("gemv", "packed", "colmajor")))
    model, _ = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32, pack=True, deterministic=deterministic))
    held = linear_layouts(model)
    decoding = {x for n, x in held.items() if role(n) != "prefill"}
    assert ("gemv" not in decoding) if deterministic else (decoding == {"gemv"}), held
    assert "gemv" not in {x for n, x in held.items() if role(n) == "prefill"}


@pytest.mark.parametrize("deterministic", [False, True])
def test_padded_single_rows_are_costed_as_the_few_rows_they_run(deterministic, monkeypatch):
    """Batch-invariant decoding runs a one-row step padded to a few rows (bf16 oneDNN 2, fp32
    MKL 12 on the AMD EPYC): the layers that decode take the few-row regime's winner there,
    the one-row regime's without invariance; prefill-only layers prefill's either way."""
    monkeypatch.setattr(kernels, "median_seconds", MockTimer(winners("colmajor", "plain", "packed")))
    model, _ = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32, pack=True, deterministic=deterministic))
    held = linear_layouts(model)
    decoding = {x for n, x in held.items() if role(n) != "prefill"}
    assert decoding == ({"plain"} if deterministic else {"colmajor"}), held
    assert {x for n, x in held.items() if role(n) == "prefill"} == {"packed"}


def test_the_timer_flushes_the_caches_before_each_call(tmp_path, monkeypatch):
    """A decode step reads gigabytes of weights, so each layer's weight comes from memory: the
    real timer reads a buffer of twice the last-level cache (sysfs) before every timed call
    (timed from the cache, packed bf16 won on the AMD EPYC; from memory ATen's GEMV did)."""
    from models.machine import last_level_cache_bytes
    for index, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "32768K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert last_level_cache_bytes(root=str(tmp_path)) == 32 << 20
    assert last_level_cache_bytes(default=7, root=str(tmp_path / "none")) == 7
    sizes, order = [], []
    monkeypatch.setattr(kernels, "last_level_cache_bytes", lambda: 1 << 16)
    real_sum = torch.Tensor.sum

    def counted_sum(t, *a, **kw):
        sizes.append(t.numel() * t.element_size())
        order.append("flush")
        return real_sum(t, *a, **kw)
    monkeypatch.setattr(torch.Tensor, "sum", counted_sum)
    probes = [kernels.Probe("plain", "float32", 4, 4, 1, 1, "decode")] * 2
    out = kernels.median_seconds(probes, [lambda: order.append("a"), lambda: order.append("b")])
    assert len(out) == 2 and set(sizes) == {2 << 16}
    timed = order[2:]                                 # after one warm-up call each
    assert timed == ["flush", "a", "flush", "b"] * kernels.REPEAT["decode"]


def test_the_cache_is_written_read_and_invalidated(cache_dir, monkeypatch):
    model = tiny()
    table = winners("plain", "plain", "plain")

    def measured(**kw) -> int:
        timer = MockTimer(table)
        choose_layouts(model, timer=timer, **kw)
        return len(timer.calls)
    first = measured()
    assert first > 0 and cache_dir.is_file()
    saved = json.loads(cache_dir.read_text())
    assert saved["machine"] == kernels.machine_id() and len(saved["timings"]) == first
    assert measured() == 0                              # read back: nothing timed
    assert measured(remeasure=True) == first            # --remeasure_kernels
    monkeypatch.setattr(kernels, "cpu_model", lambda: "Intel(R) Xeon(R) Platinum 8481C")
    assert measured() == first                          # another CPU model
    assert measured() == 0
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    assert measured() == first                          # other flags
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert measured() == first                          # another torch
    assert json.loads(cache_dir.read_text())["machine"]["torch"] == "9.9.9"
    cache_dir.write_text("{not json")                   # a damaged file: measured again, rewritten
    assert measured() == first and measured() == 0


def test_a_forced_choice_measures_nothing(cache_dir, monkeypatch):
    def no_timing(probes, runs):
        raise AssertionError("a forced choice timed a kernel")
    monkeypatch.setattr(kernels, "median_seconds", no_timing)
    for layout in kernels.LAYOUTS:
        if (layout in PACKED and not can_pack(torch.float32)) or layout == "upcast" \
                or (layout == "half" and not can_half()):                # upcast: bf16 only
            continue
        model, _ = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32, kernels=layout))
        held = linear_layouts(model)
        assert held and set(held.values()) == {layout}, held    # (the bundled weights are bf16 values)
        assert model.runtime.packed == (layout in PACKED)                # what inductor cannot take
    assert not cache_dir.exists()
    # A layout the layer cannot take falls back as before: without oneDNN packing, column-major
    # fp32 where there are more outputs than inputs, else row-major.
    monkeypatch.setattr(kernels, "can_pack", lambda dtype: False)
    model = tiny()
    layouts = choose_layouts(model, "packed")
    assert layouts["lm_head"] == "colmajor" and layouts["model.layers.0.mlp.language_mlp.down_proj"] == "plain"


def test_fp16_holds_bf16_and_fp16_weights_and_nothing_else():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=gen) * 0.02
    assert not fp16_exact(w)                                 # fp32 values: 13 more bits than fp16's
    assert fp16_exact(w.bfloat16().float()) and fp16_exact(w.half().float())
    tiny_values = (w * 1e-4).bfloat16().float()          # below fp16's normal range: within 2^-25
    assert fp16_exact(tiny_values) and not torch.equal(tiny_values.half().float(), tiny_values)
    big = w.bfloat16().float()
    big[7, 3] = 70000.0                                      # beyond fp16's range
    assert not fp16_exact(big) and not fp16_exact(-big)
    assert fp16_exact(w.bfloat16().float(), chunk=1000)      # checked in chunks
    off = w.bfloat16().float()
    off[-1, -1] = 0.1                                        # one value in the last chunk
    assert not fp16_exact(off, chunk=1000)


@needs_fbgemm
def test_half_layout_computes_the_fp32_product_of_the_same_weight():
    """HalfLinear holds the bf16-valued fp32 weight as fp16 exactly (FBGEMM unpacks it back
    bit for bit) and multiplies in fp32: F.linear's result up to the order of the sums."""
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(192, 80)
    with torch.no_grad():
        lin.weight.copy_((torch.randn(80, 192, generator=gen) * 0.05).bfloat16())
    h = HalfLinear(lin)
    assert torch.equal(torch.ops.quantized.linear_unpack_fp16(h.half_packed)[0], lin.weight)
    assert [n for n, _ in h.named_parameters()] == ["bias"]             # the fp32 weight is not kept
    with torch.inference_mode():
        for shape in [(1, 1, 192), (3, 7, 192), (300, 192)]:
            x = torch.randn(*shape, generator=gen)
            got, want = h(x), lin(x)
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_fbgemm
def test_only_weights_fp16_holds_are_offered_the_half_layout():
    """Random fp32 weights never take it (fp16 would round them); the same model with bf16
    values, as released checkpoints hold, does, and the (mock) timings decide; bf16 models too
    (their output rounded to bf16 once)."""
    model = tiny()
    assert all("half" not in c.layouts for c in kernels.shape_classes(model).values())
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16())
    assert all("half" in c.layouts for c in kernels.shape_classes(model).values())
    layouts = choose_layouts(model, timer=MockTimer(winners("half", "half", "half")))
    assert set(layouts.values()) == {"half"}
    apply_layouts(model, layouts)
    assert set(linear_layouts(model).values()) == {"half"} and not model.runtime.packed   # compilable
    assert not any(type(m) is nn.Linear for m in model.modules())          # no fp32 copy left
    bf16 = tiny(torch.bfloat16)                                            # bf16 weights: always
    assert all("half" in c.layouts for c in kernels.shape_classes(bf16).values())
    apply_layouts(bf16, choose_layouts(bf16, timer=MockTimer(winners("half", "half", "half"))))
    h = bf16.get_submodule("lm_head")
    assert isinstance(h, HalfLinear)
    x = torch.randn(2, 3, h.in_features, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = F.linear(x.float(), torch.ops.quantized.linear_unpack_fp16(h.half_packed)[0].float())
        got = h(x)
    assert got.dtype == torch.bfloat16                             # the fp32 product rounded once:
    torch.testing.assert_close(got.float(), want, rtol=4e-3, atol=1e-5)     # within half a bf16 ulp


@needs_fbgemm
@pytest.mark.parametrize("pads", [True, False])
def test_decoding_layers_do_without_half_where_invariance_pads_it(pads, monkeypatch):
    """Batch-invariant decoding pads a single row to the rows that round like 16: where half
    needs more than the few rows its decode is timed at, layers that decode take the best other
    layout however fast the (mock) few-row timings make half; prefill-only layers keep it.
    Without invariance, or where half needs no padding, every layer takes it."""
    monkeypatch.setattr(kernels, "median_seconds", MockTimer(winners("half", "half", "half")))
    from models import invariant
    monkeypatch.setattr(invariant, "half_pads", lambda dtype, out, inp: pads)
    model, _ = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32, pack=True, deterministic=True))
    held = linear_layouts(model)
    assert {x for n, x in held.items() if role(n) == "prefill"} == {"half"}
    assert ({x for n, x in held.items() if role(n) != "prefill"} == {"half"}) != pads, held
    single, _ = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32, pack=True, deterministic=False))
    assert set(linear_layouts(single).values()) == {"half"}


@needs_fbgemm
def test_half_pads_is_measured_once_and_cached(cache_dir):
    from models.invariant import half_pads
    cls = kernels.shape_classes(tiny()).popitem()[1]
    first = half_pads(cls.dtype, cls.out, cls.inp)
    written = json.loads(cache_dir.with_name("batch_invariance.json").read_text())["timings"]
    assert any("HalfLinear" in k for k in written)
    assert half_pads(cls.dtype, cls.out, cls.inp) == first


@needs_fbgemm
@pytest.mark.parametrize("faster", ["half", "plain"])
def test_a_compiled_model_keeps_the_half_layers_measured_faster(faster, monkeypatch):
    """--compile leaves every layer's weight plain for inductor to pack, except the fp32 layers
    whose measured choice is half: inductor calls those as they are (tests/test_compile.py runs
    such a step)."""
    import models.compile as mc
    monkeypatch.setattr(mc, "compile_decode", lambda model: True)          # the layouts only
    monkeypatch.setattr(kernels, "median_seconds", MockTimer(winners(faster, faster, faster)))
    model, _ = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32, compile=True, deterministic=False))
    held = set(linear_layouts(model).values())
    assert held == ({"half"} if faster == "half" else {"plain", "colmajor"}), held
    assert not model.runtime.packed                                       # nothing inductor cannot take


def image_logits(model, cfg, seed: int = 0) -> torch.Tensor:
    """Logits of one random image prompt (the bench's layout of it), no cache."""
    from bench.common import image_prompt
    from models.generate import ModelInputs
    g = torch.Generator().manual_seed(seed)
    ids, pos, vision, slots = image_prompt(cfg, 6, generator=g)
    img = torch.randn(1, 3, cfg.eva.image_size, cfg.eva.image_size, generator=g)
    with torch.inference_mode():
        return model(ModelInputs(ids, pos, vision, slots, image_embeds=model.encode_images(img)))


@needs_fbgemm
def test_half_layers_take_their_layout_as_their_weights_are_read():
    """Loading converts each `half` layer once its tensors have arrived (packed on a few
    threads: at most that many layers wait): while the rest is read, no layer holds its
    full-precision weight in the model (an fp32 load of CogVLM-17B would otherwise hold 68 GB
    before converting), and the result is the layout applied after loading."""
    from models import CogVLM
    from models.checkpoint import HALF_THREADS, is_derived, materialize
    cfg = MODEL_CONFIGS["tiny-test-cogvlm"]
    source = tiny()
    with torch.no_grad():
        for p in source.parameters():
            p.copy_(p.bfloat16())                       # the values of a released bf16 checkpoint
    sd = {k: v for k, v in source.state_dict().items() if not is_derived(k)}
    with torch.device("meta"):
        model = CogVLM(cfg)
    half = frozenset(n for n, m in model.named_modules() if type(m) is nn.Linear)
    needs = {n: {f"{n}.weight"} | ({f"{n}.bias"} if model.get_submodule(n).bias is not None else set())
             for n in half}
    read, checked = set(), 0

    def tensors():
        nonlocal checked
        for key, t in sd.items():
            waiting = [n for n in half if needs[n] <= read and not isinstance(model.get_submodule(n), HalfLinear)]
            assert len(waiting) <= HALF_THREADS, waiting                     # converted as they arrive
            for n in half:
                mod = model.get_submodule(n)
                assert isinstance(mod, HalfLinear) or mod.weight.device.type == "meta", n
                assert not isinstance(mod, HalfLinear) or needs[n] <= read, n
            checked += 1
            read.add(key)
            yield key, t.clone()
    materialize(model, tensors(), len(sd), half=half)
    assert checked and {type(model.get_submodule(n)) for n in half} == {HalfLinear}
    apply_layouts(source, {n: "half" for n in half})
    assert torch.equal(image_logits(model.eval(), cfg), image_logits(source, cfg))


@needs_fbgemm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_load_streams_half_where_fp16_holds_the_weight_and_chooses_again_elsewhere(dtype, tmp_path,
                                                                                     monkeypatch, caplog):
    """A checkpoint of bf16 values with one layer of fp32 values (a finetune saved in fp32),
    `half` measured fastest: loaded in fp32 every other layer takes `half` as it is read and that
    one its next best layout; in bf16 its values are rounded on reading and it takes `half` too.
    The logits are those of the same checkpoint given the same layouts after loading."""
    from models.checkpoint import save_sat_checkpoint
    cfg = MODEL_CONFIGS["tiny-test-cogvlm"]
    model = tiny()
    odd = "model.layers.1.mlp.language_mlp.up_proj"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(odd):
                p.copy_(p.bfloat16())
    ckpt = save_sat_checkpoint(model, cfg, tmp_path / "ckpt")
    monkeypatch.setattr(kernels, "median_seconds", MockTimer(winners("half", "half", "half")))
    with caplog.at_level(logging.INFO, logger="models.loading"):
        loaded, _ = load_model(str(ckpt), LoadOptions(dtype=dtype, pack=True, deterministic=False))
    held = linear_layouts(loaded)
    declined = {n for n, x in held.items() if x != "half"}
    assert declined == ({odd} if dtype == torch.float32 else set()), declined
    took = [r.getMessage() for r in caplog.records if "took the half layout" in r.getMessage()]
    assert len(took) == 1 and f"{len(held) - len(declined)} linear layers" in took[0], took
    assert ("1 hold values fp16 does not" in took[0]) == bool(declined)
    after, _ = load_model(str(ckpt), LoadOptions(dtype=dtype))           # the layouts given afterwards
    apply_layouts(after, held)
    assert linear_layouts(after) == held
    assert torch.equal(image_logits(loaded, cfg), image_logits(after, cfg))


@needs_fbgemm
def test_a_quantized_load_streams_half_into_the_layers_it_leaves(caplog):
    """--quant 8 --quant_vision 16 (the image encoder unquantized), `half` forced: the decoder's
    layers are quantized as they are read and the encoder's take `half` as they are read; the
    logits are those of the same load given `half` afterwards."""
    from models.quantize import QuantConfig, WeightOnlyLinear
    quant = QuantConfig(bits=8, vision_bits=16)
    with caplog.at_level(logging.INFO, logger="models.loading"):
        model, cfg = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32, kernels="half", quant=quant,
                                                           deterministic=False))
    encoder = {n: type(m) for n, m in model.named_modules() if n.startswith("model.vision.transformer.")
               and isinstance(m, (nn.Linear, HalfLinear, WeightOnlyLinear))}
    assert encoder and set(encoder.values()) == {HalfLinear}
    assert isinstance(model.get_submodule("model.layers.0.mlp.language_mlp.up_proj"), WeightOnlyLinear)
    assert f"{len(linear_layouts(model))} linear layers took the half layout" in caplog.text
    after, _ = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32, quant=quant, deterministic=False))
    apply_layouts(after, {n: "half" for n in linear_layouts(model)})
    assert linear_layouts(after) == linear_layouts(model)
    assert torch.equal(image_logits(model, cfg), image_logits(after, cfg))


def weight_ptr(mod: nn.Module) -> int:
    return torch.ops.mkldnn.data_ptr(mod.packed) if isinstance(mod, PackedLinear) else mod.weight.data_ptr()


@needs_packing
def test_decode_and_prefill_read_one_weight_per_layer(monkeypatch):
    """Decode prefers packed and prefill column-major here: each layer still holds one weight,
    and its single-row and many-row calls read that same storage."""
    from utils.chat import ImageContext, chat
    from utils.chat.tokenizer import Tokenizer
    from models.generate import GenerationConfig
    monkeypatch.setattr(kernels, "median_seconds", MockTimer(winners("packed", "packed", "colmajor")))
    # single-row decode steps (batch-invariant decoding would pad them to ROWS rows)
    model, cfg = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32, pack=True, deterministic=False))
    plain, _ = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32, cpu_layout=False))
    held = linear_layouts(model)
    assert held["model.layers.0.mlp.language_mlp.gate_proj"] == "packed"
    assert held["model.layers.0.mlp.vision_mlp.gate_proj"] == "colmajor"
    seen = {}                                           # layer -> {(rows, weight pointer)}

    def hook(mod, args, out, name):
        seen.setdefault(name, set()).add((args[0].reshape(-1, args[0].shape[-1]).shape[0], weight_ptr(mod)))
    for name in held:
        model.get_submodule(name).register_forward_hook(lambda m, a, o, n=name: hook(m, a, o, n))
    tok = Tokenizer(ROOT / "assets" / "checkpoints" / "tiny-cogvlm" / "tokenizer")
    chat(model, tok, "Describe the image.", [], ImageContext(ROOT / "assets" / "scene.png", cfg),
         gen=GenerationConfig(max_new_tokens=4))
    shared = seen["model.layers.0.self_attn.language_expert_query_key_value"]
    assert {rows for rows, _ in shared} >= {1} and max(rows for rows, _ in shared) > 1   # decode and prefill
    for name, calls in seen.items():
        assert len({ptr for _, ptr in calls}) == 1, name                                # one storage
    n_weights = sum(1 for m in model.modules() if isinstance(m, PackedLinear)) + \
        sum(1 for m in model.modules() if type(m) is nn.Linear)
    assert n_weights == sum(1 for m in plain.modules() if type(m) is nn.Linear)    # nothing doubled
    ptrs = [weight_ptr(model.get_submodule(n)) for n in held]
    assert len(set(ptrs)) == len(ptrs)


def test_greedy_answers_do_not_depend_on_the_layout(monkeypatch):
    from utils.chat import ImageContext, chat
    from utils.chat.tokenizer import Tokenizer
    from models.generate import GenerationConfig
    tok = Tokenizer(ROOT / "assets" / "checkpoints" / "tiny-cogvlm" / "tokenizer")
    questions = ["How many shapes are there?", "Describe the image with boxes."]

    def answers(opts: LoadOptions) -> list:
        model, cfg = load_model("tiny-cogvlm", opts)
        return [chat(model, tok, q, [], ImageContext(ROOT / "assets" / "scene.png", cfg),
                     gen=GenerationConfig(max_new_tokens=40))[0] for q in questions]
    reference = answers(LoadOptions(dtype=torch.float32))
    assert reference[0] == "3"                          # what the bundled model was trained to say
    forced = [x for x in kernels.LAYOUTS if x not in PACKED or can_pack(torch.float32)]
    for layout in forced:
        assert answers(LoadOptions(dtype=torch.float32, kernels=layout)) == reference, layout
    monkeypatch.setattr(kernels, "median_seconds", MockTimer(winners("plain", "packed", "colmajor")))
    assert answers(LoadOptions(dtype=torch.float32, pack=True)) == reference


def pytorch_kernel(q, x: torch.Tensor) -> torch.Tensor:
    """PyTorch's own weight-only kernel on `q`'s weights (what a one-token step runs)."""
    x2 = x.reshape(-1, q.in_features)
    return (torch._weight_int8pack_mm(x2, q.qweight, q.scales) + q.bias).view(*x.shape[:-1], -1)


@pytest.mark.parametrize("hint", [None, 256], ids=["packed", "packed_many"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_codes_in_onednn_order_compute_what_pytorchs_kernel_does(dtype, hint, monkeypatch):
    """A prefill-only int8 layer with its codes in oneDNN's blocked order (several chunks, the
    last padded), laid out for a decode step's rows or a prefill's, computes what PyTorch's
    weight-only kernel computes from the same weights."""
    from models import layout
    from models.quantize import WeightOnlyLinear
    if not can_pack(dtype):
        pytest.skip(f"oneDNN does not pack {dtype} here")
    N, K = 40, 64                                 # (PyTorch's bf16 int8 kernel needs K % 32 == 0)
    monkeypatch.setattr(layout, "SCRATCH_BYTES", N * K * dtype.itemsize // 3 + 1)    # 3 chunks, the last padded
    gen = torch.Generator().manual_seed(0)
    q = WeightOnlyLinear(torch.randn(N, K, generator=gen).to(dtype), torch.randn(N, generator=gen).to(dtype), 8)
    p = layout.PackedInt8Linear(q, hint)
    assert p.rows == 14 and p.codes.dtype == torch.int8 and p.hint == hint
    x = torch.randn(2, 9, K, generator=gen).to(dtype)
    want = pytorch_kernel(q, x)
    got = p(x)
    assert got.shape == (2, 9, N) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol * want.abs().max().item(), rtol=tol)
    torch.testing.assert_close(got, q(x), atol=tol * want.abs().max().item(), rtol=tol)   # the row-major path
    from concurrent.futures import ThreadPoolExecutor                  # sessions in threads share the scratch
    alone = [p(x * (i + 1)) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        assert all(torch.equal(a, b) for a, b in zip(pool.map(lambda i: p(x * (i + 1)), range(8)), alone))


@needs_packing
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("prefill", ["packed", "packed_many", "plain"])
def test_int8_prefill_only_layers_follow_the_gemm_of_their_shape(prefill, bits):
    """The int8 layers only prefill uses (the image encoder; under --quant 8 the vision experts
    too) keep their codes in the layout whose GEMM the (mock) timings made faster; layers decode
    reads keep the row-major codes PyTorch's weight-only kernels read, int4 ones all of theirs."""
    from models.layout import PackedInt8Linear
    from models.quantize import WeightOnlyLinear, quantize
    model = quantize(tiny(), bits, vision_bits=8)
    timer = MockTimer(winners(decode="packed", batch="packed", prefill=prefill))
    layouts = choose_layouts(model, timer=timer)
    assert any(p.rows == REGIMES["prefill"] for p in timer.calls)
    apply_layouts(model, layouts)
    held = {n: (type(m), m.bits if hasattr(m, "bits") else 8) for n, m in model.named_modules()
            if isinstance(m, (WeightOnlyLinear, PackedInt8Linear))}
    hints = {m.hint for m in model.modules() if isinstance(m, PackedInt8Linear)}
    assert hints == ({PACKED[prefill]} if prefill in PACKED else set())      # laid out for the rows chosen
    blocked = PackedInt8Linear if prefill in PACKED else WeightOnlyLinear
    assert held["model.vision.transformer.layers.0.mlp.fc1"][0] is blocked
    for name in ("model.layers.0.mlp.vision_mlp.up_proj", "model.layers.0.self_attn.vision_expert_query_key_value"):
        assert held[name][0] is (blocked if bits == 8 else WeightOnlyLinear), name
    for name in ("model.layers.0.mlp.language_mlp.up_proj", "lm_head"):
        assert held[name][0] is WeightOnlyLinear, name
    assert sum(t is PackedInt8Linear for t, _ in held.values()) == (
        sum(role(n) == "prefill" and b == 8 for n, (_, b) in held.items()) if prefill in PACKED else 0)


@needs_packing
@pytest.mark.parametrize("dtype,bits", [(torch.float32, 8), (torch.bfloat16, 8), (torch.bfloat16, 4)], ids=str)
def test_greedy_answers_do_not_depend_on_the_int8_layout(dtype, bits):
    from models.layout import PackedInt8Linear
    from models.quantize import QuantConfig
    from utils.chat import ImageContext, chat
    from utils.chat.tokenizer import Tokenizer
    from models.generate import GenerationConfig
    if not can_pack(dtype):
        pytest.skip(f"oneDNN does not pack {dtype} here")
    tok = Tokenizer(ROOT / "assets" / "checkpoints" / "tiny-cogvlm" / "tokenizer")
    questions = ["How many shapes are there?", "Describe the image with boxes."]

    def answers(kernels: str) -> tuple:
        model, cfg = load_model("tiny-cogvlm", LoadOptions(dtype=dtype, quant=QuantConfig(bits), kernels=kernels))
        calls = []
        for m in model.modules():
            if isinstance(m, PackedInt8Linear):
                m.register_forward_hook(lambda *a: calls.append(1))
        said = [chat(model, tok, q, [], ImageContext(ROOT / "assets" / "scene.png", cfg),
                     gen=GenerationConfig(max_new_tokens=40))[0] for q in questions]
        return said, len(calls)
    plain, none = answers("plain")
    assert none == 0
    for blocked in PACKED:
        packed, calls = answers(blocked)
        assert calls > 0                               # the image went through the blocked codes
        assert packed == plain, blocked


def by_kernel_dtype(faster: str):
    """A timer: quantized kernels' probes take 1 ms in dtype `faster` and 2 ms in the other;
    layout probes 1 ms (every layout alike)."""
    def timer(probes, runs):
        return [(1e-3 if p.dtype == faster else 2e-3) if p.layout.startswith("int") else 1e-3 for p in probes]
    return timer


@pytest.mark.parametrize("faster", ["bfloat16", "float32"])
def test_quantized_layers_of_fp32_models_run_the_kernel_dtype_measured_faster(faster, caplog):
    from models.quantize import WeightOnlyLinear, quantize
    model = quantize(tiny(), 4, vision_bits=8)                              # fp32, int4 + int8
    with caplog.at_level(logging.INFO, logger="models.kernels"):
        chosen = kernels.choose_quantized_kernels(model, timer=by_kernel_dtype(faster))
    want = getattr(torch, faster)
    assert chosen == {4: want, 8: want} and "GB/s" in caplog.text
    layers = [m for m in model.modules() if type(m) is WeightOnlyLinear]
    assert {(m.kernel_dtype, m.scales.dtype, m.dtype) for m in layers} == {(want, want, torch.float32)}
    m = model.get_submodule("model.layers.0.mlp.language_mlp.up_proj")
    x = torch.randn(1, 2, m.in_features)
    # one token: PyTorch's int4 kernel on activations in the chosen dtype, the output back in fp32
    kernel = torch._weight_int4pack_mm_for_cpu(x[0].to(want), m.qweight, m.group, m.scales)
    got = m(x)
    assert got.dtype == torch.float32 and torch.equal(got[0], kernel.float())
    many = torch.randn(100, m.in_features)                                  # prefill: dequantized, fp32
    reference = F.linear(many, m.dequantize())
    torch.testing.assert_close(m(many), reference, rtol=1e-4, atol=1e-4)
    timed = []                                                              # cached: nothing measured again
    kernels.choose_quantized_kernels(quantize(tiny(), 4, vision_bits=8), timer=lambda p, r: timed.append(p))
    assert timed == []


def test_tensor_parallel_ranks_take_their_group_leaders_kernel_dtype(monkeypatch):
    """Split layers must compute alike on every rank: each rank measures, then all take the
    choice of their group's first rank (models.tp.from_group_leader, a broadcast)."""
    from models import tp
    from models.quantize import WeightOnlyLinear, quantize
    model = quantize(tiny(), 8)
    model.runtime.tp_world = 2
    offered = []
    monkeypatch.setattr(tp, "from_group_leader", lambda obj: offered.append(obj) or {8: torch.bfloat16})
    kernels.choose_quantized_kernels(model, remeasure=True, timer=by_kernel_dtype("float32"))
    assert offered == [{8: torch.float32}]                  # this rank measured fp32 faster...
    assert {m.kernel_dtype for m in model.modules() if type(m) is WeightOnlyLinear} == {torch.bfloat16}  # ...its leader bf16


def test_an_fp32_app_load_switches_its_quantized_kernels_and_still_answers(monkeypatch):
    from models.quantize import QuantConfig, WeightOnlyLinear
    from utils.chat import ImageContext, chat
    from utils.chat.tokenizer import Tokenizer
    from models.generate import GenerationConfig
    monkeypatch.setattr(kernels, "median_seconds", by_kernel_dtype("bfloat16"))
    model, cfg = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32, quant=QuantConfig(8), pack=True))
    assert {m.kernel_dtype for m in model.modules() if type(m) is WeightOnlyLinear} == {torch.bfloat16}
    tok = Tokenizer(ROOT / "assets" / "checkpoints" / "tiny-cogvlm" / "tokenizer")
    said = chat(model, tok, "How many shapes are there?", [], ImageContext(ROOT / "assets" / "scene.png", cfg),
                gen=GenerationConfig(max_new_tokens=8))[0]
    assert said == "3"                                  # what the bundled model was trained to say
    forced, _ = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32, quant=QuantConfig(8), kernels="plain"))
    assert {m.kernel_dtype for m in forced.modules() if type(m) is WeightOnlyLinear} == {torch.float32}
    # --compile: the compiled step calls the same kernels, so it takes the measured dtype too
    # (it had kept the fp32 one: 5x slower int8 decode on an AVX2-only CPU)
    compiled, _ = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32, quant=QuantConfig(8), compile=True))
    assert {m.kernel_dtype for m in compiled.modules() if type(m) is WeightOnlyLinear} == {torch.bfloat16}


def test_the_flags_reach_the_loader():
    import argparse
    from utils.apps.args import add_model_args, options_from_args
    p = argparse.ArgumentParser()
    add_model_args(p)

    def opts(*argv):
        o = options_from_args(p.parse_args(["--device", "cpu", "--dtype", "float32", *argv]))
        return o.pack, o.kernels, o.remeasure_kernels
    assert opts() == (True, "auto", False)               # measured by default in the apps
    assert opts("--kernels", "colmajor") == (True, "colmajor", False)
    assert opts("--remeasure_kernels") == (True, "auto", True)
    assert opts("--cpu_weights", "plain") == (False, "auto", False)     # as before: not measured
    assert opts("--cpu_weights", "packed") == (True, "packed", False)
    assert LoadOptions().pack is False and LoadOptions().kernels == "auto"   # the library default: as before


def rows_lines(kernel_per_row: float, dequant_fixed: float, dequant_per_row: float = 1e-4):
    """A timer for the weight-only kernels' rows probes: the kernel `kernel_per_row` s a row, the
    dequantized path dequant_fixed + dequant_per_row s a row; every other probe 1 ms. Records
    the probes it was asked for."""
    def timer(probes, runs):
        timer.probes += probes
        return [(p.rows * kernel_per_row if p.layout.endswith("-kernel") else dequant_fixed + p.rows * dequant_per_row)
                if p.regime == "rows" else 1e-3 for p in probes]
    timer.probes = []
    return timer


def test_the_kernel_rows_are_where_the_two_lines_cross():
    """kernel_rows from the four timings (kernel at 16 and 64 rows, then the dequantized path):
    where their lines meet, never below a decode batch's rows (invariant.ROWS), at most
    MAX_KERNEL_ROWS where the kernel never falls behind."""
    from models.invariant import ROWS
    assert kernels.KERNEL_ROW_PROBES == (16, 64) and kernels.MIN_KERNEL_ROWS >= ROWS
    assert kernels.crossover([16e-3, 64e-3, 41.6e-3, 46.4e-3]) == 44
    assert kernels.crossover([16e-3, 64e-3, 10e-3, 12e-3]) == kernels.MIN_KERNEL_ROWS   # the GEMM wins from the start
    assert kernels.crossover([16e-3, 20e-3, 41.6e-3, 60e-3]) == kernels.MAX_KERNEL_ROWS   # never behind
    assert kernels.crossover([1e-3, 4e-3, 100e-3, 101e-3]) == kernels.MAX_KERNEL_ROWS   # beyond the cap


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_only_layers_run_their_kernel_up_to_the_rows_measured_here(bits, cache_dir, monkeypatch):
    """Each shape class of int8 / int4 layers that decode (not the prefill-only ones, nor the LM
    head) is timed at 16 and 64 rows through PyTorch's kernel and the dequantized GEMM; its
    layers run the kernel up to the crossover, the GEMM beyond, and compute the same product
    either way. Cached: a second load times nothing; --remeasure_kernels times again."""
    from models.quantize import WeightOnlyLinear, quantize
    model = quantize(tiny(torch.bfloat16), bits, vision_bits=8)
    timer = rows_lines(1e-3, 40e-3)                                          # crossing at 44 rows
    chosen = kernels.choose_kernel_rows(model, timer=timer)
    timed = {(p.out, p.inp) for p in timer.probes}
    layers = {name: m for name, m in model.named_modules() if type(m) is WeightOnlyLinear and m.bits == bits}
    assert set(chosen.values()) == {44} and len(timer.probes) == 4 * len(chosen)
    for name, m in layers.items():
        decodes = role(name) == "both"
        assert (m.kernel_rows == 44) == decodes and ((m.out_features, m.in_features) in timed or not decodes), name
    m = next(m for name, m in layers.items() if role(name) == "both")
    name = "_weight_int4pack_mm_for_cpu" if bits == 4 else "_weight_int8pack_mm"
    real, calls = getattr(torch, name), []
    monkeypatch.setattr(torch, name, lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for rows in (44, 45):
        x = torch.randn(rows, m.in_features).bfloat16()
        with torch.inference_mode():
            y = m(x).float()
        torch.testing.assert_close(y, F.linear(x, m.dequantize()).float(), rtol=2e-2, atol=2e-2)
    assert calls == [44]                                                     # 45 rows: the dequantized GEMM
    again = rows_lines(1e-3, 10e-3)
    assert kernels.choose_kernel_rows(quantize(tiny(torch.bfloat16), bits, vision_bits=8), timer=again) == chosen
    assert again.probes == []                                                # cached
    assert set(kernels.choose_kernel_rows(model, remeasure=True, timer=again).values()) == {16}
    assert json.loads(cache_dir.read_text())["timings"]


def test_a_forced_layout_leaves_the_kernel_rows_unmeasured(monkeypatch):
    from models.quantize import KERNEL_ROWS, QuantConfig, WeightOnlyLinear
    timer = rows_lines(1e-3, 40e-3)
    monkeypatch.setattr(kernels, "median_seconds", timer)
    model, _ = load_model("tiny-cogvlm", LoadOptions(quant=QuantConfig(4), kernels="plain"))
    layers = [m for m in model.modules() if type(m) is WeightOnlyLinear]
    assert layers and timer.probes == [] and {m.kernel_rows for m in layers} == {None}
    assert all(m.takes_kernel(KERNEL_ROWS[m.bits]) and not m.takes_kernel(KERNEL_ROWS[m.bits] + 1) for m in layers)
    model, _ = load_model("tiny-cogvlm", LoadOptions(quant=QuantConfig(4), pack=True))       # measured
    assert {p.regime for p in timer.probes} >= {"rows"}


def test_tensor_parallel_ranks_take_their_group_leaders_kernel_rows(monkeypatch):
    from models import tp
    from models.quantize import WeightOnlyLinear, quantize
    model = quantize(tiny(), 8)
    model.runtime.tp_world = 2
    offered = []
    monkeypatch.setattr(tp, "from_group_leader", lambda obj: offered.append(obj) or {k: 30 for k in obj})
    kernels.choose_kernel_rows(model, timer=rows_lines(1e-3, 40e-3))
    assert offered and set(offered[0].values()) == {44}                     # this rank measured 44...
    assert {m.kernel_rows for n, m in model.named_modules() if type(m) is WeightOnlyLinear and role(n) == "both"} \
        == {30}                                                              # ...its leader 30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [4, 8])
def test_greedy_answers_do_not_depend_on_the_kernel_rows(bits, dtype, tmp_path, monkeypatch):
    """The bundled model quantized, its prompt's text rows through PyTorch's kernel (rows
    measured up to 1024) or through the dequantized GEMM (from 17 rows): the same greedy answer."""
    from models.quantize import QuantConfig, WeightOnlyLinear
    from utils.chat import ImageContext, chat, prepare
    from utils.chat.tokenizer import Tokenizer
    from models.generate import GenerationConfig
    tok = Tokenizer(ROOT / "assets" / "checkpoints" / "tiny-cogvlm" / "tokenizer")
    question = "Describe the image with boxes, every shape in it and its colour, one by one."
    answers = []
    for name, timer in (("kernel", rows_lines(1e-3, 1.0)), ("gemm", rows_lines(1e-3, 0.0))):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / name))
        monkeypatch.setattr(kernels, "median_seconds", timer)
        model, cfg = load_model("tiny-cogvlm", LoadOptions(dtype=dtype, quant=QuantConfig(bits), pack=True,
                                                           compile=False))
        image = ImageContext(ROOT / "assets" / "scene.png", cfg)
        assert int((~prepare(model, tok, question, [], image).vision_mask).sum()) > 16
        assert {m.kernel_rows for n, m in model.named_modules() if type(m) is WeightOnlyLinear and role(n) == "both"} \
            == {kernels.MAX_KERNEL_ROWS if name == "kernel" else 16}
        answers.append(chat(model, tok, question, [], image, gen=GenerationConfig(max_new_tokens=40))[0])
    assert answers[0] == answers[1] and answers[0]


def test_timings_taken_while_the_cpu_is_busy_change_nothing(cache_dir):
    """The background compile of the int4 expansion times the rows again against its compiled
    pass (busy=...): where the kernel now runs slower than its cached figure by more than that
    ratio (the CPU shared with a compile or requests), the class keeps its rows and the cache
    its figures; on a quiet CPU the compiled pass's figures are cached beside the kernel's."""
    from models.quantize import WeightOnlyLinear, quantize
    model = quantize(tiny(torch.bfloat16), 4, vision_bits=8)
    kernels.choose_kernel_rows(model, timer=rows_lines(1e-3, 40e-3))                       # 44 rows
    layers = [m for m in model.modules() if type(m) is WeightOnlyLinear and m.kernel_rows]
    cached = json.loads(cache_dir.read_text())["timings"]
    busy = rows_lines(3e-3, 10e-3)                                           # the kernel 3x slower
    assert kernels.measure_kernel_rows(layers, "fused", timer=busy, busy=1.3) == {}
    assert {m.kernel_rows for m in layers} == {44} and json.loads(cache_dir.read_text())["timings"] == cached
    quiet = rows_lines(1e-3, 10e-3)
    assert set(kernels.measure_kernel_rows(layers, "fused", timer=quiet, busy=1.3).values()) == {16}
    now = json.loads(cache_dir.read_text())["timings"]
    assert {k: v for k, v in now.items() if k in cached} == cached and any("-fused " in k for k in now)


def pieces_timer(fastest: int):
    """Rows probes of choose_row_pieces: `fastest` GEMM calls take 1 ms, other counts 2 ms;
    every other probe 1 ms. Records the probes."""
    def timer(probes, runs):
        timer.probes += probes
        return [(1e-3 if p.layout.endswith(f"-pieces{fastest}") else 2e-3) if p.regime == "long" else 1e-3
                for p in probes]
    timer.probes = []
    return timer


@pytest.mark.parametrize("bits", [0, 8])
def test_prefill_only_packed_layers_run_an_images_rows_in_the_calls_measured_fastest(bits, monkeypatch):
    """Each shape class of oneDNN-packed layers only prefill runs (bf16, and int8 codes in the
    packed order) is timed on an image's rows in 1, 2 and 3 GEMM calls; its layers take the
    fastest (row_step) and compute the same product either way. Fewer rows than two pieces of
    MIN_PIECE_ROWS: nothing timed. Cached: a second model times nothing."""
    from models.layout import PackedInt8Linear, PackedLinear
    from models.quantize import quantize
    dtype = torch.bfloat16 if can_pack(torch.bfloat16) else torch.float32
    if not can_pack(dtype):
        pytest.skip("PyTorch without oneDNN")

    def packed_model():
        model = tiny(dtype)
        if bits:
            quantize(model, 8, vision_bits=8)
        apply_layouts(model, choose_layouts(model, "packed_many"))
        return model
    model = packed_model()
    layers = [m for n, m in model.named_modules() if isinstance(m, (PackedLinear, PackedInt8Linear))
              and role(n) == "prefill"]
    assert layers and (bits == 0 or any(isinstance(m, PackedInt8Linear) for m in layers))
    small = pieces_timer(2)
    assert kernels.choose_row_pieces(model, rows=2 * kernels.MIN_PIECE_ROWS - 1, timer=small) == {}
    assert small.probes == []
    rows = 2 * kernels.MIN_PIECE_ROWS + 10
    timer = pieces_timer(2)
    chosen = kernels.choose_row_pieces(model, rows=rows, timer=timer)
    assert set(chosen.values()) == {-(-rows // 2)} and {m.row_step for m in layers} == {-(-rows // 2)}
    assert {p.layout.rsplit("-", 1)[1] for p in timer.probes} == {"pieces1", "pieces2"}  # 3 calls: under the minimum
    from models import layout
    seen, real = [], layout.row_pieces
    monkeypatch.setattr(layout, "row_pieces", lambda n, step: seen.append(len(real(n, step))) or real(n, step))
    m = max(layers, key=lambda m: m.out_features * m.in_features)
    x = torch.randn(rows, m.in_features).to(dtype)
    with torch.inference_mode():
        pieces = m(x)
        m.row_step = None
        whole = m(x)
    assert seen == [2, 1]                                                   # two GEMM calls, then one
    torch.testing.assert_close(pieces, whole, rtol=1e-2, atol=1e-2)
    again = pieces_timer(1)
    assert kernels.choose_row_pieces(packed_model(), rows=rows, timer=again) == chosen and again.probes == []


def test_greedy_answers_do_not_depend_on_the_row_pieces(monkeypatch, tmp_path):
    """The bundled model's image encoder (145 rows) in one GEMM call a layer, or in three."""
    from utils.chat import ImageContext, chat
    from utils.chat.tokenizer import Tokenizer
    from models.generate import GenerationConfig
    from models.layout import PackedInt8Linear, PackedLinear
    from models.quantize import QuantConfig
    dtype = torch.bfloat16 if can_pack(torch.bfloat16) else torch.float32     # auto's dtype, where oneDNN packs it
    if not can_pack(dtype):
        pytest.skip("PyTorch without oneDNN")
    tok = Tokenizer(ROOT / "assets" / "checkpoints" / "tiny-cogvlm" / "tokenizer")
    monkeypatch.setattr(kernels, "MIN_PIECE_ROWS", 40)
    answers = []
    for fastest in (1, 3):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / str(fastest)))
        monkeypatch.setattr(kernels, "median_seconds", pieces_timer(fastest))
        model, cfg = load_model("tiny-cogvlm", LoadOptions(dtype=dtype, quant=QuantConfig(8), pack=True,
                                                           compile=False))
        steps = {m.row_step for n, m in model.named_modules() if isinstance(m, (PackedLinear, PackedInt8Linear))
                 and role(n) == "prefill"}
        assert steps == ({None} if fastest == 1 else {-(-(cfg.image_length + 1) // 3)})
        answers.append(chat(model, tok, "Describe the image with boxes.", [],
                            ImageContext(ROOT / "assets" / "scene.png", cfg), gen=GenerationConfig(max_new_tokens=40))[0])
    assert answers[0] == answers[1] and answers[0]
