"""`keel pull URI DEST`: fetch an exported model dir before the server starts.

A Kubernetes init container runs it (keel/launch/deploy.py) so the server container only ever
sees a complete model. MLflow's artifact client does the transfer, so one code path covers
`models:/NAME/VERSION` (the registry; $MLFLOW_TRACKING_URI says where) and storage URIs
such as `s3://bucket/runs/sft/model` (credentials from the usual AWS variables or the pod's
service-account role).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from data.errors import KeelError
from data.files import read_json
from data.options import ArgumentParser, check_model_uri, check_output_dir
from data.tracking_client import bound_mlflow_retries
from data.redaction import redact_text
from data.model_dir import MODEL_REF_FILE

PULLED_MARKER = ".keel-pulled"


# what MLflow's download_artifacts reads: its registry and runs, and the artifact stores it supports
SCHEMES = ("models:/", "runs:/", "s3://", "gs://", "wasbs://", "abfss://", "hdfs://", "file://", "http://", "https://",
           "mlflow-artifacts://")


def check_pull_uri(uri: str) -> str:
    if not uri.startswith(SCHEMES):
        scheme = uri.split(":", 1)[0] + ":" if ":" in uri else None
        got = f"scheme {scheme!r} is not one Keel pulls from" if scheme else "not a URI"
        raise KeelError(f"{redact_text(uri)!r}: {got}; expected models:/NAME/VERSION or a storage URI such as "
                        f"s3://bucket/path/model ({', '.join(SCHEMES)})")
    return check_model_uri(uri)


def pull_model(uri: str, dest: str | Path) -> Path:
    """Download the model dir at `uri` into `dest` (created if needed); returns `dest`. A failed pull
    leaves `dest` as it found it: a directory it created is removed again."""
    check_pull_uri(uri)
    dest = check_output_dir(dest, "DEST")
    created = not dest.exists()
    try:
        return _pull(uri, dest)
    except BaseException:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        raise


def _pull(uri: str, dest: Path) -> Path:
    marker = dest / PULLED_MARKER
    # An emptyDir outlives a restarted init container: a finished pull is not repeated.
    if marker.is_file() and marker.read_text().strip() == uri and (dest / "config.json").is_file():
        print(f"[keel] {dest} already holds {redact_text(uri)}", flush=True)
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / ".keel-pull"
    shutil.rmtree(staging, ignore_errors=True)
    bound_mlflow_retries()  # an unreachable registry: a Keel error in seconds, not minutes of retries
    from mlflow.artifacts import download_artifacts

    try:
        got = Path(download_artifacts(artifact_uri=uri, dst_path=str(staging)))
    except Exception as exc:  # MLflow, boto3 and OS errors all mean the same thing to the user
        shutil.rmtree(staging, ignore_errors=True)
        raise KeelError(f"{uri}: download failed: {type(exc).__name__}: {exc}") from None
    ref = got / MODEL_REF_FILE
    if ref.is_file() and not (got / "config.json").is_file():
        # a registry version that points at an export on a shared volume or in object storage
        location = read_json(ref, what="model reference", expect=dict).get("location")
        if not isinstance(location, str) or not location:
            shutil.rmtree(staging, ignore_errors=True)
            raise KeelError(f"{uri}: its {MODEL_REF_FILE} names no location; register the export again")
        shutil.rmtree(staging, ignore_errors=True)
        if "://" in location:
            return _pull(check_pull_uri(location), dest)
        if not (Path(location) / "config.json").is_file():
            raise KeelError(f"{uri}: registered by reference to {location}, which is not readable here; mount the "
                            "volume that holds it, or train with output.register_upload: true")
        staging.mkdir(parents=True)
        got = staging / "model"
        shutil.copytree(location, got)
    if not (got / "config.json").is_file():
        shutil.rmtree(staging, ignore_errors=True)
        raise KeelError(f"{uri}: downloaded, but it is not a model directory (no config.json); point at the "
                        "'model' directory a `keel train` run exported")
    # Whatever an earlier, different pull left goes first: no stray shards beside the new model.
    for old in dest.iterdir():
        if old == staging:
            continue
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    # models:/ URIs download into dst_path itself, storage URIs into dst_path/<last component>;
    # either way `got` is the model dir. Its entries move into dest (one filesystem: renames).
    for entry in got.iterdir():
        entry.rename(dest / entry.name)
    shutil.rmtree(staging, ignore_errors=True)
    marker.write_text(uri + "\n")
    print(f"[keel] pulled {redact_text(uri)} into {dest}", flush=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="keel pull", description="Download an exported model dir (models:/, s3://).")
    p.add_argument("uri", help="models:/NAME/VERSION or a storage URI such as s3://bucket/runs/NAME/model")
    p.add_argument("dest", help="directory to fill (created if needed)")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    pull_model(a.uri, a.dest)
    return 0
