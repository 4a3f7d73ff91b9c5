"""What MLflow should hold for a run, kept in the run dir, and `keel sync RUN_DIR` to send it.

Training must not stop or stall because the tracking server is down (restarting, a network
partition, a wrong port). Rank 0 appends every metric record it logs to RUN_DIR/metrics.jsonl
before it sends anything; when the server cannot be reached, the run goes on with the records
kept there (and, if the MLflow run could not even be created, its params, tags and artifacts
in RUN_DIR/mlflow-pending/). The tracker retries while training and once more at the end;
`keel sync RUN_DIR` sends whatever is still missing later. Sending is idempotent: the server's
history of each metric is read first and only (step, value) pairs it lacks are logged, so
syncing twice, or after a partial send, never duplicates a point.

MLflow's own client retries a failed request 7 times with exponential backoff (minutes in
all); with the local record that is not needed, so the retries are bounded here and a dead
server costs training a few seconds once, not minutes per logged step.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

METRICS_FILE = "metrics.jsonl"
PENDING_DIR = "mlflow-pending"  # params, tags and artifacts of a run the server has not seen yet
REGISTRATION_FILE = "register.json"  # in PENDING_DIR: a registry entry the run could not make
RUN_ID_FILE = "mlflow_run_id"
NOT_METRICS = ("step", "timestamp")
MAX_BATCH = 1000  # MLflow's log_batch accepts at most 1000 metrics per call
MAX_PARAM_BATCH = 100  # and at most 100 params


def bound_mlflow_retries() -> None:
    """Fail fast instead of MLflow's minutes of retries; an operator's explicit setting wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def use_tracking_uri(uri: str | None) -> None:
    """Point MLflow at `uri`. Credentials written into it (https://user:password@host) move to
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, which MLflow sends as basic auth, so
    the password is not printed in MLflow's "View run at" lines or Keel's logs."""
    import os
    from urllib.parse import unquote, urlsplit, urlunsplit

    import mlflow

    bound_mlflow_retries()
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return
    parts = urlsplit(uri)
    if parts.username is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username))
        if parts.password is not None:
            os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password))
        uri = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    mlflow.set_tracking_uri(uri)


def tracking_reachable(uri: str, timeout_s: float = 2.0) -> bool:
    """Whether an http(s) tracking server accepts connections (other stores are local: True)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return True
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def append_record(run_dir: Path, record: dict) -> None:
    with (run_dir / METRICS_FILE).open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_local(run_dir: Path) -> dict[str, dict[tuple[int, float], int]]:
    """From the run's local record, in one pass: metric key -> {(step, value): the timestamp it
    was first recorded at}."""
    points: dict[str, dict[tuple[int, float], int]] = {}
    path = run_dir / METRICS_FILE
    for line in path.read_text().splitlines() if path.is_file() else ():
        if not line.strip():
            continue
        rec = json.loads(line)
        step, stamp = int(rec["step"]), int(rec.get("timestamp", 0))
        for key, value in rec.items():
            if key not in NOT_METRICS:
                points.setdefault(key, {}).setdefault((step, float(value)), stamp)
    return points


def save_pending(run_dir: Path, *, params: dict | None = None, tags: dict | None = None,
                 artifacts: dict[str, str] | None = None, files: tuple[str, list[Path]] | None = None,
                 registration: dict | None = None) -> None:
    """Keep what the MLflow run should have been created with (or, for `registration`, what
    should have been registered at its end), for a later sync."""
    pending = run_dir / PENDING_DIR
    (pending / "artifacts").mkdir(parents=True, exist_ok=True)
    for name, values in (("params.json", params), ("tags.json", tags), (REGISTRATION_FILE, registration)):
        if values:
            (pending / name).write_text(json.dumps(values, indent=1))
    for path, text in (artifacts or {}).items():
        dst = pending / "artifacts" / path
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(text)
    if files:
        directory, paths = files
        for local in paths:
            dst = pending / "artifacts" / directory / Path(local).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, dst)


def register_export(client, run_id: str, name: str, model_location: str, *, upload: bool = False) -> str:
    """Register an export in MLflow's model registry under `name`; returns models:/NAME/VERSION.

    By reference to where the export lives: an s3:// URI is the version's source itself; a path
    (a shared volume) is recorded in a small `model-ref` artifact of the run (MLflow 3's server
    refuses bare local paths as sources) that `keel pull` / `keel serve` follow. With `upload`
    (output.register_upload) the weights themselves are logged as run artifacts, so the version
    works without access to the output dir. Either way the version carries the location as the
    tag keel.model_location."""
    from mlflow.exceptions import MlflowException

    from data.model_dir import MODEL_REF_FILE

    if "://" in model_location:
        source = model_location
    elif upload:
        client.log_artifacts(run_id, model_location, "model")
        source = f"runs:/{run_id}/model"
    else:
        client.log_text(run_id, json.dumps({"location": model_location}) + "\n", f"model-ref/{MODEL_REF_FILE}")
        source = f"runs:/{run_id}/model-ref"
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(name, source=source, run_id=run_id,
                                          tags={"keel.model_location": model_location})
    return f"models:/{name}/{version.version}"


def sync_run(run_dir: Path, *, experiment: str, run_name: str | None) -> tuple[str, int, str | None]:
    """Send what the server lacks to the run's MLflow run (creating it from mlflow-pending/ if
    the server never saw it), at the tracking URI MLflow is pointed at, and make the registry
    entry the run could not make. (run id, points sent, models:/NAME/VERSION registered or None).
    Raises what MLflow raises when the server is unreachable."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    id_file = run_dir / RUN_ID_FILE
    pending = run_dir / PENDING_DIR
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        run_id = client.create_run(exp_id, run_name=run_name).info.run_id
        id_file.write_text(run_id + "\n")
    if pending.is_dir():
        params = json.loads((pending / "params.json").read_text()) if (pending / "params.json").is_file() else {}
        items = list(params.items())
        for i in range(0, len(items), MAX_PARAM_BATCH):
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + MAX_PARAM_BATCH]])
        if (pending / "tags.json").is_file():
            for key, value in json.loads((pending / "tags.json").read_text()).items():
                client.set_tag(run_id, key, value)
        if (pending / "artifacts").is_dir() and any((pending / "artifacts").iterdir()):
            client.log_artifacts(run_id, str(pending / "artifacts"))
    missing = []
    for key, points in read_local(run_dir).items():
        on_server = {(m.step, m.value) for m in client.get_metric_history(run_id, key)}
        missing += [Metric(key, value, points[step, value], step) for step, value in sorted(points.keys() - on_server)]
    for i in range(0, len(missing), MAX_BATCH):
        client.log_batch(run_id, metrics=missing[i:i + MAX_BATCH])
    registered = None
    if (pending / REGISTRATION_FILE).is_file():
        entry = json.loads((pending / REGISTRATION_FILE).read_text())
        registered = register_export(client, run_id, entry["name"], entry["model_location"],
                                     upload=bool(entry.get("upload")))
        (pending / REGISTRATION_FILE).unlink()  # at once: a sync that dies after this does not register twice
    shutil.rmtree(pending, ignore_errors=True)
    return run_id, len(missing), registered



