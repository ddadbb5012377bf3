"""Evaluation of generated images (the paper's Sec. 5; docs/method.md#evaluation).

FID: Inception-v3 features through torch-fidelity, against cached training-set statistics.
FDD: the same Fréchet distance on DINOv2 ViT-L/14 features (timm weights, registered with
torch-fidelity as a feature extractor). Both are averaged over several sample sets. When no
Inception/DINOv2 weights can be had, the Fréchet distance is computed in the clustering
backbone's feature space and labelled as such (`fd_<backbone>`), never passed off as FID.

Also: uFID (conditional vs unconditional samples, same feature space), 1-NN AUROC of generated
vs held-out images in the backbone space (distance to the nearest training image as the score),
confidence (the kept TEMI head's maximum softmax probability on generated images) with grids of
the most and least confident samples, and the cluster metrics (ANMI, NMI, ACC) when labels exist.
"""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import torch

from cedm import conditioning, heads, pipeline, telemetry
from cedm.io import (CedmError, RunDir, file_hash, load_array, load_json, load_npz, save_json,
                     write_bytes)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"   # torch-fidelity's release file
DINOV2_TIMM = "vit_large_patch14_dinov2.lvd142m"
DINOV2_FEATURE_EXTRACTOR = "cedm-dinov2-vit-l-14"
# FDD as dgm-eval computes it (the paper's FDD): reference statistics from at most this many
# training images (its --nsample), a seeded random subsample when the training set is larger.
FDD_REF_MAX = 50_000
# DINOv2 features as dgm-eval's hub dinov2_vitl14 computes them: position embeddings resampled at
# run time (cedm.features.dinov2_hub_pos_embed; docs/method.md#fdd-features).
FDD_FEATURES = "dgm-eval-hub-pos-embed"
# dgm-eval's --seed default: its DataLoader.subsample_dataset draws the reference subsample with
# np.random.seed(13579) (reference_subsample).
REF_SEED = 13579
METRICS = ("fid", "fdd", "backbone", "classifier")      # --metric of evaluate, curve, sweep


# ----------------------------------------------------------------------------------------------
# Fréchet distance (torch-fidelity's implementation of the FID formula)

def feature_statistics(features: np.ndarray) -> dict:
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(torch.from_numpy(np.asarray(features, dtype=np.float64)))


def frechet_distance(stats1: dict, stats2: dict) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) (FID, Heusel et al.)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return float(fid_statistics_to_metric(stats1, stats2, verbose=False)[KEY_METRIC_FID])


# ----------------------------------------------------------------------------------------------
# Feature extractors: callables uint8 [N,H,W,3] -> float32 [N,D]

def set_distances(features: np.ndarray, ref: dict, sets: int, num: int) -> dict:
    """The Frechet distance to `ref` of each of `sets` consecutive sets of `num` features (set k:
    rows k num .. (k + 1) num - 1): {"values", "mean", "std"}, std the set-to-set standard
    deviation (ddof 1; 0 for one set). `cedm evaluate` and the guidance sweep score sets so."""
    values = [frechet_distance(feature_statistics(features[k * num:(k + 1) * num]), ref) for k in range(sets)]
    return {"values": values, "mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if sets > 1 else 0.0}


class _TorchFidelityExtractor:
    """Runs a torch-fidelity FeatureExtractorBase on uint8 NHWC numpy batches."""

    def __init__(self, module, feature: str, device, batch_size: int = 64):
        self.module, self.feature, self.device, self.batch_size = module, feature, device, batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        from tqdm.auto import tqdm

        out = []
        for i in tqdm(range(0, len(images), self.batch_size), desc=f"features[{self.feature}]",
                      leave=False, disable=None):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size])).permute(0, 3, 1, 2)
            out.append(self.module(x.to(self.device))[0].float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)


