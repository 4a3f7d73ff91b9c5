"""The `keel` command. Each subcommand's work lives in the package that owns it; heavy
libraries (torch, transformers, vllm, mlflow) are imported only by the subcommand that needs
them, so `keel --help`, `keel validate` and `keel plan` start at once (tests/unit/test_cli_imports.py)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from data.errors import KeelError, print_error
from data.options import ArgumentParser, check_count, check_model_uri, check_namespace, check_output_dir
from data.redaction import redact_text

USAGE = """usage: keel COMMAND [ARGS]

commands:
  tiny-model OUT_DIR        build a tiny random-init base model and tokenizer locally
  validate RECIPE...        check recipes (schema, cross-field rules; --check-paths for files)
  prepare RECIPE [k=v ...]  validate, render and tokenize the recipe's data into the cache
  plan RECIPE [k=v ...]     world size, batch, steps and per-GPU memory: fits or not (--gpu, --nodes)
  train RECIPE [k=v ...]    train under torchrun (--nproc-per-node, --nnodes, ...)
  serve MODEL_DIR           serve an exported model with vLLM's OpenAI server
  eval MODEL_DIR DATA       score a model on held-out conversations (vLLM offline engine)
  launch RECIPE             the recipe as a PyTorchJob, TrainJob, Slurm script or SageMaker job (--target)
  deploy MODEL_URI          Deployment + Service (+ autoscaler) serving a model (YAML; --apply)
  pull URI DEST             download an exported model dir (models:/NAME/VERSION, s3://...)
  sync RUN_DIR              send metrics kept locally while the MLflow server was unreachable
  quickstart                tiny model -> train on 2 processes -> serve -> ask for a tool call

`keel COMMAND --help` shows each command's options."""


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return ArgumentParser(prog=f"keel {prog}", description=description)


def cmd_tiny_model(argv: list[str]) -> int:
    p = _parser("tiny-model", "Build a tiny random-init causal LM and a BPE tokenizer trained on text the repository ships.")
    p.add_argument("out_dir")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen3", "gpt_oss"],
                   help="gpt_oss: a tiny gpt-oss (experts, attention sinks) with the o200k_harmony tokenizer")
    p.add_argument("--format", default=None,
                   help="format whose delimiters become single tokens (default hermes-qwen3; harmony for gpt_oss, "
                        "the only format it takes)")
    p.add_argument("--hidden", type=int, default=128,
                   help="hidden size (a multiple of 64; head_dim is 64; for gpt_oss a multiple of 32)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary (gpt_oss: always 201,088)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for value, flag in [(a.hidden, "--hidden"), (a.layers, "--layers"), (a.vocab_size, "--vocab-size")]:
        check_count(value, flag)
    check_output_dir(a.out_dir, "OUT_DIR")
    from trainer.models.tiny import build_tiny_model

    build_tiny_model(a.out_dir, arch=a.arch, fmt_name=a.format, vocab_size=a.vocab_size,
                     hidden=a.hidden, layers=a.layers, seed=a.seed)
    return 0


def cmd_validate(argv: list[str]) -> int:
    p = _parser("validate", "Check recipes without running them.")
    p.add_argument("recipes", nargs="+", metavar="RECIPE [key=value ...]",
                   help="recipe files, and dotted overrides applied to each of them (as keel train takes them)")
    p.add_argument("--check-paths", action="store_true",
                   help="also check that local paths exist (hub ids and s3:// URIs are checked at run time)")
    a = p.parse_args(argv)
    from trainer.recipe import check_paths, load_recipe

    # An argument with "=" that is not a file is an override, as in every other command.
    overrides = [x for x in a.recipes if "=" in x and not os.path.exists(x)]
    recipes = [x for x in a.recipes if x not in overrides]
    if not recipes:
        p.error(f"no recipe file given, only overrides ({', '.join(overrides)}): name a recipe, e.g. "
                f"keel validate recipes/quickstart/sft-tool-calling.yaml {overrides[0]}")
    failed = 0
    for path in recipes:
        try:
            recipe = load_recipe(path, overrides)
            if a.check_paths:
                check_paths(recipe, path)
            print(f"ok: {path}")
        except KeelError as exc:
            failed += 1
            print_error(exc)
    return 2 if failed else 0


def _recipe_and_overrides(p: argparse.ArgumentParser, argv: list[str]):
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.max_steps=10")
    return p.parse_intermixed_args(argv)


def cmd_prepare(argv: list[str], node=None) -> int:
    """`keel prepare`; `node`: this node's share when several prepare together (keel train passes its
    --node-rank and --nnodes), else from the environment (data/shards.py)."""
    a = _recipe_and_overrides(_parser("prepare", "Validate, render and tokenize a recipe's data into the cache."), argv)
    import time

    from trainer.recipe import check_paths, load_recipe
    from trainer.train import describe_prepared, prepared_split, recipe_format

    from trainer.remote import localize

    recipe = load_recipe(a.recipe, a.overrides)
    check_paths(recipe, a.recipe)
    recipe, _ = localize(recipe, local_rank=0)  # a remote model.path: its tokenizer, fetched once per node
    fmt = recipe_format(recipe)
    for split in ["train"] + (["eval"] if recipe.data.eval else []):
        t0 = time.time()
        prep = prepared_split(recipe, split, local_rank=0, fmt=fmt, node=node)
        took = time.time() - t0
        how = (f"reused cache {prep.path}" if prep.reused else
               f"built cache {prep.path} in {took:.1f}s ({prep.stats.rows / max(took, 1e-9):.0f} rows/s, "
               f"{prep.stats.examples / max(took, 1e-9):.0f} examples/s)")
        print(f"{split}: {how}: {describe_prepared(prep)}; statistics in {prep.path / 'stats.json'}", flush=True)
    return 0


def check_torchrun_options(a: argparse.Namespace) -> None:
    """`keel train`'s launcher options, checked before the recipe is read (a.nnodes may still be
    None: the recipe's cluster.nodes, checked by check_nodes once it is known)."""
    if a.nproc_per_node is not None:
        check_count(a.nproc_per_node, "--nproc-per-node")
    if a.nnodes is not None:
        check_count(a.nnodes, "--nnodes")
    check_count(a.max_restarts, "--max-restarts", minimum=0)
    if not 1 <= a.master_port <= 65535:
        raise KeelError(f"--master-port {a.master_port}: expected a TCP port from 1 to 65535")
    if a.rdzv_endpoint is not None:
        host, _, port = a.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise KeelError(f"--rdzv-endpoint {a.rdzv_endpoint!r}: expected HOST:PORT, e.g. node001:29500")
        if a.master_addr:
            raise KeelError("--rdzv-endpoint and --master-addr both name where the nodes meet; pass one")
    if a.nnodes is not None:
        check_nodes(a)


def check_nodes(a: argparse.Namespace) -> None:
    if not 0 <= a.node_rank < a.nnodes:
        raise KeelError(f"--node-rank {a.node_rank}: expected 0 to {a.nnodes - 1} (one less than --nnodes)")
    if a.nnodes > 1 and not a.master_addr and not a.rdzv_endpoint:
        raise KeelError(f"--nnodes {a.nnodes} (the recipe's cluster.nodes unless given) needs --master-addr (the "
                        "address of the node with --node-rank 0) or --rdzv-endpoint HOST:PORT on every node; "
                        "pass --nnodes 1 to train on this machine alone")


def default_processes(cluster, gpus_here: int) -> int:
    """`keel train`'s processes per node without --nproc-per-node: the recipe's cluster.gpus_per_node
    (processes, for gpu: cpu), capped at the GPUs this machine has; else one per GPU, else 1."""
    if cluster is None:
        return gpus_here or 1
    if cluster.gpu == "cpu":
        return cluster.gpus_per_node
    if gpus_here < cluster.gpus_per_node:
        print(f"[keel] warning: the recipe is sized for {cluster.gpus_per_node} {cluster.gpu} per node (cluster."
              f"gpus_per_node) and this machine has {gpus_here or 'no'} GPU{'' if gpus_here == 1 else 's'}: "
              f"starting {gpus_here or 1} process{'' if (gpus_here or 1) == 1 else 'es'} (check with "
              f"`keel plan RECIPE --gpus-per-node {gpus_here or 1}`)", file=sys.stderr, flush=True)
        return gpus_here or 1
    return cluster.gpus_per_node


def torchrun_command(recipe: str, overrides: list[str], *, nproc_per_node: int, nnodes: int, node_rank: int,
                     master_addr: str | None, master_port: int, max_restarts: int, log_dir: Path,
                     rdzv_endpoint: str | None = None, rdzv_id: str = "keel") -> list[str]:
    """torchrun (keel/torchrun.py: torchrun's own launcher, failures summarised) with every rank's
    output shown live and kept in log_dir (--tee 3: stdout and stderr of every rank)."""
    cmd = [sys.executable, "-m", "keel.torchrun", f"--nproc-per-node={nproc_per_node}",
           f"--max-restarts={max_restarts}", f"--log-dir={log_dir}", "--tee=3"]
    if rdzv_endpoint:
        # c10d: every node runs the same command; ranks are assigned at the rendezvous
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={rdzv_id}"]
    elif nnodes > 1:  # check_nodes made sure of master_addr
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={master_addr}",
                f"--master-port={master_port}"]
    else:
        cmd += ["--standalone"]  # a free port of its own: several jobs can share a machine
    return cmd + ["-m", "trainer", recipe, *overrides]


