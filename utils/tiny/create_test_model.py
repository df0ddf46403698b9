"""Write a randomly initialised model of a named config (e.g. tiny-test-cogvlm) in the SAT
format, with a small SentencePiece tokenizer in its tokenizer/ folder. For tests, benchmarks
and trying the pipeline without released weights: its answers are random tokens."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from models import build_model, get_config, save_sat_checkpoint  # noqa: E402
from models.config import MODEL_CONFIGS  # noqa: E402
from utils.apps.tool import reports_errors, run_tool  # noqa: E402
from utils.chat.tokenizer import train_sentencepiece  # noqa: E402

CORPUS = """Question: What is in the image? Answer: A red circle and a blue square.
[INST] Describe the picture. [/INST] There is a cat on a mat near the window.
What color is the car? Short answer: green. How many dogs are there? Two dogs.
Can you point out the person in the image and provide the bounding boxes [[086,540,400,760]]
Grounded Operation:[button] Submit -> CLICK at the box [[212,498,787,564]] Plan: Next Action:
The quick brown fox jumps over the lazy dog 0123456789 ,.;:!?'"()[]{}<>/\\|-_=+*&^%$#@~`
"""


def create(name, out: Path, seed: int = 0, overwrite: bool = False, head_std: float = None) -> Path:
    """name: a named config or a ModelConfig. head_std: re-draw the LM head with this std
    (a trained model's logits span a wide range; the 0.02 init keeps them near uniform)."""
    cfg = get_config(name) if isinstance(name, str) else name
    torch.manual_seed(seed)
    model = build_model(cfg)
    if head_std is not None:
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, head_std)
    save_sat_checkpoint(model, cfg, out, overwrite=overwrite)
    train_sentencepiece(CORPUS * 20, out / "tokenizer", vocab_size=min(400, cfg.vocab_size))
    return out


@reports_errors()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="tiny-test-cogvlm", choices=sorted(MODEL_CONFIGS))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if (a.out / "latest").exists() and not a.overwrite:
        raise FileExistsError(f"{a.out} already holds a checkpoint (--overwrite to replace it)")
    create(a.config, a.out, a.seed, a.overwrite)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    run_tool(main)
