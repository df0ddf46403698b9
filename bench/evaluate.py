"""Evaluation cost on CPU, to plan a run: seconds per 1,000 examples of each task kind through
the real runner (evaluation/evaluate.run_task + batch_chat), on the mid-size config of
bench/decode.py (16 layers of 2048, ViT 4 x 512 at 224 px) with random weights. Random weights
never say </s>, so each task generates the answer length of a real one: a grounding box (18
tokens), a VQA short answer (3), a POPE yes/no (2).

  python bench/evaluate.py [--n 16] [--batch_size 8] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.decode import MID  # noqa: E402
from evaluation.datasets import Example  # noqa: E402
from evaluation.evaluate import model_answers, run_task  # noqa: E402
from models.generate import GenerationConfig  # noqa: E402
from models.loading import build_model, cpu_flags  # noqa: E402
from utils.tiny.create_test_model import CORPUS  # noqa: E402
from utils.chat.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402

TASKS = {"refcoco:val": 18, "vqav2:val": 3, "pope:random": 2}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="examples per task")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    torch.manual_seed(0)
    model = build_model(MID)
    res = {"config": "MID (16 layers of 2048, ViT 4x512 at 224 px), fp32, random weights",
           "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
           "threads": torch.get_num_threads(), "batch_size": a.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = Tokenizer(train_sentencepiece(CORPUS * 20, tmp / "tok", vocab_size=400))
        img = tmp / "photo.jpg"
        Image.effect_noise((640, 480), 60).convert("RGB").save(img)
        for task, new_tokens in TASKS.items():
            q = "the man on the left" if task.startswith("refcoco") else "Is there a dog in the image?"
            examples = [Example(str(i), img, q, ["yes"] * 10, box=(0, 0, 100, 100), size=(640, 480))
                        for i in range(a.n)]
            answer = model_answers(model, tok, GenerationConfig(max_new_tokens=new_tokens, top_k=1,
                                                                max_length=MID.max_sequence_length))
            out = tmp / task.replace(":", "_")
            out.mkdir()
            run_task(answer, task, examples[: a.batch_size], out, "auto", a.batch_size, show=False)   # warm-up
            out2 = tmp / (task.replace(":", "_") + "-timed")
            out2.mkdir()
            t = time.perf_counter()
            run_task(answer, task, examples, out2, "auto", a.batch_size, show=False)
            per = (time.perf_counter() - t) / a.n
            res[task] = {"s_per_example": per, "min_per_1000": per * 1000 / 60, "new_tokens": new_tokens}
            print(f"{task:12s} {per:.2f} s/example = {per * 1000 / 60:.0f} min per 1,000 examples", flush=True)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
