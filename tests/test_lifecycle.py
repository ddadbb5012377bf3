"""A multi-node training's lifecycle (argo/train.yaml train-nodes, argo/sweep.yaml exit-handler,
k8s/multinode/janitor.py), simulated with Argo's rules restated from v4.1.2's source: however a
step or its workflow ends (succeeded, failed, errored and retried, timed out, stopped, past the
workflow's deadline, terminated, deleted, `argo retry`), no TrainJob is left behind and two never
run for one conditioning; the GPU slot is held until the TrainJob is gone. The janitor is the real
script, run against a small API server that holds the simulated cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import argo_controller as ac
from test_argo_controller import _template, _values
from test_manifests import K8S, NAMESPACE, SWEEP
from test_multinode import DELETE, MULTINODE, TRAIN_NODES, TRAINJOB, _trainjob

JANITOR = K8S / "multinode" / "janitor.py"
STOP, TERMINATE = "Stop", "Terminate"


def should_execute(strategy: str | None, on_exit: bool) -> bool:
    """pkg/apis/workflow/v1alpha1/workflow_types.go ShutdownStrategy.ShouldExecute: which pods may
    still be created once a workflow is stopped (`argo stop`: only exit handlers' and exit hooks')
    or terminated (`argo terminate`: none)."""
    return {TERMINATE: False, STOP: on_exit}.get(strategy, True)


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """apimachinery labels.Parse for the equality form kubectl --selector gets (`k=v,k2=v2`)."""
    return all(labels.get(k) == v for k, v in (part.split("=", 1) for part in selector.split(",")))


# ----------------------------------------------------------------------------------------------
# The cluster: TrainJobs, their pods' GPUs, and what Argo does

@dataclass
class Cluster:
    trainjobs: dict[str, dict] = field(default_factory=dict)
    workflows: dict[str, dict] = field(default_factory=dict)      # name -> {"completed": bool, "phase": str}
    most_per_conditioning: int = 0
    log: list[str] = field(default_factory=list)

    def apply(self, job: dict) -> None:
        """kubectl apply: create, or patch the one of that name (same spec: a no-op)."""
        self.trainjobs.setdefault(job["metadata"]["name"], json.loads(json.dumps(job)))
        per = {}
        for j in self.trainjobs.values():
            key = (j["metadata"]["labels"]["cedm.io/workflow"], j["metadata"]["annotations"]["cedm.io/cond"])
            per[key] = per.get(key, 0) + 1
        self.most_per_conditioning = max(self.most_per_conditioning, *per.values())
        self.log.append(f"apply {job['metadata']['name']}")

    def delete(self, selector: str) -> None:
        """kubectl delete trainjobs --selector ... --cascade=foreground --wait: returns once they are
        gone, pods first (foreground)."""
        for name in [n for n, j in self.trainjobs.items() if selector_matches(selector, j["metadata"]["labels"])]:
            del self.trainjobs[name]
            self.log.append(f"delete {name}")

    def gc_owned_by(self, workflow: str) -> None:
        """The garbage collector: a deleted workflow takes the TrainJobs it owns (setOwnerReference)."""
        for name in [n for n, j in self.trainjobs.items()
                     if any(o["kind"] == "Workflow" and o["name"] == workflow for o in j["metadata"]["ownerReferences"])]:
            del self.trainjobs[name]


def _hook_selector(workflow: str, cond: str) -> str:
    (task,) = TRAIN_NODES["dag"]["tasks"]
    vals = _values(SWEEP, TRAIN_NODES, nodes="2", cond=cond)
    vals["workflow.name"] = workflow
    (arg,) = ac.substitute(task["hooks"]["exit"]["arguments"]["parameters"], vals)
    assert task["hooks"]["exit"]["template"] == DELETE["name"] and DELETE["resource"]["action"] == "delete"
    return arg["value"]


def run_step(cluster: Cluster, workflow: str, cond: str, attempts: list[str]) -> dict:
    """One train-nodes DAG: its task's attempts (each `kubectl apply` of the same TrainJob, then
    an outcome: Succeeded, Failed, Error for the executor pod itself, Timeout of its pod,
    Stopped/Deadline/Terminated for the workflow's), the retryStrategy deciding whether another
    attempt comes (processNodeRetries: OnError retries Error only, at most `limit` times), then
    the task's exit hook if Argo runs it (runOnExitNode: ShutdownStrategy.ShouldExecute(true)).
    Returns when the DAG node is fulfilled (assessDAGPhase waits for the hook, a child of the
    task) and so when the semaphore is released: {phase, trainjobs alive at release}."""
    retry = TRAINJOB["retryStrategy"]
    assert retry["retryPolicy"] == "OnError"
    limit = int(retry["limit"])
    phase, strategy = None, None
    for n, outcome in enumerate(attempts):
        if not should_execute(strategy, on_exit=False):
            break                                         # no attempt pod is created once terminated/stopped
        cluster.apply(_trainjob(workflow=workflow, cond=cond))
        phase = {"Succeeded": ac.SUCCEEDED, "Failed": ac.FAILED, "Error": ac.ERROR, "Timeout": ac.FAILED,
                 "Stopped": ac.FAILED, "Deadline": ac.FAILED, "Terminated": ac.FAILED}[outcome]
        if outcome in ("Stopped", "Terminated"):
            strategy = STOP if outcome == "Stopped" else TERMINATE
        if not (phase == ac.ERROR and n < limit):        # OnError: an Error is retried, up to `limit`
            break
    if should_execute(strategy, on_exit=True):           # the exit hook (an onExit node)
        cluster.delete(_hook_selector(workflow, cond))
    return {"phase": phase, "alive_at_release": sum(
        1 for j in cluster.trainjobs.values() if j["metadata"]["labels"]["cedm.io/workflow"] == workflow
        and j["metadata"]["annotations"]["cedm.io/cond"] == cond)}


def run_exit_handler(cluster: Cluster, workflow: str, strategy: str | None, nodes: str = "2") -> None:
    """The workflow's onExit (operator.go: run when ShouldExecute(true)): the exit-handler DAG, its
    trainjobs task's `when` and selector from the manifest, run as run_dag decides."""
    if not should_execute(strategy, on_exit=True):
        return
    dag = _template(SWEEP, SWEEP["spec"]["onExit"])["dag"]
    scope = {f"workflow.parameters.{k}": v for k, v in {"nodes": nodes}.items()}
    scope["workflow.name"] = workflow

    def outcome(path, task, item):
        if task["name"] == "trainjobs":
            (arg,) = ac.substitute(task["arguments"]["parameters"], scope)
            cluster.delete(arg["value"])
        return ac.SUCCEEDED
    phase, nodes_ = ac.run_dag(dag, outcome, scope)
    assert phase == ac.SUCCEEDED and nodes_["record"].phase == ac.SUCCEEDED


