"""GUI-agent data as released (Mind2Web, Android in the Wild) read without their toolkits, and
their training splits converted to the finetuning layout (utils/training/dataset.py:
`images/<id>.*` + `labels/<id>.json` with `conversations`), so that
finetune_demo/finetune_cogagent_lora.sh trains CogAgent on them and evaluation/evaluate.py
(`--task mind2web:test_task`, `aitw:general`, ...) scores the result with the same prompt:

  python utils/data/gui_finetune.py --mind2web DATA/Mind2Web --split train --out data/gui/train
  python utils/data/gui_finetune.py --aitw DATA/aitw --subset general --split train --out data/gui/train
  DATA=data/gui bash finetune_demo/finetune_cogagent_lora.sh --version chat

Each sample: the screenshot; the question `What steps do I need to take to "<task>"?(with
grounding)` with the last previous actions under `History steps:`; the answer CogAgent's
grounded operation: Mind2Web `Grounded Operation:[button] Search -> CLICK at the box
[[x0,y0,x1,y1]]` (the release's action_repr, the target's box in thousandths), AITW
`Grounded Operation:tap [[x,y]]`, `swipe up`, `type "text"`, `press back`, `task complete`.

Formats (cited from the owners' repositories):
- Mind2Web (OSU-NLP-Group/Mind2Web README; read as in OSU-NLP-Group/SeeAct's screenshot code
  and njucckevin/SeeClick agent_tasks/): ROOT/data/<split>/*.json (or ROOT/<split>/*.json),
  lists of tasks {annotation_id, confirmed_task, action_reprs, actions: [{action_uid,
  operation: {op, original_op, value}, pos_candidates: [{attributes: JSON string with
  bounding_box_rect "x,y,w,h"}]}]}; screenshots in the raw dump
  ROOT/raw_dump/task/<annotation_id>/processed/screenshot.json, a list of {action_uid,
  before: {screenshot: base64}}, extracted once to ROOT/mind2web_imgs/<annotation_id>-<action_uid>.jpg
  (SeeClick's names: its extracted images there are used as they are). Or the multimodal
  release (osunlp/Multimodal-Mind2Web): ROOT/data/<split>-*.parquet, one row per action with
  the same fields, operation and candidates as JSON strings, target_action_index, screenshot.
- Android in the Wild (google-research android_in_the_wild/README.md, visualization_utils.py):
  GZIP TFRecord files of tf.train.Example in ROOT/<general|install|google_apps|single|web_shopping>/;
  features image/encoded (raw uint8 pixels), image/height, image/width, image/channels,
  image/ui_annotations_positions (normalized y, x, h, w, flattened), results/action_type,
  results/yx_touch, results/yx_lift, results/type_action, episode_id, step_id, goal_info.
  Screenshots are written once to ROOT/aitw_images/<subset>/<episode_id>_<step_id>.png. The
  episode split, when present, is Auto-UI's (cooelf/Auto-GUI dataset/<subset>_texts_splits.json:
  {"train", "val", "test"}: episode ids), which CogAgent's paper followed.

TFRecord framing (tensorflow/core/lib/io/record_writer.cc): uint64 length, uint32 masked
CRC-32C of the length, the data, uint32 masked CRC-32C of the data, little-endian; masked =
((crc >> 15 | crc << 17) + 0xa282ead8) mod 2^32. The length CRC is always checked; the data
CRC in uncompressed files (a GZIP stream carries its own CRC-32, which gzip checks) or when asked.
tf.train.Example (tensorflow/core/example/{example,feature}.proto) is decoded from the
protobuf wire format directly: Example{features=1} Features{map<string,Feature> feature=1}
Feature{bytes_list=1 | float_list=2 | int64_list=3}, each list `repeated value = 1`.
"""
from __future__ import annotations

import argparse
import base64
import gzip
import json
import shutil
import struct
import sys
from pathlib import Path
from typing import Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from any directory
from utils.apps.flags import ArgumentParser  # noqa: E402
from utils.apps.tool import reports_errors, run_tool  # noqa: E402
from utils.scoring.gui import Action, format_action, gui_query  # noqa: E402
from utils.scoring.tasks import DataError  # noqa: E402

# ----- TFRecord + tf.train.Example ---------------------------------------------------------
CRC_MASK_DELTA = 0xA282EAD8


def _crc32c_table() -> list:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1       # Castagnoli, reflected
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + CRC_MASK_DELTA) & 0xFFFFFFFF


