"""Recipe schema, overrides and the errors a user sees for a bad recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data.errors import KeelError
from trainer.recipe import apply_overrides, load_recipe, missing_paths, path_kind

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart" / "sft-tool-calling.yaml"


def write_recipe(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(QUICKSTART.read_text())
    mutate(raw)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def keel(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "keel.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_quickstart_recipe_validates():
    recipe = load_recipe(QUICKSTART)
    assert recipe.technique == "sft"
    assert recipe.model.format == "hermes-qwen3"
    assert recipe.training.max_steps > 0


def test_typo_names_the_path_and_suggests_the_key(tmp_path):
    path = write_recipe(tmp_path, lambda r: r["training"].update(learnig_rate=1e-3))
    with pytest.raises(KeelError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "training.learnig_rate" in msg
    assert "did you mean 'learning_rate'" in msg
    assert str(path) in msg


def test_unknown_section_suggests_closest(tmp_path):
    path = write_recipe(tmp_path, lambda r: r.update(trainig={"seed": 1}))
    msg = str(pytest.raises(KeelError, load_recipe, path).value)
    assert "trainig" in msg and "did you mean 'training'" in msg


def test_every_problem_is_reported_at_once(tmp_path):
    def mutate(r):
        r["training"]["micro_batch_size"] = "eight"
        r["peft"]["kind"] = "dora"
        r["output"] = {}
    msg = str(pytest.raises(KeelError, load_recipe, write_recipe(tmp_path, mutate)).value)
    assert "3 problems" in msg
    assert "training.micro_batch_size" in msg and "'eight'" in msg
    assert "peft.kind" in msg and "'none'" in msg and "'lora'" in msg
    assert "output.dir" in msg and "required" in msg


def test_cross_field_rules(tmp_path):
    msg = str(pytest.raises(KeelError, load_recipe, write_recipe(tmp_path, lambda r: r["training"].update(epochs=2))).value)
    assert "exactly one of training.max_steps and training.epochs" in msg
    msg = str(pytest.raises(KeelError, load_recipe, write_recipe(tmp_path, lambda r: r["model"].update(format="chatml-x"))).value)
    assert "model.format" in msg and "hermes-qwen3" in msg
    msg = str(pytest.raises(KeelError, load_recipe, QUICKSTART, ["technique=dpo", "training.packing=true"]).value)
    assert "training.packing" in msg and "never packed" in msg


def test_seq_len_beyond_the_models_positions_is_refused_before_launch(tmp_path, tiny_model):
    positions = json.loads((tiny_model / "config.json").read_text())["max_position_embeddings"]
    ok = load_recipe(QUICKSTART, [f"model.path={tiny_model}", f"training.seq_len={positions}"])
    assert missing_paths(ok) == [] or all("training.seq_len" not in p for p in missing_paths(ok))
    too_long = load_recipe(QUICKSTART, [f"model.path={tiny_model}", f"training.seq_len={positions + 1}"])
    problems = "\n".join(missing_paths(too_long))
    assert f"training.seq_len: {positions + 1} is beyond the model's {positions} positions" in problems


def test_overrides_are_typed_and_validated():
    recipe = load_recipe(QUICKSTART, ["training.max_steps=7", "peft.kind=lora", "peft.target_modules=[q_proj,v_proj]",
                                      "tracking.mlflow.tracking_uri=http://127.0.0.1:5000"])
    assert recipe.training.max_steps == 7
    assert recipe.peft.target_modules == ["q_proj", "v_proj"]
    assert recipe.tracking.mlflow.tracking_uri == "http://127.0.0.1:5000"
    with pytest.raises(KeelError, match="training.max_stepz.*did you mean 'max_steps'"):
        load_recipe(QUICKSTART, ["training.max_stepz=7"])
    with pytest.raises(KeelError, match="expected KEY=VALUE"):
        load_recipe(QUICKSTART, ["training.max_steps"])
    with pytest.raises(KeelError, match="is a value, not a section"):
        apply_overrides({"technique": "sft"}, ["technique.kind=x"], "r.yaml")


def test_recipe_file_problems(tmp_path):
    with pytest.raises(KeelError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(KeelError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(KeelError, match="must be a YAML mapping"):
        load_recipe(bad)


def test_path_kinds(tmp_path):
    assert path_kind("s3://bucket/model") == "uri"
    assert path_kind("meta-llama/Llama-3.2-1B") == "hub"
    assert path_kind("./runs/x") == "local"
    assert path_kind("runs/quickstart/base") == "local"
    assert path_kind(str(tmp_path)) == "local"


def test_missing_paths_name_the_key(tmp_path):
    recipe = load_recipe(QUICKSTART, [f"model.path={tmp_path / 'nomodel'}", f"data.train={tmp_path / 'none.jsonl'}"])
    problems = "\n".join(missing_paths(recipe))
    assert "model.path" in problems and "data.train" in problems
    hub = load_recipe(QUICKSTART, ["model.path=Qwen/Qwen3-0.6B", "data.train=s3://bucket/train.jsonl"])
    assert missing_paths(hub) == []


def test_cli_validate_exit_codes(tmp_path):
    ok = keel("validate", str(QUICKSTART))
    assert ok.returncode == 0 and "ok:" in ok.stdout
    bad = write_recipe(tmp_path, lambda r: r["training"].update(learnig_rate=1e-3))
    res = keel("validate", str(QUICKSTART), str(bad))
    assert res.returncode == 2
    assert "did you mean 'learning_rate'" in res.stderr
    assert "Traceback" not in res.stderr
    missing = write_recipe(tmp_path, lambda r: r["model"].update(path=str(tmp_path / "no-model")))
    assert keel("validate", str(missing)).returncode == 0  # paths are not checked by default
    res = keel("validate", "--check-paths", str(missing))
    assert res.returncode == 2 and "model.path" in res.stderr and "does not exist" in res.stderr


def test_cli_validate_takes_overrides_as_other_commands_do(tmp_path):
    """`keel validate RECIPE key=value` checks the recipe as `keel train` would run it with that
    override (it used to read `key=value` as a recipe file that does not exist)."""
    ok = keel("validate", str(QUICKSTART), "training.max_steps=5")
    assert ok.returncode == 0 and ok.stdout.strip() == f"ok: {QUICKSTART}", ok.stderr
    typo = keel("validate", str(QUICKSTART), "training.max_stepz=5")
    assert typo.returncode == 2 and "training.max_stepz" in typo.stderr and "did you mean 'max_steps'" in typo.stderr
    bad = keel("validate", str(QUICKSTART), "training.max_steps=-1")
    assert bad.returncode == 2 and "training.max_steps" in bad.stderr and "greater than 0" in bad.stderr
    alone = keel("validate", "training.max_steps=5")
    assert alone.returncode == 2 and "no recipe file given" in alone.stderr and "Traceback" not in alone.stderr


def test_train_with_bad_recipe_writes_nothing(tmp_path):
    out = tmp_path / "run"
    bad = write_recipe(tmp_path, lambda r: r["training"].update(micro_batch_size=0))
    res = keel("train", str(bad), f"output.dir={out}")
    assert res.returncode == 2
    assert "training.micro_batch_size" in res.stderr and "greater than 0" in res.stderr
    assert "keel.torchrun" not in res.stdout  # failed before any process started
    assert not out.exists()


def test_train_with_missing_files_fails_before_launch(tmp_path):
    out = tmp_path / "run"
    res = keel("train", str(QUICKSTART), f"model.path={tmp_path / 'missing-model'}",
               f"data.train={tmp_path / 'missing.jsonl'}", f"output.dir={out}")
    assert res.returncode == 2
    assert "model.path" in res.stderr and "data.train" in res.stderr
    assert "keel tiny-model" in res.stderr  # the fix
    assert not out.exists()


def test_data_keys_take_closed_values_with_clear_errors(tmp_path):
    recipe = load_recipe(QUICKSTART, ["data.shape=sharegpt", "data.on_invalid=skip", "data.train_on=last",
                                      "data.history_reasoning=keep"])
    assert (recipe.data.shape, recipe.data.on_invalid, recipe.data.train_on, recipe.data.history_reasoning) == (
        "sharegpt", "skip", "last", "keep")
    defaults = load_recipe(QUICKSTART).data
    assert (defaults.shape, defaults.on_invalid, defaults.train_on, defaults.history_reasoning) == ("auto", "error", None, None)
    msg = str(pytest.raises(KeelError, load_recipe, QUICKSTART, ["data.shape=shargpt", "data.on_invalid=ignore"]).value)
    assert "data.shape: Input should be 'auto', 'messages', 'sharegpt'" in msg and "'shargpt'" in msg
    assert "data.on_invalid: Input should be 'error' or 'skip'" in msg
    msg = str(pytest.raises(KeelError, load_recipe, QUICKSTART, ["data.on_invalide=skip"]).value)
    assert "did you mean 'on_invalid'" in msg


def test_native_format_and_its_syntax(tmp_path):
    assert load_recipe(QUICKSTART, ["model.format=native", "model.native_syntax=llama3-json"]).model.native_syntax == "llama3-json"
    msg = str(pytest.raises(KeelError, load_recipe, QUICKSTART, ["model.native_syntax=llama3-json"]).value)
    assert "model.native_syntax: only for model.format native" in msg
    msg = str(pytest.raises(KeelError, load_recipe, QUICKSTART, ["model.format=native", "model.native_syntax=chatml"]).value)
    from data.formats import available_formats

    shipped = ", ".join(f for f in available_formats() if f != "native")
    assert f"'chatml' is not a shipped format; use one of: {shipped}" in msg and "llama3-json" in shipped


def test_keel_prepare_applies_the_data_keys(tmp_path, tiny_model):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
            {"conversations": [{"from": "gpt", "value": "I speak first"}]}]
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps(rows))
    args = ["prepare", str(QUICKSTART), f"model.path={tiny_model}", f"data.train={data}",
            f"data.cache_dir={tmp_path / 'cache'}"]
    failed = keel(*args)
    assert failed.returncode == 2 and f"{data}[1]: messages[0]: an assistant message must follow" in failed.stderr
    ok = keel(*args, "data.on_invalid=skip")
    assert ok.returncode == 0, ok.stderr
    assert "2 rows -> 1 examples" in ok.stdout and "1 rejected: see " in ok.stdout
