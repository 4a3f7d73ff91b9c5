"""Server lifecycles, each ending the server it uses:

- the serving image's `serve` command (docker/serve) started as a container would start it
  (model and port from the environment the image sets), on a `models:/NAME/VERSION` registry
  model: SageMaker's /ping and /invocations with the API key, served under the registered
  name; then SIGTERM while a request is in flight: it finishes, new requests and the probes get
  503, exit 0;
- the engine process of the shared server dies: the server must exit non-zero, so a supervisor
  restarts it (vLLM itself exits 0). This runs last (marker `ends_shared_server`) instead of
  starting a server of its own: a cold start costs 1-2 minutes on the CI machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from data.synthetic import TOOLS
from tests.conftest import REPO, free_port, start_server, stop

pytestmark = pytest.mark.serving


def engine_core(proc: subprocess.Popen) -> psutil.Process:
    kids = psutil.Process(proc.pid).children(recursive=True)
    found = [k for k in kids if "EngineCore" in k.name() or "EngineCore" in " ".join(k.cmdline())]
    assert found, f"no EngineCore among {[(k.pid, k.name()) for k in kids]}"
    return found[0]


def register(trained_run, name: str) -> str:
    """The trained model into the registry the way a server can serve it from anywhere: its
    files logged to the training run's artifacts, a version made from them. (A bare local path
    is refused by the MLflow 3 server unless it lies inside the run's artifact directory.)"""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from data.model_dir import read_export_info

    client = MlflowClient(tracking_uri=trained_run.tracking_uri)
    run_id = read_export_info(trained_run.model_dir).mlflow_run_id
    client.log_artifacts(run_id, str(trained_run.model_dir), "model")
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass
    return client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id).version


def test_container_serve_command_on_a_registry_model_then_graceful_shutdown(session_dir, trained_run, keel_env,
                                                                           mlflow_server, api_key):
    name = "keel-tiny-tools"
    version = register(trained_run, name)
    port = free_port()
    # what the serving image sets, with the model from the registry instead of /opt/ml/model
    env = {**keel_env, "MLFLOW_TRACKING_URI": mlflow_server, "KEEL_MODEL_DIR": f"models:/{name}/{version}",
           "KEEL_PORT": str(port), "KEEL_HOST": "127.0.0.1", "KEEL_API_KEY": api_key,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    proc, url = start_server(["sh", str(REPO / "docker" / "serve")], log=session_dir / "serve-command.log", env=env,
                             port=port)
    headers = {"Authorization": f"Bearer {api_key}"}
    try:
        models = requests.get(url + "/v1/models", headers=headers, timeout=30).json()["data"]
        assert [m["id"] for m in models] == [name]  # served under its registered name
        # SageMaker's routes: /ping open, /invocations (an OpenAI chat body) behind the key
        assert requests.get(url + "/ping", timeout=30).status_code == 200
        body = {"messages": [{"role": "user", "content": "What's the weather in Paris?"}], "max_tokens": 200,
                "temperature": 0, "tools": TOOLS}
        assert requests.post(url + "/invocations", json=body, timeout=60).status_code == 401
        r = requests.post(url + "/invocations", json=body, timeout=120, headers=headers)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"], r.text
        started, result = threading.Event(), {}

        def long_request():
            body = {"model": name, "messages": [{"role": "user", "content": "Tell me about Paris."}],
                    "max_tokens": 600, "min_tokens": 600, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            with requests.post(url + "/v1/chat/completions", json=body, headers=headers, stream=True,
                               timeout=300) as r:
                finish, usage = None, None
                for line in r.iter_lines():
                    if line.startswith(b"data: {"):
                        started.set()
                        chunk = json.loads(line[6:])
                        usage = chunk.get("usage") or usage
                        for choice in chunk["choices"]:
                            finish = choice.get("finish_reason") or finish
                result.update(status=r.status_code, finish=finish, usage=usage, done_at=time.time())

        thread = threading.Thread(target=long_request)
        thread.start()
        assert started.wait(120)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        refused = requests.post(url + "/v1/chat/completions", headers=headers, timeout=30, json={
            "model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        health = requests.get(url + "/health", timeout=30).status_code
        still_in_flight = "done_at" not in result
        thread.join(timeout=300)
        assert still_in_flight, "the in-flight request finished before the new one was sent; nothing was tested"
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert health == 503  # load balancers stop sending traffic
        assert result["status"] == 200 and result["finish"] == "length"
        assert result["usage"]["completion_tokens"] == 600  # the in-flight request ran to its end
        assert proc.wait(timeout=120) == 0
    finally:
        stop(proc)


@pytest.mark.ends_shared_server
def test_engine_death_exits_non_zero(served_process, openai_client, base_model_name):
    proc, _url = served_process
    assert openai_client.chat.completions.create(model=base_model_name, max_tokens=2,
                                                 messages=[{"role": "user", "content": "Hi"}]).choices
    engine_core(proc).kill()
    returncode = proc.wait(timeout=120)
    assert returncode != 0, "the server exited 0 after its engine died"
