"""docs/runbook.md (and the README's cluster commands) checked where they can be offline: the
kustomizations build, every `argo submit` names the namespace it watches and real parameters with
valid values, the pinned versions are those the manifests are validated against, the runbook's
YAML validates (and passes Pod Security `restricted`), the weights parameters reach the stages'
command lines as the real CLI parses them, and what it names (labels, alerts, panels, lease
settings) exists."""
from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml

import argo_controller as ac
from test_argo_controller import _template, _workflow_values
from test_manifests import (NAMESPACE, RESOURCES, ROOT, SAMPLE_INPUTS, SCHEMAS, SWEEP, WORKFLOW_TEMPLATES, crd_errors,
                            kustomize)

RUNBOOK = (ROOT / "docs" / "runbook.md").read_text()
README = (ROOT / "README.md").read_text()
SWEEP_PARAMS = {p["name"]: p for p in SWEEP["spec"]["arguments"]["parameters"]}


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _commands(text: str) -> list[str]:
    """Command lines of the bash blocks: continuations joined, comments cut."""
    out = []
    for block in _blocks(text, "bash"):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            code = line.split(" #")[0].strip()
            if code and not code.startswith("#"):
                out += [part.strip() for part in code.split("&&")]
    return out


def _watch_namespace(argv: list[str]) -> str | None:
    """cmd/argo/commands/submit.go: the workflow is created in the manifest's namespace, but
    WaitWatchOrLog watches in the CLI's (-n / --namespace, else the kubeconfig's: None here)."""
    for i, a in enumerate(argv):
        if a in ("-n", "--namespace"):
            return argv[i + 1]
        if a.startswith("--namespace="):
            return a.split("=", 1)[1]
    return None


SUBMITS = [c for c in _commands(RUNBOOK) + _commands(README) if c.startswith("argo submit")]


@pytest.mark.parametrize("cmd", SUBMITS)
def test_every_argo_submit_watches_where_it_creates_and_passes_real_parameters(cmd):
    argv = shlex.split(cmd.replace("[", "").replace("]", ""))
    path = next(a for a in argv[2:] if a.endswith(".yaml"))
    wf = yaml.safe_load((ROOT / path).read_text())
    if "--watch" in argv:
        assert _watch_namespace(argv) == wf["metadata"]["namespace"] == NAMESPACE, cmd
    params = {p["name"]: p for p in wf["spec"]["arguments"]["parameters"]}
    for i, a in enumerate(argv):
        if a == "-p":
            name, _, value = argv[i + 1].partition("=")
            assert name in params, f"{cmd}: -p {name} is no parameter of {path}"
            if "enum" in params[name]:
                assert value in params[name]["enum"], f"{cmd}: {name}={value} not in {params[name]['enum']}"
    assert len(SUBMITS) >= 4


def test_every_kustomization_named_builds():
    dirs = [c.split("apply -k", 1)[1].split()[0] for c in _commands(RUNBOOK) + _commands(README)
            if "kubectl apply -k" in c]
    assert {"k8s/", "k8s/multinode", "overlays/cpu"} <= set(dirs)
    for d in dirs:
        assert kustomize(ROOT / d), d


def test_the_pinned_versions_are_the_validated_ones():
    sources = {s["kind"]: s for s in json.loads((SCHEMAS / "SOURCES.json").read_text())}
    argo, trainer, jobset = (sources[k]["tag"] for k in ("Workflow", "TrainJob", "JobSet"))
    operator = sources["PodMonitor"]["tag"]
    assert f"releases/download/{argo}/install.yaml" in RUNBOOK
    assert f"kubeflow-trainer --version {trainer.lstrip('v')}" in RUNBOOK
    for text in (f"Argo Workflows | {argo}", f"Trainer {trainer}, JobSet {jobset}", f"Prometheus Operator {operator}"):
        assert text in RUNBOOK, text
    # the Trainer chart of that version ships that JobSet (charts/kubeflow-trainer/Chart.yaml)
    assert "installs JobSet " + jobset in RUNBOOK
    for cmd in _commands(RUNBOOK):
        if cmd.startswith("helm install"):
            assert "--version" in cmd, f"unpinned: {cmd}"


def test_the_runbooks_yaml_validates():
    docs = [yaml.safe_load(b) for b in _blocks(RUNBOOK, "yaml")]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"PodMonitor", "Pod"}
    assert crd_errors(kinds["PodMonitor"]) == []
    import kubernetes_validate as kv

    pod = kinds["Pod"]
    kv.validate(pod, kv.latest_version(), strict=True)
    assert ac.pod_errors(pod) == [] and ac.restricted_violations(pod) == []
    assert pod["metadata"]["namespace"] == NAMESPACE
    pvc = next(d for _, d in RESOURCES if d["kind"] == "PersistentVolumeClaim")
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    version = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert pod["spec"]["containers"][0]["image"] == f"cedm:{version}"
    # the controller's metrics port, as Argo's own manifests name it
    pm = kinds["PodMonitor"]
    assert pm["spec"]["selector"]["matchLabels"] == {"app": "workflow-controller"}
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# ----------------------------------------------------------------------------------------------
# The weights parameters, from `-p` to the stage's parsed command line

