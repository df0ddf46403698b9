"""The command-line demos, run as real processes from another working directory."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "LOGLEVEL": "WARNING", "HF_HUB_OFFLINE": "1"}


OUT_DIR = tempfile.mkdtemp(prefix="cli-boxes-")          # never write into the working directory


def run(script, *args, stdin=None, timeout=120):
    args = (*args, "--output_dir", OUT_DIR)
    p = subprocess.run([sys.executable, str(ROOT / "basic_demo" / script), *map(str, args)],
                       input=stdin, capture_output=True, text=True, timeout=timeout, cwd="/", env=ENV)
    return p.returncode, p.stdout, p.stderr


def test_sat_one_shot_equals_interactive(cogvlm_ckpt, image_file):
    rc, out, err = run("cli_demo_sat.py", "--from_pretrained", cogvlm_ckpt, "--image", image_file,
                       "--query", "What is in the image?", "--max_new_tokens", 8)
    assert rc == 0, err
    one_shot = out.strip()
    session = f"{image_file}\nWhat is in the image?\nAnd then?\nclear\n\nA text-only question\nstop\n"
    rc, out, err = run("cli_demo_sat.py", "--from_pretrained", cogvlm_ckpt, "--max_new_tokens", 8,
                       "--stream_chat", stdin=session)
    assert rc == 0, err
    answers = [line.split("Model: ", 1)[1] for line in out.splitlines() if "Model: " in line]
    assert len(answers) == 3
    assert answers[0].strip() == one_shot
    assert "Traceback" not in err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_cli_matches_sat_cli(dtype, cogagent_ckpt, image_file, tmp_path):
    """Both front ends run the same model code on the same weights: the same answer, in fp32 and
    in bf16 (where the two CLIs' prompts and positions being equal is what makes it exact)."""
    from models.hf_io import sat_to_hf
    hf = sat_to_hf(cogagent_ckpt, tmp_path / "hf")
    q = ["--image", image_file, "--query", "Describe it.", "--max_new_tokens", 40, "--dtype", dtype]
    rc1, sat_out, err1 = run("cli_demo_sat.py", "--from_pretrained", cogagent_ckpt, *q)
    rc2, hf_out, err2 = run("cli_demo_hf.py", "--from_pretrained", hf, *q)
    assert rc1 == 0 and rc2 == 0, err1 + err2
    assert hf_out.strip() == sat_out.strip()
    # single-stream apps: no batch to be invariant against, single rows unpadded (even on CPU)
    assert "batch-invariant decoding" not in err1 + err2
    rc, out, err = run("cli_demo_hf.py", "--from_pretrained", hf, "--quant", "8",
                       stdin=f"{image_file}\nhi\nstop\n")
    assert rc == 0 and "Model: " in out, err


@pytest.mark.parametrize("script", ["cli_demo_sat.py", "cli_demo_hf.py"])
def test_clear_errors(script, cogvlm_ckpt, tmp_path):
    rc, out, err = run(script, "--from_pretrained", tmp_path / "nope", "--query", "hi")
    assert rc == 1 and "error:" in err and "Traceback" not in err
    if script == "cli_demo_sat.py":
        rc, out, err = run(script, "--from_pretrained", cogvlm_ckpt, "--image", tmp_path / "x.png", "--query", "hi")
        assert rc == 1 and "image not found" in err and "Traceback" not in err
        rc, out, err = run(script, "--from_pretrained", cogvlm_ckpt, "--query", "word " * 300,
                           "--max_length", 100)
        assert rc == 1 and "total length limit" in err


def test_boxes_in_answer_are_drawn(tmp_path, image_file, capsys):
    """A grounding answer makes the CLI save the image with its boxes and print the path."""
    from PIL import Image
    from utils.chat import ImageContext
    from utils.apps.cli import save_boxes
    from models import get_config
    ctx = ImageContext(image_file, get_config("tiny-test-cogvlm"))
    save_boxes("a red circle [[010,020,300,400]]", ctx, str(tmp_path / "out"))
    saved = list((tmp_path / "out").glob("*.png"))
    assert len(saved) == 1 and "boxes drawn" in capsys.readouterr().out
    assert Image.open(saved[0]).size == ctx.image.size
    save_boxes("no boxes here", ctx, str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()


def test_interactive_session_on_a_terminal(cogvlm_ckpt, image_file):
    """A real pseudo-terminal session (pexpect): image path, two questions, clear, a text-only
    question, stop; the first answer equals the one-shot answer."""
    pexpect = pytest.importorskip("pexpect")
    rc, out, err = run("cli_demo_sat.py", "--from_pretrained", cogvlm_ckpt, "--image", image_file,
                       "--query", "What is in the image?", "--max_new_tokens", 8)
    one_shot = out.strip()
    child = pexpect.spawn(sys.executable, [str(ROOT / "basic_demo" / "cli_demo_sat.py"), "--from_pretrained",
                                           str(cogvlm_ckpt), "--max_new_tokens", "8", "--output_dir", OUT_DIR],
                          env=ENV, cwd="/", encoding="utf-8", timeout=90)
    child.expect("image path")
    child.sendline(str(image_file))
    answers = []
    for q in ["What is in the image?", "And then?"]:
        child.expect("Human: ")
        child.sendline(q)
        child.expect("Model: (.*?)\r\n")
        answers.append(child.match.group(1).strip())
    child.expect("Human: ")
    child.sendline("clear")
    child.expect("image path")
    child.sendline("")
    child.expect("Human: ")
    child.sendline("A text-only question")
    child.expect("Model: ")
    child.expect("Human: ")
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert answers[0] == one_shot
