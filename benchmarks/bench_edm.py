"""cedm against NVlabs/edm (commit 008a4e5) at the same SongUNet/DDPM++ network, same run.

EDM's code is not a dependency, so its training step and sampler are re-stated here as EDM
writes them, on the pure PyTorch path (no fused op, cedm.ops.reference_ops()): EDMPrecond's forward (c_skip, c_out,
c_in, c_noise in eager PyTorch around the same SongUNet), EDMLoss (ln sigma ~ N(-1.2, 1.2^2),
weight * (D - y)^2, .sum() / batch), EDM's training-loop update (per-parameter nan_to_num,
torch.optim.Adam with its default implementation, per-parameter EMA copy_(lerp)), and
generate.py's edm_sampler (eager float64 Heun steps, the churn line evaluated every step; its
rows are benchmarks/bench_sample.py's).
cedm's step: the network's fused preconditioning and GroupNorm+SiLU, cedm.ops.edm_loss, the same nan_to_num, fused
Adam and one torch._foreach_lerp_ EMA.
Both start from the same weights, the same data and the same augmentation draws.

Rows (ratio = EDM time / cedm time, > 1: cedm is faster), all timed alternately in one loop
(a shared machine's load hits every variant alike), medians with [min-max]:
  - identical settings: fp32, contiguous (goal 1.3x for training, issue 13);
  - the roofline (benchmarks/roofline.py): EDM's step's matmul/conv FLOPs at the matmul rate
    timed in the same loop, fp32 and bf16: the largest ratio any implementation of that
    arithmetic can reach on this machine, an estimate (CIFAR fp32 ~1.04-1.13x: the 1.3x goal is above it);
  - cedm fp32 + channels_last (report);
  - cedm's CPU default, bf16 autocast + channels_last, against EDM fp32 (goal 2x).
Threads: CEDM_BENCH_THREADS (default 1), set explicitly and printed with every row.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch

from cedm import ops
from cedm.augment import AugmentPipe
from cedm.networks import build, network_kwargs, network_preset

from benchmarks import roofline, torch_threads

P_MEAN, P_STD, SIGMA_DATA = -1.2, 1.2, 0.5
EMA_HALFLIFE_NIMG = 500_000


def _interleaved(fns: dict, warmup: int, repeats: int) -> dict:
    """name -> (median, min, max) seconds; every repeat runs each function once, in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts = {n: [] for n in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t0)
    return {n: (statistics.median(t), min(t), max(t)) for n, t in ts.items()}


# ----------------------------------------------------------------------------------------------
# NVlabs/edm, re-stated (training/networks.py EDMPrecond.forward, training/loss.py EDMLoss,
# training/training_loop.py update, generate.py edm_sampler)

def edm_precond(model, x, sigma, class_labels=None, augment_labels=None):
    """EDMPrecond.forward (fp32 on a CPU: use_fp16 applies on CUDA only). The SongUNet runs with
    cedm.ops.reference_ops(): EDM's eager group_norm and silu, not cedm's fused GroupNorm+SiLU."""
    with ops.reference_ops():
        return _edm_precond(model, x, sigma, class_labels, augment_labels)


def _edm_precond(model, x, sigma, class_labels=None, augment_labels=None):
    x = x.to(torch.float32)
    sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
    c_skip = SIGMA_DATA ** 2 / (sigma ** 2 + SIGMA_DATA ** 2)
    c_out = sigma * SIGMA_DATA / (sigma ** 2 + SIGMA_DATA ** 2).sqrt()
    c_in = 1 / (SIGMA_DATA ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    F_x = model(c_in * x, c_noise.flatten(), class_labels=class_labels, augment_labels=augment_labels)
    return c_skip * x + c_out * F_x.to(torch.float32)


class EDMTrainStep:
    """One EDM training step (batch_gpu = batch, one accumulation round, loss_scaling 1)."""

    def __init__(self, net, lr: float, lr_rampup_kimg: float = 10_000):
        self.net = net.train()
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
        self.lr, self.lr_rampup_kimg, self.cur_nimg = lr, lr_rampup_kimg, 0

    def __call__(self, images, labels, pipe, aug_params, gen):
        batch = images.shape[0]
        self.opt.zero_grad(set_to_none=True)
        # EDMLoss
        rnd_normal = torch.randn([batch, 1, 1, 1], generator=gen)
        sigma = (rnd_normal * P_STD + P_MEAN).exp()
        weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
        y, augment_labels = pipe(images, aug_params)
        n = torch.randn(y.shape, generator=gen) * sigma
        D_yn = edm_precond(self.net.model, y + n, sigma, labels, augment_labels)
        loss = weight * ((D_yn - y) ** 2)
        loss.sum().mul(1 / batch).backward()
        # update
        for g in self.opt.param_groups:
            g["lr"] = self.lr * min(self.cur_nimg / max(self.lr_rampup_kimg * 1000, 1e-8), 1)
        for param in self.net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        self.opt.step()
        self.cur_nimg += batch
        ema_beta = 0.5 ** (batch / max(EMA_HALFLIFE_NIMG, 1e-8))
        with torch.no_grad():
            for p_ema, p_net in zip(self.ema.parameters(), self.net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, ema_beta))


