"""Hypothesis strategies for hostile and broken inputs, shared by the property tests.

The values are what Keel's readers can hand the validators: JSON values (string keys,
NaN and Infinity included, as Python's json reads them), shaped like the rows Keel expects
often enough to reach deep into the validators, and broken in every place.
"""

from __future__ import annotations

import json

from hypothesis import settings, strategies as st

# Every property test runs this many inputs (hypothesis stops early only when the strategy
# has fewer distinct values); tests assert the count and report it (see run_property).
EXAMPLES = 500
PROPERTY_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None)

KEYS = ["messages", "role", "content", "tool_calls", "function", "name", "arguments", "tools", "type",
        "parameters", "tool_call_id", "id", "reasoning_content", "reasoning", "text", "conversations", "from",
        "value", "system", "instruction", "input", "output", "history", "prompt", "completion", "chosen",
        "rejected", "file", "path", "image", "images", "url", "image_url", "data", "description"]
ROLES = ["system", "user", "assistant", "tool", "function", "human", "gpt", "observation", "function_call", ""]
TOOL_NAMES = ["get_weather", "f", "", "x" * 3]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=20), st.sampled_from(["", "{", "[", "{}", "[]", "null", "<think>", "</think>",
                                                           "<tool_call>", "{\"name\": \"f\", \"arguments\": {}}",
                                                           "/etc/passwd", "file:///etc/passwd", "../../x"]))
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(keys, inner, max_size=5)),
                           max_leaves=25)

SCHEMAS = [
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    {"type": "object"}, {}, {"$ref": "file:///etc/passwd"}, {"$ref": "http://127.0.0.1:9/s.json"},
    {"$ref": "#/$defs/a", "$defs": {"a": {"type": "object"}}}, {"type": "object", "properties": {"a": {"pattern": "("}}},
    {"type": "object", "properties": {"a": {"type": "string", "pattern": "a{99999999999}"}}}, {"type": 5},
    {"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 1e-320}}},
]
schemas = st.one_of(st.sampled_from(SCHEMAS), json_values, st.sampled_from(SCHEMAS).map(json.dumps))


@st.composite
def tool(draw):
    fn = {"name": draw(st.one_of(st.sampled_from(TOOL_NAMES), json_values))}
    if draw(st.booleans()):
        fn["parameters"] = draw(schemas)
    if draw(st.booleans()):
        fn["description"] = draw(st.one_of(st.text(max_size=10), json_values))
    return draw(st.sampled_from([{"type": "function", "function": fn}, fn, {"type": "other", "function": fn}]))


@st.composite
def tool_call(draw):
    args = draw(st.one_of(st.just({"city": "Paris"}), json_values, json_values.map(json.dumps),
                          st.sampled_from(["{city", "NaN", "{\"a\": NaN}", "", "[1]"])))
    fn = {"name": draw(st.one_of(st.sampled_from(TOOL_NAMES), json_values)), "arguments": args}
    call = draw(st.sampled_from([{"type": "function", "function": fn}, fn]))
    if draw(st.booleans()):
        call["id"] = draw(st.one_of(st.sampled_from(["a", "b"]), json_values))
    return call


content = st.one_of(st.text(max_size=30), st.none(), json_values,
                    st.lists(st.one_of(st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=10)),
                                       st.just({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}),
                                       json_values), max_size=3))


@st.composite
def message(draw):
    msg = {"role": draw(st.one_of(st.sampled_from(ROLES), json_values))}
    if draw(st.integers(0, 4)):
        msg["content"] = draw(content)
    if draw(st.integers(0, 3)) == 0:
        msg["tool_calls"] = draw(st.one_of(st.lists(tool_call(), max_size=3), json_values))
    if draw(st.integers(0, 3)) == 0:
        msg["reasoning_content"] = draw(st.one_of(st.text(max_size=20), json_values))
    if draw(st.integers(0, 3)) == 0:
        msg["tool_call_id"] = draw(st.one_of(st.sampled_from(["a", "b"]), json_values))
    if draw(st.integers(0, 5)) == 0:
        msg[draw(st.sampled_from(["file", "path", "image", "name"]))] = draw(scalars)
    return msg


@st.composite
def plausible_messages(draw):
    """Mostly valid turn order (user, assistant[, tool, assistant]...), so rendering is reached."""
    out = [{"role": "system", "content": draw(st.text(max_size=20))}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        out.append({"role": "user", "content": draw(st.text(max_size=40))})
        if draw(st.booleans()):
            call = {"id": "a", "type": "function",
                    "function": {"name": "get_weather", "arguments": draw(st.sampled_from(
                        ['{"city": "Paris"}', {"city": draw(st.text(max_size=10))}]))}}
            out.append({"role": "assistant", "content": draw(st.sampled_from(["", "Checking."])),
                        "reasoning_content": draw(st.one_of(st.none(), st.text(max_size=20))), "tool_calls": [call]})
            out.append({"role": "tool", "tool_call_id": "a", "content": draw(st.text(max_size=20))})
        out.append({"role": "assistant", "content": draw(st.text(min_size=1, max_size=40)),
                    "reasoning_content": draw(st.one_of(st.none(), st.text(max_size=20)))})
    return out


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMAS[0]}}

