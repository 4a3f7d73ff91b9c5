"""What a run records about itself: no secret reaches MLflow, the environment is recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.recipe import flatten, load_recipe
from data.redaction import REDACTED, redact_text
from trainer.run_facts import installed_packages, redact, run_environment

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart" / "sft-tool-calling.yaml"


def test_recipe_secrets_are_hidden_in_params_and_the_recipe_artifact():
    recipe = load_recipe(QUICKSTART, [
        "tracking.mlflow.tracking_uri=https://alice:hunter2-secret@mlflow.internal:5000",
        "data.train=https://bob:tok-abc123@data.internal/train.jsonl?sig=s1gn4ture&x=1",
        "tracking.mlflow.run_name=plain run",
    ])
    public = flatten(redact(recipe.to_dict()))
    text = repr(public)
    for secret in ("hunter2-secret", "tok-abc123", "s1gn4ture"):
        assert secret not in text
    assert public["tracking.mlflow.tracking_uri"] == f"https://alice:{REDACTED}@mlflow.internal:5000"
    assert public["data.train"] == f"https://bob:{REDACTED}@data.internal/train.jsonl?sig={REDACTED}&x=1"
    assert public["tracking.mlflow.run_name"] == "plain run"  # nothing else is touched
    assert public["training.learning_rate"] == recipe.training.learning_rate


def test_keys_named_like_secrets_are_hidden_whatever_their_value():
    assert redact({"hub": {"token": "hf_xyz", "api_key": "k", "name": "m"}}) == {
        "hub": {"token": REDACTED, "api_key": REDACTED, "name": "m"}}


def test_package_list_hides_credentials_in_vcs_urls():
    assert redact_text("pkg @ git+https://ghp_t0ken@host/org/pkg.git\n") == f"pkg @ git+https://{REDACTED}@host/org/pkg.git\n"


def test_environment_records_packages_and_keel_commit():
    artifacts, tags = run_environment(str(QUICKSTART))
    freeze = artifacts["environment/requirements.txt"]
    import torch

    assert f"torch=={torch.__version__}" in freeze.splitlines()
    assert "git.txt" in "".join(artifacts)
    if (QUICKSTART.parents[2] / ".git").exists():  # a git checkout of Keel: its commit is a tag
        assert len(tags["keel.git_commit"].split("-")[0]) == 40
    assert installed_packages() == installed_packages()  # stable order


def test_mfu_estimate_follows_6nd_over_peak():
    from trainer.models.flops import training_flops_per_token
    from trainer.tracking.tracker import mfu

    # Llama 3.1 8B at 3,000 tokens/s per H100 across 8 GPUs: 6 x 8.03e9 x 24,000 / (8 x 989e12)
    six_n = training_flops_per_token(trained=8_030_000_000)  # full fine-tuning: 6 x N per token
    assert mfu(24_000, flops_per_token=six_n, world=8, device_name="NVIDIA H100 80GB HBM3") == \
        pytest.approx(6 * 8.03e9 * 3000 / 989e12)
    assert 0.1 < mfu(24_000, flops_per_token=six_n, world=8, device_name="NVIDIA H100 80GB HBM3") < 0.2
    assert mfu(1000, flops_per_token=60, world=1, device_name="Some Unknown GPU") is None
