"""`cedm launch`: torchrun that keeps a worker's exit code 2 (Argo never retries a user error)."""
import subprocess
import sys

import pytest

from cedm import cli
from cedm.io import CedmError


@pytest.mark.slow
def test_launch_keeps_a_workers_user_error_exit_code(tmp_path):
    # two worker processes hit the same user error (no dataset in the run dir): each exits 2,
    # torchrun alone would exit 1 (which Argo's retry expression retries), `cedm launch` exits 2
    p = subprocess.run([sys.executable, "-m", "cedm", "launch", "--nproc-per-node", "2", "train",
                        "--run-dir", str(tmp_path / "empty"), "--cond", "uncond"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    # the first worker to fail ends the others (SIGTERM), so one or both say it
    assert p.stderr.count("cedm train: error: ") >= 1 and "has no prepared dataset" in p.stderr
    assert "2]" in p.stderr.split("exit codes")[-1].split(";")[0]


def test_launch_needs_a_command_and_processes(capsys):
    assert cli.main(["launch", "--nproc-per-node", "2"]) == 2
    assert "needs a cedm command" in capsys.readouterr().err
    assert cli.main(["launch", "--nproc-per-node", "0", "train"]) == 2
    assert "--nproc-per-node must be at least 1" in capsys.readouterr().err


def test_launch_gives_each_process_its_share_of_the_pods_cpus(monkeypatch):
    """On Kubernetes OMP_NUM_THREADS is the pod's whole CPU limit (argo/train.yaml: the API server
    takes only 1 or 1m as a CPU divisor); `cedm launch` splits it over its processes."""
    from torch.distributed import run as torchrun

    from cedm import threads

    assert threads.per_process(4, {"OMP_NUM_THREADS": "32"}) == 8
    assert threads.per_process(4, {"OMP_NUM_THREADS": "6"}) == 1      # rounded down
    assert threads.per_process(8, {"OMP_NUM_THREADS": "4"}) == 1      # never 0
    seen = {}
    monkeypatch.setenv("OMP_NUM_THREADS", "32")
    monkeypatch.setattr(torchrun, "run", lambda args: seen.update(omp=__import__("os").environ["OMP_NUM_THREADS"],
                                                                   nproc=args.nproc_per_node))
    assert cli.main(["launch", "--nproc-per-node", "4", "train", "--cond", "uncond"]) == 0
    assert seen == {"omp": "8", "nproc": "4"}


def test_a_multi_node_launch_needs_the_rendezvous(monkeypatch, capsys):
    from cedm import dist

    assert dist.nodes({}) == 1 and dist.nodes({"PET_NNODES": "1"}) == 1
    full = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "trainer-0", "PET_MASTER_PORT": "29400"}
    assert dist.nodes(full) == 2
    for env, msg in (({**full, "PET_MASTER_ADDR": ""}, "PET_MASTER_ADDR unset"),
                     ({**full, "PET_NNODES": "1:4"}, "PET_NNODES must be a positive integer")):
        with pytest.raises(CedmError, match=msg):
            dist.nodes(env)
    monkeypatch.setenv("PET_NNODES", "2")
    monkeypatch.delenv("PET_MASTER_ADDR", raising=False)
    assert cli.main(["launch", "--nproc-per-node", "1", "train"]) == 2
    assert "a multi-node launch needs torchrun's rendezvous" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STEPS = 200   # long enough to be killed mid-run


def _kill_node(pid: int) -> None:
    """SIGKILL a launcher and every process below it (torchrun starts its workers in sessions of
    their own, so a process group does not reach them): what losing a node's pod does."""
    import os
    import signal
    from pathlib import Path

    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _two_nodes(run_dir, port):
    """Two `cedm launch` "nodes" of one process each on this machine, with the rendezvous Kubeflow
    Trainer hands each node's pod (PET_*), gloo over localhost."""
    from test_train import _cli, _env

    argv = [sys.executable, "-m", "cedm", "launch", "--nproc-per-node", "1", *_cli(run_dir, "--mimg", str(STEPS * 8e-6))[3:]]
    return [subprocess.Popen(argv, env=dict(_env(), OMP_NUM_THREADS="1", PET_NNODES="2", PET_NODE_RANK=str(r),
                                            PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(port)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for r in (0, 1)]


@pytest.mark.slow
def test_two_nodes_train_and_a_killed_node_resumes_bit_identically(tmp_path):
    """Rank 0 (node 0) alone writes the checkpoint; node 1 is killed mid-run (its launcher and
    worker: a lost node), and node 0, left waiting in a collective, goes too, as JobSet's failure
    policy restarts the whole job (every node's pod); the same two commands then resume from
    state.pt to the weights of an uninterrupted two-node run, bit for bit."""
    from test_train import make_run

    make_run(tmp_path / "a")
    make_run(tmp_path / "b")
    procs = []
    try:
        _two_nodes_kill_resume(tmp_path, procs)
    finally:                                                         # never leave a node behind
        for p in procs:
            _kill_node(p.pid)


def _two_nodes_kill_resume(tmp_path, procs):
    import time

    import torch

    from cedm.io import load_tensors
    from test_train import _states_equal

    procs += _two_nodes(tmp_path / "a", _free_port())
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    done = torch.load(tmp_path / "a/train/temi-C5/state.pt", weights_only=True)
    assert done["step"] == STEPS
    procs[:] = _two_nodes(tmp_path / "b", _free_port())
    state = tmp_path / "b/train/temi-C5/state.pt"
    t0 = time.time()
    while not state.exists() and all(p.poll() is None for p in procs) and time.time() - t0 < 120:
        time.sleep(0.02)
    _kill_node(procs[1].pid)                                         # node 1 is lost
    time.sleep(0.5)
    _kill_node(procs[0].pid)                                         # the job's restart ends node 0
    for p in procs:
        p.communicate(timeout=300)
    assert not (tmp_path / "b/train/temi-C5/manifest.json").exists(), "finished before the kill"
    assert torch.load(state, weights_only=True)["step"] < STEPS
    procs[:] = _two_nodes(tmp_path / "b", _free_port())              # the job restarts: both nodes again
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    _states_equal(load_tensors(tmp_path / "a/train/temi-C5/network.safetensors"),
                  load_tensors(tmp_path / "b/train/temi-C5/network.safetensors"))
