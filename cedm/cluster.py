"""`cedm cluster`: cluster the features into C groups with TEMI or k-means (docs/method.md#temi,
docs/method.md#k-means): `kmeans` is the paper's baseline (scikit-learn KMeans, Euclidean,
n_init=10, raw features), `skmeans` cosine (spherical) k-means with one k-means++ init.

Writes <run>/cluster/<method>-C<C>/ (staged, manifest last):
  assignments.npy [N] int64 in [0,C)   c*(x) (TEMI: argmax of the kept head's teacher)
  summary.json                         method, clusters, used_clusters C^u, r_c = C^u/C, q (the
                                       empirical distribution of c*), loss, best_head, heads, epochs,
                                       seed, and when labels exist acc (TEMI's), acc_hungarian, ari,
                                       nmi, anmi (cedm.cluster_metrics; + *_coarse for CIFAR-100's 20
                                       super-classes)
  head.safetensors                     TEMI: the kept head's teacher weights; k-means: the
                                       centroids (+ metadata metric); `cedm.heads.load_head(path)` rebuilds either as
                                       a module features [N,D] -> probabilities [N,C]
The metrics are cedm.cluster_metrics; k-means is cedm.kmeans; TEMI is cedm.temi; `--import DIR`
(the official C-EDM cluster_ids.pt + freq.pt as the same folder, without a head) is cedm.cluster_import.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

import numpy as np

from cedm import pipeline, temi
from cedm.conditioning import ablation_folder, check_ablation, cluster_tag, subclass_tag
from cedm.io import (CedmError, RunDir, input_hash, load_array, load_json, save_array, save_json,
                     save_tensors)
from cedm.cluster_metrics import (cluster_metrics, dataset_labels, hungarian_acc, temi_acc,  # noqa: F401
                                  utilisation)                                               # (re-exported)
from cedm.kmeans import (KMEANS_MAX_ITER, KMEANS_N_INIT, CentroidHead, euclidean_kmeans,  # noqa: F401
                         kmeans, kmeans_plus_plus)                                         # (re-exported)
from cedm.knn import check_features

METHODS = ("temi", "kmeans", "skmeans")      # skmeans: spherical; no hyphen (tags are <method>-C<C>)
IMPORT_METHODS = ("clip",)                    # --import only: the official CLIP pseudo-labels as clip-C<C>
TEMI_FLOATS = ("gamma", "lr", "weight_decay", "teacher_momentum", "prior_momentum", "temperature")
TEMI_TRAINING = ("norm_last_layer", "lr_schedule", "warmup_epochs", "min_lr", "freeze_last_layer")
LR_SCHEDULES = ("cosine", "constant")
_CAST = {"int": int, "float": float, "bool": bool, "str": str}


# ----------------------------------------------------------------------------------------------
# Stage

def _check_knn(knn: np.ndarray, n: int) -> None:
    if knn.ndim != 2 or len(knn) != n:
        raise CedmError(f"kNN table has shape {tuple(knn.shape)} but there are {n} features; "
                        f"redo `cedm knn`")
    if knn.shape[1] < 1 or knn.min() < 0 or knn.max() >= n:
        raise CedmError(f"kNN table holds indices outside [0, {n}); redo `cedm knn`")


def run(run_dir, method: str, clusters: int, heads: int | None = None, epochs: int | None = None,
        batch_size: int | None = None, gamma: float | None = None, lr: float | None = None,
        weight_decay: float | None = None, teacher_momentum: float | None = None,
        prior_momentum: float | None = None, temperature: float | None = None,
        hidden: int | None = None, bottleneck: int | None = None, norm_last_layer: bool | None = None,
        lr_schedule: str | None = None, warmup_epochs: int | None = None, min_lr: float | None = None,
        freeze_last_layer: int | None = None, max_iter: int | None = None, seed: int = 0, device=None,
        force: bool = False, progress: bool = True, pushgateway=None, ablation: str | None = None) -> dict:
    """Cluster <run>/features into `clusters` groups; returns the summary dict (+ "reused": bool).

    Skips (reused=True) when <run>/cluster/<method>-C<clusters> exists with the same config.
    TEMI hyper-parameters left None come from the run's preset (its TEMIConfig, whose defaults
    are the paper's; cedm.config). ablation 'gamma1' (the paper's Table 5): TEMI with gamma = 1,
    into <run>/cluster/<method>-C<clusters>@gamma1, beside the method's own clustering.
    """
    from cedm import telemetry
    from cedm.config import run_preset

    if method not in METHODS:
        raise CedmError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    clusters = int(clusters)
    if clusters < 2:
        raise CedmError(f"--clusters must be at least 2, got {clusters}")
    check_ablation(ablation, "cluster")
    if ablation == "gamma1":
        if method != "temi":
            raise CedmError(f"--ablation gamma1 is a TEMI ablation, not one of --method {method}")
        if gamma not in (None, 1.0):
            raise CedmError(f"--ablation gamma1 sets gamma = 1; drop --gamma {gamma}")
        gamma = 1.0
    rd = RunDir(run_dir)
    pre = run_preset(run_dir)
    if method == "temi":
        # flag > the preset's TEMIConfig (the paper's defaults); a flag given as 0 stays 0 (then refused)
        tc = pre.temi.override(heads=heads, epochs=epochs, batch_size=batch_size, gamma=gamma, lr=lr,
                               weight_decay=weight_decay, teacher_momentum=teacher_momentum,
                               prior_momentum=prior_momentum, temperature=temperature, hidden=hidden,
                               bottleneck=bottleneck, norm_last_layer=norm_last_layer,
                               lr_schedule=lr_schedule, warmup_epochs=warmup_epochs, min_lr=min_lr,
                               freeze_last_layer=freeze_last_layer)
        hp = {f.name: _CAST[getattr(f.type, "__name__", f.type)](getattr(tc, f.name)) for f in fields(tc)}
        config = {"method": method, "clusters": clusters, **hp,
                  "seed": int(seed), "features": input_hash(rd.features), "knn": input_hash(rd.knn)}
        for k in ("heads", "epochs", "batch_size", "hidden", "bottleneck"):
            if config[k] < 1:
                raise CedmError(f"--{k.replace('_', '-')} must be at least 1, got {config[k]}")
        if not 0 < hp["gamma"] <= 1 or hp["temperature"] <= 0 or hp["lr"] <= 0:
            raise CedmError("need 0 < --gamma <= 1, --temperature > 0 and --lr > 0")
        if not (0 <= hp["teacher_momentum"] < 1 and 0 <= hp["prior_momentum"] < 1):
            raise CedmError("--teacher-momentum and --prior-momentum must lie in [0, 1)")
        if hp["lr_schedule"] not in LR_SCHEDULES:
            raise CedmError(f"unknown --lr-schedule {hp['lr_schedule']!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if hp["warmup_epochs"] < 0 or hp["freeze_last_layer"] < 0 or hp["min_lr"] < 0:
            raise CedmError("--warmup-epochs, --freeze-last-layer and --min-lr must be at least 0")
    else:
        config = {"method": method, "clusters": clusters,
                  "max_iter": int(KMEANS_MAX_ITER if max_iter is None else max_iter),
                  "seed": int(seed), "features": input_hash(rd.features)}
        if method == "kmeans":
            config["n_init"] = KMEANS_N_INIT
        if config["max_iter"] < 1:
            raise CedmError(f"--max-iter must be at least 1, got {config['max_iter']}")
    # The input hashes stay in the config too: `cedm bound` reads them from there.
    if ablation:
        config["ablation"] = ablation
    out = rd.cluster(method, clusters, ablation)
    inputs = [rd.data, rd.features] + ([rd.knn] if method == "temi" else [])

    def compute(work, _):
        feats = load_array(rd.features / "features.npy", mmap=True)
        check_features(feats)
        n = len(feats)
        if clusters > n:
            raise CedmError(f"--clusters {clusters} exceeds the number of samples N={n}")
        labels = dataset_labels(rd, n)

        summary = {"method": method, "clusters": clusters, "seed": int(seed), "num_samples": n,
                   **({"ablation": ablation, "gamma": 1.0} if ablation else {})}
        if method == "temi":
            nbrs = load_array(rd.knn / "knn.npy")
            _check_knn(nbrs, n)
            res = temi.train(feats, nbrs, clusters, heads=config["heads"], epochs=config["epochs"],
                             batch_size=config["batch_size"], hidden=config["hidden"],
                             bottleneck=config["bottleneck"], seed=seed, device=device, progress=progress,
                             **{k: config[k] for k in TEMI_FLOATS + TEMI_TRAINING})
            assign = res["probs"].argmax(1).astype(np.int64)                 # c* = argmax q_t(c|x)
            summary.update(loss=res["loss"], best_head=res["best_head"], heads=config["heads"],
                           epochs=config["epochs"], hidden=config["hidden"], bottleneck=config["bottleneck"],
                           head_losses=res["head_losses"], loss_history=res["loss_history"],
                           knn_k=int(nbrs.shape[1]), **{k: config[k] for k in TEMI_TRAINING})
            res["head"].save(work / "head.safetensors", {"best_head": res["best_head"]})
        else:
            if method == "kmeans":          # the paper's baseline: Euclidean, raw features, 10 inits
                res = euclidean_kmeans(feats, clusters, seed=seed, max_iter=config["max_iter"])
            else:                           # skmeans: cosine k-means, one init
                res = kmeans(feats, clusters, seed=seed, max_iter=config["max_iter"], device=device,
                             progress=progress)
            assign = res["assignments"]
            summary.update(loss=res["loss"], best_head=0, heads=1, epochs=res["iterations"],
                           converged=res["converged"])
            metric = "euclidean" if method == "kmeans" else "cosine"
            save_tensors(work / "head.safetensors", {"centroids": res["centroids"]},
                         {"kind": "kmeans", "metric": metric, "dim": res["centroids"].shape[1],
                          "clusters": clusters})
        summary.update(utilisation(assign, clusters))
        for key, lab in labels.items():
            summary.update({f"{m}{key}": v for m, v in cluster_metrics(lab, assign).items()})
        save_array(work / "assignments.npy", assign)
        save_json(work / "summary.json", summary)
        return pipeline.Output({"assignments": "assignments.npy", "summary": "summary.json",
                                "head": "head.safetensors"}, value=summary)

    res = pipeline.execute(pipeline.Stage("cluster", out, rd.root, config, inputs), compute,
                           force=force, pushgateway=pushgateway, quiet=True,
                           labels={"cond": ablation_folder(cluster_tag(method, clusters), ablation)})
    if res.skipped:
        summary = load_json(out / "summary.json")
        _set_gauges(telemetry, summary)
        print(f"cedm cluster: {out} is up to date (same config); reused", file=sys.stderr)
        return {**summary, "reused": True}
    summary = res.value
    _set_gauges(telemetry, summary)
    msg = f"cedm cluster: {method} C={clusters}: C^u={summary['used_clusters']} r_C={summary['r_c']:.3f}"
    if "anmi" in summary:
        msg += (f" ANMI={summary['anmi']:.3f} NMI={summary['nmi']:.3f} ARI={summary['ari']:.3f}"
                f" ACC={summary['acc']:.3f} (one-to-one {summary['acc_hungarian']:.3f})")
    print(msg + f" -> {out}", file=sys.stderr)
    return {**summary, "reused": False}


def _set_gauges(telemetry, summary: dict) -> None:
    labels = (ablation_folder(summary["method"], summary.get("ablation")), str(summary["clusters"]))
    telemetry.CLUSTER_UTILISATION.labels(*labels).set(summary["r_c"])
    telemetry.CLUSTER_USED.labels(*labels).set(summary["used_clusters"])


_TEMI_HELP = {
    "heads": ("H", "TEMI heads trained at once"), "epochs": ("E", "TEMI epochs"),
    "batch_size": ("B", "TEMI pairs per step"), "gamma": (None, "TEMI exponent gamma < 1 against collapse"),
    "lr": (None, "AdamW learning rate"), "weight_decay": (None, "AdamW weight decay on weights, not biases"),
    "teacher_momentum": (None, "EMA momentum of the teacher heads"),
    "prior_momentum": (None, "EMA momentum of the cluster prior q~_t"),
    "temperature": (None, "softmax temperature of student and teacher"),
    "hidden": ("N", "width of each head's hidden layer"),
    "bottleneck": ("N", "width of each head's L2-normalised bottleneck"),
    "norm_last_layer": (None, "fix the gain g of the weight-normalised last layer at 1 (logits are cosines); "
                              "--no-norm-last-layer trains g (the paper's Table 8)"),
    "lr_schedule": (None, "cosine: lr x batch/256 with linear warm-up and cosine decay to --min-lr, as the "
                          "official TEMI code; constant: --lr at every step"),
    "warmup_epochs": ("E", "linear lr warm-up epochs, capped at epochs/20"),
    "min_lr": (None, "lr at the end of the cosine decay"),
    "freeze_last_layer": ("E", "epochs during which the last layer (v, g) stays fixed"),
}


def add_temi_args(p) -> None:
    """The TEMI flags (shared with `cedm bound`), one per TEMIConfig field; None = the run's
    preset, whose defaults (printed) are the paper's; the digits preset's differences too."""
    from cedm.config import PRESETS, TEMI

    digits = PRESETS["digits"].temi
    for f in fields(TEMI):
        metavar, text = _TEMI_HELP[f.name]
        paper, small = getattr(TEMI, f.name), getattr(digits, f.name)
        show = (lambda v: f"{v:g}") if isinstance(paper, (int, float)) and not isinstance(paper, bool) else str
        note = f"default: preset, {show(paper)}" + (f"; digits {show(small)}" if small != paper else "")
        flag = "--" + f.name.replace("_", "-")
        if isinstance(paper, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"{text} ({note})")
        elif f.name == "lr_schedule":
            p.add_argument(flag, choices=LR_SCHEDULES, default=None, help=f"{text} ({note})")
        else:
            p.add_argument(flag, type=type(paper), default=None, metavar=metavar, help=f"{text} ({note})")


def temi_kwargs(args) -> dict:
    return {k: getattr(args, k) for k in _TEMI_HELP}


def register(sub) -> None:
    p = sub.add_parser("cluster", help="cluster the features with TEMI or k-means for one C",
                       description="Cluster <run>/features into C groups (TEMI heads on the kNN pairs; "
                                   "kmeans: scikit-learn KMeans, Euclidean, 10 inits, on the raw features, "
                                   "the paper's baseline; skmeans: cosine k-means++, one init) and write assignments, q(c), C^u, r_C, the kept "
                                   "head and, with labels, ANMI/NMI/ACC to <run>/cluster/<method>-C<C>/. "
                                   "With --within-labels (ClusDiff): cluster each labelled class "
                                   "separately into at most --max-subclasses sub-classes and write "
                                   "<run>/cluster/<method>-K<K>/ (train on it with --cond <method>-K<K>). "
                                   "With --import DIR: the official C-EDM cluster_ids.pt and freq.pt, checked, "
                                   "as <run>/cluster/<method>-C<C>/ (cedm.cluster_import).")
    pipeline.add_common(p)
    p.add_argument("--method", required=True, choices=METHODS + ("ap",) + IMPORT_METHODS,
                   help="temi, kmeans (Euclidean, scikit-learn, n_init=10) or skmeans (cosine, one init); "
                        "with --within-labels also ap (affinity propagation, as ClusDiff); with --import "
                        "what made the files, also clip (the official CLIP pseudo-labels)")
    p.add_argument("--clusters", type=int, default=None, metavar="C",
                   help="number of clusters C (2..N); required unless --within-labels")
    p.add_argument("--within-labels", action="store_true",
                   help="sub-classes inside each labelled class (ClusDiff); classes too small to split keep one")
    p.add_argument("--max-subclasses", type=int, default=10, metavar="K",
                   help="with --within-labels: at most K sub-classes per class (default: %(default)s)")
    p.add_argument("--ablation", choices=("gamma1",), default=None,
                   help="gamma1: the paper's Table 5, TEMI with gamma = 1 (no exponent against collapse; its "
                        "C^u is a lower bound), into cluster/<method>-C<C>@gamma1 beside the method's own "
                        "(with --import: the official beta-1 files)")
    p.add_argument("--import", dest="import_dir", default=None, metavar="DIR",
                   help="import an official C-EDM clustering, DIR = cluster_ids/<dataset>/<method>/clusters_<C>/"
                        "beta-<gamma> (cluster_ids.pt: one id per training image in the dataset's order; freq.pt: "
                        "torch.unique(ids, return_counts=True)[1], the counts of the used ids) as "
                        "cluster/<method>-C<C> (beta-1: add --ablation gamma1) instead of clustering: the ids are "
                        "checked against data/images.npy's count and C, freq against the ids' counts "
                        "(docs/method.md#cluster-import); then `cedm train --cond <method>-C<C>`")
    add_temi_args(p)
    p.add_argument("--max-iter", type=int, default=None, metavar="N",
                   help=f"k-means: most Lloyd iterations (default: {KMEANS_MAX_ITER})")
    p.set_defaults(func=_main)


def _main(args) -> int:
    tag = (subclass_tag(args.method, args.max_subclasses) if args.within_labels
           else ablation_folder(cluster_tag(args.method, args.clusters), args.ablation)
           if args.clusters is not None else None)
    with pipeline.reporting("cluster", args.pushgateway, run_dir=args.run_dir, cond=tag):
        if args.within_labels and args.import_dir is not None:
            raise CedmError("--import takes one clustering of all images, not --within-labels sub-classes")
        if args.within_labels:
            from cedm import subclass

            kw = {k: v for k, v in temi_kwargs(args).items() if v is not None and k in ("heads", "epochs",
                                                                                        "batch_size")}
            subclass.run(args.run_dir, args.method, args.max_subclasses, seed=args.seed,
                         force=args.force, temi_kwargs=kw or None)
            return 0
        if args.import_dir is not None:
            _import(args)
            return 0
        if args.method == "ap":
            raise CedmError("--method ap (affinity propagation) is for sub-classes: add --within-labels")
        if args.method in IMPORT_METHODS:
            raise CedmError(f"--method {args.method} names imported files (the official CLIP pseudo-labels): "
                            f"add --import DIR")
        if args.clusters is None:
            raise CedmError("--clusters C is required (or --within-labels for sub-classes)")
        run(args.run_dir, args.method, args.clusters, max_iter=args.max_iter, seed=args.seed,
            device=pipeline.resolve_device(args.device), force=args.force, ablation=args.ablation,
            **temi_kwargs(args))
    return 0


def _import(args) -> None:
    """`cedm cluster --import DIR` (cedm.cluster_import): no clustering runs, so its flags are refused."""
    from cedm import cluster_import, telemetry

    given = [k for k, v in {**temi_kwargs(args), "max_iter": args.max_iter}.items() if v is not None]
    if given:
        raise CedmError(f"--import clusters nothing: drop {', '.join('--' + k.replace('_', '-') for k in given)}")
    if args.clusters is None:
        raise CedmError("--import needs --clusters C (the C the files were made for: clusters_<C>)")
    s = cluster_import.run(args.run_dir, args.import_dir, args.method, args.clusters, ablation=args.ablation,
                           force=args.force, pushgateway=args.pushgateway)
    _set_gauges(telemetry, s)
