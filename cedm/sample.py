"""`cedm sample`: the EDM Heun sampler (EDM Algorithm 2; docs/method.md#sampler) for C-EDM.

Labels are drawn from q(c) by default ('prior'), uniformly ('uniform') or fixed to one raw
cluster id. Guidance (docs/method.md#guidance): D_w = (1+w) D(x|c) - w D_ref, with D_ref the
null label's D(x|null) (classifier-free guidance, cond and null in one forward of 2B) or a worse
version of the model itself, D_guide(x|c) (autoguidance, Karras et al. 2024: an earlier EMA
snapshot, or another model of the same label set); optionally only for sigma in (lo, hi]
(guidance interval, Kynkaanniemi et al. 2024), the conditional model alone elsewhere.
Confidence filtering (docs/method.md#filtering): K x the images, the most confident per cluster
by the model's own TEMI head kept, up to each cluster's count in the plain draw.
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
# Guidance (docs/method.md#guidance)

def parse_interval(value, sigma_max: float = S.sigma_max) -> tuple[float, float] | None:
    """--guidance-interval 'LO,HI' (or a pair) -> (lo, hi), guidance for sigma in (lo, hi];
    None/'' -> None (every sigma). Must lie in (0, sigma_max]: 0 <= lo < hi <= sigma_max."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        lo, hi = (float(v) for v in (value.split(",") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise CedmError(f"--guidance-interval must be LO,HI, two noise levels (got {value!r}); e.g. "
                        f"0.28,5.42") from None
    if not (0 <= lo < hi <= sigma_max) or math.isnan(lo) or math.isnan(hi):
        raise CedmError(f"--guidance-interval {lo:g},{hi:g} is not inside (0, sigma_max = {sigma_max:g}]: "
                        f"need 0 <= LO < HI <= {sigma_max:g}")
    return lo, hi


def guided_denoiser(net, labels, guidance: float = 0.0, interval: tuple[float, float] | None = None,
                    guide=None):
    """denoise(x, t) for edm_sampler from a network call net(x, sigma [B], labels) -> D:

        t outside (lo, hi], or w = 0:  D(x; t | c)
        classifier-free (guide None):  (1 + w) D(x; t | c) - w D(x; t | null), null = the zero label,
                                       one call of 2B (x and labels stacked with the null ones)
        autoguidance (guide a call):   (1 + w) D(x; t | c) - w D_guide(x; t | c)

    w is cedm's weight (0: unguided); Karras et al.'s and EDM2's autoguidance weight is 1 + w
    (EDM2: D_guide.lerp(D, 1 + w)). docs/method.md#guidance."""
    def denoise(x, t):
        sigma = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        if not guidance or (interval is not None and not interval[0] < t <= interval[1]):
            return net(x, sigma, labels)
        if guide is None:
            d, d_ref = net(torch.cat([x, x]), sigma.repeat(2),
                           torch.cat([labels, torch.zeros_like(labels)])).chunk(2)
        else:
            d, d_ref = net(x, sigma, labels), guide(x, sigma, labels)
        return (1 + guidance) * d - guidance * d_ref
    return denoise


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


def _images_of(meta: dict) -> str:
    k = meta["network_kwargs"]
    return f"{k['img_resolution']}x{k['img_resolution']} images with {k['img_channels']} channels"


def check_guide(meta: dict, gmeta: dict, name: str) -> None:
    """An autoguidance guide must make the same images from the same labels as the model: the
    same resolution and channels, the same conditioning tag, label ids and q(c)."""
    if _images_of(gmeta) != _images_of(meta):
        raise CedmError(f"--guide {name} makes {_images_of(gmeta)}, but {meta['tag']} makes "
                        f"{_images_of(meta)}; the guide must be a model of the same images")
    same = (gmeta.get("tag") == meta.get("tag") and gmeta.get("label_dim") == meta.get("label_dim")
            and gmeta.get("raw_labels") == meta.get("raw_labels")
            and np.allclose(gmeta.get("q", []), meta.get("q", []), rtol=0, atol=1e-9))
    if not same:
        raise CedmError(f"--guide {name} was trained on another label set ({gmeta.get('tag')!r}, "
                        f"label_dim {gmeta.get('label_dim')}) than {meta['tag']!r} (label_dim "
                        f"{meta['label_dim']}); autoguidance needs a guide conditioned on the same "
                        f"labels (same tag, label ids and q(c))")