def without_redacted_password(uri: str | None) -> str | None:
    """The run file's tracking URI with its redacted password removed (the user name stays), so
    the password comes from $MLFLOW_TRACKING_PASSWORD rather than being sent as '***'."""
    from urllib.parse import urlunsplit

    from data.redaction import REDACTED

    if not uri:
        return uri
    parts = urlsplit(uri)
    if parts.password != REDACTED:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{host}" if parts.username else host))


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="keel sync", description="Send a run's metrics (and, if its MLflow run was "
                                "never created, its params and artifacts) that did not reach the tracking server "
                                "while it trained. Safe to run more than once.")
    p.add_argument("run_dir", help="the run's output.dir")
    p.add_argument("--tracking-uri", help="default: the recipe's tracking.mlflow.tracking_uri, else "
                   "$MLFLOW_TRACKING_URI (a password in it is not kept in the run dir: set "
                   "$MLFLOW_TRACKING_PASSWORD, or pass the whole URI here)")
    a = p.parse_args(argv)
    import yaml

    from data.errors import KeelError
    from trainer.resilience.run_identity import RUN_FILE

    run_dir = Path(a.run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise KeelError(f"{run_dir} is not a Keel run dir (no {RUN_FILE}): pass the output.dir of a `keel train` run")
    saved = yaml.safe_load((run_dir / RUN_FILE).read_text(encoding="utf-8")) or {}
    mlflow_cfg = (saved.get("recipe") or {}).get("tracking", {}).get("mlflow", {})
    import mlflow

    from data.redaction import redact_text

    bound_mlflow_retries()
    use_tracking_uri(a.tracking_uri or without_redacted_password(mlflow_cfg.get("tracking_uri")))
    uri = mlflow.get_tracking_uri()
    if not tracking_reachable(uri):
        raise KeelError(f"the tracking server {redact_text(uri)} is not reachable; nothing was sent. Run "
                        f"`keel sync {run_dir}` again when it is back.")
    run_id, sent, registered = sync_run(run_dir, experiment=mlflow_cfg.get("experiment", "keel"),
                                        run_name=mlflow_cfg.get("run_name"))
    if saved.get("status") == "finished":
        from mlflow.tracking import MlflowClient

        MlflowClient().set_terminated(run_id, "FINISHED")
    print(f"[keel] synced {run_dir} to MLflow run {run_id} at {redact_text(uri)}: {sent} metric points sent",
          file=sys.stdout, flush=True)
    if registered:
        print(f"[keel] registered the run's export as {registered}", flush=True)
    return 0
