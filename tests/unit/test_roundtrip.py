"""Render -> prepared cache -> vLLM's parsers -> the same message, for every format.

The corpus (tests/data/roundtrip.jsonl, written by tests/data/make_roundtrip.py) is prepared
through the real path (prepare_file -> Arrow cache -> load). Each trained span of the cache is
one assistant turn as the model is taught to write it; it is detokenized by vLLM's own
incremental detokenizer (as the engine does, special tokens skipped, the stop token dropped)
and parsed by the parser class vLLM's server composes from the format spec's parser names
(ParserManager.get_parser, which looks the names up in ReasoningParserManager and
ToolParserManager), once whole (non-streaming) and once fed token by token (streaming).
The reasoning, content, tool names and arguments that come back must be the row's.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from data.conversation import validate_conversation
from data.formats import available_formats, resolve_format
from data.prepare import prepare_file, read_jsonl
from conftest import trained_spans
from data.render import split_examples
from tests.data.make_roundtrip import OUT as CORPUS
from tests.data.make_roundtrip import expressible

# (case id, format, tiny model built for, native_syntax)
CASES = [
    ("hermes-qwen3", "hermes-qwen3", "hermes-qwen3", None),
    ("llama3-json", "llama3-json", "llama3-json", None),
    # a model whose own template is Llama 3.1 style, syntax picked from its model type
    ("native-llama3", "native", "llama3-json", None),
    # a model whose own template writes Hermes calls and <think> reasoning
    ("native-hermes", "native", "hermes-qwen3", "hermes-qwen3"),
    # DeepSeek-R1 distills: the prompt opens <think>, vLLM's deepseek_r1 parser, then its deepseek_v3
    # tool parser (calls in ```json fences between <｜tool▁calls▁begin｜> and <｜tool▁calls▁end｜>)
    ("deepseek-r1", "deepseek-r1", "deepseek-r1", None),
    # no parser at all: the detokenized turn is the message content
    ("gemma3", "gemma3", "gemma3", None),
    # Mistral [INST] turns, [TOOL_CALLS] and a JSON list of calls, vLLM's mistral parser
    ("mistral", "mistral", "mistral", None),
]


def expressible_rows(supports) -> list[dict]:
    """The corpus as a format with these `supports` holds it. For a format without tools the
    tool definitions, the turns that call tools and the tool results are left out; the answers
    around them stay, so multi-turn history, empty and missing reasoning and unicode remain."""
    rows = [expressible(row, supports) for _, row in read_jsonl(CORPUS)]
    if supports.tools:
        return rows
    out = []
    for row in map(copy.deepcopy, rows):
        row.pop("tools", None)
        row["messages"] = [m for m in row["messages"] if m["role"] != "tool" and not m.get("tool_calls")]
        out.append(row)
    return out


def expected_turn(msg: dict) -> dict:
    return {"reasoning": msg.get("reasoning_content") or "", "content": msg["content"] or "",
            "calls": [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls", [])]}


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request, tiny_model_for, tmp_path_factory):
    _, fmt_name, model_fmt, syntax = request.param
    model = tiny_model_for(model_fmt)
    fmt = resolve_format(fmt_name, model_path=model, native_syntax=syntax)
    rows = expressible_rows(fmt.spec.supports)
    tmp = tmp_path_factory.mktemp(request.param[0])
    data = tmp / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    prepared = prepare_file(data, tokenizer_dir=model, fmt=fmt, seq_len=8192, cache_root=tmp / "cache")
    assert prepared.stats.rows == len(rows) >= 50 and prepared.stats.rejected == 0
    turns = []  # (prompt ids, turn ids, expected message), in cache order
    dataset = prepared.load()
    examples = iter(zip(dataset["input_ids"], dataset["labels"]))
    for row in rows:
        conv = validate_conversation(row, fmt.row_rules())
        for _end, trained in split_examples(conv["messages"], fmt, conv["tools"]):
            ids, labels = next(examples)
            spans = trained_spans(labels)
            assert len(spans) == len(trained)
            turns += [(ids[:s], ids[s:e], expected_turn(conv["messages"][i]), conv["tools"])
                      for (s, e), i in zip(spans, trained)]
    assert next(examples, None) is None
    return SimpleNamespace(fmt=fmt, model=model, turns=turns)


class Server:
    """The pieces of vLLM's OpenAI server that turn generated tokens into a message."""

    def __init__(self, model: Path, spec):
        from vllm.parser import ParserManager
        from vllm.reasoning import ReasoningParserManager
        from vllm.tokenizers import get_tokenizer
        from vllm.tool_parsers import ToolParserManager

        from serving.server import PARSER_PLUGIN

        # Keel's own parsers, loaded as `keel serve` loads them (--tool-parser-plugin MODULE)
        ToolParserManager.import_tool_parser(PARSER_PLUGIN)
        self.tokenizer = get_tokenizer(str(model))
        self.parser_cls = ParserManager.get_parser(
            tool_parser_name=spec.vllm.tool_parser, reasoning_parser_name=spec.vllm.reasoning_parser,
            enable_auto_tools=True, tokenizer=self.tokenizer)
        # the names resolve through vLLM's own registries, as --tool-call-parser/--reasoning-parser do
        if spec.vllm.tool_parser:
            assert self.parser_cls.tool_parser_cls is ToolParserManager.get_tool_parser(spec.vllm.tool_parser)
        if spec.vllm.reasoning_parser:
            assert self.parser_cls.reasoning_parser_cls is ReasoningParserManager.get_reasoning_parser(
                spec.vllm.reasoning_parser)
        self.stop_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in spec.stop_tokens}

    def request(self, tools):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return ChatCompletionRequest(model="keel", messages=[{"role": "user", "content": "x"}],
                                     tools=tools or None, tool_choice="auto" if tools else None)

    def adjusted(self, parser, tools):
        """The request as the server hands it to the engine: the parser adjusts it first when a
        tool may be called (vLLM's mistral parser keeps special tokens in the output text then,
        so its [TOOL_CALLS] token is not skipped)."""
        request = self.request(tools)
        return parser.adjust_request(request) if tools else request

    def deltas(self, prompt_ids: list[int], ids: list[int], skip_special_tokens: bool = True):
        """(text, token) as the engine's detokenizer emits them, one generated token at a time."""
        from vllm.sampling_params import SamplingParams
        from vllm.v1.engine.detokenizer import IncrementalDetokenizer

        req = SimpleNamespace(sampling_params=SamplingParams(skip_special_tokens=skip_special_tokens),
                              prompt_token_ids=list(prompt_ids), request_id="rt")
        detok = IncrementalDetokenizer.from_new_request(self.tokenizer, req)
        for k, tok in enumerate(ids):
            last = k == len(ids) - 1
            detok.update([tok], stop_terminated=last and tok in self.stop_ids)
            yield detok.get_next_output_text(finished=last, delta=True), tok

    def parse(self, prompt_ids, ids, tools) -> dict:
        if self.parser_cls is None:  # no parser named: vLLM's server returns the text as content
            return {"reasoning": "", "content": "".join(t for t, _ in self.deltas(prompt_ids, ids)), "calls": []}
        parser = self.parser_cls(self.tokenizer, self.request(tools).tools, chat_template_kwargs={})
        request = self.adjusted(parser, tools)
        text = "".join(t for t, _ in self.deltas(prompt_ids, ids, request.skip_special_tokens))
        parser.set_prompt_token_ids(prompt_ids)
        reasoning, content, calls = parser.parse(text, request, enable_auto_tools=True,
                                                 model_output_token_ids=ids)
        return {"reasoning": reasoning or "", "content": content or "",
                "calls": [(c.name, json.loads(c.arguments)) for c in calls or []]}

    def parse_streaming(self, prompt_ids, ids, tools) -> dict:
        if self.parser_cls is None:  # each delta's text is the delta's content
            return {"reasoning": "", "content": "".join(t for t, _ in self.deltas(prompt_ids, ids)), "calls": []}
        parser = self.parser_cls(self.tokenizer, self.request(tools).tools, chat_template_kwargs={})
        request = self.adjusted(parser, tools)
        reasoning, content, calls = "", "", {}
        deltas = list(self.deltas(prompt_ids, ids, request.skip_special_tokens))
        for k, (text, tok) in enumerate(deltas):
            delta = parser.parse_delta(delta_text=text, delta_token_ids=[tok], request=request,
                                       prompt_token_ids=list(prompt_ids), finished=k == len(deltas) - 1)
            if delta is None:
                continue
            reasoning += delta.reasoning or ""
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                if tc.function is not None:
                    call["name"] += tc.function.name or ""
                    call["arguments"] += tc.function.arguments or ""
        return {"reasoning": reasoning, "content": content,
                "calls": [(c["name"], json.loads(c["arguments"] or "{}")) for _, c in sorted(calls.items())]}


