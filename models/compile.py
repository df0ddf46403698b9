"""The single-token decode step compiled by inductor with frozen weights, applied after the
model is loaded (quantized or not), on CPU: by its first step with `--compile`
(`compile_decode`), or, the single-stream apps' default, in a background thread while requests
decode eagerly, then kept only if timed faster than eager (`compile_in_background`).

Why: a decode step reads every weight once, and PyTorch's eager single-row kernels read them
well below the machine's memory bandwidth. Inductor with `freezing` treats the weights as
constants, packs them once and picks, per layer shape, its own C++ GEMV template or oneDNN
(max-autotune); the speed-up per dtype is in bench/RESULTS.md ("`--compile`"). Costs, also
measured there: the first decode step compiles for about a minute on 2 cores (once per process;
`dynamic=True` so every context length shares it), the compiled step holds its own packed copy
of the language weights in bf16 and int8 (the eager model keeps its own for prefill; int4
shares them), and it needs a C++ compiler. Without one, or when compilation fails, decoding
goes on eagerly with one warning.

Layers whose measured layout is `half` (models/layout.HalfLinear: fp16 weights in FBGEMM's
GEMM, half the bytes of fp32) keep it: the compiled step calls them through an operator inductor
keeps opaque (kernels.compiled_layouts); every other weight is left plain for inductor to pack.

A single row's attention over a long cache runs the kernel measured fastest here
(`LongContextAttention.measure_long_rows`, timed before the step is compiled): inductor's,
inlined, or an eager one through the operator `cogvlm::row_attention`, which inductor keeps
opaque and which reads the cache views in place (fp32 on the AVX2 EPYC: eager 0.95 against
inductor's 1.16 us a cached token; compiled int8 slowdown 283 -> 1,299 tokens 1.38x -> 1.33x,
bytes 1.28x).

Prefill (many rows, vision-expert routing with data-dependent shapes) stays eager: it already
runs at the GEMM rate. Every compiled graph holds its own frozen weights; single-stream
generation (models.generate.decode_one_token) compiles one. The server's batch engine compiles
only the decode attention (`compile_attention`): its whole step compiled measured no faster than
the oneDNN-packed weights, its attention compiled much faster than eager. Tensor-parallel runs
stay eager. Batch-invariant decoding (the CPU default, no flag) compiles one thing only, where
measured faster: the attention of a row with a long context, or of every row in the server
(`LongContextAttention`).
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import logging
import os
import shutil
import sysconfig
import threading
import time
import types
from contextlib import contextmanager
from typing import Callable, Optional

import torch

from .cogvlm import (Cache, CrossAttention, VisionExpertAttention, decode_attention, fused_single_query_attention,
                     single_query_attention)
from .generate import forward_one_token
from .kernels import measure_kernel_rows, rows_class
from .machine import available_memory, release_free_memory
from .quantize import (FusedExpand, SplitInt4Linear, WeightOnlyLinear, _buffer, expand_kernel_int4,
                       expand_split_int4)

log = logging.getLogger(__name__)


def cxx_compiler():
    """The C++ compiler inductor would use ($CXX, else g++, c++, clang++), or None."""
    for name in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")):
        if shutil.which(name):
            return name
    return None


# inductor's weight-only int8 kernel is slower than PyTorch's eager one from 8 rows on
# (bench/RESULTS.md, "`--compile`"): int8 models run steps of more rows eagerly. bf16 and int4
# measured equal or faster compiled up to 16 rows.
INT8_MAX_ROWS = 6


class Compiled:
    """Calls `fn` compiled by inductor; the first failure (no compiler, an unsupported operator)
    logs one warning and every later call runs `fn` eagerly. max_rows: calls with more rows
    (second argument's first dimension) run eagerly (None: no limit). settings: inductor's
    config while it compiles (inductor_settings), whichever thread calls first."""

    def __init__(self, fn, what: str, first_call: str, max_rows=None, settings: Optional[dict] = None, **options):
        self.fn, self.what, self.first_call, self.max_rows = fn, what, first_call, max_rows
        self.settings = settings or {}
        self.compiled = torch.compile(fn, dynamic=True, fullgraph=True, **options)
        self.failed = False
        self.calls = 0

    def __call__(self, *args):
        if self.failed or (self.max_rows is not None and args[1].shape[0] > self.max_rows):
            return self.fn(*args)
        start = time.perf_counter()
        if self.calls == 0:
            log.info("compiling %s with inductor (%s)", self.what, self.first_call)
        try:
            with inductor_settings(self.settings):
                out = self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: run eagerly instead
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.warning("--compile: compiling %s failed (%s); running it eagerly", self.what, first[:300])
            log.debug("the compiler's error", exc_info=True)
            self.failed = True
            return self.fn(*args)
        if self.calls == 0:
            release_free_memory()                      # the compiler's temporaries
            log.info("%s compiled in %.0f s", self.what, time.perf_counter() - start)
        self.calls += 1
        return out


def compiler_missing() -> Optional[str]:
    """Why inductor cannot build its C++ kernels here, None where it can."""
    if cxx_compiler() is None:
        return "--compile needs a C++ compiler (g++ or clang++; $CXX) and none was found; running eagerly"
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"--compile needs Python's C headers (Debian: apt-get install python3-dev) and {include} has " \
               f"none; running eagerly"
    return None


def can_compile(model, warn: bool = True) -> bool:
    """Whether inductor can compile for `model` here; the reason is logged when not (warn)."""
    say = log.warning if warn else log.debug
    p = next(model.parameters())
    if p.device.type != "cpu":
        say("--compile is measured and supported on CPU only; running eagerly on %s", p.device)
        return False
    why = compiler_missing()
    if why:
        say(why)
    return why is None


def frozen_settings() -> dict:
    """inductor's settings for graphs whose weights are constants (packed once, max-autotune
    silent), applied around each call that may compile (`inductor_settings`): torch 2.13 keeps
    inductor's config per thread, so a setting made once would not reach a graph compiled in
    another thread (the background compile, a web demo's request thread). Measured on an AMX
    Xeon, the background compile without them (weights not frozen, int8 layers left to ATen's
    kernel): mid-size int8 step 77 against 58 ms."""
    return {"freezing": True, "autotune_num_choices_displayed": 0,         # no timing tables on stderr
            "max_autotune_report_choices_stats": False}


def inductor_settings(settings: dict):
    """A context in which inductor compiles with `settings` (in this thread only)."""
    import torch._inductor.config as inductor_config
    return inductor_config.patch(settings)


def set_decode_attention(model, fn) -> None:
    """The one-token attention every self and cross attention layer of `model` calls."""
    for mod in model.modules():
        if isinstance(mod, (VisionExpertAttention, CrossAttention)):
            mod.decode_attention = fn


def _prepare_inductor(model) -> dict:
    """The long rows' attention kernels chosen, and inductor's settings for the decode step."""
    if model.runtime.packed:
        raise ValueError("compile_decode needs plain weights, not packed ones (load with pack=False: "
                         "inductor packs them itself)")
    # Left to itself inductor inlines the query's rotary (cos, sin of the position) into the
    # attention's score reduction and recomputes it for every cached token; realizing pointwise
    # results of more than 8 ops keeps it in a buffer (measured: half the cost per cached token).
    settings = {**frozen_settings(), "realize_cpu_opcount_threshold": 8}
    if any(isinstance(m, WeightOnlyLinear) and m.kernel_dtype != m.dtype for m in model.modules()):
        # Weight-only layers of an fp32 model computing in bf16 (kernels.choose_quantized_kernels):
        # torch 2.13's C++ GEMM template fails to fuse the conversion back into its output
        # ("AssertionError: wrong ndim"), so no epilogue is fused into a template.
        settings["epilogue_fusion"] = False
    # A single row's attention over a long cache: the kernel measured fastest here, inductor's
    # own or an eager one it calls opaquely (row_attention below).
    if model.runtime.row_attention is None:
        model.runtime.row_attention = LongContextAttention(model)
        set_decode_attention(model, functools.partial(decode_attention, one=model.runtime.row_attention))
    model.runtime.row_attention.measure_long_rows(model)
    return settings


def compile_decode(model) -> bool:
    """Give `model` a compiled decode step (models.generate.decode_one_token uses it), compiled
    by its first call (--compile). Returns False, with the reason logged, where it does not apply."""
    if not can_compile(model):
        return False
    settings = _prepare_inductor(model)
    model.runtime.decode_step = Compiled(forward_one_token, "the decode step", "the first step takes about a minute",
                                         INT8_MAX_ROWS if model.runtime.quant_bits == 8 else None, settings,
                                         mode="max-autotune")
    return True


# --compile unset (the single-stream apps on CPU): a model whose decode step reads this many
# weights or more is worth compiling in the background; a smaller one's step takes a few ms on any
# CPU and saves too little per token to repay about a minute of compiling (the bundled models read
# 3 M, the mid-size model of bench/decode.py 0.9 G, CogVLM-17B 6.5 G).
BACKGROUND_MIN_WEIGHTS = 100_000_000
# What the compiler itself holds while it works, beyond the weights it freezes (measured: mid-size
# int8 RSS 2.5 -> 4.2 GB with 0.7 GB of frozen weights).
COMPILER_BYTES = 1 << 30
# At exit, how long the compile thread may take to stop (it stops at its next Python bytecode; a
# C++ compiler it waits for finishes first): a thread left inside torch's C++ code while the
# process tears down aborts it ("terminate called without an active exception").
STOP_WAIT_S = 60


def compile_in_background(model, on_eager: Callable[[], None]) -> bool:
    """Give `model` a decode step compiled in a background thread (BackgroundCompiled), where it
    can pay: the step reads BACKGROUND_MIN_WEIGHTS or more, and the weights inductor will freeze
    plus the compiler take at most half the memory available (CogVLM-17B int4 on a 16 GB
    machine: about 1.6 GB of 3 left: eager, within its 13 GiB). Returns False, with the reason
    logged, where not; the caller then lays the model out for eager decoding (on_eager, also
    called if the compiled step fails or loses when timed)."""
    if not can_compile(model, warn=False):
        return False
    weights = decode_weights(model)
    if weights < BACKGROUND_MIN_WEIGHTS:
        log.info("decode step of %.0f M weights: too small to repay compiling it (--compile compiles it anyway)",
                 weights / 1e6)
        return False
    need, free = frozen_bytes(model) + COMPILER_BYTES, available_memory()
    if free is not None and need > free / 2:          # the other half stays for requests' activations
        log.info("not compiling the decode step: inductor would hold %.1f GB more (its frozen weights and "
                 "itself), more than half of the %.1f GB available", need / 1e9, free / 1e9)
        return False
    model.runtime.decode_step = BackgroundCompiled(model, on_eager, _prepare_inductor(model))
    return True


def expand_int4_in_background(model) -> Optional[threading.Thread]:
    """Compile the int4 expansions in a background thread (nice 19): quantize.expand_split_int4
    for the SplitInt4Linear layers and quantize.expand_kernel_int4 for the int4 layers in PyTorch's
    kernel layout (their prefills of more than KERNEL_ROWS rows), one graph with dynamic shapes
    each, checked on a probe of every kind of layer against the eager passes, bit for bit, before
    the layers use it (quantize.FusedExpand). Where the int4 layers hold BACKGROUND_MIN_WEIGHTS
    or more, a C++ compiler exists and the compiler takes at most half the memory available; once
    per process (the first model's kinds of layer: another model's other kinds, if any, keep the
    eager passes). Returns the thread, or None."""
    global _EXPANSION
    layers = [m for m in model.modules() if isinstance(m, WeightOnlyLinear) and m.bits == 4
              and m.qweight.device.type == "cpu"]
    weights, free = sum(m.weight_count for m in layers), available_memory()
    if FusedExpand.fn is not None or FusedExpand.kernel_fn is not None or (_EXPANSION and _EXPANSION.is_alive()) \
            or weights < BACKGROUND_MIN_WEIGHTS or compiler_missing() is not None \
            or (free is not None and COMPILER_BYTES > free / 2):
        return None
    log.info("compiling the int4 expansion of %d layers in the background (%.0f M weights; until it is ready, "
             "and where it does not apply, many-row products expand them in eager passes)", len(layers), weights / 1e6)
    kinds = sorted({(isinstance(m, SplitInt4Linear), m.dtype, m.scales.dtype, m.group) for m in layers}, key=str)
    largest = {split: max((m for m in layers if isinstance(m, SplitInt4Linear) == split), key=lambda m: m.weight_count)
               for split in {k[0] for k in kinds}}
    # The layers whose kernel_rows were timed against the eager passes (kernels.choose_kernel_rows),
    # timed again against the compiled one once it is used (not under tensor parallelism: the
    # ranks would have to agree from this thread).
    timed = [m for m in layers if m.kernel_rows is not None] if model.runtime.tp_world == 1 else []
    thread = threading.Thread(target=_compile_expand, args=(kinds, largest, timed), name="compile-int4-expansion",
                              daemon=True)
    thread.start()
    atexit.register(stop_at_exit, thread)
    _EXPANSION = thread
    return thread


_EXPANSION: Optional[threading.Thread] = None         # the compile of the int4 expansions, once started


def _compile_expand(kinds: list, largest: dict, timed: list = ()) -> None:
    """The background thread of expand_int4_in_background: per layout, compile on a probe of each
    kind of layer (weight dtype, scales' dtype: an fp32 model's may be bf16,
    WeightOnlyLinear.kernel_in; group), compare with the eager passes, time both on the layout's
    largest layer (largest: split -> layer) and publish the compiled pass where it is faster here;
    then, where the kernel layout's is published, time the rows up to which the few-row kernel
    stays faster again (kernels.measure_kernel_rows) for the layers `timed`."""
    start, figures = time.perf_counter(), []
    nice_this_thread()
    try:
        for split in sorted({k[0] for k in kinds}):
            fn = torch.compile(expand_split_int4 if split else expand_kernel_int4, dynamic=True, fullgraph=True)
            if not all(_expands_alike(fn, *k) for k in kinds if k[0] == split):
                log.warning("the compiled int4 expansion differs from the eager one here; it is not used")
                continue
            eager, fused = _expansion_seconds(fn, largest[split])
            layer = largest[split]
            figures.append(f"{'split' if split else 'kernel-layout'} {layer.out_features}x{layer.in_features}: "
                           f"eager {eager * 1e3:.1f} ms, compiled {fused * 1e3:.1f} ms")
            if fused < eager:
                setattr(FusedExpand, "fn" if split else "kernel_fn", fn)
                if not split and timed:
                    _retime_kernel_rows(list(timed))
        release_free_memory()
        log.info("int4 expansion compiled in the background in %.0f s (used where faster: %s)",
                 time.perf_counter() - start, "; ".join(figures))
    except Exception as e:  # noqa: BLE001 - any compiler failure: the eager passes go on
        log.info("compiling the int4 expansion failed (%s); prefill keeps the eager passes",
                 (str(e).strip().splitlines() or [type(e).__name__])[0][:300])
    except _Stopped:
        pass


# The few-row kernels' rows timed again against the compiled expansion (_retime_kernel_rows): a
# class whose kernel runs this much slower than it did at load means the CPU is busy (the decode
# step compiling beside it, requests): then it tries again RETIME_WAIT_S later, up to RETIME_TRIES times.
RETIME_BUSY, RETIME_WAIT_S, RETIME_TRIES = 1.3, 30.0, 10


def _retime_kernel_rows(layers: list) -> None:
    """kernels.measure_kernel_rows with the compiled expansion, from the background thread,
    until every class was timed on a quiet CPU (or the tries run out: the eager figures stay)."""
    for _ in range(RETIME_TRIES):
        done = measure_kernel_rows(layers, "fused", busy=RETIME_BUSY)
        layers = [m for m in layers if rows_class(m) not in done]
        if not layers:
            return
        for _ in range(int(RETIME_WAIT_S)):      # (short sleeps: stop_at_exit's exception gets in)
            time.sleep(1)


def _expansion_seconds(fn: Callable, layer: WeightOnlyLinear) -> tuple[float, float]:
    """Median seconds of the eager passes and of `fn` expanding the first scratch chunk of
    `layer` (alternating; not yet published, so dequantize runs the eager passes)."""
    n = min(layer.chunk_rows(), layer.out_features)
    rows = slice(0, n)
    if isinstance(layer, SplitInt4Linear):
        out = _buffer((n, layer.in_features), layer.dtype)
        codes = layer.qweight[:n // layer.block]
        fused = functools.partial(layer._fused, codes, rows, out, fn)
    else:
        fused = functools.partial(layer.expanded_by, fn, 0, n)
    eager = functools.partial(layer.dequantize, _buffer((n, layer.in_features), layer.dtype), rows, True, False)
    with torch.inference_mode():
        return tuple(_alternate_medians([eager, fused], repeat=5))


def _expands_alike(fn: Callable, split: bool, dtype: torch.dtype, scales: torch.dtype, group: int) -> bool:
    """Whether `fn` (compiling it) expands a probe layer of this layout, dtypes and group as the
    eager passes do, bit for bit, called as the layers call it: first on a chunk of its rows
    (rows of a larger layer: their scales' strides and offsets are not those of a whole layer,
    and a graph compiled on a whole one was guarded on that), then on all of them (blocks,
    half-blocks and groups of unequal sizes, none 2: equal ones would share one dynamic symbol)."""
    layer = WeightOnlyLinear(torch.randn(4 * 64, 5 * group).to(dtype), None, 4, group)
    if scales != dtype:
        layer.kernel_in(scales)
    probe = SplitInt4Linear(layer) if split else layer
    want = probe.dequantize(offset=False)
    for rows in (slice(64, 4 * 64), slice(0, 4 * 64)):          # (3 and 4 blocks: 2 is a size in the graph)
        if not split:
            got = probe.expanded_by(fn, rows.start, rows.stop - rows.start, strict=False)
        else:
            got = _buffer((rows.stop - rows.start, want.shape[1]), want.dtype).zero_()
            codes = probe.qweight[rows.start // probe.block:rows.stop // probe.block]
            if not probe._fused(codes, rows, got, fn, strict=False):
                return False
        if not torch.equal(got, want[rows]):
            return False
    return True


def decode_weights(model) -> int:
    """How many weights a decode step reads: those of the linear layers a text token passes
    (image encoders and vision experts left out), the LM head included."""
    return sum(m.in_features * m.out_features for name, m in model.named_modules()
               if hasattr(m, "out_features") and "vision" not in name
               and not any(hasattr(c, "out_features") for c in m.children()))     # wrappers: their inner layer


def frozen_bytes(model) -> int:
    """Bytes of the weights a compiled decode step freezes into copies of its own: the plain
    linear weights and int8 codes a text token reads (`half` layers are called as they are and
    int4 ones share their codes)."""
    total = 0
    for name, mod in model.named_modules():
        if "vision" in name:                           # image encoders and vision experts: prefill only
            continue
        if type(mod) is torch.nn.Linear:
            total += mod.weight.nbytes
        elif isinstance(mod, WeightOnlyLinear) and mod.bits == 8:
            total += mod.qweight.nbytes
    return total


def dummy_step_args(model, length: int = 11, cross_tokens: int = 37) -> tuple:
    """forward_one_token's arguments on a short cache shaped as a single-stream request's
    (CogAgent's with an image's cross K/V), so that the graph compiled on it serves real
    requests. Sizes are dynamic in that graph, but equal sizes share one symbol (a cross K/V
    of as many tokens as the cache would tie them): the lengths are primes no other size takes."""
    cfg, dtype = model.config, model.model.compute_dtype
    with torch.inference_mode():                       # as generation makes its tensors (guarded on)
        cache = Cache.allocate(cfg, 1, 2 * length + 1, dtype, "cpu", heads=model.num_kv_heads)
        cache.length, cache.next_position = length, torch.full((1,), length)
        cache.decode_kind = "dummy"                    # the attribute a request's cache carries too
        if cfg.cross is not None:
            enc = torch.zeros(1, cross_tokens, model.model.layers[0].cross_attn.key_value.in_features, dtype=dtype)
            # cross_rows stays None: a single row with an image
            cache.cross_kv = [layer.cross_attn.compute_kv(enc) for layer in model.model.layers]
        return model, torch.zeros(1, dtype=torch.long), cache.next_position[:, None], cache


class QuietTimings:
    """Decoding pauses while inductor times candidate kernels (max-autotune) in a compile thread:
    timed beside an eager step its choices are noise (AMX Xeon, mid-size int8, compiled in the
    background while decoding: step 82 ms, against 58 ms compiled with the box quiet, because
    ATen's int8 kernel won timings the template had lost to contention). Each timing waits for
    the steps under way and holds new ones back (about 0.1 s a candidate, a few seconds in all)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.timing = self.stepping = 0

    @contextmanager
    def step(self):
        """Around an eager step: waits while a timing runs."""
        with self.cond:
            self.cond.wait_for(lambda: self.timing == 0)
            self.stepping += 1
        try:
            yield
        finally:
            with self.cond:
                self.stepping -= 1
                self.cond.notify_all()

    @contextmanager
    def timings(self):
        """Around one of inductor's timings: waits for the steps under way."""
        with self.cond:
            self.timing += 1
            self.cond.wait_for(lambda: self.stepping == 0)
        try:
            yield
        finally:
            with self.cond:
                self.timing -= 1
                self.cond.notify_all()

    @contextmanager
    def in_this_thread(self):
        """inductor's timings of kernels compiled in this thread go through timings()."""
        _QUIET[threading.get_ident()] = self
        _route_cpu_timings()
        try:
            yield
        finally:
            _QUIET.pop(threading.get_ident(), None)


_QUIET: dict = {}                      # compile thread's ident -> its QuietTimings


def _route_cpu_timings() -> None:
    """Wrap inductor's CPU timer (once) so that a compile thread's timings run quietly."""
    try:
        from torch._inductor.runtime.benchmarking import benchmarker
    except ImportError:                                # another torch: timings as they are
        return
    timer = getattr(benchmarker, "benchmark_cpu", None)
    if timer is None or getattr(timer, "quiet", False):
        return

    def quiet_timer(*args, **kwargs):
        quiet = _QUIET.get(threading.get_ident())
        if quiet is None:
            return timer(*args, **kwargs)
        with quiet.timings():
            return timer(*args, **kwargs)
    quiet_timer.quiet = True
    benchmarker.benchmark_cpu = quiet_timer


class _Stopped(BaseException):
    """Raised in the compile thread when the process exits before it is done."""


def own_code(fn: Callable) -> Callable:
    """`fn` with a code object of its own. Dynamo keeps compiled graphs (and its recompile limit)
    per code object, so graphs compiled through this copy can be dropped (`drop_graphs`) without
    touching another model's, which torch._dynamo.reset() would drop too (a composite demo holds
    several models in one process)."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__qualname__, copy.__doc__, copy.__kwdefaults__ = fn.__qualname__, fn.__doc__, fn.__kwdefaults__
    return copy


def drop_graphs(fn: Callable) -> None:
    """Forget every graph dynamo compiled for `fn`'s code object, with their frozen weights."""
    with torch._dynamo.convert_frame.compile_lock:
        torch._dynamo.reset_code(fn.__code__)


def nice_this_thread() -> None:
    """Lowest priority for this thread (Linux) and the compilers it starts: they yield to decoding."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def stop_at_exit(thread: threading.Thread) -> None:
    """At exit: a compile still running in `thread` stopped (an exception raised in it) and
    awaited: a thread left inside torch's C++ code while the process tears down aborted it."""
    if thread.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_Stopped))
        thread.join(STOP_WAIT_S)


