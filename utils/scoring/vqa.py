"""VQA accuracy by the two official protocols, each a faithful re-implementation of its rules.

- "vqa2016": the VQA evaluation as released in 2016 (GT-Vision-Lab/VQA,
  PythonEvaluationTools/vqaEvaluation/vqaEval.py at commit 458a8b2, the version that THUDM's
  own evaluation and LAVIS follow). The answer loses tabs and newlines, is stripped, then
  goes through `processPunctuation` and `processDigitArticle`; the human answers are taken as
  released (not stripped) and lose their punctuation only when they disagree (no lower case,
  no number words). The repository's 2021 revision (a013f00) also normalizes the humans.
- "evalai": the answer processor of the TextVQA server (EvalAI), as in facebookresearch/mmf,
  mmf/utils/m4c_evaluators.py (`EvalAIAnswerProcessor`, `TextVQAAccuracyEvaluator`, commit
  2dc099a): lower case, commas and "?" deleted, "'s" split off, then the same punctuation and
  digit/article steps; the human answers go through the same processor.

Both score min(1, matches / 3) averaged over the leave-one-out subsets of the human answers.
"""
from __future__ import annotations

import re

# The official contraction table (identical in both sources), transcribed as data: keys are
# compared with lower-cased words, so the capitalised keys ("Im", "Ive", ...) never match.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")
# The official periodStrip starts with "(?!<=\d)", a look-ahead that never fails in front of a
# period, so what it removes is a period not followed by a digit ("2." -> "2", "3.5" stays) ...
_PERIOD = re.compile(r"\.(?!\d)")
# ... and it passes re.UNICODE (32) where re.sub takes its count: at most 32 periods go.
_PERIOD_COUNT = int(re.UNICODE)
_COMMA_2016 = re.compile(r"\d,\d")      # commaStrip of vqaEval.py: a 1,000-style number
_COMMA_EVALAI = re.compile(r"\d,+\d")   # COMMA_STRIP of m4c_evaluators.py


def _punctuation(text: str, number_comma: re.Pattern) -> str:
    """processPunctuation: a mark next to a space (or any mark, when the text holds a number
    with a comma) is deleted, any other mark becomes a space; then the periods go."""
    drop_all = number_comma.search(text) is not None
    out = text
    for p in PUNCTUATION:
        out = out.replace(p, "" if drop_all or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _digits_articles(text: str) -> str:
    """processDigitArticle: lower case, number words to digits, articles dropped, contractions
    restored, words joined by one space."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _leave_one_out(answer: str, humans: list) -> float:
    """min(1, matches among the other humans / 3), averaged over the humans (0.0 without)."""
    same = [h == answer for h in humans]
    accs = [min(1, (sum(same) - s) / 3) for s in same]
    return sum(accs) / len(accs) if accs else 0.0


def normalize_vqa2016(text: str) -> str:
    """The 2016 evaluation's normalization of a model's answer."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text, _COMMA_2016))


def vqa_accuracy_2016(answer: str, human_answers: list) -> float:
    """VQA accuracy by the 2016 evaluation: the human answers as released, their punctuation
    processed only when they are not all the same string."""
    humans = list(human_answers)
    if len(set(humans)) > 1:
        humans = [_punctuation(h, _COMMA_2016) for h in humans]
    return _leave_one_out(normalize_vqa2016(answer), humans)


def normalize_evalai(text: str) -> str:
    """EvalAI's answer processor (TextVQA), applied to model and human answers alike."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text, _COMMA_EVALAI))


def vqa_accuracy_evalai(answer: str, human_answers: list) -> float:
    """VQA accuracy as the TextVQA server computes it: every answer processed, leave-one-out."""
    return _leave_one_out(normalize_evalai(answer), [normalize_evalai(h) for h in human_answers])


VQA_PROTOCOLS = {"vqa2016": vqa_accuracy_2016, "evalai": vqa_accuracy_evalai}