# ----------------------------------------------------------------------------------------------
# The janitor, against an API server holding the cluster

class _Api(BaseHTTPRequestHandler):
    cluster: Cluster
    seen: list

    def log_message(self, *a):
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str):
        assert self.headers["Authorization"] == "Bearer t0ken"
        url = urllib.parse.urlparse(self.path)
        parts = url.path.strip("/").split("/")
        # /apis/<group>/<version>/namespaces/<ns>/<resource>[/<name>]
        group, ns, resource = parts[1], parts[4], parts[5]
        name = parts[6] if len(parts) > 6 else None
        verb = {"GET": "get" if name else "list", "DELETE": "delete"}[method]
        self.seen.append((group, resource, verb))
        assert ns == NAMESPACE
        if resource == "trainjobs" and verb == "list":
            sel = urllib.parse.parse_qs(url.query)["labelSelector"][0]
            items = [j for j in self.cluster.trainjobs.values() if all(
                (k in j["metadata"]["labels"]) if "=" not in k else selector_matches(k, j["metadata"]["labels"])
                for k in sel.split(","))]
            return self._send(200, {"items": items})
        if resource == "workflows" and verb == "get":
            wf = self.cluster.workflows.get(name)
            if wf is None:
                return self._send(404, {"kind": "Status", "code": 404})
            return self._send(200, {"metadata": {"name": name, "labels": {
                "workflows.argoproj.io/completed": "true" if wf["completed"] else "false"}},
                "status": {"phase": wf["phase"]}})
        if resource == "trainjobs" and verb == "delete":
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert body == {"propagationPolicy": "Foreground"}
            if self.cluster.trainjobs.pop(name, None) is None:
                return self._send(404, {})
            return self._send(200, {"status": "Success"})
        self._send(403, {})

    def do_GET(self):
        self._route("GET")

    def do_DELETE(self):
        self._route("DELETE")


