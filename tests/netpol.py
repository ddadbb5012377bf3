"""Which connections NetworkPolicies allow, for the tests (test_network.py): the semantics of
`networking.k8s.io/v1` (k8s.io/api networking/v1 types.go) as the upstream policy simulator
states them, kubernetes-sigs/network-policy-api `cmd/policy-assistant/pkg/matcher`:
builder.go (BuildTarget: a policy with Ingress in policyTypes selects pods of its own namespace
by podSelector, and its ingress rules are the peers; no rules = nothing allowed;
BuildPeerMatcher: no ports and no peers = everything, no peers = every source on the ports;
BuildIPBlockNamespacePodMatcher: a peer's podSelector without namespaceSelector means the
policy's namespace, an empty selector all; BuildSinglePortMatcher: protocol TCP by default,
port + endPort a range), portmatcher.go (isPortMatch: a number, or a name matched against the
destination pod's container port names), policy.go (a pod selected by no ingress policy takes
everything; one selected by any takes what any of them allows). Only ingress: our policies
isolate nothing for egress. Only what our policies use is restated.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: tuple            # ((key, value), ...)
    ports: tuple = ()        # ((name, number, protocol), ...) of its containers

    @staticmethod
    def of(namespace: str, labels: dict, ports=()) -> "Pod":
        return Pod(namespace, tuple(sorted(labels.items())), tuple(ports))


def selects(selector: dict | None, labels: dict) -> bool:
    """metav1.LabelSelector: matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist)
    ANDed; an empty selector selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        op, key, values = e["operator"], e["key"], e.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict, policy_ns: str, src: Pod, namespaces: dict[str, dict]) -> bool:
    if "ipBlock" in peer:
        raise NotImplementedError("ipBlock peers are not restated")
    pod_ok = selects(peer.get("podSelector"), dict(src.labels))
    if "namespaceSelector" not in peer:
        return src.namespace == policy_ns and pod_ok
    return selects(peer["namespaceSelector"], namespaces.get(src.namespace, {})) and pod_ok


def _port_matches(rule_ports: list[dict], dst: Pod, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    names = {n for n, p, proto in dst.ports if p == port and proto == protocol}
    for rp in rule_ports:
        if rp.get("protocol", "TCP") != protocol:
            continue
        want = rp.get("port")
        if want is None:
            return True
        if isinstance(want, int):
            if want == port or (rp.get("endPort") is not None and want <= port <= rp["endPort"]):
                return True
        elif want in names:
            return True
    return False


def allowed(policies: list[dict], src: Pod, dst: Pod, port: int, protocol: str = "TCP",
            namespaces: dict[str, dict] | None = None) -> bool:
    """Whether `src` may open a connection to `dst` on `port`. `namespaces` maps a namespace to
    its labels (the API server adds kubernetes.io/metadata.name to every namespace)."""
    namespaces = {ns: {"kubernetes.io/metadata.name": ns, **labels} for ns, labels in (namespaces or {}).items()}
    for ns in (src.namespace, dst.namespace):
        namespaces.setdefault(ns, {"kubernetes.io/metadata.name": ns})
    selecting = [p for p in policies
                 if p["metadata"]["namespace"] == dst.namespace and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and selects(p["spec"]["podSelector"], dict(dst.labels))]
    if not selecting:
        return True                                   # not isolated for ingress
    for p in selecting:
        for rule in p["spec"].get("ingress", []):
            peers = rule.get("from", [])
            if (not peers or any(_peer_matches(peer, p["metadata"]["namespace"], src, namespaces) for peer in peers)) \
                    and _port_matches(rule.get("ports", []), dst, port, protocol):
                return True
    return False
