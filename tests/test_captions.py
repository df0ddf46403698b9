"""Captions scored as COCO scores them, and the caption datasets in their released layouts.

The expected CIDEr-D values come from the official scorer called here directly: pycocoevalcap
(salaniz/pycocoevalcap, the pip release of tylin/coco-caption), `tokenizer/ptbtokenizer.py`
(Stanford CoreNLP's PTB tokenizer, run with java) and `cider/cider.py`, references and
candidates tokenized apart as `eval.py` (COCOEvalCap.evaluate) does. Layouts: Karpathy's
caption_datasets.zip (cs.stanford.edu/people/karpathy/deepimagesent: dataset_coco.json,
dataset_flickr30k.json; {"images": [{"filepath", "filename", "cocoid", "imgid", "sentids",
"split", "sentences": [{"raw", "tokens", "imgid", "sentid"}]}]}, Flickr30k's without filepath and
cocoid, images in flickr30k-images/ as Flickr's archive unpacks); NoCaps' nocaps_val_4500_captions.json
(nocaps.org: COCO's caption layout, images with open_images_id and domain)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.datasets import DataError, read_task
from utils.scoring import captions
from utils.scoring.metrics import caption_tokens
from utils.scoring.tasks import Example, protocol, task_metrics

ROOT = Path(__file__).resolve().parent.parent
NEEDS_COCO = pytest.mark.skipif(captions.coco_missing() is not None,
                                reason=f"the coco-caption pipeline cannot run here: {captions.coco_missing()}")

# 8 images whose captions the PTB tokenizer and a regex split differently
CANDIDATES = ["A man in a red T-shirt rides a horse.", "The man's café sells coffee.",
              "A bottle holds 1.5 liters of water.", "Two dogs don't play in the snow!",
              "A U.S. flag waves over 3,000 people.", "A woman's hat (straw) on a table.",
              "Kids play soccer -- on grass; cheering.", "A cat sits on a laptop..."]
REFERENCES = [["a man wearing a red t-shirt riding a horse", "A man in a T-shirt on a brown horse."],
              ["The man's cafe sells coffee and cake.", "A café with a man's sign."],
              ["A 1.5 liter bottle of water.", "A bottle with 1.5 liters of water on a desk."],
              ["Two dogs don't want to play in the snow.", "Two dogs sit in snow."],
              ["A U.S. flag over a crowd of 3,000 people.", "The flag of the U.S. waving."],
              ["A woman's straw hat lies on a table.", "A hat (straw) on a wooden table."],
              ["Kids play soccer on the grass.", "Children playing soccer -- cheering."],
              ["A cat sitting on a laptop.", "A cat on a laptop keyboard..."]]


def official_cider(candidates: list, references: list) -> float:
    """COCOEvalCap's CIDEr-D: PTBTokenizer on the references and on the results, then Cider."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    gts = {i: [{"caption": r} for r in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": c}] for i, c in enumerate(candidates)}
    tok = PTBTokenizer()
    score, _ = Cider().compute_score(tok.tokenize(gts), tok.tokenize(res))
    return 100 * float(score)


def examples(references: list) -> list:
    return [Example(str(i), Path(f"{i}.jpg"), "", refs) for i, refs in enumerate(references)]


@NEEDS_COCO
def test_runner_equals_the_official_pipeline(monkeypatch):
    rows = [{"answer": c} for c in CANDIDATES]
    want = official_cider(CANDIDATES, REFERENCES)
    got = task_metrics("coco_caption:karpathy_test", rows, examples(REFERENCES))
    assert got == {"cider": pytest.approx(want, abs=1e-9), "n": 8}
    assert protocol("coco_caption:karpathy_test") == protocol("nocaps:val") == captions.PROTOCOL_COCO
    # tokenization matters: the regex fallback gives another number on the same answers
    monkeypatch.setattr(captions, "coco_missing", lambda: "hidden")
    assert abs(task_metrics("coco_caption:val", rows, examples(REFERENCES))["cider"] - want) > 1
    monkeypatch.undo()
    # a read-only site-packages: the tokenizer runs from a temporary folder, same numbers
    monkeypatch.setattr(captions, "_writable", lambda folder: False)
    assert task_metrics("flickr30k:test", rows, examples(REFERENCES))["cider"] == pytest.approx(want, abs=1e-9)


