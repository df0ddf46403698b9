"""Score a model on benchmarks read as their owners release them, batched, on one process or
data parallel over many (torchrun), resumable.

  python evaluation/evaluate.py --from_pretrained cogvlm-grounding-generalist-v1.1 \\
      --task refcoco:val,refcoco:testA --data DATA --output_dir OUT [--batch_size 8] [--limit N]
  torchrun --nproc-per-node 4 evaluation/evaluate.py ...      # each process a whole model
  torchrun --nproc-per-node 8 evaluation/evaluate.py --model_parallel_size 2 ...   # 4 models of 2 ranks

Tasks: refcoco:val|testA|testB, refcoco+:val|testA|testB, refcocog:val|test, synthetic:val, vqav2:val,
textvqa:val, pope:adversarial|popular|random, coco_caption:val, finetune:<split> (the
finetuning scripts' data: exact-match acc and acc_w/o_case), synthetic_qa:<split> (our synthetic
set as utils/data/synthetic.py writes it: per question kind, CogAgent actions included). Every answer is streamed to
OUT/predictions-<task>.jsonl (':' as '_'): a rerun skips what is there. The table is printed
(markdown) and written to OUT/results.json, metrics in percent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from any directory
from utils.apps.flags import ArgumentParser  # noqa: E402
from utils.apps.tool import run_tool  # noqa: E402

from evaluation.datasets import DataError, read_task  # noqa: E402
from utils.chat.task_prompts import EXPRESSION_TO_BOX  # noqa: E402
from utils.scoring.tasks import answer_rows, model_answers, score_in_memory, task_metrics  # noqa: E402,F401


def predictions_file(out: Path, task: str) -> Path:
    return out / f"predictions-{task.replace(':', '_')}.jsonl"


def done_ids(path: Path) -> dict:
    """id -> row of the lines already written (a line cut by a kill is ignored)."""
    rows = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                rows[row["id"]] = row
            except (ValueError, KeyError, TypeError):
                continue
    return rows


def append_line(path: Path, row: dict) -> None:
    """One write() per line on an O_APPEND file: lines of several processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(row, ensure_ascii=False) + "\n").encode())
    finally:
        os.close(fd)


def run_task(answer_fn, task: str, examples: list, out: Path, version: str, batch_size: int,
             rank: int = 0, world: int = 1, show: bool = True, grounding_prompt: str = EXPRESSION_TO_BOX[0]) -> int:
    """Answer this process's share (every world-th example) of what is not done yet, streaming
    each line to the task's predictions file. answer_fn(requests) -> answers, with requests
    (query, version, image path, history). Returns how many were answered."""
    from tqdm import tqdm
    path = predictions_file(out, task)
    done = done_ids(path)
    todo = [ex for i, ex in enumerate(examples) if i % world == rank and ex.id not in done]
    bar = tqdm(total=len(todo), desc=task, unit="ex", disable=not show)
    for i in range(0, len(todo), batch_size):
        for row in answer_rows(answer_fn, task, todo[i:i + batch_size], version, grounding_prompt):
            append_line(path, row)
            bar.update(1)
    bar.close()
    return len(todo)


def parse_args(argv=None):
    from utils.apps.args import add_model_args
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, default_model="cogvlm-grounding-generalist-v1.1")
    p.add_argument("--task", required=True, help="comma-separated, e.g. refcoco:val,vqav2:val")
    p.add_argument("--data", required=True, type=Path, help="the datasets' root, as released")
    p.add_argument("--output_dir", required=True, type=Path)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--model_parallel_size", type=int, default=1,
                   help="under torchrun: processes per model (tensor parallel); the models split the examples")
    p.add_argument("--grounding_prompt", default=EXPRESSION_TO_BOX[0],
                   help="the request for a referring expression, {expr} filled in (default: %(default)s)")
    return p.parse_args(argv)


def load_group_model(args, rank: int, mp_rank: int, world: int):
    """(model, tokenizer): this process's piece of its model-parallel group's model, or None
    after rank 0 printed every rank's reason (all ranks stop together)."""
    from models import CheckpointError, ModelNotFound
    from utils.apps.args import load_with_tokenizer, options_from_args
    from utils.chat.tokenizer import TokenizerError
    from utils.serving.lockstep import agree
    loaded, error = None, None
    try:
        loaded = load_with_tokenizer(args.from_pretrained, options_from_args(args, mp_rank, args.model_parallel_size),
                                     args.local_tokenizer)
    except (ModelNotFound, CheckpointError, TokenizerError, ValueError, OSError) as e:
        error = str(e)
    failed = agree(error)                          # every rank stops if any failed to load
    if failed and rank == 0:
        print("\n".join(f"error{f' (rank {r})' if world > 1 else ''}: {e}" for r, e in failed), file=sys.stderr)
    return None if failed else loaded


def write_results(out: Path, tasks: list, data: dict, seconds: float) -> None:
    """results.json and a markdown table of every task's metrics."""
    results = {}
    for task in tasks:
        rows = done_ids(predictions_file(out, task))
        results[task] = task_metrics(task, [rows[ex.id] for ex in data[task]], data[task])
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| task | metric | value |\n|---|---|---|")
    for task, m in results.items():
        for k, v in m.items():
            print(f"| {task} | {k} | {v if k == 'n' or k.endswith('_n') else f'{v:.2f}'} |")
    print(f"\n{sum(len(v) for v in data.values())} examples in {seconds:.1f} s; "
          f"predictions and results.json in {out}")


def main(argv=None) -> int:
    from utils.apps.args import GEN_DEFAULTS, setup_logging
    args = parse_args(argv)
    setup_logging()
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    try:
        data = {t: read_task(args.data, t)[: args.limit] for t in tasks}
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import torch
    import torch.distributed as dist
    from models.tp import ModelParallelGroups, init_distributed, set_group
    from utils.serving.lockstep import Lockstep
    world, mp = int(os.environ.get("WORLD_SIZE", "1")), args.model_parallel_size
    if mp < 1 or world % mp:
        print(f"error: --model_parallel_size {mp} must divide the {world} process(es) "
              f"(run it under torchrun --nproc-per-node N)", file=sys.stderr)
        return 1
    rank, _ = init_distributed(args.device)
    groups = ModelParallelGroups(mp) if world > 1 else None
    if groups is not None:
        set_group(groups.mp_group)
    mp_rank = groups.get_model_parallel_rank() if groups else 0
    dp_rank, dp = (groups.get_data_parallel_rank(), groups.dp) if groups else (0, 1)
    loaded = load_group_model(args, rank, mp_rank, world)
    if loaded is None:
        return 1
    torch.set_grad_enabled(False)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    answer = model_answers(*loaded, replace(GEN_DEFAULTS, max_new_tokens=args.max_new_tokens, top_k=1))
    # In each model-parallel group the first rank writes the answers; the others make the same
    # batch_chat calls (and so meet it in the same collectives).
    step = Lockstep({"answer": answer}, groups.mp_group if groups else None, leader=rank - mp_rank)
    t0 = time.perf_counter()
    if mp_rank > 0:
        step.follow()
    else:
        with step:
            for task in tasks:
                run_task(lambda reqs: step.call("answer", reqs), task, data[task], args.output_dir,
                         args.version or "auto", args.batch_size, dp_rank, dp, show=rank == 0,
                         grounding_prompt=args.grounding_prompt)
    if world > 1:
        dist.barrier()
    if rank == 0:
        write_results(args.output_dir, tasks, data, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    run_tool(main)                              # under torchrun: every rank leaves together
