"""CogAgent's GUI benchmarks: reading its answers and scoring them by the benchmarks' own rules.

- ScreenSpot (njucckevin/SeeClick, pretrain/screenspot_test.py): the predicted point (or the
  centre of the predicted box) must lie inside the target box, borders included; accuracy per
  platform (mobile / desktop / web) x element type (text / icon), and their unweighted mean.
- Mind2Web (OSU-NLP-Group/Mind2Web, src/action_prediction/metric.py): element accuracy (here
  the point-in-box protocol of SeeClick's agent_tasks/mind2web_test.py: the predicted point
  inside a positive candidate's `bounding_box_rect`), operation F1 = the official
  case-sensitive token-set F1 of "OP value", step success (element right and F1 = 1); steps
  that could not be asked count 0 (the official padding to each task's length); macro
  averages over tasks as the official code computes them, task success = the share of tasks
  with no failed step (the official `error_ratio[0]`).
- Android in the Wild (google-research/google-research, android_in_the_wild/action_matching.py
  and action_type.py): `actions_match` is the official `check_actions_match`, written without
  JAX; accuracy per subset (General, Install, GoogleApps, Single, WebShopping) and their plain
  mean (the AITW README: "evaluate on each dataset separately, and take the average score").
  The official code computes in float32 (JAX); here in float64, which differs only for points
  within ~1e-7 of a threshold.

CogAgent's answers: `Plan: ... Next Action: ... Grounded Operation:[button] Search -> CLICK at
the box [[x0,y0,x1,y1]]` (web), `tap [[x,y]]` (mobile), boxes and points in thousandths of
the screenshot; a box is scored by its centre.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

from .example import Example

GUI_TASKS = ("screenspot", "mind2web", "aitw")
PROTOCOLS = {"screenspot": "SeeClick screenspot_test.py: point in box",
             "mind2web": "Mind2Web metric.py (op F1, macro per task), element by point in box",
             "aitw": "android_in_the_wild action_matching.py"}
TEMPLATE = "chat"                    # CogAgent's agent requests use the chat template
HISTORY_STEPS = 4                    # previous actions shown in the prompt (SeeClick shows 4)


@dataclass
class GuiExample(Example):
    gui: dict = field(default_factory=dict)      # the benchmark's own fields for scoring


def gui_query(task: str, history: list) -> str:
    """`What steps do I need to take to "<task>"?(with grounding)`, then, when there are previous
    actions, `History steps:` with the last HISTORY_STEPS of them numbered from 0."""
    from utils.chat.task_prompts import agent_query        # here: scoring imports no chat code (nor torch)
    query = agent_query(task)
    steps = history[-HISTORY_STEPS:]
    if not steps:
        return query
    return query + "\nHistory steps:\n" + "\n".join(f"{i}. {' '.join(s.split())}" for i, s in enumerate(steps))


def prompt(ex: GuiExample, version: str = "auto") -> tuple:
    return gui_query(ex.question, ex.gui.get("previous", [])), TEMPLATE if version == "auto" else version


# ----- answers -----------------------------------------------------------------------------
GROUP_RE = re.compile(r"\[\[([^\[\]]*)\]\]")
NUMBER_RE = re.compile(r"^-?\d+(?:\.\d+)?$")


def operation_text(answer: str) -> str:
    """The part after `Grounded Operation:` (the whole answer when there is none)."""
    m = re.search(r"Grounded Operation:\s*(.*)", answer, re.S)
    return (m.group(1) if m else answer).strip()


def answer_point(answer: str) -> Optional[tuple]:
    """The first point or box of the operation as an (x, y) fraction of the screen: a
    two-number entry is the point, a four-number one its centre; None when there is none."""
    for m in GROUP_RE.finditer(operation_text(answer)):
        for entry in m.group(1).split(";"):
            parts = [p.strip() for p in entry.split(",")]
            if len(parts) in (2, 4) and all(NUMBER_RE.match(p) for p in parts):
                v = [float(p) for p in parts]      # thousandths; a box's centre is taken before dividing,
                return ((v[0] / 1000, v[1] / 1000) if len(v) == 2     # as SeeClick's screenspot_test.py does
                        else ((v[0] + v[2]) / 2 / 1000, (v[1] + v[3]) / 2 / 1000))
    return None


def inside(point: Optional[tuple], box: tuple) -> bool:
    """box x0 y0 x1 y1, in the point's units; the borders count as inside."""
    return point is not None and box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


