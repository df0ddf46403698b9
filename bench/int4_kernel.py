"""What bounds int4 decoding on this CPU: PyTorch's weight-only int4 kernel
(`_weight_int4pack_mm_for_cpu`, the one `--quant 4` runs for single-token steps) timed on one
row over a chain of a model's layer shapes, per group size, and inductor's own AVX-512 int4
template (`torch.compile(mode="max-autotune")` with frozen weights, what `--compile` could pick),
against the same process's memory read and best GEMV bandwidth.

If the kernel were bound by memory its weights/s would grow as the bytes per weight shrink
(bigger groups, fewer scales); a constant weights/s means it is bound by its arithmetic (unpack,
convert, scale, multiply), and then the fraction of bandwidth it can reach is fixed by the core
count, not by the layout.

  python bench/int4_kernel.py --json bench/results_int4_kernel.json
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import (bench_parser, best_gemv, cpu_features, median_time, read_bandwidth,  # noqa: E402
                          write_json)

# One decoder layer's language-expert shapes (out, in): QKV, dense, gate, up, down.
SHAPES = {"mid": [(6144, 2048), (2048, 2048), (5632, 2048), (5632, 2048), (2048, 5632)],
          "cogvlm-17b": [(12288, 4096), (4096, 4096), (11008, 4096), (11008, 4096), (4096, 11008)]}


def packed_chain(shapes, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, k in shapes:
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
        out.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
                    torch.randn(k // group, n, 2, generator=g).to(torch.bfloat16), k))
    return out


def eager_rate(chain, group: int, repeat: int) -> dict:
    xs = {k: torch.randn(1, k).to(torch.bfloat16) for _, _, k in chain}

    def run():
        for w, sz, k in chain:
            torch._weight_int4pack_mm_for_cpu(xs[k], w, group, sz)
    t = median_time(run, repeat, warmup=3)
    weights = sum(w.shape[0] * k for w, _, k in chain)
    nbytes = sum(w.numel() + sz.numel() * sz.element_size() for w, sz, _ in chain)
    return {"gweights_s": weights / t / 1e9, "gbytes_s": nbytes / t / 1e9}


def compiled_rate(shapes, repeat: int) -> dict:
    """The same chain as nn.Modules, compiled whole with frozen weights (inductor chooses
    between its int4 template and the ATen kernel by timing both)."""
    from models.compile import frozen_settings, inductor_settings
    from models.quantize import GROUP, WeightOnlyLinear
    layers = torch.nn.ModuleList(WeightOnlyLinear(torch.randn(n, k).to(torch.bfloat16) * 0.02, None, 4)
                                 for n, k in shapes).eval()

    def chain(x):
        return [layer(x[:, :layer.in_features]) for layer in layers]
    x = torch.randn(1, max(k for _, k in shapes)).to(torch.bfloat16)
    with torch.inference_mode():
        eager_t = median_time(lambda: chain(x), repeat, warmup=3)
        compiled = torch.compile(chain, mode="max-autotune", fullgraph=True)
        with inductor_settings(frozen_settings()):
            compiled(x)
        t = median_time(lambda: compiled(x), repeat, warmup=3)
    weights = sum(n * k for n, k in shapes)
    nbytes = sum(n * k // 2 + k // GROUP * n * 4 for n, k in shapes)
    return {"group": GROUP, "eager_gbytes_s": nbytes / eager_t / 1e9, "compiled_gbytes_s": nbytes / t / 1e9,
            "compiled_gweights_s": weights / t / 1e9}


def main(argv=None) -> int:
    p = bench_parser(__doc__, raw=True, threads=2, repeat=15)
    p.add_argument("--groups", default="32,64,128,256")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip inductor's template")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = {"threads": a.threads, "cpu_flags": cpu_features(), "read_gbps": read_bandwidth() / 1e9,
           "best_gemv_gbps": best_gemv()["best"] / 1e9, "eager": {}}
    print(f"memory read {res['read_gbps']:.1f} GB/s, best GEMV {res['best_gemv_gbps']:.1f} GB/s")
    for name, shapes in SHAPES.items():
        for group in (int(g) for g in a.groups.split(",")):
            r = eager_rate(packed_chain(shapes, group), group, a.repeat)
            res["eager"][f"{name} group {group}"] = r
            print(f"{name:10s} group {group:3d}: {r['gweights_s']:5.1f} G weights/s = {r['gbytes_s']:5.1f} GB/s "
                  f"({r['gbytes_s'] / res['best_gemv_gbps']:.0%} of best GEMV)", flush=True)
    if a.compile:
        r = res["compiled_mid"] = compiled_rate(SHAPES["mid"], a.repeat)
        print(f"mid, inductor max-autotune (group {r['group']}): {r['compiled_gbytes_s']:.1f} GB/s vs eager "
              f"{r['eager_gbytes_s']:.1f} GB/s")
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
