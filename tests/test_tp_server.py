"""The OpenAI server split over 2 tensor-parallel ranks (torchrun, gloo): the same greedy
answers as one process, concurrent streams included (CogAgent: image encoding and cross K/V
on every rank), and every rank leaves when the server stops or a rank dies."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.test_openai_api import _free_port, _image_msg, png_url, wait_healthy

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "LOGLEVEL": "WARNING", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
       "COGVLM_DIST_TIMEOUT": "60"}


def _start(ckpt: Path, log: Path, ranks: int, max_tokens: int = 32):
    port = _free_port()
    args = [str(ROOT / "openai_demo" / "openai_api.py"), "--from_pretrained", str(ckpt), "--port", str(port),
            "--max-batch", "8", "--max-length", "400", "--max-tokens", str(max_tokens)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={ranks}", *args] if ranks > 1 else [sys.executable, *args])
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=ENV, cwd="/",
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
    except RuntimeError:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return url, proc


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(e for e in env if e.startswith(b"RANK=")).split(b"=")[1])


def _ask(url: str, prompt: str, color=None, stream=False) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    msg = _image_msg(prompt, png_url(color=color)) if color else {"role": "user", "content": prompt}
    r = client.chat.completions.create(model="x", messages=[msg], temperature=0, max_tokens=12, stream=stream)
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in r if c.choices).strip()
    return r.choices[0].message.content


CASES = [("What is in the image?", (200, 30, 30)), ("Describe it.", (9, 9, 200)), ("hello there", None),
         ("What colour is it?", (30, 200, 30)), ("Say something.", None), ("Where is the box?", (250, 250, 0))]


@pytest.mark.timeout(400)
def test_tp_server_answers_like_one_process_and_stops_cleanly(cogagent_ckpt, tmp_path):
    url1, one = _start(cogagent_ckpt, tmp_path / "one.log", 1)
    try:
        expected = [_ask(url1, p, c) for p, c in CASES]
    finally:
        one.terminate()
        one.wait(timeout=30)
    url, tp = _start(cogagent_ckpt, tmp_path / "tp.log", 2)
    workers = _children(tp.pid)
    try:
        assert sorted(_rank_of(w) for w in workers) == [0, 1]
        assert [_ask(url, p, c) for p, c in CASES[:2]] == expected[:2]           # one at a time
        with ThreadPoolExecutor(len(CASES)) as ex:                                # all streaming at once
            got = list(ex.map(lambda pc: _ask(url, pc[0], pc[1], stream=True), CASES))
        assert got == [e.strip() for e in expected], (tmp_path / "tp.log").read_text()[-3000:]
    finally:
        os.killpg(tp.pid, signal.SIGINT)                  # Ctrl-C in the terminal: the whole group
        tp.wait(timeout=90)
    log = (tmp_path / "tp.log").read_text()
    assert all(not Path(f"/proc/{w}").exists() for w in workers), log[-3000:]
    # Both ranks left by themselves (torchrun did not have to kill them), without an error;
    # torchrun itself reports the Ctrl-C it received as a SignalException traceback of its own.
    assert "forcefully exiting" not in log and "leaving the torchrun group" not in log, log[-3000:]
    assert "openai_api.py" not in log and "engine.py" not in log, log[-3000:]


@pytest.mark.timeout(300)
def test_tp_server_goes_down_when_a_rank_dies(cogvlm_ckpt, tmp_path):
    url, tp = _start(cogvlm_ckpt, tmp_path / "tp.log", 2)
    workers = _children(tp.pid)
    try:
        assert _ask(url, "hello") is not None
        follower = next(w for w in workers if _rank_of(w) == 1)
        os.kill(follower, signal.SIGKILL)
        rc = tp.wait(timeout=120)                          # torchrun ends the other rank, then itself
    finally:
        if tp.poll() is None:
            os.killpg(tp.pid, signal.SIGKILL)
    assert rc != 0
    assert all(not Path(f"/proc/{w}").exists() or Path(f"/proc/{w}/stat").read_text().split()[2] == "Z"
               for w in workers)