# ----- ScreenSpot --------------------------------------------------------------------------
def screenspot_score(ex: GuiExample, answer: str) -> dict:
    return {"hit": float(inside(answer_point(answer), ex.gui["box_norm"]))}


def screenspot_metrics(rows: list, examples: list) -> dict:
    cells = defaultdict(list)
    for r, ex in zip(rows, examples):
        cells[f"{ex.gui['platform']}_{ex.gui['type']}"].append(r["score"]["hit"])
    out = {}
    for platform in ("mobile", "desktop", "web"):
        for kind in ("text", "icon"):
            got = cells.get(f"{platform}_{kind}")
            if got:
                out[f"{platform}_{kind}"] = 100 * sum(got) / len(got)
    out["mean"] = sum(out.values()) / max(1, len(out))       # unweighted over the cells present
    return {**out, "n": len(rows)}


# ----- Mind2Web ----------------------------------------------------------------------------
# The release's `op` folds HOVER and ENTER into CLICK (`original_op` keeps them).
OP_FOLD = {"HOVER": "CLICK", "ENTER": "CLICK", "PRESS_ENTER": "CLICK"}


def token_f1(pred: str, label: str) -> float:
    """The official operation F1: token sets split on whitespace, case-sensitive."""
    p, t = set(pred.strip().split()), set(label.strip().split())
    if not p and not t:
        return 1.0
    if not p or not t:
        return 0.0
    tp = len(p & t)
    if tp == 0:
        return 0.0
    precision, recall = tp / len(p), tp / len(t)
    return 2 * precision * recall / (precision + recall)


# `[button] Search -> TYPE: CogVLM at the box [[...]]`, read as utils/chat/grounding.py's
# parse_agent_output reads it (kept here so that scoring imports no chat code, nor torch)
OPERATION_RE = re.compile(r"->\s*([A-Z_]+)\s*(?::\s*(.*?))?\s*(?:at the box.*)?$", re.S)


def mind2web_operation(answer: str) -> str:
    """CogAgent's operation as the official "OP value" string: `-> TYPE: Brooklyn` ->
    `TYPE Brooklyn`, `-> CLICK` -> `CLICK`; "" when the answer has none."""
    m = OPERATION_RE.search(GROUP_RE.sub("", operation_text(answer)).strip())
    if not m:
        return ""
    return f"{OP_FOLD.get(m.group(1), m.group(1))} {(m.group(2) or '').strip()}".strip()


def mind2web_score(ex: GuiExample, answer: str) -> dict:
    w, h = ex.size
    pt = answer_point(answer)
    px = None if pt is None else (pt[0] * w, pt[1] * h)
    element = float(any(inside(px, b) for b in ex.gui["boxes"]))
    f1 = token_f1(mind2web_operation(answer), ex.gui["operation"])
    return {"element": element, "f1": f1, "step": float(element == 1 and f1 == 1)}


def mind2web_metrics(rows: list, examples: list) -> dict:
    per_task, total = defaultdict(list), {}
    for r, ex in zip(rows, examples):
        per_task[ex.gui["task"]].append(r["score"])
        total[ex.gui["task"]] = ex.gui["total_steps"]
    # Tasks none of whose steps could be asked (no screenshot or no box) count too, all failed.
    for ex in examples[:1]:
        for t, n in ex.gui.get("every_task", {}).items():
            total.setdefault(t, n)
            per_task.setdefault(t, [])
    zero = {"element": 0.0, "f1": 0.0, "step": 0.0}
    for t, n in total.items():                          # steps not asked count as failed
        per_task[t] += [zero] * (n - len(per_task[t]))
    steps = [s for t in per_task.values() for s in t]

    def micro(m):
        return 100 * sum(s[m] for s in steps) / max(1, len(steps))

    def macro(m):
        return 100 * sum(sum(s[m] for s in t) / len(t) for t in per_task.values()) / max(1, len(per_task))
    solved = sum(all(s["step"] == 1 for s in t) for t in per_task.values())
    return {"element_acc": macro("element"), "operation_f1": macro("f1"), "step_success": macro("step"),
            "task_success": 100 * solved / max(1, len(per_task)),
            "element_acc_micro": micro("element"), "operation_f1_micro": micro("f1"),
            "step_success_micro": micro("step"), "tasks": len(per_task), "n": len(rows)}