def cmd_plan(argv: list[str]) -> int:
    from trainer.plan import GPUS

    p = _parser("plan", "What the recipe will do on a cluster and whether it fits in GPU memory. Reads the model's "
                        "config.json only: no GPU, no weights. The cluster is the recipe's own (its cluster "
                        "section); the flags override it.")
    p.add_argument("--gpu", default=None, choices=sorted(GPUS) + ["cpu"],
                   help="GPU kind (default: the recipe's cluster.gpu, else h100-80gb); cpu: processes on this "
                        "machine, fp32, sharing its memory")
    p.add_argument("--nodes", type=int, default=None, help="default: the recipe's cluster.nodes, else 1")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="default: the recipe's cluster.gpus_per_node, else 8")
    a = _recipe_and_overrides(p, argv)
    for value, flag in [(a.nodes, "--nodes"), (a.gpus_per_node, "--gpus-per-node")]:
        if value is not None:
            check_count(value, flag)
    from trainer.plan import Cluster, plan, render
    from trainer.models.config import load_config
    from trainer.recipe import load_recipe, missing_paths

    recipe = load_recipe(a.recipe, a.overrides)
    config = load_config(recipe.model.path)
    result = plan(recipe, planned_cluster(recipe.cluster, gpu=a.gpu, nodes=a.nodes, gpus_per_node=a.gpus_per_node),
                  config)
    print(redact_text(render(result)))  # the resolved recipe: a tracking or data URL may hold credentials
    problems = [q for q in missing_paths(recipe) if "training.seq_len" in q]
    for q in problems:
        print_error(q.strip().removeprefix("- "))
    return 0 if result.fits and not problems else 1


