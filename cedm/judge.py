"""A local judge for labelled datasets: the Fréchet distance in a small classifier's features,
and its class predictions, which measure how well conditioning conditions (`consistency`).

Where no Inception-v3 / DINOv2 weights can be had (the built-in 8-px digits), the backbone's
Fréchet distance is the FD in raw pixels, a weak judge (docs/results/digits-conditioning.md).
As MNIST-FID practice does, `classifier_extractor` trains a small classifier on the run's own
labelled training images and takes its hidden layer as the feature space. This is not FID and its
values are not comparable to the paper's numbers (docs/method.md#evaluation).

The classifier: one hidden layer of HIDDEN ReLU units on the grey pixels (the channel mean,
/255, minus the training mean image, over the training pixels' std), trained with Adam for a
fixed number of steps on CPU with one torch thread and seeded initialisation and batches, so the
same training set gives bit-identical weights and features. A torch MLP rather than
scikit-learn's MLPClassifier (the earlier investigation's, 98.1% on held-out digits) for a fixed
cost (STEPS x BATCH whatever the dataset size: ~1-3 s at 8 or 16 px, a few s at 32 px, one thread),
float32 features on the evaluation device, and weights kept as plain arrays. A seeded
HOLDOUT fraction of the (at most MAX_IMAGES, seeded subsample) training images is held out
of the fit; the accuracy on it is cached with the weights and exposed as `.accuracy`.

Cached once per dataset in <run>/eval/_reference/classifier-<data manifest hash>-v<VERSION>-s<seed>.npz
(arrays only, written atomically); `cedm evaluate` and `cedm curve` share it.
"""
from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cedm.io import CedmError, RunDir, file_hash, load_array, load_npz, write_bytes

VERSION = 1          # bump when the classifier's design changes (a new cache file)
SEED = 0
HIDDEN = 128         # feature dimension
STEPS = 1500         # Adam steps of BATCH images
BATCH = 128
LR = 1e-3
WEIGHT_DECAY = 1e-4
HOLDOUT = 0.1        # fraction of the training images held out to measure the accuracy
MAX_IMAGES = 20_000  # training images used at most (a seeded subsample above)


def _grey(images: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W,C] (or [N,H,W]) -> float32 [N,H*W] grey in 0..1."""
    x = np.asarray(images)
    if x.ndim == 4:
        x = x.astype(np.float32).mean(-1)
    return (x.reshape(len(x), -1) / np.float32(255.0)).astype(np.float32)


class ClassifierExtractor:
    """uint8 [N,H,W,3] -> float32 [N,HIDDEN]: the hidden ReLU layer of the cached classifier.

    accuracy: its accuracy on the held-out training images; trained: whether this call fitted it
    (False when it came from the cache); path: the cache file; cache_tag: names this classifier
    (version and seed) in the file names of statistics computed in its features."""

    def __init__(self, arrays: dict, path: Path, trained: bool, device=None):
        self.device = torch.device(device or "cpu")
        self.path, self.trained = Path(path), trained
        self.cache_tag = "-".join(self.path.stem.rsplit("-", 2)[-2:])      # "v<VERSION>-s<seed>"
        self.shape = tuple(int(s) for s in arrays["shape"])
        self.accuracy = float(arrays["accuracy"])
        self.n_train, self.n_holdout = int(arrays["n_train"]), int(arrays["n_holdout"])
        self.classes = np.asarray(arrays["classes"])
        t = {k: torch.from_numpy(np.asarray(arrays[k], dtype=np.float32)).to(self.device)
             for k in ("mean", "scale", "w1", "b1", "w2", "b2")}
        self.mean, self.scale, self.w1, self.b1 = t["mean"], t["scale"], t["w1"], t["b1"]
        self.w2, self.b2 = t["w2"], t["b2"]

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if tuple(images.shape[1:3]) != self.shape:
            raise CedmError(f"the classifier judge was trained on {self.shape[0]}x{self.shape[1]} images, "
                            f"got {images.shape[1]}x{images.shape[2]}")
        out = []
        for i in range(0, len(images), 4096):
            x = torch.from_numpy(_grey(images[i:i + 4096])).to(self.device)
            out.append(torch.relu(((x - self.mean) / self.scale) @ self.w1.T + self.b1).cpu().numpy())
        if not out:
            return np.zeros((0, self.w1.shape[0]), np.float32)
        return np.concatenate(out).astype(np.float32)

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,H,W,3] -> int64 [N]: the class (a value of data/labels.npy) the classifier
        assigns to each image (argmax of its output layer on the hidden features)."""
        h = torch.from_numpy(self(images)).to(self.device)
        if not len(h):
            return np.zeros(0, np.int64)
        return self.classes[(h @ self.w2.T + self.b2).argmax(1).cpu().numpy()].astype(np.int64)


