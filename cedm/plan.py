"""Sweep planning, in one place for `cedm sweep`, the report and the Argo workflow (argo/sweep.yaml).

- `sweep_plan` / `resolve`: which C's to cluster, which candidate C's may be trained, the training
  budget and the evaluation sizes: the dataset's preset (cedm/config.py) overridden by the user's
  values, with every impossible combination rejected before any work starts (`cedm plan`).
- `conditionings`: after the bound, what is trained: the baselines (unconditional, ground-truth
  labels when the dataset has them) and every candidate C <= C_max (`cedm conds`).
- `pick_c_v` / `verdict`: C_V, the number of clusters whose C-EDM has the lowest mean Fréchet
  distance (searched in [2, C_max), docs/bound.md), and where it lies relative to C_max.

The C_max search itself (its rounds of C's) is `cedm.bound.next_round` (docs/bound.md).
"""
from __future__ import annotations

import json
import math
import re
import sys

from cedm.conditioning import label_tags, sort_key
from cedm.io import CedmError, RunDir, load_json, write_bytes

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
RUNS = "/data/runs"                 # where the Argo sweep's run directories live (the data volume)
TRAIN_CPU_PER_GPU = 8               # training pod resources per GPU (argo/train.yaml podSpecPatch)
TRAIN_MEMORY_GIB_PER_GPU = 64


def int_list(value, flag: str) -> list[int] | None:
    """Sorted distinct cluster counts from '10, 5,5', '[10, 20]' or a list; None for ''/None."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().removeprefix("[").removesuffix("]").replace(" ", "")
        if not text:
            return None
        items = [t for t in text.split(",") if t]
    else:
        items = list(value)
    try:
        vals = sorted({int(t) for t in items})
    except (TypeError, ValueError):
        raise CedmError(f"{flag} must be a comma-separated list of integers, got {value!r}") from None
    if not vals or min(vals) < 2:
        raise CedmError(f"{flag} needs cluster counts >= 2, got {value!r}")
    return vals


def _number(value, flag: str, kind=float):
    """A number from a flag whose empty value means 'the preset's' (Argo passes '' for unset)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise CedmError(f"{flag} must be a {'number' if kind is float else 'whole number'}, got {value!r}") from None


def sweep_plan(pre, clusters=None, candidates=None, mimg=None, gpus: int = 1, batch=None, nodes: int = 1) -> dict:
    """The sweep of preset `pre` with the user's overrides (None = the preset's), checked.
    gpus: per training pod (node); nodes: the nodes of one training (Kubeflow Trainer past one).

    Returns {clusters, candidates, c_start, mimg, batch, gpus, nodes, num, sets, sample_num}.
    """
    clusters = int_list(clusters, "--clusters") or sorted(set(pre.clusters))
    candidates = int_list(candidates, "--candidates") or sorted(set(pre.candidates))
    missing = sorted(set(candidates) - set(clusters))
    if missing:
        raise CedmError(f"candidate C = {', '.join(map(str, missing))} not in the cluster list {clusters}: "
                        f"every trained C needs its clustering; add it to --clusters")
    mimg = _number(mimg, "--mimg")
    mimg = float(pre.mimg if mimg is None else mimg)
    if not mimg > 0 or math.isinf(mimg):
        raise CedmError(f"--mimg must be a positive number of millions of images, got {mimg}")
    gpus = _number(gpus, "--gpus", int)
    gpus = 1 if gpus is None else gpus
    if gpus < 1:
        raise CedmError(f"--gpus must be at least 1, got {gpus}")
    nodes = _number(nodes, "--nodes", int)
    nodes = 1 if nodes is None else nodes
    if nodes < 1:
        raise CedmError(f"--nodes must be at least 1, got {nodes}")
    batch = _number(batch, "--batch", int)
    batch = int(pre.batch if batch is None else batch)
    if batch < 1:
        raise CedmError(f"--batch must be at least 1, got {batch}")
    if batch % (gpus * nodes):
        over = f"{gpus} GPUs" if nodes == 1 else f"{nodes * gpus} processes ({nodes} nodes x {gpus} GPUs)"
        raise CedmError(f"the global batch {batch} is not divisible by {over}; choose --gpus"
                        f"{'' if nodes == 1 else '/--nodes'} dividing {batch} or another --batch")
    return {"clusters": clusters, "candidates": candidates, "c_start": min(pre.c_start, min(clusters)),
            "mimg": mimg, "batch": batch, "gpus": gpus, "nodes": nodes, "num": pre.fid_samples, "sets": pre.fid_sets,
            "sample_num": pre.fid_samples * pre.fid_sets}


