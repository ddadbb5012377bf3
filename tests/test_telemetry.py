"""cedm's Prometheus metrics, the alert rules and the Grafana dashboard, against real Prometheus.

Unit level: stage outcomes, what a stage pushes, `promtool check metrics` on the exposition,
`promtool check rules` and `promtool test rules` (k8s/monitoring/alerts-test.yaml) on the alerts.

End to end (slow): the test starts Debian's `prometheus` and `prometheus-pushgateway` on
127.0.0.1 (random free ports) and
- a real `cedm data --pushgateway` (a real stage pushing its outcome),
- when `cedm.train` exists, a tiny real `cedm train --metrics-port` on digits (CPU) whose
  /metrics Prometheus scrapes,
- a small process driving the telemetry API as a sweep's pods would: stage pushes (cluster,
  bound, evaluate, a failing knn) and a training loop with one non-finite step; it is what
  makes the CedmStageFailed and CedmTrainingNonFiniteLoss alerts' conditions true,
- pushed stand-ins for series that cannot exist here, in the shape their exporters give them:
  NVIDIA dcgm-exporter's DCGM_FI_DEV_* (no GPU here; GPU utilisation 3 % for the simulated
  training pod, so CedmGpuIdle's condition holds) and the Argo controller's
  argo_workflows_cedm_step_runs_total (no Argo controller here).
Then every PromQL expression of the dashboard and of the alert rules must evaluate, and return
data where the data exists (all dashboard panels; the alerts whose conditions were made true);
Prometheus itself loads the rules and reports those alerts pending or firing.
The scrape config gives the training targets the `namespace`/`pod` labels the Prometheus
Operator's PodMonitor adds in a cluster.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from cedm import telemetry

ROOT = Path(__file__).resolve().parents[1]
RULE = ROOT / "k8s" / "monitoring" / "prometheusrule.yaml"
RULE_TESTS = ROOT / "k8s" / "monitoring" / "alerts-test.yaml"
DASHBOARD = ROOT / "k8s" / "dashboards" / "cedm.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
PUSHGATEWAY = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: apt-get install prometheus")


def _rules() -> dict:
    return yaml.safe_load(RULE.read_text())["spec"]


def _alerts() -> dict[str, str]:
    return {r["alert"]: r["expr"] for g in _rules()["groups"] for r in g["rules"] if "alert" in r}


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


# Grafana variables as Grafana would expand them for "All" and a 1 s scrape interval.
GRAFANA_VARS = {"$__rate_interval": "20s", "$clusters": ".*", "$dataset": ".*", "$run": ".*", "$workflow": ".*"}


def _expand(expr: str) -> str:
    for k, v in GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


# --------------------------------------------------------------------------------------------
# Unit level

def _value(name, **labels):
    return telemetry.REGISTRY.get_sample_value(name, labels) or 0.0


def test_stage_counts_outcomes_and_times():
    before = {o: _value("cedm_stage_runs_total", stage="t-unit", cond="", outcome=o)
              for o in ("success", "failure", "skipped")}
    with telemetry.stage("t-unit"):
        pass
    with telemetry.stage("t-unit") as run:
        run.skipped = True
    with pytest.raises(ValueError), telemetry.stage("t-unit"):
        raise ValueError("boom")
    for o in before:
        assert _value("cedm_stage_runs_total", stage="t-unit", cond="", outcome=o) == before[o] + 1
    assert _value("cedm_stage_duration_seconds_count", stage="t-unit", cond="") >= 1  # successes only
    assert _value("cedm_stage_last_failure_timestamp_seconds", stage="t-unit", cond="") >= \
        _value("cedm_stage_last_success_timestamp_seconds", stage="t-unit", cond="") > 0
    with telemetry.stage("t-unit", cond="temi-C10"):
        pass
    assert _value("cedm_stage_runs_total", stage="t-unit", cond="temi-C10", outcome="success") == 1


def test_run_labels_come_from_the_environment_else_the_run_dir(tmp_path, monkeypatch):
    for k in ("CEDM_DATASET", "CEDM_RUN", "CEDM_WORKFLOW", "CEDM_RUN_DIR", "CEDM_COND"):
        monkeypatch.delenv(k, raising=False)
    run = tmp_path / "c10-small"
    (run / "data").mkdir(parents=True)
    (run / "data" / "manifest.json").write_text(json.dumps({"config": {"dataset": "cifar10"}}))
    assert telemetry.run_labels(run) == {"dataset": "cifar10", "run": "c10-small", "workflow": ""}
    assert telemetry.run_labels() == {"dataset": "", "run": "", "workflow": ""}
    # In a pod: the template's environment (run dir and workflow), the dataset from the run dir.
    monkeypatch.setenv("CEDM_RUN_DIR", str(run))
    monkeypatch.setenv("CEDM_WORKFLOW", "cedm-sweep-x1")
    monkeypatch.setenv("HOSTNAME", "cedm-sweep-x1-cluster-123")
    assert telemetry.run_labels() == {"dataset": "cifar10", "run": "c10-small", "workflow": "cedm-sweep-x1"}
    assert telemetry.grouping_key("cluster", cond="temi-C10") == {
        "dataset": "cifar10", "run": "c10-small", "workflow": "cedm-sweep-x1", "stage": "cluster",
        "cond": "temi-C10", "instance": "cedm-sweep-x1-cluster-123"}
    monkeypatch.setenv("CEDM_RUN", "other")
    monkeypatch.setenv("CEDM_DATASET", "digits")
    assert telemetry.run_labels(run) == {"dataset": "digits", "run": "other", "workflow": "cedm-sweep-x1"}


def test_train_helpers(monkeypatch):
    monkeypatch.setenv("CEDM_RUN", "r-unit")
    monkeypatch.setenv("CEDM_DATASET", "digits")
    lbl = dict(dataset="digits", run="r-unit", cond="temi-C7", clusters="7")
    # A retried pod resumes from a checkpoint that had seen 64 images: the counter continues.
    telemetry.train_started("7", 1000, images_done=64, cond="temi-C7")
    assert _value("cedm_train_images_total", **lbl) == 64
    assert _value("cedm_train_nonfinite_steps_total", **lbl) == 0
    assert telemetry.REGISTRY.get_sample_value("cedm_train_skipped_steps_total", lbl) == 0
    telemetry.train_step("7", 32, 0.25, 100.0)
    telemetry.train_step("7", 32, float("inf"))
    assert _value("cedm_train_images_total", **lbl) == 128
    assert _value("cedm_train_nonfinite_steps_total", **lbl) == 1
    assert _value("cedm_train_images_per_second", **lbl) == 100.0
    # fp16: an overflow the gradient scaler skips is not a non-finite step.
    telemetry.train_nonfinite_step("7", skipped=True)
    telemetry.train_nonfinite_step("7", skipped=True)
    assert _value("cedm_train_skipped_steps_total", **lbl) == 2
    assert _value("cedm_train_nonfinite_steps_total", **lbl) == 1
    telemetry.train_nonfinite_step("7", skipped=False)  # fp32/bf16: it is
    assert _value("cedm_train_nonfinite_steps_total", **lbl) == 2


def test_push_view_holds_one_stage_and_no_training_series():
    telemetry.train_started("t-view", 10)
    with telemetry.stage("t-view-a"):
        pass
    with telemetry.stage("t-view-a", cond="uncond"):
        pass
    with telemetry.stage("t-view-b"):
        pass
    fams = list(telemetry._PushView("t-view-a").collect())
    assert fams and not [f.name for f in fams if f.name.startswith("cedm_train_")]
    stages = {(s.labels["stage"], s.labels["cond"]) for f in fams for s in f.samples if "stage" in s.labels}
    assert stages == {("t-view-a", "")}


def test_training_pods_serve_only_training_series():
    from prometheus_client import CollectorRegistry, generate_latest

    telemetry.train_started("t-serve", 10)
    with telemetry.stage("t-serve"):
        pass
    reg = CollectorRegistry(auto_describe=False)
    reg.register(telemetry._TrainView())
    names = set(re.findall(r"^(\w+)[{ ]", generate_latest(reg).decode(), re.M))
    assert names and all(n.startswith("cedm_train_") for n in names), names


def test_push_failure_warns_and_returns(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    with telemetry.stage("t-push", pushgateway=f"127.0.0.1:{port}"):
        pass
    assert time.time() - t0 < 5
    assert "could not push metrics" in capsys.readouterr().err


@needs_promtool
def test_exposition_passes_promtool_check_metrics():
    from prometheus_client import generate_latest

    telemetry.train_started("t-lint", 1000)
    telemetry.train_step("t-lint", 16, 0.5, 10.0)
    telemetry.train_nonfinite_step("t-lint", skipped=True)
    telemetry.CLUSTER_UTILISATION.labels("temi", "10").set(1.0)
    text = generate_latest(telemetry.REGISTRY)
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


@pytest.fixture
def rule_dir(tmp_path):
    (tmp_path / "cedm-alerts.rules.yaml").write_text(yaml.safe_dump(_rules()))
    shutil.copy(RULE_TESTS, tmp_path / "alerts-test.yaml")
    return tmp_path


@needs_promtool
def test_promtool_check_rules(rule_dir):
    r = subprocess.run([PROMTOOL, "check", "rules", str(rule_dir / "cedm-alerts.rules.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in r.stdout
    assert {"CedmStageFailed", "CedmTrainingStalled", "CedmTrainingNonFiniteLoss", "CedmGpuIdle"} <= set(_alerts())


@needs_promtool
def test_promtool_test_rules(rule_dir):
    r = subprocess.run([PROMTOOL, "test", "rules", str(rule_dir / "alerts-test.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == set(_alerts()), "every alert has a unit test"


@pytest.mark.slow
def test_a_resumed_training_counts_on_from_its_checkpoint(tmp_path, monkeypatch):
    """A retried training pod resumes from state.pt; its images counter starts at the images the
    checkpoint had seen, not at 0 (else increase() and the budget panel would jump back)."""
    from cedm import cli, train

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cli.main(["data", "--dataset", "digits", "--limit", "64", "--run-dir", str(tmp_path)]) == 0
    calls = []
    real = telemetry.train_started
    monkeypatch.setattr(telemetry, "train_started", lambda *a, **k: (calls.append((a, k)), real(*a, **k))[1])
    kw = dict(network="tiny", batch_size=8, mimg=40 * 8e-6, checkpoint_every_kimg=0.08, progress=False,
              device="cpu")                                      # a checkpoint every 10 steps
    assert train.run(tmp_path, "uncond", max_steps=17, **kw)["stopped"]
    train.run(tmp_path, "uncond", **kw)                          # the retry: resumes at step 10
    (a1, k1), (a2, k2) = calls
    assert k1["images_done"] == 0 and k2["images_done"] == 10 * 8
    assert a2[1] == 40 * 8 and k2["cond"] == "uncond" and str(k2["run_dir"]) == str(tmp_path)


# --------------------------------------------------------------------------------------------
# The sweep's exit handler against a real Pushgateway

PUSH_STAGES = r"""
import sys
from cedm import telemetry as t
pgw, stage, cond = sys.argv[1:4]
if stage == "bound":
    t.BOUND_CMAX.set(20)
