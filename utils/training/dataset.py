"""Finetuning datasets, in the two layouts the original used.

- captcha layout: a folder of `<label>.png|jpg|jpeg` files (the Kaggle captcha set; ours is
  made by utils/data/captcha.py); the question is "CAPTCHA:" and the answer the file's label.
- conversation layout (CogVLM-SFT-311K): `images/<id>.jpg` + `labels/<id>.json`, the JSON
  holding `captions` ([{"role": "caption", "content": ...}]) or `conversations`
  ([{"role": "user"|"assistant", "content": ...}, ...]). Every assistant turn is one sample,
  with the turns before it as history (as chat() builds the prompt at inference). Our synthetic
  data adds `qa` ([{"question": ..., "answer": ...}, ...]): independent single-turn samples.

Samples whose image does not open or whose label is empty / not valid JSON are skipped,
counted and reported (`Dataset.skipped`), never a crash. Each sample becomes one training row:
the model's prompt template with the image slots, answer tokens carrying the loss.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from models.config import ModelConfig
from utils.chat import build_row
from utils.chat.image import ImageError, image_to_tensor, load_image
from utils.chat.templates import build_prompt
from utils.chat.tokenizer import Tokenizer

log = logging.getLogger(__name__)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
CAPTCHA_QUERY = "CAPTCHA:"          # the original captcha finetuning's question
CAPTION_QUERY = "Describe this image in detail."


@dataclass
class Sample:
    image: Path
    turns: list                     # [(query, answer), ...]: the last is trained, the rest is history
    objects: tuple = ()             # synthetic labels: ({kind, colour, box as fractions}, ...)


def _image_ok(path: Path) -> bool:
    """Cheap checks only (a data set may hold 300K images): verify() reads PNG to its end
    (CRCs), but not JPEG data, so a JPEG must also end with its end-of-image marker."""
    try:
        with Image.open(path) as im:
            fmt = im.format
            im.verify()
        if fmt == "JPEG":
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 1024))
                if b"\xff\xd9" not in f.read():
                    return False                       # truncated: no end-of-image marker
        return True
    except Exception:  # noqa: BLE001 - any unreadable file is skipped and counted
        return False


def _text(v, what: str) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{what} must be a string, not {type(v).__name__}")
    return v.strip()


def _objects(v) -> tuple:
    """Synthetic labels' `objects`: a list of {kind, colour, box: 4 fractions}."""
    if v is None:
        return ()
    if not isinstance(v, list) or not all(
            isinstance(o, dict) and isinstance(o.get("kind"), str) and isinstance(o.get("box"), list)
            and len(o["box"]) == 4 and all(isinstance(x, (int, float)) for x in o["box"]) for o in v):
        raise TypeError("objects must be a list of {kind, colour, box}")
    return tuple(v)


