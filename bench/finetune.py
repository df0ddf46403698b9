"""Finetuning cost: LoRA vs full-parameter training of the same model, and fp32 vs bf16
autocast (`--dtype bfloat16` on CPU), through the real trainer (utils/training/finetune.py, DeepSpeed
ZeRO-2, one CPU process): median step time, peak RSS, trainable fraction. Each mode runs in
its own process, so that peak memory is its own.

  python bench/finetune.py [--json out.json]
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import bench_parser, cpu_features, write_json  # noqa: E402
from models import EVAConfig, ModelConfig  # noqa: E402
from utils.tiny.create_test_model import create  # noqa: E402

# A small CogVLM (about 150M parameters) that trains at a few steps per second on 2 cores.
SMALL = ModelConfig(num_layers=8, hidden_size=1024, num_attention_heads=16, inner_hidden_size=2816,
                    vocab_size=32000, max_sequence_length=1024, version="base",
                    eva=EVAConfig(num_layers=4, hidden_size=512, num_attention_heads=8,
                                  inner_hidden_size=2048, image_size=224))


def run(mode_args, ckpt, data, save, steps):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=1",
           str(ROOT / "finetune_demo" / "finetune_cogvlm_demo.py"), "--from_pretrained", str(ckpt),
           "--train_data", str(data), "--save", str(save), "--train_iters", str(steps), "--batch_size", "4",
           "--lr", "1e-4", "--log_interval", str(steps), "--save_interval", str(10**6), *mode_args]
    env = {**os.environ, "LOGLEVEL": "WARNING", "OMP_NUM_THREADS": str(os.cpu_count() or 2)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/").stdout
    m = re.search(r"trainable parameters: ([\d,]+) / ([\d,]+)", out)
    t = re.search(r"median step time ([0-9.]+) s, peak RSS ([0-9]+) MB", out)
    if not (m and t):
        raise RuntimeError(out[-2000:])
    return {"trainable": int(m.group(1).replace(",", "")), "total": int(m.group(2).replace(",", "")),
            "step_s": float(t.group(1)), "peak_rss_mb": float(t.group(2))}


# mode -> the trainer's flags
MODES = {"lora": ["--lora_rank", "10", "--dtype", "float32"],
         "lora_vit": ["--lora_rank", "10", "--lora_vit", "--dtype", "float32"],
         "full": ["--full", "--dtype", "float32"],
         "lora_bf16_autocast": ["--lora_rank", "10", "--dtype", "bfloat16"],
         "full_bf16_autocast": ["--full", "--dtype", "bfloat16"]}


def compare(res: dict) -> None:
    """The ratios between the modes, added to `res` and printed."""
    res["full_over_lora_step"] = res["full"]["step_s"] / res["lora"]["step_s"]
    res["full_over_lora_rss"] = res["full"]["peak_rss_mb"] / res["lora"]["peak_rss_mb"]
    print(f"full / LoRA: step time {res['full_over_lora_step']:.2f}x, peak RSS {res['full_over_lora_rss']:.2f}x")
    for name in ("lora", "full"):
        res[f"{name}_fp32_over_bf16_autocast_step"] = res[name]["step_s"] / res[f"{name}_bf16_autocast"]["step_s"]
        print(f"{name}: fp32 step / bf16 autocast step = {res[f'{name}_fp32_over_bf16_autocast_step']:.2f}x")


def main(argv=None) -> int:
    p = bench_parser(__doc__, steps=dict(default=12, help="training steps per mode"))
    a = p.parse_args(argv)
    from utils.data.captcha import generate
    res = {"config": "SMALL (8 layers, hidden 1024, ViT 4x512 at 224 px), batch 4, 1 process",
           "cpu_bf16_flags": cpu_features({"avx512_bf16", "amx_bf16"})}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = create(SMALL, tmp / "small", seed=0)
        generate(tmp / "data", 64, seed=0)
        for name, mode in MODES.items():
            r = run(mode, ckpt, tmp / "data", tmp / f"save-{name}", a.steps)
            r["trainable_fraction"] = r["trainable"] / r["total"]
            res[name] = r
            print(f"{name:9s} trainable {r['trainable']:>11,} / {r['total']:,} ({100 * r['trainable_fraction']:.2f}%)"
                  f"  step {r['step_s']:.3f} s  peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    compare(res)
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