@NEEDS_COCO
def test_line_breaks_inside_a_caption_stay_with_their_image():
    """The package replaces only "\\n"; the PTB tokenizer also breaks lines at "\\r" and U+2028,
    which would move every later caption onto the wrong image. Each caption is scored as the
    official pipeline scores it written on one line."""
    cands = ["a man\rin a red t-shirt", "the man's\u2028café"] + CANDIDATES[2:]
    got = captions.caption_cider(cands, REFERENCES)
    one_line = [" ".join(c.splitlines()) for c in cands]
    assert 100 * got[0] == pytest.approx(official_cider(one_line, REFERENCES), abs=1e-9)
    assert len(got[1]) == 8 and got[2] == captions.PROTOCOL_COCO


def test_fallback_without_java_is_named(monkeypatch, tmp_path, caplog):
    """No java on PATH: the regex tokenizer + our CIDEr-D run, say so in one log line and in the
    protocol; its CIDEr-D equals pycocoevalcap's Cider on the same (regex) tokens."""
    monkeypatch.setenv("PATH", str(tmp_path))              # an empty folder: no java
    assert captions.coco_missing().startswith("no java")
    assert protocol("coco_caption:karpathy_test") == captions.PROTOCOL_FALLBACK
    with caplog.at_level(logging.WARNING):
        got = task_metrics("coco_caption:karpathy_test", [{"answer": c} for c in CANDIDATES], examples(REFERENCES))
    lines = [r.getMessage() for r in caplog.records if r.name == captions.__name__]
    assert len(lines) == 1 and "no java" in lines[0] and captions.PROTOCOL_FALLBACK in lines[0]
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.cider.cider import Cider
    gts = {i: [" ".join(caption_tokens(r)) for r in refs] for i, refs in enumerate(REFERENCES)}
    res = {i: [" ".join(caption_tokens(c))] for i, c in enumerate(CANDIDATES)}
    assert got["cider"] == pytest.approx(100 * Cider().compute_score(gts, res)[0], abs=1e-9)


