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
from typing import Iterator
from urllib.parse import urlsplit

from data.options import ArgumentParser
from data.errors import KeelError
from data.files import parse_json, read_json, read_yaml
from data.tracking_client import bound_mlflow_retries

METRICS_FILE = "metrics.jsonl"
PENDING_DIR = "mlflow-pending"  # params, tags and artifacts of a run the server has not seen yet
REGISTRATION_FILE = "register.json"  # in PENDING_DIR: a registry entry the run could not make
RUN_ID_FILE = "mlflow_run_id"
NOT_METRICS = ("step", "timestamp")
MAX_BATCH = 1000  # MLflow's log_batch accepts at most 1000 metrics per call
MAX_PARAM_BATCH = 100  # and at most 100 params


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
    for where, rec in metric_records(run_dir / METRICS_FILE):
        step, stamp = rec.get("step"), rec.get("timestamp", 0)
        values = {k: v for k, v in rec.items() if k not in NOT_METRICS}
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (step, stamp)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
            raise KeelError(f"{where}: a metric record needs a whole-number step and timestamp and numeric values; "
                            "this line was not written by Keel: delete it and run keel sync again")
        for key, value in values.items():
            points.setdefault(key, {}).setdefault((step, float(value)), stamp)
    return points


def metric_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(FILE:LINE, record) for each line of a run's metrics.jsonl. A last line without its newline
    that is not JSON is what a process killed mid-write leaves: it is skipped, with a note; any
    other bad line is an error naming it."""
    if not path.is_file():
        return
    data = path.read_bytes()
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            # NaN is kept: a loss that turned non-finite is recorded as json.dumps writes it
            yield where, parse_json(raw.decode("utf-8"), where, what="metric record", expect=dict,
                                    allow_constants=True)
        except (KeelError, UnicodeDecodeError) as exc:
            if number == len(lines):  # no newline after it: cut short when the writer stopped
                print(f"[keel] {where}: skipping the last line, cut short when the run stopped", file=sys.stderr)
                return
            why = f"{where}: not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else str(exc)
            raise KeelError(f"{why}; delete that line (it was not written whole) and run keel sync again") from None


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
        params = (read_json(pending / "params.json", what="pending params", expect=dict)
                  if (pending / "params.json").is_file() else {})
        items = list(params.items())
        for i in range(0, len(items), MAX_PARAM_BATCH):
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + MAX_PARAM_BATCH]])
        if (pending / "tags.json").is_file():
            for key, value in read_json(pending / "tags.json", what="pending tags", expect=dict).items():
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
        entry = read_json(pending / REGISTRATION_FILE, what="pending registration", expect=dict)
        if not isinstance(entry.get("name"), str) or not isinstance(entry.get("model_location"), str):
            raise KeelError(f"{pending / REGISTRATION_FILE}: needs a name and a model_location; delete it and "
                            "register the export by hand")
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
    p = ArgumentParser(prog="keel sync", description="Send a run's metrics (and, if its MLflow run was "
                                "never created, its params and artifacts) that did not reach the tracking server "
                                "while it trained. Safe to run more than once.")
    p.add_argument("run_dir", help="the run's output.dir")
    p.add_argument("--tracking-uri", help="default: the recipe's tracking.mlflow.tracking_uri, else "
                   "$MLFLOW_TRACKING_URI (a password in it is not kept in the run dir: set "
                   "$MLFLOW_TRACKING_PASSWORD, or pass the whole URI here)")
    a = p.parse_args(argv)
    from trainer.resilience.run_identity import RUN_FILE

    run_dir = Path(a.run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise KeelError(f"{run_dir} is not a Keel run dir (no {RUN_FILE}): pass the output.dir of a `keel train` run")
    saved = read_yaml(run_dir / RUN_FILE, what="run record") or {}
    mlflow_cfg = saved
    for key in ("recipe", "tracking", "mlflow"):
        mlflow_cfg = mlflow_cfg.get(key) or {} if isinstance(mlflow_cfg, dict) else None
    if not isinstance(mlflow_cfg, dict):
        raise KeelError(f"{run_dir / RUN_FILE}: not a Keel run record (expected a mapping whose recipe.tracking.mlflow "
                        "is a section); pass the output.dir of a `keel train` run")
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
