"""--compile: the inductor-compiled decode step (models/compile.py) gives the eager step's logits
and greedy answers, on CogVLM and on CogAgent (cross attention), unquantized and int8; without a
C++ compiler, or when compiling fails, decoding goes on eagerly with one warning. Not timed:
bench/decode.py --compile measures the speed."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import Cache, LoadOptions, QuantConfig, load_model
from models.compile import compile_decode
from models.generate import decode_one_token, prefill
from models.loading import resolve_dtype
from models.quantize import WeightOnlyLinear

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own models: dynamo's recompile limit per function (8) would count
    every model this process compiled before (a CI worker runs the whole file)."""
    torch._dynamo.reset()


def _decode_logits(model, cfg, steps: int = 6) -> torch.Tensor:
    """Prefill an image + text prompt, then `steps` greedy decode steps: their logits, steps,V."""
    from bench.common import image_prompt
    from models.generate import ModelInputs
    torch.manual_seed(0)                           # the prompt's text tokens and the images
    ids, pos, vision, slots = image_prompt(cfg, 5)
    out = []
    with torch.inference_mode():
        emb = model.encode_images(torch.randn(1, 3, cfg.eva.image_size, cfg.eva.image_size))
        ckv = model.cross_kv(torch.randn(1, 3, cfg.cross.image_size, cfg.cross.image_size)) \
            if cfg.cross is not None else None
        cache = Cache.allocate(cfg, 1, ids.shape[1] + steps, emb.dtype, "cpu")
        logits = prefill(model, ModelInputs(ids, pos, vision, slots, image_embeds=emb, cross_kv=ckv), cache)
        for _ in range(steps):
            logits = decode_one_token(model, logits.argmax(-1), cache)
            out.append(logits[0].float())
    return torch.stack(out)


@pytest.mark.parametrize("name,quant,layout", [("tiny-cogvlm", None, None), ("tiny-cogagent", 8, None),
                                               ("tiny-cogvlm", None, "half")])
def test_compiled_decode_matches_eager(name, quant, layout, caplog, monkeypatch):
    """Every row's attention on the default (batch-invariant) path is taken as long and as
    faster compiled: inside the compiled step it must not call its own compiled function (a
    CI failure: dynamo cannot trace the timing around it). layout half: the step calls FBGEMM's
    fp16 weights through an operator inductor keeps opaque."""
    import models.compile as mc
    from models.kernels import choose_layouts
    from models.layout import apply_layouts, can_half
    if layout == "half" and not can_half():
        pytest.skip("PyTorch without FBGEMM's fp16-weight linear")
    monkeypatch.setattr(mc, "LONG_CONTEXT", 1)
    monkeypatch.setattr(mc.LongContextAttention, "_choose", lambda self, *a: self._compile() or "compiled")
    dtype = resolve_dtype("auto", "cpu")           # bf16 where the CPU has it, else fp32
    model, cfg = load_model(name, LoadOptions(dtype=dtype, quant=QuantConfig(bits=quant)))
    if layout:
        apply_layouts(model, choose_layouts(model, layout))
    if quant:              # as the apps run an fp32 model's int8 layers where bf16 measured faster
        for m in model.modules():
            if isinstance(m, WeightOnlyLinear):
                m.kernel_in(torch.bfloat16)
    eager = _decode_logits(model, cfg)
    with caplog.at_level(logging.INFO, logger="models.compile"):
        assert compile_decode(model)
        compiled = _decode_logits(model, cfg)
    assert "decode step compiled" in caplog.text and "running it eagerly" not in caplog.text
    assert model.runtime.decode_step.calls > 0 and not model.runtime.decode_step.failed
    long_rows = model.model.layers[0].self_attn.decode_attention.keywords["one"]
    assert long_rows.compiled is not None and long_rows.compiled.calls > 0    # it ran, eagerly
    # Same greedy tokens; logits within the rounding of the compute dtype.
    assert torch.equal(eager.argmax(-1), compiled.argmax(-1))
    err = (eager - compiled).abs().max() / eager.abs().max()
    bf16 = dtype == torch.bfloat16 or quant            # int8 kernels on bf16 activations
    assert err < (0.03 if bf16 else 1e-4), f"relative logit error {err:.4f}"