def read_tfrecord(path: Path, check_data: Optional[bool] = None) -> Iterator[bytes]:
    """The records of a TFRecord file, GZIP or not (judged by its first bytes)."""
    with open(path, "rb") as f:
        zipped = f.read(2) == b"\x1f\x8b"
    check = (not zipped) if check_data is None else check_data
    with (gzip.open(path, "rb") if zipped else open(path, "rb")) as f:
        n = 0
        while True:
            head = f.read(12)
            if not head:
                return
            if len(head) < 12 or struct.unpack("<I", head[8:])[0] != masked_crc(head[:8]):
                raise DataError(f"{path}: record {n} has a broken header (not a TFRecord file, or cut short)")
            length = struct.unpack("<Q", head[:8])[0]
            data, tail = f.read(length), f.read(4)
            if len(data) < length or len(tail) < 4:
                raise DataError(f"{path}: record {n} is cut short")
            if check and struct.unpack("<I", tail)[0] != masked_crc(data):
                raise DataError(f"{path}: record {n} fails its CRC")
            n += 1
            yield data


def _varint(buf, i: int) -> tuple:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, i
        shift += 7


def _fields(buf) -> Iterator[tuple]:
    """(field number, wire type, value) of a protobuf message: varints as ints, the rest as
    memoryview slices."""
    buf, i = memoryview(buf), 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            v, i = _varint(buf, i)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            v, i = buf[i:i + n], i + n
        elif wire == 2:
            n, i = _varint(buf, i)
            v, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, wire, v


def _feature_values(feature) -> list:
    for kind, _, lst in _fields(feature):
        values = []
        for num, wire, v in _fields(lst):
            if num != 1:
                continue
            if kind == 1:                                    # BytesList
                values.append(bytes(v))
            elif kind == 2:                                  # FloatList: packed or not
                values += struct.unpack(f"<{len(v) // 4}f", v)
            elif kind == 3 and wire == 0:                    # Int64List, unpacked
                values.append(v - (1 << 64) if v >= 1 << 63 else v)
            elif kind == 3:                                  # Int64List, packed
                j = 0
                while j < len(v):
                    x, j = _varint(v, j)
                    values.append(x - (1 << 64) if x >= 1 << 63 else x)
        return values
    return []


def parse_example(data: bytes) -> dict:
    """A serialized tf.train.Example -> {feature name: list of bytes / floats / ints}."""
    out = {}
    for num, _, features in _fields(data):
        if num != 1:
            continue
        for fnum, _, entry in _fields(features):
            if fnum != 1:
                continue
            key, value = "", b""
            for enum, _, v in _fields(entry):
                if enum == 1:
                    key = bytes(v).decode("utf-8")
                elif enum == 2:
                    value = v
            out[key] = _feature_values(value)
    return out


# ----- Android in the Wild -----------------------------------------------------------------
AITW_SUBSETS = {"general": "general", "install": "install", "googleapps": "google_apps",
                "single": "single", "webshopping": "web_shopping"}


def _text(f: dict, name: str) -> str:
    v = f.get(name) or [b""]
    return v[0].decode("utf-8", "replace")


def aitw_step(f: dict) -> dict:
    """One parsed Example -> its step: ids, goal, the recorded action, annotation boxes."""
    pos = f.get("image/ui_annotations_positions", [])
    touch, lift = f.get("results/yx_touch") or [-1.0, -1.0], f.get("results/yx_lift") or [-1.0, -1.0]
    action = Action(int(f["results/action_type"][0]), tuple(touch), tuple(lift), _text(f, "results/type_action"))
    return {"episode_id": _text(f, "episode_id"), "step_id": int(f["step_id"][0]), "goal": _text(f, "goal_info"),
            "action": action,
            "annotations": [tuple(pos[i:i + 4]) for i in range(0, len(pos) - 3, 4)]}


def aitw_image(f: dict, dst: Path) -> Path:
    """Write the raw uint8 pixels (image/height x image/width x image/channels) as a PNG."""
    from PIL import Image
    if not dst.is_file():
        h, w, c = (int(f[k][0]) for k in ("image/height", "image/width", "image/channels"))
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[c]
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.frombytes(mode, (w, h), f["image/encoded"][0]).save(dst)
    return dst


