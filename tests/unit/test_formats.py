"""The format contract: what each format declares it can express, prefix stability of every
format, rendering options recorded in the export, and the `native` format's checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.conversation import RowError, mistral_call_id, validate_conversation
from data.errors import KeelError
from data.formats import Format, available_formats, load_format, resolve_format
from data.formats.native import probe_template
from data.model_dir import ExportInfo, load_model_format
from data.prepare import prepare_file, read_jsonl
from data.render import IGNORE_INDEX, render_conversation, render_text
from tests.data.make_roundtrip import OUT as CORPUS
from tests.unit.test_roundtrip import expressible_rows

SHIPPED = [f for f in available_formats() if f != "native"]


def corpus(fmt, limit=None):
    rows = expressible_rows(fmt.spec.supports)[:limit]
    return [validate_conversation(r, fmt.row_rules()) for r in rows]


@pytest.mark.parametrize("name", SHIPPED)
def test_declared_supports_match_what_the_template_renders(name):
    fmt = load_format(name)
    s = fmt.spec.supports
    if fmt.harmony:
        # No chat template to probe: data/harmony.py renders it, and tests/unit/test_harmony_format.py
        # holds what it renders to vLLM's harmony prompt and HarmonyParser. It writes reasoning
        # (analysis), content beside a call (a commentary preamble) and one call per turn (generation
        # stops at <|call|>).
        assert (s.tools, s.parallel_tool_calls, s.reasoning, s.content_with_tool_calls) == (True, False, True, True)
        assert (fmt.spec.vllm.tool_parser, fmt.spec.vllm.reasoning_parser) == ("openai", "openai_gptoss")
        return
    probe = probe_template(fmt.chat_template)
    assert (probe.tools, probe.parallel_tool_calls, probe.reasoning) == (s.tools, s.parallel_tool_calls, s.reasoning)
    if s.reasoning:
        assert probe.history_reasoning == fmt.spec.history_reasoning
    # the spec names the parsers that serve what it renders, and none for what it cannot
    assert (bool(fmt.spec.vllm.tool_parser), bool(fmt.spec.vllm.reasoning_parser)) == (s.tools, s.reasoning)


@pytest.mark.parametrize("case", ["hermes-qwen3", "llama3-json", "gemma3", "deepseek-r1", "mistral", "native"])
def test_prompt_for_k_turns_is_a_token_prefix_of_k_plus_1_turns(case, tiny_model_for):
    """What the server tokenizes as the prompt for an assistant turn (rendered with
    add_generation_prompt) is exactly the start of the ids that turn is trained in."""
    model = tiny_model_for("llama3-json" if case == "native" else case)
    fmt = resolve_format(case, model_path=model)
    tok = AutoTokenizer.from_pretrained(model)
    checked = 0
    for conv in corpus(fmt, 30 if fmt.spec.supports.tools else 60):  # tool-free rows have fewer turns
        msgs = conv["messages"]
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = render_text({"messages": msgs[:i], "tools": conv["tools"]}, fmt=fmt, add_generation_prompt=True)
            full = render_text({"messages": msgs[: i + 1], "tools": conv["tools"]}, fmt=fmt)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            f_ids = tok(full, add_special_tokens=False)["input_ids"]
            assert f_ids[: len(p_ids)] == p_ids, (case, i, prompt[-40:])
            checked += 1
    assert checked > 50


def test_a_turn_that_breaks_the_token_boundary_is_refused(tiny_model):
    """A generation prompt ending in a space ("Assistant: ") is a classic: whole-text tokenization
    glues the space to the answer's first word, so training ids differ from what follows the
    server's prompt. Rendering refuses the row instead of training on it."""
    hermes = load_format("hermes-qwen3")
    template = ("{%- for m in messages -%}{%- if m.role == 'user' -%}{{- 'User: ' + m.content + '\\n' -}}"
                "{%- else -%}{{- 'Assistant: ' -}}{%- generation -%}{{- m.content + '<|im_end|>' -}}{%- endgeneration -%}"
                "{{- '\\n' -}}{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}")
    spaced = Format(hermes.spec, template, hermes.directory)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    conv = validate_conversation({"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "the weather is fine"}]}, [])
    with pytest.raises(RowError, match=r"messages\[1\]: the prompt the server renders for this turn ends inside a token"):
        render_conversation(conv, tokenizer=tok, fmt=spaced)


def trained_text(tok, ex) -> list[str]:
    spans, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans + ([tok.decode(cur)] if cur else [])


def multi_turn(fmt):
    return next(c for c in corpus(fmt) if sum(m["role"] == "user" for m in c["messages"]) > 1
                and any(m.get("reasoning_content") for m in c["messages"][:3]))


def test_train_on_last_trains_only_the_last_assistant_turn(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    fmt = load_format("hermes-qwen3").with_options(train_on="last")
    conv = multi_turn(fmt)
    [ex] = render_conversation(conv, tokenizer=tok, fmt=fmt)
    [span] = trained_text(tok, ex)
    assert span.endswith(conv["messages"][-1]["content"] + "<|im_end|>")
    every = render_conversation(conv, tokenizer=tok, fmt=load_format("hermes-qwen3"))
    assert sum(len(trained_text(tok, e)) for e in every) > 1


def test_history_reasoning_keep_renders_old_reasoning_and_is_exported(tiny_model, tmp_path):
    from trainer.export import write_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model)
    keep = load_format("hermes-qwen3").with_options(history_reasoning="keep", train_on="last")
    conv = multi_turn(keep)
    early = next(m["reasoning_content"] for m in conv["messages"] if m.get("reasoning_content"))
    assert early in render_text(conv, fmt=keep)
    assert early not in render_text(conv, fmt=load_format("hermes-qwen3")).split("<|im_start|>user")[-2]
    assert len(render_conversation(conv, tokenizer=tok, fmt=keep)) == 1  # one example per conversation

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    out = write_model_dir(model, tok, fmt=keep, out_dir=tmp_path / "model", info=ExportInfo())
    served = load_model_format(out)
    assert (served.spec.history_reasoning, served.spec.train_on) == ("keep", "last")
    assert render_text(conv, fmt=served) == render_text(conv, fmt=keep)  # the server renders history as trained
    assert (out / "chat_template.jinja").read_text() == keep.chat_template


def test_options_a_format_cannot_honour_are_errors(tiny_model_for):
    with pytest.raises(KeelError, match="renders no reasoning"):
        load_format("llama3-json").with_options(history_reasoning="drop")
    native = resolve_format("native", model_path=tiny_model_for("hermes-qwen3"), native_syntax="hermes-qwen3")
    with pytest.raises(KeelError, match="has no option to change it"):
        native.with_options(history_reasoning="keep")
    with pytest.raises(KeelError, match="only for model.format: native"):
        resolve_format("hermes-qwen3", native_syntax="llama3-json")


DEEPSEEK_USER = {"role": "user", "content": "What's the weather in Paris?"}
DEEPSEEK_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def deepseek_row(*calls, content="", results=None, tools=(DEEPSEEK_TOOL,)):
    calls = [{"id": f"c{k}", "type": "function", "function": {"name": name, "arguments": args}}
             for k, (name, args) in enumerate(calls)]
    results = [{"role": "tool", "tool_call_id": c["id"], "content": "18C"} for c in calls] if results is None else results
    return {"messages": [DEEPSEEK_USER, {"role": "assistant", "reasoning_content": "Look it up.", "content": content,
                                         "tool_calls": calls}, *results,
                         {"role": "assistant", "reasoning_content": "", "content": "18C."}], "tools": list(tools)}


def test_deepseek_r1_takes_tools_and_refuses_what_its_parser_would_misread_with_the_place_and_the_fix():
    """deepseek-r1 writes tools, calls and results in DeepSeek's layout (tool_call_json 'fenced'):
    reasoning, text before the calls and parallel calls are valid, calls need no ids, and
    arguments holding the format's tokens as text are fine (the template escapes them). Refused,
    naming the row's key and the fix: a call name with a line break (vLLM's deepseek_v3 parser
    reads the name up to the end of its line) or with a format token, and any tool token as text
    in content, reasoning or a tool result (the tokenizer would make it the real token)."""
    fmt = load_format("deepseek-r1")
    rules = fmt.row_rules()
    assert rules.fenced_calls and rules.parallel_tool_calls and rules.content_with_tool_calls and rules.reasoning
    ok = validate_conversation(deepseek_row(("get_weather", {"city": "Paris"}),
                                            ("get_weather", {"city": "<｜tool▁call▁end｜>```\n</think>"}),
                                            content="Let me look."), rules)
    assert [c["function"]["arguments"]["city"] for c in ok["messages"][1]["tool_calls"]] == [
        "Paris", "<｜tool▁call▁end｜>```\n</think>"]
    # no ids in the layout: results are paired with calls by order, so validation writes them in the calls' order
    swapped = validate_conversation(deepseek_row(("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Lyon"}),
                                                 results=[{"role": "tool", "tool_call_id": "c1", "content": "20C"},
                                                          {"role": "tool", "tool_call_id": "c0", "content": "18C"}]), rules)
    assert [(m["tool_call_id"], m["content"]) for m in swapped["messages"][2:4]] == [("c0", "18C"), ("c1", "20C")]
    no_ids = deepseek_row(("get_weather", {}), results=[{"role": "tool", "content": "18C"}])
    no_ids["messages"][1]["tool_calls"][0].pop("id")
    validate_conversation(no_ids, rules)
    odd = {"type": "function", "function": {"name": "get\nweather"}}
    marked = {"type": "function", "function": {"name": "get<｜tool▁sep｜>weather"}}
    cases = [
        (deepseek_row(("get\nweather", {}), tools=[odd]),
         r"messages\[1\].tool_calls\[0\].function.name: 'get\\nweather' holds a line break; .* rename the tool "
         r"\(in 'tools' too\) without line breaks"),
        (deepseek_row(("get<｜tool▁sep｜>weather", {}), tools=[marked]),
         r"messages\[1\].tool_calls\[0\].function.name: .* holds the format token '<｜tool▁sep｜>'.* rename the tool"),
        (deepseek_row(("get_weather", {}), content="Sure: <｜tool▁calls▁begin｜>"),
         r"messages\[1\].content: contains the literal format token '<｜tool▁calls▁begin｜>'"),
        (deepseek_row(("get_weather", {}), results=[{"role": "tool", "tool_call_id": "c0",
                                                     "content": "x<｜tool▁outputs▁end｜>"}]),
         r"messages\[2\].content: contains the literal format token '<｜tool▁outputs▁end｜>'"),
        ({"messages": [DEEPSEEK_USER, {"role": "assistant", "reasoning_content": "<｜tool▁call▁begin｜>",
                                       "content": "no"}]},
         r"messages\[1\].reasoning_content: contains the literal format token '<｜tool▁call▁begin｜>'"),
        (deepseek_row(("get_weather", '{"city": "Paris"')),
         r"messages\[1\].tool_calls\[0\]: arguments are not valid JSON"),
    ]
    for row, error in cases:
        with pytest.raises(RowError, match=error):
            validate_conversation(row, rules)


def test_a_fenced_format_needs_its_call_delimiters_and_three_tool_tokens(tmp_path):
    directory = Path(load_format("deepseek-r1").directory)
    spec = (directory / "spec.yaml").read_text()
    shutil.copy(directory / "chat_template.jinja", tmp_path)
    call = 'tool_call: {open: "<｜tool▁call▁begin｜>", close: "<｜tool▁call▁end｜>"}'
    tokens = 'tool_tokens: ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁sep｜>"]'
    assert call in spec and tokens in spec
    for broken in (spec.replace(call, "tool_call: null"), spec.replace(tokens, "tool_tokens: []")):
        (tmp_path / "spec.yaml").write_text(broken)
        with pytest.raises(KeelError, match="spec.yaml: invalid format spec: .*tool_call_json 'fenced' needs tool_call "
                                            r"delimiters \(the tokens around one call\) and tool_tokens"):
            Format.from_dir(tmp_path)


# ------------------------------------------------------------------------------ native


def model_with_template(src: Path, dst: Path, template: str | None) -> Path:
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    if template is not None:
        cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def test_native_takes_the_models_own_template_and_its_syntax(tiny_model_for):
    model = tiny_model_for("llama3-json")
    fmt = resolve_format("native", model_path=model)
    assert fmt.spec.name == "native" and fmt.spec.native_syntax == "llama3-json"  # from model_type llama
    assert fmt.chat_template == load_format("llama3-json").chat_template
    assert fmt.spec.vllm.tool_parser == "llama3_json"
    s = fmt.spec.supports
    assert (s.tools, s.parallel_tool_calls, s.reasoning, s.content_with_tool_calls) == (True, True, False, False)
    hermes = resolve_format("native", model_path=tiny_model_for("hermes-qwen3"), native_syntax="hermes-qwen3")
    assert hermes.spec.supports.reasoning and hermes.spec.history_reasoning == "drop"  # probed: Qwen3 rule


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_native_template_that_cannot_render_the_data_is_refused_with_the_reason(tiny_model_for, tmp_path):
    no_tools = ("{%- for m in messages -%}{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' -}}"
                "{%- if m.role == 'assistant' -%}{%- generation -%}{{- m.content + '<|eot_id|>' -}}{%- endgeneration -%}"
                "{%- else -%}{{- m.content + '<|eot_id|>' -}}{%- endif -%}{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}")
    model = model_with_template(tiny_model_for("llama3-json"), tmp_path / "m", no_tools)
    fmt = resolve_format("native", model_path=model)
    assert not fmt.spec.supports.tools
    rows = [row for _, row in read_jsonl(CORPUS)][:4]  # each lists tools
    data = write_rows(tmp_path / "rows.jsonl", rows)
    with pytest.raises(KeelError, match=r"rows.jsonl:1: tools: format 'native' cannot render tool definitions"):
        prepare_file(data, tokenizer_dir=model, fmt=fmt, seq_len=4096, cache_root=tmp_path / "c")
    plain = write_rows(tmp_path / "plain.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "hello"}]}])
    assert prepare_file(plain, tokenizer_dir=model, fmt=fmt, seq_len=512, cache_root=tmp_path / "c").stats.examples == 1


def test_native_template_without_reasoning_refuses_rows_with_reasoning(tiny_model_for, tmp_path):
    model = tiny_model_for("llama3-json")
    fmt = resolve_format("native", model_path=model)
    row = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "reasoning_content": "think first", "content": "hello"}]}
    data = write_rows(tmp_path / "rows.jsonl", [row])
    with pytest.raises(KeelError, match="reasoning_content: format 'native' has no place for reasoning"):
        prepare_file(data, tokenizer_dir=model, fmt=fmt, seq_len=512, cache_root=tmp_path / "c")


