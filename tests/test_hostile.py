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
    from utils.engine import BatchEngine, Request
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
