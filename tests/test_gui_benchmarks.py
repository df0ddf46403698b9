"""CogAgent's GUI benchmarks: readers on tiny files written here in the released layouts, and
the metrics on hand-computed cases. Expected values come from the official rules:

- ScreenSpot: njucckevin/SeeClick pretrain/screenspot_test.py (bbox [x, y, w, h] pixels made
  [x0, y0, x1, y1] / image size; hit iff bbox[0] <= x <= bbox[2] and bbox[1] <= y <= bbox[3];
  accuracy per type within each platform). Parquet mirror: rootsautomation/ScreenSpot
  (bbox normalized [x1, y1, x2, y2]).
- Mind2Web: OSU-NLP-Group/Mind2Web src/action_prediction/metric.py (calculate_f1: token sets
  of "OP value" split on whitespace, case-sensitive; step = element right and F1 == 1; missing
  steps padded with 0; macro = mean over tasks of the mean over steps; error_ratio[0] = tasks
  without a failed step).
- AITW: google-research/google-research android_in_the_wild/action_matching.py (taps: both in
  one annotation box grown by 1.4 x its size, or distance <= 0.14; tap vs swipe 0.04; swipes:
  same argmax |delta| axis; non dual-point actions by type) and README.md (feature names);
  TFRecord framing: tensorflow/core/lib/io/record_writer.cc; CRC-32C check value of
  "123456789" = 0xE3069283 (RFC 3720 / the CRC catalogue); tf.train.Example field numbers:
  tensorflow/core/example/{example,feature}.proto.
"""
from __future__ import annotations

import base64
import gzip
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from evaluation.gui import read_aitw, read_gui_task, read_mind2web, read_screenspot
from utils.data.gui_finetune import (convert_aitw, convert_mind2web, crc32c, masked_crc, parse_example,
                                     read_tfrecord)
from utils.scoring import gui
from utils.scoring.gui import (DUAL_POINT, PRESS_BACK, PRESS_HOME, TYPE, Action, actions_match, token_f1)
from utils.scoring.tasks import DataError


