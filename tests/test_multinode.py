"""Past one node (README "Past one node"): the sweep's train-nodes step creates a Kubeflow Trainer
v2.3 TrainJob on cedm's TrainingRuntime (k8s/multinode). Validated against the vendored Trainer
and JobSet CRDs (tests/schemas), with the sweep's parameters substituted; the JobSet Trainer
builds from them against JobSet's CRD and its pods against the API server's rules and Pod
Security `restricted`; Argo's success/failure conditions over every state a TrainJob goes
through; the RBAC the resource step needs, exactly."""
from __future__ import annotations

import copy
import json

import pytest
import yaml

import argo_controller as ac
from test_argo_controller import _template, _values
from test_manifests import K8S, NAMESPACE, SWEEP, WORKFLOW_TEMPLATES, crd_errors, kustomize

MULTINODE = kustomize(K8S / "multinode")
TRAIN_NODES = _template(WORKFLOW_TEMPLATES["cedm-train"], "train-nodes")


def _obj(kind: str) -> dict:
    (d,) = [d for _, d in MULTINODE if d["kind"] == kind]
    return d


def _trainjob(**over) -> dict:
    """The TrainJob the step creates: its manifest with the sweep's values substituted (Argo), the
    generated name filled in (the API server: generateName + 5 characters) and the namespace."""
    vals = _values(SWEEP, TRAIN_NODES, **{"nodes": "2", **over})
    job = yaml.safe_load(ac.VAR.sub(lambda m: vals[m.group(1)], TRAIN_NODES["resource"]["manifest"]))
    job["metadata"]["name"] = job["metadata"].pop("generateName") + "x7k2q"
    job["metadata"]["namespace"] = NAMESPACE
    return job


def _jobset(job: dict, runtime: dict) -> dict:
    """The JobSet Trainer builds from a TrainJob and its runtime (kubeflow/trainer v2.3.0
    pkg/runtime/framework/plugins: jobset/builder.go Trainer() sets the `node` container's image,
    command, args and env from spec.trainer; jobset.go SyncParallelCount sets the replicated
    job's parallelism and completions to numNodes; torch/torch.go EnforceMLPolicy adds PET_NNODES,
    PET_NPROC_PER_NODE, PET_NODE_RANK (the job completion index), PET_MASTER_ADDR/PORT and port
    29500; resourcesPerNode become the container's resources; runtimePatches are merged in)."""
    spec = copy.deepcopy(runtime["spec"]["template"]["spec"])
    for patch in job["spec"].get("runtimePatches", []):
        for rj_patch in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            rj = next(r for r in spec["replicatedJobs"] if r["name"] == rj_patch["name"])
            pod = rj["template"]["spec"]["template"]["spec"]
            rj["template"]["spec"]["template"]["spec"] = ac.strategic_merge(
                pod, rj_patch["template"]["spec"]["template"]["spec"], "PodSpec")
    (rj,) = [r for r in spec["replicatedJobs"] if r["name"] == "node"]
    t = job["spec"]["trainer"]
    rj["replicas"] = 1
    rj["template"]["spec"]["parallelism"] = rj["template"]["spec"]["completions"] = t["numNodes"]
    (c,) = [c for c in rj["template"]["spec"]["template"]["spec"]["containers"] if c["name"] == "node"]
    c.update(image=t["image"], command=t["command"], args=t["args"], resources=t["resourcesPerNode"])
    c["env"] = c.get("env", []) + t.get("env", []) + [
        {"name": "PET_NNODES", "value": str(t["numNodes"])},
        {"name": "PET_NPROC_PER_NODE", "value": str(t["numProcPerNode"])},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "PET_MASTER_ADDR", "value": f"{job['metadata']['name']}-node-0-0.{job['metadata']['name']}"},
        {"name": "PET_MASTER_PORT", "value": "29500"}]
    c["ports"] = c.get("ports", []) + [{"containerPort": 29500}]
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": job["metadata"]["name"], "namespace": NAMESPACE}, "spec": spec}


def test_the_multinode_objects_build_and_validate():
    for _, d in MULTINODE:
        assert d["metadata"]["namespace"] == NAMESPACE and d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cedm"
    assert not crd_errors(_obj("TrainingRuntime"))
    import kubernetes_validate as kv

    for kind in ("Role", "RoleBinding"):
        kv.validate(_obj(kind), kv.latest_version(), strict=True)


