"""`keel launch --target sagemaker`: a recipe as a SageMaker CreateTrainingJob request.

The training image runs as SageMaker runs every training container (`docker run IMAGE train`);
its entrypoint (keel/launch/sagemaker_entrypoint.py) reads what the request says here:

    HyperParameters   keel_recipe: the recipe (JSON; comments dropped); keel_nproc_per_node;
                      every other key a dotted override with its value (SageMaker keeps strings)
    InputDataConfig   an s3:// data.train, data.eval or model.path becomes a channel (train,
                      eval, model) and the override points the recipe at its local copy in
                      /opt/ml/input/data/<channel>; --channel NAME=S3URI adds others
    CheckpointConfig  /opt/ml/checkpoints is output.dir, kept in S3 and put back after a restart
                      or a spot interruption: the job resumes from the newest checkpoint
    OutputDataConfig  /opt/ml/model (the export) is uploaded there when the job ends
    ResourceConfig    the recipe's cluster: nodes -> InstanceCount, --instance-type or
                      cluster.instance_type

Credentials: the job reads S3 with its --role; nothing secret is put in the request (refused).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path, PurePosixPath

from data.errors import KeelError
from keel.launch.job import nccl_env, resolve_launch
from keel.launch.k8s_objects import check_image, name_from

OPT_ML = "/opt/ml"
CHECKPOINTS = f"{OPT_ML}/checkpoints"
CHANNELS = f"{OPT_ML}/input/data"
RECIPE_KEY = "keel_recipe"
NPROC_KEY = "keel_nproc_per_node"
MAX_HYPERPARAMETER = 2500  # SageMaker's limit on one hyperparameter value
_JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
_ROLE = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+$")
_INSTANCE = re.compile(r"^ml\.[a-z0-9]+\.[a-z0-9]+$")
_S3 = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$")
_CHANNEL = re.compile(r"^[A-Za-z0-9\.\-_]+$")
# recipe key -> the channel an s3:// value of it becomes
RECIPE_CHANNELS = (("data.train", "train"), ("data.eval", "eval"), ("model.path", "model"))


def check_s3(uri: str, flag: str) -> str:
    from data.redaction import has_url_credentials, redact_text

    if has_url_credentials(uri):
        raise KeelError(f"{flag} {redact_text(uri)}: carries credentials in the URL, which the job request would "
                        "hold in plain text; remove them: the job reads S3 with its --role")
    if not _S3.match(uri):
        raise KeelError(f"{flag} {uri!r}: expected an S3 URI such as s3://my-bucket/keel/ (the job's --role must be "
                        "able to use it)")
    return uri


def channel_of(uri: str) -> tuple[str, str]:
    """(the S3 prefix SageMaker downloads, the local name under the channel's directory): a file
    s3://b/p/train.jsonl arrives as <channel>/train.jsonl; a prefix s3://b/p/docs/ as <channel>/."""
    if uri.endswith("/"):
        return uri, ""
    return uri, PurePosixPath(uri).name


def parse_channels(specs: list[str]) -> dict[str, str]:
    channels = {}
    for spec in specs:
        name, sep, uri = spec.partition("=")
        if not sep or not _CHANNEL.match(name) or len(name) > 64:
            raise KeelError(f"--channel {spec!r}: expected NAME=S3URI, e.g. --channel docs=s3://my-bucket/docs/ "
                            "(NAME: letters, digits, '.', '-', '_')")
        if name in channels or name in dict((c, k) for k, c in RECIPE_CHANNELS):
            raise KeelError(f"--channel {name}: named twice (train, eval and model are the recipe's own channels)")
        channels[name] = check_s3(uri, f"--channel {name}=")
    return channels


def _input_channel(name: str, uri: str) -> dict:
    return {"ChannelName": name, "InputMode": "File",
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri,
                                            "S3DataDistributionType": "FullyReplicated"}}}