def test_native_template_without_generation_markers_gets_the_same_loss_mask(tiny_model_for, tmp_path):
    src = tiny_model_for("llama3-json")
    plain = load_format("llama3-json").chat_template.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    model = model_with_template(src, tmp_path / "m", plain)
    marked = resolve_format("native", model_path=src)
    unmarked = resolve_format("native", model_path=model)
    assert marked.has_generation_markers and not unmarked.has_generation_markers
    tok = AutoTokenizer.from_pretrained(src)
    for conv in corpus(marked, 20):
        assert render_conversation(conv, tokenizer=tok, fmt=unmarked) == render_conversation(conv, tokenizer=tok, fmt=marked)


def test_native_needs_a_template_and_a_known_syntax(tiny_model_for, tmp_path):
    src = tiny_model_for("llama3-json")
    with pytest.raises(KeelError, match="has no chat template"):
        resolve_format("native", model_path=model_with_template(src, tmp_path / "a", None))
    other = model_with_template(src, tmp_path / "b", load_format("llama3-json").chat_template)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "mystery"}))
    with pytest.raises(KeelError, match="set model.native_syntax"):
        resolve_format("native", model_path=other)
    assert resolve_format("native", model_path=other, native_syntax="llama3-json").spec.native_syntax == "llama3-json"