def inception_extractor(weights: str | None, device) -> _TorchFidelityExtractor:
    """torch-fidelity's Inception-v3 ('2048' pool features): a local file, the torch hub cache,
    or torch-fidelity's normal download. Raises CedmError when none is available."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from cedm import hub

    if weights is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        if cached.exists():
            weights = str(cached)
        elif hub.offline(fe.URL_INCEPTION_V3):    # an offline flag, or no network (found once, in seconds)
            raise CedmError(f"no Inception-v3 weights: pass --inception-weights FILE or put "
                            f"{INCEPTION_FILE} in {cached.parent} (offline, no download tried)")
    elif not Path(weights).is_file():
        raise CedmError(f"--inception-weights {weights}: no such file")
    try:
        m = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
    except Exception as e:  # download failed, or a file of the wrong kind (unpickling, shapes, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CedmError(f"could not load Inception-v3 weights ({weights or 'download'}): {first}") from None
    return _TorchFidelityExtractor(m.to(device), "2048", device)


def dinov2_preprocess(x: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,H,W] -> float [N,3,224,224]: PIL bicubic to 224x224 (as dgm-eval), then the
    ImageNet normalisation DINOv2 expects, on 0..255 values."""
    import torchvision.transforms.functional as TF

    from cedm.features import pil_resize

    if x.dtype != torch.uint8:
        raise CedmError(f"FDD features need uint8 images, got {x.dtype}")
    x = pil_resize(x.permute(0, 2, 3, 1), (224, 224)).permute(0, 3, 1, 2).float()
    return TF.normalize(x, (255 * 0.485, 255 * 0.456, 255 * 0.406), (255 * 0.229, 255 * 0.224, 255 * 0.225))


def _dinov2_class():
    """A torch-fidelity feature extractor backed by timm's DINOv2 ViT-L/14 (registered once)."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if DINOV2_FEATURE_EXTRACTOR in FEATURE_EXTRACTORS_REGISTRY:
        return FEATURE_EXTRACTORS_REGISTRY[DINOV2_FEATURE_EXTRACTOR]

    class FeatureExtractorTimmDinoV2(FeatureExtractorBase):
        INPUT_IMAGE_SIZE = 224

        def __init__(self, name, features_list, feature_extractor_weights_path=None, model_name=DINOV2_TIMM,
                     **kwargs):
            super().__init__(name, features_list)
            import timm

            from cedm.features import use_dinov2_hub_pos_embed

            overlay = dict(file=feature_extractor_weights_path) if feature_extractor_weights_path else None
            # Native size (position embeddings loaded as trained), resampled per input as dgm-eval's
            # hub model does, not once by timm (docs/method.md#fdd-features).
            self.model = use_dinov2_hub_pos_embed(timm.create_model(
                model_name, pretrained=True, num_classes=0, dynamic_img_size=True, pretrained_cfg_overlay=overlay))
            self.requires_grad_(False)
            self.eval()

        def forward(self, x):
            return (self.model(dinov2_preprocess(x)).float(),)

        @staticmethod
        def get_provided_features_list():
            return ("dinov2",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"fid": "dinov2", "kid": "dinov2", "prc": "dinov2"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

    register_feature_extractor(DINOV2_FEATURE_EXTRACTOR, FeatureExtractorTimmDinoV2)
    return FeatureExtractorTimmDinoV2


def dinov2_extractor(weights: str | None, device, model_name: str = DINOV2_TIMM) -> _TorchFidelityExtractor:
    """DINOv2 ViT-L/14 (timm) for FDD: a local file, or the hub cache. CedmError when unavailable."""
    if weights is not None and not Path(weights).is_file():
        raise CedmError(f"--dinov2-weights {weights}: no such file")
    from cedm import hub

    # hub weights in the cache: no request; else no network: the hub answers from its cache at once
    load = hub.loading(hub.timm_cached(model_name)) if weights is None else contextlib.nullcontext()
    cls = _dinov2_class()
    try:
        with load:
            m = cls(DINOV2_FEATURE_EXTRACTOR, ["dinov2"], feature_extractor_weights_path=weights, model_name=model_name)
    except Exception as e:  # hub offline / not cached / bad file: timm raises many kinds
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CedmError(f"no DINOv2 weights for FDD ({weights or 'hub ' + model_name}): {first}") from None
    ext = _TorchFidelityExtractor(m.to(device), "dinov2", device, batch_size=32)
    ext.cache_tag = FDD_FEATURES          # reference statistics of other DINOv2 features are not reused
    return ext


def backbone_extractor(run_dir, device):
    """The clustering backbone of this run (what `cedm features` used), as a feature extractor."""
    from cedm import features

    return features.load_backbone(run_dir, device=device)


def choose_extractor(run_dir, metric: str, device, inception_weights=None, dinov2_weights=None):
    """(key, label, extractor, fallback_reason): the requested metric, or the backbone's
    Fréchet distance when its weights are unavailable (said on stderr and in the metrics).
    "classifier" (cedm.judge) has no fallback: without labels it is an error. Neither has a
    weights file the user named (--inception-weights / --dinov2-weights): one that does not load
    is an error; the fallback is only for weights nobody asked for."""
    if metric not in METRICS:
        raise CedmError(f"unknown --metric {metric!r}; choose fid, fdd, backbone or classifier")
    if metric == "classifier":
        # Not "fd_...": run() takes an fd_* extractor as the clustering backbone (AUROC, confidence).
        from cedm.judge import classifier_extractor

        return ("classifier_fd", "Fréchet distance in a training-set classifier's features (not FID)",
                classifier_extractor(run_dir, device), None)
    reason = None
    try:
        if metric == "fid":
            return "fid", "FID (Inception-v3)", inception_extractor(inception_weights, device), None
        if metric == "fdd":
            return "fdd", "FDD (DINOv2 ViT-L/14)", dinov2_extractor(dinov2_weights, device), None
    except CedmError as e:
        if {"fid": inception_weights, "fdd": dinov2_weights}[metric]:
            raise
        reason = str(e)
        print(f"cedm evaluate: {reason}; reporting the Fréchet distance in the clustering backbone's "
              f"feature space instead", file=sys.stderr)
    name = load_json(RunDir(run_dir).features / "manifest.json")["config"].get("backbone", "backbone")
    return (f"fd_{name}", f"Fréchet distance in {name} feature space (not FID)",
            backbone_extractor(run_dir, device), reason)


# ----------------------------------------------------------------------------------------------
# Reference statistics of the training set, cached per extractor

def reference_cap(key: str, ref_images: int | None = None) -> int | None:
    """How many training images the reference statistics use: --ref-images, else all of them,
    except FDD's at most FDD_REF_MAX (as dgm-eval)."""
    return ref_images if ref_images else (FDD_REF_MAX if key == "fdd" else None)


