"""The training run: setup (setup.py), the step loop, evaluation on the validation and test
sets, and checkpoints. The state the loop reads and updates is one `TrainState`.

Checkpoints (`--save DIR`, every --save_interval steps and at the end), in the SAT layout:
    DIR/model_config.json        (with "lora": the adapter settings, when LoRA is on)
    DIR/<step>/mp_rank_XX_model_states.pt   {'module': SAT-named weights, 'iteration': step}
    DIR/ds_state/<step>/...      DeepSpeed's optimizer / scheduler state (ZeRO partitions)
    DIR/tokenizer/               the tokenizer the run used
    DIR/latest                   written last, after every rank finished: a run killed while
                                 saving resumes from the previous complete checkpoint.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from models.checkpoint import atomic_write, remove_stale_temporaries, sat_key
from models.loading import resolve_pretrained
from utils.chat.tokenizer import Tokenizer, resolve_tokenizer
from utils.training.aux_heads import attach_aux_heads
from utils.training.dataset import FinetuneDataset, collate_train
from utils.training.loss import compute_loss
from utils.training.options import FinetuneOptions
from utils.training.setup import (Worker, add_adapters, build_engine, checkpoint_layers, freeze_for_training,
                                  init_distributed, load_for_training, quantized_base, resume_step)

log = logging.getLogger("finetune")


@dataclass
class TrainState:
    """What the loop reads (the built run) and updates (progress and measurements)."""
    opts: FinetuneOptions
    worker: Worker
    engine: object                            # DeepSpeed engine; engine.module is the model
    scheduler: object
    cfg: object                               # models.config.ModelConfig (saved with each checkpoint)
    tok: Tokenizer
    train_set: FinetuneDataset
    valid_set: Optional[FinetuneDataset]
    object_vocab: Optional[tuple]             # --aux_object_loss targets (attach_aux_heads)
    base_sd: Optional[dict]                   # QLoRA: the checkpoint's unquantized base weights
    start_step: int
    bar: tqdm
    step: int = 0                             # optimizer steps done
    loss: Optional[float] = None              # of the last step
    first_loss: Optional[float] = None
    eval: Optional[dict] = None               # the last validation metrics
    seen: int = 0                             # samples trained on, over every rank
    window: list = field(default_factory=list)        # step losses since the last log line
    step_times: list = field(default_factory=list)    # seconds per step
    t0: float = field(default_factory=time.time)

    @property
    def save(self) -> Path:
        return Path(self.opts.run.save)


def train(opts: FinetuneOptions) -> dict:
    """The whole run. Returns {'step', 'loss' (of the last step), 'eval': last validation
    metrics, ...}; with --eval_only the metrics of --valid_data / --test_data."""
    worker = init_distributed(opts.model, opts.optim.model_parallel_size, opts)
    start = resume_step(opts.run, worker.dp)
    source = opts.model.from_pretrained
    if start is not None:                                # preflight() checked the files
        source = opts.run.save
        log.info("resuming from %s at step %d", source, start)
    if opts.run.save and worker.is_main and remove_stale_temporaries(opts.run.save):
        log.info("removed temporary files of an interrupted save in %s", opts.run.save)
    model, cfg, base_sd = prepare_model(source, opts, worker)
    tok = Tokenizer(resolve_tokenizer(opts.model.local_tokenizer, resolve_pretrained(opts.model.from_pretrained)))
    if opts.run.eval_only:
        return evaluate_sets(model, tok, cfg, opts, worker, ("valid", "test"))
    state = start_training(model, cfg, tok, base_sd, opts, worker, start or 0)
    return run_loop(state)


def prepare_model(source: str, opts: FinetuneOptions, worker: Worker):
    """(model, cfg, base_sd): this rank's model with the adapters the flags ask for; base_sd:
    QLoRA's unquantized base weights (saved in place of the 4-bit ones), else None."""
    mp, trust = opts.optim.model_parallel_size, opts.model.trust_checkpoint
    model, cfg = load_for_training(source, trust, worker, mp, opts.params.use_qlora)
    base_sd = quantized_base(source, trust, worker, mp) if opts.params.use_qlora else None
    add_adapters(model, cfg, opts.params, opts.optim.seed)
    return model, cfg, base_sd


