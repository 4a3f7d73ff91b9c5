"""`keel launch`: a recipe as a Kubeflow PyTorchJob (kubeflow.org/v1), plus the objects it needs.

One Master and N-1 Workers run the training image, whose entrypoint maps the operator's
environment to torchrun (keel/launch/pod_entrypoint.py). The recipe travels as a ConfigMap, as
written; cluster paths are `key=value` overrides on the command line, so one recipe file runs
locally and on the cluster:

    output.dir     = MOUNT/runs/NAME        checkpoints and the exported model, on the shared volume
    data.cache_dir = MOUNT/cache/prepared   prepared data, built once and shared by every pod

Each pod's working directory is the shared volume, so relative paths in the recipe (model.path,
data.train) are read from there. A restarted pod, or a worker group torchrun restarts, resumes
from the newest checkpoint under output.dir (trainer/train.py). Secrets are only referenced
(`envFrom` a Secret), never written into a manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data.errors import KeelError
from data.options import check_count, check_namespace
from keel.launch.job import check_cluster_flags, efa_env, resolve_launch, shared_paths
from keel.launch.k8s_objects import (IMAGE_UID, check_image, check_name, check_object_name, check_quantity,
                                  is_object_name, labels, metadata, name_from)

API_VERSION = "kubeflow.org/v1"
CONTAINER_NAME = "pytorch"  # the operator finds the training container by this name (webhook rule)
PORT_NAME = "pytorchjob-port"  # the operator reads MASTER_PORT / the rendezvous port from this port
PORT = 23456
RECIPE_DIR = "/etc/keel"
RECIPE_KEY = "recipe.yaml"
DEFAULT_MOUNT = "/mnt/shared"
# Nodes of a big job pull a large image at different speeds; c10d's default join timeout
# (600 s) can expire before the last pod has started.
RDZV_JOIN_TIMEOUT_S = 1800


@dataclass(frozen=True)
class SharedVolume:
    claim: str | None  # a PersistentVolumeClaim (FSx for Lustre, EFS, NFS); None: an emptyDir
    mount: str


def parse_volume(spec: str | None) -> SharedVolume:
    """`--volume CLAIM:MOUNT` (CLAIM alone mounts at /mnt/shared)."""
    if spec is None:
        return SharedVolume(None, DEFAULT_MOUNT)
    claim, sep, mount = spec.partition(":")
    mount = mount if sep else DEFAULT_MOUNT
    if not is_object_name(claim):
        raise KeelError(f"--volume {spec!r}: expected CLAIM:MOUNT, e.g. --volume fsx-claim:/mnt/shared, where CLAIM "
                        "is the name of a PersistentVolumeClaim (lowercase letters, digits and '-')")
    if not mount.startswith("/") or mount.rstrip("/") in ("", "/etc/keel", "/dev/shm"):
        raise KeelError(f"--volume {spec!r}: the mount path must be an absolute directory other than /, "
                        f"{RECIPE_DIR} and /dev/shm, e.g. --volume {claim}:/mnt/shared")
    return SharedVolume(claim, mount.rstrip("/"))


def cluster_overrides(*, name: str, mount: str) -> list[str]:
    return shared_paths(name=name, root=mount)


def recipe_configmap(*, name: str, namespace: str | None, recipe_text: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": metadata(f"{name}-recipe", namespace, instance=name, component="training"),
            "data": {RECIPE_KEY: recipe_text}}


def shared_volume_claim(*, claim: str, namespace: str | None, size: str, storage_class: str | None) -> dict:
    """A ReadWriteMany claim: every node of the job reads and writes the same files."""
    spec: dict = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": metadata(claim, namespace, instance=claim, component="shared-storage"), "spec": spec}


def _env(*, mount: str, single_node: bool, max_restarts: int, mlflow_uri: str | None, efa: int) -> list[dict]:
    env = [
        {"name": "KEEL_CACHE", "value": f"{mount}/cache"},
        # hub downloads land on the shared volume once, for every pod and every restart
        {"name": "HF_HOME", "value": f"{mount}/cache/huggingface"},
    ]
    if single_node:
        # Without an elasticPolicy (it needs Workers) the operator does not set this.
        env.append({"name": "PET_MAX_RESTARTS", "value": str(max_restarts)})
    if mlflow_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": mlflow_uri})
    env += [{"name": k, "value": v} for k, v in efa_env(efa).items()]
    return env


def pod_template(*, name: str, image: str, args: list[str], gpus: int, efa: int, volume: SharedVolume,
                 shm_size: str, env: list[dict], secrets: list[str], priority_class: str | None) -> dict:
    mounts = [{"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True},
              {"name": "shared", "mountPath": volume.mount}]
    common = {
        "image": image, "imagePullPolicy": "IfNotPresent", "workingDir": volume.mount, "env": env,
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    if secrets:
        common["envFrom"] = [{"secretRef": {"name": s}} for s in secrets]
    limits = {}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    if efa:
        limits["vpc.amazonaws.com/efa"] = str(efa)
    trainer = {"name": CONTAINER_NAME, **common, "args": args,
               "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
               "volumeMounts": [*mounts, {"name": "dshm", "mountPath": "/dev/shm"}]}
    if limits:
        trainer["resources"] = {"limits": limits}
    # Data is validated and prepared before torchrun starts: a bad row fails this pod at once
    # with `file:line: reason` instead of leaving the other nodes waiting at rendezvous. The
    # pods' init containers prepare together into the cache on the shared volume, each its
    # share of the rows by the operator's PET_NODE_RANK / PET_NNODES (data/shards.py); the cache
    # is assembled once and published by atomic rename (data/prepare.py).
    prepare = {"name": "prepare-data", **common, "command": ["keel", "prepare"], "args": args,
               "volumeMounts": mounts}
    shared = ({"persistentVolumeClaim": {"claimName": volume.claim}} if volume.claim else {"emptyDir": {}})
    spec: dict = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID,
                            "fsGroup": IMAGE_UID},
        "initContainers": [prepare],
        "containers": [trainer],
        "volumes": [
            {"name": "recipe", "configMap": {"name": f"{name}-recipe"}},
            {"name": "shared", **shared},
            # NCCL and DataLoader workers share tensors through /dev/shm; a container's default is 64 MiB
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
        ],
    }
    if priority_class:
        spec["priorityClassName"] = priority_class
    # the operator adds its own replica-type and replica-index labels to each pod
    return {"metadata": {"labels": labels(name, "training")}, "spec": spec}


def pytorchjob(*, name: str, namespace: str | None, image: str, args: list[str], nodes: int, gpus_per_node: int,
               volume: SharedVolume, nproc_per_node: int | None = None, max_restarts: int, shm_size: str, mlflow_uri: str | None = None,
               secrets: list[str] | tuple[str, ...] = (), efa: int = 0, queue: str | None = None,
               priority_class: str | None = None) -> dict:
    """The PyTorchJob: one Master, nodes-1 Workers, elastic rendezvous when there are Workers."""
    env = _env(mount=volume.mount, single_node=nodes == 1, max_restarts=max_restarts, mlflow_uri=mlflow_uri, efa=efa)

    def template() -> dict:
        return pod_template(name=name, image=image, args=args, gpus=gpus_per_node, efa=efa,
                            volume=volume, shm_size=shm_size, env=env, secrets=list(secrets),
                            priority_class=priority_class)

    # restartPolicy ExitCode: exit codes 128+ (SIGKILL from the OOM killer, preemption's
    # SIGTERM) restart the pod, which resumes from the checkpoint; 1-127 (a bad recipe, a
    # Python error that torchrun's own restarts did not cure) fail the job instead of looping.
    replicas = {"Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": template()}}
    if nodes > 1:
        replicas["Worker"] = {"replicas": nodes - 1, "restartPolicy": "ExitCode", "template": template()}
    spec: dict = {
        "nprocPerNode": str(nproc_per_node or gpus_per_node or 1),
        "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": max_restarts},
        "pytorchReplicaSpecs": replicas,
    }
    if nodes > 1:
        # Every node, Master included, joins one c10d rendezvous hosted on the Master's pod
        # (the operator gives it a Service of that name). When a process fails, torchrun
        # restarts the whole worker group up to maxRestarts times; each restart resumes from
        # the newest checkpoint on the shared volume.
        spec["elasticPolicy"] = {
            "rdzvBackend": "c10d", "rdzvHost": f"{name}-master-0", "rdzvPort": PORT, "rdzvId": name,
            "rdzvConf": [{"key": "join_timeout", "value": str(RDZV_JOIN_TIMEOUT_S)}],
            "minReplicas": nodes, "maxReplicas": nodes, "maxRestarts": max_restarts,
        }
    extra_labels = {"kueue.x-k8s.io/queue-name": queue} if queue else None
    return {"apiVersion": API_VERSION, "kind": "PyTorchJob",
            "metadata": metadata(name, namespace, instance=name, component="training", extra=extra_labels),
            "spec": spec}


def launch_manifests(*, recipe_path: str | Path, overrides: list[str], image: str, nodes: int | None = None,
                     gpus_per_node: int | None = None, name: str | None = None, namespace: str | None = None,
                     volume: str | None = None, volume_size: str | None = None, storage_class: str | None = None,
                     queue: str | None = None, priority_class: str | None = None, efa: int | None = None,
                     max_restarts: int = 3, shm_size: str = "16Gi", mlflow_uri: str | None = None,
                     secrets: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """Everything `keel launch` prints: [PersistentVolumeClaim,] ConfigMap, PyTorchJob.

    The recipe is validated with the cluster overrides applied, exactly as the pods will load
    it, so a bad recipe fails here with the same errors as `keel validate`; nodes and GPUs
    default to the recipe's cluster section (keel/launch/job.py).
    """
    shared, name = check_k8s_options(recipe_path=recipe_path, image=image, name=name, namespace=namespace,
                                     volume=volume, volume_size=volume_size, storage_class=storage_class,
                                     queue=queue, priority_class=priority_class, shm_size=shm_size,
                                     max_restarts=max_restarts, secrets=secrets, nodes=nodes)
    launch = resolve_launch(recipe_path=recipe_path, overrides=overrides, name=name,
                            path_overrides=cluster_overrides(name=name, mount=shared.mount), nodes=nodes,
                            gpus_per_node=gpus_per_node, efa=efa, mlflow_uri=mlflow_uri)
    topo = launch.topology
    check_name(name, flag="--name", longest_suffix=f"-worker-{max(topo.nodes - 2, 0)}")
    docs = []
    if volume_size:
        docs.append(shared_volume_claim(claim=shared.claim, namespace=namespace,
                                        size=check_quantity(volume_size, "--volume-size"),
                                        storage_class=storage_class))
    docs.append(recipe_configmap(name=name, namespace=namespace, recipe_text=launch.recipe_text))
    docs.append(pytorchjob(name=name, namespace=namespace, image=image,
                           args=[f"{RECIPE_DIR}/{RECIPE_KEY}", *launch.args], nodes=topo.nodes,
                           gpus_per_node=topo.gpus_per_node, nproc_per_node=topo.processes_per_node,
                           volume=shared, max_restarts=max_restarts, shm_size=shm_size, mlflow_uri=mlflow_uri,
                           secrets=secrets, efa=topo.efa, queue=queue, priority_class=priority_class))
    return docs


def check_k8s_options(*, recipe_path: str | Path, image: str | None, name: str | None, namespace: str | None,
                      volume: str | None, volume_size: str | None, storage_class: str | None, queue: str | None,
                      priority_class: str | None, shm_size: str, max_restarts: int, secrets, nodes: int | None,
                      ) -> tuple[SharedVolume, str]:
    """The options the Kubernetes targets (PyTorchJob, TrainJob) share, checked before the recipe."""
    check_cluster_flags(nodes=nodes, gpus_per_node=None, efa=None)
    check_count(max_restarts, "--max-restarts", minimum=0)
    check_namespace(namespace)
    if not image:
        raise KeelError("--image is required: the training image the pods run (docker/train.Dockerfile), e.g. "
                        "--image registry.example/keel-train:0.1.0")
    check_image(image)
    name = check_name(name or name_from(str(recipe_path)), flag="--name",
                      longest_suffix=f"-worker-{max((nodes or 1) - 2, 0)}")
    shared = parse_volume(volume)
    if volume_size and not shared.claim:
        raise KeelError("--volume-size creates the claim named by --volume CLAIM:MOUNT; pass --volume too")
    check_quantity(shm_size, "--shm-size")
    for value, flag in [(queue, "--queue"), (priority_class, "--priority-class"), (storage_class, "--storage-class"),
                        *((s, "--secret") for s in secrets)]:
        if value is not None:
            check_object_name(value, flag)
    return shared, name
