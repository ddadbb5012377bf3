"""How many CPU threads this process should use, and setting torch to it once.

The count is the number of CPUs the process may actually run on: its CPU affinity
(os.sched_getaffinity: taskset, cpusets) capped by its CPU quota (cgroup v2 `cpu.max`, or
cgroup v1 `cpu.cfs_quota_us / cpu.cfs_period_us`, as Kubernetes CPU limits set them), rounded
down, at least 1. `os.cpu_count()` counts the host's CPUs instead, and more OpenMP threads than
CPUs make every op wait for descheduled threads (measured: 2 threads on a busy 2-core machine
trained 5x slower than 1). An explicit count wins: `cedm --threads N`, else OMP_NUM_THREADS.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from cedm.io import CedmError

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"

_configured: int | None = None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_paths(proc_cgroup: str) -> dict[str, str]:
    """controller -> cgroup path of this process ('' = the v2 unified hierarchy)."""
    out = {}
    for line in (_read(Path(proc_cgroup)) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for ctrl in parts[1].split(","):
                out[ctrl] = parts[2]
    return out


def _ancestors(root: Path, rel: str):
    """root/rel, then each parent directory up to root itself (a limit anywhere above applies)."""
    d = root / rel.lstrip("/")
    while True:
        yield d
        if d == root or root not in d.parents:
            return
        d = d.parent


def cgroup_cpu_limit(root: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> float | None:
    """CPUs' worth of time per period this process's cgroup allows (quota / period), or None
    when no quota is set (or no cgroup file is readable). The smallest over the hierarchy."""
    root_p, paths = Path(root), _cgroup_paths(proc_cgroup)
    limits = []
    if "" in paths:  # v2: "<quota|max> <period>" in cpu.max
        for d in _ancestors(root_p, paths[""]):
            fields = (_read(d / "cpu.max") or "").split()
            if len(fields) == 2 and fields[0] != "max":
                try:
                    limits.append(int(fields[0]) / int(fields[1]))
                except (ValueError, ZeroDivisionError):
                    pass
    if "cpu" in paths:  # v1: cpu.cfs_quota_us (-1 = none) / cpu.cfs_period_us
        for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            base = root_p / mount
            if not base.is_dir():
                continue
            # inside a container the cgroup path is often not visible under the mount: try both
            for d in list(_ancestors(base, paths["cpu"])) + [base]:
                quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
                try:
                    q, p = int(quota or "-1"), int(period or "0")
                except ValueError:
                    continue
                if q > 0 and p > 0:
                    limits.append(q / p)
            break
    return min(limits) if limits else None


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def available_cpus(root: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> int:
    """CPUs this process may use: affinity capped by the cgroup quota (rounded down), >= 1."""
    n = _affinity()
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        n = min(n, math.floor(limit))
    return max(1, n)


def default_threads(environ=None, root: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> int:
    """OMP_NUM_THREADS when set (its first level), else available_cpus()."""
    env = os.environ if environ is None else environ
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp:
        first = omp.split(",")[0].strip()
        if not first.isdigit() or int(first) < 1:
            raise CedmError(f"OMP_NUM_THREADS must be a positive integer, got {omp!r}")
        return int(first)
    return available_cpus(root, proc_cgroup)


def per_process(nproc: int, environ=None) -> int:
    """Threads for each of `nproc` processes sharing this process's CPUs (`cedm launch`):
    default_threads() split evenly, rounded down, at least 1. On Kubernetes OMP_NUM_THREADS is the
    pod's whole CPU limit (the API server only takes 1 or 1m as a CPU divisor, so a pod cannot
    divide it by its process count itself)."""
    return max(1, default_threads(environ) // max(1, nproc))


def configure(threads: int | None = None) -> int:
    """Set torch's intra-op thread count once per process: `threads` when given (--threads),
    else default_threads(). Returns the count in use; later calls without a count keep it."""
    global _configured
    import torch

    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise CedmError(f"--threads must be a positive integer, got {threads!r}")
    if threads is None and _configured is not None:
        return _configured
    n = threads if threads is not None else default_threads()
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    _configured = n
    return n
