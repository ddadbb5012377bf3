"""`cedm features`: frozen-backbone embeddings z = g(x) of the prepared images (the paper's Sec. 3; docs/method.md#temi).

Backbones:
  <timm name>  e.g. vit_base_patch16_224.dino (the paper's DINO ViT-B/16): pretrained weights from
               the Hugging Face hub cache, or a local file (--weights); images resized to the
               model's input size (224) as the reference code does (resize "pil": PIL bicubic on
               the uint8 image, as torchvision's Resize(224, BICUBIC) on PIL images; "torch":
               torch bicubic with antialias on floats, the earlier way), normalised with the
               model's mean/std (ImageNet for DINO), embedding = the model's pooled output with
               the classifier removed (num_classes=0; the CLS token for the DINO ViTs), in fp32
               (precision "fp32", the reference; "bf16": bf16 autocast on CUDA, the earlier way).
               Missing weights are an error, never a silent random init.
  open_clip:<model>/<pretrained>
               a CLIP image tower of open_clip_torch (the paper's Fig. 4): the model's own evaluation
               transform (resize, centre crop, CLIP mean/std) on each image, embedding = CLIP's
               projected image embedding; weights from the hub cache or --weights (open_clip:<model>).
  pixels       flattened pixels, z-scored per dimension with the mean/std of the training set
               (stored beside the features so new images get the same standardisation).

Outputs in <run>/features: features.npy [N,D] float32, pixel_mean.npy / pixel_std.npy (pixels),
knn_accuracy.json (labelled datasets with a held-out split: the 20-NN accuracy of the held-out
images' features against the training features, the paper's Table 3), manifest.json. Resumable: rows are embedded in chunks written atomically to features/chunks/,
existing chunks are skipped, and the chunks are assembled at the end.

Python API (also for evaluation):
  backbone = make_backbone(name, weights=None, device=None, pixel_stats=None)
  backbone = load_backbone(run_dir, device=None)   # the one that made <run>/features
  z = backbone(images_uint8)                        # [N,H,W,3] uint8 -> [N,D] float32
  z = extract(images_uint8, name_or_backbone, ...)  # one-shot
"""
from __future__ import annotations

import contextlib
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from cedm import pipeline
from cedm.io import (CedmError, RunDir, atomic_path, input_hash, load_array, load_json, save_array,
                     save_json)

PIXELS = "pixels"
OPEN_CLIP = "open_clip:"              # open_clip:<model>/<pretrained>: a CLIP image tower (Fig. 4)
# The backbones of the paper's Fig. 4 as --backbone values; None: neither timm nor open_clip has
# them (docs/method.md#backbones says why).
FIG4_BACKBONES = {"DINO": "vit_base_patch16_224.dino", "DINOv2": "vit_base_patch14_dinov2.lvd142m",
                  "CLIP": "open_clip:ViT-B-16/openai", "MoCo v3": None, "iBOT": None}
DEFAULT_BATCH = 256
DEFAULT_CHUNK = 10_000
RESIZES = ("pil", "torch")            # the reference's PIL bicubic | torch bicubic + antialias
PRECISIONS = ("fp32", "bf16")         # bf16: autocast on CUDA only (fp32 on a CPU either way)
# Features stages written before resize/precision were recorded used these:
LEGACY = {"resize": "torch", "precision": "bf16"}


def _check_images(images) -> None:
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3:
        raise CedmError(f"images must be a [N,H,W,3] uint8 array, got "
                        f"{getattr(images, 'shape', type(images).__name__)}")
    if images.dtype != np.uint8:
        raise CedmError(f"images must be uint8, got {images.dtype}")


