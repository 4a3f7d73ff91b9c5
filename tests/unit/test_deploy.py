"""`keel deploy` and `keel pull`: the serving objects pass Kubernetes' own schemas, the server
starts only on a complete model with a key from a Secret, autoscaling follows the chosen signal,
bad input fails before anything is printed; `keel pull` fetches a registered model for real."""

from __future__ import annotations

import json

import pytest
import yaml

from data.errors import KeelError
from keel.launch.deploy import deploy_manifests
from serving.pull import PULLED_MARKER, pull_model
from keel.cli import main as keel

K8S_VERSION = "1.37.0"
IMAGE = "registry.example/keel-serve:0.1.0"


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def server_of(deployment: dict) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "server")


@pytest.mark.parametrize("uri", ["pvc://models/runs/sft/model", "s3://my-bucket/runs/sft/model",
                                 "models:/tool-caller/3"])
@pytest.mark.parametrize("scale", [{}, {"max_replicas": 4, "scale_on": "cpu"},
                                   {"min_replicas": 2, "max_replicas": 8, "scale_on": "vllm"}])
def test_objects_pass_kubernetes_schemas(uri, scale):
    import kubernetes_validate

    docs = deploy_manifests(model_uri=uri, image=IMAGE, namespace="serving", gpus=2, **scale)
    assert [d["kind"] for d in docs] == ["Deployment", "Service"] + (["HorizontalPodAutoscaler"] if scale else [])
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_server_probes_port_shm_metrics_and_key_from_a_secret():
    docs = by_kind(deploy_manifests(model_uri="models:/tool-caller/3", image=IMAGE, gpus=1))
    dep = docs["Deployment"]
    assert dep["metadata"]["name"] == "tool-caller" and dep["spec"]["replicas"] == 1
    server = server_of(dep)
    assert server["args"] == ["serve", "/opt/ml/model", "--port", "8080"]
    assert server["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert server["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # time to load a large model
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert server["env"] == [{"name": "KEEL_API_KEY", "valueFrom": {
        "secretKeyRef": {"name": "tool-caller-api-key", "key": "api-key"}}}]
    pod = dep["spec"]["template"]
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "8080",
                                              "prometheus.io/path": "/metrics"}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in server["volumeMounts"]
    svc = docs["Service"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]


def test_remote_model_is_pulled_by_an_init_container_before_the_server_starts():
    dep = by_kind(deploy_manifests(model_uri="s3://my-bucket/runs/sft/model", image=IMAGE,
                                   secrets=["aws-creds"], mlflow_uri="http://mlflow:5000"))["Deployment"]
    spec = dep["spec"]["template"]["spec"]
    (pull,) = spec["initContainers"]
    assert pull["command"] == ["keel", "pull"] and pull["args"] == ["s3://my-bucket/runs/sft/model", "/opt/ml/model"]
    assert pull["envFrom"] == [{"secretRef": {"name": "aws-creds"}}] and "envFrom" not in server_of(dep)
    assert {"name": "model", "emptyDir": {}} in spec["volumes"]
    assert {"name": "model", "mountPath": "/opt/ml/model", "readOnly": True} in server_of(dep)["volumeMounts"]
    assert dep["metadata"]["name"] == "sft"  # named after the run, not after its 'model' directory


def test_model_on_a_claim_is_mounted_read_only_without_a_pull():
    dep = by_kind(deploy_manifests(model_uri="pvc://fsx-claim/runs/sft/model", image=IMAGE, gpus=0,
                                   no_api_key=True))["Deployment"]
    spec = dep["spec"]["template"]["spec"]
    assert "initContainers" not in spec
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "fsx-claim", "readOnly": True}} in spec["volumes"]
    server = server_of(dep)
    assert server["args"][:2] == ["serve", "/mnt/models/runs/sft/model"]
    assert "env" not in server and "nvidia.com/gpu" not in server["resources"]["limits"]


def test_gpus_shard_the_model_and_extra_args_reach_vllm():
    dep = by_kind(deploy_manifests(model_uri="models:/m/1", image=IMAGE, gpus=4,
                                   vllm_args=["--max-num-seqs", "64"]))["Deployment"]
    assert server_of(dep)["args"] == ["serve", "/opt/ml/model", "--port", "8080", "--",
                                      "--max-num-seqs", "64", "--tensor-parallel-size", "4"]