def _snapshot_list(tdir: Path) -> str:
    from cedm.checkpoint import snapshots

    got = snapshots(tdir)
    return ", ".join(f"{n / 1e6:g}" for n, _ in got) + " Mimg" if got else "none"


def load_guide(spec: str, tdir, meta: dict, device="cpu"):
    """The autoguidance guide of `--guide SPEC` for the model of train dir `tdir` (docs/method.md#guidance):

    - 'snapshot:M': the EMA snapshot of the same training nearest M Mimg (train/<tag>/snapshots/,
      `cedm train --snapshot-every-mimg`), within 1% of M or one training batch;
    - a snapshot file <train dir>/snapshots/ema-<nimg>.safetensors (of this or another training);
    - a trained model directory (holding network.json, e.g. another run's train/<tag>/).

    Returns (network in eval mode, info) with info = {"guide": 'snapshot' for this training's
    snapshots, else the resolved path; "nimg": the guide's training images; "files": the files
    it was read from}. One-line CedmError for a missing, mismatched or self-identical guide."""
    from cedm.checkpoint import snapshots

    tdir = Path(tdir)
    spec = str(spec).strip()
    if spec.startswith("snapshot:"):
        try:
            mimg = float(spec[len("snapshot:"):])
        except ValueError:
            raise CedmError(f"--guide {spec}: write snapshot:M with M in Mimg (e.g. snapshot:0.05)") from None
        snaps = snapshots(tdir)
        if not snaps:
            raise CedmError(f"--guide {spec}: {tdir} kept no snapshots; train it with --snapshot-every-mimg M "
                            f"(and --force), or pass another model's directory")
        nimg, path = min(snaps, key=lambda q: abs(q[0] - mimg * 1e6))
        if abs(nimg - mimg * 1e6) > max(0.01 * mimg * 1e6, float(meta.get("batch_size") or 0)):
            raise CedmError(f"--guide {spec}: {tdir} has no snapshot at {mimg:g} Mimg (it has "
                            f"{_snapshot_list(tdir)})")
        gdir, gpath = tdir, path
    else:
        p = Path(spec)
        if p.is_dir():
            gdir, gpath, nimg = p, p / "network.safetensors", None
        elif p.is_file() and p.suffix == ".safetensors" and p.parent.name == "snapshots":
            gdir, gpath = p.parent.parent, p
            nimg = next((n for n, q in snapshots(gdir) if q.name == p.name), None)
        else:
            raise CedmError(f"--guide {spec}: not a trained model directory, a snapshot file "
                            f"(<train dir>/snapshots/ema-*.safetensors) or snapshot:M")
        if not (gdir / "network.json").exists() or not gpath.is_file():
            raise CedmError(f"--guide {spec}: no trained network there ({gdir / 'network.json'} or {gpath} "
                            f"is missing)")
    gmeta = load_json(gdir / "network.json")
    check_guide(meta, gmeta, spec)
    nimg = int(gmeta.get("nimg", 0) if nimg is None else nimg)
    own = gdir.resolve() == tdir.resolve()
    if own and (gpath.name == "network.safetensors" or nimg >= int(meta.get("nimg", -1))):
        raise CedmError(f"--guide {spec} is {meta['tag']} itself (its final EMA weights), which guides "
                        f"nothing; pick an earlier snapshot ({_snapshot_list(tdir)})")
    net = build(gmeta["network_kwargs"])
    try:
        net.load_state_dict(load_tensors(gpath), strict=True)
    except RuntimeError as e:
        raise CedmError(f"--guide {spec}: {gpath} does not match {gdir / 'network.json'}: "
                        f"{str(e).splitlines()[0]}") from None
    info = {"guide": "snapshot" if own else str(gpath.resolve() if gpath.name != "network.safetensors"
                                                 else gdir.resolve()),
            "nimg": nimg, "files": [gpath] + ([] if own else [gdir / "network.json"])}
    return net.eval().requires_grad_(False).to(device), info


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
             precision: str | None = S.precision, compile: bool = False,
             guidance_interval: tuple[float, float] | None = None, guide=None) -> dict:
    """Generate `num` images with seeds seed_base..seed_base+num-1.

    guidance: w of guided_denoiser (0: none), against the null label (classifier-free; needs a
    model trained with label dropout) or against `guide`, a network from load_guide
    (autoguidance); guidance_interval: (lo, hi], guidance only for those sigma (parse_interval).

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
    choice = label_choice(meta, labels)
    L = int(meta["label_dim"])
    if guidance_interval is not None:
        guidance_interval = parse_interval(guidance_interval, sigma_max)
    if not guidance and (guide is not None or guidance_interval is not None):
        raise CedmError(f"--{'guide' if guide is not None else 'guidance-interval'} does nothing without "
                        f"--guidance W > 0")
    if guidance and guide is None and not L:
        raise CedmError(f"classifier-free --guidance needs a conditional model; {meta['tag']} is unconditional "
                        f"(autoguidance, --guide, works without labels)")
    if guidance and guide is None and not meta.get("p_uncond"):
        raise CedmError(f"{meta['tag']} was trained without label dropout (p_uncond 0), so its null label is "
                        f"untrained and classifier-free guidance cannot work; retrain with `cedm train --cond "
                        f"{meta['tag']} --p-uncond 0.1 --force`, or guide it with an earlier snapshot "
                        f"(--guide snapshot:M, autoguidance)")

    def prepare(m):
        if any(p.dim() == 4 and not p.is_contiguous(memory_format=fmt) for p in m.parameters()):
            import copy

            m = copy.deepcopy(m).to(memory_format=fmt)       # the caller's network stays as it was
        if compile:
            m = torch.compile(m, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)

        def call(x, sigma, class_labels):                    # float64 sampler state -> the network
            with autocast(device, precision):
                return m(x.to(torch.float32).contiguous(memory_format=fmt), sigma.to(torch.float32),
                         class_labels)
        return call

    fwd = prepare(net)
    gfwd = prepare(guide) if guide is not None else None
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
        denoise = guided_denoiser(fwd, class_labels, guidance, guidance_interval, gfwd)
        x = edm_sampler(denoise, latents, steps, sigma_min, sigma_max, rho, churn, s_min, s_max, s_noise,
                        randn_like=rnd.randn_like)
        images[lo:lo + len(bseeds)] = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        index[lo:lo + len(bseeds)] = idx.cpu().numpy()
    raw = np.asarray(meta["raw_labels"], dtype=np.int64)
    return dict(images=images, labels=index, clusters=raw[index], seeds=seeds)


# ----------------------------------------------------------------------------------------------
# Confidence filtering (docs/method.md#filtering)

FILTERS = {"msp": "the TEMI head's maximum softmax probability (the paper's confidence)",
           "cluster": "the TEMI head's probability of the cluster the image was generated for"}
EXTRA_SEEDS = 10**9          # the extra candidates of --oversample draw their seeds from here on


def extra_seeds(seed_base: int, num: int, oversample: int) -> tuple[int, int]:
    """(first seed, count) of the (K - 1) num extra candidates of request (seed_base, num) with
    K = oversample: EXTRA_SEEDS + seed_base (K - 1) onwards, so requests of consecutive seed ranges
    (e.g. evaluation sets j num .. (j + 1) num - 1) draw disjoint extras."""
    return EXTRA_SEEDS + int(seed_base) * (oversample - 1), (oversample - 1) * int(num)


def confidence_scorer(run_dir, meta: dict, device=None):
    """images uint8 [N,H,W,3] -> probabilities [N, C] over the raw cluster ids: the model's own
    TEMI head (cluster/<tag>/head.safetensors) on the run's clustering backbone's features.
    A one-line CedmError for a model without such a head."""
    from cedm import features, heads
    from cedm.kmeans import CentroidHead

    tag = meta["tag"]
    if meta.get("kind") != "clusters":
        what = {"uncond": "unconditional", "labels": "conditioned on labels",
                "subclasses": "conditioned on sub-classes"}.get(str(meta.get("kind")), f"a {meta.get('kind')} model")
        raise CedmError(f"--filter scores images with the model's own TEMI head, but {tag} is {what}: it has "
                        f"no cluster head (TEMI clusterings, temi-C<C>, have one)")
    rd = RunDir(run_dir)
    head_file = rd.cluster(meta["method"], meta["C"]) / "head.safetensors"
    if not head_file.exists():
        raise CedmError(f"--filter needs {head_file}, which does not exist (an imported clustering, `cedm "
                        f"cluster --import`, brings only the cluster ids): {tag} has no head to score with")
    head = heads.load_head(head_file)
    if isinstance(head, CentroidHead):
        raise CedmError(f"--filter: {tag} is a k-means clustering, whose head gives every image its nearest "
                        f"centroid with probability 1: there is no confidence to filter by")
    if head.clusters != int(meta["C"]):
        raise CedmError(f"{head_file} has {head.clusters} clusters but {tag} was trained on C = {meta['C']}; "
                        f"redo `cedm cluster` and `cedm train`")
    backbone = features.load_backbone(run_dir, device=device)

    @torch.no_grad()
    def score(images: np.ndarray) -> np.ndarray:
        return head(torch.from_numpy(backbone(images)).float()).numpy().astype(np.float64)
    return score


def keep_confident(labels: np.ndarray, scores: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the quota[c] highest-scoring candidates of each label c, ties to the
    lower index: the kept set has exactly `quota` images per label."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    have = np.bincount(labels, minlength=len(quota))
    if any(have[c] < k for c, k in enumerate(quota)):
        raise CedmError("keep_confident: fewer candidates than the quota of a label")
    order = np.lexsort((np.arange(len(scores)), -scores))            # best first, then by index
    keep = [order[labels[order] == c][:int(k)] for c, k in enumerate(quota) if k]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def check_oversample(oversample, filter: str | None) -> int:
    """--oversample K with --filter (the sample stage, the guidance sweep, generate_filtered): K a
    whole number >= 1, a filter named in FILTERS, and K > 1 only with a filter (what to keep)."""
    if int(oversample) != oversample or oversample < 1:
        raise CedmError(f"--oversample K must be a whole number >= 1 (got {oversample})")
    if filter is not None and filter not in FILTERS:
        raise CedmError(f"--filter must be one of {', '.join(FILTERS)} (got {filter!r})")
    if filter is None and oversample != 1:
        raise CedmError(f"--oversample {oversample} needs --filter ({', '.join(FILTERS)}): what to keep")
    return int(oversample)


def generate_filtered(net, meta: dict, num: int, scorer, oversample: int, filter: str = "msp",
                      seed_base: int = 0, **sampler) -> dict:
    """`num` images of the confidence-filtered sampler (docs/method.md#filtering): the plain draw
    (seeds seed_base..seed_base+num-1) and (K - 1) num extra candidates (extra_seeds), all scored
    by `scorer` (confidence_scorer) as `filter` says; of each label, the most confident are kept,
    as many as the plain draw has of it, so the kept set has the label counts of the plain draw
    from q(c) exactly (K = 1 keeps the plain draw). generate's dict, in seed order, plus
    scores [num] (the kept images' scores) and plain_scores [num] (the plain draw's)."""
    oversample = check_oversample(oversample, filter)
    if filter not in FILTERS:
        raise CedmError(f"--filter must be one of {', '.join(FILTERS)} (got {filter!r})")
    parts = [generate(net, meta, num, seed_base=seed_base, **sampler)]
    if oversample > 1:
        first, count = extra_seeds(seed_base, num, oversample)
        parts.append(generate(net, meta, count, seed_base=first, **sampler))
    cand = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    probs = scorer(cand["images"])
    scores = probs.max(1) if filter == "msp" else probs[np.arange(len(probs)), cand["clusters"]]
    quota = np.bincount(parts[0]["labels"], minlength=max(int(meta["label_dim"]), 1))
    keep = keep_confident(cand["labels"], scores, quota)
    return {**{k: v[keep] for k, v in cand.items()}, "scores": scores[keep], "plain_scores": scores[:num]}


def save_grid(images: np.ndarray, labels: np.ndarray, path, max_cols: int = 16, max_rows: int = 64) -> None:
    """A PNG with one row per label (sorted; the first max_rows labels), up to max_cols images each
    (the first ones in seed order), through the one grid writer (cedm.images)."""
    from cedm.images import grid, rows_by_label, save_png

    save_png(path, grid(rows_by_label(images, labels, max_cols, max_rows)[1]))


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
        ablation: str | None = None, guidance_interval=None, guide: str | None = None,
        oversample: int = 1, filter: str | None = None) -> Path:
    """Sample `num` images of train/<cond> into sample/<cond>; ablation 'uniform' (the paper's
    Table 4) draws the labels uniformly instead of from q(c), into sample/<cond>@uniform; guided or
    filtered sets go beside the plain one too, into sample/<cond>@<sampler_variant>.
    precision None: the model's default on `device` (default_precision); the resolved precision
    is the stage config, so a changed default is a changed config, never a silent reuse.
    guidance_interval ('LO,HI'), guide (load_guide's SPEC): docs/method.md#guidance; oversample K
    with filter: generate_filtered (docs/method.md#filtering). Each is recorded in the config when set."""
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
    interval = parse_interval(guidance_interval, sigma_max)
    gnet, ginfo = load_guide(guide, tdir, meta, device) if guide else (None, None)
    check_oversample(oversample, filter)
    scorer = confidence_scorer(run_dir, meta, device) if filter is not None else None
    out = rd.sample(cond, "-".join(v for v in (ablation, sampler_variant(guidance, interval, ginfo, oversample,
                                                                        filter)) if v) or None)
    config = dict(cond=cond, num=num, labels=str(labels), guidance=guidance, steps=steps, sigma_min=sigma_min,
                  sigma_max=sigma_max, rho=rho, churn=churn, s_min=s_min, s_max=str(s_max), s_noise=s_noise,
                  png=png, seed_base=seed_base, network_nimg=meta.get("nimg"), precision=precision,
                  compile=bool(compile))
    inputs = [tdir]
    if interval is not None:                 # recorded only when asked for (older results stay valid)
        config["guidance_interval"] = list(interval)
    if ginfo is not None:
        config.update(guide=ginfo["guide"], guide_nimg=ginfo["nimg"])
        inputs += ginfo["files"]
    if filter is not None:
        config.update(oversample=int(oversample), filter=filter)
        inputs += [rd.features, rd.cluster(meta["method"], meta["C"])]
    config = legacy_config(out, config, force)

    def compute(work, _):
        kw = dict(labels=labels, guidance=guidance, steps=steps, sigma_min=sigma_min, sigma_max=sigma_max,
                  rho=rho, churn=churn, s_min=s_min, s_max=s_max, s_noise=s_noise, batch_size=batch_size,
                  device=device, progress=progress, precision=precision, compile=compile,
                  guidance_interval=interval, guide=gnet)
        if filter is None:
            res = generate(net, meta, num, seed_base=seed_base, **kw)
        else:
            res = generate_filtered(net, meta, num, scorer, oversample, filter, seed_base=seed_base, **kw)
            kept = {"oversample": int(oversample), "filter": filter, "score_kept_mean": float(res["scores"].mean()),
                    "score_plain_mean": float(res.pop("plain_scores").mean())}
        np.savez(work / "images.npz", **res)
        save_grid(res["images"], res["labels"], work / "grid.png")
        if png:
            from PIL import Image

            (work / "png").mkdir()
            for img, s in zip(res["images"], res["seeds"]):
                Image.fromarray(img).save(work / "png" / f"{s:06d}.png")
        counts = np.bincount(res["labels"], minlength=max(meta["label_dim"], 1))
        save_json(work / "summary.json", {"num": num, "label_counts": counts.tolist(),
                                          "raw_labels": meta["raw_labels"], **({"filter": kept} if filter else {})})
        return pipeline.Output({"images": "images.npz", "grid": "grid.png", **({"png": "png/"} if png else {})})

    pipeline.execute(pipeline.Stage("sample", out, rd.root, config, inputs), compute, force=force,
                     pushgateway=pushgateway, quiet=True, labels={"cond": cond})
    return out


def sampler_variant(guidance: float, interval, ginfo: dict | None, oversample: int, filter: str | None) -> str | None:
    """The folder suffix of a guided or filtered sample set, kept beside the model's plain one
    (sample/<cond>@<variant>, as an ablation is): 'cfg0.3', 'cfg0.3-i0.28_5.42', 'auto0.3-snap0.05'
    (autoguidance by the snapshot at 0.05 Mimg, to 3 digits; 'model' for another model), 'mspx4'; None for the
    plain sampler. So sample/<cond> is always the set `cedm evaluate` and the report score as the
    model's, and trying guidance needs no --force (docs/method.md#guidance)."""
    parts = []
    if guidance:
        parts.append(("auto" if ginfo else "cfg") + f"{guidance:g}")
        if interval is not None:
            parts.append(f"i{interval[0]:g}_{interval[1]:g}")
        if ginfo:
            parts.append(("snap" if ginfo["guide"] == "snapshot" else "model") + f"{ginfo['nimg'] / 1e6:.3g}")
    if filter is not None:
        parts.append(f"{filter}x{int(oversample)}")
    return "-".join(parts) or None


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
        extra = [f for f, v in (("--guidance-interval", args.guidance_interval), ("--guide", args.guide),
                                ("--oversample", args.oversample != 1), ("--filter", args.filter)) if v]
        if extra:
            raise CedmError(f"--balance samples with --guidance (classifier-free) only; drop {', '.join(extra)}")
        with pipeline.reporting("sample", args.pushgateway, run_dir=args.run_dir, cond=args.cond):
            out = balance(args.run_dir, args.cond, args.balance_to,
                          seed_base=args.seed if args.seed_base is None else args.seed_base,
                          batch_size=args.batch_size, device=args.device, force=args.force,
                          guidance=args.guidance, steps=args.steps, churn=args.churn,
                          precision=args.precision)
            print(f"cedm sample: balanced image folder {out}", file=sys.stderr)
        return 0
    with pipeline.reporting("sample", args.pushgateway, run_dir=args.run_dir, cond=args.cond):
        out = run(args.run_dir, args.cond, num=args.num, labels=args.labels, guidance=args.guidance,
            steps=args.steps, sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho,
            churn=args.churn, s_min=args.s_min, s_max=args.s_max, s_noise=args.s_noise,
            batch_size=args.batch_size, png=args.png,
            seed_base=args.seed if args.seed_base is None else args.seed_base,
            device=args.device, force=args.force, precision=args.precision, compile=args.compile,
            ablation=args.ablation, guidance_interval=args.guidance_interval, guide=args.guide,
            oversample=args.oversample, filter=args.filter)
        print(f"cedm sample: {out}", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "sample", help="generate images with the EDM Heun sampler from a trained C-EDM",
        description="EDM Algorithm 2 (Heun, N steps, sigma_min..sigma_max with rho, optional churn) from "
                    "train/<cond>. Labels drawn from q(c) by default. Image i uses seed seed_base+i for its "
                    "noise, label and churn, so it does not depend on the batch size. Writes "
                    "sample/<cond>/images.npz (images, labels = model label index, clusters = raw cluster "
                    "id, seeds), grid.png (one row per cluster) and with --png a png/ folder. A guided or "
                    "filtered set goes beside it, into sample/<cond>@<setting> (e.g. @cfg0.3, "
                    "@cfg0.3-i0.28_5.42, @auto0.3-snap0.05, @mspx4): sample/<cond> stays the model's plain "
                    "set, the one `cedm evaluate` and the report score (`cedm guidance` scores settings).")
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
    p.add_argument("--guidance", type=float, default=0.0, metavar="W",
                   help="guidance weight w: D = (1+w) D(x|c) - w D_ref, 0 = unguided; D_ref is D(x|null) "
                        "(classifier-free, needs a model trained with --p-uncond > 0) or, with --guide, the "
                        "guide's D(x|c) (autoguidance; Karras et al.'s and EDM2's weight is 1 + W) "
                        "(default: %(default)s; docs/method.md#guidance)")
    p.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                   help="guide only for noise levels sigma in (LO, HI], the conditional model alone elsewhere "
                        "(Kynkaanniemi et al. 2024; EDM2-S used 0.28,5.42); 0 <= LO < HI <= --sigma-max "
                        "(default: every sigma)")
    p.add_argument("--guide", default=None, metavar="SNAPSHOT|MODEL",
                   help="autoguidance: guide with a worse version of the model instead of the null label: "
                        "snapshot:M (its EMA snapshot nearest M Mimg, from `cedm train --snapshot-every-mimg`), "
                        "a snapshot file, or another trained model directory (train/<cond>/ of a run) with "
                        "the same labels, resolution and channels (default: none)")
    p.add_argument("--oversample", type=int, default=1, metavar="K",
                   help="with --filter: draw K x --num images and keep the most confident of each cluster, "
                        "as many as the plain draw has of it, so the kept set follows q(c) exactly (default: 1)")
    p.add_argument("--filter", choices=tuple(FILTERS), default=None,
                   help="score for --oversample, by the model's own TEMI head on the run's backbone features: "
                        "msp, " + FILTERS["msp"] + "; cluster, " + FILTERS["cluster"] + " (default: none; "
                        "docs/method.md#filtering)")
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