def _png(path, size=(200, 100), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _rows(examples, answers):
    return [{"id": ex.id, "answer": a, "score": gui.example_score(gui_kind(ex), ex, a)}
            for ex, a in zip(examples, answers)]


def gui_kind(ex):
    return "aitw" if "subset" in ex.gui else "mind2web" if "total_steps" in ex.gui else "screenspot"


# ----- AITW action matching --------------------------------------------------------------------
def tap(y, x):
    return Action(DUAL_POINT, (y, x), (y, x))


def test_tap_distance_13_vs_15_percent():
    truth = tap(0.5, 0.5)
    assert actions_match(tap(0.5, 0.63), truth, [])          # 0.13 of the screen <= 0.14
    assert not actions_match(tap(0.5, 0.65), truth, [])      # 0.15 > 0.14
    assert not actions_match(tap(0.6, 0.6), truth, [])       # sqrt(0.02) = 0.1414 > 0.14
    assert actions_match(tap(0.5, 0.5), Action(DUAL_POINT, (0.5, 0.5), (0.5, 0.53)), [])  # 0.03 apart: a tap


def test_tap_inside_enlarged_box_only():
    # box y=0.4 x=0.4 h=0.1 w=0.1 -> grown: top = 0.4 - 1.4*0.1/2 = 0.33, height 0.1 + 0.14 = 0.24
    # -> rows 0.33..0.57, columns 0.33..0.57 (edges included)
    box = [(0.4, 0.4, 0.1, 0.1)]
    truth, pred = tap(0.45, 0.45), tap(0.56, 0.56)           # pred outside the original (> 0.5)
    assert not actions_match(pred, truth, [])                # 0.1556 apart: too far without a box
    assert actions_match(pred, truth, box)                   # both inside the grown box
    assert not actions_match(tap(0.58, 0.58), truth, box)    # outside 0.57, and 0.184 apart


def test_swipes_compare_axis_only():
    up = Action(DUAL_POINT, (0.8, 0.5), (0.2, 0.5))          # main axis y
    down = Action(DUAL_POINT, (0.2, 0.5), (0.8, 0.5))
    left = Action(DUAL_POINT, (0.5, 0.8), (0.5, 0.2))        # main axis x
    assert not actions_match(left, up, [])                   # the other axis
    assert actions_match(down, up, [])                       # opposite direction, same axis: a match
    assert not actions_match(tap(0.5, 0.5), up, [])          # a tap never matches a swipe


def test_other_actions_by_type():
    assert actions_match(Action(TYPE, text="hello"), Action(TYPE, text="bye"), [])   # type only
    assert not actions_match(Action(PRESS_BACK), Action(PRESS_HOME), [])
    assert not actions_match(Action(PRESS_BACK), tap(0.5, 0.5), [])


def test_cogagent_mobile_answers():
    a = gui.parse_aitw_answer("Plan: open it. Next Action: tap. Grounded Operation:tap [[250,800]]")
    assert (a.type, a.touch, a.lift) == (DUAL_POINT, (0.8, 0.25), (0.8, 0.25))       # (y, x)
    b = gui.parse_aitw_answer("Grounded Operation:[button] Settings -> CLICK at the box [[100,200,300,400]]")
    assert b.touch == pytest.approx((0.3, 0.2))                                        # the centre
    assert gui.parse_aitw_answer('Grounded Operation:type "coffee maker"').text == "coffee maker"
    assert gui.parse_aitw_answer("Grounded Operation:[textbox] q -> TYPE: lowes at the box [[1,2,3,4]]").text == "lowes"
    assert gui.parse_aitw_answer("Grounded Operation:swipe up").type == DUAL_POINT
    assert gui.parse_aitw_answer("Grounded Operation:press home").type == PRESS_HOME
    assert gui.parse_aitw_answer("no idea").type == 0


# ----- Mind2Web operation F1 -------------------------------------------------------------------
def test_operation_f1_partial_tokens():
    # {TYPE, New, York} vs {TYPE, New, York, City}: tp 3, precision 1, recall 3/4 -> 2*(3/4)/(7/4) = 6/7
    assert token_f1("TYPE New York", "TYPE New York City") == pytest.approx(6 / 7)
    # case-sensitive: only TYPE is shared -> precision = recall = 1/3 -> F1 1/3
    assert token_f1("TYPE new york", "TYPE New York") == pytest.approx(1 / 3)
    assert token_f1("CLICK", "CLICK") == 1.0 and token_f1("", "") == 1.0 and token_f1("", "CLICK") == 0.0
    assert gui.mind2web_operation("Grounded Operation:[combobox] From -> TYPE: New York at the box [[1,2,3,4]]") \
        == "TYPE New York"
    assert gui.mind2web_operation("Grounded Operation:[link] Deals -> HOVER at the box [[1,2,3,4]]") == "CLICK"


# ----- ScreenSpot ------------------------------------------------------------------------------
SCREENSPOT = [{"img_filename": "m.png", "instruction": "open settings", "bbox": [50, 20, 40, 30],
               "data_type": "text", "data_source": "ios"},
              {"img_filename": "m.png", "instruction": "back arrow", "bbox": [0, 0, 20, 20],
               "data_type": "icon", "data_source": "android"}]


def test_screenspot_json_and_parquet_same_box(tmp_path):
    # 200 x 100 image; [x, y, w, h] = [50, 20, 40, 30] -> [50, 20, 90, 50] -> / size = [.25, .2, .45, .5]
    json_root = tmp_path / "json"
    _png(json_root / "screenspot_imgs" / "m.png")
    (json_root / "screenspot_mobile.json").write_text(json.dumps(SCREENSPOT))
    a = read_screenspot(json_root, "mobile")
    assert a[0].gui["box_norm"] == pytest.approx((0.25, 0.2, 0.45, 0.5)) and a[0].box == (50, 20, 90, 50)
    assert a[0].gui["platform"] == "mobile" and a[1].gui["type"] == "icon"

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq_root = tmp_path / "pq"
    (pq_root / "data").mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (200, 100)).save(buf, format="PNG")
    table = pa.table({"file_name": ["m.png"], "bbox": [[0.25, 0.2, 0.45, 0.5]], "instruction": ["open settings"],
                      "data_type": ["text"], "data_source": ["ios"],
                      "image": [{"bytes": buf.getvalue(), "path": "m.png"}]})
    pq.write_table(table, pq_root / "data" / "test-00000-of-00001.parquet")
    b = read_screenspot(pq_root, "all")
    assert len(b) == 1 and b[0].gui["platform"] == "mobile"
    assert b[0].gui["box_norm"] == pytest.approx(a[0].gui["box_norm"]) and b[0].box == pytest.approx(a[0].box)
    for ex in (a[0], b[0]):
        assert gui.screenspot_score(ex, "Grounded Operation:tap [[450,500]]")["hit"] == 1.0   # corner: inside
        assert gui.screenspot_score(ex, "[[250,200,450,500]]")["hit"] == 1.0   # centre (.35, .35)
        assert gui.screenspot_score(ex, "tap [[460,300]]")["hit"] == 0.0      # x .46 > .45


