"""`cedm train`: train C-EDM, EDM conditioned on cluster ids (docs/method.md#c-edm; EDM Table 7).

This stage only fills a config: it resolves the flags against the dataset and network presets
(cedm.config.TrainConfig), labels the training images from the conditioning tag
(cedm.conditioning), decides with the stage layer (cedm.pipeline) and the resume policy
(cedm.checkpoint.resume_policy) whether to skip, resume, extend or restart, and hands a LoopSpec
to cedm.training_loop, which trains with cedm.loss.EDMLoss under cedm.dist.

Outputs in train/<tag>/: network.safetensors (EMA weights) + network.json (no pickles),
state.pt (full training state, loaded with weights_only=True), log.jsonl, manifest.json.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from cedm import dist, ops, pipeline  # noqa: F401 (ops: the fused loss, patched in tests)
from cedm.checkpoint import load_state, resume_policy
from cedm.conditioning import conditioning, label_set_names, parse_tag, telemetry_label  # noqa: F401 (re-exported)
from cedm.config import TRAIN
from cedm.io import CedmError, RunDir, load_array, load_json
from cedm.loss import EDMLoss
from cedm.networks import NETWORK_PRESETS, TRAIN_PRESETS, network_kwargs, train_preset
from cedm.training_loop import DataOrder, LoopSpec, _Batches, step_seed, training_loop  # noqa: F401


# ----------------------------------------------------------------------------------------------
# The stage

def run(run_dir, cond: str, network: str | None = None, mimg: float | None = None,
        batch_size: int | None = None, lr: float | None = None, lr_ramp_mimg: float | None = None,
        ema_halflife_mimg: float | None = None, p_uncond: float | None = None, augment_p: float | None = None,
        precision: str | None = None, checkpoint_every_kimg: float | None = None,
        snapshot_every_mimg: float | None = None, metrics_port: int | None = None, workers: int = 0, seed: int = 0, device=None,
        force: bool = False, max_steps: int | None = None, progress: bool = True) -> dict:
    """Train (or resume, or skip) C-EDM for one conditioning tag; returns network.json's content.

    max_steps: stop after that many steps of this call without finishing (simulates a kill;
    tests). Flags left None come from the run's dataset preset and its network preset.
    """
    from cedm.config import run_preset
    from cedm.pipeline import resolve_device

    cond = str(parse_tag(cond))          # one spelling per conditioning (labels-coarse -> labels:coarse)
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
    augment_p = float(pick(augment_p, pick(pre.augment_p, tc.augment_p)))
    p_uncond = float(pick(p_uncond, tc.p_uncond))
    if not 0 <= p_uncond < 1:
        raise CedmError(f"--p-uncond must be in [0, 1) (got {p_uncond})")
    if not 0 <= augment_p <= 1:
        raise CedmError(f"--augment-p must be in [0, 1] (got {augment_p})")
    if mimg <= 0 or batch <= 0 or lr <= 0:
        raise CedmError("--mimg, --batch-size and --lr must be positive")
    if checkpoint_every_kimg is not None and checkpoint_every_kimg <= 0:
        raise CedmError(f"--checkpoint-every-kimg must be positive (got {checkpoint_every_kimg})")
    if snapshot_every_mimg is not None and not 0 < snapshot_every_mimg <= mimg:
        raise CedmError(f"--snapshot-every-mimg must be in (0, --mimg {mimg:g}] (got {snapshot_every_mimg})")
    if workers < 0:
        raise CedmError(f"--workers must be >= 0 (got {workers})")

    world, rank, local_rank = dist.env()
    if batch % world:
        raise CedmError(f"--batch-size {batch} is not divisible by the {world} processes")
    dist.init(resolve_device(device), world, local_rank)
    device = resolve_device(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    precision = pick(precision, tc.precision_for(device))   # per device: fp16 is a GPU setting
    if precision not in ("fp32", "bf16", "fp16"):
        raise CedmError(f"--precision must be fp32, bf16 or fp16 (got {precision!r})")

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
    if snapshot_every_mimg is not None:      # recorded only when asked for (older runs stay valid)
        config["snapshot_every_mimg"] = float(snapshot_every_mimg)
    config = json.loads(json.dumps(config))
    out = rd.train(cond)
    clusters_lbl = telemetry_label(cond)
    loss_fn = EDMLoss()
    spec = LoopSpec(
        cond=cond, clusters_label=clusters_lbl, config=config, net_kwargs=net_kwargs,
        meta=dict(tag=cond, kind=cnd["kind"], method=cnd["method"], C=cnd["C"], clusters=clusters_lbl,
                  network=network, network_kwargs=net_kwargs, label_dim=label_dim,
                  raw_labels=cnd["raw_labels"], label_map=cnd["label_map"], q=cnd["q"], resolution=res,
                  sigma_data=loss_fn.sigma_data, p_uncond=p_uncond, augment_p=augment_p, precision=precision,
                  dataset=pre.name, mimg=mimg, batch_size=batch, seed=seed,
                  **{k: cnd[k] for k in ("subclass_class", "within_freq") if k in cnd}),
        images_path=images_path, labels=cnd["index"], num_images=N, resolution=res, label_dim=label_dim,
        mimg=mimg, batch=batch, lr=lr, lr_ramp_mimg=lr_ramp_mimg, ema_halflife_mimg=ema_halflife_mimg,
        p_uncond=p_uncond, augment_p=augment_p, precision=precision, seed=seed,
        checkpoint_every_kimg=checkpoint_every_kimg, metrics_port=metrics_port, workers=workers,
        progress=progress, max_steps=max_steps, run_dir=run_dir, device=device, world=world, rank=rank,
        snapshot_every_mimg=snapshot_every_mimg)
    stage = pipeline.Stage("train", out, rd.root, config, [rd.data] + cnd["inputs"], resumable=True,
                           seed_redo=True)

    def compute(work: Path, d: pipeline.Decision):
        # Resume, extend or restart: every rank decides on the same files, then rank 0 acts.
        try:
            state = load_state(work / "state.pt") if (work / "state.pt").exists() else None
        except CedmError:
            if not force:                            # the error says: delete it or use --force
                raise
            if rank == 0:
                print(f"cedm train: {work / 'state.pt'} does not load; --force restarts the run", file=sys.stderr)
            state = None
        saved = None if state is None else dict(config=state.get("config", {}), nimg=state.get("nimg", 0),
                                                **({"inputs": state["inputs"]} if "inputs" in state else {}))
        action, why = resume_policy(saved, config, d.inputs, mimg * 1e6, force and not d.continuing)
        if action == "refuse":
            raise CedmError(f"{out} {why}; use --force to restart it")
        if action == "restart" and state is not None and rank == 0 and why != "--force":
            print(f"cedm train: {work}: the saved state is stale, {why}; restarting", file=sys.stderr)
        if action == "restart":
            state = None
        elif rank == 0:                              # say it: a rerun continues, it does not start over
            print(f"cedm train: resuming {work} from step {int(state['step'])} ({int(state['nimg']) / 1e3:g} of "
                  f"{mimg * 1e3:g} kimg done; {why})", file=sys.stderr)
        dist.barrier(world)
        if state is None and rank == 0:
            (work / "state.pt").unlink(missing_ok=True)
            (work / "log.jsonl").unlink(missing_ok=True)
        dist.barrier(world)
        meta = training_loop(work, state, d.inputs, spec, loss_fn)
        return pipeline.Output({"network": "network.safetensors", "config": "network.json",
                                "state": "state.pt", "log": "log.jsonl",
                                **({"snapshots": "snapshots/"} if snapshot_every_mimg else {})},
                               {"nimg": meta["nimg"], "label_dim": label_dim}, value=meta,
                               finished=not meta.get("stopped"))

    res = pipeline.execute(stage, compute, force=force, rank=rank, barrier=lambda: dist.barrier(world),
                           quiet=rank != 0, labels={"cond": cond})
    if res.skipped:
        return load_json(out / "network.json")
    return res.value




# ----------------------------------------------------------------------------------------------
# CLI

def _main(args) -> int:
    with pipeline.reporting("train", args.pushgateway, run_dir=args.run_dir, cond=args.cond):
        out = RunDir(args.run_dir).train(args.cond)
        meta = run(args.run_dir, args.cond, network=args.network, mimg=args.mimg, batch_size=args.batch_size,
                   lr=args.lr, lr_ramp_mimg=args.lr_ramp_mimg, ema_halflife_mimg=args.ema_halflife_mimg,
                   p_uncond=args.p_uncond, augment_p=args.augment_p, precision=args.precision,
                   checkpoint_every_kimg=args.checkpoint_every_kimg,
                   snapshot_every_mimg=args.snapshot_every_mimg, metrics_port=args.metrics_port,
                   workers=args.workers, seed=args.seed, device=args.device, force=args.force)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"cedm train: {out} ({meta['nimg'] / 1e6:.4g} Mimg, label_dim {meta['label_dim']})",
                  file=sys.stderr)
    dist.shutdown()
    return 0


def _optional_float(text: str) -> float | None:
    """A float, or None for an empty value (an Argo parameter left empty)."""
    return float(text) if text.strip() else None


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
                   help="conditioning: '<method>-C<C>' (clusters, e.g. temi-C20), '<method>-K<K>' "
                        "(ClusDiff sub-classes, e.g. ap-K10), 'labels' (ground truth), "
                        + ", ".join(f"'labels:{k}'" for k in label_set_names())
                        + " (docs/method.md#c-edm) or 'uncond'")
    p.add_argument("--network", choices=tuple(NETWORK_PRESETS), default=None,
                   help="network preset (default: the dataset preset's)")
    p.add_argument("--mimg", type=float, default=None, help="training budget in millions of images "
                   "(default: dataset preset)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch (default: dataset preset, else network preset: {_per_network('batch')})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"Adam learning rate (default: network preset: {_per_network('lr')}; the paper's "
                        f"Table 7 uses 1e-3 for 64x64 too: --lr 1e-3)")
    p.add_argument("--lr-ramp-mimg", type=float, default=None,
                   help=f"linear lr warm-up length in Mimg (default: network preset: {_per_network('lr_ramp_mimg')})")
    p.add_argument("--ema-halflife-mimg", type=float, default=None,
                   help="EMA half-life in Mimg, ramped as min(half-life, 0.05*nimg) (default: network "
                        f"preset: {_per_network('ema_halflife_mimg')})")
    p.add_argument("--p-uncond", type=float, default=TRAIN.p_uncond,
                   help="label dropout probability for classifier-free guidance (default: %(default)s)")
    p.add_argument("--augment-p", type=float, default=None,
                   help=f"EDM geometric augmentation probability, 0 = off (default: the dataset preset's, "
                        f"digits 0; else the network preset's: {_per_network('augment_p')})")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help=f"autocast precision; fp16 uses a gradient scaler (default per network preset "
                        f"and device: CUDA {_per_network('precision')}; CPU {_per_network('precision_cpu')}, "
                        f"bf16 only where the CPU has it natively, else fp32)")
    p.add_argument("--checkpoint-every-kimg", type=float, default=None,
                   help="write a resumable checkpoint every this many kimg (default: 10%% of the "
                        "budget, at most 500)")
    p.add_argument("--snapshot-every-mimg", type=_optional_float, default=None, metavar="M",
                   help="keep the EMA weights every M Mimg of training (and at the end) in "
                        "train/<cond>/snapshots/, for FD against training Mimg (`cedm curve`; the "
                        "paper's Figs. 2 and 9); empty = off (default: off)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (rank 0; default: off)")
    p.add_argument("--workers", type=int, default=0,
                   help="data-loader worker processes, 0 = load in the training process (default: %(default)s)")
    p.set_defaults(func=_main)
