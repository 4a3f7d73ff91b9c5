"""Checkpoint completeness and run identity: resume, refuse, or start again."""

from __future__ import annotations

from pathlib import Path

import pytest

from data.errors import KeelError
from trainer.resilience.checkpoints import COMPLETE_MARKER, latest_complete_checkpoint, set_aside_incomplete
from trainer.resilience.run_identity import RUN_FILE, check_run_dir, clear_run_dir, recorded_failure, write_run_file
from trainer.recipe import load_recipe

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart" / "sft-tool-calling.yaml"


def recipe(tmp_path, *overrides):
    return load_recipe(QUICKSTART, [f"output.dir={tmp_path / 'run'}", *overrides])


def make_ckpt(root: Path, step: int, complete: bool) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x")
    if complete:
        (path / COMPLETE_MARKER).write_text("ok")
    return path


def test_latest_complete_checkpoint_skips_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    assert latest_complete_checkpoint(root) is None
    make_ckpt(root, 100, True)
    best = make_ckpt(root, 200, True)
    make_ckpt(root, 300, False)  # a crash mid-save
    assert latest_complete_checkpoint(root) == best
    moved = set_aside_incomplete(root)
    assert [p.name.startswith("incomplete-checkpoint-300") for p in moved] == [True]
    assert not (root / "checkpoint-300").exists() and latest_complete_checkpoint(root) == best


def test_new_run_then_resume(tmp_path):
    r = recipe(tmp_path)
    assert check_run_dir(r, overwrite=False) == "new"
    write_run_file(r, "running")
    assert check_run_dir(r, overwrite=False) == "resume"
    # changes that do not alter the math are allowed on resume
    r2 = recipe(tmp_path, "tracking.mlflow.experiment=other", "training.log_every_steps=5", "checkpoint.keep_last=3")
    assert check_run_dir(r2, overwrite=False) == "resume"


def test_resume_with_changed_math_is_refused_and_lists_differences(tmp_path):
    write_run_file(recipe(tmp_path), "running")
    changed = recipe(tmp_path, "training.learning_rate=0.1", "training.micro_batch_size=4")
    with pytest.raises(KeelError) as err:
        check_run_dir(changed, overwrite=False)
    msg = str(err.value)
    assert "training.learning_rate: was 0.002, now 0.1" in msg
    assert "training.micro_batch_size: was 2, now 4" in msg
    assert "--overwrite" in msg
    assert check_run_dir(changed, overwrite=True) == "overwrite"


def test_a_finished_run_is_done_for_its_recipe_and_refused_for_another(tmp_path):
    r = recipe(tmp_path)
    write_run_file(r, "finished")
    model = tmp_path / "run" / "model"
    # finished, but the model is gone: nothing to hand back, and nothing silently retrained
    with pytest.raises(KeelError, match=rf"holds a finished run, but its model {model} is missing"):
        check_run_dir(r, overwrite=False)
    model.mkdir()
    (model / "keel-export.yaml").write_text("format: hermes-qwen3\n")
    assert check_run_dir(r, overwrite=False) == "finished"
    # what does not alter the math does not make it another run
    assert check_run_dir(recipe(tmp_path, "tracking.mlflow.experiment=other"), overwrite=False) == "finished"
    with pytest.raises(KeelError, match="holds a finished run of a different recipe") as err:
        check_run_dir(recipe(tmp_path, "training.learning_rate=0.1"), overwrite=False)
    assert "training.learning_rate: was 0.002, now 0.1" in str(err.value) and "--overwrite" in str(err.value)
    assert check_run_dir(r, overwrite=True) == "overwrite"


