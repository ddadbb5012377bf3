"""`cedm sweep-exit`: the Argo sweep's exit handler (argo/sweep.yaml, `onExit`).

Runs whatever the workflow's outcome, and
- records it in <runs>/<run>/workflow.json (status, duration, the failed steps);
- counts it as stage "sweep" (cedm_stage_runs_total, ...); this also catches pods killed before
  they could push (OOM, deadline, eviction), so the CedmStageFailed alert fires on stage="sweep";
- on the Pushgateway, replaces the workflow's per-pod groups (one per stage pod, labelled
  workflow=<this workflow>) by one group {job="cedm", dataset, run, workflow, stage="sweep"}
  holding the outcome and the last value of each method gauge (r_C, C_max, FID/FDD) those pods
  pushed. The Pushgateway keeps one group per sweep instead of one per pod for ever.
"""
from __future__ import annotations

import json
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry, delete_from_gateway, push_to_gateway
from prometheus_client.core import GaugeMetricFamily

from cedm import telemetry
from cedm.io import CedmError, save_json

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Gauges whose last values the sweep's group keeps (the method's results).
CARRIED = ("cedm_cluster_utilisation_ratio", "cedm_cluster_used_clusters", "cedm_bound_cmax_clusters",
           "cedm_frechet_distance")


def _url(gateway: str) -> str:
    return gateway if "://" in gateway else f"http://{gateway}"


def workflow_groups(gateway: str, workflow: str) -> list[dict]:
    """The Pushgateway's groups of job "cedm" pushed by the pods of `workflow` (its /api/v1/metrics)."""
    with urllib.request.urlopen(f"{_url(gateway)}/api/v1/metrics", timeout=10) as r:
        groups = json.loads(r.read())["data"]
    return [g for g in groups if g["labels"].get("job") == "cedm" and g["labels"].get("workflow") == workflow
            and g["labels"].get("stage") != "sweep"]


class _Carried:
    """The carried gauges of the deleted groups: per label set the most recently pushed value."""

    def __init__(self, groups: list[dict]):
        self.values: dict[str, dict[tuple, tuple[float, float]]] = {}
        self.help: dict[str, str] = {}
        for g in groups:
            key = set(g["labels"])
            t = float(g.get("push_time_seconds", {}).get("metrics", [{}])[0].get("value", 0) or 0)
            for name in CARRIED:
                fam = g.get(name)
                if not fam:
                    continue
                self.help[name] = fam.get("help", name)
                for m in fam["metrics"]:
                    lbl = tuple(sorted((k, v) for k, v in m.get("labels", {}).items() if k not in key))
                    old = self.values.setdefault(name, {}).get(lbl)
                    if old is None or t >= old[0]:
                        self.values[name][lbl] = (t, float(m["value"]))

    def collect(self):
        for name, series in self.values.items():
            names = sorted({k for lbl in series for k, _ in lbl})
            fam = GaugeMetricFamily(name, self.help[name], labels=names)
            for lbl, (_, v) in sorted(series.items()):
                d = dict(lbl)
                fam.add_metric([d.get(k, "") for k in names], v)
            yield fam


class _SweepStage:
    """This process's stage "sweep" series."""

    def collect(self):
        for fam in telemetry.REGISTRY.collect():
            if fam.name in telemetry._STAGE_FAMILIES:
                fam.samples = [s for s in fam.samples if s.labels.get("stage") == "sweep"]
                yield fam


def run(runs: str, dataset: str, run_name: str, workflow: str, status: str, duration: float,
        failures: str = "", pushgateway: str | None = None) -> dict:
    name = run_name or dataset
    if not RUN_NAME.fullmatch(name or ""):
        raise CedmError(f"run must be a plain directory name, got {name!r}")
    try:
        failed = json.loads(failures or "[]")
    except ValueError:
        failed = failures  # Argo's text when it is not JSON
    record = {"workflow": workflow, "status": status, "duration_seconds": duration, "failures": failed}
    root = Path(runs) / name
    root.mkdir(parents=True, exist_ok=True)
    save_json(root / "workflow.json", record)

    ok = status == "Succeeded"
    telemetry.STAGE_RUNS.labels("sweep", "", "success" if ok else "failure").inc()
    if ok:
        telemetry.STAGE_DURATION.labels("sweep", "").observe(duration)
        telemetry.STAGE_LAST_SUCCESS.labels("sweep", "").set_to_current_time()
    else:
        telemetry.STAGE_LAST_FAILURE.labels("sweep", "").set_to_current_time()
    if pushgateway:
        key = {"dataset": dataset, "run": name, "workflow": workflow, "stage": "sweep"}
        try:
            groups = workflow_groups(pushgateway, workflow) if workflow else []
            view = CollectorRegistry(auto_describe=True)
            view.register(_SweepStage())
            view.register(_Carried(groups))
            push_to_gateway(pushgateway, job="cedm", registry=view,
                            grouping_key={k: v for k, v in key.items() if v}, timeout=10)
            for g in groups:
                delete_from_gateway(pushgateway, job="cedm", timeout=10,
                                    grouping_key={k: v for k, v in g["labels"].items() if k != "job"})
            record["deleted_groups"] = len(groups)
        except (OSError, urllib.error.URLError, ValueError) as e:
            print(f"cedm sweep-exit: warning: Pushgateway {pushgateway}: {e}", file=sys.stderr)
    return record


def register(sub) -> None:
    p = sub.add_parser("sweep-exit", help="record an Argo sweep's outcome (its exit handler)",
                       description="The exit handler of argo/sweep.yaml: writes <runs>/<run>/workflow.json, "
                                   "counts the sweep as stage 'sweep' and replaces the workflow's per-pod "
                                   "Pushgateway groups by one group per sweep.")
    p.add_argument("--runs", default="/data/runs", help="folder of the run directories (default: %(default)s)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--run", default="", help="run directory name (default: the dataset)")
    p.add_argument("--workflow", required=True, help="the workflow's name ({{workflow.name}})")
    p.add_argument("--status", required=True, help="{{workflow.status}}: Succeeded, Failed or Error")
    p.add_argument("--duration", type=float, required=True, help="{{workflow.duration}} in seconds")
    p.add_argument("--failures", default="", help="{{workflow.failures}} (JSON)")
    p.add_argument("--pushgateway", default=None, metavar="HOST:PORT")
    p.set_defaults(func=_main)


def _main(args) -> int:
    rec = run(args.runs, args.dataset, args.run, args.workflow, args.status, args.duration, args.failures,
              args.pushgateway)
    print(f"{args.workflow}: {args.status} after {args.duration:.0f} s"
          + (f"; replaced {rec['deleted_groups']} Pushgateway groups" if "deleted_groups" in rec else ""))
    return 0
