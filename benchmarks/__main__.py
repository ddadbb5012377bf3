"""`make bench`: run every benchmarks/bench_*.py, print one table, write bench-results/bench.json.

Each module has `main(quick: bool) -> list[dict]`; a row holds at least
name, baseline, ours_s, baseline_s, ratio (baseline_s / ours_s), goal (ratio wanted), met.
Speed goals are ratios measured in the same run, never absolute times (shared, noisy machines).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="run only modules whose name contains this")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--out", default="bench-results/bench.json")
    args = ap.parse_args()
    import torch

    rows = []
    pkg = Path(__file__).parent
    for info in sorted(pkgutil.iter_modules([str(pkg)]), key=lambda i: i.name):
        if not info.name.startswith("bench_") or (args.only and args.only not in info.name):
            continue
        mod = importlib.import_module(f"benchmarks.{info.name}")
        print(f"== {info.name}", flush=True)
        t0 = time.time()
        for row in mod.main(quick=args.quick):
            row.setdefault("module", info.name)
            rows.append(row)
        print(f"   ({time.time() - t0:.0f} s)", flush=True)
    print()
    print(f"{'benchmark':58s} {'ours':>10s} {'baseline':>10s} {'ratio':>7s} {'goal':>6s}  met")
    for r in rows:
        ours = f"{r['ours_s'] * 1e3:.2f}ms" if r.get("ours_s") is not None else "-"
        base = f"{r['baseline_s'] * 1e3:.2f}ms" if r.get("baseline_s") is not None else "-"
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "-"
        goal = f"{r['goal']:.1f}x" if r.get("goal") is not None else "-"
        met = {True: "yes", False: "NO", None: "-"}[r.get("met")]
        print(f"{r['name'][:58]:58s} {ours:>10s} {base:>10s} {ratio:>7s} {goal:>6s}  {met}")
        for k in ("note",):
            if r.get(k):
                print(f"    {r[k]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
