"""Prometheus metrics for every stage (prometheus-client).

Long-running training serves /metrics (`serve`, rank 0; PROMETHEUS_MULTIPROC_DIR enables
prometheus-client's multiprocess mode across torchrun workers). Short stages push their
outcome and duration to a Pushgateway when one is configured (`stage(..., pushgateway=...)`).
Names follow Prometheus conventions: base units, `_total` counters, `_seconds`, bounded labels
(stage, outcome, method, clusters, metric).

Where the series go (k8s/ and argo/ rely on this):
- Training pods are scraped (PodMonitor `cedm-train`, port `metrics`): the `cedm_train_*`
  series, one per conditioning (label `clusters`: the C, or the tag such as `uncond`).
- Every stage pushes, on exit, one Pushgateway group {job="cedm", instance=<host>, stage=<name>}
  holding that stage's `cedm_stage_*` series and the method gauges (r_C, C_max, FID/FDD). The
  `cedm_train_*` series are never pushed: a pushed copy would outlive the run and go stale.
  One group per (host, stage): an Argo pod (host = pod name) keeps its own group; a local
  `cedm sweep` process re-pushes its cumulative gauges in each stage's group (same values, so
  dashboards aggregate them with max/min, never sum).
"""
from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import time

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway,
                               start_http_server)

REGISTRY = CollectorRegistry(auto_describe=True)

STAGE_DURATION = Histogram(
    "cedm_stage_duration_seconds", "Wall time of a successful pipeline stage run.", ["stage"],
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 48 * 3600), registry=REGISTRY)
STAGE_RUNS = Counter(
    "cedm_stage_runs_total", "Pipeline stage runs by outcome (success, failure, skipped).",
    ["stage", "outcome"], registry=REGISTRY)
STAGE_LAST_SUCCESS = Gauge(
    "cedm_stage_last_success_timestamp_seconds", "Unix time of the last successful stage run.",
    ["stage"], registry=REGISTRY, multiprocess_mode="mostrecent")
STAGE_LAST_FAILURE = Gauge(
    "cedm_stage_last_failure_timestamp_seconds", "Unix time of the last failed stage run.",
    ["stage"], registry=REGISTRY, multiprocess_mode="mostrecent")

TRAIN_IMAGES = Counter(
    "cedm_train_images_total", "Training images seen by the generator.", ["clusters"], registry=REGISTRY)
TRAIN_TARGET_IMAGES = Gauge(
    "cedm_train_target_images", "Training budget in images.", ["clusters"], registry=REGISTRY,
    multiprocess_mode="livemostrecent")
TRAIN_LOSS = Gauge(
    "cedm_train_loss", "Latest EDM training loss (batch mean).", ["clusters"], registry=REGISTRY,
    multiprocess_mode="livemostrecent")
TRAIN_THROUGHPUT = Gauge(
    "cedm_train_images_per_second", "Training throughput, images per second.", ["clusters"],
    registry=REGISTRY, multiprocess_mode="livemostrecent")
TRAIN_NONFINITE = Counter(
    "cedm_train_nonfinite_steps_total", "Training steps with a non-finite loss or gradient.",
    ["clusters"], registry=REGISTRY)
TRAIN_LAST_STEP = Gauge(
    "cedm_train_last_step_timestamp_seconds", "Unix time of the latest training step.", ["clusters"],
    registry=REGISTRY, multiprocess_mode="livemostrecent")

CLUSTER_UTILISATION = Gauge(
    "cedm_cluster_utilisation_ratio", "Cluster utilisation ratio r_C = C^u / C.",
    ["method", "clusters"], registry=REGISTRY, multiprocess_mode="mostrecent")
CLUSTER_USED = Gauge(
    "cedm_cluster_used_clusters", "Clusters with at least one training sample (C^u).",
    ["method", "clusters"], registry=REGISTRY, multiprocess_mode="mostrecent")
BOUND_CMAX = Gauge("cedm_bound_cmax_clusters", "The C_max upper bound found by `cedm bound`.",
                   registry=REGISTRY, multiprocess_mode="mostrecent")
