"""Prometheus metrics for every stage (prometheus-client).

Long-running training serves /metrics (`serve`, rank 0; PROMETHEUS_MULTIPROC_DIR enables
prometheus-client's multiprocess mode across torchrun workers). Short stages push their
outcome and duration to a Pushgateway when one is configured (`stage(..., pushgateway=...)`).
Names follow Prometheus conventions: base units, `_total` counters, `_seconds`, bounded labels
(stage, outcome, method, clusters, metric, and the run labels below).

Every series names its run and its conditioning (k8s/ and argo/ rely on this):
- run labels: `dataset`, `run` (the run directory's name) and `workflow` (the Argo workflow;
  empty locally). From the environment (CEDM_DATASET, CEDM_RUN, CEDM_WORKFLOW), else from the
  run directory (CEDM_RUN_DIR, or the stage's own: its name, and the dataset its data stage
  recorded). The Argo templates set CEDM_RUN_DIR, CEDM_WORKFLOW and CEDM_COND.
- `cond`: the conditioning tag (`temi-C100`, `uncond`, ...; CEDM_COND, or the stage's own), and
  on training and Fréchet series also `clusters` (the C, or the tag's kind).

Where the series go:
- Training pods are scraped (PodMonitor `cedm-train`, port `metrics`): only the `cedm_train_*`
  series, labelled dataset/run/cond/clusters; the PodMonitor adds `workflow` (from the pod
  label workflows.argoproj.io/workflow) with namespace and pod.
- Every stage pushes, on exit, one Pushgateway group {job="cedm", dataset, run, workflow,
  stage, cond, instance=<host>} holding that stage's `cedm_stage_*` series and the method
  gauges (r_C, C_max, FID/FDD); the Pushgateway puts the grouping labels on each of them.
  The `cedm_train_*` series are never pushed: a pushed copy would outlive the run and go stale.
  A local `cedm sweep` process re-pushes its cumulative gauges in each stage's group (same
  values, so dashboards aggregate them with max/min, never sum).
- When an Argo sweep ends, its exit handler (`cedm sweep-exit`, cedm/sweep_exit.py) replaces
  the sweep's per-pod groups by one group {job="cedm", dataset, run, workflow, stage="sweep"}:
  the sweep's outcome and the last method gauges, so the Pushgateway holds one group per sweep.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import sys
import time
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    push_to_gateway,
    start_http_server,
)

REGISTRY = CollectorRegistry(auto_describe=True)
RUN_LABELS = ("dataset", "run", "workflow")
TRAIN_LABELS = ["dataset", "run", "cond", "clusters"]

STAGE_DURATION = Histogram(
    "cedm_stage_duration_seconds", "Wall time of a successful pipeline stage run.", ["stage", "cond"],
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 48 * 3600), registry=REGISTRY)
STAGE_RUNS = Counter(
    "cedm_stage_runs_total", "Pipeline stage runs by outcome (success, failure, skipped).",
    ["stage", "cond", "outcome"], registry=REGISTRY)
STAGE_LAST_SUCCESS = Gauge(
    "cedm_stage_last_success_timestamp_seconds", "Unix time of the last successful stage run.",
    ["stage", "cond"], registry=REGISTRY, multiprocess_mode="mostrecent")
STAGE_LAST_FAILURE = Gauge(
    "cedm_stage_last_failure_timestamp_seconds", "Unix time of the last failed stage run.",
    ["stage", "cond"], registry=REGISTRY, multiprocess_mode="mostrecent")

TRAIN_IMAGES = Counter(
    "cedm_train_images_total", "Training images seen by the generator (resumed runs count the "
    "checkpoint's images).", TRAIN_LABELS, registry=REGISTRY)
TRAIN_TARGET_IMAGES = Gauge(
    "cedm_train_target_images", "Training budget in images.", TRAIN_LABELS, registry=REGISTRY,
    multiprocess_mode="livemostrecent")
TRAIN_LOSS = Gauge(
    "cedm_train_loss", "Latest EDM training loss (batch mean).", TRAIN_LABELS, registry=REGISTRY,
    multiprocess_mode="livemostrecent")
TRAIN_THROUGHPUT = Gauge(
    "cedm_train_images_per_second", "Training throughput, images per second.", TRAIN_LABELS,
    registry=REGISTRY, multiprocess_mode="livemostrecent")
TRAIN_NONFINITE = Counter(
    "cedm_train_nonfinite_steps_total", "Training steps with a non-finite loss or gradient "
    "(fp32/bf16; fp16 overflows count as skipped steps).", TRAIN_LABELS, registry=REGISTRY)
TRAIN_SKIPPED = Counter(
    "cedm_train_skipped_steps_total", "fp16 steps the gradient scaler skipped on an overflow "
    "(normal while it finds its scale).", TRAIN_LABELS, registry=REGISTRY)
TRAIN_LAST_STEP = Gauge(
    "cedm_train_last_step_timestamp_seconds", "Unix time of the latest training step.", TRAIN_LABELS,
    registry=REGISTRY, multiprocess_mode="livemostrecent")

CLUSTER_UTILISATION = Gauge(
    "cedm_cluster_utilisation_ratio", "Cluster utilisation ratio r_C = C^u / C.",
    ["method", "clusters"], registry=REGISTRY, multiprocess_mode="mostrecent")
CLUSTER_USED = Gauge(
    "cedm_cluster_used_clusters", "Clusters with at least one training sample (C^u).",
    ["method", "clusters"], registry=REGISTRY, multiprocess_mode="mostrecent")
class _SetOnceGauge(Gauge):
    """An unlabelled gauge that knows whether it was set: pushed only then (else every stage's
    push would carry a 0 that is no result)."""

    is_set = False

    def set(self, value: float) -> None:
        self.is_set = True
        super().set(value)


BOUND_CMAX = _SetOnceGauge("cedm_bound_cmax_clusters", "The C_max upper bound found by `cedm bound`.",
                           registry=REGISTRY, multiprocess_mode="mostrecent")
FRECHET_DISTANCE = Gauge(
    "cedm_frechet_distance", "FID / FDD of generated images per conditioning.",
    ["metric", "clusters"], registry=REGISTRY, multiprocess_mode="mostrecent")

_STAGE_FAMILIES = {"cedm_stage_duration_seconds", "cedm_stage_runs", "cedm_stage_runs_total",
                   "cedm_stage_last_success_timestamp_seconds",
                   "cedm_stage_last_failure_timestamp_seconds"}


def _dataset_of(run_dir) -> str:
    try:
        return str(json.loads((Path(run_dir) / "data" / "manifest.json").read_text())["config"]["dataset"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def run_labels(run_dir=None) -> dict[str, str]:
    """{dataset, run, workflow} of this process: the environment first (set by the Argo
    templates), else the run directory (its name; the dataset its data stage recorded)."""
    env = os.environ
    run_dir = run_dir or env.get("CEDM_RUN_DIR")
    run = env.get("CEDM_RUN") or (Path(run_dir).resolve().name if run_dir else "")
    dataset = env.get("CEDM_DATASET") or (_dataset_of(run_dir) if run_dir else "")
    return {"dataset": dataset, "run": run, "workflow": env.get("CEDM_WORKFLOW", "")}


def _cond(cond) -> str:
    return str(cond) if cond else os.environ.get("CEDM_COND", "")


@contextlib.contextmanager
def stage(name: str, pushgateway: str | None = None, run_dir=None, cond=None):
    """Time a stage run and count its outcome; push to a Pushgateway when one is given.

    `run_dir`, `cond`: where the run labels and the conditioning come from when the environment
    does not name them (see the module docstring). Set `.skipped = True` on the yielded object
    to record a skip (outputs already there).
    """
    class _Run:
        skipped = False

    run = _Run()
    c = _cond(cond)
    t0 = time.time()
    outcome = "failure"
    try:
        yield run
        outcome = "skipped" if run.skipped else "success"
    finally:
        STAGE_RUNS.labels(name, c, outcome).inc()
        if outcome == "success":
            STAGE_DURATION.labels(name, c).observe(time.time() - t0)
            STAGE_LAST_SUCCESS.labels(name, c).set_to_current_time()
        elif outcome == "failure":
            STAGE_LAST_FAILURE.labels(name, c).set_to_current_time()
        if pushgateway:
            push(pushgateway, name, run_dir=run_dir, cond=c)


_TRAIN: dict[str, tuple] = {}  # clusters label -> the full training label values


def _train_labels(clusters) -> tuple:
    c = str(clusters)
    if c not in _TRAIN:
        lbl = run_labels()
        _TRAIN[c] = (lbl["dataset"], lbl["run"], _cond(None) or c, c)
    return _TRAIN[c]


def train_started(clusters, target_images: float, images_done: float = 0, run_dir=None,
                  cond=None) -> None:
    """Create a training run's series at their start values (so `increase()` sees the first step).

    `images_done`: images already seen when resuming from a checkpoint (the counter continues
    from there). `run_dir`, `cond`: label sources when the environment does not name them.
    """
    c = str(clusters)
    lbl = run_labels(run_dir)
    _TRAIN[c] = (lbl["dataset"], lbl["run"], _cond(cond) or c, c)
    labels = _TRAIN[c]
    TRAIN_TARGET_IMAGES.labels(*labels).set(target_images)
    TRAIN_IMAGES.labels(*labels).inc(images_done)
    TRAIN_NONFINITE.labels(*labels).inc(0)
    TRAIN_SKIPPED.labels(*labels).inc(0)
    TRAIN_LAST_STEP.labels(*labels).set_to_current_time()


def train_step(clusters, images: int, loss: float, images_per_second: float | None = None) -> None:
    """Record one optimiser step: `images` seen in it, its batch-mean loss, the throughput."""
    labels = _train_labels(clusters)
    TRAIN_IMAGES.labels(*labels).inc(images)
    TRAIN_LOSS.labels(*labels).set(loss)
    if not math.isfinite(loss):
        TRAIN_NONFINITE.labels(*labels).inc()
    if images_per_second is not None:
        TRAIN_THROUGHPUT.labels(*labels).set(images_per_second)
    TRAIN_LAST_STEP.labels(*labels).set_to_current_time()


def train_nonfinite_step(clusters, skipped: bool) -> None:
    """A step whose gradients were not finite: `skipped` when the fp16 gradient scaler skipped
    it (an overflow: normal, counted apart), else a non-finite step (the alert's signal)."""
    (TRAIN_SKIPPED if skipped else TRAIN_NONFINITE).labels(*_train_labels(clusters)).inc()


class _PushView:
    """What one stage pushes: its own `cedm_stage_*` samples and the method gauges, no training series."""

    def __init__(self, stage_name: str, cond: str = ""):
        self.stage_name, self.cond = stage_name, cond

    def collect(self):
        for fam in REGISTRY.collect():
            if fam.name.startswith("cedm_train_") or (fam.name == BOUND_CMAX._name and not BOUND_CMAX.is_set):
                continue
            if fam.name in _STAGE_FAMILIES:
                fam.samples = [s for s in fam.samples if s.labels.get("stage") == self.stage_name
                               and s.labels.get("cond", "") == self.cond]
            yield fam


class _TrainView:
    """What a training pod serves: the `cedm_train_*` series only (its stage outcome is pushed)."""

    def collect(self):
        for fam in REGISTRY.collect():
            if fam.name.startswith("cedm_train_"):
                yield fam


def grouping_key(stage_name: str, run_dir=None, cond: str = "", instance: str | None = None) -> dict:
    """The Pushgateway grouping key of a stage push (empty labels left out, as Prometheus does)."""
    key = {**run_labels(run_dir), "stage": stage_name, "cond": cond,
           "instance": os.environ.get("HOSTNAME") or socket.gethostname() if instance is None else instance}
    return {k: v for k, v in key.items() if v}


def gateway_url(gateway: str) -> str:
    """The Pushgateway URL that prometheus-client pushes to for a --pushgateway value (its
    `exposition._use_gateway`: http:// is added unless the value starts with http:// or https://),
    checked before any work: a one-line CedmError naming what is wrong and the fix."""
    from urllib.parse import urlsplit

    from cedm.io import CedmError

    text = str(gateway).strip()
    fix = "give HOST:PORT or an http(s):// URL (e.g. localhost:9091), or leave --pushgateway and $CEDM_PUSHGATEWAY unset"
    if not text or any(c.isspace() or ord(c) < 32 or c == "\x7f" for c in text):
        raise CedmError(f"--pushgateway {gateway!r} is not a host: it is empty or holds spaces or control "
                        f"characters; {fix}")
    try:
        if urlsplit(text).scheme not in ("http", "https"):
            text = f"http://{text}"
        url = urlsplit(text)
        host, port = url.hostname, url.port                      # .port raises on a bad port
    except ValueError as e:
        raise CedmError(f"--pushgateway {gateway!r} is not a valid host[:port] ({e}); {fix}") from None
    if not host or url.query or url.fragment or url.username is not None:
        raise CedmError(f"--pushgateway {gateway!r} is not a host[:port] (no host, or a query, fragment or "
                        f"user part); {fix}")
    if not (_HOST.fullmatch(host) or _is_ip(host)):
        raise CedmError(f"--pushgateway {gateway!r}: {host!r} is not a host name or IP address; {fix}")
    if port == 0:
        raise CedmError(f"--pushgateway {gateway!r}: port 0 is no port; {fix}")
    return text.rstrip("/")


_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?")
_REACHABLE: dict[str, str | None] = {}     # gateway -> why it did not answer (None: it did), per process


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def check_gateway(gateway: str, timeout: float = 2.0) -> str | None:
    """Before a stage's work: a bad --pushgateway value is an error (gateway_url); a gateway that
    does not answer a TCP connect within `timeout` s is a warning, once per process, and the stage
    runs (its push at the end warns again, never fails it). Returns the reason it did not answer."""
    from urllib.parse import urlsplit

    url = urlsplit(gateway_url(gateway))
    if gateway not in _REACHABLE:
        from cedm.hub import tcp_error

        port = url.port or (443 if url.scheme == "https" else 80)
        _REACHABLE[gateway] = tcp_error(url.hostname or "", port, timeout)     # DNS included, bounded
        if _REACHABLE[gateway] is not None:
            if int(os.environ.get("RANK", "0")) == 0:          # once per job, not once per torchrun rank
                print(f"cedm: warning: Pushgateway {gateway} does not answer ({_REACHABLE[gateway]}); the work runs, "
                      f"but its metrics are pushed only if the gateway answers by then", file=sys.stderr)
    return _REACHABLE[gateway]


def push(gateway: str, job_stage: str, run_dir=None, cond: str | None = None) -> None:
    """Push stage `job_stage`'s metrics to a Pushgateway; a failed push warns, never fails the stage.

    Grouping key: job="cedm" and `grouping_key` (run labels, stage, cond, instance=<host>: the pod
    name in Kubernetes).
    """
    c = _cond(cond)
    view = CollectorRegistry(auto_describe=True)
    view.register(_PushView(job_stage, c))
    try:
        push_to_gateway(gateway, job="cedm", registry=view, grouping_key=grouping_key(job_stage, run_dir, c),
                        timeout=5)
    except Exception as e:  # noqa: BLE001 -- unreachable, refused, an HTTP error, a bad URL: never fail the stage
        print(f"cedm: warning: could not push metrics to {gateway}: {type(e).__name__}: {e}", file=sys.stderr)


def serve(port: int, addr: str = "0.0.0.0"):
    """Serve the training series on /metrics at `port` (training pods; call on rank 0 only).
    Returns (server, thread)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return start_http_server(port, addr=addr, registry=reg)
    view = CollectorRegistry(auto_describe=False)
    view.register(_TrainView())
    return start_http_server(port, addr=addr, registry=view)
