"""Hostile and broken inputs, property-based: whatever a recipe, a data row, a file Keel reads
(config.json, keel-export.yaml, a format spec, tokenizer_config.json, metrics.jsonl,
keel-run.yaml) or a command's arguments hold, only Keel's own errors (KeelError and its
subclasses, RowError among them) come out, each saying where; never a TypeError, KeyError,
AttributeError, RecursionError..., never a hang. Commands run in this process (keel.cli.main)
and must answer a mistake with one `keel: error:` line naming the file or option, exit non-zero,
print no secret and write nothing.

Each test runs 500 inputs (tests/hostile.py EXAMPLES; hypothesis settings max_examples=500,
deadline=None), asserts that many were tried, and reports the count in the run's summary
("inputs tried by property tests"). The shape-converter and renderer tests are in the slow
tier (10-15 s each on 2 busy cores), the others in the default tier. The atheris harness in
tests/fuzz/ runs the recipe, conversation and JSON Lines targets on 100k+ inputs each
(benchmarks/results/fuzz.md).
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from hypothesis import strategies as st

from data.conversation import validate_conversation, validate_document, validate_preference
from data.documents import DOCUMENT_SUFFIXES, document_text
from data.errors import KeelError
from data.formats import available_formats, load_format
from data.shapes import KINDS, detect_shape, to_canonical
from data.sources import open_source
from tests.hostile import (ALIAS_BOMB, EXAMPLES, SECRET, SECRET_URL, conversation_rows, count_text, file_bytes,
                           json_values, keys, name_text, run_property, shaped_rows, uri_text)
from trainer.recipe import parse_recipe

FORMATS = [load_format(name) for name in available_formats() if name != "native"]
SOURCE = "hostile.yaml"


def report(record_property, tried: int) -> None:
    assert tried >= EXAMPLES, f"only {tried} inputs tried"
    record_property("inputs_tried", tried)


def keel_error_only(fn, *args, **kwargs):
    """fn's result, or None when it raised a KeelError with a message; anything else fails."""
    try:
        return fn(*args, **kwargs)
    except KeelError as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return None


# --------------------------------------------------------------------------- recipes

QUICKSTART = {"model": {"path": "./m", "format": "hermes-qwen3"}, "data": {"train": "d.jsonl"},
              "training": {"max_steps": 2, "learning_rate": 1e-4}, "output": {"dir": "out"}}


