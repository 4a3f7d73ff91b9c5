"""Faults injected through the real mechanisms (signals to real torchrun workers, a real file
size limit, a file truncated on disk): a killed rank resumes and matches an uninterrupted run;
a stopped rank fails the job within distributed.timeout_s with a message naming it, and a
re-run resumes; SIGTERM saves a checkpoint a re-run resumes from; a checkpoint write that fails
ends the run naming it, and a re-run skips it and a damaged one; SIGKILL of keel train leaves
nothing running; a rank killed after the export ends the job finished; a non-finite loss stops
training, is not retried, and is summarised."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def start_job(tmp_path, tiny_model, keel_env, max_steps: int) -> tuple[subprocess.Popen, Path, list[str]]:
    """(process, run dir, command) of `keel train` on small data with no scheduled checkpoint,
    started in a session of its own so that a test can signal its whole process group."""
    run_dir = tmp_path / "run"
    cmd = train_cmd(tiny_model, run_dir, small_data(tmp_path / "data.jsonl"), f"training.max_steps={max_steps}",
                    "checkpoint.every_steps=1000", "tracking.mlflow.system_metrics_every_s=0",
                    f"tracking.mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.Popen(cmd, cwd=REPO, env=keel_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return proc, run_dir, cmd


def test_sigterm_of_the_job_saves_a_checkpoint_and_a_rerun_resumes_from_it(tmp_path, tiny_model, keel_env):
    """What Kubernetes does on preemption: SIGTERM to the job, SIGKILL after a grace period. The
    whole process group gets it (keel train, torchrun), and keel train passes it on as well, so
    torchrun sees it twice and the workers are told by torchrun."""
    # no scheduled checkpoint: the only one is the one SIGTERM saves
    proc, run_dir, cmd = start_job(tmp_path, tiny_model, keel_env, STEPS)
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

    again = run(cmd, keel_env)
    assert again.returncode == 0, again.stdout[-4000:]
    assert f"resumed from checkpoint step {step} " in again.stdout
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))  # no step lost or doubled


def running(procs) -> list[psutil.Process]:
    """Those of `procs` still running (a zombie has ended: it holds no memory and no port)."""
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    return left


def test_sigkill_of_keel_train_leaves_nothing_running(tmp_path, tiny_model, keel_env):
    """`kill -9` of `keel train` while it trains: nothing can be saved, and nothing may train on.
    torchrun is its child and starts each worker in a session of its own, so no signal to keel
    train's process group reaches the workers, and once torchrun is gone nothing would stop them:
    orphans holding memory (on GPUs, GPU memory) and ports. torchrun must end with keel train,
    and the workers with torchrun. (`kill -9 -PGID`, which also kills torchrun, is the second
    half of the same chain.)"""
    proc, run_dir, _ = start_job(tmp_path, tiny_model, keel_env, STEPS * 5)
    left: list[psutil.Process] = []
    try:
        wait_for(lambda: loss_steps(run_dir) >= 2, 600, "two trained steps", proc)
        ranks = list(workers(proc).values())
        launched = psutil.Process(proc.pid).children() + ranks  # torchrun, and the workers it started
        assert len(ranks) == 2 and len(launched) == 3, launched
        proc.kill()  # keel train alone
        proc.wait(timeout=60)  # not communicate(): a torchrun left running would hold the output pipe open
        deadline = time.time() + 5
        while (left := running(launched)) and time.time() < deadline:
            time.sleep(0.05)
        assert not left, (f"still running 5 s after keel train was killed: "
                          f"{[(p.pid, p.ppid(), p.status(), p.cmdline()[:4]) for p in left]}")
    finally:
        for p in running(left):
            p.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


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


def test_a_rank_killed_after_the_export_ends_the_job_finished_and_a_rerun_trains_nothing(tmp_path, tiny_model,
                                                                                          keel_env):
    """A rank that dies after the model was exported (at teardown) makes torchrun restart the
    workers: the restarted ones find the run finished and end at once, the job exits 0 and the
    export is the one written before the death. Running the command again trains nothing; the
    same dir with a recipe that changes the math is refused."""
    data = small_data(tmp_path / "data.jsonl")
    run_dir = tmp_path / "run"
    args = ("training.max_steps=4", "checkpoint.every_steps=1000", "tracking.mlflow.system_metrics_every_s=0",
            f"tracking.mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    # The job runs at the lowest CPU priority: on a 2-core machine its two busy ranks would
    # otherwise starve this test's polling past the short time the export spends in .model.tmp
    # (seen in CI: the run ended before the poll saw it).
    cmd = ["nice", "-n", "19", *train_cmd(tiny_model, run_dir, data, *args, launcher=("--max-restarts=1",))]
    proc = subprocess.Popen(cmd, cwd=REPO, env=keel_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # rank 1 is held once rank 0 writes the export (the gather is over: rank 1 only waits
        # for the end of the run), and killed once the export is in place. Found first, so that
        # holding it is one signal once the export starts.
        victim = wait_for(lambda: workers(proc).get(1), 600, "rank 1", proc)
        wait_for(lambda: (run_dir / ".model.tmp").exists(), 600, "rank 0 writing the export", proc, every_s=0.005)
        victim.send_signal(signal.SIGSTOP)
        wait_for(lambda: (run_dir / "model" / "keel-export.yaml").exists(), 300, "the export in place", proc)
        weights = (run_dir / "model" / "model.safetensors").read_bytes()
        victim.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "nothing to train" in out  # the restarted workers found the run finished
    assert (run_dir / "model" / "model.safetensors").read_bytes() == weights
    assert "status: finished" in (run_dir / "keel-run.yaml").read_text()

    again = run(train_cmd(tiny_model, run_dir, data, *args), keel_env)
    assert again.returncode == 0, again.stdout[-4000:]
    assert f"nothing to train. The model is in {(run_dir / 'model').resolve()}" in again.stdout
    assert "keel.torchrun" not in again.stdout  # no worker started
    assert (run_dir / "model" / "model.safetensors").read_bytes() == weights

    other = run(train_cmd(tiny_model, run_dir, data, *args, "training.learning_rate=0.01"), keel_env)
    assert other.returncode == 2, other.stdout[-4000:]
    assert "holds a finished run of a different recipe" in other.stdout
    assert "training.learning_rate: was 0.002, now 0.01" in other.stdout


def test_a_non_finite_loss_stops_training_at_its_step_exports_nothing_and_is_not_retried(tmp_path, tiny_model,
                                                                                         keel_env):
    """A learning rate of 1e30 (finite, accepted by the recipe) makes the tiny model's loss or
    gradient norm NaN/inf within a step or two. Training stops there with an error naming the
    step; nothing is exported; the restart torchrun makes stops at once with the same message
    instead of training to the same failure; keel train ends with one summary of the failure."""
    data = small_data(tmp_path / "data.jsonl")
    run_dir = tmp_path / "run"
    args = ("training.max_steps=20", "training.learning_rate=1e30", "checkpoint.every_steps=1",
            "tracking.mlflow.system_metrics_every_s=0", f"tracking.mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    out = run(train_cmd(tiny_model, run_dir, data, *args, launcher=("--max-restarts=1",)), keel_env)
    assert out.returncode != 0, out.stdout[-4000:]
    stopped = re.search(r"keel: error \(rank 0\): training stopped at step (\d+): the (loss|gradient norm) is", out.stdout)
    assert stopped, out.stdout[-4000:]
    step = int(stopped.group(1))
    assert f"[rank0]:[keel] step {step - 1}/20 " in out.stdout or step == 1  # the live output was shown
    # nothing exported, the run not finished, no checkpoint of the failed step or after
    assert not (run_dir / "model").exists() and not list(run_dir.glob(".model*"))
    assert "status: failed" in (run_dir / "keel-run.yaml").read_text()
    assert all(int(p.name.split("-")[1]) < step for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    # the restarted workers did not train again: rank 0 loaded the data once, and said why it stopped
    assert out.stdout.count("[rank0]:[keel] data:") == 1, out.stdout[-4000:]
    assert "this restart stops without training" in out.stdout
    # one summary: the rank, its exit code, its error line, where its full output is
    summary = [line for line in out.stdout.splitlines() if line.startswith("keel: error: training failed: ")]
    assert len(summary) == 1, out.stdout[-4000:]
    assert re.match(r"keel: error: training failed: rank \d \(local rank \d on .+\) exited with code 2 after 1 "
                    rf"restart of the workers \(--max-restarts=1\): keel: error \(rank \d\): training stopped at "
                    rf"step {step}: ", summary[0]), summary[0]
    logs = Path(summary[0].split("Each rank's full output: ")[1].split("/<local rank>/")[0])
    assert logs.is_relative_to(run_dir / "logs") and f"training stopped at step {step}" in \
        (logs / "0" / "stderr.log").read_text()
    assert "Traceback" not in out.stdout and "ChildFailedError" not in out.stdout  # not torchrun's


def test_a_rank_killed_by_a_signal_is_summarised_with_the_signal_and_its_last_error(tmp_path, capfd):
    """keel train's launcher (run_torchrun, keel.torchrun) on a job whose rank dies by a signal
    after printing an error: one summary names the signal and that error line, not torchrun's
    traceback; in a run dir whose run had finished, it also says the model is complete."""
    from keel.cli import run_torchrun
    from trainer.recipe import load_recipe
    from trainer.resilience.run_identity import write_run_file

    script = tmp_path / "dies.py"
    script.write_text("import os, signal, sys\n"
                      "print('RuntimeError: the planted last error', file=sys.stderr, flush=True)\n"
                      "print('a line after it that is no error', file=sys.stderr, flush=True)\n"
                      "if os.environ['RANK'] == '1':\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    run_dir = tmp_path / "run"
    write_run_file(load_recipe(REPO / "recipes" / "quickstart" / "sft-tool-calling.yaml", [f"output.dir={run_dir}"]),
                   "finished")
    log_dir = run_dir / "logs" / "launch"
    cmd = [sys.executable, "-m", "keel.torchrun", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
           f"--log-dir={log_dir}", "--tee=3", str(script)]
    assert run_torchrun(cmd, run_dir, log_dir) == 1
    out, err = capfd.readouterr()
    assert "[rank1]:RuntimeError: the planted last error" in out + err  # shown live, with its rank
    summary = [line for line in err.splitlines() if line.startswith("keel: error: ")]
    assert len(summary) == 1 and "Traceback" not in out + err, out + err
    assert summary[0].startswith("keel: error: training failed: rank 1 (local rank 1 on "), summary
    assert "was killed by SIGKILL: RuntimeError: the planted last error. Each rank's full output: " in summary[0]
    assert f"The model in {run_dir / 'model'} was exported before that failure" in summary[0]
