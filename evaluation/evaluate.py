"""Score a model on benchmarks read as their owners release them, batched, on one process or
data parallel over many (torchrun), resumable; or score a predictions file without a model.

  python evaluation/evaluate.py --from_pretrained cogvlm-grounding-generalist-v1.1 \\
      --task refcoco:val,refcoco:testA --data DATA --output_dir OUT [--batch_size 8] [--limit N]
  torchrun --nproc-per-node 4 evaluation/evaluate.py ...      # each process a whole model
  torchrun --nproc-per-node 8 evaluation/evaluate.py --model_parallel_size 2 ...   # 4 models of 2 ranks
  python evaluation/evaluate.py --task vqav2:val --data DATA --predictions FILE --output_dir OUT

Tasks: refcoco:val|testA|testB|test, refcoco+:val|testA|testB|test, refcocog:val|test, synthetic:val,
vqav2:val|test-dev|test, textvqa:val|test, pope:adversarial|popular|random,
coco_caption:val|karpathy_test|karpathy_val, flickr30k:test|val, nocaps:val,
finetune:<split> (the finetuning scripts' data: exact-match acc and acc_w/o_case), synthetic_qa:<split>
(our synthetic set as utils/data/synthetic.py writes it: per question kind, CogAgent actions
included); CogAgent's GUI benchmarks screenspot:mobile|desktop|web|all,
mind2web:test_task|test_website|test_domain, aitw:general|install|googleapps|single|webshopping|all
(evaluation/gui.py). Every answer is streamed to OUT/predictions-<task>.jsonl (':' as '_'): a rerun skips
what is there. The table is printed (markdown) and written to OUT/results.json, metrics in
percent, each task with the protocol that produced it. Splits without public answers
(vqav2:test-dev, vqav2:test, textvqa:test) are not scored: their evaluation server's results
file is written to OUT and the table says where to upload it.

--predictions FILE scores JSON lines with "id" and "answer" (ids as the dataset defines them:
refer sent_id, VQA / TextVQA / POPE question_id, COCO image id; the runner's own
predictions-<task>.jsonl is such a file) for one task, with the same code and the same
results.json, and loads no model.
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

from evaluation.datasets import DataError, read_task, server_question_ids  # noqa: E402
from utils.scoring.tasks import (GUI_KINDS, SERVER_SPLITS, VQA_PROTOCOL_DEFAULTS, answer_rows, kind, model_answers,  # noqa: E402,F401
                                 protocol, score_in_memory, server_results, task_metrics)
from utils.scoring.vqa import VQA_PROTOCOLS  # noqa: E402


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
             rank: int = 0, world: int = 1, show: bool = True, grounding_prompt: str = None,
             vqa: str = None) -> int:
    """Answer this process's share (every world-th example) of what is not done yet, streaming
    each line to the task's predictions file. answer_fn(requests) -> answers, with requests
    (query, version, image path, history). Returns how many were answered."""
    from tqdm import tqdm
    path = predictions_file(out, task)
    done = done_ids(path)
    todo = [ex for i, ex in enumerate(examples) if i % world == rank and ex.id not in done]
    bar = tqdm(total=len(todo), desc=task, unit="ex", disable=not show)
    for i in range(0, len(todo), batch_size):
        for row in answer_rows(answer_fn, task, todo[i:i + batch_size], version, grounding_prompt, vqa):
            append_line(path, row)
            bar.update(1)
    bar.close()
    return len(todo)


def read_predictions(path: Path, task: str, examples: list, known: set) -> list:
    """A predictions file (JSON lines with "id" and "answer") -> its rows in the order of
    `examples`. A line that is not such an object, an id not in `known` (the task's ids) or an
    example without an answer is a DataError naming it; of an id given twice the last counts."""
    if not path.is_file():
        raise DataError(f"predictions: no file {path}")
    rows = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key, answer = str(row["id"]), row["answer"]
        except (ValueError, KeyError, TypeError):
            raise DataError(f'{path}:{n}: not a JSON object with "id" and "answer"') from None
        if not isinstance(answer, str):
            raise DataError(f"{path}:{n}: the answer of id {key} is not a string")
        if key not in known:
            raise DataError(f"{path}:{n}: id {key} is not an example of {task}")
        rows[key] = {"id": key, "answer": answer}
    missing = [ex.id for ex in examples if ex.id not in rows]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{path}: no answer for id {missing[0]} of {task}{more}")
    return [rows[ex.id] for ex in examples]


def scoring_only(argv) -> bool:
    return any(a == "--predictions" or a.startswith("--predictions=") for a in argv)


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if not scoring_only(argv):                      # the model flags (and torch) only to run a model
        from utils.apps.args import add_model_args
        from utils.chat.task_prompts import EXPRESSION_TO_BOX
        add_model_args(p, default_model="cogvlm-grounding-generalist-v1.1")
        p.add_argument("--grounding_prompt", default=EXPRESSION_TO_BOX[0],
                       help="the request for a referring expression, {expr} filled in (default: %(default)s)")
    p.add_argument("--task", required=True, help="comma-separated, e.g. refcoco:val,vqav2:val")
    p.add_argument("--data", required=True, type=Path, help="the datasets' root, as released")
    p.add_argument("--output_dir", required=True, type=Path)
    p.add_argument("--predictions", type=Path, default=None,
                   help="score this file (JSON lines with id and answer) for one task: no model is loaded "
                        "(model flags are refused)")
    p.add_argument("--vqa_protocol", choices=list(VQA_PROTOCOLS), default=None,
                   help=f"VQA accuracy by the 2016 VQA evaluation (vqa2016) or the TextVQA server's EvalAI "
                        f"answer processor (evalai); default per benchmark: {VQA_PROTOCOL_DEFAULTS}")
    p.add_argument("--alg_name", default="cogvlm",
                   help="the method's name in a test server's results file (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help=f"default {SHORT_ANSWER_TOKENS}, or {GUI_ANSWER_TOKENS} when a task is a GUI benchmark "
                        f"(CogAgent's Plan / Next Action / Grounded Operation answers are long)")
    p.add_argument("--model_parallel_size", type=int, default=1,
                   help="under torchrun: processes per model (tensor parallel); the models split the examples")
    return p.parse_args(argv)


SHORT_ANSWER_TOKENS = 64     # boxes, short VQA answers, captions
GUI_ANSWER_TOKENS = 256      # CogAgent's plan + next action + grounded operation


def answer_tokens(args) -> int:
    """--max_new_tokens, or the default of the longest kind of answer among the tasks."""
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    gui = any(kind(t) in GUI_KINDS for t in args.task.split(","))
    return GUI_ANSWER_TOKENS if gui else SHORT_ANSWER_TOKENS


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


def task_result(out: Path, task: str, rows: list, examples: list, vqa: str, alg: str, extra_ids=()) -> dict:
    """A task's entry of results.json: its metrics and protocol; for a split without public
    answers, the server's results file written to `out` (the questions in `extra_ids` that
    were not asked answered "") and where to upload it."""
    if task not in SERVER_SPLITS:
        return {**task_metrics(task, rows, examples, vqa), "protocol": protocol(task, vqa)}
    name, server = SERVER_SPLITS[task]
    results = server_results(rows, examples)
    asked = {r["question_id"] for r in results}
    results += [{"question_id": q, "answer": ""} for q in extra_ids if q not in asked]
    path = out / name.format(alg=alg)
    path.write_text(json.dumps(results))
    return {"result": "submit to the evaluation server", "file": path.name, "server": server, "n": len(rows),
            "protocol": "the evaluation server's"}


def write_results(out: Path, tasks: list, data: dict, rows: dict, seconds: float, vqa: str, alg: str,
                  extra_ids: dict = None) -> dict:
    """results.json and a markdown table of every task's metrics (rows: task -> its prediction
    rows in the order of data[task]; vqa: the --vqa_protocol or None; alg: the method's name
    in a server's results file)."""
    results = {t: task_result(out, t, rows[t], data[t], vqa, alg, (extra_ids or {}).get(t, ())) for t in tasks}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| task | metric | value |\n|---|---|---|")
    for task, m in results.items():
        for k, v in m.items():
            print(f"| {task} | {k} | {v if isinstance(v, (int, str)) else f'{v:.2f}'} |")
    for task, m in results.items():
        if "server" in m:
            print(f"{task}: upload {out / m['file']} to {m['server']}")
    print(f"\n{sum(len(v) for v in data.values())} examples in {seconds:.1f} s; "
          f"predictions and results.json in {out}")
    return results


