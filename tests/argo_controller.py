"""What a real cluster does with our manifests, restated for the tests (test_argo_controller.py).

A schema says whether a manifest is well-formed; these functions say what Argo's controller and
the Kubernetes API server then do with it. Each restates one piece of upstream source, named in
its docstring, so a reader can check the restatement line by line:
- Argo Workflows, tag v4.1.2 (github.com/argoproj/argo-workflows): `workflow/common/ancestry.go`
  (depends), `workflow/controller/dag.go` (which tasks run, a DAG's phase), `workflow/controller/
  workflowpod.go` + `workflowpod_layout.go` (the pod it creates), `workflow/controller/
  retry_tweak.go` + `workflow/util/retry/retry.go` (retry anti-affinity), `workflow/controller/
  operator.go` (retries, timeouts).
- Kubernetes (github.com/kubernetes/kubernetes) `pkg/apis/core/validation/validation.go` for the
  pod rules the OpenAPI schema does not carry, and the Pod Security Standards' `restricted`
  profile (k8s.io/pod-security-admission, `policy/check_*.go`;
  https://kubernetes.io/docs/concepts/security/pod-security-standards/).
Only what our manifests use is restated; anything else raises instead of guessing.
"""
from __future__ import annotations

import copy
import json
import re
from collections import deque
from dataclasses import dataclass, field

VAR = re.compile(r"{{\s*([^}]+?)\s*}}")

# ----------------------------------------------------------------------------------------------
# depends (workflow/common/ancestry.go)

# TaskResult constants; ValidateTaskResults rejects any other
RESULTS = ("Succeeded", "Failed", "Errored", "Skipped", "Omitted", "Daemoned", "AnySucceeded", "AllFailed")
# taskNameRegex: a `task.Result` (group 1) or a bare task name (group 2)
TASK_NAME = re.compile(r"([a-zA-Z0-9][-a-zA-Z0-9]*?\.[A-Z][a-zA-Z]+)|([a-zA-Z0-9][-a-zA-Z0-9]*)")
# node phases (pkg/apis/workflow/v1alpha1/workflow_types.go NodePhase)
SUCCEEDED, FAILED, ERROR, SKIPPED, OMITTED = "Succeeded", "Failed", "Error", "Skipped", "Omitted"


def validate_task_results(depends: str) -> None:
    """ancestry.go ValidateTaskResults (run by `argo lint` and at submission)."""
    for m in re.finditer(r"([a-zA-Z0-9][-a-zA-Z0-9]*?)\.([A-Z][a-zA-Z]+)", depends):
        if m.group(2) not in RESULTS:
            raise ValueError(f"task result '{m.group(2)}' for task '{m.group(1)}' is invalid")


def depends_logic(task: dict, tasks: dict[str, dict]) -> tuple[set[str], str]:
    """ancestry.go GetTaskDependencies: the tasks a task waits for and its boolean logic, a bare
    name `A` expanded to (A.Succeeded || A.Skipped || A.Daemoned) [|| Errored/Failed by continueOn]
    (expandDependency); `dependencies: [A, B]` is the same expansion joined by &&."""
    expr = task.get("depends") or " && ".join(task.get("dependencies", []))
    deps: set[str] = set()
    out, pos = [], 0
    for m in TASK_NAME.finditer(expr):
        if m.group(1):
            deps.add(m.group(1).split(".")[0])
            continue
        name = m.group(2)
        deps.add(name)
        cont = tasks[name].get("continueOn", {}) if name in tasks else {}
        alts = [f"{name}.{r}" for r in ("Succeeded", "Skipped", "Daemoned")]
        alts += [f"{name}.Errored"] * bool(cont.get("error")) + [f"{name}.Failed"] * bool(cont.get("failed"))
        out += [expr[pos:m.start()], "(" + " || ".join(alts) + ")"]
        pos = m.end()
    return deps, "".join(out) + expr[pos:]


def eval_depends(logic: str, results: dict[str, dict[str, bool]]) -> bool:
    """dag.go evaluateDependsLogic: each dependency's TaskResults, `-` read as `_` (expr-lang)."""
    tokens = re.findall(r"\s+|&&|\|\||!|\(|\)|[A-Za-z0-9_-]+\.[A-Za-z]+", logic)
    if "".join(tokens) != logic:
        raise ValueError(f"depends {logic!r}: only task results, &&, ||, ! and parentheses are restated")
    py = []
    for t in tokens:
        if t.isspace():
            continue
        if t in ("&&", "||", "!"):
            py.append({"&&": " and ", "||": " or ", "!": " not "}[t])
        elif t in "()":
            py.append(t)
        else:
            name, res = t.rsplit(".", 1)
            py.append(repr(results[name][res]))
    return bool(eval("".join(py), {"__builtins__": {}}))   # noqa: S307 (literals and operators only)


