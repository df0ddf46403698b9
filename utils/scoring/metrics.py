"""Benchmark metrics as their owners compute them.

- Referring expressions (RefCOCO family), CogVLM's protocol: every box in the answer
  (thousandths of the image) merged into one by min/max, a hit when IoU with the truth > 0.5;
  `per_box`: the first box alone.
- VQA accuracy (VQAv2, TextVQA): the official evaluation's normalization of the answer
  (punctuation, number words, articles, contractions), then min(matches / 3, 1) averaged over
  the ten leave-one-out subsets of the human answers.
- POPE: accuracy, precision, recall, F1 of "yes", and the ratio of "yes" answers.
- Our synthetic set (the bundled models): per question kind, exact answers (colour, shape,
  count, presence, text), the first box at IoU >= 0.5, CogAgent actions (operation + target,
  and the box at IoU >= 0.5).
"""
from __future__ import annotations

import re
from typing import Optional

from utils.chat.grounding import parse_agent_output, parse_groundings


def iou(a, b) -> float:
    """Boxes (x0, y0, x1, y1) in any one unit."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def answer_box(answer: str, width: int, height: int, merge: bool = True) -> Optional[tuple]:
    """The answer's box in pixels: all its boxes merged by min/max (CogVLM's protocol), or
    with merge=False the first one; None without a box."""
    boxes = [b for g in parse_groundings(answer) for b in g.boxes if len(b) == 4]
    if not boxes:
        return None
    if merge:
        boxes = [(min(b[0] for b in boxes), min(b[1] for b in boxes),
                  max(b[2] for b in boxes), max(b[3] for b in boxes))]
    x0, y0, x1, y1 = boxes[0]
    return (x0 / 1000 * width, y0 / 1000 * height, x1 / 1000 * width, y1 / 1000 * height)


def grounding_hit(answer: str, truth: tuple, width: int, height: int, merge: bool = True) -> float:
    """1.0 when the answer's box has IoU > 0.5 with `truth` (x0, y0, x1, y1 in pixels)."""
    box = answer_box(answer, width, height, merge)
    return float(box is not None and iou(box, truth) > 0.5)


# ----- VQA ---------------------------------------------------------------------------------
# Answers written without their apostrophe, as the official evaluation restores them.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "im": "i'm", "Ive": "I've", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll",
    "its": "it's", "lets": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "shant": "shan't", "shed": "she'd",
    "shes": "she's", "shouldnt": "shouldn't", "shouldve": "should've", "thats": "that's", "thered": "there'd",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldnt": "wouldn't", "wouldve": "would've", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!"]
_PERIOD = re.compile(r"(?<!\d)(\.)(?!\d)")        # a period that is not a decimal point
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        # a mark next to a space, or any mark in a text with a 1,000-style number, goes away;
        # otherwise it separates words
        if (p + " " in text or " " + p in text) or _COMMA_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_articles(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = NUMBER_WORDS.get(w, w)
        if w not in ARTICLES:
            words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_vqa(text: str) -> str:
    return _digits_articles(_punctuation(text))


def vqa_accuracy(answer: str, human_answers: list) -> float:
    """The official VQA accuracy of one answer against the (ten) human answers: the answer is
    normalized (punctuation, then lower case, number words, articles, contractions); the human
    answers (released already lower-case and normalized) lose their punctuation only when they
    disagree, as the official evaluation does."""
    answer = normalize_vqa(answer.replace("\n", " ").replace("\t", " ").strip())
    humans = [h.replace("\n", " ").replace("\t", " ").strip() for h in human_answers]
    if len(set(humans)) > 1:
        humans = [_punctuation(h) for h in humans]
    accs = []
    for i in range(len(humans)):
        matches = sum(h == answer for j, h in enumerate(humans) if j != i)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs) if accs else 0.0


# ----- POPE --------------------------------------------------------------------------------
def yes_no(answer: str) -> str:
    """POPE's reading of an answer: "no" when it says no / not, else "yes"."""
    words = re.findall(r"[a-z']+", answer.lower())
    return "no" if ("no" in words or "not" in words or "n't" in answer.lower()) else "yes"


def pope_scores(pairs: list) -> dict:
    """pairs: (answer, label yes/no) -> accuracy, precision, recall, f1, yes_ratio (fractions)."""
    tp = fp = tn = fn = 0
    for answer, label in pairs:
        pred = yes_no(answer)
        if pred == "yes":
            tp, fp = tp + (label == "yes"), fp + (label != "yes")
        else:
            tn, fn = tn + (label == "no"), fn + (label != "no")
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": (tp + fp) / n if n else 0.0}


# ----- captions: CIDEr-D ---------------------------------------------------------------------
def caption_tokens(text: str) -> list:
    """Lower case, punctuation dropped (close to the COCO evaluation's tokenizer)."""
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
        pa, pr = parse_agent_output(a), parse_agent_output(r)
        ok = pa.operation == pr.operation and (pa.target or "").lower() == (pr.target or "").lower()
        ba, br = (pa.boxes[0] if pa.boxes else None), pr.boxes[0]
        return {"agent_op_target": float(ok),
                "agent_box_iou50": float(ba is not None and len(ba) == 4 and iou(ba, br) >= 0.5)}
    return {}
