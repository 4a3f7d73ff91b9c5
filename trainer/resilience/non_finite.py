"""A loss or gradient norm that is not finite ends training at that step.

transformers keeps going: with logging_nan_inf_filter (its default) it even logs the average of
earlier losses in place of a NaN, while the optimizer writes NaN into every weight, and the
checkpoints and the export that follow hold a broken model. Keel checks each optimizer step,
after its gradients are complete and before the optimizer applies them: every rank shares its
loss and gradient norm (one small all-gather), so every rank stops at the same step with the
same message naming it, before that step is applied or saved.

Such a failure is deterministic: a restart from the latest checkpoint with the same recipe and
data reaches the same step and fails the same way. Rank 0 records it in the run dir
(keel-run.yaml, status 'failed') before any rank exits, and a worker that torchrun restarts
finds it there and stops at once with the same message (trainer/train.py), instead of
training up to the same step again for every restart allowed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from data.errors import KeelError


class NonFiniteTraining(KeelError):
    """The loss or gradient norm of a step was NaN or infinite."""


def _per_rank(loss: float, grad_norm: float) -> list[tuple[float, float]]:
    """(loss, grad_norm) of every rank, in rank order (a collective: every rank calls it)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [(loss, grad_norm)]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    mine = torch.tensor([loss, grad_norm], dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [(t[0].item(), t[1].item()) for t in every]


def _describe(step: int, values: list[tuple[float, float]], *, learning_rate: float, latest: Path | None) -> str:
    bad_loss = [f"{loss} on rank {rank}" for rank, (loss, _) in enumerate(values) if not math.isfinite(loss)]
    grad_norm = values[0][1]  # the same on every rank: computed from the all-reduced gradients
    what = []
    if bad_loss:
        what.append("the loss is " + ", ".join(bad_loss))
    if not math.isfinite(grad_norm):
        what.append(f"the gradient norm is {grad_norm}")
    resume = (f"the latest complete checkpoint, {latest}, was saved before it" if latest
              else "no checkpoint was saved before it")
    return (f"training stopped at step {step}: {' and '.join(what)}. Nothing from this step was applied or saved, "
            f"and nothing was exported; {resume}. Running again from there with the same recipe and data fails "
            f"the same way: lower training.learning_rate (now {learning_rate:g}), use training.precision bf16 "
            "rather than fp16, or look for broken rows in the data.")


def stop_on_non_finite(trainer, *, record_failure: Callable[[str], None]) -> None:
    """Check every optimizer step of `trainer`; on a non-finite loss or gradient norm call
    record_failure(message) (rank 0 writes it to the run dir), wait for every rank, then raise
    NonFiniteTraining on every rank.

    Wraps two methods of the instance (transformers 5.19): training_step, whose return value is
    each micro-batch's loss, and Trainer._get_grad_norm, called once per optimizer step on
    every rank after the gradients are complete and before optimizer.step(). No callback sees
    the loss, and on_pre_optimizer_step is not given the gradient norm."""
    import torch

    training_step, get_grad_norm = trainer.training_step, trainer._get_grad_norm
    losses: list = []  # this optimizer step's micro-batch losses, kept as tensors: no sync per micro-batch

    def training_step_kept(*args, **kwargs):
        loss = training_step(*args, **kwargs)
        losses.append(loss.detach().float().reshape(()))
        return loss

    def grad_norm_checked(*args, **kwargs):
        grad_norm = get_grad_norm(*args, **kwargs)
        loss = torch.stack(losses).sum().item() if losses else 0.0
        losses.clear()
        whole = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
        norm = float(whole) if whole is not None else 0.0
        values = _per_rank(loss, norm)
        if all(math.isfinite(v) for pair in values for v in pair):
            return grad_norm
        from trainer.resilience.checkpoints import _barrier, latest_complete_checkpoint

        message = _describe(trainer.state.global_step + 1, values, learning_rate=trainer.args.learning_rate,
                            latest=latest_complete_checkpoint(Path(trainer.args.output_dir)))
        record_failure(message)
        _barrier()  # the record is on disk before any rank exits and torchrun restarts the workers
        raise NonFiniteTraining(message)

    trainer.training_step = training_step_kept
    trainer._get_grad_norm = grad_norm_checked
