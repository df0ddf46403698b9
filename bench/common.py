"""What the benchmarks share: their common flags (declared once), the machine description, the
JSON ending, timing and medians, the machine's roofline figures measured in-process, and the
model calls (building, loading, one forward, packing or compiling) kept in one place."""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

# The flags several benchmarks share: name -> argparse keywords. A script names the ones it
# takes in bench_parser, each with its default (or a dict of keywords replacing these).
FLAGS = {
    "threads": dict(type=int, help="torch threads (default %(default)s)"),
    "dtype": dict(choices=["auto", "float32", "bfloat16"], help="compute dtype (default %(default)s)"),
    "quant": dict(type=int, choices=[4, 8], help="weight-only int8/int4 (default: unquantized)"),
    "device": dict(help="cpu or cuda (default %(default)s)"),
    "repeat": dict(type=int, help="measurements (or rounds); medians are reported (default %(default)s)"),
    "steps": dict(type=int, help="decode steps per measurement (default %(default)s)"),
    "compile": dict(action=argparse.BooleanOptionalAction,
                    help="inductor-compiled decode step (models/compile.py); default: as the apps (the "
                         "single-stream ones compile it in the background where it pays; the benchmark "
                         "waits for it and its timing against eager)"),
    "deterministic": dict(action=argparse.BooleanOptionalAction,
                          help="batch-invariant decoding (models/invariant.py; default: as the apps, "
                               "on for CPU eager decoding where rows are batched, off for a single "
                               "stream)"),
}
# The CPU features that pick the kernels (bf16, int8, AMX), reported next to the figures.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def bench_parser(description: str, raw: bool = False, **flags) -> argparse.ArgumentParser:
    """An ArgumentParser with --json and the common FLAGS named in `flags` (name=default, or
    name=dict of argparse keywords); raw: print the description as written."""
    fmt = argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter
    p = argparse.ArgumentParser(description=description, formatter_class=fmt)
    p.add_argument("--json", type=Path, default=None, help="write the results to this file")
    for name, value in flags.items():
        own = value if isinstance(value, dict) else {"default": value}
        p.add_argument(f"--{name}", **{**FLAGS[name], **own})
    return p


def cpu_features(wanted=SPEED_FLAGS) -> list[str]:
    """The machine's description: which of the `wanted` CPU flags it has, sorted."""
    from models.loading import cpu_flags
    return sorted(cpu_flags() & set(wanted))


def cpu_line(threads: int, dtype: torch.dtype) -> str:
    """What every figure is measured on: the CPU model, its speed flags, torch, threads, dtype."""
    from models.kernels import cpu_model
    return f"CPU: {cpu_model()}; flags {' '.join(cpu_features())}; torch {torch.__version__}; {threads} threads; {dtype}"


def cpu_start(a: argparse.Namespace) -> torch.dtype:
    """A CPU benchmark's start: --threads set, --dtype resolved, the CPU line printed."""
    from models.loading import resolve_dtype
    torch.set_num_threads(a.threads)
    dtype = resolve_dtype(a.dtype, "cpu")
    print(cpu_line(a.threads, dtype), flush=True)
    return dtype


def write_cpu_json(path: Optional[Path], dtype: torch.dtype, results: dict) -> None:
    """write_json with the CPU, its speed flags and the dtype first."""
    from models.kernels import cpu_model
    write_json(path, {"cpu": cpu_model(), "flags": cpu_features(), "dtype": str(dtype), **results})


def write_json(path: Optional[Path], results: dict) -> None:
    """The JSON ending: `results` written to --json's file, if one was given."""
    if path:
        path.write_text(json.dumps(results, indent=1))