def task_results(phase: str, children: list[str] | None = None) -> dict[str, bool]:
    """dag.go evaluateDependsLogic: TaskResults of a node (a task group's AnySucceeded/AllFailed
    from its expanded children). A rejected, deleted or preempted pod is Error, read `Errored`."""
    children = children or []
    return {"Succeeded": phase == SUCCEEDED, "Failed": phase == FAILED, "Errored": phase == ERROR,
            "Skipped": phase == SKIPPED, "Omitted": phase == OMITTED, "Daemoned": False,
            "AnySucceeded": any(c == SUCCEEDED for c in children),
            "AllFailed": bool(children) and all(c == FAILED for c in children)}


# ----------------------------------------------------------------------------------------------
# `when` (govaluate over substituted text; only the comparisons our manifests use)

def eval_when(expr: str, params: dict[str, str]) -> bool:
    text = VAR.sub(lambda m: params[m.group(1)], expr)
    m = re.fullmatch(r"\s*'([^']*)'\s*(==|!=)\s*'([^']*)'\s*", text)
    if not m:
        raise ValueError(f"when {expr!r}: only '<a>' == '<b>' and != are restated")
    return (m.group(1) == m.group(3)) == (m.group(2) == "==")


# ----------------------------------------------------------------------------------------------
# A DAG run (dag.go executeDAG / executeDAGTask / assessDAGPhase)

@dataclass
class TaskNode:
    phase: str
    children: list[str] = field(default_factory=list)   # expanded children's phases (a task group)


def leaf_tasks(tasks: dict[str, dict]) -> list[str]:
    """dag.go findLeafTaskNames: tasks no other task depends on."""
    used = set().union(*(depends_logic(t, tasks)[0] for t in tasks.values())) if tasks else set()
    return sorted(n for n in tasks if n not in used)


def run_dag(dag: dict, outcome, params: dict[str, str], where: str = "") -> tuple[str, dict[str, TaskNode]]:
    """The phase a DAG ends in and each task's node, when every pod-level task ends as
    `outcome(path, task, item)` says (a phase, a nested DAG's tasks, or for a task with withParam
    the list of its items). Restates:
    - executeDAG: the target tasks are dag.target (space-separated) or else the leaves; only
      targets and, recursively, their dependencies run;
    - executeDAGTask: a task whose depends logic is false is Omitted; an empty withParam is
      Skipped; a false `when` is Skipped; a task group ends Succeeded unless a child ended Failed
      or Error, then with the phase of the last such child;
    - assessDAGPhase: a breadth-first walk from the DAG's roots carries each branch's last
      completed phase (Succeeded, Failed or Error) to the Skipped/Omitted nodes below it; a target
      takes that phase, a Failed or Error one in preference; the DAG is Succeeded unless a target
      is Failed or Error (then that phase; with failFast, the default, as soon as one is, without
      waiting for targets that have not run yet, `fail_fast_can_lose_a_target`).
    """
    tasks = {t["name"]: t for t in dag["tasks"]}
    deps = {n: depends_logic(t, tasks) for n, t in tasks.items()}
    for n, (d, _) in deps.items():
        unknown = d - set(tasks)
        if unknown:
            raise ValueError(f"{where}{n}: depends on unknown task(s) {sorted(unknown)}")
    targets = dag["target"].split() if dag.get("target") else leaf_tasks(tasks)
    needed: set[str] = set()
    stack = list(targets)
    while stack:                       # executeDAGTask recurses from the targets into dependencies
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack += deps[n][0]
    nodes: dict[str, TaskNode] = {}
    while len(nodes) < len(needed):
        ready = [n for n in sorted(needed - set(nodes)) if deps[n][0] <= set(nodes)]
        if not ready:
            raise ValueError(f"{where}: dependency cycle among {sorted(needed - set(nodes))}")
        for n in ready:
            t = tasks[n]
            if t.get("depends") or t.get("dependencies"):
                res = {d: task_results(nodes[d].phase, nodes[d].children) for d in deps[n][0]}
                if not eval_depends(deps[n][1].replace("-", "_"),
                                    {k.replace("-", "_"): v for k, v in res.items()}):
                    nodes[n] = TaskNode(OMITTED)
                    continue
            expands = any(k in t for k in ("withParam", "withItems", "withSequence"))
            items = outcome(f"{where}{n}", t, None) if expands else [None]
            if not items:
                nodes[n] = TaskNode(SKIPPED)
                continue
            phases = []
            for item in items:
                scope = {**params, **({"item": str(item)} if item is not None else {})}
                if "when" in t and not eval_when(t["when"], scope):
                    phases.append(SKIPPED)
                    continue
                got = outcome(f"{where}{n}" + (f"({item})" if item is not None else ""), t, item)
                if isinstance(got, dict):          # a nested DAG template, its inputs the task's arguments
                    inner = {k: v for k, v in scope.items() if k.startswith("workflow.")}
                    for a in t.get("arguments", {}).get("parameters", []):
                        inner[f"inputs.parameters.{a['name']}"] = VAR.sub(
                            lambda m, scope=scope: scope.get(m.group(1), m.group(0)), str(a.get("value", "")))
                    got = run_dag(got, outcome, inner, f"{where}{n}" + (f"({item})" if item is not None else "") + "/")[0]
                phases.append(got)
            if not expands:
                nodes[n] = TaskNode(phases[0])
            else:
                group = SUCCEEDED
                for p in phases:
                    if p in (FAILED, ERROR):
                        group = p
                nodes[n] = TaskNode(group, phases)
    return assess_dag_phase(tasks, deps, targets, nodes, dag.get("failFast", True)), nodes


