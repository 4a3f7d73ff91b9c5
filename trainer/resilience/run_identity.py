"""The run dir's identity: `keel-run.yaml` holds the resolved recipe (redacted) and the run's
status, one of

    running    training has started (or resumed) and has not ended
    finished   the model in `model/` is exported, verified and complete
    failed     training stopped on a failure that running it again from the same state would
               repeat (a non-finite loss): the message is kept beside the status

Running the same command again resumes a running or failed run, and on a finished run does
nothing and says where the model is. A recipe that changed in a way that alters the math is
refused with the differences listed, for an unfinished run and a finished one alike.

Kept light (yaml and the recipe schema, no torch): a worker that torchrun restarts reads it
before anything heavy is imported, so that a restart with nothing to do ends at once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from data.errors import KeelError
from data.files import read_yaml
from data.model_dir import EXPORT_INFO_FILE
from trainer.recipe import Recipe, flatten
from trainer.run_facts import redact

RUN_FILE = "keel-run.yaml"
CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"
LOG_DIR = "logs"

# Recipe keys that may change between a run and its resumption: they do not alter the math.
RESUMABLE_CHANGES = (
    "tracking.", "checkpoint.", "training.log_every_steps", "distributed.timeout_s", "data.cache_dir",
    "output.register_as",
    # where the run is sized to run (the world size itself was never part of the record)
    "cluster.",
)


def _math_view(recipe_dict: dict) -> dict:
    return {k: v for k, v in flatten(recipe_dict).items() if not k.startswith(RESUMABLE_CHANGES)}


def export_complete(run_dir: Path) -> bool:
    """Whether run_dir holds a complete export: the model dir is renamed into place only once it
    is written and verified (trainer/export.py), with its keel-export.yaml."""
    return (run_dir / MODEL_DIR / EXPORT_INFO_FILE).is_file()


def check_run_dir(recipe: Recipe, *, overwrite: bool) -> str:
    """Decide what to do with output.dir: 'new', 'resume', 'finished' (this recipe's run is done:
    nothing to train) or (with overwrite) 'overwrite'.

    Raises KeelError for a run (finished or not) with a different recipe, and for a run marked
    finished whose model is missing.
    """
    run_dir = Path(recipe.output.dir)
    run_file = run_dir / RUN_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise KeelError(f"output.dir {run_dir} is a file, not a directory; choose a new output.dir")
    if not run_file.is_file():
        if run_dir.is_dir() and any(p for p in run_dir.iterdir() if p.name in (CHECKPOINT_DIR, MODEL_DIR)) \
                and not overwrite:
            raise KeelError(
                f"output.dir {run_dir} holds checkpoints or a model but no {RUN_FILE}: it was not made by this "
                "recipe. Choose a new output.dir, or pass --overwrite to replace it."
            )
        return "overwrite" if overwrite and run_dir.exists() else "new"
    if overwrite:
        return "overwrite"
    saved = read_run_file(run_file)
    # The run file holds the recipe redacted (see write_run_file): compare like with like.
    before, now = _math_view(saved.get("recipe", {})), _math_view(redact(recipe.to_dict()))
    diffs = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    lines = "\n".join(f"  - {k}: was {before.get(k)!r}, now {now.get(k)!r}" for k in diffs)
    if saved.get("status") == "finished":
        if diffs:
            raise KeelError(
                f"output.dir {run_dir} holds a finished run of a different recipe (model in {run_dir / MODEL_DIR}):"
                f"\n{lines}\nChoose a new output.dir, or pass --overwrite to train it again from the start."
            )
        if not export_complete(run_dir):
            raise KeelError(
                f"output.dir {run_dir} holds a finished run, but its model {run_dir / MODEL_DIR} is missing or "
                f"incomplete (no {EXPORT_INFO_FILE}). Put the model back, choose a new output.dir, or pass "
                "--overwrite to train it again from the start."
            )
        return "finished"
    if diffs:
        raise KeelError(
            f"output.dir {run_dir} holds an unfinished run with a different recipe; resuming would change the "
            f"math:\n{lines}\nRestore those values to resume, choose a new output.dir, or pass --overwrite."
        )
    return "resume"


def read_run_file(run_file: Path) -> dict:
    try:
        saved = read_yaml(run_file, what="run record") or {}
        why = "not a mapping with a recipe"
    except KeelError as exc:
        saved, why = None, str(exc)
    if not isinstance(saved, dict) or not isinstance(saved.get("recipe"), dict):  # write_run_file always writes one
        raise KeelError(f"output.dir {run_file.parent}: {RUN_FILE} cannot be read ({why}), so Keel cannot tell which "
                        "run the directory holds. Choose a new output.dir, or pass --overwrite to start over there.")
    return saved


def run_status(run_dir: Path) -> str | None:
    """The status keel-run.yaml records (running, finished, failed), or None without one."""
    run_file = run_dir / RUN_FILE
    return read_run_file(run_file).get("status") if run_file.is_file() else None


def recorded_failure(run_dir: Path) -> str | None:
    """The message of the failure that ended the run in run_dir, if it stopped on one that a
    restart would repeat (status 'failed'); None otherwise."""
    run_file = run_dir / RUN_FILE
    saved = read_run_file(run_file) if run_file.is_file() else {}
    if saved.get("status") != "failed":
        return None
    return str(saved.get("failure") or "a failure a restart would repeat (no message was kept)")


def clear_run_dir(run_dir: Path) -> None:
    """What --overwrite removes: Keel's own files in the run dir, nothing else."""
    for name in (CHECKPOINT_DIR, MODEL_DIR, RUN_FILE, LOG_DIR, "mlflow_run_id", "metrics.jsonl", "mlflow-pending"):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_run_file(recipe: Recipe, status: str, *, failure: str | None = None) -> None:
    run_dir = Path(recipe.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RUN_FILE}.tmp"
    # Redacted: the run dir is shared, copied and uploaded; a tracking URI's password or a
    # presigned URL's signature must not sit there in plain text (`keel sync` takes them from the
    # environment or --tracking-uri instead).
    record = {"status": status, **({"failure": failure} if failure else {}), "recipe": redact(recipe.to_dict())}
    tmp.write_text(yaml.safe_dump(record, sort_keys=False), encoding="utf-8")
    tmp.replace(run_dir / RUN_FILE)