class BackgroundCompiled:
    """The decode step while --compile is unset: inductor compiles it in a thread on a dummy
    request while decoding goes on eagerly; the first request that starts after it is ready
    times both steps on that dummy (alternating) and every later request decodes with the
    faster one (one log line). A request keeps the step it started with, so an answer never
    mixes the two; a request the compiled graph does not fit (CogAgent without an image) runs
    eagerly rather than compiling again in the foreground."""

    def __init__(self, model, on_eager: Callable[[], None], settings: dict):
        self.model, self.on_eager, self.settings = model, on_eager, settings
        self.quiet = QuietTimings()
        self.step = own_code(forward_one_token)           # this model's graphs alone
        self.compiled = torch.compile(self.step, dynamic=True, fullgraph=True, mode="max-autotune")
        self.choice: Optional[str] = None              # "compiled" | "eager", once timed
        self.timed: tuple = ()                         # (eager s, compiled s) that chose it
        self.error: Optional[str] = None
        self.ready, self.deciding = threading.Event(), threading.Lock()
        log.info("compiling the decode step in the background (about a minute of CPU; decoding runs eagerly "
                 "until it is ready, then with whichever is faster)")
        self.thread = threading.Thread(target=self._compile, name="compile-decode-step", daemon=True)
        self.thread.start()
        atexit.register(self._stop)

    def _compile(self) -> None:
        start = time.perf_counter()
        nice_this_thread()
        try:
            with torch.inference_mode(), inductor_settings(self.settings), self.quiet.in_this_thread():
                self.compiled(*dummy_step_args(self.model))
            release_free_memory()      # the compiler's temporaries (mid-size bf16: 0.8 GB of RSS given back)
            log.info("the decode step compiled in the background in %.0f s", time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - any compiler failure: decode eagerly
            self.error = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        except _Stopped:
            self.error = "the process exited first"
        finally:
            self.ready.set()

    def _stop(self) -> None:
        stop_at_exit(self.thread)

    def __call__(self, model, tokens, positions, cache, attn_mask=None):
        kind = getattr(cache, "decode_kind", None)
        if kind is None:                                # a request's first step: its kind throughout
            kind = cache.decode_kind = self.decide() if self.ready.is_set() else "eager"
        if kind == "compiled":
            try:
                with torch.compiler.set_stance("fail_on_recompile"):
                    return self.compiled(model, tokens, positions, cache, attn_mask)
            except Exception as e:  # noqa: BLE001 - a request the graph does not fit: eager
                log.debug("this request decodes eagerly: %s", e)
                cache.decode_kind = "eager"
        if self.ready.is_set():
            return forward_one_token(model, tokens, positions, cache, attn_mask)
        with self.quiet.step():                         # not while the compile thread times kernels
            return forward_one_token(model, tokens, positions, cache, attn_mask)

    def decide(self, wait: bool = False) -> str:
        """"compiled" or "eager" (timing them the first time); wait: until the compile ends."""
        if wait:
            self.ready.wait()
        with self.deciding:                             # sessions of a web demo may ask at once
            if self.choice is None:
                self.choice = self._choose()
        return self.choice

    def _time(self) -> tuple[float, float]:
        """Seconds of one eager and one compiled step on a dummy request (medians, alternating)."""
        args = dummy_step_args(self.model)
        with torch.inference_mode(), torch.compiler.set_stance("fail_on_recompile"):
            eager, compiled = _alternate_medians([functools.partial(forward_one_token, *args),
                                                  functools.partial(self.compiled, *args)], repeat=5)
        return eager, compiled

    def _choose(self) -> str:
        if self.error is None:
            try:
                eager, compiled = self.timed = self._time()
            except Exception as e:  # noqa: BLE001 - the dummy itself does not fit
                self.error = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if self.error is not None:
            log.warning("compiling the decode step failed (%s); decoding eagerly", self.error)
        else:
            log.info("decode step: compiled %.1f ms, eager %.1f ms: decoding %s from now on", compiled * 1e3,
                     eager * 1e3, "compiled" if compiled < eager else "eagerly (the compiled step is dropped)")
            if compiled < eager:
                return "compiled"
        self.compiled = None
        drop_graphs(self.step)                         # its frozen weights (not another model's graphs)
        release_free_memory()
        self.on_eager()
        return "eager"


def compile_attention(model) -> bool:
    """Compile the attention of one-token steps only (every layer's self and cross attention),
    for the server's batch engine, whose linear layers stay eager with oneDNN-packed weights:
    inductor reads the K/V cache views in place where eager oneDNN copies them first
    (`bench/batch.py --compare_attention`; bench/RESULTS.md, "Batching").
    No weights are involved, so nothing is copied; it compiles in seconds. Returns False, with
    the reason logged, where it does not apply."""
    if not can_compile(model):
        return False
    set_decode_attention(model, Compiled(decode_attention, "the decode attention", "a few seconds, once per shape kind"))
    model.runtime.row_attention = None                 # every row count runs the compiled one
    return True


# From this many cached tokens on, a row's one-token attention may run compiled (below, eager
# costs little and short chats never wait for the compiler). Long-running servers start at 1
# (`compile_every_row`): there the per-row eager calls cost 1-in-10 of a 16-row step.
LONG_CONTEXT = 512


class LongContextAttention:
    """One row's one-token attention (single_query_attention's arguments, one row): every row's
    on the batch-invariant path (the CPU default), a single-row step's without it on CPU
    (measured_single_rows). Which kernel reads a long cache fastest depends on the CPU and dtype:
    eager bf16 matmuls copy the strided cache views first (at 1,299 cached tokens 2.5x
    inductor's time on an AVX-512 AMD EPYC), while in fp32 on an AVX2-only one PyTorch's fused
    kernel reads CogAgent's contiguous cross K/V 1.5x faster than both. So rows of `from_tokens`
    tokens or more (LONG_CONTEXT; 1 in the server, through invariant.compile_every_row) run
    whichever of eager, fused and compiled (where inductor can compile) is faster here: the
    first such row times them on its shape (compiling for seconds, one log line); the timings
    are cached per machine, shape kind and length class (short / long: per-call overheads weigh
    differently) beside the kernel timings, so later processes decide alike without compiling
    first when it lost."""

    def __init__(self, model):
        self.possible = can_compile(model, warn=False)
        self.from_tokens = LONG_CONTEXT        # rows this long or longer run the measured kernel
        self.compiled = None                   # Compiled(single_query_attention), once chosen
        self.choice = {}                       # shape kind -> "eager" | "fused" | "compiled"

    def __call__(self, q, k, v, mask=None):
        if torch.compiler.is_dynamo_compiling():          # --compile's decode step, every length alike
            which = self.choice.get(_attention_kind(q, k, v, long=True))
            if which in ("eager", "fused"):
                return torch.ops.cogvlm.row_attention(q, k, v, mask, which)
            return single_query_attention(q, k, v, mask)                # inductor compiles it
        if k.shape[2] < self.from_tokens:
            return single_query_attention(q, k, v, mask)
        kind = _attention_kind(q, k, v)
        if kind not in self.choice:
            self.choice[kind] = self._choose(kind, q, k, v, mask)
        return self._kernel(self.choice[kind])(q, k, v, mask)

    def _kernel(self, which: str):
        return {"eager": single_query_attention, "fused": fused_single_query_attention,
                "compiled": self.compiled}[which]

    def _choose(self, kind: str, q, k, v, mask) -> str:
        """Time every candidate on this row (cached per machine); the fastest wins."""
        from .kernels import cache_path, machine_id, read_cache, write_cache
        path, ident = cache_path().with_name("attention.json"), machine_id()
        cached = read_cache(path, ident)
        which = ["eager", "fused"] + (["compiled"] if self.possible else [])
        keys = {w: f"{w} {kind} threads={torch.get_num_threads()}" for w in which}
        if not all(key in cached for key in keys.values()):
            if self.possible:
                self._compile()
                self.compiled(q, k, v, mask)                               # compiles
                if self.compiled.failed:
                    which.remove("compiled")
            times = _alternate_medians([functools.partial(self._kernel(w), q, k, v, mask) for w in which])
            cached.update({keys[w]: t / k.shape[2] for w, t in zip(which, times)})
            write_cache(path, ident, cached)
        winner = min(which, key=lambda w: cached[keys[w]])
        mb = 2 * k[0].numel() * k.element_size() / 1e6                      # this row's K and V
        log.info("one-row attention (%s): %s (%s at %d tokens)", kind, winner, ", ".join(
            f"{w} {mb / 1e3 / (cached[keys[w]] * k.shape[2]):.1f} GB/s" for w in which), k.shape[2])
        if winner == "compiled":
            self._compile()
        return winner

    def measure_long_rows(self, model) -> None:
        """Choose the kernels of the long rows a compiled decode step will see (its self
        attention over cache views; CogAgent's cross attention over its whole K/V), timed on
        random ones of LONG_CONTEXT tokens and more, before the step is compiled (tracing
        cannot time): inductor's attention, inlined in the step, read a 1,299-token cache
        slower than eager on the AVX2 EPYC."""
        cfg, dtype = model.config, model.model.compute_dtype
        H, S = cfg.num_attention_heads, 2 * LONG_CONTEXT
        shapes = [(cfg.hidden_size // H, 64)] + ([(cfg.cross.attn_hidden_size // H, 0)] if cfg.cross else [])
        g = torch.Generator().manual_seed(0)
        for D, spare in shapes:                    # spare slots: a view into a longer cache
            q = torch.randn(1, H, 1, D, generator=g).to(dtype)
            k, v = (torch.randn(1, H, S + spare, D, generator=g).to(dtype)[:, :, :S] for _ in range(2))
            kind = _attention_kind(q, k, v)
            if kind not in self.choice:
                self.choice[kind] = self._choose(kind, q, k, v, None)

    def _compile(self) -> None:
        if self.compiled is None:                      # one graph for every shape kind and length
            self.compiled = Compiled(single_query_attention, "the one-row attention",
                                     "a few seconds, once per process")


def measured_single_rows(model) -> None:
    """Batch invariance off, CPU eager: a step of one row (a single stream) runs its one-token
    attention as the invariant path runs each row (LongContextAttention: from LONG_CONTEXT
    tokens, compiled where measured faster here, since eager bf16 copies the cache views
    first); steps of several rows keep the batched kernels."""
    model.runtime.row_attention = LongContextAttention(model)
    set_decode_attention(model, functools.partial(decode_attention, one=model.runtime.row_attention))


def _attention_kind(q, k, v, long: Optional[bool] = None) -> str:
    """What decides the attention kernel's speed: dtype, heads, head size, K/V views or whole,
    and the length class (under LONG_CONTEXT tokens the per-call overheads dominate; long:
    given, not read from k)."""
    whole = "contiguous" if k.is_contiguous() and v.is_contiguous() else "cache views"
    length = "long" if (k.shape[2] >= LONG_CONTEXT if long is None else long) else "short"
    return f"{str(q.dtype).replace('torch.', '')} heads={q.shape[1]} dim={q.shape[-1]} {whole} {length}"


@torch.library.custom_op("cogvlm::row_attention", mutates_args=())
def row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  kernel: str) -> torch.Tensor:
    """One row's one-token attention through an eager kernel ("eager": the two products,
    "fused": PyTorch's), opaque to inductor: a compiled step calls it on the K/V views in place."""
    fn = fused_single_query_attention if kernel == "fused" else single_query_attention
    return fn(q, k, v, mask).contiguous()                                         # B,H,1,D


@row_attention.register_fake
def _(q, k, v, mask, kernel):
    return q.new_empty(q.shape)


def _alternate_medians(runs: list, repeat: int = 9) -> list:
    """Median seconds of each run, the runs taking turns (a drifting machine slows them alike)."""
    times = [[] for _ in runs]
    for _ in range(repeat):
        for run, t in zip(runs, times):
            start = time.perf_counter()
            run()
            t.append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] for t in times]
