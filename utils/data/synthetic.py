"""Synthetic training data for the bundled demo models (seeded, PIL only).

Three kinds of images, each with several independent questions:
- scenes of 1-4 shapes (circle, square, triangle, diamond; 8 colours; varied sizes, positions
  and backgrounds): captions, colour / shape / count / presence questions, referring
  expressions to boxes, grounded captions (a box after each object), box to caption;
- rendered text (4-6 characters, captcha-like noise): "What does the text say?";
- GUI-like screenshots (a window with labelled buttons, text fields, checkboxes, links) with
  CogAgent agent tasks answered in the agent format (Plan / Next Action / Grounded Operation).

Output: the conversation layout the finetuning reads (`images/<id>.png`, `labels/<id>.json`),
with the questions of an image under "qa" (independent single-turn pairs).
Boxes are in thousandths of the image size, three digits each, as the released models write them.

  python utils/data/synthetic.py --out data/synthetic --n 5000 --seed 0 [--gui]
"""
from __future__ import annotations

import argparse
import json
import random
import string
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from any directory
from utils.apps.flags import ArgumentParser  # noqa: E402
from utils.apps.tool import reports_errors, run_tool  # noqa: E402

SIZE = 224
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40),
           "purple": (140, 60, 190), "orange": (245, 140, 30), "black": (25, 25, 25), "white": (250, 250, 250)}
SHAPES = ("circle", "square", "triangle", "diamond")
NUMBERS = ("zero", "one", "two", "three", "four")


def box_text(box) -> str:
    return "[[" + ",".join(f"{min(999, max(0, round(v))):03d}" for v in box) + "]]"


def to_thousandths(box, w, h):
    x0, y0, x1, y1 = box
    return (x0 / w * 1000, y0 / h * 1000, x1 / w * 1000, y1 / h * 1000)


@dataclass
class Shape:
    kind: str
    colour: str
    box: tuple          # pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def a_name(self) -> str:
        return ("an " if self.colour[0] in "aeiou" else "a ") + self.name


def _background(rng: random.Random, avoid: set) -> tuple:
    while True:
        c = tuple(rng.randint(0, 255) for _ in range(3))
        # far enough from every shape colour used, so that shapes stay visible
        if all(sum(abs(a - b) for a, b in zip(c, COLOURS[k])) > 160 for k in avoid):
            return c


def draw_shape(d: ImageDraw.ImageDraw, s: Shape) -> None:
    x0, y0, x1, y1 = s.box
    fill = COLOURS[s.colour]
    if s.kind == "circle":
        d.ellipse(s.box, fill=fill)
    elif s.kind == "square":
        d.rectangle(s.box, fill=fill)
    elif s.kind == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        d.polygon([((x0 + x1) / 2, y0), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1), (x0, (y0 + y1) / 2)], fill=fill)


def make_scene(rng: random.Random) -> tuple[Image.Image, list[Shape]]:
    n = rng.randint(1, 4)
    shapes: list[Shape] = []
    used = set()
    tries = 0
    while len(shapes) < n and tries < 200:
        tries += 1
        kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if (kind, colour) in used:
            continue
        side = rng.randint(SIZE // 6, SIZE // 3)
        x0, y0 = rng.randint(4, SIZE - side - 4), rng.randint(4, SIZE - side - 4)
        box = (x0, y0, x0 + side, y0 + side)
        if any(not (box[2] + 6 < o.box[0] or o.box[2] + 6 < box[0] or box[3] + 6 < o.box[1] or o.box[3] + 6 < box[1])
               for o in shapes):
            continue
        used.add((kind, colour))
        shapes.append(Shape(kind, colour, box))
    img = Image.new("RGB", (SIZE, SIZE), _background(rng, {s.colour for s in shapes}))
    d = ImageDraw.Draw(img)
    for s in shapes:
        draw_shape(d, s)
    return img, shapes


def _list(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _presence_probe(rng: random.Random, s: Shape) -> Shape:
    """The object asked about: `s` itself, a hard negative (its colour on another shape or its
    shape in another colour), or a random pair."""
    r = rng.random()
    if r < 0.4:
        return s
    if r < 0.7:
        return (Shape(rng.choice([k for k in SHAPES if k != s.kind]), s.colour, (0, 0, 0, 0)) if rng.random() < 0.5
                else Shape(s.kind, rng.choice([c for c in COLOURS if c != s.colour]), (0, 0, 0, 0)))
    return Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), (0, 0, 0, 0))