WEIGHTS = {   # sweep parameter -> (the stages' argparse dest, the cedm commands that get it)
    "feature-weights": ("weights", {"features"}),
    "inception-weights": ("inception_weights", {"evaluate", "curve", "ablations"}),
    "dinov2-weights": ("dinov2_weights", {"evaluate", "curve", "ablations"}),
    "clip-weights": ("weights", {"clip-labels"}),
}


def _tasks_using(param: str):
    """(task, template it runs) of every DAG task of the sweep passing workflow.parameters.<param>."""
    for t in SWEEP["spec"]["templates"]:
        for task in t.get("dag", {}).get("tasks", []):
            if f"workflow.parameters.{param}}}" in json.dumps(task.get("arguments", {})):
                ref = task.get("templateRef")
                target = _template(WORKFLOW_TEMPLATES[ref["name"]], ref["template"]) if ref else _template(SWEEP, task["template"])
                yield task, target


@pytest.mark.parametrize("param", WEIGHTS)
def test_a_weights_parameter_reaches_its_stages(param):
    from cedm.cli import build_parser

    dest, commands = WEIGHTS[param]
    assert param in SWEEP_PARAMS and SWEEP_PARAMS[param]["value"] == "" and f"-p {param}=" in RUNBOOK
    path = f"/data/weights/{param}.file"
    vals = _workflow_values(SWEEP, **{param: path})
    vals.update({f"tasks.plan.outputs.parameters.{k}": v for k, v in SAMPLE_INPUTS.items()})
    vals.update({"inputs.parameters.num": "50000", "inputs.parameters.sets": "3", "item": "0"})
    reached = set()
    for task, target in _tasks_using(param):
        args = {a["name"]: ac.VAR.sub(lambda m: vals.get(m.group(1), SAMPLE_INPUTS.get(m.group(1).split(".")[-1], "x")),
                                      a["value"]) for a in task["arguments"]["parameters"]}
        inputs = {f"inputs.parameters.{p['name']}": args.get(p["name"], p.get("value", "1"))
                  for p in target["inputs"]["parameters"]}
        argv = [ac.VAR.sub(lambda m, inputs=inputs: inputs.get(m.group(1), "1"), a) for a in target["container"]["args"]]
        if argv[0] == "launch":
            argv = argv[2:]
        parsed = build_parser().parse_args(argv)
        assert getattr(parsed, dest) == path, (task["name"], argv)
        reached.add(argv[0])
        # left empty, the stage takes its default (the hub cache), not a file named "": None from
        # the parser (pipeline.optional), or an empty value the stage itself reads as none
        # (clip_labels.run, sweep._weight_flags)
        empty = [ac.VAR.sub(lambda m, inputs=inputs: "" if m.group(1).endswith("weights") else
                            inputs.get(m.group(1), "1"), a) for a in target["container"]["args"]]
        got = getattr(build_parser().parse_args(empty[2:] if empty[0] == "launch" else empty), dest)
        assert got is None if argv[0] in ("features", "evaluate", "curve") else got == "", (argv[0], got)
    assert reached == commands


# ----------------------------------------------------------------------------------------------
# What the runbook names exists

def test_the_gpu_product_it_tells_you_to_look_up_is_what_the_pods_select():
    assert "kubectl get nodes -L nvidia.com/gpu.product" in RUNBOOK
    default = SWEEP_PARAMS["gpu-product"]["value"]
    assert f"(default\n`{default}`)" in RUNBOOK or f"`{default}`" in RUNBOOK
    for name, doc in WORKFLOW_TEMPLATES.items():
        for t in doc["spec"]["templates"]:
            if t.get("nodeSelector"):
                assert list(t["nodeSelector"]) == ["nvidia.com/gpu.product"], (name, t["name"])
    assert _template(SWEEP, "placement")["nodeSelector"] == {"nvidia.com/gpu.product": "{{workflow.parameters.gpu-product}}"}


def test_the_alerts_panels_and_settings_it_names_exist():
    rules = next(d for _, d in RESOURCES if d["kind"] == "PrometheusRule")
    alerts = {r["alert"] for g in rules["spec"]["groups"] for r in g["rules"] if "alert" in r}
    named = set(re.findall(r"`(Cedm\w+)`", RUNBOOK))
    assert named and named <= alerts, named - alerts
    dash = json.loads((ROOT / "k8s" / "dashboards" / "cedm.json").read_text())
    titles = set()

    def walk(ps):
        for p in ps:
            titles.add(p.get("title"))
            walk(p.get("panels", []))
    walk(dash["panels"])
    section = RUNBOOK.split("## 12.")[1].split("## One writer")[0]
    quoted = [" ".join(q.split()) for q in re.findall(r'"([^"]+)"', section)]
    assert len(quoted) >= 8
    for q in quoted:
        if q != "cedm sweep":
            assert q in titles, q
    from cedm import lease

    stale, wait, _ = lease.timings()
    assert f"`CEDM_LEASE_STALE` seconds (default {stale:.0f}" in RUNBOOK
    assert f"two beats = {wait:.0f} s" in RUNBOOK
