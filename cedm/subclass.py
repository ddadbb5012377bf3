"""Sub-class conditioning (ClusDiff, arXiv 2309.00199; docs/method.md#clusdiff).

Within each labelled class, cluster the images (affinity propagation as in ClusDiff, or TEMI /
k-means with a per-class C) into at most K sub-classes, and condition the generator on the flat
sub-class id. To generate class y, draw its sub-classes by their frequency within y. Classes too
small to split keep one sub-class.

Writes <run>/cluster/<method>-K<K>/ (the conditioning tag `<method>-K<K>`, K = the cap):
  assignments.npy [N] int64   flat sub-class ids in [0, S), S = total sub-classes
  summary.json                method, max_subclasses K, clusters S, classes, subclass_class [S]
                              (the class of each sub-class), within_freq [S] (frequency inside
                              its class), q [S] (global frequency), per_class [{class, size,
                              subclasses}], used_clusters, r_c
"""
from __future__ import annotations

import sys

import numpy as np

from cedm import conditioning, pipeline, temi
from cedm.cluster_metrics import cluster_metrics
from cedm.kmeans import euclidean_kmeans
from cedm.knn import cosine_knn
from cedm.io import CedmError, RunDir, load_array, load_json, save_array, save_json

METHODS = ("ap", "kmeans", "temi")
MIN_PER_SUBCLASS = 5          # a class is split only if every sub-class can hold this many images
SPLIT_SILHOUETTE = 0.25       # affinity propagation splits a class only above this silhouette


def _affinity_propagation(x: np.ndarray, max_sub: int, seed: int) -> np.ndarray:
    """Affinity propagation on cosine similarity (ClusDiff) with model selection.

    AP's preference sets how many exemplars it finds, and no single value suits every class: AP
    runs over a range of preferences (quantiles of the similarities, down to below the minimum),
    and the split with at most `max_sub` sub-classes and the best cosine silhouette is kept. A
    class stays whole when no split reaches a silhouette of SPLIT_SILHOUETTE (Kaufman &
    Rousseeuw: below 0.25 no substantial structure has been found).
    """
    import warnings

    from sklearn.cluster import AffinityPropagation
    from sklearn.metrics import silhouette_score

    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    s = u @ u.T
    off = s[~np.eye(len(s), dtype=bool)]
    lo, med = off.min(), np.median(off)
    best, best_score = np.zeros(len(x), dtype=np.int64), SPLIT_SILHOUETTE
    seen = set()
    for pref in (2 * lo - med, lo, *np.quantile(off, [0.1, 0.25, 0.5])):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning: a non-converged run is dropped below
            ap = AffinityPropagation(affinity="precomputed", preference=pref, random_state=seed,
                                     max_iter=400, convergence_iter=25)
            lab = ap.fit_predict(s)
        n_sub = len(np.unique(lab))
        if lab.min() < 0 or not 2 <= n_sub <= max_sub or n_sub in seen:
            continue
        seen.add(n_sub)
        score = silhouette_score(u, lab, metric="cosine")
        if score > best_score:
            best, best_score = lab, score
    return best


