"""The OpenAI-compatible server as a real process on 127.0.0.1, driven by the official
`openai` client and by raw HTTP: formats, streaming, usage, limits, auth, concurrency,
disconnects, and a bounded fault run."""
from __future__ import annotations

import base64
import io
import json
import os
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc, log: Path, tries: int = 600) -> None:
    """Until the server at url answers /health; its log in the error if it never does."""
    for _ in range(tries):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(Path(log).read_text()[-3000:])


def png_url(size=(64, 48), color=(200, 30, 30), fmt="PNG", mime="image/png") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


@pytest.fixture(scope="module")
def server(cogvlm_ckpt, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("srv") / "server.log"
    env = {**os.environ, "COGVLM_API_KEY": KEY, "LOGLEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "openai_demo" / "openai_api.py"),
                             "--from_pretrained", str(cogvlm_ckpt), "--port", str(port),
                             "--max-batch", "8", "--max-queue", "64", "--max-length", "200",
                             "--max-tokens", "64", "--max-images", "2", "--max-image-pixels", "4000000"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd="/")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, log)
    yield url, proc
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _image_msg(text, url):
    return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-cogvlm"]
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}     # nothing more without the key
    full = httpx.get(server[0] + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert full["status"] == "ok" and full["model"] == "tiny-cogvlm" and "active" in full


def test_chat_with_image_stream_and_not(client, tokenizer, cogvlm_ckpt):
    from models import load_model
    from models.generate import GenerationConfig
    from utils.chat import chat, prepare
    msgs = [_image_msg("What is in the image?", png_url())]
    r = client.chat.completions.create(model="tiny-cogvlm", messages=msgs, temperature=0, max_tokens=10)
    text = r.choices[0].message.content
    # the same answer as the library, and usage counts equal the tokenizer's (image slots included)
    model, cfg = load_model(str(cogvlm_ckpt))
    img = Image.open(io.BytesIO(base64.b64decode(png_url().split(",")[1])))
    expect = chat(model, tokenizer, "What is in the image?", [], img, gen=GenerationConfig(max_new_tokens=10))[0]
    assert text == expect
    from utils.chat import ImageContext
    n_prompt = prepare(model, tokenizer, "What is in the image?", [], ImageContext(img, cfg)).input_ids.shape[1]
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens <= 10 and r.usage.total_tokens == n_prompt + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length") and r.id and r.created and r.model == "tiny-cogvlm"
    chunks = list(client.chat.completions.create(model="tiny-cogvlm", messages=msgs, temperature=0,
                                                 max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text                     # the same text both ways, whitespace included
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_text_only_system_stop_length(client):
    base = client.chat.completions.create(model="x", messages=[
        {"role": "system", "content": "You are brief."}, {"role": "user", "content": "Tell me a story."}],
        temperature=0, max_tokens=12)
    assert base.choices[0].finish_reason == "length" and base.usage.completion_tokens == 12
    text = base.choices[0].message.content
    multi = client.chat.completions.create(model="x", messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"}], temperature=0, max_tokens=5)
    assert multi.choices[0].message.content is not None
    if len(text) > 4:
        stop = text[2:4]
        r = client.chat.completions.create(model="x", messages=[
            {"role": "system", "content": "You are brief."}, {"role": "user", "content": "Tell me a story."}],
            temperature=0, max_tokens=12, stop=[stop])
        assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].message.content


def test_errors_are_openai_style(server, client):
    url = server[0] + "/v1/chat/completions"
    h = {"Authorization": f"Bearer {KEY}"}
    def post(body, headers=h, raw=None):
        r = httpx.post(url, headers=headers, content=raw if raw is not None else json.dumps(body), timeout=30)
        return r.status_code, r.json()
    cases = [
        ({"messages": []}, 400), ({}, 400), ({"messages": [{"role": "user"}], "n": 2}, 400),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000}, 400),
        ({"messages": [{"role": "assistant", "content": "x"}]}, 400),
        ({"messages": [_image_msg("x", "data:image/png;base64,@@@not-base64")]}, 400),
        ({"messages": [_image_msg("x", "data:application/pdf;base64,AAAA")]}, 400),
        ({"messages": [_image_msg("x", "http://example.com/a.png")]}, 400),
        ({"messages": [_image_msg("x", "data:image/png;base64," + base64.b64encode(b"not a png").decode())]}, 400),
        ({"messages": [_image_msg("x", png_url((3000, 2000)))]}, 400),
        ({"messages": [_image_msg("a", png_url()), _image_msg("b", png_url()), _image_msg("c", png_url())]}, 400),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, 400),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400),
    ]
    for body, status in cases:
        code, js = post(body)
        assert code == status, (body, js)
        assert set(js["error"]) >= {"message", "type", "code"}
    assert post(None, raw=b"{not json")[0] == 400
    code, js = post({"messages": [{"role": "user", "content": "x"}]}, headers={})
    assert code == 401 and js["error"]["type"] == "authentication_error"
    code, _ = post(None, raw=b"x" * (21 << 20))
    assert code == 413
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0).models.list()
    # png, jpeg, webp and gif (first frame) data URLs all work
    for fmt, mime in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")):
        r = client.chat.completions.create(model="x", messages=[_image_msg("x", png_url(fmt=fmt, mime=mime))],
                                           max_tokens=2, temperature=0)
        assert r.usage.completion_tokens >= 1


