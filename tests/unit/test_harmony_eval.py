"""`keel eval` on a gpt-oss model reads output the way the server does (vLLM's HarmonyParser on
the token ids) and scores it with unchanged meaning: a turn written as harmony writes the
reference scores full marks, a wrong one does not. Imports vLLM (about 20 s), so slow."""

from __future__ import annotations

import json

import pytest

from data.formats import load_format
from serving.evaluate import Case, score_case

pytestmark = pytest.mark.slow

FMT = load_format("harmony")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL_REF = {"role": "assistant", "content": "", "reasoning_content": "Need the weather.", "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]}
ANSWER_REF = {"role": "assistant", "content": "Sunny, 21 °C.", "reasoning_content": "The tool said so."}


def written(*messages) -> list[int]:
    """Output ids as the model writes them after the prompt's `<|start|>assistant`."""
    from data.harmony_tokenizer import harmony_encoding

    ids = [t for m in messages for t in harmony_encoding().render(m)]
    return ids[2:]


def score(reference: dict, ids: list[int], finish="stop") -> dict:
    from data.harmony_tokenizer import harmony_encoding
    from serving import harmony

    case = Case(0, 1, [{"role": "user", "content": "Weather in Zürich?"}], TOOLS, reference)
    request = harmony.chat_request(case.messages, TOOLS)
    raw = harmony_encoding().decode(ids)
    reasoning, content, calls = harmony.parse_output(harmony.parser_class(FMT), None, request, raw, ids)
    return score_case(case, reasoning=reasoning, content=content,
                      calls=[(c.name, json.loads(c.arguments)) for c in calls or []], raw=raw, finish=finish, fmt=FMT)


def test_harmony_outputs_score_as_the_references_they_match():
    from openai_harmony import Message, Role

    analysis = Message.from_role_and_content(Role.ASSISTANT, "Need the weather.").with_channel("analysis")
    args = json.dumps({"city": "Zürich"}, ensure_ascii=False)
    native = (Message.from_role_and_content(Role.ASSISTANT, args).with_channel("commentary")
              .with_recipient("functions.get_weather").with_content_type("json"))  # `<|constrain|>json`
    out = score(CALL_REF, written(analysis, native))
    assert out["reasoning"] == "Need the weather." and out["content"] is None
    assert {k: out[k] for k in ("valid_calls", "begun_calls", "call_decision", "tool_name_match", "arguments_match",
                                "reasoning_format", "finished")} == {
        "valid_calls": 1, "begun_calls": 1, "call_decision": True, "tool_name_match": True, "arguments_match": True,
        "reasoning_format": True, "finished": True}
    wrong = (Message.from_role_and_content(Role.ASSISTANT, json.dumps({"city": "Bern"})).with_channel("commentary")
             .with_recipient("functions.get_weather").with_content_type("json"))
    out = score(CALL_REF, written(analysis, wrong))
    assert out["tool_name_match"] and not out["arguments_match"]

    final = Message.from_role_and_content(Role.ASSISTANT, "Sunny, 21 °C.").with_channel("final")
    said = Message.from_role_and_content(Role.ASSISTANT, "The tool said so.").with_channel("analysis")
    out = score(ANSWER_REF, written(said, final))
    assert (out["reasoning"], out["content"], out["answer_exact_match"], out["call_decision"],
            out["reasoning_format"]) == ("The tool said so.", "Sunny, 21 °C.", True, True, True)
    # an answer with no reasoning first, cut at max_tokens
    out = score(ANSWER_REF, written(final)[:-1], finish="length")
    assert out["reasoning_format"] is False and out["finished"] is False
