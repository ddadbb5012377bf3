"""Admission of the multi-node path's objects as the real cluster decides it, restated from the
controllers' source for the tests (test_multinode.py), in the style of argo_controller.py: a CRD
schema says whether an object is well formed; these say what the webhooks that guard it admit,
and what Trainer builds from it.

- JobSet v0.12.0 (github.com/kubernetes-sigs/jobset): `pkg/webhooks/jobset_webhook.go`
  (jobSetWebhook.Default, ValidateCreate, validateFailurePolicy, validateCoordinator),
  `pkg/util/placement/placement.go` (GenJobName, GenPodName), `pkg/features/features.go` (gates),
  `pkg/controllers/jobset_controller.go` (labelAndAnnotateObject: the labels of a JobSet's pods),
  `api/jobset/v1alpha2/jobset_types.go` (CRD defaults, label keys).
- Kubeflow Trainer v2.3.0 (github.com/kubeflow/trainer): `pkg/webhooks/trainingruntime_webhook.go`
  (validateReplicatedJobs), `pkg/webhooks/trainjob_webhook.go` (TrainJobDefaulter.Default,
  TrainJobValidator.ValidateCreate -> `pkg/runtime/core/trainingruntime.go` ValidateObjects ->
  the plugins' Validate: `pkg/runtime/framework/plugins/jobset/jobset.go`, `.../torch/torch.go`),
  and what Trainer builds (`trainingruntime.go` newRuntimeInfo, mergeRuntimePatches; `jobset.go`
  SyncParallelCount, Build; `jobset/builder.go` Trainer; `torch/torch.go` EnforceMLPolicy).
- Kubernetes (github.com/kubernetes/kubernetes): `staging/src/k8s.io/apimachinery/pkg/util/
  validation/validation.go` (IsDNS1035Label, IsDNS1123Subdomain, IsDomainPrefixedPath), the Job
  controller's labels on the pods of an Indexed Job (`pkg/controller/job/indexed_job_utils.go`:
  batch.kubernetes.io/job-completion-index, label and annotation).
Only what our objects use is restated; anything else raises instead of guessing.
"""
from __future__ import annotations

import copy
import re

import argo_controller as ac

# ----------------------------------------------------------------------------------------------
# apimachinery validation.go

DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
HTTP_PATH = re.compile(r"^[A-Za-z0-9/\-._~%!$&'()*+,;=:]+$")


def dns1035_label_errors(value: str) -> list[str]:
    """IsDNS1035Label."""
    errs = []
    if len(value) > 63:
        errs.append("must be no more than 63 characters")
    if not DNS1035_LABEL.match(value):
        errs.append("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
                    "alphabetic character, and end with an alphanumeric character")
    return errs


def dns1123_subdomain_errors(value: str) -> list[str]:
    """IsDNS1123Subdomain: at most 253 characters, dot-separated DNS-1123 labels."""
    if len(value) > 253 or not all(DNS1123_LABEL.match(p) for p in value.split(".")):
        return [f"{value!r}: a lowercase RFC 1123 subdomain"]
    return []


def domain_prefixed_path_errors(value: str) -> list[str]:
    """IsDomainPrefixedPath: `<DNS-1123 subdomain>/<path>`."""
    host, sep, path = value.partition("/")
    if not sep or not path:
        return [f"{value!r}: must be a domain-prefixed path (such as \"acme.io/foo\")"]
    return dns1123_subdomain_errors(host) + ([] if HTTP_PATH.match(path) else [f"{path!r}: invalid path"])


# ----------------------------------------------------------------------------------------------
# JobSet v0.12.0

RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")     # ruleNameFmt
VALID_JOB_FAILURE_REASONS = {"BackoffLimitExceeded", "DeadlineExceeded", "FailedIndexes",
                             "MaxFailedIndexesExceeded", "PodFailurePolicy"}   # validOnJobFailureReasons
FEATURE_GATES = {"InPlaceRestart": False, "RestartJob": False}               # features.go defaults (alpha)
MAX_INT32 = 2 ** 31 - 1


