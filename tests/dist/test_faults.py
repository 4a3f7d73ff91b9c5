"""Faults injected through the real mechanisms (signals to real torchrun workers): a killed
rank resumes and matches an uninterrupted run; a stopped rank fails the job within
distributed.timeout_s with a message naming it, and a re-run resumes."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from dist_helpers import REPO, losses, max_rel_diff, run, small_data, train_cmd, wait_for, workers
from trainer.checkpoints import COMPLETE_MARKER

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS, EVERY = 40, 10


def test_sigkill_of_a_rank_resumes_from_the_last_checkpoint_and_matches(tmp_path, tiny_model, keel_env):
    data = small_data(tmp_path / "data.jsonl")
    common = (f"training.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=2")
    plain = run(train_cmd(tiny_model, tmp_path / "plain", data, *common), keel_env)
    assert plain.returncode == 0, plain.stdout[-4000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(tiny_model, killed_dir, data, *common, launcher=("--max-restarts=1",)),
                            cwd=REPO, env=keel_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (killed_dir / "checkpoints" / f"checkpoint-{EVERY}" / COMPLETE_MARKER).exists(),
                 600, "the first complete checkpoint", proc)
        victim = wait_for(lambda: workers(proc).get(1), 30, "rank 1", proc)
        victim.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from checkpoint step" in out
    resumed_at = int(out.split("resumed from checkpoint step ")[1].split()[0])
    assert EVERY <= resumed_at < STEPS
    a, b = losses(tmp_path / "plain"), losses(killed_dir)
    assert sorted(b) == list(range(1, STEPS + 1))  # every step has exactly one loss, none lost or doubled
    # after the resume point the curve is the uninterrupted run's: no example skipped or seen twice
    assert max_rel_diff(b, a, range(resumed_at + 1, STEPS + 1)) < 1e-5


def test_stopped_rank_fails_within_timeout_naming_it_and_rerun_resumes(tmp_path, tiny_model, keel_env):
    data = small_data(tmp_path / "data.jsonl")
    run_dir = tmp_path / "run"
    args = (f"training.max_steps={STEPS * 5}", f"checkpoint.every_steps={EVERY}", "distributed.timeout_s=20")
    proc = subprocess.Popen(train_cmd(tiny_model, run_dir, data, *args, launcher=("--max-restarts=0",)),
                            cwd=REPO, env=keel_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = None
    try:
        wait_for(lambda: (run_dir / "checkpoints" / f"checkpoint-{EVERY}" / COMPLETE_MARKER).exists(),
                 600, "the first complete checkpoint", proc)
        victim = wait_for(lambda: workers(proc).get(1), 30, "rank 1", proc)
        victim.send_signal(signal.SIGSTOP)
        out, _ = proc.communicate(timeout=240)  # 20 s timeout + teardown; a hang would exceed this
    finally:
        if victim is not None and victim.is_running():
            victim.send_signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "distributed.timeout_s=20s" in out and "stuck: rank 1" in out, out[-4000:]
    assert f"pid {victim.pid}" in out

    again = run(train_cmd(tiny_model, run_dir, data, *args), keel_env)
    assert again.returncode == 0, again.stdout[-4000:]
    assert "resumed from checkpoint step" in again.stdout
    os.sync()
