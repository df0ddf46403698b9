"""Command-line chat through the transformers front end (HF-format checkpoints such as
THUDM/cogvlm-chat-hf or THUDM/cogagent-chat-hf, or the output of utils/convert_checkpoint.py),
with model.generate() and a TextIteratorStreamer. No trust_remote_code.

Interactive loop as cli_demo_sat.py; one-shot with --image/--query (--image '' = text only).
"""
from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from any directory
from utils.apps.flags import ArgumentParser  # noqa: E402

import torch  # noqa: E402

from models import CheckpointError  # noqa: E402
from models.generate import token_budget  # noqa: E402
from utils.apps.args import (add_dtype_args, add_generation_args, dtype_from_args, generation_config,  # noqa: E402
                        load_or_report, setup_logging)
from utils.chat import ImageContext, build_hf_inputs  # noqa: E402
from utils.apps.cli import print_answer, run  # noqa: E402
from utils.chat.tokenizer import DEFAULT_TOKENIZER, Tokenizer, resolve_tokenizer  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from_pretrained", default="THUDM/cogagent-chat-hf",
                   help="HF checkpoint directory, or a hub name found in the local HF cache")
    p.add_argument("--local_tokenizer", default=DEFAULT_TOKENIZER)
    p.add_argument("--version", default=None, choices=["base", "chat", "chat_old", "vqa"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_dtype_args(p)
    p.add_argument("--quant", type=int, choices=[4, 8], default=None)
    add_generation_args(p)
    p.add_argument("--stream_chat", action="store_true")
    p.add_argument("--chinese", action="store_true")
    p.add_argument("--image", default=None)
    p.add_argument("--output_dir", default="grounding_output",
                   help="where images with the answer's boxes drawn are saved")
    p.add_argument("--query", default=None)
    return p.parse_args(argv)


def resolve_hf_dir(name: str) -> Path:
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    from models.loading import ModelNotFound, resolve_pretrained
    try:
        return resolve_pretrained(name)              # a released or bundled name on disk (SAT format too)
    except ModelNotFound:
        pass
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not available offline
        raise CheckpointError(f"{name!r} is neither a directory nor in the local Hugging Face cache; "
                              f"download it once (huggingface-cli download {name}) or convert a SAT "
                              f"checkpoint with utils/convert_checkpoint.py sat2hf") from None


def load(args):
    from models.hf_io import load_hf_model
    path = resolve_hf_dir(args.from_pretrained)
    model = load_hf_model(path, dtype_from_args(args), args.device)
    if args.quant:
        from models.quantize import quantize
        quantize(model, args.quant)
    tok = Tokenizer(resolve_tokenizer(args.local_tokenizer, path))
    return model, tok


def generate_stream(model, tok, query, history, image, args):
    """Yield text deltas from model.generate() through a TextIteratorStreamer."""
    from transformers import TextIteratorStreamer
    gen = generation_config(args)
    inputs = build_hf_inputs(model, tok, [(query, history, image)], args.version)
    T = inputs["input_ids"].shape[1]
    budget = token_budget(T, int(inputs["token_type_ids"].sum()), gen, model.cfg.max_sequence_length)
    inputs = {k: (v.to(model.device) if isinstance(v, torch.Tensor) else
                  [[t.to(model.device) for t in row] for row in v]) for k, v in inputs.items()}
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kw = dict(max_new_tokens=budget, streamer=streamer, repetition_penalty=gen.repetition_penalty,
              eos_token_id=model.cfg.eos_token_id, pad_token_id=model.cfg.pad_token_id)
    if gen.greedy:
        kw["do_sample"] = False
    else:
        kw.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
        if gen.seed is not None:
            torch.manual_seed(gen.seed)
    failure = []

    def run():
        try:
            model.generate(**inputs, **kw)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(e)
            streamer.end()                             # never leave the reader waiting

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    for text in streamer:
        yield text.rstrip("\ufffd")
    worker.join()
    if failure:
        raise failure[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    loaded = load_or_report(args, load)
    if loaded is None:
        return 1
    model, tok = loaded

    def answer(query, history, image, prefix=""):
        return print_answer(generate_stream(model, tok, query, history, image, args), args.stream_chat, prefix)

    def open_image(path):
        return ImageContext(path, model.cfg) if path else None

    return run(args, answer, open_image)


if __name__ == "__main__":
    sys.exit(main())
