"""The training image's entrypoint: torchrun options from the environment each PyTorchJob pod
gets (tests/kubeflow_operator.py models the operator), and clear errors where a pod's
environment cannot work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from data.errors import KeelError
from kubeflow_operator import pod_env
from keel.launch.pod_entrypoint import command, torchrun_args
from keel.launch.pytorchjob import launch_manifests

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "quickstart" / "sft-tool-calling.yaml"


def rendered_job(nodes: int, gpus: int = 8) -> dict:
    # the quickstart recipe is sized for 1 CPU node: resized explicitly, as `keel launch` requires
    sized = [f"cluster.nodes={nodes}", f"cluster.gpus_per_node={gpus}", "cluster.gpu=h100-80gb"]
    docs = launch_manifests(recipe_path=RECIPE, overrides=sized, image="keel-train:test", nodes=nodes,
                            gpus_per_node=gpus, name="sft", volume="shared:/mnt/shared", max_restarts=2)
    return docs[-1]


def test_multi_node_job_joins_one_rendezvous_on_the_master():
    job = rendered_job(nodes=3)
    cmds = [torchrun_args(pod_env(job, rtype, i)) for rtype, i in [("Master", 0), ("Worker", 0), ("Worker", 1)]]
    assert cmds[0] == cmds[1] == cmds[2]  # elastic: the rendezvous, not the operator, assigns node ranks
    args = cmds[0]
    assert "--nnodes=3:3" in args and "--nproc-per-node=8" in args and "--max-restarts=2" in args
    assert "--rdzv-backend=c10d" in args and "--rdzv-endpoint=sft-master-0:23456" in args
    assert "--rdzv-id=sft" in args and "--rdzv-conf=join_timeout=1800" in args
    assert not any(a.startswith("--node-rank") for a in args)


def test_single_node_job_runs_standalone_with_the_rendered_restarts():
    job = rendered_job(nodes=1, gpus=4)
    env = pod_env(job, "Master", 0)
    env.update({e["name"]: e["value"] for e in
                job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]})
    assert torchrun_args(env) == ["--nproc-per-node=4", "--max-restarts=2", "--standalone"]


def test_static_rendezvous_from_master_and_worker_env():
    # a PyTorchJob without elasticPolicy (or a TrainJob): every node is told its rank
    base = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_MASTER_ADDR": "job-master-0",
            "PET_MASTER_PORT": "29400", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "29400", "WORLD_SIZE": "2"}
    master = torchrun_args({**base, "RANK": "0", "PET_NODE_RANK": "0"})
    worker = torchrun_args({**base, "RANK": "1", "PET_NODE_RANK": "1"})
    assert master[-4:] == ["--nnodes=2", "--node-rank=0", "--master-addr=job-master-0", "--master-port=29400"]
    assert worker[-4:] == ["--nnodes=2", "--node-rank=1", "--master-addr=job-master-0", "--master-port=29400"]


def test_trainjob_env_and_default_port():
    env = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "gpu", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "tj-node-0-0.tj"}
    assert torchrun_args(env) == ["--nproc-per-node=gpu", "--max-restarts=0", "--nnodes=2", "--node-rank=1",
                                  "--master-addr=tj-node-0-0.tj", "--master-port=23456"]


def test_command_runs_the_trainer_module_with_the_recipe_and_overrides():
    cmd = command(["/etc/keel/recipe.yaml", "training.max_steps=4"], {"PET_NNODES": "1"})
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[-4:] == ["-m", "trainer", "/etc/keel/recipe.yaml", "training.max_steps=4"]


@pytest.mark.parametrize("env, message", [
    # a Worker-only job without elasticPolicy: the operator injects no master address
    ({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1"}, r"no \$PET_MASTER_ADDR or \$MASTER_ADDR"),
    ({"PET_NNODES": "2", "PET_MASTER_ADDR": "m"}, r"\$RANK is not set"),
    ({"PET_NNODES": "2", "PET_MASTER_ADDR": "m", "PET_NODE_RANK": "2"}, r"\$PET_NODE_RANK=2 is outside 0..1"),
    ({"PET_NPROC_PER_NODE": "eight"}, r"\$PET_NPROC_PER_NODE='eight'"),
    ({"PET_NNODES": "two"}, r"\$PET_NNODES='two' is not an integer"),
    ({"PET_RDZV_ENDPOINT": "m:23456", "PET_NNODES": "1:x"}, r"\$PET_NNODES='1:x'"),
    ({"PET_MAX_RESTARTS": "-"}, r"\$PET_MAX_RESTARTS='-'"),
])
def test_environment_that_cannot_work_is_an_error_naming_the_variable(env, message):
    with pytest.raises(KeelError, match=message):
        torchrun_args(env)


def test_entrypoint_exits_2_with_the_reason_before_starting_torchrun():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "keel.launch.pod_entrypoint", "/etc/keel/recipe.yaml"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("keel: error: $PET_NNODES=2 but no $PET_MASTER_ADDR")
    assert "torch.distributed.run" not in proc.stdout
