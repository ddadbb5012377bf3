"""Past one node (README "Past one node"): the sweep's train-nodes step applies a Kubeflow Trainer
v2.3 TrainJob on cedm's TrainingRuntime (k8s/multinode). Every object is checked as the real
cluster would: the vendored CRDs (tests/schemas, with their CEL rules), then the admission webhooks
of Trainer and JobSet restated from their source (tests/admission.py) on the objects exactly as
Argo and Trainer build them, at 1, 2 and 4 nodes, and the pods JobSet and the Job controller make
against the API server's rules and Pod Security `restricted`. Also: Argo's success and failure
conditions over every state a TrainJob goes through, the RBAC the steps need (exactly), the one
metrics target per training, and the runtime's failure policy."""
from __future__ import annotations

import copy
import json
import re

import pytest
import yaml

import admission as adm
import argo_controller as ac
from test_argo_controller import _template, _values
from test_manifests import K8S, NAMESPACE, SWEEP, WORKFLOW_TEMPLATES, crd_errors, kustomize

MULTINODE = kustomize(K8S / "multinode")
TRAIN = WORKFLOW_TEMPLATES["cedm-train"]
TRAIN_NODES = _template(TRAIN, "train-nodes")          # the DAG: holds the slot, its task and exit hook
TRAINJOB = _template(TRAIN, "trainjob")                # the resource step: apply + wait
DELETE = _template(TRAIN, "trainjobs-delete")          # the resource step: delete + wait
NODES = ["1", "2", "4"]


def _obj(kind: str, name: str | None = None) -> dict:
    (d,) = [d for _, d in MULTINODE if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return d


RUNTIME = _obj("TrainingRuntime")


def _task_values(workflow: str = "cedm-sweep-x2k4", **over) -> dict[str, str]:
    """The values of the train-nodes DAG (the sweep's arguments for one conditioning), then of its
    `trainjob` task's arguments, as Argo substitutes them (expression tags included)."""
    dag = _values(SWEEP, TRAIN_NODES, **{"nodes": "2", **over})
    dag["workflow.name"] = workflow
    (task,) = TRAIN_NODES["dag"]["tasks"]
    args = ac.substitute(task["arguments"]["parameters"], dag)
    vals = {k: v for k, v in dag.items() if k.startswith("workflow.")}
    vals.update({f"inputs.parameters.{a['name']}": a["value"] for a in args})
    return vals


def _trainjob(workflow: str = "cedm-sweep-x2k4", **over) -> dict:
    """The TrainJob the step applies: its manifest substituted (Argo), the namespace and, with
    setOwnerReference, the workflow as its controller (workflow/executor resource.go)."""
    vals = _task_values(workflow, **over)
    job = yaml.safe_load(ac.VAR.sub(lambda m: vals[m.group(1)], TRAINJOB["resource"]["manifest"]))
    job["metadata"]["namespace"] = NAMESPACE
    assert TRAINJOB["resource"]["setOwnerReference"] is True
    job["metadata"]["ownerReferences"] = [{"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow", "name": workflow,
                                           "uid": "w", "controller": True, "blockOwnerDeletion": True}]
    return job


def _admitted_trainjob(**over) -> dict:
    return adm.trainjob_default(_trainjob(**over))


# ----------------------------------------------------------------------------------------------
# The objects, the API server's and the CRDs' view

def test_the_multinode_objects_build_and_validate():
    kinds = {d["kind"] for _, d in MULTINODE}
    assert kinds == {"TrainingRuntime", "Role", "RoleBinding", "ServiceAccount", "CronJob", "ConfigMap"}
    for _, d in MULTINODE:
        assert d["metadata"]["namespace"] == NAMESPACE and d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cedm"
    assert not crd_errors(RUNTIME)
    import kubernetes_validate as kv

    for _, d in MULTINODE:
        if d["kind"] != "TrainingRuntime":
            kv.validate(d, kv.latest_version(), strict=True)


@pytest.mark.parametrize("nodes", NODES)
def test_the_trainjob_the_sweep_applies_validates(nodes):
    job = _trainjob(nodes=nodes)
    assert not crd_errors(job), crd_errors(job)
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                         "name": RUNTIME["metadata"]["name"]}
    t = job["spec"]["trainer"]
    assert t["numNodes"] == int(nodes) and t["numProcPerNode"] == 4
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


