"""`cedm cluster --import DIR`: the official C-EDM clusterings as a cluster folder
(docs/method.md#cluster-import).

The official C-EDM code ships, per dataset and C, `cluster_ids.pt` (the cluster id of each
training image, in the dataset's order) and `freq.pt` (q(c) of each id). This turns them into the
folder `cedm cluster` writes, <run>/cluster/<method>-C<C>/ (assignments.npy, summary.json with
C^u, r_C = C^u / C and q(c): the paper's Sec. 4, docs/method.md#c-max), through the stage layer,
so `cedm train --cond <method>-C<C>` trains on them. No head.safetensors: the files hold no head
(`cedm evaluate` then reports no confidence).

Checks (each a one-line CedmError, exit code 2): both files exist and load with
torch.load(weights_only=True) (no code runs); cluster_ids is a 1-d integer tensor (or a list /
ndarray of integers) with one id per prepared image (data/images.npy), no id negative, and
C >= the largest id + 1; freq is a 1-d floating tensor of length C, finite, and equal to the
empirical frequency of the ids, bincount(ids, C) / N, within FREQ_ATOL per entry.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from cedm import pipeline
from cedm.io import CedmError, RunDir, file_hash, load_array, save_array, save_json

IDS_FILE, FREQ_FILE = "cluster_ids.pt", "freq.pt"
# freq.pt must be the ids' empirical frequency (docs/method.md#cluster-import): a float32 q(c)
# computed from the same ids is within ~1e-7 of it, so 1e-5 only lets rounding through.
FREQ_ATOL = 1e-5


def _load(path: Path, what: str):
    """torch.load with weights_only=True (tensors and plain containers only, no code)."""
    import pickle

    import torch

    if not path.is_file():
        raise CedmError(f"--import: missing {path} ({what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CedmError(f"--import: {path} does not load with torch.load(weights_only=True) (only tensors "
                        f"are accepted, no pickled objects): {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CedmError(f"--import: cannot read {path} (truncated or not a torch.save file): {first}") from None


def load_ids(path: Path) -> np.ndarray:
    """cluster_ids.pt as a 1-d int64 array: a 1-d integer tensor, or a list / ndarray of integers."""
    import torch

    obj = _load(path, "the cluster id of each training image")
    if isinstance(obj, torch.Tensor):
        if obj.dtype.is_floating_point or obj.dtype.is_complex or obj.dtype == torch.bool:
            raise CedmError(f"--import: {path} holds a {obj.dtype} tensor; cluster ids must be integers")
        arr = obj.numpy()
    elif isinstance(obj, (list, tuple, np.ndarray)):
        try:
            arr = np.asarray(obj)
        except ValueError:
            arr = np.asarray([], dtype=object)
        if arr.dtype.kind not in "iu":
            raise CedmError(f"--import: {path} holds a {type(obj).__name__} that is not a 1-d array of "
                            f"integers; cluster ids must be integers")
    else:
        raise CedmError(f"--import: {path} holds a {type(obj).__name__}, not a tensor of cluster ids")
    if arr.ndim != 1:
        raise CedmError(f"--import: {path} has shape {tuple(arr.shape)}; cluster ids must be 1-d (one per image)")
    return arr.astype(np.int64)


def load_freq(path: Path) -> np.ndarray:
    """freq.pt as a 1-d float64 array (a 1-d floating tensor)."""
    import torch

    obj = _load(path, "the frequency q(c) of each cluster id")
    if not isinstance(obj, torch.Tensor):
        raise CedmError(f"--import: {path} holds a {type(obj).__name__}, not a tensor of frequencies")
    if not obj.dtype.is_floating_point:
        raise CedmError(f"--import: {path} holds a {obj.dtype} tensor; frequencies must be floating point")
    if obj.ndim != 1:
        raise CedmError(f"--import: {path} has shape {tuple(obj.shape)}; freq must be 1-d (one per cluster id)")
    return obj.double().numpy()


def check(ids: np.ndarray, freq: np.ndarray, clusters: int, num_images: int, ids_path, freq_path) -> float:
    """The checks against the prepared data, --clusters and each other; returns max |freq - empirical|."""
    if len(ids) != num_images:
        raise CedmError(f"--import: {ids_path} holds {len(ids)} cluster ids but the prepared dataset has "
                        f"{num_images} images (data/images.npy); import the files made for this dataset")
    if ids.min() < 0:
        raise CedmError(f"--import: {ids_path} holds a negative cluster id ({int(ids.min())}); ids must be 0..C-1")
    if int(ids.max()) + 1 > clusters:
        raise CedmError(f"--import: {ids_path} holds cluster id {int(ids.max())}, so C must be at least "
                        f"{int(ids.max()) + 1}, but --clusters is {clusters}")
    if len(freq) != clusters:
        raise CedmError(f"--import: {freq_path} has {len(freq)} entries; freq length must be C = --clusters "
                        f"{clusters}")
    if not np.isfinite(freq).all():
        raise CedmError(f"--import: {freq_path} holds a non-finite frequency")
    empirical = np.bincount(ids, minlength=clusters) / len(ids)
    diff = np.abs(freq - empirical)
    if diff.max() > FREQ_ATOL:
        c = int(diff.argmax())
        raise CedmError(f"--import: {freq_path} disagrees with the ids: freq[{c}] = {freq[c]:.6g} but cluster "
                        f"{c} holds a fraction {empirical[c]:.6g} of the ids (freq must be the ids' empirical "
                        f"frequency within {FREQ_ATOL:g}); the two files are not from the same clustering")
    return float(diff.max())


def run(run_dir, source, method: str, clusters: int, force: bool = False, pushgateway=None) -> dict:
    """Import <source>/cluster_ids.pt and freq.pt as <run>/cluster/<method>-C<clusters>; returns the
    summary (+ "reused": bool). Skipped when the folder holds this import of the same files."""
    from cedm.cluster import METHODS, _load_labels
    from cedm.cluster_metrics import cluster_metrics, utilisation
    from cedm.conditioning import cluster_tag

    if method not in METHODS:
        raise CedmError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    clusters = int(clusters)
    if clusters < 2:
        raise CedmError(f"--clusters must be at least 2, got {clusters}")
    src = Path(source)
    if not src.is_dir():
        raise CedmError(f"--import {source}: no such folder (it must hold {IDS_FILE} and {FREQ_FILE})")
    ids_path, freq_path = src / IDS_FILE, src / FREQ_FILE
    for p, what in ((ids_path, "the cluster id of each training image"), (freq_path, "q(c) of each id")):
        if not p.is_file():
            raise CedmError(f"--import: missing {p} ({what})")
    rd = RunDir(run_dir)
    # The files' sha256 are part of the config: the result does not depend on where they lie
    # (the run never reads them again), and a changed file is another import, refused unless --force.
    config = {"method": method, "clusters": clusters, "imported": "official C-EDM cluster_ids.pt + freq.pt",
              "cluster_ids_sha256": file_hash(ids_path), "freq_sha256": file_hash(freq_path),
              "freq_atol": FREQ_ATOL}
    out = rd.cluster(method, clusters)

    def compute(work, _):
        images = load_array(rd.data / "images.npy", mmap=True)
        n = len(images)
        ids, freq = load_ids(ids_path), load_freq(freq_path)
        diff = check(ids, freq, clusters, n, ids_path, freq_path)
        summary = {"method": method, "clusters": clusters, "num_samples": n, "imported": True,
                   "source": {"cluster_ids": str(ids_path), "freq": str(freq_path)},
                   "freq_max_abs_diff": diff, **utilisation(ids, clusters)}
        for key, lab in _load_labels(rd, n).items():
            summary.update({f"{m}{key}": v for m, v in cluster_metrics(lab, ids).items()})
        save_array(work / "assignments.npy", ids)
        save_json(work / "summary.json", summary)
        return pipeline.Output({"assignments": "assignments.npy", "summary": "summary.json"}, value=summary)

    res = pipeline.execute(pipeline.Stage("cluster", out, rd.root, config, [rd.data]), compute, force=force,
                           pushgateway=pushgateway, quiet=True, labels={"cond": cluster_tag(method, clusters)})
    if res.skipped:
        from cedm.io import load_json

        print(f"cedm cluster: {out} is up to date (same import); reused", file=sys.stderr)
        return {**load_json(out / "summary.json"), "reused": True}
    s = res.value
    from cedm import telemetry
    from cedm.cluster import _set_gauges

    _set_gauges(telemetry, s)
    print(f"cedm cluster: imported {method} C={clusters} from {src}: C^u={s['used_clusters']} "
          f"r_C={s['r_c']:.3f} -> {out}", file=sys.stderr)
    return {**s, "reused": False}
