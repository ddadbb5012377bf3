"""The C-EDM training loop (after NVlabs/edm training/training_loop.py; docs/method.md#edm-training).

`training_loop(out, state, inputs, spec, loss_fn)` trains one model into `out` from a LoopSpec
that the train stage fills (cedm.train), resuming from `state` when given. Adam with a linear lr
ramp (fused where available), EMA with half-life and ramp-up (one foreach lerp), optional
bf16/fp16 autocast, channels_last where it pays (memory_format), non-finite gradients replaced
and counted on the device (read at log time: no host sync per step), DDP under torchrun (cedm.dist).

Resume rule: every random number of step s (data order, sigma, noise, augmentation, label
dropout, network dropout) derives from (seed, s) and not from a running generator, and the
saved state (model, EMA, optimizer, grad scaler, step) is all that carries over; so a run killed
at any moment and started again ends with exactly the weights of an uninterrupted run on CPU.
Each step's draws are made for the whole global batch and each rank takes its slice, so W
processes see the same per-sample randomness as one process with the same global batch.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cedm import dist, lease, telemetry
from cedm.augment import AugmentPipe
from cedm.checkpoint import rng_state, save_checkpoint, save_snapshot, set_rng_state
from cedm.io import atomic_path, load_array
from cedm.loss import EDMLoss
from cedm.networks import autocast, build, memory_format

EMA_RAMPUP = 0.05       # EDM (Table 7; docs/method.md#edm-training): EMA half-life ramp 0.05 * nimg


@dataclass(frozen=True)
class LoopSpec:
    """Everything one training run needs; filled by the train stage (cedm.train.run)."""
    cond: str
    clusters_label: str              # telemetry label of the training series
    config: dict                     # the stage config (saved in state.pt)
    net_kwargs: dict
    meta: dict                       # network.json without nimg/step
    images_path: Path
    labels: np.ndarray               # model label index per training image
    num_images: int
    resolution: int
    label_dim: int
    mimg: float
    batch: int
    lr: float
    lr_ramp_mimg: float
    ema_halflife_mimg: float
    p_uncond: float
    augment_p: float
    precision: str
    seed: int
    checkpoint_every_kimg: float | None
    metrics_port: int | None
    workers: int
    progress: bool
    max_steps: int | None
    run_dir: Any
    device: torch.device
    world: int
    rank: int
    snapshot_every_mimg: float | None = None   # EMA snapshots along training (FD against Mimg)


# ----------------------------------------------------------------------------------------------
# Deterministic data order and per-step randomness

def step_seed(seed: int, step: int, *extra: int) -> int:
    """A 63-bit seed that depends only on (seed, step, extra...)."""
    return int(np.random.SeedSequence([seed, step, *extra]).generate_state(1, np.uint64)[0]) >> 1


class DataOrder:
    """Global batch of step s: positions [s*B, (s+1)*B) of the stream of per-epoch permutations."""

    def __init__(self, num_images: int, batch: int, seed: int):
        self.n, self.batch, self.seed = num_images, batch, seed
        self._perm: dict[int, np.ndarray] = {}

    def _epoch(self, e: int) -> np.ndarray:
        if e not in self._perm:
            self._perm = {e: np.random.default_rng([self.seed, e]).permutation(self.n)}
        return self._perm[e]

    def indices(self, step: int) -> np.ndarray:
        pos = np.arange(step * self.batch, (step + 1) * self.batch)
        out = np.empty(self.batch, dtype=np.int64)
        for e in np.unique(pos // self.n):
            sel = pos // self.n == e
            out[sel] = self._epoch(int(e))[pos[sel] % self.n]
        return out


class _Batches(torch.utils.data.Dataset):
    """Item s = this rank's slice of the global batch of step s (uint8 images, label indices)."""

    def __init__(self, images_path, labels: np.ndarray, order: DataOrder, rank: int, world: int):
        self.images_path, self.labels, self.order = images_path, labels, order
        self.lo, self.hi = rank * order.batch // world, (rank + 1) * order.batch // world
        self._images = None

    def __len__(self):
        return 1 << 62

    def __getitem__(self, step):
        if self._images is None:   # open lazily: each DataLoader worker maps the file itself
            self._images = load_array(self.images_path, mmap=True)
        idx = self.order.indices(step)[self.lo:self.hi]
        order = np.argsort(idx, kind="stable")      # sorted reads from the memory map
        imgs = np.empty((len(idx),) + self._images.shape[1:], dtype=np.uint8)
        imgs[order] = self._images[idx[order]]
        return torch.from_numpy(imgs), torch.from_numpy(self.labels[idx])