def planned_cluster(section, *, gpu: str | None = None, nodes: int | None = None, gpus_per_node: int | None = None):
    """The cluster `keel plan` sizes for: the recipe's cluster section, each flag given overriding
    its key; without a section, 1 node x 8 h100-80gb."""
    from trainer.plan import Cluster

    base = Cluster(gpu=section.gpu, nodes=section.nodes, gpus_per_node=section.gpus_per_node) if section else Cluster()
    return Cluster(gpu=gpu or base.gpu, nodes=nodes or base.nodes, gpus_per_node=gpus_per_node or base.gpus_per_node)


def cmd_train(argv: list[str]) -> int:
    p = _parser("train", "Train under torchrun: `torchrun -m trainer RECIPE ...` on each node.")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes on this node (default: the recipe's cluster.gpus_per_node, as far as this "
                        "machine has the GPUs; without a cluster section: the GPUs, else 1)")
    p.add_argument("--nnodes", type=int, default=None, help="nodes (default: the recipe's cluster.nodes, else 1)")
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default=None)
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="join a c10d rendezvous there instead of --master-addr (ranks are assigned at the rendezvous; "
                        "every node runs the same command, as `keel launch --target slurm` does)")
    p.add_argument("--rdzv-id", default="keel", help="the rendezvous' job id (default keel)")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="torchrun restarts the workers after a failure; each restart resumes from the latest "
                        "complete checkpoint (default 3)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an output.dir that holds a finished or different run")
    a = _recipe_and_overrides(p, argv)
    check_torchrun_options(a)
    from trainer.recipe import check_paths, load_recipe
    from trainer.resilience.run_identity import LOG_DIR, MODEL_DIR, check_run_dir, clear_run_dir, recorded_failure

    # Everything a user can get wrong is checked here, before any process starts.
    from trainer.remote import localize

    recipe = load_recipe(a.recipe, a.overrides)
    if a.nnodes is None:
        a.nnodes = recipe.cluster.nodes if recipe.cluster else 1
        check_nodes(a)
    check_paths(recipe, a.recipe)
    recipe, remote = localize(recipe, local_rank=0)  # fetches a remote model.path once for this node
    run_dir = Path(recipe.output.dir)
    decision = check_run_dir(recipe, overwrite=a.overwrite)
    if decision == "finished":
        model = (remote["output.dir"].rstrip("/") + "/" + MODEL_DIR if remote.get("output.dir")
                 else (run_dir / MODEL_DIR).resolve())
        print(f"[keel] output.dir {run_dir} holds this recipe's finished run: nothing to train. The model is in "
              f"{model} (--overwrite trains it again from the start)", flush=True)
        return 0
    if decision == "resume" and (failure := recorded_failure(run_dir)):
        print(f"[keel] warning: the last attempt in {run_dir} stopped on: {failure}\n[keel] trying again from the "
              "latest complete checkpoint", file=sys.stderr, flush=True)
    from trainer.arguments import check_device_support

    check_device_support(peft=recipe.peft, training=recipe.training)
    if decision == "overwrite" and a.node_rank == 0:
        # Cleared here, once: workers restarted after a failure must resume, not start over.
        print(f"[keel] --overwrite: removing the previous run's checkpoints and model from {recipe.output.dir}")
        clear_run_dir(Path(recipe.output.dir))
    nproc = a.nproc_per_node or default_processes(recipe.cluster, _gpu_count())
    # Prepare the data once, before the process group exists (ranks then only read the cache);
    # the nodes of a job each tokenize their share into a shared data.cache_dir.
    from data.shards import NodeShare

    cmd_prepare([a.recipe, *a.overrides], node=NodeShare(a.node_rank, a.nnodes))
    import time

    # one directory per launch and node: a shared run dir holds every node's logs side by side
    log_dir = run_dir / LOG_DIR / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-node{a.node_rank}"
    cmd = torchrun_command(a.recipe, a.overrides, nproc_per_node=nproc, nnodes=a.nnodes, node_rank=a.node_rank,
                           master_addr=a.master_addr, master_port=a.master_port, max_restarts=a.max_restarts,
                           log_dir=log_dir, rdzv_endpoint=a.rdzv_endpoint, rdzv_id=a.rdzv_id)
    from data.redaction import redact_args

    print("[keel] " + " ".join(redact_args(cmd)), flush=True)
    return run_torchrun(cmd, run_dir, log_dir)


