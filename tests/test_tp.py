"""Tensor parallelism under torchrun (gloo, CPU) and the merge/split utility."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.config import get_config
from models.tp import merge_tensors, shard_tensor
from utils.tiny.create_test_model import create

ROOT = Path(__file__).resolve().parent.parent
# PYTHONFAULTHANDLER: a rank that aborts (SIGABRT) prints where each of its threads was.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "LOGLEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "COGVLM_DIST_TIMEOUT": "60", "PYTHONFAULTHANDLER": "1"}


def torchrun_cmd(n: int, *args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={n}", *map(str, args)]


def torchrun(n: int, *args, timeout=240, stdin=None):
    return subprocess.run(torchrun_cmd(n, *args), capture_output=True, text=True, timeout=timeout,
                          cwd="/", env=ENV, input=stdin)


def rank_errors(stderr: str) -> str:
    """What a failed run's ranks said (their C++ aborts, Python errors and the faulthandler's
    stacks come before the long summary torchrun prints last), then that summary's end."""
    words = ("terminate called", "what()", "Error", "error:", "Exception", "Fatal Python",
             "thread 0x", "Thread 0x", '  File "')
    lines = [ln for ln in stderr.splitlines() if any(w in ln for w in words)]
    return "\n".join(lines[:80]) + "\n...\n" + stderr[-1500:]


