"""Fused kernels (cedm._C) against the eager PyTorch references (cedm.ops.ref_*), same run, same CPU.

Rows: TEMI loss forward+backward (B=512, H=50, C=200 and C=1000), Heun step (Euler + correction)
on [512, 3, 32, 32] and its effective bandwidth against torch.clone, EDM preconditioning + loss
forward+backward at [512, 3, 32, 32]. Goals are ratios (baseline time / ours).
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from cedm import ops


def _time(fns: dict, warmup: int, repeat: int) -> dict:
    """Median seconds per call of each function; the functions take turns in every repeat, so
    that a change of load on this shared machine hits ours and the baseline alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _row(name, baseline, ours_s, baseline_s, goal, note=""):
    ratio = baseline_s / ours_s if ours_s else None
    return {"name": name, "baseline": baseline, "ours_s": ours_s, "baseline_s": baseline_s,
            "ratio": ratio, "goal": goal,
            "met": (ratio >= goal) if ratio is not None and goal is not None else None,
            "note": note}


def _temi_rows(quick: bool):
    rows = []
    H, B = (10, 256) if quick else (50, 512)
    for C in (200, 1000):
        g = torch.Generator().manual_seed(0)
        z = torch.randn(2, H, B, C, generator=g).requires_grad_()
        qt = torch.softmax(torch.randn(2, H, B, C, generator=g) / 0.1, dim=-1)
        prior = torch.full((H, C), 1.0 / C)

        def step(fn, z=z, qt=qt, prior=prior):
            def run():
                loss = fn(z, qt, prior, 0.6, 0.1)
                loss.sum().backward()
                z.grad = None
            return run

        t = _time({"base": step(ops.ref_temi_loss), "ours": step(ops.temi_loss)}, 1, 3 if quick else 5)
        base, ours = t["base"], t["ours"]
        rows.append(_row(f"TEMI loss fwd+bwd B={B} H={H} C={C} f32", "ref_temi_loss eager+autograd",
                         ours, base, 4.0))
    return rows


def _heun_rows(quick: bool):
    shape = (128, 3, 32, 32) if quick else (512, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    x_hat, den, x_next, den_next = (torch.randn(shape, generator=g) for _ in range(4))
    t_hat, t_next = 1.3, 0.9
    reps = 20 if quick else 50

    def step(euler, correct):
        def run():
            euler(x_hat, den, t_hat, t_next)
            correct(x_hat, den, x_next, den_next, t_hat, t_next)
        return run

    t = _time({"base": step(ops.ref_heun_euler, ops.ref_heun_correct),
               "ours": step(ops.heun_euler, ops.heun_correct),
               "clone": lambda: x_hat.clone()}, 3, reps)
    base, ours, clone = t["base"], t["ours"], t["clone"]
    nbytes = x_hat.numel() * x_hat.element_size()
    moved = (3 + 5) * nbytes  # Euler reads 2 writes 1, correction reads 4 writes 1
    bw_ours, bw_clone = moved / ours, 2 * nbytes / clone
    # the same bandwidth ratio on one thread: no waiting for a descheduled second thread, which
    # dominates millisecond ops when other work shares the two cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t1 = _time({"ours": step(ops.heun_euler, ops.heun_correct),
                    "clone": lambda: x_hat.clone()}, 3, reps)
    finally:
        torch.set_num_threads(threads)
    bw1_ours, bw1_clone = moved / t1["ours"], 2 * nbytes / t1["clone"]
    shp = "x".join(map(str, shape))
    return [
        _row(f"Heun step (euler+correct) [{shp}] f32", "ref_heun_euler+ref_heun_correct eager",
             ours, base, 2.0),
        # as a time ratio: the time clone's bandwidth would need for the same bytes / ours
        _row("Heun step bandwidth / torch.clone bandwidth", "torch.clone, same tensor size",
             ours, moved / bw_clone, 0.6,
             note=f"ours {bw_ours / 1e9:.1f} GB/s, clone {bw_clone / 1e9:.1f} GB/s "
                  f"({moved / 1e6:.1f} MB moved per step)"),
        _row("Heun step bandwidth / torch.clone bandwidth, 1 thread", "torch.clone, 1 thread",
             t1["ours"], moved / bw1_clone, None,
             note=f"ours {bw1_ours / 1e9:.1f} GB/s, clone {bw1_clone / 1e9:.1f} GB/s, "
                  "torch.set_num_threads(1) for this row only"),
    ]


def _edm_rows(quick: bool):
    shape = (128, 3, 32, 32) if quick else (512, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(shape, generator=g)
    sigma = (torch.randn(shape[0], generator=g) * 1.2 - 1.2).exp()  # ln sigma ~ N(-1.2, 1.2^2)
    x = y + sigma[:, None, None, None] * torch.randn(shape, generator=g)
    F = torch.randn(shape, generator=g).requires_grad_()
    reps = 20 if quick else 50

    def step(scale, loss_fn):
        def run():
            scale(x, sigma, 0.5)  # network input c_in x
            loss = loss_fn(x, F, y, sigma, 0.5)
            loss.sum().backward()
            F.grad = None
        return run

    t = _time({"base": step(ops.ref_edm_scale_input, ops.ref_edm_loss),
               "ours": step(ops.edm_scale_input, ops.edm_loss)}, 3, reps)
    base, ours = t["base"], t["ours"]
    shp = "x".join(map(str, shape))
    return [_row(f"EDM scale_input + loss fwd+bwd(F) [{shp}] f32",
                 "ref_edm_scale_input+ref_edm_loss eager+autograd", ours, base, 2.0)]


def main(quick: bool = False) -> list[dict]:
    if not ops.extension_available():
        return [{"name": "fused ops", "baseline": "-", "ours_s": None, "baseline_s": None,
                 "ratio": None, "goal": None, "met": None,
                 "note": "cedm._C not built (make build-ext): nothing to compare"}]
    isa = ops._EXT.cpu_isa()
    load0 = os.getloadavg()[0]
    rows = _temi_rows(quick) + _heun_rows(quick) + _edm_rows(quick)
    load = f"load avg {load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    for r in rows:
        extra = f"CPU kernels: {isa}, {torch.get_num_threads()} threads, {load}"
        r["note"] = f"{r['note']}; {extra}" if r.get("note") else extra
    return rows


if __name__ == "__main__":
    for r in main():
        print(r)
