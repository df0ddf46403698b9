"""Scoring answers in memory, shared by the benchmark runner (evaluation/), the finetuning
scripts' evaluations and the bundled models' scoring: the prompt each task asks, the score of one
answer, a task's metrics over its rows, and `score_in_memory` (answer and score without files,
data parallel over a process group)."""
from __future__ import annotations

from typing import Optional

from .captions import caption_cider, caption_protocol
from .example import DataError, Example  # noqa: F401 - importable from here too
from .metrics import grounding_hit, synthetic_scores
from .pope import pope_scores
from .vqa import VQA_PROTOCOLS


CAPTION_REQUEST = "Describe the image in one sentence."

# The VQA protocol each benchmark is scored by unless one is named (--vqa_protocol): VQAv2 by the
# 2016 VQA evaluation, TextVQA by its server's (EvalAI) answer processor.
VQA_PROTOCOL_DEFAULTS = {"vqav2": "vqa2016", "textvqa": "evalai"}
GROUNDING_PROTOCOL = ("accuracy: every box merged by min/max (CogVLM issue #127); accuracy_first_box: the "
                      "first [[...]] group with a box (mm_evaluation text_to_box); IoU > 0.5")
PROTOCOLS = {"grounding": GROUNDING_PROTOCOL, "pope": "RUCAIBox/POPE evaluate.py",
             "exact": "exact match", "synthetic": "synthetic set, per kind"}

# Splits without public answers: the answers go to the benchmark's evaluation server instead.
# task -> (results file, {alg} filled in, where to upload it). VQAv2's name follows the VQA
# repository's convention (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvalDemo.py:
# <version><task>_<data>_<subset>_<alg>_results.json).
SERVER_SPLITS = {
    "vqav2:test-dev": ("v2_OpenEnded_mscoco_test-dev2015_{alg}_results.json",
                       "https://eval.ai/web/challenges/challenge-page/830 (phase Test-Dev)"),
    "vqav2:test": ("v2_OpenEnded_mscoco_test2015_{alg}_results.json",
                   "https://eval.ai/web/challenges/challenge-page/830 (phase Test-Standard)"),
    "textvqa:test": ("TextVQA_0.5.1_test_{alg}_results.json",
                     "https://eval.ai/web/challenges/challenge-page/874 (phase Test)"),
}


# CogAgent's GUI benchmarks (utils/scoring/gui.py): each its own kind.
GUI_KINDS = ("screenspot", "mind2web", "aitw")


def kind(task: str) -> str:
    name = task.split(":")[0]
    if name in GUI_KINDS:
        return name
    return {"vqav2": "vqa", "textvqa": "vqa", "pope": "pope", "coco_caption": "caption",
            "flickr30k": "caption", "nocaps": "caption",
            "finetune": "exact", "synthetic_qa": "synthetic"}.get(name, "grounding")


def prompt(task: str, ex: Example, version: str, grounding_prompt: Optional[str] = None) -> tuple[str, str]:
    """(query, template) per task: referring expressions in the grounding request (default:
    the first of utils/chat/task_prompts.py EXPRESSION_TO_BOX); VQA in the `Short answer`
    template; POPE's question in the model's own template; GUI tasks CogAgent's request."""
    k = kind(task)
    if k in GUI_KINDS:
        from . import gui
        return gui.prompt(ex, version)
    if k == "grounding":
        # imported here: scoring a predictions file needs no chat code (nor torch)
        from utils.chat.task_prompts import EXPRESSION_TO_BOX, fill
        return fill(grounding_prompt or EXPRESSION_TO_BOX[0], expr=ex.question), version
    if k == "vqa":
        return ex.question, version if version != "auto" else "vqa"
    if k == "caption":
        return CAPTION_REQUEST, version
    return ex.question, version


def vqa_protocol(task: str, override: Optional[str] = None) -> str:
    """The VQA protocol a task is scored by: `override` when given, else its default."""
    if override is not None and override not in VQA_PROTOCOLS:
        raise ValueError(f"unknown VQA protocol {override!r}; known: {', '.join(VQA_PROTOCOLS)}")
    return override or VQA_PROTOCOL_DEFAULTS.get(task.split(":")[0], "vqa2016")


def protocol(task: str, vqa: Optional[str] = None) -> str:
    """The name of the protocol that produces a task's numbers (results.json, the table)."""
    k = kind(task)
    if k in GUI_KINDS:
        from . import gui
        return gui.PROTOCOLS[k]
    if k == "caption":                             # the coco-caption pipeline, or the fallback without Java
        return caption_protocol()
    return vqa_protocol(task, vqa) if k == "vqa" else PROTOCOLS[k]


def server_results(rows: list, examples: list) -> list:
    """The evaluation server's results file (VQA and TextVQA servers alike):
    [{"question_id": int, "answer": str}] in the examples' order."""
    return [{"question_id": int(ex.id), "answer": r["answer"]} for r, ex in zip(rows, examples)]


def exact_scores(answer: str, truth: str) -> dict:
    """The finetuning scripts' metric: the whole answer equal to the truth (and ignoring case)."""
    a, t = answer.strip(), truth.strip()
    return {"exact": float(a == t), "nocase": float(a.lower() == t.lower())}