def jobset_crd_defaults(js: dict) -> dict:
    """The CRD schema's defaults the API server applies before the webhooks
    (jobset_types.go kubebuilder:default): replicas 1, groupName "default",
    failurePolicy.restartStrategy Recreate."""
    js = copy.deepcopy(js)
    for rj in js["spec"]["replicatedJobs"]:
        rj.setdefault("replicas", 1)
        rj.setdefault("groupName", "default")
    if "failurePolicy" in js["spec"]:
        js["spec"]["failurePolicy"].setdefault("restartStrategy", "Recreate")
    return js


def jobset_default(js: dict) -> dict:
    """jobSetWebhook.Default (the mutating webhook)."""
    js = copy.deepcopy(js)
    spec = js["spec"]
    spec.setdefault("successPolicy", {"operator": "All"})
    spec.setdefault("startupPolicy", {"startupPolicyOrder": "AnyOrder"})
    for rj in spec["replicatedJobs"]:
        rj["template"]["spec"].setdefault("completionMode", "Indexed")
        pod = rj["template"]["spec"]["template"]["spec"]
        if not pod.get("restartPolicy"):
            pod["restartPolicy"] = "OnFailure"
    net = spec.setdefault("network", {})
    net.setdefault("enableDNSHostnames", True)
    net.setdefault("publishNotReadyAddresses", True)
    for i, rule in enumerate(spec.get("failurePolicy", {}).get("rules", [])):
        if not rule.get("name"):
            rule["name"] = f"failurePolicyRule{i}"
    return js


def jobset_errors(js: dict) -> list[str]:
    """jobSetWebhook.ValidateCreate (failurePolicy=fail: any error rejects the create) on the
    defaulted object."""
    spec = js["spec"]
    errs: list[str] = []
    unrestated = set(spec) - {"replicatedJobs", "failurePolicy", "successPolicy", "startupPolicy", "network",
                              "suspend"}
    if unrestated or spec.get("coordinator") or spec.get("volumeClaimPolicies") or spec.get("managedBy"):
        raise NotImplementedError(f"JobSet fields not restated: {sorted(unrestated)}")
    fp = spec.get("failurePolicy")
    if fp and fp.get("restartStrategy") == "InPlaceRestart" and not FEATURE_GATES["InPlaceRestart"]:
        errs.append("InPlaceRestart restart strategy cannot be set when InPlaceRestart feature gate is disabled")
    rjobs = spec["replicatedJobs"]
    if rjobs and rjobs[0].get("dependsOn"):
        errs.append("DependsOn can't be set for the first ReplicatedJob")
    sub = spec.get("network", {}).get("subdomain", "")
    if sub:
        errs += [f"spec.network.subdomain: {e}" for e in dns1123_subdomain_errors(sub) + dns1035_label_errors(sub)]
    names: set[str] = set()
    for i, rj in enumerate(rjobs):
        where = f"spec.replicatedJobs[{i}]"
        names.add(rj["name"])
        job = rj["template"]["spec"]
        if int(job.get("parallelism", 1)) * int(rj["replicas"]) > MAX_INT32:
            errs.append(f"the product of replicas and parallelism must not exceed {MAX_INT32}")
        errs += [f"{where}.groupName: {e}" for e in dns1035_label_errors(rj["groupName"])]
        longest_job = f"{js['metadata']['name']}-{rj['name']}-{int(rj['replicas']) - 1}"      # GenJobName
        errs += [f"{where}.name: {longest_job}: {e}" for e in dns1035_label_errors(longest_job)]
        if job.get("completionMode") == "Indexed" and job.get("completions") is not None:
            longest_pod = f"{longest_job}-{int(job['completions']) - 1}-abcde"                 # GenPodName + suffix
            errs += [f"{where}.name: pod {longest_pod}: {e}" for e in dns1035_label_errors(longest_pod)]
        for dep in rj.get("dependsOn", []):
            if dep["name"] not in names:
                errs.append(f"replicatedJob: {rj['name']} cannot depend on replicatedJob: {dep['name']}")
    for target in spec["successPolicy"].get("targetReplicatedJobs", []):
        if target not in names:
            errs.append(f"invalid replicatedJob name '{target}' does not appear in .spec.ReplicatedJobs")
    if fp:
        errs += _failure_policy_errors(fp, rjobs, names)
    return errs