def score_predictions(args, tasks: list, data: dict, everything: dict) -> int:
    """--predictions: the file scored for its one task as the runner scores its own."""
    if len(tasks) != 1:
        raise DataError(f"--predictions scores one task; got {len(tasks)}: {', '.join(tasks)}")
    task, t0 = tasks[0], time.perf_counter()
    rows = read_predictions(args.predictions, task, data[task], {ex.id for ex in everything[task]})
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_results(args.output_dir, tasks, data, {task: rows}, time.perf_counter() - t0, args.vqa_protocol,
                  args.alg_name, {task: server_question_ids(args.data, task)})
    return 0


def process_groups(device: str, world: int, mp: int):
    """(rank, groups or None, model-parallel rank, data-parallel rank, data-parallel size): models of
    `mp` ranks each, the examples split over the models."""
    from models.tp import ModelParallelGroups, init_distributed, set_group
    rank, _ = init_distributed(device)
    if world > 1:                          # a node lost mid-run: one line naming it, not a traceback
        from utils.training.nodes import node_table, report_lost_nodes
        report_lost_nodes(node_table())
    groups = ModelParallelGroups(mp) if world > 1 else None
    if groups is None:
        return rank, None, 0, 0, 1
    set_group(groups.mp_group)
    return rank, groups, groups.get_model_parallel_rank(), groups.get_data_parallel_rank(), groups.dp