def resolve(dataset: str, run=None, clusters=None, candidates=None, mimg=None, gpus: int = 1, batch=None,
            source=None, runs: str = RUNS, nodes: int = 1, clip_labels: str = "") -> dict:
    """The Argo sweep's plan: one value per output parameter of argo/sweep.yaml's plan template."""
    from cedm.config import preset

    pre = preset(dataset)
    run = (run or "").strip() or dataset
    if not RUN_NAME.fullmatch(run):
        raise CedmError(f"--run must be a plain directory name (letters, digits, . _ -), got {run!r}")
    from cedm.data import SOURCE_DATASETS

    if dataset in SOURCE_DATASETS and not (source or "").strip():
        raise CedmError(f"{dataset} has no official download: pass --source (the images-64x64 folder or zip)")
    p = sweep_plan(pre, clusters, candidates, mimg, gpus, batch, nodes)
    clip_labels = (clip_labels or "").strip() or str(pre.clip_labels).lower()   # "": the preset's (Table 2)
    if clip_labels not in ("true", "false"):
        raise CedmError(f"--clip-labels must be true, false or empty (the preset's), got {clip_labels!r}")
    return {"run-dir": f"{runs.rstrip('/')}/{run}", "clusters": json.dumps(p["clusters"]),
            "candidates": json.dumps(p["candidates"]), "c-start": p["c_start"], "mimg": p["mimg"],
            "num": p["num"], "sets": p["sets"], "sample-num": p["sample_num"],
            "train-cpu": TRAIN_CPU_PER_GPU * p["gpus"], "train-memory": f"{TRAIN_MEMORY_GIB_PER_GPU * p['gpus']}Gi",
            "clip-labels": clip_labels}


def conditionings(candidates, c_max: int | None, method: str = "temi", baselines: bool = True,
                  labels: bool | list[str] = False) -> tuple[list[str], list[int]]:
    """What to train after the bound: baselines + '<method>-C<C>' for every candidate C <= C_max.

    labels: the dataset's label conditionings (cedm.conditioning.label_tags: 'labels', and
    'labels:coarse' on CIFAR-100, the paper's Table 2); True means ['labels'].
    C_max None (no bound reached) keeps every candidate. Returns (conds, candidates left out)."""
    candidates = int_list(candidates, "--candidates") or []
    chosen = [c for c in candidates if c_max is None or c <= c_max]
    if not chosen:
        raise CedmError(f"no candidate C <= C_max = {c_max} among {candidates}; pass smaller --candidates")
    label_conds = ["labels"] if labels is True else list(labels or [])
    base = (["uncond"] + label_conds) if baselines else []
    return base + [f"{method}-C{c}" for c in chosen], sorted(set(candidates) - set(chosen))


# A conditioning beats the unconditional model when its mean Fréchet distance is lower by at least
# BEATS_SIGMA standard errors of the difference (docs/method.md#verdict); within that it ties.
BEATS_SIGMA = 2.0


