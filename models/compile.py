"""`--compile`: the single-token decode step compiled by inductor with frozen weights, applied
after the model is loaded (quantized or not), on CPU.

Why: a decode step reads every weight once, and PyTorch's eager single-row kernels read them
well below the machine's memory bandwidth. Inductor with `freezing` treats the weights as
constants, packs them once and picks, per layer shape, its own C++ GEMV template or oneDNN
(max-autotune); the speed-up per dtype is in bench/RESULTS.md ("`--compile`"). Costs, also
measured there: the first decode step compiles for about a minute on 2 cores (once per process;
`dynamic=True` so every context length shares it), the compiled step holds its own packed copy
of the language weights in bf16 and int8 (the eager model keeps its own for prefill; int4
shares them), and it needs a C++ compiler. Without one, or when compilation fails, decoding
goes on eagerly with one warning.

Prefill (many rows, vision-expert routing with data-dependent shapes) stays eager: it already
runs at the GEMM rate. Every compiled graph holds its own frozen weights; single-stream
generation (models.generate.decode_one_token) compiles one. The server's batch engine compiles
only the decode attention (`compile_attention`): its whole step compiled measured no faster than
the oneDNN-packed weights, its attention compiled much faster than eager. Tensor-parallel runs
stay eager.
"""
from __future__ import annotations

import logging
import os
import shutil
import sysconfig
import time

import torch

from .generate import forward_one_token
from .machine import release_free_memory

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
    (second argument's first dimension) run eagerly (None: no limit)."""

    def __init__(self, fn, what: str, first_call: str, max_rows=None, **options):
        self.fn, self.what, self.first_call, self.max_rows = fn, what, first_call, max_rows
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


def can_compile(model) -> bool:
    """Whether inductor can compile for `model` here; the reason is logged when not."""
    p = next(model.parameters())
    if p.device.type != "cpu":
        log.warning("--compile is measured and supported on CPU only; running eagerly on %s", p.device)
        return False
    if cxx_compiler() is None:
        log.warning("--compile needs a C++ compiler (g++ or clang++; $CXX) and none was found; running eagerly")
        return False
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        log.warning("--compile needs Python's C headers (Debian: apt-get install python3-dev) and %s has "
                    "none; running eagerly", sysconfig.get_paths()["include"])
        return False
    return True


def freeze_weights():
    """inductor's settings for graphs whose weights are constants (packed once, max-autotune
    silent); returns its config module."""
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    inductor_config.autotune_num_choices_displayed = 0  # no timing tables on stderr
    inductor_config.max_autotune_report_choices_stats = False
    return inductor_config


def set_decode_attention(model, fn) -> None:
    """The one-token attention every self and cross attention layer of `model` calls."""
    from .cogvlm import CrossAttention, VisionExpertAttention
    for mod in model.modules():
        if isinstance(mod, (VisionExpertAttention, CrossAttention)):
            mod.decode_attention = fn


def compile_decode(model) -> bool:
    """Give `model` a compiled decode step (models.generate.decode_one_token uses it). Returns
    False, with the reason logged, where it does not apply."""
    if model.runtime.packed:
        raise ValueError("compile_decode needs plain weights, not packed ones (load with pack=False: "
                         "inductor packs them itself)")
    if not can_compile(model):
        return False
    inductor_config = freeze_weights()
    # Left to itself inductor inlines the query's rotary (cos, sin of the position) into the
    # attention's score reduction and recomputes it for every cached token; realizing pointwise
    # results of more than 8 ops keeps it in a buffer (measured: half the cost per cached token).
    inductor_config.realize_cpu_opcount_threshold = 8
    model.runtime.decode_step = Compiled(forward_one_token, "the decode step", "the first step takes about a minute",
                                         INT8_MAX_ROWS if model.runtime.quant_bits == 8 else None,
                                         mode="max-autotune")
    return True


def compile_attention(model) -> bool:
    """Compile the attention of one-token steps only (every layer's self and cross attention),
    for the server's batch engine, whose linear layers stay eager with oneDNN-packed weights:
    inductor reads the K/V cache views in place where eager oneDNN copies them first
    (`bench/batch.py --compare_attention`; bench/RESULTS.md, "Batching").
    No weights are involved, so nothing is copied; it compiles in seconds. Returns False, with
    the reason logged, where it does not apply."""
    if not can_compile(model):
        return False
    from .cogvlm import decode_attention
    set_decode_attention(model, Compiled(decode_attention, "the decode attention", "a few seconds, once per shape kind"))
    return True