def reference_subsample(num_images: int, n: int, seed: int = REF_SEED) -> np.ndarray:
    """The indices of the reference subsample, as dgm-eval draws it (dgm_eval/dataloaders.py,
    DataLoader.subsample_dataset): np.random.seed(seed), then sorted(np.random.choice(N, n,
    replace=False)). No replacement: dgm-eval samples with replacement only a generated path
    holding ':train' (dgm_eval/__main__.py), never the reference, the first path, which the official
    eval_fdd.sh passes as the dataset's zip. The legacy global generator is seeded the same way
    here, without touching numpy's global state."""
    return np.sort(np.random.RandomState(seed).choice(num_images, n, replace=False))


def reference_statistics(run_dir, key: str, extractor, max_images: int | None = None) -> dict:
    """{"mu", "sigma", "n"}: statistics of the training images, all of them or, above
    `max_images`, dgm-eval's subsample (reference_subsample; n: how many were used)."""
    rd = RunDir(run_dir)
    data_hash = file_hash(rd.data / "manifest.json")[:16]
    images = load_array(rd.data / "images.npy", mmap=True)
    n = min(len(images), max_images) if max_images else len(images)
    sub = f"{max_images}-s{REF_SEED}" if n < len(images) else "all"
    made_by = getattr(extractor, "cache_tag", None)   # e.g. the classifier judge's version and seed
    cache = rd.root / "eval" / "_reference" / f"{key}-{data_hash}-{sub}{'-' + made_by if made_by else ''}.npz"
    if cache.exists():
        try:
            z = load_npz(cache)
            return {"mu": z["mu"], "sigma": z["sigma"], "n": n}
        except CedmError:                      # a damaged cache is made again, never an error --force keeps
            print(f"cedm evaluate: {cache} does not load (truncated or corrupt); computing the reference "
                  f"statistics again", file=sys.stderr)
    if n < len(images):
        images = images[reference_subsample(len(images), n)]
    stats = {**feature_statistics(extractor(np.asarray(images))), "n": n}
    buf = io.BytesIO()
    np.savez(buf, mu=stats["mu"], sigma=stats["sigma"])
    write_bytes(cache, buf.getvalue())
    return stats


