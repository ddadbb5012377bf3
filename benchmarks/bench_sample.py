"""Sampling: cedm's sampler at its per-device default and at identical fp32, against NVlabs/edm's
sampler at its own default, same network, same run (`python -m benchmarks --only sample`).

EDM's sampler is benchmarks/bench_edm.py's re-statement of generate.py's edm_sampler around
EDMPrecond, on the pure PyTorch path. Its default on a CPU is fp32: EDMPrecond's use_fp16 applies
on CUDA only. cedm's rows run cedm.sample.generate, the function `cedm sample` runs (per-image
seeds, label draws, the fused Heun steps), with the network already in the layout generate picks
(one conversion per `cedm sample` run, not per batch):

  - "cedm default": precision=None, so generate resolves it as `cedm sample` does, from the
    model's network preset and this device (cedm.sample.default_precision: bf16 + channels_last
    on a CPU with native bf16, fp32 on other CPUs, fp32 for the tiny preset);
    goal 1.8x on a native-bf16 CPU for the CIFAR network (issue 20);
  - "cedm fp32": identical settings, reported without a goal (sampling is the network's time, so
    parity is the expectation; a 1.0x goal on 1.00 +- noise passes or fails by chance);
  - tiny only: bf16 + channels_last, reported (its default is fp32: bf16 is slower at its size).

All variants are timed alternately in one loop (a shared machine's load hits each alike),
medians with [min-max]. The CIFAR rows sample over 3 Heun steps (5 network calls) and are scaled
to EDM's 18 steps (35 calls); the network is >99% of the time (bench_generator's "outside the
network" row). Threads: CEDM_BENCH_THREADS (default 1), printed with every row.
"""
from __future__ import annotations

import copy

import torch

from benchmarks import torch_threads
from benchmarks.bench_edm import _interleaved, _net, _row, edm_reference_sampler, finish, native_bf16
from cedm import sample
from cedm.networks import memory_format

GOAL_DEFAULT_CIFAR = 1.8     # cedm's default vs EDM's (fp32 on a CPU), where the CPU has native bf16


def _meta(preset: str, res: int, overrides: dict, label_dim: int = 10) -> dict:
    """The network.json fields cedm.sample.generate reads, for bench_edm._net's network of `preset`."""
    from cedm.networks import network_kwargs

    return {"tag": "bench", "network": preset,
            "network_kwargs": network_kwargs(preset, res, label_dim, **overrides),
            "label_dim": label_dim, "q": [1 / label_dim] * label_dim, "raw_labels": list(range(label_dim)),
            "label_map": {str(i): i for i in range(label_dim)}}


def _layout(precision: str) -> str:
    return precision + ("+channels_last" if memory_format(torch.device("cpu"), precision) == torch.channels_last else "")


def _sample_rows(label, preset, res, batch, overrides, steps, variants, quick, threads, goal_default):
    """Rows of cedm's default and of each precision in `variants` (each in the layout generate
    picks for it, cedm.networks.memory_format) against EDM's sampler."""
    cpu = torch.device("cpu")
    net = _net(preset, res, overrides).eval().requires_grad_(False)
    meta = _meta(preset, res, overrides)
    default = sample.default_precision(meta, cpu)          # what `cedm sample` picks here
    precisions = {"default": None, **{v: v for v in variants}}
    nets = {v: copy.deepcopy(net).to(memory_format=memory_format(cpu, p or default)) for v, p in precisions.items()}
    latents = torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(0))
    labels = torch.nn.functional.one_hot(torch.arange(batch) % 10, 10).float()

    def cedm(v):
        return lambda: sample.generate(nets[v], meta, batch, steps=steps, batch_size=batch, device=cpu,
                                       progress=False, precision=precisions[v])

    fns = {"edm": lambda: edm_reference_sampler(net.model, latents, labels, num_steps=steps)}
    fns.update({v: cedm(v) for v in precisions})
    t = _interleaved(fns, warmup=1, repeats=1 if quick else 5)
    calls = 2 * steps - 1
    scale = 35 / calls
    b = tuple(x * scale for x in t["edm"])
    rows = []
    for v in precisions:
        s = tuple(x * scale for x in t[v])
        what = f"default {_layout(default)}" if v == "default" else _layout(v)
        row = _row(f"sample {label}: cedm {what} vs EDM", s, b, goal_default if v == "default" else None,
                   f"18 Heun steps, EDM at its CPU default (fp32); {batch / s[0]:.3g} vs {batch / b[0]:.3g} img/s"
                   + ("" if calls == 35 else f" (measured over {calls} network calls, scaled to 35)"),
                   threads)
        row["baseline"] = "NVlabs/edm sampler re-stated (its CPU default: fp32, eager)"
        rows.append(row)
    return rows


def main(quick: bool = False) -> list[dict]:
    bf16 = native_bf16()
    with torch_threads() as threads:
        # tiny: its default is fp32 (bf16 is slower at its size); every layout reported
        rows = _sample_rows("tiny32 32px b16", "tiny", 32, 16, {"model_channels": 32}, 3 if quick else 5,
                            ["bf16"], quick, threads, None)
        # CIFAR DDPM++ at batch 8 (issue 20's setting): the default and identical fp32
        rows += _sample_rows("CIFAR b8", "cifar", 32, 8, {}, 2 if quick else 3, ["fp32"], quick,
                             threads, GOAL_DEFAULT_CIFAR if bf16 else None)
    return finish(rows, None if bf16 else "sample CIFAR: the 1.8x goal of the default",
                  "not judged, cedm's default here is fp32, parity with EDM")


if __name__ == "__main__":
    for r in main(quick=True):
        print(r)
