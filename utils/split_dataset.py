"""Split a dataset folder into train / valid / test (80 / 5 / 15 by default), seeded.

Captcha layout (files in one folder) or conversation layout (images/ + labels/, split by
sample id so that an image and its label stay together). Copies by default, --move moves;
refuses to write into a non-empty destination.

  python utils/split_dataset.py --src data/captcha_all --dst data/captcha --seed 0
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from any directory
from utils.apps.flags import ArgumentParser  # noqa: E402
from utils.apps.tool import reports_errors, run_tool  # noqa: E402


def split(src: Path, dst: Path, ratios=(0.8, 0.05, 0.15), seed: int = 0, move: bool = False) -> dict:
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty; refusing to overwrite")
    if abs(sum(ratios) - 1) > 1e-6 or min(ratios) < 0:
        raise ValueError(f"ratios {ratios} must be non-negative and sum to 1")
    conv = (src / "images").is_dir() and (src / "labels").is_dir()
    if conv:
        units = sorted(p.stem for p in (src / "labels").glob("*.json"))
    else:
        units = sorted(p.name for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    if not units:
        raise ValueError(f"{src} holds no samples")
    random.Random(seed).shuffle(units)
    n = len(units)
    n_train, n_valid = int(round(n * ratios[0])), int(round(n * ratios[1]))
    parts = {"train": units[:n_train], "valid": units[n_train:n_train + n_valid],
             "test": units[n_train + n_valid:]}
    op = shutil.move if move else shutil.copy2
    for name, items in parts.items():
        out = dst / name
        if conv:
            (out / "images").mkdir(parents=True, exist_ok=True)
            (out / "labels").mkdir(parents=True, exist_ok=True)
            images = {p.stem: p for p in (src / "images").iterdir()}
            for stem in items:
                op(str(src / "labels" / f"{stem}.json"), str(out / "labels" / f"{stem}.json"))
                if stem in images:
                    op(str(images[stem]), str(out / "images" / images[stem].name))
        else:
            out.mkdir(parents=True, exist_ok=True)
            for fname in items:
                op(str(src / fname), str(out / fname))
    return {k: len(v) for k, v in parts.items()}


@reports_errors()
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, type=Path)
    p.add_argument("--dst", required=True, type=Path)
    p.add_argument("--ratios", type=float, nargs=3, default=(0.8, 0.05, 0.15), metavar=("TRAIN", "VALID", "TEST"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--move", action="store_true", help="move files instead of copying")
    a = p.parse_args(argv)
    counts = split(a.src, a.dst, tuple(a.ratios), a.seed, a.move)
    print(", ".join(f"{k}: {v}" for k, v in counts.items()) + f" -> {a.dst}")
    return 0


if __name__ == "__main__":
    run_tool(main)
