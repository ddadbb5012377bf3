"""`cedm bound`: the upper bound C_max on the useful number of clusters (docs/bound.md).

TEMI at C clusters uses C^u of them; r_C = C^u / C. C_max is the largest C with r_C > alpha
(0.96). r_C is one TEMI run per C and is not monotone near alpha (measured: 0.969 at C=96 then
0.995 at C=192; 0.969 at C=161 then 0.944 at C=162), so the search is defined by what it probed,
not by a monotonicity it cannot assume:

  C_max = the largest probed C in [C_start, max_clusters] with r_C > alpha.

The probes are every TEMI clustering already on disk in that range (the sweep's cluster list,
earlier rounds) plus the rounds planned by `next_round`, a pure function of the r_C known so far:
  1. doubling: the ladder C_start * 2^k below max_clusters, then max_clusters, RUNGS (4) rungs
     a round in parallel, climbed while the top rung of the last round passes (ladder C's already
     on disk are reused). Only rung values decide the climb, so the probes depend on r_C alone,
     not on which clusterings happened to exist; a dip below the top rung does not stop it;
  2. refinement: between lo, the largest passing C, and hi, the smallest probed C above lo (it
     fails, as every probe above lo does), probe a grid of `grid` C's at once, the paper's "more
     fine-grained grid search" (geometric when hi > 2 lo, linear otherwise), and repeat;
  3. done when hi - lo <= tol (C_max = lo, bounded) or nothing above lo was probed, i.e.
     lo = max_clusters (unbounded: C_max is only a lower bound; raise --max-clusters).
On finishing: r_C(C_max) > alpha, every probe above C_max fails and the nearest is at most tol
above it. Why the largest passing C rather than the last C before the first failure (an early
stop on one dip would drop candidates for good), and the cost: docs/bound.md.

Each probe is one `cluster.run(..., method="temi")`, so runs on disk (same config) are reused.
Locally `cedm bound` runs the rounds one clustering after another; on Argo `cedm bound --next`
prints each round as a JSON list that fans out over the cedm-cluster template (argo/bound.yaml)
and a last `cedm bound` reuses them all, so both reach the same table.

Writes <run>/bound/: table.json {alpha, c_start, max_clusters, tol, grid, rows [{clusters, r_c,
used_clusters}], rounds [[C, ...], ...], c_max, bounded, temi_runs {computed, reused, total},
note} and r_c.png (r_C against C, log-x, alpha line, C_max marked).

`cedm bound --from-existing` (from_existing) runs no search: the same rule over the TEMI
clusterings already in the run, imported (`cedm cluster --import`, e.g. the official C-EDM files)
or trained; its table adds from_existing, next_above (the nearest C above C_max) and each row's
`imported`.
"""
from __future__ import annotations

import json
import re
import sys

from cedm.io import (
    CedmError,
    RunDir,
    atomic_path,
    input_hash,
    load_array,
    load_json,
    save_json,
    write_bytes,
)

ALPHA = 0.96       # utilisation threshold alpha (docs/bound.md)
GRID = 7           # C's per refinement round
RUNGS = 4          # doubling-ladder C's per round (C_start .. 8 C_start in the first)
_TEMI_DIR = re.compile(r"temi-C(\d+)")


def ladder(c_start: int, max_clusters: int) -> list[int]:
    """The doubling probes C_start * 2^k below max_clusters, then max_clusters itself."""
    out, c = [], int(c_start)
    while c < max_clusters:
        out.append(c)
        c *= 2
    return out + [int(max_clusters)]


def grid_points(lo: int, hi: int, grid: int = GRID) -> list[int]:
    """Up to `grid` integer C's strictly inside (lo, hi): all of them when few enough, else evenly
    spaced, geometrically when hi > 2 lo (the bracket spans octaves), linearly otherwise."""
    if hi - lo - 1 <= grid:
        return list(range(lo + 1, hi))
    steps = range(1, grid + 1)
    if hi > 2 * lo:
        pts = {round(lo * (hi / lo) ** (i / (grid + 1))) for i in steps}
    else:
        pts = {lo + round((hi - lo) * i / (grid + 1)) for i in steps}
    return sorted(c for c in pts if lo < c < hi)


