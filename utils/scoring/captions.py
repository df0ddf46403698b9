"""Caption scoring as COCO scores it: the coco-caption pipeline of the maintained package
`pycocoevalcap` (salaniz/pycocoevalcap, the pip release of tylin/coco-caption): every caption,
references and candidates alike, through its `PTBTokenizer` (Stanford CoreNLP's PTB tokenizer,
the jar bundled in the package, run with `java`; lower case, punctuation tokens dropped), then
its `Cider` scorer (CIDEr-D: n = 1..4, sigma 6, clipped counts, idf over the references of the
set). Without Java or the package, a pure-Python fallback (metrics.cider_d with a regex
tokenizer: the same CIDEr-D, different tokens) runs and says so in the protocol name."""
from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from .metrics import cider_d

PROTOCOL_COCO = "coco-caption (PTB tokenizer + CIDEr-D, pycocoevalcap)"
PROTOCOL_FALLBACK = "fallback: regex tokenizer + our CIDEr-D (no Java)"
log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _java_runs(java: str) -> bool:
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def coco_missing() -> Optional[str]:
    """Why the coco-caption pipeline cannot run here (None when it can): no `java` on PATH, a
    `java` that does not start, or no pycocoevalcap."""
    try:
        import pycocoevalcap.cider.cider  # noqa: F401
        import pycocoevalcap.tokenizer.ptbtokenizer  # noqa: F401
    except ImportError:
        return "pycocoevalcap is not installed (pip install pycocoevalcap)"
    java = shutil.which("java")
    if java is None:
        return "no java on PATH (make installs default-jre-headless)"
    if not _java_runs(java):
        return f"{java} -version fails"
    return None


def caption_protocol() -> str:
    """The protocol the caption metric runs by on this machine."""
    return PROTOCOL_COCO if coco_missing() is None else PROTOCOL_FALLBACK


def _one_line(text: str) -> str:
    """The caption on one line. The package replaces only "\\n", but the PTB tokenizer also
    breaks lines at "\\r", U+2028, ..., which would shift every later caption onto another
    image; str.splitlines knows those breaks."""
    return " ".join(text.splitlines())


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def ptb_tokenize(captions: dict) -> dict:
    """pycocoevalcap's PTBTokenizer on {key: [caption, ...]} -> {key: [tokens joined by " "]}.
    The package writes its temporary file next to its jar and runs java there; when that folder
    is not writable (a read-only site-packages), the jar is linked into a temporary folder and the
    tokenizer module pointed at it for the call."""
    from pycocoevalcap.tokenizer import ptbtokenizer
    data = {k: [{"caption": _one_line(c)} for c in caps] for k, caps in captions.items()}
    home = Path(ptbtokenizer.__file__).resolve().parent
    if _writable(home):
        out = ptbtokenizer.PTBTokenizer().tokenize(data)
    else:
        jar = ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
        with tempfile.TemporaryDirectory(prefix="ptb-") as tmp:
            try:
                (Path(tmp) / jar).symlink_to(home / jar)
            except OSError:
                shutil.copy(home / jar, Path(tmp) / jar)
            saved, ptbtokenizer.__file__ = ptbtokenizer.__file__, str(Path(tmp) / "ptbtokenizer.py")
            try:
                out = ptbtokenizer.PTBTokenizer().tokenize(data)
            finally:
                ptbtokenizer.__file__ = saved
    if any(len(out.get(k, ())) != len(v) for k, v in captions.items()):
        raise RuntimeError("the PTB tokenizer returned a different number of captions than it was given")
    return out


def coco_cider(candidates: list, references: list) -> tuple[float, list]:
    """CIDEr-D by pycocoevalcap (PTB tokens, then Cider), as COCOEvalCap computes it: references
    and candidates tokenized apart. One candidate and at least one reference per image.
    Returns (corpus score, per-image scores)."""
    from pycocoevalcap.cider.cider import Cider
    empty = next((i for i, refs in enumerate(references) if not refs), None)
    if empty is not None:
        raise ValueError(f"caption scoring: image #{empty} has no reference captions")
    gts = ptb_tokenize(dict(enumerate(references)))
    res = ptb_tokenize({i: [c] for i, c in enumerate(candidates)})
    score, scores = Cider().compute_score(gts, res)
    return float(score), [float(s) for s in scores]


def caption_cider(candidates: list, references: list) -> tuple[float, list, str]:
    """CIDEr-D of one candidate per image against its references: (corpus score, per-image
    scores, the protocol that produced them). The coco-caption pipeline where it can run, else
    the fallback, with one log line saying why."""
    if not candidates:
        return 0.0, [], caption_protocol()
    missing = coco_missing()
    if missing is None:
        return (*coco_cider(candidates, references), PROTOCOL_COCO)
    log.warning("captions: %s; scoring with the fallback (%s)", missing, PROTOCOL_FALLBACK)
    return (*cider_d(candidates, references), PROTOCOL_FALLBACK)
