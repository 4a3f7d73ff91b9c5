"""Checkpoints that are either complete or ignored, and the run identity of an output dir.

transformers writes `checkpoint-N/` file by file, so a crash mid-save leaves a directory that
looks like a checkpoint. Keel writes a completion marker after every rank has finished
saving; a checkpoint without it is never loaded (it is set aside with a warning).

The output dir is the run's identity: `keel-run.yaml` holds the resolved recipe and whether
the run finished. Running the same command again resumes an unfinished run; a finished run,
or an unfinished one whose recipe changed in a way that alters the math, is refused with the
differences listed.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import yaml
from transformers import TrainerCallback

from data.errors import KeelError
from trainer.recipe import Recipe, flatten

COMPLETE_MARKER = "keel-complete"
RUN_FILE = "keel-run.yaml"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

# Recipe keys that may change between a run and its resumption: they do not alter the math.
RESUMABLE_CHANGES = (
    "tracking.", "checkpoint.", "training.log_every_steps", "distributed.timeout_s", "data.cache_dir",
    "output.register_as",
)


def checkpoint_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_complete_checkpoint(ckpt_root: Path) -> Path | None:
    complete = [p for _, p in checkpoint_dirs(ckpt_root) if (p / COMPLETE_MARKER).is_file()]
    return complete[-1] if complete else None


def set_aside_incomplete(ckpt_root: Path) -> list[Path]:
    """Move checkpoints without a completion marker out of the way (they are never loaded)."""
    moved = []
    for step, path in checkpoint_dirs(ckpt_root):
        if not (path / COMPLETE_MARKER).is_file():
            target = ckpt_root / f"incomplete-{path.name}-{int(time.time())}"
            path.rename(target)
            moved.append(target)
    return moved


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointCompletion(TrainerCallback):
    """Marks a checkpoint complete once every rank has saved; saves on a time budget too."""

    def __init__(self, *, is_main: bool, every_minutes: float | None):
        self.is_main = is_main
        self.every_s = every_minutes * 60 if every_minutes else None
        self._last_save = time.time()

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every rank has written its part (ZeRO/FSDP shards, RNG states)
        if self.is_main:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                (ckpt / COMPLETE_MARKER).write_text(f"step {state.global_step}\n")
        _barrier()
        self._last_save = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_s is None:
            return
        import torch
        import torch.distributed as dist

        due = torch.tensor([1.0 if time.time() - self._last_save >= self.every_s else 0.0])
        if dist.is_available() and dist.is_initialized():
            # every rank must agree, or a sharded save would wait forever for the ranks that skip it
            dist.all_reduce(due, op=dist.ReduceOp.MAX)
        if due.item() > 0:
            control.should_save = True


# --------------------------------------------------------------------------- run identity


def _math_view(recipe_dict: dict) -> dict:
    return {k: v for k, v in flatten(recipe_dict).items() if not k.startswith(RESUMABLE_CHANGES)}


def check_run_dir(recipe: Recipe, *, overwrite: bool) -> str:
    """Decide what to do with output.dir: 'new', 'resume' or (with overwrite) 'overwrite'.

    Raises KeelError for a finished run or an unfinished run with a different recipe.
    """
    run_dir = Path(recipe.output.dir)
    run_file = run_dir / RUN_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise KeelError(f"output.dir {run_dir} is a file, not a directory; choose a new output.dir")
    if not run_file.is_file():
        if run_dir.is_dir() and any(p for p in run_dir.iterdir() if p.name in ("checkpoints", "model")) and not overwrite:
            raise KeelError(
                f"output.dir {run_dir} holds checkpoints or a model but no {RUN_FILE}: it was not made by this "
                "recipe. Choose a new output.dir, or pass --overwrite to replace it."
            )
        return "overwrite" if overwrite and run_dir.exists() else "new"
    if overwrite:
        return "overwrite"
    saved = _read_run_file(run_file)
    if saved.get("status") == "finished":
        raise KeelError(
            f"output.dir {run_dir} holds a finished run (model in {run_dir / 'model'}). Choose a new output.dir, "
            "or pass --overwrite to train it again from the start."
        )
    before, now = _math_view(saved.get("recipe", {})), _math_view(recipe.to_dict())
    diffs = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if diffs:
        lines = "\n".join(f"  - {k}: was {before.get(k)!r}, now {now.get(k)!r}" for k in diffs)
        raise KeelError(
            f"output.dir {run_dir} holds an unfinished run with a different recipe; resuming would change the "
            f"math:\n{lines}\nRestore those values to resume, choose a new output.dir, or pass --overwrite."
        )
    return "resume"


def _read_run_file(run_file: Path) -> dict:
    try:
        saved = yaml.safe_load(run_file.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError, RecursionError) as exc:
        saved = exc
    if not isinstance(saved, dict) or not isinstance(saved.get("recipe", {}), dict):
        why = f"({type(saved).__name__}: {str(saved).splitlines()[0] if str(saved) else ''})" if isinstance(saved, Exception) else "(not a mapping with a recipe)"
        raise KeelError(f"output.dir {run_file.parent}: {RUN_FILE} cannot be read {why}, so Keel cannot tell which "
                        "run the directory holds. Choose a new output.dir, or pass --overwrite to start over there.")
    return saved


def clear_run_dir(run_dir: Path) -> None:
    """What --overwrite removes: Keel's own files in the run dir, nothing else."""
    for name in ("checkpoints", "model", RUN_FILE, "mlflow_run_id", "metrics.jsonl"):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_run_file(recipe: Recipe, status: str) -> None:
    run_dir = Path(recipe.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(yaml.safe_dump({"status": status, "recipe": recipe.to_dict()}, sort_keys=False), encoding="utf-8")
    tmp.replace(run_dir / RUN_FILE)
