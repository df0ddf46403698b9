"""Up to how many rows PyTorch's weight-only kernels beat the dequantized GEMM, on this CPU: each
layer shape of a model (one decoder layer's language expert), int8 and int4, timed through the
kernel and through the dequantized path (eager passes; for int4 also the compiled expansion the
apps use once it is ready) on a ladder of row counts, the caches flushed before each call
(models.kernels.median_seconds). Reports the crossover the ladder shows beside the one the
apps take (models.kernels.crossover: the two lines through the timings at 16 and 64 rows) and
the constant it replaced (models.quantize.KERNEL_ROWS).

  python bench/kernel_rows.py [--shapes mid|cogvlm-17b] --json bench/results_kernel_rows.json
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import bench_parser, cpu_line, write_cpu_json  # noqa: E402
from bench.int4_kernel import SHAPES  # noqa: E402
from models import kernels  # noqa: E402
from models.kernels import KERNEL_ROW_PROBES, crossover  # noqa: E402
from models.quantize import KERNEL_ROWS, FusedExpand, WeightOnlyLinear, expand_kernel_int4  # noqa: E402

LADDER = (8, 16, 24, 32, 48, 64, 96, 128)


def ladder_crossover(rows: list, kernel: list, other: list) -> float:
    """The row count where the kernel stops being faster, interpolated between the ladder's rungs
    (its first rung where it never is, its last where it always is)."""
    for i in range(len(rows)):
        if kernel[i] > other[i]:
            if i == 0:
                return rows[0]
            d0, d1 = kernel[i - 1] - other[i - 1], kernel[i] - other[i]            # d0 <= 0 < d1
            return rows[i - 1] + (rows[i] - rows[i - 1]) * -d0 / (d1 - d0)
    return rows[-1]


@torch.inference_mode()
def time_paths(layer: WeightOnlyLinear, paths: dict) -> dict:
    """path -> seconds at each LADDER row count (every path and row count taking turns)."""
    probes, runs = [], []
    for rows in LADDER:
        x = torch.randn(rows, layer.in_features).to(layer.dtype)
        for name, use in paths.items():
            probes.append(kernels.Probe(name, "", layer.out_features, layer.in_features, rows, torch.get_num_threads(),
                                        "rows"))
            runs.append(lambda x=x, use=use: use(x))
    seconds = kernels.median_seconds(probes, runs)
    return {name: [s for p, s in zip(probes, seconds) if p.layout == name] for name in paths}


def measure_shape(n: int, k: int, bits: int, fused) -> dict:
    layer = WeightOnlyLinear(torch.randn(n, k).to(torch.bfloat16) * 0.02, None, bits)

    def dequantized(x, fn=None):
        FusedExpand.kernel_fn = fn
        return layer._matmul(x, False)
    paths = {"kernel": lambda x: layer._matmul(x, True), "dequantized": dequantized}
    if bits == 4 and fused is not None:
        layer.expanded_by(fused, 0, min(layer.chunk_rows(), n), strict=False)        # compiles once
        paths["fused"] = lambda x: dequantized(x, fused)
    t = time_paths(layer, paths)
    FusedExpand.kernel_fn = None
    at = [LADDER.index(r) for r in KERNEL_ROW_PROBES]
    res = {"shape": [n, k], "bits": bits, "rows": list(LADDER), "ms": {p: [s * 1e3 for s in v] for p, v in t.items()},
           "constant": KERNEL_ROWS[bits]}
    for p in paths:
        if p != "kernel":
            res[f"ladder_{p}"] = round(ladder_crossover(LADDER, t["kernel"], t[p]), 1)
            res[f"chosen_{p}"] = crossover([t["kernel"][i] for i in at] + [t[p][i] for i in at])
    return res


def main(argv=None) -> int:
    p = bench_parser(__doc__, raw=True, threads=2)
    p.add_argument("--shapes", choices=sorted(SHAPES), default="mid")
    p.add_argument("--bits", default="8,4")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(cpu_line(a.threads, torch.bfloat16), flush=True)
    fused = torch.compile(expand_kernel_int4, dynamic=True, fullgraph=True)
    results = []
    for bits in (int(b) for b in a.bits.split(",")):
        for n, k in dict.fromkeys(SHAPES[a.shapes]):
            r = measure_shape(n, k, bits, fused)
            results.append(r)
            found = "; ".join(f"{x}: ladder {r['ladder_' + x]}, chosen {r['chosen_' + x]}"
                              for x in ("dequantized", "fused") if "ladder_" + x in r)
            print(f"int{bits} {n}x{k}: the kernel is faster up to (constant {r['constant']}) {found}", flush=True)
            print("   ms " + " | ".join(f"{rows}: " + " / ".join(f"{r['ms'][x][i]:.1f}" for x in r["ms"])
                                       for i, rows in enumerate(LADDER)), flush=True)
    write_cpu_json(a.json, torch.bfloat16, {"threads": a.threads, "shapes": a.shapes, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