def merge(*args):
    return subprocess.run([sys.executable, str(ROOT / "utils" / "merge_model.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd="/", env=ENV)


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    """A tiny CogAgent whose every attention has 8 heads, so that it splits over 8 ranks."""
    cfg = copy.deepcopy(get_config("tiny-test-cogagent"))
    cfg.num_attention_heads = 8
    cfg.eva.num_attention_heads = 8
    cfg.eva.hidden_size = 64
    cfg.eva.inner_hidden_size = 128
    cfg.cross.num_attention_heads = 8
    cfg.cross.hidden_size = 64
    cfg.cross.inner_hidden_size = 96
    cfg.cross.attn_hidden_size, cfg.cross.attn_head_dim = 64, 8
    return create(cfg, tmp_path_factory.mktemp("wide") / "wide-cogagent", seed=3)


def reference(ckpt, image, dtype="float32"):
    sys.path.insert(0, str(ROOT / "tests"))
    import tp_worker
    return tp_worker.run(str(ckpt), str(image), dtype=dtype)


def tolerance(ckpt, image, ref: dict, dtype: str) -> float:
    """How far tensor-parallel logits may be from one process's. The row-parallel layers sum
    each rank's partial product, a reduction order one process never uses: fp32 rounds it at
    2^-24 relative (1e-4 absolute leaves 100x room at these logit sizes). bf16 rounds every
    layer's output at 2^-9 relative; the tiny models' logits reach about 4, and a few roundings
    of 4 x 2^-8 compound through 2-3 layers to about 0.1: 0.15, or twice one process's own bf16
    error against fp32 where that is larger (it grows with the logits and the CPU's kernels)."""
    if dtype == "float32":
        return 1e-4
    own = (ref["logits"].float() - reference(ckpt, image)["logits"].float()).abs().max()
    return max(0.15, 2 * float(own))


def check_tp(ckpt, image, n, tmp_path, ref_ckpt=None, dtype="float32"):
    out = tmp_path / f"tp{n}.pt"
    p = torchrun(n, ROOT / "tests" / "tp_worker.py", ckpt, image, out, dtype)
    assert p.returncode == 0, rank_errors(p.stderr)
    got, ref = torch.load(out), reference(ref_ckpt or ckpt, image, dtype)
    tol = tolerance(ref_ckpt or ckpt, image, ref, dtype)
    assert (got["logits"].float() - ref["logits"].float()).abs().max() < tol
    if dtype == "float32":
        assert got["answer"] == ref["answer"] and got["text_only"] == ref["text_only"]
    for tp_steps, one_steps in zip(got["paths"], ref["paths"]):
        same_greedy_until_a_near_tie(tp_steps, one_steps, tol)


def same_greedy_until_a_near_tie(tp_steps: list, one_steps: list, tol: float) -> None:
    """Greedy decoding along each model's own tokens: equal logits (within tol) while the
    tokens agree; where they first differ, one process's best two logits were within the
    rounding (2 x tol) of each other: a tie that either reduction order may break."""
    for step, (a, b) in enumerate(zip(tp_steps, one_steps)):
        assert (a - b).abs().max() < tol, step
        if a.argmax() != b.argmax():
            top2 = b.topk(2).values
            assert top2[0] - top2[1] < 2 * tol, (step, top2)
            return


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("which", ["cogvlm_ckpt", "cogagent_ckpt"])
def test_tp2_equals_tp1(which, dtype, request, image_file, tmp_path):
    check_tp(request.getfixturevalue(which), image_file, 2, tmp_path, dtype=dtype)


@pytest.mark.parametrize("n", [4, 8])
def test_tp_4_and_8_ranks(n, wide_ckpt, image_file, tmp_path):
    check_tp(wide_ckpt, image_file, n, tmp_path)


def test_mp_shard_files_load_per_rank(cogagent_ckpt, image_file, tmp_path):
    """An MP=2 checkpoint: each rank reads its own file; same logits as the MP=1 original."""
    split = tmp_path / "mp2"
    assert merge("--from_pretrained", cogagent_ckpt, "--save", split, "--mp", 2).returncode == 0
    assert sorted(p.name for p in (split / "1").iterdir()) == ["mp_rank_00_model_states.pt",
                                                               "mp_rank_01_model_states.pt"]
    check_tp(split, image_file, 2, tmp_path, ref_ckpt=cogagent_ckpt)


def test_cli_one_shot_same_under_torchrun(cogvlm_ckpt, image_file, tmp_path):
    args = ["--from_pretrained", cogvlm_ckpt, "--image", image_file, "--query", "What is it?",
            "--max_new_tokens", 12, "--output_dir", tmp_path]
    plain = subprocess.run([sys.executable, str(ROOT / "basic_demo" / "cli_demo_sat.py"), *map(str, args)],
                           capture_output=True, text=True, timeout=120, cwd="/", env=ENV)
    assert plain.returncode == 0, plain.stderr
    tp = torchrun(2, ROOT / "basic_demo" / "cli_demo_sat.py", *args)
    assert tp.returncode == 0, rank_errors(tp.stderr)
    assert tp.stdout.strip() == plain.stdout.strip() != ""


def test_cli_interactive_under_torchrun(cogagent_ckpt, image_file, tmp_path):
    """Rank 0 reads the terminal; the follower runs every turn with it, then both exit."""
    session = f"{image_file}\nWhat is it?\nclear\n\nText only\nstop\n"
    p = torchrun(2, ROOT / "basic_demo" / "cli_demo_sat.py", "--from_pretrained", cogagent_ckpt,
                 "--max_new_tokens", 6, "--output_dir", tmp_path, stdin=session)
    assert p.returncode == 0, rank_errors(p.stderr)
    assert p.stdout.count("Model: ") == 2


def test_a_failing_rank_stops_every_rank(cogvlm_ckpt, image_file, tmp_path):
    split = tmp_path / "mp2"
    assert merge("--from_pretrained", cogvlm_ckpt, "--save", split, "--mp", 2).returncode == 0
    (split / "1" / "mp_rank_01_model_states.pt").write_bytes(b"not a checkpoint")
    t = time.time()
    p = torchrun(2, ROOT / "basic_demo" / "cli_demo_sat.py", "--from_pretrained", split,
                 "--image", image_file, "--query", "hi", timeout=120)
    assert p.returncode != 0 and time.time() - t < 90
    assert "error (rank 1)" in p.stderr and "mp_rank_01_model_states.pt" in p.stderr
    assert 'cli_demo_sat.py", line' not in p.stderr        # no traceback from our code


def test_a_rank_killed_mid_session_ends_the_run(cogvlm_ckpt, tmp_path):
    """kill -9 of rank 1 while rank 0 waits for input: torchrun stops rank 0 too; no hang."""
    import signal
    cmd = torchrun_cmd(2, ROOT / "basic_demo" / "cli_demo_sat.py", "--from_pretrained", cogvlm_ckpt,
                       "--output_dir", tmp_path)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd="/", env=ENV)
    try:
        assert proc.stdout.read(10) == "Please ent"                 # rank 0 is at the prompt
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        ranks = {}
        for pid in workers:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ranks[int(next(e for e in env if e.startswith(b"RANK=")).split(b"=")[1])] = int(pid)
        os.kill(ranks[1], signal.SIGKILL)
        t = time.time()
        proc.wait(timeout=60)
        assert proc.returncode != 0 and time.time() - t < 60
    finally:
        proc.kill()


def test_wrong_number_of_ranks_is_explained(cogvlm_ckpt, tmp_path):
    split = tmp_path / "mp2"
    assert merge("--from_pretrained", cogvlm_ckpt, "--save", split, "--mp", 2).returncode == 0
    p = subprocess.run([sys.executable, str(ROOT / "basic_demo" / "cli_demo_sat.py"), "--from_pretrained",
                        str(split), "--query", "hi", "--image", ""], capture_output=True, text=True,
                       timeout=60, cwd="/", env=ENV)
    assert p.returncode == 1 and "--nproc-per-node 2" in p.stderr and "Traceback" not in p.stderr


# ---- merge / split --------------------------------------------------------------------
def _module(path: Path) -> dict:
    return torch.load(path, weights_only=True)["module"]


@pytest.mark.parametrize("n", [2, 4])
def test_split_then_merge_is_bit_identical(cogagent_ckpt, tmp_path, n):
    split, merged = tmp_path / "split", tmp_path / "merged"
    p = merge("--from_pretrained", cogagent_ckpt, "--save", split, "--mp", n)
    assert p.returncode == 0, p.stderr
    p = merge("--from_pretrained", split, "--save", merged, "--mp", 1)
    assert p.returncode == 0, p.stderr
    a, b = _module(cogagent_ckpt / "1" / "mp_rank_00_model_states.pt"), _module(merged / "1" / "mp_rank_00_model_states.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert '"model_parallel_size": 1' in (merged / "model_config.json").read_text()
    assert f'"model_parallel_size": {n}' in (split / "model_config.json").read_text()
    # the shards are really cut: a QKV piece holds 1/n of the rows
    s0 = _module(split / "1" / "mp_rank_00_model_states.pt")
    key = "transformer.layers.0.attention.query_key_value.weight"
    assert s0[key].shape[0] * n == a[key].shape[0]


def test_merge_refuses_to_overwrite_and_bad_input(cogvlm_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    p = merge("--from_pretrained", cogvlm_ckpt, "--save", out, "--mp", 2)
    assert p.returncode == 1 and "refusing to overwrite" in p.stderr
    p = merge("--from_pretrained", tmp_path / "nope", "--save", tmp_path / "o2", "--mp", 2)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    p = merge("--from_pretrained", cogvlm_ckpt, "--save", tmp_path / "o3", "--merge-lora")
    assert p.returncode == 1 and "not a LoRA checkpoint" in p.stderr


def test_strided_shard_roundtrip():
    t = torch.arange(48.0).reshape(12, 4)
    parts = [shard_tensor(t, 0, 3, r, 2) for r in range(2)]
    # rank 0 holds the first half of each of the q, k, v blocks
    assert parts[0][:, 0].tolist() == [0, 4, 16, 20, 32, 36]
    assert torch.equal(merge_tensors(parts, 0, 3), t)
    with pytest.raises(ValueError, match="does not split"):
        shard_tensor(t, 0, 3, 0, 8)


EXIT_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from models.tp import exit_process, init_distributed
rank, world = init_distributed("cpu", timeout_s=60)
print(f"rank {{rank}} of {{world}} done")        # block-buffered (a pipe): exit_process flushes it
exit_process(int(sys.argv[1]))
"""


@pytest.mark.parametrize("n", [1, 2])
def test_exit_process_keeps_the_status_and_the_output(n, tmp_path):
    """exit_process ends every rank without gloo's teardown: the status is the script's and
    nothing printed is lost (stdout is a pipe, block-buffered: exit_process must flush it)."""
    script = tmp_path / "exit_worker.py"
    script.write_text(EXIT_SCRIPT.format(root=str(ROOT)))
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}
    for status in (0, 3):
        # --no-python: torchrun would start the ranks with `python -u` (unbuffered)
        cmd = (torchrun_cmd(n, "--no-python") if n > 1 else []) + [sys.executable]
        p = subprocess.run([*cmd, str(script), str(status)], capture_output=True, text=True,
                           timeout=120, cwd="/", env=env)
        assert (p.returncode == 0) == (status == 0), rank_errors(p.stderr)
        if n == 1:
            assert p.returncode == status
        if status == 0:                 # (after a failed rank torchrun stops the others)
            # every rank's line is there (the ranks share the pipe: their writes may interleave)
            assert all(f"rank {r} of {n} done" in p.stdout for r in range(n)), p.stdout
