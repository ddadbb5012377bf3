"""Cluster metrics: utilisation (C^u, r_C, q(c)) and agreement with labels (ACC, ARI, NMI, ANMI).

Whose definition each follows (docs/method.md#cluster-metrics):
- r_C = C^u / C: the paper's Sec. 4 (docs/method.md#c-max).
- acc: TEMI's cluster accuracy: the best one-to-one cluster->class matching (Hungarian), then
  every cluster left unmatched (C > number of classes) counts as its majority class, so
  over-clustering a class into pure clusters is not an error.
- acc_hungarian: the strict one-to-one accuracy (only min(C, K) clusters can be right).
- ari, nmi (arithmetic normalisation), anmi (adjusted mutual information): scikit-learn's.
The matching is scipy's linear_sum_assignment on scikit-learn's contingency matrix.
"""
from __future__ import annotations

import numpy as np

from cedm.io import CedmError

LABEL_METRICS = ("acc", "acc_hungarian", "ari", "nmi", "anmi")


def utilisation(assignments, clusters: int) -> dict:
    """C^u = clusters with >= 1 sample, r_C = C^u / C, q(c) = empirical distribution of c*."""
    counts = np.bincount(np.asarray(assignments), minlength=clusters)
    used = int((counts > 0).sum())
    return {"used_clusters": used, "r_c": used / clusters, "q": (counts / counts.sum()).tolist()}


def _matching(labels, assignments):
    """(contingency [classes, clusters], matched rows, matched cols) of the Hungarian matching."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics.cluster import contingency_matrix

    cm = contingency_matrix(labels, assignments)               # [classes, clusters], non-empty only
    rows, cols = linear_sum_assignment(cm, maximize=True)
    return cm, rows, cols


def hungarian_acc(labels, assignments) -> float:
    """Accuracy under the best one-to-one matching of clusters to classes (Hungarian)."""
    cm, rows, cols = _matching(labels, assignments)
    return float(cm[rows, cols].sum() / len(labels))


def temi_acc(labels, assignments) -> float:
    """TEMI's cluster accuracy (docs/method.md#cluster-metrics): the Hungarian matching, then each
    cluster it leaves unmatched mapped to its majority class (100 pure clusters on 10 classes: 1.0)."""
    cm, rows, cols = _matching(labels, assignments)
    left = np.setdiff1d(np.arange(cm.shape[1]), cols)          # clusters the matching could not use
    return float((cm[rows, cols].sum() + cm[:, left].max(0).sum()) / len(labels))


def cluster_metrics(labels, assignments) -> dict:
    """ACC (TEMI's), ACC one-to-one, ARI, NMI and ANMI of clusters against labels."""
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score

    labels, assignments = np.asarray(labels), np.asarray(assignments)
    if len(labels) != len(assignments):
        raise CedmError(f"{len(labels)} labels but {len(assignments)} assignments")
    if len(labels) == 0:
        raise CedmError("no labelled samples to score the clusters on")
    return {"anmi": float(adjusted_mutual_info_score(labels, assignments)),
            "nmi": float(normalized_mutual_info_score(labels, assignments)),
            "ari": float(adjusted_rand_score(labels, assignments)),
            "acc": temi_acc(labels, assignments),
            "acc_hungarian": hungarian_acc(labels, assignments)}


def label_metrics(summary: dict, suffix: str = "") -> dict:
    """The label metrics of a cluster summary under today's names ({} when it has none).

    Summaries written before TEMI's ACC was adopted hold the one-to-one accuracy under "acc" and
    no "acc_hungarian": that value is returned as acc_hungarian, and acc (TEMI's) as None."""
    out = {m: summary.get(m + suffix) for m in LABEL_METRICS}
    if out["acc"] is not None and ("acc_hungarian" + suffix) not in summary:
        out["acc_hungarian"], out["acc"] = out["acc"], None
    return out if any(v is not None for v in out.values()) else {}


def dataset_labels(rd, n: int) -> dict:
    """The prepared dataset's label files a clustering of its n images is scored on: {"": labels,
    "_coarse": CIFAR-100's 20 super-classes} (those that exist; the suffix of their summary keys)."""
    from cedm.io import load_array

    out = {}
    for name, key in (("labels", ""), ("coarse_labels", "_coarse")):
        path = rd.data / f"{name}.npy"
        if path.exists():
            lab = load_array(path)
            if len(lab) != n:
                raise CedmError(f"feature and label counts differ: {n} features but {len(lab)} {name} "
                                f"in {path}; redo `cedm features` for this dataset")
            out[key] = lab
    return out
