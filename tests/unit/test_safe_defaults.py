"""Safe by default: no model code, no pickle, no shell, no reads outside what the recipe names.

Each test loads or prepares for real (the tiny model, a model dir with a planted auto_map, a
weights file written with torch.save), and checks that the thing that must not happen did
not: a marker file a model's code would write, an open() of a file a data row names.
"""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from data.errors import KeelError
from data.formats import load_format
from data.model_loading import LoadPolicy, check_weight_files, load_causal_lm, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("keel", "trainer", "data", "serving")
QUICKSTART = REPO / "recipes" / "quickstart" / "sft-tool-calling.yaml"
FMT = load_format("hermes-qwen3")


# --------------------------------------------------------------------------- model files


@pytest.fixture(scope="module")
def pickle_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with its weights in pytorch_model.bin (torch.save) and no safetensors."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("pickle-model")
    for p in tiny_model.iterdir():
        if p.is_file() and p.suffix != ".safetensors":
            shutil.copy(p, out / p.name)
    torch.save(load_file(tiny_model / "model.safetensors"), out / "pytorch_model.bin")
    return out


@pytest.fixture(scope="module")
def remote_code_model(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """A model dir whose config and tokenizer config point auto_map at a .py file that writes a
    marker when imported; (model dir, marker)."""
    out = tmp_path_factory.mktemp("remote-code") / "model"
    shutil.copytree(tiny_model, out)
    marker = out.parent / "code-ran"
    # subclasses, not Llama's classes re-exported: loading registers the remote classes for auto
    # classes (a class attribute), which must not stick to LlamaForCausalLM for later tests
    (out / "modeling_planted.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                             "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                             "class PlantedConfig(LlamaConfig):\n    model_type = 'planted'\n"
                                             "class PlantedModel(LlamaForCausalLM):\n"
                                             "    config_class = PlantedConfig\n")
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="planted", auto_map={"AutoConfig": "modeling_planted.PlantedConfig",
                                                  "AutoModelForCausalLM": "modeling_planted.PlantedModel"})
    (out / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["modeling_planted.PlantedTokenizer", None]}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return out, marker


def test_pickle_only_weights_are_refused_unless_allowed(pickle_model):
    with pytest.raises(KeelError, match=r"model.path: .* holds its weights only in pickle-based files "
                                        r"\(pytorch_model.bin\).*model.allow_pickle: true"):
        load_causal_lm(pickle_model)
    model = load_causal_lm(pickle_model, LoadPolicy(allow_pickle=True))  # the user said they trust it
    assert sum(p.numel() for p in model.parameters()) > 0


def test_training_refuses_a_pickle_model_before_loading_it(pickle_model):
    """build_model is what `keel train` calls; the recipe key turns pickle on."""
    from trainer.models.loading import build_model
    from trainer.recipe import load_recipe

    r = load_recipe(QUICKSTART, [f"model.path={pickle_model}"])
    assert r.model.allow_pickle is False and r.model.trust_remote_code is False  # the defaults
    with pytest.raises(KeelError, match="pickle-based"):
        build_model(model_section=r.model, peft=r.peft, training=r.training)
    allowed = load_recipe(QUICKSTART, [f"model.path={pickle_model}", "model.allow_pickle=true"])
    assert build_model(model_section=allowed.model, peft=allowed.peft, training=allowed.training) is not None


def test_model_code_does_not_run_unless_the_recipe_trusts_it(remote_code_model):
    model_dir, marker = remote_code_model
    with pytest.raises(KeelError, match=r"needs its own Python code to load .* model.trust_remote_code: true"):
        load_causal_lm(model_dir)
    # the tokenizer's auto_map is not followed either: its own class (tokenizer_class) is used
    assert load_tokenizer(model_dir).encode("<think>", add_special_tokens=False)
    assert not marker.exists()
    load_causal_lm(model_dir, LoadPolicy(trust_remote_code=True))
    assert marker.exists()  # the planted code is real: trusting it runs it


