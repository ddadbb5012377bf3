"""`cedm launch`: torchrun that keeps a worker's exit code 2 (Argo never retries a user error)."""
import subprocess
import sys

import pytest

from cedm import cli


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
