"""The MLflow server away, through the real mechanisms: a port nothing listens on, and a real
`mlflow server` killed during training and started again on the same port and store. Training
goes on with a warning; every metric it logged reaches the server once it is back: at the end
of the run if the server is back by then, else by `keel sync RUN_DIR`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dist_helpers import REPO, losses, small_data, train_cmd, wait_for
from tests.conftest import free_port, keel_cmd, start_mlflow_server

pytestmark = pytest.mark.slow

STEPS = 30
EXPERIMENT = "keel-faults"
REGISTERED = "keel-faults-model"


def kill_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the server and its workers, no shutdown of any kind
    proc.wait()


def local_points(run_dir: Path) -> dict[str, set[tuple[int, float]]]:
    points: dict[str, set] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for key, value in rec.items():
            if key not in ("step", "timestamp"):
                points.setdefault(key, set()).add((rec["step"], value))
    return points


def server_points(uri: str, run_id: str, keys) -> dict[str, set[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return {key: {(m.step, m.value) for m in client.get_metric_history(run_id, key)} for key in keys}


def tracker_away_at_start(run_dir: Path, uri: str):
    """Rank 0's tracker callback, in this process, started while nothing listens at `uri`; it
    logs data statistics and three steps."""
    from trainer.recipe import MlflowSection
    from trainer.tracking.tracker import RunTracker

    run_dir.mkdir()
    tracker = RunTracker(mlflow_section=MlflowSection(tracking_uri=uri, experiment=EXPERIMENT, run_name="away"),
                         params={"training.seed": 0}, artifacts={"recipe.yaml": "training: {seed: 0}\n"},
                         tags={"keel.test": "away"}, run_dir=run_dir, is_main=True, log_every=1)
    t0 = time.time()
    tracker.start()
    assert time.time() - t0 < 10, "a dead tracking port stalled the start"
    assert tracker.run_id is None
    tracker.log_stats("data.train", {"rows": 48})
    state = SimpleNamespace(global_step=0, max_steps=3)
    for step in (1, 2, 3):
        state.global_step = step
        tracker.on_log(None, state, None, logs={"loss": 2.0 / step, "learning_rate": 1e-3 * step})
    return tracker


@pytest.mark.dist
def test_mlflow_away_at_start_or_mid_run_training_goes_on_and_every_metric_reaches_the_server(
        tmp_path, tiny_model, keel_env, monkeypatch):
    """One server, killed and started again, for three runs (a server start is the slow part):
    1. `keel train` with output.register_as while the server is killed mid-run: the run
       finishes, says so, names `keel sync`, and keeps the registry entry it could not make;
    2. a tracker started while the port is dead (rank 0's callback, in this process), whose
       server comes back before the end: its run is created and its metrics sent at the end;
    3. `keel sync` for run 1 once the server is back: the server then holds exactly what the run
       logged locally (system metrics sampled while it was away too) and the registry holds its
       export, once; a second sync sends nothing."""
    import mlflow
    from mlflow.tracking import MlflowClient

    port, store = free_port(), tmp_path / "mlflow"
    server, uri = start_mlflow_server(store, port)
    data = small_data(tmp_path / "data.jsonl")
    trained = tmp_path / "trained"
    args = (f"training.max_steps={STEPS}", "checkpoint.every_steps=1000", "tracking.mlflow.system_metrics_every_s=0.5",
            f"tracking.mlflow.tracking_uri={uri}", f"tracking.mlflow.experiment={EXPERIMENT}")
    proc = subprocess.Popen(train_cmd(tiny_model, trained, data, *args, f"output.register_as={REGISTERED}", nproc=1), cwd=REPO, env=keel_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (trained / "metrics.jsonl").is_file() and len(losses(trained)) >= 2, 600,
                 "two logged steps", proc)
        kill_server(server)
        killed_ms = time.time() * 1000
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        if server.poll() is None:
            kill_server(server)
    assert proc.returncode == 0, out[-4000:]  # the run finished and exported without its server
    assert f"MLflow at {uri} is unreachable" in out and f"keel sync {trained}" in out, out[-4000:]
    assert f"not registered as {REGISTERED!r} yet" in out, out[-4000:]
    assert sorted(losses(trained)) == list(range(1, STEPS + 1))
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    cpu = "system/node_0/cpu_utilization_percentage"
    assert any(cpu in r and r["timestamp"] > killed_ms for r in records), "no system sample kept while away"
    trained_id = (trained / "mlflow_run_id").read_text().strip()

    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        monkeypatch.setenv(name, value)  # what the tracker sets; restored for the tests after this one
    previous_uri = mlflow.get_tracking_uri()
    away = tmp_path / "away"
    server = None
    try:
        try:
            tracker = tracker_away_at_start(away, uri)
            server, _ = start_mlflow_server(store, port)  # back, on the same port and store
            tracker.finish()
            away_id = (away / "mlflow_run_id").read_text().strip()
        finally:
            if mlflow.active_run():
                mlflow.end_run()
            mlflow.set_tracking_uri(previous_uri)
        client = MlflowClient(tracking_uri=uri)
        local = local_points(away)
        assert local["loss"] == {(1, 2.0), (2, 1.0), (3, 2.0 / 3)} and local["data.train.rows"] == {(0, 48.0)}
        assert server_points(uri, away_id, local) == local
        run = client.get_run(away_id)
        assert run.data.params == {"training.seed": "0"} and run.data.tags["keel.test"] == "away"
        assert run.info.status == "FINISHED" and run.info.run_name == "away"

        synced = subprocess.run(keel_cmd("sync", str(trained)), cwd=REPO, env=keel_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=300)
        assert synced.returncode == 0, synced.stdout[-4000:]
        local = local_points(trained)
        # every point, system metrics sampled while the server was away included
        assert len(local["loss"]) == STEPS and cpu in local and server_points(uri, trained_id, local) == local
        assert f"registered the run's export as models:/{REGISTERED}/1" in synced.stdout, synced.stdout[-4000:]
        versions = client.search_model_versions(f"name='{REGISTERED}'")
        assert [(v.run_id, v.tags["keel.model_location"]) for v in versions] == [
            (trained_id, str((trained / "model").resolve()))]
        again = subprocess.run(keel_cmd("sync", str(trained)), cwd=REPO, env=keel_env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, timeout=300)
        assert again.returncode == 0 and "0 metric points sent" in again.stdout, again.stdout[-4000:]
        assert "registered" not in again.stdout and len(client.search_model_versions(f"name='{REGISTERED}'")) == 1
        assert client.get_run(trained_id).info.status == "FINISHED"
    finally:
        if server is not None:
            kill_server(server)
