"""The sweep as Argo's controller and the API server would run it (tests/argo_controller.py
restates their rules from source): which tasks run after a failure and the phase the workflow
ends in, the pods Argo builds (its init/wait containers, podSpecPatch) against the API server's
validation and Pod Security `restricted`, where retries can be scheduled on a one-node and a
four-node pool, and the CPU profile as a whole. Each check is also shown to fail on a mutated
manifest (the mistakes these manifests once had)."""
from __future__ import annotations

import copy
import json
import re

import pytest
import yaml

import argo_controller as ac
from test_manifests import (ARGO_DOCS, CPU, CPU_ERROR, CPU_RESOURCES, NAMESPACE, ROOT, SAMPLE_INPUTS, SWEEP,
                            WORKFLOW_TEMPLATES, _docs)

CPU_SWEEP = _docs(CPU / "sweep.yaml")[0]
CPU_TEMPLATES = {d["metadata"]["name"]: d for _, d in CPU_RESOURCES if d["kind"] == "WorkflowTemplate"}
PROFILES = {"gpu": (SWEEP, WORKFLOW_TEMPLATES), "cpu": (CPU_SWEEP, CPU_TEMPLATES)}
# README's `workflow-controller-configmap` lines (the alternative to the workflow's podSpecPatch)
README_EXECUTOR = {"securityContext": {"runAsNonRoot": True, "runAsUser": 8737, "allowPrivilegeEscalation": False,
                                       "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                                       "seccompProfile": {"type": "RuntimeDefault"}}}


def _template(doc: dict, name: str) -> dict:
    (t,) = [t for t in doc["spec"]["templates"] if t["name"] == name]
    return t


def _resolve(sweep: dict, templates: dict, task: dict) -> dict:
    """The template a DAG task runs: a templateRef, else a template of the document its DAG is in."""
    if "templateRef" in task:
        return _template(templates[task["templateRef"]["name"]], task["templateRef"]["template"])
    (doc,) = [d for d in [sweep, *templates.values()] for t in d["spec"]["templates"]
              if any(x is task for x in t.get("dag", {}).get("tasks", []))]
    return _template(doc, task["template"])


def _workflow_values(sweep: dict, **over) -> dict[str, str]:
    vals = {f"workflow.parameters.{p['name']}": p.get("value", SAMPLE_INPUTS.get(p["name"], ""))
            for p in sweep["spec"]["arguments"]["parameters"]}
    vals.update({"workflow.name": "cedm-sweep-x2k4", "workflow.status": "Failed", "workflow.duration": "812.5",
                 "workflow.failures": "[]"})
    vals.update({f"workflow.parameters.{k}": v for k, v in over.items()})
    return vals


def _values(sweep: dict, t: dict, **over) -> dict[str, str]:
    vals = _workflow_values(sweep)
    for p in t.get("inputs", {}).get("parameters", []):
        vals[f"inputs.parameters.{p['name']}"] = over.get(p["name"], p.get("value", SAMPLE_INPUTS.get(p["name"])))
    return vals


def _pod_templates(sweep: dict, templates: dict):
    """(where, template) of every pod the sweep can create: its own and its WorkflowTemplates'
    (container templates, and resource templates: their pod is Argo's executor)."""
    for doc in [sweep, *templates.values()]:
        for t in doc["spec"]["templates"]:
            if "container" in t or "resource" in t:
                yield f"{doc['metadata'].get('name') or doc['metadata']['generateName']}:{t['name']}", t


# ----------------------------------------------------------------------------------------------
# `argo lint`'s reference rules that the schema cannot see

@pytest.mark.parametrize("profile", PROFILES)
def test_depends_targets_and_when_are_what_argo_accepts(profile):
    sweep, templates = PROFILES[profile]
    params = {k.removeprefix("workflow.parameters."): v for k, v in _workflow_values(sweep).items()}
    dags = 0
    for doc in [sweep, *templates.values()]:
        for t in doc["spec"]["templates"]:
            if "dag" not in t:
                continue
            dags += 1
            tasks = {x["name"]: x for x in t["dag"]["tasks"]}
            for name, task in tasks.items():
                ac.validate_task_results(task.get("depends", ""))
                deps, logic = ac.depends_logic(task, tasks)
                assert deps <= set(tasks), f"{t['name']}/{name}: depends on {deps - set(tasks)}"
                if deps:   # every combination of results evaluates (no unknown names or syntax)
                    ac.eval_depends(logic.replace("-", "_"),
                                    {d.replace("-", "_"): ac.task_results(ac.SUCCEEDED) for d in deps})
                if "when" in task and "{{item}}" not in task["when"]:
                    vals = {**{f"workflow.parameters.{k}": v for k, v in params.items()},
                            **{f"inputs.parameters.{p['name']}": "x" for p in t.get("inputs", {}).get("parameters", [])},
                            **{v: "[]" for v in ac.VAR.findall(task["when"]) if v.startswith("tasks.")}}
                    ac.eval_when(task["when"], vals)
            for target in t["dag"].get("target", "").split():
                assert target in tasks, f"{t['name']}: dag.target {target} is no task"
    assert dags >= 3


def test_a_misspelt_task_result_fails_like_argo_lint():
    with pytest.raises(ValueError, match="task result 'Error' for task 'generate' is invalid"):
        ac.validate_task_results("generate.Succeeded || generate.Error")
    # a bare name is (Succeeded || Skipped || Daemoned), ancestry.go expandDependency
    deps, logic = ac.depends_logic({"depends": "train"}, {"train": {}})
    assert deps == {"train"} and logic == "(train.Succeeded || train.Skipped || train.Daemoned)"


# ----------------------------------------------------------------------------------------------
# What runs after a failure, and the phase the workflow ends in

CONDS = ["uncond", "labels", "temi-C10", "temi-C20"]


def _outcomes(sweep: dict, templates: dict, ends: dict[str, str], conds=CONDS, shards="1"):
    """outcome() for run_dag: tasks end Succeeded unless `ends` says otherwise (keyed by path,
    e.g. 'generate(temi-C20)/train'); fan-outs over the preset's C's and `conds`. The sweep's own
    DAG templates (generate) run task by task; a stage's WorkflowTemplate (data, bound: DAGs of
    their own) is one step here, ending as `ends` says."""
    def outcome(path, task, item):
        if "withSequence" in task and item is None:        # features-shard: 0..count-1
            return list(range(int(ac.VAR.sub(lambda m: shards, task["withSequence"]["count"]))))
        if "withParam" in task and item is None:
            return list(conds) if task["name"] == "generate" else ["10", "20", "40", "80"]
        if "templateRef" not in task and "dag" in (t := _resolve(sweep, templates, task)):
            return t["dag"]
        return ends.get(path, ac.SUCCEEDED)
    return outcome


def _run(sweep, templates, ends=None, conds=CONDS, clip="false", **params):
    values = {k.removeprefix("workflow.parameters."): v for k, v in _workflow_values(sweep, **params).items()}
    scope = {f"workflow.parameters.{k}": v for k, v in values.items()}
    scope["tasks.plan.outputs.parameters.clip-labels"] = clip      # cedm plan: the preset's, or the parameter
    return ac.run_dag(_template(sweep, sweep["spec"]["entrypoint"])["dag"],
                      _outcomes(sweep, templates, ends or {}, conds, values["feature-shards"]), scope)


F, E, S, SK, OM = ac.FAILED, ac.ERROR, ac.SUCCEEDED, ac.SKIPPED, ac.OMITTED
# (what ends how, sweep parameters) -> (workflow phase, report, ablations)
SCENARIOS = {
    "all succeed": ({}, {}, S, S, SK),
    "a conditioning's training fails": ({"generate(temi-C20)/train": F}, {}, F, S, SK),
    "a training pod is rejected (Errored)": ({"generate(labels)/train": E}, {}, E, S, SK),
    "an evaluation fails": ({"generate(uncond)/evaluate": F}, {}, F, S, SK),
    "every conditioning fails": ({f"generate({c})/sample": F for c in CONDS}, {}, F, S, SK),
    "ablations asked for and succeed": ({}, {"ablations": "true"}, S, S, S),
    "ablations fail": ({"ablations": F}, {"ablations": "true"}, F, S, F),
    "ablations after a failed conditioning": ({"generate(uncond)/train": F}, {"ablations": "true"}, F, S, S),
    "a snapshot curve fails": ({"generate(temi-C10)/curve": F}, {"snapshot-every-mimg": "10"}, F, S, SK),
    "a multi-node training fails": ({"generate(temi-C20)/train-nodes": F}, {"nodes": "2"}, F, S, SK),
    "multi-node trainings succeed": ({}, {"nodes": "4"}, S, S, SK),
    "the report itself fails": ({"report": F}, {}, F, F, SK),
    "the bound fails": ({"bound": F}, {}, F, OM, OM),
    "the data stage errors": ({"data": E}, {}, E, OM, OM),
}


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("case", SCENARIOS)
def test_the_report_always_runs_and_a_failure_fails_the_workflow(profile, case):
    sweep, templates = PROFILES[profile]
    ends, params, phase, report, ablations = SCENARIOS[case]
    got, nodes = _run(sweep, templates, ends, **params)
    assert (got, nodes["report"].phase, nodes["ablations"].phase) == (phase, report, ablations), case
    # the other conditionings ran to the end
    failed = {k.split("(")[1].split(")")[0] for k in ends if k.startswith("generate(")}
    if nodes["generate"].children:
        assert sum(p == S for p in nodes["generate"].children) == len(CONDS) - len(failed)


@pytest.mark.parametrize("clip,ends,phase,bound", [("true", {}, S, S), ("false", {}, S, S),
                                                    ("true", {"clip-labels": F}, F, OM)])
def test_clip_labels_run_before_the_bound_when_the_plan_says(clip, ends, phase, bound):
    got, nodes = _run(SWEEP, WORKFLOW_TEMPLATES, ends, clip=clip)
    assert nodes["clip-labels"].phase == (ends.get("clip-labels", S) if clip == "true" else SK)
    assert (got, nodes["bound"].phase) == (phase, bound)


@pytest.mark.parametrize("shards,ends,phase,shard_phases,features", [
    ("1", {}, S, [SK], S), ("4", {}, S, [S] * 4, S),
    ("4", {"features-shard(2)": E}, E, [S, S, E, S], OM)])
def test_feature_shards_fan_out_then_gather(shards, ends, phase, shard_phases, features):
    got, nodes = _run(SWEEP, WORKFLOW_TEMPLATES, ends, **{"feature-shards": shards})
    assert (got, nodes["features-shard"].children, nodes["features"].phase) == (phase, shard_phases, features)


def test_no_conditioning_to_train_still_reports():
    got, nodes = _run(SWEEP, WORKFLOW_TEMPLATES, conds=[])
    assert (got, nodes["generate"].phase, nodes["report"].phase) == (S, SK, S)


def test_fail_fast_waits_for_the_report():
    """Targets that depend on each other (report on generate) with failFast on would end the DAG
    at a failed conditioning before the report starts (assessDAGPhase)."""
    for sweep in (SWEEP, CPU_SWEEP):
        assert not ac.fail_fast_can_lose_a_target(_template(sweep, "sweep")["dag"])
    dag = copy.deepcopy(_template(SWEEP, "sweep")["dag"])
    del dag["failFast"]
    assert ac.fail_fast_can_lose_a_target(dag)


def _mutated(mutate) -> dict:
    sweep = copy.deepcopy(SWEEP)
    mutate(_template(sweep, "sweep")["dag"])
    return sweep


def test_a_lone_leaf_would_end_a_failed_sweep_succeeded():
    """argo-workflows issue 12530: without dag.target the report, the only leaf, decides."""
    sweep = _mutated(lambda dag: dag.pop("target"))
    got, nodes = _run(sweep, WORKFLOW_TEMPLATES, {"generate(temi-C20)/train": F})
    assert (got, nodes["generate"].phase, nodes["report"].phase) == (S, F, S)


def test_without_errored_an_errored_conditioning_would_lose_the_report():
    def drop_errored(dag):
        for t in dag["tasks"]:
            if "depends" in t:
                t["depends"] = re.sub(r"\s*\|\|\s*\w+\.Errored", "", t["depends"])
    got, nodes = _run(_mutated(drop_errored), WORKFLOW_TEMPLATES, {"generate(labels)/train": E})
    assert nodes["report"].phase == OM and got == E


# ----------------------------------------------------------------------------------------------
# The pods Argo builds, as the API server and Pod Security `restricted` see them

def _kv():
    import kubernetes_validate

    return kubernetes_validate


@pytest.mark.parametrize("profile", PROFILES)
def test_every_pod_argo_builds_is_admitted(profile):
    """Built as createWorkflowPod does on a stock install (no executor securityContext in the
    controller's configmap): schema (kubernetes-validate --strict), the API server's own rules,
    and Pod Security `restricted` on init, wait and main."""
    if profile == "cpu":
        assert CPU_ERROR is None, CPU_ERROR
    sweep, templates = PROFILES[profile]
    kv = _kv()
    pods = 0
    for where, t in _pod_templates(sweep, templates):
        for over in ({}, {"gpus": "1"}, {"gpus": "8", "cpu": "96", "memory": "1Ti"}):
            pod = ac.build_pod(sweep["spec"], t, _values(sweep, t, **over))
            assert [c["name"] for c in pod["spec"]["initContainers"]] == ["init"]
            assert [c["name"] for c in pod["spec"]["containers"]] == (["main"] if "resource" in t else ["wait", "main"])
            try:
                kv.validate(pod, kv.latest_version(), strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{where} {over}: {e.message}")
            assert ac.pod_errors(pod) == [], (where, over)
            assert ac.restricted_violations(pod) == [], (where, over)
            pods += 1
    assert pods >= 3 * 14


def test_train_pods_get_their_cpus_and_gpus_from_parameters():
    t = _template(WORKFLOW_TEMPLATES["cedm-train"], "train")
    pod = ac.build_pod(SWEEP["spec"], t, _values(SWEEP, t, gpus="8", cpu="96", memory="1Ti"))
    main = pod["spec"]["containers"][1]
    assert main["resources"]["limits"] == {"cpu": "96", "memory": "1Ti", "nvidia.com/gpu": "8"}
    omp = next(e for e in main["env"] if e["name"] == "OMP_NUM_THREADS")["valueFrom"]["resourceFieldRef"]
    assert omp == {"resource": "limits.cpu", "divisor": "1"}   # cedm launch splits it per process
    assert main["args"][:2] == ["launch", "--nproc-per-node=8"]


def test_a_cpu_divisor_other_than_1_is_rejected():
    """validateContainerResourceDivisor: the old train template (divisor = gpus) made every
    training pod with gpus != 1 fail to create."""
    t = copy.deepcopy(_template(WORKFLOW_TEMPLATES["cedm-train"], "train"))
    t["podSpecPatch"] = t["podSpecPatch"].replace('divisor: "1"', 'divisor: "{{inputs.parameters.gpus}}"')
    for gpus, bad in (("1", False), ("4", True)):
        errs = ac.pod_errors(ac.build_pod(SWEEP["spec"], t, _values(SWEEP, t, gpus=gpus)))
        assert any("divisor '4'" in e for e in errs) == bad, errs


def test_init_and_wait_need_the_pod_spec_patches_or_the_configmap():
    """`init` (every pod has one) is patched by the workflow, `wait` by each container template:
    without either patch Pod Security rejects the pod."""
    t = _template(SWEEP, "plan")
    spec = copy.deepcopy(SWEEP["spec"])
    del spec["podSpecPatch"]
    bare_t = {k: v for k, v in t.items() if k != "podSpecPatch"}
    bad = ac.restricted_violations(ac.build_pod(spec, t, _values(SWEEP, t)))
    assert {v.split(":")[0] for v in bad} == {"init"}, bad
    bad = ac.restricted_violations(ac.build_pod(SWEEP["spec"], bare_t, _values(SWEEP, t)))
    assert {v.split(":")[0] for v in bad} == {"wait"}, bad
    # the README's configmap lines are the other way (an init-less controller needs them)
    assert ac.restricted_violations(ac.build_pod(spec, bare_t, _values(SWEEP, t), executor=README_EXECUTOR)) == []
    readme = (ROOT / "README.md").read_text()
    block = readme.split("executor: |", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == README_EXECUTOR


def test_every_template_carries_the_same_executor_patch():
    """A WorkflowTemplate submitted alone (argo submit --from) gets its own spec's podSpecPatch."""
    for doc in [SWEEP, CPU_SWEEP, *WORKFLOW_TEMPLATES.values()]:
        assert doc["spec"].get("podSpecPatch") == SWEEP["spec"]["podSpecPatch"], doc["metadata"]


# ----------------------------------------------------------------------------------------------
# Where retries can go (retry_tweak.go RetryOnDifferentHost, retry.go AddHostnamesToAffinity)

def _node(name: str, gpu: bool) -> dict:
    labels = {"kubernetes.io/hostname": name}
    if gpu:
        labels["nvidia.com/gpu.product"] = SAMPLE_INPUTS["gpu-product"]
    return {"labels": labels, "taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}] if gpu else []}


POOLS = {"one GPU node": [_node("cpu-0", False), _node("gpu-0", True)],
         "four GPU nodes": [_node("cpu-0", False)] + [_node(f"gpu-{i}", True) for i in range(4)],
         "kind (one node)": [_node("kind-control-plane", False)]}


@pytest.mark.parametrize("pool", ["one GPU node", "four GPU nodes"])
def test_every_retry_can_be_scheduled_on_the_gpu_pool(pool):
    for where, t in _pod_templates(SWEEP, WORKFLOW_TEMPLATES):
        assert ac.first_unschedulable_attempt(SWEEP["spec"], t, _values(SWEEP, t), POOLS[pool]) is None, where


def test_retry_anti_affinity_strands_a_retry_on_a_small_pool():
    t = copy.deepcopy(_template(WORKFLOW_TEMPLATES["cedm-train"], "train"))
    t["retryStrategy"]["affinity"] = {"nodeAntiAffinity": {}}
    vals = _values(SWEEP, t)
    assert ac.first_unschedulable_attempt(SWEEP["spec"], t, vals, POOLS["one GPU node"]) == 1
    assert ac.first_unschedulable_attempt(SWEEP["spec"], t, vals, POOLS["four GPU nodes"]) is None  # 4 attempts
    t["retryStrategy"]["limit"] = "4"
    assert ac.first_unschedulable_attempt(SWEEP["spec"], t, vals, POOLS["four GPU nodes"]) == 4


def test_the_cpu_profile_runs_whole_on_one_node():
    assert CPU_ERROR is None, CPU_ERROR
    pods = 0
    for where, t in _pod_templates(CPU_SWEEP, CPU_TEMPLATES):
        vals = _values(CPU_SWEEP, t)
        assert ac.first_unschedulable_attempt(CPU_SWEEP["spec"], t, vals, POOLS["kind (one node)"]) is None, where
        assert "nvidia.com/gpu" not in json.dumps(ac.build_pod(CPU_SWEEP["spec"], t, vals)), where
        pods += 1
    assert pods >= 14
    # with anti-affinity, as the CPU sweep had before it was generated: the first retry never schedules
    t = copy.deepcopy(_template(CPU_TEMPLATES["cedm-report"], "report"))
    t["retryStrategy"]["affinity"] = {"nodeAntiAffinity": {}}
    assert ac.first_unschedulable_attempt(CPU_SWEEP["spec"], t, _values(CPU_SWEEP, t), POOLS["kind (one node)"]) == 1


def test_the_cpu_sweep_defaults_plan_a_digits_run():
    params = {p["name"]: p.get("value") for p in CPU_SWEEP["spec"]["arguments"]["parameters"]}
    assert params["dataset"] == "digits" and params["gpus"] == "1" and params["gpu-product"] == ""
    version = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert params["image-tag"] == version


# ----------------------------------------------------------------------------------------------
# Deadlines and timeouts (operator.go checkTemplateTimeouts, processNodeRetries)

def _duration(s: str) -> float:
    return sum(float(n) * {"s": 1, "m": 60, "h": 3600}[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", s))


@pytest.mark.parametrize("profile", PROFILES)
def test_pending_timeout_is_set_only_where_argo_applies_it(profile):
    """checkTemplateTimeouts looks at a retried step's Retry node (Running) and a gated step's
    node from the start of its wait for the semaphore (ac.pending_timeout_fires): a pendingTimeout
    belongs only on a pod template with neither, and there it fails an unschedulable pod. Every
    pod's activeDeadlineSeconds runs from the pod's start, image pull included: at least 10 min."""
    sweep, templates = PROFILES[profile]
    bounded = set()
    for where, t in _pod_templates(sweep, templates):
        never = ac.pending_timeout_fires(t, lock_wait=0, pod_pending=float("inf"))
        if "pendingTimeout" in t:
            assert not t.get("retryStrategy") and not t.get("synchronization") and "timeout" not in t, where
            assert never is not None and 0 < never <= 1800, where       # an unschedulable pod fails
            assert ac.pending_timeout_fires(t, 0, pod_pending=120, pod_running=86400) is None, where  # a slow pull
            bounded.add(t["name"])
        assert int(t["activeDeadlineSeconds"]) >= 600, where
    assert {"plan", "placement", "sweep-exit", "trainjobs-delete"} <= bounded


def test_a_pending_timeout_on_a_retried_or_gated_step_would_not_bound_it():
    """What the sweep had: pendingTimeout beside a retryStrategy never fired (the unschedulable
    pod waited for the workflow's 14-day deadline); on a GPU stage it would count the queue for
    the GPU budget and fail a training that was already running."""
    plan = copy.deepcopy(_template(SWEEP, "plan"))
    plan["retryStrategy"] = {"limit": "1", "retryPolicy": "Always"}
    assert ac.pending_timeout_fires(plan, lock_wait=0, pod_pending=float("inf")) is None
    train = copy.deepcopy(_template(WORKFLOW_TEMPLATES["cedm-train"], "train"))
    train["pendingTimeout"] = "30m"
    assert ac.pending_timeout_fires(train, lock_wait=0, pod_pending=float("inf")) is None
    assert ac.pending_timeout_fires(train, lock_wait=1200, pod_pending=60, pod_running=3600) == 1800
    del train["retryStrategy"]
    assert ac.pending_timeout_fires(train, lock_wait=3600, pod_pending=60) == 1800          # a queued one


@pytest.mark.parametrize("profile,pool,fails", [("gpu", "four GPU nodes", False), ("gpu", "kind (one node)", True),
                                                ("cpu", "kind (one node)", False), ("cpu", "small node", True)])
def test_the_placement_probe_fails_within_its_pending_timeout_where_nothing_fits(profile, pool, fails):
    """The sweep's first placement check: where no node carries the GPU pool's label (or, in the
    CPU profile, no node is as big as the profile's biggest pod) it stays unscheduled and Argo
    fails it after pendingTimeout (30 min); data, and so every GPU stage, waits for it."""
    sweep, templates = PROFILES[profile]
    t = _template(sweep, "placement")
    pod = ac.build_pod(sweep["spec"], t, _values(sweep, t))
    nodes = POOLS.get(pool) or [{"labels": {"kubernetes.io/hostname": "small"}, "taints": [],
                                 "allocatable": {"cpu": "250m", "memory": "512Mi"}}]
    placed = any(ac.schedulable(pod, n) and _fits(pod, n) for n in nodes)
    assert placed == (not fails)
    at = ac.pending_timeout_fires(t, 0, pod_pending=float("inf") if fails else 30)
    assert at == (1800 if fails else None)
    tasks = {x["name"]: x for x in _template(sweep, "sweep")["dag"]["tasks"]}
    assert "placement" in ac.depends_logic(tasks["data"], tasks)[0]
    if profile == "cpu":   # it asks for what the profile's biggest pod asks for
        biggest = max((ac.quantity(c["resources"]["requests"]["cpu"]), ac.quantity(c["resources"]["requests"]["memory"]))
                      for _, x in _pod_templates(sweep, templates) if "container" in x
                      for c in [ac.build_pod(sweep["spec"], x, _values(sweep, x))["spec"]["containers"][-1]])
        req = pod["spec"]["containers"][-1]["resources"]["requests"]
        assert (ac.quantity(req["cpu"]), ac.quantity(req["memory"])) == biggest


def _fits(pod: dict, node: dict) -> bool:
    """kube-scheduler's NodeResourcesFit filter on an empty node: requests <= allocatable."""
    alloc = node.get("allocatable")
    if not alloc:
        return True
    req = {}
    for c in pod["spec"]["containers"]:
        for r, q in c.get("resources", {}).get("requests", {}).items():
            req[r] = req.get(r, 0) + ac.quantity(q)
    return all(v <= ac.quantity(alloc.get(r, 0)) for r, v in req.items())


def test_a_user_error_fails_within_two_minutes():
    """processNodeRetries waits out retryStrategy.backoff before it evaluates the expression, so
    an exit code 2 (never retried) is reported only after the first backoff."""
    for where, t in _pod_templates(SWEEP, WORKFLOW_TEMPLATES):
        backoff = t.get("retryStrategy", {}).get("backoff")
        assert backoff is None or _duration(backoff["duration"]) <= 120, where


# ----------------------------------------------------------------------------------------------
# Submission and monitoring

def _submit_namespace(wf: dict, cli_namespace: str) -> str:
    """cmd/argo/commands/submit.go submitWorkflows: the manifest's namespace, else -n / the
    kubeconfig's; templateRefs resolve in the workflow's namespace."""
    return wf["metadata"].get("namespace") or cli_namespace


def test_argo_submit_without_n_finds_the_templates():
    kust = yaml.safe_load((ROOT / "argo" / "kustomization.yaml").read_text())
    assert kust["namespace"] == NAMESPACE
    for sweep in (SWEEP, CPU_SWEEP):
        assert _submit_namespace(sweep, "default") == NAMESPACE
    bare = copy.deepcopy(SWEEP)
    del bare["metadata"]["namespace"]
    assert _submit_namespace(bare, "default") != NAMESPACE


def test_dashboard_legends_name_only_labels_the_query_keeps():
    """PromQL `sum by (a, b)` keeps only a and b: a legend {{x}} of another label is empty."""
    dash = json.loads((ROOT / "k8s" / "dashboards" / "cedm.json").read_text())

    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))
    checked = 0
    for p in panels(dash["panels"]):
        for t in p.get("targets", []):
            bys = re.findall(r"\bby \(([^)]*)\)", t.get("expr", ""))
            if not bys or not t.get("legendFormat"):
                continue
            kept = set.intersection(*({x.strip() for x in b.split(",")} for b in bys))
            used = set(re.findall(r"{{\s*(\w+)\s*}}", t["legendFormat"]))
            assert used <= kept, f"{p['title']}: legend {t['legendFormat']} but by ({', '.join(sorted(kept))})"
            checked += 1
    assert checked >= 10


def test_argo_docs_are_one_per_file():
    for name, doc in ARGO_DOCS.items():
        assert doc["kind"] in ("Workflow", "WorkflowTemplate"), name