messages = st.one_of(plausible_messages(), st.lists(message(), max_size=5), json_values)
conversation_rows = st.one_of(
    st.builds(lambda m, t: {"messages": m, "tools": t}, messages,
              st.one_of(st.none(), st.just([WEATHER]), st.lists(tool(), max_size=3), json_values,
                        st.lists(tool(), max_size=2).map(json.dumps))),
    st.builds(lambda m, extra: {"messages": m, **extra}, messages, st.dictionaries(keys, scalars, max_size=3)),
    json_values,
)
# (shape, row): rows of each shape data/shapes.py converts, given to that shape's converter,
# plus any row given to any converter.
prompt_or_messages = st.one_of(st.text(max_size=10), messages)
shaped_rows = st.one_of(
    st.tuples(st.just("messages"), conversation_rows),
    st.tuples(st.just("sharegpt"), st.builds(
        lambda turns, system: {"conversations": turns, "system": system},
        st.one_of(st.lists(st.fixed_dictionaries({"from": st.one_of(st.sampled_from(ROLES), json_values),
                                                  "value": json_values}), min_size=1, max_size=4), json_values),
        st.one_of(st.none(), st.text(max_size=5), json_values))),
    st.tuples(st.just("alpaca"), st.fixed_dictionaries(
        {"instruction": st.one_of(st.text(max_size=10), json_values), "output": st.one_of(st.text(max_size=10),
                                                                                           json_values)},
        optional={"input": json_values, "history": json_values, "system": json_values})),
    st.tuples(st.just("prompt_completion"), st.fixed_dictionaries({"prompt": prompt_or_messages,
                                                                   "completion": prompt_or_messages})),
    st.tuples(st.just("preference"), st.fixed_dictionaries(
        {"chosen": prompt_or_messages, "rejected": prompt_or_messages},
        optional={"prompt": prompt_or_messages, "tools": json_values})),
    st.tuples(st.just("text"), st.fixed_dictionaries({"text": json_values})),
    st.tuples(st.sampled_from(["messages", "sharegpt", "alpaca", "prompt_completion", "preference", "text"]),
              st.one_of(json_values, st.dictionaries(keys, json_values, max_size=6))),
)


def run_property(strategy, check) -> int:
    """Run `check` on EXAMPLES inputs drawn from `strategy`; the number of inputs tried."""
    from hypothesis import given

    tried = 0

    @PROPERTY_SETTINGS
    @given(strategy)
    def prop(value):
        nonlocal tried
        tried += 1
        check(value)

    prop()
    return tried


# --------------------------------------------------------------------------- files and arguments

SECRET = "hunter2-sekrit"  # what a hostile input carries in a URL or an option; never printed back
SECRET_URL = f"https://bob:{SECRET}@mlflow.example/x?token={SECRET}"
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
HOSTILE_TEXTS = [
    "", "{", "[", "{}", "[]", "null", "5", '"x"', "NaN", '{"a": NaN}', '{"a": Infinity}', '{"a": 1, "a": 2}',
    "a: 1\na: 2\n", "seq_len: 256\ntraining: {}\nseq_len: 2048\n", "a: &x [*x]\n", ALIAS_BOMB, "[" * 3000,
    '{"hidden_size": -1, "model_type": "llama"}', '{"hidden_size": 1e400}', '{"num_hidden_layers": "2"}',
    '{"model_type": "llama", "hidden_size": 1099511627776, "num_hidden_layers": 2}', '{"text_config": [1]}',
    "!!python/object/apply:os.system ['true']\n", "a: 2024-13-45\n", "a: !!binary 'zz'\n", "? [a]\n: 1\n",
    '{"step": "x", "loss": 1}', '{"step": 1, "loss": "high"}', '{"step": 1, "loss": 1}\n{"step": 2, "lo',
    f"recipe: {{tracking: {{mlflow: {{tracking_uri: '{SECRET_URL}'}}}}}}\n", "recipe: {tracking: 5}\n",
    "recipe: [1]\n", "\ufeff{}", '{"a": "\\ud800"}',
]
file_bytes = st.one_of(
    st.sampled_from(HOSTILE_TEXTS).map(str.encode),
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.lists(json_values.map(json.dumps), max_size=4).map(lambda lines: "\n".join(lines).encode()),
    st.sampled_from(HOSTILE_TEXTS).map(lambda t: t.encode()[:max(len(t) // 2, 1)]),  # cut short
    st.sampled_from([b"\xff\xfe\x00", b'{"a": "\xff"}', b"\x00" * 64, b"PK\x03\x04", b"%PDF-1.4"]),
)
COUNTS = [0, -1, 1, 2, 2**31 - 1, 2**31, 2**63, -(2**31)]
count_text = st.one_of(st.sampled_from(COUNTS).map(str), st.integers().map(str),
                       st.sampled_from(["1.5", "", "x", "1e3", "0x10", SECRET_URL, "--", "NaN"]))
name_text = st.one_of(st.sampled_from(["ok", "Team_A", "-x", "x-", "a" * 64, "a.b", "", " ", "ns/1", SECRET_URL,
                                       "x" * 300, "UPPER", "1abc", "kube-system"]), st.text(max_size=12))
uri_text = st.one_of(st.sampled_from([
    "models:/m/1", "models:/m/notanumber", "models:/m", "models://m/1", "models:/m/1/2", "models:/m/-1",
    "s3://bucket-a/m", "ftp://x/y", "file:///etc/passwd", "pvc://claim/m", "pvc://Claim/../m", "runs/sft/model",
    "", "://", "s3://", SECRET_URL, f"s3://bob:{SECRET}@bucket-a/m", f"models:/m/1?token={SECRET}"]),
    st.text(max_size=20))