@pytest.mark.parametrize("kernel", ["fused", "compiled"])
def test_a_compiled_step_calls_the_long_row_kernel_measured_fastest(kernel, monkeypatch):
    """The compiled decode step's single-row attention: where an eager kernel read long caches
    faster (timed before compiling: tracing cannot time), the step calls it through an operator
    inductor keeps opaque, on the cache views in place; where inductor's won, it is inlined.
    Same greedy tokens, logits within fp32 rounding."""
    import models.compile as mc
    monkeypatch.setattr(mc.LongContextAttention, "_choose", lambda self, *a: kernel)
    calls, fused = [], mc.fused_single_query_attention
    monkeypatch.setattr(mc, "fused_single_query_attention", lambda *a: calls.append(1) or fused(*a))
    model, cfg = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32, deterministic=False))
    eager = _decode_logits(model, cfg)                 # short rows: no fused call
    assert not calls and compile_decode(model)
    compiled = _decode_logits(model, cfg)
    assert model.runtime.decode_step.calls > 0 and not model.runtime.decode_step.failed
    assert bool(calls) == (kernel == "fused"), len(calls)
    assert torch.equal(eager.argmax(-1), compiled.argmax(-1))
    assert (eager - compiled).abs().max() / eager.abs().max() < 1e-4


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch without oneDNN")
def test_the_layers_only_prefill_runs_keep_their_measured_layout_under_a_compiled_step(tmp_path, monkeypatch):
    """A compiled step never reads the image encoder's or the vision experts' weights, so those
    take the layout measured fastest for prefill (here, by mock timings, oneDNN packed for many
    rows) while every layer a step reads stays plain for inductor; the step compiles and gives
    the eager model's greedy tokens."""
    from models import kernels
    from models.layout import MANY_ROWS, PackedLinear
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))             # the mock timings stay here
    best = {"decode": "packed", "batch": "packed", "prefill": "packed_many"}
    monkeypatch.setattr(kernels, "median_seconds",
                        lambda probes, runs: [1e-3 if p.layout == best[p.regime] else 2e-3 for p in probes])
    dtype = resolve_dtype("auto", "cpu")
    opts = dict(dtype=dtype, deterministic=False)
    model, cfg = load_model("tiny-cogvlm", LoadOptions(**opts, compile=True))
    eager_model, _ = load_model("tiny-cogvlm", LoadOptions(**opts, compile=False))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (PackedLinear, torch.nn.Linear))}
    prefill_only = {n for n in linears if kernels.role(n) == "prefill"}
    assert prefill_only and all(isinstance(linears[n], PackedLinear) and linears[n].hint == MANY_ROWS
                                for n in prefill_only)
    assert all(type(m) is torch.nn.Linear for n, m in linears.items() if n not in prefill_only)
    assert not model.runtime.packed
    eager, compiled = _decode_logits(eager_model, cfg), _decode_logits(model, cfg)
    assert model.runtime.decode_step.calls > 0 and not model.runtime.decode_step.failed
    assert torch.equal(eager.argmax(-1), compiled.argmax(-1))
    err = (eager - compiled).abs().max() / eager.abs().max()
    assert err < (0.03 if dtype == torch.bfloat16 else 1e-4), f"relative logit error {err:.4f}"


def test_without_a_compiler_decoding_stays_eager(monkeypatch, caplog):
    from models import compile as comp
    model, cfg = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32))
    monkeypatch.setattr(comp.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with caplog.at_level(logging.WARNING, logger="models.compile"):
        assert not compile_decode(model)
    assert "needs a C++ compiler" in caplog.text and model.runtime.decode_step is None


def test_a_failing_compilation_falls_back_to_eager(monkeypatch, caplog):
    """A compiler error on the first step (here a stand-in that raises) logs one warning and
    every step, that one included, runs eagerly with the same result."""
    from models import compile as comp

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("C++ compile error: cc1plus killed\nmore lines")
        return run
    model, cfg = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32))
    eager = _decode_logits(model, cfg, steps=3)
    monkeypatch.setattr(comp.torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="models.compile"):
        assert compile_decode(model)
        fallback = _decode_logits(model, cfg, steps=3)
    assert torch.equal(eager, fallback)
    assert model.runtime.decode_step.failed
    assert caplog.text.count("compiling the decode step failed (C++ compile error: cc1plus killed); "
                             "running it eagerly") == 1


