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
AWS_SECRET = "planted-aws-secret-6d1f"  # moto accepts any key pair; this one must show up nowhere


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
           "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
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

    # a second run on the same node reuses the fetched base model, and reads its data from S3
    fs.put(str(data), f"{BUCKET}/data/train.jsonl")
    again = run(train_cmd(Path("unused"), Path("unused"), Path("unused"), f"model.path=s3://{BUCKET}/models/tiny-base",
                          f"data.train=s3://{BUCKET}/data/train.jsonl", f"output.dir=s3://{BUCKET}/runs/second",
                          "training.max_steps=1"), s3_env)
    assert again.returncode == 0, again.stdout[-4000:]
    assert "fetching" not in again.stdout

    # the AWS secret the runs used appears in no output of either run (every rank's lines are in
    # it), in nothing they wrote to S3, nor in the node's cache of fetched models and prepared data
    stored = [fs.cat_file(p) for p in fs.find(f"{BUCKET}/runs")]
    cached = [p.read_bytes() for p in Path(s3_env["KEEL_CACHE"]).rglob("*") if p.is_file()]
    assert stored and cached
    for text in (out.stdout, again.stdout, *stored, *cached):
        assert (AWS_SECRET if isinstance(text, str) else AWS_SECRET.encode()) not in text


def test_missing_model_on_s3_fails_before_any_worker_starts(s3_env, tmp_path):
    s3(s3_env)
    data = small_data(tmp_path / "train.jsonl", rows=4)
    out = run(train_cmd(Path("unused"), tmp_path / "run", data, f"model.path=s3://{BUCKET}/models/nope"), s3_env,
              timeout=300)
    assert out.returncode != 0
    assert f"model.path: s3://{BUCKET}/models/nope holds no config.json" in out.stdout, out.stdout[-2000:]
    assert "keel.torchrun" not in out.stdout  # no worker was launched
    assert not (tmp_path / "run").exists()


def test_credentials_inside_s3_urls_are_refused_and_never_shown(s3_env, tmp_path):
    """s3fs does not read user:password@ from an s3:// URL, and Keel would print and store the
    URL: such a run stops at the recipe, naming each key, before any worker or upload, and the
    planted secret is in none of its output."""
    planted = "planted-url-secret-0b7a"
    data = small_data(tmp_path / "train.jsonl", rows=4)
    out = run(train_cmd(Path("unused"), Path("unused"), data, f"model.path=s3://AKIAKEEL:{planted}@{BUCKET}/models/x",
                        f"data.train=s3://AKIAKEEL:{planted}@{BUCKET}/data/train.jsonl",
                        f"output.dir=s3://AKIAKEEL:{planted}@{BUCKET}/runs/leak"), s3_env, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:]
    for key in ("model.path", "data.train", "output.dir"):
        assert f"{key}: s3://AKIAKEEL:***@{BUCKET}/" in out.stdout and "carries credentials" in out.stdout, out.stdout
    assert planted not in out.stdout and "keel.torchrun" not in out.stdout
    assert not s3(s3_env).exists(f"{BUCKET}/runs/leak")
