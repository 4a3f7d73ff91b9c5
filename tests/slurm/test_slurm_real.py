"""`keel launch --target slurm` on a real Slurm: a one-node cluster started on this machine (its
own slurmctld, slurmd and munged, configuration and state in a temporary directory, free ports),
the rendered script submitted with `keel launch --apply` (sbatch), data prepared once, the tiny
model trained by 2 processes on CPU through the script's srun + keel train + c10d rendezvous,
requeued mid-run with `scontrol requeue` (SIGTERM to the steps: checkpoint and stop), and the
requeued job resuming from that checkpoint to the export.

Opt-in: `make test-slurm` installs Debian's slurm-wlm daemons and munge, and runs this with
KEEL_TEST_SLURM=1. Needs root (slurmd runs jobs as their users). Skips, saying why, otherwise.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dist_helpers import REPO, small_data, wait_for
from keel.processes import free_port
from trainer.resilience.checkpoints import COMPLETE_MARKER

pytestmark = [pytest.mark.slurm, pytest.mark.dist]
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol")
JOB = "slurm-sim"


def _why_not() -> str | None:
    if os.environ.get("KEEL_TEST_SLURM") != "1":
        return "the real-Slurm test is opt-in: run `make test-slurm` (installs slurm-wlm and munge with apt)"
    missing = [d for d in DAEMONS if shutil.which(d, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        return f"Slurm is not installed here ({', '.join(missing)} missing): run `make test-slurm`"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs; run `make test-slurm` as root"
    return None


def _sbin(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 9 // 10 // 1024
    return 1024


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A private one-node Slurm: (environment with SLURM_CONF, state dir). Stopped by PID afterwards."""
    why = _why_not()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("slurm")
    # munged runs as user munge, which cannot enter pytest's private (0700) temporary directories
    munge_dir = Path(tempfile.mkdtemp(prefix="keel-munge-"))
    munge_dir.chmod(0o755)
    munge = pwd.getpwnam("munge")
    os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run([_sbin("mungekey"), "--create"], check=True)
        os.chown(key, munge.pw_uid, munge.pw_gid)
    socket_path = munge_dir / "munge.sock"
    subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged"), f"--socket={socket_path}",
                    f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
                    f"--seed-file={munge_dir}/munged.seed"], check=True)
    host = socket.gethostname().split(".")[0]
    for d in ("state", "spool"):
        (root / d).mkdir()
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=keeltest", f"SlurmctldHost={host}", "SlurmUser=root", "AuthType=auth/munge",
        f"AuthInfo=socket={socket_path}", f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        # tasks bound to their CPUs by default, as clusters often do (Slurm's automatic binding would bind a
        # one-CPU task to a whole socket here, which on this machine is every CPU)
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/affinity", "TaskPluginParam=Cores",
        "JobAcctGatherType=jobacct_gather/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory", "DefMemPerCPU=1024",
        "MpiDefault=none", "ReturnToService=2", "KillWait=120", "MinJobAge=600",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory={_memory_mb()} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    logs = {name: open(root / f"{name}.stdout", "w") for name in ("slurmctld", "slurmd")}
    daemons = [subprocess.Popen([_sbin("slurmctld"), "-D", "-c", "-f", str(conf)], env=env, stdout=logs["slurmctld"],
                                stderr=subprocess.STDOUT),
               subprocess.Popen([_sbin("slurmd"), "-D", "-f", str(conf)], env=env, stdout=logs["slurmd"],
                                stderr=subprocess.STDOUT)]
    try:
        def idle():
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            return out.returncode == 0 and out.stdout.strip() == "idle"
        wait_for(idle, 60, "the Slurm node to be idle")
        yield env, root
    finally:
        for proc in daemons:
            proc.terminate()
        for proc in daemons:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        pid = (munge_dir / "munged.pid").read_text().strip() if (munge_dir / "munged.pid").exists() else ""
        if pid.isdigit():
            os.kill(int(pid), 15)
        shutil.rmtree(munge_dir, ignore_errors=True)


