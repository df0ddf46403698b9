"""Hostile input and bad luck, through the real entry points: one request must never hurt
another, and a tool must never destroy data."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.test_openai_api import KEY, _image_msg, client, png_url, server  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "LOGLEVEL": "WARNING", "HF_HUB_OFFLINE": "1"}


def script(path, *args, timeout=180):
    p = subprocess.run([sys.executable, str(ROOT / path), *map(str, args)], capture_output=True,
                       text=True, timeout=timeout, cwd="/", env=ENV)
    return p.returncode, p.stdout, p.stderr


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- one request, one row
def test_tiny_temperature_does_not_end_the_other_streams(client):  # noqa: F811 - the fixture
    """A temperature inside the accepted range (2.94e-38) used to make sampling produce
    inf/NaN and fail every row of the batch."""
    def ask(i, temperature):
        stream = client.chat.completions.create(
            model="tiny-cogvlm", stream=True, max_tokens=12, temperature=temperature, seed=7,
            messages=[_image_msg(f"What is in picture {i}?", png_url(color=(20 * i, 90, 200)))])
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    alone = [ask(i, 0.7) for i in range(3)]
    with ThreadPoolExecutor(4) as pool:
        together = [pool.submit(ask, i, 0.7) for i in range(3)]
        evil = pool.submit(ask, 3, 2.94e-38)
        assert [f.result(timeout=120) for f in together] == alone
        assert isinstance(evil.result(timeout=120), str)          # treated as greedy: answered
    for t in (1e-300, 5e-324):
        r = client.chat.completions.create(model="tiny-cogvlm", max_tokens=4, temperature=t,
                                           messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].finish_reason in ("stop", "length")


def test_a_failing_row_ends_only_itself(cogvlm_ckpt, tokenizer):
    """Whatever goes wrong with one row during a batched decode step (here its stream's
    callback raises at its second token) ends that row with an error; the others finish with
    the answers they give alone."""
    from models import load_model
    from models.generate import GenerationConfig
    from utils.chat import prepare
    from utils.serving.engine import BatchEngine, Request
    model, _ = load_model(str(cogvlm_ckpt))
    gen = GenerationConfig(max_length=400)

    def run(names, broken=None):
        engine = BatchEngine(model, tokenizer, max_batch=4)
        results = {}
        try:
            for name in names:
                done, events = threading.Event(), []

                def emit(ev, events=events, done=done, name=name):
                    events.append(ev)
                    if name == broken and ev["type"] == "delta" and sum(e["type"] == "delta" for e in events) == 2:
                        raise RuntimeError("the client's stream broke")
                    if ev["type"] == "done":
                        done.set()
                engine.submit(Request(prepare(model, tokenizer, f"Question {name}?"), gen, 12, emit))
                results[name] = (done, events)
            for done, _ in results.values():
                assert done.wait(60)
        finally:
            engine.close()
        return {k: ("".join(e.get("text", "") for e in ev), ev[-1]) for k, (_, ev) in results.items()}

    alone = run(["a", "b"])
    together = run(["a", "bad", "b"], broken="bad")
    assert together["bad"][1]["finish_reason"] == "error"
    assert all(together[k][1]["finish_reason"] in ("stop", "length") for k in "ab")
    assert [together[k][0] for k in "ab"] == [alone[k][0] for k in "ab"]


def test_sampling_is_finite_for_every_accepted_temperature():
    from models.generate import GenerationConfig, sample
    logits = torch.tensor([[3.0, 1.0, -2.0, 0.5]])
    for t in (2.94e-38, 1e-300, 1e-6, 1e-5, 0.01, 2.0):
        tok = sample(logits, GenerationConfig(top_k=0, top_p=1.0, temperature=t),
                     torch.Generator().manual_seed(0))
        assert 0 <= int(tok) < 4
        if t < 1e-3:
            assert int(tok) == 0


# ---------------------------------------------------------------- tools never destroy data
@pytest.fixture()
def hf_dir(cogvlm_ckpt, tmp_path):
    rc, out, err = script("utils/convert_checkpoint.py", "sat2hf", "--src", cogvlm_ckpt, "--dst", tmp_path / "hf")
    assert rc == 0, err
    return tmp_path / "hf"


def test_overwrite_never_destroys_a_good_output(cogvlm_ckpt, hf_dir, tmp_path):
    good = snapshot(hf_dir)
    # A bad source (a weight of the wrong shape) with --overwrite: refused, output untouched.
    bad = shutil.copytree(cogvlm_ckpt, tmp_path / "bad")
    f = bad / "1" / "mp_rank_00_model_states.pt"
    state = torch.load(f, weights_only=True)
    state["module"]["mixins.eva.boi"] = torch.zeros(1, 1, 7)
    torch.save(state, f)
    rc, out, err = script("utils/convert_checkpoint.py", "sat2hf", "--src", bad, "--dst", hf_dir, "--overwrite")
    assert rc == 1 and "mixins.eva.boi" in err and "Traceback" not in err
    assert snapshot(hf_dir) == good
    # hf2sat from an HF source with a wrong-shaped tensor onto a good SAT directory.
    sat_out = tmp_path / "sat"
    assert script("utils/convert_checkpoint.py", "hf2sat", "--src", hf_dir, "--dst", sat_out)[0] == 0
    good_sat = snapshot(sat_out)
    broken = shutil.copytree(hf_dir, tmp_path / "broken-hf")
    from safetensors.torch import load_file, save_file
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    t = load_file(str(shard))
    k = next(k for k in t if "inv_freq" not in k)
    t[k] = torch.zeros(3, 3)
    save_file(t, str(shard))
    rc, out, err = script("utils/convert_checkpoint.py", "hf2sat", "--src", broken, "--dst", sat_out, "--overwrite")
    assert rc == 1 and k in err and snapshot(sat_out) == good_sat
    # A successful --overwrite replaces the old output whole.
    rc, out, err = script("utils/convert_checkpoint.py", "hf2sat", "--src", hf_dir, "--dst", sat_out, "--overwrite")
    assert rc == 0 and snapshot(sat_out) == good_sat
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]       # no temporaries left


def test_destination_equal_to_or_inside_the_source_is_refused(cogvlm_ckpt, hf_dir, tmp_path):
    src = shutil.copytree(cogvlm_ckpt, tmp_path / "src")
    before = snapshot(src)
    for dst in (src, src / "inner"):
        rc, out, err = script("utils/convert_checkpoint.py", "sat2hf", "--src", src, "--dst", dst, "--overwrite")
        assert rc == 1 and "wrote" not in out and "source" in err
    before_hf = snapshot(hf_dir)
    rc, out, err = script("utils/convert_checkpoint.py", "hf2sat", "--src", hf_dir, "--dst", hf_dir, "--overwrite")
    assert rc == 1 and "wrote" not in out
    assert snapshot(src) == before and snapshot(hf_dir) == before_hf


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(cogvlm_ckpt, tmp_path):
    mine = tmp_path / "my-documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "config.json").write_text("{}")
    rc, out, err = script("utils/convert_checkpoint.py", "sat2hf", "--src", cogvlm_ckpt, "--dst", mine, "--overwrite")
    assert rc == 1 and "does not look like a checkpoint" in err and "thesis.tex" in err
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_written_files_have_normal_permissions(hf_dir, cogvlm_ckpt, tmp_path):
    rc, out, err = script("utils/merge_model.py", "--from_pretrained", cogvlm_ckpt, "--save", tmp_path / "mp2", "--mp", "2")
    assert rc == 0, err
    for d in (hf_dir, tmp_path / "mp2"):
        files = [p for p in d.rglob("*") if p.is_file()]
        assert files and all(stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044 for p in files)
        assert stat.S_IMODE(d.stat().st_mode) & 0o055 == 0o055


def test_merge_refuses_a_missing_or_duplicated_rank(cogvlm_ckpt, tmp_path):
    mp2 = tmp_path / "mp2"
    assert script("utils/merge_model.py", "--from_pretrained", cogvlm_ckpt, "--save", mp2, "--mp", "2")[0] == 0
    missing = shutil.copytree(mp2, tmp_path / "missing")
    (missing / "1" / "mp_rank_01_model_states.pt").unlink()
    rc, out, err = script("utils/merge_model.py", "--from_pretrained", missing, "--save", tmp_path / "o1", "--mp", "1")
    assert rc == 1 and "missing" in err and not (tmp_path / "o1").exists()
    dup = shutil.copytree(mp2, tmp_path / "dup")
    shutil.copy(dup / "1" / "mp_rank_00_model_states.pt", dup / "1" / "mp_rank_01_model_states.pt")
    rc, out, err = script("utils/merge_model.py", "--from_pretrained", dup, "--save", tmp_path / "o2", "--mp", "1")
    assert rc == 1 and "duplicated" in err and not (tmp_path / "o2").exists()
    json.loads((mp2 / "model_config.json").read_text())          # the source is untouched


# ---------------------------------------------------------------- the server, attacked
def start_server(ckpt, log, *extra, env=None):
    """The server as users start it (env: the whole environment; default: ours with the API key)."""
    from tests.test_openai_api import _free_port, wait_healthy
    port = _free_port()
    env = env if env is not None else {**ENV, "COGVLM_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "openai_demo" / "openai_api.py"), "--from_pretrained",
                             str(ckpt), "--port", str(port), *map(str, extra)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd="/")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, log)
    return url, proc


def post(url, body=None, raw=None, key=KEY, timeout=60):
    import httpx
    r = httpx.post(url + "/v1/chat/completions", content=raw if raw is not None else json.dumps(body),
                   headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}, timeout=timeout)
    return r.status_code, r.json()


def user(text="hi", image=None):
    from tests.test_openai_api import _image_msg
    return {"messages": [_image_msg(text, image) if image else {"role": "user", "content": text}], "max_tokens": 4}


def test_client_mistakes_are_400_in_the_openai_shape(server):  # noqa: F811 - the fixture
    import base64
    import httpx
    import random
    url = server[0]
    rnd = random.Random(0)
    fuzzed = bytearray(base64.b64decode(png_url((40, 30)).split(",")[1]))
    for i in rnd.sample(range(40, len(fuzzed)), 12):
        fuzzed[i] = rnd.randrange(256)
    cases = {
        "nested 5000 deep": '{"messages": ' + "[" * 5000 + "]" * 5000 + "}",
        "a 5000-digit number": '{"messages": [{"role": "user", "content": "x"}], "max_tokens": ' + "9" * 5000 + "}",
        "seed 2**64": json.dumps({**user(), "seed": 2**64}),
        "lone surrogate": '{"messages": [{"role": "user", "content": "a \\ud800 b"}]}',
        "n: true": json.dumps({**user(), "n": True}),
        "fuzzed png": json.dumps(user("x", "data:image/png;base64," + base64.b64encode(bytes(fuzzed)).decode())),
        "bad image in a system message": json.dumps({"messages": [
            {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
            {"role": "user", "content": "hi"}]}),
        "temperature inf": '{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}',
    }
    for name, raw in cases.items():
        code, js = post(url, raw=raw.encode())
        assert code == 400 and set(js["error"]) >= {"message", "type", "code"}, (name, code, js)
    assert post(url, {**user(), "temperature": 1e-300})[0] == 200
    for method, path, status in (("GET", "/v1/completions", 404), ("POST", "/nope", 404),
                                 ("GET", "/v1/chat/completions", 405), ("GET", "/openapi.json", 404)):
        r = httpx.request(method, url + path, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == status and set(r.json()["error"]) >= {"message", "type", "code"}, (path, r.text)


def test_only_web_image_formats_are_decoded(server):  # noqa: F811 - the fixture
    import base64
    import io
    from PIL import Image
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, "BMP")
    for data in (eps, buf.getvalue()):
        code, js = post(server[0], user("x", "data:image/png;base64," + base64.b64encode(data).decode()))
        assert code == 400 and "not an image file" in js["error"]["message"], js
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(jpeg, "JPEG")           # judged by content: fine
    assert post(server[0], user("x", "data:image/png;base64," + base64.b64encode(jpeg.getvalue()).decode()))[0] == 200


def test_a_big_body_does_not_stall_others(server):  # noqa: F811 - the fixture
    import time
    import httpx
    url = server[0]
    big = json.dumps({"messages": [{"role": "user", "content": "word " * 3_600_000}]}).encode()   # 18 MB
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, url, None, big, KEY, 120)
        worst = 0.0
        while not slow.done():
            t = time.perf_counter()
            assert httpx.get(url + "/health", timeout=30).status_code == 200
            worst = max(worst, time.perf_counter() - t)
            time.sleep(0.02)
        code, js = slow.result()
    assert code == 400 and js["error"]["code"] == "context_length_exceeded"
    assert worst < 1.0, f"/health took {worst:.2f} s while a big body was parsed"


def test_half_open_connections_are_closed(cogvlm_ckpt, tmp_path):
    import socket
    import time
    url, proc = start_server(cogvlm_ckpt, tmp_path / "log", "--header-timeout", "1")
    try:
        host, port = url.rsplit(":", 1)[0][7:], int(url.rsplit(":", 1)[1])
        socks = []
        for i in range(60):
            s = socket.create_connection((host, port))
            if i % 2:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")        # a head that never ends
            socks.append(s)
        time.sleep(2.5)
        for s in socks:
            s.settimeout(5)
            assert s.recv(100) == b""                                      # closed by the server
            s.close()
        assert post(url, user())[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_queued_big_images_hold_only_model_sized_tensors(cogvlm_ckpt, tmp_path):
    """32 queued requests with 4000x4000 16-bit PNGs (about 120 KB each) used to take the
    server from 0.5 GB to 3.2 GB: each held its decoded picture until its turn."""
    import base64
    import io
    import numpy as np
    from PIL import Image
    url, proc = start_server(cogvlm_ckpt, tmp_path / "log", "--max-batch", "1", "--max-queue", "64",
                             "--max-image-pixels", "20000000", "--max-tokens", "64")

    def peak_rss():
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    try:
        arr = np.zeros((4000, 4000, 3), np.uint16)
        arr[::7, :, 0] = 60000
        buf = io.BytesIO()
        Image.fromarray(arr[:, :, 0]).save(buf, "PNG")                      # 16-bit greyscale
        data = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        assert post(url, {**user("warm up", data), "max_tokens": 2})[0] == 200
        before = peak_rss()
        with ThreadPoolExecutor(32) as pool:
            codes = list(pool.map(lambda i: post(url, {**user(f"picture {i}", data), "max_tokens": 16}, timeout=300)[0],
                                  range(32)))
        assert codes == [200] * 32
        grown = peak_rss() - before
        assert grown < 400e6, f"peak RSS grew {grown / 1e6:.0f} MB with 32 queued 16-MP images"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def slow_image_server(delay: float, hosts: list = None):
    """A local HTTP server that answers 200 with 100 bytes, one every `delay` seconds; the Host
    header of each request goes to `hosts`."""
    import socketserver
    import time

    class Slow(socketserver.BaseRequestHandler):
        def handle(self):
            head = self.request.recv(1000)
            if hosts is not None:
                hosts.append(head.split(b"Host: ")[1].split(b"\r\n")[0].decode())
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            for _ in range(100):
                try:
                    self.request.sendall(b"x")
                except OSError:
                    return
                time.sleep(delay)

    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Slow)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_remote_fetch_has_one_deadline_and_refuses_shared_addresses(monkeypatch):
    import time
    sys.path.insert(0, str(ROOT / "openai_demo"))
    import openai_api
    from openai_demo import images
    srv = slow_image_server(0.1)                                         # 1 byte every 0.1 s
    monkeypatch.setattr(images, "checked_address", lambda host: "127.0.0.1")   # the test host only
    t = time.monotonic()
    with pytest.raises(openai_api.ApiError, match="longer than 1 s"):
        images.fetch_remote_image(f"http://img.test:{srv.server_address[1]}/a.png",
                                  openai_api.Limits(remote_timeout_s=1.0))
    assert time.monotonic() - t < 3
    srv.shutdown()
    monkeypatch.undo()
    for host in ("100.64.1.2", "10.0.0.1", "127.0.0.1", "169.254.1.1", "::ffff:10.0.0.1", "0.0.0.0"):
        with pytest.raises(openai_api.ApiError, match="not a public address"):
            images.checked_address(host)


# ---------------------------------------------------------------- the command line
@pytest.mark.parametrize("args,expect", [
    (["--seed", str(2**64)], "--seed: 18446744073709551616 is out of range"),
    (["--max_new_tokens", "-3"], "--max_new_tokens: -3 is out of range"),
    (["--repetition_penalty", "0"], "--repetition_penalty: 0 is out of range (above 0)"),
    (["--top_p", "2"], "--top_p: 2 is out of range"),
    (["--temperature", "nan"], "--temperature: nan is out of range"),
    (["--max_length", "x"], "--max_length: 'x' is not a whole number"),
    (["--output_dir", "/proc/no/such/dir"], "--output_dir /proc/no/such/dir cannot be created"),
])
def test_cli_bad_flags_are_one_line(args, expect, cogvlm_ckpt):
    rc, out, err = script("basic_demo/cli_demo_sat.py", "--from_pretrained", cogvlm_ckpt, "--query", "hi", *args)
    assert rc != 0 and expect in err and "Traceback" not in err, err


def test_cli_fuzzed_images_and_tiny_temperature(cogvlm_ckpt, image_file, tmp_path):
    import random
    rnd = random.Random(1)
    data = bytearray(image_file.read_bytes())
    for i in rnd.sample(range(30, len(data)), 20):
        data[i] = rnd.randrange(256)
    (tmp_path / "fuzzed.png").write_bytes(bytes(data))
    (tmp_path / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rnd.randbytes(3000))
    for name in ("fuzzed.png", "noise.png"):
        rc, out, err = script("basic_demo/cli_demo_sat.py", "--from_pretrained", cogvlm_ckpt, "--image",
                              tmp_path / name, "--query", "hi", "--output_dir", tmp_path)
        assert "Traceback" not in err and (rc == 0 or err.strip().startswith("error:")), err
    rc, out, err = script("basic_demo/cli_demo_sat.py", "--from_pretrained", cogvlm_ckpt, "--image", image_file,
                          "--query", "hi", "--temperature", "1e-40", "--top_k", "0", "--max_new_tokens", "5",
                          "--output_dir", tmp_path)
    assert rc == 0 and "Traceback" not in err, err
    # A bad image in interactive mode is reported and the session goes on.
    session = f"{tmp_path / 'noise.png'}\n{image_file}\nWhat is it?\nstop\n"
    p = subprocess.run([sys.executable, str(ROOT / "basic_demo" / "cli_demo_sat.py"), "--from_pretrained",
                        str(cogvlm_ckpt), "--max_new_tokens", "4", "--output_dir", str(tmp_path)],
                       input=session, capture_output=True, text=True, timeout=120, cwd="/", env=ENV)
    assert p.returncode == 0 and "Error: " in p.stdout and "Model: " in p.stdout and "Traceback" not in p.stderr


def test_ctrl_c_stops_the_answer_and_keeps_the_session(tmp_path, tokenizer_dir):
    """A model slow enough to interrupt (4096 tokens of context, random weights whose LM head
    row of </s> is zero, so that greedy decoding never ends the answer early); Ctrl-C mid-answer
    prints [answer stopped] and the next question is answered. The demo runs as from a terminal,
    with Ctrl-C's default handling: a test suite started in the background by a shell inherits
    SIGINT ignored, and so would the demo (its answer then simply runs to the end)."""
    import signal
    import time
    import pexpect
    from models import get_config, save_sat_checkpoint
    from models.loading import build_model
    cfg = get_config("tiny-test-cogvlm")
    cfg.num_layers, cfg.hidden_size, cfg.inner_hidden_size, cfg.max_sequence_length = 6, 256, 512, 4096
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.lm_head.weight[cfg.eos_token_id] = 0      # logit 0, below the largest of the others
    ckpt = save_sat_checkpoint(model, cfg, tmp_path / "slow")
    shutil.copytree(tokenizer_dir, ckpt / "tokenizer")
    child = pexpect.spawn(sys.executable, [str(ROOT / "basic_demo" / "cli_demo_sat.py"), "--from_pretrained",
                                           str(ckpt), "--max_length", "4096", "--stream_chat", "--output_dir",
                                           str(tmp_path)], env=ENV, cwd="/", timeout=120, encoding="utf-8",
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect("image path")
    child.sendline("")
    child.expect("Human: ")
    child.sendline("Tell me a very long story.")
    child.expect("Model: ")
    time.sleep(1.5)
    child.sendintr()
    child.expect(r"\[answer stopped\]")
    child.expect("Human: ")
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before


# ---------------------------------------------------------------- finetuning data
def test_bad_rows_never_end_a_finetuning_run(tmp_path):
    from PIL import Image
    from tests.test_finetune import finetune, finetune_cmd, losses, ENV as FT_ENV
    from utils.tiny.create_test_model import create
    base = create("tiny-test-cogvlm", tmp_path / "base", seed=0)
    data = tmp_path / "sft"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()

    def row(name, label, image=True):
        if image:
            Image.new("RGB", (64, 48), (len(name) * 20 % 255, 100, 200)).save(data / "images" / f"{name}.jpg")
        if isinstance(label, str):
            (data / "labels" / f"{name}.json").write_text(label)
        else:
            (data / "labels" / f"{name}.json").write_text(json.dumps(label))

    for i in range(4):
        row(f"ok{i}", {"captions": [{"role": "caption", "content": f"a card {i}"}]})
    row("deep", '{"conversations": ' + "[" * 5000 + "]" * 5000 + "}")
    row("objects", {"qa": [{"question": "What?", "answer": "x"}], "objects": "abc"})
    row("dict", {"conversations": [{"role": "user", "content": {"text": "hi"}},
                                   {"role": "assistant", "content": "x"}]})
    row("long", {"conversations": [{"role": "user", "content": "word " * 600}, {"role": "assistant", "content": "x"}]})
    (data / "labels" / "folder.json").mkdir()
    Image.new("RGB", (64, 48)).save(data / "images" / "folder.jpg")
    Image.new("RGB", (640, 480), (1, 2, 3)).save(data / "images" / "trunc.jpg", quality=95)
    full = (data / "images" / "trunc.jpg").read_bytes()
    (data / "images" / "trunc.jpg").write_bytes(full[: len(full) // 2])
    row("trunc", {"captions": [{"content": "cut"}]}, image=False)
    save = tmp_path / "s"
    out = finetune(1, "--from_pretrained", base, "--train_data", data, "--save", save, "--train_iters", 2,
                   "--batch_size", 2, "--log_interval", 1, "--save_interval", 2, "--max_length", 400)
    assert "train samples: 4 (skipped 6)" in out, out
    assert len(losses(out)) == 2 and "nan" not in out.lower()
    # Temporaries of a save killed half-way are removed when the run resumes.
    (save / ".latestabcd1234").write_text("x")
    (save / "2" / ".mp_rank_00_model_states.ptabcd_123").write_bytes(b"partial")
    finetune(1, "--from_pretrained", base, "--train_data", data, "--save", save, "--train_iters", 3,
             "--batch_size", 2, "--log_interval", 1, "--save_interval", 3, "--max_length", 400, "--resume")
    assert not [p for p in save.rglob(".*") if p.is_file() and "ds_state" not in str(p)]
    # --resume without the optimizer state: one line, before any work.
    shutil.rmtree(save / "ds_state" / "3")
    p = subprocess.run(finetune_cmd(1, "finetune_cogvlm_demo.py", "--from_pretrained", base, "--train_data", data,
                                    "--save", save, "--train_iters", 4, "--resume"),
                       capture_output=True, text=True, timeout=300, cwd="/", env=FT_ENV)
    # Our one line comes first; what follows is torchrun's own report of a rank that exited 1.
    assert p.returncode != 0 and p.stderr.startswith("error: --resume:") and "state of step 3" in p.stderr
    assert "utils/training/" not in p.stderr                        # no traceback of ours


# ---------------------------------------------------------------- configs and weight files
@pytest.mark.parametrize("change,field", [
    ({"num_layers": 1000000}, "num_layers"), ({"hidden_size": 1e9}, "hidden_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"), ({"inner_hidden_size": -5}, "inner_hidden_size"),
    ({"eva_args": None}, "eva_args"), ({"eva_args.patch_size": 0}, "patch_size"),
    ({"num_layers": 3}, "num_layers"),                        # the weights hold 2
])
def test_config_sizes_are_checked_before_anything_is_built(change, field, cogvlm_ckpt, tmp_path):
    import time
    ck = shutil.copytree(cogvlm_ckpt, tmp_path / "c")
    cfg = json.loads((ck / "model_config.json").read_text())
    for k, v in change.items():
        if k.startswith("eva_args."):
            cfg["eva_args"][k.split(".", 1)[1]] = v
        else:
            cfg[k] = v
    (ck / "model_config.json").write_text(json.dumps(cfg))
    t = time.monotonic()
    rc, out, err = script("basic_demo/cli_demo_sat.py", "--from_pretrained", ck, "--query", "hi")
    assert rc == 1 and field in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    assert time.monotonic() - t < 60


def test_broken_weight_files_are_one_line(cogvlm_ckpt, tmp_path):
    from safetensors.torch import save_file
    rc, out, err = script("utils/convert_checkpoint.py", "sat2hf", "--src", cogvlm_ckpt, "--dst", tmp_path / "hf")
    assert rc == 0, err
    hf = tmp_path / "hf"

    def hf_cli(d):
        return script("basic_demo/cli_demo_hf.py", "--from_pretrained", d, "--query", "hi", "--output_dir", tmp_path)

    def with_header(name, edit):
        d = shutil.copytree(hf, tmp_path / name)
        f = d / "model-00001-of-00001.safetensors"
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        edit(header)
        new = json.dumps(header).encode()
        new += b" " * (n - len(new)) if len(new) <= n else b""
        f.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
        return d

    key = "model.embed_tokens.weight"
    cases = {"no dtype": lambda h: h[key].pop("dtype"),
             "bad shape": lambda h: h[key].__setitem__("shape", [3, -1]),
             "offsets": lambda h: h[key].__setitem__("data_offsets", [0, 10])}
    for name, edit in cases.items():
        rc, out, err = hf_cli(with_header(name.replace(" ", "_"), edit))
        assert rc == 1 and key in err and "Traceback" not in err, (name, err)
    # A .bin whose pickle would run code: refused, the code never runs.
    evil = shutil.copytree(hf, tmp_path / "evil")
    for f in evil.glob("model*"):
        f.unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"model.embed_tokens.weight": Payload()}, evil / "pytorch_model.bin")
    rc, out, err = hf_cli(evil)
    assert rc == 1 and "pytorch_model.bin" in err and "Traceback" not in err and not marker.exists(), err
    # NaN weights are reported at load, with the key.
    nan = shutil.copytree(cogvlm_ckpt, tmp_path / "nan")
    f = nan / "1" / "mp_rank_00_model_states.pt"
    state = torch.load(f, weights_only=True)
    state["module"]["transformer.layers.1.mlp.dense_4h_to_h.weight"][3, 3] = float("nan")
    torch.save(state, f)
    rc, out, err = script("basic_demo/cli_demo_sat.py", "--from_pretrained", nan, "--query", "hi")
    assert rc == 1 and "transformer.layers.1.mlp.dense_4h_to_h.weight holds 1 NaN" in err, err
    hf_nan = shutil.copytree(hf, tmp_path / "hf-nan")
    from safetensors.torch import load_file
    t = load_file(str(hf_nan / "model-00001-of-00001.safetensors"))
    t["lm_head.weight"][0, 0] = float("inf")
    save_file(t, str(hf_nan / "model-00001-of-00001.safetensors"))
    rc, out, err = hf_cli(hf_nan)
    assert rc == 1 and "lm_head.weight holds 1 NaN or infinite" in err, err


def test_slow_remote_fetches_do_not_starve_data_requests(cogvlm_ckpt, tokenizer, monkeypatch):
    """8 fetches from a server that sends 1 byte every 0.2 s must not hold up a data: request
    (they used to take every worker thread: an innocent request waited 28.5 s)."""
    import time
    import httpx
    import uvicorn
    sys.path.insert(0, str(ROOT / "openai_demo"))
    import openai_api
    from models import load_model
    from tests.test_openai_api import _free_port
    from utils.serving.engine import BatchEngine

    hosts = []
    slow = slow_image_server(0.2, hosts)
    from openai_demo import images
    monkeypatch.setattr(images, "checked_address", lambda host: "127.0.0.1")
    model, _ = load_model(str(cogvlm_ckpt))
    engine = BatchEngine(model, tokenizer, max_batch=4)
    app = openai_api.create_app(model, tokenizer, "tiny", engine, openai_api.Limits(remote_timeout_s=8.0),
                                allow_remote_images=True)
    port = _free_port()
    api = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=api.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(url + "/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    try:
        remote = user("x", f"http://img.example:{slow.server_address[1]}/a.png")
        with ThreadPoolExecutor(9) as pool:
            fetches = [pool.submit(post, url, remote) for _ in range(8)]
            time.sleep(1.0)                                        # they are all waiting on bytes
            t = time.monotonic()
            code, _ = post(url, user("y", png_url()))
            waited = time.monotonic() - t
            results = [f.result(timeout=60) for f in fetches]
        assert code == 200 and waited < 5, f"a data: request waited {waited:.1f} s behind slow fetches"
        assert all(c == 400 and "longer than 8 s" in js["error"]["message"] for c, js in results), results
        assert set(hosts) == {f"img.example:{slow.server_address[1]}"}    # asked by name, at the checked address
    finally:
        api.should_exit = True
        engine.close()
        slow.shutdown()


def test_cli_reads_image_urls_and_skips_empty_questions(cogvlm_ckpt, image_file, tmp_path):
    """The original accepted image URLs: http(s) images are downloaded (size cap, deadline);
    an empty line is not sent to the model as a question."""
    import functools
    import http.server
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(image_file.parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/{image_file.name}"
    try:
        session = f"{url}\n\n   \nWhat is it?\nstop\n"
        p = subprocess.run([sys.executable, str(ROOT / "basic_demo" / "cli_demo_sat.py"), "--from_pretrained",
                            str(cogvlm_ckpt), "--max_new_tokens", "4", "--output_dir", str(tmp_path)],
                           input=session, capture_output=True, text=True, timeout=120, cwd="/", env=ENV)
        assert p.returncode == 0 and "Error" not in p.stdout, p.stdout + p.stderr
        assert p.stdout.count("Model: ") == 1                              # blank lines were skipped
        missing = url.rsplit("/", 1)[0] + "/nope.png"
        rc, out, err = script("basic_demo/cli_demo_sat.py", "--from_pretrained", cogvlm_ckpt, "--image", missing,
                              "--query", "hi", "--output_dir", tmp_path)
        assert rc == 1 and "HTTP 404" in err and "Traceback" not in err
    finally:
        httpd.shutdown()


# ---------------------------------------------------------------- finetune launchers
@pytest.mark.parametrize("env,extra,expect", [
    ({"MODEL": "/no/such/model"}, [], "no such checkpoint directory: /no/such/model"),
    ({"MP_SIZE": "2"}, ["--use_qlora"], "--use_qlora with --model_parallel_size > 1 is not supported"),
    ({"DATA": "/no/such/data"}, [], "--train_data /no/such/data/train is not a directory"),
])
def test_launchers_check_first_in_one_line(env, extra, expect, cogvlm_ckpt, tmp_path):
    """Checked in one process, in seconds, before torchrun starts any rank (which used to
    take 74 s and print the error twice plus a torchrun traceback)."""
    import time
    from utils.data.captcha import generate
    from utils.split_dataset import split
    generate(tmp_path / "all", 20, seed=0)
    split(tmp_path / "all", tmp_path / "data", seed=0)
    full_env = {**ENV, "MODEL": str(cogvlm_ckpt), "DATA": str(tmp_path / "data"), "SAVE": str(tmp_path / "save"),
                "NUM_GPUS": "2", "PYTHON": sys.executable, **env}
    t = time.monotonic()
    for launcher in ("finetune_cogvlm_lora.sh", "finetune_cogagent_lora.sh"):
        p = subprocess.run(["bash", str(ROOT / "finetune_demo" / launcher), *extra], capture_output=True, text=True,
                           timeout=120, cwd="/", env=full_env)
        errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert p.returncode != 0 and len(errors) == 1 and expect in errors[0], p.stderr
        assert "Traceback" not in p.stderr and "starting" not in p.stderr      # no rank was started
    assert time.monotonic() - t < 60


def test_flags_in_both_spellings_and_bundled_names_in_the_converter(tmp_path):
    rc, out, err = script("basic_demo/cli_demo_sat.py", "--from-pretrained", "tiny-cogvlm", "--image",
                          ROOT / "assets" / "scene.png", "--query", "How many shapes are there?",
                          "--max-new-tokens", "4", "--output-dir", tmp_path)
    assert rc == 0 and out.strip() == "3", err
    rc, out, err = script("utils/convert_checkpoint.py", "sat2hf", "--src", "tiny-cogvlm", "--dst", tmp_path / "hf")
    assert rc == 0 and (tmp_path / "hf" / "config.json").is_file(), err
    rc, out, err = script("openai_demo/openai_api.py", "--max_length", "100", "--max-batch", "2", "--help")
    assert rc == 0


def test_make_demo_passes_any_query(tmp_path):
    """`make demo DEMO_QUERY=...` with double quotes, `$` and backslashes (every agent task is
    quoted): the query reaches the CLI unchanged. A stand-in venv (this interpreter) keeps
    make from installing anything."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".core").touch()
    outputs = []
    for query in ('What steps do I need to take to "click the Open button"?(with grounding)',
                  'a "quoted" $HOME `date` \\n query'):
        p = subprocess.run(["make", "-s", "-C", str(ROOT), "demo", f"VENV={venv}", "DEMO_MODEL=tiny-cogagent",
                            "DEMO_IMAGE=assets/gui.png", f"DEMO_QUERY={query}"],
                           capture_output=True, text=True, timeout=180, env=ENV)
        assert p.returncode == 0 and "unrecognized arguments" not in p.stderr, p.stderr
        outputs.append(p.stdout)
    assert "CLICK" in outputs[0] and "Open" in outputs[0], outputs[0]      # the agent task, intact