def fit_pixel_stats(images, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of flattened pixels (float64 accumulation; std floored)."""
    _check_images(images)
    if len(images) == 0:
        raise CedmError("no images to compute pixel statistics from")
    d = int(np.prod(images.shape[1:]))
    s, s2 = np.zeros(d), np.zeros(d)
    for i in range(0, len(images), chunk):
        x = np.asarray(images[i:i + chunk], dtype=np.float64).reshape(-1, d)
        s += x.sum(0)
        s2 += (x * x).sum(0)
    n = len(images)
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
    # Pixels that (almost) never change, like digit borders, must not be blown up: a floor of a
    # tenth of the typical pixel std keeps noise there from dominating distances (and FDs).
    floor = max(0.1 * float(np.median(std[std > 0])) if (std > 0).any() else 1.0, 1e-6)
    std = np.maximum(std, floor)
    return mean.astype(np.float32), std.astype(np.float32)


class Backbone:
    """A frozen feature extractor g: uint8 images [N,H,W,3] -> float32 features [N,D]."""

    def __init__(self, name: str, weights=None, device=None, pixel_stats=None, resize: str = "pil",
                 precision: str = "fp32"):
        if resize not in RESIZES or precision not in PRECISIONS:
            raise CedmError(f"--resize must be one of {', '.join(RESIZES)} and --precision one of "
                            f"{', '.join(PRECISIONS)} (got {resize!r}, {precision!r})")
        self.name, self.resize, self.precision = name, resize, precision
        self.weights = str(weights) if weights else None
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = None
        if name == PIXELS:
            if weights:
                raise CedmError("--weights is not used with the pixels backbone")
            self.mean = self.std = None
            if pixel_stats is not None:
                self.set_pixel_stats(*pixel_stats)
        elif name.startswith(OPEN_CLIP):
            from cedm.clip_labels import load_model

            model, _, pretrained = name[len(OPEN_CLIP):].partition("/")
            if not model or not (pretrained or weights):
                raise CedmError(f"--backbone {name!r}: use open_clip:<model>/<pretrained tag> (e.g. "
                                f"open_clip:ViT-B-16/openai), or open_clip:<model> with --weights FILE")
            net, self.preprocess, _ = load_model(model, pretrained or None, weights, device=self.device)
            self.model = net.visual if hasattr(net, "visual") else net
            self._clip = net
            self.dim = int(net.encode_image(self.preprocess(_blank()).unsqueeze(0).to(self.device)).shape[1])
        else:
            self.model = _create_timm(name, weights).to(self.device).eval().requires_grad_(False)
            import timm.data

            cfg = timm.data.resolve_model_data_config(self.model)
            self.input_size = tuple(cfg["input_size"][1:])
            self._mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
            self._std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)
            self.dim = int(self.model.num_features)

    def set_pixel_stats(self, mean, std) -> None:
        self.mean = torch.as_tensor(np.asarray(mean, np.float32), device=self.device)
        self.std = torch.as_tensor(np.asarray(std, np.float32), device=self.device)
        self.dim = int(self.mean.numel())

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """One batch: uint8 [B,H,W,3] tensor on self.device -> float32 [B,D]."""
        if self.name == PIXELS:
            if self.mean is None:
                raise CedmError("the pixels backbone needs training-set statistics "
                                "(make_backbone(..., pixel_stats=fit_pixel_stats(train_images)))")
            z = x.reshape(len(x), -1).float()
            if z.shape[1] != self.dim:
                raise CedmError(f"pixels backbone was fitted on {self.dim}-d images, got "
                                f"{tuple(x.shape[1:])} ({z.shape[1]} values)")
            return (z - self.mean) / self.std                          # per-dimension z-score
        bf16 = self.precision == "bf16" and self.device.type == "cuda"
        if self.name.startswith(OPEN_CLIP):                             # the CLIP model's own transform
            from PIL import Image

            x = torch.stack([self.preprocess(Image.fromarray(im)) for im in x.cpu().numpy()]).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                return self._clip.encode_image(x).float()               # CLIP's image embedding
        if tuple(x.shape[1:3]) != self.input_size and self.resize == "pil":
            x = pil_resize(x, self.input_size)                         # uint8 -> uint8, PIL bicubic
        x = x.permute(0, 3, 1, 2).float() / 255.0
        if tuple(x.shape[-2:]) != self.input_size:                     # torch bicubic resize to 224
            x = torch.nn.functional.interpolate(x, size=self.input_size, mode="bicubic",
                                                align_corners=False, antialias=True).clamp_(0, 1)
        x = (x - self._mean) / self._std                               # ImageNet mean/std
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            z = self.model(x)                                          # pooled CLS embedding
        return z.float()

    def __call__(self, images, batch_size: int = DEFAULT_BATCH, progress: bool = False) -> np.ndarray:
        from tqdm import tqdm

        _check_images(images)
        if batch_size < 1:
            raise CedmError(f"--batch-size must be at least 1, got {batch_size}")
        out = np.empty((len(images), self.dim), np.float32)
        starts = range(0, len(images), batch_size)
        for i in tqdm(starts, desc=f"features {self.name}", file=sys.stderr, disable=None if progress else True):
            x = torch.from_numpy(np.array(images[i:i + batch_size])).to(self.device)  # copy: mmaps are read-only
            out[i:i + len(x)] = self.embed(x).cpu().numpy()
        return out


def _blank():
    """A black 8x8 PIL image (to read a model's embedding size)."""
    from PIL import Image

    return Image.fromarray(np.zeros((8, 8, 3), np.uint8))


def pil_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 images [B,H,W,3] -> [B,size[0],size[1],3] uint8, PIL bicubic per image (what the
    reference's torchvision Resize(224, interpolation=BICUBIC) does to a PIL image), same device."""
    from PIL import Image

    h, w = size
    out = np.stack([np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))
                    for img in x.cpu().numpy()]) if len(x) else np.zeros((0, h, w, 3), np.uint8)
    return torch.from_numpy(out).to(x.device)


def _create_timm(name: str, weights=None):
    """timm model with pretrained weights (hub cache or a local file, loaded strictly), no classifier."""
    import timm

    if not timm.is_model(name):
        raise CedmError(f"unknown backbone {name!r} (not a timm model name, nor 'pixels')")
    kw = {}
    load: contextlib.AbstractContextManager = contextlib.nullcontext()
    if weights is not None:
        if not Path(weights).is_file():
            raise CedmError(f"--weights {weights}: no such file")
        kw["pretrained_cfg_overlay"] = dict(file=str(weights))
    else:
        from cedm import hub

        load = hub.loading(hub.timm_cached(name))   # cached: no request; else no network: the cache at once
    try:
        # Keep the pretrained classifier size while loading: timm then loads strictly (with
        # num_classes=0 it would load non-strictly and leave missing weights randomly initialised).
        with load:
            model = timm.create_model(name, pretrained=True, **kw)
        model.reset_classifier(0)                              # embedding = pooled pre-logits
        return model
    except Exception as e:  # offline hub, missing cache, bad file, key mismatch: never random init
        msg = " ".join(str(e).split()) or type(e).__name__                # one line
        raise CedmError(f"cannot load pretrained weights for {name}"
                        + (f" from {weights}" if weights else " from the Hugging Face hub/cache")
                        + f": {type(e).__name__}: {msg[:400]}"
                        + ("" if weights else "; download them once online (HF_HOME cache) or pass --weights FILE")) from None


# ----------------------------------------------------------------------------------------------
# DINOv2 position embeddings as the hub model interpolates them (FDD; docs/method.md#fdd-features)

def dinov2_hub_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Position embeddings [1, 1 + M*M, D] (class token first, an M x M patch grid) resampled to a
    grid (h, w) of patches the way the DINOv2 hub model does it at run time: unchanged when the
    grid is M x M; else in fp32, bicubic without antialias, with the scale factor (h + 0.1) / M,
    (w + 0.1) / M (the output size is its floor: h, w), in the embedding's dtype again."""
    n, d = pos_embed.shape[1] - 1, pos_embed.shape[2]
    m = int(round(n ** 0.5))
    if m * m != n:
        raise CedmError(f"position embeddings of {n} patches are not a square grid")
    h, w = int(grid[0]), int(grid[1])
    if (h, w) == (m, m):
        return pos_embed
    pe = pos_embed.float()
    patches = pe[:, 1:].reshape(1, m, m, d).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, scale_factor=((h + 0.1) / m, (w + 0.1) / m),
                                              mode="bicubic", align_corners=False)
    if tuple(patches.shape[-2:]) != (h, w):
        raise CedmError(f"DINOv2 position embeddings: {m}x{m} resampled to {tuple(patches.shape[-2:])}, not {(h, w)}")
    return torch.cat([pe[:, :1], patches.permute(0, 2, 3, 1).reshape(1, h * w, d)], 1).to(pos_embed.dtype)


