"""Command-line chat with a CogVLM / CogAgent SAT checkpoint.

Interactive (the original's loop): enter an image path (empty = text-only chat), then
questions; `clear` starts over with a new image, `stop` exits.
One-shot for scripts: --image PATH --query TEXT (--image '' for text only).
Model parallel: `torchrun --standalone --nnodes=1 --nproc-per-node=N basic_demo/cli_demo_sat.py ...`
splits the model over N processes; rank 0 reads the terminal, the others follow it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from any directory
from utils.apps.flags import ArgumentParser  # noqa: E402
from utils.apps.tool import run_tool  # noqa: E402

from utils.apps.args import add_generation_args, add_model_args, generation_config, load_or_report, setup_logging  # noqa: E402
from utils.chat import ImageContext, stream_chat  # noqa: E402
from utils.apps.cli import add_cli_args, one_shot, print_answer, run  # noqa: E402
from utils.serving.lockstep import Lockstep  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, single_stream=True)
    add_generation_args(p)
    add_cli_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    if args.compile is None and one_shot(args):
        args.compile = False                   # one answer, then exit: a background compile would go unused
    loaded = load_or_report(args)
    if loaded is None:
        return 1
    model, tok = loaded
    gen = generation_config(args)
    state = {"image": None}

    def set_image(pixels):                 # a decoded PIL image (rank 0 read the file) or None
        state["image"] = ImageContext(pixels, model.config) if pixels is not None else None

    def generate(query, history):
        return stream_chat(model, tok, query, history, state["image"], args.version, gen)

    step = Lockstep({"set_image": set_image, "generate": generate})
    if step.rank != 0:
        return step.follow()

    def open_image(path):
        if not path:
            step.call("set_image", None)
            return None
        pixels = ImageContext(path, model.config).image      # errors are raised here, on rank 0
        step.call("set_image", pixels)
        return state["image"]

    def answer(query, history, image, prefix=""):
        return print_answer(step.call("generate", query, history), args.stream_chat, prefix)

    with step:
        return run(args, answer, open_image)


if __name__ == "__main__":
    run_tool(main)                              # under torchrun: every rank leaves together