def _extra_presence(rng: random.Random, shapes: list[Shape], n: int) -> list[tuple[str, str]]:
    """n more presence questions: half objects of the scene, half hard negatives."""
    qa, names = [], {o.name for o in shapes}
    for o in rng.sample(shapes, min(n // 2, len(shapes))):
        qa.append((f"Is there {o.a_name}?", "yes"))
    negatives = n - n // 2
    # pairs of swaps (colour, kind) in a fixed order, an odd one chosen at random
    swaps = ["colour", "kind"] * (negatives // 2) + ([rng.choice(["colour", "kind"])] if negatives % 2 else [])
    for swap in swaps:
        o = rng.choice(shapes)
        fakes = ([Shape(o.kind, c, o.box) for c in COLOURS] if swap == "colour"
                 else [Shape(k, o.colour, o.box) for k in SHAPES])
        fakes = [f for f in fakes if f.name not in names]      # (o itself is in names)
        if fakes:                   # (none when all four shapes share o's colour)
            qa.append((f"Is there {rng.choice(fakes).a_name}?", "no"))
    return qa


def scene_questions(rng: random.Random, shapes: list[Shape], extra_presence: int = 0) -> list[tuple[str, str]]:
    """Every kind of question about one scene (a few of each, chosen at random).
    extra_presence (training): that many more presence questions, half of them objects of the
    scene and half hard negatives (an object with its colour or its shape changed), so that
    about half the presence answers are "yes" and the model has to bind colour and shape."""
    qa = []
    ordered = sorted(shapes, key=lambda s: (s.box[0], s.box[1]))       # left to right
    qa.append(("Describe the image.", _list([s.a_name for s in ordered]) + "."))
    qa.append(("How many shapes are there?", str(len(shapes))))
    s = rng.choice(shapes)
    kinds = [o.kind for o in shapes]
    colours = [o.colour for o in shapes]
    # Questions that name only the shape or only the colour, for every object where that is
    # unambiguous: they teach the model to bind an object's colour to its shape.
    for o in shapes:
        if kinds.count(o.kind) == 1:
            qa.append((f"What colour is the {o.kind}?", o.colour))
        if colours.count(o.colour) == 1:
            qa.append((f"What shape is the {o.colour} object?", o.kind))
    kind = rng.choice(SHAPES)
    qa.append((f"How many {kind}s are there?", str(kinds.count(kind))))
    colour = rng.choice(list(COLOURS))
    qa.append((f"How many {colour} shapes are there?", str(colours.count(colour))))
    probe = _presence_probe(rng, s)
    present = any(o.name == probe.name for o in shapes)
    qa.append((f"Is there {probe.a_name}?", "yes" if present else "no"))
    if extra_presence:
        qa += _extra_presence(rng, shapes, extra_presence)
    box = box_text(to_thousandths(s.box, SIZE, SIZE))
    qa.append((f"Where is the {s.name}?", box))
    qa.append(("Describe the image with boxes.",
               _list([f"{o.a_name} {box_text(to_thousandths(o.box, SIZE, SIZE))}" for o in ordered]) + "."))
    qa.append((f"What is in the region {box}?", s.a_name))
    return qa


def make_text_image(rng: random.Random, min_len: int = 4) -> tuple[Image.Image, str, list[dict]]:
    """min_len-6 characters in large glyphs (the bundled font scaled up), with line and dot
    noise. Returns the image, the text and each character's box (pixels)."""
    from utils.chat.grounding import load_font
    text = "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(rng.randint(min_len, 6)))
    bg = tuple(rng.randint(180, 255) for _ in range(3))
    img = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(img)
    gaps = [rng.randint(1, 5) for _ in text]
    for size in range(44, 20, -2):                   # the largest glyphs that fit the width
        font = load_font(size)
        width = sum(d.textlength(ch, font=font) for ch in text) + sum(gaps)
        if width <= SIZE - 8:
            break
    x = rng.randint(4, max(4, int(SIZE - 4 - width)))
    chars = []
    for ch, gap in zip(text, gaps):
        fg = tuple(rng.randint(0, 110) for _ in range(3))
        y = SIZE // 2 - font.size * 0.6 + rng.randint(-10, 10)
        d.text((x, y), ch, fill=fg, font=font)
        chars.append({"kind": f"char {ch}", "box": d.textbbox((x, y), ch, font=font)})
        x += d.textlength(ch, font=font) + gap
    for _ in range(rng.randint(2, 5)):
        d.line([(rng.randint(0, SIZE), rng.randint(0, SIZE)) for _ in range(2)],
               fill=tuple(rng.randint(60, 160) for _ in range(3)), width=2)
    for _ in range(150):
        xy = (rng.randint(0, SIZE - 1), rng.randint(0, SIZE - 1))
        d.point(xy, fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return img.filter(ImageFilter.SMOOTH), text, chars


# ----- GUI screenshots and agent tasks ------------------------------------------------------
BUTTONS = ["Submit", "Cancel", "OK", "Search", "Login", "Save", "Next", "Back", "Send", "Delete", "Open", "Help"]
FIELDS = ["Name", "Email", "Password", "City", "Phone", "Query", "User", "Title"]
CHECKS = ["Remember me", "Subscribe", "Agree", "Dark mode", "Notify me"]
LINKS = ["Home", "About", "Settings", "Profile", "News", "Contact"]
WORDS = ["hello", "cat", "blue", "paris", "tom", "report", "apple", "music", "london", "test"]


def make_gui(rng: random.Random, size: int) -> tuple[Image.Image, list[dict]]:
    """A window: title bar, a row of links, labelled text fields, checkboxes, buttons.
    Returns the image and its elements: {kind, label, box (pixels)}."""
    from utils.chat.grounding import load_font
    img = Image.new("RGB", (size, size), tuple(rng.randint(200, 245) for _ in range(3)))
    d = ImageDraw.Draw(img)
    font = load_font(max(10, size // 28))
    s = size / 448
    d.rectangle((0, 0, size, int(28 * s)), fill=tuple(rng.randint(30, 90) for _ in range(3)))
    d.text((int(8 * s), int(6 * s)), rng.choice(["Account", "Form", "Search", "Editor", "Mail"]), fill=(255, 255, 255), font=font)
    elements = []
    x = int(10 * s)
    for label in rng.sample(LINKS, rng.randint(2, 4)):
        w = d.textlength(label, font=font)
        box = (x, int(40 * s), x + w, int(40 * s) + font.size + 2)
        d.text((x, int(40 * s)), label, fill=(20, 60, 200), font=font)
        d.line((x, box[3], x + w, box[3]), fill=(20, 60, 200))
        elements.append({"kind": "link", "label": label, "box": box})
        x += w + int(20 * s)
    y = int(80 * s)
    for label in rng.sample(FIELDS, rng.randint(1, 3)):
        d.text((int(14 * s), y + int(4 * s)), label, fill=(0, 0, 0), font=font)
        box = (int(120 * s), y, int(400 * s), y + int(28 * s))
        d.rectangle(box, fill=(255, 255, 255), outline=(120, 120, 120))
        elements.append({"kind": "textbox", "label": label, "box": box})
        y += int(44 * s)
    for label in rng.sample(CHECKS, rng.randint(0, 2)):
        box = (int(14 * s), y, int(34 * s), y + int(20 * s))
        d.rectangle(box, fill=(255, 255, 255), outline=(60, 60, 60))
        d.text((int(44 * s), y + int(2 * s)), label, fill=(0, 0, 0), font=font)
        elements.append({"kind": "checkbox", "label": label, "box": box})
        y += int(32 * s)
    x, y = int(14 * s), max(y + int(10 * s), int(330 * s))
    for label in rng.sample(BUTTONS, rng.randint(1, 3)):
        w = d.textlength(label, font=font) + int(24 * s)
        box = (x, y, x + w, y + int(34 * s))
        d.rounded_rectangle(box, radius=int(6 * s), fill=tuple(rng.randint(60, 200) for _ in range(3)))
        d.text((x + int(12 * s), y + int(8 * s)), label, fill=(255, 255, 255), font=font)
        elements.append({"kind": "button", "label": label, "box": box})
        x += w + int(16 * s)
    return img, elements


def agent_answer(el: dict, size: int, typed: str = None) -> tuple[str, str]:
    """(task, answer) in CogAgent's format for one element."""
    box = box_text(to_thousandths(el["box"], size, size))
    kind, label = el["kind"], el["label"]
    if kind == "textbox":
        task = f'type {typed} in the {label} field'
        plan = f"1. Click the {label} field. 2. Type {typed}."
        nxt = f"Type {typed} into the {label} field."
        op = f"[textbox] {label} -> TYPE: {typed} at the box {box}"
    else:
        noun = {"button": "button", "link": "link", "checkbox": "checkbox"}[kind]
        task = f"click the {label} {noun}" if kind != "checkbox" else f"tick the {label} checkbox"
        plan = f"1. Click the {label} {noun}."
        nxt = f"Click the {label} {noun}."
        op = f"[{kind}] {label} -> CLICK at the box {box}"
    return task, f"Plan: {plan} Next Action: {nxt} Grounded Operation:{op}"


def gui_questions(rng: random.Random, elements: list[dict], size: int) -> list[tuple[str, str]]:
    from utils.chat.task_prompts import agent_query
    qa = []
    for el in rng.sample(elements, min(4, len(elements))):
        task, answer = agent_answer(el, size, rng.choice(WORDS))
        qa.append((agent_query(task, grounding=True), answer))
    el = rng.choice(elements)
    qa.append((f"Where is the {el['label']} {el['kind']}?", box_text(to_thousandths(el["box"], size, size))))
    return qa


# ----------------------------------------------------------------------------------------
def generate(out: Path, n: int, seed: int = 0, gui: bool = False, text_fraction: float = 0.2,
             gui_fraction: float = 0.4, gui_size: int = 448, text_min_len: int = 4, extra_presence: int = 0) -> dict:
    """Write n images with their questions. Returns counts per kind. For training sets,
    text_min_len < 4 adds easier, shorter texts and extra_presence that many more presence questions
    (scene_questions); held-out sets keep the task's 4-6 characters and one presence question."""
    from tqdm import tqdm
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counts = {"scene": 0, "text": 0, "gui": 0}
    for i in tqdm(range(n), desc=f"synthetic data -> {out}", unit="img"):
        r = rng.random()
        if gui and r < gui_fraction:
            img, elements = make_gui(rng, gui_size)
            qa, kind = gui_questions(rng, elements, gui_size), "gui"
            objects = [{"kind": e["kind"], "box": [v / gui_size for v in e["box"]]} for e in elements]
        elif r < (gui_fraction if gui else 0) + text_fraction:
            img, text, chars = make_text_image(rng, text_min_len)
            qa, kind = [("What does the text say?", text)], "text"
            objects = [{"kind": c["kind"], "box": [v / SIZE for v in c["box"]]} for c in chars]
        else:
            img, shapes = make_scene(rng)
            qa, kind = scene_questions(rng, shapes, extra_presence), "scene"
            objects = [{"kind": s.kind, "colour": s.colour, "box": [v / SIZE for v in s.box]} for s in shapes]
        counts[kind] += 1
        name = f"{seed:03d}{i:06d}"
        img.save(out / "images" / f"{name}.png")
        # "objects" (kind, colour, box as fractions of the image) feed the optional auxiliary
        # per-patch loss of the training (utils/training/finetune.py --aux_object_loss)
        (out / "labels" / f"{name}.json").write_text(json.dumps({"kind": kind, "objects": objects, "qa": [
            {"question": q, "answer": a} for q, a in qa]}))
    return counts


@reports_errors()
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gui", action="store_true", help="include GUI screenshots with agent tasks (CogAgent)")
    a = p.parse_args(argv)
    if a.out.exists() and any(a.out.iterdir()):
        raise FileExistsError(f"{a.out} is not empty")
    counts = generate(a.out, a.n, a.seed, a.gui)
    print(f"wrote {a.n} images to {a.out}: {counts}")
    return 0


def read_synthetic_qa(root: Path, split: str) -> list:
    """The set as `generate` writes it -> an Example per question of a known kind."""
    from utils.scoring.metrics import synthetic_category
    from utils.scoring.tasks import DataError, Example
    folder = root / split if split else root
    if not (folder / "labels").is_dir():
        raise DataError(f"synthetic set: no {folder / 'labels'} (make one with utils/data/synthetic.py)")
    out = []
    for lab in sorted((folder / "labels").glob("*.json")):
        qa = json.loads(lab.read_text(encoding="utf-8"))["qa"]
        img = next((folder / "images").glob(lab.stem + ".*"), None)
        if img is None:
            raise DataError(f"synthetic set: no image {folder / 'images' / lab.stem}.* for {lab}")
        out += [Example(f"{lab.stem}#{j}", img, x["question"], [x["answer"]])
                for j, x in enumerate(qa) if synthetic_category(x["question"]) != "other"]
    return out


if __name__ == "__main__":
    run_tool(main)