def _failure_policy_errors(fp: dict, rjobs: list, names: set[str]) -> list[str]:
    """validateFailurePolicy."""
    errs = []
    rules = fp.get("rules", [])
    if any(r["action"] in ("RestartJob", "RestartJobAndIgnoreMaxRestarts") for r in rules):
        if not FEATURE_GATES["RestartJob"]:
            return ["RestartJob and RestartJobAndIgnoreMaxRestarts failure policy actions are not allowed when "
                    "RestartJob feature gate is disabled"]
    seen: dict[str, list[int]] = {}
    for i, r in enumerate(rules):
        name = r.get("name", "")
        if not 1 <= len(name) <= 128:
            errs.append(f"invalid failure policy rule name of length {len(name)}")
        seen.setdefault(name, []).append(i)
        if not RULE_NAME.match(name):
            errs.append(f"invalid failure policy rule name '{name}', a failure policy rule name must start with an "
                        "alphabetic character, optionally followed by a string of alphanumeric characters or '_,:', "
                        "and must end with an alphanumeric character or '_'")
        for t in r.get("targetReplicatedJobs", []):
            if t not in names:
                errs.append(f"invalid replicatedJob name '{t}' in failure policy does not appear in .spec.ReplicatedJobs")
        for reason in r.get("onJobFailureReasons", []):
            if reason not in VALID_JOB_FAILURE_REASONS:
                errs.append(f"invalid job failure reason '{reason}' in failure policy is not a recognized job "
                            "failure reason")
    errs += [f"rule names are not unique, rules with indices {ix} all have the same name '{n}'"
             for n, ix in seen.items() if len(ix) > 1]
    return errs


def admit_jobset(js: dict) -> tuple[dict, list[str]]:
    """What the API server stores, or why it refuses: CRD defaults, the mutating webhook, then
    the validating one."""
    js = jobset_default(jobset_crd_defaults(js))
    return js, jobset_errors(js)


# ----------------------------------------------------------------------------------------------
# Kubeflow Trainer v2.3.0

ANCESTOR = "trainer.kubeflow.org/trainjob-ancestor-step"
ANCESTOR_CONTAINERS = {"trainer": "node", "model-initializer": "model-initializer",
                       "dataset-initializer": "dataset-initializer"}               # expectedContainerNames
TORCH_RESERVED_ENV = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
TRAINER_PORT = 29500                                                           # constants.ContainerTrainerPort


def trainingruntime_errors(rt: dict) -> list[str]:
    """TrainingRuntimeValidator.ValidateCreate -> validateReplicatedJobs: a replicated job labelled
    as an ancestor step has replicas 1 (its CRD default) and that step's container."""
    errs = []
    for i, rj in enumerate(rt["spec"]["template"]["spec"]["replicatedJobs"]):
        ancestor = rj["template"].get("metadata", {}).get("labels", {}).get(ANCESTOR)
        if ancestor not in ANCESTOR_CONTAINERS:
            continue
        if int(rj.get("replicas", 1)) != 1:
            errs.append(f"spec.template.spec.replicatedJobs[{i}].replicas: always must be 1")
        names = [c["name"] for c in rj["template"]["spec"]["template"]["spec"]["containers"]]
        if ANCESTOR_CONTAINERS[ancestor] not in names:
            errs.append(f"spec.template.spec.replicatedJobs[{i}].template.spec.template.spec.containers: must "
                        f"contain the required container for the ancestor: {ancestor}")
    return errs


def trainjob_default(tj: dict, now: str = "2026-01-01T00:00:00Z") -> dict:
    """TrainJobDefaulter.Default on create: every runtime patch gets its time."""
    tj = copy.deepcopy(tj)
    for p in tj["spec"].get("runtimePatches", []):
        p.setdefault("time", now)
    return tj


