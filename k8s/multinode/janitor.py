"""Delete the TrainJobs whose Argo workflow is over (the CronJob in janitor.yaml runs this).

A sweep's multi-node trainings are deleted by each training's exit hook and by the sweep's exit
handler (argo/train.yaml, argo/sweep.yaml). `argo terminate` runs neither (Argo's
ShutdownStrategy.ShouldExecute: Terminate executes no pod, exit handlers included), and a
TrainJob would keep its GPUs until its own deadline. This catches it, and any other leak: every
cedm TrainJob names its workflow (label cedm.io/workflow); one whose workflow is gone, or
completed (label workflows.argoproj.io/completed=true, set by the controller once the workflow and
its exit handler have ended), is deleted in the foreground (its JobSet, Jobs and pods first).

Python's standard library only, with the pod's service account: in the cluster,
https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT with the account's token and CA
(CEDM_K8S_API and CEDM_K8S_SA_DIR point it elsewhere, for tests). One line per deletion; exit 1
on any API error other than 404, so a failing run shows as a failed Job.
"""
from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

TRAINJOBS = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs"
WORKFLOW = "/apis/argoproj.io/v1alpha1/namespaces/{ns}/workflows/{name}"
SELECTOR = "app.kubernetes.io/part-of=cedm,cedm.io/workflow"


class Api:
    def __init__(self) -> None:
        sa = os.environ.get("CEDM_K8S_SA_DIR", "/var/run/secrets/kubernetes.io/serviceaccount")
        self.base = os.environ.get("CEDM_K8S_API") or (
            f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}")
        with open(os.path.join(sa, "token")) as f:
            self.token = f.read().strip()
        with open(os.path.join(sa, "namespace")) as f:
            self.namespace = f.read().strip()
        ca = os.path.join(sa, "ca.crt")
        self.ssl = ssl.create_default_context(cafile=ca) if self.base.startswith("https") else None

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(self.base + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, context=self.ssl, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return 404, {}
            raise SystemExit(f"janitor: {method} {path}: HTTP {e.code}: "
                             f"{e.read()[:300].decode(errors='replace')}") from None
        except urllib.error.URLError as e:
            raise SystemExit(f"janitor: {method} {path}: {e.reason}") from None


def main() -> int:
    api = Api()
    ns = api.namespace
    _, listed = api.call("GET", TRAINJOBS.format(ns=ns) + "?labelSelector=" + urllib.parse.quote(SELECTOR))
    deleted = 0
    for tj in listed.get("items", []):
        name = tj["metadata"]["name"]
        workflow = tj["metadata"]["labels"]["cedm.io/workflow"]
        status, wf = api.call("GET", WORKFLOW.format(ns=ns, name=workflow))
        if status == 404:
            why = "is gone"
        elif wf.get("metadata", {}).get("labels", {}).get("workflows.argoproj.io/completed") == "true":
            why = "has ended (" + wf.get("status", {}).get("phase", "?") + ")"
        else:
            continue
        api.call("DELETE", TRAINJOBS.format(ns=ns) + "/" + name, {"propagationPolicy": "Foreground"})
        print(f"janitor: deleted TrainJob {name}: its workflow {workflow} {why}", flush=True)
        deleted += 1
    print(f"janitor: {len(listed.get('items', []))} cedm TrainJob(s), {deleted} deleted", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
