"""The Gradio web demo in headless chromium: upload, ask, streamed answer, boxes drawn,
errors shown in the page while the app keeps running."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.browser import browser_page, free_port

ROOT = Path(__file__).resolve().parent.parent
SHOTS = Path(os.environ.get("COGVLM_SCREENSHOT_DIR", "/tmp"))


def wait_http(url: str, proc=None, timeout: float = 90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(proc.stdout.read() if proc.stdout else "server exited")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(url)


ANSWERS = {}


def start_server(ckpt, tmp, nproc=None):
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "LOGLEVEL": "WARNING",
           "GRADIO_TEMP_DIR": str(tmp), "OMP_NUM_THREADS": "1", "COGVLM_DIST_TIMEOUT": "60"}
    launcher = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc-per-node={nproc}"]
    proc = subprocess.Popen([*launcher, str(ROOT / "basic_demo" / "web_demo.py"), "--from_pretrained",
                             str(ckpt), "--port", str(port), "--max_length", "160"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/", env=env)
    wait_http(f"http://127.0.0.1:{port}/", proc)
    return proc, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def web_server(cogvlm_ckpt, tmp_path_factory):
    proc, url = start_server(cogvlm_ckpt, tmp_path_factory.mktemp("gradio"))
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def ask(page, text, wait=True):
    """Send a question; with wait, return once the answer is complete (the page clears the
    question box after the answer's last chunk)."""
    page.fill("#query textarea", text)
    page.click("#send")
    if wait:
        page.wait_for_function("() => document.querySelector('#query textarea').value === ''", timeout=90000)


def bot_texts(page):
    return [m.inner_text() for m in page.query_selector_all('#chatbot [data-testid="bot"]')]


def test_upload_ask_and_stream(web_server, image_file):
    with browser_page() as page:
        page.goto(web_server)
        page.set_input_files("#image-input input[type=file]", str(image_file))
        page.wait_for_selector("#image-preview img", timeout=30000)
        ask(page, "What is in the image?", wait=False)
        page.wait_for_function("""() => { const m = document.querySelectorAll('#chatbot [data-testid="bot"]');
                                          return m.length == 1 && m[0].innerText.trim().length > 0; }""", timeout=60000)
        assert page.query_selector('#chatbot [data-testid="user"]').inner_text().strip() == "What is in the image?"
        page.wait_for_function("() => document.querySelector('#query textarea').value === ''", timeout=90000)
        ANSWERS["plain"] = bot_texts(page)[0]
        # prompt too long for --max_length 160: the error shows in the page, the app goes on
        ask(page, "describe " * 200)
        page.wait_for_function("() => document.querySelector('#error').innerText.includes('total length limit')",
                               timeout=60000)
        assert len(bot_texts(page)) == 1
        ask(page, "And the colours?")
        page.wait_for_function("""() => document.querySelectorAll('#chatbot [data-testid="bot"]').length == 2""",
                               timeout=60000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(SHOTS / "web_demo.png"))
        page.click("#clear")
        page.wait_for_function("""() => document.querySelectorAll('#chatbot [data-testid="bot"]').length == 0""")


def test_torchrun_rank0_serves_and_rank1_follows(cogvlm_ckpt, image_file, tmp_path):
    if "plain" not in ANSWERS:
        pytest.skip("needs the single-process answer of test_upload_ask_and_stream")
    proc, url = start_server(cogvlm_ckpt, tmp_path, nproc=2)
    try:
        with browser_page() as page:
            page.goto(url)
            page.set_input_files("#image-input input[type=file]", str(image_file))
            page.wait_for_selector("#image-preview img", timeout=30000)
            ask(page, "What is in the image?")
            assert bot_texts(page)[0] == ANSWERS["plain"]          # same greedy answer, split model
            ask(page, "And the colours?")                         # the follower kept up
            assert len(bot_texts(page)) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_grounding_answer_is_drawn_beside_the_chat(image_file):
    """The page's box path, with a scripted model call whose answer holds boxes (the tiny
    random model never writes one)."""
    from basic_demo.web_demo import build_app
    from utils.serving.lockstep import Lockstep

    def generate(query, history, pixels, *sampling):
        assert pixels is not None and pixels.size == (160, 120)
        yield from ["A red circle [[062,083,375,500]] ", "and a blue square [[562,416,937,916]]."]

    app = build_app(Lockstep({"generate": generate}))
    port = free_port()
    app.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1", server_port=port,
                                                  prevent_thread_lock=True, share=False)
    try:
        with browser_page() as page:
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("#image-input input[type=file]", str(image_file))
            page.wait_for_selector("#image-preview img", timeout=30000)
            ask(page, "Describe the image with boxes.")
            page.wait_for_selector("#grounding-output img", timeout=30000)
            assert "blue square" in bot_texts(page)[0]
    finally:
        app.close()


def test_bad_image_keeps_the_chat_and_old_boxes_are_cleared(image_file, tmp_path):
    """A bad upload shows our one-line message and keeps the conversation; an answer without
    boxes clears the previous answer's boxes; an empty question gets a visible warning."""
    from basic_demo.web_demo import build_app
    from utils.serving.lockstep import Lockstep
    answers = iter(["A red circle [[062,083,375,500]].", "No boxes this time."])

    def generate(query, history, pixels, *sampling):
        yield next(answers)

    app = build_app(Lockstep({"generate": generate}))
    port = free_port()
    app.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1", server_port=port,
                                                  prevent_thread_lock=True, share=False)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    try:
        with browser_page() as page:
            popups = []
            page.on("console", lambda m: popups.append(m.text) if "preprocess" in m.text else None)
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("#image-input input[type=file]", str(image_file))
            page.wait_for_selector("#image-preview img", timeout=30000)
            ask(page, "Describe the image with boxes.")
            page.wait_for_selector("#grounding-output img", timeout=30000)
            page.set_input_files("#image-input input[type=file]", str(bad))
            page.wait_for_function("() => document.querySelector('#error').innerText.includes('not an image file')",
                                   timeout=30000)
            assert len(bot_texts(page)) == 1                               # the chat is still there
            assert not page.query_selector_all(".toast-body") and not popups
            ask(page, "And now?")
            page.wait_for_function("() => !document.querySelector('#grounding-output img')", timeout=30000)
            assert bot_texts(page)[1] == "No boxes this time."
            page.click("#send")                                            # empty question
            page.wait_for_function("() => document.querySelector('#error').innerText.includes('Type a question first')",
                                   timeout=30000)
            assert page.query_selector("#error strong") is not None       # bold, not faint text
    finally:
        app.close()


def test_startup_line_names_our_share_flag(cogvlm_ckpt, tmp_path):
    proc, url = start_server(cogvlm_ckpt, tmp_path)
    try:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    finally:
        proc.kill()
    assert "restart with --share" in out and "share=True" not in out, out
