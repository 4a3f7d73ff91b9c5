"""The vLLM command line `keel serve` builds from a model dir."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from data.errors import KeelError
from data.formats import load_format
from data.model_dir import EXPORT_INFO_FILE, FORMAT_DIR
from serving.server import server_env, vllm_command

FMT = load_format("hermes-qwen3")


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "model"
    (d / FORMAT_DIR).mkdir(parents=True)
    (d / "config.json").write_text("{}")
    shutil.copy(FMT.directory / "spec.yaml", d / FORMAT_DIR / "spec.yaml")
    (d / FORMAT_DIR / "chat_template.jinja").write_text(FMT.chat_template)
    (d / "chat_template.jinja").write_text(FMT.chat_template)
    (d / EXPORT_INFO_FILE).write_text(yaml.safe_dump({"seq_len": 2048, "dtype": "float32"}))
    return d


def test_command_comes_from_the_model_dir(model_dir):
    cmd = vllm_command(model_dir, host="127.0.0.1", port=8123)
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    assert f"--chat-template {model_dir / 'chat_template.jinja'}" in joined
    assert "--enable-auto-tool-choice --tool-call-parser hermes" in joined
    assert "--reasoning-parser qwen3" in joined
    assert "--max-model-len 2048" in joined and "--port 8123" in joined
    assert "--dtype float32" in joined  # as trained, not vLLM's CPU default of bfloat16


def test_extra_args_pass_through_and_override(model_dir):
    cmd = vllm_command(model_dir, host="h", port=1, extra=["--max-model-len", "512", "--seed", "3"])
    assert cmd.count("--max-model-len") == 1 and cmd[-4:] == ["--max-model-len", "512", "--seed", "3"]


def test_api_key_goes_by_env_not_argv(model_dir):
    cmd = vllm_command(model_dir, host="h", port=1)
    env = server_env("s3cret")
    assert "s3cret" not in " ".join(cmd) and env["VLLM_API_KEY"] == "s3cret"


def test_not_a_model_dir(tmp_path):
    with pytest.raises(KeelError, match="no config.json"):
        vllm_command(tmp_path, host="h", port=1)
