"""Run under torchrun by tests/test_tp.py: load a checkpoint tensor parallel over the ranks,
compute logits for a fixed image + text prompt and a greedy answer; rank 0 saves them."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from models.cogvlm import Cache  # noqa: E402
from models.generate import GenerationConfig, decode_one_token, prefill  # noqa: E402
from models.loading import LoadOptions, load_model  # noqa: E402
from models.tp import exit_process, init_distributed  # noqa: E402
from utils.chat import ImageContext, chat, prepare  # noqa: E402
from utils.chat.tokenizer import Tokenizer  # noqa: E402


def run(ckpt: str, image: str, rank: int = 0, world: int = 1, dtype: str = "float32") -> dict:
    torch.manual_seed(0)
    model, cfg = load_model(ckpt, LoadOptions(rank=rank, world=world, dtype=getattr(torch, dtype)))
    tok = Tokenizer(Path(ckpt) / "tokenizer")
    ctx = ImageContext(image, cfg)
    with torch.inference_mode():
        inputs = prepare(model, tok, "Describe the picture.", [], ctx)
        logits = model(inputs)
    gen = GenerationConfig(max_new_tokens=24)
    answer, _, _ = chat(model, tok, "Describe the picture.", [], ctx, gen=gen)
    text_only, _, _ = chat(model, tok, "Hello there", [], None, gen=gen)
    paths = [greedy_path(model, prepare(model, tok, q, [], c), 24)
             for q, c in (("Describe the picture.", ctx), ("Hello there", None))]
    return {"logits": logits, "answer": answer, "text_only": text_only, "paths": paths}


@torch.inference_mode()
def greedy_path(model, inputs, n: int) -> list:
    """The logits (fp32, V) of each of n greedy steps, along this model's own greedy tokens."""
    cache = Cache.allocate(model.config, 1, inputs.input_ids.shape[1] + n, next(model.parameters()).dtype,
                           "cpu", heads=model.num_kv_heads)
    steps = [prefill(model, inputs, cache)]
    for _ in range(n - 1):
        steps.append(decode_one_token(model, steps[-1].argmax(-1), cache))
    return [s[0].float() for s in steps]


if __name__ == "__main__":
    rank, world = init_distributed("cpu", timeout_s=60)
    out = run(sys.argv[1], sys.argv[2], rank, world, *sys.argv[4:5])
    if rank == 0:
        torch.save(out, sys.argv[3])     # argv: ckpt image out [dtype]
    exit_process(0)