def test_a_recorded_failure_is_kept_until_the_run_starts_again(tmp_path, monkeypatch):
    r = recipe(tmp_path)
    write_run_file(r, "failed", failure="training stopped at step 2: the loss is nan on rank 0")
    assert recorded_failure(tmp_path / "run") == "training stopped at step 2: the loss is nan on rank 0"
    assert check_run_dir(r, overwrite=False) == "resume"  # a user's re-run may try again
    # a worker torchrun restarted would fail the same way: it stops with the recorded message
    from trainer.train import run_dir_decision

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(KeelError, match=r"step 2: the loss is nan on rank 0 \(recorded in .*keel-run.yaml by an "
                                        r"earlier attempt of this job: this restart stops without training"):
        run_dir_decision(r, overwrite=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert run_dir_decision(r, overwrite=False) == "resume"
    write_run_file(r, "running")
    assert recorded_failure(tmp_path / "run") is None


def test_foreign_directory_is_not_overwritten_silently(tmp_path):
    r = recipe(tmp_path)
    (tmp_path / "run" / "model").mkdir(parents=True)
    with pytest.raises(KeelError, match="was not made by this recipe"):
        check_run_dir(r, overwrite=False)


def test_clear_removes_only_keels_files(tmp_path):
    r = recipe(tmp_path)
    write_run_file(r, "finished")
    run = tmp_path / "run"
    make_ckpt(run / "checkpoints", 10, True)
    (run / "model").mkdir()
    (run / "notes.txt").write_text("mine")
    clear_run_dir(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert not (run / RUN_FILE).exists()


def test_a_checkpoint_changed_on_disk_after_its_marker_is_set_aside_naming_the_file(tmp_path):
    from trainer.resilience.checkpoints import set_aside_damaged, write_complete_marker

    root = tmp_path / "checkpoints"
    first = make_ckpt(root, 100, False)
    write_complete_marker(first, 100)
    second = make_ckpt(root, 200, False)
    (second / "optimizer.pt").write_bytes(b"0123456789")
    write_complete_marker(second, 200)
    assert latest_complete_checkpoint(root) == second
    (second / "optimizer.pt").write_bytes(b"01234")  # truncated on disk
    assert latest_complete_checkpoint(root) == first
    [(moved, why)] = set_aside_damaged(root)
    assert moved.name.startswith("damaged-checkpoint-200-") and why == "optimizer.pt is 5 bytes, 10 when it was saved"
    assert latest_complete_checkpoint(root) == first and set_aside_damaged(root) == []


def test_run_file_keeps_no_credentials_and_the_run_still_resumes(tmp_path):
    """keel-run.yaml lives in a run dir people share and upload: a tracking URI's password and a
    presigned URL's signature are redacted there, and resuming compares like with like."""
    from trainer.tracking.local import without_redacted_password

    r = recipe(tmp_path, "tracking.mlflow.tracking_uri=http://keel:hunter2-planted@127.0.0.1:5000",
               "data.train=https://bucket.example/train.jsonl?X-Amz-Signature=planted-sig&x=1")
    write_run_file(r, "running")
    text = (tmp_path / "run" / "keel-run.yaml").read_text()
    assert "hunter2-planted" not in text and "planted-sig" not in text
    assert check_run_dir(r, overwrite=False) == "resume"
    # keel sync sends the user name and takes the password from $MLFLOW_TRACKING_PASSWORD
    assert without_redacted_password("http://keel:***@127.0.0.1:5000") == "http://keel@127.0.0.1:5000"
    assert without_redacted_password("http://keel:real@h:1") == "http://keel:real@h:1"


def test_prune_keeps_the_newest_complete_checkpoints_and_leaves_incomplete_ones(tmp_path):
    from trainer.resilience.checkpoints import prune_checkpoints

    for step, complete in ((2, True), (4, True), (6, False), (8, True)):
        make_ckpt(tmp_path, step, complete)
    assert prune_checkpoints(tmp_path, 2) == [tmp_path / "checkpoint-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]


def test_with_keep_last_1_a_complete_checkpoint_exists_at_every_save(tmp_path, tiny_model):
    """A real Trainer with Keel's arguments and callback, saving every step with keep_last 1.
    When the trainer hands a new checkpoint to the callbacks (before Keel marks it complete), the
    previous complete one must still be on disk: a crash there must leave something to resume
    from. transformers' own save_total_limit had deleted it by then. Resumed from the checkpoint
    of the last step, the trainer trains nothing more."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from trainer.arguments import training_args
    from trainer.resilience.checkpoints import CheckpointCompletion, no_step_past_max_steps

    r = recipe(tmp_path, "checkpoint.every_steps=1", "checkpoint.keep_last=1", "training.max_steps=3",
               "training.micro_batch_size=1", "training.grad_accum=1", "training.precision=fp32")
    root = tmp_path / "run" / "checkpoints"
    seen = []

    class CompleteCheckpointsAtSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            seen.append(sorted(p.name for p in root.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()))

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    args = training_args(training=r.training, checkpoint=r.checkpoint, distributed=r.distributed, model=model,
                         output_dir=str(root), has_eval=False)
    args["ddp_backend"] = None  # one process, no process group
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}] * 4  # the 3 steps end mid-epoch
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=rows,
                      callbacks=[CompleteCheckpointsAtSave(),
                                 CheckpointCompletion(is_main=True, every_minutes=None, keep_last=1)])
    trainer.train()
    assert seen == [[], ["checkpoint-1"], ["checkpoint-2"]]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3"]
    assert latest_complete_checkpoint(root) == root / "checkpoint-3"

    # Resumed from that checkpoint of the last step (a run stopped or killed before its export),
    # Keel's trainer trains no step more: transformers alone trained and saved a 4th (`step 4/3`).
    resumed = Trainer(model=model, args=TrainingArguments(**args), train_dataset=rows,
                      callbacks=[CheckpointCompletion(is_main=True, every_minutes=None, keep_last=1)])
    no_step_past_max_steps(resumed)
    resumed.train(resume_from_checkpoint=str(root / "checkpoint-3"))
    assert resumed.state.global_step == 3
    assert not [r for r in resumed.state.log_history if "loss" in r and r["step"] > 3]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3"]