def split_class(x: np.ndarray, method: str, max_sub: int, seed: int, temi_kwargs: dict | None = None) -> np.ndarray:
    """Sub-class ids in [0, s) for the features of one class, s <= max_sub (1 if too small)."""
    n = len(x)
    k = min(max_sub, n // MIN_PER_SUBCLASS)
    if k < 2:
        return np.zeros(n, dtype=np.int64)
    if method == "ap":
        lab = _affinity_propagation(x, k, seed)
    elif method == "kmeans":                 # as `cedm cluster --method kmeans`: scikit-learn, Euclidean
        lab = euclidean_kmeans(x, k, seed=seed)["assignments"]
    else:
        nn = cosine_knn(x, min(10, n - 1))
        res = temi.train(x, nn, k, seed=seed, **(temi_kwargs or {}))
        lab = res["probs"].argmax(1)
    return np.unique(lab, return_inverse=True)[1].astype(np.int64)   # drop empty ids


def within_labels(features: np.ndarray, labels: np.ndarray, method: str = "ap", max_sub: int = 10,
                  seed: int = 0, temi_kwargs: dict | None = None, progress: bool = True) -> dict:
    """Cluster each labelled class separately into at most `max_sub` sub-classes."""
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise CedmError(f"unknown sub-class --method {method!r}; choose one of {', '.join(METHODS)}")
    if max_sub < 1:
        raise CedmError(f"--max-subclasses must be at least 1, got {max_sub}")
    if len(features) != len(labels):
        raise CedmError(f"feature and label counts differ: {len(features)} features, {len(labels)} labels")
    classes = np.unique(labels)
    assign = np.empty(len(labels), dtype=np.int64)
    subclass_class, per_class, offset = [], [], 0
    for y in tqdm(classes, desc=f"sub-classes ({method}, K<={max_sub})", file=sys.stderr,
                  disable=None if progress else True):
        idx = np.flatnonzero(labels == y)
        lab = split_class(np.asarray(features[idx], dtype=np.float32), method, max_sub, seed + int(y), temi_kwargs)
        s = int(lab.max()) + 1
        assign[idx] = offset + lab
        subclass_class += [int(y)] * s
        per_class.append({"class": int(y), "size": int(len(idx)), "subclasses": s})
        offset += s
    counts = np.bincount(assign, minlength=offset)
    cls = np.asarray(subclass_class)
    class_size = {p["class"]: p["size"] for p in per_class}
    within = [float(counts[i] / class_size[int(cls[i])]) for i in range(offset)]
    return {"assignments": assign, "clusters": offset, "classes": [int(c) for c in classes],
            "subclass_class": subclass_class, "within_freq": within,
            "q": (counts / counts.sum()).tolist(), "per_class": per_class}


def run(run_dir, method: str = "ap", max_sub: int = 10, seed: int = 0, force: bool = False,
        progress: bool = True, temi_kwargs: dict | None = None, pushgateway=None) -> dict:
    """`cedm cluster --within-labels`: sub-classes of every labelled class of the run's dataset."""
    rd = RunDir(run_dir)
    lab_file = rd.data / "labels.npy"
    if not lab_file.exists():
        raise CedmError(f"--within-labels needs class labels, but {lab_file} does not exist (unlabeled dataset)")
    config = {"method": method, "max_subclasses": int(max_sub), "seed": int(seed),
              "temi": temi_kwargs or {}}                  # inputs (data, features): cedm.pipeline
    out = conditioning.cluster_dir(run_dir, conditioning.subclass_tag(method, max_sub))

    def compute(work, _):
        feats = load_array(rd.features / "features.npy")
        labels = load_array(lab_file)
        if not np.isfinite(feats).all():
            raise CedmError("features contain NaN or inf; redo `cedm features`")
        res = within_labels(feats, labels, method, max_sub, seed, temi_kwargs, progress)
        summary = {k: v for k, v in res.items() if k != "assignments"}
        summary.update(method=method, max_subclasses=int(max_sub), used_clusters=res["clusters"], r_c=1.0,
                       seed=int(seed), **{f"{k}_vs_classes": v for k, v in
                                          cluster_metrics(labels, res["assignments"]).items()})
        save_array(work / "assignments.npy", res["assignments"])
        save_json(work / "summary.json", summary)
        print(f"cedm cluster: {len(res['classes'])} classes -> {res['clusters']} sub-classes ({method}, "
              f"at most {max_sub} each) -> {out}", file=sys.stderr)
        return pipeline.Output({"assignments": "assignments.npy", "summary": "summary.json"}, value=summary)

    res = pipeline.execute(pipeline.Stage("cluster", out, rd.root, config, [rd.data, rd.features]),
                           compute, force=force, pushgateway=pushgateway, quiet=True,
                           labels={"cond": out.name})
    if res.skipped:
        print(f"cedm cluster: {out} is up to date (same config); reused", file=sys.stderr)
        return {**load_json(out / "summary.json"), "reused": True}
    return {**res.value, "reused": False}


def class_subclasses(meta: dict, y: int) -> tuple[np.ndarray, np.ndarray]:
    """Model label indices of class y's sub-classes and their within-class frequencies."""
    sub_class = meta.get("subclass_class")
    if sub_class is None:
        raise CedmError(f"--class needs a sub-class model (conditioning <method>-K<K>), "
                        f"but {meta.get('tag', 'this checkpoint')} is not one")
    raw = np.asarray(meta["raw_labels"])
    cls = np.asarray(sub_class)[raw]
    pick = np.flatnonzero(cls == y)
    if len(pick) == 0:
        raise CedmError(f"class {y} does not exist in this model; classes are "
                        f"{', '.join(map(str, sorted(set(cls.tolist()))))}")
    w = np.asarray(meta["within_freq"])[raw[pick]]
    return pick, w / w.sum()


def balance_counts(class_counts: dict[int, int], target: int | None = None) -> dict[int, int]:
    """Images to generate per class to bring every class to `target` (default: the largest)."""
    if not class_counts:
        raise CedmError("no classes to balance")
    target = max(class_counts.values()) if target is None else int(target)
    if target < 1:
        raise CedmError(f"--balance-to must be at least 1, got {target}")
    return {y: max(0, target - n) for y, n in sorted(class_counts.items())}
