"""Quality and memory per precision and quantization scheme, against bf16: weight bytes, peak
RSS, decode tokens/s, greedy-token agreement and the error of the first step's logits over
50 prompts, for fp32 / bf16 / PyTorch int8 / PyTorch int4 (groups of 64 and 128) / bitsandbytes
int8 / nf4 of the same random-weight model; then the same agreement and logit error on the
bundled trained models.

Each scheme runs in its own process (so peak RSS is its own); the model is a SAT checkpoint
written once (language hidden 1024, 8 layers, vocab 32000; ViT 56 px, 16 image tokens).
Random weights make the agreement figure a measure of numerical perturbation only (their
logits have tiny margins, so every rounding flips tokens); the bundled models are trained.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import bench_parser, image_prompt, load, logits, peak_rss, random_model, write_json  # noqa: E402
from models import EVAConfig, ModelConfig, save_sat_checkpoint  # noqa: E402

SMALL = ModelConfig(num_layers=8, hidden_size=1024, num_attention_heads=16, inner_hidden_size=2816,
                    vocab_size=32000, max_sequence_length=2048,
                    eva=EVAConfig(num_layers=2, hidden_size=256, num_attention_heads=4,
                                  inner_hidden_size=1024, image_size=56))
# scheme -> (load dtype, bits, back end, int4 group)
SCHEMES = {"fp32": (torch.float32, None, None, None), "bf16": (torch.bfloat16, None, None, None),
           "int8": (torch.bfloat16, 8, "torch", None), "int4": (torch.bfloat16, 4, "torch", None),
           "int4-g128": (torch.bfloat16, 4, "torch", 128),
           "bnb-int8": (torch.bfloat16, 8, "bitsandbytes", None), "bnb-nf4": (torch.bfloat16, 4, "bitsandbytes", None)}
REF = "bf16"


def load_scheme(ckpt: str, scheme: str):
    """(model, config) of `ckpt` in one of SCHEMES."""
    from models.quantize import quantize
    dtype, bits, backend, group = SCHEMES[scheme]
    if backend == "bitsandbytes":                      # bitsandbytes quantizes after loading
        model, cfg = load(ckpt, dtype)
        quantize(model, bits, vision_bits=8, backend=backend, group=group)
    else:
        model, cfg = load(ckpt, dtype, bits, group)
    return model, cfg


def worker(ckpt: str, scheme: str, prompts: int, new_tokens: int, out: str) -> None:
    from models.generate import GenerationConfig, ModelInputs, generate_tokens
    from models.quantize import weight_bytes
    torch.set_num_threads(2)
    model, cfg = load_scheme(ckpt, scheme)
    g = torch.Generator().manual_seed(0)
    outputs, first_logits, decode_time, decoded = [], [], 0.0, 0
    for i in range(prompts):
        ids, pos, vision, slots = image_prompt(cfg, 12, generator=g)
        img = torch.randn(1, 3, 56, 56, generator=g)
        with torch.inference_mode():
            inputs = ModelInputs(ids, pos, vision, slots, image_embeds=model.encode_images(img))
            first_logits.append(logits(model, inputs, last_only=True)[0, -1].float())
            toks, t0 = [], None
            for step, tok in enumerate(generate_tokens(model, inputs, GenerationConfig(), -1, new_tokens)):
                if step == 0:
                    t0 = time.perf_counter()          # decode steps only, after the prefill
                toks.append(int(tok))
            decode_time += time.perf_counter() - t0
            decoded += new_tokens - 1
        outputs.append(toks)
    torch.save(torch.stack(first_logits), out + ".pt")
    Path(out).write_text(json.dumps({
        "weight_bytes": weight_bytes(model), "peak_rss": peak_rss(),
        "tok_s": decoded / decode_time, "outputs": outputs}))


def logit_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over prompts of ||a - ref|| / ||ref|| (first-step logits)."""
    return float(((a - ref).norm(dim=-1) / ref.norm(dim=-1)).mean())


BUNDLED = [("tiny-cogvlm", "scene.png", ["Describe the image.", "How many shapes are there?",
                                         "What shape is the blue object?", "Describe the image with boxes.",
                                         "What colour is the square?"]),
           ("tiny-cogagent", "gui.png", ['What steps do I need to take to "click the Open button"?(with grounding)',
                                         "Describe the image.", "What does the title say?"])]