def aitw_split(root: Path, folder: str, split: str) -> Optional[set]:
    """Auto-UI's episode ids for the split, or None when ROOT has no split file."""
    f = root / f"{folder}_texts_splits.json"
    if not f.is_file():
        return None
    ids = json.loads(f.read_text(encoding="utf-8"))
    if split not in ids:
        raise DataError(f"{f}: no {split!r} list (has {', '.join(ids)})")
    return set(map(str, ids[split]))


def aitw_episodes(root: Path, subset: str, split: str = "test") -> dict:
    """{episode_id: [step, ...] in step order} of one subset; each step also has `image`,
    the path of its screenshot (written on the first read)."""
    folder = AITW_SUBSETS[subset]
    base = root / folder
    files = sorted(p for p in base.glob("*") if p.is_file() and not p.name.startswith(".")) if base.is_dir() else []
    if not files:
        raise DataError(f"AITW {subset}: no TFRecord files in {base}")
    keep, episodes = aitw_split(root, folder, split), {}
    for path in files:
        for rec in read_tfrecord(path):
            f = parse_example(rec)
            step = aitw_step(f)
            if keep is not None and step["episode_id"] not in keep:
                continue
            step["image"] = aitw_image(f, root / "aitw_images" / folder / f"{step['episode_id']}_{step['step_id']}.png")
            episodes.setdefault(step["episode_id"], []).append(step)
    for steps in episodes.values():
        steps.sort(key=lambda s: s["step_id"])
    return episodes


# ----- Mind2Web ----------------------------------------------------------------------------
def _loads(v):
    return json.loads(v) if isinstance(v, str) else v


def candidate_boxes(action: dict) -> list:
    """The positive candidates' boxes, x0 y0 x1 y1 pixels, from `bounding_box_rect` "x,y,w,h"
    (absent ones, "-1,-1,-1,-1", skipped)."""
    out = []
    for c in action.get("pos_candidates") or []:
        rect = _loads(_loads(c).get("attributes") or "{}").get("bounding_box_rect", "")
        try:
            x, y, w, h = (float(v) for v in rect.split(","))
        except ValueError:
            continue
        if (x, y, w, h) != (-1, -1, -1, -1):
            out.append((x, y, x + w, y + h))
    return out


def operation_string(operation) -> str:
    """The official target string: `op` + " " + `value`, stripped."""
    op = _loads(operation)
    return f"{op['op']} {op.get('value', '')}".strip()


def _mind2web_json(root: Path, split: str) -> list:
    files = sorted((root / "data" / split).glob("*.json")) or sorted((root / split).glob("*.json"))
    tasks = []
    for f in files:
        try:
            tasks += json.loads(f.read_text(encoding="utf-8"))
        except ValueError as e:
            raise DataError(f"{f}: not valid JSON ({e})") from None
    return tasks


def _screens(root: Path, annotation_id: str) -> dict:
    """{action_uid: base64 screenshot before the action} from the raw dump (or {})."""
    f = root / "raw_dump" / "task" / annotation_id / "processed" / "screenshot.json"
    if not f.is_file():
        return {}
    shots = json.loads(f.read_text(encoding="utf-8"))
    return {s.get("action_uid", i): (s.get("before") or {}).get("screenshot") for i, s in enumerate(shots)}


def _json_steps(root: Path, split: str) -> list:
    out = []
    for task in _mind2web_json(root, split):
        aid, screens = task["annotation_id"], None
        reprs = task.get("action_reprs") or []
        for i, action in enumerate(task["actions"]):
            uid = action["action_uid"]
            img = root / "mind2web_imgs" / f"{aid}-{uid}.jpg"
            if not img.is_file():
                screens = _screens(root, aid) if screens is None else screens
                b64 = screens.get(uid) or screens.get(i)
                if not b64:
                    img = None
                else:
                    img.parent.mkdir(parents=True, exist_ok=True)
                    img.write_bytes(base64.b64decode(b64))
            out.append({"task_id": aid, "task": task["confirmed_task"], "index": i, "total": len(task["actions"]),
                        "action_uid": uid, "operation": operation_string(action["operation"]),
                        "boxes": candidate_boxes(action), "image": img, "previous": reprs[:i],
                        "repr": reprs[i] if i < len(reprs) else ""})
    return out