def per_class_fd(run_dir, cond: str, key: str, extractor, gen_feats: np.ndarray, gen_raw: np.ndarray,
                 min_images: int) -> dict:
    """Fréchet distance per labelled class (ClusDiff) for class-aware models, where both the
    generated and the training images of the class number at least `min_images`."""
    rd = RunDir(run_dir)
    lab_file = rd.data / "labels.npy"
    meta_file = rd.train(cond) / "network.json"
    if not lab_file.exists() or not meta_file.exists():
        return {}
    meta = load_json(meta_file)
    if meta.get("kind") == "labels" and not meta.get("method"):   # the fine labels, not labels:coarse/clip
        gen_cls = gen_raw
    elif meta.get("subclass_class") is not None:
        gen_cls = np.asarray(meta["subclass_class"])[gen_raw]
    else:
        return {}
    labels = load_array(lab_file)
    images = load_array(rd.data / "images.npy", mmap=True)
    out = {}
    for y in np.unique(labels):
        g = gen_cls == y
        idx = np.flatnonzero(labels == y)
        if g.sum() < min_images or len(idx) < min_images:
            continue
        ref = feature_statistics(extractor(np.asarray(images[idx])))
        out[str(int(y))] = {"fd": frechet_distance(feature_statistics(gen_feats[g]), ref),
                            "generated": int(g.sum()), "training": int(len(idx))}
    return out


# ----------------------------------------------------------------------------------------------
# Other metrics

def class_consistency(run_dir, cond: str, images: np.ndarray, groups: np.ndarray, judge=None, device=None) -> dict:
    """Does conditioning condition? (docs/method.md#consistency) The share of the images generated
    for cluster c (class, sub-class) that the classifier judge (cedm.judge) assigns to c's majority
    class among the training images, and beside it the same rate of the training images
    themselves under the same judge: how consistent the groups are to begin with. Per group:
    {c: [samples' rate, samples, training images' rate, training images]}."""
    from cedm.judge import classifier_extractor, consistency, majority_class

    rd = RunDir(run_dir)
    judge = judge or classifier_extractor(run_dir, device)
    labels = load_array(rd.data / "labels.npy")
    train = conditioning.conditioning(run_dir, cond, len(labels))
    train_groups = np.asarray(train["raw_labels"], np.int64)[train["index"]]
    majority = majority_class(train_groups, labels)
    gen = consistency(judge.predict(images), groups, majority)
    real = consistency(judge.predict(load_array(rd.data / "images.npy", mmap=True)), train_groups,
                       majority)
    per = {str(c): [*gen["per_group"][c], *real["per_group"].get(c, [None, 0])] for c in gen["per_group"]}
    return {"samples": gen["rate"], "training": real["rate"], "judge_accuracy": float(judge.accuracy),
            "groups": len(majority), "per_group": per,
            "majority": {str(c): y for c, y in majority.items()}}


def _seeds(z: dict) -> np.ndarray:
    # Sample files without a seeds array are taken as cedm sample's default, seeds 0..N-1.
    return np.asarray(z["seeds"]) if "seeds" in z else np.arange(len(z["images"]))


def ufid_uncond_images(cond_z: dict, uncond_z: dict, num: int) -> tuple[str, np.ndarray]:
    """(metric key, num unconditional images) for uFID against the first `num` conditional ones.

    `cedm sample` gives image i the seed seed_base + i for its noise, and every conditioning
    samples from seed_base 0 by default, so uncond[:num] would start from the very same noise as
    the conditional set and the two sets would not be independent. The unconditional images are
    therefore the first `num` whose seeds the conditional set does not use (with the usual
    sets x num uncond samples: uncond[num:2 num]), and the key is "ufid". When the uncond samples
    hold too few such images, uncond[:num] is used and the key, "ufid_shared_seeds", says so."""
    used = _seeds(cond_z)[:num]
    u_images = uncond_z["images"]
    free = np.flatnonzero(~np.isin(_seeds(uncond_z), used))
    if len(free) >= num:
        return "ufid", u_images[free[:num]]
    print(f"cedm evaluate: the uncond samples hold {len(free)} images with seeds the conditional set does "
          f"not use ({num} needed); uFID shares seeds, reported as ufid_shared_seeds", file=sys.stderr)
    return "ufid_shared_seeds", u_images[:num]