def test_every_inference_entry_point_takes_compile(tmp_path):
    """The CLI answers the same with --compile; the other apps accept the flag; tensor
    parallel runs refuse it with a clear message."""
    env = {**os.environ, "LOGLEVEL": "INFO", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "basic_demo" / "cli_demo_sat.py"), "--from_pretrained",
                        "tiny-cogvlm", "--compile", "--image", str(ROOT / "assets" / "scene.png"), "--query",
                        "How many shapes are there?", "--output_dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=400, cwd="/", env=env)
    assert p.returncode == 0 and p.stdout.strip() == "3", p.stderr[-3000:]
    assert "decode step compiled" in p.stderr
    sys.path.insert(0, str(ROOT / "openai_demo"))
    from basic_demo.web_demo import parse_args as web_args
    from composite_demo.registry import parse as composite_args
    from openai_api import parse_args as server_args
    assert web_args(["--compile"]).compile and composite_args(["--compile"]).compile
    assert web_args([]).compile is None and composite_args(["--no-compile"]).compile is False   # None: background
    assert server_args(["--compile"]).compile and not server_args([]).compile


def test_int8_models_run_large_batches_eagerly():
    """inductor's int8 kernel loses from 8 rows on (bench/RESULTS.md): an int8 model's compiled
    step hands steps of more than INT8_MAX_ROWS rows to the eager forward; bf16 keeps them."""
    from models import compile as comp
    model, cfg = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32, quant=QuantConfig(bits=8)))
    assert compile_decode(model) and model.runtime.decode_step.max_rows == comp.INT8_MAX_ROWS
    seen = []
    model.runtime.decode_step.compiled = lambda *args: seen.append(args[1].shape[0]) or "compiled"
    for rows in (1, comp.INT8_MAX_ROWS, comp.INT8_MAX_ROWS + 1):
        with torch.inference_mode():
            cache = Cache.allocate(cfg, rows, 4, torch.float32, "cpu")
            cache.next_position = torch.zeros(rows, dtype=torch.long)
            out = decode_one_token(model, torch.zeros(rows, dtype=torch.long), cache)
        assert (out == "compiled") == (rows <= comp.INT8_MAX_ROWS)
    assert seen == [1, comp.INT8_MAX_ROWS]
    plain, _ = load_model("tiny-cogvlm", LoadOptions(dtype=torch.float32))
    assert compile_decode(plain) and plain.runtime.decode_step.max_rows is None


def test_compiled_attention_in_the_batch_engine(cogagent_ckpt, tokenizer, image_file, caplog):
    """openai_api.py --compile: the batch engine's one-token attention (self and cross) runs
    compiled, with the eager engine's greedy answers for requests joining at different steps."""
    from PIL import Image
    from models.compile import compile_attention
    from tests.test_engine import run_requests
    from utils.chat import ImageContext
    from utils.serving.engine import BatchEngine
    model, cfg = load_model(str(cogagent_ckpt))
    specs = [("What is in the image?", ImageContext(image_file, cfg), 20, None),
             ("Tell me a story.", None, 16, None),
             ("Colour?", ImageContext(Image.new("RGB", (50, 70), (10, 120, 250)), cfg), 12, None)]

    def answers():
        engine = BatchEngine(model, tokenizer, max_batch=3, max_len=160)
        res = run_requests(engine, model, tokenizer, specs, [0, 0.05, 0.1], timeout=300)
        engine.close()
        return [text for text, _ in res]
    eager = answers()
    with caplog.at_level(logging.INFO, logger="models.compile"):
        assert compile_attention(model)
        compiled = answers()
    fn = model.model.layers[0].self_attn.decode_attention
    assert fn is model.model.layers[0].cross_attn.decode_attention and fn.calls > 0 and not fn.failed
    assert "decode attention compiled" in caplog.text
    assert compiled == eager and all(compiled)


# ----- --compile unset: the single-stream apps compile the step in the background -------------
def _app_model(name: str, *flags):
    """`name` loaded with the options cli_demo_sat.py gives it (its flags' defaults)."""
    from basic_demo.cli_demo_sat import parse_args
    from utils.apps.args import options_from_args
    return load_model(name, options_from_args(parse_args(["--from_pretrained", name, *flags])))


