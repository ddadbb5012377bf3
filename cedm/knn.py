"""`cedm knn`: each point's m nearest neighbours by cosine similarity (the paper's Sec. 3, TEMI inputs; docs/method.md#temi).

A TEMI training pair is (x, x') with x' drawn uniformly from the neighbours of x. The search is
exact and brute force over symmetric blocks of the similarity matrix (each block computed once,
used for its rows and its columns) with a running top-k per row, so memory is bounded by one
block plus N x k; the point itself is excluded by index (duplicates of a point stay valid
neighbours). Runs on the GPU when one is given.
Output: <run>/knn/knn.npy [N,k] int64, neighbours in decreasing similarity.

Also the k-NN classifier accuracy of the features (`knn_accuracy`, the paper's Table 3: k = 20,
T = 0.02 as TEMI's gen_embeds.py, held-out split against the training features), which `cedm
features` reports.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

from cedm import pipeline
from cedm.io import CedmError, RunDir, load_array, save_array

SIM_BUDGET = {"cpu": 256 << 20, "cuda": 2 << 30}   # bytes for one block of similarities


def check_features(features, name: str = "features") -> None:
    """Clear errors for arrays TEMI/k-means/kNN cannot use (numpy or torch, checked in chunks)."""
    if features.ndim != 2:
        raise CedmError(f"{name} must be a 2-d [N,D] array, got shape {tuple(features.shape)}")
    if len(features) == 0 or features.shape[1] == 0:
        raise CedmError(f"{name} are empty (shape {tuple(features.shape)})")
    bad = []
    for i in range(0, len(features), 65536):
        part = features[i:i + 65536]
        ok = torch.isfinite(part).all(1) if isinstance(part, torch.Tensor) else np.isfinite(part).all(1)
        bad += (np.flatnonzero(np.asarray(~ok.cpu() if isinstance(ok, torch.Tensor) else ~ok)) + i).tolist()
    if bad:
        raise CedmError(f"{name} contain NaN/inf in {len(bad)} row(s) (first: {bad[:5]})")


def _unit_rows(features, device) -> torch.Tensor:
    """float32 L2-normalised rows on `device`, copied in chunks (bounded host memory)."""
    n, d = features.shape
    out = torch.empty((n, d), dtype=torch.float32, device=device)
    for i in range(0, n, 65536):
        part = features[i:i + 65536]
        part = part if isinstance(part, torch.Tensor) else torch.from_numpy(np.array(part, np.float32))
        out[i:i + len(part)] = torch.nn.functional.normalize(part.to(device, torch.float32), dim=1)
    return out


def _auto_block(n: int, device: torch.device) -> int:
    """Block size b so that one b x b block of similarities fits the memory budget."""
    return int(max(1, min(n, math.isqrt(SIM_BUDGET.get(device.type, 256 << 20) // 4))))


def _merge(vals, idx, new_vals, new_idx, k):
    """Running top-k: keep the k largest of the current and the new candidates."""
    v, j = torch.cat([vals, new_vals], 1).topk(k, dim=1)
    return v, torch.cat([idx, new_idx], 1).gather(1, j)


@torch.no_grad()
def cosine_knn(features, k: int, chunk: int | None = None, device=None, progress: bool = False) -> np.ndarray:
    """Indices [N,k] int64 of the k most cosine-similar other points of each row, self excluded.

    Exact and brute force over symmetric blocks: the similarity block S_ij = U_i U_j^T (unit rows)
    is computed once for i <= j and serves the rows of block i and, transposed, those of block j,
    so only half of the N^2 D multiply-adds are done; a running top-k per row keeps memory at one
    b x b block plus N x k. The diagonal of each diagonal block is excluded by index.
    """
    from tqdm import tqdm

    device = torch.device(device) if device is not None else torch.device("cpu")
    check_features(features)
    n = len(features)
    if k < 1:
        raise CedmError(f"k must be at least 1, got {k}")
    if k >= n:
        raise CedmError(f"k={k} neighbours need at least k+1 points, got N={n} (self is excluded)")
    if chunk is not None and chunk < 1:
        raise CedmError(f"--chunk must be at least 1, got {chunk}")
    u = _unit_rows(features, device)                               # z / ||z||
    b = chunk or _auto_block(n, device)
    starts = list(range(0, n, b))
    vals = torch.full((n, k), -float("inf"), device=device)
    idx = torch.full((n, k), -1, dtype=torch.int64, device=device)
    pairs = [(i, j) for a, i in enumerate(starts) for j in starts[a:]]
    for i, j in tqdm(pairs, desc="knn blocks", file=sys.stderr, disable=None if progress else True):
        ui, uj = u[i:i + b], u[j:j + b]
        sim = ui @ uj.T                                            # cosine similarities [bi,bj]
        if i == j:
            sim.fill_diagonal_(-float("inf"))                      # exclude self by index
        kk = min(k, sim.shape[1])
        v, c = sim.topk(kk, dim=1)                                 # candidates for rows of block i
        vals[i:i + b], idx[i:i + b] = _merge(vals[i:i + b], idx[i:i + b], v, c + j, k)
        if i != j:                                                 # the same block, transposed
            kk = min(k, sim.shape[0])
            v, c = sim.T.contiguous().topk(kk, dim=1)              # candidates for rows of block j
            vals[j:j + b], idx[j:j + b] = _merge(vals[j:j + b], idx[j:j + b], v, c + i, k)
    return idx.cpu().numpy()


# ----------------------------------------------------------------------------------------------
# The k-NN classifier of the features (the paper's Table 3; docs/method.md#knn-accuracy)

KNN_CLASSIFIER_K = 20          # Table 3: a 20-NN classifier
# The authors' embedding script (TEMI's gen_embeds.py) reports k = 20 at its --temperature default
# T = 0.02: the headline. DINO's weighted k-NN evaluation uses T = 0.07: recorded beside it.
KNN_TEMPERATURE = 0.02
DINO_KNN_TEMPERATURE = 0.07


@torch.no_grad()
def _neighbours(train_feats, test_feats, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine similarities, training indices) [M,k] of each held-out query's k most similar
    training features, most similar first: TEMI's knn_classifier's normalise + topk, done once for
    every vote rule. Copies the inputs (they may be read-only memory maps)."""
    def unit(a):
        return torch.nn.functional.normalize(torch.from_numpy(np.array(a, np.float32)), dim=1, p=2)

    x, q = unit(train_feats).t(), unit(test_feats)
    parts = [(q[i:i + chunk] @ x).topk(k, largest=True, sorted=True) for i in range(0, len(q), chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@torch.no_grad()
def knn_classifier(distances: torch.Tensor, retrieved: torch.Tensor, targets: torch.Tensor, temperature: float,
                   num_classes: int, chunk: int = 1024) -> tuple[float, float]:
    """(top-1, top-5) accuracy in [0, 1] of TEMI's eval_cluster_utils.knn_classifier, restated op by
    op from its neighbours (`_neighbours`: cosine similarities `distances` [M,k], sorted, and the
    neighbours' labels `retrieved` [M,k]): each votes exp(cos / T) for its label (one-hot times
    weight, summed over the k), classes sorted by their summed votes. Labels are 0..num_classes-1
    (a query whose `targets` label is -1 counts as wrong). Top-5 counts the first min(5, k,
    num_classes) classes: TEMI's narrows to min(5, k) and fails with fewer than 5 classes
    (docs/method.md#knn-accuracy)."""
    m, k = retrieved.shape
    top1 = top5 = 0
    for i in range(0, m, chunk):
        b = len(retrieved[i:i + chunk])
        one_hot = torch.zeros(b * k, num_classes).scatter_(1, retrieved[i:i + chunk].reshape(-1, 1), 1)
        weights = distances[i:i + chunk].div(temperature).exp().view(b, -1, 1)
        votes = (one_hot.view(b, -1, num_classes) * weights).sum(1)
        _, predictions = votes.sort(1, True)
        correct = predictions.eq(targets[i:i + chunk].view(-1, 1))
        top1 += int(correct.narrow(1, 0, 1).sum())
        top5 += int(correct.narrow(1, 0, min(5, k, num_classes)).sum())
    return top1 / m, top5 / m


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k: int = KNN_CLASSIFIER_K,
                 temperature: float = KNN_TEMPERATURE) -> dict:
    """Table 3's k-NN accuracy of held-out features against training features (docs/method.md#knn-accuracy):
    `accuracy` / `accuracy_top5` as TEMI's gen_embeds.py computes it (knn_classifier, T = 0.02),
    `dino` the same at DINO's T = 0.07, and `accuracy_majority` one vote per neighbour (ties: the
    smallest label), all three from the same k neighbours. Labels may be any integers; the classes
    are the training labels'."""
    check_features(train_feats, "training features")
    check_features(test_feats, "held-out features")
    train_labels, test_labels = np.asarray(train_labels).reshape(-1), np.asarray(test_labels).reshape(-1)
    if len(train_labels) != len(train_feats) or len(test_labels) != len(test_feats):
        raise CedmError(f"k-NN accuracy: {len(train_feats)} training features with {len(train_labels)} labels, "
                        f"{len(test_feats)} held-out features with {len(test_labels)} labels")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise CedmError(f"k-NN accuracy: training features are {train_feats.shape[1]}-d, held-out "
                        f"{test_feats.shape[1]}-d")
    if not 1 <= k <= len(train_feats):
        raise CedmError(f"k-NN accuracy: k={k} needs 1 <= k <= {len(train_feats)} training features")
    if not temperature > 0:
        raise CedmError(f"k-NN accuracy: the temperature must be positive, got {temperature}")
    classes, ytr = np.unique(train_labels, return_inverse=True)           # labels -> 0..K-1
    pos = np.searchsorted(classes, test_labels).clip(0, len(classes) - 1)
    yte = torch.from_numpy(np.where(classes[pos] == test_labels, pos, -1).astype(np.int64))   # unseen: never right
    out = {"k": int(k), "temperature": float(temperature), "metric": "cosine", "rule": "TEMI gen_embeds.py",
           "num_train": int(len(train_feats)), "num_test": int(len(test_feats))}
    distances, indices = _neighbours(train_feats, test_feats, k)
    retrieved = torch.from_numpy(ytr.reshape(-1).astype(np.int64))[indices]     # the neighbours' labels [M,k]
    out["accuracy"], out["accuracy_top5"] = knn_classifier(distances, retrieved, yte, temperature, len(classes))
    top1, top5 = knn_classifier(distances, retrieved, yte, DINO_KNN_TEMPERATURE, len(classes))
    out["dino"] = {"temperature": DINO_KNN_TEMPERATURE, "accuracy": top1, "accuracy_top5": top5}
    # one vote per neighbour: T -> infinity weighs them equally; ties (argmax: the first) -> smallest label
    counts = torch.zeros(len(retrieved), len(classes)).scatter_add_(1, retrieved, torch.ones(retrieved.shape))
    out["accuracy_majority"] = int((counts.argmax(1) == yte).sum()) / len(yte)
    return out


def run(run_dir, k: int | None = None, chunk: int | None = None, device=None, force: bool = False,
        pushgateway=None) -> dict:
    """Mine <run>/knn/knn.npy from <run>/features; skips when done. Returns {"config", "skipped"}."""
    from cedm.config import run_preset

    rd = RunDir(run_dir)
    k = int(k if k is not None else run_preset(run_dir).knn_k)
    if k < 1:
        raise CedmError(f"--k must be at least 1, got {k}")
    if chunk is not None and chunk < 1:
        raise CedmError(f"--chunk must be at least 1, got {chunk}")
    config = {"k": k}

    def compute(work, _):
        feats = load_array(rd.features / "features.npy", mmap=True)
        nn = cosine_knn(feats, k, chunk=chunk, device=device, progress=True)
        save_array(work / "knn.npy", nn)
        print(f"cedm knn: {nn.shape[0]} x {k} neighbours -> {rd.knn}/knn.npy", file=sys.stderr)
        return pipeline.Output({"knn": "knn.npy"}, {"shape": list(nn.shape)})

    res = pipeline.execute(pipeline.Stage("knn", rd.knn, rd.root, config, [rd.features]), compute,
                           force=force, pushgateway=pushgateway)
    return {"config": config, "skipped": res.skipped}


def register(sub) -> None:
    p = sub.add_parser("knn", help="cosine k-nearest neighbours of the features (self excluded)",
                       description=__doc__.split("\n\n")[0] + " Writes <run>/knn/knn.npy [N,k] int64.")
    pipeline.add_common(p)
    p.add_argument("--k", type=int, default=None, metavar="N",
                   help="neighbours per point (default: the preset's, 50; digits 10); must be < N")
    p.add_argument("--chunk", type=int, default=None, metavar="N",
                   help="block size b: one b x b block of similarities at a time (default: from a "
                        "memory budget of 256 MiB on CPU (b=8192), 2 GiB on GPU (b=23170))")
    p.set_defaults(func=_main)


def _main(args) -> int:
    with pipeline.reporting("knn", args.pushgateway, run_dir=args.run_dir):
        run(args.run_dir, k=args.k, chunk=args.chunk, device=pipeline.resolve_device(args.device),
            force=args.force)
    return 0