# ----- Android in the Wild -----------------------------------------------------------------
# android_in_the_wild/action_type.py
TYPE, DUAL_POINT, PRESS_BACK, PRESS_HOME, PRESS_ENTER = 3, 4, 5, 6, 7
STATUS_TASK_COMPLETE, STATUS_TASK_IMPOSSIBLE = 10, 11
# android_in_the_wild/action_matching.py
TAP_DISTANCE_THRESHOLD = 0.14        # fraction of the screen
ANNOTATION_AUGMENT = 1.4             # boxes grow by 1.4x their size (2.4x in all), centred
SWIPE_DISTANCE_THRESHOLD = 0.04      # touch-lift distance up to which a dual point is a tap
# A swipe's two points by the direction the finger moves (as SeeClick's action_matching.py
# places its scrolls), (y, x) fractions; only the axis is compared.
SWIPES = {"up": ((0.8, 0.5), (0.2, 0.5)), "down": ((0.2, 0.5), (0.8, 0.5)),
          "left": ((0.5, 0.8), (0.5, 0.2)), "right": ((0.5, 0.2), (0.5, 0.8))}
NO_POINT = (-1.0, -1.0)


@dataclass
class Action:
    type: int
    touch: tuple = NO_POINT          # (y, x) fractions
    lift: tuple = NO_POINT
    text: str = ""


def is_tap(touch: tuple, lift: tuple) -> bool:
    return math.dist(touch, lift) <= SWIPE_DISTANCE_THRESHOLD


def _enlarged(box: tuple) -> tuple:
    """(y, x, h, w) -> the official resized box: top-left moved out by half the growth and
    clamped at 0, height and width grown by 1.4x and clamped at 1."""
    y, x, h, w = box
    dh, dw = ANNOTATION_AUGMENT * h, ANNOTATION_AUGMENT * w
    return max(0.0, y - dh / 2), max(0.0, x - dw / 2), min(1.0, h + dh), min(1.0, w + dw)


def _in_yxhw(yx: tuple, box: tuple) -> bool:
    top, left, h, w = box
    return top <= yx[0] <= top + h and left <= yx[1] <= left + w


def _main_axis(a: Action) -> int:
    dy, dx = abs(a.lift[0] - a.touch[0]), abs(a.lift[1] - a.touch[1])
    return 0 if dy >= dx else 1                          # argmax: the first on a tie


def actions_match(a: Action, b: Action, annotations: list) -> bool:
    """The official check_actions_match: non-dual-point actions by type; two taps when one
    enlarged annotation box holds both or they are within 0.14 of the screen; two swipes when
    their main axis is the same (direction is not compared); a tap never matches a swipe."""
    if a.type != DUAL_POINT or b.type != DUAL_POINT:
        return a.type == b.type
    tap_a, tap_b = is_tap(a.touch, a.lift), is_tap(b.touch, b.lift)
    if tap_a != tap_b:
        return False
    if tap_a:
        boxes = [_enlarged(tuple(box)) for box in annotations]
        both = any(_in_yxhw(a.touch, box) and _in_yxhw(b.touch, box) for box in boxes)
        return both or math.dist(a.touch, b.touch) <= TAP_DISTANCE_THRESHOLD
    return _main_axis(a) == _main_axis(b)


