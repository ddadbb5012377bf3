"""cedm.threads: CPUs this process may use (affinity, cgroup v1/v2 quota), OMP_NUM_THREADS,
--threads. cgroup hierarchies are fake directory trees under tmp_path."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cedm import threads
from cedm.io import CedmError

ROOT = Path(__file__).resolve().parents[1]


def _proc(tmp_path, text):
    p = tmp_path / "proc_self_cgroup"
    p.write_text(text)
    return str(p)


def test_cgroup_v2_quota(tmp_path):
    cg = tmp_path / "cg"
    d = cg / "kubepods" / "pod1" / "ctr"
    d.mkdir(parents=True)
    (d / "cpu.max").write_text("150000 100000\n")            # 1.5 CPUs
    (cg / "kubepods" / "cpu.max").write_text("max 100000\n")  # no limit above
    proc = _proc(tmp_path, "0::/kubepods/pod1/ctr\n")
    assert threads.cgroup_cpu_limit(str(cg), proc) == pytest.approx(1.5)
    assert threads.available_cpus(str(cg), proc) == 1  # rounded down: no thread without a CPU


def test_cgroup_v2_limit_of_a_parent_applies(tmp_path):
    cg = tmp_path / "cg"
    d = cg / "a" / "b"
    d.mkdir(parents=True)
    (d / "cpu.max").write_text("max 100000")
    (cg / "a" / "cpu.max").write_text("300000 100000")
    proc = _proc(tmp_path, "0::/a/b\n")
    assert threads.cgroup_cpu_limit(str(cg), proc) == pytest.approx(3.0)


def test_cgroup_v2_unlimited_and_missing(tmp_path):
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cpu.max").write_text("max 100000")
    assert threads.cgroup_cpu_limit(str(cg), _proc(tmp_path, "0::/\n")) is None
    assert threads.cgroup_cpu_limit(str(tmp_path / "nowhere"), str(tmp_path / "no_proc")) is None
    affinity = len(os.sched_getaffinity(0))
    assert threads.available_cpus(str(cg), _proc(tmp_path, "0::/\n")) == affinity


def test_cgroup_v1_cfs_quota(tmp_path):
    cg = tmp_path / "cg"
    d = cg / "cpu,cpuacct" / "docker" / "abc"
    d.mkdir(parents=True)
    (d / "cpu.cfs_quota_us").write_text("250000\n")
    (d / "cpu.cfs_period_us").write_text("100000\n")
    proc = _proc(tmp_path, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    assert threads.cgroup_cpu_limit(str(cg), proc) == pytest.approx(2.5)
    # inside the container the path under the mount is not visible: the mount root holds it
    cg2 = tmp_path / "cg2"
    m = cg2 / "cpu"
    m.mkdir(parents=True)
    (m / "cpu.cfs_quota_us").write_text("-1")   # no quota
    (m / "cpu.cfs_period_us").write_text("100000")
    assert threads.cgroup_cpu_limit(str(cg2), _proc(tmp_path, "3:cpu:/docker/abc\n")) is None
    (m / "cpu.cfs_quota_us").write_text("50000")
    assert threads.cgroup_cpu_limit(str(cg2), _proc(tmp_path, "3:cpu:/docker/abc\n")) == pytest.approx(0.5)
    assert threads.available_cpus(str(cg2), _proc(tmp_path, "3:cpu:/docker/abc\n")) == 1  # >= 1


def test_affinity_caps_a_larger_quota(tmp_path, monkeypatch):
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cpu.max").write_text("800000 100000")  # 8 CPUs of quota
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert threads.available_cpus(str(cg), _proc(tmp_path, "0::/\n")) == 3
    (cg / "cpu.max").write_text("200000 100000")
    assert threads.available_cpus(str(cg), _proc(tmp_path, "0::/\n")) == 2


def test_omp_num_threads_wins_over_detection(tmp_path):
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cpu.max").write_text("100000 100000")
    proc = _proc(tmp_path, "0::/\n")
    assert threads.default_threads({}, str(cg), proc) == 1
    assert threads.default_threads({"OMP_NUM_THREADS": "3"}, str(cg), proc) == 3
    assert threads.default_threads({"OMP_NUM_THREADS": "4,2"}, str(cg), proc) == 4  # nested: 1st level
    for bad in ("abc", "0", "-2"):
        with pytest.raises(CedmError, match="OMP_NUM_THREADS must be a positive integer"):
            threads.default_threads({"OMP_NUM_THREADS": bad}, str(cg), proc)


def test_configure_sets_torch_once(monkeypatch):
    saved = torch.get_num_threads()
    monkeypatch.setattr(threads, "_configured", None)
    monkeypatch.setattr(threads, "default_threads", lambda: 1)
    try:
        assert threads.configure(2) == 2 and torch.get_num_threads() == 2  # explicit count
        assert threads.configure() == 2 and torch.get_num_threads() == 2   # kept, not re-detected
        monkeypatch.setattr(threads, "_configured", None)
        assert threads.configure() == 1 and torch.get_num_threads() == 1   # detected
        with pytest.raises(CedmError, match="--threads must be a positive integer, got 0"):
            threads.configure(0)
    finally:
        torch.set_num_threads(saved)


def _cli(*args, env=None):
    code = ("import sys, torch; from cedm import cli;"
            "cli.STAGE_MODULES = ();"  # no stage needed: --help / the error path
            "sys.exit(cli.main(sys.argv[1:]))")
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=120)


def test_cli_documents_threads():
    r = _cli("--help")
    assert r.returncode == 0 and "--threads N" in r.stdout and "cgroup" in r.stdout


def _with_probe(parser):
    """The real parser plus a stage `probe` that records torch's thread count when it runs."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.add_parser("probe").set_defaults(func=lambda args: _SEEN.update(threads=torch.get_num_threads()))
    return parser


_SEEN = {}


def test_cli_threads_reaches_torch_before_the_stage(monkeypatch):
    from cedm import cli

    saved = torch.get_num_threads()
    real = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_probe(real()))
    try:
        for n in (1, 2):
            monkeypatch.setattr(threads, "_configured", None)
            _SEEN.clear()
            assert cli.main(["--threads", str(n), "probe"]) == 0
            assert _SEEN["threads"] == n
        monkeypatch.setattr(threads, "_configured", None)
        assert cli.main(["--threads", "0", "probe"]) == 2  # one-line error, exit 2
    finally:
        torch.set_num_threads(saved)