def use_dinov2_hub_pos_embed(model):
    """A timm DINOv2 ViT (created with dynamic_img_size=True at its native size, so its position
    embeddings are loaded as trained) that resamples them per input as dinov2_hub_pos_embed does,
    instead of timm's antialiased resampling: the features dgm-eval's hub dinov2_vitl14 gives."""
    import types

    if not getattr(model, "dynamic_img_size", False) or model.cls_token is None \
            or getattr(model, "reg_token", None) is not None or getattr(model, "no_embed_class", False):
        raise CedmError("the hub's DINOv2 position embeddings need a timm ViT with a class token, no "
                        "register tokens, position embeddings over the class token and dynamic_img_size=True")

    def _pos_embed(self, x):                                       # x: patch tokens [B, h, w, D]
        b, h, w, d = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, d)], 1)
        return self.pos_drop(x + dinov2_hub_pos_embed(self.pos_embed, (h, w)).to(x.dtype))

    model._pos_embed = types.MethodType(_pos_embed, model)
    return model


def make_backbone(name: str, weights=None, device=None, pixel_stats=None, resize: str = "pil",
                  precision: str = "fp32") -> Backbone:
    """A Backbone by name: a timm model name or 'pixels' (with (mean, std) from the training set)."""
    return Backbone(name, weights=weights, device=device, pixel_stats=pixel_stats, resize=resize,
                    precision=precision)