def versus(m: dict, base: dict) -> dict:
    """How a model's evaluation `m` compares with `base` (the unconditional model's), both
    {"mean", "std", "sets"} over independent sample sets (docs/method.md#verdict):

        delta = mean_base - mean_m          (> 0: m has the lower, better, FD)
        sigma = sqrt(std_m^2 / sets_m + std_base^2 / sets_base)     the difference's standard error
        z     = delta / sigma

    outcome: "beats" (z >= BEATS_SIGMA), "worse" (z <= -BEATS_SIGMA), "ties" (in between), or
    "no noise estimate" when either side has fewer than two sets (its std is unknown)."""
    n_m, n_b = int(m.get("sets", len(m.get("values", [])) or 1)), int(base.get("sets", len(base.get("values", [])) or 1))
    delta = float(base["mean"]) - float(m["mean"])
    out = {"mean": float(m["mean"]), "std": float(m.get("std", 0.0)), "sets": n_m, "delta": delta}
    if n_m < 2 or n_b < 2:
        return {**out, "sigma": None, "z": None, "outcome": "no noise estimate"}
    sigma = math.sqrt(float(m["std"]) ** 2 / n_m + float(base["std"]) ** 2 / n_b)
    z = delta / sigma if sigma > 0 else (math.inf if delta > 0 else -math.inf if delta < 0 else 0.0)
    outcome = "beats" if z >= BEATS_SIGMA else ("worse" if z <= -BEATS_SIGMA else "ties")
    return {**out, "sigma": sigma, "z": z, "outcome": outcome}


def _candidates(metrics: dict[str, dict], method: str, c_max: int | None) -> dict[int, dict]:
    """{C: metrics} of the evaluated '<method>-C<C>' with C <= C_max (ablations left out)."""
    from cedm.conditioning import cluster_of, is_tag

    out = {}
    for cond, m in metrics.items():
        if "@" in cond or not is_tag(cond):  # an ablation (cedm.conditioning.ABLATIONS), not a candidate
            continue
        cl = cluster_of(cond)
        if cl is not None and cl[0] == method and (c_max is None or cl[1] <= c_max):
            out[cl[1]] = m
    return out


def pick_c_v(metrics: dict[str, dict], method: str, c_max: int | None = None) -> tuple[int | None, dict]:
    """The number of clusters with the lowest mean Fréchet distance among the evaluated
    '<method>-C<C>' with C <= C_max (docs/bound.md: C_V is searched below the bound; a model of a
    C above it, e.g. left from an earlier bound, is never picked). C_max None: every C.
    `verdict` applies it to the C's that beat the unconditional model."""
    cands = _candidates(metrics, method, c_max)
    if not cands:
        return None, {}
    best = min(sorted(cands), key=lambda c: cands[c]["mean"])
    return best, cands[best]


def _metric_key(metrics: dict[str, dict], prefer: str | None = None) -> str | None:
    """The one metric a verdict ranks by: `prefer` when evaluations use it, else the unconditional
    model's, else the one most evaluations use (never a mix: docs/method.md#verdict)."""
    keys = [m.get("metric") for m in metrics.values()]
    if prefer and prefer in keys:
        return prefer
    if "uncond" in metrics:
        return metrics["uncond"].get("metric")
    return max(sorted(set(keys), key=str), key=keys.count) if keys else None


def _sigma_text(z) -> str:
    if z is None:
        return "σ unknown"
    return "∞ σ" if math.isinf(z) else f"{z:+.1f} σ".replace("+-", "−").replace("-", "−")


