"""VQA (2016 and EvalAI protocols) and POPE scoring: every expected value below is worked out
from the official rule stated next to it, never from this project's output.

Sources:
- VQA 2016: GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py (commit 458a8b2):
  the answer: tabs/newlines to spaces, strip, processPunctuation (a mark next to a space, or any
  mark when the text has a digit,digit, is deleted, any other becomes a space; periodStrip
  deletes a period not followed by a digit), processDigitArticle (lower case, manualMap number
  words, articles dropped, the contractions table); the human answers as released, through
  processPunctuation only when they are not all equal; accuracy = mean over the ten humans of
  min(1, matches among the other nine / 3).
- EvalAI: facebookresearch/mmf, mmf/utils/m4c_evaluators.py (commit 2dc099a): every answer,
  model's and humans', lower-cased, "," and "?" deleted, "'s" -> " 's", then the same steps.
- POPE: RUCAIBox/POPE, evaluate.py (commit f3ec604): the text before the first ".", commas
  removed, split on " "; "no" iff one of the words is exactly "No", "not" or "no".
"""
from __future__ import annotations

import pytest

from utils.scoring.pope import pope_answer, pope_scores
from utils.scoring.vqa import (CONTRACTIONS, VQA_PROTOCOLS, normalize_evalai, normalize_vqa2016,
                               vqa_accuracy_2016, vqa_accuracy_evalai)


def test_vqa2016_periods():
    # humans disagree -> their punctuation only ("two" stays "two"): six "2"; the answer "2."
    # loses its period (not followed by a digit) -> "2"; every subset keeps >= 5 of the six "2"
    # -> min(1, 5/3) = 1 each -> 1.0
    assert vqa_accuracy_2016("2.", ["2"] * 6 + ["two"] * 2 + ["3"] * 2) == 1.0
    assert normalize_vqa2016("10.") == "10"
    assert normalize_vqa2016("3...") == "3"            # all three periods: none before a digit
    assert normalize_vqa2016("$3.50.") == "$3.50"      # "." before "5" stays; "$" is no mark
    assert normalize_vqa2016("7:00.") == "7:00"        # ":" is not in the punctuation list
    for answer, human in [("10.", "10"), ("3...", "3"), ("$3.50.", "$3.50"), ("7:00.", "7:00")]:
        assert vqa_accuracy_2016(answer, [human] * 10) == 1.0
    # periodStrip is given re.UNICODE (32) as re.sub's count: only the first 32 periods go
    assert normalize_vqa2016("x." * 40) == "x" * 33 + ".x" * 7 + "."


def test_vqa2016_contractions_are_the_official_table():
    # "shed" is no key of the official table: the answer stays "shed", 7 human "shed"s -> 1.0
    assert vqa_accuracy_2016("shed", ["shed"] * 7 + ["barn"] * 3) == 1.0
    for word in ["shed", "its", "wed", "lets", "im", "ive", "shes"]:
        assert word not in CONTRACTIONS and normalize_vqa2016(word) == word
    # official keys (the table has 120 entries)
    assert len(CONTRACTIONS) == 120
    assert normalize_vqa2016("oclock") == "o'clock"
    assert normalize_vqa2016("twas") == "'twas"
    assert normalize_vqa2016("somebodys") == "somebody's"
    assert normalize_vqa2016("Isnt it the 1,000 cats?") == "isn't it 1000 cats"
    # "Im" is a key, but words are lower-cased before the look-up, so it never applies
    assert normalize_vqa2016("Im") == "im"


def test_vqa2016_human_answers_as_released():
    # all ten equal -> the humans are not processed at all: "Nokia" != "nokia"
    assert vqa_accuracy_2016("nokia", ["Nokia"] * 10) == 0.0
    # humans are not stripped: " 2" != "2" (the answer is stripped)
    assert vqa_accuracy_2016(" 2 ", [" 2"] * 5 + ["3"] * 5) == 0.0
    # disagreeing humans lose punctuation only: "yes." -> "yes" (3 of them), no lower case
    # -> the 3 subsets without one "yes" keep 2 (2/3), the 7 others keep 3 (1)
    assert vqa_accuracy_2016("yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy_2016("two", ["Two"] * 3 + ["no"] * 7) == 0.0


def test_evalai():
    # humans are processed too: "Nokia" -> "nokia", "a dog" -> "dog"
    assert vqa_accuracy_evalai("nokia", ["Nokia"] * 10) == 1.0
    assert vqa_accuracy_evalai("dog", ["a dog"] * 10) == 1.0
    # commas are deleted before anything else: "red,white" -> "redwhite" != "red white"
    assert normalize_evalai("red,white") == "redwhite"
    assert vqa_accuracy_evalai("red,white", ["red white"] * 10) == 0.0
    assert normalize_evalai("The dog's Bone?") == "dog 's bone"    # "'s" split off, "?" gone
    assert normalize_evalai("2.") == "2"
    # two of ten humans "2" (after "two" -> "2"): subsets without one keep 1 (1/3), others 2 (2/3)
    assert vqa_accuracy_evalai("2", ["Two", "2"] + ["3"] * 8) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)


def test_protocols_by_name():
    assert VQA_PROTOCOLS == {"vqa2016": vqa_accuracy_2016, "evalai": vqa_accuracy_evalai}


@pytest.mark.parametrize("text,want", [
    ("Yes. There is no cat.", "yes"),  # only "Yes" (before the first period) is read
    ("There isn't a dog.", "yes"),     # "isn't" is not one of the exact words
    ("NO", "yes"),                     # exact words: "NO" is neither "No" nor "no"
    ("Not sure", "yes"),               # "Not" (capital N) is not "not"
    ("no-one is there", "yes"),        # "no-one" is one word
    ("No\nthere is a dog", "yes"),     # split on spaces only: "No\nthere" is one word
    ("No, there is not.", "no"),       # comma removed -> "No"
    ("There is no dog", "no"),
    ("no", "no"),
    (".no", "yes"),                    # the first sentence is empty
])
def test_pope_answer(text, want):
    assert pope_answer(text) == want


def test_pope_scores():
    # readings: yes, no, no, yes, yes ("NO"); a label is negative only when exactly "no"
    pairs = [("Yes, there is.", "yes"), ("No.", "yes"), ("There is no cat.", "no"), ("yes", "no"),
             ("NO", "yes")]
    # tp 2, fn 1, tn 1, fp 1: accuracy 3/5, precision 2/3, recall 2/3, f1 2/3, yes ratio 3/5
    assert pope_scores(pairs) == pytest.approx(
        {"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.6})
    # no "yes" reading: the official script divides by zero; here precision, recall, f1 are 0
    assert pope_scores([("no", "yes")]) == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0,
                                            "f1": 0.0, "yes_ratio": 0.0}