if stage == "cluster":
    t.CLUSTER_UTILISATION.labels("temi", cond.split("C")[-1]).set(0.95)
if stage == "evaluate":
    t.FRECHET_DISTANCE.labels("fid", cond.split("C")[-1]).set(7.5)
with t.stage(stage, pgw, cond=cond):
    pass
"""


@pytest.mark.skipif(PUSHGATEWAY is None, reason="prometheus-pushgateway missing: apt-get install prometheus-pushgateway")
def test_sweep_exit_replaces_the_sweeps_groups_by_one(tmp_path):
    port = _free_port()
    pgw = f"127.0.0.1:{port}"
    proc = _start([PUSHGATEWAY, f"--web.listen-address={pgw}", "--persistence.file="])
    try:
        _wait("the Pushgateway", lambda: _get(f"http://{pgw}/-/ready"), 20, [("pushgateway", proc)])
        # Two sweeps of the same dataset, each stage pod pushing its own group.
        for wf, run in (("cedm-sweep-a", "c10"), ("cedm-sweep-b", "c10-b")):
            for i, (stage, cond) in enumerate((("cluster", "temi-C10"), ("cluster", "temi-C20"),
                                               ("bound", ""), ("evaluate", "temi-C10"))):
                env = {"CEDM_RUN": run, "CEDM_DATASET": "cifar10", "CEDM_WORKFLOW": wf, "HOSTNAME": f"{wf}-{i}"}
                r = subprocess.run([sys.executable, "-c", PUSH_STAGES, pgw, stage, cond], cwd=ROOT, capture_output=True,
                                   text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
                assert r.returncode == 0, r.stderr

        def groups(wf):
            return [g for g in json.loads(_get(f"http://{pgw}/api/v1/metrics"))["data"]
                    if g["labels"].get("workflow") == wf]

        assert len(groups("cedm-sweep-a")) == 4
        assert {g["labels"].get("cond", "") for g in groups("cedm-sweep-a")} == {"temi-C10", "temi-C20", ""}
        failures = json.dumps([{"displayName": "train(0:temi-C10)", "message": "OOMKilled"}])
        r = subprocess.run([sys.executable, "-m", "cedm", "sweep-exit", "--runs", str(tmp_path / "runs"),
                            "--dataset", "cifar10", "--run", "c10", "--workflow", "cedm-sweep-a", "--status", "Failed",
                            "--duration", "12.5", "--failures", failures, "--pushgateway", pgw],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr
        assert "replaced 4 Pushgateway groups" in r.stdout
        rec = json.loads((tmp_path / "runs" / "c10" / "workflow.json").read_text())
        assert rec["status"] == "Failed" and rec["failures"][0]["message"] == "OOMKilled"
        assert rec["duration_seconds"] == 12.5 and rec["workflow"] == "cedm-sweep-a"
        # Sweep a: one group, keyed by the run, holding the outcome and the method's results.
        (g,) = groups("cedm-sweep-a")
        assert g["labels"] == {"job": "cedm", "dataset": "cifar10", "run": "c10", "workflow": "cedm-sweep-a",
                               "stage": "sweep"}
        samples = {(name, tuple(sorted((k, v) for k, v in m["labels"].items() if k not in {*g["labels"], "instance"}))): float(m["value"])
                   for name, fam in g.items() if isinstance(fam, dict) and "metrics" in fam for m in fam["metrics"]}
        assert samples[("cedm_bound_cmax_clusters", ())] == 20
        assert samples[("cedm_cluster_utilisation_ratio", (("clusters", "10"), ("method", "temi")))] == 0.95
        assert samples[("cedm_cluster_utilisation_ratio", (("clusters", "20"), ("method", "temi")))] == 0.95
        assert samples[("cedm_frechet_distance", (("clusters", "10"), ("metric", "fid")))] == 7.5
        assert samples[("cedm_stage_runs_total", (("cond", ""), ("outcome", "failure")))] == 1
        assert samples[("cedm_stage_last_failure_timestamp_seconds", (("cond", ""),))] > 0
        # Sweep b is untouched.
        assert len(groups("cedm-sweep-b")) == 4
        # A bad run name is a user error: exit code 2, one line.
        r = subprocess.run([sys.executable, "-m", "cedm", "sweep-exit", "--runs", str(tmp_path / "runs"),
                            "--dataset", "cifar10", "--run", "../etc", "--workflow", "w", "--status", "Failed",
                            "--duration", "1"], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 2 and "plain directory name" in r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


# --------------------------------------------------------------------------------------------
# End to end

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout=5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _wait(what: str, cond, timeout: float, procs=()):
    t0 = time.time()
    while time.time() - t0 < timeout:
        for name, p in procs:
            if p.poll() is not None:
                out = p.stdout.read().decode(errors="replace")[-3000:] if p.stdout else ""
                pytest.fail(f"{name} exited ({p.returncode}) while waiting for {what}:\n{out}")
        try:
            v = cond()
            if v:
                return v
        except OSError:
            pass
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


WORKFLOW = "cedm-sweep-e2e"

# The simulated sweep pod: stage pushes, then a training loop serving /metrics.
SIMULATED_POD = r"""
import sys, time
from cedm import telemetry as t
from cedm.io import CedmError

