"""Cluster metrics: utilisation (C^u, r_C, q(c)) and agreement with labels (ANMI, NMI, ACC).

r_C = C^u / C (docs/method.md#c-max). ANMI = adjusted (normalised) mutual information, NMI
(arithmetic normalisation), ACC = accuracy under the best one-to-one cluster->class matching
(Hungarian; with C != K only min(C, K) clusters can be matched), all from scikit-learn/scipy.
"""
from __future__ import annotations

import numpy as np

from cedm.io import CedmError


def utilisation(assignments, clusters: int) -> dict:
    """C^u = clusters with >= 1 sample, r_C = C^u / C, q(c) = empirical distribution of c*."""
    counts = np.bincount(np.asarray(assignments), minlength=clusters)
    used = int((counts > 0).sum())
    return {"used_clusters": used, "r_c": used / clusters, "q": (counts / counts.sum()).tolist()}


def hungarian_acc(labels, assignments) -> float:
    """Accuracy under the best one-to-one matching of clusters to classes (Hungarian)."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics.cluster import contingency_matrix

    cm = contingency_matrix(labels, assignments)               # [classes, clusters]
    rows, cols = linear_sum_assignment(cm, maximize=True)
    return float(cm[rows, cols].sum() / len(labels))


def cluster_metrics(labels, assignments) -> dict:
    """ANMI (adjusted NMI), NMI and Hungarian ACC of clusters against labels."""
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    labels, assignments = np.asarray(labels), np.asarray(assignments)
    if len(labels) != len(assignments):
        raise CedmError(f"{len(labels)} labels but {len(assignments)} assignments")
    return {"anmi": float(adjusted_mutual_info_score(labels, assignments)),
            "nmi": float(normalized_mutual_info_score(labels, assignments)),
            "acc": hungarian_acc(labels, assignments)}
