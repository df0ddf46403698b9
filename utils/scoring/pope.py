"""POPE scored by the rules of its official script (RUCAIBox/POPE, evaluate.py, commit f3ec604).

An answer is read as "no" when its first sentence (the text before the first period), with
commas removed and split on single spaces, holds one of the exact words "No", "not", "no";
otherwise as "yes" (so "NO", "Not sure", "isn't" and "no-one" all read "yes"). A label is
negative when it is exactly "no". The scores are those the script prints, as fractions.
"""
from __future__ import annotations

NO_WORDS = ("No", "not", "no")


def pope_answer(text: str) -> str:
    """The official reading of one answer: "yes" or "no"."""
    first = text.split(".")[0]                  # only the first sentence counts
    words = first.replace(",", "").split(" ")   # single spaces only: "No\nthere" is one word
    return "no" if any(w in NO_WORDS for w in words) else "yes"


def pope_scores(pairs: list) -> dict:
    """pairs: (answer, label) -> accuracy, precision, recall, f1 of "yes" and the ratio of
    "yes" answers (fractions; 0.0 where the official script would divide by zero)."""
    tp = fp = tn = fn = 0
    for answer, label in pairs:
        said_yes, is_yes = pope_answer(answer) == "yes", label != "no"
        tp, fp = tp + (said_yes and is_yes), fp + (said_yes and not is_yes)
        tn, fn = tn + (not said_yes and not is_yes), fn + (not said_yes and is_yes)
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": (tp + fp) / n if n else 0.0}
