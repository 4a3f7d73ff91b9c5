"""Session fixtures: one tiny model, one MLflow server, one 2-process training run, one vLLM
server. Each is built the first time a test asks for it and shared by every later test.

Nothing here downloads: the model and tokenizer are built locally by the same code path
`keel tiny-model` uses, and the data ships with the repository.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from keel import processes
from keel.processes import free_port, stop  # noqa: F401 (tests import them from here)

REPO = Path(__file__).resolve().parent.parent
QUICKSTART_RECIPE = REPO / "recipes" / "quickstart" / "sft-tool-calling.yaml"
QUICKSTART_DATA = REPO / "data" / "examples" / "tool-calling.jsonl"
API_KEY = "test-key-for-keel"
ADAPTER_NAME = "tools-lora"
# servers the tests start run from the repository root
start_server = functools.partial(processes.start_server, cwd=REPO)


def keel_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "keel.cli", *args]


@pytest.fixture(autouse=True)
def _tracking_uri_not_carried_between_tests(monkeypatch):
    """mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI, so a test that points MLflow at its
    own server (or back at the default store) would point every later test there: each test
    starts without it, and whatever it sets is undone after it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def export_untrained(base: Path, fmt, out_dir: Path, *, seq_len: int = 1024, dtype: str = "float32") -> Path:
    """A model dir written by the export's own writer (trainer/export.py write_model_dir) from an
    untrained base, as `keel train` writes a trained one: for tests about serving, where which
    weights the model has does not matter and a training run would only cost time."""
    from data.model_dir import ExportInfo
    from data.model_loading import load_causal_lm, load_tokenizer
    from trainer.export import write_model_dir

    model, tokenizer = load_causal_lm(base), load_tokenizer(base)
    return write_model_dir(model, tokenizer, fmt=fmt, out_dir=out_dir,
                           info=ExportInfo(base_model=str(base), format=fmt.name, seq_len=seq_len, dtype=dtype))


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("keel-session")


@pytest.fixture(scope="session")
def keel_env(session_dir) -> dict[str, str]:
    """Environment for `keel` subprocesses: a private data cache, no ambient MLflow URI."""
    env = dict(os.environ)
    env["KEEL_CACHE"] = str(session_dir / "cache")
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def tiny_model(session_dir) -> Path:
    from trainer.models.tiny import build_tiny_model

    return build_tiny_model(session_dir / "tiny-base")


@pytest.fixture(scope="session")
def tiny_model_for(session_dir, tiny_model):
    """tiny_model_for(format_name): a tiny model whose tokenizer holds that format's tokens and
    carries its template as its own chat template; each built once per session."""
    from trainer.models.tiny import build_tiny_model

    built = {"hermes-qwen3": tiny_model}

    def get(fmt_name: str) -> Path:
        if fmt_name not in built:
            built[fmt_name] = build_tiny_model(session_dir / f"tiny-{fmt_name}", fmt_name=fmt_name)
        return built[fmt_name]

    return get


