"""How `keel eval` scores one generated turn against its reference (no engine needed)."""

from __future__ import annotations

import math

from data.formats import load_format
from data.synthetic import TOOLS
from serving.evaluate import Case, score_case, summarize

FMT = load_format("hermes-qwen3")
CALL_REF = {"role": "assistant", "reasoning_content": "r", "content": "",
            "tool_calls": [{"id": "1", "type": "function", "function": {"name": "get_weather",
                                                                        "arguments": {"city": "Paris"}}}]}
ANSWER_REF = {"role": "assistant", "reasoning_content": "r", "content": "It is 18°C in Paris."}


def score(reference, *, raw, content=None, calls=(), finish="stop"):
    case = Case(0, 1, [{"role": "user", "content": "q"}], TOOLS, reference)
    case.result = score_case(case, reasoning="r", content=content, calls=list(calls), raw=raw, finish=finish, fmt=FMT)
    return case


def test_the_right_call():
    r = score(CALL_REF, raw='<think>r</think><tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
              '</tool_call>', calls=[("get_weather", {"city": "Paris"})]).result
    assert r["valid_calls"] == r["begun_calls"] == 1
    assert r["call_decision"] and r["tool_name_match"] and r["arguments_match"] and r["reasoning_format"]


def test_right_tool_wrong_arguments():
    r = score(CALL_REF, raw="<think>r</think><tool_call>...</tool_call>", calls=[("get_weather", {"city": "Rome"})]).result
    assert r["tool_name_match"] and not r["arguments_match"] and r["valid_calls"] == 1


def test_a_call_that_breaks_the_schema_or_is_cut_is_not_valid():
    r = score(CALL_REF, raw="<think>r</think><tool_call>x</tool_call><tool_call>{\"na", finish="length",
              calls=[("get_weather", {"town": "Paris"})]).result
    assert r["valid_calls"] == 0 and r["begun_calls"] == 2 and not r["finished"]


def test_answers_and_reasoning_format():
    good = score(ANSWER_REF, raw="<think>r</think>It is 18°C in Paris.", content="It is 18°C in Paris.")
    no_think = score(ANSWER_REF, raw="It is 18°C in Paris.", content="It is 18°C in Paris.")
    called = score(ANSWER_REF, raw="<think>r</think><tool_call>{}</tool_call>", calls=[("get_weather", {})])
    assert good.result["answer_exact_match"] and good.result["reasoning_format"]
    assert not no_think.result["reasoning_format"]
    assert not called.result["call_decision"] and not called.result["answer_exact_match"]
    summary = summarize([good, no_think, called])
    assert summary["answer_exact_match"] == (2 / 3, 3) and summary["reasoning_format"] == (2 / 3, 3)
    assert summary["tool_call_validity"] == (0.0, 1) and math.isnan(summary["tool_name_match"][0])


def test_reasoning_format_when_the_generation_prompt_opens_the_reasoning():
    """DeepSeek-R1's generation prompt ends in <think>: a well-formed output starts inside the
    reasoning, and one that opens it again has two opening tags."""
    fmt = load_format("deepseek-r1")

    def fmt_ok(raw: str, content: str) -> bool:
        case = Case(0, 1, [{"role": "user", "content": "q"}], None, ANSWER_REF)
        return score_case(case, reasoning="r", content=content, calls=[], raw=raw, finish="stop", fmt=fmt)["reasoning_format"]

    assert fmt_ok("r\n</think>\n\nIt is 18°C in Paris.", "It is 18°C in Paris.")
    assert not fmt_ok("<think>r</think>It is 18°C in Paris.", "It is 18°C in Paris.")
    assert not fmt_ok("It is 18°C in Paris.", "It is 18°C in Paris.")
    # hermes-qwen3's prompt does not open it: the output must
    assert not score(ANSWER_REF, raw="r</think>It is 18°C in Paris.", content="It is 18°C in Paris.").result["reasoning_format"]