def run_torchrun(cmd: list[str], run_dir: Path, log_dir: Path) -> int:
    """torchrun, with SIGTERM and SIGINT passed on to it: when `keel train` is the container's
    main process, it is the one Kubernetes signals. torchrun passes the signal to the workers,
    which save a checkpoint and stop (trainer/resilience/stopping.py). A failure ends with one
    summary (keel/torchrun.py) instead of torchrun's traceback."""
    import signal

    from trainer.resilience.launcher import TRAIN_PID_ENV

    proc = subprocess.Popen(cmd, env={**os.environ, TRAIN_PID_ENV: str(os.getpid())})  # it ends if this process dies
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        returncode = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        from trainer.resilience.checkpoints import latest_complete_checkpoint
        from trainer.resilience.run_identity import CHECKPOINT_DIR

        latest = latest_complete_checkpoint(run_dir / CHECKPOINT_DIR)
        name = signal.Signals(received[0]).name
        print(f"keel: stopped by {name}; " + (f"latest complete checkpoint: {latest}; running the same command "
                                               "again resumes from it" if latest else "no complete checkpoint yet"),
              file=sys.stderr, flush=True)
        return returncode or 128 + received[0]
    if returncode != 0:
        from keel.torchrun import failure_summary
        from trainer.resilience.run_identity import MODEL_DIR, run_status

        summary = failure_summary(log_dir) or f"torchrun exited with code {returncode}; the logs are in {log_dir}"
        if run_status(run_dir) == "finished":
            summary += (f" The model in {run_dir / MODEL_DIR} was exported before that failure and is complete; "
                        "running the same command again exits 0 with it.")
        print_error(summary)
    return returncode


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def cmd_serve(argv: list[str]) -> int:
    from serving.server import main

    return main(argv)


