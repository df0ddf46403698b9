"""Finetuning and evaluation across nodes, on real network hosts made on this machine: two
network namespaces joined by a veth pair (10.231.0.1 and 10.231.0.2, iproute2's `ip netns`),
each a "node" running its own launcher, gloo over the veth addresses. Needs root (skips
otherwise); every process of a namespace is killed and the namespaces are removed even when a
test fails.

The launchers follow torchrun's c10d rendezvous (torch/distributed/elastic/rendezvous in
pytorch/pytorch: --nnodes, --rdzv-endpoint, join_timeout) and DeepSpeed's hostfile (`host slots=N`,
deepspeed/launcher/runner.py in deepspeedai/DeepSpeed, --no_ssh --node_rank)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ADDRS = ("10.231.0.1", "10.231.0.2")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "LOGLEVEL": "WARNING", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "COGVLM_DTYPE": "float32", "PYTHON": sys.executable, "MODEL": "tiny-cogvlm", "RDZV_TIMEOUT": "60",
       "COGVLM_DIST_TIMEOUT": "60"}
STEPS = 6


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def namespace_pids(ns: str) -> list:
    """Every process whose network namespace is `ns` (read from /proc: `ip netns pids` can miss
    some while processes come and go)."""
    try:
        inode = os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return []
    out = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                out.append(int(entry))
        except OSError:
            continue
    return out


def kill_namespace(ns: str):
    """SIGKILL every process in namespace `ns`: the whole node dies (torchrun starts its workers
    in sessions of their own, so a launcher's process group is not all of it)."""
    for _ in range(100):
        pids = namespace_pids(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


@dataclass
class Nodes:
    ns: tuple          # the namespaces, node 0 and node 1
    dev: tuple         # each one's end of the veth pair


@pytest.fixture(scope="module")
def nodes():
    """Two namespaces ("nodes") and a veth pair between them; deleted at the end, whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is missing (make test installs it)")
    tag = os.getpid() % 100000
    made = Nodes((f"cvn{tag}a", f"cvn{tag}b"), (f"cv{tag}a", f"cv{tag}b"))
    try:
        for n in made.ns:
            _ip("netns", "add", n)
        _ip("link", "add", made.dev[0], "type", "veth", "peer", "name", made.dev[1])
        for n, dev, addr in zip(made.ns, made.dev, ADDRS):
            _ip("link", "set", dev, "netns", n)
            _ip("netns", "exec", n, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            _ip("netns", "exec", n, "ip", "link", "set", dev, "up")
            _ip("netns", "exec", n, "ip", "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as e:
        for n in made.ns:
            _ip("netns", "del", n, check=False)
        pytest.skip(f"network namespaces do not work here: {getattr(e, 'stderr', '') or e}")
    try:
        yield made
    finally:
        for n in made.ns:                       # the veth pair goes with its namespaces
            kill_namespace(n)
            _ip("netns", "del", n, check=False)


class Node:
    """One node's command, started in its namespace, output to a file."""
    def __init__(self, ns: str, cmd: list, env: dict, log: Path):
        self.ns, self.log = ns, log
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *map(str, cmd)], stdout=log.open("w"),
                                     stderr=subprocess.STDOUT, env=env, cwd="/", start_new_session=True)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self):
        """The node dies: every process of its namespace."""
        kill_namespace(self.ns)
        self.proc.wait()

    @property
    def out(self) -> str:
        return self.log.read_text()

    @property
    def errors(self) -> list:
        return [line for line in self.out.splitlines() if line.startswith("error:")]


def run_nodes(runs: list, tmp: Path, timeout: float = 120) -> list:
    """Start every (namespace, command, env) at once, wait for all; returns their (exit status,
    Node); whatever happens, every process of those namespaces is killed on the way out."""
    started = [Node(ns, cmd, env, tmp / f"run{i}.log") for i, (ns, cmd, env) in enumerate(runs)]
    try:
        deadline = time.time() + timeout
        codes = [n.wait(max(1, deadline - time.time())) for n in started]
    finally:
        for ns in {n.ns for n in started}:
            kill_namespace(ns)
    return list(zip(codes, started))


def node_env(rank: int, port: int, **extra) -> dict:
    """torchrun's c10d rendezvous: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT."""
    return {**ENV, "NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": ADDRS[0], "MASTER_PORT": str(port),
            "NUM_GPUS": "1", **{k: str(v) for k, v in extra.items()}}


def hostfile_env(hostfile: Path, rank: int, port: int, **extra) -> dict:
    """DeepSpeed's launcher over the hostfile, the same command on each host (--no_ssh: NODE_RANK)."""
    return {**ENV, "HOSTFILE": str(hostfile), "NODE_RANK": str(rank), "MASTER_PORT": str(port),
            **{k: str(v) for k, v in extra.items()}}


