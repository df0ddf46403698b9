"""Continuous batching: requests joining at different steps give the same greedy text as
chat() alone; stop strings, length limits, cancellation, a full queue."""
from __future__ import annotations

import queue
import threading
import time

import pytest
from PIL import Image

from models import load_model
from models.generate import GenerationConfig
from utils.chat import ImageContext, chat, prepare
from utils.serving.engine import BatchEngine, QueueFull, Request


def run_requests(engine, model, tokenizer, specs, delays, timeout: float = 60):
    """specs: (query, image, max_new, stop). Submit with delays; return (text, done) per spec.
    timeout: the longest wait for one event."""
    results = [None] * len(specs)
    threads = []

    def one(i, query, image, max_new, stop):
        q = queue.Queue()
        inp = prepare(model, tokenizer, query, [], image)
        engine.submit(Request(inp, GenerationConfig(), max_new, q.put, stop=stop or []))
        text = ""
        while True:
            ev = q.get(timeout=timeout)
            if ev["type"] == "delta":
                text += ev["text"]
            elif ev["type"] == "done":
                results[i] = (text, ev)
                return

    for i, (spec, delay) in enumerate(zip(specs, delays)):
        time.sleep(delay)
        t = threading.Thread(target=one, args=(i, *spec))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(timeout=2 * timeout)
    return results


@pytest.mark.parametrize("which", ["cogvlm", "cogagent"])
def test_joining_requests_match_chat(which, cogvlm_ckpt, cogagent_ckpt, tokenizer, image_file):
    model, cfg = load_model(str(cogvlm_ckpt if which == "cogvlm" else cogagent_ckpt))
    engine = BatchEngine(model, tokenizer, max_batch=3, max_len=160)
    other = Image.new("RGB", (50, 70), (10, 120, 250))
    specs = [("What is in the image?", ImageContext(image_file, cfg), 30, None),
             ("Tell me a story.", None, 25, None),
             ("Colour?", ImageContext(other, cfg), 20, None),
             ("hi", None, 12, None),
             ("Another text question", None, 18, None)]
    res = run_requests(engine, model, tokenizer, specs, [0, 0.05, 0.1, 0.02, 0.3])
    engine.close()
    for (q, img, n, _), (text, ev) in zip(specs, res):
        expect = chat(model, tokenizer, q, [], img, gen=GenerationConfig(max_new_tokens=n))[0]
        assert text.strip() == expect
        assert ev["finish_reason"] in ("stop", "length")
        assert ev["prompt_tokens"] == prepare(model, tokenizer, q, [], img).input_ids.shape[1]
    assert engine.steps > 0


def test_stop_and_length_and_cancel(cogvlm_ckpt, tokenizer):
    model, cfg = load_model(str(cogvlm_ckpt))
    full = chat(model, tokenizer, "Tell me a story.", gen=GenerationConfig(max_new_tokens=20))[0]
    engine = BatchEngine(model, tokenizer, max_batch=2, max_queue=4, max_len=120)
    stop = full[3:5]
    (text, ev), (t2, ev2) = run_requests(engine, model, tokenizer,
                                         [("Tell me a story.", None, 20, [stop]),
                                          ("Tell me a story.", None, 5, None)], [0, 0])
    assert stop not in text and full.startswith(text.strip()) and ev["finish_reason"] == "stop"
    assert ev2["finish_reason"] == "length" and ev2["completion_tokens"] == 5
    # cancellation frees the row
    q = queue.Queue()
    req = Request(prepare(model, tokenizer, "Tell me a story."), GenerationConfig(), 100, q.put)
    engine.submit(req)
    req.cancelled.set()
    while (ev := q.get(timeout=30))["type"] != "done":
        pass
    assert ev["finish_reason"] == "cancelled" or ev["completion_tokens"] < 100
    engine.close()


def test_queue_full(cogvlm_ckpt, tokenizer):
    model, _ = load_model(str(cogvlm_ckpt))
    engine = BatchEngine(model, tokenizer, max_batch=1, max_queue=1, max_len=120)
    inp = prepare(model, tokenizer, "x")
    with engine.cv:                     # hold the worker so nothing is admitted meanwhile
        engine.waiting.append(Request(inp, GenerationConfig(), 2, lambda e: None))
        with pytest.raises(QueueFull):
            engine.submit(Request(inp, GenerationConfig(), 2, lambda e: None))
    engine.close()