def load_datasets(opts: FinetuneOptions, cfg, tok: Tokenizer, worker: Worker):
    """(training set, validation set or None); rank 0 prints their sizes."""
    d, version = opts.data, opts.model.version
    train_set = FinetuneDataset(d.train_data, cfg, tok, version, d.max_length, d.pack_questions)
    valid_set = FinetuneDataset(d.valid_data, cfg, tok, version, d.max_length) if d.valid_data else None
    if worker.is_main:
        print(f"train samples: {len(train_set)} (skipped {len(train_set.skipped)})"
              + (f"; valid samples: {len(valid_set)} (skipped {len(valid_set.skipped)})" if valid_set else ""),
              flush=True)
    return train_set, valid_set


def make_trainable(model, train_set, opts: FinetuneOptions, worker: Worker) -> Optional[tuple]:
    """Aux heads (--aux_object_loss), requires_grad on what trains, activation checkpointing,
    training mode. Returns the aux heads' object vocabulary (None without them)."""
    object_vocab = attach_aux_heads(model, train_set) if opts.data.aux_object_loss else None
    trainable, total = freeze_for_training(model, opts.params)
    if trainable == 0:
        raise ValueError("nothing to train: give --lora_rank > 0, --full or --train_params")
    if worker.is_main:
        print(f"trainable parameters: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)", flush=True)
    if opts.optim.checkpoint_activations:
        checkpoint_layers(model)
    model.train()
    return object_vocab


def start_training(model, cfg, tok, base_sd, opts: FinetuneOptions, worker: Worker, start: int) -> TrainState:
    """Data, trainable parameters, the DeepSpeed engine (its optimizer state restored with
    --resume) and the progress bar: the state of step `start`."""
    train_set, valid_set = load_datasets(opts, cfg, tok, worker)
    object_vocab = make_trainable(model, train_set, opts, worker)
    engine, scheduler = build_engine(model, opts.optim, opts.data, worker)
    if opts.run.resume:
        engine.load_checkpoint(str(Path(opts.run.save) / "ds_state"), tag=str(start), load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=True)
    bar = tqdm(total=opts.optim.train_iters, initial=start, desc="finetune", unit="step",
               disable=not worker.is_main, dynamic_ncols=True)
    return TrainState(opts, worker, engine, scheduler, cfg, tok, train_set, valid_set, object_vocab, base_sd,
                      start_step=start, bar=bar, step=start)


# ----------------------------------------------------------------------------------------
def batch_indices(n: int, step: int, micro: int, global_batch: int, accum: int, dp_rank: int,
                  batch: int, seed: int) -> list[int]:
    """Sample indices of micro-batch `micro` of optimizer step `step` for one data-parallel
    rank: a stream of per-epoch permutations (seeded by seed and epoch), cut in order. A pure
    function of its arguments, so a resumed run reads exactly what it would have read."""
    start = (step * accum + micro) * global_batch + dp_rank * batch
    out = []
    for pos in range(start, start + batch):
        epoch, i = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[i]))
    return out


def due(step: int, interval: int, last: int) -> bool:
    """Whether the work done every `interval` steps (and after the last one) follows step `step`."""
    return (step + 1) % interval == 0 or step + 1 == last


def run_loop(state: TrainState) -> dict:
    """Steps start_step .. train_iters, each logged, evaluated and saved when due; then the
    test set and the timings. Returns the run's result (see train)."""
    o, run = state.opts.optim, state.opts.run
    for step in range(state.start_step, o.train_iters):
        train_step(state, step)
        log_progress(state, step)
        if state.valid_set is not None and due(step, run.eval_interval, o.train_iters):
            evaluate_valid(state, step)
        if due(step, run.save_interval, o.train_iters):
            save_checkpoint(state, step + 1)
    state.bar.close()
    result = {"step": state.step, "loss": state.loss, "eval": state.eval}
    if state.first_loss is not None:
        result["first_loss"] = state.first_loss
    if state.opts.data.test_data:
        result.update(evaluate_sets(state.engine.module, state.tok, state.cfg, state.opts, state.worker, ("test",)))
    result.update(timings(state))
    if state.worker.is_main and result["loss"] is not None:
        print(f"final step {result['step']} loss {result['loss']:.8f}", flush=True)
    return result