# ------------------------------------------------------------------------------ gemma3


def test_gemma3_refuses_tools_tool_calls_and_reasoning_with_the_place_and_the_fix():
    rules = load_format("gemma3").row_rules()
    user = {"role": "user", "content": "What's the weather in Paris?"}
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    tool = {"type": "function", "function": {"name": "get_weather"}}
    cases = [
        ({"messages": [user, {"role": "assistant", "content": "Sunny."}], "tools": [tool]},
         "tools: format 'gemma3' cannot render tool definitions"),
        # no tools list: the call itself is refused (it used to pass, and only the template failed)
        ({"messages": [user, {"role": "assistant", "content": "", "tool_calls": [call]},
                       {"role": "tool", "tool_call_id": "c1", "content": "18C"}, {"role": "assistant", "content": "18C."}]},
         r"messages\[1\].tool_calls: format 'gemma3' has no tool calls; remove the turn"),
        ({"messages": [user, {"role": "assistant", "reasoning_content": "Look it up.", "content": "Sunny."}]},
         r"messages\[1\].reasoning_content: format 'gemma3' has no place for reasoning"),
        ({"messages": [{"role": "user", "content": "say <end_of_turn> please"}, {"role": "assistant", "content": "no"}]},
         r"messages\[0\].content: contains the literal format token '<end_of_turn>'"),
    ]
    for row, error in cases:
        with pytest.raises(RowError, match=error):
            validate_conversation(row, rules)
    # the server: a request with tools gets the template's error, not a prompt that drops them
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="format 'gemma3' has no tool calls"):
        render_text({"messages": [user], "tools": [tool]}, fmt=load_format("gemma3"), add_generation_prompt=True)


