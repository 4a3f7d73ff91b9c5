"""GRPO rewards by closed name, each scoring one completion read back as the server reads it.

A completion arrives as token ids (never re-tokenized text); it is decoded with special tokens
kept, cut at the format's first stop token, and read by data/completion.py, the parsing Keel's
vLLM tool parser runs. So "a well-formed tool call" here is a parsed `tool_calls` entry in the
API, and "nothing leaking into content" is what a client would see in `message.content`.

    tool_call       1 when the calls equal the reference's (names, and arguments compared as JSON
                    values, in order); `tool_name_credit` when only the names match; for a
                    reference without calls, 1 when the completion makes none. Needs a reference.
    schema_valid    the share of the completion's calls (dropped malformed ones included) whose
                    name is an offered tool and whose arguments validate against its JSON schema;
                    0 without calls.
    format          1 when the completion ends its turn (a stop token, not max tokens), reasoning
                    sits once in the think delimiters (formats with reasoning), no call is
                    malformed or cut, and no markup leaks into content; else 0.
    answer_match    1 when the final content equals the reference's content (exact, or normalized:
                    case, whitespace and trailing punctuation ignored); 0 otherwise. Needs a
                    reference with content.
    length          minus the completion's share of max_completion_tokens (a penalty: weight it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from data.completion import ReadOutput, parseable_tool_calls, read_output
from data.formats import Format

REWARDS = ("tool_call", "schema_valid", "format", "answer_match", "length")
NEEDS_REFERENCE = ("tool_call", "answer_match")
NEEDS_TOOL_CALLS = ("tool_call", "schema_valid")


@dataclass(frozen=True)
class Scored:
    """One completion's reading and what the rewards need besides the reference."""

    output: ReadOutput
    ended: bool  # a stop token ended it (not max_completion_tokens)
    tokens: int


def read_completion(completion_ids: list[int], *, tokenizer, fmt: Format) -> Scored:
    """The completion's ids up to the first stop token, decoded with special tokens kept (the
    delimiters must reach the parser, as `skip_special_tokens=False` does in serving)."""
    stop_ids = {i for i in (tokenizer.convert_tokens_to_ids(t) for t in fmt.spec.stop_tokens) if i is not None}
    ids, ended = list(completion_ids), False
    for k, token in enumerate(ids):
        if token in stop_ids:
            ids, ended = ids[:k], True
            break
    pad = tokenizer.pad_token_id
    while ids and pad is not None and ids[-1] == pad and pad not in stop_ids:
        ids.pop()
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return Scored(read_output(text, fmt), ended=ended, tokens=len(completion_ids))


def json_value(text: str):
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return text


def tool_call_reward(scored: Scored, reference: dict, *, name_credit: float) -> float:
    want = reference.get("tool_calls") or []
    got = scored.output.calls
    if not want:
        return 1.0 if not got and not scored.output.invalid_calls else 0.0
    if [c.name for c in got] != [c["name"] for c in want]:
        return 0.0
    if all(json_value(g.arguments) == json_value(w["arguments"]) for g, w in zip(got, want)) \
            and not scored.output.invalid_calls:
        return 1.0
    return name_credit


def schema_valid_reward(scored: Scored, tools: list[dict]) -> float:
    from data.conversation import RowError, check_arguments

    schemas = {t["function"]["name"]: t["function"].get("parameters") for t in tools if "function" in t}
    total = len(scored.output.calls) + scored.output.invalid_calls
    if not total:
        return 0.0
    valid = 0
    for call in scored.output.calls:
        if call.name not in schemas:
            continue
        try:
            check_arguments(json.loads(call.arguments), schemas[call.name], "arguments")
        except RowError:
            continue
        valid += 1
    return valid / total


def format_reward(scored: Scored, fmt: Format) -> float:
    out = scored.output
    if not scored.ended or out.invalid_calls or out.cut_call:
        return 0.0
    if fmt.spec.supports.reasoning and fmt.spec.think is not None:
        if out.reasoning is None or not out.reasoning_well_formed:
            return 0.0
    leaked = [m for m in (*fmt.markup_strings(), *fmt.spec.control_tokens) if out.content and m in out.content]
    return 0.0 if leaked else 1.0


_SPACE = re.compile(r"\s+")


def normalize_answer(text: str | None) -> str:
    return _SPACE.sub(" ", (text or "").strip().casefold()).rstrip(".!?;:, ")


def answer_match_reward(scored: Scored, reference: dict, *, normalized: bool) -> float:
    want, got = reference.get("content"), scored.output.content
    if want is None:
        return 0.0
    if normalized:
        return float(normalize_answer(got) == normalize_answer(want))
    return float((got or "") == want)


def length_reward(scored: Scored, max_completion_tokens: int) -> float:
    return -min(1.0, scored.tokens / max_completion_tokens)


def score(name: str, scored: Scored, *, reference: dict | None, tools: list[dict], fmt: Format,
          name_credit: float = 0.0, normalized: bool = True, max_completion_tokens: int = 1) -> float:
    """One reward of one completion; `reference` None for a prompt without one (validation
    refuses that for the rewards in NEEDS_REFERENCE)."""
    if name == "tool_call":
        return tool_call_reward(scored, reference or {}, name_credit=name_credit)
    if name == "schema_valid":
        return schema_valid_reward(scored, tools)
    if name == "format":
        return format_reward(scored, fmt)
    if name == "answer_match":
        return answer_match_reward(scored, reference or {}, normalized=normalized)
    if name == "length":
        return length_reward(scored, max_completion_tokens)
    raise KeyError(name)


def reward_problem(name: str, fmt: Format) -> str | None:
    """Why a reward cannot be used with a format, or None."""
    if name in NEEDS_TOOL_CALLS and not parseable_tool_calls(fmt):
        return (f"grpo.rewards.{name}: format {fmt.name!r} has no tool calls Keel parses for rewards (tool rewards "
                "read tagged JSON calls, as hermes-qwen3 writes them); set grpo.rewards."
                f"{name}: 0, or use a format with tool calls such as hermes-qwen3")
    return None