def load_backbone(run_dir, device=None) -> Backbone:
    """The backbone that made <run_dir>/features (same weights; pixels: the stored training stats)."""
    fdir = RunDir(run_dir).features
    man = fdir / "manifest.json"
    if not man.exists():
        raise CedmError(f"{fdir} is not complete; run `cedm features --run-dir {run_dir}` first")
    cfg = load_json(man)["config"]
    stats = None
    if cfg["backbone"] == PIXELS:
        stats = (load_array(fdir / "pixel_mean.npy"), load_array(fdir / "pixel_std.npy"))
    return make_backbone(cfg["backbone"], cfg.get("weights"), device, stats,
                         cfg.get("resize", LEGACY["resize"]), cfg.get("precision", LEGACY["precision"]))


def extract(images, backbone, weights=None, device=None, batch_size: int = DEFAULT_BATCH,
            pixel_stats=None, progress: bool = False) -> np.ndarray:
    """Features [N,D] float32 of uint8 images [N,H,W,3].

    `backbone` is a Backbone (e.g. from load_backbone) or a name. For the name 'pixels' without
    `pixel_stats`, the statistics are computed from `images` themselves: only right when
    `images` is the training set; for new images use load_backbone(run_dir).
    """
    if not isinstance(backbone, Backbone):
        if backbone == PIXELS and pixel_stats is None:
            pixel_stats = fit_pixel_stats(images)
        backbone = make_backbone(backbone, weights, device, pixel_stats)
    return backbone(images, batch_size=batch_size, progress=progress)


# ----------------------------------------------------------------------------------------------
# The features' k-NN accuracy (the paper's Table 3; docs/method.md#knn-accuracy)

KNN_FILE = "knn_accuracy.json"


def heldout_knn_accuracy(rd: RunDir, backbone: Backbone, train_feats, batch_size: int = DEFAULT_BATCH):
    """cedm.knn.knn_accuracy (k = 20, or every training image when fewer; cosine) of the held-out
    split's features against the training features, for a labelled dataset with a held-out split (data/labels.npy, test_images.npy,
    test_labels.npy); None otherwise."""
    from cedm.knn import KNN_CLASSIFIER_K, knn_accuracy

    files = [rd.data / f for f in ("labels.npy", "test_images.npy", "test_labels.npy")]
    if not all(f.exists() for f in files):
        return None
    labels, test_images, test_labels = (load_array(f, mmap=f.name == "test_images.npy") for f in files)
    if len(test_images) == 0:
        return None
    _check_images(test_images)
    test_feats = backbone(test_images, batch_size=batch_size, progress=True)
    # fewer than 20 training images (toy runs): all of them, and the recorded k says so
    return knn_accuracy(train_feats, labels, test_feats, test_labels, k=min(KNN_CLASSIFIER_K, len(train_feats)))