def test_run_log_says_when_loading_may_run_code(capsys):
    from trainer.recipe import load_recipe
    from trainer.train import log_load_policy

    log_load_policy(load_recipe(QUICKSTART))
    assert capsys.readouterr().out == ""
    log_load_policy(load_recipe(QUICKSTART, ["model.trust_remote_code=true", "model.allow_pickle=true"]))
    out = capsys.readouterr().out
    assert "warning: model.trust_remote_code is on" in out and "warning: model.allow_pickle is on" in out


def test_run_log_warns_when_no_checkpoint_is_saved_during_the_run(capsys):
    from trainer.recipe import load_recipe
    from trainer.train import log_checkpoint_policy

    log_checkpoint_policy(load_recipe(QUICKSTART))  # it saves every 300 steps
    log_checkpoint_policy(load_recipe(QUICKSTART, ["checkpoint.every_steps=null", "checkpoint.every_minutes=30"]))
    assert capsys.readouterr().out == ""
    log_checkpoint_policy(load_recipe(QUICKSTART, ["checkpoint.every_steps=null"]))
    out = capsys.readouterr().out
    assert "warning: neither checkpoint.every_steps nor checkpoint.every_minutes is set" in out
    assert "set checkpoint.every_minutes" in out


def test_serving_passes_trust_remote_code_only_for_a_model_trained_with_it(tmp_path):
    from serving.server import vllm_command
    from tests.unit.test_serve_args import export

    plain = export(tmp_path / "a" / "model", {"seq_len": 512, "dtype": "float32"})
    trained = export(tmp_path / "b" / "model", {"seq_len": 512, "dtype": "float32", "trust_remote_code": True})
    cmd = vllm_command(plain, host="127.0.0.1", port=1)
    assert "--trust-remote-code" not in cmd and cmd[cmd.index("--load-format") + 1] == "safetensors"
    assert "--trust-remote-code" in vllm_command(trained, host="127.0.0.1", port=1)
    # a model dir with pickle weights only is refused before vLLM starts, unless the operator
    # takes over the weight format
    torch_file = plain / "pytorch_model.bin"
    torch_file.write_bytes(b"not read")
    with pytest.raises(KeelError, match=r"pickle-based .* pass `-- --load-format auto` to keel serve"):
        vllm_command(plain, host="127.0.0.1", port=1)
    cmd = vllm_command(plain, host="127.0.0.1", port=1, extra=["--load-format", "auto"])
    assert cmd[cmd.index("--load-format") + 1] == "auto" and cmd.count("--load-format") == 1


def test_check_weight_files_accepts_safetensors_beside_pickle(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    check_weight_files(tmp_path, LoadPolicy())  # transformers picks safetensors when both exist


# --------------------------------------------------------------------------- source invariants

FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_ATTRS = {("os", "system"), ("os", "popen"), ("yaml", "load"), ("yaml", "unsafe_load"),
                   ("yaml", "full_load"), ("pickle", "load"), ("pickle", "loads"), ("torch", "load"),
                   ("subprocess", "getoutput"), ("subprocess", "getstatusoutput")}
SUBPROCESS_FUNCS = {"run", "Popen", "call", "check_call", "check_output"}


def _package_sources():
    for package in PACKAGES:
        yield from sorted((REPO / package).rglob("*.py"))


def _dotted(node) -> tuple[str, ...]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "<expression>")  # model.eval() is not eval()
    return tuple(reversed(parts))


def test_no_shell_eval_or_unsafe_deserialisation_in_keels_sources():
    """Subprocesses get argument lists (never shell=True or a command string), nothing is
    eval'd or exec'd, YAML is read with the safe loader, nothing is unpickled; and every
    from_pretrained goes through data/model_loading.py, where the recipe's policy applies."""
    problems = []
    for path in _package_sources():
        rel = path.relative_to(REPO)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            where = f"{rel}:{node.lineno}"
            if len(name) == 1 and name[0] in FORBIDDEN_CALLS:
                problems.append(f"{where}: {name[0]}()")
            if name[-2:] in FORBIDDEN_ATTRS:
                problems.append(f"{where}: {'.'.join(name)}()")
            if any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                   for k in node.keywords):
                problems.append(f"{where}: shell=")
            if name[-1:] and name[-1] in SUBPROCESS_FUNCS and name[:1] == ("subprocess",) and node.args:
                if isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)):
                    problems.append(f"{where}: subprocess.{name[-1]} with a command string")
            if name[-1:] == ("from_pretrained",) and rel.as_posix() != "data/model_loading.py" \
                    and name[:1] != ("PeftModel",):  # PeftModel: Keel's own safetensors adapter export
                problems.append(f"{where}: {'.'.join(name)}() outside data/model_loading.py")
    assert not problems, "\n".join(problems)


