"""The recipe: one typed, frozen schema for a training run.

YAML file -> dotted `key=value` overrides -> one validation -> `Recipe`. Unknown keys are
errors (with the closest valid name), and every problem is reported at once with its YAML
path, why, and the fix.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from data.errors import KeelError
from data.files import parse_yaml, quote, read_text
from data.model_config import read_model_config
from data.model_loading import tokenizer_problem
from data.formats import available_formats
from data.redaction import URL_USERINFO, redact_text
from trainer.models.config import packing_problem
from trainer.models.known import format_problem, known_model, path_kind
from trainer.plan import GPUS  # the planner's table is the one list of GPU kinds


class Section(BaseModel):
    # allow_inf_nan=False: `learning_rate: .inf` passes gt=0 and trains a model of NaNs
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSection(Section):
    path: str = Field(description="Local directory, hub id (org/name) or s3:// URI of the base model.")
    format: str = Field(description="Conversation format: a directory name under data/formats/, or native "
                                    "(the base model's own chat template).")
    native_syntax: str | None = Field(
        default=None, description="With format native: the shipped format whose tool-call and reasoning syntax "
                                  "the model's template writes; default: picked from the model type.")
    trust_remote_code: bool = Field(
        default=False, description="Run Python code shipped in the model directory (auto_map in its config) "
                                   "when loading the model and tokenizer. Off: such a model is refused.")
    allow_pickle: bool = Field(
        default=False, description="Load weights from pickle-based files (pytorch_model.bin, *.pt), which can "
                                   "run code when read. Off: only safetensors weights are loaded.")

    @property
    def load_policy(self):
        from data.model_loading import LoadPolicy

        return LoadPolicy(trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle)


class DataSection(Section):
    train: str = Field(description="Training data: a file (.jsonl, .json, .parquet, .csv, documents), a saved "
                                   "dataset or a directory of documents; a local path or an fsspec URL.")
    eval: str | None = Field(default=None, description="Optional held-out data in the same shape.")
    cache_dir: str | None = Field(
        default=None, description="Where prepared (tokenized) data is cached; default ~/.cache/keel/prepared."
    )
    shape: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "preference", "text"] = Field(
        default="auto", description="How rows are laid out; auto: from the first row's keys.")
    on_invalid: Literal["error", "skip"] = Field(
        default="error", description="error: stop and list invalid rows; skip: leave them out and list them in "
                                     "rejected.jsonl next to the prepared data.")
    train_on: Literal["all", "last"] | None = Field(
        default=None, description="Assistant turns trained: all, or only the last of each conversation; "
                                  "default: the format's.")
    history_reasoning: Literal["drop", "keep"] | None = Field(
        default=None, description="Reasoning of assistant turns before the last user message: drop or keep, "
                                  "in training and in the exported template; default: the format's.")
    num_proc: int | None = Field(
        default=None, gt=0, description="Processes that render and tokenize the data; default the CPUs the process may use. "
                                        "The prepared result (and its cache) is the same for any value.")


class PeftSection(Section):
    kind: Literal["none", "lora", "qlora"] = Field(
        default="none", description="none: full fine-tuning; lora; qlora: LoRA on a 4-bit base (needs a CUDA GPU)."
    )
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class DpoSection(Section):
    beta: float = Field(default=0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "bco_pair", "apo_zero", "apo_down"] = "sigmoid"
    reference: Literal["auto", "copy", "base_adapters_disabled"] = Field(
        default="auto",
        description="auto: the base model with adapters disabled under LoRA/QLoRA, a frozen copy otherwise.",
    )


class GrpoRewards(Section):
    """Weights of the closed-name rewards (data/rewards.py); 0 leaves one out."""

    tool_call: float = Field(default=0.0, description="Calls equal the reference's: names, and arguments as JSON values.")
    schema_valid: float = Field(default=0.0, description="Calls' arguments validate against the offered tool's schema.")
    format: float = Field(default=0.0, description="Turn ended, reasoning in the think delimiters, no malformed call, "
                                                   "no markup in content.")
    answer_match: float = Field(default=0.0, description="Final content equals the reference's content.")
    length: float = Field(default=0.0, description="Penalty: minus the completion's share of max_completion_tokens.")

    def used(self) -> dict[str, float]:
        return {name: weight for name, weight in self.model_dump().items() if weight}


class GrpoSection(Section):
    num_generations: int = Field(default=4, gt=1, description="Group size: completions sampled per prompt; their "
                                                               "rewards are compared within the group.")
    max_completion_tokens: int = Field(default=256, gt=0, description="Most tokens a completion may have.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature of the rollouts.")
    beta: float = Field(default=0.0, ge=0, description="KL penalty against the starting model; 0: no reference model.")
    epsilon: float = Field(default=0.2, gt=0, lt=1, description="PPO-style clip range of the probability ratio.")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(
        default="dapo", description="How token losses are averaged (TRL's loss_type); dapo: over all tokens of the batch.")
    iterations: int = Field(default=1, gt=0, description="Optimizer passes over each generated batch (TRL's num_iterations).")
    rewards: GrpoRewards = Field(description="Reward weights by name: tool_call, schema_valid, format, answer_match, "
                                             "length; at least one non-zero.")
    tool_name_credit: float = Field(default=0.0, ge=0, le=1, description="tool_call reward when only the call names "
                                                                        "match the reference.")
    answer_normalized: bool = Field(default=True, description="answer_match ignores case, whitespace and trailing "
                                                              "punctuation; false: exact match.")
    python_rewards: dict[str, float] = Field(
        default_factory=dict, description="Your own reward functions by dotted path (module.function) -> weight; "
                                          "runs your code, so it needs grpo.trust_python_code: true.")
    trust_python_code: bool = Field(default=False, description="Allow grpo.python_rewards (imports and runs the named "
                                                               "Python functions in every training process).")
    max_turns: int = Field(default=1, gt=0, description="Assistant turns per rollout: above 1, the model's tool calls "
                                                        "get results (grpo.tool_results) that are fed back.")
    tool_results: Literal["module", "recorded"] = Field(
        default="module", description="Where multi-turn rollouts get tool results: module, by running the functions "
                                      "of grpo.tools_module; recorded, from the tool results recorded in the data "
                                      "(a call whose name and arguments match a recorded call gets its result; "
                                      "the prompt ends at the row's last user message).")
    tools_module: str | None = Field(
        default=None, description="Python module whose functions are the tools multi-turn rollouts call, by name; "
                                  "runs your code, so it needs grpo.trust_python_code: true.")
    generation: Literal["auto", "transformers", "vllm"] = Field(
        default="auto", description="Rollout engine: transformers' generate, or vLLM colocated in the training "
                                    "processes (TRL's colocate mode); auto: vllm on CUDA GPUs with vLLM installed, "
                                    "transformers otherwise.")

    @model_validator(mode="after")
    def _some_reward(self):
        if not self.rewards.used() and not self.python_rewards:
            raise ValueError("grpo.rewards: every weight is 0; give at least one reward a weight, e.g. "
                             "grpo.rewards.tool_call: 1.0")
        if self.python_rewards and not self.trust_python_code:
            raise ValueError("grpo.python_rewards: runs Python code from your modules in every training process; "
                             "set grpo.trust_python_code: true to allow it, or remove grpo.python_rewards")
        if self.tools_module is not None and not self.trust_python_code:
            raise ValueError("grpo.tools_module: runs your Python functions as tools in every training process; set "
                             "grpo.trust_python_code: true to allow it, or remove grpo.tools_module")
        if self.tool_results == "recorded" and self.tools_module is not None:
            raise ValueError("grpo.tools_module: not used with grpo.tool_results: recorded (the results come from the "
                             "data); remove grpo.tools_module, or set grpo.tool_results: module to run it")
        if self.tool_results == "recorded" and self.max_turns == 1:
            raise ValueError("grpo.tool_results: recorded results are fed back between assistant turns, and "
                             "grpo.max_turns is 1; set grpo.max_turns: 2 (or more), or remove grpo.tool_results")
        if self.max_turns > 1 and self.tool_results == "module" and self.tools_module is None:
            raise ValueError(f"grpo.max_turns: {self.max_turns} turns need tool results between them; set "
                             "grpo.tools_module (and grpo.trust_python_code: true) to run your tools, or "
                             "grpo.tool_results: recorded to replay the results recorded in the data, or "
                             "grpo.max_turns: 1")
        if self.max_turns > 1 and self.generation == "vllm":
            raise ValueError("grpo.max_turns: multi-turn rollouts generate with transformers here; set "
                             "grpo.generation: transformers (or auto), or grpo.max_turns: 1")
        for path in self.python_rewards:
            if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", path):
                raise ValueError(f"grpo.python_rewards: {path!r} is not a dotted path module.function; write it "
                                 "like my_rewards.exact_answer")
        return self


def group_problem(grpo: GrpoSection, training: "TrainingSection", world: int) -> str | None:
    """Why the batch cannot be cut into whole groups, or None: TRL samples each prompt's group in
    one generation batch of micro_batch_size x processes x grad_accum completions."""
    batch = training.micro_batch_size * training.grad_accum * world
    if batch % grpo.num_generations:
        return (f"grpo.num_generations: {grpo.num_generations} completions per prompt do not divide the generation "
                f"batch of {batch} (training.micro_batch_size {training.micro_batch_size} x "
                f"training.grad_accum {training.grad_accum} x {world} processes); make the batch a multiple of "
                f"{grpo.num_generations}, or pick a group size that divides {batch}")
    return None


class TrainingSection(Section):
    max_steps: int | None = Field(default=None, gt=0)
    epochs: float | None = Field(default=None, gt=0)
    learning_rate: float = Field(gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    micro_batch_size: int = Field(default=1, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    seq_len: int = Field(default=2048, gt=0)
    packing: bool = Field(
        default=False, description="Bin-pack examples into rows of seq_len tokens, attention kept per example "
                                   "(position ids restart; flash attention's varlen kernels, Keel's per-document "
                                   "SDPA on CPU, or a block-diagonal mask; probed at start). Trains faster than "
                                   "padded batches on CPU and GPU (benchmarks/train_throughput.py): every "
                                   "catalogue recipe packs except DPO (preference pairs are never packed) and "
                                   "models with attention sinks (refused). Off unless set.")
    seed: int = 42
    log_every_steps: int = Field(default=1, gt=0)
    gradient_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="auto: bf16 on GPUs that support it, fp32 on CPU."
    )

    @model_validator(mode="after")
    def _one_length(self):
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError(
                "training.max_steps: set exactly one of training.max_steps and training.epochs "
                f"(got max_steps={self.max_steps}, epochs={self.epochs})"
            )
        return self


class DistributedSection(Section):
    strategy: Literal["ddp", "zero1", "zero2", "zero3", "fsdp2"] = "ddp"
    offload: Literal["none", "optimizer", "optimizer_and_params"] = Field(
        default="none", description="DeepSpeed CPU offload: optimizer (zero2, zero3) or also parameters (zero3)."
    )
    timeout_s: int = Field(default=1800, gt=0, description="Bound on any collective; a stuck rank fails the job after this.")

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload == "optimizer" and self.strategy not in ("zero2", "zero3"):
            raise ValueError(f"distributed.offload: optimizer needs strategy zero2 or zero3 (got {self.strategy})")
        if self.offload == "optimizer_and_params" and self.strategy != "zero3":
            raise ValueError(f"distributed.offload: optimizer_and_params needs strategy zero3 (got {self.strategy})")
        return self


class CheckpointSection(Section):
    every_steps: int | None = Field(default=None, gt=0, description="Save every N optimizer steps.")
    every_minutes: float | None = Field(default=None, gt=0, description="Also save when this much time passed.")
    keep_last: int = Field(default=2, gt=0)


class MlflowSection(Section):
    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else MLflow's local store in the working directory."
    )
    experiment: str = "keel"
    run_name: str | None = None
    system_metrics_every_s: float = Field(
        default=10.0, ge=0, description="Seconds between system-metric samples (CPU, memory, disk, network, GPU), "
                                        "logged by one process per node as system/node_<N>/...; 0 turns them off.")


class TrackingSection(Section):
    mlflow: MlflowSection = MlflowSection()


class OutputSection(Section):
    dir: str = Field(description="Run directory: checkpoints and the exported model (in <dir>/model).")
    merge_lora: bool = Field(default=True, description="Merge LoRA into the base at export; false keeps the adapter.")
    register_as: str | None = Field(
        default=None, description="Register the export in the MLflow model registry under this name (by "
                                  "reference to where it lives; see register_upload)."
    )
    register_upload: bool = Field(
        default=False, description="Also upload the exported weights to MLflow as run artifacts, so the registry "
                                   "version works without access to output.dir (off: a 70B export is not pushed "
                                   "through a tracking server by default)."
    )


class ClusterSection(Section):
    """Where the recipe is sized to run. `keel plan`, `keel launch` and `keel train` default to it;
    their flags override it (`keel launch` refuses a --nodes or --gpus-per-node that disagrees,
    unless the override is explicit: cluster.nodes=N)."""

    nodes: int = Field(default=1, gt=0, description="Machines (nodes) the job runs on.")
    gpus_per_node: int = Field(gt=0, description="GPUs per node, one training process each; with gpu: cpu, "
                                                 "training processes per node.")
    gpu: str = Field(description="GPU kind, as keel plan knows them (h100-80gb, a100-80gb, ...), or cpu.")
    efa: int = Field(default=0, ge=0, description="EFA network interfaces per node (AWS p4d/p5: 4/32); 0: none. "
                                                  "Adds the EFA devices and libfabric's settings to launched jobs.")
    instance_type: str | None = Field(
        default=None, description="Cloud instance type, e.g. ml.p5.48xlarge: what `keel launch --target sagemaker` "
                                  "requests unless --instance-type names another.")

    @model_validator(mode="after")
    def _known_gpu(self):
        if self.gpu != "cpu" and self.gpu not in GPUS:
            close = difflib.get_close_matches(self.gpu, list(GPUS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"cluster.gpu: {self.gpu!r} is not a GPU kind keel plan knows; {hint}use one of: "
                             + ", ".join(sorted(GPUS)) + ", cpu")
        return self


class Recipe(Section):
    model: ModelSection
    data: DataSection
    technique: Literal["cpt", "sft", "dpo", "grpo"] = "sft"
    peft: PeftSection = PeftSection()
    dpo: DpoSection | None = None
    grpo: GrpoSection | None = None
    training: TrainingSection
    distributed: DistributedSection = DistributedSection()
    checkpoint: CheckpointSection = CheckpointSection()
    tracking: TrackingSection = TrackingSection()
    output: OutputSection
    cluster: ClusterSection | None = None

    @model_validator(mode="after")
    def _cross_field(self):
        problems = []
        if self.model.format not in available_formats():
            problems.append(f"model.format: {self.model.format!r} is not a known format; use one of: "
                            + ", ".join(available_formats()))
        elif problem := format_problem(self.model.path, self.model.format):
            problems.append(problem)
        if (known := known_model(self.model.path)) is not None:
            if problem := packing_problem(known.config(), self.training.packing, known.hub_id):
                problems.append(problem)
        if self.model.native_syntax is not None:
            if self.model.format != "native":
                problems.append(f"model.native_syntax: only for model.format native (the format is "
                                f"{self.model.format!r}); remove it")
            elif self.model.native_syntax not in available_formats() or self.model.native_syntax == "native":
                problems.append(f"model.native_syntax: {self.model.native_syntax!r} is not a shipped format; use one "
                                "of: " + ", ".join(f for f in available_formats() if f != "native"))
        for key, location in (("model.path", self.model.path), ("data.train", self.data.train),
                              ("data.eval", self.data.eval), ("data.cache_dir", self.data.cache_dir),
                              ("output.dir", self.output.dir)):
            # http(s) sends user:password@ as basic auth (and Keel redacts it wherever it shows the
            # URL); object stores' fsspec drivers ignore it, so it could only leak
            if location and URL_USERINFO.match(location) and not location.lower().startswith(("http://", "https://")):
                problems.append(f"{key}: {redact_text(location)} carries credentials in the URL, which s3fs/gcsfs do "
                                "not read (and the URL is printed, and stored in keel-run.yaml); remove them and "
                                "use the store's usual credentials "
                                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a pod role, or a Secret "
                                "passed with `keel launch --secret NAME`)")
        if self.dpo is not None and self.technique != "dpo":
            problems.append(f"dpo: set, but technique is {self.technique!r}; remove it or set technique: dpo")
        problems += self._grpo_problems()
        if self.peft.kind == "qlora" and self.distributed.strategy in ("zero3", "fsdp2"):
            problems.append(f"peft.kind: qlora with distributed.strategy {self.distributed.strategy} is not supported "
                            "(4-bit weights cannot be sharded here); use ddp, zero1 or zero2")
        if self.dpo is not None and self.dpo.reference == "base_adapters_disabled" and self.peft.kind == "none":
            problems.append("dpo.reference: base_adapters_disabled needs peft.kind lora or qlora")
        if self.technique == "dpo" and self.training.packing:
            problems.append("training.packing: DPO trains on (prompt, chosen, rejected) pairs, which are never packed; "
                            "set training.packing: false")
        if self.peft.kind == "none" and not self.output.merge_lora:
            problems.append("output.merge_lora: false only applies with peft.kind lora or qlora")
        if problems:
            # One line per problem, each starting with its key path (see format_validation_error).
            raise ValueError("\n".join(problems))
        return self

    def _grpo_problems(self) -> list[str]:
        if self.technique != "grpo":
            return ([f"grpo: set, but technique is {self.technique!r}; remove it or set technique: grpo"]
                    if self.grpo is not None else [])
        if self.grpo is None:
            return ["grpo: technique grpo needs a grpo section with at least its rewards, e.g. "
                    "grpo: {rewards: {tool_call: 1.0}}"]
        problems = []
        if self.training.packing:
            problems.append("training.packing: GRPO trains on sampled completions, which are not packed; "
                            "set training.packing: false")
        if self.grpo.max_completion_tokens >= self.training.seq_len:
            problems.append(f"grpo.max_completion_tokens: {self.grpo.max_completion_tokens} leaves no room for the "
                            f"prompt in training.seq_len {self.training.seq_len}; lower it or raise training.seq_len")
        if self.cluster is not None:
            world = self.cluster.nodes * self.cluster.gpus_per_node
            if problem := group_problem(self.grpo, self.training, world):
                problems.append(problem)
        if self.model.format in available_formats() and self.model.format != "native":
            from data.formats import load_format
            from data.rewards import reward_problem

            fmt = load_format(self.model.format)
            if fmt.harmony:
                problems.append(f"model.format: technique grpo does not render {self.model.format!r} (harmony) "
                                "prompts yet; use a jinja format such as hermes-qwen3")
            for name in self.grpo.rewards.used():
                if problem := reward_problem(name, fmt):
                    problems.append(problem)
        return problems

    @property
    def dpo_settings(self) -> DpoSection:
        return self.dpo or DpoSection()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading


def apply_overrides(raw: dict, overrides: list[str], source: str) -> dict:
    """Apply dotted `key=value` overrides; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise KeelError(f"override {item!r}: expected KEY=VALUE, for example training.max_steps=100")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise KeelError(f"override {item!r}: {key!r} is not a dotted key like training.seq_len")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise KeelError(
                    f"override {item!r}: {'.'.join(parts[:depth + 1])} in {source} is a value, not a section"
                )
            node = child
        try:
            node[parts[-1]] = parse_yaml(value, f"override {item!r}") if value != "" else None
        except KeelError:  # not a YAML value: the text itself
            node[parts[-1]] = value
    return raw


