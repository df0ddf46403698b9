"""Evaluation cost on CPU, to plan a run: seconds per 1,000 examples of each task kind through
the real runner (evaluation/evaluate.run_task + batch_chat), on the mid-size config of
bench/decode.py (16 layers of 2048, ViT 4 x 512 at 224 px; GUI tasks on its CogAgent, the same
language model plus the 448-px cross branch) with random weights. Random weights never say </s>,
so each task generates the answer length of a real one: a grounding box (18 tokens), a VQA short
answer (3), a POPE yes/no (2), a caption (12), CogAgent's plan + next action + grounded
operation (80).

  python bench/evaluate.py [--n 16] [--batch_size 8] [--json out.json]
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import bench_parser, cpu_features, random_model, write_json  # noqa: E402
from bench.decode import MID, MID_CROSS, with_cross_branch  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from utils.scoring.gui import GuiExample  # noqa: E402
from evaluation.evaluate import run_task  # noqa: E402
from models.generate import GenerationConfig  # noqa: E402
from utils.scoring.tasks import Example, model_answers  # noqa: E402
from utils.tiny.create_test_model import CORPUS  # noqa: E402
from utils.chat.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402

TASKS = {"refcoco:val": 18, "vqav2:val": 3, "pope:random": 2, "coco_caption:val": 12}
GUI_TASKS = {"screenspot:mobile": 80}         # Mind2Web and AITW answers are of the same kind and length


def examples_for(task: str, img: Path, n: int) -> list:
    """n examples of the task's kind, all on one image (scores are not the point: time is)."""
    if task.startswith("screenspot"):
        return [GuiExample(str(i), img, "open the settings", gui={"platform": "mobile", "type": "text",
                                                                  "box_norm": (0.1, 0.1, 0.2, 0.2)})
                for i in range(n)]
    q = "the man on the left" if task.startswith("refcoco") else "Is there a dog in the image?"
    return [Example(str(i), img, q, ["yes"] * 10, box=(0, 0, 100, 100), size=(640, 480)) for i in range(n)]


def time_task(model, tok, task: str, new_tokens: int, n: int, batch_size: int, tmp: Path, img: Path) -> dict:
    """Seconds per example of `n` examples of one task through run_task (after a warm-up batch)."""
    examples = examples_for(task, img, n)
    answer = model_answers(model, tok, GenerationConfig(max_new_tokens=new_tokens, top_k=1,
                                                        max_length=MID.max_sequence_length))
    out = tmp / task.replace(":", "_")
    out.mkdir()
    run_task(answer, task, examples[:batch_size], out, "auto", batch_size, show=False)   # warm-up
    out2 = tmp / (task.replace(":", "_") + "-timed")
    out2.mkdir()
    t = time.perf_counter()
    run_task(answer, task, examples, out2, "auto", batch_size, show=False)
    per = (time.perf_counter() - t) / n
    return {"s_per_example": per, "min_per_1000": per * 1000 / 60, "new_tokens": new_tokens}


def main(argv=None) -> int:
    p = bench_parser(__doc__, raw=True)
    p.add_argument("--n", type=int, default=16, help="examples per task")
    p.add_argument("--batch_size", type=int, default=8)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model = random_model(MID, torch.float32)
    res = {"config": "MID (16 layers of 2048, ViT 4x512 at 224 px), fp32, random weights",
           "cpu_flags": cpu_features({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
           "threads": torch.get_num_threads(), "batch_size": a.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = Tokenizer(train_sentencepiece(CORPUS * 20, tmp / "tok", vocab_size=400))
        img = tmp / "photo.jpg"
        Image.effect_noise((640, 480), 60).convert("RGB").save(img)
        agent = with_cross_branch(model, ModelConfig(**{**MID.__dict__, "model_class": "CogAgentModel",
                                                        "cross": MID_CROSS, "adapter_has_pos_embed": True}))
        runs = [(model, t, k) for t, k in TASKS.items()] + [(agent, t, k) for t, k in GUI_TASKS.items()]
        for m, task, new_tokens in runs:
            res[task] = time_task(m, tok, task, new_tokens, a.n, a.batch_size, tmp, img)
            per = res[task]["s_per_example"]
            print(f"{task:18s} {per:.2f} s/example = {per * 1000 / 60:.0f} min per 1,000 examples", flush=True)
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
