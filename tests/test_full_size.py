"""bench/full_size.py: the released sizes' benchmark, checked on a tiny config (the real run
needs ~15 GB and ~10 minutes): its flags, its JSON fields, the QLoRA step; and --quant through
a demo (quantized while loading, the rest oneDNN-packed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"model", "precision", "peak_rss_gb", "build_s", "image_s", "cross_image_s", "ttft_s",
          "decode_tok_s", "decode_frac_bw", "gemv_gbps"}


def test_full_size_help():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "full_size.py"), "--help"],
                       capture_output=True, text=True, timeout=120, cwd="/")
    assert p.returncode == 0 and "--json" in p.stdout and "cogagent-chat" in p.stdout


def test_full_size_tiny_run_writes_the_json(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "full_size.py"), "--model", "tiny-test-cogagent",
                        "--quant", "4", "--decode_steps", "2", "--qlora_step", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd="/")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert FIELDS <= r.keys()
    assert r["model"] == "tiny-test-cogagent" and r["precision"].startswith("int4 + vision int8")
    assert r["cross_image_s"] > 0 and r["ttft_s"] >= r["image_s"] + r["cross_image_s"]
    assert r["decode_tok_s"] > 0 and 0 < r["decode_frac_bw"] and r["peak_rss_gb"] > 0
    assert 0 < r["weights_gb"] < r["peak_rss_gb"]
    assert r["qlora_trainable"] > 0 and r["qlora_loss"] == r["qlora_loss"]       # finite


def test_cli_with_quant_answers(tmp_path):
    env = {**os.environ, "LOGLEVEL": "WARNING"}
    for quant in (["8"], ["4"], ["4", "--quant_group", "128"]):
        p = subprocess.run([sys.executable, str(ROOT / "basic_demo" / "cli_demo_sat.py"), "--from_pretrained",
                            "tiny-cogvlm", "--quant", *quant, "--dtype", "bfloat16", "--image",
                            str(ROOT / "assets" / "scene.png"), "--query", "How many shapes are there?",
                            "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                           cwd="/", env=env)
        assert p.returncode == 0 and p.stdout.strip() == "3", (quant, p.stderr[-2000:])
    p = subprocess.run([sys.executable, str(ROOT / "basic_demo" / "cli_demo_sat.py"), "--from_pretrained",
                        "tiny-cogvlm", "--quant", "4", "--quant_group", "100"], capture_output=True, text=True,
                       timeout=120, cwd="/", env=env)
    assert p.returncode == 2 and "--quant_group" in p.stderr and "Traceback" not in p.stderr
    for flags, says in ((["--quant_group", "128"], "add --quant"), (["--quant", "8", "--quant_group", "128"], "4-bit")):
        p = subprocess.run([sys.executable, str(ROOT / "basic_demo" / "cli_demo_sat.py"), "--from_pretrained",
                            "tiny-cogvlm", *flags, "--image", str(ROOT / "assets" / "scene.png"), "--query", "Hi"],
                           capture_output=True, text=True, timeout=120, cwd="/", env=env)
        assert p.returncode != 0 and says in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
