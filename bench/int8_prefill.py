"""int8 layers only prefill uses (image encoder; under --quant 8 also the vision experts), their
codes in oneDNN's blocked order against row-major, in one process, alternating: the mid-size
random-weight CogVLM of bench/decode.py quantized as `--quant N` quantizes it (image encoder
int8), prepared as the apps prepare it (each layer's layout measured here, models/kernels.py),
against a copy whose int8 prefill-only layers keep their row-major codes. Times the image
encoder + a 283-token prefill; medians over --repeat rounds (a busy box drifts 2x between
processes, so only a same-process ratio means anything)."""
from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import bench_parser, cpu_start, median_time, medians, random_model, write_cpu_json  # noqa: E402
from bench.decode import MID, make_inputs, prefill_run  # noqa: E402
from models.kernels import choose_layouts  # noqa: E402
from models.layout import PackedInt8Linear, apply_layouts  # noqa: E402
from models.quantize import quantize  # noqa: E402


def compare(bits: int, repeat: int, dtype: torch.dtype) -> dict:
    """Prefill seconds of each layout, medians over `repeat` alternating rounds."""
    chosen = quantize(random_model(MID, dtype), bits, vision_bits=8)
    row_major = copy.deepcopy(chosen)
    layouts = choose_layouts(chosen)
    apply_layouts(chosen, layouts)
    blocked = {n for n, m in chosen.named_modules() if isinstance(m, PackedInt8Linear)}
    apply_layouts(row_major, {n: "plain" if n in blocked else x for n, x in layouts.items()})
    print(f"--quant {bits}: {len(blocked)} int8 prefill-only layers take the blocked codes", flush=True)
    prompt = make_inputs(MID, 24, chosen, False)
    models = {"chosen (blocked where faster)": chosen, "row-major int8": row_major}
    fns = {name: prefill_run(m, prompt, "cpu") for name, m in models.items()}
    for fn in fns.values():                             # warm-up: oneDNN's kernels, the scratch weights
        fn()
    runs = {}
    for _ in range(repeat):
        for name, fn in fns.items():
            runs.setdefault(name, []).append(median_time(fn, 1, 0))
    res = medians(runs)
    a, b = res.values()
    ratio = statistics.median(y / x for x, y in zip(*runs.values()))       # round by round
    print(f"prefill (image encoder + {prompt.input_ids.shape[1]} tokens): chosen {a:.3f} s, "
          f"row-major {b:.3f} s ({b / a:.3f}x; median of the rounds' ratios {ratio:.3f}x)")
    return {"bits": bits, "blocked_layers": len(blocked), "median_s": res, "ratio_of_rounds": ratio,
            "rounds_s": runs}


def main(argv=None) -> int:
    p = bench_parser(__doc__, threads=2, repeat=8, dtype="auto")
    p.add_argument("--quant", type=int, default=8, choices=[4, 8], help="language model bits (default 8)")
    a = p.parse_args(argv)
    dtype = cpu_start(a)
    res = compare(a.quant, a.repeat, dtype)
    write_cpu_json(a.json, dtype, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