def assess_dag_phase(tasks, deps, targets, nodes, fail_fast: bool = True) -> str:
    """dag.go assessDAGPhase over finished nodes (see run_dag)."""
    completed = (SUCCEEDED, FAILED, ERROR)
    children: dict[str, list[str]] = {n: [] for n in nodes}
    for n in nodes:
        for d in deps[n][0]:
            if d in nodes:
                children[d].append(n)
    target_phase = {t: "" for t in targets}
    queue = deque((n, SUCCEEDED) for n in nodes if not deps[n][0] & set(nodes))
    seen = set()
    while queue:                        # uniquePhaseNodeQueue: one visit per (node, phase)
        n, branch = queue.popleft()
        if (n, branch) in seen:
            continue
        seen.add((n, branch))
        node = nodes[n]
        if node.phase in completed:     # only a completed node sets its branch's phase
            branch = node.phase
        if n in target_phase and target_phase[n] not in (FAILED, ERROR):
            target_phase[n] = branch
        # a task group's dependents hang below each expanded child (its outbound nodes), and a
        # child that did not complete (Skipped) inherits the group's phase
        outs = [c if c in completed else branch for c in node.children] or [branch]
        for c in children[n]:
            queue.extend((c, p) for p in outs)
    result = SUCCEEDED
    for t in targets:
        p = target_phase[t]
        if p in (FAILED, ERROR) and not _continues_on(tasks[t], p):
            result = p
            if fail_fast:
                break
    return result


def fail_fast_can_lose_a_target(dag: dict) -> bool:
    """assessDAGPhase with failFast on (the default): while a target has no node yet (it has not
    started), a target already Failed or Error ends the DAG at once, so a target that depends on a
    failed task's completion (a report) would never start. True when that can happen: some target
    depends on another target that can fail, and failFast is not off."""
    if dag.get("failFast") is False:
        return False
    tasks = {t["name"]: t for t in dag["tasks"]}
    targets = dag["target"].split() if dag.get("target") else leaf_tasks(tasks)
    return any(depends_logic(tasks[a], tasks)[0] & set(targets) for a in targets)


def _continues_on(task: dict, phase: str) -> bool:
    """DAGTask.ContinuesOn: continueOn.failed / .error exempt a target's phase."""
    c = task.get("continueOn", {})
    return bool(c.get("failed")) if phase == FAILED else bool(c.get("error"))


# ----------------------------------------------------------------------------------------------
# The pod Argo creates (workflowpod.go createWorkflowPod, the default legacy layout)

EXECUTOR_IMAGE = "quay.io/argoproj/argoexec:v4.1.2"


