"""The training process: what `torchrun -m trainer RECIPE [key=value ...]` runs on every rank.

recipe -> prepared data (from the cache, or prepared by local rank 0 while the others wait on
a file marker) -> model (+ LoRA) -> TRL SFTTrainer -> export of a serving-ready model dir.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from data.errors import KeelError
from data.formats import Format, resolve_format
from trainer.recipe import Recipe, check_paths, flatten, load_recipe

CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"


def dist_env() -> tuple[int, int, int]:
    """(global rank, local rank, world size) from the torchrun / PyTorchJob environment."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def recipe_format(recipe: Recipe) -> Format:
    """The recipe's format with its rendering options (data.train_on, data.history_reasoning)."""
    return resolve_format(recipe.model.format, model_path=recipe.model.path, native_syntax=recipe.model.native_syntax,
                          history_reasoning=recipe.data.history_reasoning, train_on=recipe.data.train_on)


def prepared_split(recipe: Recipe, split: str, local_rank: int, fmt: Format | None = None):
    """Prepared data for a split. Local rank 0 builds a missing cache; the others wait for it."""
    from data.prepare import PrepOptions, prepare_file, wait_for_prepared

    data_file = recipe.data.train if split == "train" else recipe.data.eval
    kwargs = dict(tokenizer_dir=recipe.model.path, fmt=fmt or recipe_format(recipe),
                  seq_len=recipe.training.seq_len, cache_root=recipe.data.cache_dir,
                  options=PrepOptions(shape=recipe.data.shape, on_invalid=recipe.data.on_invalid))
    if local_rank == 0:
        prepared = prepare_file(data_file, split=split, **kwargs)
    else:
        prepared = wait_for_prepared(data_file, **kwargs)
    if local_rank == 0 and prepared.kind == "document" and (recipe.data.train_on or recipe.data.history_reasoning):
        print(f"[keel] warning: data.{split} holds documents: data.train_on and data.history_reasoning have no "
              "effect on them (every token of a document is trained)", file=sys.stderr, flush=True)
    if prepared.kind == "preference" and recipe.technique == "sft":
        raise KeelError(f"data.{split}: {data_file} holds preference pairs (prompt/chosen/rejected), which "
                        "technique 'sft' cannot train on; Keel's trainer has no DPO yet")
    return prepared


def build_peft_config(peft):
    """LoRA config from the recipe's peft section (None for full fine-tuning)."""
    if peft.kind == "none":
        return None
    from peft import LoraConfig

    return LoraConfig(r=peft.r, lora_alpha=peft.alpha, lora_dropout=peft.dropout,
                      target_modules=peft.target_modules, task_type="CAUSAL_LM")


def make_trainer_class():
    """TRL's SFTTrainer, with the model's own loss where TRL's fused LM head would run without Triton.

    TRL 1.16 always computes the loss through a chunked, fused LM head. Without Triton (on CPU)
    it falls back to a per-tile torch loop over every position that made a training step of the
    tiny model about 6x slower than the model's own cross-entropy (measured here: 5+ s vs 0.8 s
    for 16 x 450 tokens). Where Triton runs (GPU), TRL's path is kept: it saves logits memory.
    """
    import torch
    from transformers import Trainer
    from trl import SFTTrainer

    class KeelSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if torch.cuda.is_available():
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            labels = inputs["labels"]
            # Trainer.compute_loss: the model's loss over num_items_in_batch (the trained tokens of
            # every rank and accumulation step), scaled back for DDP's gradient averaging.
            loss = Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if model.training else "eval"
            if mode == "train":
                seen = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(labels.numel())
                trained = (labels[..., 1:] != -100).sum()
                counts = self.accelerator.gather_for_metrics(torch.stack([seen, trained]).view(1, 2)).sum(0)
                self._total_train_tokens += int(counts[0])
                self._total_trained_tokens = getattr(self, "_total_trained_tokens", 0) + int(counts[1])
                self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
                self._metrics[mode]["num_trained_tokens"] = [self._total_trained_tokens]
            return loss

    return KeelSFTTrainer


