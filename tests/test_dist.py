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