# ----------------------------------------------------------------------------------------------
# Admission as the cluster does it: Trainer's webhooks, then JobSet's on what Trainer builds

def test_the_runtime_passes_trainers_webhook():
    assert adm.trainingruntime_errors(RUNTIME) == []
    bad = copy.deepcopy(RUNTIME)
    bad["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0][
        "name"] = "trainer"
    assert any("required container for the ancestor: trainer" in e for e in adm.trainingruntime_errors(bad))


@pytest.mark.parametrize("nodes", NODES)
def test_every_object_of_a_trainjob_is_admitted(nodes):
    """The TrainJob by Trainer's webhooks (and its CRD), the JobSet Trainer builds from it by
    JobSet's CRD and webhooks (which Trainer's webhook never sees: a rejection there leaves the
    TrainJob without status, only a TrainJobResourcesCreationFailed event), each node's pod by
    the API server and Pod Security."""
    job = _admitted_trainjob(nodes=nodes)
    assert not crd_errors(job)
    assert adm.trainjob_errors(job, {RUNTIME["metadata"]["name"]: RUNTIME}) == []
    js, errs = adm.admit_jobset(adm.build_jobset(job, RUNTIME))
    assert errs == [], errs
    assert not crd_errors(js), crd_errors(js)
    (rj,) = js["spec"]["replicatedJobs"]
    assert rj["template"]["spec"]["parallelism"] == rj["template"]["spec"]["completions"] == int(nodes)
    import kubernetes_validate as kv

    kv.validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{js['metadata']['name']}-node-0",
                                                                      "namespace": NAMESPACE},
                 "spec": rj["template"]["spec"]}, kv.latest_version(), strict=True)
    pods = adm.node_pods(js)
    assert len(pods) == int(nodes)
    for pod in pods:
        kv.validate(pod, kv.latest_version(), strict=True)
        assert ac.pod_errors(pod) == [] and ac.restricted_violations(pod) == []
        assert len(pod["metadata"]["name"]) <= 63
        spec = pod["spec"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": _values(SWEEP, TRAIN_NODES)["inputs.parameters.gpu-product"]}
        assert {v["name"]: v for v in spec["volumes"]}["data"]["persistentVolumeClaim"]["claimName"] == "cedm-data"
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env["PET_MASTER_ADDR"]["value"] == f"{pods[0]['spec']['hostname']}.{pods[0]['spec']['subdomain']}"
        assert pod["metadata"]["labels"]["cedm.io/workflow"] == "cedm-sweep-x2k4"


def test_jobset_rejects_the_rule_names_the_runtime_had():
    """Issue 25's first finding, reproduced: `user-error` passes Trainer's CRD and webhooks, and
    JobSet's webhook rejects the JobSet built from it (validateFailurePolicy, ruleNameFmt)."""
    old = copy.deepcopy(RUNTIME)
    old["spec"]["template"]["spec"]["failurePolicy"]["rules"][0]["name"] = "user-error"
    job = _admitted_trainjob()
    assert not crd_errors(old) and adm.trainingruntime_errors(old) == []
    assert adm.trainjob_errors(job, {old["metadata"]["name"]: old}) == []
    _, errs = adm.admit_jobset(adm.build_jobset(job, old))
    assert any("invalid failure policy rule name 'user-error'" in e for e in errs), errs
    for name, ok in (("user_error", True), ("UserError", True), ("a:b,c_", True), ("9lives", False), ("x-", False),
                     ("", False)):
        assert bool(adm.RULE_NAME.match(name)) == ok, name


def test_trainers_webhook_refuses_what_it_should():
    runtimes = {RUNTIME["metadata"]["name"]: RUNTIME}
    job = _admitted_trainjob()
    job["spec"]["trainer"]["env"].append({"name": "PET_MASTER_PORT", "value": "1"})
    assert any("reserved envs" in e for e in adm.trainjob_errors(job, runtimes))
    job = _admitted_trainjob()
    job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["name"] = "nodes"
    assert any("replicated job that doesn't exist" in e for e in adm.trainjob_errors(job, runtimes))
    job = _admitted_trainjob()
    job["spec"]["runtimePatches"][0]["manager"] = "cedm"
    assert any("domain-prefixed path" in e for e in adm.trainjob_errors(job, runtimes))
    assert adm.trainjob_errors(_admitted_trainjob(), {}) != []                      # apply k8s/multinode first


def test_long_names_still_fit_jobsets_limits():
    """The TrainJob's name is fixed-length (cedm- and 12 hex digits of its workflow and
    conditioning), so the JobSet's pod names fit 63 characters at any node count we use."""
    job = _admitted_trainjob(nodes="999", workflow="cedm-sweep-" + "x" * 200)
    assert re.fullmatch(r"cedm-[0-9a-f]{12}", job["metadata"]["name"])
    _, errs = adm.admit_jobset(adm.build_jobset(job, RUNTIME))
    assert errs == []
    js = adm.build_jobset(job, RUNTIME)
    js["metadata"]["name"] = "cedm-sweep-" + "x" * 40                              # what a long name would do
    assert any("63" in e for e in adm.admit_jobset(js)[1])


# ----------------------------------------------------------------------------------------------
# The TrainJob's identity, deadline, labels

def test_one_name_per_workflow_and_conditioning():
    a, b = _trainjob(cond="temi-C20"), _trainjob(cond="temi-C20")
    assert a["metadata"]["name"] == b["metadata"]["name"]                          # a retry adopts it
    assert _trainjob(cond="temi-C40")["metadata"]["name"] != a["metadata"]["name"]
    assert _trainjob(workflow="cedm-sweep-other", cond="temi-C20")["metadata"]["name"] != a["metadata"]["name"]
    assert TRAINJOB["resource"]["action"] == "apply"                                # kubectl apply: create or adopt
    # the exit hook's selector names exactly this TrainJob
    hook = TRAIN_NODES["dag"]["tasks"][0]["hooks"]["exit"]
    vals = _task_values(cond="temi-C20")
    dag = _values(SWEEP, TRAIN_NODES, nodes="2", cond="temi-C20")
    dag["workflow.name"] = "cedm-sweep-x2k4"
    (sel,) = ac.substitute(hook["arguments"]["parameters"], dag)
    assert sel["value"] == f"cedm.io/trainjob={vals['inputs.parameters.name']}"
    assert a["metadata"]["labels"]["cedm.io/trainjob"] == a["metadata"]["name"]


def test_the_trainjob_ends_itself_before_its_watcher_is_killed():
    """spec.activeDeadlineSeconds (Trainer's reconcileDeadline: from creation or from Kueue's
    admission, pending pods included; then Failed, DeadlineExceeded, its JobSet deleted) is
    shorter than the watching pod's, so the step reads the failure rather than dying first."""
    job = _trainjob()
    assert 0 < job["spec"]["activeDeadlineSeconds"] < int(TRAINJOB["activeDeadlineSeconds"])


def test_kueue_sees_the_queue_and_the_dashboard_the_workflow():
    job = _trainjob(queue="gpu-team")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team"
    # no Kueue: an empty queue name is no queue name (kueue jobframework QueueNameForObject)
    assert _trainjob()["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == ""
    assert job["metadata"]["labels"]["cedm.io/workflow"] == "cedm-sweep-x2k4"
    sweep_params = {p["name"] for p in SWEEP["spec"]["arguments"]["parameters"]}
    assert "queue" in sweep_params


# ----------------------------------------------------------------------------------------------
# Metrics: one target per training (Prometheus relabeling over the pods' labels)

def _relabel(labels: dict[str, str], rules: list[dict]) -> dict[str, str] | None:
    """prometheus/model/relabel Process for `keep` and `replace` (defaults: regex (.*), separator
    ';', replacement $1): the regex anchored, the source labels joined; keep drops a non-match,
    replace sets target_label only when the regex matches. None = dropped."""
    labels = dict(labels)
    for r in rules:
        value = ";".join(labels.get(s, "") for s in r["sourceLabels"])
        m = re.fullmatch(r.get("regex", "(.*)"), value)
        action = r.get("action", "replace")
        if action == "keep":
            if not m:
                return None
        elif action == "replace":
            if m:
                labels[r["targetLabel"]] = m.expand(r.get("replacement", "$1").replace("$1", r"\1"))
        else:
            raise NotImplementedError(action)
    return labels


def _meta(pod: dict) -> dict[str, str]:
    return {"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
            for k, v in pod["metadata"]["labels"].items()}


@pytest.mark.parametrize("nodes", NODES)
def test_only_node_zero_of_a_trainjob_is_scraped_with_its_workflow(nodes):
    from test_manifests import RESOURCES

    (pm,) = [d for _, d in RESOURCES if d["kind"] == "PodMonitor" and d["metadata"]["name"] == "cedm-train"]
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    js, _ = adm.admit_jobset(adm.build_jobset(_admitted_trainjob(nodes=nodes), RUNTIME))
    kept = [t for t in (_relabel(_meta(p), ep["relabelings"]) for p in adm.node_pods(js)) if t is not None]
    assert len(kept) == 1 and kept[0]["workflow"] == "cedm-sweep-x2k4"
    assert kept[0]["__meta_kubernetes_pod_label_batch_kubernetes_io_job_completion_index"] == "0"
    argo_pod = {"metadata": {"labels": {"cedm.io/stage": "train", "workflows.argoproj.io/workflow": "cedm-sweep-a1"}}}
    assert _relabel(_meta(argo_pod), ep["relabelings"])["workflow"] == "cedm-sweep-a1"   # the one-pod training


# ----------------------------------------------------------------------------------------------
# The runtime's failure policy and Argo's reading of the TrainJob

def test_the_failure_policy_is_the_one_documented():
    """Exit code 2 fails the JobSet at once, a disruption restarts it without spending the
    budget, anything else restarts it at most maxRestarts times (the runtime's comment)."""
    spec = RUNTIME["spec"]["template"]["spec"]
    (rj,) = spec["replicatedJobs"]
    rules = rj["template"]["spec"]["podFailurePolicy"]["rules"]
    assert rj["template"]["spec"]["backoffLimit"] == 0
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "node", "operator": "In", "values": [2]}}
    assert rules[1] == {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}

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
    "past its deadline": (_status(("Failed", "True")), ac.FAILED),
    "suspended by Kueue": (_status(("Suspended", "True")), "waiting"),
    "admitted by Kueue, running": (_status(("Suspended", "False")), "waiting"),
    "admitted by Kueue, complete": (_status(("Suspended", "False"), ("Complete", "True"), succeeded=1), ac.SUCCEEDED),
    "admitted by Kueue, failed": (_status(("Suspended", "False"), ("Failed", "True")), ac.FAILED),
}


