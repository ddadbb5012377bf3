"""`cedm sample`: the EDM Heun sampler (EDM Algorithm 2; docs/method.md#sampler) for C-EDM.

Labels are drawn from q(c) by default ('prior'), uniformly ('uniform') or fixed to one raw
cluster id. Classifier-free guidance: D = (1+w) D(x|c) - w D(x|null), null = zero label.
Per-image seeds: image i uses seed seed_base+i for its initial noise, then its label draw, then
its churn noise, so an image depends only on its seed and not on the batch it was made in.

Outputs in sample/<tag>/: images.npz with images [N,H,W,3] uint8, labels [N] int64 (the model's
label index 0..label_dim-1), clusters [N] int64 (the raw cluster id / class id of that index),
seeds [N] int64; grid.png (one row per cluster); png/<seed>.png with --png.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

from cedm import ops, pipeline
from cedm.config import SAMPLER as S
from cedm.io import CedmError, RunDir, load_json, load_tensors, save_json
from cedm.networks import autocast, build, memory_format, train_preset

PRECISIONS = ("fp32", "bf16", "fp16")
# Sample stages made before the sampling precision was recorded in their config ran the network
# in fp32, eagerly (the only default then); `legacy_config` reads a config without the keys so.
LEGACY = {"precision": "fp32", "compile": False}


# ----------------------------------------------------------------------------------------------
# EDM Algorithm 2

def time_steps(num_steps: int = S.steps, sigma_min: float = S.sigma_min, sigma_max: float = S.sigma_max,
               rho: float = S.rho, device=None) -> torch.Tensor:
    """t_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, i < N, and t_N = 0 (float64)."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    t = (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


def edm_sampler(denoise, latents: torch.Tensor, num_steps: int = S.steps, sigma_min: float = S.sigma_min,
                sigma_max: float = S.sigma_max, rho: float = S.rho, S_churn: float = S.churn,
                S_min: float = S.s_min, S_max: float = S.s_max, S_noise: float = S.s_noise,
                randn_like=torch.randn_like) -> torch.Tensor:
    """EDM Algorithm 2. `denoise(x, t) -> D(x; t)`; latents n ~ N(0, I). Returns x_N (float64).

    2N - 1 calls of `denoise` (35 for N = 18). The step arithmetic runs through the fused ops.
    """
    if num_steps < 1:
        raise CedmError(f"--steps must be >= 1 (got {num_steps})")
    t_steps = time_steps(num_steps, sigma_min, sigma_max, rho, latents.device).tolist()
    x_next = latents.to(torch.float64) * t_steps[0]                          # x_0 = n t_0
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur                                        # t_hat = t_i (1 + gamma_i)
        x_hat = ops.heun_churn(x_cur, randn_like(x_cur), t_cur, t_hat, S_noise) if gamma > 0 else x_cur
        denoised = denoise(x_hat, t_hat).to(torch.float64)
        x_next = ops.heun_euler(x_hat, denoised, t_hat, t_next)              # Euler step
        if t_next != 0:                                                      # 2nd-order correction
            denoised_next = denoise(x_next, t_next).to(torch.float64)
            x_next = ops.heun_correct(x_hat, denoised, x_next, denoised_next, t_hat, t_next)
    return x_next


