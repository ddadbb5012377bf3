"""Typed configs, one per paper object, with the papers' defaults written once (and cited), and
per-dataset presets composing them. Command-line flags take their defaults from here.

- TEMIConfig: TEMI clustering (TEMI; the paper's Table 8; docs/method.md#temi-training)
- SamplerConfig: the EDM sampler (EDM Algorithm 2 and Table 1; docs/method.md#sampler)
- TrainConfig: EDM training (EDM; the paper's Table 7; docs/method.md#edm-training); the
  network presets in cedm.networks compose one each
- Preset: what differs per dataset (resolution, backbone, the C's, budgets, a TEMIConfig)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from cedm.io import CedmError


@dataclass(frozen=True)
class TEMIConfig:
    """TEMI heads and their training (docs/method.md#temi)."""
    heads: int = 50                   # H heads trained at once
    epochs: int = 200
    batch_size: int = 512             # pairs per step
    gamma: float = 0.6                # exponent gamma < 1 against collapse (TEMI Eq. 7)
    lr: float = 1e-4                  # AdamW
    weight_decay: float = 1e-4        # on weights, not biases
    teacher_momentum: float = 0.996   # teacher = EMA of the student
    prior_momentum: float = 0.9       # EMA of the cluster prior q~ (docs/method.md#temi-prior)
    temperature: float = 0.1          # softmax temperature of student and teacher
    hidden: int = 512                 # head MLP 768 -> 512 -> GELU -> 256 -> L2 -> C
    bottleneck: int = 256
    # As the official TEMI code reads Table 8 (docs/method.md#temi-training); the flags below
    # give back the fixed-lr, fixed-gain training: lr_schedule constant, norm_last_layer True,
    # freeze_last_layer 0.
    norm_last_layer: bool = False     # Table 8 "false": the gain g of the weight-normed layer trains
    lr_schedule: str = "cosine"       # cosine: lr x batch/256, linear warm-up, cosine to min_lr
    warmup_epochs: int = 10           # linear warm-up (capped at epochs/20: 10 of the paper's 200)
    min_lr: float = 1e-6              # end of the cosine decay
    freeze_last_layer: int = 1        # epochs the last layer (v, g) stays fixed

    def override(self, **flags) -> "TEMIConfig":
        """This config with every flag that is not None replaced (0 stays 0, and is then refused)."""
        return replace(self, **{k: v for k, v in flags.items() if v is not None})


@dataclass(frozen=True)
class SamplerConfig:
    """EDM Algorithm 2 (deterministic with churn 0; docs/method.md#sampler)."""
    steps: int = 18                   # N up to 32 px; 2N - 1 network evaluations (35)
    steps_64: int = 40                # N above 32 px: EDM's 64x64 setting (79 evaluations)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    churn: float = 0.0                # S_churn
    s_min: float = 0.0                # S_min
    s_max: float = math.inf           # S_max
    s_noise: float = 1.0              # S_noise
    # The network's autocast while sampling (the Heun steps stay float64). None: the model's
    # training precision rule on the sampling device, TrainConfig.precision_for of its network
    # preset (fp16 on CUDA as EDM; bf16 on a CPU with native bf16, else fp32; the tiny preset
    # fp32 everywhere); docs/performance.md, "Per-device defaults"
    precision: str | None = None

    def steps_for(self, resolution: int) -> int:
        """The default N for a model of `resolution` px: EDM samples 32x32 with 18 steps, 64x64 with 40."""
        return self.steps if int(resolution) <= 32 else self.steps_64


@dataclass(frozen=True)
class TrainConfig:
    """EDM training of one C-EDM model (docs/method.md#edm-training); defaults: CIFAR, Table 7."""
    batch: int = 1024                 # global batch
    lr: float = 1e-3                  # Adam (0.9, 0.999)
    lr_ramp_mimg: float = 10.0        # linear lr warm-up, Mimg
    ema_halflife_mimg: float = 0.5    # EMA half-life, ramped as min(half-life, 0.05 nimg)
    augment_p: float = 0.12           # EDM geometric augmentation probability
    precision: str = "fp16"           # autocast on CUDA (EDM's mixed precision, with a loss scaler)
    precision_cpu: str = "bf16"       # on a CPU: bf16 where the CPU has it natively, else fp32
    p_uncond: float = 0.0             # label dropout for classifier-free guidance

    def precision_for(self, device) -> str:
        """The default precision on `device`: fp16 is a GPU setting; a CPU without native bf16
        (AVX512-BF16/AMX) emulates it, several times slower than fp32 (benchmarks/bench_edm.py)."""
        if getattr(device, "type", str(device)) == "cuda":
            return self.precision
        if self.precision_cpu == "bf16":
            import torch

            try:
                native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
            except (AttributeError, RuntimeError):
                native = False
            return "bf16" if native else "fp32"
        return self.precision_cpu


TEMI = TEMIConfig()
SAMPLER = SamplerConfig()
TRAIN = TrainConfig()


@dataclass(frozen=True)
class Preset:
    name: str
    resolution: int                  # generator resolution (pixels)
    num_classes: int | None          # known class count (for C_start and ANMI), None if unlabeled
    backbone: str                    # features backbone (timm name or 'pixels')
    c_start: int                     # first C of the C_max search
    clusters: tuple[int, ...]        # the C's of a clustering sweep
    candidates: tuple[int, ...]      # the C's trained with C-EDM (those <= C_max are used)
    network: str                     # generator preset in cedm.networks: tiny | cifar | ffhq64 | afhq64
    mimg: float                      # training budget per model, millions of images
    batch: int                       # global training batch
    temi: TEMIConfig = TEMI
    knn_k: int = 50                  # m nearest neighbours of the TEMI pairs
    fid_samples: int = 50_000        # images per sample set for FID/FDD
    fid_sets: int = 3                # sample sets averaged
    augment_p: float | None = None   # EDM augmentation probability (None: the network preset's)
    bound_tol: int = 1               # C_max search: stop when the bracket is this narrow (1: exact)
    bound_max_clusters: int | None = None   # largest C the C_max search probes (None: N/2)
    clip_labels: bool = False        # a sweep also trains on CLIP pseudo-labels (labels:clip, Table 2)
    # The generative metric that ranks the models (cedm evaluate --metric): FID as the paper; the
    # classifier judge (cedm.judge) where no Inception/DINOv2 weights are meant to be used (digits)
    metric: str = "fid"

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    # CIFAR-10 (the paper's Table 1: C-EDM + TEMI best at C=100); C_max search from the class count.
    "cifar10": Preset("cifar10", 32, 10, "vit_base_patch16_224.dino", 10,
                      (10, 20, 50, 100, 200, 400, 500, 600, 800), (10, 20, 50, 100, 200, 400),
                      "cifar", 100.0, 1024),
    # CIFAR-100: Table 2 trains its 100 labels, 20 coarse labels and CLIP pseudo-labels beside C-EDM.
    "cifar100": Preset("cifar100", 32, 100, "vit_base_patch16_224.dino", 100,
                       (100, 200, 400, 600, 800, 1000), (100, 200, 400, 600),
                       "cifar", 100.0, 1024, clip_labels=True),
    "ffhq64": Preset("ffhq64", 64, None, "vit_base_patch16_224.dino", 100,
                     (100, 200, 400, 600, 700, 800), (100, 200, 400, 600),
                     "ffhq64", 100.0, 512),
    # AFHQv2-64: FFHQ-64's settings with dropout 0.25 (network preset afhq64); images via --source.
    "afhqv2-64": Preset("afhqv2-64", 64, None, "vit_base_patch16_224.dino", 100,
                        (100, 200, 400, 600, 700, 800), (100, 200, 400, 600),
                        "afhq64", 100.0, 512),
    # Built-in default: scikit-learn digits at their native 8x8 (no upsampling: the same
    # information as 16 px at a quarter of the pixels), raw pixels, a tiny generator; the whole
    # pipeline in about 6 minutes on a 2-core CPU. Measured (docs/results/digits-default.md): at
    # 0.1 Mimg per model the labels model's samples are recognised as their own digit by the
    # classifier judge 95.6% of the time (0.05 Mimg: 93.2%; 16 px at 0.02 Mimg, the old default: ~13%),
    # and temi-C20 beats the unconditional model by 4.0 sigma.
    "digits": Preset("digits", 8, 10, "pixels", 5, (5, 10, 20, 40, 80), (10, 20),
                     "tiny", 0.1, 64, knn_k=10, fid_samples=500, fid_sets=3, metric="classifier",
                     # a demo's C_max to within 20 below C=320: ~10 TEMI runs instead of ~25
                     bound_tol=20, bound_max_clusters=320,
                     # no geometric augmentation: EDM's x-flips (half the images) and rotations change
                     # a digit's identity, and at a demo's budget the network does not yet separate
                     # them by their augmentation labels (measured: pixel FD of uncond 807 -> 140,
                     # labels 1791 -> 111 at 0.05 Mimg without it; docs/method.md#augmentation)
                     augment_p=0.0,
                     # 280 TEMI steps instead of ~20k: a faster-moving student/teacher and narrower heads.
                     temi=replace(TEMI, heads=8, epochs=40, batch_size=256, lr=1e-3, teacher_momentum=0.99,
                                  hidden=64, bottleneck=32)),
}


