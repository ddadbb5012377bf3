"""`cedm cluster --import DIR`: an official C-EDM clustering as a cluster folder
(docs/method.md#cluster-import).

The official C-EDM repository ships, per dataset, method, C and TEMI gamma
(`cluster_ids/<dataset>/<method>/clusters_<C>/beta-<gamma>/`):
  cluster_ids.pt  a 1-d int64 (a few: int32) tensor, the cluster id of each training image in
                  the dataset's order;
  freq.pt         the int64 counts of the USED ids, torch.unique(ids, return_counts=True)[1]:
                  one entry per non-empty cluster in ascending id order, length C^u (not C).
Its training maps the ids to 0..C^u-1 by torch.unique's inverse (training/dataset.py,
_read_pseudo_labels) and its sampler draws labels with multinomial(freq.float()) (generate.py,
asserting label_dim == len(freq)). Here the ids become <run>/cluster/<method>-C<C>/ as `cedm
cluster` writes it (assignments.npy = the ids, summary.json with C^u, r_C = C^u / C and q(c) =
counts / N: the paper's Sec. 4), through the stage layer; `cedm train --cond <method>-C<C>` then
maps them by np.unique's inverse (cedm.conditioning), the same ascending order, and draws labels
from the same q. No head.safetensors: the files hold no head (`cedm evaluate` then reports no
confidence).

Checks (each a one-line CedmError, exit code 2): both files exist and load with
torch.load(weights_only=True) (no code runs); cluster_ids is a 1-d integer tensor (or a list /
ndarray of integers) with one id per prepared image (data/images.npy), no id negative, and
C >= the largest id + 1; freq is a 1-d integer tensor equal to the ids' unique counts.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from cedm import pipeline
from cedm.cluster_metrics import cluster_metrics, dataset_labels, utilisation
from cedm.conditioning import cluster_tag, is_tag
from cedm.io import CedmError, RunDir, ablation_folder, file_hash, load_array, load_json, save_array, save_json

IDS_FILE, FREQ_FILE = "cluster_ids.pt", "freq.pt"
FORMAT = "official C-EDM: cluster_ids.pt (one id per image) + freq.pt (unique counts of the used ids)"
_FREQ_RULE = "torch.unique(ids, return_counts=True)[1], the official format"


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
    """cluster_ids.pt as a 1-d int64 array: a 1-d integer tensor (int64, int32, ...), or a list /
    ndarray of integers."""
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


def load_counts(path: Path) -> np.ndarray:
    """freq.pt as a 1-d int64 array: a 1-d integer tensor (the official int64 counts)."""
    import torch

    obj = _load(path, f"the image count of each used cluster id, {_FREQ_RULE}")
    if not isinstance(obj, torch.Tensor):
        raise CedmError(f"--import: {path} holds a {type(obj).__name__}, not a tensor of cluster counts "
                        f"({_FREQ_RULE})")
    if obj.dtype.is_floating_point or obj.dtype.is_complex or obj.dtype == torch.bool:
        raise CedmError(f"--import: {path} holds a {obj.dtype} tensor; freq.pt must hold the integer image "
                        f"counts of the used cluster ids, {_FREQ_RULE}")
    if obj.ndim != 1:
        raise CedmError(f"--import: {path} has shape {tuple(obj.shape)}; freq.pt must be 1-d (one count per "
                        f"used cluster id)")
    return obj.numpy().astype(np.int64)


def check(ids: np.ndarray, counts: np.ndarray, clusters: int, num_images: int, ids_path, freq_path) -> None:
    """The checks against the prepared data, --clusters and each other (module docstring)."""
    if len(ids) != num_images:
        raise CedmError(f"--import: {ids_path} holds {len(ids)} cluster ids but the prepared dataset has "
                        f"{num_images} images (data/images.npy); import the files made for this dataset "
                        f"(one id per training image, in the dataset's order)")
    if ids.min() < 0:
        raise CedmError(f"--import: {ids_path} holds a negative cluster id ({int(ids.min())}); ids must be 0..C-1")
    if int(ids.max()) + 1 > clusters:
        raise CedmError(f"--import: {ids_path} holds cluster id {int(ids.max())}, so C must be at least "
                        f"{int(ids.max()) + 1}, but --clusters is {clusters}")
    used, want = np.unique(ids, return_counts=True)       # = torch.unique(ids, return_counts=True)
    if len(counts) != len(used):
        raise CedmError(f"--import: {freq_path} has {len(counts)} entries but the ids use C^u = {len(used)} "
                        f"clusters; freq.pt must be {_FREQ_RULE} (one count per used id, ascending)")
    bad = np.flatnonzero(counts != want)
    if len(bad):
        i = int(bad[0])
        raise CedmError(f"--import: {freq_path} disagrees with the ids: entry {i} (cluster id {int(used[i])}) is "
                        f"{int(counts[i])} but {int(want[i])} images have that id ({len(bad)} entries differ); "
                        f"the two files are not from the same clustering")


def run(run_dir, source, method: str, clusters: int, ablation: str | None = None, force: bool = False,
        pushgateway=None) -> dict:
    """Import <source>/cluster_ids.pt and freq.pt as <run>/cluster/<method>-C<clusters>[@ablation];
    returns the summary (+ "reused": bool). Skipped when the folder holds this import of the same files.

    method: any name of the tag grammar (temi, kmeans, clip, ...: what made the files);
    ablation "gamma1": TEMI files made with gamma = 1 (the official beta-1 folders, Table 5)."""
    clusters = int(clusters)
    if clusters < 2:
        raise CedmError(f"--clusters must be at least 2, got {clusters}")
    tag = cluster_tag(method, clusters)
    if not is_tag(tag):                                   # a method name the tags can hold
        raise CedmError(f"--import: --method {method!r} cannot name a conditioning tag <method>-C<C>; use lower-case "
                        f"letters, digits and '_' (e.g. temi, kmeans, clip)")
    if ablation not in (None, "gamma1"):
        raise CedmError(f"--import: unknown --ablation {ablation!r}; the official files hold gamma1 (beta-1)")
    if ablation == "gamma1" and method != "temi":
        raise CedmError(f"--ablation gamma1 is a TEMI ablation, not one of --method {method}")
    src = Path(source)
    if not src.is_dir():
        raise CedmError(f"--import {source}: no such folder (it must hold {IDS_FILE} and {FREQ_FILE})")
    ids_path, freq_path = src / IDS_FILE, src / FREQ_FILE
    for p, what in ((ids_path, "the cluster id of each training image"), (freq_path, "the counts of the used ids")):
        if not p.is_file():
            raise CedmError(f"--import: missing {p} ({what})")
    rd = RunDir(run_dir)
    # The files' sha256 are part of the config: the result does not depend on where they lie
    # (the run never reads them again), and a changed file is another import, refused unless --force.
    config = {"method": method, "clusters": clusters, "imported": FORMAT,
              "cluster_ids_sha256": file_hash(ids_path), "freq_sha256": file_hash(freq_path),
              **({"ablation": ablation} if ablation else {})}
    out = rd.cluster(method, clusters, ablation)

    def compute(work, _):
        n = len(load_array(rd.data / "images.npy", mmap=True))
        ids, counts = load_ids(ids_path), load_counts(freq_path)
        check(ids, counts, clusters, n, ids_path, freq_path)
        summary = {"method": method, "clusters": clusters, "num_samples": n, "imported": True,
                   "source": {"cluster_ids": str(ids_path), "freq": str(freq_path)},
                   **({"ablation": ablation, "gamma": 1.0} if ablation else {}),
                   **utilisation(ids, clusters)}                       # q(c) = counts / N (freq.pt's)
        for key, lab in dataset_labels(rd, n).items():
            summary.update({f"{m}{key}": v for m, v in cluster_metrics(lab, ids).items()})
        save_array(work / "assignments.npy", ids)
        save_json(work / "summary.json", summary)
        return pipeline.Output({"assignments": "assignments.npy", "summary": "summary.json"}, value=summary)

    res = pipeline.execute(pipeline.Stage("cluster", out, rd.root, config, [rd.data]), compute, force=force,
                           pushgateway=pushgateway, quiet=True, labels={"cond": ablation_folder(tag, ablation)})
    if res.skipped:
        print(f"cedm cluster: {out} is up to date (same import); reused", file=sys.stderr)
        return {**load_json(out / "summary.json"), "reused": True}
    s = res.value
    print(f"cedm cluster: imported {method} C={clusters}{' (' + ablation + ')' if ablation else ''} from {src}: "
          f"C^u={s['used_clusters']} r_C={s['r_c']:.3f} -> {out}", file=sys.stderr)
    return {**s, "reused": False}