def launcher(*flags) -> list:
    return ["bash", str(ROOT / "finetune_demo" / "finetune_cogvlm_lora.sh"), *map(str, flags)]


def train_flags(data: Path, steps: int = STEPS, *extra) -> list:
    return ["--train_data", data, "--valid_data=", "--test_data=", "--train_iters", steps, "--batch_size", 2,
            "--lr", 1e-2, "--log_interval", 1, "--save_interval", 3, "--lora_rank", 4, *extra]


def losses(out: str) -> dict:
    return {int(s): float(v) for s, v in re.findall(r"step (\d+)/\d+ loss ([0-9.]+)", out)}


def weights(save: Path, step: int) -> dict:
    return torch.load(save / str(step) / "mp_rank_00_model_states.pt", weights_only=True)["module"]


def wait_for(what, seconds: float, explain):
    deadline = time.time() + seconds
    while not what():
        assert time.time() < deadline, explain()
        time.sleep(0.1)


@pytest.fixture(scope="module")
def captchas(tmp_path_factory):
    from utils.data.captcha import generate
    root = tmp_path_factory.mktemp("captcha") / "train"
    generate(root, 16, seed=0)
    return root


@pytest.fixture(scope="module")
def hostfile(tmp_path_factory):
    """DeepSpeed's format; 4 slots each, of which NUM_GPUS_PER_WORKER=1 are used where it is set."""
    path = tmp_path_factory.mktemp("hosts") / "hostfile"
    path.write_text(f"# the two namespaces\n{ADDRS[0]} slots=4\n{ADDRS[1]} slots=4\n")
    return path


@pytest.fixture(scope="module")
def one_node_two_processes(nodes, captchas, tmp_path_factory):
    """The reference: one node of two processes (in node 0's namespace, so nothing outlives it)."""
    tmp = tmp_path_factory.mktemp("one")
    [(code, run)] = run_nodes([(nodes.ns[0], launcher(*train_flags(captchas)), {**ENV, "SAVE": tmp / "save",
                                                                              "NUM_GPUS": "2"})], tmp)
    assert code == 0, run.out[-3000:]
    return tmp / "save", losses(run.out)


def same_training(save: Path, out: str, reference):
    """The losses of every step and the saved weights, bit for bit, are the reference's."""
    ref_save, ref_losses = reference
    assert losses(out) == ref_losses and len(ref_losses) == STEPS
    for step in (3, STEPS):
        a, b = weights(save, step), weights(ref_save, step)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (save / str(STEPS)).iterdir()) == ["mp_rank_00_model_states.pt"]   # written once


@pytest.mark.timeout(240)
def test_two_nodes_train_like_two_processes_and_resume_on_one_node(nodes, captchas, one_node_two_processes, tmp_path):
    save = tmp_path / "save"
    flags = train_flags(captchas)
    (c0, n0), (c1, n1) = run_nodes([(nodes.ns[r], launcher(*flags), node_env(r, 29541, SAVE=save)) for r in (0, 1)],
                                   tmp_path)
    assert c0 == 0 and c1 == 0, n0.out[-2000:] + n1.out[-2000:]
    same_training(save, n0.out, one_node_two_processes)
    # resumed on another node count (one node of two processes: ZeRO-2's optimizer partitions
    # need the same data-parallel size), from the 2-node checkpoint
    [(code, run)] = run_nodes([(nodes.ns[0], launcher(*train_flags(captchas, STEPS + 2), "--resume"),
                                {**ENV, "SAVE": save, "NUM_GPUS": "2"})], tmp_path)
    assert code == 0, run.out[-3000:]
    assert sorted(losses(run.out)) == [STEPS + 1, STEPS + 2] and (save / "latest").read_text() == str(STEPS + 2)


@pytest.mark.timeout(180)
def test_hostfile_nodes_train_like_two_processes(nodes, captchas, hostfile, one_node_two_processes, tmp_path):
    """DeepSpeed's launcher, with the original's variables: HOST_FILE_PATH, NUM_WORKERS, NUM_GPUS_PER_WORKER."""
    save = tmp_path / "save"
    env = {**ENV, "HOST_FILE_PATH": str(hostfile), "NUM_WORKERS": "2", "NUM_GPUS_PER_WORKER": "1", "SAVE": str(save),
           "MASTER_PORT": "29551"}
    runs = [(nodes.ns[r], launcher(*train_flags(captchas)), {**env, "NODE_RANK": str(r)}) for r in (0, 1)]
    (c0, n0), (c1, n1) = run_nodes(runs, tmp_path)
    assert c0 == 0 and c1 == 0, n0.out[-2000:] + n1.out[-2000:]
    assert "starting 2 node(s) of" in n0.out
    same_training(save, n0.out, one_node_two_processes)