def verdict(run_dir, method: str = "temi", metric: str | None = None) -> dict:
    """The sweep's verdict from the bound table and the evaluations on disk (docs/method.md#verdict).

    Every evaluated conditioning is compared with the unconditional model (`versus`); C_V is the
    '<method>-C<C>' (C <= C_max) with the lowest Fréchet distance among those that beat it.
    case: "beats" (C_V found), "none beats" (no clustered model beats the unconditional one: c_v
    None, best_c the lowest FD all the same), "no baseline" (no unconditional model evaluated:
    C_V by the lowest FD alone), "no noise estimate" (fewer than two sample sets: likewise),
    "no model" (no clustered model evaluated). Evaluations in another metric than the verdict's
    (`metric`: a metric key as metrics.json stores it, e.g. "classifier_fd"; default the
    unconditional model's) are listed in other_metrics and never ranked."""
    rd = RunDir(run_dir)
    table = rd.bound / "table.json"
    c_max = load_json(table).get("c_max") if table.exists() else None
    every = {}
    if (rd.root / "eval").exists():
        for d in sorted((rd.root / "eval").iterdir()):
            if (d / "manifest.json").exists():
                every[d.name] = load_json(d / "metrics.json")
    key = _metric_key(every, metric)
    metrics = {k: m for k, m in every.items() if m.get("metric") == key}
    other = {k: m.get("metric") for k, m in every.items() if m.get("metric") != key}
    base = metrics.get("uncond")
    comparisons = {k: versus(m, base) for k, m in metrics.items() if k != "uncond"} if base else {}
    cands = _candidates(metrics, method, c_max)
    best_c, best = pick_c_v(metrics, method, c_max)
    label = (best or base or next(iter(metrics.values()), {})).get("label", "FD")
    base_mean = float(base["mean"]) if base else math.nan
    if best_c is None:
        case, c_v = "no model", None
    elif base is None:
        case, c_v = "no baseline", best_c
    elif comparisons[f"{method}-C{best_c}"]["z"] is None:
        case, c_v = "no noise estimate", best_c
    else:
        beating = {c: m for c, m in cands.items() if comparisons[f"{method}-C{c}"]["outcome"] == "beats"}
        c_v = pick_c_v({f"{method}-C{c}": m for c, m in beating.items()}, method, c_max)[0]
        case = "beats" if c_v is not None else "none beats"

    if c_v is None or c_max is None:
        bound_text = "" if c_v is None else "C_max unknown (no bound computed, or r_C stayed above alpha)"
    else:
        bound_text = (f"C_V = {c_v} {'<' if c_v < c_max else ('=' if c_v == c_max else '>')} C_max = {c_max}"
                      + (f", {math.log2(c_max / c_v):.1f} doublings below the bound" if c_v < c_max else ""))
    if case == "no model":
        text = f"no {method}-C<C> model evaluated"
    elif case == "beats":
        cmp = comparisons[f"{method}-C{c_v}"]
        text = (f"C_V = {c_v} beats the unconditional model by {_sigma_text(cmp['z'])} (FD "
                f"{cmp['mean']:.3f} against {base_mean:.3f})")
    elif case == "none beats":
        cmp = comparisons[f"{method}-C{best_c}"]
        text = (f"no {method} conditioning beats the unconditional model at this budget (best: C = {best_c}, "
                f"{_sigma_text(cmp['z'])}; FD {cmp['mean']:.3f} against {base_mean:.3f})")
    elif case == "no baseline":
        text = f"C_V = {c_v} by the lowest {label}; no unconditional model evaluated to compare with"
    else:
        text = (f"C_V = {c_v} by the lowest {label}; fewer than two sample sets, so the noise is unknown "
                f"and no comparison with the unconditional model is made")
    others = [f"{k} {_sigma_text(v['z'])}" for k, v in sorted(comparisons.items(), key=lambda t: sort_key(t[0]))
              if "@" not in k and not (cands and k == f"{method}-C{c_v}")]     # ablations: rows of their own
    out = {"method": method, "c_max": c_max, "c_v": c_v, "best_c": best_c, "case": case,
           "metric": key, "metric_label": label, "beats_sigma": BEATS_SIGMA,
           "verdict": text + (f"; {bound_text}" if bound_text else ""), "bound_verdict": bound_text,
           "against_uncond": ", ".join(others),
           "comparisons": comparisons, "other_metrics": other,
           "fd": {k: {"mean": v["mean"], "std": v["std"]} for k, v in metrics.items()}}
    if base and best:
        out["gain_vs_uncond"] = base["mean"] - best["mean"]
    return out


def _write_outputs(outputs, values: dict) -> None:
    """One file per output parameter (Argo reads `valueFrom.path`), each written atomically."""
    from pathlib import Path

    for name, value in values.items():
        write_bytes(Path(outputs) / name, str(value).encode())


