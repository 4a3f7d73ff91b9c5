"""`keel launch --target slurm`: a recipe as an sbatch script.

The script holds the recipe as written (so the job does not depend on the file staying where it
was rendered) and runs, from a directory every node shares (--workdir: Lustre, NFS):

    srun (1 task per node)  keel prepare on each node: each tokenizes its share of the rows into
                            the shared cache (data/shards.py; node rank $SLURM_NODEID of the job's
                            nodes, handed over as PET_NODE_RANK / PET_NNODES), one of them
                            assembles the cache and publishes it once, the others wait for it
    srun (1 task per node)  keel train on each node: torchrun joining one c10d rendezvous on the
                            first node of the allocation; output.dir and the cache on --workdir

Each step's task gets all the CPUs the job holds on a node (srun --cpus-per-task), not srun's 1.

Preemption and time limits: the job is requeueable. Slurm's SIGTERM (preemption, scancel) reaches
every task; keel train passes it to torchrun, whose workers save a checkpoint and stop
(trainer/resilience/stopping.py), and the batch shell waits for that instead of dying first.
Before a --time limit, Slurm signals the batch shell (USR1, SIGNAL_BEFORE_S ahead), which stops
the training step the same way and requeues the job. A requeued job runs this script again and
resumes from the newest checkpoint under output.dir.

Containers: with --image, each step runs in it through enroot/pyxis (srun --container-image),
with --workdir mounted at the same path; without, on the nodes' own environment (`keel` on PATH).
Secrets: --secret FILE names a file of KEY=VALUE lines that the job reads when it starts; its
contents never enter the script.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

from data.errors import KeelError
from keel.launch.job import nccl_env, resolve_launch, shared_paths
from keel.launch.k8s_objects import check_image, name_from

SIGNAL_BEFORE_S = 300  # time to save a checkpoint of a large model before the limit
RECIPE_END = "KEEL_RECIPE_END"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.,-]*$")  # partition (a list is allowed), account, qos
# minutes | MM:SS | HH:MM:SS | D-HH | D-HH:MM | D-HH:MM:SS, as sbatch --time takes it
_TIME = re.compile(r"^([0-9]+|[0-9]+:[0-9]{2}|[0-9]+:[0-9]{2}:[0-9]{2}|[0-9]+-[0-9]+(:[0-9]{2}){0,2}|UNLIMITED)$")
_PATH = re.compile(r"^/[^\s'\"\\$`]*$")


def check_slurm_options(*, name: str, partition: str | None, account: str | None, qos: str | None,
                        time_limit: str | None, workdir: str, secrets, image: str | None, rdzv_port: int) -> None:
    if not _NAME.match(name):
        raise KeelError(f"--name {name!r}: expected letters, digits, '_', '.' and '-' (a Slurm job name)")
    for value, flag in ((partition, "--partition"), (account, "--account"), (qos, "--qos")):
        if value is not None and not _WORD.match(value):
            raise KeelError(f"{flag} {value!r}: expected a Slurm name (letters, digits, '_', '.', '-'; partitions "
                            "comma-separated)")
    if time_limit is not None and not _TIME.match(time_limit):
        raise KeelError(f"--time {time_limit!r}: expected a Slurm time limit such as 90, 12:00:00 or 2-00:00:00")
    if not _PATH.match(workdir):
        raise KeelError(f"--workdir {workdir!r}: expected an absolute path without spaces or quotes, on storage "
                        "every node shares (Lustre, NFS), e.g. --workdir /fsx/keel")
    for secret in secrets:
        if not _PATH.match(secret):
            raise KeelError(f"--secret {secret!r}: on Slurm, an absolute path to a file of KEY=VALUE lines that the "
                            "nodes can read (chmod 600), e.g. --secret /home/me/.keel/secrets.env")
    if image is not None:
        check_image(image, example="registry.example/keel-train:0.1.0 (run by enroot/pyxis)")
    if not 1 <= rdzv_port <= 65535:
        raise KeelError(f"--rdzv-port {rdzv_port}: expected a TCP port from 1 to 65535")


def sbatch_script(*, recipe_path: str | Path, overrides: list[str], name: str | None, nodes: int | None,
                  gpus_per_node: int | None, efa: int | None, image: str | None, partition: str | None,
                  account: str | None, qos: str | None, time_limit: str | None, workdir: str, exclusive: bool = True,
                  rdzv_port: int = 29500, max_restarts: int = 3, secrets=(), mlflow_uri: str | None = None) -> str:
    name = name or name_from(str(recipe_path))
    workdir = str(workdir).rstrip("/") or "/"
    check_slurm_options(name=name, partition=partition, account=account, qos=qos, time_limit=time_limit,
                        workdir=workdir, secrets=secrets, image=image, rdzv_port=rdzv_port)
    run_dir = f"{workdir}/runs/{name}"
    launch = resolve_launch(recipe_path=recipe_path, overrides=overrides, name=name,
                            path_overrides=shared_paths(name=name, root=workdir), nodes=nodes,
                            gpus_per_node=gpus_per_node, efa=efa, mlflow_uri=mlflow_uri)
    topo = launch.topology
    if any(line.strip() == RECIPE_END for line in launch.recipe_text.splitlines()):
        raise KeelError(f"{recipe_path}: a line of the recipe reads {RECIPE_END}, which ends the recipe inside the "
                        "script; remove it")

    sbatch = [f"--job-name={name}", f"--nodes={topo.nodes}", "--ntasks-per-node=1"]
    if topo.gpus_per_node:
        sbatch.append(f"--gpus-per-node={topo.gpus_per_node}")
    if exclusive:
        sbatch.append("--exclusive")
    sbatch += [f"--{flag}={value}" for flag, value in (("partition", partition), ("account", account), ("qos", qos),
                                                      ("time", time_limit)) if value]
    sbatch += [f"--chdir={workdir}", f"--output={workdir}/slurm-%x-%j.out", "--open-mode=append",
               "--requeue", f"--signal=B:USR1@{SIGNAL_BEFORE_S}"]

    env = {"KEEL_CACHE": f"{workdir}/cache", "HF_HOME": f"{workdir}/cache/huggingface", **nccl_env(topo)}
    if mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    container = ""
    if image:
        container = (f" --container-image={shlex.quote(image)} --container-mounts={workdir}:{workdir}"
                     f" --container-workdir={workdir}")
    # both steps: one task a node, with every CPU the job holds there ($cpus_per_node, computed in the script)
    step = f'--nodes={topo.nodes} --ntasks-per-node=1 --cpus-per-task="$cpus_per_node" --kill-on-bad-exit=1{container}'
    recipe_file = f"{run_dir}/recipe.yaml"
    keel_args = " ".join(shlex.quote(a) for a in launch.args)
    # data/shards.py reads a node's share from PET_NODE_RANK / PET_NNODES (as the Kubeflow operators
    # set them); Slurm numbers the job's nodes in SLURM_NODEID, and the job has topo.nodes of them
    prepare = f'PET_NODE_RANK="$SLURM_NODEID" PET_NNODES={topo.nodes} exec keel prepare "$@"'
    train = (f'exec keel train "$@" --nnodes={topo.nodes} --nproc-per-node={topo.processes_per_node} '
             f'--rdzv-endpoint="$KEEL_HEAD:{rdzv_port}" --rdzv-id="$SLURM_JOB_ID" --node-rank="$SLURM_NODEID" '
             f'--max-restarts={max_restarts}')
    lines = [
        "#!/bin/bash",
        f"# {launch.recipe_path} as a Slurm job, rendered by `keel launch --target slurm`; submit it with sbatch.",
        *(f"#SBATCH {option}" for option in sbatch),
        "set -uo pipefail",
        "",
        "# the recipe as written; the overrides below put its run directory and cache on --workdir",
        f"mkdir -p {run_dir}",
        f'cat > "{recipe_file}.tmp.$SLURM_JOB_ID" <<\'{RECIPE_END}\'',
        launch.recipe_text.rstrip("\n"),
        RECIPE_END,
        f'mv "{recipe_file}.tmp.$SLURM_JOB_ID" "{recipe_file}"',
        f"keel_args=({shlex.quote(recipe_file)} {keel_args})",
        "",
        *(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
        *(f"set -a; . {s}; set +a  # secrets, read at job start" for s in secrets),
        'KEEL_HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export KEEL_HEAD",
        "# each step runs one task a node, and srun gives a task 1 CPU unless told (since Slurm 22.05 it does not",
        "# inherit sbatch's --cpus-per-task), to which a task plugin that binds pins torchrun, all its ranks and the",
        "# preparation's workers. So the task asks for all the CPUs the job holds on a node: SLURM_JOB_CPUS_PER_NODE",
        "# reads like 72(x2),36, and as one srun asks the same of every node, the least of them",
        r"""cpus_per_node=$(tr ',' '\n' <<<"$SLURM_JOB_CPUS_PER_NODE" | sed 's/(.*//' | sort -n | head -n 1)""",
        'echo "[keel] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST; rendezvous '
        f'$KEEL_HEAD:{rdzv_port}"',
        "",
        "# data preparation before the training step, on every node: each tokenizes its share of the rows into the",
        "# shared cache; once every share is there, one of them assembles the cache and publishes it, once",
        f"srun {step} \\",
        f"    bash -c {shlex.quote(prepare)} keel \"${{keel_args[@]}}\" || exit $?",
        "",
        "# training: one task per node, each keel train running torchrun against the first node's rendezvous",
        f"srun {step} \\",
        f"    bash -c {shlex.quote(train)} keel \"${{keel_args[@]}}\" &",
        "train_pid=$!",
        "# preemption or scancel: the steps get SIGTERM and checkpoint; the shell waits for them",
        'trap \'echo "[keel] SIGTERM: the training step saves a checkpoint and stops"; wait "$train_pid"\' TERM',
        "# before the time limit: stop the step the same way, then requeue; the requeued job resumes",
        "requeue() {",
        '    echo "[keel] time limit near: checkpointing, then requeueing job $SLURM_JOB_ID"',
        '    kill -TERM "$train_pid" 2>/dev/null',
        '    wait "$train_pid"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "}",
        "trap requeue USR1",
        'wait "$train_pid"',
        "status=$?",
        'echo "[keel] training step ended with status $status"',
        "exit $status",
        "",
    ]
    return "\n".join(lines)


def submit(script: str) -> int:
    """`sbatch` with the script on its standard input; prints the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise KeelError("--apply runs sbatch, but sbatch is not on PATH; run it on a Slurm login node, or leave out "
                        "--apply and submit the printed script: keel launch --target slurm ... > job.sbatch && "
                        "sbatch job.sbatch")
    return subprocess.run([sbatch], input=script, text=True).returncode
