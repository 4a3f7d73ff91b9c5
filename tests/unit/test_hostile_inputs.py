"""Hostile and broken inputs, property-based: whatever a recipe or a data row holds, only Keel's
own errors (KeelError and its subclasses, RowError among them) come out, each saying where;
never a TypeError, KeyError, AttributeError, RecursionError..., never a hang.

Each test runs 500 inputs (tests/hostile.py EXAMPLES; hypothesis settings max_examples=500,
deadline=None), asserts that many were tried, and reports the count in the run's summary
("inputs tried by property tests"). The shape-converter and renderer tests are in the slow
tier (10-15 s each on 2 busy cores), the others in the default tier. The atheris harness in
tests/fuzz/ runs the recipe, conversation and JSON Lines targets on 100k+ inputs each
(benchmarks/results/fuzz.md).
"""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import strategies as st

from data.conversation import validate_conversation, validate_document, validate_preference
from data.documents import DOCUMENT_SUFFIXES, document_text
from data.errors import KeelError
from data.formats import available_formats, load_format
from data.shapes import KINDS, detect_shape, to_canonical
from data.sources import open_source
from tests.hostile import EXAMPLES, conversation_rows, json_values, keys, run_property, shaped_rows
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
