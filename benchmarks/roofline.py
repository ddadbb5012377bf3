"""What the same arithmetic can reach on this machine: a step's matmul/convolution FLOPs (counted
by torch.utils.flop_counter) at the best matmul rate measured in the same run.

`ceiling = t_baseline / (flops / rate)` estimates the speed-up that any implementation doing the
baseline's arithmetic at the dtype measured can reach: with the matmuls and convolutions already
near the machine's matmul rate, a much larger ratio needs fewer FLOPs (Winograd/FFT convolutions,
a smaller dtype), not faster kernels around them. It is an estimate, not a proof: a convolution
can run a little faster than the one 1024^3 matmul timed, and the rate moves with the machine's
load. Rows report it beside a goal so that an unmet goal says whether it was within reach.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn) -> int:
    """FLOPs of the matmuls, convolutions and attention fn() runs (forward and backward)."""
    with FlopCounterMode(display=False) as mode:
        fn()
    return int(mode.get_total_flops())


def gemm(n: int = 1024, dtype: torch.dtype = torch.float32):
    """(fn, flops): one n x n x n matmul, timed beside the benchmark to measure the machine's rate."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    return (lambda: torch.mm(a, b)), 2 * n ** 3


def ceiling(t_baseline: float, flops: int, rate: float) -> float:
    """The largest baseline/ours ratio reachable at `rate` FLOP/s for `flops` of arithmetic."""
    return t_baseline / (flops / rate)


def row(name: str, baseline: str, t_baseline: float, flops: int, rate: float, note: str) -> dict:
    """A `make bench` row (benchmarks/__main__.py) reporting the ceiling: no goal of its own."""
    cap = ceiling(t_baseline, flops, rate)
    return {"name": name, "baseline": baseline, "ours_s": t_baseline / cap, "baseline_s": t_baseline,
            "ratio": cap, "goal": None, "met": None, "note": note}