def build_sft_config(training, checkpoint, *, run_dir: Path, has_eval: bool):
    import torch
    from trl import SFTConfig

    on_gpu = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(run_dir / CHECKPOINT_DIR),
        max_steps=training.max_steps or -1,
        num_train_epochs=training.epochs or 1.0,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        per_device_train_batch_size=training.micro_batch_size,
        per_device_eval_batch_size=training.micro_batch_size,
        gradient_accumulation_steps=training.grad_accum,
        seed=training.seed,
        data_seed=training.seed,
        logging_steps=1,
        save_strategy="steps" if checkpoint.every_steps else "no",
        save_steps=checkpoint.every_steps or 500,
        save_total_limit=checkpoint.keep_last,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=max(1, (training.max_steps or 100) // 5) if has_eval else None,
        report_to="none",
        # Data is prepared (rendered, tokenized, truncated, labels built) by Keel; TRL only
        # batches it. Padded batches: on CPU, SDPA with a per-example (padding-free) mask ran
        # 2x slower than padded batches here; the speed issue revisits batching.
        dataset_kwargs={"skip_prepare_dataset": True},
        padding_free=False,
        max_length=None,
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        ddp_backend=None if on_gpu else "gloo",
        ddp_find_unused_parameters=False,
        disable_tqdm=not sys.stderr.isatty(),
        remove_unused_columns=False,
    )


def train(recipe: Recipe, source: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint
    from trainer.export import export_model
    from trainer.tracking import RunTracker

    rank, local_rank, world = dist_env()
    is_main = rank == 0
    run_dir = Path(recipe.output.dir)
    fmt = recipe_format(recipe)
    t0 = time.time()

    train_data = prepared_split(recipe, "train", local_rank, fmt)
    eval_data = prepared_split(recipe, "eval", local_rank, fmt) if recipe.data.eval else None
    if is_main:
        s = train_data.stats
        print(f"[keel] data: {'reused' if train_data.reused else 'prepared'} {train_data.path} "
              f"({s.rows} rows -> {s.examples} examples, {s.tokens} tokens, {s.trained_tokens} trained, "
              f"{s.truncated} truncated, {s.rejected} rejected"
              + (f": see {train_data.rejected_file}" if train_data.rejected_file else "") + ")", flush=True)

    tokenizer = AutoTokenizer.from_pretrained(recipe.model.path)
    model = AutoModelForCausalLM.from_pretrained(recipe.model.path, dtype=torch.float32)
    tracker = RunTracker(
        mlflow_section=recipe.tracking.mlflow,
        params={**flatten(recipe.to_dict()), "world_size": world},
        artifacts={"recipe.yaml": recipe.to_yaml(), f"format/{fmt.spec.chat_template}": fmt.chat_template,
                   "format/spec.yaml": fmt.spec_yaml()},
        run_dir=run_dir, is_main=is_main, log_every=recipe.training.log_every_steps,
    )
    tracker.start()
    tracker.log_stats("data.train", vars(train_data.stats))
    status = "FAILED"
    try:
        trainer = make_trainer_class()(
            model=model,
            args=build_sft_config(recipe.training, recipe.checkpoint, run_dir=run_dir, has_eval=eval_data is not None),
            train_dataset=train_data.load(),
            eval_dataset=eval_data.load() if eval_data else None,
            processing_class=tokenizer,
            peft_config=build_peft_config(recipe.peft),
            callbacks=[tracker],
        )
        # Keel prints its own progress lines (RunTracker); without a TTY, transformers would
        # also print every log dict.
        trainer.remove_callback(PrinterCallback)
        last = get_last_checkpoint(str(run_dir / CHECKPOINT_DIR)) if (run_dir / CHECKPOINT_DIR).is_dir() else None
        if last and is_main:
            print(f"[keel] resuming from checkpoint {last}", flush=True)
        trainer.train(resume_from_checkpoint=last)
        trainer.accelerator.wait_for_everyone()
        out = run_dir / MODEL_DIR
        if is_main:
            export_model(trainer.model, tokenizer, fmt=fmt, out_dir=out, info={
                "base_model": recipe.model.path, "format": fmt.name, "technique": recipe.technique,
                "peft": recipe.peft.kind, "seq_len": recipe.training.seq_len, "world_size": world,
                # the dtype training computed in; the server uses it too (vLLM's CPU backend
                # would otherwise downcast float32 weights to bfloat16)
                "dtype": "bfloat16" if trainer.args.bf16 else "float32",
                "mlflow_run_id": tracker.run_id,
            })
            print(f"[keel] exported {out} in {time.time() - t0:.0f}s total", flush=True)
        trainer.accelerator.wait_for_everyone()
        status = "FINISHED"
        return out
    finally:
        tracker.finish(status=status, tags={"keel.model_dir": str((run_dir / MODEL_DIR).resolve())}
                       if status == "FINISHED" else None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: torchrun [torchrun options] -m trainer RECIPE [key=value ...]")
        return 0 if argv else 2
    source, overrides = argv[0], argv[1:]
    try:
        recipe = load_recipe(source, overrides)
        check_paths(recipe, source)
        train(recipe, source)
    except KeelError as exc:
        rank = dist_env()[0]
        print(f"keel: error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
