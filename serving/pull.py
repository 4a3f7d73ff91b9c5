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
from data.redaction import redact_text
from data.model_dir import MODEL_REF_FILE

PULLED_MARKER = ".keel-pulled"


def pull_model(uri: str, dest: str | Path) -> Path:
    """Download the model dir at `uri` into `dest` (created if needed); returns `dest`."""
    if "://" not in uri and not uri.startswith(("models:/", "runs:/")):
        raise KeelError(f"{uri!r}: expected a URI such as models:/NAME/VERSION or s3://bucket/path/model")
    dest = Path(dest)
    marker = dest / PULLED_MARKER
    # An emptyDir outlives a restarted init container: a finished pull is not repeated.
    if marker.is_file() and marker.read_text().strip() == uri and (dest / "config.json").is_file():
        print(f"[keel] {dest} already holds {redact_text(uri)}", flush=True)
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / ".keel-pull"
    shutil.rmtree(staging, ignore_errors=True)
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
            return pull_model(location, dest)
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
    import argparse

    p = argparse.ArgumentParser(prog="keel pull", description="Download an exported model dir (models:/, s3://).")
    p.add_argument("uri", help="models:/NAME/VERSION or a storage URI such as s3://bucket/runs/NAME/model")
    p.add_argument("dest", help="directory to fill (created if needed)")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    pull_model(a.uri, a.dest)
    return 0