def test_every_shipped_format_is_covered():
    # harmony (gpt-oss) round-trips in tests/unit/test_harmony_format.py: vLLM's HarmonyParser reads
    # the output ids (no detokenizer, no tiny model), and its prompt is vLLM's harmony render, not a
    # template, so the template-based path here does not apply
    assert {c[1] for c in CASES} | {"harmony"} >= set(available_formats())


def test_the_corpus_holds_the_hard_cases():
    rows = [row for _, row in read_jsonl(CORPUS)]
    text = CORPUS.read_text(encoding="utf-8")
    calls = [c for r in rows for m in r["messages"] for c in m.get("tool_calls", [])]
    assert len(rows) >= 50
    assert "\\u" in text and "東京" in text  # unicode both escaped and literal in the file
    assert any(m.get("reasoning_content") == "" for r in rows for m in r["messages"])
    assert any(c["function"]["arguments"] in ({}, "{}") for c in calls)
    assert any(len(m.get("tool_calls", [])) > 1 for r in rows for m in r["messages"])
    assert any("</tool_call>" in json.dumps(c["function"]["arguments"], ensure_ascii=False) for c in calls)
    assert any("<think>" in json.dumps(c["function"]["arguments"], ensure_ascii=False) for c in calls)
    assert any(sum(m["role"] == "user" for m in r["messages"]) > 1 and any(m["role"] == "tool" for m in r["messages"])
               for r in rows)


def _mismatches(case, parse) -> list[str]:
    server = Server(case.model, case.fmt.spec)
    bad = []
    for prompt_ids, ids, want, tools in case.turns:
        want = {**want, "calls": [(n, json.loads(a) if isinstance(a, str) else a) for n, a in want["calls"]]}
        got = parse(server, prompt_ids, ids, tools)
        if got != want:
            bad.append(f"want {want}\n     got  {got}")
    return bad


def test_nonstreaming_parse_gives_back_every_trained_turn(case):
    bad = _mismatches(case, Server.parse)
    assert not bad, f"{len(bad)} of {len(case.turns)} turns differ:\n" + "\n".join(bad[:5])


def test_streaming_parse_token_by_token_gives_back_every_trained_turn(case):
    bad = _mismatches(case, Server.parse_streaming)
    assert not bad, f"{len(bad)} of {len(case.turns)} turns differ:\n" + "\n".join(bad[:5])
