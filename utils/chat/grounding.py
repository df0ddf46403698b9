"""Grounding and agent output: parse boxes, attach them to phrases, draw them; parse
CogAgent's `Plan / Next Action / Grounded Operation` answers.

Boxes are `[[x0,y0,x1,y1]]` in thousandths of the image size (origin top-left), several
for one phrase separated by `;`, and a two-number entry is a point. Malformed entries are
skipped, never raised.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from PIL import Image, ImageDraw, ImageFont

BOX_RE = re.compile(r"\[\[([^\[\]]*)\]\]")
DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "his", "her", "its", "their",
               "my", "your", "our", "one", "two", "three", "four", "five", "some", "each", "every"}
COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
          (70, 240, 240), (240, 50, 230), (128, 128, 0)]


@dataclass
class Grounding:
    phrase: str
    boxes: list                      # (x0, y0, x1, y1) or (x, y), in thousandths
    span: tuple                      # (start, end) of the [[...]] in the text

    def pixel_boxes(self, width: int, height: int) -> list:
        out = []
        for b in self.boxes:
            xs = [round(v / 1000 * width) for v in b[0::2]]
            ys = [round(v / 1000 * height) for v in b[1::2]]
            out.append(tuple(v for pair in zip(xs, ys) for v in pair))
        return out


def _parse_entry(entry: str) -> Optional[tuple]:
    try:
        nums = [int(v) for v in entry.replace(" ", "").split(",")]
    except ValueError:
        return None
    if len(nums) not in (2, 4) or not all(0 <= v <= 1000 for v in nums):
        return None
    if len(nums) == 4 and (nums[2] < nums[0] or nums[3] < nums[1]):
        return None                                    # x1 < x0 or y1 < y0: not a box
    return tuple(nums)


def phrase_before(text: str) -> str:
    """The noun phrase just before a box: spaCy's last noun chunk when spaCy and
    en_core_web_sm are installed; otherwise, within the clause before the box, the words from
    the last determiner on (or the last three words)."""
    segment = re.split(r"[.,;:!?\n]|\]\]", text)[-1].strip()
    if not segment:
        return ""
    nlp = _spacy()
    if nlp is not None:
        chunks = list(nlp(segment).noun_chunks)
        if chunks:
            return chunks[-1].text
    words = segment.split()
    for i in range(len(words) - 1, -1, -1):
        if words[i].lower() in DETERMINERS:
            return " ".join(words[i:])
    return " ".join(words[-3:])


_NLP = None


def _spacy():
    global _NLP
    if _NLP is None:
        try:
            import spacy
            _NLP = spacy.load("en_core_web_sm")
        except Exception:  # noqa: BLE001 - not installed: use the rule-based fallback
            _NLP = False
    return _NLP or None


# `[button] Open -> CLICK at the box [[...]]`: an agent action's box is labelled by its target.
ACTION_RE = re.compile(r"\[([^\[\]]*)\]\s*([^\[\]]*?)\s*->\s*([A-Z_]+)[^\[\]]*?$")


def parse_groundings(text: str) -> list[Grounding]:
    """Every box with its label: the noun phrase before it, or for a CogAgent action
    (`[button] Open -> CLICK at the box [[...]]`) the action's target (`Open`)."""
    out = []
    for m in BOX_RE.finditer(text):
        boxes = [b for b in (_parse_entry(e) for e in m.group(1).split(";")) if b is not None]
        if boxes:
            before = text[: m.start()]
            action = ACTION_RE.search(before[-300:])
            phrase = (action.group(2).strip() or action.group(1).strip()) if action else phrase_before(before)
            out.append(Grounding(phrase, boxes, m.span()))
    return out


