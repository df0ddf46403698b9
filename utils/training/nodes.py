"""Finetuning across nodes: data parallel across nodes, model parallel inside one.

- Joining: every node checks in within RDZV_TIMEOUT seconds (both launchers), or the others
  give up naming the nodes that never came: `node_roll_call` before torchrun's c10d rendezvous
  (finetune_demo/_launch.sh runs `torchrun_nodes`), `join_group` under DeepSpeed's launcher.
- The same configuration everywhere: model, data and options compared before training.
- A lost node: a collective that fails (a peer's sockets closed, or COGVLM_DIST_TIMEOUT seconds
  without an answer) ends every surviving node with one line naming the lost node, exit status 1.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from tqdm import tqdm

from models.loading import resolve_pretrained
from utils.training.options import FinetuneOptions

LOST_NODE_FILE = "COGVLM_LOST_NODE_FILE"   # set by torchrun_nodes; a worker that lost a node creates it
AGENT_GRACE_S = 5.0                        # how long torchrun's agent may take to end by itself after that


def join_timeout() -> float:
    """Seconds a node waits for the others to join (RDZV_TIMEOUT, both launchers)."""
    return float(os.environ.get("RDZV_TIMEOUT", "600"))


def collective_timeout() -> float:
    """Seconds a collective waits for a peer before failing (COGVLM_DIST_TIMEOUT)."""
    return float(os.environ.get("COGVLM_DIST_TIMEOUT", "600"))


def procs_per_node() -> int:
    """torchrun sets LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE."""
    env = os.environ
    return int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env.get("WORLD_SIZE") or 1)


def check_mp_per_node(mp_size: int) -> None:
    per_node = procs_per_node()
    if mp_size < 1 or per_node % mp_size:
        raise ValueError(f"--model_parallel_size {mp_size} must divide the {per_node} process(es) per node "
                         f"(model parallel stays inside a node, data parallel spans the nodes)")


def node_of(rank: int) -> int:
    return rank // procs_per_node()


def this_node() -> int:
    """This node's number: the launcher's NODE_RANK, torchrun's GROUP_RANK, DeepSpeed's CROSS_RANK."""
    env = os.environ
    given = env.get("NODE_RANK") or env.get("GROUP_RANK") or env.get("CROSS_RANK")
    return int(given) if given else node_of(int(env.get("RANK", "0")))


def start_process_group(backend: str, opts: Optional[FinetuneOptions]) -> None:
    """DeepSpeed's process group, every collective bounded by COGVLM_DIST_TIMEOUT (after
    join_group's roll call under DeepSpeed's launcher); with several processes, the node table,
    the one-line report of a lost node and the same-configuration check."""
    import deepspeed
    if backend == "gloo":   # DeepSpeed's CPU shared-memory all-reduce serves only its inference path: no C++ build
        getattr(deepspeed.ops, "__compatible_ops__", {})["deepspeed_shm_comm"] = False
    join_group(backend)
    deepspeed.init_distributed(dist_backend=backend, verbose=False,
                               timeout=datetime.timedelta(seconds=collective_timeout()))
    if dist.get_world_size() > 1:
        nodes = node_table()
        report_lost_nodes(nodes)
        if opts is not None:
            check_same_configuration(nodes, run_fingerprint(opts))


# ----------------------------------------------------------------------------------------
# Joining
def join_group(backend: str) -> None:
    """Under DeepSpeed's launcher (no torchrun agent did the rendezvous): every rank checks in
    at MASTER_ADDR:MASTER_PORT within RDZV_TIMEOUT seconds, or all give up naming the nodes
    missing; then the process group over that store."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world == 1 or dist.is_initialized() or "TORCHELASTIC_RUN_ID" in os.environ:
        return
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    wait = join_timeout()
    try:
        if rank != 0 and not reachable(addr, port, wait):
            raise RuntimeError
        store = dist.TCPStore(addr, port, world, rank == 0, datetime.timedelta(seconds=wait), wait_for_workers=False)
    except RuntimeError:
        raise ConnectionError(f"node {this_node()}: node 0 (the rendezvous at {addr}:{port}) did not answer "
                              f"within RDZV_TIMEOUT={wait:g} s") from None
    store.set(f"cogvlm/joined/{rank}", "1")
    missing = wait_for_keys(store, [f"cogvlm/joined/{r}" for r in range(world)], wait)
    if missing:
        nodes = sorted({node_of(int(k.rsplit("/", 1)[1])) for k in missing})
        nnodes = int(os.environ.get("CROSS_SIZE") or node_of(world - 1) + 1)
        raise TimeoutError(f"node(s) {', '.join(map(str, nodes))} of {nnodes} did not join the rendezvous at "
                           f"{addr}:{port} within RDZV_TIMEOUT={wait:g} s (seen from node {this_node()})")
    store.set_timeout(datetime.timedelta(seconds=collective_timeout()))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=collective_timeout()))


