"""`keel deploy MODEL_URI`: an OpenAI-compatible endpoint on Kubernetes.

Deployment + Service, and a HorizontalPodAutoscaler when a replica range is given. Each pod
runs the serving image's `serve` command (`keel serve` on port 8080, as SageMaker expects)
on one exported model dir:

    pvc://CLAIM/path/to/model   mounted read-only from a PersistentVolumeClaim
    s3://bucket/path/to/model   pulled by an init container (`keel pull`) into an emptyDir
    models:/NAME/VERSION        the same, from the MLflow model registry

so the server only starts on a complete model. The API key comes from a Secret; Prometheus
scrapes vLLM's /metrics. Autoscaling follows vLLM's own load metrics (requests waiting and
running per pod) where a metrics adapter publishes them, CPU otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from data.errors import KeelError
from data.options import check_count, check_model_uri, check_namespace
from data.redaction import has_url_credentials, secret_options
from keel.launch.k8s_objects import (IMAGE_UID, check_image, check_name, check_object_name, check_quantity, labels,
                                  metadata, name_from)

PORT = 8080
PULLED_MODEL_DIR = "/opt/ml/model"  # SageMaker's model path, the serve image's default
PVC_MOUNT = "/mnt/models"
# The names a Prometheus Adapter rule gives vLLM's `vllm:num_requests_waiting` and
# `vllm:num_requests_running` gauges (docs/kubernetes.md: "Probes, metrics and autoscaling"); ':' is not allowed in them.
WAITING_METRIC = "vllm_num_requests_waiting"
RUNNING_METRIC = "vllm_num_requests_running"


@dataclass(frozen=True)
class ModelSource:
    uri: str
    model_dir: str  # where the server reads the model inside the pod
    claim: str | None = None  # pvc:// sources
    pulled: bool = False  # s3:// and models:/ sources: an init container fetches them first


def model_source(uri: str) -> ModelSource:
    if uri.startswith("pvc://"):
        claim, _, path = uri.removeprefix("pvc://").partition("/")
        if not claim or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", claim) or ".." in path.split("/"):
            raise KeelError(f"{uri!r}: expected pvc://CLAIM/path/to/model, CLAIM a PersistentVolumeClaim in the "
                            "namespace and the path the model dir's place inside it")
        return ModelSource(uri, f"{PVC_MOUNT}/{path.strip('/')}".rstrip("/"), claim=claim)
    if re.fullmatch(r"s3://[a-z0-9][-a-z0-9.]{1,61}[a-z0-9](/.*)?", uri) or re.fullmatch(r"models:/[^/]+/[^/]+", uri):
        return ModelSource(uri, PULLED_MODEL_DIR, pulled=True)
    raise KeelError(f"model {uri!r}: expected pvc://CLAIM/path/to/model, s3://bucket/path/to/model or "
                    "models:/NAME/VERSION (an MLflow registered model)")


def default_name(uri: str) -> str:
    """models:/tool-caller/3 -> tool-caller; s3://b/runs/sft/model -> sft (the run, not 'model')."""
    if uri.startswith("models:/"):
        return name_from(uri.split("/")[1])
    parts = [p for p in uri.split("://", 1)[-1].split("/")[1:] if p and p != "model"]
    return name_from(parts[-1] if parts else "keel-model")


def _probe(path: str, *, period_s: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period_s, "failureThreshold": failures,
            "timeoutSeconds": 5}