@st.composite
def recipe_texts(draw):
    """YAML text: the quickstart recipe with values and keys replaced, arbitrary YAML, or junk."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        raw = json.loads(json.dumps(QUICKSTART))
        for _ in range(draw(st.integers(1, 4))):
            section = draw(st.sampled_from(sorted(raw) + ["peft", "dpo", "distributed", "tracking", "checkpoint"]))
            node = raw.setdefault(section, {}) if isinstance(raw.get(section, {}), dict) else raw
            node[draw(keys)] = draw(json_values)
        return yaml.safe_dump(raw)
    if kind == 1:
        return yaml.safe_dump(draw(json_values))
    if kind == 2:
        return draw(st.sampled_from([
            "!!python/object/apply:os.system ['true']\n", "a: !!python/name:os.system\n", "a: 2024-13-45\n",
            "a: &x [*x]\n", "[" * 2000, "a: !!binary 'zz'\n", "? [a]\n: 1\n", "model: {1: 2}\n", "1: 2\n",
            "{null: 1}\n", "a: !!set {x}\n", "<<: 5\n", "a: !!float nope\n", "a: !!int 0x\n"]))
    return draw(st.text(max_size=200))


def test_recipe_loader_raises_only_keel_errors_naming_the_file(record_property):
    def check(case):
        text, overrides = case
        try:
            parse_recipe(text, SOURCE, overrides)
        except KeelError as exc:
            # an override error names the override; everything else names the file
            assert SOURCE in str(exc) or "override" in str(exc), str(exc)

    overrides = st.lists(st.one_of(st.text(max_size=20), st.builds(lambda k, v: f"{k}={v}", st.text(max_size=15),
                                                                     st.text(max_size=15)),
                                   st.sampled_from(["training.max_steps=5", "model=1", "model.path.x=1", "a..b=1",
                                                    "model.trust_remote_code=!!python/object:os.system {}",
                                                    "training.seed=2024-13-45", "x=" + "[" * 2000])), max_size=3)
    report(record_property, run_property(st.tuples(recipe_texts(), overrides), check))


def test_python_yaml_tags_are_refused_naming_the_file(tmp_path):
    """The safe loader only: a recipe cannot construct Python objects, let alone run code."""
    from trainer.recipe import load_recipe

    recipe = tmp_path / "evil.yaml"
    marker = tmp_path / "ran"
    recipe.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(KeelError, match=r"evil\.yaml: not valid YAML: could not determine a constructor for the tag "
                                        r"'tag:yaml.org,2002:python/object/apply:os.system'"):
        load_recipe(recipe)
    assert not marker.exists()


# --------------------------------------------------------------------------- rows


def test_conversation_validator_raises_only_keel_errors(record_property):
    def check(case):
        row, fmt = case
        out = keel_error_only(validate_conversation, row, fmt.row_rules())
        if out is not None:  # what comes out is what rendering relies on
            assert out["messages"][-1]["role"] == "assistant" and isinstance(out["tools"], list)
            assert all(isinstance(m["content"], str) for m in out["messages"])
            # tool-call arguments that validate are JSON any parser reads back: no NaN, no Infinity
            for m in out["messages"]:
                for call in m.get("tool_calls") or []:
                    json.dumps(call["function"]["arguments"], allow_nan=False)

    report(record_property, run_property(st.tuples(conversation_rows, st.sampled_from(FORMATS)), check))


@pytest.mark.slow  # ~10-15 s on 2 busy cores: the default tier's budget is spent
def test_shape_converters_and_validators_raise_only_keel_errors(record_property):
    rules = load_format("hermes-qwen3").row_rules()

    def check(case):
        shape, row = case
        keel_error_only(detect_shape, row, "rows.jsonl:1")
        canonical = keel_error_only(to_canonical, shape, row)
        if canonical is None:
            return
        validate = {"conversation": lambda r: validate_conversation(r, rules),
                    "preference": lambda r: validate_preference(r, rules),
                    "document": lambda r: validate_document(r, ("<|im_end|>",))}[KINDS[shape]]
        keel_error_only(validate, canonical)

    report(record_property, run_property(shaped_rows, check))


def test_document_reader_raises_only_keel_errors(record_property):
    def check(case):
        name, data = case
        keel_error_only(document_text, name, data)

    names = st.builds(lambda stem, suffix: stem + suffix, st.text(max_size=5),
                      st.sampled_from(list(DOCUMENT_SUFFIXES) + ["", ".exe", ".PDF"]))
    blobs = st.one_of(st.binary(max_size=300), st.text(max_size=100).map(str.encode),
                      st.binary(max_size=100).map(lambda b: b"%PDF-1.4\n" + b),
                      st.binary(max_size=100).map(lambda b: b"PK\x03\x04" + b))
    report(record_property, run_property(st.tuples(names, blobs), check))


def test_jsonl_reader_names_the_line_of_every_bad_row(record_property):
    """Any bytes as a .jsonl file: each row comes back as a value or a RowError, with FILE:LINE."""
    import fsspec

    fs = fsspec.filesystem("memory")

    def check(lines):
        data = b"\n".join(lines)
        fs.pipe("/hostile.jsonl", data)
        rows = list(open_source("memory:///hostile.jsonl").rows())
        assert len(rows) == sum(1 for line in data.split(b"\n") if line.strip())
        for where, row in rows:
            assert where.startswith("memory:///hostile.jsonl:")
            if isinstance(row, KeelError):
                assert str(row).strip()

    line = st.one_of(st.binary(max_size=40), json_values.map(lambda v: json.dumps(v).encode()),
                     st.sampled_from([b'{"messages": [', b"\xff\xfe", b"[" * 5000, b'{"a": NaN}', b"\xef\xbb\xbf{}"]))
    report(record_property, run_property(st.lists(line, max_size=5), check))


# --------------------------------------------------------------------------- rendering


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from data.model_loading import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.mark.slow  # ~10-15 s on 2 busy cores: the default tier's budget is spent
def test_renderer_raises_only_keel_errors_and_masks_only_assistant_text(tokenizer, record_property):
    """Rows that validate render to ids and labels of equal length; labels are the ids where
    trained; rows that cannot be rendered raise a KeelError. Each row goes through a Jinja
    format (hermes-qwen3) and through harmony (gpt-oss, rendered by the harmony library, which
    needs no tokenizer; there every trained run also ends on <|return|> or <|call|>)."""
    from data.render import IGNORE_INDEX, render_conversation, render_document, render_preference

    formats = [(load_format("hermes-qwen3"), tokenizer), (load_format("harmony"), None)]
    stops = {200002, 200012}  # harmony's <|return|>, <|call|>

    def render_row(row, fmt, tok):
        rules = fmt.row_rules()
        conv = keel_error_only(validate_conversation, row, rules)
        if conv is not None:
            for ex in keel_error_only(render_conversation, conv, tokenizer=tok, fmt=fmt) or []:
                assert len(ex.input_ids) == len(ex.labels)
                assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ex.input_ids, ex.labels))
                if fmt.harmony:
                    ends = [k for k in range(len(ex.labels)) if ex.labels[k] != IGNORE_INDEX
                            and (k + 1 == len(ex.labels) or ex.labels[k + 1] == IGNORE_INDEX)]
                    assert ends and all(ex.input_ids[k] in stops for k in ends)
            messages = conv["messages"]
            last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
            pair = {"prompt": messages[:last_user + 1], "chosen": messages[-1],
                    "rejected": {"role": "assistant", "content": "no"}, "tools": row.get("tools")}
            pair = keel_error_only(validate_preference, pair, rules)
            if pair is not None:
                keel_error_only(render_preference, pair, tokenizer=tok, fmt=fmt)

    def check(row):
        for fmt, tok in formats:
            render_row(row, fmt, tok)
        text = row.get("messages") if isinstance(row, dict) else None
        if isinstance(text, str) and text.strip():
            assert keel_error_only(render_document, text, tokenizer=tokenizer)

    report(record_property, run_property(conversation_rows, check))


# --------------------------------------------------------------------------- files Keel reads


def _run_keel(argv: list[str]) -> tuple[int, str, str]:
    """`keel ARGV` in this process: (exit status, stdout, stderr). Only SystemExit (argparse's usage
    errors) may leave main(); any other exception is a traceback the user would see."""
    import contextlib
    import io

    from keel.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc, out: str, err: str) -> None:
    """What a user sees for a mistake: non-zero, one `keel: error:` line (or argparse's usage and its
    one error line), no traceback, no secret."""
    assert rc not in (0, None), (out, err)
    assert "Traceback" not in err and SECRET not in out + err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[keel]")]
    errors = [line for line in lines if line.startswith("keel") and "error" in line.split(":", 2)[1]]
    assert len(errors) == 1 and errors[0] == lines[-1], err


def _file_readers():
    from data.formats import Format
    from data.formats.native import model_chat_template
    from data.model_config import read_model_config
    from data.model_dir import read_export_info
    from trainer.recipe import load_recipe, parse_recipe
    from trainer.resilience.run_identity import check_run_dir
    from trainer.tracking.local import read_local

    def run_dir_check(d):
        check_run_dir(parse_recipe(yaml.safe_dump({**QUICKSTART, "output": {"dir": str(d)}}), "r.yaml"),
                      overwrite=False)

    # (file name, reader given the directory holding it, whether its errors may list several problems)
    return [("config.json", lambda d: read_model_config(d / "config.json"), False),
            ("keel-export.yaml", read_export_info, False),
            ("spec.yaml", Format.from_dir, False),
            ("tokenizer_config.json", model_chat_template, False),
            ("recipe.yaml", lambda d: load_recipe(d / "recipe.yaml"), True),
            ("metrics.jsonl", read_local, False),
            ("keel-run.yaml", run_dir_check, False)]


def test_every_file_reader_names_the_file_in_one_line(tmp_path, record_property):
    """Any bytes as config.json, keel-export.yaml, a format spec, tokenizer_config.json, a recipe,
    metrics.jsonl or keel-run.yaml (each input to one reader, drawn): the reader returns, or raises a
    KeelError naming the file, in one line (a recipe's schema problems are listed one per line after
    the line naming it), without the secret a URL in it held. A run record that reads well may be
    answered about the run it holds (finished, or trained with another recipe): that is no file error."""
    readers = _file_readers()
    about_the_run = ("holds a finished run", "holds an unfinished run")

    def check(case):
        (name, read, listed), data = case
        d = tmp_path / name.replace(".", "_")
        d.mkdir(exist_ok=True)
        (d / name).write_bytes(data)
        try:
            read(d)
        except KeelError as exc:
            message = str(exc)
            assert SECRET not in message, message
            if name == "keel-run.yaml" and any(about in message for about in about_the_run):
                return
            first = message.splitlines()[0] if message else ""
            assert name in first, (name, message)
            assert listed or "\n" not in message, (name, message)

    report(record_property, run_property(st.tuples(st.sampled_from(readers), file_bytes), check))


def test_keel_sync_of_a_hostile_run_record_is_one_line(tmp_path, record_property):
    """keel sync reads keel-run.yaml before it contacts anything (here a server that is not there)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def check(data):
        (run_dir / "keel-run.yaml").write_bytes(data)
        rc, out, err = _run_keel(["sync", str(run_dir), "--tracking-uri", "http://127.0.0.1:9"])
        assert_one_line_error(rc, out, err)
        assert "keel-run.yaml" in err or "not reachable" in err, err
        assert sorted(p.name for p in run_dir.iterdir()) == ["keel-run.yaml"]  # nothing written

    report(record_property, run_property(file_bytes, check))


