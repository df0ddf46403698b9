"""Talk to openai_api.py with the official `openai` client: a multi-turn conversation about an
image, streamed and not streamed. Runs from any directory.

    python openai_demo/openai_api.py --from_pretrained cogvlm-chat-v1.1 &
    python openai_demo/openai_api_request.py --image assets/demo.png
"""
from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from any directory
from utils.apps.flags import ArgumentParser  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def data_url(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def main(argv=None) -> int:
    from openai import APIConnectionError, OpenAI, OpenAIError
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api_key", default=os.environ.get("COGVLM_API_KEY", "none"))
    p.add_argument("--image", type=Path, default=ROOT / "assets" / "demo.png")
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--query", default="What is in the image?", help="first question (with the image)")
    p.add_argument("--follow_up", default="Describe it in more detail.", help="second question (streamed)")
    a = p.parse_args(argv)
    if not a.image.is_file():
        print(f"error: image not found: {a.image}", file=sys.stderr)
        return 1
    client = OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0)
    try:
        model = client.models.list().data[0].id
        messages = [{"role": "user", "content": [
            {"type": "text", "text": a.query},
            {"type": "image_url", "image_url": {"url": data_url(a.image)}}]}]
        first = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                               max_tokens=a.max_tokens)
        answer = first.choices[0].message.content
        print(f"user: {a.query}\nassistant: {answer}\n  (usage: {first.usage.prompt_tokens} "
              f"prompt + {first.usage.completion_tokens} completion tokens)")
        messages += [{"role": "assistant", "content": answer},
                     {"role": "user", "content": a.follow_up}]
        print(f"user: {a.follow_up}\nassistant: ", end="", flush=True)
        for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                    max_tokens=a.max_tokens, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
    except APIConnectionError as e:        # nothing listening (or not an HTTP server): say where and how
        print(f"error: no server answered at {a.base_url} ({e.__cause__ or e}).\n"
              f"Start one first, e.g. `python openai_demo/openai_api.py --from_pretrained tiny-cogvlm` "
              f"(http://127.0.0.1:8000/v1), or pass --base_url URL of a running one.", file=sys.stderr)
        return 1
    except OpenAIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
