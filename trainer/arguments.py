"""Training arguments shared by every technique: what the run computes in, what the machine
must support, and the TrainingArguments fields built from the recipe's sections."""

from __future__ import annotations

import sys
from typing import Any

from data.errors import KeelError


def compute_precision(training) -> str:
    """'bf16' or 'fp32': what the run computes in."""
    import torch

    if training.precision != "auto":
        return training.precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def check_device_support(*, peft, training) -> None:
    """Fail before any work when the recipe needs hardware this machine lacks."""
    import torch

    if peft.kind == "qlora" and not torch.cuda.is_available():
        raise KeelError(
            "peft.kind: qlora loads the base model in 4 bits with bitsandbytes, which needs a CUDA GPU; "
            "this machine has none. Use peft.kind=lora here, or run on a GPU machine."
        )
    if training.precision == "bf16" and not torch.cuda.is_available():
        print("[keel] warning: training.precision=bf16 on CPU runs under autocast and is usually slower than fp32",
              file=sys.stderr, flush=True)


def training_args(*, training, checkpoint, distributed, model, output_dir: str, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments fields shared by every technique."""
    import torch

    from trainer.parallel import strategy_args

    on_gpu = torch.cuda.is_available()
    bf16 = compute_precision(training) == "bf16"
    return dict(
        output_dir=output_dir,
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
        gradient_checkpointing=training.gradient_checkpointing,
        seed=training.seed,
        data_seed=training.seed,
        logging_steps=1,
        # Checkpoints are saved on Keel's schedule (CheckpointCompletion adds the time budget).
        save_strategy="steps" if checkpoint.every_steps or checkpoint.every_minutes else "no",
        save_steps=checkpoint.every_steps or 10**9,
        save_total_limit=None,  # Keel prunes after marking the new checkpoint complete (prune_checkpoints)
        eval_strategy="steps" if has_eval else "no",
        eval_steps=max(1, (training.max_steps or 100) // 5) if has_eval else None,
        report_to="none",
        use_cpu=not on_gpu,
        bf16=bf16,
        ddp_backend=None if on_gpu else "gloo",
        ddp_find_unused_parameters=False,
        disable_tqdm=not sys.stderr.isatty(),
        remove_unused_columns=False,
        **strategy_args(distributed, model=model),
    )
