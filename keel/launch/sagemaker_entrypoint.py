"""The training image under SageMaker's training-job container contract (`docker run IMAGE train`,
which the image's entrypoint, keel/launch/pod_entrypoint.py, hands to this module).

SageMaker gives each instance (host) of the job:

    /opt/ml/input/config/hyperparameters.json   what `keel launch --target sagemaker` wrote: the
                                                recipe (keel_recipe), processes per node, and each
                                                override as key -> value, every value a string
    /opt/ml/input/config/resourceconfig.json    current_host, hosts (algo-1..N), network_interface_name
    /opt/ml/input/data/<channel>/               each input channel, downloaded
    /opt/ml/checkpoints/                        synced with S3 while the job runs, and put back on a
                                                restart or after a spot interruption
    /opt/ml/model/                              uploaded to S3 when the job ends
    /opt/ml/output/failure                      the reason the job failed, shown by DescribeTrainingJob

and this runs `keel train` with output.dir=/opt/ml/checkpoints (so a restarted job resumes from
the newest checkpoint there), the hosts as torchrun's nodes (the first host is the rendezvous,
node ranks in the order of `hosts`), and copies the export to /opt/ml/model on the first host.

KEEL_OPT_ML moves the /opt/ml root (tests run several "hosts" on one machine); hyperparameter
values under /opt/ml follow it. KEEL_HOST_ADDRESSES (JSON, host -> address) resolves host names
that the machine's DNS does not know (the same tests, on loopback).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path

from data.errors import KeelError, print_error
from data.model_dir import EXPORT_INFO_FILE
from data.redaction import redact_text

DEFAULT_ROOT = "/opt/ml"
RECIPE_KEY = "keel_recipe"
NPROC_KEY = "keel_nproc_per_node"
PORT_KEY = "keel_master_port"
DEFAULT_PORT = 29500
FAILURE_LIMIT = 1024  # DescribeTrainingJob shows the first 1024 characters of the failure file


def read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeelError(f"{path} is missing: SageMaker writes the {what} there; run this image as a SageMaker "
                        "training job (keel launch --target sagemaker)") from None
    except (OSError, ValueError) as exc:
        raise KeelError(f"{path}: the {what} cannot be read ({exc})") from None
    if not isinstance(value, dict):
        raise KeelError(f"{path}: the {what} is not a JSON object")
    return value


def job_plan(root: Path, env: dict) -> tuple[list[str], dict]:
    """(the `keel train` arguments after the recipe, facts: recipe text, hosts, first host, ...)
    from the contract's files."""
    config = root / "input" / "config"
    params = read_json(config / "hyperparameters.json", "hyperparameters")
    resources = read_json(config / "resourceconfig.json", "resource configuration")
    recipe = params.pop(RECIPE_KEY, None)
    if not recipe:
        raise KeelError(f"hyperparameter {RECIPE_KEY} is missing: the job request must carry the recipe "
                        "(keel launch --target sagemaker writes it)")
    nproc = params.pop(NPROC_KEY, "1")
    port = params.pop(PORT_KEY, str(DEFAULT_PORT))
    hosts = resources.get("hosts")
    current = resources.get("current_host")
    if not isinstance(hosts, list) or not hosts or current not in hosts:
        raise KeelError(f"{config / 'resourceconfig.json'}: expected hosts (a list) holding current_host, got "
                        f"hosts={hosts!r}, current_host={current!r}")
    for key, value in (("keel_nproc_per_node", nproc), ("keel_master_port", port)):
        if not str(value).isdigit() or int(value) < 1:
            raise KeelError(f"hyperparameter {key}={value!r}: expected a positive whole number")
    overrides = []
    for key, value in params.items():
        if key.startswith("sagemaker_") or key.startswith("_"):
            continue  # the SageMaker SDK's own keys (sagemaker_program, ...), not Keel's
        value = str(value)
        if value == DEFAULT_ROOT or value.startswith(DEFAULT_ROOT + "/"):
            value = str(root) + value[len(DEFAULT_ROOT):]
        overrides.append(f"{key}={value}")
    addresses = json.loads(env.get("KEEL_HOST_ADDRESSES") or "{}")
    facts = {"recipe": recipe, "hosts": hosts, "current": current, "node_rank": hosts.index(current),
             "master": addresses.get(hosts[0], hosts[0]), "port": int(port), "nproc": int(nproc),
             "interface": resources.get("network_interface_name")}
    return overrides, facts


