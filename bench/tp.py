"""Tensor-parallel decode speed on CPU: tokens/s with the model split over 1 and 2 processes
(torchrun, gloo), same checkpoint, same prompt, greedy, the demos' code path (load_model with
rank/world, prefill + decode_one_token). On CPU, 2 processes share the same 2 cores and every
layer adds gloo all-reduces, so expect TP=2 to be slower here; on GPUs it splits memory and
bandwidth. Reported, not tuned for.

  python bench/tp.py [--json out.json]          (launches the torchrun workers itself)
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import bench_parser, load, write_json  # noqa: E402


def worker(ckpt: str, out: str, new_tokens: int, repeat: int) -> None:
    from models.generate import GenerationConfig, generate_tokens
    from models.tp import exit_process, init_distributed
    from utils.chat import ImageContext, prepare
    from utils.chat.tokenizer import Tokenizer
    from PIL import Image
    rank, world = init_distributed("cpu")
    model, cfg = load(ckpt, rank=rank, world=world)
    tok = Tokenizer(Path(ckpt) / "tokenizer")
    ctx = ImageContext(Image.new("RGB", (224, 224), (120, 30, 60)), cfg)
    rates = []
    for _ in range(repeat + 1):
        inputs = prepare(model, tok, "Describe the image in detail.", [], ctx)
        steps = generate_tokens(model, inputs, GenerationConfig(), eos_token_id=-1, max_new_tokens=new_tokens + 1)
        next(steps)                                     # prefill + first token: not decode
        t = time.perf_counter()
        for _ in steps:
            pass
        rates.append(new_tokens / (time.perf_counter() - t))
    if rank == 0:
        write_json(Path(out), {"world": world, "tok_s": statistics.median(rates[1:])})
    exit_process(0)


def main(argv=None) -> int:
    p = bench_parser(__doc__, repeat=3)
    p.add_argument("--new_tokens", type=int, default=32)
    a = p.parse_args(argv)
    from bench.finetune import SMALL
    from utils.tiny.create_test_model import create
    res = {"config": "SMALL (8 layers, hidden 1024, ViT 4x512 at 224 px), fp32, 2 cores in total"}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = create(SMALL, Path(tmp) / "small", seed=0)
        for n in (1, 2):
            out = Path(tmp) / f"tp{n}.json"
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // n)), "LOGLEVEL": "WARNING"}
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                            f"--nproc-per-node={n}", __file__, "--worker", str(ckpt), str(out),
                            str(a.new_tokens), str(a.repeat)], check=True, env=env, cwd="/")
            res[f"tp{n}_tok_s"] = json.loads(out.read_text())["tok_s"]
            print(f"TP={n}: {res[f'tp{n}_tok_s']:.2f} tok/s", flush=True)
    res["tp2_over_tp1"] = res["tp2_tok_s"] / res["tp1_tok_s"]
    print(f"TP=2 / TP=1: {res['tp2_over_tp1']:.2f}x")
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(main())
