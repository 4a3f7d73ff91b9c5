"""Node 0's system metrics are sampled by Keel's thread from MLflow's monitors and handed to the
tracker, which keeps them like every metric: sampling never touches the tracking store, so a
store that is away or that MLflow refuses (its file store, here) costs no sample and never
stops training."""

from __future__ import annotations

import time


def test_samples_reach_the_sink_whatever_the_tracking_store(monkeypatch, tmp_path):
    from trainer.tracking.tracker import NodeSystemMetrics

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")  # refused by MLflow 3
    samples = []
    metrics = NodeSystemMetrics(None, None, node=0, every_s=0.05, sink=samples.append)
    deadline = time.time() + 30
    while len(samples) < 2 and time.time() < deadline:
        time.sleep(0.05)
    metrics.finish()
    assert len(samples) >= 2
    assert all("system/node_0/cpu_utilization_percentage" in s and "system/node_0/system_memory_usage_megabytes" in s
               for s in samples), samples[0]
    assert not (tmp_path / "mlruns").exists()


def test_a_failing_sink_stops_sampling_with_a_warning_not_the_run(capsys):
    from trainer.tracking.tracker import NodeSystemMetrics

    def sink(_):
        raise OSError("disk full")

    metrics = NodeSystemMetrics(None, None, node=0, every_s=0.05, sink=sink)
    err, deadline = "", time.time() + 30
    while "system metrics stopped" not in err and time.time() < deadline:
        time.sleep(0.05)
        err += capsys.readouterr().err
    assert "[keel] warning: system metrics stopped: OSError: disk full" in err
    metrics.finish()  # returns at once: the thread has ended