@pytest.mark.parametrize("over", [{}, {"nodes": "4", "gpus": "8", "cpu": "96", "memory": "1Ti"}])
def test_the_trainjob_the_sweep_creates_validates(over):
    job = _trainjob(**over)
    assert not crd_errors(job), crd_errors(job)
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                         "name": _obj("TrainingRuntime")["metadata"]["name"]}
    t = job["spec"]["trainer"]
    assert t["numNodes"] == int(over.get("nodes", "2")) and t["numProcPerNode"] == int(over.get("gpus", "4"))
    # `cedm launch` on every node: its processes match Trainer's PET_NPROC_PER_NODE
    assert t["command"] == ["cedm"] and t["args"][:3] == ["launch", f"--nproc-per-node={t['numProcPerNode']}", "train"]
    from cedm.cli import build_parser

    build_parser().parse_args(t["args"])                          # the real CLI takes the command line


def test_a_misspelt_trainjob_fails_the_schema():
    job = _trainjob()
    job["spec"]["trainer"]["numNode"] = job["spec"]["trainer"].pop("numNodes")
    assert any("numNode" in e for e in crd_errors(job))
    job = _trainjob()
    job["metadata"]["name"] = "Cedm_Train"                       # Trainer's CEL rule: an RFC 1035 label
    assert any("RFC 1035" in e for e in crd_errors(job))


@pytest.mark.parametrize("over", [{}, {"nodes": "4", "gpus": "8", "cpu": "96", "memory": "1Ti"}])
def test_every_node_pod_is_admitted(over):
    js = _jobset(_trainjob(**over), _obj("TrainingRuntime"))
    assert not crd_errors(js), crd_errors(js)
    import kubernetes_validate as kv

    (rj,) = js["spec"]["replicatedJobs"]
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "n", "namespace": NAMESPACE},
           "spec": rj["template"]["spec"]}
    kv.validate(job, kv.latest_version(), strict=True)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "n-0"}, "spec": rj["template"]["spec"]["template"]["spec"]}
    assert ac.pod_errors(pod) == [] and ac.restricted_violations(pod) == []
    spec = pod["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": _values(SWEEP, TRAIN_NODES)["inputs.parameters.gpu-product"]}
    assert {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]} >= {"/data", "/tmp", "/dev/shm", "/home/cedm"}
    assert {v["name"]: v for v in spec["volumes"]}["data"]["persistentVolumeClaim"]["claimName"] == "cedm-data"