def register(sub) -> None:
    from cedm import pipeline
    from cedm.config import PRESETS

    p = sub.add_parser("plan", help="resolve a sweep (preset + overrides) and reject impossible inputs",
                       description="The sweep of a dataset preset with the given overrides (empty values "
                                   "take the preset's): the C's to cluster, the candidate C's to train, "
                                   "C_start, the training budget, evaluation sizes and training pod "
                                   "resources. Impossible inputs fail here, before any work. Prints the "
                                   "plan as JSON; --outputs writes one file per value (Argo outputs).")
    p.add_argument("--dataset", required=True, choices=tuple(PRESETS), help="dataset preset")
    p.add_argument("--run", default="", metavar="NAME",
                   help="run directory name under --runs (default: the dataset's name)")
    p.add_argument("--runs", default=RUNS, metavar="DIR", help="root of the run directories (default: %(default)s)")
    p.add_argument("--source", default="", metavar="PATH_OR_URL",
                   help="dataset archive, folder or zip (ffhq64 and afhqv2-64 need one)")
    p.add_argument("--clusters", default="", metavar="LIST", help="C's to cluster (default: the preset's)")
    p.add_argument("--candidates", default="", metavar="LIST",
                   help="C's to train C-EDM for when C <= C_max; each must be in the cluster list "
                        "(default: the preset's)")
    p.add_argument("--mimg", default="", help="training budget per model in Mimg (default: the preset's)")
    p.add_argument("--gpus", default="1", help="GPUs per training pod (default: %(default)s)")
    p.add_argument("--nodes", default="1", help="nodes per training, each with --gpus GPUs; more than 1 trains "
                                                "through Kubeflow Trainer (default: %(default)s)")
    p.add_argument("--clip-labels", default="", choices=("", "true", "false"),
                   help="also train on CLIP pseudo-labels (labels:clip, Table 2) (default: the preset's, true "
                        "for cifar100)")
    p.add_argument("--batch", default="", help="global training batch (default: the preset's); "
                                               "must be divisible by --nodes x --gpus")
    p.add_argument("--outputs", default=None, metavar="DIR", help="also write one file per plan value to DIR")
    p.set_defaults(func=_plan_main)

    c = sub.add_parser("conds", help="the conditionings to train after the bound: baselines + C <= C_max",
                       description="Read C_max from <run>/bound/table.json and list the conditionings to "
                                   "train: uncond and labels (when the dataset has labels) unless "
                                   "--baselines false, and <method>-C<C> for every candidate C <= C_max. "
                                   "Prints {c-max, conds} as JSON; --outputs writes c-max and conds files.")
    pipeline.add_run_dir(c)                     # the last run prepared, as for every stage
    c.add_argument("--candidates", required=True, metavar="LIST", help="candidate C's (comma list or JSON list)")
    c.add_argument("--method", default="temi", choices=("temi", "kmeans", "skmeans"), help="clustering (default: %(default)s)")
    c.add_argument("--baselines", default="true", choices=("true", "false"),
                   help="also train the unconditional and label models (default: %(default)s)")
    c.add_argument("--outputs", default=None, metavar="DIR", help="also write c-max and conds files to DIR")
    c.set_defaults(func=_conds_main)


def _plan_main(args) -> int:
    plan = resolve(args.dataset, args.run, args.clusters, args.candidates, args.mimg, args.gpus, args.batch,
                   args.source, args.runs, args.nodes, args.clip_labels)
    if args.outputs:
        _write_outputs(args.outputs, plan)
    print(json.dumps(plan, indent=1))
    return 0


def _conds_main(args) -> int:
    rd = RunDir(args.run_dir)
    table = rd.bound / "table.json"
    c_max = load_json(table).get("c_max") if table.exists() else None
    conds, left_out = conditionings(args.candidates, c_max, args.method, args.baselines == "true",
                                    label_tags(rd.root))
    out = {"c-max": "none" if c_max is None else str(c_max), "conds": json.dumps(conds)}
    if args.outputs:
        _write_outputs(args.outputs, out)
    if left_out:
        print(f"cedm conds: C_max = {c_max}: not training C = {left_out}", file=sys.stderr)
    print(json.dumps({"c-max": c_max, "conds": conds}))
    return 0
