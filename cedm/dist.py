"""Distributed helpers for training under torchrun (NCCL on GPUs, gloo on CPUs).

Each step's random draws are made for the whole global batch and every rank takes its slice,
so W processes see the same per-sample randomness as one process with the same global batch.
"""
from __future__ import annotations

import os

import torch


def env() -> tuple[int, int, int]:
    """(world size, rank, local rank) from torchrun's environment (1, 0, 0 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def init(device: torch.device, world: int, local_rank: int) -> None:
    """Start the process group once (NCCL for CUDA, gloo otherwise)."""
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    """The sum of `t` over all ranks (a copy; `t` itself is left as it is)."""
    if world > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# `cedm launch`: torchrun that keeps our exit codes

RENDEZVOUS = ("PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")   # torchrun's static rendezvous


def nodes(environ=None) -> int:
    """The nodes of this training job: PET_NNODES, torchrun's own variable, which Kubeflow
    Trainer's torch runtime sets on every node's pod with PET_NODE_RANK, PET_MASTER_ADDR and
    PET_MASTER_PORT (1 without it)."""
    env = os.environ if environ is None else environ
    from cedm.io import CedmError

    raw = env.get("PET_NNODES", "").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise CedmError(f"PET_NNODES must be a positive integer (a fixed node count), got {raw!r}")
    n = int(raw)
    missing = [k for k in RENDEZVOUS if not env.get(k)]
    if n > 1 and missing:
        raise CedmError(f"PET_NNODES={n} but {', '.join(missing)} unset: a multi-node launch needs torchrun's "
                        f"rendezvous ({', '.join(RENDEZVOUS)}), as Kubeflow Trainer sets it")
    return n


def launch(nproc: int, argv: list[str]) -> int:
    """Run `cedm <argv>` in `nproc` processes on this node: torchrun --standalone on one node, or
    one node of a multi-node job when PET_NNODES > 1 (nodes(); torchrun then reads the node rank
    and the master's address from PET_*, a static rendezvous, and the global rank and world size
    reach the workers as RANK / WORLD_SIZE).

    torchrun exits 1 whatever its workers exited with, so a user error (our exit code 2) would be
    retried by Argo like a crash; here a worker's 2 becomes the launcher's 2.
    """
    import sys

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from cedm import threads
    from cedm.io import CedmError

    if nproc < 1:
        raise CedmError(f"--nproc-per-node must be at least 1, got {nproc}")
    if not argv:
        raise CedmError("cedm launch needs a cedm command to run, e.g. `cedm launch --nproc-per-node 4 train ...`")
    n = nodes()
    # one share of this pod's CPUs per process (torchrun passes the environment to its workers)
    os.environ["OMP_NUM_THREADS"] = str(threads.per_process(nproc))
    where = ["--standalone", "--nnodes=1"] if n == 1 else [f"--nnodes={n}"]   # else PET_* give the rest
    args = torchrun.parse_args([*where, f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "cedm", *argv])
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        rc = 2 if 2 in codes else 1
        print(f"cedm launch: {argv[0]} failed in {len(e.failures)} of {nproc} processes (exit codes "
              f"{codes}); exit {rc}", file=sys.stderr)
        return rc
    return 0


def register(sub) -> None:
    import argparse

    p = sub.add_parser(
        "launch", help="run a cedm command in N processes (DDP training), keeping exit code 2",
        description="`cedm launch --nproc-per-node N train --cond ...` runs `cedm train` in N processes "
                    "on this node, like `torchrun --standalone --nproc-per-node N -m cedm train ...`; with "
                    "PET_NNODES > 1 (and PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT, as Kubeflow Trainer "
                    "sets them) it is one node of a multi-node job. Unlike torchrun, "
                    "a user error in a worker (exit code 2) is the launcher's exit code too, so Argo's "
                    "retry expression never retries it (torchrun itself exits 1).")
    p.add_argument("--nproc-per-node", type=int, required=True, metavar="N",
                   help="processes on this node (one per GPU; the global batch is split across them)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the cedm command and its flags")
    p.set_defaults(func=lambda a: launch(a.nproc_per_node, a.command))
