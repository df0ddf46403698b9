"""Benchmark evaluation: metrics against hand-computed values, readers on tiny files in each
dataset's released layout (written here), the runner end to end, resumed, and data parallel
over two torchrun processes with the numbers of one."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from evaluation.datasets import DataError, read_task
from utils.scoring.metrics import cider_d, grounding_hit
from utils.scoring.pope import pope_scores
# the hand-computed cases below hold under the 2016 VQA evaluation (GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py), the protocol VQAv2 is scored by by default
from utils.scoring.vqa import normalize_vqa2016 as normalize_vqa, vqa_accuracy_2016 as vqa_accuracy

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- metrics, by hand
def test_vqa_accuracy_by_hand():
    # the answer is normalized ("two" -> "2"); leave-one-out over the ten human answers:
    # the 3 subsets without one "2" keep 2 matches (2/3), the 7 others keep 3 (1.0)
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    # "The dog." -> "dog": 9 human "dog"s, so every subset keeps >= 8 matches -> 1.0
    assert vqa_accuracy("The dog.", ["dog"] * 9 + ["a dog"]) == 1.0
    assert vqa_accuracy("A Dog.", ["dog"] * 10) == 1.0
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    # humans disagree: their punctuation goes ("yes." -> "yes"), nothing else of theirs changes
    assert vqa_accuracy("yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert vqa_accuracy("two", ["Two"] * 3 + ["no"] * 7) == 0.0      # "Two" keeps its case and word
    assert vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert normalize_vqa("Isnt it the 1,000 cats?") == "isn't it 1000 cats"
    assert normalize_vqa("It's 3.5 m.") == "it's 3.5 m"


def test_grounding_protocol_by_hand():
    # two boxes merged by min/max into the truth; the first alone has IoU exactly 0.5 (no hit)
    answer = "the bus [[100,100,500,900]] and its other half [[500,100,900,900]]"
    truth = (100, 100, 900, 900)                                  # pixels of a 1000 x 1000 image
    assert grounding_hit(answer, truth, 1000, 1000) == 1.0
    assert grounding_hit(answer, truth, 1000, 1000, merge=False) == 0.0
    # thousandths are scaled to the image: [[250,500,750,1000]] on 200 x 100 -> (50, 50, 150, 100)
    assert grounding_hit("[[250,500,750,1000]]", (50, 50, 150, 100), 200, 100) == 1.0
    assert grounding_hit("no box here", truth, 1000, 1000) == 0.0


def test_pope_scores_by_hand():
    pairs = [("Yes, there is.", "yes"), ("No.", "yes"), ("There is no cat.", "no"), ("yes", "no"),
             ("Yes", "yes")]
    s = pope_scores(pairs)
    # tp 2, fn 1, tn 1, fp 1: accuracy 3/5, precision 2/3, recall 2/3, f1 2/3, yes ratio 3/5
    assert s == pytest.approx({"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.6})


def test_cider_d_by_hand():
    import math
    # Two images, one reference each, no word shared: every n-gram has df 1, idf log 2.
    refs = [["a man rides a horse"], ["two dogs play in snow"]]
    # a candidate equal to its reference: cosine 1 for n = 1..4, no length penalty -> 10
    assert cider_d(["A man rides a horse."], refs[:1] + [["some other words here"]])[1][0] == pytest.approx(10.0)
    # "a man" against "a man rides a horse": unigrams {a: 1, man: 1} vs {a: 2, man, rides, horse}
    # (all idf log 2): clipped dot = (1*2 + 1*1) (log 2)^2, norms sqrt(2) log 2 and sqrt(7) log 2
    # -> cos1 = 3 / sqrt(14); bigram "a man" vs 4 bigrams of count 1: cos2 = 1 / 2; no 3- or
    # 4-grams in the candidate; length penalty exp(-(2 - 5)^2 / 72)
    want = 10 * (3 / math.sqrt(14) + 1 / 2) / 4 * math.exp(-9 / 72)
    corpus, per_image = cider_d(["a man", "cats"], refs)
    assert per_image == pytest.approx([want, 0.0]) and corpus == pytest.approx(want / 2)


# ---------------------------------------------------------------- released layouts
def make_refcoco(root: Path) -> Path:
    """refer layout: refcoco/instances.json (COCO boxes x y w h), refcoco/refs(unc).p, images."""
    img_dir = root / "images" / "mscoco" / "images" / "train2014"
    img_dir.mkdir(parents=True)
    images = []
    for i, (w, h) in enumerate([(200, 100), (100, 100)], start=1):
        name = f"COCO_train2014_{i:012d}.jpg"
        Image.new("RGB", (w, h), (40 * i, 120, 200)).save(img_dir / name)
        images.append({"id": i, "file_name": name, "width": w, "height": h})
    anns = [{"id": 10, "image_id": 1, "bbox": [50, 50, 100, 50], "category_id": 1},
            {"id": 11, "image_id": 2, "bbox": [0, 0, 50, 50], "category_id": 1},
            {"id": 12, "image_id": 2, "bbox": [50, 50, 50, 50], "category_id": 1}]
    (root / "refcoco").mkdir()
    (root / "refcoco" / "instances.json").write_text(json.dumps({"images": images, "annotations": anns}))
    refs = [{"ref_id": 0, "ann_id": 10, "image_id": 1, "split": "val",
             "sentences": [{"sent_id": 100, "sent": "the right half"}, {"sent_id": 101, "sent": "that part"}]},
            {"ref_id": 1, "ann_id": 11, "image_id": 2, "split": "val", "sentences": [{"sent_id": 102, "sent": "top left"}]},
            {"ref_id": 3, "ann_id": 11, "image_id": 2, "split": "testB", "sentences": [{"sent_id": 104, "sent": "the top one"}]},
            {"ref_id": 2, "ann_id": 12, "image_id": 2, "split": "testA", "sentences": [{"sent_id": 103, "sent": "bottom"}]}]
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return root


def make_vqa_pope(root: Path) -> Path:
    (root / "val2014").mkdir(parents=True)
    for i in (1, 2):
        Image.new("RGB", (64, 48), (90 * i, 40, 40)).save(root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    qs = [{"question_id": 1001, "image_id": 1, "question": "How many cats?"},
          {"question_id": 1002, "image_id": 2, "question": "What colour?"}]
    ans = [{"question_id": 1001, "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(["2"] * 3 + ["3"] * 7)]},
           {"question_id": 1002, "answers": [{"answer": "red", "answer_id": k + 1} for k in range(10)]}]
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": qs}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": ans}))
    lines = [{"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cat in the image?", "label": "yes"},
             {"question_id": 2, "image": "COCO_val2014_000000000002.jpg", "text": "Is there a dog in the image?", "label": "no"}]
    (root / "coco_pope_random.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    caps = {"images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (1, 2)],
            "annotations": [{"id": 7, "image_id": 1, "caption": "A man rides a horse."},
                            {"id": 8, "image_id": 2, "caption": "Two dogs play in snow."}]}
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(caps))
    return root


def test_readers_follow_the_released_layouts(tmp_path):
    root = make_vqa_pope(make_refcoco(tmp_path / "data"))
    val = read_task(root, "refcoco:val")
    assert [(e.id, e.question, e.box, e.size) for e in val] == [
        ("100", "the right half", (50, 50, 150, 100), (200, 100)), ("101", "that part", (50, 50, 150, 100), (200, 100)),
        ("102", "top left", (0, 0, 50, 50), (100, 100))]
    assert val[0].image.name == "COCO_train2014_000000000001.jpg" and val[0].image.is_file()
    assert [e.id for e in read_task(root, "refcoco:testA")] == ["103"]
    vqa = read_task(root, "vqav2:val")
    assert vqa[0].question == "How many cats?" and vqa[0].answers == ["2"] * 3 + ["3"] * 7 and vqa[1].image.is_file()
    pope = read_task(root, "pope:random")
    assert [(e.question, e.answers) for e in pope] == [("Is there a cat in the image?", ["yes"]),
                                                      ("Is there a dog in the image?", ["no"])]
    with pytest.raises(DataError, match=r"refcocog refs: none of refs\(umd\)\.p in .*data/refcocog"):
        read_task(root, "refcocog:val")
    with pytest.raises(DataError, match="TextVQA: none of TextVQA_0.5.1_val.json"):
        read_task(root, "textvqa:val")


def test_refs_pickle_is_read_as_plain_data_only(tmp_path):
    root = make_refcoco(tmp_path / "data")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump([Payload()], f)
    with pytest.raises(DataError, match="only plain data is read"):
        read_task(root, "refcoco:val")
    assert not marker.exists()


# ---------------------------------------------------------------- the runner
def test_run_task_with_a_scripted_model(tmp_path):
    """Known answers -> the numbers by hand: refcoco val 2 hits of 3, VQA (0.9 + 1.0) / 2,
    POPE accuracy 1/2."""
    from evaluation.evaluate import done_ids, predictions_file, run_task, task_metrics
    root = make_vqa_pope(make_refcoco(tmp_path / "data"))
    scripted = {"the right half": "[[250,500,750,1000]]",                 # exactly the truth: hit
                "that part": "[[000,000,100,100]]",                       # miss
                "top left": "[[000,000,500,500]]",                        # hit
                "How many cats?": "two", "What colour?": "Red",
                "Is there a cat in the image?": "Yes.", "Is there a dog in the image?": "Yes, a dog."}

    captions = {"COCO_val2014_000000000001.jpg": "a man rides a horse", "COCO_val2014_000000000002.jpg": "cats"}

    def answer(reqs):
        return [captions[img.name] if q.startswith("Describe the image")
                else next(v for k, v in scripted.items() if k in q) for q, _, img, _ in reqs]
    out = tmp_path / "out"
    out.mkdir()
    expect = {"refcoco:val": {"accuracy": 200 / 3, "accuracy_first_box": 200 / 3, "n": 3},
              "vqav2:val": {"accuracy": 100 * (0.9 + 1.0) / 2, "n": 2},
              "pope:random": {"accuracy": 50.0, "precision": 50.0, "recall": 100.0, "f1": 100 * 2 / 3,
                              "yes_ratio": 100.0, "n": 2},
              # CIDEr-D: image 1 equals its only reference (10), image 2 shares nothing (0), x100
              "coco_caption:val": {"cider": 100 * (10 + 0) / 2, "n": 2}}
    for task, want in expect.items():
        examples = read_task(root, task)
        assert run_task(answer, task, examples, out, "auto", 2, show=False) == len(examples)
        rows = done_ids(predictions_file(out, task))
        assert task_metrics(task, [rows[e.id] for e in examples], examples) == pytest.approx(want)
        assert run_task(answer, task, examples, out, "auto", 2, show=False) == 0     # resumed: nothing left
    row = done_ids(predictions_file(out, "refcoco:val"))["100"]
    assert row["prompt"].startswith("Can you point out the right half") and row["boxes"] == [[250, 500, 750, 1000]]


def test_finetune_task_scores_the_finetuning_data(tmp_path):
    """The finetuning scripts' data through the runner (task finetune:<split>): each answer
    turn an example with the earlier turns as history; exact-match acc and acc_w/o_case by
    hand; the in-memory path the finetuning scripts call gives the same numbers."""
    from evaluation.evaluate import done_ids, predictions_file, run_task, score_in_memory, task_metrics
    test = tmp_path / "data" / "test"
    (test / "images").mkdir(parents=True)
    (test / "labels").mkdir()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(test / "images" / "a.jpg")
    conv = [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "Red"},
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes"}]
    (test / "labels" / "a.json").write_text(json.dumps({"conversations": conv}))
    Image.new("RGB", (60, 20), (0, 0, 0)).save(tmp_path / "data" / "ab12.png")   # a captcha split
    seen = []

    def answer(reqs):
        seen.extend(reqs)
        return [{"What colour?": "red", "Sure?": "yes"}.get(q, "AB12") for q, _, _, _ in reqs]
    examples = read_task(tmp_path / "data", "finetune:test")
    assert [(e.question, e.answers, e.history) for e in examples] == [
        ("What colour?", ["Red"], []), ("Sure?", ["yes"], [("What colour?", "Red")])]
    out = tmp_path / "out"
    out.mkdir()
    run_task(answer, "finetune:test", examples, out, "auto", 4, show=False)
    assert seen[1][3] == [("What colour?", "Red")]                # history reaches the model
    rows = done_ids(predictions_file(out, "finetune:test"))
    want = {"acc": 50.0, "acc_w/o_case": 100.0, "n": 2}           # "red" vs "Red": only ignoring case
    assert task_metrics("finetune:test", [rows[e.id] for e in examples], examples) == want
    assert score_in_memory(answer, "finetune:test", examples, "auto", 1) == want
    captcha = read_task(tmp_path / "data", "finetune:")
    assert [(e.question, e.answers) for e in captcha][0][1] == ["ab12"]
    with pytest.raises(DataError, match="no folder"):
        read_task(tmp_path / "data", "finetune:valid")


def test_runner_cli_one_and_two_processes_agree(cogvlm_ckpt, tmp_path):
    root = make_vqa_pope(make_refcoco(tmp_path / "data"))
    env = {**os.environ, "LOGLEVEL": "WARNING", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["--from_pretrained", str(cogvlm_ckpt), "--task", "refcoco:val,vqav2:val,pope:random",
            "--data", str(root), "--batch_size", "2", "--max_new_tokens", "8"]
    one = subprocess.run([sys.executable, str(ROOT / "evaluation" / "evaluate.py"), *args, "--output_dir",
                          str(tmp_path / "one")], capture_output=True, text=True, timeout=300, cwd="/", env=env)
    assert one.returncode == 0 and "| refcoco:val | accuracy |" in one.stdout, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                          "--nproc-per-node=2", str(ROOT / "evaluation" / "evaluate.py"), *args, "--output_dir",
                          str(tmp_path / "two")], capture_output=True, text=True, timeout=300, cwd="/", env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    # 4 processes = 2 models of 2 tensor-parallel ranks, each model taking every other example
    mp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                         "--nproc-per-node=4", str(ROOT / "evaluation" / "evaluate.py"), *args,
                         "--model_parallel_size", "2", "--output_dir", str(tmp_path / "mp")],
                        capture_output=True, text=True, timeout=300, cwd="/", env=env)
    assert mp.returncode == 0, mp.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    c = json.loads((tmp_path / "mp" / "results.json").read_text())
    assert a == b == c and a["refcoco:val"]["n"] == 3 and a["pope:random"]["n"] == 2
    mp_lines = (tmp_path / "mp" / "predictions-vqav2_val.jsonl").read_text().splitlines()
    assert len(mp_lines) == 2                        # each example answered once, by a group's first rank
    lines = (tmp_path / "two" / "predictions-refcoco_val.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["id"] for x in lines) == ["100", "101", "102"]
    bad = subprocess.run([sys.executable, str(ROOT / "evaluation" / "evaluate.py"), *args[:2], "--task",
                          "textvqa:val", "--data", str(root), "--output_dir", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120, cwd="/", env=env)
    assert bad.returncode == 1 and "TextVQA: none of TextVQA_0.5.1_val.json" in bad.stderr and "Traceback" not in bad.stderr


def test_bundled_model_scored_by_the_runner_agrees_with_its_eval_json(tmp_path):
    """The held-out synthetic set (seed 1, 300 images) exported in the refer and VQAv2 layouts
    and scored by evaluation/evaluate.py gives tiny-cogvlm's own figures (eval.json, written by
    utils/tiny/evaluate.py): box accuracy as is, VQA accuracy as the weighted mean of the
    one-word question kinds."""
    from utils.data.layouts import export
    from utils.data.synthetic import generate
    generate(tmp_path / "heldout", 300, 1, gui=False, text_min_len=4)
    counts = export(tmp_path / "heldout", tmp_path / "layouts")
    m = json.loads((ROOT / "assets" / "checkpoints" / "tiny-cogvlm" / "eval.json").read_text())["metrics"]
    kinds = ("colour", "shape", "count", "presence", "text")
    assert counts == {"expressions": m["box_iou50"]["n"], "questions": sum(m[k]["n"] for k in kinds)}
    env = {**os.environ, "LOGLEVEL": "WARNING", "HF_HUB_OFFLINE": "1", "COGVLM_DTYPE": "float32"}
    # --no-deterministic: this test is about the scores; batch invariance (tested in
    # test_batch_invariance.py) prefills a tiny model's 16-row batches row by row, 15 s more here.
    p = subprocess.run([sys.executable, str(ROOT / "evaluation" / "evaluate.py"), "--from_pretrained", "tiny-cogvlm",
                        "--task", "synthetic:val,vqav2:val", "--data", str(tmp_path / "layouts"), "--output_dir",
                        str(tmp_path / "out"), "--version", "chat_old", "--grounding_prompt", "Where is the {expr}?",
                        "--max_new_tokens", "96", "--batch_size", "16", "--no-deterministic"],
                       capture_output=True, text=True, timeout=600, cwd="/", env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert r["synthetic:val"]["accuracy"] == pytest.approx(100 * m["box_iou50"]["accuracy"])
    weighted = sum(m[k]["accuracy"] * m[k]["n"] for k in kinds) / sum(m[k]["n"] for k in kinds)
    assert r["vqav2:val"]["accuracy"] == pytest.approx(100 * weighted)


def test_synthetic_qa_task_scores_every_kind_by_hand(tmp_path):
    """The synthetic folder as utils/data/synthetic.py writes it, read by the runner (task
    synthetic_qa, what utils/tiny/evaluate.py now calls): the reference answers score 100 on
    every kind (CogAgent actions included), empty answers 0; counts per kind as in the labels."""
    from evaluation.evaluate import score_in_memory
    from utils.scoring.metrics import synthetic_category
    from utils.data.synthetic import generate
    generate(tmp_path / "s", 4, 3, gui=True, text_min_len=4)
    examples = read_task(tmp_path / "s", "synthetic_qa:")
    labels = [q for lab in sorted((tmp_path / "s" / "labels").glob("*.json"))
              for q in json.loads(lab.read_text())["qa"] if synthetic_category(q["question"]) != "other"]
    assert [e.question for e in examples] == [q["question"] for q in labels]
    truth = {(e.image, e.question): e.answers[0] for e in examples}
    right = score_in_memory(lambda reqs: [truth[(img, q)] for q, _, img, _ in reqs], "synthetic_qa:", examples, "auto", 3)
    wrong = score_in_memory(lambda reqs: [""] * len(reqs), "synthetic_qa:", examples, "auto", 3)
    kinds = {k for k in right if not k.endswith("_n") and k != "n"}
    assert "agent_op_target" in kinds and "box_iou50" in kinds
    assert all(right[k] == 100 for k in kinds) and all(wrong[k] == 0 for k in kinds)
    per_kind = {}
    for q in labels:
        c = synthetic_category(q["question"])
        per_kind[c] = per_kind.get(c, 0) + 1
    assert right["agent_op_target_n"] == per_kind["agent"] and right["box_iou50_n"] == per_kind["box"]


# ---------------------------------------------------------------- issue 32: official rules wired in
def test_grounding_boxes_read_as_the_original_parser(tmp_path):
    """Boxes as THUDM's grounding_parser reads them (THUDM/CogVLM, utils/utils/grounding_parser.py:
    groups by the regex \\[\\[(.*?)\\]\\], entries split on ";" and kept when
    entry.replace(",", "").isdigit(), int() of each value, no range check) and the first-box protocol
    of THUDM's benchmark code (qijimrc/mm_evaluation, mmdoctor/tasks/vqa/refcoco_task.py text_to_box:
    the first group holding a four-number entry, that group's four-number entries merged by min/max,
    a group whose int() raises skipped by its try/except; a hit when IoU > 0.5)."""
    from utils.scoring.metrics import box_groups
    assert box_groups("a [[1,2,3,4;5,6]] b [[7,8,9,10]]") == [[(1, 2, 3, 4), (5, 6)], [(7, 8, 9, 10)]]
    assert box_groups("[[100, 100, 900, 900]]") == [[]]            # " 100" is not all digits: dropped
    assert box_groups("[[-5,0,9,9]]") == [[]]                      # "-" is no digit
    assert box_groups("[[0,0,1200,1000]]") == [[(0, 0, 1200, 1000)]]    # over 1000: kept
    assert box_groups("[[[0,0,100,100]]") == [[]]                  # the group is "[0,0,100,100"
    assert box_groups("[[1,,2,3,4;0,0,9,9]] [[1,2,3,4]]") == [[(1, 2, 3, 4)]]   # int("") raises: group skipped
    full = (0, 0, 1000, 1000)                                      # pixels of a 1000 x 1000 image
    # over 1000 kept: (0, 0, 1200, 1000) has IoU 1000*1000 / 1200*1000 = 0.83 with the full image
    assert grounding_hit("[[0,0,1200,1000]]", full, 1000, 1000) == 1.0
    assert grounding_hit("[[0, 0, 1000, 1000]]", full, 1000, 1000) == 0.0     # spaces: no box at all
    # the first group holding a box: the point group is passed over; every box merged: the whole image
    answer = "[[500,500]] the cup [[0,0,100,100]] and the plate [[900,900,1000,1000]]"
    assert grounding_hit(answer, (0, 0, 100, 100), 1000, 1000, merge=False) == 1.0
    assert grounding_hit(answer, (0, 0, 100, 100), 1000, 1000) == 0.0
    assert grounding_hit(answer, full, 1000, 1000) == 1.0
    # a group's own boxes are merged in the first-box protocol too (get_one_box)
    assert grounding_hit("[[0,0,500,1000;500,0,1000,1000]] [[0,0,10,10]]", full, 1000, 1000, merge=False) == 1.0
    # a group with an unreadable entry is skipped whole: the next group (the full image) is taken
    assert grounding_hit("[[1,,2,3,4;0,0,100,100]] [[0,0,1000,1000]]", (0, 0, 100, 100), 1000, 1000, merge=False) == 0.0


def test_vqa_and_pope_protocols_wired_into_the_task_metrics():
    """The issue's repro cases through task_metrics (the runner's scoring): VQAv2 by the 2016
    evaluation (GT-Vision-Lab/VQA vqaEval.py: "2." loses its period, "shed" is no contraction key),
    TextVQA by EvalAI's processor (facebookresearch/mmf m4c_evaluators.py: humans normalized, commas
    deleted), either by name; POPE by RUCAIBox/POPE evaluate.py (first sentence, exact words)."""
    from utils.scoring.tasks import Example, protocol, task_metrics
    ex = lambda answers: Example("1", Path("x.jpg"), "q", answers)        # noqa: E731
    vqa = [("2.", ["2"] * 6 + ["two"] * 2 + ["3"] * 2), ("shed", ["shed"] * 7 + ["barn"] * 3)]
    rows, examples = [{"answer": a} for a, _ in vqa], [ex(h) for _, h in vqa]
    assert task_metrics("vqav2:val", rows, examples) == {"accuracy": 100.0, "n": 2}
    assert protocol("vqav2:val") == "vqa2016" and protocol("textvqa:val") == "evalai"
    text = [("nokia", ["Nokia"] * 10), ("dog", ["a dog"] * 10), ("red,white", ["red white"] * 10)]
    rows, examples = [{"answer": a} for a, _ in text], [ex(h) for _, h in text]
    assert task_metrics("textvqa:val", rows, examples) == pytest.approx({"accuracy": 200 / 3, "n": 3})
    # 2016: "Nokia" x10 are not processed (0), "a dog" x10 neither (0), "red,white" -> "red white" (1)
    assert task_metrics("textvqa:val", rows, examples, "vqa2016") == pytest.approx({"accuracy": 100 / 3, "n": 3})
    assert protocol("textvqa:val", "vqa2016") == "vqa2016"
    with pytest.raises(ValueError, match="unknown VQA protocol 'x'"):
        task_metrics("vqav2:val", rows, examples, "x")
    # POPE: all read "yes" by the official rule (the old reading said "no" to each)
    pope = ["Yes. There is no cat.", "There isn't a dog.", "NO", "Not sure", "no-one is there", "No\nthere is a dog"]
    m = task_metrics("pope:random", [{"answer": a} for a in pope], [ex(["no"]) for _ in pope])
    assert m["yes_ratio"] == 100.0 and m["accuracy"] == 0.0


def test_refcoco_test_is_testA_and_testB_as_refer_defines_it(tmp_path):
    """lichengunc/refer, refer.py getRefIds: split "test" takes every ref whose split holds
    "test", "testA" every ref whose split holds "A", in the refs' order."""
    root = make_refcoco(tmp_path / "data")
    test = [e.id for e in read_task(root, "refcoco:test")]
    both = {e.id for e in read_task(root, "refcoco:testA")} | {e.id for e in read_task(root, "refcoco:testB")}
    assert test == ["104", "103"] and set(test) == both