def test_the_invariant_scan_catches_what_it_looks_for(tmp_path, monkeypatch):
    """The scan above would fail on each forbidden use (a scan that finds nothing proves nothing)."""
    bad = tmp_path / "trainer"
    bad.mkdir()
    (bad / "x.py").write_text("import os, subprocess, yaml\nos.system('ls')\nsubprocess.run('ls', shell=True)\n"
                              "eval('1')\nyaml.load('a')\nsubprocess.run(f'ls {1}')\n"
                              "from transformers import AutoTokenizer\nAutoTokenizer.from_pretrained('x')\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("trainer",))
    with pytest.raises(AssertionError) as err:
        test_no_shell_eval_or_unsafe_deserialisation_in_keels_sources()
    for found in ("os.system()", "shell=", "eval()", "yaml.load()", "command string", "outside data/model_loading"):
        assert found in str(err.value)


# --------------------------------------------------------------------------- paths in data


class OpenedFiles:
    """Every file opened while recording (an audit hook: open() and os.open alike)."""

    def __init__(self):
        self.paths: list[str] | None = None
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if self.paths is not None and event == "open" and isinstance(args[0], (str, bytes)):
            self.paths.append(args[0] if isinstance(args[0], str) else args[0].decode(errors="replace"))

    def __enter__(self):
        self.paths = []
        return self

    def __exit__(self, *exc):
        self.paths, self.seen = None, self.paths


@pytest.fixture(scope="session")
def opened_files():
    return OpenedFiles()


def test_file_and_image_fields_in_rows_are_never_opened(tmp_path, tiny_model, opened_files):
    """A row naming a file (file/path/image fields, an image_url part, a tool schema $ref) makes
    Keel open nothing: unknown fields are ignored, non-text parts and outside $refs are refused."""
    from data.prepare import PrepOptions, prepare_file
    from data.synthetic import TOOLS
    from tests.unit.test_invalid_rows import good

    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-CONTENT")
    url = secret.resolve().as_uri()
    with_fields = {**good(), "file": str(secret), "path": str(secret), "image": str(secret), "images": [url]}
    with_part = good()
    with_part["messages"][0]["content"] = [{"type": "text", "text": "Look:"},
                                           {"type": "image_url", "image_url": {"url": url}}]
    with_ref = good()
    with_ref["tools"] = [json.loads(json.dumps(TOOLS[0]))]
    with_ref["tools"][0]["function"]["parameters"] = {"$ref": url}
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (with_fields, with_part, with_ref)))
    with opened_files:
        prepared = prepare_file(data, tokenizer_dir=tiny_model, fmt=FMT, seq_len=1024, cache_root=tmp_path / "c",
                                options=PrepOptions(on_invalid="skip"), num_proc=1)
    assert not [p for p in opened_files.seen if "secret" in p], opened_files.seen
    assert any(str(data) in p for p in opened_files.seen)  # the hook does see what is opened
    assert (prepared.stats.examples, prepared.stats.rejected) == (1, 2)
    reasons = [json.loads(line)["reason"] for line in prepared.rejected_file.read_text().splitlines()]
    assert "only text parts" in reasons[0] and "Keel follows no $ref to files or URLs" in reasons[1]


