"""Classifier-free guidance: cond and null in one forward of 2B (cedm.sample.guided_denoiser, what
`cedm sample --guidance W` runs) against two forwards of B (the baseline), same network, same
inputs, same run (`python -m benchmarks --only guidance`).

One guided evaluation D_w(x; sigma) is timed (the sampler makes 2N - 1 of them; the Heun steps
around them are the same for both). Both variants are timed alternately in one loop, medians with
[min-max]; the two must agree to float rounding (checked before timing). Networks: the tiny preset
at the digits' 8 px at batch 128 (`cedm sample`'s CPU batch) and 16, and the CIFAR DDPM++ at
batch 2 (a CPU takes seconds per call), in fp32 as `cedm sample` runs them on a CPU without
native bf16. No goal: a batched forward saves
the per-call overhead and runs larger matrix products, which pays most for small networks and
batches; the ratio says how much on this CPU. Threads: CEDM_BENCH_THREADS (default 1).
"""
from __future__ import annotations

import torch

from benchmarks import torch_threads
from benchmarks.bench_edm import _interleaved, _net, finish
from cedm import sample


def two_forwards(net, labels, guidance: float):
    """The baseline: D(x|c) and D(x|null) as two calls of B."""
    def denoise(x, t):
        sigma = torch.full((x.shape[0],), t, dtype=x.dtype)
        return (1 + guidance) * net(x, sigma, labels) - guidance * net(x, sigma, torch.zeros_like(labels))
    return denoise


def _rows(label, preset, res, batch, overrides, repeats, threads):
    net = _net(preset, res, overrides).eval().requires_grad_(False)
    x = torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(0))
    labels = torch.nn.functional.one_hot(torch.arange(batch) % 10, 10).float()
    w, t = 1.5, 2.5
    one = sample.guided_denoiser(net, labels, w)
    two = two_forwards(net, labels, w)
    with torch.no_grad():
        torch.testing.assert_close(one(x, t), two(x, t), rtol=1e-4, atol=1e-4)

        def timed(fn):
            return lambda: fn(x, t)

        r = _interleaved({"one": timed(one), "two": timed(two)}, warmup=1, repeats=repeats)
    a, b = r["one"], r["two"]
    ratio = b[0] / a[0]
    return [{"name": f"CFG {label}: one forward of 2B vs two of B", "baseline": "two forwards of B",
             "ours_s": a[0], "baseline_s": b[0], "ratio": ratio, "goal": None, "met": None,
             "note": f"one guided evaluation, fp32; 2B {a[0]:.3g} s [{a[1]:.3g}-{a[2]:.3g}], "
                     f"2 x B {b[0]:.3g} s [{b[1]:.3g}-{b[2]:.3g}] [{threads} thread{'s' if threads > 1 else ''}]"}]


def main(quick: bool = False) -> list[dict]:
    with torch_threads() as threads:
        rows = _rows("tiny 8px b128", "tiny", 8, 128, {}, 5 if quick else 21, threads)
        rows += _rows("tiny 8px b16", "tiny", 8, 16, {}, 5 if quick else 21, threads)
        rows += _rows("CIFAR b2", "cifar", 32, 2, {}, 3 if quick else 7, threads)
    return finish(rows)


if __name__ == "__main__":
    for r in main(quick=True):
        print(r)
