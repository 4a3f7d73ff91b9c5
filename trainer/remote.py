"""Models and outputs beyond local disk: `model.path` and `output.dir` as s3:// (or any fsspec)
URIs.

- A remote base model is fetched once per node into Keel's cache (the first process of each
  node downloads into a temporary directory, renames it into place and writes a marker; the
  other processes wait for the marker). A later run, or a restarted worker, reuses it.
- A remote output dir: the run directory (checkpoints, run identity, logs) lives in a local
  staging directory derived from the URI, so a re-run on the same machine resumes; the exported
  model is uploaded to `<output.dir>/model` when training finishes, with a completion marker
  written last, so a reader never sees half an upload as a model.

Credentials come from the usual places for the scheme (AWS_* variables, the pod's role, an
endpoint in AWS_ENDPOINT_URL); they are never part of the URI Keel records.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

from data.errors import KeelError
from data.redaction import redact_text

FETCHED_MARKER = ".keel-fetched"
UPLOADED_MARKER = ".keel-upload-complete"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def cache_root() -> Path:
    return Path(os.environ.get("KEEL_CACHE", "~/.cache/keel")).expanduser()


def _slot(uri: str) -> str:
    uri = uri.rstrip("/")
    return f"{uri.rsplit('/', 1)[-1] or 'root'}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def local_model_dir(uri: str) -> Path:
    return cache_root() / "models" / _slot(uri)


def local_run_dir(uri: str) -> Path:
    """Where a run with a remote output.dir keeps its run directory on this machine."""
    return cache_root() / "runs" / _slot(uri)


def _fs(uri: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        scheme = uri.split("://", 1)[0]
        raise KeelError(f"{uri}: no filesystem for {scheme}:// ({exc}); install Keel's cloud extra "
                        "(s3fs comes with Keel; pip install 'keel[cloud]' adds gcsfs for gs://)") from None


def fetch_model(uri: str, *, local_rank: int, timeout_s: float = 3600, key: str = "model.path") -> Path:
    """The model at `uri` as a local directory, fetched by one process per node."""
    dest = local_model_dir(uri)
    marker = dest / FETCHED_MARKER
    if marker.is_file():
        return dest
    if local_rank != 0:
        return _wait_for(marker, uri, timeout_s)
    fs, root = _fs(uri)
    root = root.rstrip("/")
    try:
        listing = {f: info.get("size") or 0 for f, info in fs.find(root, detail=True).items()
                   if info.get("type") != "directory"}  # one listing, sizes included
    except Exception as exc:  # noqa: BLE001 - every backend has its own errors; the message says which
        raise KeelError(f"{key}: cannot list {uri}: {type(exc).__name__}: {exc}") from None
    files = sorted(listing)
    names = {f[len(root) + 1:] for f in files}
    if "config.json" not in names:
        raise KeelError(f"{key}: {uri} holds no config.json ({len(names)} files found); expected an exported or "
                        "saved model directory")
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    total = sum(listing.values())
    done, t0, last = 0, time.time(), 0.0
    print(f"[keel] fetching {redact_text(uri)} ({len(files)} files, {total / 1e6:.1f} MB) into {dest}", flush=True)
    for f in files:
        target = tmp / f[len(root) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f, str(target))
        done += target.stat().st_size
        now = time.time()
        if now - last > 10 or done == total:
            rate = done / max(now - t0, 1e-6)
            eta = (total - done) / rate if rate else 0
            print(f"[keel]   {done / 1e6:.1f}/{total / 1e6:.1f} MB, {rate / 1e6:.1f} MB/s, ETA {eta:.0f}s", flush=True)
            last = now
    if dest.exists():  # an earlier fetch that died before its marker
        shutil.rmtree(dest)
    tmp.rename(dest)
    (dest / FETCHED_MARKER).write_text(uri + "\n")
    return dest


def _wait_for(marker: Path, uri: str, timeout_s: float) -> Path:
    t0 = last = time.time()
    while not marker.is_file():
        if time.time() - t0 > timeout_s:
            raise KeelError(f"waited {timeout_s:.0f}s for this node's first process to fetch {uri}; see its log")
        if time.time() - last > 30:
            print(f"[keel] waiting for {redact_text(uri)} to be fetched ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
            last = time.time()
        time.sleep(0.5)
    return marker.parent


def upload_dir(local: Path, uri: str) -> None:
    """Upload a directory; its completion marker goes last (and any old marker first away)."""
    fs, root = _fs(uri)
    root = root.rstrip("/")
    if fs.exists(f"{root}/{UPLOADED_MARKER}"):
        fs.rm_file(f"{root}/{UPLOADED_MARKER}")
    files = sorted(p for p in local.rglob("*") if p.is_file())
    print(f"[keel] uploading {local} to {redact_text(uri)} ({len(files)} files)", flush=True)
    for p in files:
        fs.put_file(str(p), f"{root}/{p.relative_to(local).as_posix()}")
    with fs.open(f"{root}/{UPLOADED_MARKER}", "w") as f:
        f.write("complete\n")


def localize(recipe, *, local_rank: int):
    """The recipe with remote model.path / output.dir replaced by their local places, and the
    URIs they stood for ({"model.path": uri or None, "output.dir": uri or None})."""
    uris = {"model.path": recipe.model.path if is_remote(recipe.model.path) else None,
            "output.dir": recipe.output.dir if is_remote(recipe.output.dir) else None}
    updates = {}
    if uris["model.path"]:
        updates["model"] = recipe.model.model_copy(
            update={"path": str(fetch_model(uris["model.path"], local_rank=local_rank))})
    if uris["output.dir"]:
        _fs(uris["output.dir"])  # fail now, not after training, when the scheme has no filesystem
        updates["output"] = recipe.output.model_copy(update={"dir": str(local_run_dir(uris["output.dir"]))})
    return recipe.model_copy(update=updates), uris