def peak_rss() -> int:
    """Bytes: the process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_gb() -> float:
    """Resident memory now (GB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def now() -> float:
    """perf_counter once queued CUDA work is done (else a GPU timing measures the launch only)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def median_time(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() (CUDA work included: synchronized before and after)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = now()
        fn()
        times.append(now() - t)
    return statistics.median(times)


def medians(runs: dict) -> dict:
    """name -> list of measurements  =>  name -> their median."""
    return {k: statistics.median(v) for k, v in runs.items()}


def best_gemv(n: int = 8192, repeat: int = 15, device="cpu") -> dict:
    """Bytes/s of an n x n matrix-vector product by kernel: fp32 torch.mv, bf16 F.linear, on
    CPU bf16 through ATen's own GEMV (oneDNN off: the `gemv` layout), and (where oneDNN runs
    bf16) bf16 oneDNN-packed; "best" is the highest, the reference that decode speed is
    compared with."""
    import torch.nn.functional as F
    from models.layout import GemvLinear, can_pack
    w, x = torch.randn(n, n, device=device), torch.randn(n, device=device)
    res = {"fp32": n * n * 4 / median_time(lambda: torch.mv(w, x), repeat, warmup=3)}
    wb, xb = w.bfloat16(), x.bfloat16()[None]
    res["bf16"] = n * n * 2 / median_time(lambda: F.linear(xb, wb), repeat, warmup=3)
    if torch.device(device).type == "cpu":
        lin = torch.nn.Linear(n, n, bias=False, device="meta")
        lin.weight = torch.nn.Parameter(wb, requires_grad=False)
        gemv = GemvLinear(lin)
        res["bf16_gemv"] = n * n * 2 / median_time(lambda: gemv(xb), repeat, warmup=3)
    if can_pack(torch.bfloat16, device):
        packed = torch.ops.mkldnn._reorder_linear_weight(wb, 1)
        res["bf16_packed"] = n * n * 2 / median_time(
            lambda: torch.ops.mkldnn._linear_pointwise(xb, packed, None, "none", [], ""), repeat, warmup=3)
    res["best"] = max(res.values())
    return res


def read_bandwidth(nbytes: int = 1 << 30, repeat: int = 9, device="cpu") -> float:
    """Bytes/s of reading `nbytes` once (a sum over a fp32 and a bf16 tensor, the faster): the
    machine's memory read bandwidth as a plain reduction reaches it. Matrix-vector kernels read
    less than this (on a 2-core AMD EPYC: PyTorch's GEMV 22-35 GB/s against 40-53 GB/s here,
    llama.cpp's bf16 decode up to 43 GB/s), so decode is reported against both figures."""
    def one(dtype) -> float:
        x = torch.ones(nbytes // dtype.itemsize, dtype=dtype, device=device)
        return nbytes / median_time(lambda: x.sum(dtype=torch.float32), repeat, warmup=2)
    return max(one(torch.float32), one(torch.bfloat16))


def gemm_dtype(dtype: torch.dtype, device="cpu") -> torch.dtype:
    """The dtype a model in `dtype` runs its prefill products in: fp32 for bf16 on a CPU whose
    oneDNN has no bf16 (models.layout.UpcastLinear), else `dtype`."""
    from models.layout import can_upcast
    return torch.float32 if torch.device(device).type == "cpu" and can_upcast(dtype) else dtype


def gemm_flops(n: int = 2048, repeat: int = 7, dtype=torch.float32, device="cpu") -> float:
    """FLOP/s of an n x n product in gemm_dtype(dtype): the rate a prefill in `dtype` can reach."""
    dtype = gemm_dtype(dtype, device)
    if torch.device(device).type == "cuda":
        n = 8192                                      # a GPU needs a bigger product to reach its peak
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    t = median_time(lambda: a @ b, repeat, warmup=2)
    return 2 * n ** 3 / t


def held_bytes(mod: torch.nn.Module) -> int:
    """Bytes a leaf module holds: its tensors (quantized codes and scales included), a
    oneDNN-packed weight as its plain size (packed tensors do not report theirs), an
    FBGEMM-packed fp16 one (models.layout.HalfLinear) as fp16."""
    n = sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers())
            if t.layout == torch.strided)
    if hasattr(mod, "half_packed"):
        return mod.in_features * mod.out_features * 2 + n
    if hasattr(mod, "packed"):
        return mod.in_features * mod.out_features * (2 if mod.packed.dtype == torch.bfloat16 else 4) + n
    return n


