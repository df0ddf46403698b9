"""The bundled demo models (assets/checkpoints/tiny-cogvlm, tiny-cogagent): their scores on
the held-out synthetic set against the goals, the same greedy answers when a test replays the
first held-out questions (by name, from another directory), and the HF front end after
conversion giving the SAT front end's answer."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.loading import BUNDLED_DIR
from utils.tiny.evaluate import GOALS
from utils.data.synthetic import generate

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["tiny-cogvlm", "tiny-cogagent"]
# Goals the committed checkpoints do not reach, with the figure they reach on the whole
# held-out set (eval.json, 300 images); README "Bundled demo models" says what limits each.
# The test holds the models to these figures, and to the goal everywhere else.
NOT_REACHED = {
    ("tiny-cogvlm", "colour"): 0.567, ("tiny-cogvlm", "count"): 0.88, ("tiny-cogvlm", "presence"): 0.541,
    ("tiny-cogvlm", "box_iou50"): 0.433, ("tiny-cogvlm", "text"): 0.0,
    ("tiny-cogagent", "colour"): 0.596, ("tiny-cogagent", "shape"): 0.60, ("tiny-cogagent", "count"): 0.725,
    ("tiny-cogagent", "presence"): 0.543, ("tiny-cogagent", "box_iou50"): 0.316, ("tiny-cogagent", "text"): 0.0,
    ("tiny-cogagent", "agent_box_iou50"): 0.464,
}


def read_eval(name: str) -> dict:
    return json.loads((BUNDLED_DIR / name / "eval.json").read_text())


def run(*cmd, cwd):
    p = subprocess.run([sys.executable, *map(str, cmd)], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.parametrize("name", MODELS)
def test_goals_or_recorded_figures(name):
    metrics = read_eval(name)["metrics"]
    expected = set(GOALS) - ({"agent_op_target", "agent_box_iou50"} if name == "tiny-cogvlm" else set())
    assert expected <= set(metrics)
    for k in expected:
        floor = NOT_REACHED.get((name, k), GOALS[k])
        assert metrics[k]["accuracy"] >= floor, f"{name} {k}: {metrics[k]['accuracy']:.1%} < {floor:.1%}"
        assert metrics[k]["n"] >= 50, f"{name} {k}: only {metrics[k]['n']} questions"


@pytest.mark.parametrize("name", MODELS)
def test_first_held_out_answers_replay(name, tmp_path):
    """The held-out set is seed 1: its first images are regenerated here, the model is found
    by name from another working directory, and greedy decoding repeats eval.json's answers."""
    data = tmp_path / "held-out"
    generate(data, 12, seed=1, gui=name == "tiny-cogagent")
    out = tmp_path / "eval.json"
    run(ROOT / "utils" / "tiny" / "evaluate.py", "--from_pretrained", name, "--data", data,
        "--limit", 48, "--json", out, cwd=tmp_path)
    got, want = json.loads(out.read_text())["answers"], read_eval(name)["answers"][:48]
    assert len(got) == 48 and [g[:3] for g in got] == [w[:3] for w in want]     # same questions
    same = sum(g[3] == w[3] for g, w in zip(got, want))
    assert same >= 0.9 * len(got), [(g[1], g[3], w[3]) for g, w in zip(got, want) if g[3] != w[3]]


@pytest.mark.parametrize("name,image,query", [
    ("tiny-cogvlm", "scene.png", "Where is the blue diamond?"),
    ("tiny-cogagent", "gui.png", 'What steps do I need to take to "click the Open button"?(with grounding)'),
])
def test_hf_conversion_gives_the_same_answer(name, image, query, tmp_path):
    """The one-shot CLI on a bundled image, then the same question to the HF conversion
    through cli_demo_hf.py: the same answer, and the boxes drawn by both. (A long answer may
    part at a near-tie late on: the two front ends compute in a different order; their logits
    agree to 1e-4, tests/test_hf.py.)"""
    hf = tmp_path / "hf"
    run(ROOT / "utils" / "convert_checkpoint.py", "sat2hf", "--src", BUNDLED_DIR / name, "--dst", hf, cwd=tmp_path)
    common = ["--image", ROOT / "assets" / image, "--query", query, "--top_k", 1]
    sat = run(ROOT / "basic_demo" / "cli_demo_sat.py", "--from_pretrained", name, *common,
              "--output_dir", tmp_path / "sat_boxes", cwd=tmp_path)
    out = run(ROOT / "basic_demo" / "cli_demo_hf.py", "--from_pretrained", hf, *common,
              "--output_dir", tmp_path / "hf_boxes", cwd=tmp_path)
    answer = lambda s: [ln for ln in s.splitlines() if not ln.startswith("[boxes drawn")]  # noqa: E731
    assert answer(sat) == answer(out) and "[[" in sat
    assert len(list((tmp_path / "sat_boxes").glob("*.png"))) == 1 == len(list((tmp_path / "hf_boxes").glob("*.png")))