def test_screenspot_cells_and_mean(tmp_path):
    _png(tmp_path / "screenspot_imgs" / "m.png")
    (tmp_path / "screenspot_mobile.json").write_text(json.dumps(SCREENSPOT))
    (tmp_path / "screenspot_desktop.json").write_text(json.dumps(SCREENSPOT[:1]))
    (tmp_path / "screenspot_web.json").write_text(json.dumps(SCREENSPOT[1:]))
    ex = read_gui_task(tmp_path, "screenspot:all")
    rows = _rows(ex, ["tap [[350,350]]", "tap [[900,900]]", "tap [[10,10]]", "tap [[50,100]]"])
    m = gui.task_metrics("screenspot", rows, ex)
    # mobile text hit, mobile icon miss, desktop text miss ((.01,.01) outside), web icon hit ((.05,.1) in [0,0,.1,.2])
    assert m == {"mobile_text": 100.0, "mobile_icon": 0.0, "desktop_text": 0.0, "web_icon": 100.0,
                 "mean": 50.0, "n": 4}
    q, template = gui.prompt(ex[0])
    assert q == 'What steps do I need to take to "open settings"?(with grounding)' and template == "chat"


# ----- Mind2Web reader + metrics -----------------------------------------------------------------
def _cand(rect):
    return {"tag": "button", "backend_node_id": "1", "attributes": json.dumps({"bounding_box_rect": rect})}


def _jpeg_b64(size=(400, 200)):
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 10)).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def _mind2web(root, split="test_task"):
    tasks = [{"annotation_id": "t1", "confirmed_task": "Find flights to New York City", "website": "united",
              "action_reprs": ["[button]  Flights -> CLICK", "[textbox]  To -> TYPE: New York City",
                               "[button]  Search -> CLICK"],
              "actions": [{"action_uid": "a0", "operation": {"op": "CLICK", "original_op": "CLICK", "value": ""},
                           "pos_candidates": [_cand("100,40,80,20")], "neg_candidates": []},
                          {"action_uid": "a1", "operation": {"op": "TYPE", "original_op": "TYPE", "value": "New York City"},
                           "pos_candidates": [_cand("200,100,100,40")], "neg_candidates": []},
                          {"action_uid": "a2", "operation": {"op": "CLICK", "original_op": "CLICK", "value": ""},
                           "pos_candidates": [_cand("0,0,10,10")], "neg_candidates": []}]},
             {"annotation_id": "t2", "confirmed_task": "Open deals", "website": "united",
              "action_reprs": ["[link]  Deals -> CLICK"],
              "actions": [{"action_uid": "b0", "operation": {"op": "CLICK", "original_op": "HOVER", "value": ""},
                           "pos_candidates": [_cand("-1,-1,-1,-1"), _cand("0,100,400,100")], "neg_candidates": []}]}]
    (root / "data" / split).mkdir(parents=True)
    (root / "data" / split / f"{split}_0.json").write_text(json.dumps(tasks))
    for aid, uids in (("t1", ["a0", "a1"]), ("t2", ["b0"])):       # a2's screenshot is missing
        d = root / "raw_dump" / "task" / aid / "processed"
        d.mkdir(parents=True)
        (d / "screenshot.json").write_text(json.dumps(
            [{"action_uid": u, "before": {"screenshot": _jpeg_b64()}, "after": {"screenshot": ""}} for u in uids]))