def eval_expression(expr: str, values: dict[str, str]):
    """An expression tag `{{=...}}` (util/template expression_template.go: expr-lang over the
    scope, util/expr/env GetFuncMap: dotted names nested, `sprig` = Masterminds/sprig v3
    GenericFuncMap). Only what our manifests use: string literals and +, names such as
    workflow.name or inputs.parameters.cond, and sprig.default / trunc / sha256sum (sprig
    defaults.go dfault: the value unless empty, else the default; strings.go trunc: the first c
    characters, or the last -c; crypto.go sha256sum: hex SHA-256 of the string)."""
    import ast
    import hashlib

    sprig = {"default": lambda d, v: v if v not in ("", None) else d,
             "trunc": lambda c, s: s[:c] if c >= 0 else s[c:],
             "sha256sum": lambda s: hashlib.sha256(s.encode()).hexdigest()}

    def name(node) -> str:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            return f"{name(node.value)}.{node.attr}"
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):   # inputs.parameters['run-dir']
            return f"{name(node.value)}.{node.slice.value}"
        raise ValueError(f"expression {expr!r}: {ast.dump(node)} is not restated")

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, int)):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return ev(node.left) + ev(node.right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Call):
            fn = name(node.func)
            if not fn.startswith("sprig.") or fn[6:] not in sprig:
                raise ValueError(f"expression {expr!r}: {fn} is not restated")
            return sprig[fn[6:]](*(ev(a) for a in node.args))
        key = name(node)
        if key not in values:
            raise KeyError(f"unresolved {key} in {{{{={expr}}}}}")
        return values[key]
    return ev(ast.parse(expr.strip(), mode="eval").body)


def substitute(obj, values: dict[str, str]):
    """Argo's template substitution ({{inputs.parameters.x}}, {{workflow.x}}, expression tags
    {{=...}}, eval_expression) over a JSON value; an unknown name raises (the controller leaves
    it, and the API server then sees `{{`)."""
    text = json.dumps(obj)

    def one(m):
        key = json.loads(f'"{m.group(1)}"')          # the tag as written (JSON-escaped in `text`)
        if key.startswith("="):
            return json.dumps(str(eval_expression(key[1:], values)))[1:-1]
        if key not in values:
            raise KeyError(f"unresolved {{{{{key}}}}}")
        return json.dumps(values[key])[1:-1]
    return json.loads(VAR.sub(one, text))


def build_pod(wf_spec: dict, tmpl: dict, values: dict[str, str], executor: dict | None = None,
              retry_failed_hosts: list[str] | None = None, archive_logs: bool = False) -> dict:
    """The pod of one attempt of a container template. Restates createWorkflowPod (legacy layout,
    workflowpod_layout.go legacyLayout): `init` (argoexec init) as the one init container, `wait`
    (argoexec wait) before `main`; both from newExecContainer, whose securityContext is the
    controller configmap's `executor.securityContext` or none; the volumes var-run-argo and
    tmp-dir-argo before the template's; the template's (else the workflow's) pod securityContext;
    nodeSelector, tolerations, activeDeadlineSeconds; the retry affinity (RetryOnDifferentHost);
    then processPodSpecPatch + util.ApplyPodSpecPatch: the workflow's podSpecPatch, then the
    template's, each a strategic merge patch applied after all of the above exists. A resource
    template's pod has `main` (argoexec resource) and a `wait` only where logs are archived
    (build: needsAuxCtr = ... || resource && SaveLogsAsArtifact(); IsArchiveLogs: the controller's
    artifact repository `archiveLogs: true` wins over everything), its executor containers locked
    down by Argo when the configmap gives none (newExecContainer: MinimalCtrSC)."""
    executor = executor or {}
    # the fields that make the pod (metrics, outputs and synchronization are the controller's;
    # a resource template's manifest is the executor's)
    tmpl = substitute({k: v for k, v in tmpl.items() if k not in ("metrics", "outputs", "synchronization", "inputs",
                                                                   "resource")}, values) | (
        {"resource": tmpl["resource"]} if "resource" in tmpl else {})
    resource = "resource" in tmpl

    def exec_container(name, cmd):
        c = {"name": name, "image": EXECUTOR_IMAGE, "command": ["argoexec", *cmd],
             "volumeMounts": [{"name": "var-run-argo", "mountPath": "/var/run/argo"}]}
        if name == "wait":
            c["volumeMounts"].append({"name": "tmp-dir-argo", "mountPath": "/tmp"})
        if executor.get("securityContext"):
            c["securityContext"] = copy.deepcopy(executor["securityContext"])
        elif resource:       # newExecContainer: "lock down resource pods by default" (MinimalCtrSC)
            c["securityContext"] = {"capabilities": {"drop": ["ALL"]}, "privileged": False, "runAsNonRoot": True,
                                    "runAsUser": 8737, "allowPrivilegeEscalation": False,
                                    "seccompProfile": {"type": "RuntimeDefault"},
                                    **({} if name == "init" else {"readOnlyRootFilesystem": True})}
        return c

    if resource:   # executeResource: `main` is the executor (argoexec resource <action>)
        containers = [exec_container("wait", ["wait"])] * archive_logs + [
            exec_container("main", ["resource", tmpl["resource"]["action"]])]
    else:
        main = copy.deepcopy(tmpl["container"])
        main["name"] = "main"
        containers = [exec_container("wait", ["wait"]), main]
    spec = {"initContainers": [exec_container("init", ["init"])],
            "containers": containers,
            "volumes": [{"name": "var-run-argo", "emptyDir": {}}, {"name": "tmp-dir-argo", "emptyDir": {}},
                        *copy.deepcopy(tmpl.get("volumes", []))],
            "restartPolicy": "Never", "serviceAccountName": wf_spec.get("serviceAccountName", "default")}
    sc = tmpl.get("securityContext") or wf_spec.get("securityContext")
    if sc:
        spec["securityContext"] = copy.deepcopy(sc)
    for k in ("nodeSelector", "tolerations", "affinity"):
        if tmpl.get(k) or wf_spec.get(k):
            spec[k] = copy.deepcopy(tmpl.get(k) or wf_spec.get(k))
    if tmpl.get("activeDeadlineSeconds"):
        spec["activeDeadlineSeconds"] = int(tmpl["activeDeadlineSeconds"])
    if retry_failed_hosts and tmpl.get("retryStrategy", {}).get("affinity", {}).get("nodeAntiAffinity") is not None:
        spec["affinity"] = add_hostnames_to_affinity(retry_failed_hosts, spec.get("affinity"))
    import yaml

    for patch in (wf_spec.get("podSpecPatch"), tmpl.get("podSpecPatch")):
        if patch:
            spec = strategic_merge(spec, substitute(yaml.safe_load(patch), values), "PodSpec")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "cedm-sweep-x-1", "namespace": "cedm"},
            "spec": spec}


