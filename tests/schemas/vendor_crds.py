"""Refresh the vendored CRD schemas that tests/test_manifests.py validates argo/ and k8s/ against.

    python3 tests/schemas/vendor_crds.py OWNER/REPO=CHECKOUT [OWNER/REPO=CHECKOUT ...]

e.g. argoproj/argo-workflows=../argo-workflows kubeflow/trainer=../trainer. The files of the
repositories named are rewritten; the others' records in SOURCES.json are kept.
Each checkout is a git clone of the upstream repository; the CRDs are read at the tag in
SOURCES below (`git show TAG:PATH`), never from the work tree. From each CRD this keeps the
served version's `openAPIV3Schema` only, drops the `description` texts (most of the bytes; they
do not validate anything) and writes it as gzipped JSON beside this file. Every other keyword
(types, enums, patterns, x-kubernetes-int-or-string, list types, x-kubernetes-validations CEL
rules, x-kubernetes-preserve-unknown-fields) is kept verbatim. SOURCES.json records the tag,
commit and the sha256 of each upstream file.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
# (repository, tag, path in the repository, output file)
SOURCES = [
    ("argoproj/argo-workflows", "v4.1.2", "manifests/base/crds/full/argoproj.io_workflows.yaml",
     "argoproj.io_workflows.json.gz"),
    ("argoproj/argo-workflows", "v4.1.2", "manifests/base/crds/full/argoproj.io_workflowtemplates.yaml",
     "argoproj.io_workflowtemplates.json.gz"),
    ("prometheus-operator/prometheus-operator", "v0.93.0",
     "example/prometheus-operator-crd-full/monitoring.coreos.com_podmonitors.yaml",
     "monitoring.coreos.com_podmonitors.json.gz"),
    ("prometheus-operator/prometheus-operator", "v0.93.0",
     "example/prometheus-operator-crd-full/monitoring.coreos.com_prometheusrules.yaml",
     "monitoring.coreos.com_prometheusrules.json.gz"),
    # multi-node training: Kubeflow Trainer v2 (README "Past one node") and the JobSet it runs on
    ("kubeflow/trainer", "v2.3.0", "manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml",
     "trainer.kubeflow.org_trainjobs.json.gz"),
    ("kubeflow/trainer", "v2.3.0", "manifests/base/crds/trainer.kubeflow.org_trainingruntimes.yaml",
     "trainer.kubeflow.org_trainingruntimes.json.gz"),
    ("kubernetes-sigs/jobset", "v0.12.0", "config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml",
     "jobset.x-k8s.io_jobsets.json.gz"),
]


def _strip(schema):
    """The schema without its `description` texts (a property named `description` stays)."""
    if isinstance(schema, list):
        return [_strip(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "properties":
            out[k] = {name: _strip(s) for name, s in v.items()}
        elif k != "description":
            out[k] = _strip(v)
    return out


def main(checkouts: dict[str, str]) -> None:
    old = {r["file"]: r for r in json.loads((HERE / "SOURCES.json").read_text())}
    record = []
    for repo, tag, path, out in SOURCES:
        if repo not in checkouts:
            record.append(old[out])
            continue
        git = ["git", "-C", checkouts[repo]]
        commit = subprocess.run([*git, "rev-parse", f"{tag}^{{commit}}"], check=True, capture_output=True,
                                text=True).stdout.strip()
        raw = subprocess.run([*git, "show", f"{tag}:{path}"], check=True, capture_output=True).stdout
        crd = yaml.safe_load(raw)
        version = next(v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage"))
        doc = {"group": crd["spec"]["group"], "kind": crd["spec"]["names"]["kind"], "version": version["name"],
               "openAPIV3Schema": _strip(version["schema"]["openAPIV3Schema"])}
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        (HERE / out).write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
        record.append({"file": out, "repository": repo, "tag": tag, "commit": commit, "path": path,
                       "sha256": hashlib.sha256(raw).hexdigest(), "kind": doc["kind"],
                       "apiVersion": f"{doc['group']}/{doc['version']}"})
    (HERE / "SOURCES.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main(dict(a.split("=", 1) for a in sys.argv[1:]))