def largest_passing(r: dict[int, float], alpha: float = ALPHA) -> tuple[int | None, int | None]:
    """The rule (docs/bound.md): (lo, hi) with lo = C_max, the largest C of `r` with r_C > alpha
    (None when none passes), and hi the smallest C of `r` above lo (every one above lo fails, by
    the choice of lo; None when lo is the largest C of `r`: C_max is then only a lower bound)."""
    passing = [c for c, v in r.items() if v > alpha]
    if not passing:
        return None, None
    lo = max(passing)
    above = [c for c in r if c > lo]
    return lo, (min(above) if above else None)


def next_round(r: dict[int, float], c_start: int, max_clusters: int, alpha: float = ALPHA,
               grid: int = GRID, tol: int = 1, rungs: int = RUNGS) -> dict:
    """The next round of the C_max search from the r_C known so far (module docstring).

    r: {C: r_C} of the finished TEMI clusterings (any C; those outside [c_start, max_clusters] are
    ignored). Returns {"done", "next" (sorted C's to cluster, [] when done), "c_max", "bounded"};
    c_max and bounded are None until done. Raises CedmError when no probe passes (C_max < C_start).
    """
    probes = {int(c): float(v) for c, v in r.items() if c_start <= int(c) <= max_clusters}
    rungs_all = ladder(c_start, max_clusters)
    for k in range(0, len(rungs_all), rungs):               # doubling, `rungs` rungs a round,
        chunk = rungs_all[k:k + rungs]                      # climbed while the top rung passes
        todo = [c for c in chunk if c not in probes]
        if todo:
            return {"done": False, "next": todo, "c_max": None, "bounded": None}
        if probes[chunk[-1]] <= alpha:
            break
    lo, hi = largest_passing(probes, alpha)
    if lo is None:
        raise CedmError(f"r_C <= alpha {alpha} at every probed C from --c-start {c_start} on (r_C = "
                        f"{probes[c_start]:.3f} at C_start): C_max is below C_start; rerun with a smaller "
                        f"--c-start (e.g. {max(2, c_start // 2)})")
    if hi is None:                                          # lo = max_clusters: only a lower bound
        return {"done": True, "next": [], "c_max": lo, "bounded": False}
    if hi - lo <= tol:
        return {"done": True, "next": [], "c_max": lo, "bounded": True}
    return {"done": False, "next": grid_points(lo, hi, grid), "c_max": None, "bounded": None}


def search(probe, c_start: int, alpha: float, max_clusters: int, tol: int = 1, grid: int = GRID,
           known: dict[int, float] | None = None) -> dict:
    """Run the rounds of `next_round` with r_C = probe(C), one C after another.

    known: r_C already measured (reused, never probed again). Returns {"c_max", "bounded",
    "rows" [{clusters, r_c}] over every probe in range, "rounds" [[C, ...], ...]}.
    """
    r = dict(known or {})
    rounds = []
    while True:
        step = next_round(r, c_start, max_clusters, alpha, grid, tol)
        if step["done"]:
            break
        rounds.append(step["next"])
        for c in step["next"]:
            r[c] = probe(c)
    rows = [{"clusters": c, "r_c": r[c]} for c in sorted(r) if c_start <= c <= max_clusters]
    return {"c_max": step["c_max"], "bounded": step["bounded"], "rows": rows, "rounds": rounds}


