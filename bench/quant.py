"""Quantization table: weight bytes, peak RSS, decode tokens/s and greedy-token agreement with
fp32 over 50 prompts, for fp32 / bf16 / int8 / int4 of the same random-weight model.

Each precision runs in its own process (so peak RSS is its own); the model is a SAT
checkpoint written once (language hidden 1024, 8 layers, vocab 32000; ViT 56 px, 16 image tokens).
Random weights make the agreement figure a measure of numerical perturbation only; the
quality of a trained model is what matters, and this is the only one that can be run here.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from models import EVAConfig, ModelConfig, build_model, load_model, save_sat_checkpoint  # noqa: E402

SMALL = ModelConfig(num_layers=8, hidden_size=1024, num_attention_heads=16, inner_hidden_size=2816,
                    vocab_size=32000, max_sequence_length=2048,
                    eva=EVAConfig(num_layers=2, hidden_size=256, num_attention_heads=4,
                                  inner_hidden_size=1024, image_size=56))
PRECISIONS = ["fp32", "bf16", "int8", "int4"]


def worker(ckpt: str, precision: str, prompts: int, new_tokens: int, out: str) -> None:
    from models.generate import GenerationConfig, ModelInputs, generate_tokens
    from models.quantize import quantize, weight_bytes
    torch.set_num_threads(2)
    dtype = torch.bfloat16 if precision in ("bf16", "int8", "int4") else torch.float32
    model, cfg = load_model(ckpt, dtype=dtype)
    if precision.startswith("int"):
        quantize(model, int(precision[3:]))
    L = cfg.image_length
    g = torch.Generator().manual_seed(0)
    outputs, decode_time, decoded = [], 0.0, 0
    for i in range(prompts):
        n_text = 12
        ids = torch.randint(3, cfg.vocab_size, (1, 1 + L + 2 + n_text), generator=g)
        pos = torch.tensor([[0, 1] + [2] * L + [3] + list(range(4, 4 + n_text))])
        vision = torch.zeros_like(ids, dtype=torch.bool)
        vision[0, 1:L + 2] = True
        slots = vision.clone()
        slots[0, L + 2] = True
        img = torch.randn(1, 3, 56, 56, generator=g)
        with torch.inference_mode():
            inputs = ModelInputs(ids, pos, vision, slots, image_embeds=model.encode_images(img))
            toks, t0 = [], None
            for step, tok in enumerate(generate_tokens(model, inputs, GenerationConfig(), -1, new_tokens)):
                if step == 0:
                    t0 = time.perf_counter()          # decode steps only, after the prefill
                toks.append(int(tok))
            decode_time += time.perf_counter() - t0
            decoded += new_tokens - 1
        outputs.append(toks)
    Path(out).write_text(json.dumps({
        "weight_bytes": weight_bytes(model), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "tok_s": decoded / decode_time, "outputs": outputs}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--new_tokens", type=int, default=10)
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", nargs=3, metavar=("CKPT", "PRECISION", "OUT"))
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker[0], a.worker[1], a.prompts, a.new_tokens, a.worker[2])
        return 0
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        save_sat_checkpoint(build_model(SMALL), SMALL, Path(d) / "m")
        res = {}
        for prec in PRECISIONS:
            out = Path(d) / f"{prec}.json"
            subprocess.run([sys.executable, __file__, "--prompts", str(a.prompts), "--new_tokens",
                            str(a.new_tokens), "--worker", str(Path(d) / "m"), prec, str(out)], check=True)
            res[prec] = json.loads(out.read_text())
    ref = res["fp32"]["outputs"]
    print(f"{'':6} {'weights MB':>10} {'peak RSS MB':>11} {'decode tok/s':>12} {'greedy tokens = fp32':>21}")
    table = {}
    for prec in PRECISIONS:
        r = res[prec]
        same = sum(x == y for o, q in zip(ref, r["outputs"]) for x, y in zip(o, q))
        total = sum(len(o) for o in ref)
        exact = sum(o == q for o, q in zip(ref, r["outputs"]))
        table[prec] = dict(weight_MB=r["weight_bytes"] / 1e6, peak_rss_MB=r["peak_rss"] / 1e6,
                           tok_s=r["tok_s"], token_agreement=same / total, prompt_agreement=exact / len(ref))
        print(f"{prec:6} {r['weight_bytes'] / 1e6:10.0f} {r['peak_rss'] / 1e6:11.0f} {r['tok_s']:12.2f} "
              f"{same / total:10.1%} ({exact}/{len(ref)} prompts)")
    if a.json:
        a.json.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
