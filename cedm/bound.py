"""`cedm bound`: the upper bound C_max on the useful number of clusters (PAPER.md, "Cluster
utilisation ratio and the upper bound C_max").

TEMI at C clusters uses C^u of them; r_C = C^u / C. Starting at C_start, C doubles until
r_C <= alpha (0.96), then bisection between the last passing and the first failing C finds
C_max = the largest C with r_C > alpha. Each probe is one `cluster.run(..., method="temi")`, so
runs already on disk (same config) are reused. The search assumes r_C falls monotonically in C.

Writes <run>/bound/: table.json {alpha, c_start, max_clusters, rows [{clusters, r_c,
used_clusters}], c_max, bounded, temi_runs {computed, reused, total}, note} and r_c.png
(r_C against C, log-x, alpha line, C_max marked).
"""
from __future__ import annotations

import sys

from cedm.io import CedmError, RunDir, input_hash, load_array, save_json, stage_done, staging_dir, write_manifest


def search(probe, c_start: int, alpha: float, max_clusters: int, tol: int = 1) -> dict:
    """Doubling then bisection on r_C = probe(C). Returns {"c_max", "bounded", "rows"}.

    probe(C) -> r_C. `bounded` is False when r_C stayed above alpha up to max_clusters
    (C_max is then only a lower bound). Bisection stops when the bracket is <= tol wide.
    """
    r = {}

    def at(c):
        if c not in r:
            r[c] = probe(c)
        return r[c]

    if at(c_start) <= alpha:
        raise CedmError(f"r_C at --c-start {c_start} is {r[c_start]:.3f} <= alpha {alpha}: C_max is below "
                        f"C_start; rerun with a smaller --c-start (e.g. {max(2, c_start // 2)})")
    lo, hi = c_start, None                       # r(lo) > alpha; r(hi) <= alpha
    while hi is None:
        c = min(2 * lo, max_clusters)            # doubling
        if c <= lo:
            break
        if at(c) <= alpha:
            hi = c
        else:
            lo = c
    if hi is not None:
        while hi - lo > tol:                     # bisection between last pass and first fail
            mid = (lo + hi) // 2
            if at(mid) > alpha:
                lo = mid
            else:
                hi = mid
    return {"c_max": lo, "bounded": hi is not None, "rows": [{"clusters": c, "r_c": r[c]} for c in sorted(r)]}


