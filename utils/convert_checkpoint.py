"""Convert CogVLM / CogAgent checkpoints between the SAT and Hugging Face formats.

    python utils/convert_checkpoint.py sat2hf --src ~/.sat_models/cogvlm-chat-v1.1 --dst cogvlm-chat-hf
    python utils/convert_checkpoint.py hf2sat --src THUDM-cogagent-chat-hf --dst ~/.sat_models/cogagent-chat

Streams tensor by tensor (peak memory about one shard), shows progress, checks every key and
shape, and refuses to overwrite an existing output unless --overwrite is given.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.apps.flags import ArgumentParser  # noqa: E402
from utils.apps.tool import reports_errors, run_tool  # noqa: E402

from models.checkpoint import CheckpointError  # noqa: E402
from models.config import DTYPES  # noqa: E402
from models.hf_io import hf_to_sat, sat_to_hf  # noqa: E402
from models.loading import resolve_pretrained  # noqa: E402


@reports_errors(CheckpointError)
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=["sat2hf", "hf2sat"])
    p.add_argument("--src", required=True, type=Path,
                   help="sat2hf: a SAT directory or a model name (as --from_pretrained); hf2sat: an HF directory")
    p.add_argument("--dst", required=True, type=Path)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: keep the source dtype")
    p.add_argument("--shard_size_gb", type=float, default=2.0, help="sat2hf: size of each safetensors shard")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--trust-checkpoint", dest="trust", action="store_true",
                   help="sat2hf: allow a SAT file that needs full unpickling")
    a = p.parse_args(argv)
    dtype = DTYPES.get(a.dtype)
    if a.direction == "sat2hf":
        src = resolve_pretrained(str(a.src))           # a directory, or a released/bundled name
        out = sat_to_hf(src, a.dst, int(a.shard_size_gb * (1 << 30)), dtype, a.overwrite, a.trust)
    else:
        out = hf_to_sat(a.src, a.dst, dtype, a.overwrite)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_tool(main)