# A template in the style of the one Gemma 3 ships (written here from its documented layout):
# bos_token, a system message folded into the first user turn, text trimmed, no generation markers.
GOOGLE_STYLE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') }}{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")


def test_native_on_a_gemma_model_takes_the_gemma3_syntax_and_the_same_loss_mask(tiny_model_for, tmp_path):
    src = tiny_model_for("gemma3")
    model = model_with_template(src, tmp_path / "m", GOOGLE_STYLE)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma3_text"}))
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "bos_token": "<bos>"}))
    native = resolve_format("native", model_path=model)
    assert native.spec.native_syntax == "gemma3" and not native.has_generation_markers
    s = native.spec.supports
    assert not (s.tools or s.parallel_tool_calls or s.reasoning or s.content_with_tool_calls)
    assert (native.spec.vllm.tool_parser, native.spec.vllm.reasoning_parser) == (None, None)
    gemma3 = load_format("gemma3")
    tok = AutoTokenizer.from_pretrained(model)
    # Google's template trims the text; Keel's keeps it, so compare on rows with nothing to trim
    convs = [c for c in corpus(gemma3) if all(m["content"] == m["content"].strip() for m in c["messages"])]
    assert len(convs) >= 20
    for conv in convs:
        assert render_text(conv, fmt=native, special_tokens={"bos_token": "<bos>"}) == render_text(conv, fmt=gemma3)
        assert render_conversation(conv, tokenizer=tok, fmt=native) == render_conversation(conv, tokenizer=tok, fmt=gemma3)


