"""Synthetic data for the bundled models, and the scorer that grades them."""
from __future__ import annotations

import json

import pytest

from utils.tiny.evaluate import category, iou, score
from utils.chat.grounding import parse_agent_output, parse_groundings
from utils.data.synthetic import generate


def test_generator_layout_and_answers(tmp_path):
    counts = generate(tmp_path / "d", 40, seed=3, gui=True)
    assert sum(counts.values()) == 40 and all(counts.values())
    labels = sorted((tmp_path / "d" / "labels").glob("*.json"))
    assert len(labels) == 40 and len(list((tmp_path / "d" / "images").glob("*.png"))) == 40
    kinds = set()
    for lab in labels:
        for x in json.loads(lab.read_text())["qa"]:
            q, a = x["question"], x["answer"]
            kinds.add(category(q))
            for g in parse_groundings(a):
                assert all(0 <= v <= 999 for b in g.boxes for v in b)
            if category(q) == "agent":
                act = parse_agent_output(a)
                assert act.operation in ("CLICK", "TYPE") and act.target and len(act.boxes[0]) == 4
                assert '"' in q and q.endswith("(with grounding)")
            assert all(v == 1.0 for v in score(q, a, a).values())
    assert {"colour", "shape", "count", "presence", "box", "text", "agent"} <= kinds
    # same seed, same data
    generate(tmp_path / "e", 40, seed=3, gui=True)
    assert (tmp_path / "d" / "labels" / labels[5].name).read_text() == (tmp_path / "e" / "labels" / labels[5].name).read_text()


def test_scoring():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0 and iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert score("Where is the red circle?", "[[100,100,500,500]]", "[[120,120,500,500]]") == {"box_iou50": 1.0}
    assert score("Where is the red circle?", "somewhere", "[[120,120,500,500]]") == {"box_iou50": 0.0}
    assert score("How many shapes are there?", "3", "2") == {"count": 0.0}
    assert score("What does the text say?", "ab3x", "ab3xy") == {"text": 0.0, "text_chars": 0.8}
    ref = "Plan: 1. Click. Next Action: Click. Grounded Operation:[button] Submit -> CLICK at the box [[100,100,200,200]]"
    bad = ref.replace("Submit", "Cancel")
    assert score('What steps do I need to take to "x"?', bad, ref) == {"agent_op_target": 0.0, "agent_box_iou50": 1.0}


def test_text_images_label_each_character(tmp_path):
    """Text images carry each glyph's box (for the auxiliary per-patch loss), left to right;
    training sets may add shorter texts, held-out sets keep 4-6 characters."""
    generate(tmp_path / "t", 30, seed=5, text_fraction=1.0, text_min_len=1)
    lengths = []
    for lab in (tmp_path / "t" / "labels").glob("*.json"):
        d = json.loads(lab.read_text())
        text = d["qa"][0]["answer"]
        lengths.append(len(text))
        assert [o["kind"] for o in d["objects"]] == [f"char {c}" for c in text]
        xs = [o["box"][0] for o in d["objects"]]
        assert xs == sorted(xs) and all(0 <= v <= 1 for o in d["objects"] for v in o["box"])
    assert min(lengths) < 4
    generate(tmp_path / "u", 30, seed=5, text_fraction=1.0)
    assert all(4 <= len(json.loads(f.read_text())["qa"][0]["answer"]) <= 6 for f in (tmp_path / "u" / "labels").glob("*.json"))


def test_extra_presence_questions_are_balanced_and_true(tmp_path):
    """Training sets may add presence questions (four: two objects of the scene, two hard
    negatives with the colour or the shape changed): every answer is right for the scene, about
    half are "yes"; sets without them (held-out) keep one presence question per scene; two extra
    give one of each."""
    generate(tmp_path / "x", 60, seed=7, text_fraction=0.0, extra_presence=4)
    answers, hard = [], 0
    for lab in (tmp_path / "x" / "labels").glob("*.json"):
        d = json.loads(lab.read_text())
        names = {f"{o['colour']} {o['kind']}" for o in d["objects"]}
        for x in d["qa"]:
            if category(x["question"]) == "presence":
                name = x["question"].removeprefix("Is there ").rstrip("?").split(" ", 1)[1]
                assert x["answer"] == ("yes" if name in names else "no")
                answers.append(x["answer"])
                colour, kind = name.split()
                hard += x["answer"] == "no" and any(colour in n or kind in n for n in names)
    assert len(answers) > 4 * 60 and 0.4 < answers.count("yes") / len(answers) < 0.6
    assert hard > len(answers) / 3
    generate(tmp_path / "plain", 60, seed=7, text_fraction=0.0)
    for lab in (tmp_path / "plain" / "labels").glob("*.json"):
        plain = json.loads(lab.read_text())["qa"]
        assert sum(category(x["question"]) == "presence" for x in plain) == 1
    generate(tmp_path / "two", 60, seed=7, text_fraction=0.0, extra_presence=2)
    for lab in (tmp_path / "two" / "labels").glob("*.json"):
        two = [x for x in json.loads(lab.read_text())["qa"] if category(x["question"]) == "presence"][1:]
        assert [x["answer"] for x in two] in (["yes", "no"], ["yes"])   # (no hard negative exists
        # when all four shapes share a colour)


@pytest.mark.parametrize("version,prompt,most", [("chat_old", "Question: What does the text say? Answer:", 10),
                                                 ("chat", " [INST] What does the text say? [/INST] ", 12)])
def test_tokenizer_corpus_makes_the_template_words_tokens(tmp_path, version, prompt, most):
    """The bundled models' tokenizer is trained on every question inside its prompt template:
    with the bare questions, the template words lost their merges to the random texts of the
    text images (`Question:` took 6 tokens, `[/INST]` 7, in every packed question)."""
    import sentencepiece as spm
    from utils.chat.tokenizer import train_sentencepiece
    from utils.tiny.train import corpus_text
    generate(tmp_path / "t", 1500, seed=3, text_fraction=1.0, text_min_len=1)
    tok = train_sentencepiece(corpus_text([tmp_path / "t"], version), tmp_path / "tok", vocab_size=1024,
                              split_digits=True, symbols=("[[", "]]"))
    pieces = spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model")).encode(prompt, out_type=str)
    assert len(pieces) <= most, pieces