def test_concurrent_streams_match_alone(client):
    prompts = [f"Question number {i}: what do you see?" for i in range(8)]
    def alone(p):
        return client.chat.completions.create(model="x", messages=[_image_msg(p, png_url(color=(9, 9, 200)))],
                                              temperature=0, max_tokens=16).choices[0].message.content
    expected = [alone(p) for p in prompts]
    def streamed(p):
        s = client.chat.completions.create(model="x", messages=[_image_msg(p, png_url(color=(9, 9, 200)))],
                                           temperature=0, max_tokens=16, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in s if c.choices)
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(streamed, prompts))
    assert got == expected


def test_disconnect_frees_slot(server, client):
    url = server[0] + "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 64,
            "stream": True, "temperature": 0}
    with httpx.stream("POST", url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                break                                          # leave after the first chunk
    for _ in range(100):
        load = httpx.get(server[0] + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
        if load["active"] == 0 and load["waiting"] == 0:
            break
        time.sleep(0.1)
    assert load["active"] == 0


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_fault_run(server):
    """300 requests, 16 at a time, a third malformed: each malformed one gets its 4xx, each valid
    one an answer, the server stays up, RSS grows less than 10%."""
    url, proc = server
    h = {"Authorization": f"Bearer {KEY}"}
    good_img = png_url()
    big = png_url((6000, 5000))                                 # 30 megapixels
    bad = [
        ({"messages": [_image_msg("x", "data:image/png;base64,!!!")]}, h, 400),
        ({"messages": [_image_msg("x", "data:text/plain;base64,aGk=")]}, h, 400),
        ({"messages": [_image_msg("x", big)]}, h, 400),
        ({"messages": [_image_msg(str(i), good_img) for i in range(10)]}, h, 400),
        ({"model": "x"}, h, 400),
        ({"messages": [{"role": "user", "content": "x"}]}, {"Authorization": "Bearer nope"}, 401),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 9}, h, 400),
    ]
    rng = random.Random(0)
    plan = [("bad", *rng.choice(bad)) if i % 3 == 0 else
            ("good", {"messages": [_image_msg(f"q{i}", good_img)] if i % 2 else [{"role": "user", "content": f"q{i}"}],
                      "max_tokens": 4, "temperature": 0}, h, 200) for i in range(300)]
    def warm(_):
        with httpx.Client(timeout=60) as c:
            c.post(url + "/v1/chat/completions", json=plan[1][1], headers=h)
    with ThreadPoolExecutor(16) as ex:                         # warm up with a burst, then measure
        list(ex.map(warm, range(16)))
    time.sleep(0.5)
    rss0 = _rss_kb(proc.pid)

    def send(item):
        kind, body, headers, status = item
        for _ in range(50):
            with httpx.Client(timeout=60) as c:
                r = c.post(url + "/v1/chat/completions", json=body, headers=headers)
            if r.status_code != 429:
                break
            time.sleep(float(r.headers.get("Retry-After", 1)))
        ok = r.status_code == status and ("error" in r.json() if status != 200 else
                                          r.json()["choices"][0]["message"]["content"] is not None)
        return ok, r.status_code, kind

    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(send, plan))
    assert all(ok for ok, _, _ in results), [r for r in results if not r[0]][:5]
    assert proc.poll() is None
    assert httpx.get(url + "/health").status_code == 200
    growth = _rss_kb(proc.pid) / rss0
    assert growth < 1.10, growth


def test_compile_flag_compiles_the_engine_attention(cogvlm_ckpt, client, tmp_path):
    """openai_api.py --compile: the engine's one-token attention runs compiled (logged), and
    concurrent streams answer as the eager server does."""
    port = _free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "LOGLEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "openai_demo" / "openai_api.py"),
                             "--from_pretrained", str(cogvlm_ckpt), "--port", str(port), "--compile",
                             "--max-batch", "4", "--max-length", "200"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd="/")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log)
        compiled = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        prompts = [f"Question {i}: what do you see?" for i in range(4)]

        def ask(c, p):
            return c.chat.completions.create(model="x", messages=[_image_msg(p, png_url(color=(9, 120, 9)))],
                                             temperature=0, max_tokens=12).choices[0].message.content
        expected = [ask(client, p) for p in prompts]
        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda p: ask(compiled, p), prompts))
        assert got == expected
        assert "decode attention compiled" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
