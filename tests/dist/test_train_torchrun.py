"""The quickstart recipe trained by `keel train` under torchrun with 2 processes (gloo), logging
to a real `mlflow server` process: the run, the export and what MLflow holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from data.formats import load_format

QUICKSTART_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart" / "sft-tool-calling.yaml"
from data.model_dir import EXPORT_INFO_FILE, FORMAT_DIR, load_model_format, read_export_info

pytestmark = pytest.mark.dist
FMT = load_format("hermes-qwen3")


def test_two_process_run_succeeds(trained_run):
    assert trained_run.returncode == 0, trained_run.output[-6000:]
    out = trained_run.output
    assert "--nproc-per-node=2" in out
    max_steps = yaml.safe_load(QUICKSTART_RECIPE.read_text())["training"]["max_steps"]
    steps = [int(m) for m in re.findall(rf"\[keel\] step (\d+)/{max_steps} ", out)]
    assert steps and max(steps) == max_steps  # every optimizer step of the recipe ran
    assert "[keel] exported" in out


def test_export_is_a_complete_serving_dir(trained_run):
    model_dir = trained_run.model_dir
    assert (model_dir / "model.safetensors").is_file()
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert any("layers.0.self_attn.q_proj" in k for k in f.keys())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (model_dir / name).is_file(), name
    # the exact chat template used in training, and the format spec, travel with the model
    assert (model_dir / "chat_template.jinja").read_text() == FMT.chat_template
    exported = load_model_format(model_dir)
    assert exported.spec == FMT.spec and exported.chat_template == FMT.chat_template
    info = read_export_info(model_dir)
    assert info.seq_len == 1024 and info.world_size == 2 and info.format == "hermes-qwen3"
    assert (model_dir / FORMAT_DIR / "spec.yaml").is_file()
    # written under a temporary name and renamed: no leftovers
    assert not list(trained_run.run_dir.glob(".model*"))


def test_mlflow_run_has_recipe_params_loss_curve_and_template(trained_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=trained_run.tracking_uri)
    exp = client.get_experiment_by_name(trained_run.experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    quickstart = yaml.safe_load(QUICKSTART_RECIPE.read_text())
    assert float(params["training.learning_rate"]) == quickstart["training"]["learning_rate"]
    assert params["model.format"] == "hermes-qwen3"
    assert params["world_size"] == "2"
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert len(loss) >= 100  # one point per optimizer step
    first, last = loss[0].value, loss[-1].value
    assert last < first / 5, (first, last)  # it learned
    for metric in ("learning_rate", "grad_norm", "tokens_per_s", "trained_tokens_per_s", "memory_rss_gib"):
        assert client.get_metric_history(run.info.run_id, metric), metric
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "format", "loss_curve.png", "data"} <= artifacts
    # the prepared data's statistics: numbers as metrics, stats.json and the length plot as artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "data/train")} == {
        "data/train/stats.json", "data/train/lengths.png"}
    assert run.data.metrics["data.train.rows"] == 400 and run.data.metrics["data.train.sequences"] > 0
    template = client.download_artifacts(run.info.run_id, "format/chat_template.jinja")
    assert open(template).read() == FMT.chat_template
    recipe = yaml.safe_load(open(client.download_artifacts(run.info.run_id, "recipe.yaml")))
    assert recipe["model"]["format"] == "hermes-qwen3"
    assert recipe["training"] == {**recipe["training"], **quickstart["training"]}  # resolved = file + defaults


def test_mlflow_run_records_environment_and_node_metrics_but_no_secret(trained_run, tmp_path):
    from conftest import HF_TOKEN, TRACKING_PASSWORD
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=trained_run.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name(trained_run.experiment).experiment_id])[0]
    # the tracking URI keeps its user name and loses the password
    assert run.data.params["tracking.mlflow.tracking_uri"].startswith("http://keel:***@127.0.0.1:")
    # system metrics from the node's first process, named by node
    assert any(k.startswith("system/node_0/cpu_utilization_percentage") for k in run.data.metrics), \
        sorted(run.data.metrics)
    import torch

    freeze = open(client.download_artifacts(run.info.run_id, "environment/requirements.txt")).read()
    assert f"torch=={torch.__version__}" in freeze.splitlines()
    assert "keel.git_commit" in run.data.tags or "not in a git work tree" in open(
        client.download_artifacts(run.info.run_id, "environment/git.txt")).read()
    # no planted secret anywhere: params, tags, any artifact, the training log, and every file of
    # the run dir (keel-run.yaml, local metrics, checkpoints, the exported model)
    texts = [repr(run.data.params), repr(run.data.tags), trained_run.output]
    local = client.download_artifacts(run.info.run_id, "", str(tmp_path))
    texts += [p.read_bytes().decode("utf-8", "replace") for p in Path(local).rglob("*") if p.is_file()]
    texts += [p.read_bytes().decode("utf-8", "replace") for p in trained_run.run_dir.rglob("*") if p.is_file()]
    for secret in (TRACKING_PASSWORD, HF_TOKEN):
        assert not any(secret in t for t in texts), secret


def test_registered_model_is_pulled_by_reference_from_the_registry(trained_run, keel_env, tmp_path):
    """output.register_as registers the export by reference (MLflow 3's server refuses bare
    paths as sources): `keel pull models:/NAME/1` follows the reference to the same files."""
    import subprocess
    import sys

    from conftest import REGISTERED_NAME

    assert f"registered {trained_run.model_dir.resolve()} as models:/{REGISTERED_NAME}/1" in trained_run.output
    dest = tmp_path / "pulled"
    out = subprocess.run([sys.executable, "-m", "keel.cli", "pull", f"models:/{REGISTERED_NAME}/1", str(dest)],
                         env={**keel_env, "MLFLOW_TRACKING_URI": trained_run.tracking_uri}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (dest / name).read_bytes() == (trained_run.model_dir / name).read_bytes(), name
    gone = subprocess.run([sys.executable, "-m", "keel.cli", "pull", f"models:/{REGISTERED_NAME}/7", str(tmp_path / "x")],
                          env={**keel_env, "MLFLOW_TRACKING_URI": trained_run.tracking_uri}, capture_output=True,
                          text=True, timeout=300)
    assert gone.returncode != 0 and f"models:/{REGISTERED_NAME}/7" in gone.stderr