def majority_class(groups: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    """{group: the most common label among the images of that group} (ties: the smaller label).
    For ground-truth label groups each class is its own majority."""
    groups, labels = np.asarray(groups, np.int64), np.asarray(labels, np.int64)
    out = {}
    for g in np.unique(groups):
        vals, counts = np.unique(labels[groups == g], return_counts=True)
        out[int(g)] = int(vals[np.argmax(counts)])
    return out


def consistency(judged: np.ndarray, groups: np.ndarray, majority: dict[int, int]) -> dict:
    """Class/cluster consistency (docs/method.md#consistency): the share of images of group c (a
    cluster, a class, a sub-class) that the judge assigns to c's majority class, over all images
    ("rate") and per group ({c: [rate, images]}); a group without a majority class (none of its
    training images labelled) counts as inconsistent."""
    judged, groups = np.asarray(judged, np.int64), np.asarray(groups, np.int64)
    target = np.array([majority.get(int(g), -1) for g in groups], np.int64)
    hit = judged == target
    per = {int(g): [float(hit[groups == g].mean()), int((groups == g).sum())] for g in np.unique(groups)}
    return {"rate": float(hit.mean()) if len(hit) else float("nan"), "per_group": per}


def _fit(images: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """Train the classifier (CPU, one thread, seeded): its weights, normalisation and accuracy."""
    rng = np.random.default_rng(seed)
    n = len(images)
    if n > MAX_IMAGES:
        idx = np.sort(rng.choice(n, MAX_IMAGES, replace=False))
        images, labels, n = np.asarray(images[idx]), labels[idx], MAX_IMAGES
    classes, y = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise CedmError("the classifier judge needs at least two classes in data/labels.npy")
    perm = rng.permutation(n)
    n_hold = max(1, int(round(HOLDOUT * n)))
    hold, fit = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])
    x = _grey(images)
    mean = x[fit].mean(0)
    scale = np.float32(max(float((x[fit] - mean).std()), 1e-6))
    xt = torch.from_numpy((x - mean) / scale)
    yt = torch.from_numpy(y.astype(np.int64))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)                     # same sums, same weights, on any machine
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], HIDDEN), torch.nn.ReLU(),
                                      torch.nn.Linear(HIDDEN, len(classes)))
        opt = torch.optim.Adam(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        order = np.zeros(0, np.int64)
        for _ in range(STEPS):
            if len(order) < BATCH:
                order = np.concatenate([order, fit[rng.permutation(len(fit))]])
            b, order = torch.from_numpy(order[:BATCH]), order[BATCH:]
            loss = torch.nn.functional.cross_entropy(net(xt[b]), yt[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = net(xt[torch.from_numpy(hold)]).argmax(1).numpy()
    finally:
        torch.set_num_threads(threads)
    w1, b1 = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    w2, b2 = net[2].weight.detach().numpy(), net[2].bias.detach().numpy()
    return {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "mean": mean, "scale": np.asarray(scale),
            "classes": classes, "shape": np.asarray(images.shape[1:3], np.int64),
            "accuracy": np.asarray(float((pred == y[hold]).mean())),
            "n_train": np.asarray(len(fit)), "n_holdout": np.asarray(n_hold), "seed": np.asarray(seed),
            "version": np.asarray(VERSION)}


def cache_path(run_dir, seed: int = SEED) -> Path:
    """Where the classifier of this run's dataset is cached (keyed by the data manifest's hash)."""
    rd = RunDir(run_dir)
    data_hash = file_hash(rd.data / "manifest.json")[:16]
    return rd.root / "eval" / "_reference" / f"classifier-{data_hash}-v{VERSION}-s{seed}.npz"


def classifier_extractor(run_dir, device=None, seed: int = SEED) -> ClassifierExtractor:
    """The classifier judge's feature extractor for this run: trained once per dataset on
    data/images.npy + data/labels.npy, then loaded from the cache. CedmError without labels."""
    rd = RunDir(run_dir)
    if not (rd.data / "labels.npy").exists():
        raise CedmError(f"the classifier judge needs a labelled dataset ({rd.data / 'labels.npy'} is missing); "
                        f"use --metric fid, fdd or backbone instead")
    path = cache_path(run_dir, seed)
    if path.exists():
        try:
            return ClassifierExtractor(load_npz(path), path, trained=False, device=device)
        except CedmError:                      # a damaged cache is made again, never an error --force keeps
            print(f"cedm: {path} does not load (truncated or corrupt); training the classifier judge again",
                  file=sys.stderr)
    images = load_array(rd.data / "images.npy", mmap=True)
    labels = load_array(rd.data / "labels.npy")
    if len(labels) != len(images):
        raise CedmError(f"{rd.data}: {len(images)} images but {len(labels)} labels")
    t0 = time.perf_counter()
    arrays = _fit(images, labels, seed)
    arrays["fit_seconds"] = np.asarray(time.perf_counter() - t0)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())
    return ClassifierExtractor(arrays, path, trained=True, device=device)
