"""The sweep report: one self-contained HTML page (images inlined) and a Markdown twin.

In the order a reader needs it: the verdict (every conditioning against the unconditional model
and the set-to-set noise, on one metric, stated: cedm.plan.verdict), the r_C-vs-C curve with
alpha and C_max, the Fréchet-distance-vs-C curve with the baselines (one plot per metric), the
chosen C_V's training images beside its samples, cluster by cluster; then the tables (generation,
one per metric; clustering, probes without a model folded away) with every column defined once,
the side-by-side grids of every conditioning, the sample-efficiency curves (`cedm curve`), the
ablations and the confidence grids.
"""
from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

import numpy as np

from cedm import conditioning, pipeline
from cedm.cluster_metrics import label_metrics
from cedm.io import CedmError, RunDir, load_array, load_json, write_bytes



def _conds(root: Path, sub: str) -> list[str]:
    d = root / sub
    return sorted(p.name for p in d.iterdir()
                  if not p.name.startswith(".") and (p / "manifest.json").exists()) if d.exists() else []


_sort_key = conditioning.sort_key


def _kind(cond: str) -> str | None:
    return conditioning.parse_tag(cond).kind if conditioning.is_tag(cond) else None


def collect(run_dir) -> dict:
    """Everything the report shows, read from the run directory's finished stages."""
    rd = RunDir(run_dir)
    if not (rd.data / "manifest.json").exists():
        raise CedmError(f"{run_dir} has no finished stages to report on (no data/manifest.json)")
    info = {"run_dir": str(run_dir), "data": load_json(rd.data / "manifest.json")["config"]}
    info["clusters"] = {c: load_json(rd.root / "cluster" / c / "summary.json")
                        for c in _conds(rd.root, "cluster")}
    info["bound"] = load_json(rd.bound / "table.json") if (rd.bound / "manifest.json").exists() else None
    info["features"] = _features(rd)
    clip = rd.root / "clip"                  # CLIP pseudo-labels (labels:clip; docs/method.md#clip-labels)
    info["clip"] = load_json(clip / "summary.json") if (clip / "manifest.json").exists() else None
    info["eval"] = {c: load_json(rd.eval(c) / "metrics.json") for c in _conds(rd.root, "eval")}
    info["curves"] = {c: load_json(rd.curve(c) / "curve.json") for c in _conds(rd.root, "curve")}
    info["samples"] = [c for c in _conds(rd.root, "sample") if (rd.sample(c) / "grid.png").exists()]
    info["class_names"] = load_json(rd.data / "manifest.json").get("class_names")
    # The verdict is computed from the evaluations on disk, so an evaluation made after the sweep
    # is never shown against a stale verdict; sweep.json names the sweep's method and metric.
    from cedm.plan import verdict

    swept = load_json(rd.root / "sweep.json") if (rd.root / "sweep.json").exists() else {}
    methods = sorted({s["method"] for s in info["clusters"].values() if "method" in s}) or ["temi"]
    method = swept.get("method") or ("temi" if "temi" in methods else methods[0])
    info["sweep"] = {**swept, **verdict(run_dir, method, swept.get("metric"))}
    return info


def _features(rd: RunDir) -> dict | None:
    """The features stage's backbone and, for a labelled dataset with a held-out split, its
    20-NN accuracy (the paper's Table 3; docs/method.md#knn-accuracy)."""
    if not (rd.features / "manifest.json").exists():
        return None
    out = {"backbone": load_json(rd.features / "manifest.json")["config"].get("backbone")}
    if (rd.features / "knn_accuracy.json").exists():
        out["knn"] = load_json(rd.features / "knn_accuracy.json")
    return out


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_utilisation(info) -> bytes | None:
    """r_C against C per method, alpha and C_max marked (docs/method.md#c-max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: dict[str, list] = {}
    for cond, s in info["clusters"].items():
        if _kind(cond) == "clusters":   # sub-class runs (<method>-K<K>) have no utilisation curve
            by_method.setdefault(s["method"], []).append((s["clusters"], s["r_c"]))
    if not by_method:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for method, pts in sorted(by_method.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
    b = info["bound"]
    if b:
        ax.axhline(b["alpha"], color="grey", ls="--", lw=1, label=f"α = {b['alpha']}")
        if b.get("c_max"):
            ax.axvline(b["c_max"], color="tab:red", ls=":", lw=1.5, label=f"C_max = {b['c_max']}")
    ax.set_xscale("log")
    ax.set_xlabel("number of clusters C")
    ax.set_ylabel("utilisation r_C = C^u / C")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def metric_keys(info) -> list[str]:
    """The metrics the evaluations use, the verdict's first: one plot and one table each, never mixed."""
    keys = sorted({m.get("metric") for m in info["eval"].values()}, key=str)
    first = info["sweep"].get("metric")
    return ([first] if first in keys else []) + [k for k in keys if k != first]