def reachable(host: str, port: int, seconds: float) -> bool:
    """Whether host:port accepts a connection within `seconds` (tried every half second): a
    store client that cannot connect logs C++ errors and a stack trace before it gives up."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)


def wait_for_keys(store, keys: list, seconds: float) -> list:
    """The keys still missing from `store` after waiting up to `seconds` for all of them."""
    deadline = time.monotonic() + seconds
    while True:
        missing = [k for k in keys if not store.check([k])]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)


def node_roll_call(endpoint: str, node: int, nnodes: int, wait: float):
    """Before torchrun's rendezvous, every node checks in by its NODE_RANK at the rendezvous
    endpoint (node 0 hosts the store; torchrun's c10d rendezvous shares it), so that a node that
    never comes is named. Returns the store (kept open while torchrun runs)."""
    host, port = endpoint.rsplit(":", 1)
    try:
        if node != 0 and not reachable(host, int(port), wait):
            raise RuntimeError
        store = dist.TCPStore(host, int(port), None, node == 0, datetime.timedelta(seconds=wait),
                              wait_for_workers=False, multi_tenant=True)
    except RuntimeError:
        raise ConnectionError(f"node {node}: node 0 (the rendezvous at {endpoint}) did not answer within "
                              f"RDZV_TIMEOUT={wait:g} s") from None
    if store.add(f"cogvlm/node/{node}/count", 1) > 1:
        raise ValueError(f"two nodes were started with NODE_RANK={node}; give each node its own rank 0..{nnodes - 1}")
    store.set(f"cogvlm/node/{node}", socket.gethostname())
    missing = wait_for_keys(store, [f"cogvlm/node/{n}" for n in range(nnodes)], wait)
    if missing:
        names = ", ".join(k.rsplit("/", 1)[1] for k in missing)
        raise TimeoutError(f"node(s) {names} of {nnodes} did not join the rendezvous at {endpoint} within "
                           f"RDZV_TIMEOUT={wait:g} s (seen from node {node})")
    return store


# ----------------------------------------------------------------------------------------
# Who is where, and one line for a lost node
def local_address() -> str:
    """The address this node reaches MASTER_ADDR from (what its peers see)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def node_table() -> list:
    """Every rank's (node, host, address), gathered once."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, (this_node(), socket.gethostname(), local_address()))
    return out


def describe(node: int, nodes: list) -> str:
    """'node 1 (10.0.0.2, ranks 2-3)': the node's address as its peers reach it."""
    host, addr = next((h, a) for n, h, a in nodes if n == node)
    ranks = [r for r, (n, _, _) in enumerate(nodes) if n == node]
    span = f"ranks {ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else f"rank {ranks[0]}"
    return f"node {node} ({host if addr.startswith('127.') else addr}, {span})"


def lost_node_message(error: BaseException, nodes: list) -> str:
    """One line for a collective that failed because a peer node died or stopped answering:
    the node whose address the error names, else every other node."""
    me = nodes[dist.get_rank()][0]
    # gloo's text: "[.../pair.cc:553] Connection closed by peer [ADDR]:PORT. This is typically ..."
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().split("\n")[0]).split(". ")[0] or type(error).__name__
    named = {n for n, _, a in nodes if not a.startswith("127.") and re.search(rf"\b{re.escape(a)}\b", str(error))}
    others = (named or {n for n, _, _ in nodes}) - {me}
    lost = " or ".join(describe(n, nodes) for n in sorted(others)) if others else f"a process of {describe(me, nodes)}"
    return (f"lost {lost}: {text[:200]} (seen from node {me}; collectives wait "
            f"COGVLM_DIST_TIMEOUT={collective_timeout():g} s)")


