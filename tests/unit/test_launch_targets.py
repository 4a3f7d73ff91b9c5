"""`keel launch --target trainjob|slurm|sagemaker`: one resolution of recipe, cluster, overrides,
paths and secrets (keel/launch/job.py), rendered per target. The TrainJob matches its CRD schema
(tests/data/schemas/trainjob-v1alpha1.yaml); the batch script is valid bash that carries the
recipe byte for byte; the SageMaker request passes botocore's own validation against its
SageMaker service model, and the entrypoint reads the container contract's files as the
platform writes them. Bad input fails with the option named and nothing printed."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from data.errors import KeelError
from keel.cli import main as keel
from keel.launch.job import resolve_topology
from trainer.recipe import ClusterSection, load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart" / "sft-tool-calling.yaml"
TWO_NODES = REPO / "recipes" / "llama" / "llama-3.3-70b-sft-lora.yaml"  # cluster: 2 x 8 h100-80gb
IMAGE = "registry.example/keel-train:0.1.0"
ROLE = "arn:aws:iam::123456789012:role/keel-training"
SCHEMA = REPO / "tests" / "data" / "schemas" / "trainjob-v1alpha1.yaml"


def launch(capsys, *argv) -> tuple[int, str, str]:
    rc = keel(["launch", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------- the recipe's cluster


def test_cluster_section_is_typed_and_rejects_unknown_keys_and_gpus():
    recipe = load_recipe(TWO_NODES)
    assert (recipe.cluster.nodes, recipe.cluster.gpus_per_node, recipe.cluster.gpu) == (2, 8, "h100-80gb")
    with pytest.raises(KeelError, match=r"cluster.node: unknown key; did you mean 'nodes'\?"):
        load_recipe(TWO_NODES, ["cluster.node=2"])
    with pytest.raises(KeelError, match=r"cluster.gpu: 'h100' is not a GPU kind keel plan knows; did you mean "
                                        r"'h100-80gb'\?"):
        load_recipe(TWO_NODES, ["cluster.gpu=h100"])
    with pytest.raises(KeelError, match="cluster.gpus_per_node"):
        load_recipe(TWO_NODES, ["cluster.gpus_per_node=0"])


def test_flags_must_match_the_recipes_cluster_unless_the_override_is_explicit():
    cluster = ClusterSection(nodes=2, gpus_per_node=8, gpu="h100-80gb", efa=32)
    topo = resolve_topology(cluster, nodes=None, gpus_per_node=None, efa=None, source="r.yaml")
    assert (topo.nodes, topo.gpus_per_node, topo.processes_per_node, topo.efa) == (2, 8, 8, 32)
    with pytest.raises(KeelError, match=r"--nodes 4 does not match the recipe's cluster.nodes 2 .*override "
                                        r"cluster.nodes=4"):
        resolve_topology(cluster, nodes=4, gpus_per_node=None, efa=None, source="r.yaml")
    with pytest.raises(KeelError, match="--gpus-per-node is required: r.yaml has no cluster section"):
        resolve_topology(None, nodes=2, gpus_per_node=None, efa=None, source="r.yaml")
    cpu = resolve_topology(ClusterSection(gpus_per_node=2, gpu="cpu"), nodes=1, gpus_per_node=0, efa=None, source="q")
    assert (cpu.gpus_per_node, cpu.processes_per_node) == (0, 2)  # CPU nodes: no GPUs requested, 2 processes


def test_keel_train_defaults_to_the_recipes_cluster():
    from keel.cli import default_processes

    assert default_processes(load_recipe(QUICKSTART).cluster, gpus_here=0) == 2
    assert default_processes(load_recipe(TWO_NODES).cluster, gpus_here=8) == 8
    assert default_processes(load_recipe(TWO_NODES).cluster, gpus_here=0) == 1  # warned, not 8 CPU processes
    assert default_processes(None, gpus_here=4) == 4


# ---------------------------------------------------------------- Kubeflow Trainer v2


def trainjob_docs(capsys, *extra) -> dict[str, dict]:
    rc, out, err = launch(capsys, TWO_NODES, "--target", "trainjob", "--image", IMAGE, "--volume", "fsx:/fsx",
                          "--namespace", "ml", "--secret", "hf-token", "--queue", "team-a", "--efa", "32", *extra)
    assert rc == 0, err
    return {d["kind"]: d for d in yaml.safe_load_all(out)}


def test_trainjob_matches_its_crd_schema_and_the_check_is_live(capsys):
    import jsonschema

    schema = yaml.safe_load(SCHEMA.read_text())
    job = trainjob_docs(capsys)["TrainJob"]
    jsonschema.validate(job, schema)
    for breakage in (lambda j: j["spec"]["trainer"].update(numProcPerNode=0),
                     lambda j: j["spec"]["runtimeRef"].pop("name"),
                     lambda j: j["spec"]["trainer"].update(nprocPerNode=8),  # a PyTorchJob field, not a TrainJob's
                     lambda j: j["spec"]["runtimePatches"][0].pop("manager")):
        broken = json.loads(json.dumps(job))
        breakage(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def test_trainjob_runs_the_recipe_on_the_torch_runtime_with_secrets_by_reference(capsys):
    docs = trainjob_docs(capsys)
    job = docs["TrainJob"]
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                         "name": "torch-distributed"}
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 8)
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8", "vpc.amazonaws.com/efa": "32"}
    assert trainer["args"][:3] == ["/etc/keel/recipe.yaml", "output.dir=/fsx/runs/llama-3-3-70b-sft-lora",
                                   "data.cache_dir=/fsx/cache/prepared"]
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["KEEL_PREPARE"] == "1" and env["KEEL_WORKDIR"] == "/fsx" and env["FI_PROVIDER"] == "efa"
    assert env["KEEL_SECRET_DIRS"] == "/var/run/keel/secrets/hf-token"
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    volumes = {v["name"]: v for v in pod["template"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["secret-0"] == {"name": "secret-0", "secret": {"secretName": "hf-token"}}
    assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "fsx"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert docs["ConfigMap"]["data"]["recipe.yaml"] == TWO_NODES.read_text()
    # the pods load the recipe `keel validate` sees with the same arguments
    assert load_recipe(TWO_NODES, trainer["args"][1:]).output.dir == "/fsx/runs/llama-3-3-70b-sft-lora"


def test_pod_entrypoint_exports_mounted_secret_files_by_name(tmp_path):
    from keel.launch.pod_entrypoint import export_secret_files

    secret = tmp_path / "hf-token"
    secret.mkdir()
    (secret / "HF_TOKEN").write_text("planted-token")
    (secret / "..data").mkdir()  # the kubelet's own entries are not variables
    env = {}
    assert export_secret_files(env, str(secret)) == ["HF_TOKEN"] and env == {"HF_TOKEN": "planted-token"}
    with pytest.raises(KeelError, match="is the Secret mounted"):
        export_secret_files({}, str(tmp_path / "absent"))


# ---------------------------------------------------------------- Slurm


def slurm_script(capsys, *extra, recipe=TWO_NODES) -> str:
    rc, out, err = launch(capsys, recipe, "--target", "slurm", "--partition", "gpu", "--time", "2-00:00:00",
                          "--workdir", "/fsx/keel", *extra)
    assert rc == 0, err
    return out


def test_slurm_script_is_bash_with_the_clusters_sbatch_options(capsys):
    script = slurm_script(capsys, "--image", IMAGE, "--efa", "32", "--secret", "/home/me/.keel/secrets.env")
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # parses as bash
    options = re.findall(r"^#SBATCH (\S+)", script, re.M)
    for option in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive", "--partition=gpu",
                   "--time=2-00:00:00", "--requeue", "--signal=B:USR1@300", "--chdir=/fsx/keel"):
        assert option in options, option
    assert "export FI_PROVIDER=efa" in script and "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script
    assert "--container-image=registry.example/keel-train:0.1.0" in script
    assert "set -a; . /home/me/.keel/secrets.env; set +a" in script
    # data prepared on every node (one task each, its share of the rows by its Slurm node id), then trained on
    # every node; tests/unit/test_prepare_nodes.py runs this preparation step for real
    steps = re.findall(r"^srun (.*) \\\n    bash -c '(.*)' keel \"\$\{keel_args\[@\]\}\"", script, re.M)
    every_node = (f'--nodes=2 --ntasks-per-node=1 --cpus-per-task="$cpus_per_node" --kill-on-bad-exit=1 '
                  f"--container-image={IMAGE} "
                  "--container-mounts=/fsx/keel:/fsx/keel --container-workdir=/fsx/keel")
    assert [(options, re.search(r"\bexec (keel \w+)", command)[1]) for options, command in steps] == [
        (every_node, "keel prepare"), (every_node, "keel train")]
    assert steps[0][1].startswith('PET_NODE_RANK="$SLURM_NODEID" PET_NNODES=2 exec keel prepare')
    assert "srun --nodes=1" not in script
    assert '--rdzv-endpoint="$KEEL_HEAD:29500"' in script and "--nproc-per-node=8" in script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    assert "scontrol requeue" in script and "trap requeue USR1" in script


@pytest.mark.parametrize("job_cpus, per_task", [("96(x2)", "96"), ("72(x2),36", "36"), ("36,72(x3)", "36"),
                                                ("8", "8")])
def test_slurm_steps_give_their_one_task_the_cpus_the_job_holds_on_a_node(capsys, job_cpus, per_task):
    """srun gives a task 1 CPU unless told (since Slurm 22.05 it does not inherit sbatch's --cpus-per-task),
    and a task plugin that binds pins the task to it: all of torchrun's ranks and the preparation's workers
    on one core. Each step's single task asks for the CPUs the job holds on its smallest node."""
    script = slurm_script(capsys)
    sruns = re.findall(r"^srun .*", script, re.M)
    assert len(sruns) == 2 and all(' --cpus-per-task="$cpus_per_node" ' in line for line in sruns), sruns
    [count] = re.findall(r"^cpus_per_node=.*", script, re.M)
    assert script.index(count) < script.index(sruns[0])
    # the line as bash runs it, with SLURM_JOB_CPUS_PER_NODE as sbatch sets it (CPUs[(xNODES)],...)
    shown = subprocess.run(["bash", "-c", f'{count}\necho "$cpus_per_node"'], capture_output=True, text=True,
                           env={**os.environ, "SLURM_JOB_CPUS_PER_NODE": job_cpus}, check=True)
    assert shown.stdout == per_task + "\n", shown.stderr


def test_slurm_script_carries_the_recipe_as_written(capsys):
    script = slurm_script(capsys, "training.epochs=1")
    body = script.split("<<'KEEL_RECIPE_END'\n", 1)[1].split("\nKEEL_RECIPE_END\n", 1)[0]
    assert body + "\n" == TWO_NODES.read_text()
    args = re.search(r"^keel_args=\((.*)\)$", script, re.M)[1].split()
    assert args == ["/fsx/keel/runs/llama-3-3-70b-sft-lora/recipe.yaml", "output.dir=/fsx/keel/runs/llama-3-3-70b-sft-lora",
                    "data.cache_dir=/fsx/keel/cache/prepared", "training.epochs=1"]


def test_slurm_cpu_recipe_asks_for_no_gpus(capsys):
    script = slurm_script(capsys, recipe=QUICKSTART)
    assert "--gpus-per-node" not in "".join(re.findall(r"^#SBATCH .*", script, re.M))
    assert "--nproc-per-node=2" in script and "--container-image" not in script


# ---------------------------------------------------------------- SageMaker


def sagemaker_request(capsys, *extra, recipe=TWO_NODES) -> dict:
    rc, out, err = launch(capsys, recipe, "--target", "sagemaker", "--image", IMAGE, "--role", ROLE,
                          "--output-s3", "s3://my-bucket/keel/", "--instance-type", "ml.p5.48xlarge", "--spot",
                          "data.train=s3://my-bucket/data/chats.jsonl", "--channel", "docs=s3://my-bucket/docs/",
                          *extra)
    assert rc == 0, err
    return json.loads(out)


def test_sagemaker_request_passes_botocores_validation_against_the_service_model(capsys):
    import botocore.session
    from botocore.validate import ParamValidator

    shape = botocore.session.get_session().get_service_model("sagemaker").operation_model(
        "CreateTrainingJob").input_shape
    request = sagemaker_request(capsys)
    report = ParamValidator().validate(request, shape)
    assert not report.has_errors(), report.generate_report()
    broken = json.loads(json.dumps(request))
    broken["ResourceConfig"]["InstanceCount"] = "2"
    broken["HyperParameters"]["keel_nproc_per_node"] = 8
    assert ParamValidator().validate(broken, shape).has_errors()  # the check is live


def test_sagemaker_request_maps_the_recipe_to_the_container_contract(capsys):
    request = sagemaker_request(capsys)
    assert request["ResourceConfig"] == {"InstanceType": "ml.p5.48xlarge", "InstanceCount": 2, "VolumeSizeInGB": 500}
    assert request["CheckpointConfig"] == {"S3Uri": "s3://my-bucket/keel/llama-3-3-70b-sft-lora/checkpoints",
                                           "LocalPath": "/opt/ml/checkpoints"}
    assert request["EnableManagedSpotTraining"] is True
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in request["InputDataConfig"]}
    assert channels == {"train": "s3://my-bucket/data/chats.jsonl", "docs": "s3://my-bucket/docs/"}
    params = request["HyperParameters"]
    assert all(isinstance(v, str) for v in params.values())
    assert params["data.train"] == "/opt/ml/input/data/train/chats.jsonl"
    assert params["output.dir"] == "/opt/ml/checkpoints" and params["keel_nproc_per_node"] == "8"
    # the entrypoint's view of these hyperparameters is the recipe `keel validate` sees
    overrides = [f"{k}={v}" for k, v in params.items() if not k.startswith("keel_")]
    recipe = parse_recipe(params["keel_recipe"], "hyperparameters", overrides)
    assert recipe.to_dict() == load_recipe(TWO_NODES, overrides).to_dict()


