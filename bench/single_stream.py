"""The two CPU defaults in one process, alternating: a model prepared as the batching apps
prepare it (the server, the evaluation runner: batch-invariant decoding, layouts costed at the
few-row regime) against the same weights prepared as the single-stream apps prepare it (CLIs,
web and composite demos: no invariance, single rows through the kernels measured fastest).
Mid-size random-weight CogVLM of bench/decode.py; one decode step, 1 row, at 283 and 1,299
tokens of context; medians over --repeat rounds (a busy box drifts 2x between processes, so
only a same-process ratio means anything)."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import bench_parser, cpu_start, medians, pack_or_compile, random_model, write_cpu_json  # noqa: E402
from bench.decode import MID, decode_step_time  # noqa: E402


def compare(repeat: int, steps: int, dtype: torch.dtype) -> dict:
    """ms per step of each default, per context, medians over `repeat` alternating rounds."""
    base = random_model(MID, dtype)
    models = {"batching apps (invariant)": pack_or_compile(copy.deepcopy(base), True, False, single_stream=False),
              "single-stream apps": pack_or_compile(base, True, False, single_stream=True)}
    runs = {}
    for _ in range(repeat):
        for ctx in (283, 1299):
            for name, model in models.items():
                runs.setdefault(f"{name}, {ctx} tokens", []).append(decode_step_time(model, ctx, steps) * 1e3)
    res = medians(runs)
    for ctx in (283, 1299):
        inv, one = (res[f"{n}, {ctx} tokens"] for n in models)
        print(f"{ctx} tokens: batching apps {inv:.1f} ms, single-stream apps {one:.1f} ms a step ({inv / one:.2f}x)")
    return {"median_ms": res, "rounds_ms": runs}


def main(argv=None) -> int:
    p = bench_parser(__doc__, threads=2, repeat=6, steps=8, dtype="auto")
    a = p.parse_args(argv)
    dtype = cpu_start(a)
    res = compare(a.repeat, a.steps, dtype)
    write_cpu_json(a.json, dtype, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