def _request(model, cfg, image: bool = True):
    """A request's prompt prefilled into its own cache: (cache, logits)."""
    from bench.common import image_prompt
    from models.generate import ModelInputs
    torch.manual_seed(0)
    ids, pos, vision, slots = image_prompt(cfg, 5)
    with torch.inference_mode():
        emb = model.encode_images(torch.randn(1, 3, cfg.eva.image_size, cfg.eva.image_size))
        ckv = model.cross_kv(torch.randn(1, 3, cfg.cross.image_size, cfg.cross.image_size)) \
            if cfg.cross is not None and image else None
        cache = Cache.allocate(cfg, 1, ids.shape[1] + 16, emb.dtype, "cpu")
        return cache, prefill(model, ModelInputs(ids, pos, vision, slots, image_embeds=emb, cross_kv=ckv), cache)


def _steps(model, cache, logits, n: int) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for _ in range(n):
            logits = decode_one_token(model, logits.argmax(-1), cache)
            out.append(logits[0].float())
    return torch.stack(out)


@pytest.mark.parametrize("faster", ["compiled", "eager"])
def test_the_single_stream_apps_compile_the_step_in_the_background(faster, monkeypatch, caplog):
    """CogAgent as cli_demo_sat.py loads it with no --compile: a request started while the
    step compiles decodes eagerly to its end; the next one times both steps (injected here) and
    decodes with the faster one: compiled, with the eager tokens (fp32 logits within 1e-4);
    eager, with the compiled step dropped and the layers laid out again for eager decoding. A
    request without an image, which the compiled graph does not fit, decodes eagerly without
    compiling again."""
    import threading
    import models.compile as mc
    monkeypatch.setattr(mc, "BACKGROUND_MIN_WEIGHTS", 0)             # the bundled model is small
    hold, compile_now = threading.Event(), mc.BackgroundCompiled._compile
    monkeypatch.setattr(mc.BackgroundCompiled, "_compile", lambda self: hold.wait() and compile_now(self))
    monkeypatch.setattr(mc.BackgroundCompiled, "_time", lambda self: (1.0, 0.5) if faster == "compiled" else (0.5, 1.0))
    relaid = []
    with caplog.at_level(logging.INFO, logger="models.compile"):
        model, cfg = _app_model("tiny-cogagent")
        step = model.runtime.decode_step
        assert isinstance(step, mc.BackgroundCompiled) and "compiling the decode step in the background" in caplog.text
        early, logits = _request(model, cfg)
        eager = _steps(model, early, logits, 3)              # while compiling
        hold.set()
        step.ready.wait(300)
        assert step.error is None, step.error
        lay_out = step.on_eager
        monkeypatch.setattr(step, "on_eager", lambda: relaid.append(lay_out()))
        eager = torch.cat([eager, _steps(model, early, eager[-1:], 3)])
        assert early.decode_kind == "eager" and step.choice is None            # not asked yet
        late, logits = _request(model, cfg)
        late_logits = _steps(model, late, logits, 6)
    assert late.decode_kind == faster and step.choice == faster
    assert caplog.text.count("decode step: compiled 500.0 ms, eager 1000.0 ms") == (faster == "compiled")
    assert torch.equal(eager.argmax(-1), late_logits.argmax(-1))
    assert (eager - late_logits).abs().max() / eager.abs().max() < 1e-4
    if faster == "eager":
        assert step.compiled is None and len(relaid) == 1 and "the compiled step is dropped" in caplog.text
        return
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    text_only, logits = _request(model, cfg, image=False)
    _steps(model, text_only, logits, 3)
    assert text_only.decode_kind == "eager" and torch._dynamo.utils.counters["frames"]["ok"] == frames


