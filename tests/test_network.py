"""k8s/networkpolicy.yaml, evaluated pod to pod (tests/netpol.py restates NetworkPolicy
semantics): the nodes of one TrainJob reach each other (torchrun's rendezvous on 29500, NCCL on
ports the OS picks), and nothing new besides: other namespaces, the stage pods and Prometheus
are denied what they were denied before. The TrainJob's pods are built as JobSet and the Job
controller make them (tests/admission.py)."""
from __future__ import annotations

import copy

import pytest

import admission as adm
import netpol
from test_manifests import RESOURCES, SWEEP, WORKFLOW_TEMPLATES
from test_multinode import RUNTIME, _admitted_trainjob

POLICIES = [d for _, d in RESOURCES if d["kind"] == "NetworkPolicy"]
NS = "cedm"
NAMESPACES = {"monitoring": {}, "team-b": {}, NS: {}}


def _node_pods(nodes: str = "2", **over) -> list[netpol.Pod]:
    js, _ = adm.admit_jobset(adm.build_jobset(_admitted_trainjob(nodes=nodes, **over), RUNTIME))
    out = []
    for p in adm.node_pods(js):
        ports = [(pt.get("name", ""), pt["containerPort"], pt.get("protocol", "TCP"))
                 for c in p["spec"]["containers"] for pt in c.get("ports", [])]
        out.append(netpol.Pod.of(p["metadata"]["namespace"], p["metadata"]["labels"], ports))
    return out


def _stage_pod(template: str, name: str) -> netpol.Pod:
    t = next(t for t in WORKFLOW_TEMPLATES[template]["spec"]["templates"] if t["name"] == name)
    labels = {**SWEEP["spec"]["podMetadata"]["labels"], **t.get("metadata", {}).get("labels", {}),
              "workflows.argoproj.io/workflow": "cedm-sweep-x2k4"}
    return netpol.Pod.of(NS, labels, [(p["name"], p["containerPort"], "TCP") for p in t["container"].get("ports", [])])


PROMETHEUS = netpol.Pod.of("monitoring", {"app.kubernetes.io/name": "prometheus"})
OTHER = netpol.Pod.of("team-b", {"cedm.io/stage": "train", "jobset.sigs.k8s.io/jobset-name": "x"})
PUSHGATEWAY = netpol.Pod.of(NS, {"app.kubernetes.io/name": "cedm-pushgateway", "app.kubernetes.io/part-of": "cedm"},
                            [("metrics", 9091, "TCP")])


def _allowed(src, dst, port, protocol="TCP", policies=None):
    return netpol.allowed(POLICIES if policies is None else policies, src, dst, port, protocol, NAMESPACES)


@pytest.mark.parametrize("nodes", ["2", "4"])
def test_the_nodes_of_a_trainjob_reach_each_other(nodes):
    pods = _node_pods(nodes)
    for a in pods:
        for b in pods:
            if a is not b:
                assert _allowed(a, b, 29500)                     # rendezvous: PET_MASTER_PORT
                assert _allowed(a, b, 45123)                     # NCCL/Gloo: a port the OS picked
                assert not _allowed(a, b, 45123, "UDP")          # nothing but TCP
    # without the new policy, default deny: node 1 could not reach node 0's rendezvous
    without = [p for p in POLICIES if p["metadata"]["name"] != "cedm-allow-trainjob-peers"]
    assert not _allowed(pods[1], pods[0], 29500, policies=without)


def test_nothing_else_is_opened():
    node0 = _node_pods("2")[0]
    sample = _stage_pod("cedm-sample", "sample")
    train = _stage_pod("cedm-train", "train")                    # Argo's one-pod training: no JobSet label
    for src in (OTHER, PROMETHEUS, sample, train):
        assert not _allowed(src, node0, 29500), src              # other namespaces, stage pods, Prometheus
    assert not _allowed(node0, sample, 45123) and not _allowed(node0, train, 29500)
    assert not _allowed(OTHER, PUSHGATEWAY, 9091)                # another namespace cannot push
    # what was allowed still is: Prometheus scrapes the node's metrics port, the nodes push
    assert _allowed(PROMETHEUS, node0, 9310) and _allowed(node0, PUSHGATEWAY, 9091)
    assert _allowed(sample, PUSHGATEWAY, 9091)


def test_the_evaluator_reads_policies_as_kubernetes_does():
    """An empty podSelector selects every pod; a peer without namespaceSelector is the policy's
    namespace only; a named port is the destination's container port of that name."""
    deny = next(p for p in POLICIES if p["metadata"]["name"] == "cedm-default-deny-ingress")
    assert netpol.selects(deny["spec"]["podSelector"], {"any": "thing"})
    node0 = _node_pods("2")[0]
    assert netpol.allowed([], OTHER, node0, 29500)               # no policy: not isolated
    scrape = next(p for p in POLICIES if p["metadata"]["name"] == "cedm-allow-prometheus-scrape")
    assert scrape["spec"]["ingress"][0]["ports"][0]["port"] == "metrics"
    assert _allowed(PROMETHEUS, node0, 9310) and not _allowed(PROMETHEUS, node0, 9311)
    peers = next(p for p in POLICIES if p["metadata"]["name"] == "cedm-allow-trainjob-peers")
    moved = copy.deepcopy(peers)
    moved["metadata"]["namespace"] = "team-b"
    assert not _allowed(_node_pods("2")[1], node0, 29500, policies=[deny, moved])
