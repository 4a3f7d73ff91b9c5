"""What keeps a run alive and resumable: checkpoints marked complete and resumed from
(checkpoints.py), the run dir's identity and status (run_identity.py), checkpoint-and-exit on
SIGTERM (stopping.py), the heartbeat that turns a hung collective into a failure
(heartbeat.py), the stop at a non-finite loss or gradient norm (non_finite.py); and workers
that end when their launcher dies, instead of training on as orphans (launcher.py)."""
