"""model.path and output.dir on S3, against a real S3 server on loopback (moto's server mode, a
separate process): the base model is fetched once per node and reused, the export is uploaded
with a completion marker written last, and a missing model fails before any worker starts."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import free_port, start_server, stop
from dist_helpers import run, small_data, train_cmd

pytestmark = pytest.mark.dist
BUCKET = "keel-test"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    # moto[server] (dev extra) and s3fs (a Keel dependency) are installed by `make install`: a
    # missing one fails here rather than skipping the S3 tests unnoticed
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    port = free_port()
    proc, url = start_server([moto, "-H", "127.0.0.1", "-p", str(port)], log=tmp_path_factory.mktemp("moto") / "moto.log",
                             env=dict(os.environ), port=port, timeout_s=60, health="/moto-api/")
    try:
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def s3_env(s3_server, keel_env, tmp_path_factory):
    env = {**keel_env, "AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "KEEL_CACHE": str(tmp_path_factory.mktemp("keel-cache"))}
    return env


def make_bucket(env):
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)


def s3(env):
    import s3fs

    make_bucket(env)
    return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                             client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"], "region_name": "us-east-1"})


def test_model_from_s3_and_export_to_s3(s3_env, tiny_model, tmp_path):
    fs = s3(s3_env)
    fs.put(str(tiny_model) + "/", f"{BUCKET}/models/tiny-base/", recursive=True)
    assert fs.exists(f"{BUCKET}/models/tiny-base/config.json")
    data = small_data(tmp_path / "train.jsonl", rows=16)

    out = run(train_cmd(Path("unused"), Path("unused"), data, f"model.path=s3://{BUCKET}/models/tiny-base",
                        f"output.dir=s3://{BUCKET}/runs/first", "training.max_steps=3"), s3_env)
    assert out.returncode == 0, out.stdout[-4000:]
    # one fetch for the node (the launcher's), which every worker then found in the cache
    assert out.stdout.count(f"fetching s3://{BUCKET}/models/tiny-base") == 1, out.stdout[-4000:]
    exported = {p.rsplit("/", 1)[-1] for p in fs.find(f"{BUCKET}/runs/first/model")}
    assert {"config.json", "model.safetensors", "tokenizer.json", ".keel-upload-complete"} <= exported, exported
    assert f"exported s3://{BUCKET}/runs/first/model" in out.stdout

    from transformers import AutoModelForCausalLM

    local = tmp_path / "downloaded"
    fs.get(f"{BUCKET}/runs/first/model/", str(local) + "/", recursive=True)
    AutoModelForCausalLM.from_pretrained(local)  # a complete, loadable model

    # a second run on the same node reuses the fetched base model
    again = run(train_cmd(Path("unused"), Path("unused"), data, f"model.path=s3://{BUCKET}/models/tiny-base",
                          f"output.dir=s3://{BUCKET}/runs/second", "training.max_steps=1"), s3_env)
    assert again.returncode == 0, again.stdout[-4000:]
    assert "fetching" not in again.stdout


def test_missing_model_on_s3_fails_before_any_worker_starts(s3_env, tmp_path):
    s3(s3_env)
    data = small_data(tmp_path / "train.jsonl", rows=4)
    out = run(train_cmd(Path("unused"), tmp_path / "run", data, f"model.path=s3://{BUCKET}/models/nope"), s3_env,
              timeout=300)
    assert out.returncode != 0
    assert f"model.path: s3://{BUCKET}/models/nope holds no config.json" in out.stdout, out.stdout[-2000:]
    assert "torch.distributed.run" not in out.stdout  # no worker was launched
    assert not (tmp_path / "run").exists()