import os
port, pgw, ready, trigger = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
with t.stage("cluster", pgw, cond="temi-C20"):
    for c, used in ((10, 10), (20, 19)):
        t.CLUSTER_UTILISATION.labels("temi", str(c)).set(used / c)
        t.CLUSTER_USED.labels("temi", str(c)).set(used)
with t.stage("bound", pgw):
    t.BOUND_CMAX.set(10)
with t.stage("evaluate", pgw, cond="temi-C10"):
    t.FRECHET_DISTANCE.labels("fid", "10").set(12.5)
try:
    with t.stage("knn", pgw):
        raise CedmError("simulated failure")
except CedmError:
    pass
t.serve(port, addr="127.0.0.1")
t.train_started("10", 1e7, cond="temi-C10")
t.train_nonfinite_step("10", skipped=True)  # an fp16 overflow: counted apart, no alert
open(ready, "w").write("ready")
i, done = 0, False
while True:  # until the test stops it; one NaN step once the test has seen the counter at 0
    i += 1
    nan = not done and os.path.exists(trigger)
    done = done or nan
    t.train_step("10", 64, float("nan") if nan else 1.0 / i ** 0.5, 640.0)
    time.sleep(0.1)
"""


def _start(cmd, env=None, **kw):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, **kw)


class _Prometheus:
    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> list:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            body = json.loads(_get(url))
        except urllib.error.HTTPError as e:
            pytest.fail(f"Prometheus rejected {expr!r}: {e.read().decode()}")
        assert body["status"] == "success", body
        return body["data"]["result"]

    def api(self, path: str):
        return json.loads(_get(f"{self.base}/api/v1/{path}"))["data"]


@pytest.mark.slow
@pytest.mark.skipif(None in (PROMETHEUS, PUSHGATEWAY, PROMTOOL),
                    reason="prometheus / prometheus-pushgateway missing: apt-get install prometheus prometheus-pushgateway")
def test_end_to_end_with_prometheus(tmp_path):
    from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway

    real_train = importlib.util.find_spec("cedm.train") is not None
    pg_port, prom_port, sim_port, train_port = (_free_port() for _ in range(4))
    pgw = f"127.0.0.1:{pg_port}"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(_rules()))
    targets = [("cedm-train-sim", sim_port)] + ([("cedm-train-real", train_port)] if real_train else [])
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yaml")],
        "scrape_configs": [
            {"job_name": "pushgateway", "honor_labels": True,
             "static_configs": [{"targets": [pgw]}]},
            # What PodMonitor cedm-train gives in a cluster: job, namespace and pod labels.
            # (and `workflow`, relabelled from the pod label workflows.argoproj.io/workflow).
            {"job_name": "cedm/cedm-train",
             "static_configs": [{"targets": [f"127.0.0.1:{p}"],
                                 "labels": {"namespace": "cedm", "pod": pod, "workflow": WORKFLOW}}
                                for pod, p in targets]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    procs = []  # long-running: any exit while waiting is a failure
    finite = []  # run to completion
    try:
        procs.append(("pushgateway", _start([PUSHGATEWAY, f"--web.listen-address={pgw}", "--persistence.file="])))
        procs.append(("prometheus", _start([
            PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn"])))
        # A real stage pushing its outcome (also the training data of the real `cedm train`).
        run_dir = tmp_path / "run"
        pod_env = {"CEDM_RUN_DIR": str(run_dir), "CEDM_WORKFLOW": WORKFLOW}  # as the Argo templates set
        data = _start([sys.executable, "-m", "cedm", "data", "--dataset", "digits", "--limit", "128",
                       "--run-dir", str(run_dir), "--pushgateway", pgw], env=pod_env)
        finite.append(("cedm data", data))
        _wait("the Pushgateway", lambda: _get(f"http://{pgw}/-/ready"), 20, procs)
        ready = tmp_path / "sim-ready"
        trigger = tmp_path / "sim-nan"
        procs.append(("simulated pod", _start([sys.executable, "-c", SIMULATED_POD, str(sim_port), pgw,
                                               str(ready), str(trigger)], env=pod_env)))
        _wait("the simulated pod", ready.exists, 30, procs)
        # Stand-ins for dcgm-exporter and the Argo controller (see the module docstring).
        reg = CollectorRegistry()
        labels = ["gpu", "UUID", "modelName", "Hostname", "namespace", "pod", "container"]
        for name, doc, val in (("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", 3),
                               ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", 1200),
                               ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", 65)):
            Gauge(name, doc, labels, registry=reg).labels(
                "0", "GPU-0", "NVIDIA A100-SXM4-80GB", "node-1", "cedm", "cedm-train-sim", "main").set(val)
        push_to_gateway(pgw, job="dcgm-exporter-standin", registry=reg)
        reg = CollectorRegistry()
        Counter("argo_workflows_cedm_step_runs", "cedm workflow steps by final status, counted by the Argo "
                "controller.", ["stage", "status"], registry=reg).labels("train", "Succeeded").inc()
        push_to_gateway(pgw, job="argo-controller-standin", registry=reg)

        _wait("cedm data", lambda: data.poll() is not None, 60)
        assert data.returncode == 0, data.stdout.read().decode()
        if real_train:
            train = _start([sys.executable, "-m", "cedm", "train", "--run-dir", str(run_dir), "--cond", "uncond",
                            "--network", "tiny", "--mimg", "0.02", "--batch-size", "16", "--device", "cpu",
                            "--metrics-port", str(train_port)], env=pod_env)
            procs.append(("cedm train", train))
            text = _wait("cedm train's /metrics", lambda: b"cedm_train_images_total{" in
                         (body := _get(f"http://127.0.0.1:{train_port}/metrics")) and body, 90, procs)
            r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True)
            assert r.returncode == 0, (r.stdout + r.stderr).decode()
        text = _get(f"http://127.0.0.1:{sim_port}/metrics")
        r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True)
        assert r.returncode == 0, (r.stdout + r.stderr).decode()

        prom = _Prometheus(prom_port)
        _wait("Prometheus", lambda: _get(f"{prom.base}/-/ready"), 30, procs)
        # The non-finite step comes after Prometheus has seen its counter at 0 (for increase()).
        _wait("the non-finite counter at 0", lambda: prom.query(
            'cedm_train_nonfinite_steps_total{pod="cedm-train-sim"} == 0'), 40, procs)
        trigger.write_text("now")
        _wait("the non-finite step", lambda: prom.query(
            'cedm_train_nonfinite_steps_total{pod="cedm-train-sim"} > 0'), 20, procs)
        for pod, _ in targets:
            _wait(f"{pod} scraped", lambda pod=pod: prom.query(
                f'cedm_train_images_total{{pod="{pod}"}} > 0'), 40, procs)
        _wait("the pushed groups", lambda: prom.query('cedm_stage_runs_total{stage="knn"}'), 20, procs)

        # Pushed groups: one per (instance, stage), never a training series.
        groups = json.loads(_get(f"http://{pgw}/api/v1/metrics"))["data"]
        ours = [g for g in groups if g["labels"].get("job") == "cedm"]
        assert {g["labels"]["stage"] for g in ours} == {"data", "cluster", "bound", "evaluate", "knn"}
        assert not [k for g in ours for k in g if k.startswith("cedm_train_")]
        # ... each keyed by its run and workflow (and conditioning where the stage has one).
        assert all(g["labels"].get("run") == "run" and g["labels"].get("workflow") == WORKFLOW for g in ours), ours
        assert {g["labels"].get("cond") for g in ours if g["labels"]["stage"] == "evaluate"} == {"temi-C10"}
        # Every cedm series in Prometheus names its run and its workflow.
        unnamed = prom.query('{__name__=~"cedm_.+", run=""} or {__name__=~"cedm_.+", workflow=""}')
        assert not unnamed, [r["metric"] for r in unnamed]
        assert prom.query('cedm_train_skipped_steps_total{pod="cedm-train-sim"} == 1')

        # Every dashboard expression returns data.
        for title, expr in _dashboard_exprs():
            assert prom.query(_expand(expr)), f"dashboard panel {title!r}: no data for {expr!r}"
        dash = json.loads(DASHBOARD.read_text())
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                metric, label = re.fullmatch(r"label_values\(([^,]+),\s*(\w+)\)", var["definition"]).groups()
                assert prom.query(f"count by ({label}) ({_expand(metric)})"), var["name"]
        if real_train:  # the real trainer's series are among them
            assert prom.query('cedm_train_loss{pod="cedm-train-real", clusters="uncond"}')
        # Every alert expression evaluates; those whose conditions were made true return data.
        provoked = {"CedmStageFailed", "CedmTrainingNonFiniteLoss", "CedmGpuIdle"}
        for name, expr in _alerts().items():
            result = prom.query(expr)
            if name in provoked:
                assert result, f"{name}: no data for {expr!r}"
            else:  # CedmTrainingStalled needs 15 quiet minutes: its inputs exist, it evaluates empty
                assert not result, name
                for metric in set(re.findall(r"\b(cedm_\w+|DCGM_\w+)", expr)):
                    assert prom.query(metric), f"{name}: no series {metric}"
        failed = {r["metric"]["stage"] for r in prom.query(_alerts()["CedmStageFailed"])}
        assert failed == {"knn"}
        # Prometheus loaded the rules itself and holds the provoked alerts.
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        assert {r["name"] for r in rules} == set(_alerts()) and all(r["health"] == "ok" for r in rules), rules
        active = _wait("the alerts", lambda: (a := {x["labels"]["alertname"] for x in prom.api("alerts")["alerts"]})
                       >= provoked and a, 20, procs)
        assert "CedmTrainingStalled" not in active
    finally:
        for name, p in procs + finite:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in procs + finite:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