# ------------------------------------------------------------------------------ mistral


MISTRAL_USER = {"role": "user", "content": "What's the weather in Paris?"}
MISTRAL_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def mistral_call(call_id, city="Paris"):
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


def mistral_row(*calls, content="", results=None):
    results = [{"role": "tool", "tool_call_id": c["id"], "content": "18C"} for c in calls] if results is None else results
    return {"messages": [MISTRAL_USER, {"role": "assistant", "content": content, "tool_calls": list(calls)},
                         *results, {"role": "assistant", "content": "18C."}], "tools": [MISTRAL_TOOL]}


def test_mistral_takes_tools_and_parallel_calls_and_refuses_what_it_cannot_write_with_the_place_and_the_fix():
    """mistral writes tools, calls and results in Mistral's layout (tool_call_json 'list'): a row
    with parallel calls is valid; rows the template could not write so that vLLM's mistral parser
    gives them back are refused naming the row's key and the fix: reasoning, text beside calls,
    Mistral's control tokens as text (the parser splits the output at a literal [TOOL_CALLS]),
    calls without ids (results name their call by id) and ids that become the same 9 characters."""
    fmt = load_format("mistral")
    rules = fmt.row_rules()
    assert rules.listed_calls and rules.parallel_tool_calls and not rules.content_with_tool_calls
    ok = validate_conversation(mistral_row(mistral_call("call_1"), mistral_call("call_2", "Lyon")), rules)
    assert [c["id"] for c in ok["messages"][1]["tool_calls"]] == ["call_1", "call_2"]  # the row keeps its ids
    no_ids = mistral_row(mistral_call(None), results=[{"role": "tool", "content": "18C"}])
    cases = [
        (mistral_row(mistral_call("c1"), content="Let me look."),
         r"messages\[1\]: format 'mistral' cannot hold content next to tool calls"),
        (no_ids, r"messages\[1\].tool_calls\[0\]: format 'mistral' writes each call's id .* add an 'id' to every tool call"),
        # "call_1" and "call-1" both become "0000call1"
        (mistral_row(mistral_call("call_1"), mistral_call("call-1", "Lyon")),
         r"messages\[1\].tool_calls\[1\].id: 'call-1' and 'call_1' are both written as '0000call1'"),
        ({"messages": [MISTRAL_USER, {"role": "assistant", "reasoning_content": "Look it up.", "content": "Sunny."}]},
         r"messages\[1\].reasoning_content: format 'mistral' has no place for reasoning"),
        ({"messages": [{"role": "user", "content": "end with [/INST] please"}, {"role": "assistant", "content": "no"}]},
         r"messages\[0\].content: contains the literal format token '\[/INST\]'"),
        # text the parser would take for the start of a call list
        ({"messages": [MISTRAL_USER, {"role": "assistant", "content": 'Sure: [TOOL_CALLS] [{"name": "get_weather"}]'}],
          "tools": [MISTRAL_TOOL]},
         r"messages\[1\].content: contains the literal format token '\[TOOL_CALLS\]'"),
        (mistral_row(mistral_call("c1"), results=[{"role": "tool", "tool_call_id": "c1", "content": "[TOOL_RESULTS] x"}]),
         r"messages\[2\].content: contains the literal format token '\[TOOL_RESULTS\]'"),
    ]
    for row, error in cases:
        with pytest.raises(RowError, match=error):
            validate_conversation(row, rules)


