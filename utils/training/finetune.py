"""Finetuning CogVLM / CogAgent with DeepSpeed: LoRA (default), QLoRA, or full parameters.

Launch with `torchrun --nproc-per-node N` or `deepspeed --num_gpus N` (finetune_demo/*.sh):
data parallel over N / model_parallel_size groups, tensor parallel inside each group
(models/tp.py). ZeRO-2, bf16 on CUDA, fp32 on CPU (gloo).

Checkpoints go to `--save DIR` every --save_interval steps and at the end, in the SAT layout
(utils/training/trainer.py); DIR/latest is written last, so a run killed while saving resumes
from the previous complete checkpoint. `--resume` continues from DIR/latest with the same data
order (the order is a function of --seed and the step), so a killed and resumed run ends
where an uninterrupted one does.

The code: options.py (flags -> FinetuneOptions), setup.py (checks, process groups, model,
DeepSpeed engine), aux_heads.py (--aux_object_loss heads), loss.py, trainer.py (the loop,
evaluation, checkpoints); this module is the scripts' entry point.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import utils.apps.args as common
from utils.apps.flags import ArgumentParser
from utils.training.aux_heads import AuxObjectHeads, attach_aux_heads, object_loss
from utils.training.loss import compute_loss, forward_batch
from utils.training.options import FinetuneOptions, add_finetune_args, flag_problem, options_from_args
from utils.training.setup import checkpoint_layers, cosine_with_warmup, ds_config, freeze_for_training, preflight
from utils.training.trainer import TrainState, batch_indices, evaluate, evaluate_sets, sat_state_for_saving, train

# What scripts, tests and benchmarks import from here (the pieces live in the modules above).
__all__ = ["AuxObjectHeads", "FinetuneOptions", "TrainState", "add_finetune_args", "attach_aux_heads",
           "batch_indices", "checkpoint_layers", "compute_loss", "cosine_with_warmup", "ds_config", "evaluate",
           "evaluate_sets", "forward_batch", "freeze_for_training", "main", "object_loss", "options_from_args",
           "parse_options", "preflight", "sat_state_for_saving", "train"]


def parse_options(argv=None, default_model: str = "cogvlm-base-490",
                  description: str = __doc__) -> tuple[FinetuneOptions, bool]:
    """(options, --preflight) from the command line; a combination that cannot run exits
    with argparse's usage line and the problem."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_finetune_args(p, default_model)
    args = p.parse_args(argv)
    opts = options_from_args(args)
    problem = flag_problem(opts)
    if problem:
        p.error(problem)
    return opts, args.preflight


def main(argv=None, default_model: str = "cogvlm-base-490", description: str = __doc__) -> int:
    opts, only_check = parse_options(argv, default_model, description)
    common.setup_logging()
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    from models import CheckpointError, ModelNotFound
    from utils.chat.tokenizer import TokenizerError
    try:
        preflight(opts)
        if only_check:
            return 0
        train(opts)
    except (ModelNotFound, CheckpointError, TokenizerError, OSError, ValueError) as e:
        if os.environ.get("LOCAL_RANK", "0") == "0":     # one line per node, not one per rank
            print(f"error: {e}", flush=True, file=sys.stderr)
        return 1
    return 0                # the launchers end with models.tp.exit_process: all ranks together
