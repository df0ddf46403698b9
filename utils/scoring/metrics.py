"""Benchmark metrics as their owners compute them.

- Referring expressions (RefCOCO family): boxes read from the answer as THUDM's
  `grounding_parser` reads them (THUDM/CogVLM, utils/utils/grounding_parser.py), thousandths of
  the image, a hit when IoU with the truth > 0.5. Two protocols: `accuracy`, the headline, merges
  every box of the answer by min/max (the maintainer's description, CogVLM issue #127);
  `accuracy_first_box` takes the first `[[...]]` group that holds a four-number box, that group's
  boxes merged (`text_to_box` of THUDM's benchmark code, qijimrc/mm_evaluation,
  mmdoctor/tasks/vqa/refcoco_task.py).
- VQA accuracy (VQAv2, TextVQA) and POPE: the official rules, in vqa.py and pope.py.
- Captions: CIDEr-D, by pycocoevalcap's PTB tokenizer and Cider (captions.py); the regex
  tokenizer and CIDEr-D below are its fallback where Java cannot run.
- Our synthetic set (the bundled models): per question kind, exact answers (colour, shape,
  count, presence, text), the first box at IoU >= 0.5, CogAgent actions (operation + target,
  and the box at IoU >= 0.5).
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional


def iou(a, b):
    """Boxes (x0, y0, x1, y1) in any one unit (exact when given Fractions)."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ----- grounding ---------------------------------------------------------------------------
# The box groups of an answer, found as grounding_parser's parse_response and mm_evaluation's
# text_to_box find them: non-greedy, within one line.
BOX_GROUP = re.compile(r"\[\[(.*?)\]\]")


def box_groups(answer: str) -> list:
    """Each `[[...]]` group's entries (split on ";") as grounding_parser reads them: an entry is
    kept when, its commas removed, it is all digits (str.isdigit), so "1, 2, 3, 4" (spaces) and
    "-5,0,9,9" are dropped, values over 1000 are kept and an entry may hold any number of
    values. A group holding an entry that int() cannot read ("1,,2,3,4", a superscript digit)
    is dropped whole, as text_to_box's try/except drops it."""
    groups = []
    for group in BOX_GROUP.findall(answer):
        try:
            groups.append([tuple(int(v) for v in e.split(",")) for e in group.split(";")
                           if e.replace(",", "").isdigit()])
        except ValueError:
            continue
    return groups


def _merge(boxes: list) -> tuple:
    """min/max of the boxes (text_to_box's get_one_box: min x0, min y0, max x1, max y1)."""
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def answer_box(answer: str, width: int, height: int, merge: bool = True) -> Optional[tuple]:
    """The answer's box in pixels (exact Fractions): every four-number box merged by min/max, or
    with merge=False the first group holding a four-number box, its four-number boxes merged;
    None without one."""
    groups = [g for g in ([b for b in group if len(b) == 4] for group in box_groups(answer)) if g]
    if not groups:
        return None
    x0, y0, x1, y1 = _merge([b for g in groups for b in g] if merge else groups[0])
    w, h = Fraction(width) / 1000, Fraction(height) / 1000
    return (x0 * w, y0 * h, x1 * w, y1 * h)


def grounding_hit(answer: str, truth: tuple, width: int, height: int, merge: bool = True) -> float:
    """1.0 when the answer's box has IoU > 0.5 with `truth` (x0, y0, x1, y1 in pixels)."""
    box = answer_box(answer, width, height, merge)
    return float(box is not None and iou(box, tuple(Fraction(v) for v in truth)) > Fraction(1, 2))


# ----- captions: CIDEr-D, the fallback of captions.py (no Java) ----------------------------------
def caption_tokens(text: str) -> list:
    """Lower case, punctuation dropped: an approximation of the PTB tokenizer (it differs on
    "T-shirt", "man's", "1.5", "café"), used only where the PTB tokenizer cannot run."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def _ngrams(words: list, n: int) -> dict:
    out = {}
    for i in range(len(words) - n + 1):
        g = tuple(words[i:i + n])
        out[g] = out.get(g, 0) + 1
    return out


def cider_d(candidates: list, references: list, sigma: float = 6.0) -> tuple[float, list]:
    """CIDEr-D of candidate captions (one per image) against their reference captions (a list
    per image): tf-idf n-gram vectors (n = 1..4, idf over the references of the whole set),
    the candidate's counts clipped by the reference's, cosine, a Gaussian length penalty
    (sigma 6), averaged over the references and the four n, times 10.
    Returns (corpus score, per-image scores)."""
    import math
    N = len(references)
    refs = [[caption_tokens(r) for r in rs] for rs in references]
    df = {}
    for rs in refs:
        for g in {g for r in rs for n in range(1, 5) for g in _ngrams(r, n)}:
            df[g] = df.get(g, 0) + 1

    def vectors(words):
        vecs, norms = [], []
        for n in range(1, 5):
            v = {g: c * (math.log(N) - math.log(max(1.0, df.get(g, 0.0)))) for g, c in _ngrams(words, n).items()}
            vecs.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vecs, norms, len(words)

    scores = []
    for cand, rs in zip(candidates, refs):
        hv, hn, hl = vectors(caption_tokens(cand))
        total = [0.0] * 4
        for r in rs:
            rv, rn, rl = vectors(r)
            for n in range(4):
                if hn[n] and rn[n]:
                    val = sum(min(x, rv[n].get(g, 0.0)) * rv[n].get(g, 0.0) for g, x in hv[n].items())
                    total[n] += val / (hn[n] * rn[n]) * math.exp(-((hl - rl) ** 2) / (2 * sigma ** 2))
        scores.append(10.0 * sum(t / len(rs) for t in total) / 4 if rs else 0.0)
    return (sum(scores) / len(scores) if scores else 0.0), scores


# ---------------------------------------------------------------- our synthetic set
SYNTHETIC_KINDS = (("What colour", "colour"), ("What shape", "shape"), ("How many", "count"),
                   ("Is there", "presence"), ("Where is", "box"), ("What does the text say", "text"))


def synthetic_category(question: str) -> str:
    if "steps do I need" in question:
        return "agent"
    return next((kind for start, kind in SYNTHETIC_KINDS if question.startswith(start)), "other")


def first_box(text: str):
    from utils.chat.grounding import parse_groundings
    return next((b for g in parse_groundings(text) for b in g.boxes if len(b) == 4), None)


def synthetic_scores(question: str, answer: str, reference: str) -> dict:
    """Per-metric 0/1 for one question (metrics that do not apply are absent)."""
    cat, a, r = synthetic_category(question), answer.strip(), reference.strip()
    if cat in ("colour", "shape", "count", "presence", "text"):
        out = {cat: float(a.lower().rstrip(".") == r.lower().rstrip("."))}
        if cat == "text":              # partial credit, to see progress before exact matches
            out["text_chars"] = sum(x == y for x, y in zip(a.lower(), r.lower())) / max(len(a), len(r), 1)
        return out
    if cat == "box":
        pa, pr = first_box(a), first_box(r)
        return {"box_iou50": float(pa is not None and iou(pa, pr) >= 0.5)}
    if cat == "agent":
        from utils.chat.grounding import parse_agent_output
        pa, pr = parse_agent_output(a), parse_agent_output(r)
        ok = pa.operation == pr.operation and (pa.target or "").lower() == (pr.target or "").lower()
        ba, br = (pa.boxes[0] if pa.boxes else None), pr.boxes[0]
        return {"agent_op_target": float(ok),
                "agent_box_iou50": float(ba is not None and len(ba) == 4 and iou(ba, br) >= 0.5)}
    return {}
