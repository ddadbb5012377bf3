"""The k-means baselines (docs/method.md#k-means).

- `euclidean_kmeans`: the paper's baseline as its official cluster files were made: scikit-learn
  `KMeans` (Euclidean, k-means++, n_init=10 restarts, the lowest inertia kept) on the raw,
  not normalised, features. `cedm cluster --method kmeans`.
- `kmeans`: cosine (spherical) k-means, one k-means++ init: Lloyd steps on L2-normalised features
  with mean-then-renormalise centroids; empty clusters are re-seeded with the points farthest
  from their centroids (as scikit-learn does). `cedm cluster --method skmeans`.
`CentroidHead` turns either's centroids into a classifier features -> one-hot, the k-means
counterpart of a TEMI head.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from torch import nn

from cedm.knn import _unit_rows

KMEANS_MAX_ITER = 300
KMEANS_N_INIT = 10          # scikit-learn restarts of the official baseline


def _unit(features, device) -> torch.Tensor:
    return _unit_rows(features, device)


def _best(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 16384):
    """For each row: the most cosine-similar centroid and that similarity (chunked)."""
    sims, idx = [], []
    for i in range(0, len(x), chunk):
        s = x[i:i + chunk] @ centroids.T
        v, j = s.max(dim=1)
        sims.append(v)
        idx.append(j)
    return torch.cat(sims), torch.cat(idx)


@torch.no_grad()
def kmeans_plus_plus(x: torch.Tensor, clusters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on unit rows: next centre drawn with probability ~ D^2 = 2 - 2 cos."""
    n = len(x)
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [first]
    d2 = (2 - 2 * (x @ x[first])).clamp_min_(0)
    for _ in range(1, clusters):
        w = d2.double().cpu()
        if w.sum() <= 0:                         # every point sits on a centre: uniform draw
            w = torch.ones(n, dtype=torch.float64)
        j = int(torch.multinomial(w, 1, generator=generator))
        centres.append(j)
        d2 = torch.minimum(d2, (2 - 2 * (x @ x[j])).clamp_min_(0))
    return x[centres].clone()


@torch.no_grad()
def kmeans(features, clusters: int, seed: int = 0, max_iter: int = KMEANS_MAX_ITER, device=None,
           progress: bool = False) -> dict:
    """Spherical k-means on L2-normalised features: Lloyd steps with mean-then-renormalise centroids.

    Empty clusters are re-seeded with the points farthest from their centroids (as scikit-learn
    does). Returns {"assignments" [N] int64, "centroids" [C,D], "loss" (mean 1 - cos to the
    assigned centroid), "iterations", "converged"}.
    """
    from tqdm import tqdm

    device = torch.device(device) if device is not None else torch.device("cpu")
    x = _unit(features, device)
    g = torch.Generator().manual_seed(int(seed))
    centroids = kmeans_plus_plus(x, clusters, g)
    assign = None
    converged, it = False, 0
    for it in tqdm(range(1, max_iter + 1), desc=f"k-means C={clusters}", file=sys.stderr,
                   disable=None if progress else True):
        sim, new = _best(x, centroids)
        if assign is not None and torch.equal(new, assign):
            converged = True
            break
        assign = new
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=clusters)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):                                   # relocate empty clusters
            far = torch.argsort(sim)[:len(empty)]         # least similar points first
            sums[empty] = x[far]
        centroids = torch.nn.functional.normalize(sums, dim=1)
    sim, assign = _best(x, centroids)
    return {"assignments": assign.cpu().numpy().astype(np.int64), "centroids": centroids.cpu(),
            "loss": float((1 - sim).double().mean()), "iterations": it, "converged": converged}


def euclidean_kmeans(features, clusters: int, seed: int = 0, max_iter: int = KMEANS_MAX_ITER,
                     n_init: int = KMEANS_N_INIT) -> dict:
    """scikit-learn KMeans (Euclidean, k-means++, `n_init` restarts) on the raw features.

    Returns the dict of `kmeans`: {"assignments" [N] int64, "centroids" [C,D], "loss" (mean
    squared Euclidean distance to the assigned centroid, inertia / N), "iterations",
    "converged"}. Deterministic for a seed (random_state).
    """
    from sklearn.cluster import KMeans

    x = np.asarray(features, dtype=np.float32)
    km = KMeans(n_clusters=int(clusters), n_init=int(n_init), max_iter=int(max_iter),
                random_state=int(seed)).fit(x)
    return {"assignments": km.labels_.astype(np.int64), "centroids": torch.from_numpy(km.cluster_centers_.astype(np.float32)),
            "loss": float(km.inertia_) / len(x), "iterations": int(km.n_iter_),
            "converged": bool(km.n_iter_ < max_iter)}


class CentroidHead(nn.Module):
    """k-means as a classifier: features [N,D] -> one-hot of the nearest centroid, by Euclidean
    distance (metric "euclidean", the `kmeans` method) or cosine similarity ("cosine", skmeans)."""

    def __init__(self, centroids: torch.Tensor, metric: str = "cosine"):
        super().__init__()
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"unknown centroid metric {metric!r}")
        self.metric = metric
        c = centroids.float()
        self.register_buffer("centroids", torch.nn.functional.normalize(c, dim=1) if metric == "cosine" else c)

    @property
    def clusters(self) -> int:
        return len(self.centroids)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.metric == "cosine":
            j = (torch.nn.functional.normalize(z.float(), dim=1) @ self.centroids.T).argmax(1)
        else:
            j = torch.cdist(z.float(), self.centroids).argmin(1)
        return torch.nn.functional.one_hot(j, self.clusters).float()

    @torch.no_grad()
    def predict(self, features, batch_size: int = 8192) -> np.ndarray:
        out = [self(torch.as_tensor(np.asarray(features[i:i + batch_size], np.float32),
                                    device=self.centroids.device)).cpu()
               for i in range(0, len(features), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.clusters), np.float32)
