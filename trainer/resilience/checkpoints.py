"""Checkpoints that are either complete or ignored, and the run identity of an output dir.

transformers writes `checkpoint-N/` file by file, so a crash mid-save (a kill, a full disk)
leaves a directory that looks like a checkpoint. Keel writes a completion marker after every
rank has finished saving, last, by rename; a checkpoint without it is never loaded (it is set
aside with a warning). The marker lists every file of the checkpoint with its size, so a
checkpoint damaged on disk afterwards (a truncated weights or optimizer file) is set aside too,
with a warning naming the file, and the run resumes from the one before it.

The run dir's identity (keel-run.yaml) is in run_identity.py.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from data.errors import KeelError

COMPLETE_MARKER = "keel-complete"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def write_complete_marker(ckpt: Path, step: int) -> None:
    """The marker, written last and renamed into place: every file of the checkpoint and its size."""
    files = {str(f.relative_to(ckpt)): f.stat().st_size for f in sorted(ckpt.rglob("*"))
             if f.is_file() and f.name != COMPLETE_MARKER and not f.name.startswith(f".{COMPLETE_MARKER}")}
    tmp = ckpt / f".{COMPLETE_MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=0) + "\n")
    tmp.replace(ckpt / COMPLETE_MARKER)


def checkpoint_damage(ckpt: Path) -> str | None:
    """Why a complete checkpoint can no longer be loaded (a file missing, or not the size it was
    saved with), or None. Markers written before they listed files are trusted."""
    try:
        files = json.loads((ckpt / COMPLETE_MARKER).read_text()).get("files")
    except (ValueError, AttributeError):
        return None
    for name, size in (files or {}).items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} when it was saved"
    return None


def latest_complete_checkpoint(ckpt_root: Path) -> Path | None:
    complete = [p for _, p in checkpoint_dirs(ckpt_root)
                if (p / COMPLETE_MARKER).is_file() and checkpoint_damage(p) is None]
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


def set_aside_damaged(ckpt_root: Path) -> list[tuple[Path, str]]:
    """Move complete checkpoints whose files changed on disk out of the way: (new path, why).
    Moved, not left: the resumed run saves a checkpoint of the same step again."""
    moved = []
    for step, path in checkpoint_dirs(ckpt_root):
        if (path / COMPLETE_MARKER).is_file() and (why := checkpoint_damage(path)):
            target = ckpt_root / f"damaged-{path.name}-{int(time.time())}"
            path.rename(target)
            moved.append((target, why))
    return moved


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any rank (a collective: every rank calls it at the same point),
    so that every rank takes the same decision. The flag travels on the device the process
    group reduces on: NCCL reduces only GPU tensors, gloo only CPU ones."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item() > 0


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last` (by step); returns them.

    Called only once the newest is marked complete, so a complete checkpoint exists at every
    moment. (transformers' save_total_limit deletes older checkpoints while saving the new one,
    before Keel has marked it complete: with keep_last 1, a crash then would leave none.)
    Incomplete directories are left to resume, which sets them aside."""
    def step(p: Path) -> int:
        return int(p.name.split("-", 1)[1])

    complete = sorted((p for p in ckpt_root.glob("checkpoint-*")
                       if p.name.split("-", 1)[1].isdigit() and (p / COMPLETE_MARKER).is_file()), key=step)
    old = complete[:-keep_last] if keep_last > 0 else []
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


class CheckpointCompletion(TrainerCallback):
    """Marks a checkpoint complete once every rank has saved, then keeps the newest `keep_last`
    complete ones; saves on a time budget too."""

    def __init__(self, *, is_main: bool, every_minutes: float | None, keep_last: int):
        self.is_main = is_main
        self.every_s = every_minutes * 60 if every_minutes else None
        self.keep_last = keep_last
        self._last_save = time.time()

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every rank has written its part (ZeRO/FSDP shards, RNG states)
        if self.is_main:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                write_complete_marker(ckpt, state.global_step)
                prune_checkpoints(Path(args.output_dir), self.keep_last)
        _barrier()
        self._last_save = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_s is None:
            return
        # every rank must agree, or a sharded save would wait forever for the ranks that skip it
        if any_rank(time.time() - self._last_save >= self.every_s):
            control.should_save = True


def _storage_facts(path: Path) -> str:
    """Free space where the checkpoint goes, and this process's file size limit if it has one:
    torch.save reports a full disk only as "unexpected pos ...", so the likely cause is spelled out."""
    import resource

    facts = []
    try:
        facts.append(f"{shutil.disk_usage(path).free / 2**30:.2f} GiB free on its filesystem")
    except OSError:
        pass
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        facts.append(f"this process may write files of at most {limit} bytes (ulimit -f)")
    return "; ".join(facts)


class CheckpointWriteFailed(KeelError):
    pass


def fail_loudly_on_save(trainer, ckpt_root: Path) -> None:
    """A failed checkpoint write (disk full, quota, file size limit, a lost mount) ends the run
    with an error naming the checkpoint, the cause and the checkpoint a re-run resumes from,
    instead of a bare serialization traceback. The half-written directory has no completion
    marker, so it is never loaded.

    Wraps the instance's Trainer._save_checkpoint (transformers 5.19): the one place every
    trainer (SFT, DPO) writes a checkpoint, and no callback runs when it raises."""
    save = trainer._save_checkpoint

    def save_or_explain(*args, **kwargs):
        try:
            return save(*args, **kwargs)
        except Exception as exc:
            ckpt = ckpt_root / f"checkpoint-{trainer.state.global_step}"
            latest = latest_complete_checkpoint(ckpt_root)
            resume = (f"the latest complete checkpoint is {latest}; running the same command again resumes from it"
                      if latest else "no complete checkpoint exists yet")
            facts = _storage_facts(ckpt_root)
            raise CheckpointWriteFailed(
                f"writing checkpoint {ckpt} failed: {type(exc).__name__}: {exc}"
                + (f" ({facts})" if facts else "") + f". It is incomplete and will not be loaded; {resume}."
            ) from exc

    trainer._save_checkpoint = save_or_explain


def no_step_past_max_steps(trainer) -> None:
    """A run resumed from the checkpoint of its last step trains nothing more, and goes on to the
    export. That checkpoint is saved before the export, so a run stopped or killed in between
    (SIGTERM in the last step, a kill during the export) resumes from it; transformers 5.19 checks
    max_steps only at the end of a step, and trained (and saved) one step past it, `step 41/40`,
    whenever max_steps ends mid-epoch.

    Wraps the instance's Trainer.get_batch_samples, which draws each optimizer step's batches
    before the step runs: at max_steps it draws none and stops training."""
    get_batch_samples = trainer.get_batch_samples

    def batches_up_to_max_steps(*args, **kwargs):
        if trainer.state.global_step >= trainer.state.max_steps:
            trainer.control.should_training_stop = True
            return [], None
        return get_batch_samples(*args, **kwargs)

    trainer.get_batch_samples = batches_up_to_max_steps
