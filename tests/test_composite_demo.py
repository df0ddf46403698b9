"""The Streamlit composite demo: every mode through streamlit.testing's AppTest (in process),
and one real server + headless chromium screenshot."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser import browser_page, free_port
from tests.test_web_demo import SHOTS, wait_http

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "composite_demo" / "main.py")


@pytest.fixture
def app(cogvlm_ckpt, cogagent_ckpt, monkeypatch):
    from streamlit.testing.v1 import AppTest
    monkeypatch.setenv("COGVLM_MODEL", str(cogvlm_ckpt))
    monkeypatch.setenv("COGAGENT_MODEL", str(cogagent_ckpt))
    monkeypatch.setattr(sys, "argv", [APP])            # as `streamlit run main.py` (no flags after --)
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception and not at.error
    at.sidebar.slider(key="max_new_tokens").set_value(16).run()   # short answers: room for turns
    return at


def upload(at, path):
    at.file_uploader[0].upload(Path(path).name, Path(path).read_bytes(), "image/png")
    at.run()


def messages(at):
    return [m.markdown[0].value for m in at.chat_message]


def test_cogvlm_chat_with_image_grounding_retry_clear(app, image_file):
    upload(app, image_file)
    app.chat_input[0].set_value("What is in the image?").run()
    assert not app.exception and len(messages(app)) == 2 and messages(app)[1]
    first = messages(app)[1]
    app.sidebar.button(key="retry").click().run()            # same greedy answer again
    assert messages(app) == ["What is in the image?", first]
    app.sidebar.toggle(key="grounding").set_value(True).run()
    app.sidebar.selectbox(key="gkind").set_value("expression to box").run()
    app.chat_input[0].set_value("the red circle").run()
    assert messages(app)[2] == "Can you point out the red circle in the image and provide the bounding boxes of their location?"
    app.sidebar.button(key="clear").click().run()
    assert messages(app) == []


def test_cogagent_chat_text_only(app):
    app.sidebar.radio(key="mode").set_value("CogAgent chat").run()
    app.chat_input[0].set_value("Hello").run()
    assert not app.exception and len(messages(app)) == 2


def test_cogagent_agent_task_is_quoted_and_action_parsed(app, image_file):
    app.sidebar.radio(key="mode").set_value("CogAgent agent").run()
    upload(app, image_file)
    app.chat_input[0].set_value("open the settings").run()
    assert messages(app)[0] == 'What steps do I need to take to "open the settings"?(with grounding)'
    # the random model's answer is parsed: an action's fields, or a note that it is none
    assert (len(app.json) == 1 and "operation" in app.json[0].value) or \
        any("not an action" in w.value for w in app.warning)
    app.sidebar.toggle(key="agrounding").set_value(False).run()
    app.chat_input[0].set_value("close it").run()
    assert messages(app)[2] == 'What steps do I need to take to "close it"?'
    assert not app.error
    assert not app.error


def test_bad_image_and_missing_model_are_reported(app, tmp_path, monkeypatch):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    upload(app, bad)
    assert any("Image not usable" in e.value for e in app.error) and not app.exception
    app.chat_input[0].set_value("Still answering text?").run()   # the app keeps going, text only
    assert len(messages(app)) == 2
    assert any("answered without an image" in w.value for w in app.warning)       # and says so
    from streamlit.testing.v1 import AppTest
    for var in ("COGVLM_MODEL", "COGAGENT_MODEL"):
        monkeypatch.delenv(var)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert "No model configured" in at.error[0].value


def test_streamlit_server_in_chromium(cogvlm_ckpt, image_file, tmp_path):
    port = free_port()
    env = {**os.environ, "COGVLM_MODEL": str(cogvlm_ckpt), "HF_HUB_OFFLINE": "1", "LOGLEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", APP, "--server.headless=true",
                             "--browser.gatherUsageStats=false", "--server.address=127.0.0.1",
                             f"--server.port={port}", "--server.fileWatcherType=none"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/", env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/_stcore/health", proc)
        with browser_page() as page:
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector('[data-testid="stFileUploaderDropzoneInput"]', state="attached", timeout=60000)
            page.set_input_files('[data-testid="stFileUploaderDropzoneInput"]', str(image_file))
            page.wait_for_selector('[data-testid="stImage"]', timeout=30000)
            page.fill('[data-testid="stChatInputTextArea"]', "What is in the image?")
            page.keyboard.press("Enter")
            page.wait_for_function("() => document.querySelectorAll('[data-testid=\"stChatMessage\"]').length == 2",
                                   timeout=60000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(SHOTS / "composite_demo.png"))
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_agent_tasks_start_fresh_and_non_actions_are_named(app, image_file, monkeypatch):
    """A second agent task is asked without the first (the original's one task per
    screenshot); an answer that is no action says so instead of a JSON of nulls."""
    import utils.chat
    seen = []

    def spy(model, tok, query, history, *a, **k):
        seen.append(list(history))
        return iter(["Plan: 1. Click it. Next Action: Click the Open button. "
                     "Grounded Operation:[button] Open -> CLICK at the box [[100,200,300,400]]"])
    monkeypatch.setattr(utils.chat, "stream_chat", spy)
    app.sidebar.radio(key="mode").set_value("CogAgent agent").run()
    upload(app, image_file)
    for task in ("open the settings", "close it"):
        app.chat_input[0].set_value(task).run()
    assert seen == [[], []]
    assert any("Each task starts fresh" in c.value for c in app.caption)
    monkeypatch.setattr(utils.chat, "stream_chat", lambda *a, **k: iter(["I cannot see a button here."]))
    app.chat_input[0].set_value("press it").run()
    assert any("not an action" in w.value for w in app.warning) and len(app.json) == 2


def test_unknown_flags_are_refused(cogvlm_ckpt, monkeypatch):
    from streamlit.testing.v1 import AppTest
    monkeypatch.setattr(sys, "argv", [APP, "--cogvlmm", str(cogvlm_ckpt)])
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert "unknown argument(s) after `--`: --cogvlmm" in at.error[0].value


def test_streamlit_from_the_repository_root_is_local_and_quiet(cogvlm_ckpt):
    """The plain README command run from the repository root: `.streamlit/config.toml` makes it
    listen on 127.0.0.1 only and send no usage statistics (Streamlit's defaults: every
    interface, statistics on)."""
    port = free_port()
    env = {**os.environ, "COGVLM_MODEL": str(cogvlm_ckpt), "HF_HUB_OFFLINE": "1", "LOGLEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "composite_demo/main.py",
                             f"--server.port={port}", "--server.fileWatcherType=none"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/_stcore/health", proc)
        listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                     + Path("/proc/net/tcp6").read_text().splitlines()[1:]
                     if line.split()[3] == "0A" and line.split()[1].endswith(f":{port:04X}")]
        assert listening == [f"0100007F:{port:04X}"], listening       # 127.0.0.1 only
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert "usage statistics" not in out.lower(), out                  # printed when they are on
