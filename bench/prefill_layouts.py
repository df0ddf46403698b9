"""The layers only prefill uses (image encoder and adapter, vision experts; int8 ones too) in
each layout they can take, in one process, alternating: the mid-size random-weight CogVLM of
bench/decode.py (optionally quantized as `--quant N` quantizes it), one copy per layout of
those layers: row-major (`plain`: what a compiled decode step left them in before they took
their measured layout), oneDNN-packed for a decode step's rows (`packed`) and for a prefill's
(`packed_many`). Every other layer takes the layout measured here (models/kernels.py), the same
in every copy. With `--quant 4` those copies keep the int4 prefill-only layers (vision experts) in
PyTorch's int4 kernel layout, and two more copies take the measured layouts: `measured` with
those int4 layers in the kernel's layout, `measured+split` split by rows as the apps load them
(quantize.SplitInt4Linear); every copy expands its int4 layers in eager passes, and
`measured+split+fused` is the split copy again with the expansions compiled (where a C++
compiler exists), as the apps run it, and `measured+split+fused+fixed_rows` the same with the
weight-only kernels taking up to quantize.KERNEL_ROWS rows, not the rows measured here. Times the image encoder + a 283-token prefill; medians over --repeat rounds,
each against the same process's bf16 / fp32 GEMM (a busy box drifts 2x between processes).

  python bench/prefill_layouts.py [--quant 8|4] [--text N] --json bench/results_prefill_layouts.json
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import (bench_parser, cpu_start, gemm_dtype, gemm_flops, median_time, medians,  # noqa: E402
                          random_model, write_cpu_json)
from bench.decode import MID, make_inputs, prefill_flops, prefill_run  # noqa: E402
from models import CogVLM  # noqa: E402
from models.kernels import choose_kernel_rows, choose_layouts, role  # noqa: E402
from models.layout import PACKED, apply_layouts, split_prefill_int4  # noqa: E402
from models.compile import expand_int4_in_background  # noqa: E402
from models.quantize import FusedExpand, WeightOnlyLinear, quantize  # noqa: E402

VARIANTS = ("plain",) + tuple(PACKED)


def variants(bits: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """layout -> a copy of the model whose prefill-only layers take it; and the measured choice."""
    base = random_model(MID, dtype)
    if bits:
        quantize(base, bits, vision_bits=8)
        choose_kernel_rows(base)                     # as the apps load it (every copy keeps these rows)
    chosen = choose_layouts(base)
    shared = {n: x for n, x in chosen.items() if role(n) != "prefill"}
    models = {}
    if bits == 4:      # as measured, the int4 prefill-only layers in the kernel's layout / split by rows (the apps')
        for name in ("measured", "measured+split"):
            models[name] = copy.deepcopy(base)
            apply_layouts(models[name], chosen)
        split_prefill_int4(models["measured+split"])
    for i, layout in enumerate(VARIANTS):
        m = base if i == len(VARIANTS) - 1 else copy.deepcopy(base)     # the last takes the original
        apply_layouts(m, {**shared, **{n: layout for n in chosen if role(n) == "prefill"}})
        models[layout] = m
    return models, {n: x for n, x in chosen.items() if role(n) == "prefill"}


def with_eager_expansion(run):
    """`run` with the int4 expansions in eager passes (quantize.FusedExpand off around the call)."""
    def eager_passes():
        fused = FusedExpand.fn, FusedExpand.kernel_fn
        FusedExpand.fn = FusedExpand.kernel_fn = None
        try:
            return run()
        finally:
            FusedExpand.fn, FusedExpand.kernel_fn = fused
    return eager_passes


def prefill_runs(models: dict, prompt) -> dict:
    """name -> the prefill of models[name]. With int4 layers (--quant 4) every variant expands
    them in eager passes, as before session 15, and where inductor compiles here one more,
    `measured+split+fused`, takes the compiled single passes (the split layers', and the
    kernel-layout layers' beyond KERNEL_ROWS rows): the apps' default now."""
    fns = {name: prefill_run(m, prompt, "cpu") for name, m in models.items()}
    if "measured+split" not in models:
        return fns
    thread = expand_int4_in_background(models["measured+split"])
    if thread is not None:
        thread.join()
    fused = FusedExpand.fn or FusedExpand.kernel_fn
    return {**{name: with_eager_expansion(fn) for name, fn in fns.items()},
            **({"measured+split+fused": fns["measured+split"],
                "measured+split+fused+fixed_rows": with_fixed_kernel_rows(fns["measured+split"],
                                                                          models["measured+split"])} if fused else {})}


def with_fixed_kernel_rows(run, model):
    """`run` with `model`'s weight-only layers taking PyTorch's kernel up to quantize.KERNEL_ROWS
    rows, the constant in use before the rows were measured (kernels.choose_kernel_rows)."""
    layers = [m for m in model.modules() if isinstance(m, WeightOnlyLinear) and m.kernel_rows]

    def fixed():
        rows = [m.kernel_rows for m in layers]
        for m in layers:
            m.kernel_rows = None
        try:
            return run()
        finally:
            for m, r in zip(layers, rows):
                m.kernel_rows = r
    return fixed


def main(argv=None) -> int:
    p = bench_parser(__doc__, threads=2, repeat=7, dtype="auto")
    p.add_argument("--quant", type=int, default=0, choices=[0, 4, 8], help="language model bits (0: none)")
    p.add_argument("--text", type=int, default=24, help="text tokens of the prompt besides the image's (default 24)")
    a = p.parse_args(argv)
    dtype = cpu_start(a)
    models, chosen = variants(a.quant, dtype)
    prompt = make_inputs(MID, a.text, models["plain"], False)
    fns = prefill_runs(models, prompt)
    for fn in fns.values():                             # warm-up: oneDNN's kernels, the scratch weights
        fn()
    runs = {"gemm": []}
    for _ in range(a.repeat):
        runs["gemm"].append(gemm_flops(repeat=3, dtype=gemm_dtype(dtype)))
        for name, fn in fns.items():
            runs.setdefault(name, []).append(median_time(fn, 1, 0))
    med = medians(runs)
    with torch.device("meta"):
        counted = CogVLM(MID)
    T = prompt.input_ids.shape[1]
    flops = prefill_flops(counted, MID, T, int(prompt.vision_mask.sum()))
    picked = sorted(set(chosen.values()))
    print(f"--quant {a.quant or 'none'}, {dtype}: the measured choice for the {len(chosen)} prefill-only "
          f"layers: {', '.join(picked)}; GEMM {med['gemm'] / 1e12:.2f} TFLOP/s")
    for name in fns:
        print(f"  prefill-only layers {name:14s}: {med[name]:.3f} s = {flops / med[name] / med['gemm']:.0%} of "
              f"GEMM, {med[name] / med['plain']:.2f}x plain")
    write_cpu_json(a.json, dtype, {"quant": a.quant, "text_tokens": a.text, "chosen": picked, "median_s": med, "rounds_s": runs,
                                   "prefill_gflop": flops / 1e9})
    return 0


if __name__ == "__main__":
    sys.exit(main())
