"""Score a model on benchmarks read as their owners release them, batched, on one process or
data parallel over many (torchrun), resumable.

  python evaluation/evaluate.py --from_pretrained cogvlm-grounding-generalist-v1.1 \\
      --task refcoco:val,refcoco:testA --data DATA --output_dir OUT [--batch_size 8] [--limit N]
  torchrun --nproc-per-node 4 evaluation/evaluate.py ...      # each process a whole model
  torchrun --nproc-per-node 8 evaluation/evaluate.py --model_parallel_size 2 ...   # 4 models of 2 ranks

Tasks: refcoco:val|testA|testB, refcoco+:val|testA|testB, refcocog:val|test, synthetic:val, vqav2:val,
textvqa:val, pope:adversarial|popular|random, coco_caption:val, finetune:<split> (the
finetuning scripts' data: exact-match acc and acc_w/o_case), synthetic_qa:<split> (our synthetic
set as utils/synthetic_data.py writes it: per question kind, CogAgent actions included). Every answer is streamed to
OUT/predictions-<task>.jsonl (':' as '_'): a rerun skips what is there. The table is printed
(markdown) and written to OUT/results.json, metrics in percent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from any directory
from utils.flags import ArgumentParser  # noqa: E402

from evaluation.datasets import DataError, Example, read_task  # noqa: E402
from evaluation.metrics import cider_d, grounding_hit, pope_scores, synthetic_scores, vqa_accuracy  # noqa: E402
from utils.task_prompts import EXPRESSION_TO_BOX, fill  # noqa: E402


CAPTION_REQUEST = "Describe the image in one sentence."


def kind(task: str) -> str:
    name = task.split(":")[0]
    return {"vqav2": "vqa", "textvqa": "vqa", "pope": "pope", "coco_caption": "caption",
            "finetune": "exact", "synthetic_qa": "synthetic"}.get(name, "grounding")


def prompt(task: str, ex: Example, version: str, grounding_prompt: str = EXPRESSION_TO_BOX[0]) -> tuple[str, str]:
    """(query, template) per task: referring expressions in the grounding request; VQA in the
    `Short answer` template; POPE's question in the model's own template."""
    k = kind(task)
    if k == "grounding":
        return fill(grounding_prompt, expr=ex.question), version
    if k == "vqa":
        return ex.question, version if version != "auto" else "vqa"
    if k == "caption":
        return CAPTION_REQUEST, version
    return ex.question, version


def exact_scores(answer: str, truth: str) -> dict:
    """The finetuning scripts' metric: the whole answer equal to the truth (and ignoring case)."""
    a, t = answer.strip(), truth.strip()
    return {"exact": float(a == t), "nocase": float(a.lower() == t.lower())}


def example_score(task: str, ex: Example, answer: str):
    k = kind(task)
    if k == "grounding":
        w, h = ex.size
        return {"hit": grounding_hit(answer, ex.box, w, h), "hit_first_box": grounding_hit(answer, ex.box, w, h, False)}
    if k == "vqa":
        return {"accuracy": vqa_accuracy(answer, ex.answers)}
    if k == "caption":
        return {}                                  # CIDEr is a corpus score (idf over the set)
    if k == "exact":
        return exact_scores(answer, ex.answers[0])
    if k == "synthetic":
        return synthetic_scores(ex.question, answer, ex.answers[0])
    return {"label": ex.answers[0]}


def task_metrics(task: str, rows: list, examples: list) -> dict:
    """rows: the prediction lines of every example of the task (in the order of `examples`)
    -> metrics in percent (CIDEr as the papers print it, x100)."""
    k = kind(task)
    if k == "caption":
        score, _ = cider_d([r["answer"] for r in rows], [ex.answers for ex in examples])
        return {"cider": 100 * score, "n": len(rows)}
    if k == "grounding":
        return {"accuracy": 100 * sum(r["score"]["hit"] for r in rows) / len(rows),
                "accuracy_first_box": 100 * sum(r["score"]["hit_first_box"] for r in rows) / len(rows),
                "n": len(rows)}
    if k == "vqa":
        return {"accuracy": 100 * sum(r["score"]["accuracy"] for r in rows) / len(rows), "n": len(rows)}
    if k == "synthetic":                           # per question kind: percent and count
        out = {}
        for m in sorted({m for r in rows for m in r["score"]}):
            got = [r["score"][m] for r in rows if m in r["score"]]
            out[m], out[m + "_n"] = 100 * sum(got) / len(got), len(got)
        return {**out, "n": len(rows)}
    if k == "exact":
        n = max(1, len(rows))
        return {"acc": 100 * sum(r["score"]["exact"] for r in rows) / n,
                "acc_w/o_case": 100 * sum(r["score"]["nocase"] for r in rows) / n, "n": len(rows)}
    s = pope_scores([(r["answer"], r["score"]["label"]) for r in rows])
    return {**{m: 100 * v for m, v in s.items()}, "n": len(rows)}


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


