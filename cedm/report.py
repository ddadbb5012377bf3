"""The sweep report: one self-contained HTML page (images inlined) and a Markdown twin.

Shows the r_C-vs-C curve with alpha and C_max, the Fréchet-distance-vs-C curve with the
unconditional (and ground-truth label) baselines, a table per C, the Fréchet distance against
training Mimg per conditioning with the sample efficiency read from it (when models kept
snapshots: `cedm curve`), cluster exemplar grids (training images per cluster), sample grids per
conditioning and the confidence grids.
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
    sweep_file = rd.root / "sweep.json"
    if sweep_file.exists():
        info["sweep"] = load_json(sweep_file)
    else:  # a run made stage by stage (e.g. by Argo): the same verdict, from the artifacts
        from cedm.plan import verdict

        methods = sorted({s["method"] for s in info["clusters"].values()}) or ["temi"]
        info["sweep"] = verdict(run_dir, "temi" if "temi" in methods else methods[0])
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


def plot_fd(info) -> bytes | None:
    """Fréchet distance against C, with the unconditional / label baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = info["eval"]
    pts: dict[str, list] = {}
    for cond, m in ev.items():
        if _kind(cond) == "clusters":
            t = conditioning.parse_tag(cond)
            pts.setdefault(t.method, []).append((t.count, m["mean"], m["std"]))
    if not pts and not ev:
        return None
    label = next(iter(ev.values()))["label"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for method, p in sorted(pts.items()):
        p.sort()
        ax.errorbar([q[0] for q in p], [q[1] for q in p], yerr=[q[2] for q in p], fmt="o-", capsize=3,
                    label=f"C-EDM + {method}")
    for base, style in (("uncond", "k--"), ("labels", "g-.")):
        if base in ev:
            ax.axhline(ev[base]["mean"], color=style[0], ls=style[1:], lw=1,
                       label={"uncond": "unconditional EDM", "labels": "ground-truth labels"}[base])
    b = info["bound"]
    if b and b.get("c_max") and pts:
        ax.axvline(b["c_max"], color="tab:red", ls=":", lw=1.5, label=f"C_max = {b['c_max']}")
    if pts:
        ax.set_xscale("log")
    ax.set_xlabel("number of clusters C")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
    for ax, cond in zip(axes.flat, conds):
        r = res[cond]
        base = r["settings"][0]
        lines: dict[str, list] = {}
        for st in r["settings"][1:]:
            if st.get("filter"):
                ax.plot([st["guidance"]], [st["mean"]], "*", ms=9, label=st["name"])
                continue
            key = st["name"].replace(f" w={st['guidance']:g}", "")
            lines.setdefault(key, []).append(st)
        for key, pts in sorted(lines.items()):
            pts = [base] + sorted(pts, key=lambda q: q["guidance"])
            ax.errorbar([q["guidance"] for q in pts], [q["mean"] for q in pts], yerr=[q["std"] for q in pts],
                        fmt="o-", ms=3, capsize=2, lw=1, label=key)
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


def exemplar_grid(run_dir, cond: str, per_cluster: int = 8, max_clusters: int = 12) -> bytes | None:
    """Training images of the largest clusters (or sub-classes), one row per cluster."""
    from PIL import Image

    rd = RunDir(run_dir)
    if _kind(cond) not in ("clusters", "subclasses"):
        return None
    a_file = conditioning.cluster_dir(run_dir, cond) / "assignments.npy"
    if not a_file.exists():
        return None
    a = load_array(a_file)
    images = load_array(rd.data / "images.npy", mmap=True)
    ids, counts = np.unique(a, return_counts=True)
    top = ids[np.argsort(-counts)][:max_clusters]
    h, w = images.shape[1:3]
    canvas = np.full((len(top) * (h + 2) + 2, per_cluster * (w + 2) + 2, 3), 255, np.uint8)
    rng = np.random.default_rng(0)
    for r, c in enumerate(top):
        members = np.flatnonzero(a == c)
        pick = np.sort(rng.choice(members, min(per_cluster, len(members)), replace=False))
        for j, i in enumerate(pick):
            canvas[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + j * (w + 2):2 + j * (w + 2) + w] = images[i]
    img = Image.fromarray(canvas)
    scale = max(1, 64 // h)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _fmt(v, nd=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table_rows(info) -> tuple[list[str], list[list[str]]]:
    """One row per conditioning: clustering quality and generation quality side by side."""
    conds = sorted((set(info["clusters"]) | set(info["eval"])) - set(ablations(info)), key=_sort_key)
    # ACC is TEMI's (unmatched clusters take their majority class), ACC 1:1 the one-to-one
    # Hungarian accuracy (docs/method.md#cluster-metrics); older summaries hold only the latter.
    head = ["conditioning", "C", "C^u", "r_C", "ANMI", "ACC", "FD (mean ± std)", "uFID", "1-NN AUROC",
            "confidence", "NMI", "ARI", "ACC 1:1"]
    rows = []
    for c in conds:
        s = info["clusters"].get(c, {})
        lm = label_metrics(s)
        m = info["eval"].get(c, {})
        fd = f"{m['mean']:.3f} ± {m['std']:.3f}" if m else "–"
        rows.append([c, _fmt(s.get("clusters")), _fmt(s.get("used_clusters")), _fmt(s.get("r_c")),
                     _fmt(lm.get("anmi")), _fmt(lm.get("acc")), fd,
                     _fmt(m.get("ufid")) if "ufid_shared_seeds" not in m
                     else f"{_fmt(m['ufid_shared_seeds'])} (shared seeds)",
                     _fmt(m.get("auroc_1nn")), _fmt((m.get("confidence") or {}).get("mean")),
                     _fmt(lm.get("nmi")), _fmt(lm.get("ari")), _fmt(lm.get("acc_hungarian"))])
    return head, rows


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


def _write(run_dir, tmp: Path):
    rd = RunDir(run_dir)
    info = collect(run_dir)
    figures: list[tuple[str, str, bytes]] = []          # (section, caption, png)

    def add(section, caption, png):
        if png:
            figures.append((section, caption, png))

    add("Cluster utilisation", "r_C against C, with α and C_max", plot_utilisation(info))
    add("Generation quality", "Fréchet distance against C, with baselines", plot_fd(info))
    add("Sample efficiency", "Fréchet distance against training Mimg per conditioning (snapshots)",
        plot_curves(info))
    add("Guidance", "Fréchet distance against the guidance weight per conditioning (cedm guidance)",
        plot_guidance(info))
    trained = set(info["eval"]) | set(info["samples"])
    shown = [c for c in info["clusters"] if c in trained] or list(info["clusters"])
    for c in sorted(shown, key=_sort_key):
        add("Cluster exemplars", f"{c}: training images of the largest clusters (one row each)",
            exemplar_grid(run_dir, c))
    for c in sorted(info["samples"], key=_sort_key):
        add("Samples", f"{c}: generated images, one row per cluster", (rd.sample(c) / "grid.png").read_bytes())
    for c in sorted(info["eval"], key=_sort_key):
        for kind in ("confident", "unconfident"):
            f = rd.eval(c) / f"{kind}.png"
            if f.exists():
                add("Confidence", f"{c}: {'most' if kind == 'confident' else 'least'} confident samples "
                    f"(TEMI head max softmax)", f.read_bytes())

    head, rows = table_rows(info)
    per_class = {c: m["per_class"] for c, m in info["eval"].items() if m.get("per_class")}
    d = info["data"]
    summary = [f"dataset **{d.get('dataset')}** at {d.get('resolution')} px"]
    f = info.get("features")
    if f and f.get("knn"):
        k = f["knn"]
        summary.append(f"features {f['backbone']}: {k['k']}-NN accuracy **{k['accuracy']:.4f}** "
                       f"({k['metric']}, votes exp(cos/{k['temperature']:g}); majority vote "
                       f"{k['accuracy_majority']:.4f}) on {k['num_test']} held-out images against "
                       f"{k['num_train']} training images (Table 3)")
    c = info.get("clip")
    if c:
        summary.append(f"CLIP pseudo-labels (labels:clip, Table 2): {c['model']}, {len(c['class_names'])} class "
                       f"names, {c['num_images']} images"
                       + (f", zero-shot accuracy **{c['accuracy']:.4f}**" if "accuracy" in c else ""))
    if info["bound"]:
        b = info["bound"]
        runs = b.get("temi_runs", "?")
        if isinstance(runs, dict):
            runs = f"{runs.get('total', '?')} TEMI runs, {len(runs.get('computed', []))} computed by the search"
        else:
            runs = f"{runs} TEMI runs"
        summary.append(f"C_max = **{b.get('c_max')}** (α = {b['alpha']}, {runs})")
    if info["sweep"] and info["sweep"].get("c_v") is not None:
        s = info["sweep"]
        summary.append(f"best number of visual groups C_V = **{s['c_v']}** by {s.get('metric_label', 'FD')} "
                       f"({s.get('verdict', '')})")

    md = ["# cedm report", "", f"Run directory: `{run_dir}`", ""] + [f"- {x}" for x in summary] + [""]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    pc_lines = [f"{c}: " + ", ".join(f"class {y}: {v['fd']:.3f} ({v['generated']} images)"
                                     for y, v in sorted(pc.items(), key=lambda t: int(t[0])))
                for c, pc in sorted(per_class.items())]
    if pc_lines:
        md += ["", "Per-class Fréchet distance:", ""] + [f"- {x}" for x in pc_lines]
    abl = ablations(info)
    abl_head = ["ablation", "of", "what (the paper's table)", "ablation's result", "the method's"]
    abl_rows = [[n, a["of"], a["text"], a["value"], a["base"]] for n, a in sorted(abl.items())]
    if abl_rows:
        md += ["", "Ablations:", "", "| " + " | ".join(abl_head) + " |", "|" + "---|" * len(abl_head)]
        md += ["| " + " | ".join(r) + " |" for r in abl_rows]
    eff_lines = efficiency_lines(info)
    if eff_lines:
        md += ["", "Sample efficiency against the unconditional model (from the snapshot curves):", ""]
        md += [f"- {x}" for x in eff_lines]
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>cedm report</title>",
         "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
         "td:first-child{text-align:left}figure{display:inline-block;margin:.5em;vertical-align:top}"
         "img{max-width:100%;image-rendering:pixelated}figcaption{font-size:.85em;color:#555}</style>",
         "</head><body><h1>cedm report</h1>",
         f"<p>Run directory: <code>{html.escape(str(run_dir))}</code></p><ul>"]
    h += [f"<li>{_md_bold(html.escape(x))}</li>" for x in summary] + ["</ul>"]
    h += ["<table><tr>" + "".join(f"<th>{html.escape(x)}</th>" for x in head) + "</tr>"]
    h += ["<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>" for r in rows]
    h += ["</table>"]
    if pc_lines:
        h += ["<p>Per-class Fréchet distance:</p><ul>"] + [f"<li>{html.escape(x)}</li>" for x in pc_lines] + ["</ul>"]
    if abl_rows:
        h += ["<p>Ablations:</p><table><tr>" + "".join(f"<th>{html.escape(x)}</th>" for x in abl_head) + "</tr>"]
        h += ["<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>" for r in abl_rows]
        h += ["</table>"]
    if eff_lines:
        h += ["<p>Sample efficiency against the unconditional model (from the snapshot curves):</p><ul>"]
        h += [f"<li>{_md_bold(html.escape(x))}</li>" for x in eff_lines] + ["</ul>"]
    section = None
    for i, (sec, cap, png) in enumerate(figures):
        name = f"fig{i:02d}.png"
        write_bytes(tmp / name, png)
        if sec != section:
            md += ["", f"## {sec}", ""]
            h += [f"<h2>{html.escape(sec)}</h2>"]
            section = sec
        md += [f"![{cap}]({name})", f"*{cap}*", ""]
        b64 = base64.b64encode(png).decode()
        h += [f"<figure><img alt='{html.escape(cap, quote=True)}' src='data:image/png;base64,{b64}'>"
              f"<figcaption>{html.escape(cap)}</figcaption></figure>"]
    # Lets a headless browser (and a reader) see that every image decoded.
    h += ["<script>window.addEventListener('load',function(){var i=[].slice.call(document.images);"
          "document.body.setAttribute('data-images-loaded',i.filter(function(x){return x.complete&&"
          "x.naturalWidth>0}).length+'/'+i.length);});</script></body></html>"]
    write_bytes(tmp / "report.md", ("\n".join(md) + "\n").encode())
    write_bytes(tmp / "report.html", "\n".join(h).encode())
    return pipeline.Output({"html": "report.html", "markdown": "report.md"})


def _md_bold(s: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)


def register(sub) -> None:
    p = sub.add_parser("report", help="HTML + Markdown report of a run directory",
                       description="Write <run-dir>/report/report.html (self-contained, images inlined) "
                                   "and report.md (with PNGs beside it): r_C vs C with α and C_max, "
                                   "FID/FDD vs C with the unconditional baseline, a table per C, cluster "
                                   "exemplar grids, sample grids and confidence grids.")
    pipeline.add_common(p)
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <run-dir>/report)")

    def _main(args):
        with pipeline.reporting("report", args.pushgateway, run_dir=args.run_dir):
            path = build(args.run_dir, args.out, force=args.force)
        print(f"report: {path}")

    p.set_defaults(func=_main)


__all__ = ["build", "collect", "register"]
