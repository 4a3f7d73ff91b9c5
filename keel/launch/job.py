"""What every `keel launch` target shares: one resolution of the recipe, its overrides, the cluster
it runs on, the job's name, its paths and its secrets. Each target (pytorchjob.py, trainjob.py,
slurm.py, sagemaker.py) is a small renderer of a `Launch`.

    recipe file + target paths + user overrides  ->  validated once, as the job will load it
    recipe's cluster section + --nodes/--gpus-per-node/--efa  ->  Topology (a disagreement with
        the recipe's sizing is refused unless it is explicit: cluster.nodes=N as an override)
    recipe, overrides and $MLFLOW_TRACKING_URI  ->  refused when they carry a credential, since
        every target's output is kept in plain text (a manifest, a batch script, a job request)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data.errors import KeelError
from data.options import check_count

TARGETS = ("pytorchjob", "trainjob", "slurm", "sagemaker")


@dataclass(frozen=True)
class Topology:
    nodes: int
    gpus_per_node: int  # GPUs each node requests; 0 on CPU nodes
    processes_per_node: int  # training processes per node: one per GPU, or the recipe's count on CPU
    gpu: str | None  # the GPU kind (cluster.gpu), "cpu", or None when only flags said it
    efa: int  # EFA interfaces per node
    instance_type: str | None


def check_cluster_flags(*, nodes: int | None, gpus_per_node: int | None, efa: int | None) -> None:
    for value, flag, minimum in ((nodes, "--nodes", 1), (gpus_per_node, "--gpus-per-node", 0), (efa, "--efa", 0)):
        if value is not None:
            check_count(value, flag, minimum=minimum)


def resolve_topology(cluster, *, nodes: int | None, gpus_per_node: int | None, efa: int | None,
                     source: str) -> Topology:
    """The recipe's cluster section, with the flags checked against it.

    A flag that disagrees with the recipe's sizing is refused: the recipe's global batch and
    memory per GPU were planned for its own cluster. The explicit way to resize is an override
    of the section itself (cluster.nodes=N), which `keel plan` then checks."""
    check_cluster_flags(nodes=nodes, gpus_per_node=gpus_per_node, efa=efa)
    if cluster is None:
        missing = [f for v, f in ((nodes, "--nodes"), (gpus_per_node, "--gpus-per-node")) if v is None]
        if missing:
            raise KeelError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required: {source} has no "
                            "cluster section. Pass them, or add to the recipe: cluster: {nodes: N, gpus_per_node: G, "
                            "gpu: h100-80gb} (then keel plan, keel launch and keel train all default to it)")
        return Topology(nodes=nodes, gpus_per_node=gpus_per_node, processes_per_node=gpus_per_node or 1, gpu=None,
                        efa=efa or 0, instance_type=None)
    on_cpu = cluster.gpu == "cpu"
    if on_cpu and gpus_per_node:
        raise KeelError(f"--gpus-per-node {gpus_per_node}: the recipe's cluster runs on CPU (cluster.gpu: cpu, "
                        f"{cluster.gpus_per_node} processes per node; {source}). Leave out --gpus-per-node, or size it "
                        f"for GPUs explicitly: cluster.gpu=h100-80gb cluster.gpus_per_node={gpus_per_node} (check "
                        f"it with keel plan)")
    own_gpus = 0 if on_cpu else cluster.gpus_per_node
    for value, flag, key, own in ((nodes, "--nodes", "nodes", cluster.nodes),
                                  (gpus_per_node, "--gpus-per-node", "gpus_per_node", own_gpus)):
        if value is not None and value != own:
            raise KeelError(f"{flag} {value} does not match the recipe's cluster.{key} {own} ({source}): the recipe's "
                            f"batch and memory are sized for {cluster.nodes} x {cluster.gpus_per_node} {cluster.gpu}. "
                            f"Leave out {flag}, or resize the recipe explicitly with the override "
                            f"cluster.{key}={value} (check it with: keel plan {source} cluster.{key}={value})")
    return Topology(nodes=cluster.nodes, gpus_per_node=0 if on_cpu else cluster.gpus_per_node,
                    processes_per_node=cluster.gpus_per_node, gpu=cluster.gpu,
                    efa=cluster.efa if efa is None else efa, instance_type=cluster.instance_type)


@dataclass(frozen=True)
class Launch:
    """A recipe resolved for a launch: what every target renders from."""
    name: str
    recipe_path: Path
    recipe_text: str  # the file as written (the job receives it whole, comments included)
    args: list[str]  # the overrides the job runs with: the target's paths first, then the user's
    recipe: object  # trainer.recipe.Recipe, loaded with args exactly as the job will load it
    topology: Topology
    mlflow_uri: str | None


def resolve_launch(*, recipe_path: str | Path, overrides: list[str], path_overrides: list[str], name: str,
                   nodes: int | None, gpus_per_node: int | None, efa: int | None,
                   mlflow_uri: str | None) -> Launch:
    """Validate the recipe as the job will load it (the same errors as `keel validate`), resolve its
    cluster and refuse credentials that the rendered output would hold in plain text."""
    from data.files import read_text
    from trainer.recipe import MAX_RECIPE_BYTES, load_recipe

    path = Path(recipe_path)
    args = [*path_overrides, *overrides]
    recipe = load_recipe(path, args)  # raises KeelError with every problem, as `keel validate` does
    refuse_inlined_secrets(recipe.to_dict(), mlflow_uri)
    topology = resolve_topology(recipe.cluster, nodes=nodes, gpus_per_node=gpus_per_node, efa=efa, source=str(path))
    text = read_text(path, what="recipe file", max_bytes=MAX_RECIPE_BYTES)
    return Launch(name=name, recipe_path=path, recipe_text=text, args=args, recipe=recipe, topology=topology,
                  mlflow_uri=mlflow_uri)


def shared_paths(*, name: str, root: str) -> list[str]:
    """Run directory and prepared-data cache on storage every node shares: a restarted or requeued
    job resumes from the newest checkpoint there, and data is prepared once for all nodes."""
    return [f"output.dir={root}/runs/{name}", f"data.cache_dir={root}/cache/prepared"]


def refuse_inlined_secrets(recipe: dict, mlflow_uri: str | None, *, extra: dict[str, str] | None = None) -> None:
    """Rendered jobs are printed, committed and kept by the scheduler in plain text: a password in a
    URL or a secret-named recipe key would be readable by anyone who can read the job. Refused,
    with where it goes instead (each target passes secrets by reference; docs/SECURITY.md)."""
    from data.redaction import has_url_credentials
    from trainer.recipe import flatten
    from trainer.run_facts import redact

    found = [k for k, v in flatten(redact(recipe)).items() if v != flatten(recipe).get(k)]
    if mlflow_uri and has_url_credentials(mlflow_uri):
        found.append("$MLFLOW_TRACKING_URI")
    found += [where for where, value in (extra or {}).items() if has_url_credentials(value)]
    if found:
        raise KeelError(
            f"{', '.join(sorted(found))} carries a credential, which the rendered job would hold in plain text. "
            "Remove it from the recipe, overrides, options and URI; pass it by reference instead: --secret (a "
            "Kubernetes Secret, or on Slurm a file read at job start) holding MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or HF_TOKEN; on SageMaker the "
            "job's --role grants S3")


def efa_env(efa: int) -> dict[str, str]:
    """libfabric's EFA provider, with GPUDirect RDMA on instances that have it (p4d, p5)."""
    return {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1"} if efa else {}


def nccl_env(topology: Topology) -> dict[str, str]:
    """What multi-node GPU jobs set in the field: NCCL errors end the job (and its restart resumes)
    instead of hanging in a collective; EFA when the nodes have it."""
    env = {}
    if topology.gpus_per_node:
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
        env["NCCL_DEBUG"] = "WARN"
    return {**env, **efa_env(topology.efa)}