def format_action(a: Action) -> str:
    """An AITW action in CogAgent's words (finetuning answers, history lines)."""
    if a.type == DUAL_POINT:
        if is_tap(a.touch, a.lift):
            return f"tap [[{round(a.touch[1] * 1000)},{round(a.touch[0] * 1000)}]]"
        dy, dx = a.lift[0] - a.touch[0], a.lift[1] - a.touch[1]
        return "swipe " + (("down" if dy > 0 else "up") if _main_axis(a) == 0 else ("right" if dx > 0 else "left"))
    return {TYPE: f'type "{a.text}"', PRESS_BACK: "press back", PRESS_HOME: "press home",
            PRESS_ENTER: "press enter", STATUS_TASK_COMPLETE: "task complete",
            STATUS_TASK_IMPOSSIBLE: "task impossible"}.get(a.type, f"action {a.type}")


def parse_aitw_answer(answer: str) -> Action:
    """CogAgent's answer -> an AITW action: a tap (`tap [[x,y]]`, or CLICK at a box's centre),
    a swipe / scroll with a direction, TYPE with its text, press back / home / enter, task
    complete (or END) / impossible. Unreadable answers become an action that matches nothing."""
    op = operation_text(answer)
    low = op.lower()
    typed = re.search(r"\btype\b\s*:?\s*\"([^\"]*)\"|->\s*TYPE:\s*(.*?)(?:\s+at the box.*)?$", op, re.S | re.I)
    swipe = re.search(r"\b(?:swipe|scroll)[ _]*(up|down|left|right)\b", low)
    if typed:
        return Action(TYPE, text=(typed.group(1) if typed.group(1) is not None else typed.group(2)).strip())
    if swipe:
        return Action(DUAL_POINT, *SWIPES[swipe.group(1)])
    for words, kind in ((("press back", "press_back"), PRESS_BACK), (("press home", "press_home"), PRESS_HOME),
                        (("press enter", "press_enter"), PRESS_ENTER), (("impossible",), STATUS_TASK_IMPOSSIBLE),
                        (("task complete", "status_task_complete"), STATUS_TASK_COMPLETE)):
        if any(w in low for w in words):
            return Action(kind)
    if re.search(r"\bEND\b", op):                      # CogAgent's own end-of-task operation
        return Action(STATUS_TASK_COMPLETE)
    pt = answer_point(answer)
    if pt is not None:
        return Action(DUAL_POINT, (pt[1], pt[0]), (pt[1], pt[0]))
    return Action(0)                                   # UNUSED_0: matches no recorded action


def aitw_score(ex: GuiExample, answer: str) -> dict:
    g = ex.gui
    truth = Action(g["action_type"], tuple(g["touch"]), tuple(g["lift"]), g["text"])
    pred = parse_aitw_answer(answer)
    match = actions_match(pred, truth, g["annotations"])
    p, t = pred.text.lower().strip(), truth.text.lower().strip()
    # Auto-UI's text_acc (cooelf/Auto-GUI main.py): matched and one typed text inside the other
    return {"match": float(match), "type": float(pred.type == truth.type),
            "text": float(match and (p in t or t in p))}


def aitw_metrics(rows: list, examples: list) -> dict:
    by_subset = defaultdict(list)
    for r, ex in zip(rows, examples):
        by_subset[ex.gui["subset"]].append(r["score"])
    out = {}
    for subset, scores in by_subset.items():
        pre = f"{subset}_" if len(by_subset) > 1 else ""
        out[pre + "action_match"] = 100 * sum(s["match"] for s in scores) / len(scores)
        out[pre + "type_acc"] = 100 * sum(s["type"] for s in scores) / len(scores)
        out[pre + "text_match"] = 100 * sum(s["text"] for s in scores) / len(scores)
    if len(by_subset) > 1:
        out["mean"] = sum(out[f"{s}_action_match"] for s in by_subset) / len(by_subset)
    return {**out, "n": len(rows)}


# ----- the runner's hooks ------------------------------------------------------------------
def example_score(kind: str, ex: GuiExample, answer: str) -> dict:
    return {"screenspot": screenspot_score, "mind2web": mind2web_score, "aitw": aitw_score}[kind](ex, answer)


def task_metrics(kind: str, rows: list, examples: list) -> dict:
    return {"screenspot": screenspot_metrics, "mind2web": mind2web_metrics, "aitw": aitw_metrics}[kind](rows, examples)