def test_the_failure_policy_is_the_one_documented():
    """Exit code 2 fails the JobSet at once, a disruption restarts it without spending the
    budget, anything else restarts it at most maxRestarts times (the runtime's comment)."""
    spec = _obj("TrainingRuntime")["spec"]["template"]["spec"]
    (rj,) = spec["replicatedJobs"]
    rules = rj["template"]["spec"]["podFailurePolicy"]["rules"]
    assert rj["template"]["spec"]["backoffLimit"] == 0
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "node", "operator": "In", "values": [2]}}
    assert rules[1] == {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    import re

    # the Job controller's FailJob messages (pkg/controller/job/pod_failure_policy.go)
    messages = {0: "Container node for pod cedm/t-node-0-1-abcde failed with exit code 2 matching FailJob rule at index 0",
                1: "Pod cedm/t-node-0-1-abcde has condition DisruptionTarget matching FailJob rule at index 1"}

    def action(reason, message):          # JobSet: the first rule that matches, else RestartJobSet
        for r in spec["failurePolicy"]["rules"]:
            if (not r.get("onJobFailureReasons") or reason in r["onJobFailureReasons"]) and (
                    not r.get("onJobFailureMessagePatterns")
                    or any(re.search(p, message) for p in r["onJobFailureMessagePatterns"])):
                return r["action"]
        return "RestartJobSet"
    assert action("PodFailurePolicy", messages[0]) == "FailJobSet"
    assert action("PodFailurePolicy", messages[1]) == "RestartJobSetAndIgnoreMaxRestarts"
    assert action("BackoffLimitExceeded", "Job has reached the specified backoff limit") == "RestartJobSet"
    assert spec["failurePolicy"]["maxRestarts"] >= 1


def _status(*conditions, succeeded=0):
    return {"status": {"conditions": [{"type": t, "status": s} for t, s in conditions],
                       "jobsStatus": [{"name": "node", "ready": 0, "succeeded": succeeded, "failed": 0, "active": 0,
                                       "suspended": 0}]}}


STATES = {  # a TrainJob's status over its life -> what Argo's resource step does
    "just created": ({"status": {}}, "waiting"),
    "running": (_status(), "waiting"),
    "complete": (_status(("Complete", "True"), succeeded=1), ac.SUCCEEDED),
    "failed": (_status(("Failed", "True")), ac.FAILED),
    "suspended by Kueue": (_status(("Suspended", "True")), "waiting"),
    "admitted by Kueue, running": (_status(("Suspended", "False")), "waiting"),
    "admitted by Kueue, complete": (_status(("Suspended", "False"), ("Complete", "True"), succeeded=1), ac.SUCCEEDED),
    "admitted by Kueue, failed": (_status(("Suspended", "False"), ("Failed", "True")), ac.FAILED),
}


@pytest.mark.parametrize("state", STATES)
def test_argo_reads_every_trainjob_state_right(state):
    obj, want = STATES[state]
    r = TRAIN_NODES["resource"]
    assert ac.resource_state(obj, r["successCondition"], r["failureCondition"]) == want


def test_a_gjson_predicate_or_a_first_condition_only_would_not_do():
    with pytest.raises(ValueError, match="invalid label key"):
        ac.parse_selector('status.conditions.#(type=="Complete").status == True')
    obj, _ = STATES["admitted by Kueue, complete"]
    assert ac.resource_state(obj, "status.conditions.0.type == Complete", "status.conditions.0.type == Failed") \
        == "waiting"                                               # would wait for two weeks


def test_rbac_grants_exactly_what_the_resource_step_needs():
    """`kubectl create` then GETs of the object (resource.go ExecResource, WaitResource), and with
    setOwnerReference a blockOwnerDeletion reference to the workflow (update on
    workflows/finalizers under OwnerReferencesPermissionEnforcement)."""
    r = TRAIN_NODES["resource"]
    manifest = yaml.safe_load(r["manifest"].replace("{{inputs.parameters.nodes}}", "2")
                              .replace("{{inputs.parameters.gpus}}", "4"))
    group = manifest["apiVersion"].split("/")[0]
    need = {(group, manifest["kind"].lower() + "s", verb) for verb in ({"create", "get"} if r["action"] == "create"
                                                                        else {r["action"], "get"})}
    if r.get("setOwnerReference"):
        need.add(("argoproj.io", "workflows/finalizers", "update"))
    role = _obj("Role")
    grants = {(g, res, v) for rule in role["rules"] for g in rule["apiGroups"] for res in rule["resources"]
              for v in rule["verbs"]}
    assert grants == need
    binding = _obj("RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SWEEP["spec"]["serviceAccountName"],
                                    "namespace": NAMESPACE}]


def test_the_resource_steps_pod_has_no_stray_wait_container():
    """The workflow's podSpecPatch patches `wait`, which a resource pod does not have: without the
    template's delete directive the merge would add a `wait` without an image."""
    vals = _values(SWEEP, TRAIN_NODES)
    pod = ac.build_pod(SWEEP["spec"], TRAIN_NODES, vals)
    assert [c["name"] for c in pod["spec"]["containers"]] == ["main"] and not ac.pod_errors(pod)
    bare = {k: v for k, v in TRAIN_NODES.items() if k != "podSpecPatch"}
    errs = ac.pod_errors(ac.build_pod(SWEEP["spec"], bare, vals))
    assert any("'wait': image: Required value" in e for e in errs), errs


def test_the_plan_checks_the_batch_over_every_process():
    from cedm.io import CedmError
    from cedm.plan import resolve

    assert resolve("cifar10", gpus=4, nodes=2)["train-cpu"]
    with pytest.raises(CedmError, match="not divisible by 12 processes"):
        resolve("cifar10", gpus=4, nodes=3)
    sweep_params = {p["name"]: p for p in SWEEP["spec"]["arguments"]["parameters"]}
    assert sweep_params["nodes"]["value"] == "1"
    assert json.dumps(_template(SWEEP, "plan")["container"]["args"]).count("inputs.parameters.nodes") == 1
