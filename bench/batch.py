"""Batched decode throughput on the mid-size config of bench/decode.py: tokens/s at batch 1,
4 and 16 (one decode step serves every row; the weights are read once per step)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import compile_or_exit  # noqa: E402
from bench.decode import MID, decode_step_time  # noqa: E402
from models.compile import compile_attention  # noqa: E402
from models import CogVLM  # noqa: E402
from models.layout import pack_for_cpu_inference, use_fast_cpu_layout  # noqa: E402
from models.loading import init_weights  # noqa: E402


def compare_attention(model, a) -> int:
    """Rounds alternating the three decode attentions on one model (the box drifts between
    processes): tokens/s per variant, context and batch, medians over the rounds."""
    from models import cogvlm
    from models.compile import set_decode_attention
    compiled = model.model.layers[0].self_attn.decode_attention      # set by compile_attention
    chunk = cogvlm.DECODE_CHUNK_BYTES
    runs = {}
    for _ in range(a.repeat):
        for variant in ("one product", "row groups", "compiled"):
            cogvlm.DECODE_CHUNK_BYTES = 1 << 62 if variant == "one product" else chunk
            set_decode_attention(model, compiled if variant == "compiled" else cogvlm.decode_attention)
            for ctx in sorted({a.ctx, 1299}):
                for b in (1, 4, 16):
                    t = decode_step_time(model, ctx, a.steps, batch=b)
                    runs.setdefault(f"{variant}, {ctx} tokens, {b} rows", []).append(b / t)
    cogvlm.DECODE_CHUNK_BYTES = chunk
    res = {k: statistics.median(v) for k, v in runs.items()}
    for k, v in res.items():
        print(f"{k:34s} {v:7.2f} tok/s  (rounds: {', '.join(f'{x:.1f}' for x in runs[k])})")
    if a.json:
        a.json.write_text(json.dumps({"median_tok_s": res, "rounds": runs}, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--ctx", type=int, default=283)
    p.add_argument("--json", type=Path)
    p.add_argument("--no-packed", dest="packed", action="store_false",
                   help="plain F.linear instead of the oneDNN-packed weights the demos use on CPU")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--quant", type=int, choices=[4, 8], default=None)
    p.add_argument("--compile", action="store_true",
                   help="inductor-compiled decode step (models/compile.py; implies --no-packed)")
    p.add_argument("--compile_attention", action="store_true",
                   help="only the decode attention compiled, the weights packed: what openai_api.py "
                        "--compile runs (models.compile.compile_attention)")
    p.add_argument("--compare_attention", action="store_true",
                   help="one process, rounds alternating the decode attention: one batched product "
                        "(before), rows grouped (eager default), compiled; at --ctx and 1299 tokens")
    a = p.parse_args(argv)
    a.packed = a.packed and not a.compile
    torch.set_num_threads(a.threads)
    from models.loading import resolve_dtype
    from models.quantize import quantize
    dtype = resolve_dtype(a.dtype, "cpu")
    model = CogVLM(MID)
    init_weights(model)
    model = model.to(dtype).eval()
    if dtype == torch.float32:
        use_fast_cpu_layout(model)
    if a.quant:
        quantize(model, a.quant, vision_bits=8, backend="torch")
    if a.packed:
        pack_for_cpu_inference(model)
    if a.compile:
        compile_or_exit(model)
    if (a.compile_attention or a.compare_attention) and not compile_attention(model):
        print("--compile_attention: compiling is not possible here (see the message above)")
        return 1
    if a.compare_attention:
        return compare_attention(model, a)
    print(f"dtype {dtype}, quant {a.quant}, packed {a.packed}, compiled {a.compile}, "
          f"attention compiled {a.compile_attention}")
    runs = {b: [] for b in (1, 4, 16)}
    for _ in range(a.repeat):
        for b in runs:
            runs[b].append(decode_step_time(model, a.ctx, a.steps, batch=b))
    res = {"ctx": a.ctx, "compiled": a.compile, "attention_compiled": a.compile_attention}
    base = None
    for b, ts in runs.items():
        tok_s = b / statistics.median(ts)
        base = base or tok_s
        res[f"batch_{b}_tok_s"] = tok_s
        print(f"batch {b:2d}: {tok_s:6.2f} tokens/s ({tok_s / base:.2f}x batch 1), "
              f"{statistics.median(ts) * 1e3:.0f} ms/step at {a.ctx} tokens of context")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
