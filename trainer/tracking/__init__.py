"""Run tracking: the MLflow tracker (tracker.py) and the local record of what MLflow should
hold, sent later by `keel sync` when the server was unreachable (local.py)."""