def example_score(task: str, ex: Example, answer: str, vqa: Optional[str] = None):
    """One answer's score: grounding hits by both protocols, VQA accuracy by `vqa` (or the
    task's default protocol), the synthetic kinds, exact match; POPE keeps the label."""
    k = kind(task)
    if k in GUI_KINDS:
        from . import gui
        return gui.example_score(k, ex, answer)
    if k == "grounding":
        w, h = ex.size
        return {"hit": grounding_hit(answer, ex.box, w, h), "hit_first_box": grounding_hit(answer, ex.box, w, h, False)}
    if k == "vqa":
        return {"accuracy": VQA_PROTOCOLS[vqa_protocol(task, vqa)](answer, ex.answers)}
    if k == "caption":
        return {}                                  # CIDEr is a corpus score (idf over the set)
    if k == "exact":
        return exact_scores(answer, ex.answers[0])
    if k == "synthetic":
        return synthetic_scores(ex.question, answer, ex.answers[0])
    return {"label": ex.answers[0]}


def task_metrics(task: str, rows: list, examples: list, vqa: Optional[str] = None) -> dict:
    """rows: the prediction lines of every example of the task (in the order of `examples`;
    only their "answer" is read: every score is computed again here, so a predictions file is
    rescored under any protocol) -> metrics in percent (CIDEr as the papers print it, x100)."""
    k = kind(task)
    rows = [{"answer": r["answer"], "score": example_score(task, ex, r["answer"], vqa)}
            for r, ex in zip(rows, examples)]
    if k in GUI_KINDS:
        from . import gui
        return gui.task_metrics(k, rows, examples)
    if k == "caption":
        score, _, _ = caption_cider([r["answer"] for r in rows], [ex.answers for ex in examples])
        return {"cider": 100 * score, "n": len(rows)}
    if k == "grounding":
        return {"accuracy": 100 * sum(r["score"]["hit"] for r in rows) / len(rows),
                "accuracy_first_box": 100 * sum(r["score"]["hit_first_box"] for r in rows) / len(rows),
                "n": len(rows)}
    if k == "vqa":
        return {"accuracy": 100 * sum(r["score"]["accuracy"] for r in rows) / len(rows), "n": len(rows)}
    if k == "synthetic":                           # per question kind: percent and count
        out = {}
        for m in sorted({m for r in rows for m in r["score"]}):
            got = [r["score"][m] for r in rows if m in r["score"]]
            out[m], out[m + "_n"] = 100 * sum(got) / len(got), len(got)
        return {**out, "n": len(rows)}
    if k == "exact":
        n = max(1, len(rows))
        return {"acc": 100 * sum(r["score"]["exact"] for r in rows) / n,
                "acc_w/o_case": 100 * sum(r["score"]["nocase"] for r in rows) / n, "n": len(rows)}
    s = pope_scores([(r["answer"], r["score"]["label"]) for r in rows])
    return {**{m: 100 * v for m, v in s.items()}, "n": len(rows)}


def answer_rows(answer_fn, task: str, chunk: list, version: str, grounding_prompt: Optional[str] = None,
                vqa: Optional[str] = None):
    """One batch of examples -> their prediction rows (id, prompt, answer, parsed boxes, score)."""
    from utils.chat.grounding import parse_groundings
    reqs = [(*prompt(task, ex, version, grounding_prompt), ex.image, ex.history) for ex in chunk]
    return [{"id": ex.id, "prompt": query, "answer": answer,
             "boxes": [list(b) for g in parse_groundings(answer) for b in g.boxes],
             "score": example_score(task, ex, answer, vqa)}
            for ex, (query, *_), answer in zip(chunk, reqs, answer_fn(reqs))]


def score_in_memory(answer_fn, task: str, examples: list, version: str, batch_size: int,
                    rank: int = 0, world: int = 1, group=None, rows_out: Optional[list] = None,
                    show: bool = False) -> dict:
    """What run_task + task_metrics compute, without files: this process answers every
    world-th example, the rows are gathered over `group` (data parallel) and every rank gets
    the task's metrics (and, in rows_out, every example's row in order). The finetuning
    scripts' evaluations and utils/tiny/evaluate.py use it."""
    import torch.distributed as dist
    from tqdm import tqdm
    mine = []
    todo = [(i, ex) for i, ex in enumerate(examples) if i % world == rank]
    for j in tqdm(range(0, len(todo), batch_size), desc=task, unit="batch", disable=not show):
        chunk = todo[j:j + batch_size]
        mine += zip((i for i, _ in chunk), answer_rows(answer_fn, task, [ex for _, ex in chunk], version))
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine, group=group)
        mine = [r for part in parts for r in part]
    rows = [r for _, r in sorted(mine, key=lambda x: x[0])]
    if rows_out is not None:
        rows_out.extend(rows)
    return task_metrics(task, rows, examples)


def model_answers(model, tok, gen):
    """answer_fn for run_task: batch_chat on the model, each image decoded once per batch."""
    from utils.chat import ImageContext, batch_chat

    def answer(reqs):
        images, by_version = {}, {}
        for i, (query, version, image, history) in enumerate(reqs):
            if image not in images:
                images[image] = ImageContext(image, model.config)
            by_version.setdefault(version, []).append(i)
        out = [None] * len(reqs)
        for version, idx in by_version.items():
            answers = batch_chat(model, tok, [(reqs[i][0], reqs[i][3], images[reqs[i][2]]) for i in idx],
                                 None if version == "auto" else version, gen)
            for i, a in zip(idx, answers):
                out[i] = a
        return out
    return answer