@dataclass(frozen=True)
class Reproduction:
    """`cedm run --reproduce`: the paper's sample-efficiency experiment (Figs. 2 and 9; C-EDM at
    40 Mimg beating unconditional EDM at 200) at the built-in digits' scale, under an hour on a
    2-core CPU: every model of the sweep trained twice as long as the demo with EMA snapshots
    along the way, each snapshot sampled and scored, the curves and the ratio in the report.
    Judged as the demo, in the features of a classifier trained on the digits (cedm.judge;
    the digits preset's metric), not FID."""
    run_dir: str = "runs/digits-reproduce"
    mimg: float = 0.2                  # per model (the demo: 0.1)
    snapshot_every_mimg: float = 0.025  # 8 points per curve


REPRODUCTION = Reproduction()


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise CedmError(f"unknown dataset preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def run_preset(run_dir) -> Preset:
    """The preset of a run directory, from the dataset its `data` stage recorded.

    Image folders get a generic preset by resolution (CIFAR-like up to 32 px, else FFHQ-64-like).
    """
    from cedm.io import RunDir, load_json, MANIFEST

    m = RunDir(run_dir).data / MANIFEST
    if not m.exists():
        raise CedmError(f"{run_dir} has no prepared dataset; run `cedm data --run-dir {run_dir}` first")
    cfg = load_json(m)["config"]
    name = cfg.get("dataset")
    if name in PRESETS:
        return PRESETS[name]
    res = int(cfg.get("resolution", 32))
    base = PRESETS["cifar10" if res <= 32 else "ffhq64"]
    return replace(base, name=str(name), resolution=res, num_classes=cfg.get("num_classes"))
