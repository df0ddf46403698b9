"""Re-split a SAT checkpoint across model-parallel ranks, and fold LoRA adapters into weights.
Two separate operations (the original called both "merge"); plain `python`, CPU, no torchrun:

  # model parallel: MP=N -> MP=1 (merge) or MP=1 -> MP=N (split), or any M -> N
  python utils/merge_model.py --from_pretrained CKPT --save OUT --mp 1
  # LoRA: add the adapters into the base weights (a plain model, no adapters, comes out)
  python utils/merge_model.py --from_pretrained LORA_CKPT --save OUT --merge-lora

Input files are memory-mapped and read tensor by tensor; each output rank is built and
written in turn, so memory holds one output file's tensors at a time. Only the model
weights are carried over (optimizer and RNG state of training checkpoints are dropped).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from any directory
from utils.apps.flags import ArgumentParser  # noqa: E402
from utils.apps.tool import reports_errors, run_tool  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models.checkpoint import (CheckpointError, atomic_write, check_key_sets, checkpoint_files,  # noqa: E402
                               load_sat_config, read_shard, sat_key_map, write_checkpoint_dir)
from models.config import ModelConfig  # noqa: E402
from models.loading import resolve_pretrained  # noqa: E402
from models.lora import merge_lora_state  # noqa: E402
from models.tp import merge_tensors, shard_spec, shard_tensor  # noqa: E402

log = logging.getLogger("merge_model")


def _our_names(cfg: ModelConfig) -> tuple[dict[str, str], dict[str, tuple]]:
    """SAT key -> our parameter name, and SAT key -> full shape, for this architecture (with
    its LoRA adapters if any)."""
    from models.cogvlm import CogVLM
    with torch.device("meta"):
        model = CogVLM(cfg)
    if "lora" in cfg.extra:
        from models.lora import LoRAConfig, apply_lora
        apply_lora(model, LoRAConfig.from_json(cfg.extra["lora"]))
    names = sat_key_map(model)
    sd = model.state_dict()
    return names, {k: tuple(sd[o].shape) for k, o in names.items()}


def check_shards(files: list, shards: list, names: dict, shapes: dict) -> None:
    """Every key known to the architecture, and every rank file a piece of its own."""
    for i, sd in enumerate(shards):                   # pieces of tensors: names only, shapes not compared
        check_key_sets(dict.fromkeys(names), dict.fromkeys(sd), str(files[i]))
    split = next((k for k in shards[0] if shard_spec(names[k]) and tuple(shards[0][k].shape) != shapes[k]), None)
    for i in range(1, len(shards)):
        if split is not None and torch.equal(shards[0][split], shards[i][split]):
            raise CheckpointError(f"{files[i]} holds the same piece of {split} as {files[0].name}: "
                                  f"a rank file was duplicated, not saved by its own rank")


def reshard(src: Path, dst: Path, mp: int = None, merge_lora: bool = False, trust: bool = False) -> Path:
    """Write `dst` from `src` with `mp` model-parallel files (default: as many as `src`),
    LoRA folded in when merge_lora. Returns dst."""
    src = resolve_pretrained(str(src))
    it, files = checkpoint_files(src)
    m = len(files)
    n = mp or m
    shards = [read_shard(f, trust) for f in files]           # memory-mapped
    cfg = load_sat_config(src, shards[0])
    if merge_lora and "lora" not in cfg.extra:
        raise CheckpointError(f"{src}: model_config.json has no 'lora' entry: not a LoRA checkpoint")
    names, shapes = _our_names(cfg)
    check_shards(files, shards, names, shapes)
    scaling = cfg.extra["lora"]["alpha"] / cfg.extra["lora"]["rank"] if merge_lora else None
    log.info("%s: %d shard(s) -> %s: %d shard(s)%s", src, m, dst, n, ", LoRA folded in" if merge_lora else "")

    def full(key):
        spec = shard_spec(names[key])
        if m == 1 or spec is None or tuple(shards[0][key].shape) == shapes[key]:
            return shards[0][key]              # replicated (SAT kept some sharded-here tensors whole)
        return merge_tensors([sd[key] for sd in shards], *spec)

    def write(dst: Path) -> None:
        for r in range(n):
            out = {}
            for key in tqdm(list(shards[0]), desc=f"rank {r + 1}/{n}", unit="tensor", leave=False):
                spec = shard_spec(names[key])
                if spec is not None and m == n and tuple(shards[r][key].shape) != shapes[key]:
                    # same split: pieces pass through
                    t = shards[r][key]
                elif spec is not None and n > 1:
                    t = shard_tensor(full(key), *spec, r, n, key)
                else:
                    t = full(key)
                out[key] = t.contiguous().clone()
            if merge_lora:
                out = merge_lora_state(out, scaling)
            target = dst / it / f"mp_rank_{r:02d}_model_states.pt"
            atomic_write(target, lambda p, sd=out: torch.save({"module": sd}, p))
            del out                                         # free this rank's tensors before the next
        if merge_lora:
            cfg.extra.pop("lora")
        cfg.model_parallel_size = n
        atomic_write(dst / "model_config.json", lambda p: cfg.save(p))
        for extra in ("tokenizer",):                        # the bundled tokenizer folder, if any
            if (src / extra).is_dir() and not (dst / extra).exists():
                import shutil
                shutil.copytree(src / extra, dst / extra)
        atomic_write(dst / "latest", lambda p: Path(p).write_text(it))
    return write_checkpoint_dir(dst, write, [src])


@reports_errors(CheckpointError)
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from_pretrained", required=True, help="SAT checkpoint directory or model name")
    p.add_argument("--save", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--mp", type=int, default=None, help="model-parallel files to write (1 = merge)")
    p.add_argument("--merge-lora", "--merge_lora", dest="merge_lora", action="store_true",
                   help="fold LoRA adapters into the base weights")
    p.add_argument("--trust-checkpoint", "--trust_checkpoint", dest="trust_checkpoint", action="store_true",
                   help="allow files that need full unpickling (training checkpoints you trust)")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.mp is None and not args.merge_lora:
        p.error("nothing to do: give --mp N and/or --merge-lora")
    if args.mp is not None and not 1 <= args.mp <= 64:
        p.error("--mp must be between 1 and 64")
    out = reshard(Path(args.from_pretrained), Path(args.save), args.mp, args.merge_lora, args.trust_checkpoint)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_tool(main)