def training_job_request(*, recipe_path: str | Path, overrides: list[str], image: str | None, role: str | None,
                         output_s3: str | None, name: str | None = None, nodes: int | None = None,
                         gpus_per_node: int | None = None, efa: int | None = None, instance_type: str | None = None,
                         checkpoint_s3: str | None = None, channels: list[str] = (), volume_gb: int = 500,
                         max_run_s: int = 432000, spot: bool = False, max_restarts: int = 3,
                         mlflow_uri: str | None = None) -> dict:
    """The CreateTrainingJob request (boto3's create_training_job keyword arguments)."""
    from data.options import check_count

    for value, flag, fix in ((image, "--image", "the training image in ECR, e.g. --image "
                              "REGISTRY/keel-train:0.1.0"),
                             (role, "--role", "the IAM role the job runs as, e.g. --role "
                              "arn:aws:iam::123456789012:role/keel-training"),
                             (output_s3, "--output-s3", "where the model is uploaded, e.g. --output-s3 "
                              "s3://my-bucket/keel/")):
        if not value:
            raise KeelError(f"{flag} is required for --target sagemaker: {fix}")
    check_image(image, example="REGISTRY/keel-train:0.1.0")
    if not _ROLE.match(role):
        raise KeelError(f"--role {role!r}: expected an IAM role ARN, e.g. arn:aws:iam::123456789012:role/keel-training")
    check_s3(output_s3, "--output-s3")
    name = name or name_from(str(recipe_path))
    if not _JOB_NAME.match(name):
        raise KeelError(f"--name {name!r}: expected letters, digits and '-', at most 63 characters (a SageMaker "
                        "training job name)")
    checkpoint_s3 = check_s3(checkpoint_s3, "--checkpoint-s3") if checkpoint_s3 else \
        f"{output_s3.rstrip('/')}/{name}/checkpoints"
    extra = parse_channels(list(channels))
    check_count(volume_gb, "--volume-gb")
    check_count(max_run_s, "--max-run")
    check_count(max_restarts, "--max-restarts", minimum=0)

    from trainer.models.known import path_kind
    from trainer.recipe import flatten, load_recipe

    # the recipe as the user wrote it (with their overrides): its s3:// locations become channels
    as_written = flatten(load_recipe(recipe_path, list(overrides)).to_dict())
    path_overrides, inputs, warnings = [f"output.dir={CHECKPOINTS}"], [], []
    for key, channel in RECIPE_CHANNELS:
        value = as_written.get(key)
        if isinstance(value, str) and value.startswith("s3://"):
            uri, local = channel_of(check_s3(value, key))
            inputs.append(_input_channel(channel, uri))
            path_overrides.append(f"{key}={CHANNELS}/{channel}" + (f"/{local}" if local else ""))
        elif isinstance(value, str) and "://" not in value and not (key == "model.path" and path_kind(value) == "hub"):
            warnings.append(f"[keel] warning: {key} {value} is a local path: the training container reads it from its "
                            f"image, not from this machine; an s3:// URI becomes the {channel!r} channel")
    inputs += [_input_channel(n, uri) for n, uri in extra.items()]
    # the channel paths come after the user's overrides: they must win over an s3:// override
    launch = resolve_launch(recipe_path=recipe_path, overrides=[*overrides, *path_overrides[1:]], name=name,
                            path_overrides=path_overrides[:1], nodes=nodes, gpus_per_node=gpus_per_node, efa=efa,
                            mlflow_uri=mlflow_uri)
    topo = launch.topology
    instance_type = instance_type or topo.instance_type
    if not instance_type:
        raise KeelError("--instance-type is required for --target sagemaker (the recipe's cluster has no "
                        "instance_type): e.g. --instance-type ml.p5.48xlarge, or add instance_type to the recipe's "
                        "cluster section")
    if not _INSTANCE.match(instance_type):
        raise KeelError(f"--instance-type {instance_type!r}: expected a SageMaker instance type such as ml.p5.48xlarge")

    hyperparameters = hyperparameters_for(launch.recipe_path, launch.args, topo.processes_per_node)
    env = dict(nccl_env(topo))
    if mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    request = {
        "TrainingJobName": name,
        "AlgorithmSpecification": {"TrainingImage": image, "TrainingInputMode": "File"},
        "RoleArn": role,
        "HyperParameters": hyperparameters,
        "OutputDataConfig": {"S3OutputPath": output_s3},
        "ResourceConfig": {"InstanceType": instance_type, "InstanceCount": topo.nodes, "VolumeSizeInGB": volume_gb},
        "StoppingCondition": {"MaxRuntimeInSeconds": max_run_s},
        "CheckpointConfig": {"S3Uri": checkpoint_s3, "LocalPath": CHECKPOINTS},
        "Environment": env,
        "Tags": [{"Key": "keel:recipe", "Value": str(launch.recipe_path)[:256]}],
    }
    if inputs:
        request["InputDataConfig"] = inputs
    if max_restarts:
        # on an internal failure the instances are replaced and the job resumes from the checkpoints
        request["RetryStrategy"] = {"MaximumRetryAttempts": min(max_restarts, 30)}
    if spot:
        request["EnableManagedSpotTraining"] = True
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = max_run_s * 2
    if not env:
        del request["Environment"]
    for warning in warnings:  # once every check has passed: an error stays the only line
        print(warning, file=sys.stderr)
    return request


def hyperparameters_for(recipe_path: Path, args: list[str], processes_per_node: int) -> dict[str, str]:
    """The recipe file (as JSON: SageMaker keeps strings, at most 2500 characters each) and each
    override as its own key."""
    from data.files import parse_yaml, read_text

    raw = parse_yaml(read_text(recipe_path, what="recipe file"), str(recipe_path), what="recipe") or {}
    recipe_json = json.dumps(raw, separators=(",", ":"), sort_keys=False)
    if len(recipe_json) > MAX_HYPERPARAMETER:
        raise KeelError(f"{recipe_path}: the recipe is {len(recipe_json)} characters as JSON; SageMaker holds at most "
                        f"{MAX_HYPERPARAMETER} per hyperparameter. Move settings to overrides (key=value, each its "
                        "own hyperparameter) or shorten lists")
    params = {RECIPE_KEY: recipe_json, NPROC_KEY: str(processes_per_node)}
    for item in args:
        key, _, value = item.partition("=")
        if len(value) > MAX_HYPERPARAMETER:
            raise KeelError(f"override {key}: {len(value)} characters; SageMaker holds at most {MAX_HYPERPARAMETER}")
        params[key] = value  # later overrides win, as on the command line
    return params


def create_training_job(request: dict, *, region: str | None) -> int:
    try:
        import boto3
    except ImportError:
        raise KeelError("--apply submits with boto3, which is not installed: pip install boto3, or leave out "
                        "--apply and submit the printed request: aws sagemaker create-training-job "
                        "--cli-input-json file://job.json") from None
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        response = boto3.client("sagemaker", region_name=region).create_training_job(**request)
    except (BotoCoreError, ClientError) as exc:
        raise KeelError(f"SageMaker did not create the training job {request['TrainingJobName']}: {exc}") from None
    print(response["TrainingJobArn"])
    return 0