def test_a_step_that_loses_to_eager_drops_its_own_graphs_only(monkeypatch):
    """Two models in one process (the composite demo holds up to three), each compiling its step
    in the background: the one whose eager step is timed faster drops its own compiled graphs,
    and the other goes on decoding compiled, without compiling again (torch._dynamo.reset() would
    have dropped both: the other model's requests then decoded eagerly)."""
    import models.compile as mc
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list as entries
    monkeypatch.setattr(mc, "BACKGROUND_MIN_WEIGHTS", 0)             # the bundled models are small
    loaded = {name: _app_model(name) for name in ("tiny-cogvlm", "tiny-cogagent")}
    steps = {name: m.runtime.decode_step for name, (m, _) in loaded.items()}
    for step in steps.values():
        assert isinstance(step, mc.BackgroundCompiled)
        step.ready.wait(300)
        assert step.error is None, step.error
    monkeypatch.setattr(steps["tiny-cogvlm"], "_time", lambda: (1.0, 0.5))       # compiled faster
    monkeypatch.setattr(steps["tiny-cogagent"], "_time", lambda: (0.5, 1.0))     # eager faster
    kinds = []
    for name in ("tiny-cogvlm", "tiny-cogagent", "tiny-cogvlm"):
        model, cfg = loaded[name]
        if name == "tiny-cogagent":
            frames = torch._dynamo.utils.counters["frames"]["ok"]
        cache, logits = _request(model, cfg)
        _steps(model, cache, logits, 3)
        kinds.append(cache.decode_kind)
    assert kinds == ["compiled", "eager", "compiled"]
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames                 # nothing compiled again
    assert steps["tiny-cogagent"].compiled is None and not entries(steps["tiny-cogagent"].step)
    assert entries(steps["tiny-cogvlm"].step)
    assert steps["tiny-cogvlm"].step.__code__ is not steps["tiny-cogagent"].step.__code__


@pytest.mark.parametrize("where", ["background", "--compile from another thread"])
def test_a_step_compiled_off_the_main_thread_freezes_its_weights_and_times_kernels_quietly(where, monkeypatch,
                                                                                           tmp_path):
    """torch 2.13 keeps inductor's settings per thread: a step compiled in the background thread
    (or, with --compile, first called from a web demo's request thread) still freezes its
    weights (set on the main thread only, it did not: an AMX Xeon's int8 step kept ATen's
    kernel, 77 against 58 ms). Inductor's timings of candidate kernels in the background
    thread never overlap an eager step (beside one, the choices were noise). The compiler's freed
    memory goes back to the OS from the compiling thread."""
    import threading
    import time
    import torch._inductor.freezing as freezing
    from torch._inductor.runtime.benchmarking import benchmarker
    import models.compile as mc
    monkeypatch.setattr(mc, "BACKGROUND_MIN_WEIGHTS", 0)             # the bundled model is small
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))     # cold: inductor times its kernels,
    monkeypatch.setattr("torch._inductor.select_algorithm._ALGORITHM_SELECTOR_CACHE", None)   # none remembered
    froze, timed, stepped, trimmed = [], [], [], []
    freeze_now, time_now = freezing.freeze, benchmarker.benchmark_cpu
    monkeypatch.setattr(mc, "release_free_memory", lambda: trimmed.append(threading.current_thread().name))
    monkeypatch.setattr(freezing, "freeze", lambda *a, **k: froze.append(threading.current_thread().name)
                        or freeze_now(*a, **k))

    def timing(*args, **kwargs):                     # inductor timing a candidate, held longer
        start = time.perf_counter()
        out = time_now(*args, **kwargs)
        time.sleep(0.3)                              # the GIL free: a step could run here
        timed.append((start, time.perf_counter()))
        return out
    monkeypatch.setattr(benchmarker, "benchmark_cpu", timing)
    step_now = mc.forward_one_token

    def eager_step(*args):                           # an eager step of the main thread (traced: the step)
        if torch.compiler.is_dynamo_compiling() or threading.current_thread() is not threading.main_thread():
            return step_now(*args)
        start = time.perf_counter()
        out = step_now(*args)
        stepped.append((start, time.perf_counter()))
        return out
    monkeypatch.setattr(mc, "forward_one_token", eager_step)
    flags = ("--quant", "8") + (("--compile",) if where != "background" else ())
    model, cfg = _app_model("tiny-cogvlm", *flags)
    step = model.runtime.decode_step
    if where == "background":
        assert isinstance(step, mc.BackgroundCompiled)
        cache, logits = _request(model, cfg)
        while not step.ready.wait(0):                  # eager steps while it compiles
            _steps(model, cache, logits, 1)
            with torch.inference_mode():               # the same slot again: the cache never fills
                cache.length, cache.next_position = cache.length - 1, cache.next_position - 1
        assert step.error is None, step.error
        assert step.decide() in ("compiled", "eager")
    else:
        worker = threading.Thread(target=lambda: _steps(model, *_request(model, cfg), 2), name="request")
        worker.start()
        worker.join(600)
        assert not step.failed and step.calls > 0
    assert froze and set(froze) == {"compile-decode-step" if where == "background" else "request"}
    assert set(froze) <= set(trimmed)                  # the compiler's freed memory given back to the OS
    if where == "background":
        if not timed:        # run alone (or first in its process) it times them; a file run may not
            pytest.skip("inductor reused kernel choices made earlier in this process: no timing to check")
        assert stepped and not [(s, t) for s in stepped for t in timed if s[0] < t[1] and t[0] < s[1]]