def _parquet_steps(root: Path, split: str, files: list) -> list:
    import pyarrow.parquet as pq
    cols = ["annotation_id", "action_uid", "confirmed_task", "operation", "pos_candidates", "action_reprs",
            "target_action_index", "screenshot"]
    out = []
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=16, columns=cols):
            for row in batch.to_pylist():
                aid, uid, i = row["annotation_id"], row["action_uid"], int(row["target_action_index"])
                img = root / "mind2web_imgs" / f"{aid}-{uid}.jpg"
                shot = row["screenshot"] or {}
                if not img.is_file() and shot.get("bytes"):
                    img.parent.mkdir(parents=True, exist_ok=True)
                    img.write_bytes(shot["bytes"])
                reprs = row["action_reprs"] or []
                out.append({"task_id": aid, "task": row["confirmed_task"], "index": i, "total": len(reprs),
                            "action_uid": uid, "operation": operation_string(row["operation"]),
                            "boxes": candidate_boxes(row), "image": img if img.is_file() else None,
                            "previous": reprs[:i], "repr": reprs[i] if i < len(reprs) else ""})
    return out


def mind2web_steps(root: Path, split: str) -> list:
    """Every action of the split: task id and text, step index and the task's length, the
    official operation string, the positive boxes, the screenshot path (None when missing),
    the previous action_reprs and its own."""
    parquet = sorted((root / "data").glob(f"{split}-*.parquet")) + sorted(root.glob(f"{split}-*.parquet"))
    if parquet:
        try:
            return _parquet_steps(root, split, parquet)
        except ImportError:
            raise DataError(f"{parquet[0]}: reading parquet needs pyarrow (pip install pyarrow)") from None
    steps = _json_steps(root, split)
    if not steps:
        raise DataError(f"Mind2Web {split}: no tasks in {root}/data/{split}/*.json, {root}/{split}/*.json "
                        f"or {root}/data/{split}-*.parquet")
    return steps


# ----- the finetuning layout ---------------------------------------------------------------
def thousandths(box: tuple, size: tuple) -> list:
    w, h = size
    return [min(1000, max(0, round(v / s * 1000))) for v, s in zip(box, (w, h, w, h))]


def mind2web_answer(step: dict, size: tuple) -> str:
    repr_ = " ".join(step["repr"].split())
    return f"Grounded Operation:{repr_} at the box [[{','.join(map(str, thousandths(step['boxes'][0], size)))}]]"


def write_sample(out: Path, sid: str, image: Path, query: str, answer: str) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image, out / "images" / f"{sid}{image.suffix}")
    label = {"conversations": [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]}
    (out / "labels" / f"{sid}.json").write_text(json.dumps(label, ensure_ascii=False), encoding="utf-8")


def convert_mind2web(root: Path, split: str, out: Path) -> int:
    """Every action with a screenshot and a target box -> one sample. Returns the count."""
    from PIL import Image
    n = 0
    for s in mind2web_steps(root, split):
        if s["image"] is None or not s["boxes"] or not s["repr"]:
            continue
        with Image.open(s["image"]) as im:
            size = im.size
        write_sample(out, f"{s['task_id']}_{s['action_uid']}", s["image"], gui_query(s["task"], s["previous"]),
                     mind2web_answer(s, size))
        n += 1
    return n


def convert_aitw(root: Path, subset: str, split: str, out: Path) -> int:
    n = 0
    for eid, steps in aitw_episodes(root, subset, split).items():
        previous = []
        for s in steps:
            action = format_action(s["action"])
            write_sample(out, f"{eid}_{s['step_id']}", s["image"], gui_query(s["goal"], previous),
                         f"Grounded Operation:{action}")
            previous.append(action)
            n += 1
    return n


@reports_errors(DataError, KeyError)
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--mind2web", type=Path, help="Mind2Web root (data/<split>/ + raw_dump/, or the parquet release)")
    src.add_argument("--aitw", type=Path, help="AITW root (<subset>/ TFRecords, <subset>_texts_splits.json)")
    p.add_argument("--subset", choices=sorted(AITW_SUBSETS), help="AITW subset")
    p.add_argument("--split", default="train", help="Mind2Web: train; AITW: train|val|test of the split file")
    p.add_argument("--out", type=Path, required=True, help="the finetuning folder (images/ + labels/)")
    a = p.parse_args(argv)
    if a.aitw is not None and a.subset is None:
        p.error("--aitw needs --subset")
    n = convert_mind2web(a.mind2web, a.split, a.out) if a.mind2web else convert_aitw(a.aitw, a.subset, a.split, a.out)
    print(f"{n} samples written to {a.out} (images/ + labels/)")
    return 0


if __name__ == "__main__":
    run_tool(main)