def cmd_eval(argv: list[str]) -> int:
    from serving.evaluate import main

    return main(argv)


def _mlflow_uri_for_pods(where: str = "the pods") -> str | None:
    """$MLFLOW_TRACKING_URI when the job's machines (`where`) can reach it too (a server, not a file
    on this machine)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and not uri.startswith(("http://", "https://", "databricks")):
        print(f"[keel] not passing MLFLOW_TRACKING_URI={redact_text(uri)} to {where}: it names storage on this "
              "machine; set the recipe's tracking.mlflow.tracking_uri to a server they can reach",
              file=sys.stderr)
        return None
    return uri


def _emit(docs: list[dict], *, apply: bool, hint: str) -> int:
    from keel.launch.k8s_objects import dump_yaml, kubectl_apply

    text = dump_yaml(docs)
    if apply:
        return kubectl_apply(text, flag_hint=hint)
    sys.stdout.write(text)
    return 0


# option -> the targets it applies to; any other target refuses it rather than ignoring it
LAUNCH_OPTIONS = {
    "namespace": ("pytorchjob", "trainjob"), "volume": ("pytorchjob", "trainjob"),
    "volume_size": ("pytorchjob", "trainjob"), "storage_class": ("pytorchjob", "trainjob"),
    "queue": ("pytorchjob", "trainjob"), "priority_class": ("pytorchjob",), "shm_size": ("pytorchjob", "trainjob"),
    "runtime": ("trainjob",),
    "partition": ("slurm",), "account": ("slurm",), "qos": ("slurm",), "time": ("slurm",), "workdir": ("slurm",),
    "exclusive": ("slurm",), "rdzv_port": ("slurm",),
    "role": ("sagemaker",), "instance_type": ("sagemaker",), "output_s3": ("sagemaker",),
    "checkpoint_s3": ("sagemaker",), "channel": ("sagemaker",), "volume_gb": ("sagemaker",),
    "max_run": ("sagemaker",), "spot": ("sagemaker",), "region": ("sagemaker",),
    "secret": ("pytorchjob", "trainjob", "slurm"),
}


def cmd_launch(argv: list[str]) -> int:
    p = _parser("launch", "Render (or with --apply, submit) the job that trains RECIPE where your team runs: a "
                "Kubeflow PyTorchJob (default), a Kubeflow Trainer v2 TrainJob, a Slurm batch script or a SageMaker "
                "training job. Nodes and GPUs come from the recipe's cluster section.")
    p.add_argument("--target", choices=["pytorchjob", "trainjob", "slurm", "sagemaker"], default="pytorchjob",
                   help="pytorchjob (kubeflow.org/v1, default), trainjob (trainer.kubeflow.org/v1alpha1), slurm "
                   "(an sbatch script), sagemaker (a CreateTrainingJob request)")
    p.add_argument("--image", help="the training image (docker/train.Dockerfile); on Slurm optional: run it with "
                   "enroot/pyxis (srun --container-image) instead of the nodes' own environment")
    p.add_argument("--nodes", type=int, help="nodes (default: the recipe's cluster.nodes; another value needs the "
                   "override cluster.nodes=N)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node, one process each (default: the recipe's "
                   "cluster.gpus_per_node); 0: CPU nodes")
    p.add_argument("--efa", type=int, metavar="N", help="EFA interfaces per node (default: the recipe's cluster.efa)")
    p.add_argument("--name", help="job name (default: from the recipe file name)")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="restarts after a failure; each resumes from the newest checkpoint (default 3)")
    p.add_argument("--secret", action="append", default=[], metavar="NAME",
                   help="Kubernetes: a Secret whose keys become environment variables; Slurm: an absolute path to a "
                   "file of KEY=VALUE lines read at job start (HF_TOKEN, AWS_*, MLFLOW_TRACKING_*); repeatable")
    p.add_argument("--apply", action="store_true",
                   help="submit (kubectl apply, sbatch, or boto3's create_training_job) instead of printing")
    k8s = p.add_argument_group("pytorchjob and trainjob")
    k8s.add_argument("--namespace")
    k8s.add_argument("--volume", metavar="CLAIM:MOUNT",
                     help="shared ReadWriteMany PersistentVolumeClaim (FSx for Lustre, EFS, NFS) for data, cache, "
                     "checkpoints and the exported model; the pods' working directory (default: an emptyDir, "
                     "lost with the pod)")
    k8s.add_argument("--volume-size", metavar="SIZE", help="also create the --volume claim with this size (e.g. 1Ti)")
    k8s.add_argument("--storage-class", help="storage class for --volume-size")
    k8s.add_argument("--queue", help="Kueue LocalQueue to submit to (label kueue.x-k8s.io/queue-name)")
    k8s.add_argument("--priority-class", help="PriorityClass of the pods (pytorchjob)")
    k8s.add_argument("--shm-size", help="size of /dev/shm (memory-backed; default 16Gi)")
    k8s.add_argument("--runtime", help="trainjob: the ClusterTrainingRuntime to run on (default torch-distributed)")
    slurm = p.add_argument_group("slurm")
    slurm.add_argument("--partition", help="partition to submit to (default: the cluster's default partition)")
    slurm.add_argument("--account", help="account to charge")
    slurm.add_argument("--qos", help="quality of service")
    slurm.add_argument("--time", help="time limit, e.g. 2-00:00:00 (a requeue before it keeps the job going)")
    slurm.add_argument("--workdir", help="a directory every node shares (Lustre, NFS): runs/, cache/ and logs "
                       "(default: the current directory)")
    slurm.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=None,
                       help="whole nodes (default: on)")
    slurm.add_argument("--rdzv-port", type=int, help="port of the c10d rendezvous on the first node (default 29500)")
    sm = p.add_argument_group("sagemaker")
    sm.add_argument("--role", help="IAM role ARN the job runs as (reads the channels, writes S3)")
    sm.add_argument("--instance-type", help="e.g. ml.p5.48xlarge (default: the recipe's cluster.instance_type)")
    sm.add_argument("--output-s3", metavar="S3URI", help="where SageMaker uploads the model (S3OutputPath)")
    sm.add_argument("--checkpoint-s3", metavar="S3URI",
                    help="where /opt/ml/checkpoints is kept (default: OUTPUT_S3/NAME/checkpoints)")
    sm.add_argument("--channel", action="append", default=[], metavar="NAME=S3URI",
                    help="another input channel, in /opt/ml/input/data/NAME (s3:// data.train, data.eval and "
                    "model.path become channels on their own); repeatable")
    sm.add_argument("--volume-gb", type=int, help="storage per instance in GB (default 500)")
    sm.add_argument("--max-run", type=int, metavar="SECONDS", help="time limit (default 432000: 5 days)")
    sm.add_argument("--spot", action="store_true", help="managed spot training; an interruption resumes from "
                    "the checkpoints")
    sm.add_argument("--region", help="AWS region for --apply (default: boto3's)")
    a = _recipe_and_overrides(p, argv)
    for dest, targets in LAUNCH_OPTIONS.items():
        if a.target not in targets and getattr(a, dest) != p.get_default(dest):
            flag = "--" + dest.replace("_", "-")
            raise KeelError(f"{flag} does not apply to --target {a.target}; it is an option of "
                            + " and ".join(f"--target {t}" for t in targets))
    renderer = {"pytorchjob": _launch_kubernetes, "trainjob": _launch_kubernetes, "slurm": _launch_slurm,
                "sagemaker": _launch_sagemaker}[a.target]
    return renderer(a)


def _launch_kubernetes(a: argparse.Namespace) -> int:
    check_namespace(a.namespace)
    common = dict(recipe_path=a.recipe, overrides=a.overrides, image=a.image, nodes=a.nodes,
                  gpus_per_node=a.gpus_per_node, name=a.name, namespace=a.namespace, volume=a.volume,
                  volume_size=a.volume_size, storage_class=a.storage_class, queue=a.queue, efa=a.efa,
                  max_restarts=a.max_restarts, shm_size=a.shm_size or "16Gi", mlflow_uri=_mlflow_uri_for_pods(),
                  secrets=a.secret)
    if a.target == "trainjob":
        from keel.launch.trainjob import trainjob_manifests

        docs = trainjob_manifests(**common, runtime=a.runtime)
    else:
        from keel.launch.pytorchjob import launch_manifests

        docs = launch_manifests(**common, priority_class=a.priority_class)
    if a.volume is None:
        print("[keel] no --volume: checkpoints and the exported model live in an emptyDir and are lost with the "
              "pod" + ("; the nodes cannot resume together" if (a.nodes or 1) > 1 else ""), file=sys.stderr)
    return _emit(docs, apply=a.apply, hint=f"keel launch --target {a.target} ...")


def _launch_slurm(a: argparse.Namespace) -> int:
    from keel.launch.slurm import sbatch_script, submit

    script = sbatch_script(recipe_path=a.recipe, overrides=a.overrides, name=a.name, nodes=a.nodes,
                           gpus_per_node=a.gpus_per_node, efa=a.efa, image=a.image, partition=a.partition,
                           account=a.account, qos=a.qos, time_limit=a.time, workdir=a.workdir or os.getcwd(),
                           exclusive=a.exclusive is not False, rdzv_port=a.rdzv_port or 29500,
                           max_restarts=a.max_restarts, secrets=a.secret,
                           mlflow_uri=_mlflow_uri_for_pods("the Slurm job's nodes"))
    if a.apply:
        return submit(script)
    sys.stdout.write(script)
    return 0


def _launch_sagemaker(a: argparse.Namespace) -> int:
    from keel.launch.sagemaker import create_training_job, training_job_request

    request = training_job_request(recipe_path=a.recipe, overrides=a.overrides, name=a.name, nodes=a.nodes,
                                   gpus_per_node=a.gpus_per_node, efa=a.efa, image=a.image, role=a.role,
                                   instance_type=a.instance_type, output_s3=a.output_s3, checkpoint_s3=a.checkpoint_s3,
                                   channels=a.channel, volume_gb=a.volume_gb or 500, max_run_s=a.max_run or 432000,
                                   spot=a.spot, max_restarts=a.max_restarts,
                                   mlflow_uri=_mlflow_uri_for_pods("the SageMaker training job"))
    if a.apply:
        return create_training_job(request, region=a.region)
    import json

    print(json.dumps(request, indent=2))
    return 0


def cmd_deploy(argv: list[str]) -> int:
    vllm_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, vllm_args = argv[:cut], argv[cut + 1:]
    p = _parser("deploy", "Render a Deployment + Service (+ HorizontalPodAutoscaler) serving MODEL_URI with the "
                "serving image's `serve` (vLLM's OpenAI server). Prints YAML; --apply submits it with kubectl. "
                "Arguments after `--` go to vLLM.")
    p.add_argument("model_uri", help="pvc://CLAIM/path/to/model, s3://bucket/path/to/model or models:/NAME/VERSION")
    p.add_argument("--image", required=True, help="the serving image (docker/serve.Dockerfile)")
    p.add_argument("--name", help="Deployment/Service name (default: from the model URI)")
    p.add_argument("--namespace")
    p.add_argument("--replicas", type=int, help="fixed number of replicas (default 1)")
    p.add_argument("--min-replicas", type=int, help="autoscaling: fewest replicas (default 1)")
    p.add_argument("--max-replicas", type=int, help="autoscaling: most replicas; adds a HorizontalPodAutoscaler")
    p.add_argument("--scale-on", choices=["cpu", "vllm"], default="cpu",
                   help="autoscaling signal: cpu (works everywhere) or vllm (requests waiting/running per pod; "
                   "needs a metrics adapter, see docs/kubernetes.md)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per replica (tensor parallel across them); 0: CPU")
    p.add_argument("--cpu", default="4", help="CPU request per replica (default 4)")
    p.add_argument("--memory", default="32Gi", help="memory request and limit per replica (default 32Gi)")
    p.add_argument("--shm-size", default="8Gi", help="size of /dev/shm (default 8Gi)")
    p.add_argument("--api-key-secret", metavar="SECRET[:KEY]",
                   help="Secret holding the API key clients must send (default: NAME-api-key, key api-key)")
    p.add_argument("--no-api-key", action="store_true", help="serve without an API key")
    p.add_argument("--secret", action="append", default=[], metavar="NAME",
                   help="a Secret whose keys become environment variables of the model pull (AWS_*, "
                   "MLFLOW_TRACKING_*); repeatable")
    p.add_argument("--startup-timeout", type=int, default=1800, metavar="SECONDS",
                   help="how long a replica may take to load the model before it is restarted (default 1800)")
    p.add_argument("--apply", action="store_true", help="submit with `kubectl apply -f -` instead of printing")
    a = p.parse_args(argv)
    check_namespace(a.namespace)
    check_model_uri(a.model_uri)
    for value, flag in [(a.replicas, "--replicas"), (a.min_replicas, "--min-replicas"),
                        (a.max_replicas, "--max-replicas")]:
        if value is not None:
            check_count(value, flag)
    check_count(a.gpus, "--gpus", minimum=0)
    from keel.launch.deploy import deploy_manifests

    docs = deploy_manifests(
        model_uri=a.model_uri, image=a.image, name=a.name, namespace=a.namespace, replicas=a.replicas, gpus=a.gpus,
        min_replicas=a.min_replicas, max_replicas=a.max_replicas, scale_on=a.scale_on,
        api_key_secret=a.api_key_secret, no_api_key=a.no_api_key, secrets=a.secret,
        mlflow_uri=_mlflow_uri_for_pods(), cpu=a.cpu, memory=a.memory, shm_size=a.shm_size,
        startup_timeout_s=a.startup_timeout, vllm_args=vllm_args)
    return _emit(docs, apply=a.apply, hint="keel deploy ...")


def cmd_pull(argv: list[str]) -> int:
    from serving.pull import main

    return main(argv)


def cmd_sync(argv: list[str]) -> int:
    from trainer.tracking.local import main

    return main(argv)


def cmd_quickstart(argv: list[str]) -> int:
    from keel.quickstart import main

    return main(argv)


COMMANDS = {
    "tiny-model": cmd_tiny_model,
    "validate": cmd_validate,
    "prepare": cmd_prepare,
    "plan": cmd_plan,
    "train": cmd_train,
    "serve": cmd_serve,
    "eval": cmd_eval,
    "launch": cmd_launch,
    "deploy": cmd_deploy,
    "pull": cmd_pull,
    "sync": cmd_sync,
    "quickstart": cmd_quickstart,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        import difflib

        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"keel: unknown command {argv[0]!r}{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return command(argv[1:])
    except KeelError as exc:
        print_error(exc)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