def deployment(*, name: str, namespace: str | None, image: str, source: ModelSource, gpus: int,
               replicas: int | None, api_key_secret: tuple[str, str] | None, secrets: list[str] | tuple[str, ...],
               mlflow_uri: str | None, cpu: str, memory: str, shm_size: str, startup_timeout_s: int,
               vllm_args: list[str]) -> dict:
    pod_labels = labels(name, "serving")
    env = []
    if api_key_secret:
        secret, key = api_key_secret
        env.append({"name": "KEEL_API_KEY", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    vllm_args = list(vllm_args)
    if gpus > 1 and "--tensor-parallel-size" not in vllm_args:
        vllm_args += ["--tensor-parallel-size", str(gpus)]  # one model across the pod's GPUs
    limits = {"memory": memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    model_volume = ({"name": "model", "persistentVolumeClaim": {"claimName": source.claim, "readOnly": True}}
                    if source.claim else {"name": "model", "emptyDir": {}})
    model_mount = {"name": "model", "mountPath": PVC_MOUNT if source.claim else PULLED_MODEL_DIR, "readOnly": True}
    envfrom = [{"secretRef": {"name": s}} for s in secrets]
    server = {
        "name": "server", "image": image, "imagePullPolicy": "IfNotPresent",
        "args": ["serve", source.model_dir, "--port", str(PORT), *(["--", *vllm_args] if vllm_args else [])],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits},
        "volumeMounts": [model_mount, {"name": "dshm", "mountPath": "/dev/shm"}],
        # Loading weights and capturing CUDA graphs takes minutes for a large model: the
        # startup probe allows that much; liveness only starts counting after it passes.
        "startupProbe": _probe("/health", period_s=10, failures=max(1, startup_timeout_s // 10)),
        "readinessProbe": _probe("/health", period_s=5, failures=3),
        "livenessProbe": _probe("/health", period_s=15, failures=4),
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    if env:
        server["env"] = env
    spec: dict = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID,
                            "fsGroup": IMAGE_UID},
        "containers": [server],
        "volumes": [model_volume, {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}}],
    }
    if source.pulled:
        pull = {"name": "pull-model", "image": image, "imagePullPolicy": "IfNotPresent",
                "command": ["keel", "pull"], "args": [source.uri, PULLED_MODEL_DIR],
                "volumeMounts": [{"name": "model", "mountPath": PULLED_MODEL_DIR}],
                "securityContext": {"allowPrivilegeEscalation": False}}
        if mlflow_uri:
            pull["env"] = [{"name": "MLFLOW_TRACKING_URI", "value": mlflow_uri}]
        if envfrom:  # storage and registry credentials: only the container that downloads sees them
            pull["envFrom"] = envfrom
        spec["initContainers"] = [pull]
    dep_spec: dict = {
        "selector": {"matchLabels": pod_labels},
        "template": {
            "metadata": {"labels": pod_labels, "annotations": {
                "prometheus.io/scrape": "true", "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics"}},
            "spec": spec,
        },
    }
    if replicas is not None:  # left out under an autoscaler, so `kubectl apply` never resets its count
        dep_spec = {"replicas": replicas, **dep_spec}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": metadata(name, namespace, instance=name, component="serving"), "spec": dep_spec}


def service(*, name: str, namespace: str | None) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": metadata(name, namespace, instance=name, component="serving"),
            "spec": {"selector": labels(name, "serving"),
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}


def autoscaler(*, name: str, namespace: str | None, min_replicas: int, max_replicas: int, scale_on: str,
               target_waiting: int, target_running: int, target_cpu: int) -> dict:
    if scale_on == "vllm":
        # Requests queued per pod is the signal that users wait; requests running per pod
        # catches a pod that is saturated before a queue forms. The HPA follows the larger.
        metrics = [
            {"type": "Pods", "pods": {"metric": {"name": WAITING_METRIC},
                                      "target": {"type": "AverageValue", "averageValue": str(target_waiting)}}},
            {"type": "Pods", "pods": {"metric": {"name": RUNNING_METRIC},
                                      "target": {"type": "AverageValue", "averageValue": str(target_running)}}},
        ]
    else:
        metrics = [{"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": target_cpu}}}]
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": metadata(name, namespace, instance=name, component="serving"),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "minReplicas": min_replicas, "maxReplicas": max_replicas, "metrics": metrics,
                # a new replica needs minutes to load the model: scale down slowly so a short
                # lull does not throw away capacity that the next burst needs again
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}},
            }}


def refuse_secret_args(vllm_args: list[str], mlflow_uri: str | None = None) -> None:
    """A credential in vLLM's arguments or in $MLFLOW_TRACKING_URI would sit in plain text in the
    Deployment, as launch refuses it in a recipe (keel/launch/job.py refuse_inlined_secrets)."""
    if mlflow_uri and has_url_credentials(mlflow_uri):
        raise KeelError("$MLFLOW_TRACKING_URI carries a credential, which the manifests would hold in plain text. "
                        "Remove it from the URI; put MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in a "
                        "Kubernetes Secret and pass --secret SECRET_NAME")
    found = secret_options(list(vllm_args))
    if found:
        fix = ("pass the API key as a Kubernetes Secret with --api-key-secret SECRET[:KEY] (keel serve reads it "
               "from $KEEL_API_KEY)" if any("api" in f.lower() for f in found) else
               "put it in a Kubernetes Secret and pass --secret SECRET_NAME (its keys become the environment)")
        raise KeelError(f"-- {', '.join(dict.fromkeys(found))}: carries a credential, which the manifests would hold "
                        f"in plain text; remove it and {fix}")


