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
