"""Generator speed on this machine: C-EDM training and Heun sampling (report-only rows).

- training img/s of one full step (augment, forward, fused EDM loss, backward, Adam) for the
  tiny and the CIFAR (DDPM++, 56M) preset, fp32 vs bf16 autocast (ratio = fp32 / bf16 time:
  > 1 means bf16 helps);
- sampling img/s of the 18-step Heun sampler (35 network calls), fp32 vs bf16 autocast;
- the share of sampling time spent outside the network: the sampler with the network replaced
  by a cached output vs the full sampler.
The CIFAR preset is run for a few steps at batch 4 (it is a GPU model); its sampling time is
measured over 2 sampler steps (3 network calls) and scaled to 35 calls per image.
Runs on CEDM_BENCH_THREADS torch threads (default 1, restored afterwards): on shared cores,
OpenMP threads of a busy machine spin and make multi-thread timings meaningless (10x swings).
"""
from __future__ import annotations


import torch

from benchmarks import median_time, torch_threads
from cedm import ops
from cedm.augment import AugmentPipe
from cedm.networks import build, network_kwargs, network_preset
from cedm.sample import edm_sampler




def _net(preset: str, res: int, label_dim: int = 10):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build(network_kwargs(preset, res, label_dim))
    # Non-trivial output layer (it is zero-initialised) so nothing is special-cased by the data.
    torch.nn.init.normal_(net.model.dec[f"{res}x{res}_aux_conv"].weight, std=0.02)
    return net


def _train_step_fn(preset: str, res: int, batch: int, dtype):
    net = _net(preset, res).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    pipe = AugmentPipe(p=network_preset(preset)["augment_p"])
    g = torch.Generator().manual_seed(0)
    y0 = torch.rand(batch, 3, res, res, generator=g) * 2 - 1
    labels = torch.nn.functional.one_hot(torch.arange(batch) % 10, 10).float()

    def step():
        sigma = (torch.randn(batch, generator=g) * 1.2 - 1.2).exp()
        y, aug = pipe(y0, pipe.draw(batch, g))
        x = y + torch.randn(y.shape, generator=g) * sigma[:, None, None, None]
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            F = net(x, sigma, labels, aug, return_F=True)
        ops.edm_loss(x, F, y, sigma).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _sampler_fn(net, batch: int, steps: int, dtype, cached: bool = False):
    res = net.img_resolution
    latents = torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(0))
    labels = torch.nn.functional.one_hot(torch.arange(batch) % 10, 10).float()

    @torch.no_grad()
    def denoise(x, t):
        sigma = torch.full((x.shape[0],), t)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return net(x.to(torch.float32), sigma, labels)

    out = denoise(latents.double() * 80, 80.0).float()

    def run():
        edm_sampler((lambda x, t: out) if cached else denoise, latents, num_steps=steps)

    return run


def _row(name, ours, base, note, baseline="fp32"):
    return dict(name=name, baseline=baseline, ours_s=ours, baseline_s=base,
                ratio=(base / ours) if (ours and base) else None, goal=None, met=None, note=note)


def main(quick: bool = False) -> list[dict]:
    with torch_threads() as threads:
        rows = _bench(quick)
    for r in rows:
        r["note"] += f" [{threads} thread{'s' if threads > 1 else ''}]"
    return rows


def _bench(quick: bool) -> list[dict]:
    rows = []
    reps = 3 if quick else 5
    configs = [("tiny", 16, 64, reps, 2), ("cifar", 32, 4, 1 if quick else 2, 1)]
    for preset, res, batch, r, w in configs:
        t = {}
        for label, dt in (("fp32", None), ("bf16", torch.bfloat16)):
            t[label] = median_time(_train_step_fn(preset, res, batch, dt), warmup=w, repeats=r)
        best = "bf16" if t["bf16"] < t["fp32"] else "fp32"
        rows.append(_row(f"train {preset} {res}px b{batch}: bf16 vs fp32 step", t["bf16"], t["fp32"],
                         f"fp32 {batch / t['fp32']:.3g} img/s, bf16 {batch / t['bf16']:.3g} img/s "
                         f"-> {best} is faster on this CPU"))

    # Sampling: tiny at full 18 steps; CIFAR over 2 steps (3 calls), scaled to 35 calls.
    for preset, res, batch, steps in (("tiny", 16, 64, 18), ("cifar", 32, 4, 2)):
        net = _net(preset, res).eval()
        calls = 2 * steps - 1
        t = {}
        for label, dt in (("fp32", None), ("bf16", torch.bfloat16)):
            t[label] = median_time(_sampler_fn(net, batch, steps, dt), warmup=1, repeats=reps if preset == "tiny" else 1)
        per_img = {k: v / batch * 35 / calls for k, v in t.items()}
        best = "bf16" if t["bf16"] < t["fp32"] else "fp32"
        scaled = "" if calls == 35 else f" (measured over {calls} calls, scaled to 35)"
        rows.append(_row(f"sample {preset} {res}px b{batch}: bf16 vs fp32, 18 Heun steps", t["bf16"] * 35 / calls,
                         t["fp32"] * 35 / calls,
                         f"fp32 {1 / per_img['fp32']:.3g} img/s, bf16 {1 / per_img['bf16']:.3g} img/s{scaled} "
                         f"-> {best} is faster; {per_img[best] * 50_000 / 3600:.3g} h per 50k images ({best})"))
        full = t["fp32"]
        outside = median_time(_sampler_fn(net, batch, steps, None, cached=True), warmup=1, repeats=reps)
        kernels = "fused kernels" if ops.extension_available() else "PyTorch reference ops"
        rows.append(_row(f"sampler outside the network, {preset} b{batch}", outside, full,
                         f"{100 * outside / full:.2f}% of sampling time is outside the network "
                         f"(schedule + Heun step ops, {kernels})", baseline="full sampler"))
    return rows
