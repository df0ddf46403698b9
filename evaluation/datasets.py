"""Benchmark data read as the owners release them. Each reader takes the dataset root (--data)
and returns Examples, their ids the datasets' own (refer `sent_id`, VQA and TextVQA
`question_id`, POPE `question_id`, COCO image `id`); a missing file is named in one line with
where it was looked for.

- RefCOCO / RefCOCO+ / RefCOCOg (the `refer` layout): ROOT/<name>/instances.json (COCO boxes,
  x y w h in pixels) and ROOT/<name>/refs(unc).p (refcocog: refs(umd).p), a pickle of refs
  with split, sentences, ann_id, image_id, read with a restricted unpickler (builtin containers
  and scalars only: never code); images ROOT/images/mscoco/images/train2014/. Splits are chosen
  as refer's getRefIds chooses them (lichengunc/refer, refer.py): val exactly; testA / testB
  every ref whose split holds "A" / "B"; test every ref whose split holds "test" (RefCOCO and
  RefCOCO+: testA + testB).
- VQAv2: v2_OpenEnded_mscoco_<subset>_questions.json (+ v2_mscoco_<subset>_annotations.json
  for train and val) in ROOT or ROOT/Questions, ROOT/Annotations; subsets train2014, val2014,
  test-dev2015 and test2015 (tasks vqav2:train|val|test-dev|test); images ROOT/<images>/,
  ROOT/images/<images>/ or, as the VQA repository lays them out, ROOT/Images/mscoco/<images>/
  (test-dev's images are in test2015/).
- TextVQA: ROOT/TextVQA_0.5.1_<split>.json; images ROOT/train_images/ for train and val (the
  val images live there), ROOT/test_images/ for test.
- POPE: ROOT/coco_pope_<kind>.json (one JSON object a line: question_id, image, text, label);
  images ROOT/val2014/ or ROOT/images/val2014/.
- COCO captions: ROOT/captions_<split>2014.json (or annotations/); images ROOT/<split>2014/.
  Karpathy's split (coco_caption:karpathy_test|karpathy_val): ROOT/dataset_coco.json, images
  ROOT/<filepath>/<filename>, ids the cocoid; Flickr30k (flickr30k:test|val) by the same reader
  from ROOT/dataset_flickr30k.json, images ROOT/flickr30k-images/, ids the file name's stem.
  NoCaps (nocaps:val): ROOT/nocaps_val_4500_captions.json (COCO's caption layout), images ROOT/val/.
- Our synthetic set as utils/data/synthetic.py writes it (`synthetic_qa:<split>`): ROOT/<split>/
  labels/<name>.json ({"qa": [{question, answer}, ...]}) + images/<name>.*; every question of a
  known kind (agent tasks included) is an example.
- Finetuning data (`finetune:<split>`): ROOT/<split>/ in either layout the finetuning scripts
  read (labels/ + images/ conversations, or captcha images named by their text); every
  answer turn is an example, the turns before it its history.
"""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

from utils.scoring.tasks import DataError, Example


def _find(root: Path, names: list, what: str) -> Path:
    for n in names:
        if (root / n).is_file():
            return root / n
    raise DataError(f"{what}: none of {', '.join(names)} in {root}")


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _image_dir(root: Path, candidates: list, what: str) -> Path:
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    raise DataError(f"{what} images: none of {', '.join(candidates)} in {root}")


class _DataOnly(pickle.Unpickler):
    """Builds builtin containers and scalars only; any class or function is refused."""
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refs file wants {module}.{name}: only plain data is read")