def main(argv=None) -> int:
    args = parse_args(argv)
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    try:
        everything = {t: read_task(args.data, t) for t in tasks}
        data = {t: examples[: args.limit] for t, examples in everything.items()}
        if args.predictions is not None:
            return score_predictions(args, tasks, data, everything)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from utils.apps.args import GEN_DEFAULTS, setup_logging
    setup_logging()
    import torch
    import torch.distributed as dist
    from utils.serving.lockstep import Lockstep
    world, mp = int(os.environ.get("WORLD_SIZE", "1")), args.model_parallel_size
    if mp < 1 or world % mp:
        print(f"error: --model_parallel_size {mp} must divide the {world} process(es) "
              f"(run it under torchrun --nproc-per-node N)", file=sys.stderr)
        return 1
    rank, groups, mp_rank, dp_rank, dp = process_groups(args.device, world, mp)
    loaded = load_group_model(args, rank, mp_rank, world)
    if loaded is None:
        return 1
    torch.set_grad_enabled(False)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    answer = model_answers(*loaded, replace(GEN_DEFAULTS, max_new_tokens=answer_tokens(args), top_k=1))
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
                         grounding_prompt=args.grounding_prompt, vqa=args.vqa_protocol)
    if world > 1:
        dist.barrier()
    if rank == 0:
        done = {t: done_ids(predictions_file(args.output_dir, t)) for t in tasks}
        rows = {t: [done[t][ex.id] for ex in data[t]] for t in tasks}
        write_results(args.output_dir, tasks, data, rows, time.perf_counter() - t0, args.vqa_protocol,
                      args.alg_name, {t: server_question_ids(args.data, t) for t in tasks})
    return 0


if __name__ == "__main__":
    run_tool(main)                              # under torchrun: every rank leaves together