def _section_class(loc: tuple) -> type[BaseModel] | None:
    """The schema class at a YAML path, for suggesting valid keys."""
    cls: Any = Recipe
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        # an optional section (`cluster: ClusterSection | None`) suggests its own keys too
        ann = next((a for a in (field.annotation, *typing.get_args(field.annotation))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if ann is None:
            return None
        cls = ann
    return cls


def _fix_hint(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not isinstance(p, int))
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _section_class(loc[:-1])
        valid = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        if close:
            return f"unknown key; did you mean '{close[0]}'?"
        return "unknown key; valid keys here: " + ", ".join(valid)
    if kind == "missing":
        cls = _section_class(loc[:-1])
        field = cls.model_fields.get(loc[-1]) if cls else None
        desc = f" ({field.description})" if field is not None and field.description else ""
        return f"required key is missing; add it{desc}"
    if kind == "literal_error":
        return f"{err['msg']} (got {quote(err.get('input'))})"
    return f"{err['msg']} (got {quote(err.get('input'))})"


def format_validation_error(exc: ValidationError, source: str) -> str:
    problems = []
    for err in exc.errors():
        if err["type"] == "value_error":
            # cross-field rules: one problem per line, each already starting with its key path
            problems += err["msg"].removeprefix("Value error, ").splitlines()
        else:
            # a key is quoted in full only when it is short: a megabyte-long key makes no readable message
            path = ".".join(str(p) if len(str(p)) <= 80 else quote(str(p)) for p in err["loc"]) or "(top level)"
            problems.append(f"{path}: {_fix_hint(err)}")
    lines = [f"{source}: invalid recipe ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"]
    return "\n".join(lines + [f"  - {p}" for p in problems])


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    return parse_recipe(read_text(path, what="recipe file", max_bytes=MAX_RECIPE_BYTES), str(path), overrides)


# a recipe is a few KiB
MAX_RECIPE_BYTES = 1 << 20
MAX_FLOW_NESTING = 100


def parse_recipe(text: str, source: str, overrides: list[str] | None = None) -> Recipe:
    """A recipe from its YAML text; `source` names it in every error."""
    # the safe loader only: no Python tags (!!python/object...), so a recipe cannot run code
    raw = parse_yaml(text, source, what="recipe", max_nesting=MAX_FLOW_NESTING)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise KeelError(f"{source}: a recipe must be a YAML mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [], source)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise KeelError(format_validation_error(exc, source)) from None


# --------------------------------------------------------------------------- paths

def missing_paths(recipe: Recipe) -> list[str]:
    """Problems with local paths the recipe names (hub ids and URIs are checked at run time)."""
    problems = []
    data_kinds = "a data file, a saved dataset or a directory of documents"
    checks = [("model.path", recipe.model.path, "a model directory (keel tiny-model OUT_DIR makes one)"),
              ("data.train", recipe.data.train, data_kinds)]
    if recipe.data.eval:
        checks.append(("data.eval", recipe.data.eval, data_kinds))
    known = known_model(recipe.model.path)
    if known is not None:  # a hub id whose config Keel keeps: its positions are known offline
        problems += _model_fit_problems(recipe, known.config_file)
    for key, value, what in checks:
        if path_kind(value) != "local":
            continue
        p = Path(value).expanduser()
        if not p.exists():
            where = "a symlink loop" if p.is_symlink() else f"resolved to {os.path.abspath(p)}"
            problems.append(f"  - {key}: {value!r} does not exist ({where}); expected {what}")
        elif key == "model.path" and not (p / "config.json").is_file():
            problems.append(f"  - {key}: {value!r} has no config.json; expected {what}")
        elif key == "model.path":
            problems += _model_fit_problems(recipe, p / "config.json")
            if problem := tokenizer_problem(p):
                problems.append(f"  - {problem}")
    return problems


def _model_fit_problems(recipe: Recipe, config_file: Path) -> list[str]:
    """What the model's own config rules out: a seq_len beyond its positions."""
    try:
        config = read_model_config(config_file)
    except KeelError as exc:
        return [f"  - model.path: {exc}"]
    problems = []
    if problem := packing_problem(config, recipe.training.packing, str(config_file.parent)):
        problems.append(f"  - {problem}")
    config = config.get("text_config", config)
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and recipe.training.seq_len > positions:
        problems.append(f"  - training.seq_len: {recipe.training.seq_len} is beyond the model's {positions} "
                        f"positions (max_position_embeddings in {config_file}); use at most {positions}")
    return problems


def check_paths(recipe: Recipe, source: str) -> None:
    problems = missing_paths(recipe)
    if problems:
        raise KeelError(f"{source}: {len(problems)} problem{'s' if len(problems) > 1 else ''} with what the recipe "
                       "points at:\n" + "\n".join(problems))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