def _temi_dirs(rd: RunDir, lo: int = 2, hi: int | None = None):
    """(C, folder, manifest config) of every finished <run>/cluster/temi-C<C> with lo <= C <= hi,
    trained or imported; a trained one made from other features or kNN than the run's current
    ones is an error (it must be redone, never silently reused)."""
    root = rd.root / "cluster"
    if not root.is_dir():
        return
    current = None                      # the run's features and kNN, hashed once, when first needed
    for d in sorted(root.iterdir()):
        m = _TEMI_DIR.fullmatch(d.name)
        if not m or not (d / "manifest.json").exists():
            continue
        c = int(m.group(1))
        if c < lo or (hi is not None and c > hi):
            continue
        cfg = load_json(d / "manifest.json").get("config", {})
        if not cfg.get("imported"):
            current = current or (input_hash(rd.features), input_hash(rd.knn))
            if (cfg.get("features"), cfg.get("knn")) != current:
                raise CedmError(f"{d} was clustered from other features or kNN than the run's current ones; "
                                f"redo it with `cedm cluster --method temi --clusters {c} --force`")
        yield c, d, cfg


def finished(rd: RunDir, lo: int = 2, hi: int | None = None) -> dict[int, float]:
    """{C: r_C} of the run's own finished TEMI clusterings <run>/cluster/temi-C<C> with lo <= C <= hi,
    the search's probes. An imported one in range is an error: the search would mix it with its own
    runs (`cedm bound --from-existing` takes them as they are)."""
    out: dict[int, float] = {}
    for c, d, cfg in _temi_dirs(rd, lo, hi):
        if cfg.get("imported"):
            raise CedmError(f"{d} is an imported clustering (cedm cluster --import), not this run's TEMI, and the "
                            f"search probes C = {c}: use `cedm bound --from-existing` to take the clusterings "
                            f"as they are, or import into a run directory of its own (docs/bound.md)")
        out[c] = float(load_json(d / "summary.json")["r_c"])
    return out


def existing(rd: RunDir, lo: int = 2, hi: int | None = None) -> dict[int, dict]:
    """{C: {r_c, used_clusters, imported}} of every finished TEMI clustering of the run, imported or
    trained (`cedm bound --from-existing`)."""
    out = {}
    for c, d, cfg in _temi_dirs(rd, lo, hi):
        s = load_json(d / "summary.json")
        out[c] = {"r_c": float(s["r_c"]), "used_clusters": int(s["used_clusters"]), "imported": bool(cfg.get("imported"))}
    return out


def from_existing(run_dir, alpha: float = ALPHA, c_start: int | None = None, max_clusters: int | None = None,
                  force: bool = False, pushgateway=None) -> dict:
    """`cedm bound --from-existing`: the r_C table, the plot and C_max (the same rule, largest_passing)
    over the TEMI clusterings already in the run, imported or trained, in [c_start, max_clusters]
    (default: all); no TEMI runs. Returns the table plus "skipped"."""
    from cedm import pipeline, telemetry

    rd = RunDir(run_dir)
    if not 0 < alpha < 1:
        raise CedmError(f"--alpha must lie in (0, 1), got {alpha}")
    lo_c = 2 if c_start is None else int(c_start)
    found = existing(rd, lo_c, max_clusters)
    if not found:
        raise CedmError(f"--from-existing: no finished TEMI clustering cluster/temi-C<C> in {rd.root / 'cluster'}"
                        + (f" with {lo_c} <= C" + (f" <= {max_clusters}" if max_clusters else "") if c_start or
                           max_clusters else "")
                        + "; import the official files (`cedm cluster --import DIR --method temi --clusters C`) "
                          "or cluster first")
    r = {c: v["r_c"] for c, v in found.items()}
    c_max, hi = largest_passing(r, alpha)
    if c_max is None:
        raise CedmError(f"r_C <= alpha {alpha} at every clustering in the run (C = {min(r)}..{max(r)}): C_max is "
                        f"below the smallest C; add clusterings with a smaller C")
    if hi is not None:
        note = (f"C_max = {c_max}: the largest C in the run with r_C > alpha = {alpha}; every C above it fails, "
                f"the nearest, C = {hi} (r_C = {r[hi]:.4f}), {hi - c_max} above it: C_max is exact to that grid")
    else:
        note = (f"r_C stayed above alpha = {alpha} up to the largest C in the run: C_max >= {c_max} is only a "
                f"lower bound (add a larger C)")
    rows = [{"clusters": c, **found[c]} for c in sorted(found)]
    table: dict = {"alpha": float(alpha), "c_start": min(r), "max_clusters": max(r), "tol": None, "grid": None,
             "from_existing": True, "rows": rows, "rounds": [], "c_max": c_max, "bounded": hi is not None,
             "next_above": hi,
             "temi_runs": {"computed": [], "reused": sorted(r), "total": len(r),
                           "imported": sorted(c for c in r if found[c]["imported"])},
             "note": note}
    config = {"from_existing": True, "alpha": float(alpha), "c_start": c_start, "max_clusters": max_clusters}

    def compute(work, _):
        save_json(work / "table.json", table)
        plot(table, work / "r_c.png")
        return pipeline.Output({"table": "table.json", "plot": "r_c.png"})

    inputs = [rd.cluster("temi", c) for c in sorted(r)]
    done = pipeline.execute(pipeline.Stage("bound", rd.bound, rd.root, config, inputs), compute,
                            force=force, pushgateway=pushgateway, quiet=True)
    if done.skipped:
        table = load_json(rd.bound / "table.json")
        print(f"cedm bound: {rd.bound} is up to date (same clusterings); C_max = {table['c_max']}", file=sys.stderr)
    else:
        print(f"cedm bound --from-existing: {note}; {len(r)} clusterings ({len(table['temi_runs']['imported'])} "
              f"imported), no TEMI run -> {rd.bound}", file=sys.stderr)
    telemetry.BOUND_CMAX.set(table["c_max"])
    return {**table, "skipped": done.skipped}


