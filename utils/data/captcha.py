"""Generate a captcha dataset in the Kaggle layout the original finetuning example used
(a folder of `<label>.png` images), with the `captcha` package (the Kaggle set cannot be
downloaded here). Labels are unique, 4-6 characters by default, seeded.

  python utils/data/captcha.py --out data/captcha_all --n 1000 --seed 0
  python utils/split_dataset.py --src data/captcha_all --dst data/captcha --seed 0
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from any directory
from utils.apps.flags import ArgumentParser  # noqa: E402
from utils.apps.tool import reports_errors, run_tool  # noqa: E402

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def generate(out: Path, n: int, seed: int = 0, length=(5, 5), alphabet: str = ALPHABET,
             width: int = 200, height: int = 60) -> list[Path]:
    try:
        from captcha.image import ImageCaptcha
    except ImportError:
        raise ImportError("the captcha package is missing: pip install captcha") from None
    if len(alphabet) ** length[1] < n:
        raise ValueError(f"cannot make {n} unique labels of at most {length[1]} characters")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    render = ImageCaptcha(width=width, height=height)
    # the package draws its noise with the `random` module: seed it for reproducible images
    random.seed(seed)
    labels, paths = set(), []
    with tqdm(total=n, desc="captchas", unit="img") as bar:
        while len(paths) < n:
            label = "".join(rng.choice(alphabet) for _ in range(rng.randint(*length)))
            if label in labels:
                continue
            labels.add(label)
            path = out / f"{label}.png"
            render.generate_image(label).save(path)
            paths.append(path)
            bar.update(1)
    return paths


@reports_errors(ImportError)
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min_len", type=int, default=5)
    p.add_argument("--max_len", type=int, default=5)
    a = p.parse_args(argv)
    if a.out.exists() and any(a.out.iterdir()):
        raise FileExistsError(f"{a.out} is not empty; refusing to mix datasets")
    generate(a.out, a.n, a.seed, (a.min_len, a.max_len))
    print(f"wrote {a.n} images to {a.out}")
    return 0


if __name__ == "__main__":
    run_tool(main)