# patchMergeKey of the PodSpec lists our patches touch (k8s.io/api/core/v1 types.go); any other
# list is replaced, as strategic merge does for lists without a merge key
MERGE_KEYS = {("PodSpec", "containers"): ("name", "Container"),
              ("PodSpec", "initContainers"): ("name", "Container"),
              ("PodSpec", "volumes"): ("name", None),
              ("Container", "env"): ("name", None),
              ("Container", "volumeMounts"): ("mountPath", None),
              ("Container", "ports"): ("containerPort", None)}


# The struct a field of a merged map holds, to find the merge keys below it (JobSet's
# JobSetSpec.replicatedJobs: patchMergeKey name, api/jobset/v1alpha2/jobset_types.go; then
# batch/v1 and core/v1 types.go down to the PodSpec)
MERGE_KEYS[("JobSetSpec", "replicatedJobs")] = ("name", "ReplicatedJob")
CHILD_KINDS = {("ReplicatedJob", "template"): "JobTemplateSpec", ("JobTemplateSpec", "spec"): "JobSpec",
               ("JobSpec", "template"): "PodTemplateSpec", ("PodTemplateSpec", "spec"): "PodSpec"}


def strategic_merge(base, patch, kind: str | None = None):
    """k8s.io/apimachinery strategicpatch.StrategicMergePatch for PodSpec (and a JobSetSpec down
    to its pods): maps merge key by key, lists with a patchMergeKey merge element by element on
    that key (an element with `$patch: delete` removes its match, one with no match is appended
    as it is), other lists and scalars are replaced."""
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for k, v in patch.items():
        mk = MERGE_KEYS.get((kind, k))
        if mk and isinstance(v, list):
            key, sub = mk
            merged = copy.deepcopy(out.get(k, []))
            for item in v:
                hit = next((i for i, x in enumerate(merged) if x.get(key) == item.get(key)), None)
                if item.get("$patch") == "delete":       # the delete directive removes the element
                    if hit is not None:
                        del merged[hit]
                elif hit is None:
                    merged.append(copy.deepcopy(item))
                else:
                    merged[hit] = strategic_merge(merged[hit], item, sub)
            out[k] = merged
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = strategic_merge(out[k], v, CHILD_KINDS.get((kind, k)))
        else:
            out[k] = copy.deepcopy(v)
    return out


