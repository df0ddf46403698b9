"""What the kernel selection (models/kernels.py) picks on this CPU for the mid-size model, and
the figures that picked it.

The mid-size CogVLM of bench/decode.py is built on the meta device (no weights); every linear
shape class is timed in each layout (oneDNN-packed, row-major and column-major F.linear, gemv) and
regime (1, 4 and 256 rows) with random weights, as load_model times them (models/kernels.py:
median of a few calls), but without the cache and without a time budget. Printed next to
the same process's references (bench/common.py): the best 8192^2 GEMV per kernel and a plain
memory read.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import best_gemv, bench_parser, cpu_features, cpu_line, read_bandwidth, write_json  # noqa: E402
from bench.decode import MID  # noqa: E402
from models import CogVLM  # noqa: E402
from models import kernels  # noqa: E402
from models.loading import resolve_dtype  # noqa: E402


def select(dtype: torch.dtype) -> tuple[dict, dict, dict, float]:
    """(classes, timings, layouts, seconds measuring) of the mid-size model in `dtype`."""
    with torch.device("meta"):
        model = CogVLM(MID).to(dtype)
    classes = kernels.shape_classes(model, weight_of=kernels.random_weight)
    timings, start = {}, time.perf_counter()
    kernels.measure(classes, timings, kernels.median_seconds, budget=float("inf"))
    took = time.perf_counter() - start
    layouts = {name: kernels.fastest(cls, timings, r) or kernels.default_layout(cls)
               for cls in classes.values() for name, r in cls.layers.items()}
    return classes, timings, layouts, took


def table(classes: dict, timings: dict, layouts: dict) -> list[str]:
    """Markdown rows: per shape class, the figure of each layout per regime, and the choice."""
    heads = [f"{n} row{'s' if n > 1 else ''} {kernels.unit(n)} ({' / '.join(kernels.LAYOUTS)})"
             for n in kernels.REGIMES.values()]
    rows = ["| shape (layers) | roles | " + " | ".join(heads) + " | chosen |", "|---|---|---|---|---|---|"]
    for cls in classes.values():
        cells = []
        for r in kernels.REGIMES:
            keys = [cls.probe(x, r).key for x in kernels.LAYOUTS if x in cls.layouts]
            cells.append(" / ".join(f"{kernels.rate(cls.probe(x, r), timings[k]):.{1 if r != 'prefill' else 2}f}"
                                    for x, k in zip(cls.layouts, keys) if k in timings) or "-")
        by_role = {}
        for name, role in cls.layers.items():
            by_role.setdefault(role, layouts[name])
        rows.append(f"| {cls.out}x{cls.inp} ({len(cls.layers)}) | {', '.join(by_role)} | " + " | ".join(cells)
                    + " | " + ", ".join(f"{r}: {x}" for r, x in by_role.items()) + " |")
    return rows


def main(argv=None) -> int:
    p = bench_parser(__doc__, threads=2, dtype="bfloat16")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = resolve_dtype(a.dtype, "cpu")
    gemv, read = best_gemv(), read_bandwidth()
    classes, timings, layouts, took = select(dtype)
    gemv_after = best_gemv()
    print(cpu_line(a.threads, dtype))
    by_kernel = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in gemv.items() if k != "best")
    print(f"references (same process): best GEMV {gemv['best'] / 1e9:.1f} GB/s before, "
          f"{gemv_after['best'] / 1e9:.1f} after ({by_kernel}); "
          f"memory read {read / 1e9:.1f} GB/s; measuring took {took:.1f} s")
    print("\n".join(table(classes, timings, layouts)))
    print("log line:", kernels.describe(classes, timings, layouts))
    write_json(a.json, {"cpu": kernels.cpu_model(), "cpu_flags": cpu_features(), "torch": torch.__version__,
                        "threads": a.threads, "dtype": str(dtype).split(".")[-1], "measure_s": took,
                        "gemv_GBps_by_kernel": {k: v / 1e9 for k, v in gemv.items()},
                        "gemv_GBps_after": gemv_after["best"] / 1e9, "read_GBps": read / 1e9,
                        "timings_s": timings, "chosen": layouts})
    return 0


if __name__ == "__main__":
    sys.exit(main())