def parse_api_key_secret(spec: str) -> tuple[str, str]:
    secret, _, key = spec.partition(":")
    key = key or "api-key"
    check_object_name(secret, "--api-key-secret")
    if not re.fullmatch(r"[-._a-zA-Z0-9]+", key):
        raise KeelError(f"--api-key-secret {spec!r}: expected SECRET or SECRET:KEY, KEY a key of that Secret")
    return secret, key


def deploy_manifests(*, model_uri: str, image: str, name: str | None = None, namespace: str | None = None,
                     replicas: int | None = None, gpus: int = 1, min_replicas: int | None = None,
                     max_replicas: int | None = None, scale_on: str = "cpu", target_waiting: int = 2,
                     target_running: int = 64, target_cpu: int = 70, api_key_secret: str | None = None,
                     no_api_key: bool = False, secrets: list[str] | tuple[str, ...] = (),
                     mlflow_uri: str | None = None, cpu: str = "4", memory: str = "32Gi", shm_size: str = "8Gi",
                     startup_timeout_s: int = 1800, vllm_args: list[str] = ()) -> list[dict]:
    """Everything `keel deploy` prints: Deployment, Service and, with --max-replicas, an autoscaler."""
    source = model_source(check_model_uri(model_uri))
    check_namespace(namespace)
    name = check_name(name or default_name(model_uri), flag="--name")
    check_image(image, example="registry.example/keel-serve:0.1.0")
    check_count(gpus, "--gpus", minimum=0)  # 0: CPU serving
    for value, flag in [(replicas, "--replicas"), (min_replicas, "--min-replicas"), (max_replicas, "--max-replicas")]:
        if value is not None:
            check_count(value, flag)
    autoscale = min_replicas is not None or max_replicas is not None
    if autoscale and replicas is not None:
        raise KeelError("--replicas sets a fixed count; --min-replicas/--max-replicas let an autoscaler choose. "
                        "Pass one or the other")
    if autoscale:
        if max_replicas is None:
            raise KeelError("--min-replicas needs --max-replicas (the most replicas the autoscaler may run)")
        min_replicas = 1 if min_replicas is None else min_replicas
        if not 1 <= min_replicas <= max_replicas:
            raise KeelError(f"--min-replicas {min_replicas} / --max-replicas {max_replicas}: "
                            "need 1 <= min <= max")
    elif replicas is None:
        replicas = 1
    if scale_on not in ("cpu", "vllm"):
        raise KeelError(f"--scale-on {scale_on!r}: use cpu or vllm")
    if no_api_key and api_key_secret:
        raise KeelError("--no-api-key and --api-key-secret contradict each other; pass one")
    key_ref = None if no_api_key else parse_api_key_secret(api_key_secret or f"{name}-api-key")
    for s in secrets:
        check_object_name(s, "--secret")
    for value, flag in [(cpu, "--cpu"), (memory, "--memory"), (shm_size, "--shm-size")]:
        check_quantity(value, flag)
    refuse_secret_args(vllm_args, mlflow_uri)
    check_count(startup_timeout_s, "--startup-timeout", minimum=10)  # the server needs a few seconds to load
    docs = [
        deployment(name=name, namespace=namespace, image=image, source=source, gpus=gpus,
                   replicas=None if autoscale else replicas, api_key_secret=key_ref, secrets=secrets,
                   mlflow_uri=mlflow_uri, cpu=cpu, memory=memory, shm_size=shm_size,
                   startup_timeout_s=startup_timeout_s, vllm_args=list(vllm_args)),
        service(name=name, namespace=namespace),
    ]
    if autoscale:
        docs.append(autoscaler(name=name, namespace=namespace, min_replicas=min_replicas, max_replicas=max_replicas,
                               scale_on=scale_on, target_waiting=target_waiting, target_running=target_running,
                               target_cpu=target_cpu))
    return docs
