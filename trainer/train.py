"""The training process: what `torchrun -m trainer RECIPE [key=value ...] [--overwrite]` runs
on every rank.

recipe -> run identity (resume, refuse, or start) -> prepared data (from the cache, or built
by local rank 0 while the others wait on a file marker) -> model (+ LoRA/QLoRA) -> TRL trainer
under the recipe's distribution strategy, resuming from the latest complete checkpoint ->
export of a serving-ready, verified model dir.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import yaml

from data.errors import KeelError, print_error
from data.formats import Format, resolve_format
from data.model_dir import ExportInfo

from trainer.models.config import model_config
from trainer.models.flops import model_flops_per_token
from trainer.recipe import Recipe, check_paths, flatten, load_recipe
from trainer.resilience.run_identity import CHECKPOINT_DIR, MODEL_DIR, RUN_FILE, check_run_dir, recorded_failure
# What each technique trains on (the kind data/prepare.py reports for a prepared split).
TECHNIQUE_DATA = {"sft": "conversation", "cpt": "document", "dpo": "preference"}
DATA_TECHNIQUE = {kind: technique for technique, kind in TECHNIQUE_DATA.items()}
KIND_NAMES = {"conversation": "conversations", "document": "documents (plain text)",
              "preference": "preference pairs (prompt/chosen/rejected)"}


def dist_env() -> tuple[int, int, int]:
    """(global rank, local rank, world size) from the torchrun / PyTorchJob environment."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def log(msg: str) -> None:
    print(f"[keel] {msg}", flush=True)


def recipe_format(recipe: Recipe) -> Format:
    """The recipe's format with its rendering options (data.train_on, data.history_reasoning)."""
    return resolve_format(recipe.model.format, model_path=recipe.model.path, native_syntax=recipe.model.native_syntax,
                          history_reasoning=recipe.data.history_reasoning, train_on=recipe.data.train_on,
                          trust_remote_code=recipe.model.trust_remote_code)


def prepared_prompts(recipe: Recipe, split: str, local_rank: int, fmt: Format):
    """GRPO's prompts for a split (data/prompts.py). Local rank 0 builds them; the others wait."""
    from data.prompts import prepare_prompts
    from data.rewards import NEEDS_REFERENCE

    needs = next((name for name in recipe.grpo.rewards.used() if name in NEEDS_REFERENCE), None)
    return prepare_prompts(recipe.data.train if split == "train" else recipe.data.eval,
                           tokenizer_dir=recipe.model.path, fmt=fmt, seq_len=recipe.training.seq_len,
                           max_completion_tokens=recipe.grpo.max_completion_tokens, needs_reference=needs,
                           recorded_results=recipe.grpo.tool_results == "recorded",
                           split=split, cache_root=recipe.data.cache_dir, shape=recipe.data.shape,
                           on_invalid=recipe.data.on_invalid, build=local_rank == 0,
                           trust_remote_code=recipe.model.trust_remote_code)


def prepared_split(recipe: Recipe, split: str, local_rank: int, fmt: Format | None = None, node=None):
    """Prepared data for a split. Local rank 0 builds a missing cache; the others wait for it.

    With data.cache_dir set (the launchers set it to the volume every node shares), a job of
    several nodes prepares across them: each node's local rank 0 tokenizes its share of the
    rows (`node`, by default from the torchrun or operator environment; data/shards.py). The
    default cache directory is in the home directory, usually each node's own: there every
    node prepares its whole copy, as before."""
    from data.prepare import PrepOptions, prepare_file, wait_for_prepared
    from data.shards import NodeShare, node_share_from_env

    if recipe.technique == "grpo":
        return prepared_prompts(recipe, split, local_rank, fmt or recipe_format(recipe))
    data_file = recipe.data.train if split == "train" else recipe.data.eval
    kwargs = dict(tokenizer_dir=recipe.model.path, fmt=fmt or recipe_format(recipe),
                  seq_len=recipe.training.seq_len, cache_root=recipe.data.cache_dir,
                  trust_remote_code=recipe.model.trust_remote_code,
                  options=PrepOptions(shape=recipe.data.shape, on_invalid=recipe.data.on_invalid,
                                      packing=recipe.training.packing))
    if local_rank == 0:
        if recipe.data.cache_dir is None:
            node = NodeShare()
        prepared = prepare_file(data_file, split=split, num_proc=recipe.data.num_proc,
                                node=node if node is not None else node_share_from_env(), **kwargs)
    else:
        prepared = wait_for_prepared(data_file, **kwargs)
    if local_rank == 0 and prepared.kind == "document" and (recipe.data.train_on or recipe.data.history_reasoning):
        print(f"[keel] warning: data.{split} holds documents: data.train_on and data.history_reasoning have no "
              "effect on them (every token of a document is trained)", file=sys.stderr, flush=True)
    wanted = TECHNIQUE_DATA[recipe.technique]
    if prepared.kind != wanted:
        raise KeelError(
            f"data.{split}: {data_file} holds {KIND_NAMES[prepared.kind]}, but technique {recipe.technique!r} trains "
            f"on {KIND_NAMES[wanted]}. Set technique: {DATA_TECHNIQUE[prepared.kind]}, or point data.{split} at "
            f"{KIND_NAMES[wanted]} (data.shape selects how rows are read)."
        )
    return prepared


