"""Prometheus metrics for every stage (prometheus-client).

Long-running training serves /metrics (`serve`, rank 0; PROMETHEUS_MULTIPROC_DIR enables
prometheus-client's multiprocess mode across torchrun workers). Short stages push their
outcome and duration to a Pushgateway when one is configured (`stage(..., pushgateway=...)`).
Names follow Prometheus conventions: base units, `_total` counters, `_seconds`, bounded labels
(stage, method, clusters, metric).
"""
from __future__ import annotations

import contextlib
import os
import socket
import time

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway,
                               start_http_server)

REGISTRY = CollectorRegistry(auto_describe=True)

STAGE_DURATION = Histogram(
    "cedm_stage_duration_seconds", "Wall time of a pipeline stage run.", ["stage"],
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 48 * 3600), registry=REGISTRY)
STAGE_RUNS = Counter(
    "cedm_stage_runs_total", "Pipeline stage runs by outcome (success, failure, skipped).",
    ["stage", "outcome"], registry=REGISTRY)
STAGE_LAST_SUCCESS = Gauge(
    "cedm_stage_last_success_timestamp_seconds", "Unix time of the last successful stage run.",
    ["stage"], registry=REGISTRY)

TRAIN_IMAGES = Counter(
    "cedm_train_images_total", "Training images seen by the generator.", ["clusters"], registry=REGISTRY)
TRAIN_TARGET_IMAGES = Gauge(
    "cedm_train_target_images", "Training budget in images.", ["clusters"], registry=REGISTRY)
TRAIN_LOSS = Gauge(
    "cedm_train_loss", "Latest EDM training loss (batch mean).", ["clusters"], registry=REGISTRY)
TRAIN_THROUGHPUT = Gauge(
    "cedm_train_images_per_second", "Training throughput, images per second.", ["clusters"],
    registry=REGISTRY)
TRAIN_NONFINITE = Counter(
    "cedm_train_nonfinite_steps_total", "Training steps with a non-finite loss or gradient.",
    ["clusters"], registry=REGISTRY)
TRAIN_LAST_STEP = Gauge(
    "cedm_train_last_step_timestamp_seconds", "Unix time of the latest training step.", ["clusters"],
    registry=REGISTRY)

CLUSTER_UTILISATION = Gauge(
    "cedm_cluster_utilisation_ratio", "Cluster utilisation ratio r_C = C^u / C.",
    ["method", "clusters"], registry=REGISTRY)
CLUSTER_USED = Gauge(
    "cedm_cluster_used_clusters", "Clusters with at least one training sample (C^u).",
    ["method", "clusters"], registry=REGISTRY)
BOUND_CMAX = Gauge("cedm_bound_cmax_clusters", "The C_max upper bound found by `cedm bound`.",
                   registry=REGISTRY)
FRECHET_DISTANCE = Gauge(
    "cedm_frechet_distance", "FID / FDD of generated images per conditioning.",
    ["metric", "clusters"], registry=REGISTRY)


@contextlib.contextmanager
def stage(name: str, pushgateway: str | None = None):
    """Time a stage run and count its outcome; push to a Pushgateway when one is given.

    The body may `yield`-ed object's `.skipped = True` to record a skip.
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
        if pushgateway:
            push(pushgateway, name)


def push(gateway: str, job_stage: str) -> None:
    """Push the registry to a Pushgateway; a failed push warns, never fails the stage."""
    instance = os.environ.get("HOSTNAME") or socket.gethostname()
    try:
        push_to_gateway(gateway, job=f"cedm-{job_stage}", registry=REGISTRY,
                        grouping_key={"instance": instance}, timeout=5)
    except OSError as e:
        import sys

        print(f"cedm: warning: could not push metrics to {gateway}: {e}", file=sys.stderr)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics on `port` (training pods; call on rank 0 only)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        start_http_server(port, addr=addr, registry=reg)
    else:
        start_http_server(port, addr=addr, registry=REGISTRY)
