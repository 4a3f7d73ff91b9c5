"""`keel launch`: the rendered PyTorchJob is admitted by the operator's webhook, loads into the
kubeflow-training SDK's typed models without loss, matches the CRD schema, and its ConfigMap,
PVC and pods pass Kubernetes' own schemas; the recipe in the pods is the recipe `keel validate`
sees locally; bad input fails before anything is printed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from kubeflow_operator import webhook_problems
from keel.cli import main as keel
from keel.launch.pytorchjob import launch_manifests
from trainer.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "quickstart" / "sft-tool-calling.yaml"
K8S_VERSION = "1.37.0"  # the newest Kubernetes whose schemas kubernetes-validate ships
CRD_NAME = "kubeflow.org_pytorchjobs.yaml"


def sized(nodes: int, gpus_per_node: int) -> list[str]:
    """The quickstart recipe (1 CPU node) resized explicitly, as `keel launch` requires for other sizes."""
    if gpus_per_node == 0:
        return [f"cluster.nodes={nodes}"]
    return [f"cluster.nodes={nodes}", f"cluster.gpus_per_node={gpus_per_node}", "cluster.gpu=h100-80gb"]


def render(**kw) -> list[dict]:
    nodes, gpus = kw.get("nodes", 4), kw.get("gpus_per_node", 8)
    kw["overrides"] = [*kw.get("overrides", ["model.path=base", "training.max_steps=10"]), *sized(nodes, gpus)]
    args = dict(recipe_path=RECIPE, overrides=["model.path=base", "training.max_steps=10"],
                image="registry.example/keel-train:0.1.0", nodes=4, gpus_per_node=8, volume="fsx-claim:/fsx",
                volume_size="1200Gi", storage_class="fsx-sc", queue="team-a", priority_class="high", efa=32,
                secrets=["hf-token", "mlflow-creds"], mlflow_uri="http://mlflow.mlflow:5000")
    return launch_manifests(**{**args, **kw})


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def pod_specs(job: dict) -> dict[str, dict]:
    return {r: s["template"]["spec"] for r, s in job["spec"]["pytorchReplicaSpecs"].items()}


def trainer_container(spec: dict) -> dict:
    return next(c for c in spec["containers"] if c["name"] == "pytorch")


# ---------------------------------------------------------------- the operator's view


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_operator_webhook_admits_the_job(nodes):
    job = by_kind(render(nodes=nodes))["PyTorchJob"]
    assert webhook_problems(job) == []
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {}).get("replicas", 0) == nodes - 1
    # elasticPolicy (and with it maxRestarts) only with Workers: the webhook rejects it otherwise
    assert ("elasticPolicy" in job["spec"]) == (nodes > 1)


def test_webhook_model_catches_what_the_operator_rejects():
    job = by_kind(render(nodes=2))["PyTorchJob"]
    bad = json.loads(json.dumps(job))
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    del bad["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert webhook_problems(bad) == [
        "spec.pytorchReplicaSpecs[Worker]: must be configured if elastic policy is used",
        "Master: replicas must be 1"]


@pytest.mark.parametrize("nodes", [1, 3])
def test_job_loads_into_the_kubeflow_sdk_models_without_loss(nodes):
    from kubeflow.training import ApiClient

    job = by_kind(render(nodes=nodes))["PyTorchJob"]

    class Response:  # what ApiClient.deserialize reads from an API response
        data = json.dumps(job)

    client = ApiClient()
    typed = client.deserialize(Response(), "KubeflowOrgV1PyTorchJob")
    assert type(typed).__name__ == "KubeflowOrgV1PyTorchJob"
    master = typed.spec.pytorch_replica_specs["Master"].template.spec.containers[0]
    assert master.name == "pytorch" and master.ports[0].container_port == 23456
    if nodes > 1:
        assert typed.spec.elastic_policy.max_restarts == 3 and typed.spec.elastic_policy.rdzv_backend == "c10d"
    assert client.sanitize_for_serialization(typed) == job  # every field has a typed home: nothing dropped


def _crd_schema() -> dict:
    where = Path(os.environ.get("KEEL_SCHEMAS_DIR", REPO.parent / "shared" / "schemas")) / CRD_NAME
    if not where.is_file():
        pytest.skip(f"PyTorchJob CRD not found at {where}: the CRD schema check did NOT run. Put kubeflow/trainer "
                    f"release-1.9's manifests/base/crds/{CRD_NAME} there or set KEEL_SCHEMAS_DIR")
    crd = yaml.safe_load(where.read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("nodes", [1, 2])
def test_job_matches_the_pytorchjob_crd_schema(nodes):
    import jsonschema

    schema = _crd_schema()
    job = by_kind(render(nodes=nodes))["PyTorchJob"]
    jsonschema.validate(job, schema)
    broken = json.loads(json.dumps(job))
    broken["spec"]["runPolicy"]["backoffLimit"] = "three"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)  # the check is live


# ---------------------------------------------------------------- core objects


def test_core_objects_pass_kubernetes_schemas():
    import kubernetes_validate

    docs = by_kind(render())
    for kind in ("ConfigMap", "PersistentVolumeClaim"):
        kubernetes_validate.validate(docs[kind], K8S_VERSION, strict=True)
    # each pod template is a full PodSpec: validate it as the Pod the operator will create
    for role, spec in pod_specs(docs["PyTorchJob"]).items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"job-{role.lower()}-0"}, "spec": spec}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


# ---------------------------------------------------------------- what runs in the pods


def test_pods_run_the_mounted_recipe_with_cluster_paths_and_user_overrides():
    docs = by_kind(render(nodes=2))
    job = docs["PyTorchJob"]
    for spec in pod_specs(job).values():
        trainer = trainer_container(spec)
        assert "command" not in trainer  # the image's entrypoint (docker/train*.Dockerfile) runs it
        assert trainer["args"] == ["/etc/keel/recipe.yaml", "output.dir=/fsx/runs/sft-tool-calling",
                                   "data.cache_dir=/fsx/cache/prepared", "model.path=base", "training.max_steps=10",
                                   *sized(2, 8)]
        assert trainer["workingDir"] == "/fsx"
        prepare = spec["initContainers"][0]
        assert prepare["command"] == ["keel", "prepare"] and prepare["args"] == trainer["args"]
        mounts = {m["mountPath"]: m["name"] for m in trainer["volumeMounts"]}
        assert mounts == {"/etc/keel": "recipe", "/fsx": "shared", "/dev/shm": "dshm"}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["recipe"]["configMap"]["name"] == "sft-tool-calling-recipe"
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "fsx-claim"
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    # the ConfigMap holds the file as written; with the pod's arguments it is the recipe
    # `keel validate` reads locally with the same overrides
    configmap = docs["ConfigMap"]
    assert configmap["data"]["recipe.yaml"] == RECIPE.read_text()
    pod_recipe = load_recipe(RECIPE, trainer["args"][1:])
    assert pod_recipe.output.dir == "/fsx/runs/sft-tool-calling" and pod_recipe.training.max_steps == 10
    assert pod_recipe.to_dict() == load_recipe(RECIPE, trainer["args"][1:]).to_dict()


def test_user_override_of_a_cluster_path_wins():
    job = by_kind(render(overrides=["output.dir=/fsx/team/run7"]))["PyTorchJob"]
    args = trainer_container(pod_specs(job)["Master"])["args"]
    assert load_recipe(RECIPE, args[1:]).output.dir == "/fsx/team/run7"


def test_resources_scheduling_and_secrets_by_reference():
    docs = by_kind(render())
    job = docs["PyTorchJob"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["nprocPerNode"] == "8"
    for spec in pod_specs(job).values():
        assert spec["priorityClassName"] == "high"
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
        trainer = trainer_container(spec)
        assert trainer["resources"]["limits"] == {"nvidia.com/gpu": "8", "vpc.amazonaws.com/efa": "32"}
        env = {e["name"]: e["value"] for e in trainer["env"]}
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow:5000" and env["FI_PROVIDER"] == "efa"
        assert trainer["envFrom"] == [{"secretRef": {"name": "hf-token"}}, {"secretRef": {"name": "mlflow-creds"}}]
    elastic = job["spec"]["elasticPolicy"]
    assert (elastic["minReplicas"], elastic["maxReplicas"], elastic["maxRestarts"]) == (4, 4, 3)
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_cpu_job_without_volume_uses_an_emptydir_and_no_gpus():
    docs = by_kind(render(nodes=1, gpus_per_node=0, volume=None, volume_size=None, storage_class=None, efa=0))
    assert set(docs) == {"ConfigMap", "PyTorchJob"}
    spec = pod_specs(docs["PyTorchJob"])["Master"]
    assert "resources" not in trainer_container(spec)
    assert {"name": "shared", "emptyDir": {}} in spec["volumes"]
    assert docs["PyTorchJob"]["spec"]["nprocPerNode"] == "2"  # the recipe's cluster: 2 CPU processes per node


# ---------------------------------------------------------------- the command


def test_keel_launch_prints_the_manifests(capsys):
    rc = keel(["launch", str(RECIPE), "--image", "keel-train:0.1.0", "--nodes", "2", "--gpus-per-node", "8",
               "--volume", "fsx-claim:/fsx", "--namespace", "ml", "model.path=base", *sized(2, 8)])
    out = capsys.readouterr()
    assert rc == 0
    docs = list(yaml.safe_load_all(out.out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "PyTorchJob"]
    assert all(d["metadata"]["namespace"] == "ml" for d in docs)
    assert "recipe.yaml: |" in out.out  # the recipe stays readable in the ConfigMap
    assert docs[0]["data"]["recipe.yaml"] == RECIPE.read_text()


BAD_INPUT = [
    (["--volume", "fsx"], None),  # CLAIM alone is fine: mounted at /mnt/shared
    (["--volume", "FSx:/data"], "--volume 'FSx:/data': expected CLAIM:MOUNT"),
    (["--volume", "fsx:data"], "the mount path must be an absolute directory"),
    (["--nodes", "0"], "--nodes 0: expected a whole number from 1 to 2,147,483,647"),
    (["--nodes", str(2**31)], "--nodes 2147483648: expected a whole number from 1 to 2,147,483,647"),
    (["--namespace", "Team_A"], "--namespace 'Team_A': expected a Kubernetes namespace"),
    (["--gpus-per-node", "-1"], "--gpus-per-node -1"),
    (["--nodes", "2"], "--nodes 2 does not match the recipe's cluster.nodes 1"),
    (["--gpus-per-node", "8"], "--gpus-per-node 8: the recipe's cluster runs on CPU"),
    (["--name", "My_Job"], "--name 'My_Job': expected lowercase letters"),
    (["--volume-size", "1Ti"], "--volume-size creates the claim named by --volume"),
    (["--volume", "fsx:/fsx", "--volume-size", "lots"], "--volume-size 'lots': expected a Kubernetes quantity"),
    (["--queue", "Team A"], "--queue 'Team A'"),
    (["training.max_step=3"], "training.max_step: unknown key; did you mean 'max_steps'?"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUT)
def test_bad_input_is_an_error_naming_the_flag_and_prints_nothing(extra, message, capsys):
    base = {"--image": "keel-train:0.1.0"}  # nodes and GPUs: the recipe's cluster
    flags = dict(zip(extra[::2], extra[1::2])) if extra[0].startswith("--") else {}
    argv = ["launch", str(RECIPE), *[x for kv in {**base, **flags}.items() for x in kv]]
    if not extra[0].startswith("--"):
        argv += extra
    rc = keel(argv)
    out = capsys.readouterr()
    if message is None:
        assert rc == 0
        return
    assert rc == 2 and out.out == ""
    assert message in out.err and out.err.startswith("keel: error:")


def test_invalid_recipe_gives_the_errors_keel_validate_gives(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.read_text().replace("learning_rate:", "learning_rat:"))
    assert keel(["validate", str(bad)]) == 2
    validate_err = capsys.readouterr().err
    assert keel(["launch", str(bad), "--image", "i:1", "--nodes", "1", "--gpus-per-node", "0"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == validate_err
    assert "training.learning_rat: unknown key; did you mean 'learning_rate'?" in out.err


def test_apply_without_kubectl_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no kubectl
    rc = keel(["launch", str(RECIPE), "--image", "i:1", "--nodes", "1", "--gpus-per-node", "0", "--apply"])
    out = capsys.readouterr()
    assert rc == 2 and out.out == ""
    assert "--apply runs `kubectl apply -f -`, but kubectl is not on PATH" in out.err


@pytest.mark.parametrize("uri, passed", [("http://mlflow.mlflow:5000", True), ("sqlite:///mlflow.db", False)])
def test_mlflow_server_from_the_environment_reaches_the_pods(monkeypatch, capsys, uri, passed):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert keel(["launch", str(RECIPE), "--image", "i:1", "--nodes", "1", "--gpus-per-node", "0"]) == 0
    out = capsys.readouterr()
    job = by_kind(list(yaml.safe_load_all(out.out)))["PyTorchJob"]
    env = {e["name"]: e["value"] for e in trainer_container(pod_specs(job)["Master"])["env"]}
    assert env.get("MLFLOW_TRACKING_URI") == (uri if passed else None)
    # a store on this machine means nothing in a pod: said, not silently dropped
    assert ("names storage on this machine" in out.err) == (not passed)


@pytest.mark.parametrize("where", ["override", "recipe file", "environment"])
def test_credentials_are_refused_rather_than_written_into_manifests(where, tmp_path, monkeypatch, capsys):
    """Manifests are kept in plain text (ConfigMap, pod args, env values): a planted password is
    refused with the way to pass it as a Secret, and nothing is printed."""
    planted = "planted-launch-secret"
    recipe, extra = RECIPE, []
    uri = f"http://keel:{planted}@mlflow.mlflow:5000"
    if where == "override":
        extra = [f"tracking.mlflow.tracking_uri={uri}"]
    elif where == "recipe file":
        recipe = tmp_path / "r.yaml"
        recipe.write_text(RECIPE.read_text().replace("experiment: keel-quickstart",
                                                     f"experiment: keel-quickstart\n    tracking_uri: {uri}"))
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rc = keel(["launch", str(recipe), "--image", "i:1", "--nodes", "1", "--gpus-per-node", "0", *extra])
    out = capsys.readouterr()
    assert rc != 0 and out.out == ""
    assert "carries a credential" in out.err and "--secret" in out.err and planted not in out.err + out.out
