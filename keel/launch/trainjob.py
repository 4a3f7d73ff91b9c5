"""`keel launch --target trainjob`: a recipe as a Kubeflow Trainer v2 TrainJob
(trainer.kubeflow.org/v1alpha1) on a torch runtime, plus the recipe's ConfigMap.

The runtime (a ClusterTrainingRuntime, `torch-distributed` by default) owns the pod template and
starts torchrun's environment; the TrainJob names the image, nodes, processes and resources per
node, and patches the runtime's pods with what Keel needs: the recipe, the shared volume as the
working directory, /dev/shm, and Secrets mounted as files. The training image's entrypoint
(keel/launch/pod_entrypoint.py) maps the injected PET_* variables to torchrun, prepares the data
first (KEEL_PREPARE=1: there is no init container to patch in) and exports the mounted Secrets'
keys as environment variables, so Secrets are referenced, never written into the manifest.
"""

from __future__ import annotations

from pathlib import Path

from keel.launch.job import efa_env, nccl_env, resolve_launch
from keel.launch.k8s_objects import IMAGE_UID, check_object_name, metadata
from keel.launch.pytorchjob import (RECIPE_DIR, RECIPE_KEY, check_k8s_options, cluster_overrides, recipe_configmap,
                                    shared_volume_claim)

API_VERSION = "trainer.kubeflow.org/v1alpha1"
DEFAULT_RUNTIME = "torch-distributed"
# The torch runtimes Kubeflow Trainer ships name their one replicated job, and its container, "node".
NODE = "node"
SECRETS_DIR = "/var/run/keel/secrets"  # not under the read-only recipe mount (/etc/keel)
PATCH_MANAGER = "keel.dev/launch"


def node_pod_patch(*, name: str, mount: str, claim: str | None, shm_size: str, secrets: list[str]) -> dict:
    """The runtime patch: volumes and mounts of the training pods, and their user."""
    mounts = [{"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True},
              {"name": "shared", "mountPath": mount}, {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes = [{"name": "recipe", "configMap": {"name": f"{name}-recipe"}},
               {"name": "shared", **({"persistentVolumeClaim": {"claimName": claim}} if claim else {"emptyDir": {}})},
               {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}}]
    for i, secret in enumerate(secrets):
        volumes.append({"name": f"secret-{i}", "secret": {"secretName": secret}})
        mounts.append({"name": f"secret-{i}", "mountPath": f"{SECRETS_DIR}/{secret}", "readOnly": True})
    pod = {"securityContext": {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID,
                               "fsGroup": IMAGE_UID},
           "containers": [{"name": NODE, "volumeMounts": mounts}], "volumes": volumes}
    job = {"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}
    return {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [job]}}}}


def trainjob(*, name: str, namespace: str | None, image: str, args: list[str], runtime: str, nodes: int,
             processes_per_node: int, gpus_per_node: int, efa: int, env: dict[str, str], patch: dict,
             queue: str | None) -> dict:
    limits = {}
    if gpus_per_node:
        limits["nvidia.com/gpu"] = str(gpus_per_node)
    if efa:
        limits["vpc.amazonaws.com/efa"] = str(efa)
    trainer: dict = {"image": image, "args": args, "numNodes": nodes, "numProcPerNode": processes_per_node,
                     "env": [{"name": k, "value": v} for k, v in env.items()]}
    if limits:
        trainer["resourcesPerNode"] = {"limits": limits}
    extra = {"kueue.x-k8s.io/queue-name": queue} if queue else None
    return {"apiVersion": API_VERSION, "kind": "TrainJob",
            "metadata": metadata(name, namespace, instance=name, component="training", extra=extra),
            "spec": {"runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                    "name": runtime},
                     "trainer": trainer, "runtimePatches": [patch]}}


def trainjob_manifests(*, recipe_path: str | Path, overrides: list[str], image: str | None, nodes: int | None = None,
                       gpus_per_node: int | None = None, name: str | None = None, namespace: str | None = None,
                       volume: str | None = None, volume_size: str | None = None, storage_class: str | None = None,
                       queue: str | None = None, efa: int | None = None, max_restarts: int = 3,
                       shm_size: str = "16Gi", mlflow_uri: str | None = None, secrets=(),
                       runtime: str | None = None) -> list[dict]:
    """[PersistentVolumeClaim,] ConfigMap, TrainJob."""
    runtime = check_object_name(runtime or DEFAULT_RUNTIME, "--runtime")
    shared, name = check_k8s_options(recipe_path=recipe_path, image=image, name=name, namespace=namespace,
                                     volume=volume, volume_size=volume_size, storage_class=storage_class, queue=queue,
                                     priority_class=None, shm_size=shm_size, max_restarts=max_restarts,
                                     secrets=secrets, nodes=nodes)
    launch = resolve_launch(recipe_path=recipe_path, overrides=overrides, name=name,
                            path_overrides=cluster_overrides(name=name, mount=shared.mount), nodes=nodes,
                            gpus_per_node=gpus_per_node, efa=efa, mlflow_uri=mlflow_uri)
    topo = launch.topology
    env = {"KEEL_CACHE": f"{shared.mount}/cache", "HF_HOME": f"{shared.mount}/cache/huggingface",
           "KEEL_PREPARE": "1", "KEEL_WORKDIR": shared.mount, "PET_MAX_RESTARTS": str(max_restarts),
           **nccl_env(topo), **efa_env(topo.efa)}
    if secrets:
        env["KEEL_SECRET_DIRS"] = ":".join(f"{SECRETS_DIR}/{s}" for s in secrets)
    if mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    docs = []
    if volume_size:
        docs.append(shared_volume_claim(claim=shared.claim, namespace=namespace, size=volume_size,
                                        storage_class=storage_class))
    docs.append(recipe_configmap(name=name, namespace=namespace, recipe_text=launch.recipe_text))
    patch = node_pod_patch(name=name, mount=shared.mount, claim=shared.claim, shm_size=shm_size, secrets=list(secrets))
    docs.append(trainjob(name=name, namespace=namespace, image=image, args=[f"{RECIPE_DIR}/{RECIPE_KEY}", *launch.args],
                         runtime=runtime, nodes=topo.nodes, processes_per_node=topo.processes_per_node,
                         gpus_per_node=topo.gpus_per_node, efa=topo.efa, env=env, patch=patch, queue=queue))
    return docs