def is_peer_loss(error: BaseException) -> bool:
    """A collective or store operation that failed because a peer went away or stopped answering."""
    return isinstance(error, (dist.DistError, ConnectionError, TimeoutError)) or (
        isinstance(error, RuntimeError) and bool(re.search(
            r"[Cc]onnection (closed|reset|refused)|[Bb]roken pipe|[Tt]imed out|[Tt]imeout|peer", str(error))))


def report_lost_nodes(nodes: list) -> None:
    """A distributed error that ends the run becomes one line (from each surviving node's first
    process) and exit status 1, without the teardown that can hang on a dead peer; under
    torchrun_nodes the agent is told too (LOST_NODE_FILE), and learns who is where beforehand
    (the agent may be the one to notice that node 0, the store's host, is gone)."""
    previous = sys.excepthook
    if os.environ.get(LOST_NODE_FILE) and os.environ.get("LOCAL_RANK", "0") == "0":
        Path(os.environ[LOST_NODE_FILE] + ".nodes").write_text(
            json.dumps({n: describe(n, nodes) for n in sorted({n for n, _, _ in nodes})}))

    def hook(kind, error, tb):
        if not is_peer_loss(error):
            return previous(kind, error, tb)
        if os.environ.get("LOCAL_RANK", "0") == "0":      # tqdm.write: on a line of its own, not after the bar
            tqdm.write(f"error: {lost_node_message(error, nodes)}", file=sys.stderr)
            sys.stderr.flush()
        if os.environ.get(LOST_NODE_FILE):
            Path(os.environ[LOST_NODE_FILE]).touch()
        sys.stdout.flush()
        os._exit(1)
    sys.excepthook = hook


# ----------------------------------------------------------------------------------------
# The same configuration on every node
def folder_fingerprint(path: Optional[str]) -> Optional[str]:
    """Names and sizes of the files under `path` (a model or data folder), hashed: the same
    data under another path on another node agrees."""
    if not path:
        return None
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root)}\0{f.stat().st_size}\0".encode())
        if f.parent == root and f.suffix == ".json" and f.stat().st_size < 1 << 20:   # model_config.json
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def file_digest(path: Optional[str]) -> Optional[str]:
    """A short hash of a file's bytes (None when there is no such file)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12] if path else None
    except OSError:
        return None


def run_fingerprint(opts: FinetuneOptions) -> dict:
    """What every node must agree on, by flag: the model's and data's content, and each
    training option (the --deepspeed_config file by content; paths of --save and the tokenizer
    excepted)."""
    out = {"--from_pretrained": folder_fingerprint(str(resolve_pretrained(opts.model.from_pretrained))),
           "--version": opts.model.version, "--dtype": opts.model.dtype}
    for flag in ("train_data", "valid_data", "test_data"):
        out[f"--{flag}"] = folder_fingerprint(getattr(opts.data, flag))
    for part in (opts.data, opts.optim, opts.params, opts.run):
        for k, v in asdict(part).items():
            if k not in ("train_data", "valid_data", "test_data", "save"):
                out[f"--{k}"] = file_digest(v) if k == "deepspeed_config" else v
    return out


def check_same_configuration(nodes: list, fingerprint: dict) -> None:
    """Every rank's fingerprint against rank 0's: a node started with another model, data or
    option is refused before training, the message naming what differs."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, fingerprint)
    ours = everyone[0]
    for rank, theirs in enumerate(everyone):
        if theirs == ours:
            continue
        diff = [f"{k} {ours.get(k)!r} vs {theirs.get(k)!r}" for k in sorted(set(ours) | set(theirs))
                if ours.get(k) != theirs.get(k)]
        raise ValueError(f"{describe(nodes[rank][0], nodes)} was started with another configuration than "
                         f"{describe(nodes[0][0], nodes)}: {'; '.join(diff)} (model and data compared by "
                         f"file names and sizes)")