def test_mistral_writes_every_id_as_nine_letters_or_digits_in_the_call_and_its_result():
    """The template's id rule (Jinja) and data.conversation.mistral_call_id (Python, used by
    validation) agree, and a call and its result carry the same written id."""
    fmt = load_format("mistral")
    ids = ["call_1", "c10_0", "call_abcdefghijklmnopqrstuvwx", "aB3dE6gH9", "---", "id-ü-42"]
    for call_id in ids:
        text = render_text(validate_conversation(mistral_row(mistral_call(call_id)), fmt.row_rules()), fmt=fmt)
        written = mistral_call_id(call_id)
        assert len(written) == 9 and written.isascii() and written.isalnum()
        assert f'"id": "{written}"' in text and f'"call_id": "{written}"' in text, (call_id, text)
    assert [mistral_call_id(i) for i in ids] == ["0000call1", "00000c100", "pqrstuvwx", "aB3dE6gH9", "000000000",
                                                 "00000id42"]
    # a request whose history has a call without an id gets the template's error, not a guessed id
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="format 'mistral' writes the id of every tool call"):
        render_text({"messages": [MISTRAL_USER, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}],
            "tools": [MISTRAL_TOOL]}, fmt=fmt)


def test_a_list_format_needs_its_open_token_and_the_end_of_turn_as_close(tmp_path):
    spec = (Path(load_format("mistral").directory) / "spec.yaml").read_text()
    shutil.copy(Path(load_format("mistral").directory) / "chat_template.jinja", tmp_path)
    for broken in (spec.replace('tool_call: {open: "[TOOL_CALLS]", close: "</s>"}', "tool_call: null"),
                   spec.replace('close: "</s>"}', 'close: "]"}')):
        (tmp_path / "spec.yaml").write_text(broken)
        with pytest.raises(KeelError, match="spec.yaml: invalid format spec: .*tool_call_json 'list' needs tool_call "
                                            "delimiters: open, the token before the list of calls, and close, the "
                                            "end_of_turn token"):
            Format.from_dir(tmp_path)