def trainjob_errors(tj: dict, runtimes: dict[str, dict]) -> list[str]:
    """TrainJobValidator.ValidateCreate: the runtime (by kind) -> TrainingRuntime.ValidateObjects:
    the runtime must exist in the TrainJob's namespace, then the custom validation plugins the
    runtime enables: JobSet (runtime patches name replicated jobs and containers the runtime has,
    set no env on the trainer's `node` container, a domain-prefixed manager) and Torch (no
    reserved PET_* env; envInjection targets exist)."""
    ref = tj["spec"]["runtimeRef"]
    if ref.get("kind", "ClusterTrainingRuntime") != "TrainingRuntime" or ref.get("apiGroup", "trainer.kubeflow.org") \
            != "trainer.kubeflow.org":
        raise NotImplementedError(f"runtimeRef {ref} not restated")
    if tj["spec"].get("initializer"):
        raise NotImplementedError("initializer not restated")
    rt = runtimes.get(ref["name"])
    if rt is None or rt["metadata"].get("namespace") != tj["metadata"].get("namespace"):
        return [f"spec.runtimeRef: {ref['name']}: specified trainingRuntime must be created before the TrainJob "
                "is created"]
    errs = []
    containers = {rj["name"]: {c["name"] for c in rj["template"]["spec"]["template"]["spec"].get("initContainers", [])
                               + rj["template"]["spec"]["template"]["spec"]["containers"]}
                  for rj in rt["spec"]["template"]["spec"]["replicatedJobs"]}
    for patch in tj["spec"].get("runtimePatches", []):                       # jobset.go Validate
        errs += [f"spec.runtimePatches.manager: {e}" for e in domain_prefixed_path_errors(patch["manager"])]
        for rjp in patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", []):
            if rjp["name"] not in containers:
                errs.append("spec.runtimePatches: must not have replicated job that doesn't exist in the runtime "
                            "job template")
                continue
            pod = rjp.get("template", {}).get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("initContainers", []) + pod.get("containers", []):
                if c["name"] not in containers[rjp["name"]]:
                    errs.append(f"spec.runtimePatches: must not have container that doesn't exist in the runtime "
                                f"job {rjp['name']}")
                elif c.get("env") and c["name"] in ("dataset-initializer", "model-initializer", "node"):
                    errs.append("spec.runtimePatches: must not have envs for the dataset-initializer, "
                                "model-initializer, node containers")
    torch = rt["spec"].get("mlPolicy", {}).get("torch")
    if torch is not None:                                                      # torch.go Validate
        for target in torch.get("envInjection", {}).get("targets", []):
            raise NotImplementedError(f"envInjection {target} not restated")
        reserved = sorted({e["name"] for e in tj["spec"].get("trainer", {}).get("env", [])} & TORCH_RESERVED_ENV)
        if reserved:
            errs.append(f"spec.trainer.env: must not have reserved envs, invalid envs configured: {reserved}")
    return errs