def train_command(recipe_file: Path, overrides: list[str], facts: dict, checkpoints: Path) -> list[str]:
    cmd = [sys.executable, "-m", "keel.cli", "train", str(recipe_file), *overrides, f"output.dir={checkpoints}",
           f"--nproc-per-node={facts['nproc']}", f"--nnodes={len(facts['hosts'])}"]
    if len(facts["hosts"]) > 1:
        cmd += [f"--node-rank={facts['node_rank']}", f"--master-addr={facts['master']}",
                f"--master-port={facts['port']}"]
    return cmd


def run_teed(cmd: list[str], env: dict) -> tuple[int, list[str]]:
    """Run cmd with its output passed through (SageMaker sends it to CloudWatch) and its last lines
    kept for the failure reason; SIGTERM (a stop, a spot interruption) is passed on, so training
    saves a checkpoint and stops."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: deque[str] = deque(maxlen=60)

    def forward(signum, frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        returncode = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    reader.join(timeout=10)
    return returncode, list(tail)


def failure_reason(returncode: int, tail: list[str]) -> str:
    errors = [line for line in tail if line.startswith("keel: ")]
    text = " ".join(errors[-3:]) if errors else (tail[-1] if tail else "")
    return redact_text(f"keel train exited with status {returncode}: {text}".strip())[:FAILURE_LIMIT]


def write_failure(root: Path, reason: str) -> None:
    output = root / "output"
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / ".failure.tmp"
    tmp.write_text(reason + "\n", encoding="utf-8")
    os.replace(tmp, output / "failure")


def publish_model(export: Path, model_dir: Path) -> None:
    """The export into /opt/ml/model (hard links where the filesystem allows: no second copy)."""
    model_dir.mkdir(parents=True, exist_ok=True)

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for entry in export.iterdir():
        target = model_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        if entry.is_dir():
            shutil.copytree(entry, target, copy_function=link_or_copy)
        else:
            link_or_copy(entry, target)


def run(root: Path, env: dict) -> int:
    from trainer.resilience.run_identity import MODEL_DIR

    overrides, facts = job_plan(root, env)
    checkpoints = root / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    child_env = dict(env)
    if facts["interface"]:  # the instance's network for the collectives, not a container bridge
        child_env.setdefault("NCCL_SOCKET_IFNAME", facts["interface"])
        child_env.setdefault("GLOO_SOCKET_IFNAME", facts["interface"])
    with tempfile.TemporaryDirectory(prefix="keel-recipe-") as tmp:
        recipe_file = Path(tmp) / "recipe.yaml"
        recipe_file.write_text(facts["recipe"], encoding="utf-8")  # JSON is YAML
        cmd = train_command(recipe_file, overrides, facts, checkpoints)
        from data.redaction import redact_args

        print(f"[keel] SageMaker host {facts['current']} (node {facts['node_rank']} of {len(facts['hosts'])}): "
              + " ".join(redact_args(cmd)), flush=True)
        returncode, tail = run_teed(cmd, child_env)
    if returncode != 0:
        write_failure(root, failure_reason(returncode, tail))
        return returncode
    if facts["node_rank"] == 0:
        export = checkpoints / MODEL_DIR
        if not (export / EXPORT_INFO_FILE).is_file():
            write_failure(root, f"keel train ended without an export in {export}")
            return 1
        publish_model(export, root / "model")
        print(f"[keel] the model is in {root / 'model'} (uploaded to S3 when the job ends)", flush=True)
    return 0


def main() -> int:
    root = Path(os.environ.get("KEEL_OPT_ML") or DEFAULT_ROOT)
    try:
        return run(root, dict(os.environ))
    except KeelError as exc:
        print_error(exc)
        try:
            write_failure(root, redact_text(f"keel: error: {exc}")[:FAILURE_LIMIT])
        except OSError:
            pass
        return 2


if __name__ == "__main__":
    sys.exit(main())