# ----------------------------------------------------------------------------------------------
# Stage

SHARDS = "features.shards"      # <run>/features.shards/<key>/: the chunks of `cedm features --shard I/N`


def parse_shard(text) -> tuple[int, int] | None:
    """'I/N' -> (I, N) with 0 <= I < N; '' or None -> None (the whole stage)."""
    text = (text or "").strip()
    if not text:
        return None
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or not 0 <= int(parts[0]) < int(parts[1]):
        raise CedmError(f"--shard must be I/N with 0 <= I < N (e.g. 0/8), got {text!r}")
    return int(parts[0]), int(parts[1])


def shard_chunks(num_chunks: int, shard: tuple[int, int]) -> range:
    """The chunk indices of shard I of N: a contiguous run, the N runs covering every chunk once."""
    i, n = shard
    return range(i * num_chunks // n, (i + 1) * num_chunks // n)


def _chunk_dir(root: Path, ckey: dict) -> Path:
    """A folder of chunks for exactly this config, input and chunk size (any other is removed)."""
    if root.exists() and (not (root / "config.json").exists() or load_json(root / "config.json") != ckey):
        shutil.rmtree(root)
    if not root.exists():
        root.mkdir(parents=True)
        save_json(root / "config.json", ckey)
    return root


def run(run_dir, backbone: str | None = None, weights=None, batch_size: int | None = None,
        chunk: int | None = None, device=None, force: bool = False, pushgateway=None,
        resize: str = "pil", precision: str = "fp32", shard=None, gather_shards=None) -> dict:
    """Embed <run>/data/images.npy into <run>/features; resumable in chunks; skips when done.

    shard 'I/N': compute only shard I's chunks (a contiguous run of chunks, shard_chunks) into
    <run>/features.shards/, each chunk atomic and kept (a rerun resumes), for N pods in parallel;
    nothing else is written. gather_shards N: the stage itself, from the shards' chunks, which
    must cover every row (else a one-line error naming the missing shards); without it the stage
    uses whatever chunks the shards left and computes the rest itself.
    Returns {"config", "shape" [N,D] or None when skipped/a shard, "skipped"}.
    """
    from cedm.config import run_preset

    rd = RunDir(run_dir)
    pre = run_preset(run_dir)
    backbone = backbone if backbone is not None else pre.backbone
    batch_size = DEFAULT_BATCH if batch_size is None else int(batch_size)
    chunk = DEFAULT_CHUNK if chunk is None else int(chunk)
    if batch_size < 1 or chunk < 1:
        raise CedmError("--batch-size and --chunk must be at least 1")
    shard = parse_shard(shard) if isinstance(shard, str) or shard is None else tuple(shard)
    if isinstance(gather_shards, str):          # the CLI's: '' = no gathering
        if gather_shards.strip() and not gather_shards.strip().isdigit():
            raise CedmError(f"--gather-shards must be a whole number of shards, got {gather_shards!r}")
        gather_shards = int(gather_shards) if gather_shards.strip() else None
    if shard is not None and gather_shards is not None:
        raise CedmError("--shard computes one shard, --gather-shards assembles them: pass one")
    if gather_shards is not None and gather_shards < 1:
        raise CedmError(f"--gather-shards must be at least 1, got {gather_shards}")
    if gather_shards == 1:                      # one shard is the whole stage on this pod
        gather_shards = None
    weights = str(Path(weights).resolve()) if weights else None
    config = {"backbone": backbone, "weights": weights}
    if backbone != PIXELS:                      # how a timm backbone sees the images
        if resize not in RESIZES or precision not in PRECISIONS:
            raise CedmError(f"--resize must be one of {', '.join(RESIZES)} and --precision one of "
                            f"{', '.join(PRECISIONS)} (got {resize!r}, {precision!r})")
        config.update(resize=resize, precision=precision)
    out = rd.features

    def prepare():
        images = load_array(rd.data / "images.npy", mmap=True)
        _check_images(images)
        n = len(images)
        if n == 0:
            raise CedmError(f"{rd.data}/images.npy is empty")
        stats = fit_pixel_stats(images) if backbone == PIXELS else None
        g = make_backbone(backbone, weights, device, stats, **{k: config[k] for k in ("resize", "precision")
                                                               if k in config})
        # Chunks are valid only for the same config, input and chunk size (else start over).
        ckey = {**config, "data": input_hash(rd.data), "chunk": chunk, "num_images": n, "dim": g.dim}
        shards = rd.root / SHARDS
        return images, n, stats, g, ckey, shards

    def embed(g, images, starts, cdir, desc):
        from tqdm import tqdm

        for i in tqdm(starts, desc=desc, file=sys.stderr, disable=None if len(starts) > 1 else True):
            z = g(images[i:i + chunk], batch_size=batch_size, progress=True)
            if not np.isfinite(z).all():
                raise CedmError(f"backbone {backbone} produced non-finite features in rows {i}..{i + len(z) - 1}")
            save_array(cdir / f"chunk_{i // chunk:06d}.npy", z)

    if shard is not None:                       # one shard's chunks, outside the stage's staging folder
        if pipeline.finished_manifest(out) is not None and pipeline.damage(out) is None and not force:   # before loading any backbone
            print(f"cedm features: {out} is complete; shard {shard[0]}/{shard[1]} has nothing to do", file=sys.stderr)
            return {"config": config, "shape": None, "skipped": True}
        images, n, _, g, ckey, shards = prepare()
        cdir = _chunk_dir(shards, ckey)
        starts = [c * chunk for c in shard_chunks(math.ceil(n / chunk), shard)]
        todo = [i for i in starts if not (cdir / f"chunk_{i // chunk:06d}.npy").exists()]
        embed(g, images, todo, cdir, f"shard {shard[0]}/{shard[1]}")
        rows = f"rows {starts[0]}..{min(n, starts[-1] + chunk) - 1}" if starts else "no rows"
        print(f"cedm features: shard {shard[0]}/{shard[1]}: {rows} ({len(starts) - len(todo)} of {len(starts)} "
              f"chunks were done) -> {cdir}", file=sys.stderr)
        return {"config": config, "shape": None, "skipped": False}

    def compute(work: Path, _):
        images, n, stats, g, ckey, shards = prepare()
        cdir = _chunk_dir(work / "chunks", ckey)
        starts = list(range(0, n, chunk))
        if shards.exists():                     # chunks the shards computed (same key), moved in
            sdir = _chunk_dir(shards, ckey)
            for f in sdir.glob("chunk_*.npy"):
                if not (cdir / f.name).exists():
                    f.replace(cdir / f.name)
        todo = [i for i in starts if not (cdir / f"chunk_{i // chunk:06d}.npy").exists()]
        if gather_shards is not None and todo:
            chunks = {i // chunk for i in todo}
            missing = [k for k in range(gather_shards) if chunks & set(shard_chunks(len(starts), (k, gather_shards)))]
            raise CedmError(f"--gather-shards {gather_shards}: shard(s) {', '.join(map(str, missing))} not done "
                            f"({len(todo)} of {len(starts)} chunks of {chunk} rows missing); run `cedm features "
                            f"--shard I/{gather_shards}` for them")
        if len(todo) < len(starts):
            print(f"cedm features: resuming, {len(starts) - len(todo)}/{len(starts)} chunks already done",
                  file=sys.stderr)
        embed(g, images, todo, cdir, "chunks")

        # Assemble with bounded memory: write into a memory-mapped .npy under a temporary name.
        with atomic_path(work / "features.npy", suffix=".npy") as tmp:
            feats = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, g.dim))
            for i in starts:
                feats[i:i + chunk] = load_array(cdir / f"chunk_{i // chunk:06d}.npy")
            feats.flush()
            del feats
        outputs, extra = {"features": "features.npy"}, {"shape": [n, g.dim]}
        for name in ("pixel_mean.npy", "pixel_std.npy", KNN_FILE):
            (work / name).unlink(missing_ok=True)
        if stats is not None:
            save_array(work / "pixel_mean.npy", stats[0])
            save_array(work / "pixel_std.npy", stats[1])
            outputs.update(pixel_mean="pixel_mean.npy", pixel_std="pixel_std.npy")
        knn = heldout_knn_accuracy(rd, g, load_array(work / "features.npy", mmap=True), batch_size)
        if knn is not None:                          # the paper's Table 3: 20-NN accuracy
            save_json(work / KNN_FILE, knn)
            outputs["knn_accuracy"] = KNN_FILE
            extra["knn_accuracy"] = knn["accuracy"]
        shutil.rmtree(cdir)
        shutil.rmtree(shards, ignore_errors=True)
        print(f"cedm features: {backbone}: [{n}, {g.dim}] -> {out}/features.npy"
              + (f"; {knn['k']}-NN accuracy on the {knn['num_test']} held-out images {knn['accuracy']:.4f}"
                 if knn else ""), file=sys.stderr)
        return pipeline.Output(outputs, extra, value=[n, g.dim])

    res = pipeline.execute(pipeline.Stage("features", out, rd.root, config, [rd.data], resumable=True),
                           compute, force=force, pushgateway=pushgateway)
    return {"config": config, "shape": res.value, "skipped": res.skipped}