def _job_state(env: dict, job_id: str) -> tuple[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    state = re.search(r"JobState=(\S+)", out)
    restarts = re.search(r"Restarts=(\d+)", out)
    return (state[1] if state else "UNKNOWN"), (restarts[1] if restarts else "0")


def test_rendered_script_trains_on_real_slurm_and_a_requeue_resumes(slurm_cluster, tiny_model, keel_env, tmp_path):
    env, root = slurm_cluster
    workdir = tmp_path / "shared"
    workdir.mkdir()
    bin_dir = tmp_path / "bin"  # the nodes' own environment: `keel` on PATH
    bin_dir.mkdir()
    # which first says how many CPUs the step's task may use (its affinity, which Slurm's task plugin sets)
    count = "import os; print(len(os.sched_getaffinity(0)))"
    (bin_dir / "keel").write_text(f"#!/bin/sh\necho \"[test] keel $1 may use $({sys.executable} -c '{count}') CPUs\"\n"
                                  f"exec {sys.executable} -m keel.cli \"$@\"\n")
    (bin_dir / "keel").chmod(0o755)
    data = small_data(tmp_path / "data.jsonl", rows=48)
    job_env = {**keel_env, "SLURM_CONF": env["SLURM_CONF"], "PYTHONPATH": str(REPO),
               "PATH": f"{bin_dir}:{keel_env['PATH']}"}
    steps, every = 40, 5
    launch = subprocess.run(
        [sys.executable, "-m", "keel.cli", "launch", str(REPO / "recipes/quickstart/sft-tool-calling.yaml"),
         "--target", "slurm", "--partition", "debug", "--time", "30", "--workdir", str(workdir), "--name", JOB,
         "--apply", f"model.path={tiny_model}", f"data.train={data}", "training.seq_len=512",
         "training.warmup_ratio=0", f"training.max_steps={steps}", f"checkpoint.every_steps={every}",
         "checkpoint.keep_last=2", "tracking.mlflow.experiment=keel-slurm-test"],
        cwd=workdir, env=job_env, capture_output=True, text=True, timeout=120)
    assert launch.returncode == 0, launch.stderr
    job_id = re.search(r"Submitted batch job (\d+)", launch.stdout)[1]
    run_dir = workdir / "runs" / JOB
    log = workdir / f"slurm-{JOB}-{job_id}.out"
    first = run_dir / "checkpoints" / f"checkpoint-{every}" / COMPLETE_MARKER
    wait_for(lambda: first.exists() or _job_state(env, job_id)[0] in ("FAILED", "COMPLETED", "CANCELLED"), 600,
             "the first checkpoint", every_s=1)
    assert first.exists(), log.read_text()[-4000:] if log.exists() else "no log"
    # what preemption does to a requeueable job: SIGTERM to the steps, then the job back in the queue
    subprocess.run(["scontrol", "requeue", job_id], env=env, check=True)
    wait_for(lambda: _job_state(env, job_id) == ("COMPLETED", "1") or _job_state(env, job_id)[0] == "FAILED",
             900, "the requeued job to finish", every_s=2)
    text = log.read_text()
    assert _job_state(env, job_id) == ("COMPLETED", "1"), text[-6000:]
    assert (run_dir / "model" / "keel-export.yaml").is_file(), text[-4000:]
    # the first run stopped on the requeue's SIGTERM; the second resumed from a checkpoint, not step 0
    assert "(restart 0)" in text and "(restart 1)" in text
    resumed = re.findall(r"resumed from checkpoint step (\d+)", text)
    assert resumed and int(resumed[-1]) >= every, text[-6000:]
    assert "reused cache" in text  # the training step reuses what the preparation step built
    # both runs' steps may use every CPU of the node: torchrun with its ranks, and the preparation with its
    # workers, are not pinned to the one CPU a task that srun gives by default
    used = re.findall(r"\[test\] keel (\w+) may use (\d+) CPUs", text)
    n = str(os.cpu_count())
    assert len(used) == 4 and sorted(set(used)) == [("prepare", n), ("train", n)], used