def write_contract(root: Path, *, host: str, hosts: list[str], params: dict) -> None:
    config = root / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps(params))
    (config / "resourceconfig.json").write_text(json.dumps(
        {"current_host": host, "hosts": hosts, "network_interface_name": "eth0"}))


def test_sagemaker_entrypoint_reads_the_contract_files(tmp_path):
    from keel.launch.sagemaker_entrypoint import job_plan, train_command

    params = {"keel_recipe": "{}", "keel_nproc_per_node": "8", "data.train": "/opt/ml/input/data/train/x.jsonl",
              "training.max_steps": "50", "sagemaker_program": "ignored"}
    for rank, host in enumerate(["algo-1", "algo-2"]):
        root = tmp_path / host
        write_contract(root, host=host, hosts=["algo-1", "algo-2"], params=params)
        overrides, facts = job_plan(root, {})
        assert overrides == [f"data.train={root}/input/data/train/x.jsonl", "training.max_steps=50"]
        cmd = train_command(Path("r.yaml"), overrides, facts, root / "checkpoints")
        assert cmd[cmd.index("r.yaml") + 3] == f"output.dir={root}/checkpoints"
        assert {"--nproc-per-node=8", "--nnodes=2", f"--node-rank={rank}", "--master-addr=algo-1",
                "--master-port=29500"} <= set(cmd)