@torch.no_grad()
def edm_reference_sampler(model, latents, class_labels, num_steps=18, sigma_min=0.002, sigma_max=80.0,
                          rho=7.0, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0):
    """generate.py edm_sampler with EDMPrecond (round_sigma is the identity)."""
    def net(x, t):
        return edm_precond(model, x, t.expand(x.shape[0]), class_labels)

    step_indices = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1)
               * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, 2 ** 0.5 - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * torch.randn_like(x_cur)
        denoised = net(x_hat, t_hat).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


# ----------------------------------------------------------------------------------------------
# cedm

class CedmTrainStep:
    """cedm's step at the same settings: fused preconditioning and loss, fused Adam, foreach EMA;
    `dtype` (autocast) and channels_last for the per-device defaults."""

    def __init__(self, net, lr: float, lr_rampup_kimg: float = 10_000, dtype=None, channels_last=False):
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net.train().to(memory_format=self.fmt)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.params, self.ema_params = list(self.net.parameters()), list(self.ema.parameters())
        self.opt = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
        self.lr, self.lr_rampup_kimg, self.cur_nimg, self.dtype = lr, lr_rampup_kimg, 0, dtype

    def __call__(self, images, labels, pipe, aug_params, gen):
        batch = images.shape[0]
        self.opt.zero_grad(set_to_none=True)     # before the forward, as cedm.training_loop
        sigma = (torch.randn(batch, generator=gen) * P_STD + P_MEAN).exp()
        y, augment_labels = pipe(images, aug_params)
        y = y.contiguous(memory_format=self.fmt)
        x = y + torch.randn(y.shape, generator=gen).contiguous(memory_format=self.fmt) * sigma[:, None, None, None]
        with torch.autocast("cpu", dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            F = self.net(x, sigma, labels, augment_labels, return_F=True)
        (ops.edm_loss(x, F, y, sigma, SIGMA_DATA).sum() / batch).backward()
        for g in self.opt.param_groups:
            g["lr"] = self.lr * min(self.cur_nimg / max(self.lr_rampup_kimg * 1000, 1e-8), 1)
        for p in self.params:
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        self.opt.step()
        self.cur_nimg += batch
        beta = 0.5 ** (batch / max(EMA_HALFLIFE_NIMG, 1e-8))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1 - beta)


# ----------------------------------------------------------------------------------------------

def _net(preset, res, overrides):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build(network_kwargs(preset, res, 10, **overrides))
    # non-trivial output layer (it is zero-initialised): nothing special-cased by the data
    torch.nn.init.normal_(net.model.dec[f"{res}x{res}_aux_conv"].weight, std=0.02)
    return net


def _row(name, t_ours, t_base, goal, note, threads):
    ratio = t_base[0] / t_ours[0]
    return {"name": name, "baseline": "NVlabs/edm step re-stated (fp32, eager)", "ours_s": t_ours[0],
            "baseline_s": t_base[0], "ratio": ratio, "goal": goal,
            "met": (ratio >= goal) if goal is not None else None,
            "note": f"{note}; cedm {t_ours[0]:.3g} s [{t_ours[1]:.3g}-{t_ours[2]:.3g}], "
                    f"EDM {t_base[0]:.3g} s [{t_base[1]:.3g}-{t_base[2]:.3g}] [{threads} thread"
                    f"{'s' if threads > 1 else ''}]"}


VARIANTS = {  # name -> (autocast dtype, channels_last)
    "fp32": (None, False), "fp32+channels_last": (None, True), "bf16+channels_last": (torch.bfloat16, True),
}
GOALS = {"fp32": 1.3, "fp32+channels_last": None, "bf16+channels_last": 2.0}


