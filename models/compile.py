"""`--compile`: the single-token decode step compiled by inductor with frozen weights, applied
after the model is loaded (quantized or not), on CPU.

Why: a decode step reads every weight once, and PyTorch's eager single-row kernels read them at
16-27 GB/s where the machine reads 33-49 GB/s. Inductor with `freezing` treats the weights as
constants, packs them once and picks, per layer shape, its own C++ GEMV template or oneDNN
(max-autotune): measured on the mid-size model (bench/RESULTS.md) int8 decode 2.1x, bf16 1.5x,
int4 1.2x the eager step. Costs, also measured there: the first decode step compiles for about
a minute on 2 cores (once per process; `dynamic=True` so every context length shares it), the
compiled step holds its own packed copy of the language weights in bf16 and int8 (the eager
model keeps its own for prefill; int4 shares them), and it needs a C++ compiler. Without one, or when compilation fails, decoding
goes on eagerly with one warning.

Prefill (many rows, vision-expert routing with data-dependent shapes) stays eager: it already
runs at the GEMM rate. Every compiled graph holds its own frozen weights; single-stream
generation (models.generate.decode_one_token) compiles one. The server's batch engine decodes
eagerly (compiled, it measured no faster than the oneDNN-packed weights), and so do
tensor-parallel runs.
"""
from __future__ import annotations

import logging
import os
import shutil
import sysconfig
import time

import torch

from .generate import forward_one_token
from .loading import release_free_memory

log = logging.getLogger(__name__)


def cxx_compiler():
    """The C++ compiler inductor would use ($CXX, else g++, c++, clang++), or None."""
    for name in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")):
        if shutil.which(name):
            return name
    return None


# inductor's weight-only int8 kernel is slower than PyTorch's eager one from 8 rows on (mid-size
# int8, same process: 6 rows 48-53 vs 35-41 tok/s, 8 rows 34-37 vs 43): int8 models run steps
# of more rows eagerly. bf16 and int4 measured equal or faster compiled up to 16 rows.
INT8_MAX_ROWS = 6


class CompiledDecode:
    """Calls the compiled step; the first failure (no compiler, an unsupported operator) logs
    one warning and every later step runs forward_one_token eagerly. max_rows: steps of more
    rows run eagerly (None: no limit)."""

    def __init__(self, max_rows=None):
        self.compiled = torch.compile(forward_one_token, mode="max-autotune", dynamic=True, fullgraph=True)
        self.max_rows = max_rows
        self.failed = False
        self.calls = 0

    def __call__(self, *args):
        tokens = args[1]
        if self.failed or (self.max_rows is not None and tokens.shape[0] > self.max_rows):
            return forward_one_token(*args)
        start = time.perf_counter()
        if self.calls == 0:
            log.info("compiling the decode step with inductor (the first step takes about a minute)")
        try:
            out = self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: decode eagerly instead
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.warning("--compile: compiling the decode step failed (%s); decoding eagerly", first[:300])
            log.debug("the compiler's error", exc_info=True)
            self.failed = True
            return forward_one_token(*args)
        if self.calls == 0:
            release_free_memory()                      # the compiler's temporaries
            log.info("decode step compiled in %.0f s", time.perf_counter() - start)
        self.calls += 1
        return out


def compile_decode(model) -> bool:
    """Give `model` a compiled decode step (models.generate.decode_one_token uses it). Returns
    False, with the reason logged, where it does not apply."""
    p = next(model.parameters())
    if p.device.type != "cpu":
        log.warning("--compile is measured and supported on CPU only; decoding eagerly on %s", p.device)
        return False
    if getattr(model, "packed_for_inference", False):
        raise ValueError("--compile needs plain weights: load with --cpu_weights plain (inductor packs them itself)")
    if cxx_compiler() is None:
        log.warning("--compile needs a C++ compiler (g++ or clang++; $CXX) and none was found; decoding eagerly")
        return False
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        log.warning("--compile needs Python's C headers (Debian: apt-get install python3-dev) and %s has "
                    "none; decoding eagerly", sysconfig.get_paths()["include"])
        return False
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True                    # weights become constants: packed once
    inductor_config.autotune_num_choices_displayed = 0  # no timing tables on stderr
    inductor_config.max_autotune_report_choices_stats = False
    # Left to itself inductor inlines the query's rotary (cos, sin of the position) into the
    # attention's score reduction and recomputes it for every cached token; realizing pointwise
    # results of more than 8 ops keeps it in a buffer (one layer, 283 -> 1299 tokens of context:
    # +0.4 ms instead of +0.9 ms per step).
    inductor_config.realize_cpu_opcount_threshold = 8
    model.decode_step = CompiledDecode(INT8_MAX_ROWS if getattr(model, "quantized_bits", None) == 8 else None)
    return True
