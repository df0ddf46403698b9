"""The interactive terminal loop shared by the command-line demos (the original's loop):
ask for an image path (Enter alone = text-only chat), then questions; `clear` starts over
with a new image, `stop` exits. Errors are printed and the loop goes on."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

from models.generate import PromptTooLong
from utils.chat.image import ImageError

PROMPTS = {
    False: {"image": "Please enter the image path (press Enter for plain text chat): ",
            "human": "Human: ", "model": "Model: "},
    True: {"image": "请输入图像路径（直接回车进入纯文本对话）：", "human": "用户：", "model": "模型："},
}


def add_cli_args(p) -> None:
    """The terminal demos' own flags (cli_demo_sat.py, cli_demo_hf.py)."""
    p.add_argument("--stream_chat", action="store_true", help="print the answer as it is generated")
    p.add_argument("--chinese", action="store_true", help="Chinese prompts in the terminal")
    p.add_argument("--image", default=None, help="one-shot mode: image path ('' for text only)")
    p.add_argument("--output_dir", default="grounding_output",
                   help="where images with the answer's boxes drawn are saved")
    p.add_argument("--query", default=None, help="one-shot mode: the question")


def print_answer(deltas: Iterable[str], stream: bool, prefix: str = "", out=sys.stdout) -> str:
    """Print an answer streamed delta by delta, or whole at the end; return it."""
    out.write(prefix)
    out.flush()
    parts = []
    for d in deltas:
        parts.append(d)
        if stream:
            out.write(d)
            out.flush()
    response = "".join(parts).strip()
    if not stream:
        out.write(response)
    out.write("\n")
    out.flush()
    return response


def interactive(answer: Callable, open_image: Callable, chinese: bool = False,
                on_answer: Callable = None) -> None:
    """Ctrl-C while typing ends the session quietly; during an answer it stops that answer."""
    try:
        _loop(answer, open_image, chinese, on_answer)
    except KeyboardInterrupt:
        print()


def _ask(prompt: str) -> Optional[str]:
    """One line from the user; None ends the session (Ctrl-D, or `stop`)."""
    try:
        line = input(prompt)
    except EOFError:
        return None
    return None if line.strip() == "stop" else line


def _loop(answer: Callable, open_image: Callable, chinese: bool, on_answer: Callable) -> None:
    """answer(query, history, image, prefix) -> response text (printed by it);
    open_image(path) -> image context or None; on_answer(response, image) e.g. draws boxes."""
    text = PROMPTS[chinese]
    while True:
        path = _ask(text["image"])
        if path is None:
            return
        try:
            image = open_image(path.strip()) if path.strip() else None
        except ImageError as e:
            print(f"Error: {e}")
            continue
        history = []
        while True:
            query = _ask(text["human"])
            if query is None:
                return
            if query.strip() == "clear":
                break
            if not query.strip():
                continue                                # an empty line is no question
            try:
                response = answer(query, history, image, text["model"])
            except PromptTooLong as e:
                print(f"\nError: {e}")
                continue
            except KeyboardInterrupt:                   # Ctrl-C stops this answer, not the session
                print("\n[answer stopped]")
                continue
            history = history + [(query, response)]
            if on_answer is not None:
                on_answer(response, image)


def save_boxes(response: str, image, out_dir: str = "grounding_output") -> None:
    """When an answer holds boxes, save the image with them drawn and say where."""
    if image is None:
        return
    from pathlib import Path
    import time
    from utils.chat.grounding import draw_groundings, parse_groundings
    groundings = parse_groundings(response)
    if groundings:
        path = Path(out_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}.png"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            draw_groundings(image.image, groundings).save(path)
        except OSError as e:
            print(f"[boxes not saved: cannot write {path}: {e.strerror or e}]")
            return
        print(f"[boxes drawn: {path.resolve()}]")


def one_shot(args) -> bool:
    """Whether the CLI answers once and exits (--image or --query given) rather than chatting."""
    return args.query is not None or args.image is not None


def run(args, answer: Callable, open_image: Callable) -> int:
    """One-shot mode when --image or --query is given (exit status 0/1/2), else the loop."""
    on_answer = lambda response, image: save_boxes(response, image, args.output_dir)  # noqa: E731
    try:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --output_dir {args.output_dir} cannot be created: {e.strerror or e}", file=sys.stderr)
        return 1
    if not os.access(args.output_dir, os.W_OK):
        print(f"error: --output_dir {args.output_dir} is not writable", file=sys.stderr)
        return 1
    if one_shot(args):
        if args.query is None:
            print("error: --image needs --query", file=sys.stderr)
            return 2
        try:
            image = open_image(args.image or "")
            on_answer(answer(args.query, [], image), image)
        except (ImageError, PromptTooLong) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
            return 130
        return 0
    interactive(answer, open_image, args.chinese, on_answer)
    return 0
