"""Faults injected through the real mechanisms (signals to real torchrun workers, a real file
size limit, a file truncated on disk): a killed rank resumes and matches an uninterrupted run;
a stopped rank fails the job within distributed.timeout_s with a message naming it, and a
re-run resumes; SIGTERM saves a checkpoint a re-run resumes from; a checkpoint write that fails
ends the run naming it, and a re-run skips it and a damaged one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import psutil
import pytest

from dist_helpers import REPO, losses, max_rel_diff, run, small_data, train_cmd, wait_for, workers
from trainer.resilience.checkpoints import COMPLETE_MARKER

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


def loss_steps(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return len(losses(run_dir)) if path.is_file() else 0


def test_sigterm_of_the_job_saves_a_checkpoint_and_a_rerun_resumes_from_it(tmp_path, tiny_model, keel_env):
    """What Kubernetes does on preemption: SIGTERM to the job, SIGKILL after a grace period. The
    whole process group gets it (keel train, torchrun), and keel train passes it on as well, so
    torchrun sees it twice and the workers are told by torchrun."""
    data = small_data(tmp_path / "data.jsonl")
    run_dir = tmp_path / "run"
    # no scheduled checkpoint: the only one is the one SIGTERM saves
    args = (f"training.max_steps={STEPS}", "checkpoint.every_steps=1000", "tracking.mlflow.system_metrics_every_s=0",
            f"tracking.mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.Popen(train_cmd(tiny_model, run_dir, data, *args), cwd=REPO, env=keel_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: loss_steps(run_dir) >= 3, 600, "three trained steps", proc)
        sent = time.time()
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, out[-4000:]
    found = re.search(r"stopped by SIGTERM, checkpoint at step (\d+)", out)
    assert found, out[-4000:]
    step = int(found.group(1))
    assert 3 <= step < STEPS and took < 30  # within torchrun's and Kubernetes' 30 s before SIGKILL
    assert (run_dir / "checkpoints" / f"checkpoint-{step}" / COMPLETE_MARKER).is_file()
    assert not (run_dir / "model").exists()  # stopped, not finished: nothing exported

    again = run(train_cmd(tiny_model, run_dir, data, *args), keel_env)
    assert again.returncode == 0, again.stdout[-4000:]
    assert f"resumed from checkpoint step {step} " in again.stdout
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))  # no step lost or doubled


def test_disk_full_mid_checkpoint_fails_loudly_and_a_damaged_checkpoint_is_skipped(tmp_path, tiny_model, keel_env):
    """Two faults, one run to set them up: a file size limit (RLIMIT_FSIZE, what a full disk or
    quota does to write(): EFBIG/ENOSPC) set on the running worker while it trains, so its third
    checkpoint cannot be written; then, between runs, the second checkpoint's weights truncated
    on disk. The re-run must set both aside with warnings naming them and resume from the first."""
    data = small_data(tmp_path / "data.jsonl")
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    steps = 3 * EVERY + 5
    args = (f"training.max_steps={steps}", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=5",
            "tracking.mlflow.system_metrics_every_s=0",
            f"tracking.mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    cmd = train_cmd(tiny_model, run_dir, data, *args, nproc=1, launcher=("--max-restarts=0",))
    proc = subprocess.Popen(cmd, cwd=REPO, env=keel_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (ckpts / f"checkpoint-{2 * EVERY}" / COMPLETE_MARKER).exists(), 600,
                 "the second complete checkpoint", proc)
        worker = wait_for(lambda: workers(proc).get(0), 30, "rank 0", proc)
        weights = (ckpts / f"checkpoint-{2 * EVERY}" / "model.safetensors").stat().st_size
        limit = weights // 4  # every file the run writes but a checkpoint's stays far below this
        worker.rlimit(psutil.RLIMIT_FSIZE, (limit, limit))
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    third = ckpts / f"checkpoint-{3 * EVERY}"
    assert proc.returncode != 0
    assert f"writing checkpoint {third} failed" in out and "File too large" in out, out[-4000:]
    assert f"at most {limit} bytes" in out  # the cause, spelled out
    assert not (third / COMPLETE_MARKER).exists()
    second = ckpts / f"checkpoint-{2 * EVERY}" / "model.safetensors"
    with open(second, "r+b") as f:
        f.truncate(weights // 2)

    again = run(cmd, keel_env)
    assert again.returncode == 0, again.stdout[-4000:]
    lines = again.stdout.splitlines()
    assert any("without completion marker set aside" in line and f"incomplete-checkpoint-{3 * EVERY}-" in line
               for line in lines), again.stdout[-4000:]
    assert any("damaged since it was saved (model.safetensors is" in line and f"damaged-checkpoint-{2 * EVERY}-" in line
               for line in lines), again.stdout[-4000:]
    assert f"resumed from checkpoint step {EVERY} " in again.stdout
    assert sorted(losses(run_dir)) == list(range(1, steps + 1))