def test_a_metrics_file_cut_short_by_a_crash_still_syncs_and_any_other_bad_line_is_named(tmp_path):
    from trainer.tracking.local import METRICS_FILE, read_local

    metrics = tmp_path / METRICS_FILE
    metrics.write_bytes(b'{"step": 1, "timestamp": 5, "loss": 2.5}\n{"step": 2, "timestamp": 6, "loss": NaN}\n'
                        b'{"step": 3, "timesta')
    points = read_local(tmp_path)["loss"]  # the NaN loss kept, the line cut short skipped
    assert (1, 2.5) in points and len(points) == 2
    for bad, why in [(b"\xff\xfe\n", "not UTF-8 text"), (b'{"step": 1,\n', "not valid JSON"),
                     (b'{"step": "one", "loss": 1}\n', "whole-number step")]:
        metrics.write_bytes(bad + b'{"step": 2, "timestamp": 6, "loss": 1.0}\n')
        with pytest.raises(KeelError, match=rf"^{re.escape(str(metrics))}:1: .*{why}.*run keel sync again"):
            read_local(tmp_path)


def test_yaml_duplicate_keys_alias_bombs_and_huge_files_are_refused_before_use(tmp_path):
    from data.files import MAX_BYTES, read_json
    from trainer.recipe import load_recipe

    recipe = tmp_path / "dup.yaml"
    recipe.write_text(yaml.safe_dump(QUICKSTART) + "training: {max_steps: 3, learning_rate: 1.0e-4, seq_len: 256}\n")
    with pytest.raises(KeelError, match=r"dup\.yaml: not valid YAML: key 'training' appears twice in one mapping "
                                        r"\(lines \d+ and \d+\); the second would silently win"):
        load_recipe(recipe)
    recipe.write_text(ALIAS_BOMB)  # 10^9 values once expanded
    with pytest.raises(KeelError) as bomb:
        load_recipe(recipe)
    assert "aliases expand to more than 100,000 values" in str(bomb.value) and len(str(bomb.value)) < 300
    big = tmp_path / "config.json"
    big.write_bytes(b" " * (MAX_BYTES + 1))
    with pytest.raises(KeelError, match=r"config\.json: model config is larger than 16 MiB"):
        read_json(big, what="model config")
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    with pytest.raises(KeelError, match=r"loop\.yaml: cannot read the recipe file \(a symlink loop\)"):
        load_recipe(loop)