def test_autoscaling_on_vllm_queue_or_cpu():
    docs = by_kind(deploy_manifests(model_uri="models:/m/1", image=IMAGE, min_replicas=2, max_replicas=6,
                                    scale_on="vllm"))
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "m"}
    assert {m["pods"]["metric"]["name"] for m in hpa["metrics"]} == {"vllm_num_requests_waiting",
                                                                     "vllm_num_requests_running"}
    assert "replicas" not in docs["Deployment"]["spec"]  # the autoscaler owns the count
    cpu = by_kind(deploy_manifests(model_uri="models:/m/1", image=IMAGE, max_replicas=3))
    assert cpu["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert server_of(cpu["Deployment"])["resources"]["requests"]["cpu"] == "4"  # utilization needs a request


def test_keel_deploy_prints_the_manifests(capsys):
    rc = keel(["deploy", "models:/tool-caller/3", "--image", IMAGE, "--replicas", "2", "--api-key-secret",
               "keys:serving", "--", "--max-num-seqs", "32"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    docs = by_kind(list(yaml.safe_load_all(out.out)))
    assert set(docs) == {"Deployment", "Service"} and docs["Deployment"]["spec"]["replicas"] == 2
    server = server_of(docs["Deployment"])
    assert server["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "keys", "key": "serving"}
    assert server["args"][-3:] == ["--", "--max-num-seqs", "32"]


@pytest.mark.parametrize("argv, message", [
    (["runs/sft/model"], "expected pvc://CLAIM/path/to/model, s3://bucket/path/to/model or models:/NAME/VERSION"),
    (["pvc://Bad_Claim/m"], "expected pvc://CLAIM/path/to/model"),
    (["models:/m/1", "--replicas", "2", "--max-replicas", "4"], "Pass one or the other"),
    (["models:/m/1", "--min-replicas", "2"], "--min-replicas needs --max-replicas"),
    (["models:/m/1", "--min-replicas", "5", "--max-replicas", "4"], "need 1 <= min <= max"),
    (["models:/m/1", "--no-api-key", "--api-key-secret", "k"], "contradict"),
    (["models:/m/1", "--api-key-secret", "k:bad key"], "expected SECRET or SECRET:KEY"),
    (["models:/m/1", "--gpus", "-1"], "--gpus -1"),
    (["models:/m/1", "--name", "9lives"], "--name '9lives'"),
    (["models:/m/1", "--memory", "lots"], "--memory 'lots'"),
])
def test_bad_input_is_an_error_naming_the_flag_and_prints_nothing(argv, message, capsys):
    rc = keel(["deploy", *argv, "--image", IMAGE])
    out = capsys.readouterr()
    assert rc == 2 and out.out == "" and out.err.startswith("keel: error:")
    assert message in out.err


# ---------------------------------------------------------------- keel pull, for real


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A local MLflow tracking store + model registry with one Keel-shaped model version."""
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = tmp_path / "export" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "keel-export.yaml").write_text("seq_len: 1024\n")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("not a model")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("pull-test")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model), artifact_path="model")
        mlflow.log_artifacts(str(notes), artifact_path="notes")
    client = MlflowClient(tracking_uri=uri)
    for name, path in [("tool-caller", "model"), ("notes", "notes")]:
        client.create_registered_model(name)
        client.create_model_version(name, source=f"{run.info.artifact_uri}/{path}", run_id=run.info.run_id)
    return model


def test_pull_fetches_a_registered_model_once(registry, tmp_path):
    dest = tmp_path / "opt-ml-model"
    dest.mkdir()
    (dest / "stale-shard.safetensors").write_text("from an earlier model")
    assert pull_model("models:/tool-caller/1", dest) == dest
    assert json.loads((dest / "config.json").read_text()) == {"model_type": "llama"}
    assert (dest / "keel-export.yaml").read_text() == "seq_len: 1024\n"
    assert sorted(p.name for p in dest.iterdir()) == [PULLED_MARKER, "config.json", "keel-export.yaml"]
    (dest / "config.json").touch()
    mtime = (dest / "config.json").stat().st_mtime_ns
    pull_model("models:/tool-caller/1", dest)  # a restarted init container does not download again
    assert (dest / "config.json").stat().st_mtime_ns == mtime


def test_pull_of_something_that_is_not_a_model_dir_fails_and_leaves_nothing(registry, tmp_path):
    dest = tmp_path / "dest"
    with pytest.raises(KeelError, match="not a model directory"):
        pull_model("models:/notes/1", dest)
    assert not dest.exists()  # the pull made it; a failed pull takes it away again, no empty DEST
    with pytest.raises(KeelError, match="download failed"):
        pull_model("models:/no-such-model/1", dest)
    assert not dest.exists()
    dest.mkdir()  # an emptyDir the pod was given stays, empty
    with pytest.raises(KeelError, match="download failed"):
        pull_model("models:/no-such-model/1", dest)
    assert list(dest.iterdir()) == []
    with pytest.raises(KeelError, match="not a URI; expected models:/NAME/VERSION"):
        pull_model("runs/sft/model", dest)
