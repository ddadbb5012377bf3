"""`cedm train`: train C-EDM, EDM conditioned on cluster ids (docs/method.md#c-edm; EDM Table 7).

Conditioning tags: '<method>-C<C>' (cluster/<method>-C<C>/assignments.npy), 'labels'
(data/labels.npy) or 'uncond'. Labels are remapped to 0..C^u-1 over the non-empty clusters
(label_dim = C^u; C^u = 1 is the unconditional model, label_dim 0); the map is saved with the
checkpoint. Loss: EDM loss through the fused op, ln sigma ~ N(-1.2, 1.2^2), summed over pixels,
averaged over the batch. Adam with a linear lr ramp, EMA with half-life and ramp-up, optional
bf16/fp16 autocast, non-finite gradients replaced. DDP under torchrun (gloo on CPU).

Resume rule: every random number of step s (data order, sigma, noise, augmentation, label
dropout, network dropout) derives from (seed, s) and not from a running generator, and the
saved state (model, EMA, optimizer, grad scaler, step) is all that carries over; so a run
killed at any moment and started again ends with exactly the weights of an uninterrupted run
on CPU. Each step's draws are made for the whole global batch and each rank takes its slice,
so W processes see the same per-sample randomness as one process with the same global batch.

Outputs in train/<tag>/: network.safetensors (EMA weights) + network.json (no pickles),
state.pt (full training state, loaded with weights_only=True), log.jsonl, manifest.json.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cedm import dist, ops, pipeline, telemetry  # noqa: F401 (ops: the fused loss, patched in tests)
from cedm.augment import AugmentPipe
from cedm.conditioning import conditioning, parse_tag, telemetry_label  # noqa: F401 (re-exported)
from cedm.checkpoint import load_state, resume_policy, rng_state, save_checkpoint, set_rng_state
from cedm.io import CedmError, RunDir, atomic_path, load_array, load_json
from cedm.loss import EDMLoss
from cedm.config import TRAIN
from cedm.networks import TRAIN_PRESETS, build, network_kwargs, train_preset

EMA_RAMPUP = 0.05       # EDM (Table 7 / docs/method.md#edm-training): EMA half-life ramp 0.05 * nimg


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
# The training loop

def _autocast_dtype(precision: str):
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def run(run_dir, cond: str, network: str | None = None, mimg: float | None = None,
        batch_size: int | None = None, lr: float | None = None, lr_ramp_mimg: float | None = None,
        ema_halflife_mimg: float | None = None, p_uncond: float | None = None, augment_p: float | None = None,
        precision: str | None = None, checkpoint_every_kimg: float | None = None,
        metrics_port: int | None = None, workers: int = 0, seed: int = 0, device=None,
        force: bool = False, max_steps: int | None = None, progress: bool = True) -> dict:
    """Train (or resume, or skip) C-EDM for one conditioning tag; returns network.json's content.

    max_steps: stop after that many steps of this call without finishing (simulates a kill;
    tests). Flags left None come from the run's dataset preset and its network preset.
    """
    from cedm.config import run_preset
    from cedm.pipeline import resolve_device

    rd = RunDir(run_dir)
    pre = run_preset(run_dir)
    network = network if network is not None else pre.network
    tc = train_preset(network)                   # flag > dataset preset > network's TrainConfig
    pick = lambda v, d: d if v is None else v    # a flag given as 0 stays 0 (and is then refused)
    mimg = float(pick(mimg, pre.mimg))
    batch = int(pick(batch_size, pre.batch or tc.batch))
    lr = float(pick(lr, tc.lr))
    lr_ramp_mimg = float(pick(lr_ramp_mimg, tc.lr_ramp_mimg))
    ema_halflife_mimg = float(pick(ema_halflife_mimg, tc.ema_halflife_mimg))
    augment_p = float(pick(augment_p, tc.augment_p))
    precision = pick(precision, tc.precision)
    p_uncond = float(pick(p_uncond, tc.p_uncond))
    if precision not in ("fp32", "bf16", "fp16"):
        raise CedmError(f"--precision must be fp32, bf16 or fp16 (got {precision!r})")
    if not 0 <= p_uncond < 1:
        raise CedmError(f"--p-uncond must be in [0, 1) (got {p_uncond})")
    if not 0 <= augment_p <= 1:
        raise CedmError(f"--augment-p must be in [0, 1] (got {augment_p})")
    if mimg <= 0 or batch <= 0 or lr <= 0:
        raise CedmError("--mimg, --batch-size and --lr must be positive")

    world, rank, local_rank = dist.env()
    if batch % world:
        raise CedmError(f"--batch-size {batch} is not divisible by the {world} processes")
    dist.init(resolve_device(device), world, local_rank)
    device = resolve_device(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)

    images_path = rd.data / "images.npy"
    images = load_array(images_path, mmap=True)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8 or images.shape[1] != images.shape[2]:
        raise CedmError(f"{images_path} must be [N,H,H,3] uint8 (got {images.shape} {images.dtype})")
    N, res = images.shape[0], images.shape[1]
    cnd = conditioning(run_dir, cond, N)
    label_dim = cnd["label_dim"]
    net_kwargs = network_kwargs(network, res, label_dim, augment=augment_p > 0)

    config = dict(cond=cond, network=network, network_kwargs=net_kwargs, mimg=mimg, batch_size=batch,
                  lr=lr, lr_ramp_mimg=lr_ramp_mimg, ema_halflife_mimg=ema_halflife_mimg,
                  p_uncond=p_uncond, augment_p=augment_p, precision=precision, seed=seed)
    config = json.loads(json.dumps(config))
    out = rd.train(cond)
    clusters_lbl = telemetry_label(cond)
    loss_fn = EDMLoss()
    stage = pipeline.Stage("train", out, rd.root, config, [rd.data] + cnd["inputs"], resumable=True,
                           seed_redo=True)

    def compute(work: Path, d: pipeline.Decision):
        # Resume, extend or restart: every rank decides on the same files, then rank 0 acts.
        state = load_state(work / "state.pt") if (work / "state.pt").exists() else None
        saved = None if state is None else dict(config=state.get("config", {}), nimg=state.get("nimg", 0),
                                                **({"inputs": state["inputs"]} if "inputs" in state else {}))
        action, why = resume_policy(saved, config, d.inputs, mimg * 1e6, force and not d.continuing)
        if action == "refuse":
            raise CedmError(f"{out} {why}; use --force to restart it")
        if action == "restart" and state is not None and rank == 0 and why != "--force":
            print(f"cedm train: {work}: the saved state is stale, {why}; restarting", file=sys.stderr)
        if action == "restart":
            state = None
        dist.barrier(world)
        if state is None and rank == 0:
            (work / "state.pt").unlink(missing_ok=True)
            (work / "log.jsonl").unlink(missing_ok=True)
        dist.barrier(world)
        meta = _loop(work, state, d.inputs)
        return pipeline.Output({"network": "network.safetensors", "config": "network.json",
                                "state": "state.pt", "log": "log.jsonl"},
                               {"nimg": meta["nimg"], "label_dim": label_dim}, value=meta,
                               finished=not meta.get("stopped"))

    def _loop(out: Path, state, inputs: dict) -> dict:
        # Network, EMA, optimizer (initialised from the seed alone).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = build(net_kwargs)
        net.train().requires_grad_(True).to(device)
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
        amp_dtype = _autocast_dtype(precision)
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
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
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
        local = batch // world
        lo = rank * local
        pipe = AugmentPipe(p=augment_p) if augment_p > 0 else None
        meta = dict(tag=cond, kind=cnd["kind"], method=cnd["method"], C=cnd["C"], clusters=clusters_lbl,
                    network=network, network_kwargs=net_kwargs, label_dim=label_dim,
                    raw_labels=cnd["raw_labels"], label_map=cnd["label_map"], q=cnd["q"],
                    resolution=res, sigma_data=loss_fn.sigma_data, p_uncond=p_uncond, augment_p=augment_p,
                    precision=precision, dataset=pre.name, mimg=mimg, batch_size=batch, seed=seed,
                    **{k: cnd[k] for k in ("subclass_class", "within_freq") if k in cnd})

        order = DataOrder(N, batch, seed)
        loader = torch.utils.data.DataLoader(
            _Batches(images_path, cnd["index"], order, rank, world), batch_size=None,
            sampler=range(step, total_steps), num_workers=workers, pin_memory=device.type == "cuda",
            persistent_workers=False)

        def state_dict(step_done):
            return dict(config=config, inputs=inputs, step=step_done, nimg=step_done * batch, net=net.state_dict(),
                        ema=ema.state_dict(), optimizer=opt.state_dict(),
                        scaler=scaler.state_dict() if scaler.is_enabled() else {}, rng=rng_state(),
                        data={"seed": seed, "position": step_done * batch, "num_images": N})

        def checkpoint(step_done, with_state=True):
            if rank == 0:
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
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        nonfinite = 0
        t_log, n_log = time.perf_counter(), 0
        stopped = False
        for images_u8, labels in loader:
            # All randomness of this step: from (seed, step); drawn for the global batch, then sliced.
            g = torch.Generator(device).manual_seed(step_seed(seed, step))
            torch.manual_seed(step_seed(seed, step, 1 + rank))               # network dropout
            sigma = loss_fn.sigma(torch.randn(batch, generator=g, device=device))[lo:lo + local]
            noise = torch.randn(batch, 3, res, res, generator=g, device=device)[lo:lo + local]
            keep = torch.rand(batch, generator=g, device=device)[lo:lo + local] >= p_uncond
            aug = pipe.draw(batch, g) if pipe else None

            y = images_u8.to(device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1
            aug_labels = None
            if pipe:
                y, aug_labels = pipe(y, AugmentPipe.slice(aug, lo, lo + local))
            class_labels = None
            if label_dim:
                class_labels = torch.nn.functional.one_hot(labels.to(device), label_dim).to(torch.float32)
                class_labels = class_labels * keep[:, None].to(torch.float32)    # dropped label = zeros
            loss = loss_fn(ddp, y, sigma, noise, class_labels, aug_labels, autocast=torch.autocast(
                device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None))
            scaler.scale(loss.mean()).backward()

            nimg = step * batch                                                # images seen before this step
            for group in opt.param_groups:                                     # linear lr ramp-up
                group["lr"] = lr * min(nimg / max(lr_ramp_mimg * 1e6, 1e-8), 1)
            scaler.unscale_(opt)
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            if not bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
                nonfinite += 1
                if rank == 0:   # fp16: an overflow the scaler skips (normal), else a real non-finite step
                    telemetry.train_nonfinite_step(clusters_lbl, skipped=scaler.is_enabled())
            for gr in grads:
                torch.nan_to_num(gr, nan=0, posinf=1e5, neginf=-1e5, out=gr)   # non-finite grads replaced
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

            halflife = min(ema_halflife_mimg * 1e6, nimg * EMA_RAMPUP)         # EMA half-life with ramp-up
            beta = 0.5 ** (batch / max(halflife, 1e-8))
            with torch.no_grad():
                for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                    p_ema.copy_(p_net.detach().lerp(p_ema, beta))
                for b_ema, b_net in zip(ema.buffers(), net.buffers()):
                    b_ema.copy_(b_net)

            step += 1
            loss_sum += loss.detach().sum()
            n_log += local
            bar.update(batch)
            if step % log_steps == 0 or step == total_steps:
                loss_mean = dist.all_sum(loss_sum, world).item() / (n_log * world)
                dt = time.perf_counter() - t_log
                rec = dict(step=step, kimg=step * batch / 1e3, mimg=step * batch / 1e6, loss=loss_mean,
                           lr=opt.param_groups[0]["lr"], img_per_s=n_log * world / dt, nonfinite=nonfinite,
                           time=time.time())
                if rank == 0:
                    with open(out / "log.jsonl", "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    telemetry.train_step(clusters_lbl, n_log * world, loss_mean, rec["img_per_s"])
                    bar.set_postfix(loss=f"{loss_mean:.3f}")
                loss_sum.zero_()
                t_log, n_log, nonfinite = time.perf_counter(), 0, 0
            if step % ckpt_steps == 0 and step < total_steps:
                checkpoint(step)
            if max_steps is not None and step >= max_steps and step < total_steps:
                stopped = True
                break
        bar.close()
        if stopped:
            return dict(meta, nimg=step * batch, step=step, stopped=True)
        checkpoint(step)
        return dict(meta, nimg=step * batch, step=step)

    res = pipeline.execute(stage, compute, force=force, rank=rank, barrier=lambda: dist.barrier(world),
                           quiet=rank != 0, labels={"cond": cond})
    if res.skipped:
        return load_json(out / "network.json")
    return res.value




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


# ----------------------------------------------------------------------------------------------
# CLI

def _main(args) -> int:
    with pipeline.reporting("train", args.pushgateway, run_dir=args.run_dir, cond=args.cond):
        out = RunDir(args.run_dir).train(args.cond)
        meta = run(args.run_dir, args.cond, network=args.network, mimg=args.mimg, batch_size=args.batch_size,
                   lr=args.lr, lr_ramp_mimg=args.lr_ramp_mimg, ema_halflife_mimg=args.ema_halflife_mimg,
                   p_uncond=args.p_uncond, augment_p=args.augment_p, precision=args.precision,
                   checkpoint_every_kimg=args.checkpoint_every_kimg, metrics_port=args.metrics_port,
                   workers=args.workers, seed=args.seed, device=args.device, force=args.force)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"cedm train: {out} ({meta['nimg'] / 1e6:.4g} Mimg, label_dim {meta['label_dim']})",
                  file=sys.stderr)
    dist.shutdown()
    return 0


def _per_network(field: str) -> str:
    """A TrainConfig field's default per network preset, for --help."""
    return ", ".join(f"{n} {getattr(t, field)}" for n, t in TRAIN_PRESETS.items())


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train cluster-conditional EDM (C-EDM) for one conditioning",
        description="Train EDM (SongUNet/DDPM++, EDM preconditioning and loss, EMA) conditioned on "
                    "cluster ids ('<method>-C<C>', from cluster/<method>-C<C>), ground-truth labels "
                    "('labels') or nothing ('uncond'). Writes train/<cond>/network.safetensors + "
                    "network.json (EMA weights, label map, q(c)), state.pt, log.jsonl. Killing it and "
                    "running the same command again resumes; a finished run is skipped; another config "
                    "is an error unless --force (which restarts, or extends the run when only --mimg "
                    "grew). Multi-GPU/CPU: `torchrun --nproc-per-node N -m cedm train ...` (global "
                    "batch split across processes).")
    pipeline.add_common(p)
    p.add_argument("--cond", required=True, metavar="TAG",
                   help="conditioning: '<method>-C<C>' (e.g. temi-C20), 'labels' or 'uncond'")
    p.add_argument("--network", choices=("tiny", "cifar", "ffhq64"), default=None,
                   help="network preset (default: the dataset preset's)")
    p.add_argument("--mimg", type=float, default=None, help="training budget in millions of images "
                   "(default: dataset preset)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch (default: dataset preset, else network preset: {_per_network('batch')})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"Adam learning rate (default: network preset: {_per_network('lr')})")
    p.add_argument("--lr-ramp-mimg", type=float, default=None,
                   help=f"linear lr warm-up length in Mimg (default: network preset: {_per_network('lr_ramp_mimg')})")
    p.add_argument("--ema-halflife-mimg", type=float, default=None,
                   help="EMA half-life in Mimg, ramped as min(half-life, 0.05*nimg) (default: network "
                        f"preset: {_per_network('ema_halflife_mimg')})")
    p.add_argument("--p-uncond", type=float, default=TRAIN.p_uncond,
                   help="label dropout probability for classifier-free guidance (default: %(default)s)")
    p.add_argument("--augment-p", type=float, default=None,
                   help=f"EDM geometric augmentation probability, 0 = off (default: network preset: "
                        f"{_per_network('augment_p')})")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help=f"autocast precision; fp16 uses a gradient scaler (default: network preset: "
                        f"{_per_network('precision')})")
    p.add_argument("--checkpoint-every-kimg", type=float, default=None,
                   help="write a resumable checkpoint every this many kimg (default: 10%% of the "
                        "budget, at most 500)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (rank 0; default: off)")
    p.add_argument("--workers", type=int, default=0,
                   help="data-loader worker processes, 0 = load in the training process (default: %(default)s)")
    p.set_defaults(func=_main)