def make_test_server_layouts(root: Path) -> Path:
    """The VQA repository's layout (GT-Vision-Lab/VQA README: Questions/, Images/mscoco/test2015/)
    with test-dev2015 and test2015 question files as released (no annotations), and TextVQA's
    test split (TextVQA_0.5.1_test.json without answers, images in test_images/)."""
    (root / "Questions").mkdir(parents=True)
    (root / "Images" / "mscoco" / "test2015").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(root / "Images" / "mscoco" / "test2015" / "COCO_test2015_000000000007.jpg")
    dev = [{"question_id": 7001, "image_id": 7, "question": "How many cats?"},
           {"question_id": 7002, "image_id": 7, "question": "What colour?"}]
    info = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}}
    (root / "Questions" / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(
        json.dumps({**info, "data_subtype": "test-dev2015", "questions": dev}))
    (root / "Questions" / "v2_OpenEnded_mscoco_test2015_questions.json").write_text(json.dumps(
        {**info, "data_subtype": "test2015", "questions": dev + [{"question_id": 7003, "image_id": 7, "question": "Why?"}]}))
    (root / "test_images").mkdir()
    Image.new("RGB", (32, 32)).save(root / "test_images" / "abc123.jpg")
    data = [{"question_id": 40, "image_id": "abc123", "question": "What brand?", "image_classes": [],
             "flickr_original_url": "", "flickr_300k_url": "", "image_width": 32, "image_height": 32, "set_name": "test"}]
    (root / "TextVQA_0.5.1_test.json").write_text(json.dumps({"dataset_type": "test", "dataset_name": "textvqa",
                                                                  "dataset_version": "0.5.1", "data": data}))
    return root


def test_test_server_splits_write_the_servers_results_file(tmp_path, capsys):
    """vqav2:test-dev reads the test-dev2015 questions with the test2015 images; with no answers
    to score, the runner writes the server's results file ([{"question_id": int, "answer": str}],
    the VQA evaluation page's results format, named as GT-Vision-Lab/VQA vqaEvalDemo.py names
    results files) over every test2015 question (unasked ones answered "", as LLaVA's
    scripts/convert_vqav2_for_submission.py does for the test-dev phase); TextVQA test alike."""
    from evaluation.evaluate import main
    root = make_test_server_layouts(tmp_path / "data")
    dev = read_task(root, "vqav2:test-dev")
    assert [(e.id, e.answers) for e in dev] == [("7001", []), ("7002", [])] and dev[0].image.is_file()
    assert read_task(root, "textvqa:test")[0].image == root / "test_images" / "abc123.jpg"
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": 7001, "answer": "two"}) + "\n" + json.dumps({"id": "7002", "answer": "red"}) + "\n")
    out = tmp_path / "out"
    assert main(["--task", "vqav2:test-dev", "--data", str(root), "--predictions", str(preds),
                 "--output_dir", str(out), "--alg_name", "mine"]) == 0
    server = json.loads((out / "v2_OpenEnded_mscoco_test-dev2015_mine_results.json").read_text())
    assert server == [{"question_id": 7001, "answer": "two"}, {"question_id": 7002, "answer": "red"},
                      {"question_id": 7003, "answer": ""}]
    r = json.loads((out / "results.json").read_text())["vqav2:test-dev"]
    assert r["result"] == "submit to the evaluation server" and "challenge-page/830" in r["server"]
    assert "upload" in capsys.readouterr().out
    preds.write_text(json.dumps({"id": 40, "answer": "Nokia"}) + "\n")
    assert main(["--task", "textvqa:test", "--data", str(root), "--predictions", str(preds),
                 "--output_dir", str(out), "--alg_name", "mine"]) == 0
    assert json.loads((out / "TextVQA_0.5.1_test_mine_results.json").read_text()) == [{"question_id": 40, "answer": "Nokia"}]


def test_predictions_file_scored_like_the_runner(tmp_path, capsys):
    """The runner's predictions-<task>.jsonl, scored by --predictions (no model), gives the
    runner's own results.json; another system's file with integer ids alike; a missing or unknown
    id is one error line naming it; --vqa_protocol rescores the same answers."""
    from evaluation.evaluate import done_ids, main, predictions_file, run_task, write_results
    root = make_vqa_pope(make_refcoco(tmp_path / "data"))
    scripted = {"the right half": "[[250,500,750,1000]]", "that part": "[[000,000,100,100]]",
                "top left": "[[000,000,500,500]]", "How many cats?": "two", "What colour?": "Red",
                "Is there a cat in the image?": "Yes.", "Is there a dog in the image?": "There isn't a dog."}

    def answer(reqs):
        return [next(v for k, v in scripted.items() if k in q) for q, _, _, _ in reqs]
    tasks = ["refcoco:val", "vqav2:val", "pope:random"]
    data = {t: read_task(root, t) for t in tasks}
    runner = tmp_path / "runner"
    runner.mkdir()
    for t in tasks:
        run_task(answer, t, data[t], runner, "auto", 2, show=False)
    rows = {t: [done_ids(predictions_file(runner, t))[e.id] for e in data[t]] for t in tasks}
    want = write_results(runner, tasks, data, rows, 0.0, None, "cogvlm")
    assert want["vqav2:val"]["protocol"] == "vqa2016" and want["refcoco:val"]["accuracy"] == pytest.approx(200 / 3)
    assert want["pope:random"]["yes_ratio"] == 100.0          # "There isn't a dog." reads "yes" (POPE evaluate.py)
    for t in tasks:
        out = tmp_path / t.replace(":", "_")
        assert main(["--task", t, "--data", str(root), "--predictions", str(predictions_file(runner, t)),
                     "--output_dir", str(out)]) == 0
        assert json.loads((out / "results.json").read_text()) == {t: want[t]}
    other = tmp_path / "other.jsonl"                          # question_id as the dataset writes it: an int
    other.write_text(json.dumps({"id": 1002, "answer": "red"}) + "\n" + json.dumps({"id": 1001, "answer": "2"}) + "\n")
    assert main(["--task", "vqav2:val", "--data", str(root), "--predictions", str(other), "--output_dir",
                 str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "results.json").read_text())["vqav2:val"]["accuracy"] == pytest.approx(95.0)
    capsys.readouterr()
    other.write_text(json.dumps({"id": 1002, "answer": "red"}) + "\n")
    assert main(["--task", "vqav2:val", "--data", str(root), "--predictions", str(other), "--output_dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no answer for id 1001 of vqav2:val" in err
    other.write_text(json.dumps({"id": 1001, "answer": "2"}) + "\n" + json.dumps({"id": 999, "answer": "red"}) + "\n")
    assert main(["--task", "vqav2:val", "--data", str(root), "--predictions", str(other), "--output_dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "id 999 is not an example of vqav2:val" in err
    # the same answers under the other protocol: "Red" vs ten "red" (EvalAI lower-cases both): 100
    vqa = predictions_file(runner, "vqav2:val")
    assert main(["--task", "vqav2:val", "--data", str(root), "--predictions", str(vqa), "--output_dir",
                 str(tmp_path / "e"), "--vqa_protocol", "evalai"]) == 0
    r = json.loads((tmp_path / "e" / "results.json").read_text())["vqav2:val"]
    assert r["protocol"] == "evalai" and r["accuracy"] == pytest.approx(100 * (0.9 + 1.0) / 2)


def test_predictions_mode_loads_no_model(tmp_path):
    """--predictions on the command line: neither the model code nor torch is imported."""
    root = make_vqa_pope(tmp_path / "data")
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"id": i, "answer": "yes"}) + "\n" for i in (1, 2)))
    script = str(ROOT / "evaluation" / "evaluate.py")
    code = ("import runpy, sys; sys.argv = ['evaluate.py', '--task', 'pope:random', '--data', sys.argv[1], "
            "'--predictions', sys.argv[2], '--output_dir', sys.argv[3]]\n"
            f"try:\n    runpy.run_path({script!r}, run_name='__main__')\n"
            "except SystemExit as e:\n    print('status', e.code, 'models' in sys.modules, 'torch' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code, str(root), str(preds), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120, cwd="/")
    assert "status 0 False False" in p.stdout, p.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["pope:random"]["accuracy"] == 50.0
