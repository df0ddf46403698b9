"""Train the bundled demo models from scratch on synthetic data, with the project's own
finetuning script in full-parameter mode (`make tiny-models`):

  1. synthetic data (utils/data/synthetic.py): training set (seed 0) and a held-out test set (seed 1)
  2. a BPE SentencePiece tokenizer on that corpus (LLaMA layout, digits split, byte fallback)
  3. a random model of the named config (models/config.py: tiny-cogvlm / tiny-cogagent)
  4. finetune_demo/finetune_<model>_demo.py --full under torchrun (resumes if interrupted)
  5. export to assets/checkpoints/tiny-<model>/ in bf16 (SAT layout + tokenizer/), then score it on
     the test set (utils/tiny/evaluate.py) and write eval.json beside it

  python utils/tiny/train.py --which cogvlm [--steps N] [--threads 1] --work build/tiny

`make tiny-models` trains both at once, one thread each (about 2 hours on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from utils.apps.tool import run_tool  # noqa: E402


def corpus_text(folders, version: str) -> str:
    """The tokenizer's training text: every question inside the model's prompt template, then
    its answer. (With the bare questions, the template words were too rare for a merge of
    their own: `Question:` took 6 tokens, `[/INST]` 7, about 80 tokens of every packed row.)"""
    from utils.chat.task_prompts import AGENT_TASK, CAPTION_WITH_BOXES, EXPRESSION_TO_BOX, BOX_TO_CAPTION
    from utils.chat.templates import IMAGE_MARK, build_prompt
    lines = [*AGENT_TASK, *CAPTION_WITH_BOXES, *EXPRESSION_TO_BOX, *BOX_TO_CAPTION]
    for f in folders:
        for lab in sorted((f / "labels").glob("*.json")):
            for x in json.loads(lab.read_text())["qa"]:
                # (the chat template ends in a space; the answer is encoded on its own, "▁"-led)
                prompt = build_prompt(x["question"], [], version).replace(IMAGE_MARK, "").rstrip()
                lines.append(f"{prompt} {x['answer']}")
    return "\n".join(lines) + "\n"


# The recipe of the committed checkpoints: optimizer steps of 16 images (full model), steps that
# first train only the image encoder(s) on the per-patch object loss (a fraction of the cost of
# a full step), and training images; chosen so that both models train together in under 2 hours
# on 2 cores.
# extra_presence: how many balanced presence questions the training set adds per scene
# (utils/data/synthetic.py).
RECIPES = {"cogvlm": {"steps": 1450, "encoder_steps": 1500, "n_train": 26000, "extra_presence": 0},
           "cogagent": {"steps": 950, "encoder_steps": 800, "n_train": 21000, "extra_presence": 4}}


def step(msg):
    print(f"== {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", choices=["cogvlm", "cogagent"], required=True)
    p.add_argument("--work", type=Path, default=ROOT / "build" / "tiny")
    p.add_argument("--out", type=Path, default=None, help="default: assets/checkpoints/tiny-<which>")
    p.add_argument("--n_train", type=int, default=None, help="training images (default: RECIPES)")
    p.add_argument("--n_test", type=int, default=300, help="held-out images")
    p.add_argument("--steps", type=int, default=None, help="full optimizer steps (default: RECIPES)")
    p.add_argument("--encoder_steps", type=int, default=None,
                   help="encoder-only steps before them (finetune --aux_warmup_iters; default: RECIPES)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--procs", type=int, default=1, help="data-parallel processes")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / procs)")
    p.add_argument("--max_length", type=int, default=512, help="packed row length cap (tokens)")
    p.add_argument("--extra_presence", type=int, choices=range(0, 5), default=None, metavar="N",
                   help="N more presence questions per training scene, half yes (default: RECIPES)")
    p.add_argument("--aux_object_loss", type=float, default=0.5, help="weight of the per-patch object loss (0 = off)")
    a = p.parse_args(argv)
    a.steps = a.steps or RECIPES[a.which]["steps"]
    a.n_train = a.n_train or RECIPES[a.which]["n_train"]
    if a.extra_presence is None:
        a.extra_presence = RECIPES[a.which]["extra_presence"]
    if a.encoder_steps is None:
        a.encoder_steps = RECIPES[a.which]["encoder_steps"] if a.aux_object_loss else 0
    return a


def make_data(a, work: Path, tag: str) -> tuple[Path, Path]:
    """(training set, held-out set), generated once (a `done` file marks a finished folder)."""
    from utils.data.synthetic import generate
    train, test = work / f"data-{tag}-train", work / f"data-{a.which}-test"
    for folder, n, seed in ((train, a.n_train, 0), (test, a.n_test, 1)):
        if not (folder / "done").exists():
            step(f"synthetic data: {n} images -> {folder}")
            shutil.rmtree(folder, ignore_errors=True)
            # training adds shorter texts (1-3 characters) as easier examples and, per recipe,
            # balanced presence questions; the held-out set keeps the task's 4-6 characters and one
            generate(folder, n, seed, gui=a.which == "cogagent", text_min_len=1 if folder == train else 4,
                     extra_presence=a.extra_presence if folder == train else 0)
            (folder / "done").write_text("ok")
    return train, test


def make_init(name: str, train: Path, work: Path, tag: str) -> tuple[Path, Path]:
    """(tokenizer folder, randomly initialised checkpoint), each made once."""
    from models.checkpoint import save_sat_checkpoint
    from models.config import get_config
    from models.loading import build_model
    from utils.chat.tokenizer import train_sentencepiece
    cfg = get_config(name)
    tok_dir = work / f"tokenizer-{tag}"
    if not (tok_dir / "tokenizer.model").exists():
        step(f"tokenizer -> {tok_dir}")
        train_sentencepiece(corpus_text([train], cfg.version), tok_dir, vocab_size=cfg.vocab_size,
                            split_digits=True, symbols=("[[", "]]"))
    init = work / f"init-{tag}"
    if not (init / "latest").exists():
        step(f"random {name} -> {init}")
        import torch
        torch.manual_seed(0)
        save_sat_checkpoint(build_model(cfg), cfg, init)
        shutil.copytree(tok_dir, init / "tokenizer", dirs_exist_ok=True)
    return tok_dir, init


def train_model(a, init: Path, train: Path, run: Path) -> bool:
    """finetune_demo's full training under torchrun (resumed where a run stopped); True when it succeeded."""
    step(f"training tiny-{a.which}: {a.encoder_steps} encoder-only + {a.steps} full steps, "
         f"batch {a.batch_size} x {a.procs} process(es) -> {run}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc-per-node={a.procs}",
           str(ROOT / "finetune_demo" / f"finetune_{a.which}_demo.py"), "--from_pretrained", str(init),
           "--train_data", str(train), "--save", str(run), "--full", "--train_iters", str(a.encoder_steps + a.steps),
           "--batch_size", str(a.batch_size), "--lr", str(a.lr), "--warmup", "0.03", "--min_lr_ratio", "0.05",
           "--weight_decay", "0.01", "--save_interval", "250", "--log_interval", "50", "--max_length", str(a.max_length),
           "--pack_questions", "--aux_object_loss", str(a.aux_object_loss),
           "--aux_warmup_iters", str(a.encoder_steps)]
    if (run / "latest").exists():
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads or max(1, (os.cpu_count() or 2) // a.procs))}
    return subprocess.run(cmd, env=env).returncode == 0


def export(run: Path, out: Path, tok_dir: Path, a) -> None:
    """The last training checkpoint in bf16, with its tokenizer and a TRAINING.md."""
    import torch
    from models.checkpoint import atomic_write, read_sat_state_dict
    from models.config import ModelConfig
    step(f"export (bf16) -> {out}")
    trained = ModelConfig.load(run / "model_config.json")
    sd = read_sat_state_dict(run, trust=False)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    it = (run / "latest").read_text().strip()
    state = {"module": {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}}
    atomic_write(out / "1" / "mp_rank_00_model_states.pt", lambda f: torch.save(state, f))
    trained.save(out / "model_config.json")
    shutil.copytree(tok_dir, out / "tokenizer")
    (out / "latest").write_text("1")
    images = a.batch_size * a.procs
    (out / "TRAINING.md").write_text(f"Trained by utils/tiny/train.py: {a.encoder_steps} encoder-only steps "
                                     f"({a.encoder_steps * images} images) then {a.steps} full steps "
                                     f"({a.steps * images} images), checkpoint {it}, "
                                     f"batch {a.batch_size} x {a.procs}, lr {a.lr}, "
                                     f"from {a.n_train} synthetic training images"
                                     f"{f', {a.extra_presence} extra presence questions per scene' if a.extra_presence else ''}.\n")


def main(argv=None) -> int:
    from models.loading import BUNDLED_DIR
    a = parse_args(argv)
    name = f"tiny-{a.which}"
    work, out = a.work, a.out or BUNDLED_DIR / name
    # Folders built from the training set name its options: a cached one is reused only when they match.
    tag = f"{a.which}-presence{a.extra_presence}" if a.extra_presence else a.which
    train, test = make_data(a, work, tag)
    tok_dir, init = make_init(name, train, work, tag)
    run = work / f"run-{tag}"
    if not train_model(a, init, train, run):
        print("error: training failed (run again to resume from the last checkpoint)", file=sys.stderr)
        return 1
    export(run, out, tok_dir, a)
    step(f"evaluate on {test}")
    from utils.tiny.evaluate import main as eval_main
    return eval_main(["--from_pretrained", str(out), "--data", str(test), "--json", str(out / "eval.json")])


if __name__ == "__main__":
    run_tool(main)
