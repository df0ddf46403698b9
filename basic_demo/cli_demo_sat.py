"""Command-line chat with a CogVLM / CogAgent SAT checkpoint.

Interactive (the original's loop): enter an image path (empty = text-only chat), then
questions; `clear` starts over with a new image, `stop` exits.
One-shot for scripts: --image PATH --query TEXT (--image '' for text only).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from any directory

from models import CheckpointError, ModelNotFound  # noqa: E402
from models.generate import PromptTooLong  # noqa: E402
from utils.args import add_generation_args, add_model_args, generation_config, load_from_args, setup_logging  # noqa: E402
from utils.chat import ImageContext, stream_chat  # noqa: E402
from utils.image import ImageError  # noqa: E402
from utils.tokenizer import TokenizerError  # noqa: E402

PROMPTS = {
    False: {"image": "Please enter the image path (press Enter for plain text chat): ",
            "human": "Human: ", "model": "Model: "},
    True: {"image": "请输入图像路径（直接回车进入纯文本对话）：", "human": "用户：", "model": "模型："},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_generation_args(p)
    p.add_argument("--stream_chat", action="store_true", help="print the answer as it is generated")
    p.add_argument("--chinese", action="store_true", help="Chinese prompts in the terminal")
    p.add_argument("--image", default=None, help="one-shot mode: image path ('' for text only)")
    p.add_argument("--query", default=None, help="one-shot mode: the question")
    return p.parse_args(argv)


def answer(model, tok, query, history, image, args, out=sys.stdout, prefix=""):
    """Print one answer (streamed or whole) and return the new history."""
    out.write(prefix)
    out.flush()
    parts = []
    for delta in stream_chat(model, tok, query, history, image, args.version, generation_config(args)):
        parts.append(delta)
        if args.stream_chat:
            out.write(delta)
            out.flush()
    response = "".join(parts).strip()
    if not args.stream_chat:
        out.write(response)
    out.write("\n")
    out.flush()
    return list(history) + [(query, response)]


def open_image(path: str, model):
    return ImageContext(path.strip(), model.config) if path.strip() else None


def interactive(model, tok, args) -> None:
    text = PROMPTS[args.chinese]
    while True:
        try:
            path = input(text["image"])
        except EOFError:
            return
        if path.strip() == "stop":
            return
        try:
            image = open_image(path, model)
        except ImageError as e:
            print(f"Error: {e}")
            continue
        history = []
        while True:
            try:
                query = input(text["human"])
            except EOFError:
                return
            if query.strip() == "clear":
                break
            if query.strip() == "stop":
                return
            try:
                history = answer(model, tok, query, history, image, args, prefix=text["model"])
            except PromptTooLong as e:
                print(f"\nError: {e}")


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        model, tok = load_from_args(args)
    except (ModelNotFound, CheckpointError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.query is not None or args.image is not None:
        if args.query is None:
            print("error: --image needs --query", file=sys.stderr)
            return 2
        try:
            answer(model, tok, args.query, [], open_image(args.image or "", model), args)
        except (ImageError, PromptTooLong) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    interactive(model, tok, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
