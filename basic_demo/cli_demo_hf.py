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
from utils.apps.tool import run_tool  # noqa: E402

import torch  # noqa: E402

from models import CheckpointError  # noqa: E402
from models.hf_io import hf_architecture  # noqa: E402
from models.generate import token_budget  # noqa: E402
from utils.apps.args import (add_generation_args, add_model_args, generation_config,  # noqa: E402
                             load_or_report, load_with_tokenizer, options_from_args, setup_logging)
from utils.chat import ImageContext, build_hf_inputs  # noqa: E402
from utils.apps.cli import add_cli_args, print_answer, run  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, default_model="THUDM/cogagent-chat-hf",
                   pretrained_help="HF checkpoint directory, or a hub name found in the local HF cache",
                   single_stream=True)
    add_generation_args(p)
    add_cli_args(p)
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
    """The one loader of every demo (models.load_model: quantized while streaming, SAT or HF
    files), building the transformers class. One process: generate() runs no lockstep."""
    if args.compile:
        raise ValueError("--compile compiles our decode loop (cli_demo_sat.py); transformers' generate() "
                         "runs eagerly: drop --compile")
    args.compile = False                               # nothing here would call a compiled step
    path = resolve_hf_dir(args.from_pretrained)
    return load_with_tokenizer(str(path), options_from_args(args), args.local_tokenizer, hf_architecture)


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
    run_tool(main)
