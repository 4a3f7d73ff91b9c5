"""The vLLM command line `keel serve` builds from what it is asked to serve."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data.errors import KeelError
from data.formats import load_format
from data.model_dir import EXPORT_INFO_FILE, FORMAT_DIR
from serving.engine import Target
from serving.server import KEEL_ROOT, server_env, vllm_command

FMT = load_format("hermes-qwen3")
CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 1319,
          "max_position_embeddings": 4096, "tie_word_embeddings": True}


def export(d: Path, info: dict, *, adapter_rank: int | None = None) -> Path:
    (d / FORMAT_DIR).mkdir(parents=True)
    if adapter_rank is None:
        (d / "config.json").write_text(json.dumps(CONFIG))
    else:
        (d / "adapter_config.json").write_text(json.dumps({"r": adapter_rank, "peft_type": "LORA"}))
    shutil.copy(FMT.directory / "spec.yaml", d / FORMAT_DIR / "spec.yaml")
    (d / FORMAT_DIR / "chat_template.jinja").write_text(FMT.chat_template)
    (d / "chat_template.jinja").write_text(FMT.chat_template)
    (d / EXPORT_INFO_FILE).write_text(yaml.safe_dump(info))
    return d


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return export(tmp_path / "run" / "model", {"seq_len": 2048, "dtype": "float32"})


@pytest.fixture
def adapter_dir(tmp_path, model_dir) -> Path:
    return export(tmp_path / "lora-run" / "model", {"seq_len": 2048, "dtype": "float32", "adapter": True,
                                                    "base_model": str(model_dir)}, adapter_rank=12)


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def keel_serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keel.cli", "serve", *args], capture_output=True, text=True,
                          cwd=KEEL_ROOT, env={**os.environ, **(env or {})}, timeout=120)


def test_command_comes_from_the_model_dir(model_dir):
    cmd = vllm_command(model_dir, host="127.0.0.1", port=8123)
    assert cmd[:3] == [sys.executable, "-m", "serving.vllm_server"]  # vLLM's main + an exit status
    assert flag(cmd, "--chat-template") == str(model_dir / "chat_template.jinja")
    assert flag(cmd, "--tool-call-parser") == "keel_hermes" and flag(cmd, "--tool-parser-plugin") == "serving.parsers"
    assert "--enable-auto-tool-choice" in cmd and flag(cmd, "--reasoning-parser") == "qwen3"
    assert flag(cmd, "--max-model-len") == "2048" and flag(cmd, "--port") == "8123"
    assert flag(cmd, "--dtype") == "float32"  # as trained, not vLLM's CPU default of bfloat16
    assert flag(cmd, "--middleware") == "serving.middleware.KeelMiddleware"
    assert int(flag(cmd, "--shutdown-timeout")) > 0  # drain in-flight requests on SIGTERM
    assert "--enable-lora" not in cmd


def test_extra_args_pass_through_and_override(model_dir):
    cmd = vllm_command(model_dir, host="h", port=1, extra=["--max-model-len", "512", "--seed", "3"])
    assert cmd.count("--max-model-len") == 1 and cmd[-4:] == ["--max-model-len", "512", "--seed", "3"]
    assert "--dtype" in cmd  # only the overridden setting is dropped


def test_gpu_target_sets_parallelism_and_memory(model_dir):
    cmd = vllm_command(model_dir, host="h", port=1, target=Target(gpus=2, gpu_memory_gib=24))
    assert flag(cmd, "--tensor-parallel-size") == "2" and flag(cmd, "--gpu-memory-utilization") == "0.88"


def test_api_key_goes_by_env_not_argv(model_dir):
    cmd = vllm_command(model_dir, host="h", port=1)
    env = server_env("s3cret")
    assert "s3cret" not in " ".join(cmd)
    assert env["KEEL_API_KEY"] == "s3cret" and env["VLLM_API_KEY"] == "s3cret"
    # the server process imports this Keel's middleware and parsers
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(KEEL_ROOT)
    assert "KEEL_API_KEY" not in server_env(None)


def test_an_adapter_export_serves_its_base_with_the_adapter(adapter_dir, model_dir):
    cmd = vllm_command(adapter_dir, host="h", port=1)
    assert flag(cmd, "--model") == str(model_dir)
    assert flag(cmd, "--lora-modules") == f"lora-run={adapter_dir.resolve()}"  # named after its run
    assert flag(cmd, "--max-lora-rank") == "16" and flag(cmd, "--max-loras") == "1"  # rank 12 rounded up


def test_base_with_named_adapters(model_dir, adapter_dir, tmp_path):
    other = export(tmp_path / "other" / "model", {"base_model": str(model_dir), "adapter": True}, adapter_rank=64)
    cmd = vllm_command(model_dir, host="h", port=1, adapters=[f"tools={adapter_dir}", str(other)])
    i = cmd.index("--lora-modules")
    assert cmd[i + 1:i + 3] == [f"tools={adapter_dir.resolve()}", f"other={other.resolve()}"]
    assert flag(cmd, "--max-lora-rank") == "64" and flag(cmd, "--max-loras") == "2"
    with pytest.raises(KeelError, match="names must differ"):
        vllm_command(model_dir, host="h", port=1, adapters=[f"a={adapter_dir}", f"a={other}"])
    with pytest.raises(KeelError, match="no adapter_config.json"):
        vllm_command(model_dir, host="h", port=1, adapters=[f"a={model_dir}"])


def test_an_adapter_trained_with_another_format_is_refused(model_dir, tmp_path):
    other = export(tmp_path / "x" / "model", {"base_model": str(model_dir), "adapter": True}, adapter_rank=8)
    (other / FORMAT_DIR / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(KeelError, match="different format or template"):
        vllm_command(model_dir, host="h", port=1, adapters=[str(other)])


def test_not_a_model_dir(tmp_path):
    with pytest.raises(KeelError, match="no config.json"):
        vllm_command(tmp_path, host="h", port=1)


def test_cli_errors_exit_2_with_the_reason(tmp_path, adapter_dir, model_dir):
    r = keel_serve(str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("keel: error:") and "no config.json" in r.stderr
    r = keel_serve(str(tmp_path / "missing"))
    assert r.returncode == 2 and "no such model directory" in r.stderr
    shutil.rmtree(model_dir)  # the adapter's base is gone
    r = keel_serve(str(adapter_dir))
    assert r.returncode == 2 and "base model" in r.stderr and "--adapter" in r.stderr
    r = keel_serve()
    assert r.returncode == 2 and "KEEL_MODEL_DIR" in r.stderr


def test_unknown_registry_model_exits_2(tmp_path):
    r = keel_serve("models:/no-such-model/1", env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                                   "KEEL_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2 and "keel: error: models:/no-such-model/1: download failed" in r.stderr


def test_model_host_and_port_from_the_environment(model_dir):
    """The container sets these (SageMaker: port 8080, the model in /opt/ml/model)."""
    r = keel_serve("--dry-run", env={"KEEL_MODEL_DIR": str(model_dir), "KEEL_PORT": "8080", "KEEL_HOST": "0.0.0.0"})
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.strip().splitlines()[-1].split()
    assert flag(cmd, "--model") == str(model_dir) and flag(cmd, "--port") == "8080" and flag(cmd, "--host") == "0.0.0.0"


def test_serving_image_defaults_to_sagemakers_place_and_port():
    serve = (KEEL_ROOT / "docker" / "serve").read_text()
    assert "/opt/ml/model" in serve and "exec keel serve" in serve
    for dockerfile in ("serve.Dockerfile", "serve-cpu.Dockerfile"):
        assert "KEEL_PORT=8080" in (KEEL_ROOT / "docker" / dockerfile).read_text()
