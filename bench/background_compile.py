"""What the single-stream apps' default (no --compile) does on this CPU: the decode step compiled
in a background thread while decoding goes on eagerly, then timed against eager and kept if
faster. Mid-size random-weight CogVLM of bench/decode.py (--quant as there), prepared as the CLIs
prepare it, beside a copy prepared with --no-compile. Reports the eager step while the compile
runs (what a user's first answers get), how long the compile took, the choice and its timings,
RSS before and after, then one decode step at 283 and 1,299 tokens of both models, alternating,
medians over --repeat rounds (only a same-process ratio means anything on a drifting box)."""
from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (bench_parser, cpu_start, load_options, medians, pack_or_compile, random_model,  # noqa: E402
                          rss_gb, write_cpu_json)
from bench.decode import MID, decode_step_time  # noqa: E402
from models.loading import prepare_for_inference  # noqa: E402


def while_compiling(model) -> dict:
    """Prepare `model` as the CLIs do and decode eagerly until its background compile is ready."""
    before, start = rss_gb(), time.perf_counter()
    prepare_for_inference(model, load_options("cpu", True, None, single_stream=True))
    step = model.runtime.decode_step
    if not hasattr(step, "decide"):
        sys.exit("the decode step is not compiled in the background here (the log above says why)")
    during = []
    while not step.ready.is_set():
        during.append(decode_step_time(model, 283, 4) * 1e3)
    compiled_s = time.perf_counter() - start
    kind = step.decide()
    print(f"compiled in the background in {compiled_s:.0f} s; eager steps meanwhile {statistics.median(during):.1f} "
          f"ms (median of {len(during)}); decoding {kind}; RSS {before:.2f} -> {rss_gb():.2f} GB", flush=True)
    return {"compile_s": round(compiled_s, 1), "eager_ms_while_compiling": during, "choice": kind,
            "choice_timings_ms": [round(t * 1e3, 2) for t in step.timed], "rss_gb": [before, rss_gb()]}


def main(argv=None) -> int:
    p = bench_parser(__doc__, threads=2, repeat=5, steps=8, dtype="auto",
                     quant=dict(help="weight-only int8/int4, image encoder int8"))
    a = p.parse_args(argv)
    dtype = cpu_start(a)
    base = random_model(MID, dtype, a.quant)
    models = {"--no-compile": pack_or_compile(copy.deepcopy(base), True, False, single_stream=True),
              "default": base}
    res = while_compiling(base)
    runs = {}
    for _ in range(a.repeat):
        for ctx in (283, 1299):
            for name, model in models.items():
                runs.setdefault(f"{name}, {ctx} tokens", []).append(decode_step_time(model, ctx, a.steps) * 1e3)
    res.update(median_ms=medians(runs), rounds_ms=runs)
    for ctx in (283, 1299):
        off, on = (res["median_ms"][f"{n}, {ctx} tokens"] for n in models)
        print(f"{ctx} tokens: default {on:.1f} ms ({1e3 / on:.2f} tok/s), --no-compile {off:.1f} ms "
              f"({1e3 / off:.2f} tok/s): {off / on:.2f}x")
    write_cpu_json(a.json, dtype, {"quant": a.quant, **res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