# ----------------------------------------------------------------------------------------
# The torchrun side of finetune_demo/_launch.sh on each node
def child_pids() -> list:
    """The pids of this process's children (torchrun's workers), from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                out.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def watch_for_lost_node(flag: Path) -> None:
    """A thread beside torchrun's agent: once a worker reported a lost node (created `flag`),
    the agent gets AGENT_GRACE_S seconds to end by itself; it can instead block for many minutes
    on a rendezvous store that the lost node hosted. Then this node's workers and the agent end,
    status 1 (the worker printed the line)."""
    def watch():
        while not flag.exists():
            time.sleep(0.2)
        time.sleep(AGENT_GRACE_S)
        for pid in child_pids():
            for kill in (os.killpg, os.kill):          # each worker leads a session of its own
                try:
                    kill(pid, signal.SIGKILL)
                    break
                except OSError:
                    continue
        flag.unlink(missing_ok=True)
        sys.stderr.flush()
        os._exit(1)
    threading.Thread(target=watch, name="lost-node-watch", daemon=True).start()


def torchrun_nodes(argv: list) -> int:
    """torchrun with `argv` on this node (NODE_RANK), after the roll call; its failures as one
    line (a worker's own error line already printed says the rest). Returns the exit status."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run
    args = parse_args(argv)
    node, nnodes = int(os.environ.get("NODE_RANK", "0")), int(str(args.nnodes).split(":")[-1])
    logging.disable(logging.ERROR)               # the agent's failure reports: ours are shorter
    flag = Path(tempfile.gettempdir()) / f"cogvlm-lost-node-{os.getpid()}-{time.time_ns()}"   # made only on a loss
    os.environ[LOST_NODE_FILE] = str(flag)                # the workers inherit it
    try:
        store = node_roll_call(args.rdzv_endpoint, node, nnodes, join_timeout()) if nnodes > 1 else None
        watch_for_lost_node(flag)
        run(args)
        del store
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        if all(c < 0 for c in codes):
            print(f"error: node {node}: a process died with signal {-codes[0]}", file=sys.stderr)
        return next((c for c in codes if c > 0), 1)
    except (ConnectionError, TimeoutError, ValueError) as e:    # the roll call's, naming the nodes
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RendezvousError as e:
        print(rendezvous_failure(e, node, args.rdzv_endpoint, flag), file=sys.stderr, end="")
        return 1
    except SignalException as e:                 # Ctrl-C or a scheduler's SIGTERM: torchrun stopped the workers
        return 128 + int(e.sigval)
    finally:
        flag.unlink(missing_ok=True)
        Path(f"{flag}.nodes").unlink(missing_ok=True)
    return 0


def rendezvous_failure(error: Exception, node: int, endpoint: str, flag: Path) -> str:
    """The line (or nothing) for torchrun's agent failing on its rendezvous store. Before the
    workers met: the rendezvous failed. After (they wrote who is where): node 0, which hosts the
    store, is lost, unless a worker has already said so (`flag`)."""
    why = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    try:
        nodes = json.loads(Path(f"{flag}.nodes").read_text())
    except (OSError, ValueError):
        return (f"error: node {node}: the rendezvous at {endpoint} failed ({why}) within "
                f"RDZV_TIMEOUT={join_timeout():g} s\n")
    if flag.exists():
        return ""
    return f"error: lost {nodes.get('0', 'node 0')}: the rendezvous store it hosts stopped answering ({why[:200]}) " \
           f"(seen from node {node})\n"
