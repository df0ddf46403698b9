"""Conversation inputs and `chat()` / `stream_chat()` on top of models.generate.

Token layout of one row with an image (models/README.md explains it):
    ids        <s>  boi  patch x L  eoi  text...
    position    0    1    2 ... 2     3   4, 5, ...
    vision      0    1    1 ... 1     0   0 ...     (eoi uses the language expert)
Without an image the row is `<s> text...` with positions 0, 1, 2, ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from models.cogvlm import CogVLM
from models.config import ModelConfig
from models.generate import GenerationConfig, ModelInputs, generate_tokens, token_budget
from utils.chat.image import MAX_PIXELS, image_to_tensor, load_image
from utils.chat.templates import IMAGE_MARK, build_prompt, hf_prompt
from utils.chat.text_stream import TextStream
from utils.chat.tokenizer import Tokenizer


@dataclass
class Row:
    ids: list
    positions: list
    vision: list
    image_slots: list

    def __len__(self):
        return len(self.ids)


def build_row(tokenizer: Tokenizer, cfg: ModelConfig, prompt: str, has_image: bool) -> Row:
    """`<s>` + pieces tokenized separately; the `<EOI>` mark becomes the image slots."""
    before, mark, after = prompt.partition(IMAGE_MARK)
    ids = [cfg.bos_token_id] + tokenizer.encode(before)
    positions = list(range(len(ids)))
    vision, slots = [False] * len(ids), [False] * len(ids)
    if mark and has_image:
        L, p = cfg.image_length, positions[-1]
        ids += [cfg.pad_token_id] * (L + 2)
        positions += [p + 1] + [p + 2] * L + [p + 3]
        vision += [True] * (L + 1) + [False]
        slots += [True] * (L + 2)
    text = tokenizer.encode(after) if mark else []
    start = positions[-1] + 1
    ids += text
    positions += list(range(start, start + len(text)))
    vision += [False] * len(text)
    slots += [False] * len(text)
    return Row(ids, positions, vision, slots)


def left_pad(tensors: Sequence[torch.Tensor], fill) -> torch.Tensor:
    """Tensors B_i,T_i -> one (sum B_i),max T_i tensor, each padded on the left with `fill`."""
    T = max(t.shape[1] for t in tensors)
    return torch.cat([torch.cat([t.new_full((t.shape[0], T - t.shape[1]), fill), t], 1) for t in tensors])


def collate(rows: Sequence[Row], device="cpu") -> ModelInputs:
    """Left-pad rows to one length (padding slots are masked out of attention)."""
    return merge_inputs([_row_tensors(r, device) for r in rows])


def _row_tensors(r: Row, device) -> ModelInputs:
    return ModelInputs(*(torch.tensor([v], device=device) for v in (r.ids, r.positions, r.vision, r.image_slots)))


class ImageContext:
    """One image of a conversation: its pixels and, once computed, its encodings (low-res
    embeddings, CogAgent's per-layer cross K/V). Kept across turns so that each image is
    encoded once, not once per turn and never once per token."""

    def __init__(self, image, cfg: ModelConfig, max_pixels: int = MAX_PIXELS, formats=None,
                 keep_image: bool = True):
        """keep_image=False drops the decoded picture once it is resized to the model's input
        (a server's queued request then holds only those tensors); boxes cannot be drawn."""
        img = load_image(image, max_pixels, formats)
        self.low = image_to_tensor(img, cfg.eva.image_size)
        self.high = image_to_tensor(img, cfg.cross.image_size) if cfg.cross else None
        self.image = img if keep_image else None
        self.image_embeds = None
        self.cross_kv = None

    @torch.inference_mode()
    def encode(self, model: CogVLM):
        dev = model.model.device
        if self.image_embeds is None:
            self.image_embeds = model.encode_images(self.low[None].to(dev))
        if self.high is not None and self.cross_kv is None:
            self.cross_kv = model.cross_kv(self.high[None].to(dev))
        return self.image_embeds, self.cross_kv


class ImageCache:
    """The last few images' ImageContexts by content hash, so that an app that is handed
    the same picture again each turn (web pages, Streamlit reruns) encodes it once. Under
    tensor parallelism every rank sees the same calls in the same order, so every rank's
    cache hits and misses alike (and the ranks meet in the same collectives)."""

    def __init__(self, cfg: ModelConfig, size: int = 4):
        self.cfg, self.size, self.items = cfg, size, {}

    @staticmethod
    def key(image) -> str:
        import hashlib
        return hashlib.sha1(image.tobytes() + repr((image.size, image.mode)).encode()).hexdigest()

    def get(self, image) -> Optional[ImageContext]:
        """image: a decoded PIL image, or None (text only)."""
        if image is None:
            return None
        k = self.key(image)
        if k not in self.items:
            self.items[k] = ImageContext(image, self.cfg)
            while len(self.items) > self.size:
                self.items.pop(next(iter(self.items)))
        else:
            self.items[k] = self.items.pop(k)               # most recently used last
        return self.items[k]


def prepare(model: CogVLM, tokenizer: Tokenizer, query: str, history=(),
            image: Optional[ImageContext] = None, version: Optional[str] = None) -> ModelInputs:
    cfg = model.config
    prompt = build_prompt(query, history, version or cfg.version)
    return row_inputs(model, build_row(tokenizer, cfg, prompt, image is not None), image)


def row_inputs(model: CogVLM, row: Row, image: Optional[ImageContext] = None) -> ModelInputs:
    """One tokenized row -> the model's inputs on its device, the image encoded (once per
    ImageContext)."""
    inputs = collate([row], device=model.model.device)
    if image is not None:
        inputs.image_embeds, inputs.cross_kv = image.encode(model)
    return inputs


def merge_inputs(items: Sequence[ModelInputs]) -> ModelInputs:
    """One-row inputs -> one left-padded batch (image embeddings in row order; CogAgent rows
    without an image get zero cross K/V and are masked out of the cross attention)."""
    out = ModelInputs(left_pad([x.input_ids for x in items], 0), left_pad([x.position_ids for x in items], 0),
                      left_pad([x.vision_mask for x in items], False), left_pad([x.image_mask for x in items], False))
    if any(x.input_ids.shape[1] != out.input_ids.shape[1] for x in items):
        out.pad_mask = left_pad([torch.ones_like(x.input_ids, dtype=torch.bool) for x in items], False)
    embeds = [x.image_embeds for x in items if x.image_embeds is not None]
    out.image_embeds = torch.cat(embeds) if embeds else None
    ref = next((x.cross_kv for x in items if x.cross_kv is not None), None)
    if ref is not None:
        out.cross_kv = [tuple(torch.cat([x.cross_kv[i][j] if x.cross_kv is not None else torch.zeros_like(ref[i][j])
                                         for x in items]) for j in range(2)) for i in range(len(ref))]
        out.cross_rows = torch.tensor([x.cross_kv is not None for x in items], device=out.input_ids.device)
    return out


def prepare_batch(model: CogVLM, tokenizer: Tokenizer, requests, version: Optional[str] = None) -> ModelInputs:
    """requests: (query, history, ImageContext | None) per row; rows may mix images and text
    only. Left padding; each row keeps its own positions and expert masks."""
    return merge_inputs([prepare(model, tokenizer, q, h, img, version) for q, h, img in requests])


def batch_chat(model: CogVLM, tokenizer: Tokenizer, requests, version: Optional[str] = None,
               gen: Optional[GenerationConfig] = None) -> list[str]:
    """Answer several conversations in one batch. requests: (query, history, image) with image
    a path / PIL / bytes / ImageContext or None. Greedy answers equal those of `chat()` alone:
    bit for bit under batch-invariant decoding (models/invariant.py, in groups of its rows),
    else up to the rounding of batched products."""
    gen = gen or GenerationConfig()
    requests = [(q, h, img if img is None or isinstance(img, ImageContext) else ImageContext(img, model.config))
                for q, h, img in requests]
    group = model.runtime.batch_invariant or len(requests)
    if len(requests) > group:
        return [a for i in range(0, len(requests), group)
                for a in batch_chat(model, tokenizer, requests[i:i + group], version, gen)]
    inputs = prepare_batch(model, tokenizer, requests, version)
    budget = token_budget(inputs.input_ids.shape[1], int(inputs.image_mask.sum(1).max()), gen,
                          model.config.max_sequence_length)
    eos = model.config.eos_token_id
    out, finished = [[] for _ in requests], [False] * len(requests)
    for tok in generate_tokens(model, inputs, gen, eos, budget):
        for i, t in enumerate(tok.tolist()):
            finished[i] = finished[i] or t == eos
            if not finished[i]:
                out[i].append(t)
    return [tokenizer.decode(ids).rstrip("\ufffd").strip() for ids in out]


def stream_chat(model: CogVLM, tokenizer: Tokenizer, query: str, history=(),
                image: Optional[ImageContext] = None, version: Optional[str] = None,
                gen: Optional[GenerationConfig] = None) -> Iterator[str]:
    """Yield the answer as text deltas. A delta never ends in half a UTF-8 character: text
    is only released once the decoded string no longer ends with U+FFFD."""
    gen = gen or GenerationConfig()
    inputs = prepare(model, tokenizer, query, history, image, version)
    n_img = int(inputs.image_mask.sum())
    budget = token_budget(inputs.input_ids.shape[1], n_img, gen, model.config.max_sequence_length)
    yield from stream_text(generate_tokens(model, inputs, gen, model.config.eos_token_id, budget),
                           tokenizer, model.config.eos_token_id)


def stream_text(token_steps, tokenizer: Tokenizer, eos: int) -> Iterator[str]:
    """Token steps (row 0) -> text deltas, holding back an incomplete UTF-8 character."""
    stream = TextStream(tokenizer)
    for tok in token_steps:
        t = int(tok.reshape(-1)[0])
        if t == eos:
            break
        if delta := stream.push(t):
            yield delta
    if delta := stream.flush():
        yield delta


def chat(model: CogVLM, tokenizer: Tokenizer, query: str, history=(), image=None,
         version: Optional[str] = None, gen: Optional[GenerationConfig] = None):
    """One turn. `image` is a path, bytes, PIL image, an ImageContext from an earlier turn,
    or None for text only. Returns (response, history, image_context)."""
    if image is not None and not isinstance(image, ImageContext):
        image = ImageContext(image, model.config)
    response = "".join(stream_chat(model, tokenizer, query, history, image, version, gen)).strip()
    return response, list(history) + [(query, response)], image


def build_hf_inputs(model, tokenizer: Tokenizer, requests, version: Optional[str] = None) -> dict:
    """Inputs for the transformers front end (`model.generate(**inputs)`), as the original
    `build_conversation_input_ids` made them: input_ids, token_type_ids (1 on image slots),
    attention_mask (0 on left padding), images / cross_images (one list per row, [] without
    an image). requests: (query, history, image or None) per row. version: the original HF
    code's template name; default the checkpoint's `template_version`."""
    cfg = model.cfg
    version = version or model.config.template_version
    rows, lows, highs = [], [], []
    for query, history, image in requests:
        if image is not None and not isinstance(image, ImageContext):
            image = ImageContext(image, cfg)
        rows.append(build_row(tokenizer, cfg, hf_prompt(query, history, version, cfg.cross is not None),
                              image is not None))
        lows.append([image.low] if image is not None else [])
        highs.append([image.high] if image is not None and image.high is not None else [])
    batch = collate(rows)
    out = {"input_ids": batch.input_ids, "token_type_ids": batch.image_mask.long(),
           "attention_mask": batch.pad_mask.long() if batch.pad_mask is not None
           else torch.ones_like(batch.input_ids)}
    if any(lows):
        out["images"] = lows
    if cfg.cross is not None and any(highs):
        out["cross_images"] = highs
    return out
