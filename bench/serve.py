"""Serving throughput of the continuous-batching engine behind openai_api.py: aggregate
generated tokens/s and p50/p95 time to first token with 1, 4 and 16 concurrent streams, on the
tiny test model and on the mid-size config of bench/decode.py (random weights, text prompts of
about 20 tokens, a fixed number of new tokens per stream, greedy)."""
from __future__ import annotations

import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import bench_parser, pack_or_compile, random_model, write_json  # noqa: E402
from bench.decode import MID  # noqa: E402
from models import get_config  # noqa: E402
from models.compile import compile_attention  # noqa: E402
from models.invariant import compile_every_row  # noqa: E402
from models.generate import GenerationConfig  # noqa: E402
from models.loading import resolve_dtype  # noqa: E402
from utils.chat import prepare  # noqa: E402
from utils.tiny.create_test_model import CORPUS  # noqa: E402
from utils.serving.engine import BatchEngine, Request  # noqa: E402
from utils.chat.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402


def run_level(engine, model, tok, streams: int, new_tokens: int, filler: str = ""):
    ttft, done = [], threading.Barrier(streams + 1)
    counts, errors = [], []

    def one(i):
        q = queue.Queue()
        t0 = time.perf_counter()
        inp = prepare(model, tok, f"{filler}Question {i}: what is the quick brown fox doing today?")
        engine.submit(Request(inp, GenerationConfig(), new_tokens, q.put))
        first = None
        while True:
            ev = q.get()
            if ev["type"] == "first_token":
                first = time.perf_counter() - t0
            if ev["type"] == "done":
                if ev.get("finish_reason") == "error":
                    errors.append(ev.get("error"))
                counts.append(ev["completion_tokens"])
                ttft.append(first if first is not None else time.perf_counter() - t0)
                break
        done.wait()

    t0 = time.perf_counter()
    for i in range(streams):
        threading.Thread(target=one, args=(i,), daemon=True).start()
    done.wait()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"a stream failed: {errors[0]}")
    ttft.sort()
    return {"tok_s": sum(counts) / wall, "ttft_p50": statistics.median(ttft),
            "ttft_p95": ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))], "wall_s": wall}


def serve_levels(model, tok, name: str, new_tokens: int, context: int) -> dict:
    """Tokens/s and TTFT at 1, 4 and 16 streams through one BatchEngine (printed)."""
    model.config.eos_token_id = -1                     # EOS never ends a stream: each makes new_tokens
    unit = "the fox runs. "
    filler = unit * (context // len(tok.encode(unit)))
    question = f"{filler}Question 0: what is the quick brown fox doing today?"
    engine = BatchEngine(model, tok, max_batch=16, max_queue=64, max_len=256 + context)
    run_level(engine, model, tok, 1, 4, filler)               # warm-up (and compilation)
    run_level(engine, model, tok, 4, 4, filler)
    res = {}
    for streams in (1, 4, 16):
        r = run_level(engine, model, tok, streams, new_tokens, filler)
        r["prompt_tokens"] = prepare(model, tok, question).input_ids.shape[1]
        res[f"{name}_{streams}"] = r
        base = res[f"{name}_1"]["tok_s"]
        print(f"{name:4} {streams:2d} streams: {r['tok_s']:7.1f} tok/s "
              f"({r['tok_s'] / max(base, 1e-9):4.1f}x 1 stream), "
              f"TTFT p50 {r['ttft_p50'] * 1e3:6.0f} ms, p95 {r['ttft_p95'] * 1e3:6.0f} ms, "
              f"prompts of {r['prompt_tokens']} tokens")
    engine.close()
    return res


def main(argv=None) -> int:
    p = bench_parser(__doc__, threads=2, dtype="auto", quant=None, deterministic=None,
                     compile=dict(help="the decode attention compiled, as openai_api.py --compile runs it"))
    p.add_argument("--configs", nargs="+", default=["tiny", "mid"])
    p.add_argument("--context", type=int, default=0,
                   help="about this many tokens of filler text before each question: long prompts as "
                        "an image makes them (1258 tokens at CogVLM-17B's 490 px)")
    a = p.parse_args(argv)
    dtype = resolve_dtype(a.dtype, "cpu")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tok = Tokenizer(train_sentencepiece(CORPUS * 20, Path(d) / "tok"))
    res = {}
    for name in a.configs:
        cfg, new_tokens = (get_config("tiny-test-cogvlm"), 48) if name == "tiny" else (MID, 24)
        model = pack_or_compile(random_model(cfg, dtype, a.quant), True, False,   # as openai_api.py serves on CPU
                                a.deterministic)
        if a.compile and not compile_attention(model):
            print("--compile: compiling is not possible here (see the message above)")
            return 1
        compile_every_row(model)                 # as openai_api.py (one process)
        res.update(serve_levels(model, tok, name, new_tokens, a.context))
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