def image_prompt(cfg, n_text: int, generator=None, device="cpu"):
    """A random prompt laid out as the templates lay it out: <s>, boi, image patches, eoi, then
    n_text text tokens. Returns (input_ids, position_ids, vision_mask, image_mask), each 1,T."""
    L = cfg.image_length
    ids = torch.randint(3, cfg.vocab_size, (1, 1 + L + 2 + n_text), generator=generator)
    pos = torch.tensor([[0, 1] + [2] * L + [3] + list(range(4, 4 + n_text))])
    vision = torch.zeros_like(ids, dtype=torch.bool)
    vision[0, 1:L + 2] = True                          # boi + patches: the vision expert
    slots = vision.clone()
    slots[0, L + 2] = True                             # + eoi: the image's slots
    return tuple(t.to(device) for t in (ids, pos, vision, slots))


def random_model(cfg, dtype: torch.dtype, bits: Optional[int] = None, device="cpu", backend=None):
    """A random-weight model as the demos hold it (fp32 column-major on CPU), weight-only
    int8/int4 with the image encoder int8 where `bits` (backend: the device's default). Its
    weights are bf16 values in any dtype, as a released checkpoint's are."""
    from models.loading import build_model
    from models.quantize import quantize
    model = build_model(cfg, device, dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16())
    if bits:
        quantize(model, bits, vision_bits=8, backend=backend)
    return model


def load_options(device, packed: bool, compiled: bool, deterministic: Optional[bool] = None,
                 single_stream: bool = False, quant=None):
    """The models.loading.LoadOptions the apps load with, for pack_or_compile's arguments."""
    from models.loading import LoadOptions, QuantConfig
    return LoadOptions(device=device, pack=packed, compile=compiled, deterministic=deterministic,
                       single_stream=single_stream, quant=quant or QuantConfig())


def pack_or_compile(model, packed: bool, compiled: bool, deterministic: Optional[bool] = None,
                    single_stream: bool = False, layouts: Optional[dict] = None):
    """`model` prepared as the apps prepare it (models.loading.prepare_for_inference): packed:
    each CPU linear layer in the layout measured fastest here (--kernels auto, cached);
    compiled: the compiled decode step, or the run ends (measuring the eager step under a
    "compiled" label would mislead); deterministic (None: the apps' default for the device,
    on for CPU eager decoding unless single_stream, as the CLIs and demos run it):
    batch-invariant decoding (models/invariant.py); layouts: those chosen before the weights
    were made (bench/full_size.py, as models.loading.load_model does), else chosen here."""
    from models.loading import prepare_for_inference
    dev = next(model.parameters()).device
    prepare_for_inference(model, load_options(dev, packed, compiled, deterministic, single_stream), layouts)
    if compiled and deterministic is not True and model.runtime.decode_step is None:
        sys.exit("--compile: the decode step cannot be compiled here (see the warning above)")
    if hasattr(model.runtime.decode_step, "decide"):   # compiling in the background: what users get once done
        print(f"decode step: {model.runtime.decode_step.decide(wait=True)} (compiled in the background, "
              f"timed against eager)")
    return model


def step_kind(model) -> str:
    """How `model` decodes: "compiled" or "eager" (for the JSON)."""
    step = model.runtime.decode_step
    return getattr(step, "choice", None) or ("eager" if step is None else "compiled")


def load(path, dtype: Optional[torch.dtype] = None, bits: Optional[int] = None, group: Optional[int] = None,
         rank: int = 0, world: int = 1):
    """The benchmarks' one load_model call: (model, config) of a checkpoint, quantized to `bits`
    (int4 in groups of `group`) while loading, rank `rank`'s piece of `world`."""
    from models.loading import LoadOptions, QuantConfig, load_model
    return load_model(str(path), LoadOptions(dtype=dtype, quant=QuantConfig(bits=bits, group=group),
                                             rank=rank, world=world))


def logits(model, inputs, last_only: bool = False) -> torch.Tensor:
    """The benchmarks' one direct forward: logits B,T,V of a ModelInputs without a cache
    (B,1,V with last_only)."""
    return model(inputs, last_only=last_only)
