"""Score a model on a held-out synthetic set (utils/synthetic_data.py, another seed), greedy:
colour / shape / count / presence accuracy, referring expression -> box (IoU >= 0.5), text
reading (exact; text_chars: characters right in place, no goal), CogAgent actions (operation + target correct; box IoU >= 0.5).

  python utils/eval_synthetic.py --from_pretrained tiny-cogvlm --data data/synthetic-test [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from any directory
from utils.flags import ArgumentParser  # noqa: E402

from evaluation.metrics import iou  # noqa: E402
from utils.grounding import parse_agent_output, parse_groundings  # noqa: E402

GOALS = {"colour": 0.9, "shape": 0.9, "count": 0.9, "presence": 0.9, "box_iou50": 0.7, "text": 0.8,
         "agent_op_target": 0.8, "agent_box_iou50": 0.6}


def first_box(text: str):
    for g in parse_groundings(text):
        for b in g.boxes:
            if len(b) == 4:
                return b
    return None


def category(question: str) -> str:
    if question.startswith("What colour"):
        return "colour"
    if question.startswith("What shape"):
        return "shape"
    if question.startswith("How many"):
        return "count"
    if question.startswith("Is there"):
        return "presence"
    if question.startswith("Where is"):
        return "box"
    if question.startswith("What does the text say"):
        return "text"
    if "steps do I need" in question:
        return "agent"
    return "other"


def score(question: str, answer: str, reference: str) -> dict:
    """Per-metric 0/1 for one question (metrics that do not apply are absent)."""
    cat, a, r = category(question), answer.strip(), reference.strip()
    if cat in ("colour", "shape", "count", "presence", "text"):
        out = {cat: float(a.lower().rstrip(".") == r.lower().rstrip("."))}
        if cat == "text":              # partial credit, to see progress before exact matches
            out["text_chars"] = sum(x == y for x, y in zip(a.lower(), r.lower())) / max(len(a), len(r), 1)
        return out
    if cat == "box":
        pa, pr = first_box(a), first_box(r)
        return {"box_iou50": float(pa is not None and iou(pa, pr) >= 0.5)}
    if cat == "agent":
        pa, pr = parse_agent_output(a), parse_agent_output(r)
        ok = pa.operation == pr.operation and (pa.target or "").lower() == (pr.target or "").lower()
        ba, br = (pa.boxes[0] if pa.boxes else None), pr.boxes[0]
        return {"agent_op_target": float(ok),
                "agent_box_iou50": float(ba is not None and len(ba) == 4 and iou(ba, br) >= 0.5)}
    return {}


def evaluate(model, tok, data: Path, limit: int = None, batch: int = 16, version: str = None,
             records: list = None) -> dict:
    """-> {metric: {accuracy, n, goal}}; each question's [image, question, reference, answer]
    is appended to `records` when given."""
    from models.generate import GenerationConfig
    from utils.chat import ImageContext, batch_chat
    from tqdm import tqdm
    items = []
    for lab in sorted((data / "labels").glob("*.json")):
        d = json.loads(lab.read_text())
        img = next((data / "images").glob(lab.stem + ".*"))
        items += [(img, x["question"], x["answer"]) for x in d["qa"] if category(x["question"]) != "other"]
    items = items[:limit] if limit else items
    sums, counts = defaultdict(float), defaultdict(int)
    gen = GenerationConfig(max_new_tokens=96, top_k=1)
    cache = {}
    for i in tqdm(range(0, len(items), batch), desc="evaluating", unit="batch"):
        chunk = items[i:i + batch]
        reqs = []
        for img, q, _ in chunk:
            if img not in cache:
                cache = {img: ImageContext(img, model.config)}      # consecutive questions share it
            reqs.append((q, [], cache[img]))
        for (img, q, ref), ans in zip(chunk, batch_chat(model, tok, reqs, version, gen)):
            if records is not None:
                records.append([img.name, q, ref, ans])
            for k, v in score(q, ans, ref).items():
                sums[k] += v
                counts[k] += 1
    return {k: {"accuracy": sums[k] / counts[k], "n": counts[k], "goal": GOALS.get(k)} for k in sorted(counts)}


def main(argv=None) -> int:
    from utils.args import add_model_args, load_or_report, setup_logging
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, default_model="tiny-cogvlm")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if not (a.data / "labels").is_dir():
        print(f"error: {a.data} is not a synthetic data folder (no labels/); make one with "
              f"utils/synthetic_data.py", file=sys.stderr)
        return 1
    setup_logging()
    loaded = load_or_report(a)
    if loaded is None:
        return 1
    model, tok = loaded
    records = []
    res = evaluate(model, tok, a.data, a.limit, version=a.version, records=records)
    for k, v in res.items():
        goal = f" (goal {v['goal']:.0%})" if v["goal"] else ""
        print(f"{k:16s} {v['accuracy']:.1%} of {v['n']}{goal}")
    if a.json:
        # the answers too: a test replays the first questions and expects the same answers
        a.json.write_text(json.dumps({"metrics": res, "answers": records}, indent=0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