def finish(rows: list[dict], bf16_row: str | None = None, bf16_note: str = "") -> list[dict]:
    """Every row names the ops it ran with; bf16_row: the name of a row that says what was not
    run or judged (bf16_note) because this CPU has no native bf16."""
    kernels = "fused kernels" if ops.extension_available() else "PyTorch reference ops (cedm._C not built)"
    for r in rows:
        r["note"] += f"; cedm ops: {kernels}"
    if bf16_row is not None:
        rows.append({"name": bf16_row, "baseline": "-", "ours_s": None, "baseline_s": None, "ratio": None,
                     "goal": None, "met": None, "note": "this CPU has no native bf16 (torch.ops.mkldnn."
                                                        f"_is_mkldnn_bf16_supported() is False): {bf16_note}"})
    return rows


def native_bf16() -> bool:
    """Does this CPU compute bf16 natively (AVX512-BF16 / AMX)? Without it oneDNN emulates bf16
    and autocast makes the network several times slower (measured: 6-12x on an AVX2 EPYC)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _train_rows(label, preset, res, batch, overrides, quick, threads, variants):
    base = _net(preset, res, overrides)
    lr = network_preset(preset)["lr"]
    pipe = AugmentPipe(p=network_preset(preset)["augment_p"])
    y0 = torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.nn.functional.one_hot(torch.arange(batch) % 10, 10).float()
    steps = {"edm": EDMTrainStep(copy.deepcopy(base), lr)}
    for v in variants:
        dt, cl = VARIANTS[v]
        steps[v] = CedmTrainStep(copy.deepcopy(base), lr, dtype=dt, channels_last=cl)
    gens = {k: torch.Generator().manual_seed(2) for k in steps}  # the same draws for every variant

    def runner(k):
        def run():
            g = gens[k]
            steps[k](y0, labels, pipe, pipe.draw(batch, g), g)
        return run

    # The roofline: EDM's step's matmul/conv FLOPs, and the matmul rate (fp32, and bf16 where a
    # bf16 variant runs) timed in the same interleaved loop.
    probe, g = copy.deepcopy(steps["edm"]), torch.Generator()
    flops = roofline.count_flops(lambda: probe(y0, labels, pipe, pipe.draw(batch, g), g))
    gemms = {"gemm fp32": roofline.gemm(1024, torch.float32)}
    if any(VARIANTS[v][0] is torch.bfloat16 for v in variants):
        gemms["gemm bf16"] = roofline.gemm(1024, torch.bfloat16)
    reps = 1 if quick else 3
    fns = {k: runner(k) for k in steps}
    fns.update({k: fn for k, (fn, _) in gemms.items()})
    t = _interleaved(fns, warmup=1, repeats=reps)
    rows = []
    for v in variants:
        rows.append(_row(f"train {label}: cedm {v} vs EDM fp32", t[v], t["edm"], GOALS[v],
                         f"{batch / t[v][0]:.3g} vs {batch / t['edm'][0]:.3g} img/s, median of {reps}",
                         threads))
    for k, (_, gemm_flops) in gemms.items():
        rate = gemm_flops / t[k][0]
        dtype = k.split()[1]
        rows.append(roofline.row(
            f"train {label}: roofline ceiling, {dtype}, vs EDM fp32", "NVlabs/edm step re-stated (fp32, eager)",
            t["edm"][0], flops, rate,
            f"EDM's step: {flops / 1e9:.1f} GFLOP in matmuls/convolutions, run at "
            f"{flops / t['edm'][0] / 1e9:.0f} GFLOP/s; a 1024^3 {dtype} matmul in the same "
            f"loop: {rate / 1e9:.0f} GFLOP/s [{threads} thread{'s' if threads > 1 else ''}]. "
            f"Same arithmetic in {dtype} at that rate: this ratio; a goal far above it needs fewer "
            "FLOPs, not faster kernels (an estimate: it moves with the matmul rate measured; "
            "benchmarks/roofline.py)"))
    return rows


def main(quick: bool = False) -> list[dict]:
    bf16 = native_bf16()
    # tiny: every variant; CIFAR (seconds per image on one CPU thread): bf16 only where the CPU
    # has it natively, channels_last not (it did not help at fp32 on the tiny preset either)
    tiny_v = list(VARIANTS)
    cifar_v = ["fp32"] + (["bf16+channels_last"] if bf16 else [])
    tiny = ("tiny 32ch 32px b16", "tiny", 32, 16, {"model_channels": 32})
    cb = 2 if quick else 4
    with torch_threads() as threads:
        rows = _train_rows(*tiny, quick, threads, tiny_v)
        rows += _train_rows(f"CIFAR DDPM++ 32px b{cb}", "cifar", 32, cb, {}, quick, threads, cifar_v)
    return finish(rows, None if bf16 else "CIFAR bf16+channels_last rows",
                  "not run; see the tiny bf16 rows for what autocast costs here")


if __name__ == "__main__":
    for r in main(quick=True):
        print(r)
