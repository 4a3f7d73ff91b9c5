"""What keeps a run alive and resumable: checkpoints marked complete and resumed from
(checkpoints.py), checkpoint-and-exit on SIGTERM (stopping.py), and the heartbeat that turns a
hung collective into a failure (heartbeat.py)."""