def train_step(state: TrainState, step: int) -> None:
    """One optimizer step over --gradient_accumulation_steps micro-batches; the loss averaged
    over them and over the data-parallel ranks."""
    o, d, w = state.opts.optim, state.opts.data, state.worker
    t = time.perf_counter()
    step_loss = torch.zeros((), dtype=torch.float64)
    for micro in range(o.gradient_accumulation_steps):
        idx = batch_indices(len(state.train_set), step, micro, o.batch_size * w.dp, o.gradient_accumulation_steps,
                            w.dp_rank, o.batch_size, o.seed)
        batch = collate_train([state.train_set[i] for i in idx], state.object_vocab)
        if batch is None:
            continue
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=w.autocast_bf16):
            loss = compute_loss(state.engine.module, batch, torch.device(w.device), d.aux_object_loss,
                                encoders_only=step < d.aux_warmup_iters)
        state.engine.backward(loss)
        state.engine.step()
        step_loss += loss.detach().double().cpu() / o.gradient_accumulation_steps
        state.seen += len(idx) * w.dp
    if w.dp > 1:
        dist.all_reduce(step_loss, group=w.dp_group)
        step_loss /= w.dp
    state.step_times.append(time.perf_counter() - t)
    state.step, state.loss = step + 1, step_loss.item()
    if step == state.start_step:
        state.first_loss = state.loss
    state.window.append(state.loss)
    state.bar.update(1)


def log_progress(state: TrainState, step: int) -> None:
    """Every --log_interval steps (and the first and last): mean loss since the last line, LR, speed."""
    o = state.opts.optim
    if not (due(step, state.opts.run.log_interval, o.train_iters) or step == state.start_step):
        return
    rate = state.seen / max(1e-9, time.time() - state.t0)
    lr = state.scheduler.get_last_lr()[0]
    what = " (image encoders, per-patch loss)" if step < state.opts.data.aux_warmup_iters else ""
    if state.worker.is_main:
        state.bar.write(f"step {step + 1}/{o.train_iters} loss {sum(state.window) / len(state.window):.6f}{what} "
                        f"lr {lr:.3e} samples/s {rate:.2f}")
    state.window.clear()


