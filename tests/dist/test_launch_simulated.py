"""A simulated `keel launch`: the rendered 2-node PyTorchJob run as the cluster would run it, on
this machine. Each pod's init container (`keel prepare`), then its main container through the
training image's own ENTRYPOINT (read from docker/train.Dockerfile), with the pod's rendered
arguments, working directory and env plus exactly what the operator injects for Master and
Worker (tests/kubeflow_operator.py). Standing in for the cluster: the ConfigMap is written to a
directory, the shared claim is a local directory, and the Master's Service name and port are
127.0.0.1 and a free port. The tiny model trains across both "pods" and exports once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import QUICKSTART_DATA, QUICKSTART_RECIPE, REPO, free_port, keel_cmd
from data.model_dir import read_export_info
from dockerfiles import last
from kubeflow_operator import pod_env
from keel.launch.pytorchjob import PORT, launch_manifests

pytestmark = pytest.mark.dist
JOB = "sim"
TIMEOUT_S = 900


def _container_argv(container: dict, image_entrypoint: list[str]) -> list[str]:
    """What the container runtime executes: `command` replaces the ENTRYPOINT, `args` follow."""
    argv = container.get("command") or image_entrypoint
    argv = argv + container.get("args", [])
    if argv[:1] == ["keel"]:
        return keel_cmd(*argv[1:])  # the images' `keel` console script
    assert argv[0] == "python", argv
    return [sys.executable, *argv[1:]]


def _kubelet_view(spec: dict, configmaps: dict[str, dict], root: Path) -> dict[str, str]:
    """Mount path -> local directory for the pod's ConfigMap volumes (files written out)."""
    mounts = {}
    for volume in spec["volumes"]:
        if "configMap" in volume:
            local = root / volume["name"]
            local.mkdir(parents=True, exist_ok=True)
            for key, text in configmaps[volume["configMap"]["name"]]["data"].items():
                (local / key).write_text(text)
            mounts[volume["name"]] = local
    return {m["mountPath"]: str(mounts[m["name"]]) for c in spec["containers"] for m in c["volumeMounts"]
            if m["name"] in mounts}


def _rewrite(value: str, mounts: dict[str, str]) -> str:
    for mount_path, local in mounts.items():
        if value == mount_path or value.startswith(mount_path + "/"):
            return local + value[len(mount_path):]
    return value


def test_rendered_job_trains_across_master_and_worker(tiny_model, keel_env, tmp_path):
    shared = tmp_path / "shared-claim"
    shared.mkdir()
    docs = launch_manifests(
        recipe_path=QUICKSTART_RECIPE, image="keel-train:test", nodes=2, gpus_per_node=0, name=JOB,
        volume=f"shared-claim:{shared}", max_restarts=0,
        # the quickstart recipe is sized for one CPU node with 2 processes: resized explicitly to 2 x 1
        overrides=["cluster.nodes=2", "cluster.gpus_per_node=1",
                   f"model.path={tiny_model}", f"data.train={QUICKSTART_DATA}", "training.max_steps=4",
                   "training.micro_batch_size=1", "training.log_every_steps=1"])
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    entrypoint = last(REPO / "docker" / "train.Dockerfile", "ENTRYPOINT").exec_form()
    port = str(free_port())

    pods, inits = [], []
    for rtype in ("Master", "Worker"):
        spec = job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]
        mounts = _kubelet_view(spec, configmaps, tmp_path / f"{rtype.lower()}-volumes")
        injected = {k: v.replace(f"{JOB}-master-0", "127.0.0.1").replace(str(PORT), port)
                    for k, v in pod_env(job, rtype, 0).items()}
        assert injected["PET_RDZV_ENDPOINT"] == f"127.0.0.1:{port}" and injected["MASTER_ADDR"] == "127.0.0.1"

        def run_as(container: dict, log: Path) -> subprocess.Popen:
            env = {**keel_env, "PYTHONPATH": os.pathsep.join([str(REPO), keel_env.get("PYTHONPATH", "")])}
            env.update({e["name"]: _rewrite(e["value"], mounts) for e in container.get("env", [])})
            env.update(injected)
            argv = [_rewrite(a, mounts) for a in _container_argv(container, entrypoint)]
            return subprocess.Popen(argv, cwd=_rewrite(container["workingDir"], mounts), env=env,
                                    stdout=log.open("w"), stderr=subprocess.STDOUT)

        # each pod's init containers run to completion before its main container starts, the pods
        # side by side (here: both pods' before either main container, as the cluster may order them)
        (init,) = spec["initContainers"]
        log = tmp_path / f"{rtype}-{init['name']}.log"
        inits.append((run_as(init, log), log))
        (trainer,) = [c for c in spec["containers"] if c["name"] == "pytorch"]
        pods.append((rtype, lambda trainer=trainer, run_as=run_as, rtype=rtype: run_as(trainer, tmp_path / f"{rtype}.log"),
                     tmp_path / f"{rtype}.log"))
    for proc, log in inits:
        assert proc.wait(timeout=TIMEOUT_S) == 0, log.read_text()[-4000:]
    pods = [(rtype, start(), log) for rtype, start, log in pods]

    codes = {}
    for rtype, proc, log in pods:
        try:
            codes[rtype] = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for _, p, _ in pods:
                p.kill()
            pytest.fail(f"{rtype} did not finish in {TIMEOUT_S}s:\n" + log.read_text()[-4000:])
    logs = {rtype: log.read_text() for rtype, _, log in pods}
    assert codes == {"Master": 0, "Worker": 0}, "\n\n".join(f"== {r}\n{t[-4000:]}" for r, t in logs.items())

    # the data was prepared once, on the shared volume, by both pods' init containers together
    # (data/shards.py): whichever finished last assembled the cache, the other reused it
    prep = [(tmp_path / f"{rtype}-prepare-data.log").read_text() for rtype in ("Master", "Worker")]
    assert sorted("train: built cache" in text for text in prep) == [False, True], prep
    assert sum("train: reused cache" in text for text in prep) == 1, prep
    assert "data.train prepared by 2 nodes" in "".join(prep)
    # both pods ran the image's entrypoint, which joined one c10d rendezvous of 2 nodes
    for text in logs.values():
        assert f"--nnodes=2:2 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:{port} --rdzv-id={JOB}" in text
    assert "[keel] step 4/4 " in logs["Master"] + logs["Worker"]
    model_dir = shared / "runs" / JOB / "model"
    assert (model_dir / "model.safetensors").is_file()
    info = read_export_info(model_dir)
    assert info.world_size == 2 and info.base_model == str(tiny_model)
    assert yaml.safe_load((model_dir / "keel-export.yaml").read_text())["format"] == "hermes-qwen3"
