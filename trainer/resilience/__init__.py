"""What keeps a run alive and resumable: checkpoints marked complete and resumed from
(checkpoints.py), the run dir's identity and status (run_identity.py), checkpoint-and-exit on
SIGTERM (stopping.py), the heartbeat that turns a hung collective into a failure
(heartbeat.py), and the stop at a non-finite loss or gradient norm (non_finite.py)."""
