"""Incremental detokenization: generated token ids in, text deltas out (the one place both
`stream_chat` and the serving engine turn tokens into streamed text)."""
from __future__ import annotations

from typing import Sequence

from utils.chat.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"          # what decoding an unfinished UTF-8 character ends with


class TextStream:
    """The text of one answer so far, released in deltas that never end inside a UTF-8
    character, never show a stop string, and never take back what was sent.

        stream = TextStream(tokenizer, stop=["\\n\\n"])
        for token in tokens:
            delta = stream.push(token)        # "" while nothing new is safe to show
            if stream.stopped:                # a stop string appeared: delta is the text before it
                break
        delta = stream.flush()                # at the end: whatever was held back
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        # Text that could be the start of a stop string is held back until it cannot be.
        self.hold = max((len(s) - 1 for s in self.stop), default=0)
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one generated token; returns the text that became safe to show."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            if s in text:
                self.stopped = True
                return self._advance(text[: text.index(s)])
        if text.endswith(REPLACEMENT):
            return ""
        return self._advance(text[: len(text) - self.hold])

    def flush(self) -> str:
        """The answer is over: release the rest, minus an unfinished last character."""
        return self._advance(self.tokenizer.decode(self.ids).rstrip(REPLACEMENT))

    def _advance(self, text: str) -> str:
        """The part of `text` after what was sent (nothing if `text` does not extend it)."""
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
