"""Tokenizer wrapper reproducing the original's ids.

The original encoded each prompt piece separately, without special tokens, with the LLaMA
SentencePiece tokenizer under transformers 4.x ("legacy": every piece gets SentencePiece's
dummy-prefix "▁"). transformers 5 drops that prefix for pieces starting with a space, which
changes the ids; so we call SentencePiece (or the `tokenizers` library) directly.
"""
from __future__ import annotations

import json
from pathlib import Path


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(self, path):
        p = Path(path).expanduser()
        if not p.is_dir():
            raise TokenizerError(f"tokenizer directory not found: {p} (--local_tokenizer takes a "
                                 f"directory with tokenizer.model or tokenizer.json)")
        self.path = p
        self.sp = self.tk = None
        if (p / "tokenizer.model").is_file():
            import sentencepiece as spm
            try:
                self.sp = spm.SentencePieceProcessor(model_file=str(p / "tokenizer.model"))
            except (OSError, RuntimeError) as e:
                raise TokenizerError(f"{p / 'tokenizer.model'}: not a SentencePiece model ({e})") from None
            self.vocab_size = self.sp.get_piece_size()
            self.bos_token_id, self.eos_token_id = self.sp.bos_id(), self.sp.eos_id()
            self.unk_token_id = self.sp.unk_id()
        elif (p / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as TK
            try:
                self.tk = TK.from_file(str(p / "tokenizer.json"))
            except Exception as e:  # noqa: BLE001 - the library raises a bare Exception
                raise TokenizerError(f"{p / 'tokenizer.json'}: cannot be read ({e})") from None
            self.vocab_size = self.tk.get_vocab_size()
            cfg = {}
            if (p / "tokenizer_config.json").is_file():
                cfg = json.loads((p / "tokenizer_config.json").read_text())
            tok = lambda name, default: self.tk.token_to_id(_token_str(cfg.get(name)) or default)  # noqa: E731
            self.bos_token_id, self.eos_token_id = tok("bos_token", "<s>"), tok("eos_token", "</s>")
            self.unk_token_id = tok("unk_token", "<unk>")
        else:
            raise TokenizerError(f"{p}: has neither tokenizer.model nor tokenizer.json")
        self.pad_token_id = 0

    @classmethod
    def from_pretrained(cls, name_or_path) -> "Tokenizer":
        """The tokenizer a model uses, found from what `--from_pretrained` takes: a directory with
        tokenizer.model / tokenizer.json; a checkpoint (directory or model name) with its own
        `tokenizer/` folder; else Vicuna-7B-v1.5's for a checkpoint or released model name without
        one; else a hub name (e.g. lmsys/vicuna-7b-v1.5) from the local Hugging Face cache."""
        from models.config import ALIASES, MODEL_CONFIGS
        from models.loading import ModelNotFound, resolve_pretrained
        p = Path(name_or_path).expanduser()
        if p.is_dir() and any((p / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
            return cls(p)
        try:
            ckpt = resolve_pretrained(str(name_or_path))
        except ModelNotFound:
            ckpt = None
        if ckpt is not None or ALIASES.get(str(name_or_path), str(name_or_path)) in MODEL_CONFIGS:
            return cls(resolve_tokenizer(None, ckpt))       # the checkpoint's own, else the default
        return cls(resolve_tokenizer(str(name_or_path)))

    def encode(self, text: str) -> list[int]:
        """One prompt piece, no special tokens, legacy dummy prefix (as the original)."""
        if not text:
            return []
        if self.sp is not None:
            return self.sp.encode(text)
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True, **_) -> str:
        """Special tokens (<s>, </s>, <unk>) are never part of the text; ids beyond the
        tokenizer's vocabulary (a model vocabulary padded past it) are dropped."""
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        if self.sp is not None:
            return self.sp.decode(ids)
        return self.tk.decode(ids, skip_special_tokens=True)


def _token_str(v):
    if isinstance(v, dict):          # {"content": "<s>", ...} in some tokenizer_config.json
        return v.get("content")
    return v


def train_sentencepiece(text: str, out_dir, vocab_size: int = 400, split_digits: bool = False,
                        symbols: tuple = ()) -> Path:
    """Train a small BPE SentencePiece tokenizer with the LLaMA layout (<unk>=0, <s>=1,
    </s>=2, byte fallback) and save it as a tokenizer directory (tokenizer.model).
    split_digits: every digit its own token (as LLaMA's); symbols: pieces kept whole."""
    import sentencepiece as spm
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    corpus.write_text(text)
    try:
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            character_coverage=1.0, add_dummy_prefix=True, minloglevel=2, num_threads=1,
            split_digits=split_digits, user_defined_symbols=list(symbols))
    finally:
        corpus.unlink()
        (out / "tokenizer.vocab").unlink(missing_ok=True)
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True}, indent=1))
    return out


DEFAULT_TOKENIZER = "lmsys/vicuna-7b-v1.5"


def resolve_tokenizer(arg, ckpt_dir=None) -> Path:
    """--local_tokenizer: a directory; else a `tokenizer/` folder shipped inside the checkpoint;
    else the Hugging Face cache (offline) for a hub name such as lmsys/vicuna-7b-v1.5."""
    if arg and Path(arg).expanduser().is_dir():
        return Path(arg).expanduser()
    if ckpt_dir is not None and (Path(ckpt_dir) / "tokenizer").is_dir() and arg in (None, DEFAULT_TOKENIZER):
        return Path(ckpt_dir) / "tokenizer"
    name = arg or DEFAULT_TOKENIZER
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, local_files_only=True,
                                      allow_patterns=["tokenizer*", "special_tokens_map.json"]))
    except Exception:  # noqa: BLE001 - any hub/cache failure means "not available offline"
        raise TokenizerError(
            f"tokenizer {name!r} is neither a directory nor in the local Hugging Face cache. "
            f"Download it once (e.g. `huggingface-cli download {name} tokenizer.model "
            f"tokenizer_config.json`) or pass --local_tokenizer DIR") from None
