"""One benchmark example as every scorer reads it, and the error a dataset reader raises (apart
from tasks.py, so that the GUI scorers can build on Example without importing tasks.py back)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


class DataError(FileNotFoundError):
    """A dataset file that is missing or unreadable; the message says which and where."""


@dataclass
class Example:
    id: str
    image: Path
    question: str                            # the expression, question or POPE question
    answers: list = field(default_factory=list)     # VQA: human answers; POPE: [label]
    box: Optional[tuple] = None              # grounding truth, x0 y0 x1 y1 in pixels
    size: Optional[tuple] = None             # (width, height) of the image
    history: list = field(default_factory=list)    # earlier (query, answer) turns (finetuning data)