def plot(table: dict, path) -> None:
    """r_C against C (log-x) with the alpha line and C_max marked (matplotlib, Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from cedm.io import atomic_path

    cs = [row["clusters"] for row in table["rows"]]
    rs = [row["r_c"] for row in table["rows"]]
    fig = Figure(figsize=(5.5, 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(cs, rs, "o-", color="C0", label="TEMI $r_C = C^u / C$")
    ax.axhline(table["alpha"], color="C3", ls="--", lw=1, label=f"$\\alpha$ = {table['alpha']}")
    cm = table["c_max"]
    ax.axvline(cm, color="C2", ls=":", lw=1.5,
               label=f"$C_{{max}}$ = {cm}" + ("" if table["bounded"] else " (lower bound)"))
    ax.set_xscale("log")
    ax.set_xlabel("clusters C")
    ax.set_ylabel("utilisation ratio $r_C$")
    ax.set_ylim(min(rs + [table["alpha"]]) - 0.05, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def run(run_dir, c_start: int | None = None, alpha: float = 0.96, max_clusters: int | None = None,
        tol: int = 1, seed: int = 0, device=None, force: bool = False, progress: bool = True,
        **cluster_opts) -> dict:
    """Search C_max for <run> (TEMI runs via cluster.run, reused when on disk); returns the table
    plus "skipped" (True when bound/ already holds the same search)."""
    from cedm import cluster, telemetry
    from cedm.config import run_preset

    rd = RunDir(run_dir)
    pre = run_preset(run_dir)
    c_start = int(c_start or pre.c_start)
    if not 0 < alpha < 1:
        raise CedmError(f"--alpha must lie in (0, 1), got {alpha}")
    if c_start < 2:
        raise CedmError(f"--c-start must be at least 2, got {c_start}")
    if tol < 1:
        raise CedmError(f"--tol must be at least 1, got {tol}")
    n = len(load_array(rd.features / "features.npy", mmap=True))
    max_clusters = int(max_clusters or max(2, n // 2))
    if max_clusters > n:
        raise CedmError(f"--max-clusters {max_clusters} exceeds the number of samples N={n}")
    if c_start > max_clusters:
        raise CedmError(f"--c-start {c_start} exceeds --max-clusters {max_clusters}")
    opts = {k: v for k, v in cluster_opts.items() if v is not None}
    config = {"c_start": c_start, "alpha": float(alpha), "max_clusters": max_clusters, "tol": int(tol),
              "seed": int(seed), "cluster": opts, "features": input_hash(rd.features),
              "knn": input_hash(rd.knn)}
    if stage_done(rd.bound, config, force):
        from cedm.io import load_json

        table = load_json(rd.bound / "table.json")
        telemetry.BOUND_CMAX.set(table["c_max"])
        print(f"cedm bound: {rd.bound} is up to date (same config); C_max = {table['c_max']}", file=sys.stderr)
        return {**table, "skipped": True}

    runs = {"computed": [], "reused": []}
    used = {}

    def probe(c: int) -> float:
        s = cluster.run(run_dir, "temi", c, seed=seed, device=device, progress=progress, **opts)
        runs["reused" if s["reused"] else "computed"].append(c)
        used[c] = s["used_clusters"]
        print(f"cedm bound: C={c}: r_C={s['r_c']:.4f} ({s['used_clusters']} used)"
              + (" [reused]" if s["reused"] else ""), file=sys.stderr)
        return s["r_c"]

    res = search(probe, c_start, alpha, max_clusters, tol)
    rows = [{**row, "used_clusters": used[row["clusters"]]} for row in res["rows"]]
    if res["bounded"]:
        note = f"C_max = {res['c_max']}: the largest C with r_C > alpha = {alpha}"
    else:
        note = (f"r_C stayed above alpha = {alpha} up to --max-clusters {max_clusters}: C_max >= "
                f"{res['c_max']} is only a lower bound (raise --max-clusters)")
    table = {"alpha": float(alpha), "c_start": c_start, "max_clusters": max_clusters, "tol": int(tol),
             "rows": rows, "c_max": res["c_max"], "bounded": res["bounded"],
             "temi_runs": {"computed": runs["computed"], "reused": runs["reused"],
                           "total": len(runs["computed"]) + len(runs["reused"])},
             "note": note}
    with staging_dir(rd.bound) as tmp:
        save_json(tmp / "table.json", table)
        plot(table, tmp / "r_c.png")
        write_manifest(tmp, "bound", config, inputs=[rd.features, rd.knn],
                       outputs={"table": "table.json", "plot": "r_c.png"})
    telemetry.BOUND_CMAX.set(res["c_max"])
    print(f"cedm bound: {note}; {table['temi_runs']['total']} TEMI runs "
          f"({len(runs['computed'])} computed, {len(runs['reused'])} reused) -> {rd.bound}", file=sys.stderr)
    return {**table, "skipped": False}


def register(sub) -> None:
    from cedm.cli import add_common
    from cedm.cluster import add_temi_args

    p = sub.add_parser("bound", help="search C_max, the largest C whose TEMI utilisation r_C > alpha",
                       description="Double C from --c-start until the TEMI cluster utilisation r_C <= "
                                   "alpha, then bisect; C_max is the largest C with r_C > alpha. Reuses "
                                   "cluster runs on disk; writes <run>/bound/table.json and r_c.png.")
    add_common(p)
    p.add_argument("--c-start", type=int, default=None, metavar="N",
                   help="first C of the search (default: the preset's, e.g. the class count)")
    p.add_argument("--alpha", type=float, default=0.96,
                   help="utilisation threshold alpha (default: %(default)s)")
    p.add_argument("--max-clusters", type=int, default=None, metavar="N",
                   help="largest C probed (default: N/2); if r_C > alpha up to it, C_max is a lower bound")
    p.add_argument("--tol", type=int, default=1, metavar="N",
                   help="stop the bisection when the bracket is at most N wide (default: %(default)s, exact)")
    add_temi_args(p)
    p.set_defaults(func=_main)


def _main(args) -> int:
    from cedm import telemetry
    from cedm.cli import resolve_device
    from cedm.cluster import temi_kwargs

    with telemetry.stage("bound", args.pushgateway) as st:
        res = run(args.run_dir, c_start=args.c_start, alpha=args.alpha, max_clusters=args.max_clusters,
                  tol=args.tol, seed=args.seed, device=resolve_device(args.device), force=args.force,
                  **temi_kwargs(args))
        st.skipped = res["skipped"]
    print(res["c_max"])
    return 0