def plot(table: dict, path) -> None:
    """r_C against C (log-x) with the alpha line and C_max marked (matplotlib, Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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


def _limits(rd: RunDir, pre, c_start, alpha, max_clusters, tol, grid) -> tuple[int, int, int]:
    """C_start, max_clusters and tol (None: the preset's) after the checks every mode shares."""
    c_start = int(pre.c_start if c_start is None else c_start)
    tol = int(pre.bound_tol if tol is None else tol)
    if not 0 < alpha < 1:
        raise CedmError(f"--alpha must lie in (0, 1), got {alpha}")
    if c_start < 2:
        raise CedmError(f"--c-start must be at least 2, got {c_start}")
    if tol < 1:
        raise CedmError(f"--tol must be at least 1, got {tol}")
    if grid < 1:
        raise CedmError(f"--grid must be at least 1, got {grid}")
    n = len(load_array(rd.features / "features.npy", mmap=True))
    if max_clusters is None:
        max_clusters = min(pre.bound_max_clusters or n // 2, n)
    max_clusters = int(max(2, max_clusters))
    if max_clusters > n:
        raise CedmError(f"--max-clusters {max_clusters} exceeds the number of samples N={n}")
    if c_start > max_clusters:
        raise CedmError(f"--c-start {c_start} exceeds --max-clusters {max_clusters}")
    return c_start, max_clusters, tol


def plan_next(run_dir, c_start: int | None = None, alpha: float = ALPHA, max_clusters: int | None = None,
              tol: int | None = None, grid: int = GRID) -> dict:
    """`cedm bound --next`: the next round from the finished clusterings on disk (nothing is written)."""
    from cedm.config import run_preset

    rd = RunDir(run_dir)
    c_start, max_clusters, tol = _limits(rd, run_preset(run_dir), c_start, alpha, max_clusters, tol, grid)
    return next_round(finished(rd, c_start, max_clusters), c_start, max_clusters, alpha, grid, tol)


def run(run_dir, c_start: int | None = None, alpha: float = ALPHA, max_clusters: int | None = None,
        tol: int | None = None, grid: int = GRID, seed: int = 0, device=None, force: bool = False,
        progress: bool = True, pushgateway=None, **cluster_opts) -> dict:
    """Search C_max for <run> (TEMI runs via cluster.run, reused when on disk); returns the table
    plus "skipped" (True when bound/ already holds the same search of the same clusterings).

    Runs through the stage layer (cedm.pipeline): the inputs are the features, the kNN and every
    clustering the search probed, so a clustering added or redone in range makes it search again.
    """
    from cedm import cluster, pipeline, telemetry
    from cedm.config import run_preset

    rd = RunDir(run_dir)
    c_start, max_clusters, tol = _limits(rd, run_preset(run_dir), c_start, alpha, max_clusters, tol, grid)
    opts = {k: v for k, v in cluster_opts.items() if v is not None}
    config = {"c_start": c_start, "alpha": float(alpha), "max_clusters": max_clusters, "tol": int(tol),
              "grid": int(grid), "seed": int(seed), "cluster": opts}
    runs: dict[str, list[int]] = {"computed": [], "reused": []}
    used: dict[int, int] = {}

    def probe(c: int) -> float:
        if c not in known:        # progress where no TTY shows TEMI's bar (a log, a pod)
            print(f"cedm bound: TEMI C={c} (the search's {len(runs['computed']) + 1}. new clustering)...",
                  file=sys.stderr, flush=True)
        # each clustering reports as its own `cluster` stage, not as part of bound's outcome
        with pipeline.reporting("cluster", pushgateway, run_dir=run_dir, cond=f"temi-C{c}"):
            s = cluster.run(run_dir, "temi", c, seed=seed, device=device, progress=progress, **opts)
        runs["reused" if s["reused"] else "computed"].append(c)
        used[c] = s["used_clusters"]
        if not s["reused"]:
            print(f"cedm bound: C={c}: r_C={s['r_c']:.4f} ({s['used_clusters']} used)", file=sys.stderr)
        return s["r_c"]

    # Clusterings already on disk go through cluster.run too: it checks their config matches.
    known = finished(rd, c_start, max_clusters)
    res = search(probe, c_start, alpha, max_clusters, tol, grid, known={c: probe(c) for c in known})
    rows = [{**row, "used_clusters": used[row["clusters"]]} for row in res["rows"]]
    if res["bounded"]:
        note = (f"C_max = {res['c_max']}: the largest probed C with r_C > alpha = {alpha}; every probed C "
                f"above it fails, the nearest within --tol {tol}")
    else:
        note = (f"r_C stayed above alpha = {alpha} up to --max-clusters {max_clusters}: C_max >= "
                f"{res['c_max']} is only a lower bound (raise --max-clusters)")
    table = {"alpha": float(alpha), "c_start": c_start, "max_clusters": max_clusters, "tol": int(tol),
             "grid": int(grid), "rows": rows, "rounds": res["rounds"], "c_max": res["c_max"],
             "bounded": res["bounded"],
             "temi_runs": {"computed": runs["computed"], "reused": runs["reused"],
                           "total": len(runs["computed"]) + len(runs["reused"])},
             "note": note}

    def compute(work, _):
        save_json(work / "table.json", table)
        plot(table, work / "r_c.png")
        return pipeline.Output({"table": "table.json", "plot": "r_c.png"})

    inputs = [rd.features, rd.knn] + [rd.cluster("temi", row["clusters"]) for row in rows]
    done = pipeline.execute(pipeline.Stage("bound", rd.bound, rd.root, config, inputs), compute,
                            force=force, pushgateway=pushgateway, quiet=True)
    if done.skipped:
        table = load_json(rd.bound / "table.json")
        print(f"cedm bound: {rd.bound} is up to date (same config and clusterings); C_max = "
              f"{table['c_max']}", file=sys.stderr)
    else:
        print(f"cedm bound: {note}; {table['temi_runs']['total']} TEMI runs "
              f"({len(runs['computed'])} computed, {len(runs['reused'])} reused) in {len(res['rounds'])} "
              f"rounds -> {rd.bound}", file=sys.stderr)
    telemetry.BOUND_CMAX.set(table["c_max"])
    return {**table, "skipped": done.skipped}


def register(sub) -> None:
    from cedm.pipeline import add_common
    from cedm.cluster import add_temi_args

    p = sub.add_parser("bound", help="search C_max, the largest C whose TEMI utilisation r_C > alpha",
                       description="Probe the doubling ladder C_start*2^k, four rungs a round while the top one passes, then grids between the "
                                   "largest C with r_C > alpha and the next probed C above it, until they "
                                   "are --tol apart; C_max is the largest probed C with r_C > alpha "
                                   "(robust to r_C not falling monotonically). Reuses cluster runs on "
                                   "disk; writes <run>/bound/table.json and r_c.png. With --next, only "
                                   "print the next round's C's (JSON, [] when done) for a parallel search.")
    add_common(p)
    p.add_argument("--c-start", type=int, default=None, metavar="N",
                   help="first C of the search (default: the preset's, e.g. the class count)")
    p.add_argument("--alpha", type=float, default=ALPHA,
                   help="utilisation threshold alpha (default: %(default)s)")
    p.add_argument("--max-clusters", type=int, default=None, metavar="N",
                   help="largest C probed (default: the preset's, else N/2; digits 320); if r_C > alpha "
                        "up to it, C_max is a lower bound")
    p.add_argument("--tol", type=int, default=None, metavar="N",
                   help="stop refining when the next probed C above C_max is at most N above it "
                        "(default: the preset's: 1, exact; digits 20)")
    p.add_argument("--grid", type=int, default=GRID, metavar="N",
                   help="C's probed per refinement round (default: %(default)s)")
    p.add_argument("--next", action="store_true",
                   help="cluster nothing: print the next round's C's as a JSON list ([] when the search "
                        "is complete) from the clusterings on disk")
    p.add_argument("--next-out", default=None, metavar="FILE",
                   help="with --next: also write that JSON list to FILE (an Argo output parameter)")
    p.add_argument("--from-existing", action="store_true",
                   help="run no TEMI: the r_C table, plot and C_max (the same rule) from the TEMI clusterings "
                        "already in the run, imported (cedm cluster --import) or trained; --c-start / "
                        "--max-clusters limit the C's taken (default: all)")
    p.add_argument("--c-max-out", default=None, metavar="FILE",
                   help="also write C_max to FILE (an Argo output parameter)")
    add_temi_args(p)
    p.set_defaults(func=_main)


def _main(args) -> int:
    from cedm import pipeline
    from cedm.pipeline import resolve_device
    from cedm.cluster import temi_kwargs

    if args.next_out and not args.next:
        raise CedmError("--next-out needs --next")
    if args.next:
        step = plan_next(args.run_dir, c_start=args.c_start, alpha=args.alpha, max_clusters=args.max_clusters,
                         tol=args.tol, grid=args.grid)
        text = json.dumps(step["next"])
        if args.next_out:
            write_bytes(args.next_out, text.encode())
        print("cedm bound --next: " + (f"C_max = {step['c_max']}" + ("" if step["bounded"] else
                                                                      " (lower bound)") + ": search complete"
                                        if step["done"] else f"cluster C = {text} next"), file=sys.stderr)
        print(text)
        return 0
    if args.from_existing:
        if args.next:
            raise CedmError("--from-existing plans no search: drop --next")
        given = [k for k, v in {**temi_kwargs(args), "tol": args.tol}.items() if v is not None]
        if given or args.grid != GRID:
            given += ["grid"] if args.grid != GRID else []
            raise CedmError(f"--from-existing runs no TEMI: drop {', '.join('--' + k.replace('_', '-') for k in given)}")
        with pipeline.reporting("bound", args.pushgateway, run_dir=args.run_dir):
            res = from_existing(args.run_dir, alpha=args.alpha, c_start=args.c_start, max_clusters=args.max_clusters,
                                force=args.force)
        if args.c_max_out:
            write_bytes(args.c_max_out, str(res["c_max"]).encode())
        print(res["c_max"])
        return 0
    with pipeline.reporting("bound", args.pushgateway, run_dir=args.run_dir):
        res = run(args.run_dir, c_start=args.c_start, alpha=args.alpha, max_clusters=args.max_clusters,
                  tol=args.tol, grid=args.grid, seed=args.seed, device=resolve_device(args.device),
                  force=args.force, **temi_kwargs(args))
    if args.c_max_out:
        write_bytes(args.c_max_out, str(res["c_max"]).encode())
    print(res["c_max"])
    return 0