def run_janitor(cluster: Cluster, tmp_path: Path) -> tuple[subprocess.CompletedProcess, list]:
    seen: list = []
    handler = type("H", (_Api,), {"cluster": cluster, "seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sa = tmp_path / "sa"
    sa.mkdir(exist_ok=True)
    (sa / "token").write_text("t0ken\n")
    (sa / "namespace").write_text(NAMESPACE)
    try:
        r = subprocess.run([sys.executable, str(JANITOR)], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, CEDM_K8S_API=f"http://127.0.0.1:{server.server_port}",
                                    CEDM_K8S_SA_DIR=str(sa)))
    finally:
        server.shutdown()
    return r, seen


# ----------------------------------------------------------------------------------------------
# Every way a training's step, or its workflow, ends

SCENARIOS = {   # attempts of the trainjob task, how the workflow ends
    "succeeds": (["Succeeded"], None),
    "the TrainJob fails": (["Failed"], None),
    "the watching pod errors, the retry adopts": (["Error", "Succeeded"], None),
    "the watching pod errors every time": (["Error", "Error", "Error"], None),
    "the watching pod times out": (["Timeout"], None),
    "argo stop": (["Stopped"], STOP),
    # past the deadline Argo terminates the step's pod (exec_control.go applyExecutionControl), but
    # creates exit hooks' and exit handlers' pods still (workflowpod.go: onExit pods ignore it)
    "the workflow's deadline": (["Deadline"], "deadline"),
    "argo terminate": (["Terminated"], TERMINATE),
}


@pytest.mark.parametrize("case", SCENARIOS)
def test_no_trainjob_is_left_and_none_is_doubled(case, tmp_path):
    attempts, ending = SCENARIOS[case]
    cluster = Cluster(workflows={"cedm-sweep-a": {"completed": False, "phase": "Running"}})
    strategy = ending if ending in (STOP, TERMINATE) else None
    step = run_step(cluster, "cedm-sweep-a", "temi-C20", attempts)      # stop/terminate come mid-attempt
    assert cluster.most_per_conditioning == 1, cluster.log                   # a retry adopts, never adds
    if strategy != TERMINATE:
        assert step["alive_at_release"] == 0, cluster.log                     # the slot outlives the TrainJob
        assert not cluster.trainjobs
    else:
        # Terminate runs nothing (no hook, no exit handler): the slot is released with the
        # TrainJob alive; the janitor deletes it once the workflow is marked completed
        assert step["alive_at_release"] == 1 and cluster.trainjobs
    run_exit_handler(cluster, "cedm-sweep-a", strategy)
    cluster.workflows["cedm-sweep-a"] = {"completed": True, "phase": "Failed" if case != "succeeds" else "Succeeded"}
    r, _ = run_janitor(cluster, tmp_path)
    assert r.returncode == 0, r.stderr
    assert not cluster.trainjobs, (case, cluster.log)
    if strategy == TERMINATE:
        assert "its workflow cedm-sweep-a has ended (Failed)" in r.stdout


def test_a_stopped_workflow_cleans_up_through_its_exit_handler_alone():
    """Even without the step's hook (say it failed), `argo stop` and the workflow deadline run the
    exit handler (onExit pods are exempt), which deletes every TrainJob of the workflow and only
    those."""
    cluster = Cluster()
    for cond in ("temi-C20", "temi-C40", "uncond"):
        cluster.apply(_trainjob(workflow="cedm-sweep-a", cond=cond))
    cluster.apply(_trainjob(workflow="cedm-sweep-b", cond="temi-C20"))
    run_exit_handler(cluster, "cedm-sweep-a", STOP)
    assert [j["metadata"]["labels"]["cedm.io/workflow"] for j in cluster.trainjobs.values()] == ["cedm-sweep-b"]
    run_exit_handler(cluster, "cedm-sweep-b", TERMINATE)                  # terminate: not run at all
    assert len(cluster.trainjobs) == 1
    cluster.trainjobs.clear()
    cluster.apply(_trainjob(workflow="cedm-sweep-c", cond="uncond"))
    run_exit_handler(cluster, "cedm-sweep-c", None, nodes="1")           # one-node sweeps: skipped
    assert len(cluster.trainjobs) == 1


def test_argo_retry_after_terminate_adopts_the_running_trainjob(tmp_path):
    """`argo retry` keeps the workflow's name, so the retried step applies the same TrainJob: it
    waits for the one still running instead of starting a second; the janitor leaves a running
    workflow's TrainJobs alone, and deletes those of a deleted workflow."""
    cluster = Cluster(workflows={"cedm-sweep-a": {"completed": True, "phase": "Failed"}})
    run_step(cluster, "cedm-sweep-a", "temi-C20", ["Terminated"])
    cluster.workflows["cedm-sweep-a"] = {"completed": False, "phase": "Running"}       # argo retry
    r, _ = run_janitor(cluster, tmp_path)
    assert r.returncode == 0 and len(cluster.trainjobs) == 1 and "1 cedm TrainJob(s), 0 deleted" in r.stdout
    step = run_step(cluster, "cedm-sweep-a", "temi-C20", ["Succeeded"])
    assert cluster.most_per_conditioning == 1 and step["alive_at_release"] == 0
    cluster.apply(_trainjob(workflow="cedm-sweep-gone", cond="uncond"))
    r, _ = run_janitor(cluster, tmp_path)                                 # `kubectl delete workflow` w/o GC
    assert "its workflow cedm-sweep-gone is gone" in r.stdout and not cluster.trainjobs


def test_the_janitor_needs_exactly_its_rbac_and_fails_visibly(tmp_path):
    cluster = Cluster(workflows={"cedm-sweep-a": {"completed": True, "phase": "Succeeded"},
                                 "cedm-sweep-b": {"completed": False, "phase": "Running"}})
    cluster.apply(_trainjob(workflow="cedm-sweep-a", cond="uncond"))
    cluster.apply(_trainjob(workflow="cedm-sweep-b", cond="uncond"))
    r, seen = run_janitor(cluster, tmp_path)
    assert r.returncode == 0, r.stderr
    (role,) = [d for _, d in MULTINODE if d["kind"] == "Role" and d["metadata"]["name"] == "cedm-janitor"]
    grants = {(g, res, v) for rule in role["rules"] for g in rule["apiGroups"] for res in rule["resources"]
              for v in rule["verbs"]}
    assert set(seen) == grants
    (cron,) = [d for _, d in MULTINODE if d["kind"] == "CronJob"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == role["metadata"]["name"]
    (cm,) = [d for _, d in MULTINODE if d["kind"] == "ConfigMap"]
    assert cm["data"]["janitor.py"] == JANITOR.read_text()                  # what the CronJob mounts
    assert pod["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
    assert ac.restricted_violations({"spec": pod}) == []
    # an API error is one line and exit 1: a failed Job
    sa = tmp_path / "sa"
    r = subprocess.run([sys.executable, str(JANITOR)], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, CEDM_K8S_API="http://127.0.0.1:9", CEDM_K8S_SA_DIR=str(sa)))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "janitor: GET" in r.stderr