def start_mlflow_server(root: Path, port: int) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on loopback with its store in `root`, up when /health answers. In a
    session of its own: its workers are its children, and os.killpg(proc.pid, ...) ends them all."""
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    proc, url = start_server(
        [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        log=root / "server.log", port=port, cwd=root, new_session=True, timeout_s=120)
    return proc, url


@pytest.fixture(scope="session")
def mlflow_server(session_dir):
    """A real `mlflow server` process on loopback."""
    proc, url = start_mlflow_server(session_dir / "mlflow-server", free_port())
    try:
        yield url
    finally:
        stop(proc)


TRACKING_PASSWORD = "tracking-pw-7f3a"  # planted secrets that no MLflow param or artifact may hold
HF_TOKEN = "hf_planted_secret_91c2"
REGISTERED_NAME = "keel-quickstart"  # the trained run's registry entry (models:/keel-quickstart/1)


@dataclass
class TrainedRun:
    run_dir: Path
    returncode: int
    output: str
    tracking_uri: str
    experiment: str

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


@pytest.fixture(scope="session")
def trained_run(session_dir, tiny_model, mlflow_server, keel_env) -> TrainedRun:
    """The quickstart recipe trained with `keel train` on 2 processes, logging to the server."""
    run_dir = session_dir / "quickstart-run"
    experiment = "keel-tests"
    proc = subprocess.run(
        keel_cmd("train", str(QUICKSTART_RECIPE), "--nproc-per-node", "2",
                 f"model.path={tiny_model}", f"output.dir={run_dir}",
                 # credentials in the URI (the server ignores them): they must not reach MLflow
                 f"tracking.mlflow.tracking_uri={mlflow_server.replace('://', f'://keel:{TRACKING_PASSWORD}@')}",
                 f"tracking.mlflow.experiment={experiment}", "tracking.mlflow.system_metrics_every_s=2",
                 f"output.register_as={REGISTERED_NAME}"),
        cwd=REPO, env={**keel_env, "HF_TOKEN": HF_TOKEN}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800,
    )
    (session_dir / "train.log").write_text(proc.stdout)
    return TrainedRun(run_dir, proc.returncode, proc.stdout, mlflow_server, experiment)


@pytest.fixture(scope="session")
def lora_run(session_dir, trained_run, mlflow_server, keel_env) -> TrainedRun:
    """A LoRA adapter trained by `keel train` on the trained model and exported unmerged
    (output.merge_lora=false): what `keel serve --adapter` serves beside its base."""
    assert trained_run.returncode == 0, trained_run.output[-4000:]
    run_dir = session_dir / "lora-run"
    experiment = "keel-tests-lora"
    proc = subprocess.run(
        keel_cmd("train", str(QUICKSTART_RECIPE), "--nproc-per-node", "1", f"model.path={trained_run.model_dir}",
                 f"output.dir={run_dir}", "peft.kind=lora", "peft.r=8", "peft.alpha=16", "output.merge_lora=false",
                 "training.max_steps=30", "training.log_every_steps=10", "checkpoint.every_steps=1000",
                 f"tracking.mlflow.tracking_uri={mlflow_server}", f"tracking.mlflow.experiment={experiment}"),
        cwd=REPO, env=keel_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200,
    )
    (session_dir / "train-lora.log").write_text(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return TrainedRun(run_dir, proc.returncode, proc.stdout, mlflow_server, experiment)


@pytest.fixture(scope="session")
def served_process(session_dir, trained_run, lora_run, keel_env):
    """`keel serve` on the trained model with a LoRA adapter beside it: a real vLLM OpenAI
    server (CPU build), API key on, Keel's parsers and middleware. Shared by every serving test
    that does not need a server configured otherwise. (process, base URL)."""
    port = free_port()
    proc, url = start_server(
        keel_cmd("serve", str(trained_run.model_dir), "--host", "127.0.0.1", "--port", str(port),
                 "--api-key", API_KEY, "--adapter", f"{ADAPTER_NAME}={lora_run.model_dir}"),
        # vLLM's INFO lines (its startup arguments among them) in the log whatever the caller's
        # environment sets: the API-key test reads them.
        log=session_dir / "vllm-server.log", env={**keel_env, "VLLM_LOGGING_LEVEL": "INFO"}, port=port)
    try:
        yield proc, url
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def served_model(served_process) -> str:
    return served_process[1]


@pytest.fixture(scope="session")
def api_key() -> str:
    return API_KEY


@pytest.fixture(scope="session")
def adapter_name() -> str:
    return ADAPTER_NAME


@pytest.fixture(scope="session")
def openai_client(served_model):
    from openai import OpenAI

    return OpenAI(base_url=served_model + "/v1", api_key=API_KEY)


@pytest.fixture(scope="session")
def base_model_name(openai_client, adapter_name) -> str:
    return next(m.id for m in openai_client.models.list().data if m.id != adapter_name)


def pytest_collection_modifyitems(config, items):
    """Tests that start servers of their own run before those that share `served_model`: the
    shared server lives until the session ends, and two vLLM servers on a 2-core machine
    starve each other (each binds its threads to the cores). A test marked `ends_shared_server`
    (it kills the shared server's engine, saving a server start of its own) runs last of all."""
    def order(item):
        if item.get_closest_marker("ends_shared_server"):
            return 2
        return 1 if "served_process" in getattr(item, "fixturenames", ()) else 0

    items.sort(key=order)


def pytest_terminal_summary(terminalreporter):
    """How many inputs each property test tried (tests/unit/test_hostile_inputs.py)."""
    lines = [f"  {report.nodeid.split('::')[-1]}: {value}"
             for report in terminalreporter.stats.get("passed", [])
             for name, value in report.user_properties if name == "inputs_tried"]
    if lines:
        terminalreporter.write_line(f"inputs tried by property tests ({len(lines)} tests):")
        for line in lines:
            terminalreporter.write_line(line)


def trained_spans(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of trained tokens in a rendered example's labels."""
    from data.render import IGNORE_INDEX

    spans, start = [], None
    for k, lab in enumerate([*labels, IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = k
        elif lab == IGNORE_INDEX and start is not None:
            spans.append((start, k))
            start = None
    return spans