FRECHET_DISTANCE = Gauge(
    "cedm_frechet_distance", "FID / FDD of generated images per conditioning.",
    ["metric", "clusters"], registry=REGISTRY, multiprocess_mode="mostrecent")

_STAGE_FAMILIES = {"cedm_stage_duration_seconds", "cedm_stage_runs", "cedm_stage_runs_total",
                   "cedm_stage_last_success_timestamp_seconds",
                   "cedm_stage_last_failure_timestamp_seconds"}


@contextlib.contextmanager
def stage(name: str, pushgateway: str | None = None):
    """Time a stage run and count its outcome; push to a Pushgateway when one is given.

    Set `.skipped = True` on the yielded object to record a skip (outputs already there).
    """
    class _Run:
        skipped = False

    run = _Run()
    t0 = time.time()
    outcome = "failure"
    try:
        yield run
        outcome = "skipped" if run.skipped else "success"
    finally:
        STAGE_RUNS.labels(name, outcome).inc()
        if outcome == "success":
            STAGE_DURATION.labels(name).observe(time.time() - t0)
            STAGE_LAST_SUCCESS.labels(name).set_to_current_time()
        elif outcome == "failure":
            STAGE_LAST_FAILURE.labels(name).set_to_current_time()
        if pushgateway:
            push(pushgateway, name)


def train_started(clusters, target_images: float, images_done: float = 0) -> None:
    """Create a training run's series at their start values (so `increase()` sees the first step).

    `images_done`: images already seen when resuming from a checkpoint.
    """
    c = str(clusters)
    TRAIN_TARGET_IMAGES.labels(c).set(target_images)
    TRAIN_IMAGES.labels(c).inc(images_done)
    TRAIN_NONFINITE.labels(c).inc(0)
    TRAIN_LAST_STEP.labels(c).set_to_current_time()


def train_step(clusters, images: int, loss: float, images_per_second: float | None = None) -> None:
    """Record one optimiser step: `images` seen in it, its batch-mean loss, the throughput."""
    c = str(clusters)
    TRAIN_IMAGES.labels(c).inc(images)
    TRAIN_LOSS.labels(c).set(loss)
    if not math.isfinite(loss):
        TRAIN_NONFINITE.labels(c).inc()
    if images_per_second is not None:
        TRAIN_THROUGHPUT.labels(c).set(images_per_second)
    TRAIN_LAST_STEP.labels(c).set_to_current_time()


class _PushView:
    """What one stage pushes: its own `cedm_stage_*` samples and the method gauges, no training series."""

    def __init__(self, stage_name: str):
        self.stage_name = stage_name

    def collect(self):
        for fam in REGISTRY.collect():
            if fam.name.startswith("cedm_train_"):
                continue
            if fam.name in _STAGE_FAMILIES:
                fam.samples = [s for s in fam.samples if s.labels.get("stage") == self.stage_name]
            yield fam


def push(gateway: str, job_stage: str) -> None:
    """Push stage `job_stage`'s metrics to a Pushgateway; a failed push warns, never fails the stage.

    Grouping key: job="cedm", instance=<host> (the pod name in Kubernetes), stage=<job_stage>.
    """
    instance = os.environ.get("HOSTNAME") or socket.gethostname()
    view = CollectorRegistry(auto_describe=True)
    view.register(_PushView(job_stage))
    try:
        push_to_gateway(gateway, job="cedm", registry=view,
                        grouping_key={"instance": instance, "stage": job_stage}, timeout=5)
    except OSError as e:
        print(f"cedm: warning: could not push metrics to {gateway}: {e}", file=sys.stderr)


def serve(port: int, addr: str = "0.0.0.0"):
    """Serve /metrics on `port` (training pods; call on rank 0 only). Returns (server, thread)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return start_http_server(port, addr=addr, registry=reg)
    return start_http_server(port, addr=addr, registry=REGISTRY)
