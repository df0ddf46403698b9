"""Our synthetic held-out set (utils/data/synthetic.py) exported in the released layouts, so
that the bundled models are scored by the code that scores real data:

- `Where is the <object>?` questions -> the refer layout as task `synthetic:val`
  (DST/synthetic/instances.json with COCO x y w h pixel boxes, DST/synthetic/refs(unc).p, the
  images under DST/images/mscoco/images/train2014/); the expression is the object's name, to be
  asked with `--grounding_prompt "Where is the {expr}?"` as the models were trained;
- the one-word questions (colour, shape, count, presence, text) -> the VQAv2 layout
  (questions + annotations with ten identical answers, DST/val2014/COCO_val2014_<id>.jpg).

  python utils/data/layouts.py --src build/tiny/data-cogvlm-test --dst build/tiny/eval-layouts
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from any directory
from utils.apps.flags import ArgumentParser  # noqa: E402
from utils.apps.tool import reports_errors, run_tool  # noqa: E402

from PIL import Image  # noqa: E402

WHERE = re.compile(r"Where is the (.+)\?$")
ONE_WORD = re.compile(r"^(What colour|What shape|How many|Is there|What does the text say)")


def export(src: Path, dst: Path) -> dict:
    """-> counts of what was written."""
    ref_images, anns, refs, questions, answers = [], [], [], [], []
    img_dir = dst / "images" / "mscoco" / "images" / "train2014"
    vqa_dir = dst / "val2014"
    img_dir.mkdir(parents=True, exist_ok=True)
    vqa_dir.mkdir(parents=True, exist_ok=True)
    for n, lab in enumerate(sorted((src / "labels").glob("*.json")), start=1):
        d = json.loads(lab.read_text())
        img = next((src / "images").glob(lab.stem + ".*"))
        w, h = Image.open(img).size
        wrote_ref = wrote_vqa = False
        for k, qa in enumerate(d["qa"]):
            q, a = qa["question"], qa["answer"]
            m = WHERE.match(q)
            box = re.fullmatch(r"\[\[(\d+),(\d+),(\d+),(\d+)\]\]", a.strip())
            if m and box:
                x0, y0, x1, y1 = (int(v) / 1000 for v in box.groups())
                ann_id = n * 100 + k
                anns.append({"id": ann_id, "image_id": n, "bbox": [x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h],
                             "category_id": 1})
                refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": n, "split": "val",
                             "sentences": [{"sent_id": ann_id, "sent": m.group(1)}]})
                wrote_ref = True
            elif ONE_WORD.match(q):
                qid = n * 100 + k
                questions.append({"question_id": qid, "image_id": n, "question": q})
                answers.append({"question_id": qid, "answers": [{"answer": a, "answer_id": i + 1} for i in range(10)]})
                wrote_vqa = True
        if wrote_ref:
            ref_images.append({"id": n, "file_name": img.name, "width": w, "height": h})
            shutil.copy(img, img_dir / img.name)
        if wrote_vqa:
            shutil.copy(img, vqa_dir / f"COCO_val2014_{n:012d}.jpg")    # decoded by content
    (dst / "synthetic").mkdir(parents=True, exist_ok=True)
    (dst / "synthetic" / "instances.json").write_text(json.dumps({"images": ref_images, "annotations": anns}))
    with open(dst / "synthetic" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    (dst / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (dst / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": answers}))
    return {"expressions": len(refs), "questions": len(questions)}


@reports_errors()
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, type=Path, help="a synthetic data folder (labels/, images/)")
    p.add_argument("--dst", required=True, type=Path)
    a = p.parse_args(argv)
    if not (a.src / "labels").is_dir():
        raise FileNotFoundError(f"{a.src} has no labels/ (make one with utils/data/synthetic.py)")
    print(f"wrote {export(a.src, a.dst)} to {a.dst}")
    return 0


if __name__ == "__main__":
    run_tool(main)