@pytest.mark.timeout(180)
def test_two_node_evaluation_gives_the_results_of_one_process(nodes, tmp_path):
    from utils.data.synthetic import generate
    generate(tmp_path / "s", 3, 3, gui=False, text_min_len=4)      # as tests/test_evaluation.py makes it
    args = ["--from_pretrained", "tiny-cogvlm", "--task", "synthetic_qa:", "--data", tmp_path / "s",
            "--version", "chat_old", "--batch_size", 3, "--max_new_tokens", 12, "--limit", 7]
    evaluate = ROOT / "evaluation" / "evaluate.py"
    one = subprocess.run([sys.executable, str(evaluate), *map(str, args), "--output_dir", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=120, cwd="/", env=ENV)
    assert one.returncode == 0, one.stderr[-2000:]
    runs = []
    for rank, addr in enumerate(ADDRS):
        runs.append((nodes.ns[rank], [sys.executable, "-m", "torch.distributed.run", "--nnodes", 2, "--nproc-per-node", 1,
                                      "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{ADDRS[0]}:29542", "--rdzv-id", "eval",
                                      "--rdzv-conf", f"is_host={int(rank == 0)},join_timeout=60", "--local-addr", addr,
                                      evaluate, *args, "--output_dir", tmp_path / "two"],
                     {**ENV, "GLOO_SOCKET_IFNAME": nodes.dev[rank]}))
    (c0, n0), (c1, n1) = run_nodes(runs, tmp_path)
    assert c0 == 0 and c1 == 0, n0.out[-2000:] + n1.out[-2000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert a == b and a["synthetic_qa:"]["n"] == 7
    ids = [json.loads(x)["id"] for x in (tmp_path / "two" / "predictions-synthetic_qa_.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 7                     # every example answered once, over both nodes


def ends_with_one_line(node: Node, code: int, lost: int):
    """Exit status 1, one `error:` line naming the lost node by number, address and rank, no traceback."""
    assert code == 1, (code, node.out[-2000:])
    addr = re.escape(ADDRS[lost])
    assert len(node.errors) == 1 and re.match(rf"error: lost node {lost} \({addr}, rank {lost}\): ", node.errors[0]), \
        node.out[-2000:]
    assert "Traceback" not in node.out


@pytest.mark.timeout(150)
@pytest.mark.parametrize("fault", ["killed", "cut off"])
def test_lost_node_ends_the_others_with_one_line(nodes, captchas, tmp_path, fault):
    """Node 0 (it hosts the rendezvous) killed: its sockets close and node 1 ends at once. Node
    1's link cut (a peer that stops answering): both end after COGVLM_DIST_TIMEOUT seconds."""
    timeout = 20 if fault == "killed" else 10
    env = {"SAVE": tmp_path / "save", "COGVLM_DIST_TIMEOUT": timeout}
    flags = train_flags(captchas, 400)
    started = [Node(nodes.ns[r], launcher(*flags), node_env(r, 29543, **env), tmp_path / f"node{r}.log") for r in (0, 1)]
    try:
        wait_for(lambda: "step 3/400" in started[0].out, 90, lambda: started[0].out[-2000:] + started[1].out[-2000:])
        if fault == "killed":
            started[0].kill()
        else:
            _ip("netns", "exec", nodes.ns[1], "ip", "link", "set", nodes.dev[1], "down")
        t = time.time()
        survivors = [1] if fault == "killed" else [0, 1]
        codes = {r: started[r].wait(timeout=timeout + 30) for r in survivors}
        took = time.time() - t
    finally:
        _ip("netns", "exec", nodes.ns[1], "ip", "link", "set", nodes.dev[1], "up", check=False)
        for n in started:
            n.kill()
    for r in survivors:
        ends_with_one_line(started[r], codes[r], 1 - r)
    if fault == "killed":
        assert took < timeout / 2, took                       # not a timeout: the closed sockets told
    else:
        assert timeout - 1 < took < timeout + 15, took        # the collective's timeout (+ the agent's grace)


@pytest.fixture(scope="module")
def other_captchas(tmp_path_factory):
    from utils.data.captcha import generate
    root = tmp_path_factory.mktemp("other") / "train"
    generate(root, 16, seed=1)
    return root


@pytest.mark.timeout(150)
def test_missing_mismatched_and_misconfigured_nodes_are_refused(nodes, captchas, other_captchas, hostfile, tmp_path):
    """All at once: a node alone (node 1 never joins, or node 0 never answers) under each launcher
    gives up after RDZV_TIMEOUT; a node started with other data and seed is refused before
    training; MP_SIZE that does not divide the processes per node is refused by the launcher."""
    flags, alone = train_flags(captchas, 2), {"RDZV_TIMEOUT": 5}
    odd_hosts = hostfile.parent / "odd"
    odd_hosts.write_text(f"{ADDRS[0]} slots=3\n{ADDRS[1]} slots=3\n")
    a, b = nodes.ns
    runs = [(a, launcher(*flags), node_env(0, 29544, SAVE=tmp_path / "t0", **alone)),
            (b, launcher(*flags), node_env(1, 29545, SAVE=tmp_path / "t1", **alone)),
            (a, launcher(*flags), hostfile_env(hostfile, 0, 29546, SAVE=tmp_path / "d0", NUM_GPUS_PER_WORKER=1, **alone)),
            (b, launcher(*flags), hostfile_env(hostfile, 1, 29547, SAVE=tmp_path / "d1", NUM_GPUS_PER_WORKER=1, **alone)),
            (a, launcher(*flags), node_env(0, 29548, SAVE=tmp_path / "m")),
            (b, launcher(*train_flags(other_captchas, 2), "--seed", 7), node_env(1, 29548, SAVE=tmp_path / "m")),
            (a, launcher(*flags), node_env(0, 29549, SAVE=tmp_path / "mp", NUM_GPUS=3, MP_SIZE=2)),
            (a, launcher(*flags), hostfile_env(odd_hosts, 0, 29550, SAVE=tmp_path / "mp", MP_SIZE=2))]
    done = run_nodes(runs, tmp_path, timeout=120)
    for code, node in done:
        assert code in (1, 2) and len(node.errors) == 1 and "Traceback" not in node.out, (code, node.out[-2000:])
    errors = [node.errors[0] for _, node in done]
    assert errors[0] == "error: node(s) 1 of 2 did not join the rendezvous at 10.231.0.1:29544 within RDZV_TIMEOUT=5 s " \
                        "(seen from node 0)"
    assert errors[1] == "error: node 1: node 0 (the rendezvous at 10.231.0.1:29545) did not answer within RDZV_TIMEOUT=5 s"
    assert errors[2] == "error: node(s) 1 of 2 did not join the rendezvous at 10.231.0.1:29546 within RDZV_TIMEOUT=5 s " \
                        "(seen from node 0)"
    assert errors[3] == "error: node 1: node 0 (the rendezvous at 10.231.0.1:29547) did not answer within RDZV_TIMEOUT=5 s"
    mismatch = r"error: node 1 \(10\.231\.0\.2, rank 1\) was started with another configuration than node 0 " \
               r"\(10\.231\.0\.1, rank 0\): --seed 1234 vs 7; --train_data '\w+' vs '\w+' "
    assert re.match(mismatch, errors[4]) and errors[4] == errors[5]   # both nodes say it
    assert not (tmp_path / "m" / "latest").exists()                    # refused before training
    assert errors[6] == errors[7] == "error: MP_SIZE=2 must divide the 3 process(es) per node (model parallel " \
                                     "stays inside a node, data parallel spans the nodes)"
    assert [code for code, _ in done] == [1, 1, 1, 1, 1, 1, 2, 2]


def test_agent_losing_the_store_after_the_start_names_node_0(tmp_path):
    """torchrun's agent on node 1 can notice node 0's death (its store) before the worker does:
    before the workers met it is a failed rendezvous, after they met it is lost node 0 in the
    workers' words, and nothing when a worker has already said it."""
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from utils.training.nodes import rendezvous_failure
    flag, error = tmp_path / "flag", RendezvousConnectionError("The connection to the C10d store has failed.")
    before = rendezvous_failure(error, 1, "10.231.0.1:29543", flag)
    assert before.startswith("error: node 1: the rendezvous at 10.231.0.1:29543 failed (RendezvousConnectionError")
    (tmp_path / "flag.nodes").write_text(json.dumps({0: "node 0 (10.231.0.1, rank 0)", 1: "node 1 (10.231.0.2, rank 1)"}))
    after = rendezvous_failure(error, 1, "10.231.0.1:29543", flag)
    assert re.match(r"error: lost node 0 \(10\.231\.0\.1, rank 0\): .*\(seen from node 1\)\n$", after)
    flag.touch()
    assert rendezvous_failure(error, 1, "10.231.0.1:29543", flag) == ""
