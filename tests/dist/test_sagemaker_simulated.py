"""A simulated SageMaker training job: the request `keel launch --target sagemaker` renders, run as
the platform runs it, on this machine. Two hosts (algo-1, algo-2), each a directory standing in
for its /opt/ml (KEEL_OPT_ML) with the contract's files written from the request: its
hyperparameters.json (strings), its resourceconfig.json (network interface lo; the host names
resolved to loopback by KEEL_HOST_ADDRESSES), and the channels the request names, "downloaded"
into input/data/<channel>. Each runs the training image's own ENTRYPOINT (docker/train.Dockerfile)
with `train`, as `docker run IMAGE train` does.

A spot interruption (SIGTERM to both containers) after the first checkpoint leaves a checkpoint
and a failure reason; the restart (fresh containers, /opt/ml/checkpoints put back from S3: here
algo-1's copied to both) resumes from it and exports into algo-1's /opt/ml/model. One training,
interrupted once."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dist_helpers import QUICKSTART_RECIPE, REPO, small_data, wait_for
from dockerfiles import last
from keel.launch.sagemaker import training_job_request
from keel.processes import free_port
from trainer.resilience.checkpoints import COMPLETE_MARKER

pytestmark = [pytest.mark.dist, pytest.mark.slow]
HOSTS = ["algo-1", "algo-2"]
STEPS, EVERY = 30, 5


def _contract(root: Path, host: str, request: dict, port: int, sources: dict[str, Path]) -> None:
    config = root / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps({**request["HyperParameters"],
                                                             "keel_master_port": str(port)}))
    (config / "resourceconfig.json").write_text(json.dumps(
        {"current_host": host, "hosts": HOSTS, "network_interface_name": "lo"}))
    for channel in request["InputDataConfig"]:  # what SageMaker downloads before the container starts
        name = channel["ChannelName"]
        uri = channel["DataSource"]["S3DataSource"]["S3Uri"]
        dest = root / "input" / "data" / name
        if uri.endswith("/"):
            shutil.copytree(sources[name], dest)
        else:
            dest.mkdir(parents=True)
            shutil.copy(sources[name], dest / uri.rsplit("/", 1)[1])
    (root / "model").mkdir()
    (root / "checkpoints").mkdir()


def _start(roots: dict[str, Path], keel_env: dict) -> dict[str, subprocess.Popen]:
    entrypoint = last(REPO / "docker" / "train.Dockerfile", "ENTRYPOINT").exec_form()
    assert entrypoint[0] == "python"
    procs = {}
    for host, root in roots.items():
        env = {**keel_env, "KEEL_OPT_ML": str(root), "PYTHONPATH": str(REPO),
               "KEEL_HOST_ADDRESSES": json.dumps({"algo-1": "127.0.0.1"})}
        procs[host] = subprocess.Popen([sys.executable, *entrypoint[1:], "train"], cwd=root, env=env,
                                       stdout=open(root / f"log-{len(list(root.glob('log-*')))}.txt", "w"),
                                       stderr=subprocess.STDOUT)
    return procs


def test_two_hosts_train_through_the_container_contract_and_a_restart_resumes(tmp_path, tiny_model, keel_env):
    data = small_data(tmp_path / "chats.jsonl", rows=48)
    request = training_job_request(
        recipe_path=QUICKSTART_RECIPE, image="registry.example/keel-train:0.1.0",
        role="arn:aws:iam::123456789012:role/keel-training", output_s3="s3://my-bucket/keel/",
        instance_type="ml.c7i.4xlarge", nodes=2, name="sm-sim",
        overrides=["cluster.nodes=2", "cluster.gpus_per_node=1", "model.path=s3://my-bucket/models/tiny/",
                   "data.train=s3://my-bucket/data/chats.jsonl", "training.seq_len=512", "training.warmup_ratio=0",
                   f"training.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=2",
                   "tracking.mlflow.experiment=keel-sagemaker-sim"])
    assert {c["ChannelName"] for c in request["InputDataConfig"]} == {"train", "model"}
    port = free_port()
    roots = {h: tmp_path / h for h in HOSTS}
    for host, root in roots.items():
        _contract(root, host, request, port, {"train": data, "model": tiny_model})

    # first attempt: interrupted (spot) once algo-1 holds a complete checkpoint
    procs = _start(roots, keel_env)
    first = roots["algo-1"] / "checkpoints" / "checkpoints" / f"checkpoint-{EVERY}" / COMPLETE_MARKER
    try:
        wait_for(first.exists, 600, "the first checkpoint in algo-1's /opt/ml/checkpoints", procs["algo-1"],
                 every_s=0.5)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {h: p.wait(timeout=300) for h, p in procs.items()}
    log = (roots["algo-1"] / "log-0.txt").read_text()
    assert codes["algo-1"] != 0, log[-3000:]
    failure = (roots["algo-1"] / "output" / "failure").read_text()
    assert "SIGTERM" in failure and len(failure) <= 1025, failure

    # restart: fresh containers; SageMaker puts the checkpoints back from S3 on every host
    for host, root in roots.items():
        shutil.rmtree(root / "output")
        if host != "algo-1":
            shutil.copytree(roots["algo-1"] / "checkpoints", root / "checkpoints", dirs_exist_ok=True)
            # On SageMaker every host sees the same /opt/ml paths; here each has its own root, so the
            # run record that came "from S3" names algo-1's root: map it, as the real paths would be.
            record = root / "checkpoints" / "keel-run.yaml"
            record.write_text(record.read_text().replace(str(roots["algo-1"]), str(root)))
    procs = _start(roots, keel_env)
    codes = {h: p.wait(timeout=900) for h, p in procs.items()}
    log = (roots["algo-1"] / "log-1.txt").read_text()
    assert codes == {"algo-1": 0, "algo-2": 0}, log[-4000:] + (roots["algo-2"] / "log-1.txt").read_text()[-2000:]
    resumed = re.findall(r"resumed from checkpoint step (\d+)", log)
    assert resumed and int(resumed[0]) >= EVERY, log[-4000:]
    assert "--nnodes=2 --node-rank=0 --master-addr=127.0.0.1" in log
    model = roots["algo-1"] / "model"
    assert (model / "keel-export.yaml").is_file() and (model / "config.json").is_file()
    assert not any((roots["algo-2"] / "model").iterdir())  # one export, from the first host
    assert not (roots["algo-1"] / "output" / "failure").exists()
    assert os.path.samefile(model / "config.json", roots["algo-1"] / "checkpoints" / "model" / "config.json")