def register(sub) -> None:
    p = sub.add_parser("features", help="frozen-backbone embeddings of the prepared images",
                       description="Embed <run>/data/images.npy with a frozen backbone into "
                                   "<run>/features/features.npy [N,D] float32 (resumable in chunks).")
    pipeline.add_common(p)
    p.add_argument("--backbone", default=None, metavar="NAME",
                   help="timm model name (pretrained, classifier removed; e.g. DINO vit_base_patch16_224.dino, "
                        "DINOv2 vit_base_patch14_dinov2.lvd142m, CLIP vit_base_patch16_clip_224.openai), "
                        "open_clip:<model>/<pretrained> (a CLIP image embedding with the model's own "
                        "preprocessing, e.g. open_clip:ViT-B-16/openai; docs/method.md#backbones) or 'pixels' "
                        "(default: the preset's: vit_base_patch16_224.dino; digits: pixels)")
    p.add_argument("--weights", default=None, type=pipeline.optional, metavar="FILE",
                   help="local weight file for the timm backbone (.safetensors/.pth); default: the "
                        "Hugging Face hub cache. Missing weights are an error, never random init")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help=f"images per forward pass (default: {DEFAULT_BATCH})")
    p.add_argument("--chunk", type=int, default=None, metavar="N",
                   help=f"images per resumable chunk file (default: {DEFAULT_CHUNK})")
    p.add_argument("--shard", default="", metavar="I/N",
                   help="compute only shard I of N (a contiguous run of chunks) into <run>/features.shards, "
                        "for N pods in parallel; then `--gather-shards N` assembles the stage (default: all)")
    p.add_argument("--gather-shards", default="", metavar="N",
                   help="assemble features.npy from the chunks of N shards, an error naming any shard not "
                        "done; 1: no shards, the whole stage here (default: compute what no shard did)")
    p.add_argument("--resize", choices=RESIZES, default="pil",
                   help="timm backbones: pil = PIL bicubic on the uint8 image, as the reference code; "
                        "torch = torch bicubic with antialias on floats (default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="timm backbones: fp32, as the reference code, or bf16 autocast on CUDA "
                        "(default: %(default)s)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    with pipeline.reporting("features", args.pushgateway, run_dir=args.run_dir):
        run(args.run_dir, backbone=args.backbone, weights=args.weights, batch_size=args.batch_size,
            chunk=args.chunk, device=pipeline.resolve_device(args.device), force=args.force,
            resize=args.resize, precision=args.precision, shard=args.shard, gather_shards=args.gather_shards)
    return 0