def answer_rows(answer_fn, task: str, chunk: list, version: str, grounding_prompt: str = EXPRESSION_TO_BOX[0]):
    """One batch of examples -> their prediction rows (id, prompt, answer, parsed boxes, score)."""
    from utils.grounding import parse_groundings
    reqs = [(*prompt(task, ex, version, grounding_prompt), ex.image, ex.history) for ex in chunk]
    return [{"id": ex.id, "prompt": query, "answer": answer,
             "boxes": [list(b) for g in parse_groundings(answer) for b in g.boxes],
             "score": example_score(task, ex, answer)}
            for ex, (query, *_), answer in zip(chunk, reqs, answer_fn(reqs))]


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


def score_in_memory(answer_fn, task: str, examples: list, version: str, batch_size: int,
                    rank: int = 0, world: int = 1, group=None, rows_out: Optional[list] = None,
                    show: bool = False) -> dict:
    """What run_task + task_metrics compute, without files: this process answers every
    world-th example, the rows are gathered over `group` (data parallel) and every rank gets
    the task's metrics (and, in rows_out, every example's row in order). The finetuning
    scripts' evaluations and utils/eval_synthetic.py use it."""
    import torch.distributed as dist
    from tqdm import tqdm
    mine = []
    todo = [(i, ex) for i, ex in enumerate(examples) if i % world == rank]
    for j in tqdm(range(0, len(todo), batch_size), desc=task, unit="batch", disable=not show):
        chunk = todo[j:j + batch_size]
        mine += zip((i for i, _ in chunk), answer_rows(answer_fn, task, [ex for _, ex in chunk], version))
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine, group=group)
        mine = [r for part in parts for r in part]
    rows = [r for _, r in sorted(mine, key=lambda x: x[0])]
    if rows_out is not None:
        rows_out.extend(rows)
    return task_metrics(task, rows, examples)


def model_answers(model, tok, gen):
    """answer_fn for run_task: batch_chat on the model, each image decoded once per batch."""
    from utils.chat import ImageContext, batch_chat

    def answer(reqs):
        images, by_version = {}, {}
        for i, (query, version, image, history) in enumerate(reqs):
            if image not in images:
                images[image] = ImageContext(image, model.config)
            by_version.setdefault(version, []).append(i)
        out = [None] * len(reqs)
        for version, idx in by_version.items():
            answers = batch_chat(model, tok, [(reqs[i][0], reqs[i][3], images[reqs[i][2]]) for i in idx],
                                 None if version == "auto" else version, gen)
            for i, a in zip(idx, answers):
                out[i] = a
        return out
    return answer


def main(argv=None) -> int:
    from utils.args import add_model_args, dtype_from_args, setup_logging
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
    args = p.parse_args(argv)
    setup_logging()
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    try:
        data = {t: read_task(args.data, t)[: args.limit] for t in tasks}
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import torch
    import torch.distributed as dist
    from models import CheckpointError, ModelNotFound, load_model
    from models.generate import GenerationConfig
    from models.loading import resolve_pretrained
    from utils.tokenizer import Tokenizer, TokenizerError, resolve_tokenizer
    from models.tp import ModelParallelGroups, init_distributed, set_group
    from utils.lockstep import Lockstep, agree
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
    error = None
    try:
        model, cfg = load_model(args.from_pretrained, device=args.device, dtype=dtype_from_args(args),
                                trust_checkpoint=args.trust_checkpoint, rank=mp_rank, world=mp)
        tok = Tokenizer(resolve_tokenizer(args.local_tokenizer, resolve_pretrained(args.from_pretrained)))
    except (ModelNotFound, CheckpointError, TokenizerError, ValueError, OSError) as e:
        error = str(e)
    failed = agree(error)                          # every rank stops if any failed to load
    if failed:
        if rank == 0:
            print("\n".join(f"error{f' (rank {r})' if world > 1 else ''}: {e}" for r, e in failed), file=sys.stderr)
        return 1
    torch.set_grad_enabled(False)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    answer = model_answers(model, tok, GenerationConfig(max_new_tokens=args.max_new_tokens, top_k=1))
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
        results = {}
        for task in tasks:
            rows = done_ids(predictions_file(args.output_dir, task))
            results[task] = task_metrics(task, [rows[ex.id] for ex in data[task]], data[task])
        (args.output_dir / "results.json").write_text(json.dumps(results, indent=1))
        print("\n| task | metric | value |\n|---|---|---|")
        for task, m in results.items():
            for k, v in m.items():
                print(f"| {task} | {k} | {v if k == 'n' or k.endswith('_n') else f'{v:.2f}'} |")
        print(f"\n{sum(len(v) for v in data.values())} examples in {time.perf_counter() - t0:.1f} s; "
              f"predictions and results.json in {args.output_dir}")
    return 0


if __name__ == "__main__":
    from models.tp import exit_process
    exit_process(main())