def one_nn_auroc(train_feats: np.ndarray, generated: np.ndarray, heldout: np.ndarray) -> float:
    """AUROC of separating generated from held-out images by the cosine distance to their nearest
    training image (0.5: as close to the data as unseen real images; > 0.5: farther, OOD)."""
    from sklearn.metrics import roc_auc_score

    def nn_dist(q):
        t = torch.nn.functional.normalize(torch.from_numpy(train_feats).float(), dim=1)
        q = torch.nn.functional.normalize(torch.from_numpy(q).float(), dim=1)
        best = torch.cat([(q[i:i + 4096] @ t.T).amax(1) for i in range(0, len(q), 4096)])
        return (1 - best).numpy()

    scores = np.concatenate([nn_dist(generated), nn_dist(heldout)])
    truth = np.concatenate([np.ones(len(generated)), np.zeros(len(heldout))])
    return float(roc_auc_score(truth, scores))


def save_image_grid(images: np.ndarray, path, cols: int = 8) -> None:
    """A plain image grid PNG (uint8 NHWC), `cols` a row, written atomically (cedm.images)."""
    from cedm.images import grid, save_png

    if len(images):
        save_png(path, grid([[images[i:i + cols]] for i in range(0, len(images), cols)]))


# ----------------------------------------------------------------------------------------------
# The stage