def read_refs(path: Path) -> list:
    try:
        with open(path, "rb") as f:
            return _DataOnly(io.BytesIO(f.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a refs pickle of plain data ({e})") from None


# synthetic: our held-out set exported in this layout (utils/data/layouts.py)
REFER = {"refcoco": "refs(unc).p", "refcoco+": "refs(unc).p", "refcocog": "refs(umd).p", "synthetic": "refs(unc).p"}


def refer_split(ref_split: str, split: str) -> bool:
    """Whether a ref of `ref_split` belongs to `split`, as refer's getRefIds decides."""
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref_split                # refer also counts testAB, testBC, ...
    if split == "test":
        return "test" in ref_split
    return ref_split == split


def read_refer(root: Path, name: str, split: str) -> list[Example]:
    base = root / name
    refs = read_refs(_find(base, [REFER[name]], f"{name} refs"))
    inst = _json(_find(base, ["instances.json"], f"{name} instances"))
    images = {im["id"]: im for im in inst["images"]}
    anns = {a["id"]: a for a in inst["annotations"]}
    img_dir = _image_dir(root, ["images/mscoco/images/train2014", "train2014"], "COCO train2014")
    out = []
    for ref in refs:
        if not refer_split(ref["split"], split):
            continue
        im, (x, y, w, h) = images[ref["image_id"]], anns[ref["ann_id"]]["bbox"]
        for s in ref["sentences"]:
            out.append(Example(str(s["sent_id"]), img_dir / im["file_name"], s["sent"],
                               box=(x, y, x + w, y + h), size=(im["width"], im["height"])))
    if not out:
        raise DataError(f"{name}: no referring expressions in split {split!r}")
    return out


# VQAv2 split -> (the files' subset, the images' folder); test-dev's images are test2015's.
VQA_SUBSETS = {"train": ("train2014", "train2014"), "val": ("val2014", "val2014"),
               "test-dev": ("test-dev2015", "test2015"), "test": ("test2015", "test2015")}


def vqa_questions(root: Path, split: str) -> list:
    """The questions of a VQAv2 split, as released (question_id, image_id, question)."""
    sub = VQA_SUBSETS[split][0]
    name = f"v2_OpenEnded_mscoco_{sub}_questions.json"
    return _json(_find(root, [name, f"Questions/{name}"], "VQAv2 questions"))["questions"]


def read_vqav2(root: Path, split: str) -> list[Example]:
    """VQAv2 (train, val: with the ten human answers; test-dev, test: questions only)."""
    if split not in VQA_SUBSETS:
        raise DataError(f"vqav2:{split}: the split must be one of {', '.join(VQA_SUBSETS)}")
    sub, images = VQA_SUBSETS[split]
    questions = vqa_questions(root, split)
    answers = {}
    if not split.startswith("test"):
        name = f"v2_mscoco_{sub}_annotations.json"
        a = _find(root, [name, f"Annotations/{name}"], "VQAv2 annotations")
        answers = {x["question_id"]: [y["answer"] for y in x["answers"]] for x in _json(a)["annotations"]}
    img_dir = _image_dir(root, [images, f"images/{images}", f"Images/mscoco/{images}"], f"COCO {images}")
    return [Example(str(x["question_id"]), img_dir / f"COCO_{images}_{x['image_id']:012d}.jpg",
                    x["question"], answers.get(x["question_id"], []))
            for x in questions]


def server_question_ids(root: Path, task: str) -> list:
    """Question ids the server's results file must hold besides the task's own: for VQAv2
    test-dev, every test2015 question when its file is at hand (the test-dev phase takes a file
    over the whole test2015 set, answering "" what was not asked, as LLaVA's
    scripts/convert_vqav2_for_submission.py writes it); otherwise none."""
    if task != "vqav2:test-dev":
        return []
    try:
        return [x["question_id"] for x in vqa_questions(root, "test")]
    except DataError:
        return []


def read_textvqa(root: Path, split: str) -> list[Example]:
    """TextVQA as released; the test split has no answers and its images in test_images/."""
    d = _json(_find(root, [f"TextVQA_0.5.1_{split}.json"], "TextVQA"))
    folders = ["test_images"] if split == "test" else ["train_images", "images"]
    img_dir = _image_dir(root, folders, "TextVQA")
    return [Example(str(x["question_id"]), img_dir / f"{x['image_id']}.jpg", x["question"], x.get("answers", []))
            for x in d["data"]]


def read_pope(root: Path, kind: str) -> list[Example]:
    f = _find(root, [f"coco_pope_{kind}.json", f"coco/coco_pope_{kind}.json"], f"POPE {kind}")
    img_dir = _image_dir(root, ["val2014", "images/val2014"], "COCO val2014")
    out = []
    for line in f.read_text(encoding="utf-8").splitlines():
        if line.strip():
            x = json.loads(line)
            out.append(Example(str(x["question_id"]), img_dir / x["image"], x["text"], [x["label"]]))
    return out


def _captions_by_image(d: dict, img_dir: Path) -> list[Example]:
    """COCO's caption layout ("images" with id and file_name, "annotations" with image_id and
    caption): one example per image that has captions, its id the image id, the captions its
    answers (an image without captions cannot be scored and is left out)."""
    caps = {}
    for a in d["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"])
    return [Example(str(im["id"]), img_dir / im["file_name"], "", caps[im["id"]])
            for im in d["images"] if caps.get(im["id"])]


def read_coco_captions(root: Path, split: str) -> list[Example]:
    """COCO's own release: captions_<split>2014.json (or annotations/...); images ROOT/<split>2014/."""
    f = _find(root, [f"captions_{split}2014.json", f"annotations/captions_{split}2014.json"], "COCO captions")
    img_dir = _image_dir(root, [f"{split}2014", f"images/{split}2014", split], f"COCO {split}2014")
    return _captions_by_image(_json(f), img_dir)


def read_nocaps(root: Path, split: str) -> list[Example]:
    """NoCaps (nocaps.org): nocaps_val_4500_captions.json in COCO's caption layout (its images
    also carry open_images_id and domain); images ROOT/val/ or ROOT/images/val/ by file_name.
    Only val has public captions (test is scored by the EvalAI server)."""
    if split != "val":
        raise DataError(f"nocaps:{split}: only nocaps:val has public captions")
    f = _find(root, ["nocaps_val_4500_captions.json", "annotations/nocaps_val_4500_captions.json"], "NoCaps val")
    return _captions_by_image(_json(f), _image_dir(root, ["val", "images/val"], "NoCaps val"))


# Karpathy's splits (cs.stanford.edu/people/karpathy/deepimagesent caption_datasets.zip):
# name -> (file, image folders to try for an entry without "filepath")
KARPATHY = {"coco_caption": ("dataset_coco.json", []),
            "flickr30k": ("dataset_flickr30k.json",
                          ["flickr30k-images", "images/flickr30k-images", "flickr30k_images"])}
KARPATHY_SPLITS = ("test", "val", "train", "restval")


def read_karpathy(root: Path, name: str, split: str) -> list[Example]:
    """Karpathy's split file: {"images": [{"filepath"?, "filename", "cocoid"?, "split",
    "sentences": [{"raw", "tokens"}]}]}; the examples of one split, the raw sentences as the
    references (the scorer tokenizes them, as COCO's ground truth is). COCO: images
    ROOT/<filepath>/<filename> (or ROOT/images/<filepath>/), ids the cocoid; Flickr30k: images
    ROOT/flickr30k-images/<filename>, ids the file name without its extension (Flickr's id)."""
    file, folders = KARPATHY[name]
    f = _find(root, [file, f"annotations/{file}", f"caption_datasets/{file}"], f"Karpathy's {name} split")
    dirs, out = {}, []
    try:
        for im in _json(f)["images"]:
            if im["split"] != split or not im["sentences"]:
                continue
            where = im.get("filepath")
            if where not in dirs:
                tries = [where, f"images/{where}"] if where else folders
                dirs[where] = _image_dir(root, tries, f"{name} {where or ''}".strip())
            key = im["cocoid"] if "cocoid" in im else Path(im["filename"]).stem
            out.append(Example(str(key), dirs[where] / im["filename"], "", [s["raw"] for s in im["sentences"]]))
    except (KeyError, TypeError) as e:
        raise DataError(f"{f}: not Karpathy's layout (bad or missing field: {e})") from None
    if not out:
        raise DataError(f"{f}: no images in split {split!r}")
    return out


def read_caption_task(root: Path, name: str, part: str) -> list[Example]:
    """coco_caption:val|train (COCO's files) or coco_caption:karpathy_test|karpathy_val (Karpathy's);
    flickr30k:test|val (Karpathy's, also as karpathy_test); nocaps:val."""
    if name == "nocaps":
        return read_nocaps(root, part or "val")
    split = part[len("karpathy_"):] if part.startswith("karpathy_") else part
    if name == "coco_caption" and not part.startswith("karpathy_"):
        return read_coco_captions(root, part or "val")
    if split not in KARPATHY_SPLITS:
        raise DataError(f"{name}:{part}: the split must be one of "
                        f"{', '.join(('karpathy_' if name == 'coco_caption' else '') + s for s in KARPATHY_SPLITS)}")
    return read_karpathy(root, name, split)


def read_finetune(root: Path, split: str) -> list[Example]:
    """The finetuning scripts' own data (utils/training/dataset.py layouts), answers as the truth."""
    from utils.training.dataset import scan_captcha, scan_conversations
    folder = root / split if split else root
    if not folder.is_dir():
        raise DataError(f"finetuning data: no folder {folder} (expected {root}/<split>/ with labels/ + images/, "
                        f"or captcha images)")
    conv = (folder / "labels").is_dir() and (folder / "images").is_dir()
    samples, _ = (scan_conversations if conv else scan_captcha)(folder)
    out = []
    for i, s in enumerate(samples):
        (query, answer), history = s.turns[-1], s.turns[:-1]
        out.append(Example(f"{s.image.name}#{i}", s.image, query, [answer], history=list(history)))
    return out


# task name -> (reader, its argument); the split or kind follows the colon: refcoco:val
def read_task(root: Path, task: str) -> list[Example]:
    from evaluation.gui import read_gui_task
    gui_examples = read_gui_task(root, task)        # CogAgent's GUI benchmarks (evaluation/gui.py)
    if gui_examples is not None:
        return gui_examples
    name, _, part = task.partition(":")
    if name == "finetune":
        return read_finetune(root, part)
    if name == "synthetic_qa":
        from utils.data.synthetic import read_synthetic_qa
        return read_synthetic_qa(root, part)
    if name in REFER:
        if part not in ("val", "testA", "testB", "test"):
            raise DataError(f"{task}: the split must be val, testA, testB or test")
        return read_refer(root, name, part)
    if name == "vqav2":
        return read_vqav2(root, part or "val")
    if name == "textvqa":
        return read_textvqa(root, part or "val")
    if name in ("coco_caption", "flickr30k", "nocaps"):
        return read_caption_task(root, name, part)
    if name == "pope":
        if part not in ("adversarial", "popular", "random"):
            raise DataError(f"{task}: the POPE kind must be adversarial, popular or random")
        return read_pope(root, part)
    raise DataError(f"unknown task {task!r}; known: refcoco:val|testA|testB|test, refcoco+:..., refcocog:val|test, "
                    f"vqav2:val|test-dev|test, textvqa:val|test, pope:adversarial|popular|random, "
                    f"coco_caption:val|karpathy_test|karpathy_val, flickr30k:test|val, nocaps:val, "
                    f"finetune:<split>, synthetic_qa:<split>, screenspot:mobile|desktop|web|all, "
                    f"mind2web:test_task|test_website|test_domain, "
                    f"aitw:general|install|googleapps|single|webshopping|all")