def add_hostnames_to_affinity(hosts: list[str], affinity: dict | None) -> dict:
    """retry.go AddHostnamesToAffinity: a REQUIRED node affinity `kubernetes.io/hostname NotIn
    <every host an attempt failed on>` (the label from RETRY_HOST_NAME_LABEL_KEY, default
    kubernetes.io/hostname), added to the first term or to an existing NotIn on that key."""
    aff = copy.deepcopy(affinity) or {}
    req = aff.setdefault("nodeAffinity", {}).setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = req.setdefault("nodeSelectorTerms", [])
    rule = {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": list(dict.fromkeys(hosts))}
    if not terms:
        terms.append({"matchExpressions": [rule]})
        return aff
    for term in terms:
        for e in term.get("matchExpressions", []):
            if e["key"] == rule["key"] and e["operator"] == "NotIn":
                e["values"] = list(dict.fromkeys(e["values"] + rule["values"]))
                return aff
    terms[0].setdefault("matchExpressions", []).append(rule)
    return aff


# ----------------------------------------------------------------------------------------------
# Scheduling (kube-scheduler's NodeAffinity filter, which also applies nodeSelector; taints)

def schedulable(pod: dict, node: dict) -> bool:
    spec = pod["spec"]
    labels = node["labels"]
    if any(labels.get(k) != v for k, v in spec.get("nodeSelector", {}).items()):
        return False
    req = spec.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    if req:   # terms are ORed, expressions within a term ANDed
        def ok(e):
            v = labels.get(e["key"])
            return {"In": v in e.get("values", []), "NotIn": v not in e.get("values", []),
                    "Exists": v is not None, "DoesNotExist": v is None}[e["operator"]]
        if not any(all(ok(e) for e in t.get("matchExpressions", [])) for t in req["nodeSelectorTerms"]):
            return False
    for taint in node.get("taints", []):
        if taint["effect"] in ("NoSchedule", "NoExecute") and not any(
                tol.get("key") == taint["key"] and (tol.get("operator") == "Exists" or tol.get("value") == taint.get("value"))
                and tol.get("effect", taint["effect"]) == taint["effect"] for tol in spec.get("tolerations", [])):
            return False
    return True


def first_unschedulable_attempt(wf_spec: dict, tmpl: dict, values: dict, pool: list[dict]) -> int | None:
    """Attempt 0 and each retry (retryStrategy.limit of them), each earlier attempt having failed
    on a node it could run on (the worst case for GetFailHosts: a different one each time). The
    first attempt no node can take (it stays Pending: activeDeadlineSeconds does not count
    Pending time, operator.go checkTemplateTimeouts), or None."""
    limit = int(tmpl.get("retryStrategy", {}).get("limit", 0))
    failed: list[str] = []
    for attempt in range(limit + 1):
        pod = build_pod(wf_spec, tmpl, values, retry_failed_hosts=failed)
        fits = [n for n in pool if schedulable(pod, n)]
        if not fits:
            return attempt
        fresh = [n for n in fits if n["labels"]["kubernetes.io/hostname"] not in failed]
        failed.append((fresh or fits)[0]["labels"]["kubernetes.io/hostname"])
    return None


# ----------------------------------------------------------------------------------------------
# A Pending step's timeouts (operator.go executeTemplate, checkTemplateTimeouts, processNodeRetries)

def _seconds(d: str) -> float:
    """wfv1.ParseStringToDuration for the forms we use (30m, 10m, 1h30m, 90s)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([smh])", d)
    if not parts or "".join(n + u for n, u in parts) != d:
        raise ValueError(f"duration {d!r} is not restated")
    return sum(float(n) * {"s": 1, "m": 60, "h": 3600}[u] for n, u in parts)


def pending_timeout_fires(tmpl: dict, lock_wait: float, pod_pending: float, pod_running: float = 0.0):
    """When (seconds after the step's node was created) checkTemplateTimeouts fails the step on
    its pendingTimeout, or None. It checks the node executeTemplate holds, and only while that node
    is Pending, from the node's StartedAt:
    - without a retryStrategy that is the step's Pod node: created Pending when the step starts
      waiting for a semaphore (initializeExecutableNode ... NodePending, markNodeWaitingForLock),
      else when the pod is created; Pending until the pod runs. The wait for a semaphore counts.
    - with a retryStrategy it is the Retry parent. Created Running when nothing was waited for
      (initializeExecutableNode(..., NodeTypeRetry, ..., NodeRunning)): it is never Pending, so the
      timeout never fires, however long the attempt's pod stays unscheduled (the attempt runs via
      executeContainer, which checks no timeout). When the step first waited for a semaphore, the
      Pending node made for the wait becomes the parent and nothing sets it Running while its
      attempt runs (processNodeRetries): the timeout then fires counted from the start of the wait,
      even during the attempt's run (and it marks the parent only: no pod of its ID exists).
    `lock_wait` is 0 for a template without synchronization."""
    if "pendingTimeout" not in tmpl:
        return None
    limit = _seconds(tmpl["pendingTimeout"])
    waited = bool(tmpl.get("synchronization")) and lock_wait > 0
    if tmpl.get("retryStrategy"):
        pending_for = lock_wait + pod_pending + pod_running if waited else 0.0
    else:
        pending_for = (lock_wait if tmpl.get("synchronization") else 0.0) + pod_pending
    return limit if pending_for > limit else None


# ----------------------------------------------------------------------------------------------
# The API server's pod validation beyond the schema (pkg/apis/core/validation/validation.go)

QUANTITY = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
CPU_DIVISORS = {"1m", "1"}
MEMORY_DIVISORS = {"1", "1k", "1M", "1G", "1T", "1P", "1E", "1Ki", "1Mi", "1Gi", "1Ti", "1Pi", "1Ei"}


def quantity(q) -> float:
    q = str(q)
    if not QUANTITY.match(q):
        raise ValueError(f"quantities must match the regular expression (got {q!r})")
    m = re.match(r"^([+-]?[\d.]+)(.*)$", q)
    num, suf = float(m.group(1)), m.group(2)
    scale = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
             "E": 1e18, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50, "Ei": 2 ** 60}
    return num * (scale[suf] if suf in scale else 10 ** int(suf[1:]))


def pod_errors(pod: dict) -> list[str]:
    """ValidatePodCreate's rules our manifests can break that the OpenAPI schema cannot see:
    container names (DNS-1123 labels, unique across init and app containers, validateContainers),
    env names (validateEnvVarName), resource quantities and requests <= limits, extended resources
    (nvidia.com/gpu) whole and requests == limits (ValidateResourceRequirements), the divisor of a
    resourceFieldRef (validateContainerResourceDivisor: cpu 1m or 1, memory 1 ... 1Ei), volume
    mounts naming a volume (validateVolumeMounts)."""
    errs = []
    spec = pod["spec"]
    vols = {v["name"] for v in spec.get("volumes", [])}
    names = set()
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        w = f"container {c.get('name')!r}"
        if not DNS1123_LABEL.match(c.get("name", "")):
            errs.append(f"{w}: name must be a DNS-1123 label")
        if c.get("name") in names:
            errs.append(f"{w}: Duplicate value")
        names.add(c.get("name"))
        if not c.get("image"):
            errs.append(f"{w}: image: Required value")
        for e in c.get("env", []):
            if not ENV_NAME.match(e["name"]):
                errs.append(f"{w}: env {e['name']!r}: a valid environment variable name")
            ref = e.get("valueFrom", {}).get("resourceFieldRef")
            if ref and "divisor" in ref:
                d = str(ref["divisor"])
                ok = CPU_DIVISORS if ref["resource"].endswith(".cpu") else MEMORY_DIVISORS
                if d not in ok:
                    errs.append(f"{w}: env {e['name']}: divisor {d!r}: only divisor's values "
                                f"{' and '.join(sorted(ok))} are supported with the {ref['resource']} resource")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for r, q in res.get(kind, {}).items():
                try:
                    quantity(q)
                except ValueError as e:
                    errs.append(f"{w}: resources.{kind}.{r}: {e}")
        for r, q in res.get("requests", {}).items():
            lim = res.get("limits", {}).get(r)
            try:
                if lim is not None and quantity(q) > quantity(lim):
                    errs.append(f"{w}: resources.requests.{r}: must be less than or equal to {r} limit")
                if "/" in r and (lim is None or quantity(q) != quantity(lim)):
                    errs.append(f"{w}: resources.requests.{r}: must be equal to {r} limit")
                if "/" in r and quantity(q) != int(quantity(q)):
                    errs.append(f"{w}: resources.requests.{r}: must be an integer")
            except ValueError:
                pass
        for m in c.get("volumeMounts", []):
            if m["name"] not in vols:
                errs.append(f"{w}: volumeMounts {m['name']!r}: Not found")
    if "{{" in json.dumps(pod):
        errs.append("unsubstituted {{...}} in the pod")
    return errs


# ----------------------------------------------------------------------------------------------
# Pod Security Standards, `restricted` (k8s.io/pod-security-admission policy/check_*.go)

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """The `restricted` profile (which includes `baseline`): every container, init containers
    included, must set allowPrivilegeEscalation=false and drop ALL capabilities (adding at most
    NET_BIND_SERVICE); runAsNonRoot true on the pod or on every container and false nowhere;
    runAsUser never 0; seccompProfile RuntimeDefault or Localhost on the pod or every container;
    no privileged, host namespaces, hostPath or other non-listed volume types, host ports."""
    spec = pod["spec"]
    psc = spec.get("securityContext", {})
    out = []
    if any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")):
        out.append("host namespaces")
    for v in spec.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {v['name']}: restricted volume types {sorted(kinds - RESTRICTED_VOLUMES)}")
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser=0")
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        sc = c.get("securityContext") or {}
        n = c["name"]
        if sc.get("privileged"):
            out.append(f"{n}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{n}: allowPrivilegeEscalation != false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            out.append(f"{n}: unrestricted capabilities (must drop ALL)")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{n}: capabilities added {caps['add']}")
        if sc.get("runAsNonRoot") is False or (sc.get("runAsNonRoot") is None and psc.get("runAsNonRoot") is not True):
            out.append(f"{n}: runAsNonRoot != true")
        if sc.get("runAsUser") == 0:
            out.append(f"{n}: runAsUser=0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{n}: seccompProfile must be RuntimeDefault or Localhost")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{n}: hostPort")
    return out


# ----------------------------------------------------------------------------------------------
# A resource template's success and failure conditions (workflow/executor/resource.go)

LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def parse_selector(text: str) -> list[tuple[str, str, str]]:
    """k8s.io/apimachinery labels.Parse for the forms `key == v`, `key = v`, `key != v`, `key > n`,
    `key < n` (comma-separated): each key a qualified name (validateLabelKey: at most 63 of
    [-A-Za-z0-9_.], alphanumeric at both ends, an optional DNS prefix and '/'), each value a
    label value. What WaitResource does with successCondition / failureCondition."""
    reqs = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\S+?)\s*(==|!=|=|>|<)\s*(\S*)\s*", part)
        if not m:
            raise ValueError(f"unable to parse requirement {part.strip()!r}")
        key, op, value = m.groups()
        name = key.rsplit("/", 1)[-1]
        if len(name) > 63 or not LABEL_NAME.match(name):
            raise ValueError(f"invalid label key {key!r}: a qualified name (no gjson predicates)")
        if op in (">", "<") and not re.fullmatch(r"-?\d+", value):
            raise ValueError(f"{key} {op} {value}: for 'Gt', 'Lt' operators, the value must be an integer")
        if len(value) > 63 or not LABEL_VALUE.match(value):
            raise ValueError(f"invalid label value {value!r}")
        reqs.append((key, "==" if op == "=" else op, value))
    return reqs


def gjson_get(obj, path: str):
    """gjson.GetBytes for a plain dotted path (numbers index arrays): (String(), Exists())."""
    for part in path.split("."):
        if isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        elif isinstance(obj, dict) and part in obj:
            obj = obj[part]
        else:
            return "", False
    if isinstance(obj, bool):
        return ("true" if obj else "false"), True
    return (obj if isinstance(obj, str) else json.dumps(obj)), True


def _matches(req, obj) -> bool:
    """labels.Requirement.Matches over gjsonLabels."""
    key, op, value = req
    got, has = gjson_get(obj, key)
    if op == "==":
        return has and got == value
    if op == "!=":
        return not has or got != value
    try:
        n = int(got)
    except ValueError:
        return False
    return has and (n > int(value) if op == ">" else n < int(value))


def resource_state(obj: dict, success: str, failure: str) -> str:
    """matchConditions: any one failure requirement that holds fails the step ('Failed'); all the
    success requirements holding ends it ('Succeeded'); else the executor polls again
    ('waiting')."""
    if any(_matches(r, obj) for r in parse_selector(failure)):
        return FAILED
    if all(_matches(r, obj) for r in parse_selector(success)):
        return SUCCEEDED
    return "waiting"
