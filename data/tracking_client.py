"""How every MLflow client Keel runs (training's tracker, `keel sync`, `keel pull`, `keel serve
models:/...`) talks to a tracking server: with bounded retries.

MLflow's own client retries a failed request 7 times with exponential backoff, minutes in all;
an unreachable server should cost a command seconds, then a Keel error. Here, in data/, because
trainer and serving both use it and neither may import the other.
"""

from __future__ import annotations

import os


def bound_mlflow_retries() -> None:
    """Fail fast instead of MLflow's minutes of retries; an operator's explicit setting wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