def test_mind2web_reader_and_metrics(tmp_path):
    _mind2web(tmp_path)
    ex = read_mind2web(tmp_path, "test_task")
    assert [e.id for e in ex] == ["t1_a0", "t1_a1", "t2_b0"] and ex[0].size == (400, 200)
    assert ex[1].gui["operation"] == "TYPE New York City" and ex[1].gui["boxes"] == [(200, 100, 300, 140)]
    assert ex[2].gui["boxes"] == [(0, 100, 400, 200)]           # the -1 box is skipped
    q, _ = gui.prompt(ex[1])
    assert q == ('What steps do I need to take to "Find flights to New York City"?(with grounding)\n'
                 'History steps:\n0. [button] Flights -> CLICK')
    answers = ["Grounded Operation:[button] Flights -> CLICK at the box [[250,200,450,300]]",   # centre (140, 50): in
               "Grounded Operation:[textbox] To -> TYPE: New York at the box [[500,500,750,700]]",  # (250,120): in, F1 6/7
               "Grounded Operation:[link] Deals -> CLICK at the box [[0,600,100,800]]"]          # (20,140): in
    m = gui.task_metrics("mind2web", _rows(ex, answers), ex)
    # t1: element (1, 1, 0 padded) -> 2/3; F1 (1, 6/7, 0); step (1, 0, 0) -> 1/3; t2: all 1
    assert m["element_acc"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert m["operation_f1"] == pytest.approx(100 * ((1 + 6 / 7) / 3 + 1) / 2)
    assert m["step_success"] == pytest.approx(100 * (1 / 3 + 1) / 2)
    assert m["task_success"] == 50.0 and m["tasks"] == 2 and m["n"] == 3
    assert m["step_success_micro"] == pytest.approx(100 * 2 / 4)


def test_mind2web_parquet_release(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    (tmp_path / "data").mkdir()
    shot = base64.b64decode(_jpeg_b64())
    table = pa.table({"annotation_id": ["t2"], "action_uid": ["b0"], "confirmed_task": ["Open deals"],
                      "operation": [json.dumps({"original_op": "HOVER", "value": "", "op": "CLICK"})],
                      "pos_candidates": [[json.dumps(_cand("0,100,400,100"))]],
                      "action_reprs": [["[link]  Deals -> CLICK"]], "target_action_index": ["0"],
                      "screenshot": [{"bytes": shot, "path": None}]})
    pq.write_table(table, tmp_path / "data" / "test_website-00000-of-00001.parquet")
    ex = read_gui_task(tmp_path, "mind2web:test_website")
    assert len(ex) == 1 and ex[0].gui["operation"] == "CLICK" and ex[0].gui["boxes"] == [(0, 100, 400, 200)]
    assert ex[0].size == (400, 200)


# ----- TFRecord + AITW ---------------------------------------------------------------------------
def _varint(n):
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def _ld(num, payload):                     # a length-delimited field (wire type 2)
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _example(features: dict) -> bytes:
    """tf.train.Example by hand: Example{1: Features{1: entry{1: key, 2: Feature}}};
    Feature{1: BytesList, 2: FloatList (packed float32), 3: Int64List (packed varints)}."""
    entries = b""
    for key, v in features.items():
        if isinstance(v[0], bytes):
            feat = _ld(1, b"".join(_ld(1, x) for x in v))
        elif isinstance(v[0], float):
            feat = _ld(2, _ld(1, struct.pack(f"<{len(v)}f", *v)))
        else:
            feat = _ld(3, _ld(1, b"".join(_varint(x & (2 ** 64 - 1)) for x in v)))
        entries += _ld(1, _ld(1, key.encode()) + _ld(2, feat))
    return _ld(1, entries)


def _record(data: bytes) -> bytes:
    n = struct.pack("<Q", len(data))
    return n + struct.pack("<I", masked_crc(n)) + data + struct.pack("<I", masked_crc(data))


def test_crc32c_check_value_and_hand_record(tmp_path):
    assert crc32c(b"123456789") == 0xE3069283
    # masked = ((crc >> 15) | (crc << 17)) + 0xa282ead8 mod 2^32, written out for the check value
    crc = 0xE3069283
    assert masked_crc(b"123456789") == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
    # one record "123456789" framed by hand: length 9 as uint64 LE, masked CRC of those 8 bytes,
    # the data, masked CRC of the data
    length = bytes([9, 0, 0, 0, 0, 0, 0, 0])
    rec = length + struct.pack("<I", masked_crc(length)) + b"123456789" + struct.pack("<I", masked_crc(b"123456789"))
    (tmp_path / "one.tfrecord").write_bytes(rec)
    assert list(read_tfrecord(tmp_path / "one.tfrecord")) == [b"123456789"]
    (tmp_path / "bad.tfrecord").write_bytes(rec[:-1] + bytes([rec[-1] ^ 1]))
    with pytest.raises(DataError, match="CRC"):
        list(read_tfrecord(tmp_path / "bad.tfrecord"))
    (tmp_path / "cut.tfrecord").write_bytes(rec[:15])
    with pytest.raises(DataError, match="cut short"):
        list(read_tfrecord(tmp_path / "cut.tfrecord"))


def test_parse_example_matches_protobuf():
    data = _example({"a": [b"x", b"yz"], "f": [0.5, -2.0], "i": [3, -1, 300]})
    assert parse_example(data) == {"a": [b"x", b"yz"], "f": [0.5, -2.0], "i": [3, -1, 300]}
    pb = pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    assert pb
    # the same messages declared from feature.proto / example.proto's field numbers
    fd = descriptor_pb2.FileDescriptorProto(name="ex_test.proto", package="t", syntax="proto3")
    F = descriptor_pb2.FieldDescriptorProto

    def msg(name, fields):
        m = fd.message_type.add(name=name)
        for fname, num, ftype, label, tname in fields:
            f = m.field.add(name=fname, number=num, type=ftype, label=label)
            if tname:
                f.type_name = tname
        return m
    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    msg("BytesList", [("value", 1, F.TYPE_BYTES, rep, None)])
    msg("FloatList", [("value", 1, F.TYPE_FLOAT, rep, None)])
    msg("Int64List", [("value", 1, F.TYPE_INT64, rep, None)])
    feat = msg("Feature", [("bytes_list", 1, F.TYPE_MESSAGE, opt, ".t.BytesList"),
                           ("float_list", 2, F.TYPE_MESSAGE, opt, ".t.FloatList"),
                           ("int64_list", 3, F.TYPE_MESSAGE, opt, ".t.Int64List")])
    feat.oneof_decl.add(name="kind")
    for f in feat.field:
        f.oneof_index = 0
    fs = msg("Features", [("feature", 1, F.TYPE_MESSAGE, rep, ".t.Features.FeatureEntry")])
    entry = fs.nested_type.add(name="FeatureEntry")
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt, type_name=".t.Feature")
    entry.options.map_entry = True
    msg("Example", [("features", 1, F.TYPE_MESSAGE, opt, ".t.Features")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    Example = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Example"))
    ex = Example()
    ex.features.feature["a"].bytes_list.value.extend([b"x", b"yz"])
    ex.features.feature["f"].float_list.value.extend([0.5, -2.0])
    ex.features.feature["i"].int64_list.value.extend([3, -1, 300])
    assert parse_example(ex.SerializeToString()) == {"a": [b"x", b"yz"], "f": [0.5, -2.0], "i": [3, -1, 300]}
    assert Example.FromString(data) == ex                    # our hand encoding is what protobuf reads


def _aitw_step(episode, step, action_type, touch, lift, text="", goal="search for coffee"):
    pixels = bytes([10, 20, 30]) * (4 * 2)                   # 2 rows x 4 columns, RGB
    return _example({"episode_id": [episode.encode()], "step_id": [step], "episode_length": [2],
                     "goal_info": [goal.encode()], "image/encoded": [pixels], "image/height": [2],
                     "image/width": [4], "image/channels": [3],
                     "image/ui_annotations_positions": [0.4, 0.4, 0.1, 0.1],
                     "image/ui_annotations_text": [b"Search"], "image/ui_annotations_ui_types": [b"TEXT"],
                     "results/action_type": [action_type], "results/yx_touch": touch, "results/yx_lift": lift,
                     "results/type_action": [text.encode()]})


def _aitw(root):
    (root / "general").mkdir(parents=True)
    recs = [_aitw_step("e1", 0, DUAL_POINT, [0.45, 0.45], [0.45, 0.45]),
            _aitw_step("e1", 1, TYPE, [-1.0, -1.0], [-1.0, -1.0], "Coffee"),
            _aitw_step("e2", 0, DUAL_POINT, [0.8, 0.5], [0.2, 0.5])]
    with gzip.open(root / "general" / "general-000-of-001", "wb") as f:
        f.write(b"".join(_record(r) for r in recs))
    (root / "general_texts_splits.json").write_text(json.dumps({"train": ["e2"], "val": [], "test": ["e1"]}))


def test_aitw_reader_and_metrics(tmp_path):
    _aitw(tmp_path)
    ex = read_aitw(tmp_path, "general")                       # the test episode only
    assert [e.id for e in ex] == ["general/e1_0", "general/e1_1"]
    assert ex[0].gui["annotations"] == [pytest.approx((0.4, 0.4, 0.1, 0.1))]
    assert ex[1].gui["action_type"] == TYPE and ex[1].gui["text"] == "Coffee"
    with Image.open(ex[0].image) as im:
        assert im.size == (4, 2) and im.getpixel((3, 1)) == (10, 20, 30)
    assert gui.prompt(ex[1])[0].endswith('History steps:\n0. tap [[450,450]]')
    rows = _rows(ex, ["Grounded Operation:tap [[560,560]]",    # in the grown box with (0.45, 0.45)
                      'Grounded Operation:type "coffee maker"'])
    m = gui.task_metrics("aitw", rows, ex)
    # both match; texts: "coffee" inside "coffee maker" (Auto-UI's text_acc, lower-cased) -> 100
    assert m == {"action_match": 100.0, "type_acc": 100.0, "text_match": 100.0, "n": 2}
    rows[1] = _rows(ex[1:], ["Grounded Operation:press back"])[0]
    assert gui.task_metrics("aitw", rows, ex)["action_match"] == 50.0


def test_gui_finetune_layout(tmp_path):
    from utils.chat.grounding import parse_agent_output
    from utils.training.dataset import scan_conversations
    _mind2web(tmp_path / "m2w", split="train")
    out = tmp_path / "ft"
    assert convert_mind2web(tmp_path / "m2w", "train", out) == 3          # a2 has no screenshot
    _aitw(tmp_path / "aitw")
    assert convert_aitw(tmp_path / "aitw", "general", "train", out) == 1
    samples, skipped = scan_conversations(out)
    assert not skipped and len(samples) == 4
    by_id = {s.image.stem: s for s in samples}
    (q, a), = by_id["t1_a1"].turns
    assert q == gui.gui_query("Find flights to New York City", ["[button]  Flights -> CLICK"])
    act = parse_agent_output(a)                       # box [200,100,300,140] on 400 x 200 -> thousandths
    assert (act.operation, act.text, act.boxes) == ("TYPE", "New York City", [(500, 500, 750, 700)])
    assert by_id["e2_0"].turns[0][1] == "Grounded Operation:swipe up"


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(DataError, match="screenspot_mobile.json"):
        read_screenspot(tmp_path, "mobile")
    with pytest.raises(DataError, match="must be"):
        read_screenspot(tmp_path, "tablet")
    with pytest.raises(DataError, match="no TFRecord files"):
        read_aitw(tmp_path, "install")
    with pytest.raises(DataError, match="Mind2Web test_domain"):
        read_mind2web(tmp_path, "test_domain")


def test_operation_parse_agrees_with_parse_agent_output():
    from utils.chat.grounding import parse_agent_output
    for answer in ["Plan: a. Next Action: b. Grounded Operation:[combobox] Search -> TYPE: CogVLM at the box [[1,2,3,4]]",
                   "Grounded Operation:[button] Go -> CLICK at the box [[10,20,30,40]]",
                   "Grounded Operation:[select] Size -> SELECT: Large at the box [[10,20,30,40]]"]:
        act = parse_agent_output(answer)
        assert gui.mind2web_operation(answer) == f"{act.operation} {act.text or ''}".strip()


def test_scoring_imports_no_torch():
    import subprocess
    import sys
    code = ("import sys, evaluation.gui, utils.scoring.gui as g; "
            "g.mind2web_operation('Grounded Operation:[a] b -> CLICK at the box [[1,2,3,4]]'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_screenspot_box_centre_is_taken_before_dividing(tmp_path):
    """SeeClick pretrain/screenspot_test.py takes a box answer's centre as (x0 + x2) / 2 / 1000:
    here exactly the target's bottom edge 0.951 (borders count), a hit; dividing each corner by
    1000 first gives 0.9510000000000001, a miss."""
    _png(tmp_path / "screenspot_imgs" / "big.png", size=(2000, 1000))
    (tmp_path / "screenspot_mobile.json").write_text(json.dumps([
        {"img_filename": "big.png", "bbox": [138, 633, 103, 318], "instruction": "open it",
         "data_type": "text", "data_source": "ios"}]))
    ex = read_screenspot(tmp_path, "mobile")
    assert gui.screenspot_score(ex[0], "tap [[84,927,156,975]]") == {"hit": 1.0}


def test_mind2web_task_with_no_askable_step_still_counts(tmp_path):
    """OSU-NLP-Group/Mind2Web src/action_prediction/metric.py (evaluate_dataset) scores a step
    that cannot be asked as failed and keeps its task in the per-task averages: a task none of
    whose steps has a screenshot counts as an unsolved task."""
    _mind2web(tmp_path)
    extra = [{"annotation_id": "t3", "confirmed_task": "Check bags", "website": "united",
              "action_reprs": ["[link]  Bags -> CLICK"],
              "actions": [{"action_uid": "c0", "operation": {"op": "CLICK", "original_op": "CLICK", "value": ""},
                           "pos_candidates": [_cand("0,0,50,50")], "neg_candidates": []}]}]
    (tmp_path / "data" / "test_task" / "test_task_1.json").write_text(json.dumps(extra))
    d = tmp_path / "raw_dump" / "task" / "t3" / "processed"
    d.mkdir(parents=True)
    (d / "screenshot.json").write_text("[]")                   # no screenshot for its one step
    ex = read_mind2web(tmp_path, "test_task")
    assert [e.id for e in ex] == ["t1_a0", "t1_a1", "t2_b0"]
    answers = ["Grounded Operation:[button] Flights -> CLICK at the box [[250,200,450,300]]",
               "Grounded Operation:[textbox] To -> TYPE: New York at the box [[500,500,750,700]]",
               "Grounded Operation:[link] Deals -> CLICK at the box [[0,600,100,800]]"]
    m = gui.task_metrics("mind2web", _rows(ex, answers), ex)
    assert m["tasks"] == 3 and m["task_success"] == pytest.approx(100 / 3)
    assert m["element_acc"] == pytest.approx(100 * (2 / 3 + 1 + 0) / 3)
    assert m["step_success_micro"] == pytest.approx(100 * 2 / 5)


def test_gui_finetuning_data_trains_and_is_scored(cogagent_ckpt, tmp_path):
    """The converted Mind2Web training split finetunes a CogAgent with the finetuning script
    (LoRA, CogAgent's `chat` template as its GUI prompts use) and the runner scores the result."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LOGLEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
    _mind2web(tmp_path / "m2w-train", split="train")
    _mind2web(tmp_path / "m2w", split="test_task")
    assert convert_mind2web(tmp_path / "m2w-train", "train", tmp_path / "ft") == 3
    save = tmp_path / "lora"
    ft = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                         "--nproc-per-node=1", str(root / "finetune_demo" / "finetune_cogagent_demo.py"),
                         "--from_pretrained", str(cogagent_ckpt), "--version", "chat",
                         "--train_data", str(tmp_path / "ft"), "--save", str(save), "--train_iters", "2",
                         "--batch_size", "1", "--save_interval", "2", "--log_interval", "1", "--lora_rank", "4"],
                        capture_output=True, text=True, timeout=300, cwd="/", env=env)
    assert ft.returncode == 0, ft.stdout[-2000:] + ft.stderr[-3000:]
    out = tmp_path / "eval"
    ev = subprocess.run([sys.executable, str(root / "evaluation" / "evaluate.py"), "--from_pretrained", str(save),
                         "--task", "mind2web:test_task", "--data", str(tmp_path / "m2w"), "--output_dir", str(out),
                         "--max_new_tokens", "8", "--batch_size", "3"],
                        capture_output=True, text=True, timeout=300, cwd="/", env=env)
    assert ev.returncode == 0, ev.stdout[-2000:] + ev.stderr[-3000:]
    m = json.loads((out / "results.json").read_text())["mind2web:test_task"]
    assert m["tasks"] == 2 and m["n"] == 3 and 0 <= m["step_success"] <= 100