def load_font(size: int):
    """Pillow's bundled scalable font; if FreeType cannot be used, Pillow's built-in bitmap
    font. Never needs a system TTF (the original crashed without one)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ValueError, ImportError):
        return ImageFont.load_default_imagefont()


def draw_groundings(image: Image.Image, groundings: list[Grounding]) -> Image.Image:
    """A copy of the image with every box (and point) drawn and labelled with its phrase."""
    img = image.convert("RGB").copy()
    d = ImageDraw.Draw(img)
    W, H = img.size
    width = max(2, round(min(W, H) / 200))
    font = load_font(max(12, round(min(W, H) / 30)))
    for i, g in enumerate(groundings):
        color = COLORS[i % len(COLORS)]
        for b in g.pixel_boxes(W, H):
            if len(b) == 2:
                r = width * 3
                d.ellipse((b[0] - r, b[1] - r, b[0] + r, b[1] + r), outline=color, width=width)
                anchor = (b[0] + r, b[1] - r)
            else:
                d.rectangle(b, outline=color, width=width)
                anchor = (b[0], b[1])
            if g.phrase:
                _label(d, anchor, g.phrase, font, color, W)
    return img


def _label(d: ImageDraw.ImageDraw, anchor: tuple, text: str, font, color, W: int) -> None:
    """The phrase on a filled tag above the anchor (below it at the top edge), moved left
    where it would run off the right edge of the image."""
    left, top, right, bottom = d.textbbox((0, 0), text, font=font)    # offsets from the text origin
    w, h = right - left, bottom - top
    x = max(2, min(anchor[0], W - w - 4))
    y = anchor[1] - h - 4 if anchor[1] - h - 4 >= 0 else anchor[1]
    d.rectangle((x + left - 2, y + top - 2, x + right + 2, y + bottom + 2), fill=color)
    d.text((x, y), text, fill=(255, 255, 255), font=font)


# ----- CogAgent agent answers ------------------------------------------------------------
OPERATIONS = ("CLICK", "DOUBLE_CLICK", "RIGHT_CLICK", "TYPE", "SCROLL_UP", "SCROLL_DOWN",
              "SCROLL_LEFT", "SCROLL_RIGHT", "SCROLL", "SELECT", "HOVER", "PRESS", "LONG_PRESS",
              "SWIPE", "OPEN_APP", "QUOTE_TEXT", "END")


@dataclass
class AgentAction:
    plan: str = ""
    next_action: str = ""
    operation: Optional[str] = None          # CLICK, TYPE, SCROLL_DOWN, ...
    element_type: Optional[str] = None       # the [bracketed] element kind, e.g. button
    target: Optional[str] = None             # the element's name, e.g. Search
    text: Optional[str] = None               # what TYPE types
    boxes: list = field(default_factory=list)


def parse_agent_output(text: str) -> AgentAction:
    """`Plan: ... Next Action: ... Grounded Operation:[combobox] Search -> TYPE: CogVLM at the
    box [[212,498,787,564]]`. Missing parts stay empty; nothing raises."""
    def section(name, until):
        m = re.search(rf"{name}:\s*(.*?)(?=(?:{until}):|$)", text, re.S)
        return m.group(1).strip() if m else ""
    act = AgentAction(plan=section("Plan", "Next Action|Grounded Operation"),
                      next_action=section("Next Action", "Grounded Operation"))
    op = section("Grounded Operation", "$^")
    m = re.match(r"\s*\[([^\]]*)\]\s*(.*?)\s*->\s*([A-Z_]+)\s*(?::\s*(.*?))?\s*(?:at the box.*)?$",
                 BOX_RE.sub("", op).strip(), re.S)
    if m:
        act.element_type, act.target = m.group(1).strip() or None, m.group(2).strip() or None
        act.operation = m.group(3)
        act.text = (m.group(4) or "").strip() or None
    else:
        word = re.search(r"\b(" + "|".join(OPERATIONS) + r")\b", op or act.next_action)
        act.operation = word.group(1) if word else None
    act.boxes = [b for g in parse_groundings(op) for b in g.boxes]
    return act