def test_a_fast_step_or_too_little_memory_decodes_eagerly(monkeypatch, caplog):
    """The bundled model's step (3 M weights) does not repay a compile, nor does one whose frozen
    weights would take more than half the memory available: no background compile, and the
    layers take the layouts eager decoding measures (those of --no-compile)."""
    import models.compile as mc
    from models.loading import LoadOptions as Opts, modes
    from utils.apps.args import options_from_args
    from basic_demo.cli_demo_sat import parse_args
    opts = options_from_args(parse_args(["--from_pretrained", "tiny-cogvlm"]))
    assert opts.compile is None and modes(opts)[1] == (mc.compiler_missing() is None)
    assert options_from_args(parse_args(["--no-compile"])).compile is False
    assert not modes(Opts(single_stream=False))[1]             # the server, the evaluation runner
    layouts = lambda m: [type(x).__name__ for x in m.modules()]
    # Every shape class timed by the first load (a slow box leaves some to later loads otherwise).
    monkeypatch.setattr("models.kernels.BUDGET_S", 1e9)
    eager, _ = _app_model("tiny-cogvlm", "--no-compile")
    with caplog.at_level(logging.INFO, logger="models.compile"):
        fast, _ = _app_model("tiny-cogvlm")
        monkeypatch.setattr(mc, "BACKGROUND_MIN_WEIGHTS", 0)
        monkeypatch.setattr(mc, "available_memory", lambda: 1 << 30)
        short, _ = _app_model("tiny-cogvlm")
    if mc.compiler_missing() is not None:
        pytest.skip("no C++ compiler here: the background compile never applies")
    assert "decode step of 3 M weights: too small to repay compiling it" in caplog.text and "more than half of the 1.1 GB available" in caplog.text
    for m in (fast, short):
        assert m.runtime.decode_step is None and layouts(m) == layouts(eager)


def test_a_one_shot_cli_run_compiles_nothing(monkeypatch, caplog, tmp_path):
    """cli_demo_sat.py --query answers once and exits: a background compile would go unused."""
    import models.compile as mc
    from basic_demo.cli_demo_sat import main
    monkeypatch.setattr(mc, "BACKGROUND_MIN_WEIGHTS", 0)
    with caplog.at_level(logging.INFO):
        assert main(["--from_pretrained", "tiny-cogvlm", "--query", "Describe the image.",
                     "--image", str(ROOT / "assets" / "scene.png"), "--output_dir", str(tmp_path)]) == 0
    assert "loading" in caplog.text and "in the background" not in caplog.text


def test_exiting_while_the_step_compiles_in_the_background(tmp_path):
    """A process that ends while its decode step compiles stops the compile thread first: left
    inside torch's C++ code while the process tears down, it aborted the process ("terminate
    called without an active exception": without the stop, 4 of 7 runs that exited 2 to 7 s
    after an answer). Here an app model answers, waits 2, 4 or 6 s and exits, each run with an
    empty inductor cache (so the compile is still running)."""
    script = ("import sys, time; sys.path.insert(0, {root!r}); import models.compile as mc\n"
              "mc.BACKGROUND_MIN_WEIGHTS = 0\n"
              "from tests.test_compile import _app_model, _request, _steps\n"
              "model, cfg = _app_model('tiny-cogvlm')\n"
              "cache, logits = _request(model, cfg)\n"
              "_steps(model, cache, logits, 3)\n"
              "time.sleep({delay})\n")
    for delay in (2, 4, 6):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor{delay}")}
        p = subprocess.run([sys.executable, "-c", script.format(root=str(ROOT), delay=delay)], capture_output=True,
                           text=True, timeout=300, env=env)
        assert p.returncode == 0 and "terminate called" not in p.stderr, p.stderr[-2000:]