def bundled(schemes) -> dict:
    """Greedy answers and first-step logits of the bundled models' example questions, per scheme."""
    from models.generate import GenerationConfig
    from models.loading import BUNDLED_DIR
    from utils.chat import ImageContext, chat, prepare
    from utils.chat.tokenizer import Tokenizer
    root = Path(__file__).resolve().parent.parent
    res = {}
    for scheme in schemes:
        answers, first = [], []
        for name, image, questions in BUNDLED:
            model, cfg = load_scheme(str(BUNDLED_DIR / name), scheme)
            tok = Tokenizer(BUNDLED_DIR / name / "tokenizer")
            for q in questions:
                img = ImageContext(root / "assets" / image, cfg)
                x = prepare(model, tok, q, [], img)
                with torch.inference_mode():
                    first.append(logits(model, x, last_only=True)[0, -1].float())
                answers.append(chat(model, tok, q, [], img, gen=GenerationConfig(max_new_tokens=64))[0])
        res[scheme] = (answers, first)
    return res


def run_schemes(schemes, prompts: int, new_tokens: int) -> tuple[dict, dict]:
    """Each scheme's worker in its own process on one random-weight checkpoint written here:
    scheme -> its figures and outputs, scheme -> its first-step logits."""
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        save_sat_checkpoint(random_model(SMALL, torch.float32), SMALL, Path(d) / "m")
        res, first = {}, {}
        for scheme in schemes:
            out = Path(d) / f"{scheme}.json"
            subprocess.run([sys.executable, __file__, "--prompts", str(prompts), "--new_tokens",
                            str(new_tokens), "--worker", str(Path(d) / "m"), scheme, str(out)], check=True)
            res[scheme] = json.loads(out.read_text())
            first[scheme] = torch.load(str(out) + ".pt")
    return res, first


def random_table(schemes, res: dict, first_logits: dict) -> dict:
    """The random-weight model's figures per scheme, against REF (printed as a table)."""
    ref = res[REF]["outputs"]
    print(f"random-weight model, against {REF}:")
    print(f"{'':9} {'weights MB':>10} {'peak RSS MB':>11} {'decode tok/s':>12} {'logit error':>11} "
          f"{'first token = bf16':>18} {'greedy tokens = bf16':>21}")
    table = {}
    for scheme in schemes:
        r = res[scheme]
        same = sum(x == y for o, q in zip(ref, r["outputs"]) for x, y in zip(o, q))
        total = sum(len(o) for o in ref)
        exact = sum(o == q for o, q in zip(ref, r["outputs"]))
        lg, ref_lg = first_logits[scheme], first_logits[REF]
        first = float((lg.argmax(-1) == ref_lg.argmax(-1)).float().mean())
        err = logit_error(lg, ref_lg)
        table[scheme] = dict(weight_MB=r["weight_bytes"] / 1e6, peak_rss_MB=r["peak_rss"] / 1e6,
                             tok_s=r["tok_s"], logit_rel_error=err, first_token_agreement=first,
                             token_agreement=same / total, prompt_agreement=exact / len(ref))
        print(f"{scheme:9} {r['weight_bytes'] / 1e6:10.0f} {r['peak_rss'] / 1e6:11.0f} {r['tok_s']:12.2f} "
              f"{err:11.4f} {first:18.1%} {same / total:10.1%} ({exact}/{len(ref)} prompts)")
    return table


def bundled_table(schemes) -> dict:
    """The bundled models' agreement with REF per scheme (printed)."""
    b = bundled(schemes)
    print(f"\nbundled models (tiny-cogvlm, tiny-cogagent; {len(b[REF][0])} questions), against {REF}:")
    table = {}
    for scheme in schemes:
        answers, lg = b[scheme]
        same = sum(x == y for x, y in zip(answers, b[REF][0]))
        err = sum(logit_error(x[None], y[None]) for x, y in zip(lg, b[REF][1])) / len(lg)
        table[scheme] = dict(same_answers=same, of=len(answers), logit_rel_error=err)
        print(f"{scheme:9} same greedy answer {same}/{len(answers)}, logit error {err:.4f}")
    return table


def main(argv=None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--new_tokens", type=int, default=10)
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--worker", nargs=3, metavar=("CKPT", "SCHEME", "OUT"))
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker[0], a.worker[1], a.prompts, a.new_tokens, a.worker[2])
        return 0
    schemes = a.schemes.split(",")
    res, first_logits = run_schemes(schemes, a.prompts, a.new_tokens)
    table = {"random": random_table(schemes, res, first_logits), "bundled": bundled_table(schemes)}
    write_json(a.json, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
