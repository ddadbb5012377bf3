"""Conditioning tags and the labels they give the training images (docs/method.md#c-edm).

One grammar, parsed here only:
  uncond            the unconditional model (one label, label_dim 0)
  labels            the dataset's ground-truth classes (data/labels.npy)
  labels:coarse     CIFAR-100's 20 coarse super-classes (data/coarse_labels.npy; the paper's Table 2);
                    its folders are named labels-coarse (`folder`), which parses back to it
  labels:clip       zero-shot CLIP pseudo-labels from the dataset's class names (<run>/clip/labels.npy,
                    `cedm clip-labels`; the paper's Table 2)
  labels:clip-coarse  CIFAR-100: the zero-shot over its 20 super-class names (<run>/clip/coarse_labels.npy;
                    Table 2's CLIP row at C = 20)
  <method>-C<C>     C clusters of `cedm cluster --method <method> --clusters C` (e.g. temi-C20),
                    read from <run>/cluster/<method>-C<C>/
  <method>-K<K>     ClusDiff sub-classes, at most K per labelled class (e.g. ap-K10), read from
                    <run>/cluster/<method>-K<K>/ (`cedm cluster --within-labels`)
The label map (raw id -> model index over the non-empty ids) and q(c) travel with each
checkpoint in network.json, so sampling draws labels exactly as training saw them.
Per-tag folders (train/, sample/, eval/) are named by `folder(tag)`: the tag itself, with no ':'.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cedm.io import CedmError, RunDir, load_array, load_json
from cedm.io import ablation_folder, split_ablation, tag_folder  # noqa: F401 (the run layout's; re-exported)

_TAG = re.compile(r"^(?P<method>[a-z0-9_]+)-(?P<kind>[CK])(?P<C>[0-9]+)$")
LABEL_SETS = {"coarse": "coarse_labels.npy"}     # labels:<set> -> its file in data/ (labels: labels.npy)
# labels:<set> made by a stage of their own -> (that stage's folder, its file, the command making it)
STAGE_LABEL_SETS = {
    "clip": ("clip", "labels.npy", "clip-labels"),                  # zero-shot CLIP pseudo-labels
    "clip-coarse": ("clip", "coarse_labels.npy", "clip-labels"),    # ... over CIFAR-100's 20 super-classes
}


def label_set_names() -> list[str]:
    """Every <set> of a 'labels:<set>' tag."""
    return [*LABEL_SETS, *STAGE_LABEL_SETS]


class Tag(NamedTuple):
    """A parsed conditioning tag; unpacks as (kind, method, count)."""
    kind: str                  # "uncond" | "labels" | "clusters" | "subclasses"
    method: str | None         # clustering method (temi, kmeans, skmeans, ap) for clusters /
                               # sub-classes; the label set ("coarse") for labels:<set>
    count: int | None  # type: ignore[assignment]  # C or K (shadows tuple.count, by design)

    def __str__(self) -> str:
        if self.kind == "labels" and self.method:
            return f"labels:{self.method}"
        if self.kind in ("uncond", "labels"):
            return self.kind
        return f"{self.method}-{'C' if self.kind == 'clusters' else 'K'}{self.count}"


def parse_tag(cond: str) -> Tag:
    """'uncond' | 'labels' | 'labels:coarse' | '<method>-C<C>' | '<method>-K<K>' -> Tag(kind, method, C or K).

    '<method>-K<K>' are ClusDiff sub-classes (at most K per labelled class, cedm.subclass).
    'labels-coarse' (the folder name of labels:coarse) parses as labels:coarse.
    """
    if cond in ("uncond", "labels"):
        return Tag(cond, None, None)
    for sep in (":", "-"):
        head, _, label_set = str(cond).partition(sep)
        if head == "labels" and label_set in label_set_names():
            return Tag("labels", label_set, None)
    m = _TAG.match(str(cond))
    if not m:
        raise CedmError(f"unknown --cond {cond!r}: use 'uncond', 'labels', "
                        + ", ".join(f"'labels:{k}'" for k in label_set_names()) + ", '<method>-C<C>' "
                        "(e.g. temi-C20) or '<method>-K<K>' for sub-classes (e.g. ap-K10)")
    return Tag("clusters" if m["kind"] == "C" else "subclasses", m["method"], int(m["C"]))


def is_tag(cond: str) -> bool:
    try:
        parse_tag(cond)
        return True
    except CedmError:
        return False


def folder(cond: str) -> str:
    """The folder name of a tag under train/, sample/, eval/: the tag, ':' written '-'
    (labels:coarse -> labels-coarse, which parse_tag reads back). Other strings pass unchanged."""
    return tag_folder(str(parse_tag(cond))) if is_tag(cond) else str(cond)


# Ablations (the paper's Tables 4 and 5): a variant of one stage's result, kept beside it in the
# folder <tag>@<name> (cedm.io.ablation_folder), so the sweep can run it next to the method and the
# report show it as a row.
ABLATIONS = {
    "uniform": ("sample", "Table 4: cluster labels drawn uniformly at sampling instead of from q(c)"),
    "gamma1": ("cluster", "Table 5: TEMI with gamma = 1 (no exponent against collapse): its C^u is a lower bound"),
}


def check_ablation(ablation: str | None, stage: str) -> None:
    """A one-line CedmError unless `ablation` is None or an ablation of `stage`."""
    if ablation is None:
        return
    of = {"evaluate": "sample"}.get(stage, stage)          # evaluate scores a sample ablation
    ok = [a for a, (st, _) in ABLATIONS.items() if st == of]
    if ablation not in ok:
        raise CedmError(f"unknown --ablation {ablation!r} for this stage; choose {', '.join(ok) or 'none'}")


def cluster_tag(method: str, clusters: int) -> str:
    return str(Tag("clusters", method, int(clusters)))


def subclass_tag(method: str, max_subclasses: int) -> str:
    return str(Tag("subclasses", method, int(max_subclasses)))


def cluster_dir(run_dir, cond: str) -> Path | None:
    """The clustering a tag conditions on: <run>/cluster/<tag> (clusters, sub-classes); None otherwise."""
    t = parse_tag(cond)
    return RunDir(run_dir).root / "cluster" / str(t) if t.kind in ("clusters", "subclasses") else None


def cluster_of(cond: str):
    """(method, C) for '<method>-C<C>'; None for 'labels', 'uncond' and sub-classes."""
    t = parse_tag(cond)
    return (t.method, t.count) if t.kind == "clusters" else None


def sort_key(cond: str):
    """Order for tables and plots: cluster tags by (method, C), then the rest by name."""
    t = parse_tag(cond) if is_tag(cond) else None
    return (0, t.method, t.count) if t is not None and t.kind == "clusters" else (1, str(cond), 0)


def telemetry_label(cond: str) -> str:
    """The `clusters` label of the training series: the C, the sub-class tag, or the kind
    (labels:coarse for the coarse labels)."""
    t = parse_tag(cond)
    return str(t.count) if t.kind == "clusters" else (str(t) if t.kind in ("subclasses", "labels") else t.kind)


def label_tags(run_dir) -> list[str]:
    """The ground-truth label conditionings a prepared dataset offers: 'labels' (data/labels.npy)
    and 'labels:<set>' for each other label file (CIFAR-100's coarse labels: the paper's Table 2)."""
    data = RunDir(run_dir).data
    tags = ["labels"] if (data / "labels.npy").exists() else []
    tags += [f"labels:{k}" for k, f in LABEL_SETS.items() if (data / f).exists()]
    root = RunDir(run_dir).root
    return tags + [f"labels:{k}" for k, (d, f, _) in STAGE_LABEL_SETS.items()
                   if (root / d / "manifest.json").exists() and (root / d / f).exists()]


def conditioning(run_dir, cond: str, num_images: int) -> dict:
    """Labels of the training images for a tag: model index per image, label map, q over labels.

    Labels are remapped to 0..C^u-1 over the non-empty clusters (label_dim = C^u; C^u = 1 is the
    unconditional model, label_dim 0). q(c) is the clustering's (its summary), else empirical.
    `inputs`: the stage folders the labels come from (for the stage layer's identity).
    """
    rd = RunDir(run_dir)
    kind, method, C = parse_tag(cond)
    inputs, q_raw, sub = [], None, {}
    if kind == "subclasses":
        cdir = rd.root / "cluster" / str(parse_tag(cond))   # cluster_dir(): clusters, sub-classes
        if not (cdir / "manifest.json").exists():
            raise CedmError(f"no sub-classes {cdir} (run `cedm cluster --run-dir {run_dir} --within-labels "
                            f"--method {method} --max-subclasses {C}` first)")
        summary = load_json(cdir / "summary.json")
        C = int(summary["clusters"])                          # total sub-classes S
        raw = load_array(cdir / "assignments.npy").astype(np.int64)
        if raw.size and (raw.min() < 0 or raw.max() >= C):
            raise CedmError(f"{cdir}/assignments.npy has ids outside [0, {C})")
        q_raw = np.asarray(summary["q"], dtype=np.float64)
        sub = dict(subclass_class=summary["subclass_class"], within_freq=summary["within_freq"])
        inputs.append(cdir)
    elif kind == "uncond":
        raw = np.zeros(num_images, dtype=np.int64)
    elif kind == "labels" and method in STAGE_LABEL_SETS:       # e.g. labels:clip, <run>/clip/labels.npy
        sub_dir, name, command = STAGE_LABEL_SETS[method]
        ldir = rd.root / sub_dir
        if not (ldir / "manifest.json").exists() or not (ldir / name).exists():
            raise CedmError(f"--cond labels:{method} needs {ldir / name} (run `cedm {command} --run-dir {run_dir}` "
                            f"first" + ("; CIFAR-100 only" if method == "clip-coarse" else "") + ")")
        raw = load_array(ldir / name).astype(np.int64)
        inputs.append(ldir)
    elif kind == "labels":
        f = rd.data / LABEL_SETS.get(method or "", "labels.npy")            # method: the label set, if any
        if not f.exists():
            raise CedmError(f"--cond {parse_tag(cond)} needs {f.name}, but {f} does not exist "
                            + ("(this dataset has no coarse labels; CIFAR-100 has)" if method
                               else "(this dataset is unlabeled)"))
        raw = load_array(f).astype(np.int64)
    else:
        cdir = rd.root / "cluster" / str(parse_tag(cond))   # cluster_dir(): clusters, sub-classes
        if not (cdir / "manifest.json").exists():
            raise CedmError(f"no clustering {cdir} (run `cedm cluster --run-dir {run_dir} --method "
                            f"{method} --clusters {C}` first)")
        raw = load_array(cdir / "assignments.npy").astype(np.int64)
        if raw.size and (raw.min() < 0 or raw.max() >= C):
            raise CedmError(f"{cdir}/assignments.npy has ids outside [0, {C})")
        summary = load_json(cdir / "summary.json")
        if "q" in summary and len(summary["q"]) == C:
            q_raw = np.asarray(summary["q"], dtype=np.float64)
        inputs.append(cdir)
    if raw.shape != (num_images,):
        raise CedmError(f"{cond}: {raw.shape[0]} labels for {num_images} images; redo the stage that made them")
    ids, index, counts = np.unique(raw, return_inverse=True, return_counts=True)
    q = counts / counts.sum()                               # empirical q(c) over non-empty clusters
    if q_raw is not None and q_raw[ids].sum() > 0:
        q = q_raw[ids] / q_raw[ids].sum()                   # q(c) from the clustering summary
    label_dim = len(ids) if len(ids) > 1 else 0             # C^u = 1: unconditional
    return dict(kind=kind, method=method, C=C, label_dim=label_dim, raw_labels=ids.tolist(),
                label_map={str(int(r)): i for i, r in enumerate(ids)}, q=q.tolist(),
                index=index.astype(np.int64), inputs=inputs, **sub)