def run(run_dir, cond: str, metric: str | None = None, sets: int | None = None, num: int | None = None,
        inception_weights=None, dinov2_weights=None, ref_images: int | None = None, device=None,
        force: bool = False, per_class_min: int = 50, pushgateway=None, ablation: str | None = None) -> dict:
    """Score sample/<cond> into eval/<cond>/metrics.json; ablation 'uniform' (the paper's Table 4)
    scores sample/<cond>@uniform into eval/<cond>@uniform."""
    from cedm.conditioning import check_ablation, parse_tag
    from cedm.config import run_preset

    check_ablation(ablation, "evaluate")
    cond = str(parse_tag(cond))          # one spelling per conditioning (labels-coarse -> labels:coarse)
    rd = RunDir(run_dir)
    device = pipeline.resolve_device(device)
    pre = run_preset(run_dir)
    metric = pre.metric if metric is None else metric     # the dataset's judge (Preset.metric)
    sets = int(pre.fid_sets if sets is None else sets)
    num = int(pre.fid_samples if num is None else num)
    if sets < 1 or num < 2:
        raise CedmError(f"need --sets >= 1 and --num >= 2 (got {sets}, {num})")
    sample_dir = rd.sample(cond, ablation)
    sample_file = sample_dir / "images.npz"
    if not (sample_dir / "manifest.json").exists():
        abl = f" --ablation {ablation}" if ablation else ""
        raise CedmError(f"no samples for {cond!r}{abl}: run `cedm sample --run-dir {run_dir} --cond {cond} "
                        f"--num {sets * num}{abl}` first")
    out = rd.eval(cond, ablation)
    # The reference subsample's size and seed are part of the identity of the cached statistics.
    config = {"cond": cond, "metric": metric, "sets": sets, "num": num, "ref_images": ref_images,
              "ref_seed": REF_SEED,
              **({"fdd_ref_max": FDD_REF_MAX, "fdd_features": FDD_FEATURES} if metric == "fdd" else {}),
              "inception_weights": str(inception_weights) if inception_weights else None,
              "dinov2_weights": str(dinov2_weights) if dinov2_weights else None, "per_class_min": per_class_min,
              **({"ablation": ablation} if ablation else {})}
    # Everything the metrics read: the samples, the training set, the clustering backbone, and when
    # present the uncond samples (uFID), the model's label map (per-class FD), the cluster head.
    uncond = rd.sample("uncond")
    cl = conditioning.cluster_of(cond)
    optional = [rd.train(cond), *([uncond] if cond != "uncond" else []), *([rd.cluster(*cl)] if cl else [])]
    inputs = [sample_dir, rd.data, rd.features] + [d for d in optional if (d / "manifest.json").exists()]

    def compute(work, _):
        z = load_npz(sample_file)
        images = z["images"]
        if len(images) < sets * num:
            raise CedmError(f"{sample_file} holds {len(images)} images, but --sets {sets} x --num {num} = "
                            f"{sets * num} are needed; sample more or lower --num/--sets")
        key, label, extractor, fallback = choose_extractor(run_dir, metric, device, inception_weights,
                                                           dinov2_weights)
        ref = reference_statistics(run_dir, key, extractor, reference_cap(key, ref_images))
        gen_feats = extractor(images[:sets * num])
        metrics = {"cond": cond, "metric": key, "label": label, "sets": sets, "num": num,
                   **set_distances(gen_feats, ref, sets, num), "ref_images": ref["n"], "ref_seed": REF_SEED}
        if fallback:
            metrics["fallback_reason"] = fallback
        if hasattr(extractor, "accuracy"):          # the classifier judge's held-out accuracy
            metrics["judge_accuracy"] = float(extractor.accuracy)
        if cond != "uncond" and (rd.data / "labels.npy").exists():
            judge = extractor if hasattr(extractor, "predict") else None
            try:
                metrics["consistency"] = class_consistency(run_dir, cond, images[:sets * num],
                                                           z["clusters"][:sets * num], judge, device)
            except CedmError as e:        # e.g. one class only: no judge; the FD stands without it
                if judge is not None:
                    raise
                metrics["consistency_unavailable"] = str(e)
                print(f"cedm evaluate: no consistency for {cond}: {e}", file=sys.stderr)
        per_class = per_class_fd(run_dir, cond, key, extractor, gen_feats, z["clusters"][:sets * num], per_class_min)
        if per_class:
            metrics["per_class"] = per_class

        # uFID: conditional vs unconditional samples in the same feature space.
        if cond != "uncond" and (uncond / "manifest.json").exists():
            key_u, u = ufid_uncond_images(z, load_npz(uncond / "images.npz"), num)
            metrics[key_u] = frechet_distance(feature_statistics(gen_feats[:num]),
                                              feature_statistics(extractor(u)))

        # 1-NN AUROC and confidence live in the clustering backbone's space.
        bb = extractor if key.startswith("fd_") else backbone_extractor(run_dir, device)
        bb_gen = gen_feats[:num] if bb is extractor else bb(images[:num])
        # The held-out split `cedm data` keeps (never trained on): up to `num` of its images vs the
        # first `num` generated ones; auroc_heldout says how many held-out images were used.
        test_file = rd.data / "test_images.npy"
        if test_file.exists():
            train_feats = load_array(rd.features / "features.npy")
            held = bb(np.asarray(load_array(test_file, mmap=True)[:num]))
            metrics["auroc_1nn"] = one_nn_auroc(train_feats, bb_gen, held)
            metrics["auroc_heldout"] = int(len(held))
        if cl is not None:
            cdir = rd.cluster(*cl)
            summary = load_json(cdir / "summary.json")
            from cedm.cluster_metrics import label_metrics     # an older one-to-one acc is never read as TEMI's

            metrics["cluster"] = {k: v for k, v in {**label_metrics(summary), **{
                k: summary[k] for k in ("r_c", "used_clusters") if k in summary}}.items() if v is not None}
            head_file = cdir / "head.safetensors"
            if head_file.exists():
                head = heads.load_head(head_file)
                with torch.no_grad():
                    probs = head(torch.from_numpy(bb_gen).float()).numpy()
                conf = probs.max(1)
                order = np.argsort(-conf)
                metrics["confidence"] = {"mean": float(conf.mean()), "median": float(np.median(conf)),
                                         "min": float(conf.min()), "max": float(conf.max())}
                save_image_grid(images[order[:32]], work / "confident.png")
                save_image_grid(images[order[::-1][:32]], work / "unconfident.png")
        if ablation:
            metrics["ablation"] = ablation
        else:   # the gauge is the method's; an ablation is a row of the report, not a series
            telemetry.FRECHET_DISTANCE.labels(key, str(cl[1]) if cl else cond).set(metrics["mean"])
        save_json(work / "metrics.json", metrics)
        return pipeline.Output({"metrics": "metrics.json"}, value=metrics)

    res = pipeline.execute(pipeline.Stage("evaluate", out, rd.root, config, inputs), compute, force=force,
                           pushgateway=pushgateway, quiet=True, labels={"cond": cond})
    return load_json(out / "metrics.json") if res.skipped else res.value


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="FID / FDD, uFID, 1-NN AUROC, confidence of generated images",
        description="Score the samples of one conditioning (sample/<cond>/images.npz) against the "
                    "training set: FID (Inception-v3, torch-fidelity) or FDD (DINOv2 ViT-L/14), "
                    "mean and spread over --sets sets of --num images. Without Inception/DINOv2 "
                    "weights it says so and reports the Fréchet distance in the clustering "
                    "backbone's feature space, labelled as such. Also uFID vs the 'uncond' "
                    "samples when present, 1-NN AUROC vs held-out images when the dataset has "
                    "them, TEMI-head confidence with grids of the most/least confident samples, "
                    "and ANMI/NMI/ACC of the clusters when labels exist.")
    pipeline.add_common(p)
    p.add_argument("--cond", required=True, metavar="TAG",
                   help="conditioning to evaluate: <method>-C<C> (e.g. temi-C100), labels, or uncond")
    p.add_argument("--metric", default=None, choices=METRICS,
                   help="fid (Inception-v3), fdd (DINOv2 ViT-L/14), backbone (clustering features) or "
                        "classifier (the Fréchet distance in the hidden layer of a small classifier "
                        "trained on the labelled training set, cached per dataset; a stronger local "
                        "judge than pixels where no Inception/DINOv2 weights exist; not FID) "
                        "(default: the dataset preset's: classifier for digits, else fid)")
    p.add_argument("--sets", type=int, default=None, help="number of sample sets averaged (default: preset, 3)")
    p.add_argument("--num", type=int, default=None, help="images per sample set (default: preset, 50000)")
    p.add_argument("--ref-images", type=int, default=None,
                   help="training images used for the reference statistics, a seeded random subsample "
                        f"(default: all; {FDD_REF_MAX} for fdd, as dgm-eval)")
    p.add_argument("--ablation", choices=("uniform",), default=None,
                   help="uniform: score sample/<cond>@uniform (`cedm sample --ablation uniform`, the paper's "
                        "Table 4) into eval/<cond>@uniform")
    p.add_argument("--per-class-min", type=int, default=50, metavar="N",
                   help="per-class FD (models conditioned on labels or sub-classes) for classes with at "
                        "least N generated and N training images (default: %(default)s)")
    p.add_argument("--inception-weights", default=None, type=pipeline.optional, metavar="FILE",
                   help="torch-fidelity Inception-v3 weights file (default: torch hub cache or download)")
    p.add_argument("--dinov2-weights", default=None, type=pipeline.optional, metavar="FILE",
                   help=f"timm {DINOV2_TIMM} weights file (default: the Hugging Face hub cache)")

    def _main(args):
        with pipeline.reporting("evaluate", args.pushgateway, run_dir=args.run_dir, cond=args.cond):
            m = run(args.run_dir, args.cond, args.metric, args.sets, args.num, args.inception_weights,
                    args.dinov2_weights, args.ref_images, args.device, args.force, args.per_class_min,
                    ablation=args.ablation)
        extra = "".join(f" ({k} {m[k]:.3f})" for k in ("ufid", "ufid_shared_seeds") if k in m)
        print(f"{args.cond}: {m['label']} = {m['mean']:.3f} ± {m['std']:.3f} over {m['sets']} x {m['num']}{extra}")

    p.set_defaults(func=_main)
