"""CogAgent's GUI benchmarks read as released; scored by utils/scoring/gui.py.

- `screenspot:mobile|desktop|web|all` (njucckevin/SeeClick readme.md, pretrain/screenspot_test.py):
  ROOT/screenspot_<platform>.json, lists of {img_filename, instruction, bbox: pixel [x, y, w, h],
  data_type: text|icon, data_source}, images in ROOT/screenspot_imgs/ (SeeClick's
  --screenspot_imgs; ROOT/images/ also accepted). Or the parquet mirror
  (rootsautomation/ScreenSpot: ROOT/data/test-*.parquet, columns file_name, bbox normalized
  [x1, y1, x2, y2], instruction, data_type, data_source, image), its platform from data_source
  (ios/android: mobile, macos/windows: desktop, the rest web); its images are written once to
  ROOT/screenspot_imgs/.
- `mind2web:test_task|test_website|test_domain` (OSU-NLP-Group/Mind2Web; the layouts in
  utils/data/gui_finetune.py): one example per action that has a screenshot and a target box;
  the others still count, as failed steps, in the task's length (the official padding).
- `aitw:general|install|googleapps|single|webshopping|all` (google-research android_in_the_wild):
  the GZIP TFRecords in ROOT/<general|install|google_apps|single|web_shopping>/; the test
  episodes of Auto-UI's ROOT/<subset>_texts_splits.json when it is there, else every episode.

Every example's question is the task; earlier steps' actions (the recorded ones, as the
official evaluations feed them) go to the prompt as `History steps:`.
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from utils.data.gui_finetune import AITW_SUBSETS, aitw_episodes, mind2web_steps
from utils.scoring.gui import GuiExample, format_action
from utils.scoring.tasks import DataError

SCREENSPOT_PLATFORMS = ("mobile", "desktop", "web")
PLATFORM_OF_SOURCE = {"ios": "mobile", "android": "mobile", "macos": "desktop", "windows": "desktop"}
MIND2WEB_SPLITS = ("test_task", "test_website", "test_domain", "train")


def _size(path: Path) -> tuple:
    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


def _screenspot_json(root: Path, platform: str) -> list:
    f = root / f"screenspot_{platform}.json"
    img_dir = next((root / d for d in ("screenspot_imgs", "images") if (root / d).is_dir()), None)
    if img_dir is None:
        raise DataError(f"ScreenSpot images: none of screenspot_imgs, images in {root}")
    out = []
    for i, x in enumerate(json.loads(f.read_text(encoding="utf-8"))):
        img = img_dir / x["img_filename"]
        if not img.is_file():
            raise DataError(f"ScreenSpot: image {img} is missing")
        (w, h), (bx, by, bw, bh) = _size(img), x["bbox"]
        out.append(GuiExample(f"{platform}/{i}", img, x["instruction"], box=(bx, by, bx + bw, by + bh), size=(w, h),
                              gui={"platform": platform, "type": x["data_type"], "source": x["data_source"],
                                   "box_norm": (bx / w, by / h, (bx + bw) / w, (by + bh) / h)}))
    return out


def _screenspot_parquet(root: Path, files: list, platforms: tuple) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{files[0]}: reading parquet needs pyarrow (pip install pyarrow)") from None
    img_dir, out, i = root / "screenspot_imgs", [], 0
    for f in files:
        for row in pq.read_table(f).to_pylist():
            platform = PLATFORM_OF_SOURCE.get(row["data_source"].lower(), "web")
            i += 1
            if platform not in platforms:
                continue
            img = img_dir / row["file_name"]
            if not img.is_file():
                img_dir.mkdir(parents=True, exist_ok=True)
                img.write_bytes(row["image"]["bytes"])
            (w, h), b = _size(img), tuple(row["bbox"])
            out.append(GuiExample(f"{platform}/{row['file_name']}#{i - 1}", img, row["instruction"],
                                  box=(b[0] * w, b[1] * h, b[2] * w, b[3] * h), size=(w, h),
                                  gui={"platform": platform, "type": row["data_type"], "source": row["data_source"],
                                       "box_norm": b}))
    return out


def read_screenspot(root: Path, part: str) -> list:
    platforms = SCREENSPOT_PLATFORMS if part == "all" else (part,)
    if not set(platforms) <= set(SCREENSPOT_PLATFORMS):
        raise DataError(f"screenspot:{part}: the part must be mobile, desktop, web or all")
    if all((root / f"screenspot_{p}.json").is_file() for p in platforms):
        return [ex for p in platforms for ex in _screenspot_json(root, p)]
    parquet = sorted((root / "data").glob("test-*.parquet")) + sorted(root.glob("test-*.parquet"))
    if parquet:
        return _screenspot_parquet(root, parquet, platforms)
    raise DataError(f"ScreenSpot: none of {', '.join(f'screenspot_{p}.json' for p in platforms)} "
                    f"or data/test-*.parquet in {root}")


def read_mind2web(root: Path, split: str) -> list:
    if split not in MIND2WEB_SPLITS:
        raise DataError(f"mind2web:{split}: the split must be test_task, test_website or test_domain")
    out, every_task = [], {}                 # task -> its step count, tasks with no askable step included
    for s in mind2web_steps(root, split):
        every_task[s["task_id"]] = s["total"]
        if s["image"] is None or not s["boxes"]:
            continue                           # not asked: scored as failed, as the official code does
        out.append(GuiExample(f"{s['task_id']}_{s['action_uid']}", s["image"], s["task"], size=_size(s["image"]),
                              gui={"task": s["task_id"], "total_steps": s["total"], "operation": s["operation"],
                                   "boxes": s["boxes"], "previous": s["previous"], "every_task": every_task}))
    return out


def read_aitw(root: Path, subset: str) -> list:
    subsets = list(AITW_SUBSETS) if subset == "all" else [subset]
    if not set(subsets) <= set(AITW_SUBSETS):
        raise DataError(f"aitw:{subset}: the subset must be one of {', '.join(AITW_SUBSETS)} or all")
    out = []
    for sub in subsets:
        for eid, steps in aitw_episodes(root, sub, "test").items():
            previous = []
            for s in steps:
                a = s["action"]
                out.append(GuiExample(f"{sub}/{eid}_{s['step_id']}", s["image"], s["goal"],
                                      gui={"subset": sub, "action_type": a.type, "touch": list(a.touch),
                                           "lift": list(a.lift), "text": a.text, "annotations": s["annotations"],
                                           "previous": list(previous)}))
                previous.append(format_action(a))
    return out


# task name -> (reader, the part read when the task names none)
GUI_READERS = {"screenspot": (read_screenspot, "all"), "mind2web": (read_mind2web, "test_task"),
               "aitw": (read_aitw, "all")}


def read_gui_task(root: Path, task: str):
    """The examples of a GUI task, or None when the task is not one."""
    name, _, part = task.partition(":")
    if name not in GUI_READERS:
        return None
    reader, default = GUI_READERS[name]
    return reader(root, part or default)