@pytest.mark.parametrize("state", STATES)
def test_argo_reads_every_trainjob_state_right(state):
    obj, want = STATES[state]
    r = TRAINJOB["resource"]
    assert ac.resource_state(obj, r["successCondition"], r["failureCondition"]) == want


def test_a_gjson_predicate_or_a_first_condition_only_would_not_do():
    with pytest.raises(ValueError, match="invalid label key"):
        ac.parse_selector('status.conditions.#(type=="Complete").status == True')
    obj, _ = STATES["admitted by Kueue, complete"]
    assert ac.resource_state(obj, "status.conditions.0.type == Complete", "status.conditions.0.type == Failed") \
        == "waiting"                                               # would wait for two weeks


# ----------------------------------------------------------------------------------------------
# RBAC: exactly what the steps do with the API

def kubectl_verbs(tmpl: dict) -> set[tuple[str, str, str]]:
    """(group, resource, verb) a resource template's `kubectl` call makes, restated from
    k8s.io/kubectl v0.35.4 (argoexec v4.1.2's): apply (pkg/cmd/apply: GET the live object, then
    create or patch), delete (pkg/cmd/delete: a --selector LISTs, each match is DELETEd; --wait
    then GETs, LISTs and WATCHes until gone, pkg/cmd/wait IsDeleted, and is skipped silently when
    forbidden), and Argo's own use (workflow/executor resource.go: WaitResource GETs the object;
    setOwnerReference: update on workflows/finalizers for the blockOwnerDeletion reference)."""
    r = tmpl["resource"]
    if r.get("manifest"):
        m = yaml.safe_load(ac.VAR.sub("1", r["manifest"]))
        group, resource = m["apiVersion"].split("/")[0], m["kind"].lower() + "s"
    else:
        resource, group = r["flags"][0].split(".", 1)
    need = set()
    if r["action"] == "apply":
        need |= {(group, resource, v) for v in ("get", "create", "patch")}
    elif r["action"] == "delete":
        need.add((group, resource, "delete"))
        if "--selector" in r.get("flags", []):
            need.add((group, resource, "list"))
        if "--wait=true" in r.get("flags", []):
            need |= {(group, resource, v) for v in ("get", "list", "watch")}
    else:
        raise NotImplementedError(r["action"])
    if r.get("successCondition") or r.get("failureCondition"):
        need.add((group, resource, "get"))
    if r.get("setOwnerReference"):
        need.add(("argoproj.io", "workflows/finalizers", "update"))
    return need