def test_sagemaker_entrypoint_writes_the_failure_reason(tmp_path, monkeypatch, capsys):
    from keel.launch.sagemaker_entrypoint import main

    write_contract(tmp_path, host="algo-1", hosts=["algo-1"], params={"training.max_steps": "5"})
    monkeypatch.setenv("KEEL_OPT_ML", str(tmp_path))
    assert main() == 2
    failure = (tmp_path / "output" / "failure").read_text()
    assert "hyperparameter keel_recipe is missing" in failure and "keel: error:" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input, every target

BAD = [
    (["--target", "sagemaker", "--image", IMAGE, "--output-s3", "s3://my-bucket/k/", "--instance-type", "ml.p5.48xlarge"],
     "--role is required for --target sagemaker"),
    (["--target", "sagemaker", "--role", ROLE, "--output-s3", "s3://my-bucket/k/", "--instance-type", "ml.p5.48xlarge"],
     "--image is required for --target sagemaker"),
    (["--target", "sagemaker", "--image", IMAGE, "--role", ROLE, "--output-s3", "s3://my-bucket/k/"],
     "--instance-type is required for --target sagemaker"),
    (["--target", "sagemaker", "--image", IMAGE, "--role", ROLE, "--output-s3", "s3://my-bucket/k/", "--instance-type",
      "ml.p5.48xlarge", "--channel", "docs=s3://AKIAEXAMPLE:planted-secret@my-bucket/docs/"],
     "--channel docs= s3://AKIAEXAMPLE:***@my-bucket/docs/: carries credentials in the URL"),
    (["--target", "sagemaker", "--image", IMAGE, "--role", ROLE, "--output-s3", "s3://my-bucket/k/", "--instance-type",
      "ml.p5.48xlarge", "data.train=s3://AKIAEXAMPLE:planted-secret@my-bucket/data/x.jsonl"],
     "data.train: s3://AKIAEXAMPLE:***@my-bucket/data/x.jsonl carries credentials in the URL"),
    (["--target", "trainjob"], "--image is required"),
    (["--target", "slurm", "--nodes", "4"], "--nodes 4 does not match the recipe's cluster.nodes 2"),
    (["--target", "trainjob", "--image", IMAGE, "--gpus-per-node", "4"],
     "--gpus-per-node 4 does not match the recipe's cluster.gpus_per_node 8"),
    (["--target", "slurm", "--partition", "gpu queue"], "--partition 'gpu queue': expected a Slurm name"),
    (["--target", "slurm", "--time", "two days"], "--time 'two days': expected a Slurm time limit"),
    (["--target", "slurm", "--secret", "hf-token"], "--secret 'hf-token': on Slurm, an absolute path"),
    (["--target", "slurm", "--role", ROLE], "--role does not apply to --target slurm; it is an option of --target "
                                            "sagemaker"),
    (["--target", "sagemaker", "--partition", "gpu"], "--partition does not apply to --target sagemaker"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_names_the_option_and_prints_nothing(argv, message, capsys):
    rc, out, err = launch(capsys, TWO_NODES, *argv)
    assert rc == 2 and out == "", out
    assert err.startswith("keel: error:") and message in err, err
    assert "planted-secret" not in err


def test_nodes_override_is_explicit_and_then_accepted(capsys):
    script = slurm_script(capsys, "--nodes", "4", "cluster.nodes=4")
    assert "#SBATCH --nodes=4" in script


def test_apply_without_sbatch_is_a_clear_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    rc, out, err = launch(capsys, TWO_NODES, "--target", "slurm", "--apply")
    assert rc == 2 and out == "" and "--apply runs sbatch, but sbatch is not on PATH" in err


def test_a_local_tracking_uri_stays_here_and_the_message_names_the_target(capsys, monkeypatch):
    """A file store on this machine is not handed to the job (its machines cannot see it), and the
    message says which machines and what to set instead."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///home/me/mlruns")
    rc, out, err = launch(capsys, QUICKSTART, "--target", "slurm")
    assert rc == 0 and "file:///home/me/mlruns" not in out
    assert "not passing MLFLOW_TRACKING_URI=file:///home/me/mlruns to the Slurm job's nodes" in err
    assert "tracking.mlflow.tracking_uri" in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    rc, out, err = launch(capsys, QUICKSTART, "--target", "slurm")
    assert rc == 0 and "MLFLOW_TRACKING_URI=http://mlflow.internal:5000" in out and "not passing" not in err
