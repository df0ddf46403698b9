"""Batched decode throughput on the mid-size config of bench/decode.py: tokens/s at batch 1,
4 and 16 (one decode step serves every row; the weights are read once per step)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import bench_parser, cpu_features, medians, pack_or_compile, random_model, write_json  # noqa: E402
from models.kernels import cpu_model  # noqa: E402
from bench.decode import MID, decode_step_time  # noqa: E402
from models.compile import compile_attention  # noqa: E402
from models.loading import resolve_dtype  # noqa: E402


def compare_attention(model, repeat: int, steps: int, ctx: int) -> dict:
    """Rounds alternating the three decode attentions on one model (the box drifts between
    processes): tokens/s per variant, context and batch, medians over the rounds."""
    from models import cogvlm
    from models.compile import set_decode_attention
    compiled = model.model.layers[0].self_attn.decode_attention      # set by compile_attention
    chunk = cogvlm.DECODE_CHUNK_BYTES
    runs = {}
    for _ in range(repeat):
        for variant in ("one product", "row groups", "compiled"):
            cogvlm.DECODE_CHUNK_BYTES = 1 << 62 if variant == "one product" else chunk
            set_decode_attention(model, compiled if variant == "compiled" else cogvlm.decode_attention)
            for c in sorted({ctx, 1299}):
                for b in (1, 4, 16):
                    t = decode_step_time(model, c, steps, batch=b)
                    runs.setdefault(f"{variant}, {c} tokens, {b} rows", []).append(b / t)
    cogvlm.DECODE_CHUNK_BYTES = chunk
    res = medians(runs)
    for k, v in res.items():
        print(f"{k:34s} {v:7.2f} tok/s  (rounds: {', '.join(f'{x:.1f}' for x in runs[k])})")
    return {"median_tok_s": res, "rounds": runs}


def compare_invariance(model, repeat: int, steps: int, ctx: int) -> dict:
    """Rounds alternating the batched kernels and batch-invariant decoding (models/invariant.py)
    on one model: tokens/s at 1, 4 and 16 rows, and the invariant step's time over the batched
    one (medians over the rounds)."""
    from models.invariant import ROWS, make_batch_invariant
    runs = {}
    for _ in range(repeat):
        for rows in (0, ROWS):
            make_batch_invariant(model, rows)
            for b in (1, 4, 16):
                runs.setdefault(f"{'invariant' if rows else 'batched'}, {b} rows", []).append(
                    decode_step_time(model, ctx, steps, batch=b))
    make_batch_invariant(model, 0)
    res = medians(runs)
    out = {"ctx": ctx, "tok_s": {k: int(k.split(", ")[1].split()[0]) / t for k, t in res.items()}, "cost": {}}
    for b in (1, 4, 16):
        cost = res[f"invariant, {b} rows"] / res[f"batched, {b} rows"]
        out["cost"][f"{b} rows"] = cost
        print(f"{b:2d} rows at {ctx} tokens: batched {out['tok_s'][f'batched, {b} rows']:7.2f} tok/s, "
              f"invariant {out['tok_s'][f'invariant, {b} rows']:7.2f} tok/s: step time x{cost:.3f}")
    return out


def batch_rates(model, repeat: int, steps: int, ctx: int) -> dict:
    """Tokens/s at batch 1, 4 and 16 (medians of `repeat` measurements, interleaved)."""
    runs = {b: [] for b in (1, 4, 16)}
    for _ in range(repeat):
        for b in runs:
            runs[b].append(decode_step_time(model, ctx, steps, batch=b))
    res, base = {}, None
    for b, step in medians(runs).items():
        tok_s = b / step
        base = base or tok_s
        res[f"batch_{b}_tok_s"] = tok_s
        print(f"batch {b:2d}: {tok_s:6.2f} tokens/s ({tok_s / base:.2f}x batch 1), "
              f"{step * 1e3:.0f} ms/step at {ctx} tokens of context")
    return res


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, threads=2, repeat=3, steps=8, dtype="float32", quant=None, deterministic=None,
                     compile=dict(help="inductor-compiled decode step (models/compile.py; implies --no-packed)"))
    p.add_argument("--ctx", type=int, default=283)
    p.add_argument("--no-packed", dest="packed", action="store_false",
                   help="plain F.linear instead of the oneDNN-packed weights the demos use on CPU")
    p.add_argument("--compile_attention", action="store_true",
                   help="only the decode attention compiled, the weights packed: what openai_api.py "
                        "--compile runs (models.compile.compile_attention)")
    p.add_argument("--compare_attention", action="store_true",
                   help="one process, rounds alternating the decode attention: one batched product "
                        "(before), rows grouped (eager default), compiled; at --ctx and 1299 tokens")
    p.add_argument("--compare_invariance", action="store_true",
                   help="one process, rounds alternating the batched kernels and batch-invariant "
                        "decoding (--deterministic): the cost at 1, 4 and 16 rows")
    a = p.parse_args(argv)
    a.packed = a.packed and not a.compile
    if a.compile_attention or a.compare_attention:       # as the server: compiled attention is not invariant
        a.deterministic = False
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    dtype = resolve_dtype(a.dtype, "cpu")
    model = pack_or_compile(random_model(MID, dtype, a.quant, backend="torch"), a.packed, a.compile, a.deterministic)
    if (a.compile_attention or a.compare_attention) and not compile_attention(model):
        print("--compile_attention: compiling is not possible here (see the message above)")
        return 1
    if a.compare_attention:
        write_json(a.json, compare_attention(model, a.repeat, a.steps, a.ctx))
        return 0
    if a.compare_invariance:
        print(f"dtype {dtype}, quant {a.quant}, packed {a.packed}; CPU: {cpu_model()}, {' '.join(cpu_features())}")
        write_json(a.json, {"dtype": str(dtype), "quant": a.quant, "cpu": cpu_model(), "flags": cpu_features(),
                            **compare_invariance(model, a.repeat, a.steps, a.ctx)})
        return 0
    print(f"dtype {dtype}, quant {a.quant}, packed {a.packed}, compiled {a.compile}, "
          f"attention compiled {a.compile_attention}")
    res = {"ctx": a.ctx, "compiled": a.compile, "attention_compiled": a.compile_attention}
    res.update(batch_rates(model, a.repeat, a.steps, a.ctx))
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
