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

    def encode(self, text: str) -> list[int]:
        """One prompt piece, no special tokens, legacy dummy prefix (as the original)."""
        if not text:
            return []
        if self.sp is not None:
            return self.sp.encode(text)
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.sp is not None:
            return self.sp.decode(ids)
        return self.tk.decode(ids, skip_special_tokens=True)


def _token_str(v):
    if isinstance(v, dict):          # {"content": "<s>", ...} in some tokenizer_config.json
        return v.get("content")
    return v
