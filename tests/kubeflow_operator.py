"""What the Kubeflow training-operator (release-1.9) does with a PyTorchJob, for tests.

Three things a schema check cannot tell: the admission webhook's rules
(pkg/webhooks/pytorch/pytorchjob_webhook.go), the defaults it fills in
(pkg/apis/kubeflow.org/v1/pytorch_defaults.go), and the environment each pod's containers get
(pkg/controller.v1/pytorch/envvar.go, master.go, elastic.go). Written from reading those
files.
"""

from __future__ import annotations

import re

CONTAINER = "pytorch"
PORT_NAME = "pytorchjob-port"
DEFAULT_PORT = 23456
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def webhook_problems(job: dict) -> list[str]:
    """The admission webhook's errors for a PyTorchJob (empty: it would be admitted)."""
    problems = []
    name = job.get("metadata", {}).get("name", "")
    if not _DNS_1035.match(name) or len(name) > 63:
        problems.append(f"metadata.name {name!r} is not a DNS-1035 label")
    spec = job.get("spec", {})
    replicas = spec.get("pytorchReplicaSpecs")
    if not replicas:
        return problems + ["spec.pytorchReplicaSpecs: required"]
    if "elasticPolicy" in spec:
        if "Worker" not in replicas:
            problems.append("spec.pytorchReplicaSpecs[Worker]: must be configured if elastic policy is used")
        if "nProcPerNode" in spec["elasticPolicy"] and "nprocPerNode" in spec:
            problems.append("spec.elasticPolicy.nProcPerNode: must not be used with spec.nprocPerNode")
    for rtype, rspec in replicas.items():
        if rtype not in ("Master", "Worker"):
            problems.append(f"spec.pytorchReplicaSpecs[{rtype}]: not a supported replica type")
        containers = (rspec or {}).get("template", {}).get("spec", {}).get("containers") or []
        if not containers:
            problems.append(f"{rtype}: containers must be specified")
        if any(not c.get("image") for c in containers):
            problems.append(f"{rtype}: every container needs an image")
        if not any(c.get("name") == CONTAINER for c in containers):
            problems.append(f"{rtype}: must have at least one container with name {CONTAINER}")
        count = (rspec or {}).get("replicas")
        if rtype == "Master" and count != 1:
            problems.append("Master: replicas must be 1")
        if rtype == "Worker" and count is not None and count < 1:
            problems.append("Worker: replicas must be at least 1")
    return problems


def _port(job: dict, rtype: str) -> int:
    for c in job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]["containers"]:
        if c["name"] == CONTAINER:
            for p in c.get("ports", []):
                if p.get("name") == PORT_NAME:
                    return p["containerPort"]
    return DEFAULT_PORT  # the defaulting webhook adds this port when it is missing


def pod_env(job: dict, rtype: str, index: int) -> dict[str, str]:
    """The variables the operator adds to the containers of pod `rtype`-`index`."""
    spec = job["spec"]
    name = job["metadata"]["name"]
    replicas = spec["pytorchReplicaSpecs"]
    nproc = spec.get("nprocPerNode", "auto")
    total = sum(r.get("replicas", 1) for r in replicas.values())
    env = {"PYTHONUNBUFFERED": "1"}
    if "Master" in replicas:
        port = str(_port(job, "Master"))
        rank = index + 1 if rtype == "Worker" else index
        env.update(MASTER_PORT=port, PET_MASTER_PORT=port, MASTER_ADDR=f"{name}-master-0",
                   PET_MASTER_ADDR=f"{name}-master-0",
                   WORLD_SIZE=str(total * (int(nproc) if nproc.isdigit() else 1)), RANK=str(rank),
                   PET_NODE_RANK=str(rank))
    env["PET_NPROC_PER_NODE"] = nproc
    elastic = spec.get("elasticPolicy")
    if elastic is None:
        env["PET_NNODES"] = str(total)
        return env
    host = elastic.get("rdzvHost", f"{name}-worker-0")
    env["PET_RDZV_ENDPOINT"] = f"{host}:{elastic.get('rdzvPort', _port(job, 'Worker'))}"
    env["PET_RDZV_BACKEND"] = elastic.get("rdzvBackend", "c10d")
    lo, hi = elastic.get("minReplicas"), elastic.get("maxReplicas")
    if lo is None and hi is None:
        env["PET_NNODES"] = str(replicas["Worker"]["replicas"])
    else:
        env["PET_NNODES"] = f"{lo if lo is not None else hi}:{hi if hi is not None else lo}"
    if "maxRestarts" in elastic:
        env["PET_MAX_RESTARTS"] = str(elastic["maxRestarts"])
    if "rdzvId" in elastic:
        env["PET_RDZV_ID"] = elastic["rdzvId"]
    if elastic.get("rdzvConf"):
        env["PET_RDZV_CONF"] = ",".join(f"{kv['key']}={kv['value']}" for kv in elastic["rdzvConf"])
    return env