class SeededRandom:
    """One torch.Generator per image (its seed), so draws do not depend on the batch."""

    def __init__(self, seeds, device):
        self.device = device
        self.generators = [torch.Generator(device).manual_seed(int(s) % (1 << 63)) for s in seeds]

    def randn(self, shape, dtype=torch.float32) -> torch.Tensor:
        return torch.stack([torch.randn(shape[1:], generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype)

    def rand(self) -> torch.Tensor:
        return torch.stack([torch.rand([], generator=g, device=self.device, dtype=torch.float64)
                            for g in self.generators])


# ----------------------------------------------------------------------------------------------
# Precision: the device rule of training, applied to the model being sampled

def default_precision(meta: dict, device) -> str:
    """The network's precision when sampling `meta`'s model on `device` without --precision: the
    rule its training used, TrainConfig.precision_for of its network preset (the one place the
    device rule lives): fp16 on CUDA (EDM's fp16 network, the Heun steps float64), bf16 on a CPU
    with native bf16, fp32 on other CPUs; the tiny preset fp32 everywhere, as it trains
    (docs/performance.md, "Per-device defaults")."""
    name = meta.get("network")
    if name is None:
        raise CedmError(f"network.json of {meta.get('tag')!r} names no network preset, so its default "
                        f"sampling precision is unknown; pass --precision fp32, bf16 or fp16")
    return train_preset(name).precision_for(torch.device(device))


def resolve_precision(meta: dict, device, precision: str | None = None) -> str:
    """`precision` when given (checked), else default_precision(meta, device)."""
    if precision is None:
        return default_precision(meta, device)
    if precision not in PRECISIONS:
        raise CedmError(f"--precision must be fp32, bf16 or fp16 (got {precision!r})")
    return precision


def legacy_config(out, config: dict, force: bool = False) -> dict:
    """The config to hand the stage layer for `out`, reading a result made before `precision` and
    `compile` were recorded as LEGACY (fp32, eager). Such a result is the same stage as a config
    that resolves to fp32 eager (the keys are left out, so the layer compares like with like and
    skips or refuses on the other keys); under any other precision it is refused with the reason
    and both ways out, never reused and never an unexplained config mismatch. --force redoes it."""
    old = pipeline.finished_manifest(out)
    if force or old is None:
        return config
    missing = [k for k in LEGACY if k in config and k not in (old.get("config") or {})]
    if not missing:
        return config
    if all(config[k] == LEGACY[k] for k in missing):
        return {k: v for k, v in config.items() if k not in missing}
    now = ", ".join(f"{k} {config[k]}" for k in missing if config[k] != LEGACY[k])
    raise CedmError(f"{out} was made before cedm recorded the sampling precision, so with fp32 and no "
                    f"compile (the default then), but this run asks for {now} (the default precision "
                    f"now follows the device, docs/performance.md); pass --precision fp32 to reuse it, "
                    f"or --force to redo it")


# ----------------------------------------------------------------------------------------------
# Checkpoints and generation (the API the evaluation stage uses)

def load_network(train_dir, device="cpu"):
    """(EDMPrecond in eval mode, network.json) from train/<tag>/ -- safetensors + JSON, no pickles."""
    train_dir = Path(train_dir)
    if not (train_dir / "network.json").exists():
        raise CedmError(f"no trained network in {train_dir} (run `cedm train` for it first)")
    meta = load_json(train_dir / "network.json")
    net = build(meta["network_kwargs"])
    try:
        net.load_state_dict(load_tensors(train_dir / "network.safetensors"), strict=True)
    except RuntimeError as e:
        raise CedmError(f"{train_dir}/network.safetensors does not match network.json: "
                        f"{str(e).splitlines()[0]}") from None
    return net.eval().requires_grad_(False).to(device), meta


def class_choice(meta: dict, y: int):
    """Model label indices of class y and their probabilities: a ground-truth-label model has one;
    a sub-class model (ClusDiff) has y's sub-classes, drawn by their within-class frequency."""
    if meta.get("kind") == "labels":
        if str(int(y)) not in meta["label_map"]:
            raise CedmError(f"class {y} does not exist in {meta['tag']}; classes are "
                            f"{', '.join(map(str, meta['raw_labels']))}")
        return np.array([meta["label_map"][str(int(y))]]), np.ones(1)
    from cedm.subclass import class_subclasses

    return class_subclasses(meta, int(y))


def label_choice(meta: dict, labels="prior"):
    """Check a --labels request against the checkpoint: 'prior' | 'uniform' | raw cluster id |
    'class:Y' (a labelled class: its sub-classes by within-class frequency)."""
    if labels in ("prior", "uniform"):
        return labels
    if isinstance(labels, str) and labels.startswith("class:"):
        try:
            y = int(labels[6:])
        except ValueError:
            raise CedmError(f"--class must be an integer class label (got {labels[6:]!r})") from None
        return ("class", *class_choice(meta, y))
    try:
        raw = int(labels)
    except (TypeError, ValueError):
        raise CedmError(f"--labels must be 'prior', 'uniform' or a cluster id (got {labels!r})") from None
    if str(raw) not in meta["label_map"]:
        ids = meta["raw_labels"]
        span = f"{ids[0]}..{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else ", ".join(map(str, ids[:20]))
        raise CedmError(f"--labels {raw}: the checkpoint {meta['tag']} was trained on {len(ids)} "
                        f"label(s) (label_dim {meta['label_dim']}, ids {span}); {raw} is not one of them")
    return meta["label_map"][str(raw)]


@torch.no_grad()
def generate(net, meta: dict, num: int, seed_base: int = 0, labels="prior", guidance: float = 0.0,
             steps: int | None = None, sigma_min: float = S.sigma_min, sigma_max: float = S.sigma_max,
             rho: float = S.rho, churn: float = S.churn, s_min: float = S.s_min, s_max: float = S.s_max,
             s_noise: float = S.s_noise, batch_size: int = 256, device=None, progress: bool = True,
             precision: str | None = S.precision, compile: bool = False) -> dict:
    """Generate `num` images with seeds seed_base..seed_base+num-1.

    precision: the network's autocast (fp32, bf16, fp16; the Heun steps stay float64), in the
    layout it is fastest in (cedm.networks.memory_format); None: default_precision, the model's
    training rule on `device`. compile: run the network through
    torch.compile (on CUDA with CUDA graphs, mode 'reduce-overhead'); an opt-in, compiling costs
    seconds to minutes up front.
    steps: N, None = the model resolution's default (sampler_steps).
    Returns images [N,H,W,3] uint8, labels [N] (model label index), clusters [N] (raw id), seeds [N].
    """
    steps = sampler_steps(meta, steps)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    precision = resolve_precision(meta, device, precision)
    fmt = memory_format(device, precision)
    if any(p.dim() == 4 and not p.is_contiguous(memory_format=fmt) for p in net.parameters()):
        import copy

        net = copy.deepcopy(net).to(memory_format=fmt)     # the caller's network stays as it was
    fwd = net
    if compile:
        fwd = torch.compile(net, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)
    choice = label_choice(meta, labels)
    L = int(meta["label_dim"])
    if guidance and not L:
        raise CedmError(f"--guidance needs a conditional model; {meta['tag']} is unconditional")
    if guidance and not meta.get("p_uncond"):
        print(f"cedm sample: warning: {meta['tag']} was trained without label dropout (p_uncond 0); "
              f"its null label is untrained and guidance will not behave", file=sys.stderr)
    q = torch.as_tensor(meta["q"], dtype=torch.float64)
    cdf = q.cumsum(0) / q.sum()
    res, ch = int(meta["network_kwargs"]["img_resolution"]), int(meta["network_kwargs"]["img_channels"])
    seeds = np.arange(seed_base, seed_base + num, dtype=np.int64)
    images = np.empty((num, res, res, ch), dtype=np.uint8)
    index = np.zeros(num, dtype=np.int64)
    from tqdm.auto import tqdm

    for lo in tqdm(range(0, num, batch_size), desc=f"sample {meta['tag']}", unit="batch",
                   disable=None if progress else True, file=sys.stderr):
        bseeds = seeds[lo:lo + batch_size]
        rnd = SeededRandom(bseeds, device)
        latents = rnd.randn([len(bseeds), ch, res, res])                    # initial noise first
        u = rnd.rand()                                                      # then the label draw
        if choice == "prior":
            idx = torch.searchsorted(cdf.to(device), u, right=True).clamp_max(len(q) - 1)
        elif choice == "uniform":
            idx = (u * len(q)).long().clamp_max(len(q) - 1)
        elif isinstance(choice, tuple):                                     # ("class", indices, weights)
            wc = torch.as_tensor(choice[2], dtype=torch.float64).cumsum(0)
            pick = torch.searchsorted((wc / wc[-1]).to(device), u, right=True).clamp_max(len(wc) - 1)
            idx = torch.as_tensor(choice[1], dtype=torch.long, device=device)[pick]
        else:
            idx = torch.full_like(u, choice, dtype=torch.long)
        class_labels = torch.nn.functional.one_hot(idx, L).to(torch.float32) if L else None

        def denoise(x, t, class_labels=class_labels):
            sigma = torch.full((x.shape[0],), t, dtype=torch.float32, device=device)
            if not guidance:
                with autocast(device, precision):
                    return fwd(x.to(torch.float32).contiguous(memory_format=fmt), sigma, class_labels)
            with autocast(device, precision):
                both = fwd(torch.cat([x, x]).to(torch.float32).contiguous(memory_format=fmt), sigma.repeat(2),
                           torch.cat([class_labels, torch.zeros_like(class_labels)]))
            d_c, d_u = both.chunk(2)
            return (1 + guidance) * d_c - guidance * d_u                    # classifier-free guidance

        x = edm_sampler(denoise, latents, steps, sigma_min, sigma_max, rho, churn, s_min, s_max, s_noise,
                        randn_like=rnd.randn_like)
        images[lo:lo + len(bseeds)] = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        index[lo:lo + len(bseeds)] = idx.cpu().numpy()
    raw = np.asarray(meta["raw_labels"], dtype=np.int64)
    return dict(images=images, labels=index, clusters=raw[index], seeds=seeds)


def save_grid(images: np.ndarray, labels: np.ndarray, path, max_cols: int = 16, max_rows: int = 64,
              pad: int = 1) -> None:
    """A PNG with one row per label (sorted; the first max_rows labels), up to max_cols images each
    (the first ones in seed order). Images smaller than 64 px are enlarged (nearest) for viewing."""
    from PIL import Image

    from cedm.io import write_bytes
    import io

    ids = np.unique(labels)[:max_rows]
    rows = [images[labels == c][:max_cols] for c in ids]
    h, w = images.shape[1:3]
    cols = max(len(r) for r in rows) if rows else 1
    canvas = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y0:y0 + h, x0:x0 + w] = img
    scale = max(1, 64 // h)   # small images: enlarge so the grid is viewable
    im = Image.fromarray(canvas)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------
# The stage

def sampler_steps(meta: dict, steps: int | None = None) -> int:
    """N: `steps` when given, else the default for the model's resolution (SamplerConfig.steps_for:
    18 up to 32 px, 40 for 64x64 as EDM)."""
    if steps is not None:
        return int(steps)
    return S.steps_for(int(meta["network_kwargs"]["img_resolution"]))


def run(run_dir, cond: str, num: int | None = None, labels="prior", guidance: float = 0.0,
        steps: int | None = None, sigma_min: float = S.sigma_min, sigma_max: float = S.sigma_max,
        rho: float = S.rho, churn: float = S.churn, s_min: float = S.s_min, s_max: float = S.s_max,
        s_noise: float = S.s_noise, batch_size: int | None = None,
        png: bool = False, seed_base: int = 0, device=None, force: bool = False, progress: bool = True,
        pushgateway=None, precision: str | None = S.precision, compile: bool = False,
        ablation: str | None = None) -> Path:
    """Sample `num` images of train/<cond> into sample/<cond>; ablation 'uniform' (the paper's
    Table 4) draws the labels uniformly instead of from q(c), into sample/<cond>@uniform.
    precision None: the model's default on `device` (default_precision); the resolved precision
    is the stage config, so a changed default is a changed config, never a silent reuse."""
    from cedm.config import run_preset
    from cedm.conditioning import check_ablation, conditioning, parse_tag

    check_ablation(ablation, "sample")
    if ablation == "uniform":
        if labels not in ("prior", "uniform"):
            raise CedmError(f"--ablation uniform draws the labels uniformly; drop --labels {labels}")
        labels = "uniform"

    cond = str(parse_tag(cond))          # one spelling per conditioning (labels-coarse -> labels:coarse)
    rd = RunDir(run_dir)
    device = pipeline.resolve_device(device)
    pre = run_preset(run_dir)
    num = int(pre.fid_samples * pre.fid_sets if num is None else num)
    if num < 1:
        raise CedmError(f"--num must be >= 1 (got {num})")
    batch_size = _batch_size(batch_size, device)
    tdir = rd.train(cond)
    if not (tdir / "manifest.json").exists():
        raise CedmError(f"{tdir} holds no finished training run; run `cedm train --run-dir {run_dir} "
                        f"--cond {cond}` first")
    net, meta = load_network(tdir, device)
    kind, method, C = parse_tag(cond)
    if meta.get("tag") != cond or (kind != "subclasses" and meta.get("C") != C):
        raise CedmError(f"{tdir}/network.json is a checkpoint for {meta.get('tag')!r} "
                        f"(C={meta.get('C')}, label_dim {meta['label_dim']}), not for {cond!r}")
    if kind == "clusters" and (rd.cluster(method, C) / "assignments.npy").exists():
        from cedm.io import load_array

        now = conditioning(run_dir, cond, len(load_array(rd.cluster(method, C) / "assignments.npy")))
        if now["raw_labels"] != meta["raw_labels"]:
            raise CedmError(f"cluster/{cond} now has {len(now['raw_labels'])} non-empty clusters but "
                            f"the checkpoint was trained on {len(meta['raw_labels'])} "
                            f"(label_dim {meta['label_dim']}); retrain with --force")
    label_choice(meta, labels)   # fail before any work
    steps = sampler_steps(meta, steps)   # the resolved N is what the config records
    precision = resolve_precision(meta, device, precision)   # and the resolved precision
    out = rd.sample(cond, ablation)
    config = dict(cond=cond, num=num, labels=str(labels), guidance=guidance, steps=steps, sigma_min=sigma_min,
                  sigma_max=sigma_max, rho=rho, churn=churn, s_min=s_min, s_max=str(s_max), s_noise=s_noise,
                  png=png, seed_base=seed_base, network_nimg=meta.get("nimg"), precision=precision,
                  compile=bool(compile))
    config = legacy_config(out, config, force)

    def compute(work, _):
        res = generate(net, meta, num, seed_base=seed_base, labels=labels, guidance=guidance, steps=steps,
                       sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, churn=churn, s_min=s_min,
                       s_max=s_max, s_noise=s_noise, batch_size=batch_size, device=device, progress=progress,
                       precision=precision, compile=compile)
        np.savez(work / "images.npz", **res)
        save_grid(res["images"], res["labels"], work / "grid.png")
        if png:
            from PIL import Image

            (work / "png").mkdir()
            for img, s in zip(res["images"], res["seeds"]):
                Image.fromarray(img).save(work / "png" / f"{s:06d}.png")
        counts = np.bincount(res["labels"], minlength=max(meta["label_dim"], 1))
        save_json(work / "summary.json", {"num": num, "label_counts": counts.tolist(),
                                          "raw_labels": meta["raw_labels"]})
        return pipeline.Output({"images": "images.npz", "grid": "grid.png", **({"png": "png/"} if png else {})})

    pipeline.execute(pipeline.Stage("sample", out, rd.root, config, [tdir]), compute, force=force,
                     pushgateway=pushgateway, quiet=True, labels={"cond": cond})
    return out


def _batch_size(batch_size, device) -> int:
    batch_size = int((512 if device.type == "cuda" else 128) if batch_size is None else batch_size)
    if batch_size < 1:
        raise CedmError(f"--batch-size must be >= 1 (got {batch_size})")
    return batch_size


def balance(run_dir, cond: str, target: int | None = None, seed_base: int = 0, batch_size: int | None = None,
            device=None, force: bool = False, progress: bool = True, pushgateway=None, **sampler) -> Path:
    """`cedm sample --balance` (ClusDiff): generate, per class, the images that bring every class of
    the training set to `target` images (default: the largest class).

    Writes <run>/balanced/<cond>/: an image folder <class:05d>/<seed>.png, metadata.csv
    (file_name,label; read by Hugging Face `imagefolder`, and the folders by torchvision
    ImageFolder) and counts.json (before, generated, after per class). Class y's image i uses seed
    seed_base + y * 10^7 + i, so a class's images do not depend on the other classes.
    """
    from PIL import Image

    from cedm.io import load_array, write_bytes
    from cedm.subclass import balance_counts

    rd = RunDir(run_dir)
    device = pipeline.resolve_device(device)
    lab_file = rd.data / "labels.npy"
    if not lab_file.exists():
        raise CedmError(f"--balance needs class labels, but {lab_file} does not exist (unlabeled dataset)")
    tdir = rd.train(cond)
    if not (tdir / "manifest.json").exists():
        raise CedmError(f"{tdir} holds no finished training run; run `cedm train --run-dir {run_dir} --cond {cond}` first")
    net, meta = load_network(tdir, device)
    if meta.get("kind") not in ("labels", "subclasses"):
        raise CedmError(f"--balance needs a class-aware model (--cond labels or <method>-K<K>), not {cond!r}")
    ys, n = np.unique(load_array(lab_file), return_counts=True)
    before = {int(y): int(c) for y, c in zip(ys, n)}
    need = balance_counts(before, target)
    sampler["steps"] = sampler_steps(meta, sampler.get("steps"))
    sampler["precision"] = resolve_precision(meta, device, sampler.get("precision"))
    out = rd.root / "balanced" / cond
    config = dict(cond=cond, target=target, seed_base=seed_base, network_nimg=meta.get("nimg"),
                  **{k: str(v) for k, v in sampler.items()})
    config = legacy_config(out, config, force)
    batch_size = _batch_size(batch_size, device)

    def compute(work, _):
        rows = ["file_name,label"]
        for y, k in need.items():
            (work / f"{y:05d}").mkdir()
            if k == 0:
                continue
            res = generate(net, meta, k, seed_base=seed_base + y * 10**7, labels=f"class:{y}",
                           batch_size=batch_size, device=device, progress=progress, **sampler)
            for img, sd in zip(res["images"], res["seeds"]):
                name = f"{y:05d}/{sd:010d}.png"
                Image.fromarray(img).save(work / name)
                rows.append(f"{name},{y}")
        write_bytes(work / "metadata.csv", ("\n".join(rows) + "\n").encode())
        save_json(work / "counts.json", {"before": before, "generated": need,
                                         "after": {y: before[y] + need[y] for y in before}})
        return pipeline.Output({"images": "<class>/<seed>.png", "metadata": "metadata.csv"})

    pipeline.execute(pipeline.Stage("balance", out, rd.root, config, [tdir, rd.data]), compute,
                     force=force, pushgateway=pushgateway, quiet=True, labels={"cond": cond})
    return out


def _main(args) -> int:
    if args.klass is not None:
        if args.labels != "prior":
            raise CedmError("--class and --labels exclude each other")
        args.labels = f"class:{args.klass}"
    if args.balance:
        with pipeline.reporting("sample", args.pushgateway, run_dir=args.run_dir, cond=args.cond):
            out = balance(args.run_dir, args.cond, args.balance_to,
                          seed_base=args.seed if args.seed_base is None else args.seed_base,
                          batch_size=args.batch_size, device=args.device, force=args.force,
                          guidance=args.guidance, steps=args.steps, churn=args.churn,
                          precision=args.precision)
            print(f"cedm sample: balanced image folder {out}", file=sys.stderr)
        return 0
    with pipeline.reporting("sample", args.pushgateway, run_dir=args.run_dir, cond=args.cond):
        out = RunDir(args.run_dir).sample(args.cond, args.ablation)
        run(args.run_dir, args.cond, num=args.num, labels=args.labels, guidance=args.guidance,
            steps=args.steps, sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho,
            churn=args.churn, s_min=args.s_min, s_max=args.s_max, s_noise=args.s_noise,
            batch_size=args.batch_size, png=args.png,
            seed_base=args.seed if args.seed_base is None else args.seed_base,
            device=args.device, force=args.force, precision=args.precision, compile=args.compile,
            ablation=args.ablation)
        print(f"cedm sample: {out}", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "sample", help="generate images with the EDM Heun sampler from a trained C-EDM",
        description="EDM Algorithm 2 (Heun, N steps, sigma_min..sigma_max with rho, optional churn) from "
                    "train/<cond>. Labels drawn from q(c) by default. Image i uses seed seed_base+i for its "
                    "noise, label and churn, so it does not depend on the batch size. Writes "
                    "sample/<cond>/images.npz (images, labels = model label index, clusters = raw cluster "
                    "id, seeds), grid.png (one row per cluster) and with --png a png/ folder.")
    pipeline.add_common(p)
    p.add_argument("--cond", required=True, metavar="TAG", help="conditioning tag of the trained model")
    p.add_argument("--num", type=int, default=None,
                   help="number of images (default: the preset's FID samples x sets)")
    p.add_argument("--labels", default="prior",
                   help="'prior' (draw from q(c)), 'uniform', or a raw cluster id (default: %(default)s)")
    p.add_argument("--ablation", choices=("uniform",), default=None,
                   help="uniform: the paper's Table 4, labels drawn uniformly instead of from q(c), into "
                        "sample/<cond>@uniform beside the q(c) samples (score it with `cedm evaluate "
                        "--ablation uniform`)")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="classifier-free guidance weight w: D = (1+w) D(x|c) - w D(x) (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampler steps N; 2N-1 network calls (default: by the model's resolution, as EDM: "
                        f"{S.steps} up to 32 px, {S.steps_64} above)")
    p.add_argument("--sigma-min", type=float, default=S.sigma_min, help="lowest noise level (default: %(default)s)")
    p.add_argument("--sigma-max", type=float, default=S.sigma_max, help="highest noise level (default: %(default)s)")
    p.add_argument("--rho", type=float, default=S.rho, help="time step exponent (default: %(default)s)")
    p.add_argument("--churn", type=float, default=S.churn, help="S_churn, stochasticity; 0 = deterministic (default: %(default)s)")
    p.add_argument("--s-min", type=float, default=S.s_min, help="S_min: churn only for t >= this (default: %(default)s)")
    p.add_argument("--s-max", type=float, default=S.s_max, help="S_max: churn only for t <= this (default: %(default)s)")
    p.add_argument("--s-noise", type=float, default=S.s_noise, help="S_noise, churn noise scale (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per network batch; does not change the images (default: 128 on CPU, 512 on GPU)")
    p.add_argument("--png", action="store_true", help="also write every image to png/<seed>.png")
    p.add_argument("--precision", choices=PRECISIONS, default=S.precision,
                   help="the network's autocast while sampling; the Heun steps stay float64 (default: "
                        "the model's training rule on this device: fp16 on CUDA as EDM, bf16 on a CPU "
                        "with native bf16 (AVX512-BF16/AMX; about 2x fp32 on the CIFAR network), else "
                        "fp32; the tiny preset of `cedm run` fp32 everywhere, where bf16 is slower; "
                        "the choice is recorded in the stage config; docs/performance.md)")
    p.add_argument("--compile", action="store_true",
                   help="run the network through torch.compile (CUDA graphs on a GPU); compiling "
                        "takes a while up front, so it pays for large --num")
    p.add_argument("--class", dest="klass", type=int, default=None, metavar="Y",
                   help="generate labelled class Y: its sub-classes drawn by within-class frequency "
                        "(sub-class models <method>-K<K>, ClusDiff) or label Y (--cond labels)")
    p.add_argument("--balance", action="store_true",
                   help="write <run>/balanced/<cond>/: per class, the images that bring every class to the "
                        "size of the largest (or --balance-to), as an image folder with metadata.csv")
    p.add_argument("--balance-to", type=int, default=None, metavar="N",
                   help="with --balance: the size every class is brought to (default: the largest class)")
    p.add_argument("--seed-base", type=int, default=None,
                   help="seed of the first image; image i uses seed_base+i (default: --seed)")
    p.set_defaults(func=_main)