def scan_captcha(folder: Path) -> tuple[list[Sample], dict]:
    samples, skipped = [], {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_EXTS:
            continue
        label = p.stem.strip()
        if not label:
            skipped[str(p)] = "empty label"
        elif not _image_ok(p):
            skipped[str(p)] = "unreadable image"
        else:
            samples.append(Sample(p, [(CAPTCHA_QUERY, label)]))
    return samples, skipped


def _samples(label: dict) -> list:
    """A label -> its samples, each a list of (query, answer) turns (the last one trained)."""
    if not isinstance(label, dict):
        raise TypeError("a label must be a JSON object")
    if label.get("captions"):
        return [[(CAPTION_QUERY, _text(c["content"], "content"))] for c in label["captions"][:1]]
    conv, turns, query = label.get("conversations") or [], [], None
    if label.get("qa"):                                # independent pairs (utils/data/synthetic.py)
        return [[(_text(x["question"], "question"), _text(x["answer"], "answer"))] for x in label["qa"]]
    if not isinstance(conv, list):
        raise TypeError("conversations must be a list")
    for msg in conv:
        if msg.get("role") == "user":
            query = _text(msg["content"], "content")
        elif msg.get("role") == "assistant" and query is not None:
            turns.append((query, _text(msg["content"], "content")))
            query = None
    turns = [(q, a) for q, a in turns if q and a]
    return [turns[: k + 1] for k in range(len(turns))]   # each turn, the earlier ones as history


def scan_conversations(folder: Path) -> tuple[list[Sample], dict]:
    samples, skipped = [], {}
    images = {p.stem: p for p in sorted((folder / "images").glob("*")) if p.suffix.lower() in IMAGE_EXTS}
    for lab in sorted((folder / "labels").glob("*.json")):
        try:
            label = json.loads(lab.read_text(encoding="utf-8"))
            convs = _samples(label)
            objects = _objects(label.get("objects"))
        except OSError as e:                           # e.g. a directory named x.json
            skipped[str(lab)] = f"label cannot be read ({e.strerror or e})"
            continue
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
            skipped[str(lab)] = f"label is not valid JSON of the expected layout ({type(e).__name__}: {str(e)[:60]})"
            continue
        img = images.get(lab.stem)
        if not convs or not all(q and a for c in convs for q, a in c):
            skipped[str(lab)] = "empty label"
        elif img is None:
            skipped[str(lab)] = "no image"
        elif not _image_ok(img):
            skipped[str(img)] = "unreadable image"
        else:
            samples += [Sample(img, c, objects) for c in convs]
    return samples, skipped


class FinetuneDataset(torch.utils.data.Dataset):
    """Either layout, detected from the folder (labels/ + images/ = conversations)."""

    def __init__(self, folder, cfg: ModelConfig, tokenizer: Tokenizer, version: Optional[str] = None,
                 max_length: int = 2048, pack: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"dataset folder {self.folder} does not exist")
        self.cfg, self.tok, self.version = cfg, tokenizer, version or cfg.version
        self.max_length = min(max_length, cfg.max_sequence_length)
        conv = (self.folder / "labels").is_dir() and (self.folder / "images").is_dir()
        samples, self.skipped = (scan_conversations if conv else scan_captcha)(self.folder)
        # A prompt that leaves no room for one answer token would train on nothing (loss NaN).
        self.samples = []
        for smp in samples:
            query, history = smp.turns[-1][0], smp.turns[:-1]
            n = len(build_row(tokenizer, cfg, build_prompt(query, history, self.version), True))
            if n >= self.max_length:
                self.skipped[f"{smp.image} ({query[:30]!r})"] = (f"prompt of {n} tokens does not fit "
                                                                f"--max_length {self.max_length}")
            else:
                self.samples.append(smp)
        if self.skipped:
            log.warning("%s: skipped %d sample(s) (%s)", self.folder, len(self.skipped),
                        ", ".join(f"{Path(k).name}: {v}" for k, v in list(self.skipped.items())[:3]))
        if not self.samples:
            raise ValueError(f"{self.folder}: no usable samples ({len(self.skipped)} skipped)")
        # Training units: one sample each, or with pack=True the single-turn questions of one
        # image together in one row (the image is encoded once for all of them).
        self.units = [[i] for i in range(len(self.samples))]
        if pack:
            by_image, self.units = {}, []
            for i, s in enumerate(self.samples):
                if len(s.turns) == 1:
                    by_image.setdefault(s.image, []).append(i)
                else:
                    self.units.append([i])
            self.units += list(by_image.values())
            self.units.sort(key=lambda u: u[0])

    def __len__(self):
        return len(self.units)

    def encode_packed(self, turns: list, seed: int = 0) -> tuple[list, list, list, list, list, list]:
        """Several single-turn (query, answer) pairs about one image in one row:
        `<s> image | prompt1 answer1 </s> | prompt2 answer2 </s> | ...`. Each pair is a segment
        whose positions restart after the image and which may attend only to the image prefix
        and to itself (`segments` -> the attention mask in training), so that each answer is
        learned exactly as chat() will ask it, and no answer leaks into another.
        When they do not all fit in max_length, the ones kept are a random choice (seeded), not
        the first ones: questions listed last would otherwise never be trained."""
        rows = [build_row(self.tok, self.cfg, build_prompt(q, [], self.version), True) for q, _ in turns]
        n = max(i for i, v in enumerate(rows[0].image_slots) if v) + 1 if any(rows[0].image_slots) else 1
        ids, pos, vision, slots = rows[0].ids[:n], rows[0].positions[:n], rows[0].vision[:n], rows[0].image_slots[:n]
        loss, segs = [False] * n, [0] * n
        texts = [(row.ids[n:], self.tok.encode(answer) + [self.cfg.eos_token_id]) for row, (_, answer) in zip(rows, turns)]
        if n + sum(len(q) + len(a) for q, a in texts) > self.max_length:
            random.Random(seed).shuffle(texts)
        k = 0
        for prompt, ans in texts:
            text = prompt + ans
            if len(ids) + len(text) > self.max_length:
                continue                              # a shorter one may still fit
            k += 1
            start = pos[n - 1] + 1
            ids += text
            pos += list(range(start, start + len(text)))
            vision += [False] * len(text)
            slots += [False] * len(text)
            loss += [False] * (len(text) - len(ans)) + [True] * len(ans)
            segs += [k] * len(text)
        return ids, pos, vision, slots, loss, segs

    def encode(self, query: str, history: list, answer: str) -> tuple[list, list, list, list, list]:
        """(ids, positions, vision, image_slots, loss): the prompt exactly as chat() builds it
        (template, history, image slots), then the answer + EOS, which alone carry loss."""
        row = build_row(self.tok, self.cfg, build_prompt(query, history, self.version), True)
        ans = self.tok.encode(answer) + [self.cfg.eos_token_id]
        start = row.positions[-1] + 1
        ids = row.ids + ans
        positions = row.positions + list(range(start, start + len(ans)))
        vision = row.vision + [False] * len(ans)
        slots = row.image_slots + [False] * len(ans)
        loss = [False] * len(row.ids) + [True] * len(ans)
        n = self.max_length
        return ids[:n], positions[:n], vision[:n], slots[:n], loss[:n]

    def __getitem__(self, i: int) -> Optional[dict]:
        unit = [self.samples[j] for j in self.units[i]]
        s = unit[0]
        try:
            img = load_image(s.image)
        except ImageError as e:                        # a file that changed since the scan
            log.warning("skipping %s: %s", s.image, e)
            return None
        (query, answer), history = s.turns[-1], s.turns[:-1]
        if len(unit) > 1:
            ids, pos, vision, slots, loss, segs = self.encode_packed([u.turns[0] for u in unit], seed=i)
        else:
            (ids, pos, vision, slots, loss), segs = self.encode(query, history, answer), None
        item = {"ids": ids, "positions": pos, "vision": vision, "slots": slots, "loss": loss, "segments": segs,
                "image": image_to_tensor(img, self.cfg.eva.image_size), "answer": answer,
                "query": query, "history": history, "path": str(s.image)}
        if self.cfg.cross is not None:
            item["cross_image"] = image_to_tensor(img, self.cfg.cross.image_size)
        item["objects"] = s.objects
        return item


def collate_train(items: list, object_vocab: Optional[tuple] = None) -> Optional[dict]:
    """Right-pad a batch for training; None items (unreadable at load time) are dropped.
    object_vocab = (grid, kinds, colours, high-res grid or None): add per-patch object
    targets (object_targets), for the high-res encoder too (keys prefixed cross_)."""
    items = [x for x in items if x is not None]
    if not items:
        return None
    T = max(len(x["ids"]) for x in items)

    def pad(key, fill):
        return torch.tensor([x[key] + [fill] * (T - len(x[key])) for x in items])
    batch = {"input_ids": pad("ids", 0), "position_ids": pad("positions", 0),
             "vision_mask": pad("vision", False), "image_mask": pad("slots", False),
             "loss_mask": pad("loss", False),
             "pad_mask": torch.tensor([[True] * len(x["ids"]) + [False] * (T - len(x["ids"])) for x in items]),
             "images": torch.stack([x["image"] for x in items])}
    if "cross_image" in items[0]:
        batch["cross_images"] = torch.stack([x["cross_image"] for x in items])
    if any(x.get("segments") for x in items):
        for x in items:
            x["segments"] = x.get("segments") or [1] * len(x["ids"])
        batch["segments"] = pad("segments", 0)
    if object_vocab is not None:
        grid, kinds, colours, cross_grid = object_vocab
        batch.update(object_targets(items, grid, kinds, colours))
        if cross_grid:
            batch.update({"cross_" + k: v for k, v in object_targets(items, cross_grid, kinds, colours).items()})
    return batch


def object_targets(items: list, grid: int, kinds: list, colours: list) -> dict:
    """Per low-res patch targets from the images' object labels: the kind and colour of the
    object under the patch centre (0 = background) and that object's box (fractions);
    -100 (ignored) for images without object labels."""
    n = grid * grid
    kind_t = torch.full((len(items), n), -100, dtype=torch.long)
    colour_t = torch.full((len(items), n), -100, dtype=torch.long)
    box_t = torch.zeros(len(items), n, 4)
    centres = (torch.arange(grid) + 0.5) / grid
    cy, cx = centres[:, None].expand(grid, grid).reshape(-1), centres[None, :].expand(grid, grid).reshape(-1)
    for b, x in enumerate(items):
        objs = x.get("objects") or ()
        if not objs:
            continue
        kind_t[b], colour_t[b] = 0, 0
        for o in objs:                               # later objects are drawn on top
            x0, y0, x1, y1 = o["box"]
            inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
            kind_t[b][inside] = kinds.index(o["kind"]) + 1 if o["kind"] in kinds else -100
            colour_t[b][inside] = colours.index(o["colour"]) + 1 if o.get("colour") in colours else -100
            box_t[b][inside] = torch.tensor([x0, y0, x1, y1])
    return {"obj_kind": kind_t, "obj_colour": colour_t, "obj_box": box_t}


def packed_attention_mask(segments: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    """segments: B,T (0 = shared prefix, k = k-th packed question) -> B,1,T,T bool mask:
    causal, within the own segment or the prefix, never padding; every token sees itself."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()           # T,T
    same = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0)  # B,T,T
    mask = causal & same & pad_mask[:, None, :]
    return (mask | torch.eye(T, dtype=torch.bool, device=segments.device))[:, None]      # B,1,T,T