def _grants(role: dict) -> set[tuple[str, str, str]]:
    return {(g, res, v) for rule in role["rules"] for g in rule["apiGroups"] for res in rule["resources"]
            for v in rule["verbs"]}


def test_rbac_grants_exactly_what_the_resource_steps_need():
    resource_templates = [t for t in TRAIN["spec"]["templates"] if "resource" in t]
    assert {t["name"] for t in resource_templates} == {"trainjob", "trainjobs-delete"}
    need = set().union(*(kubectl_verbs(t) for t in resource_templates))
    role = _obj("Role", "cedm-trainjobs")
    assert _grants(role) == need
    assert {"--cascade=foreground", "--wait=true"} <= set(DELETE["resource"]["flags"])   # gone before the slot is
    binding = _obj("RoleBinding", "cedm-trainjobs")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SWEEP["spec"]["serviceAccountName"],
                                    "namespace": NAMESPACE}]


# ----------------------------------------------------------------------------------------------
# The resource steps' pods

@pytest.mark.parametrize("archive_logs", [False, True])
@pytest.mark.parametrize("name", ["trainjob", "trainjobs-delete"])
def test_the_resource_steps_pods_keep_argos_own_containers(name, archive_logs):
    """A resource pod is Argo's `init` and `main` (argoexec resource), plus Argo's `wait` where
    logs are archived (build: needsAuxCtr), all locked down by Argo (newExecContainer). The
    workflow's pod spec patch touches only `init`; the `$patch: delete` of `wait` this step had
    removed Argo's real `wait` on such installs (its logs never saved, its result awaited 10 min)."""
    t = _template(TRAIN, name)
    vals = _values(SWEEP, t)
    pod = ac.build_pod(SWEEP["spec"], t, vals, archive_logs=archive_logs)
    assert [c["name"] for c in pod["spec"]["containers"]] == ["wait"] * archive_logs + ["main"]
    assert ac.pod_errors(pod) == [] and ac.restricted_violations(pod) == []
    old = dict(t, podSpecPatch="containers:\n  - name: wait\n    $patch: delete\n")
    pod = ac.build_pod(SWEEP["spec"], old, vals, archive_logs=archive_logs)
    assert [c["name"] for c in pod["spec"]["containers"]] == ["main"]                # Argo's wait gone


def test_the_plan_checks_the_batch_over_every_process():
    from cedm.io import CedmError
    from cedm.plan import resolve

    assert resolve("cifar10", gpus=4, nodes=2)["train-cpu"]
    with pytest.raises(CedmError, match="not divisible by 12 processes"):
        resolve("cifar10", gpus=4, nodes=3)
    sweep_params = {p["name"]: p for p in SWEEP["spec"]["arguments"]["parameters"]}
    assert sweep_params["nodes"]["value"] == "1"
    assert json.dumps(_template(SWEEP, "plan")["container"]["args"]).count("inputs.parameters.nodes") == 1