def build_jobset(tj: dict, rt: dict) -> dict:
    """The JobSet Trainer applies for a TrainJob on its TrainingRuntime: the runtime's JobSet spec
    with the TrainJob's runtime patches merged in (mergeRuntimePatches: a strategic merge of the
    JobSetSpec, replicated jobs by name), the trainer ancestor's job scaled to numNodes
    (newRuntimeInfo + Torch EnforceMLPolicy: the pod set's count; SyncParallelCount: parallelism
    = completions = count; builder.Trainer: replicas 1), its `node` container given the
    TrainJob's image, command, args and env (builder.Trainer), resourcesPerNode
    (newRuntimeInfo: MergeResourceRequirements) and torchrun's rendezvous (EnforceMLPolicy:
    PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK from the completion index, PET_MASTER_ADDR
    <job>-node-0-0.<job>, PET_MASTER_PORT and container port 29500); named as the TrainJob,
    labelled with the runtime template's and the patches' labels, owned by it (Build)."""
    spec = copy.deepcopy(rt["spec"]["template"]["spec"])
    labels = dict(rt["spec"]["template"].get("metadata", {}).get("labels", {}))
    order = [r["name"] for r in spec["replicatedJobs"]]
    for patch in tj["spec"].get("runtimePatches", []):
        template = patch.get("trainingRuntimeSpec", {}).get("template", {})
        labels.update(template.get("metadata", {}).get("labels", {}))
        if template.get("spec"):
            spec = ac.strategic_merge(spec, template["spec"], "JobSetSpec")
    spec["replicatedJobs"].sort(key=lambda r: order.index(r["name"]))
    t = tj["spec"]["trainer"]
    name = tj["metadata"]["name"]
    nodes = int(t.get("numNodes", rt["spec"].get("mlPolicy", {}).get("numNodes", 1)))
    for rj in spec["replicatedJobs"]:
        if rj["template"].get("metadata", {}).get("labels", {}).get(ANCESTOR) != "trainer":
            continue
        rj["replicas"] = 1
        rj["template"]["spec"]["parallelism"] = rj["template"]["spec"]["completions"] = nodes
        for c in rj["template"]["spec"]["template"]["spec"]["containers"]:
            if c["name"] != "node":
                continue
            c.update({k: v for k, v in (("image", t.get("image")), ("command", t.get("command")),
                                        ("args", t.get("args"))) if v is not None})
            if "resourcesPerNode" in t:     # MergeResourceRequirements: a strategic merge (maps by key)
                c["resources"] = ac.strategic_merge(c.get("resources", {}), t["resourcesPerNode"])
            env = {e["name"]: e for e in c.get("env", [])}
            for e in t.get("env", []) + [
                    {"name": "PET_NNODES", "value": str(nodes)},
                    {"name": "PET_NPROC_PER_NODE", "value": str(t.get("numProcPerNode", "auto"))},
                    {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
                        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
                    {"name": "PET_MASTER_ADDR", "value": f"{name}-node-0-0.{name}"},
                    {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)}]:
                env[e["name"]] = e                                             # apply.UpsertEnvVars
            c["env"] = list(env.values())
            if not any(p["containerPort"] == TRAINER_PORT for p in c.get("ports", [])):
                c["ports"] = c.get("ports", []) + [{"containerPort": TRAINER_PORT}]
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": name, "namespace": tj["metadata"]["namespace"], "labels": labels,
                         "ownerReferences": [{"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
                                              "name": name, "uid": "u", "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": spec}


def node_pods(js: dict) -> list[dict]:
    """The pods of an admitted JobSet: for each replicated job, its replicas' Jobs (GenJobName), each
    Indexed Job's pods (completion index 0..completions-1), labelled by JobSet
    (labelAndAnnotateObject: jobset-name, replicatedjob-name, job-index, ...) and by the Job
    controller (job-name, job-completion-index), hostname <job>-<index> in the JobSet's subdomain."""
    pods = []
    name = js["metadata"]["name"]
    for rj in js["spec"]["replicatedJobs"]:
        for j in range(int(rj["replicas"])):
            job = f"{name}-{rj['name']}-{j}"
            tmpl = rj["template"]["spec"]["template"]
            for idx in range(int(rj["template"]["spec"].get("completions", 1))):
                labels = {**tmpl.get("metadata", {}).get("labels", {}),
                          "jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": rj["name"],
                          "jobset.sigs.k8s.io/job-index": str(j), "batch.kubernetes.io/job-name": job,
                          "batch.kubernetes.io/job-completion-index": str(idx)}
                pods.append({"apiVersion": "v1", "kind": "Pod",
                             "metadata": {"name": f"{job}-{idx}-abcde", "namespace": js["metadata"]["namespace"],
                                          "labels": labels,
                                          "annotations": {"batch.kubernetes.io/job-completion-index": str(idx)}},
                             "spec": {**copy.deepcopy(tmpl["spec"]), "hostname": f"{job}-{idx}",
                                      "subdomain": js["spec"].get("network", {}).get("subdomain", name)}})
    return pods
