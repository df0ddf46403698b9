"""Score a model on a held-out synthetic set (utils/data/synthetic.py, another seed), greedy:
colour / shape / count / presence accuracy, referring expression -> box (IoU >= 0.5), text
reading (exact; text_chars: characters right in place, no goal), CogAgent actions (operation + target correct; box IoU >= 0.5).

  python utils/tiny/evaluate.py --from_pretrained tiny-cogvlm --data data/synthetic-test [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from any directory
from utils.apps.flags import ArgumentParser  # noqa: E402
from utils.apps.tool import reports_errors, run_tool  # noqa: E402

from utils.scoring.metrics import first_box, iou, synthetic_category as category  # noqa: E402,F401
from utils.scoring.metrics import synthetic_scores as score  # noqa: E402,F401

GOALS = {"colour": 0.9, "shape": 0.9, "count": 0.9, "presence": 0.9, "box_iou50": 0.7, "text": 0.8,
         "agent_op_target": 0.8, "agent_box_iou50": 0.6}


def evaluate(model, tok, data: Path, limit: int = None, batch: int = 16, version: str = None,
             records: list = None) -> dict:
    """-> {metric: {accuracy, n, goal}} by the benchmark runner (task synthetic_qa: the same
    reader, batching and metrics as `evaluation/evaluate.py --task synthetic_qa:`); each
    question's [image, question, reference, answer] is appended to `records` when given."""
    from utils.data.synthetic import read_synthetic_qa
    from utils.scoring.tasks import model_answers, score_in_memory
    from models.generate import GenerationConfig
    examples = read_synthetic_qa(data, "")[:limit] if limit else read_synthetic_qa(data, "")
    rows = []
    m = score_in_memory(model_answers(model, tok, GenerationConfig(max_new_tokens=96, top_k=1)), "synthetic_qa:",
                        examples, version or "auto", batch, rows_out=rows, show=True)
    if records is not None:
        records += [[ex.image.name, ex.question, ex.answers[0], r["answer"]] for ex, r in zip(examples, rows)]
    return {k: {"accuracy": m[k] / 100, "n": m[k + "_n"], "goal": GOALS.get(k)}
            for k in sorted(m) if k != "n" and not k.endswith("_n")}


@reports_errors()
def main(argv=None) -> int:
    from utils.apps.args import add_model_args, load_or_report, setup_logging
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, default_model="tiny-cogvlm")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if not (a.data / "labels").is_dir():
        raise FileNotFoundError(f"{a.data} is not a synthetic data folder (no labels/); make one with "
                                f"utils/data/synthetic.py")
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
    run_tool(main)