def _evals_in(info, key: str) -> dict[str, dict]:
    return {c: m for c, m in info["eval"].items() if m.get("metric") == key}


def plot_fd(info, key: str) -> bytes | None:
    """Fréchet distance (one metric) against C, with the unconditional / label baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = {c: m for c, m in _evals_in(info, key).items() if "@" not in c}
    pts: dict[str, list] = {}
    for cond, m in ev.items():
        if _kind(cond) == "clusters":
            t = conditioning.parse_tag(cond)
            pts.setdefault(t.method, []).append((t.count, m["mean"], m["std"]))
    if not ev:
        return None
    label = next(iter(ev.values()))["label"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for method, p in sorted(pts.items()):
        p.sort()
        ax.errorbar([q[0] for q in p], [q[1] for q in p], yerr=[q[2] for q in p], fmt="o-", capsize=3,
                    label=f"C-EDM + {method} (± set-to-set std)")
    for base, style in (("uncond", "k--"), ("labels", "g-.")):
        if base in ev:
            m = ev[base]
            ax.axhline(m["mean"], color=style[0], ls=style[1:], lw=1,
                       label={"uncond": "unconditional EDM", "labels": "ground-truth labels"}[base])
            if base == "uncond" and m.get("std"):
                ax.axhspan(m["mean"] - m["std"], m["mean"] + m["std"], color="k", alpha=0.08, lw=0)
    b = info["bound"]
    if b and b.get("c_max") and pts:
        ax.axvline(b["c_max"], color="tab:red", ls=":", lw=1.5, label=f"C_max = {b['c_max']}")
    if pts:
        ax.set_xscale("log")
    ax.set_xlabel("number of clusters C")
    ax.set_ylabel(f"{label}\n(lower is better)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def efficiency(info) -> dict:
    """The sample efficiency the curves show (cedm.curve.sample_efficiency), by conditioning tag."""
    from cedm.curve import sample_efficiency

    return sample_efficiency({m["cond"]: m["points"] for m in info.get("curves", {}).values()})


def plot_curves(info) -> bytes | None:
    """Fréchet distance against training Mimg, one line per conditioning (the paper's Figs. 2, 9),
    the unconditional model's final FD as the sample-efficiency target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {m["cond"]: m for m in info.get("curves", {}).values() if m.get("points")}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for cond in sorted(curves, key=_sort_key):
        pts = sorted(curves[cond]["points"], key=lambda q: q["mimg"])
        style = {"uncond": "k--o", "labels": "g-.s"}.get(cond, "-o")
        ax.plot([q["mimg"] for q in pts], [q["fd"] for q in pts], style, ms=3, label=cond)
    eff = efficiency(info)
    if eff:
        ax.axhline(eff["target_fd"], color="grey", lw=0.8, ls=":",
                   label=f"uncond at {eff['reference_mimg']:.3g} Mimg")
    ax.set_xlabel("training images (Mimg)")
    ax.set_ylabel(next(iter(curves.values()))["label"], fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())   # 10, 20, 30, not 10^1
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _png(fig)


def plot_guidance(info) -> bytes | None:
    """FD against the guidance weight w per conditioning, from `cedm guidance` (docs/method.md#guidance-sweep):
    a line per method (and guide and interval) starting at the unguided point (w = 0), ± the
    set-to-set std; confidence-filtered settings as stars; the best setting in the panel's title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cedm.guidance import results

    res = results(info["run_dir"])
    if not res:
        return None
    conds = sorted(res, key=_sort_key)
    cols = min(3, len(conds))
    rows = -(-len(conds) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    family = lambda st: st["name"].replace(f" w={st['guidance']:g}", "")        # noqa: E731
    names = sorted({family(st) for r in res.values() for st in r["settings"][1:]})
    color = {n: f"C{i % 10}" for i, n in enumerate(names)}                       # one colour per setting family
    for ax, cond in zip(axes.flat, conds):
        r = res[cond]
        base = r["settings"][0]
        lines: dict[str, list] = {}
        for st in r["settings"][1:]:
            if st.get("filter"):
                ax.plot([st["guidance"]], [st["mean"]], "*", ms=9, color=color[family(st)], label=st["name"])
                continue
            lines.setdefault(family(st), []).append(st)
        for key, pts in sorted(lines.items()):
            pts = [base] + sorted(pts, key=lambda q: q["guidance"])
            ax.errorbar([q["guidance"] for q in pts], [q["mean"] for q in pts], yerr=[q["std"] for q in pts],
                        fmt="o-", ms=3, capsize=2, lw=1, color=color[key], label=key)
        ax.axhline(base["mean"], color="grey", lw=0.8, ls=":")
        ax.set_title(f"{cond}: best {r['best']['name']}", fontsize=8)
        ax.set_xlabel("guidance weight w (0: unguided)", fontsize=8)
        ax.set_ylabel(r.get("label", "FD"), fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(conds):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def efficiency_lines(info) -> list[str]:
    """One line per conditioning: the Mimg it needs to match uncond's final FD, and the ratio."""
    eff = efficiency(info)
    if not eff:
        return []
    out = []
    for cond in sorted(eff["models"], key=_sort_key):
        m = eff["models"][cond]
        if m["ratio"] is None:
            out.append(f"{cond}: does not reach uncond's FD {eff['target_fd']:.3f} within its "
                       f"{m['final_mimg']:.3g} Mimg (FD {m['final_fd']:.3f} there)")
        else:
            out.append(f"{cond}: reaches uncond's FD {eff['target_fd']:.3f} (at {eff['reference_mimg']:.3g} Mimg) "
                       f"after {m['mimg']:.3g} Mimg: **{m['ratio']:.2f}x** the sample efficiency")
    return out


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def paired_grid(run_dir, cond: str, info, per: int = 8, max_rows: int = 10) -> bytes | None:
    """Training images of each cluster (class, sub-class) beside the images generated for it,
    one row per group (the largest first), each row labelled with its id, its number of training
    images, its majority label and how many of its samples the judge gives that label
    (`cedm evaluate`'s consistency). Unconditional models: their samples alone."""
    from cedm.images import grid, png_bytes
    from cedm.io import load_npz

    rd = RunDir(run_dir)
    base = conditioning.split_ablation(cond)[0]            # a variant (<tag>@<ablation or sampler setting>)
    kind = _kind(base)                                      # has its tag's kind and groups
    f = rd.sample(cond) / "images.npz"
    if not f.exists():
        g = rd.sample(cond) / "grid.png"
        return g.read_bytes() if g.exists() else None
    z = load_npz(f)
    gen, gen_groups = z["images"], z["clusters"]
    if kind == "uncond":
        k = min(len(gen), per * 4)
        return png_bytes(grid([[gen[i:i + per]] for i in range(0, k, per)], headers=["generated (no clusters)"]))
    images = load_array(rd.data / "images.npy", mmap=True)
    try:
        train = conditioning.conditioning(run_dir, base, len(images))
    except CedmError:              # the groups' source is gone (e.g. another run's clustering)
        return (rd.sample(cond) / "grid.png").read_bytes() if (rd.sample(cond) / "grid.png").exists() else None
    groups = np.asarray(train["raw_labels"], np.int64)[train["index"]]
    ids, counts = np.unique(groups, return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")][:max_rows]
    cons = (info["eval"].get(cond) or {}).get("consistency") or {}
    names = info.get("class_names") or []
    noun = {"labels": "class", "subclasses": "sub-class"}.get(kind or "", "cluster")
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for c in order:
        members = np.flatnonzero(groups == c)
        pick = np.sort(rng.choice(members, min(per, len(members)), replace=False))
        rows.append([np.asarray(images[pick]), gen[gen_groups == c][:per]])
        text = f"{noun} {c} ({len(members)})"
        maj = (cons.get("majority") or {}).get(str(int(c)))
        if maj is not None:
            per_c = (cons.get("per_group") or {}).get(str(int(c)))
            text += f"  '{names[maj] if maj < len(names) else maj}'"
            if per_c:
                text += f"  {_pct(per_c[0])} | {_pct(per_c[2])}"
        labels.append(text)
    key = (f"{noun} (training images)  majority label  judged so: samples | training" if cons
           else f"{noun} (training images)")
    return png_bytes(grid(rows, labels, headers=["training images", "generated for that group"], label_header=key))


def _fmt(v, nd=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


# Every column of the report's tables, defined once, with the direction that is better.
COLUMNS = {
    "C": "clusters asked for", "C^u": "clusters used: those with at least one training image",
    "r_C": "cluster utilisation C^u / C; the bound C_max is the largest C with r_C > alpha (docs/bound.md)",
    "ANMI": "adjusted normalised mutual information of clusters and labels (higher: clusters follow the labels)",
    "ACC": "TEMI's clustering accuracy: clusters matched one-to-one to classes, the rest to their majority "
           "class (higher is better)",
    "NMI": "normalised mutual information (higher: clusters follow the labels)",
    "ARI": "adjusted Rand index (higher: clusters follow the labels)",
    "ACC 1:1": "one-to-one (Hungarian) accuracy; at most one cluster per class (higher is better)",
    "FD": "Fréchet distance of the generated images to the training set, mean ± std over the sample sets "
          "(lower is better; the metric is named above the table)",
    "vs uncond": "the difference to the unconditional model in standard errors of the difference: "
                 "+ is lower (better) FD; beats at +2 σ or more, worse at -2 σ or less, else ties "
                 "(docs/method.md#verdict)",
    "consistency": "share of the images generated for a cluster (class) that the classifier judge assigns to "
                   "its majority class, then the same share of its training images (higher: conditioning "
                   "conditions; docs/method.md#consistency)",
    "uFID": "Fréchet distance between the model's samples and the unconditional model's, same features "
            "(higher: further from unconditional generation)",
    "1-NN AUROC": "separating generated from held-out images by the distance to the nearest training image "
                  "(0.5: as close as unseen real images; higher: out of distribution)",
    "confidence": "mean max-softmax probability of the TEMI head on the samples (higher: clearer clusters)",
}
CLUSTER_HEAD = ["conditioning", "C", "C^u", "r_C", "ANMI", "ACC", "NMI", "ARI", "ACC 1:1"]


def cluster_rows(info) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """The clusterings: (head, rows of those with a trained or evaluated model, rows of the rest:
    the bound's probes, which the report folds away)."""
    conds = sorted(set(info["clusters"]) - set(ablations(info)), key=_sort_key)
    trained = set(info["eval"]) | set(info["samples"])
    shown, folded = [], []
    for c in conds:
        s = info["clusters"][c]
        lm = label_metrics(s)
        row = [c, _fmt(s.get("clusters")), _fmt(s.get("used_clusters")), _fmt(s.get("r_c")),
               _fmt(lm.get("anmi")), _fmt(lm.get("acc")), _fmt(lm.get("nmi")), _fmt(lm.get("ari")),
               _fmt(lm.get("acc_hungarian"))]
        (shown if c in trained else folded).append(row)
    return CLUSTER_HEAD, shown, folded


def generation_rows(info, key: str) -> tuple[list[str], list[list[str]]]:
    """One row per model evaluated in metric `key`: FD, against the unconditional model, the
    consistency and the other sample metrics; columns that no row has are left out."""
    ev = {c: m for c, m in _evals_in(info, key).items() if "@" not in c}
    cmp = info["sweep"].get("comparisons", {}) if info["sweep"].get("metric") == key else {}
    if not cmp and "uncond" in ev:
        from cedm.plan import versus

        cmp = {c: versus(m, ev["uncond"]) for c, m in ev.items() if c != "uncond"}
    head = ["conditioning", "FD", "vs uncond", "consistency", "uFID", "1-NN AUROC", "confidence"]
    rows = []
    for c in sorted(ev, key=_sort_key):
        m, v = ev[c], cmp.get(c)
        vs = "–" if c == "uncond" or not v else (
            f"{v['z']:+.1f} σ, {v['outcome']}" if v["z"] is not None else v["outcome"])
        cons = m.get("consistency")
        rows.append([c, f"{m['mean']:.3f} ± {m['std']:.3f} ({m.get('sets', len(m.get('values', [])))} sets)", vs,
                     f"{_pct(cons['samples'])} (training {_pct(cons['training'])})" if cons else "–",
                     _fmt(m.get("ufid")) if "ufid_shared_seeds" not in m
                     else f"{_fmt(m['ufid_shared_seeds'])} (shared seeds)",
                     _fmt(m.get("auroc_1nn")), _fmt((m.get("confidence") or {}).get("mean"))])
    keep = [j for j in range(len(head)) if j < 2 or any(r[j] != "–" for r in rows)]
    return [head[j] for j in keep], [[r[j] for j in keep] for r in rows]


def ablations(info) -> dict[str, dict]:
    """The ablation results (folders <name>@<ablation>; the paper's Tables 4 and 5) next to the
    result they vary: {folder: {"ablation", "of", "text", "value", "base"}}."""
    from cedm.conditioning import ABLATIONS, split_ablation

    def used(s):
        return f"C^u = {s['used_clusters']}, r_C = {s['r_c']:.3f}" if s else "–"

    out = {}
    for kind, results in (("cluster", info["clusters"]), ("eval", info["eval"])):
        for name, r in results.items():
            base, abl = split_ablation(name)
            if not abl:
                continue
            text = ABLATIONS.get(abl, ("", abl))[1]
            if kind == "cluster":
                out[name] = {"ablation": abl, "of": base, "text": text, "value": used(r),
                             "base": used(info["clusters"].get(base, {}))}
            else:
                b = info["eval"].get(base, {})
                out[name] = {"ablation": abl, "of": base, "text": text,
                             "value": f"{r['mean']:.3f} ± {r['std']:.3f}",
                             "base": f"{b['mean']:.3f} ± {b['std']:.3f}" if b else "–"}
    return out


def build(run_dir, out_dir=None, force: bool = False, pushgateway=None) -> Path:
    """Write report/report.html (self-contained) and report/report.md (+ PNGs) atomically.

    Its inputs are every finished stage it shows; the same inputs: the report is up to date."""
    rd = RunDir(run_dir)
    collect(run_dir)                                  # a clear error before anything is written
    out_dir = Path(out_dir) if out_dir else rd.report
    inputs = [rd.data] + ([rd.features] if (rd.features / "manifest.json").exists() else [])
    inputs += [rd.root / sub / c for sub in ("cluster", "sample", "eval", "curve", "guidance")
                          for c in _conds(rd.root, sub)]
    inputs += [p for p in (rd.bound, rd.root / "sweep.json", rd.root / "clip")
               if (p / "manifest.json").exists() or p.is_file()]
    pipeline.execute(pipeline.Stage("report", out_dir, rd.root, {"out": str(out_dir)}, inputs),
                     lambda work, _: _write(run_dir, work), force=force, pushgateway=pushgateway)
    return out_dir / "report.html"


def metric_note(info, key: str) -> str | None:
    """Why a table is not FID, and how to get FID (None for FID itself)."""
    ev = _evals_in(info, key)
    if key == "fid" or not ev:
        return None
    run = info["run_dir"]
    how = (f"For FID: `cedm evaluate --run-dir {run} --cond <tag> --metric fid --inception-weights FILE --force` "
           f"(torch-fidelity's weights-inception-2015-12-05-6726825d.pth; FDD: --metric fdd --dinov2-weights FILE).")
    if key == "classifier_fd":
        acc = next((m["judge_accuracy"] for m in ev.values() if "judge_accuracy" in m), None)
        return ("Not FID: this dataset's metric is the Fréchet distance in the hidden layer of a classifier "
                "trained on its own labelled training images (cedm.judge"
                + (f", {100 * acc:.1f}% accurate on held-out training images" if acc is not None else "")
                + "): Inception-v3's features were made for natural photographs at 299 px, not for tiny "
                "digits. " + how)
    if key == "fdd":
        return "FDD: the Fréchet distance in DINOv2 ViT-L/14 features (as dgm-eval), the paper's second metric. " + how
    reason = next((m["fallback_reason"] for m in ev.values() if m.get("fallback_reason")), None)
    return (f"Not FID: the Fréchet distance in the clustering backbone's features ({key[3:]}), a weaker judge"
            + (f", because {reason}" if reason else "") + ". " + how)


def _write(run_dir, tmp: Path):
    rd = RunDir(run_dir)
    info = collect(run_dir)
    v, d, b = info["sweep"], info["data"], info["bound"]
    blocks: list[tuple] = []           # ("h2", text) ("p", text) ("ul", items) ("table", head, rows)
    #                                    ("fig", caption, png) ("details", summary, [blocks])
    keys = metric_keys(info)

    # 1. The verdict, first.
    head = []
    if v.get("case") and v["case"] != "no model":
        head.append(f"**Verdict** ({v.get('metric_label', 'FD')}, lower is better): {v['verdict']}.")
        rule = {"beats": "C_V is the number of clusters with the lowest FD among the clustered models that beat "
                         f"the unconditional model by at least {v.get('beats_sigma', 2):g} σ",
                "none beats": "no C_V is claimed: none of the clustered models beats the unconditional model by "
                              f"{v.get('beats_sigma', 2):g} σ, the noise of {_n_sets(info, v.get('metric'))} sample "
                              "sets; more training or more sets may change that",
                "no baseline": "no unconditional model was evaluated, so C_V is only the lowest FD",
                "no noise estimate": "one sample set per model: the FDs' noise is unknown"}.get(v["case"])
        if rule:
            head.append(f"Case **{v['case']}**: {rule}.")
        if v.get("against_uncond"):
            head.append(f"Against the unconditional model (σ: standard errors of the difference): "
                        f"{v['against_uncond']}.")
    if b:
        runs = b.get("temi_runs", "?")
        if isinstance(runs, dict):
            runs = f"{runs.get('total', '?')} TEMI runs, {len(runs.get('computed', []))} computed by the search"
        else:
            runs = f"{runs} TEMI runs"
        head.append(f"Upper bound C_max = **{b.get('c_max')}** (largest C with r_C > α = {b['alpha']}; {runs}).")
    if v.get("other_metrics"):
        head.append("Evaluated in another metric, not ranked with the rest: "
                    + ", ".join(f"{c} ({k})" for c, k in sorted(v["other_metrics"].items())) + ".")
    blocks.append(("ul", head or ["No conditioning evaluated yet."]))

    # 2. The curves, then the chosen C_V's clusters beside its samples.
    blocks.append(("fig", "Cluster utilisation r_C against C, with α and C_max", plot_utilisation(info)))
    for key in keys:
        ev = _evals_in(info, key)
        blocks.append(("fig", f"{next(iter(ev.values()))['label']} against C, with the baselines (lower is better)",
                       plot_fd(info, key)))
    shown_c = v.get("c_v") if v.get("c_v") is not None else v.get("best_c")
    tag = f"{v.get('method', 'temi')}-C{shown_c}" if shown_c is not None else None
    if tag and tag in info["samples"]:
        what = "C_V" if v.get("c_v") is not None else "the best C (it does not beat the unconditional model)"
        blocks.append(("fig", f"{tag}, {what}: training images of each cluster (left) and images generated for it "
                              f"(right), largest clusters first", paired_grid(run_dir, tag, info)))

    # 3. What the run is, then the tables with every column defined once.
    about = [f"dataset **{d.get('dataset')}** at {d.get('resolution')} px"]
    f = info.get("features")
    if f and f.get("knn"):
        k = f["knn"]
        dino = k.get("dino")
        about.append(f"features {f['backbone']}: {k['k']}-NN accuracy **{k['accuracy']:.4f}** "
                     + (f"(top-5 {k['accuracy_top5']:.4f}) " if "accuracy_top5" in k else "")
                     + f"({k.get('rule', 'DINO')}: {k['metric']}, votes exp(cos/{k['temperature']:g})"
                     + (f"; DINO's T = {dino['temperature']:g}: {dino['accuracy']:.4f}" if dino else "")
                     + f"; majority vote {k['accuracy_majority']:.4f}) on {k['num_test']} held-out images "
                     f"against {k['num_train']} training images (Table 3)")
    c = info.get("clip")
    if c:
        about.append(f"CLIP pseudo-labels (labels:clip, Table 2): {c['model']}, {len(c['class_names'])} class "
                     f"names, {c['num_images']} images"
                     + (f", zero-shot accuracy **{c['accuracy']:.4f}**" if "accuracy" in c else ""))
    times = v.get("stage_seconds")
    if times:
        by: dict[str, float] = {}
        for name, sec in times:
            by[name.split()[0]] = by.get(name.split()[0], 0.0) + sec
        about.append(f"the sweep took {v.get('seconds', sum(by.values())):.0f} s: "
                     + ", ".join(f"{k} {sec:.0f} s" for k, sec in sorted(by.items(), key=lambda t: -t[1])))
    blocks += [("h2", "The run"), ("ul", about)]
    used_cols = set()
    for key in keys:
        ghead, grows = generation_rows(info, key)
        if not grows:
            continue
        label = next(iter(_evals_in(info, key).values()))["label"]
        blocks += [("h2", f"Generation: {label}")]
        note = metric_note(info, key)
        if note:
            blocks.append(("p", note))
        blocks.append(("table", ghead, grows))
        used_cols |= set(ghead)
    chead, crows, folded = cluster_rows(info)
    if crows or folded:
        blocks.append(("h2", "Clusterings"))
        if crows:
            blocks.append(("table", chead, crows))
        if folded:
            blocks.append(("details", f"{len(folded)} clusterings without a trained model (the bound's probes)",
                           [("table", chead, folded)]))
        used_cols |= set(chead)
    defs = [f"**{name}**: {text}" for name, text in COLUMNS.items() if name in used_cols]
    if defs:
        blocks += [("h2", "Columns"), ("ul", defs)]
    per_class = {c: m["per_class"] for c, m in info["eval"].items() if m.get("per_class")}
    pc_lines = [f"{c}: " + ", ".join(f"class {y}: {q['fd']:.3f} ({q['generated']} images)"
                                     for y, q in sorted(pc.items(), key=lambda t: int(t[0])))
                for c, pc in sorted(per_class.items())]
    if pc_lines:
        blocks += [("p", "Per-class Fréchet distance:"), ("ul", pc_lines)]
    abl = ablations(info)
    if abl:
        abl_head = ["ablation", "of", "what (the paper's table)", "ablation's result", "the method's"]
        blocks += [("h2", "Ablations"),
                   ("table", abl_head, [[n, a["of"], a["text"], a["value"], a["base"]] for n, a in sorted(abl.items())])]

    # 4. Every conditioning's samples beside its training groups; curves; confidence.
    blocks.append(("h2", "Samples"))
    for cond in sorted(info["samples"], key=_sort_key):
        if cond == tag:
            continue
        base, variant = conditioning.split_ablation(cond)
        kind = _kind(base)
        cap = {"uncond": f"{cond}: generated images (an unconditional model: no clusters)",
               "labels": f"{cond}: training images of each class (left) and images generated for it (right)"}.get(
            kind or "", f"{cond}: training images of each group (left) and images generated for it (right), "
                        f"largest first")
        if variant:
            cap += (f" ({'the ablation' if variant in conditioning.ABLATIONS else 'the sampler setting'} "
                    f"{variant}, beside {base}'s plain samples)")
        blocks.append(("fig", cap, paired_grid(run_dir, cond, info)))
    curves = plot_curves(info)
    if curves:
        blocks += [("h2", "Sample efficiency"),
                   ("fig", "Fréchet distance against training Mimg per conditioning (snapshots)", curves),
                   ("p", "Sample efficiency against the unconditional model (from the snapshot curves):"),
                   ("ul", efficiency_lines(info))]
    guided = plot_guidance(info)             # `cedm guidance` (docs/method.md#guidance-sweep)
    if guided:
        from cedm.guidance import report_lines

        blocks += [("h2", "Guidance"), ("fig", "Fréchet distance against the guidance weight w per conditioning "
                                               "(cedm guidance; ± the set-to-set std)", guided),
                   ("ul", report_lines(run_dir))]
    conf = []
    for cond in sorted(info["eval"], key=_sort_key):
        for which in ("confident", "unconfident"):
            fpath = rd.eval(cond) / f"{which}.png"
            if fpath.exists():
                conf.append(("fig", f"{cond}: {'most' if which == 'confident' else 'least'} confident samples "
                                    f"(TEMI head max softmax)", fpath.read_bytes()))
    if conf:
        blocks += [("h2", "Confidence")] + conf

    md, h = _render(blocks, tmp)
    md = ["# cedm report", "", f"Run directory: `{run_dir}`", ""] + md
    h = (["<!doctype html><html><head><meta charset='utf-8'><title>cedm report</title>",
          "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
          "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
          "td:first-child{text-align:left}figure{display:inline-block;margin:.5em;vertical-align:top}"
          "img{max-width:100%;image-rendering:pixelated}figcaption{font-size:.85em;color:#555}"
          "details{margin:.5em 0}</style>",
          "</head><body><h1>cedm report</h1>",
          f"<p>Run directory: <code>{html.escape(str(run_dir))}</code></p>"] + h
         # Lets a headless browser (and a reader) see that every image decoded.
         + ["<script>window.addEventListener('load',function(){var i=[].slice.call(document.images);"
            "document.body.setAttribute('data-images-loaded',i.filter(function(x){return x.complete&&"
            "x.naturalWidth>0}).length+'/'+i.length);});</script></body></html>"])
    write_bytes(tmp / "report.md", ("\n".join(md) + "\n").encode())
    write_bytes(tmp / "report.html", "\n".join(h).encode())
    return pipeline.Output({"html": "report.html", "markdown": "report.md"})


def _n_sets(info, key) -> str:
    n = sorted({m.get("sets", len(m.get("values", []))) for m in _evals_in(info, key).values()})
    return "/".join(map(str, n)) or "?"


def _render(blocks: list[tuple], tmp: Path, figs: list | None = None) -> tuple[list[str], list[str]]:
    """The blocks as Markdown lines (figures as PNG files beside it) and HTML lines (inlined)."""
    figs = [] if figs is None else figs
    md: list[str] = []
    h: list[str] = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h2":
            md += ["", f"## {blk[1]}", ""]
            h.append(f"<h2>{html.escape(blk[1])}</h2>")
        elif kind == "p":
            md += [blk[1], ""]
            h.append(f"<p>{_html_inline(blk[1])}</p>")
        elif kind == "ul":
            md += [f"- {x}" for x in blk[1]] + [""]
            h += ["<ul>"] + [f"<li>{_html_inline(x)}</li>" for x in blk[1]] + ["</ul>"]
        elif kind == "table":
            head, rows = blk[1], blk[2]
            md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            md += ["| " + " | ".join(r) + " |" for r in rows] + [""]
            h += ["<table><tr>" + "".join(f"<th>{html.escape(x)}</th>" for x in head) + "</tr>"]
            h += ["<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>" for r in rows]
            h += ["</table>"]
        elif kind == "details":
            inner_md, inner_h = _render(blk[2], tmp, figs)
            md += [f"{blk[1]}:", ""] + inner_md
            h += [f"<details><summary>{html.escape(blk[1])}</summary>"] + inner_h + ["</details>"]
        elif kind == "fig" and blk[2]:
            name = f"fig{len(figs):02d}.png"
            figs.append(name)
            write_bytes(tmp / name, blk[2])
            md += [f"![{blk[1]}]({name})", f"*{blk[1]}*", ""]
            b64 = base64.b64encode(blk[2]).decode()
            h += [f"<figure><img alt='{html.escape(blk[1], quote=True)}' src='data:image/png;base64,{b64}'>"
                  f"<figcaption>{html.escape(blk[1])}</figcaption></figure>"]
    return md, h


def _html_inline(s: str) -> str:
    """**bold** and `code` of a Markdown line, in HTML (the rest escaped)."""
    return re.sub(r"`(.+?)`", r"<code>\1</code>", _md_bold(html.escape(s)))


def _md_bold(s: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)


def register(sub) -> None:
    p = sub.add_parser("report", help="HTML + Markdown report of a run directory",
                       description="Write <run-dir>/report/report.html (self-contained, images inlined) "
                                   "and report.md (with PNGs beside it): the verdict (every conditioning "
                                   "against the unconditional model and the noise of its sample sets, on one "
                                   "metric), r_C vs C with α and C_max, the FD vs C per metric, the chosen "
                                   "C_V's training images beside its samples, the generation and clustering "
                                   "tables with their columns defined, every model's grids, the sample-"
                                   "efficiency curves, the ablations and confidence grids.")
    pipeline.add_common(p)
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <run-dir>/report)")

    def _main(args):
        with pipeline.reporting("report", args.pushgateway, run_dir=args.run_dir):
            path = build(args.run_dir, args.out, force=args.force)
        print(f"report: {path}")

    p.set_defaults(func=_main)


__all__ = ["build", "collect", "register"]