def init_process_group(distributed, *, rank: int, local_rank: int, world: int) -> None:
    """Start the process group ourselves, before TrainingArguments would.

    Two workarounds, both seen here with torch 2.13 / transformers 5.19:
    - after torchrun restarts failed workers, the new workers read the previous attempt's
      gloo addresses from the agent's store (its keys are not separated per attempt) and fail
      with "Connection refused"; keys under a per-attempt prefix fix that, so restarts resume;
    - TrainingArguments passes ddp_timeout to the process group on GPUs but drops it on the
      CPU path, leaving gloo's 30-minute default instead of distributed.timeout_s.
    accelerate and DeepSpeed keep a process group that already exists.
    """
    import datetime

    import torch
    import torch.distributed as dist

    if world <= 1 or dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=distributed.timeout_s)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                          is_master=not agent_store and rank == 0, timeout=timeout,
                          multi_tenant=not agent_store)
    store = dist.PrefixStore(f"keel/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def describe_prepared(prepared) -> str:
    """One line of what a prepared split holds (keel prepare and the trainer print it)."""
    s = prepared.stats
    if prepared.kind == "prompt":
        recorded = f", {s.with_recorded_results} with recorded tool results" if s.with_recorded_results else ""
        return (f"{s.rows} rows -> {s.prompts} prompts ({s.with_reference} with a reference{recorded}), longest prompt "
                f"{s.max_prompt_tokens} tokens, {s.rejected} rejected"
                + (f": see {prepared.rejected_file}" if prepared.rejected_file else ""))
    rows = (f", packed into {s.sequences} rows of up to {prepared.seq_len} tokens ({s.padding_fraction:.1%} padding)"
            if prepared.packed else "")
    return (f"{s.rows} rows -> {s.examples} examples, {s.tokens} tokens, {s.trained_tokens} trained{rows}, "
            f"{s.truncated} truncated, {s.dropped_no_trained_tokens_after_truncation} dropped after truncation, "
            f"{s.rejected} rejected" + (f": see {prepared.rejected_file}" if prepared.rejected_file else ""))


def mfu_flops_per_token(recipe: Recipe) -> int:
    """Training FLOPs per token for the tracker's MFU, counted as `keel plan` counts them
    (trainer/models/flops.py); 0, with a note, for a model type that arithmetic has no layout for."""
    try:
        return model_flops_per_token(model_config(recipe.model.path), recipe.peft)
    except KeelError as exc:
        log(f"note: no MFU in the metrics: {exc}")
        return 0


def log_load_policy(recipe: Recipe) -> None:
    """Say so when the recipe lets loading run code (both are off by default)."""
    if recipe.model.trust_remote_code:
        log(f"warning: model.trust_remote_code is on: Python code shipped in {recipe.model.path} runs in every "
            "training process (and in the server, which is told the model was trained so)")
    if recipe.model.allow_pickle:
        log(f"warning: model.allow_pickle is on: pickle-based weights in {recipe.model.path} may be loaded; "
            "unpickling runs whatever code the file holds")


def log_checkpoint_policy(recipe: Recipe) -> None:
    """Say so when the recipe saves no checkpoint during the run (neither interval is set)."""
    if recipe.checkpoint.every_steps is None and recipe.checkpoint.every_minutes is None:
        log("warning: neither checkpoint.every_steps nor checkpoint.every_minutes is set: no checkpoint is saved "
            "during the run (only on SIGTERM), so a crash, a dead rank or a lost node starts it over; "
            "set checkpoint.every_minutes (the catalogue's recipes use 30)")


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers (0: the first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def run_dir_decision(recipe: Recipe, *, overwrite: bool) -> str:
    """check_run_dir's decision, read before anything heavy is loaded. A worker that torchrun
    restarted after a failure a restart would repeat (recorded by the attempt that hit it)
    stops here with that failure's message."""
    decision = check_run_dir(recipe, overwrite=overwrite)
    if decision == "resume" and restart_count() > 0 and (failure := recorded_failure(Path(recipe.output.dir))):
        raise KeelError(f"{failure} (recorded in {Path(recipe.output.dir) / RUN_FILE} by an earlier attempt "
                        "of this job: this restart stops without training, since it would fail the same way)")
    return decision


def start_run_dir(recipe: Recipe, *, decision: str, is_main: bool) -> None:
    """Resume, start or (with --overwrite) restart the run in output.dir, as check_run_dir decided."""
    from trainer.resilience.run_identity import clear_run_dir, write_run_file

    if is_main:
        if decision == "overwrite":
            log(f"--overwrite: removing the previous run's checkpoints and model from {recipe.output.dir}")
            clear_run_dir(Path(recipe.output.dir))
        write_run_file(recipe, "running")


def build_model_parts(recipe: Recipe):
    """(tokenizer, model, peft_config): the base model in the dtype it trains in (4-bit for
    QLoRA) and the adapters' config (None for full fine-tuning)."""
    from data.model_loading import load_tokenizer
    from trainer.models.loading import build_model, build_peft_config

    tokenizer = load_tokenizer(recipe.model.path, recipe.model.load_policy)
    model = build_model(model_section=recipe.model, peft=recipe.peft, training=recipe.training,
                        distributed=recipe.distributed)
    return tokenizer, model, build_peft_config(recipe.peft)


def build_trainer(recipe: Recipe, *, model, tokenizer, peft_config, train_data, eval_data, output_dir: str,
                  callbacks: list, fmt: Format | None = None):
    """The technique's TRL trainer: TrainingArguments from the recipe's sections, the prepared
    datasets, Keel's callbacks. Creates no process group itself: under torchrun, train() has
    started one; a single process outside torchrun (a test, a notebook) needs none."""
    from transformers.trainer_callback import PrinterCallback

    from trainer.arguments import training_args

    args = training_args(training=recipe.training, checkpoint=recipe.checkpoint, distributed=recipe.distributed,
                         model=model, output_dir=output_dir, has_eval=eval_data is not None)
    if "MASTER_ADDR" not in os.environ:
        args["ddp_backend"] = None  # one process outside torchrun: no process group to create
    datasets = dict(train_dataset=train_data.load(), eval_dataset=eval_data.load() if eval_data else None)
    if recipe.technique == "dpo":
        from trainer.techniques.dpo import build_dpo_trainer

        trainer = build_dpo_trainer(model=model, tokenizer=tokenizer, peft_config=peft_config,
                                    dpo=recipe.dpo_settings, model_path=recipe.model.path, args=args,
                                    load_policy=recipe.model.load_policy, callbacks=callbacks, **datasets)
    elif recipe.technique == "grpo":
        from trainer.recipe import group_problem
        from trainer.techniques.grpo import build_grpo_trainer

        if problem := group_problem(recipe.grpo, recipe.training, int(os.environ.get("WORLD_SIZE", 1))):
            raise KeelError(problem)
        trainer = build_grpo_trainer(model=model, tokenizer=tokenizer, peft_config=peft_config, grpo=recipe.grpo,
                                     fmt=fmt or recipe_format(recipe), args=args, callbacks=callbacks, **datasets)
    else:  # sft on rendered conversations, cpt on document blocks: both next-token loss on labels
        from trainer.techniques.sft import build_sft_trainer

        trainer = build_sft_trainer(model=model, tokenizer=tokenizer, peft_config=peft_config, args=args,
                                    packed=train_data.packed, callbacks=callbacks, **datasets)
    # Keel prints its own progress lines (RunTracker); without a TTY, transformers would also
    # print every log dict.
    trainer.remove_callback(PrinterCallback)
    return trainer


def export_run(recipe: Recipe, trainer, *, tokenizer, peft_config, fmt: Format, world: int,
               mlflow_run_id: str | None) -> Path:
    """The serving-ready, verified model dir in output.dir/model, with the facts serving reads
    (keel-export.yaml)."""
    from trainer.arguments import compute_precision
    from trainer.export import export_trained

    out = Path(recipe.output.dir) / MODEL_DIR
    precision = compute_precision(recipe.training)
    export_trained(
        trainer, tokenizer, fmt=fmt, out_dir=out, recipe_model_path=recipe.model.path, peft_config=peft_config,
        merge_lora=recipe.output.merge_lora, precision=precision, quantized=recipe.peft.kind == "qlora",
        load_policy=recipe.model.load_policy,
        info=ExportInfo(base_model=recipe.model.path, format=fmt.name, technique=recipe.technique,
                        peft=recipe.peft.kind, adapter=recipe.peft.kind != "none" and not recipe.output.merge_lora,
                        seq_len=recipe.training.seq_len, world_size=world,
                        trust_remote_code=recipe.model.trust_remote_code,
                        # the dtype training computed in; the server uses it too (vLLM's CPU backend
                        # would otherwise downcast float32 weights to bfloat16)
                        dtype="bfloat16" if precision == "bf16" else "float32",
                        mlflow_run_id=mlflow_run_id),
    )
    return out


def fit(trainer, recipe: Recipe, *, resume_from: Path | None, heartbeat, stopper, rank: int, world: int) -> None:
    """Run the training loop to its end, resuming from `resume_from`; a collective that timed
    out becomes a Keel error naming the rank, a SIGTERM a checkpoint and StoppedBySignal."""
    from trainer.resilience.heartbeat import is_collective_timeout
    from trainer.resilience.stopping import StoppedBySignal

    ckpt_root = Path(recipe.output.dir) / CHECKPOINT_DIR
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except Exception as exc:
        if world > 1 and is_collective_timeout(exc):
            raise KeelError(
                f"a collective did not finish within distributed.timeout_s={recipe.distributed.timeout_s}s on "
                f"rank {rank}: {heartbeat.report()}. Running the same command again resumes from the latest "
                f"complete checkpoint in {ckpt_root}."
            ) from exc
        raise
    if stopper.stopped_at is not None:
        raise StoppedBySignal(f"stopped by SIGTERM, checkpoint at step {stopper.stopped_at} "
                              f"({ckpt_root / f'checkpoint-{stopper.stopped_at}'}); running the same command "
                              "again resumes from it")


def resume_point(ckpt_root: Path, *, is_main: bool, world: int) -> Path | None:
    """The latest complete checkpoint, after rank 0 set aside incomplete and damaged ones."""
    from trainer.resilience.checkpoints import latest_complete_checkpoint, set_aside_damaged, set_aside_incomplete

    if is_main:
        for path in set_aside_incomplete(ckpt_root):
            log(f"warning: checkpoint without completion marker set aside, not loaded: {path}")
        for path, why in set_aside_damaged(ckpt_root):
            log(f"warning: checkpoint damaged since it was saved ({why}) set aside, not loaded: {path}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank picks its checkpoint after rank 0 set the unusable ones aside
    return latest_complete_checkpoint(ckpt_root)


def start_tracking(recipe: Recipe, *, fmt: Format, recipe_file: str | None, remote: dict, resume_step: int,
                   rank: int, local_rank: int, world: int):
    """(tracker, system metrics): the MLflow run (rank 0 creates it; every rank learns its id)
    with the redacted recipe, the format and the environment, and the node's system sampler."""
    from trainer.run_facts import redact, run_environment
    from trainer.tracking.tracker import NodeSystemMetrics, RunTracker, share_run

    is_main = rank == 0
    as_written = recipe.to_dict()
    for key, uri in remote.items():
        if uri:
            section, field = key.split(".")
            as_written[section][field] = uri
    recipe_public = redact(as_written)  # what reaches MLflow: no passwords, tokens or signed URLs
    env_artifacts, env_tags = run_environment(recipe_file) if is_main else ({}, {})
    tracker = RunTracker(
        mlflow_section=recipe.tracking.mlflow,
        params={**flatten(recipe_public), "world_size": world},
        artifacts={"recipe.yaml": yaml.safe_dump(recipe_public, sort_keys=False),
                   # a harmony format has no chat template (its spec says how it renders)
                   **({f"format/{fmt.spec.chat_template}": fmt.chat_template} if fmt.chat_template is not None
                      else {}),
                   "format/spec.yaml": fmt.spec_yaml(), **env_artifacts},
        tags=env_tags, run_dir=Path(recipe.output.dir), is_main=is_main, log_every=recipe.training.log_every_steps,
        resume_step=resume_step, flops_per_token=mfu_flops_per_token(recipe) if is_main else 0, world=world,
    )
    tracker.start()
    run_id, tracking_uri = share_run(tracker.run_id, recipe.tracking.mlflow.tracking_uri, world)
    system_metrics = NodeSystemMetrics(run_id, tracking_uri,
                                       node=int(os.environ.get("GROUP_RANK", 0)),
                                       # one process per node samples: its first
                                       every_s=recipe.tracking.mlflow.system_metrics_every_s if local_rank == 0 else 0,
                                       sink=tracker.log_system if is_main else None)
    return tracker, system_metrics


def train(recipe: Recipe, *, overwrite: bool = False, recipe_file: str | None = None,
          remote: dict[str, str | None] | None = None) -> Path:
    """Train and export: run identity and data, model, tracking, trainer, fit, export. `remote`:
    the URIs a remote model.path / output.dir stood for before trainer.remote.localize replaced
    them with local places."""
    rank, local_rank, world = dist_env()
    is_main = rank == 0
    run_dir = Path(recipe.output.dir)
    ckpt_root = run_dir / CHECKPOINT_DIR
    remote = remote or {}
    model_uri = (remote["output.dir"].rstrip("/") + "/" + MODEL_DIR if remote.get("output.dir")
                 else str((run_dir / MODEL_DIR).resolve()))
    decision = run_dir_decision(recipe, overwrite=overwrite)
    if decision == "finished":
        # A re-run of a finished run, or a worker torchrun restarted after the export (a rank
        # that died at teardown): the model is complete, nothing is left to do.
        if is_main:
            log(f"output.dir {run_dir} holds this recipe's finished run: nothing to train; the model is in {model_uri}")
        return run_dir / MODEL_DIR

    from trainer.resilience.checkpoints import CheckpointCompletion, fail_loudly_on_save, no_step_past_max_steps
    from trainer.resilience.heartbeat import Heartbeat
    from trainer.resilience.non_finite import stop_on_non_finite
    from trainer.resilience.run_identity import write_run_file
    from trainer.resilience.stopping import StopOnSigterm

    stopper = StopOnSigterm(rank=rank, ckpt_root=ckpt_root)
    stopper.install()
    fmt = recipe_format(recipe)
    t0 = time.time()
    if is_main:
        log_load_policy(recipe)
        log_checkpoint_policy(recipe)
    start_run_dir(recipe, decision=decision, is_main=is_main)
    init_process_group(recipe.distributed, rank=rank, local_rank=local_rank, world=world)

    train_data = prepared_split(recipe, "train", local_rank, fmt)
    eval_data = prepared_split(recipe, "eval", local_rank, fmt) if recipe.data.eval else None
    if is_main:
        log(f"data: {'reused' if train_data.reused else 'prepared'} {train_data.path} ({describe_prepared(train_data)})")

    tokenizer, model, peft_config = build_model_parts(recipe)
    resume_from = resume_point(ckpt_root, is_main=is_main, world=world)
    resume_step = int(resume_from.name.split("-")[1]) if resume_from else 0
    tracker, system_metrics = start_tracking(recipe, fmt=fmt, recipe_file=recipe_file, remote=remote,
                                             resume_step=resume_step, rank=rank, local_rank=local_rank, world=world)
    for split, prepared in (("train", train_data), ("eval", eval_data)):
        if prepared is not None:
            tracker.log_stats(f"data.{split}", prepared.stats.numbers())
            tracker.log_files(f"data/{split}", prepared.report_files())
    status = "FAILED"
    try:
        heartbeat = Heartbeat(rank, world)
        callbacks = [tracker, CheckpointCompletion(is_main=is_main, every_minutes=recipe.checkpoint.every_minutes,
                                                   keep_last=recipe.checkpoint.keep_last),
                     heartbeat, stopper]
        trainer = build_trainer(recipe, model=model, tokenizer=tokenizer, peft_config=peft_config,
                                train_data=train_data, eval_data=eval_data, output_dir=str(ckpt_root),
                                callbacks=callbacks, fmt=fmt)
        fail_loudly_on_save(trainer, ckpt_root)
        no_step_past_max_steps(trainer)

        def record_failure(message: str) -> None:
            if is_main:
                write_run_file(recipe, "failed", failure=message)

        stop_on_non_finite(trainer, record_failure=record_failure)
        if resume_from is not None and is_main:
            log(f"resumed from checkpoint step {resume_step} ({resume_from})")
        try:
            fit(trainer, recipe, resume_from=resume_from, heartbeat=heartbeat, stopper=stopper, rank=rank, world=world)
        except KeelError:
            if stopper.stopped_at is not None:
                status = "KILLED"
            raise

        out = export_run(recipe, trainer, tokenizer=tokenizer, peft_config=peft_config, fmt=fmt, world=world,
                         mlflow_run_id=tracker.run_id)
        if is_main and not remote.get("output.dir"):
            # Finished as soon as the verified export is in place, before waiting for the other
            # ranks: a rank that dies from here on (at teardown) makes torchrun restart the
            # workers, and the restarted ones find the run finished and end at once.
            write_run_file(recipe, "finished")
            status = "FINISHED"
        try:
            trainer.accelerator.wait_for_everyone()
        except Exception:
            if status != "FINISHED":
                raise
            log("warning: a rank ended before the end of the run; the export is complete")
        if is_main:
            if remote.get("output.dir"):
                from trainer.remote import upload_dir

                upload_dir(out, model_uri)  # finished once uploaded, with its completion marker
                write_run_file(recipe, "finished")
            log(f"exported {model_uri} in {time.time() - t0:.0f}s total")
            tracker.register_model(model_uri, recipe.output.register_as, upload=recipe.output.register_upload)
        status = "FINISHED"
        return out
    finally:
        system_metrics.finish()
        tracker.finish(status=status, tags={"keel.model_dir": model_uri}
                       if status == "FINISHED" else None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: torchrun [torchrun options] -m trainer RECIPE [key=value ...] [--overwrite]")
        return 0 if argv else 2
    # --overwrite applies to the first start only: workers that torchrun restarts after a
    # failure must resume from the checkpoint, not wipe it.
    overwrite = "--overwrite" in argv and restart_count() == 0
    argv = [a for a in argv if a != "--overwrite"]
    source, overrides = argv[0], argv[1:]
    try:
        recipe = load_recipe(source, overrides)
        check_paths(recipe, source)
        from trainer.remote import localize

        recipe, remote = localize(recipe, local_rank=dist_env()[1])
        train(recipe, overwrite=overwrite, recipe_file=source, remote=remote)
        dist = sys.modules.get("torch.distributed")  # not loaded when there was nothing to train
        if dist is not None and dist.is_available() and dist.is_initialized():
            # after the last collective of the run: without it a rank can abort at interpreter
            # exit ("terminate called without an active exception"), and torch warns of a leak
            dist.destroy_process_group()
    except KeelError as exc:
        rank = dist_env()[0]
        # loaded once training began; a worker that stopped before (a restart with nothing to
        # do) must not wait for transformers to load just to print its error
        stopping = sys.modules.get("trainer.resilience.stopping")
        if stopping is not None and isinstance(exc, stopping.StoppedBySignal):
            if rank == 0:
                print(f"keel: {exc}", file=sys.stderr, flush=True)
            return stopping.EXIT_STATUS
        print_error(exc, rank=rank)
        return 2
    return 0