def test_a_symlink_out_of_a_documents_directory_is_not_read(tmp_path, tiny_model):
    from data.prepare import PrepOptions, prepare_file

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("A plain document about rivers.")
    outside = tmp_path / "private.txt"
    outside.write_text("SECRET-CONTENT")
    (docs / "link.txt").symlink_to(outside)
    prepared = prepare_file(docs, tokenizer_dir=tiny_model, fmt=FMT, seq_len=256, cache_root=tmp_path / "c",
                            options=PrepOptions(on_invalid="skip"), num_proc=1)
    [rejected] = [json.loads(line) for line in prepared.rejected_file.read_text().splitlines()]
    assert rejected["where"].endswith("docs/link.txt") and "outside" in rejected["reason"]
    assert prepared.stats.examples == 1
    with pytest.raises(KeelError, match=r"docs/link.txt: a symbolic link to .*private.txt, outside"):
        prepare_file(docs, tokenizer_dir=tiny_model, fmt=FMT, seq_len=256, cache_root=tmp_path / "c2", num_proc=1)


# --------------------------------------------------------------------------- output.dir


def test_output_dir_holding_something_keel_cannot_identify_is_not_overwritten(tmp_path):
    from trainer.resilience.run_identity import RUN_FILE, check_run_dir
    from trainer.recipe import load_recipe

    run = tmp_path / "run"
    r = load_recipe(QUICKSTART, [f"output.dir={run}"])
    run.mkdir()
    for text in ("[1, 2]\n", "status: running\nrecipe: 5\n", "a: [\n", "\xff"):
        (run / RUN_FILE).write_text(text, encoding="latin-1")
        with pytest.raises(KeelError, match=rf"output.dir {run}: {RUN_FILE} cannot be read .* new output.dir, or "
                                            "pass --overwrite"):
            check_run_dir(r, overwrite=False)
        assert check_run_dir(r, overwrite=True) == "overwrite"
    shutil.rmtree(run)
    run.write_text("a file")
    with pytest.raises(KeelError, match=f"output.dir {run} is a file, not a directory"):
        check_run_dir(r, overwrite=False)


def test_recipe_defaults_are_the_safe_ones():
    from trainer.recipe import load_recipe

    model = load_recipe(QUICKSTART).to_dict()["model"]
    assert model["trust_remote_code"] is False and model["allow_pickle"] is False
    assert yaml.safe_load(QUICKSTART.read_text())["model"].get("trust_remote_code") is None  # not spelled out


def test_serving_on_every_interface_without_a_key_is_warned_about():
    from serving.server import exposure_warning

    assert "anyone who can reach this port" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", "k") is None and exposure_warning("127.0.0.1", None) is None


@pytest.mark.parametrize("location", ["memory://AKIAKEEL:planted-secret-3e@bucket/train.jsonl",
                                      "memory://bucket/train.jsonl?X-Amz-Signature=planted-secret-3e&x=1"])
def test_an_error_naming_a_location_does_not_carry_its_credentials(location):
    """Every KeelError is redacted where it is made, so no message that echoes a URL (here the
    data reader's "does not exist") can show a password or a presigned signature."""
    from data.sources import open_source

    with pytest.raises(KeelError) as err:
        open_source(location)
    assert "does not exist" in str(err.value) and "***" in str(err.value)
    assert "planted-secret-3e" not in str(err.value) and "planted-secret-3e" not in repr(err.value)


def test_credentials_in_a_storage_url_are_refused_by_the_recipe(tmp_path):
    from trainer.recipe import load_recipe

    with pytest.raises(KeelError) as err:
        load_recipe(QUICKSTART, ["model.path=gs://user:planted-secret-3e@bucket/model", f"output.dir={tmp_path}"])
    assert "model.path: gs://user:***@bucket/model carries credentials" in str(err.value)
    assert "planted-secret-3e" not in str(err.value)
    # a tracking URI may carry a user and password (MLflow sends them): redacted, not refused
    recipe = load_recipe(QUICKSTART, ["tracking.mlflow.tracking_uri=http://keel:pw@127.0.0.1:5000"])
    assert recipe.tracking.mlflow.tracking_uri == "http://keel:pw@127.0.0.1:5000"