def karpathy_coco(root: Path) -> Path:
    """dataset_coco.json with a test, a val and a restval image (restval's in train2014)."""
    for folder in ("val2014", "train2014"):
        (root / folder).mkdir(parents=True)
    def image(cocoid, split, folder, raws):
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        (root / folder / name).write_bytes(b"")
        return {"filepath": folder, "filename": name, "cocoid": cocoid, "imgid": cocoid % 97, "split": split,
                "sentids": list(range(len(raws))),
                "sentences": [{"raw": r, "tokens": caption_tokens(r), "imgid": cocoid % 97, "sentid": k}
                              for k, r in enumerate(raws)]}
    images = [image(391895, "test", "val2014", ["A man in a T-shirt.", "A man's bike."]),
              image(522418, "val", "val2014", ["A woman cuts a cake."]),
              image(184613, "test", "val2014", ["A café at 1.5 km."]),
              image(57870, "restval", "train2014", ["A dining table."])]
    (root / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    return root


def test_karpathy_coco_reader(tmp_path):
    root = karpathy_coco(tmp_path / "coco")
    test = read_task(root, "coco_caption:karpathy_test")
    assert [(e.id, e.image, e.answers) for e in test] == [
        ("391895", root / "val2014" / "COCO_val2014_000000391895.jpg", ["A man in a T-shirt.", "A man's bike."]),
        ("184613", root / "val2014" / "COCO_val2014_000000184613.jpg", ["A café at 1.5 km."])]
    assert [e.id for e in read_task(root, "coco_caption:karpathy_val")] == ["522418"]
    restval = read_task(root, "coco_caption:karpathy_restval")
    assert [e.image for e in restval] == [root / "train2014" / "COCO_train2014_000000057870.jpg"]
    with pytest.raises(DataError, match="karpathy_test"):
        read_task(root, "coco_caption:karpathy_tset")
    shutil.rmtree(root / "val2014")
    with pytest.raises(DataError, match="val2014"):
        read_task(root, "coco_caption:karpathy_test")


def test_flickr30k_and_nocaps_readers(tmp_path):
    root = tmp_path / "flickr"
    (root / "flickr30k-images").mkdir(parents=True)
    images = [{"filename": "1000092795.jpg", "imgid": 0, "split": "test", "sentids": [0, 1],
               "sentences": [{"raw": "Two young guys with shaggy hair.", "tokens": [], "imgid": 0, "sentid": 0},
                             {"raw": "Two friends enjoy time outside.", "tokens": [], "imgid": 0, "sentid": 1}]},
              {"filename": "10002456.jpg", "imgid": 1, "split": "train", "sentids": [2],
               "sentences": [{"raw": "Workers on a building.", "tokens": [], "imgid": 1, "sentid": 2}]}]
    (root / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    for split in ("test", "karpathy_test"):
        [ex] = read_task(root, f"flickr30k:{split}")
        assert (ex.id, ex.image) == ("1000092795", root / "flickr30k-images" / "1000092795.jpg")
        assert ex.answers == ["Two young guys with shaggy hair.", "Two friends enjoy time outside."]
    root = tmp_path / "nocaps"
    (root / "val").mkdir(parents=True)
    nocaps = {"licenses": [], "info": {},
              "images": [{"id": 0, "open_images_id": "0013ea2087020901", "file_name": "0013ea2087020901.jpg",
                          "height": 1024, "width": 732, "domain": "in-domain", "coco_url": "", "license": 0},
                         {"id": 1, "open_images_id": "002c5c8d5d5f3ca8", "file_name": "002c5c8d5d5f3ca8.jpg",
                          "height": 683, "width": 1024, "domain": "out-domain", "coco_url": "",
                          "license": 0}],
              "annotations": [{"image_id": 1, "id": 0, "caption": "A jellyfish in blue water."},
                              {"image_id": 0, "id": 1, "caption": "A baby with a toy."},
                              {"image_id": 1, "id": 2, "caption": "A jellyfish swims."}]}
    (root / "nocaps_val_4500_captions.json").write_text(json.dumps(nocaps))
    got = read_task(root, "nocaps:val")
    assert [(e.id, e.image.name, e.answers) for e in got] == [
        ("0", "0013ea2087020901.jpg", ["A baby with a toy."]),
        ("1", "002c5c8d5d5f3ca8.jpg", ["A jellyfish in blue water.", "A jellyfish swims."])]
    assert got[0].image.parent == root / "val"
    with pytest.raises(DataError, match="only nocaps:val"):
        read_task(root, "nocaps:test")


def test_results_name_the_protocol_that_ran(tmp_path):
    """evaluate.py --predictions on Karpathy's test split: results.json names the pipeline that
    produced the number; with java hidden from PATH, the fallback, and one line says so."""
    root = karpathy_coco(tmp_path / "coco")
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"id": i, "answer": a}) + "\n"
                             for i, a in ((391895, "A man in a t-shirt."), (184613, "A café."))))

    def run(path: str, out: str) -> tuple:
        p = subprocess.run([sys.executable, str(ROOT / "evaluation" / "evaluate.py"), "--task",
                            "coco_caption:karpathy_test", "--data", str(root), "--predictions", str(preds),
                            "--output_dir", str(tmp_path / out)],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": path})
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads((tmp_path / out / "results.json").read_text())["coco_caption:karpathy_test"], p.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    fallback, err = run(str(empty), "fallback")
    assert fallback["protocol"] == captions.PROTOCOL_FALLBACK and fallback["n"] == 2
    assert [line for line in err.splitlines() if "fallback" in line] == [
        f"captions: no java on PATH (make installs default-jre-headless); scoring with the fallback "
        f"({captions.PROTOCOL_FALLBACK})"]
    if captions.coco_missing() is None:
        coco, _ = run(os.environ["PATH"], "coco")
        assert coco["protocol"] == captions.PROTOCOL_COCO
        assert coco["cider"] == pytest.approx(official_cider(["A man in a t-shirt.", "A café."],
                                                             [["A man in a T-shirt.", "A man's bike."],
                                                              ["A café at 1.5 km."]]), abs=1e-9)