# ----------------------------------------------------------------------------------------------
# The loop

def adam(params, lr: float, device: torch.device) -> torch.optim.Adam:
    """EDM's Adam (0.9, 0.999, 1e-8), the fused implementation (one kernel for all parameters;
    no host sync under the fp16 gradient scaler) where this PyTorch has it for the device."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def ema_update(ema_params: list, net_params: list, beta: float) -> None:
    """p_ema <- beta p_ema + (1 - beta) p_net for all parameters in one foreach call."""
    torch._foreach_lerp_(ema_params, net_params, 1 - beta)


class _HeldInterrupt:
    """Ctrl-C (SIGINT) while training: the step under way finishes, then the loop saves a checkpoint
    and stops (KeyboardInterrupt), so nothing since the last checkpoint is lost and the same command
    resumes exactly (the resume rule above). A second Ctrl-C stops at once, as before. Only in the
    main thread of a single process (under torchrun the ranks could stop at different steps).
    The interrupt of a lost lease (cedm/lease.py: another process now owns the folder) is not a
    Ctrl-C: it raises the lease's error at once, and nothing more is written."""

    def __init__(self, enabled: bool):
        import signal
        import threading

        self.requested, self._signal, self._old = False, signal, None
        self.enabled = (enabled and threading.current_thread() is threading.main_thread()
                        and signal.getsignal(signal.SIGINT) is signal.default_int_handler)

    def _handler(self, signum, frame):
        if os.getpid() != self._pid:                  # a forked data-loader worker: the main process stops it
            return
        lost = lease.lost()
        if lost is not None:                          # the lease thread's interrupt: no checkpoint
            raise lost
        self.requested = True
        self._signal.signal(self._signal.SIGINT, self._old)       # a second Ctrl-C interrupts at once
        print("\ncedm train: interrupted: saving a checkpoint after this step (Ctrl-C again to stop at once, "
              "losing the work since the last checkpoint)", file=sys.stderr, flush=True)

    def __enter__(self):
        if self.enabled:
            self._pid = os.getpid()
            self._old = self._signal.signal(self._signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.enabled and not self.requested:
            self._signal.signal(self._signal.SIGINT, self._old)
        return False


def training_loop(out: Path, state: dict | None, inputs: dict, spec: LoopSpec,
                  loss_fn: EDMLoss = EDMLoss()) -> dict:
    """Train (resuming from `state` when given) into `out`; returns network.json's content, with
    stopped=True when spec.max_steps ended it early (simulates a kill; tests). Ctrl-C saves a
    checkpoint after the step under way (_HeldInterrupt), then raises KeyboardInterrupt."""
    with _HeldInterrupt(spec.world == 1) as held:
        return _train(out, state, inputs, spec, loss_fn, held)


def _train(out: Path, state: dict | None, inputs: dict, spec: LoopSpec, loss_fn: EDMLoss,
           held: _HeldInterrupt) -> dict:
    (cond, clusters_lbl, config, net_kwargs, images_path, N, res, label_dim, mimg, batch, lr, lr_ramp_mimg,
     ema_halflife_mimg, p_uncond, augment_p, precision, seed, checkpoint_every_kimg, metrics_port, workers,
     progress, max_steps, run_dir, device, world, rank) = (
        spec.cond, spec.clusters_label, spec.config, spec.net_kwargs, spec.images_path, spec.num_images,
        spec.resolution, spec.label_dim, spec.mimg, spec.batch, spec.lr, spec.lr_ramp_mimg,
        spec.ema_halflife_mimg, spec.p_uncond, spec.augment_p, spec.precision, spec.seed,
        spec.checkpoint_every_kimg, spec.metrics_port, spec.workers, spec.progress, spec.max_steps,
        spec.run_dir, spec.device, spec.world, spec.rank)
    # Network, EMA, optimizer (initialised from the seed alone).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build(net_kwargs)
    fmt = memory_format(device, precision)
    net.train().requires_grad_(True).to(device=device, memory_format=fmt)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = adam(net.parameters(), lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step = 0
    if state is not None:
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step = int(state["step"])
    net_params = [p for p in net.parameters()]
    ema_params = [p for p in ema.parameters()]
    ddp = net
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    total_nimg = int(round(mimg * 1e6))
    total_steps = max(1, math.ceil(total_nimg / batch))
    ckpt_nimg = (checkpoint_every_kimg * 1e3 if checkpoint_every_kimg
                 else min(500e3, max(total_nimg / 10, batch)))
    ckpt_steps = max(1, int(round(ckpt_nimg / batch)))
    log_steps = max(1, min(50_000 // batch, total_steps // 100))
    # EMA snapshots whenever the images seen cross a multiple of snapshot_every_mimg, and at the end
    snap_nimg = int(round(spec.snapshot_every_mimg * 1e6)) if spec.snapshot_every_mimg else 0
    local = batch // world
    lo = rank * local
    pipe = AugmentPipe(p=augment_p) if augment_p > 0 else None
    meta = spec.meta

    order = DataOrder(N, batch, seed)
    loader = torch.utils.data.DataLoader(
        _Batches(images_path, spec.labels, order, rank, world), batch_size=None,
        sampler=range(step, total_steps), num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=False)

    def state_dict(step_done):
        return dict(config=config, inputs=inputs, step=step_done, nimg=step_done * batch, net=net.state_dict(),
                    ema=ema.state_dict(), optimizer=opt.state_dict(),
                    scaler=scaler.state_dict() if scaler.is_enabled() else {}, rng=rng_state(),
                    data={"seed": seed, "position": step_done * batch, "num_images": N})

    def checkpoint(step_done, with_state=True):
        if rank == 0:
            lease.check()                   # never into a folder another process has taken over
            save_checkpoint(out, net, ema, dict(meta, nimg=step_done * batch, step=step_done),
                            state_dict(step_done) if with_state else None)
        dist.barrier(world)

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _trim_log(out / "log.jsonl", step)
        telemetry.train_started(clusters_lbl, total_steps * batch, images_done=step * batch,
                                run_dir=run_dir, cond=cond)   # a resumed run counts on
        if metrics_port:
            try:
                telemetry.serve(metrics_port)
            except OSError as e:   # e.g. a second run in this process: the port is already served
                print(f"cedm train: warning: cannot serve metrics on port {metrics_port}: {e}", file=sys.stderr)
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps * batch, initial=step * batch, unit="img", unit_scale=True,
               desc=f"train {cond}", disable=None if (progress and rank == 0) else True, file=sys.stderr)
    # Read on the host only at log time: no per-step device->host sync.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)   # steps with non-finite gradients
    t_log, n_log = time.perf_counter(), 0
    stopped = False
    saved_step = step                       # the steps state.pt holds (0: none)
    batches = iter(loader)
    while True:
        try:
            if held.requested:                  # Ctrl-C during the step just done: keep it, then stop
                raise KeyboardInterrupt
            images_u8, labels = next(batches)
        except StopIteration:
            break
        except BaseException:                   # e.g. a data-loader worker Ctrl-C stopped
            lost = lease.lost()
            if lost is not None:                # the folder is no longer ours: no checkpoint
                raise lost from None
            if not held.requested:
                raise
            bar.close()
            if step > saved_step:
                checkpoint(step)                # between steps: the whole state of step `step`
            kept = (f"the state after step {step} of {total_steps} ({step * batch / 1e3:g} of "
                    f"{total_steps * batch / 1e3:g} kimg) is in {out / 'state.pt'}: the same command resumes "
                    f"from there" if step > 0 else "no step had finished: nothing to keep")
            print(f"cedm train: stopped; {kept}", file=sys.stderr, flush=True)
            raise KeyboardInterrupt from None
        # The last step's gradients are freed here, before the forward pass (as EDM's loop), not
        # right after opt.step(): freed there, the forward's activations came from fresh pages
        # (~65k page faults, 5-10% of a CIFAR step on a CPU; benchmarks/bench_edm.py).
        opt.zero_grad(set_to_none=True)
        # All randomness of this step: from (seed, step); drawn for the global batch, then sliced.
        g = torch.Generator(device).manual_seed(step_seed(seed, step))
        torch.manual_seed(step_seed(seed, step, 1 + rank))               # network dropout
        sigma = loss_fn.sigma(torch.randn(batch, generator=g, device=device))[lo:lo + local]
        noise = torch.randn(batch, 3, res, res, generator=g, device=device)[lo:lo + local]
        keep = torch.rand(batch, generator=g, device=device)[lo:lo + local] >= p_uncond
        aug = pipe.draw(batch, g) if pipe else None

        y = images_u8.to(device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1
        y, noise = y.contiguous(memory_format=fmt), noise.contiguous(memory_format=fmt)
        aug_labels = None
        if pipe:
            y, aug_labels = pipe(y, AugmentPipe.slice(aug, lo, lo + local))
        class_labels = None
        if label_dim:
            class_labels = torch.nn.functional.one_hot(labels.to(device), label_dim).to(torch.float32)
            class_labels = class_labels * keep[:, None].to(torch.float32)    # dropped label = zeros
        loss = loss_fn(ddp, y, sigma, noise, class_labels, aug_labels, autocast=autocast(device, precision))
        scaler.scale(loss.mean()).backward()

        nimg = step * batch                                                # images seen before this step
        for group in opt.param_groups:                                     # linear lr ramp-up
            group["lr"] = lr * min(nimg / max(lr_ramp_mimg * 1e6, 1e-8), 1)
        scaler.unscale_(opt)
        grads = [p.grad for p in net_params if p.grad is not None]
        nonfinite += ~torch.stack(torch._foreach_norm(grads)).isfinite().all()
        for gr in grads:
            torch.nan_to_num(gr, nan=0, posinf=1e5, neginf=-1e5, out=gr)   # non-finite grads replaced
        scaler.step(opt)
        scaler.update()

        halflife = min(ema_halflife_mimg * 1e6, nimg * EMA_RAMPUP)         # EMA half-life with ramp-up
        beta = 0.5 ** (batch / max(halflife, 1e-8))
        with torch.no_grad():
            ema_update(ema_params, net_params, beta)
            for b_ema, b_net in zip(ema.buffers(), net.buffers()):
                b_ema.copy_(b_net)

        step += 1
        if snap_nimg and rank == 0 and (step == total_steps
                                        or (step * batch) // snap_nimg > ((step - 1) * batch) // snap_nimg):
            lease.check()
            save_snapshot(out, ema, step * batch)
        loss_sum += loss.detach().sum()
        n_log += local
        bar.update(batch)
        if step % log_steps == 0 or step == total_steps:
            loss_mean = dist.all_sum(loss_sum, world).item() / (n_log * world)
            n_bad = int(nonfinite.item())
            dt = time.perf_counter() - t_log
            rec = dict(step=step, kimg=step * batch / 1e3, mimg=step * batch / 1e6, loss=loss_mean,
                       lr=opt.param_groups[0]["lr"], img_per_s=n_log * world / dt, nonfinite=n_bad,
                       time=time.time())
            if rank == 0:
                for _ in range(n_bad):  # fp16: an overflow the scaler skips (normal), else a real non-finite step
                    telemetry.train_nonfinite_step(clusters_lbl, skipped=scaler.is_enabled())
                lease.check()
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                telemetry.train_step(clusters_lbl, n_log * world, loss_mean, rec["img_per_s"])
                bar.set_postfix(loss=f"{loss_mean:.3f}")
            loss_sum.zero_()
            nonfinite.zero_()
            t_log, n_log = time.perf_counter(), 0
        if step % ckpt_steps == 0 and step < total_steps:
            checkpoint(step)
            saved_step = step
        if max_steps is not None and step >= max_steps and step < total_steps:
            stopped = True
            break
    bar.close()
    if stopped:
        return dict(meta, nimg=step * batch, step=step, stopped=True)
    checkpoint(step)
    if held.requested:                      # Ctrl-C during the last step or the final checkpoint
        print(f"cedm train: saved; interrupted: the state after all {total_steps} steps is in {out / 'state.pt'}: "
              f"the same command finishes the stage from there", file=sys.stderr, flush=True)
        raise KeyboardInterrupt
    return dict(meta, nimg=step * batch, step=step)


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step (they will be logged again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            continue
    with atomic_path(path) as tmp:
        tmp.write_text("".join(k + "\n" for k in keep))
