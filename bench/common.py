"""Helpers shared by the benchmarks: medians, machine roofline figures measured in-process."""
from __future__ import annotations

import statistics
import time

import torch


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_time(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() (CUDA work included: synchronized before and after)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def best_gemv(n: int = 8192, repeat: int = 15, device="cpu") -> dict:
    """Bytes/s of an n x n matrix-vector product by kernel: fp32 torch.mv, bf16 F.linear, and
    (where oneDNN runs bf16) bf16 oneDNN-packed; "best" is the highest, the reference that
    decode speed is compared with."""
    import torch.nn.functional as F
    from models.layout import can_pack
    w, x = torch.randn(n, n, device=device), torch.randn(n, device=device)
    res = {"fp32": n * n * 4 / median_time(lambda: torch.mv(w, x), repeat, warmup=3)}
    wb, xb = w.bfloat16(), x.bfloat16()[None]
    res["bf16"] = n * n * 2 / median_time(lambda: F.linear(xb, wb), repeat, warmup=3)
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


def gemm_flops(n: int = 2048, repeat: int = 7, dtype=torch.float32, device="cpu") -> float:
    if torch.device(device).type == "cuda":
        n = 8192                                      # a GPU needs a bigger product to reach its peak
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    t = median_time(lambda: a @ b, repeat, warmup=2)
    return 2 * n ** 3 / t


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


def compile_or_exit(model) -> None:
    """A benchmark's --compile: the model's compiled decode step, or the run ends (measuring
    the eager step under a "compiled" label would mislead)."""
    import sys
    from models.compile import compile_decode
    if not compile_decode(model):
        sys.exit("--compile: the decode step cannot be compiled here (see the warning above)")
