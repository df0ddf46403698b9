"""Batched inference: mixed rows (different prompts, different images, text only) give the
same greedy tokens as each row run alone."""
from __future__ import annotations

import pytest
from PIL import Image

from models import load_model
from models.generate import GenerationConfig
from utils.chat import ImageContext, batch_chat, chat


@pytest.mark.parametrize("which", ["cogvlm", "cogagent"])
def test_batch_equals_single(which, cogvlm_ckpt, cogagent_ckpt, tokenizer, image_file):
    model, cfg = load_model(str(cogvlm_ckpt if which == "cogvlm" else cogagent_ckpt))
    other = Image.new("RGB", (90, 60), (20, 200, 90))
    requests = [
        ("What is in the image?", [], ImageContext(image_file, cfg)),
        ("Tell me a long story about a fox.", [], None),
        ("Colour?", [("What is it?", "A square.")], ImageContext(other, cfg)),
        ("hi", [], None),
    ]
    gen = GenerationConfig(max_new_tokens=10)
    batched = batch_chat(model, tokenizer, requests, gen=gen)
    alone = [chat(model, tokenizer, q, h, img, gen=gen)[0] for q, h, img in requests]
    assert batched == alone
    assert len(set(alone)) > 1
