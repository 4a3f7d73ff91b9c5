"""The training image's entrypoint: `torchrun -m trainer RECIPE [key=value ...]` configured from
the environment a Kubeflow PyTorchJob gives each pod, so one image runs as Master, as Worker
and under elastic rendezvous.

The operator (training-operator release-1.9) injects:
  with a Master replica:  MASTER_ADDR, MASTER_PORT, PET_MASTER_ADDR, PET_MASTER_PORT, RANK (the
                          node's rank), PET_NODE_RANK, WORLD_SIZE
  always:                 PET_NPROC_PER_NODE (spec.nprocPerNode)
  without elasticPolicy:  PET_NNODES (the replica count)
  with elasticPolicy:     PET_RDZV_ENDPOINT, PET_RDZV_BACKEND, PET_NNODES as MIN:MAX, and
                          PET_RDZV_ID, PET_MAX_RESTARTS, PET_RDZV_CONF when the policy sets them
Kubeflow Trainer v2 (TrainJob) injects the static set (PET_NNODES, PET_NPROC_PER_NODE,
PET_NODE_RANK, PET_MASTER_ADDR/PORT), which the same mapping covers.

A TrainJob's runtime owns the pod template, so what Keel's PyTorchJob sets on the container is
asked for through the environment instead (keel/launch/trainjob.py): KEEL_WORKDIR (the working
directory: the shared volume), KEEL_SECRET_DIRS (mounted Secrets, each file a variable) and
KEEL_PREPARE=1 (`keel prepare` before torchrun, as the PyTorchJob's init container does).

`train` alone as the argument is SageMaker's training-job contract (`docker run IMAGE train`):
keel/launch/sagemaker_entrypoint.py runs it.

torchrun reads PET_* variables on its own too; the mapping is written out here anyway so a
missing or malformed variable is an error naming it (not a hang at rendezvous), and the exact
torchrun command is printed at the top of every pod's log.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping

from data.errors import KeelError, print_error

DEFAULT_PORT = 23456  # the operator's default for the `pytorchjob-port` container port
_NPROC = re.compile(r"^(auto|cpu|gpu|[1-9][0-9]*)$")
_NNODES_RANGE = re.compile(r"^[1-9][0-9]*(:[1-9][0-9]*)?$")


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise KeelError(f"${name} is not set; the PyTorchJob operator sets it on every pod of a job "
                            "that has a Master replica (render the job with `keel launch`)")
        return default
    try:
        return int(value)
    except ValueError:
        raise KeelError(f"${name}={value!r} is not an integer") from None


def torchrun_args(env: Mapping[str, str]) -> list[str]:
    """torchrun's launcher options for this pod, from the operator-injected environment."""
    nproc = env.get("PET_NPROC_PER_NODE") or "auto"
    if not _NPROC.match(nproc):
        raise KeelError(f"$PET_NPROC_PER_NODE={nproc!r}: expected a positive integer, auto, cpu or gpu "
                        "(it comes from the PyTorchJob's spec.nprocPerNode)")
    args = [f"--nproc-per-node={nproc}", f"--max-restarts={_int(env, 'PET_MAX_RESTARTS', 0)}"]

    endpoint = env.get("PET_RDZV_ENDPOINT")
    if endpoint:  # elastic: nodes join a c10d rendezvous; ranks are assigned there, not by the operator
        nnodes = env.get("PET_NNODES", "")
        if not _NNODES_RANGE.match(nnodes):
            raise KeelError(f"$PET_NNODES={nnodes!r}: an elastic job needs N or MIN:MAX nodes "
                            "(it comes from the PyTorchJob's elasticPolicy.minReplicas/maxReplicas)")
        args += [f"--nnodes={nnodes}", f"--rdzv-backend={env.get('PET_RDZV_BACKEND') or 'c10d'}",
                 f"--rdzv-endpoint={endpoint}", f"--rdzv-id={env.get('PET_RDZV_ID') or 'keel'}"]
        if env.get("PET_RDZV_CONF"):
            args.append(f"--rdzv-conf={env['PET_RDZV_CONF']}")
        return args

    nnodes = _int(env, "PET_NNODES", 1)
    if nnodes < 1:
        raise KeelError(f"$PET_NNODES={nnodes}: needs at least one node")
    if nnodes == 1:
        # One node talks to nobody else: a private free port, so nothing depends on the Service.
        return args + ["--standalone"]
    master = env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR")
    if not master:
        raise KeelError(f"$PET_NNODES={nnodes} but no $PET_MASTER_ADDR or $MASTER_ADDR: a PyTorchJob without a "
                        "Master replica gets no master address; give it a Master (keel launch does) or an "
                        "elasticPolicy")
    rank_var = "PET_NODE_RANK" if "PET_NODE_RANK" in env else "RANK"  # older operators set only RANK
    node_rank = _int(env, rank_var)
    if not 0 <= node_rank < nnodes:
        raise KeelError(f"${rank_var}={node_rank} is outside 0..{nnodes - 1} (the {nnodes} nodes of $PET_NNODES)")
    port = _int(env, "PET_MASTER_PORT", _int(env, "MASTER_PORT", DEFAULT_PORT))
    return args + [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={master}",
                   f"--master-port={port}"]


def command(argv: list[str], env: Mapping[str, str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(env), "-m", "trainer", *argv]


def export_secret_files(env: dict, dirs: str) -> list[str]:
    """Each file of each mounted Secret (KEEL_SECRET_DIRS, ':'-separated) as an environment
    variable named after the file; the names, never the values, are returned for the log."""
    names = []
    for directory in filter(None, dirs.split(":")):
        if not os.path.isdir(directory):
            raise KeelError(f"$KEEL_SECRET_DIRS names {directory}, which is not a directory: is the Secret mounted?")
        for entry in sorted(os.listdir(directory)):
            path = os.path.join(directory, entry)
            # a Secret volume also holds ..data and timestamped dirs (the kubelet's atomic update)
            if entry.startswith(".") or not os.path.isfile(path):
                continue
            with open(path, encoding="utf-8") as f:
                env[entry] = f.read()
            names.append(entry)
    return names


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["train"]:
        from keel.launch.sagemaker_entrypoint import main as sagemaker_main

        return sagemaker_main()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m keel.launch.pod_entrypoint RECIPE [key=value ...]\n"
              "Runs torchrun -m trainer with launcher options from the PyTorchJob / TrainJob environment.")
        return 0 if argv else 2
    try:
        if os.environ.get("KEEL_WORKDIR"):
            os.chdir(os.environ["KEEL_WORKDIR"])
        exported = export_secret_files(os.environ, os.environ.get("KEEL_SECRET_DIRS", ""))
        cmd = command(argv, os.environ)
    except (KeelError, OSError) as exc:
        print_error(exc)
        return 2
    from data.redaction import redact_args

    if exported:
        print(f"[keel] environment from mounted Secrets: {', '.join(exported)}", flush=True)
    if os.environ.get("KEEL_PREPARE") == "1":
        # validated and prepared before torchrun starts: a bad row fails this node at once
        prepare = [sys.executable, "-m", "keel.cli", "prepare", *argv]
        print("[keel] " + " ".join(redact_args(prepare)), flush=True)
        returncode = subprocess.run(prepare).returncode
        if returncode:
            return returncode
    print("[keel] " + " ".join(redact_args(cmd)), flush=True)
    # exec: torchrun becomes the container's main process and receives the kubelet's SIGTERM
    # itself, which it forwards to the training processes.
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