@pytest.mark.parametrize("sizes, message", [
    ({"num_attention_heads": 12, "num_key_value_heads": 5}, "num_key_value_heads 5 does not divide num_attention_heads 12"),
    ({"hidden_size": 100, "num_attention_heads": 3}, "hidden_size 100 is not a multiple of num_attention_heads 3"),
])
def test_attention_heads_that_cannot_build_a_model_are_refused_naming_the_keys(tmp_path, sizes, message):
    from data.model_config import read_model_config

    config = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "vocab_size": 4096, **sizes}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeelError, match=re.escape(f"config.json: {message}")):
        read_model_config(tmp_path / "config.json")
    # an explicit head_dim (Qwen3, Gemma: hidden need not split over the heads) is a valid layout
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 100, "num_attention_heads": 4,
                                                      "num_key_value_heads": 2, "head_dim": 64}))
    assert read_model_config(tmp_path / "config.json")["head_dim"] == 64


# --------------------------------------------------------------------------- non-finite numbers


@pytest.mark.parametrize("key", ["training.learning_rate", "training.epochs", "training.warmup_ratio",
                                 "training.max_grad_norm", "training.weight_decay", "peft.dropout",
                                 "dpo.beta", "checkpoint.every_minutes"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400"])
def test_every_float_in_the_recipe_must_be_finite(key, value):
    extra = {"technique=dpo"} if key.startswith("dpo.") else set()
    with pytest.raises(KeelError, match=rf"{re.escape(key)}: Input should be a finite number"):
        parse_recipe(yaml.safe_dump(QUICKSTART), SOURCE, [*extra, f"{key}={value}"])


@pytest.mark.parametrize("arguments", [{"city": float("nan")}, {"city": [1, float("inf")]}, '{"city": NaN}',
                                       '{"city": -Infinity}'])
def test_tool_call_arguments_must_be_strict_json_whichever_form(arguments):
    row = {"messages": [{"role": "user", "content": "weather?"},
                        {"role": "assistant", "content": "", "tool_calls": [
                            {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}
    with pytest.raises(KeelError, match=r"messages\[1\]\.tool_calls\[0\]: arguments .*(NaN|Infinity)"):
        validate_conversation(row, FORMATS[0].row_rules())


# --------------------------------------------------------------------------- command-line arguments


@st.composite
def command_lines(draw, root):
    """A keel command with hostile option values, laid out so that none of them can start work: the
    recipe does not exist and OUT_DIR/DEST is a file, so every line ends in an error or, for deploy,
    printed YAML."""
    missing, a_file = str(root / "no-recipe.yaml"), str(root / "a-file")
    opt = lambda flag, values: [flag, draw(values)] if draw(st.booleans()) else []  # noqa: E731
    cmd = draw(st.sampled_from(["launch", "deploy", "pull", "train", "tiny-model", "plan"]))
    if cmd == "launch":
        return [cmd, missing, "--image", draw(st.sampled_from(["keel-train:1", SECRET_URL, "a b"])), "--nodes",
                draw(count_text), "--gpus-per-node", draw(count_text), *opt("--namespace", name_text),
                *opt("--name", name_text), *opt("--max-restarts", count_text), *opt("--efa", count_text)]
    if cmd == "deploy":
        vllm = draw(st.sampled_from([[], ["--", "--api-key", SECRET], ["--", f"--hf-token={SECRET}"],
                                     ["--", "--max-model-len", "512"], ["--", SECRET_URL]]))
        return [cmd, draw(uri_text), "--image", "keel-serve:1", *opt("--replicas", count_text),
                *opt("--namespace", name_text), *opt("--name", name_text), *opt("--gpus", count_text),
                *opt("--max-replicas", count_text), *vllm]
    if cmd == "pull":
        return [cmd, draw(uri_text), a_file]
    if cmd == "train":
        return [cmd, missing, *opt("--nproc-per-node", count_text), *opt("--nnodes", count_text),
                *opt("--node-rank", count_text), *opt("--master-port", count_text),
                *opt("--max-restarts", count_text)]
    if cmd == "tiny-model":
        return [cmd, a_file, *opt("--layers", count_text), *opt("--hidden", count_text),
                *opt("--vocab-size", count_text)]
    return [cmd, missing, *opt("--nodes", count_text), *opt("--gpus-per-node", count_text), "--gpu", "cpu"]


def test_every_command_refuses_hostile_arguments_in_one_line(tmp_path, monkeypatch, record_property):
    """launch, deploy, pull, train, tiny-model and plan with counts beyond 32 bits, negative or not
    numbers, names Kubernetes refuses, malformed model URIs, credentials in URLs and vLLM args: a
    one-line error naming the option (deploy may print its manifests), no traceback, no secret,
    nothing written."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "a-file").write_text("keep me\n")

    def check(argv):
        rc, out, err = _run_keel(argv)
        if rc == 0:
            assert argv[0] == "deploy" and "kind: Deployment" in out and SECRET not in out + err
        else:
            assert_one_line_error(rc, out, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
        assert (tmp_path / "a-file").read_text() == "keep me\n"

    report(record_property, run_property(command_lines(tmp_path), check))


@pytest.mark.parametrize("argv, message", [
    (["train", "R", "--nproc-per-node", "-1"], "--nproc-per-node -1: expected a whole number from 1 to 2,147,483,647"),
    (["launch", "R", "--image", "i:1", "--nodes", str(2**31), "--gpus-per-node", "0"],
     "--nodes 2147483648: expected a whole number from 1 to 2,147,483,647"),
    (["deploy", "models:/m/1", "--image", "i:1", "--replicas", str(2**31)],
     "--replicas 2147483648: expected a whole number from 1 to 2,147,483,647"),
    (["tiny-model", "OUT", "--layers", "-1"], "--layers -1: expected a whole number from 1 to 2,147,483,647"),
    (["deploy", "models:/m/x", "--image", "i:1"], "MODEL_URI 'models:/m/x': expected models:/NAME/VERSION"),
    (["pull", "models:/m/x", "OUT"], "MODEL_URI 'models:/m/x': expected models:/NAME/VERSION"),
    (["deploy", "models:/m/1", "--image", "i:1", "--namespace", "Team_A"], "--namespace 'Team_A': expected a "
     "Kubernetes namespace"),
    (["launch", "R", "--image", "i:1", "--nodes", "1", "--gpus-per-node", "0", "--namespace", "Team_A"],
     "--namespace 'Team_A': expected a Kubernetes namespace"),
    (["pull", "ftp://host/m", "OUT"], "'ftp://host/m': scheme 'ftp:' is not one Keel pulls from"),
    (["tiny-model", "FILE"], "OUT_DIR '{FILE}': is a file, not a directory"),
    (["pull", "s3://bucket-a/m", "FILE"], "DEST '{FILE}': is a file, not a directory"),
    (["deploy", "models:/m/1", "--image", "i:1", "--", "--api-key", SECRET], "-- --api-key: carries a credential"),
])
def test_the_same_rule_gives_the_same_message_in_every_command(argv, message, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    subst = {"R": str(tmp_path / "r.yaml"), "OUT": str(tmp_path / "out"), "FILE": str(a_file)}
    rc, out, err = _run_keel([subst.get(a, a) for a in argv])
    assert_one_line_error(rc, out, err)
    assert err.startswith("keel: error: " + message.format(FILE=a_file)), err
    assert not (tmp_path / "out").exists()


def test_plan_prints_the_resolved_recipe_without_credentials(tiny_model, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**QUICKSTART, "model": {"path": str(tiny_model), "format": "hermes-qwen3"},
                                      "data": {"train": f"https://bob:{SECRET}@data.example/train.jsonl"},
                                      "tracking": {"mlflow": {"tracking_uri": SECRET_URL}}}))
    rc, out, err = _run_keel(["plan", str(recipe), "--gpu", "cpu"])
    assert "resolved recipe:" in out and "tracking_uri: https://bob:***@mlflow.example/x?token=***" in out
    assert SECRET not in out + err


@pytest.mark.parametrize("meta", [b"", b"{", b"[]", b'{"kind": "sft"}', b"\xff"])
def test_a_damaged_prepared_cache_is_named_with_its_fix(tmp_path, meta):
    from data.prepare import META_FILE, STATS_FILE, _read_prepared

    (tmp_path / META_FILE).write_bytes(meta)
    (tmp_path / STATS_FILE).write_text("{}")
    with pytest.raises(KeelError, match=rf"{re.escape(str(tmp_path))}.*the prepared-data cache is damaged: delete "
                                        rf"{re.escape(str(tmp_path))} and prepare again$"):
        _read_prepared(tmp_path)


def test_pull_from_an_unreachable_registry_fails_in_one_line_without_the_password_or_a_dest(tmp_path,
                                                                                             monkeypatch):
    """MLflow's client retries for minutes unless told otherwise; pull uses training's bounded
    retries, names the URI with the password hidden, and leaves no empty DEST behind."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, "")  # recorded, so what pull sets is undone after the test
        monkeypatch.delenv(name)
    import mlflow

    uri = f"http://bob:{SECRET}@127.0.0.1:9"  # nothing listens on port 9
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # an earlier test in this process may have set another
    dest = tmp_path / "pulled" / "model"
    try:
        rc, out, err = _run_keel(["pull", "models:/tool-caller/1", str(dest)])
    finally:
        mlflow.set_tracking_uri(before)
    assert_one_line_error(rc, out, err)
    assert err.startswith("keel: error: models:/tool-caller/1: download failed:") and "bob:***@" in err
    assert not dest.exists()
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"


@pytest.mark.parametrize("command", [["deploy", "models:/m/1", "--image", "i:1"],
                                     ["launch", "RECIPE", "--image", "i:1", "--nodes", "1", "--gpus-per-node", "0"]])
def test_launch_and_deploy_refuse_a_tracking_uri_with_a_password(command, monkeypatch):
    """The pods would get $MLFLOW_TRACKING_URI in their manifest, in plain text."""
    from tests.unit.test_launch import RECIPE

    monkeypatch.setenv("MLFLOW_TRACKING_URI", SECRET_URL)
    rc, out, err = _run_keel([str(RECIPE) if a == "RECIPE" else a for a in command])
    assert_one_line_error(rc, out, err)
    assert "$MLFLOW_TRACKING_URI carries a credential" in err