def timings(state: TrainState) -> dict:
    """Median step time and peak memory of this process (printed by rank 0)."""
    if not state.step_times:
        return {}
    import resource
    import statistics
    out = {"step_time": statistics.median(state.step_times),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if state.worker.is_main:
        cuda_peak = f", CUDA peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MB" if state.worker.cuda else ""
        print(f"median step time {out['step_time']:.4f} s, peak RSS {out['peak_rss_mb']:.0f} MB"
              f"{cuda_peak} (rank 0)", flush=True)
    return out


# ----------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, tok, examples: list, opts: FinetuneOptions, worker: Worker) -> dict:
    """Greedy answers to `examples` (spread over the data-parallel ranks), scored by the
    benchmark runner's `finetune` task (utils/scoring/tasks.py): acc (exact match) and
    acc_w/o_case, in percent."""
    from models.generate import GenerationConfig
    from utils.scoring.tasks import model_answers, score_in_memory
    model.eval()
    gen = GenerationConfig(max_new_tokens=opts.run.eval_max_new_tokens, top_k=1)
    metrics = score_in_memory(model_answers(model, tok, gen), "finetune:", examples, opts.model.version or "auto",
                              opts.optim.batch_size, worker.dp_rank, worker.dp, worker.dp_group)
    model.train()
    return metrics


def eval_examples(dataset: FinetuneDataset) -> list:
    """A finetuning dataset's samples (the ones that fit) as the runner's examples."""
    from utils.scoring.tasks import Example
    return [Example(f"{s.image.name}#{i}", s.image, s.turns[-1][0], [s.turns[-1][1]], history=list(s.turns[:-1]))
            for i, s in enumerate(dataset.samples)]


def evaluate_valid(state: TrainState, step: int) -> None:
    """The first --eval_samples validation samples, during training."""
    examples = eval_examples(state.valid_set)[: state.opts.run.eval_samples]
    state.eval = metrics = evaluate(state.engine.module, state.tok, examples, state.opts, state.worker)
    if state.worker.is_main:
        state.bar.write(f"eval step {step + 1}: acc {metrics['acc']:.2f} acc_w/o_case "
                        f"{metrics['acc_w/o_case']:.2f} ({metrics['n']} samples)")


def evaluate_sets(model, tok, cfg, opts: FinetuneOptions, worker: Worker, names: tuple) -> dict:
    """Score the named sets: "valid" (its first --eval_samples) and/or "test" (every sample)."""
    sets = {"valid": (opts.data.valid_data, opts.run.eval_samples), "test": (opts.data.test_data, None)}
    out = {}
    for name in names:
        folder, limit = sets[name]
        if not folder:
            continue
        data = FinetuneDataset(folder, cfg, tok, opts.model.version, opts.data.max_length)
        out[name] = metrics = evaluate(model, tok, eval_examples(data)[:limit], opts, worker)
        if worker.is_main:
            print(f"{name}: acc {metrics['acc']:.2f} acc_w/o_case {metrics['acc_w/o_case']:.2f} "
                  f"({metrics['n']} samples, skipped {len(data.skipped)})", flush=True)
    return out


# ----------------------------------------------------------------------------------------
def sat_state_for_saving(model, base_sd: Optional[dict]) -> dict:
    """SAT-named weights; quantized (QLoRA) base weights come from the checkpoint they were
    loaded from (they never change), everything else from the model."""
    from models.quantize import QUANTIZED
    quantized = {n for n, m in model.named_modules() if isinstance(m, QUANTIZED)}
    out = {}
    for name in sorted(quantized):                    # PyTorch int4/int8: qweight + scales buffers
        key = sat_key(name + ".weight")
        out[key] = base_sd[key].detach().cpu().contiguous()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        mod, _, attr = name.rpartition(".")
        if name.startswith("aux_heads.") or mod in quantized and attr in ("qweight", "scales"):
            continue                                  # training-only heads; quantized weights (above)
        key = sat_key(name)
        if not t.is_floating_point():                 # bitsandbytes' packed weights
            t = base_sd[key]
        out[key] = t.detach().cpu().contiguous()
    return out


def save_checkpoint(state: TrainState, step: int) -> None:
    """Every rank's files of `step`, then (after a barrier) `latest` pointing at them."""
    w, save = state.worker, state.save
    state.engine.save_checkpoint(str(save / "ds_state"), tag=str(step), save_latest=False,
                                 exclude_frozen_parameters=True)
    if w.dp_rank == 0:
        module = {"module": sat_state_for_saving(state.engine.module, state.base_sd), "iteration": step}
        atomic_write(save / str(step) / f"mp_rank_{w.mp_rank:02d}_model_states.pt",
                     lambda p: torch.save(module, p))
    if w.is_main:
        save_config_and_tokenizer(state)
    dist.barrier()                                  # every file of this step is on disk ...
    if w.is_main:                                   # ... before `latest` points at it
        atomic_write(save / "latest", lambda p: Path(p).write_text(str(step)))
        log.info("saved checkpoint %s/%d", save, step)
    dist.barrier()


def save_config_and_tokenizer(state: TrainState) -> None:
    """model_config.json (with the LoRA settings and the model-parallel size) and, once, the tokenizer."""
    state.cfg.model_parallel_size = state.opts.optim.model_parallel_size
    atomic_write(state.save / "model_config.json", lambda p: state.cfg.save(p))
    tokdir = state.save / "tokenizer"
    if not tokdir.exists() and state.tok.path.is_dir():
        shutil.copytree(state.tok.path, tokdir)
