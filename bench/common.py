"""Helpers shared by the benchmarks: medians, machine roofline figures measured in-process."""
from __future__ import annotations

import statistics
import time

import torch


def median_time(fn, repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gemv_bandwidth(n: int = 8192, repeat: int = 15) -> float:
    """Bytes/s of an n x n fp32 matrix-vector product (reads the whole matrix once)."""
    w, x = torch.randn(n, n), torch.randn(n)
    t = median_time(lambda: torch.mv(w, x), repeat, warmup=3)
    return n * n * 4 / t


def gemm_flops(n: int = 2048, repeat: int = 7) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = median_time(lambda: a @ b, repeat, warmup=2)
    return 2 * n ** 3 / t
