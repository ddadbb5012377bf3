"""Per-dataset presets (PAPER.md defaults). Command-line flags override any field.

Each stage module owns its own hyper-parameters; a preset only says what differs per dataset.
"""
from __future__ import annotations

from dataclasses import dataclass, field, asdict

from cedm.io import CedmError


@dataclass(frozen=True)
class Preset:
    name: str
    resolution: int                  # generator resolution (pixels)
    num_classes: int | None          # known class count (for C_start and ANMI), None if unlabeled
    backbone: str                    # features backbone (timm name or 'pixels')
    c_start: int                     # first C of the C_max search
    clusters: tuple[int, ...]        # the C's of a clustering sweep
    candidates: tuple[int, ...]      # the C's trained with C-EDM (those <= C_max are used)
    network: str                     # generator preset in cedm.networks: tiny | cifar | ffhq64
    mimg: float                      # training budget per model, millions of images
    batch: int                       # global training batch
    temi_epochs: int = 200
    temi_batch: int = 512
    temi_heads: int = 50
    knn_k: int = 50
    fid_samples: int = 50_000        # images per sample set for FID/FDD
    fid_sets: int = 3                # sample sets averaged
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    # PAPER.md: CIFAR-10, C-EDM+TEMI best at C=100, C_max search from the class count.
    "cifar10": Preset("cifar10", 32, 10, "vit_base_patch16_224.dino", 10,
                      (10, 20, 50, 100, 200, 400, 500, 600, 800), (10, 20, 50, 100, 200, 400),
                      "cifar", 100.0, 1024),
    "cifar100": Preset("cifar100", 32, 100, "vit_base_patch16_224.dino", 100,
                       (100, 200, 400, 600, 800, 1000), (100, 200, 400, 600),
                       "cifar", 100.0, 1024),
    "ffhq64": Preset("ffhq64", 64, None, "vit_base_patch16_224.dino", 100,
                     (100, 200, 400, 600, 700, 800), (100, 200, 400, 600),
                     "ffhq64", 100.0, 512),
    # Built-in default: scikit-learn digits, raw pixels, a tiny generator; minutes on a CPU.
    "digits": Preset("digits", 16, 10, "pixels", 5, (5, 10, 20, 40, 80), (5, 10, 20),
                     "tiny", 0.02, 64, temi_epochs=40, temi_batch=256, temi_heads=8, knn_k=10,
                     fid_samples=500, fid_sets=2,
                     # 280 TEMI steps instead of ~20k: a faster-moving student/teacher and narrower
                     # heads (cedm.cluster reads extra["temi_<flag>"] for any TEMI flag).
                     extra={"temi_lr": 1e-3, "temi_teacher_momentum": 0.99, "temi_hidden": 64,
                            "temi_bottleneck": 32}),
}


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
    from dataclasses import replace

    return replace(base, name=str(name), resolution=res, num_classes=cfg.get("num_classes"))
