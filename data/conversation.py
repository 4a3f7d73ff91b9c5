"""The canonical conversation row, and its validation.

A row is OpenAI chat messages plus the tools the assistant may call:

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", ...}], "tools": [...]}

Assistant messages carry `content`, `reasoning_content` and `tool_calls`
(`[{"id", "type": "function", "function": {"name", "arguments"}}]`); tool messages carry
`content` and the `tool_call_id` they answer. `validate_conversation` checks one row and returns
it normalised (tool arguments as dicts, tools in the OpenAI `{"type": "function", ...}` shape),
or raises `RowError` with the reason; the caller adds the file and row number.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from data.errors import KeelError

ROLES = ("system", "user", "assistant", "tool")


class RowError(KeelError, ValueError):
    """One row is invalid; the message says why and where inside the row (the caller adds the
    file and row). A KeelError like every mistake a user can fix; a ValueError for callers
    written before it was one."""


@dataclass(frozen=True)
class RowRules:
    """What a format can express; rows that need more are invalid (Format.row_rules builds it)."""

    markup: tuple[str, ...] = ()  # must not appear literally in message text
    format_name: str = ""
    reasoning: bool = True
    tools: bool = True
    parallel_tool_calls: bool = True
    content_with_tool_calls: bool = True
    bare_json_calls: bool = False  # calls are bare JSON objects: text must not look like one
    listed_calls: bool = False  # calls are one JSON list after a token (Mistral): each needs an id
    fenced_calls: bool = False  # the name outside the JSON, on a line of its own (DeepSeek)


_ALPHANUMERIC = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def mistral_call_id(call_id: str) -> str:
    """The 9-character id the mistral template writes for a call id: its ASCII letters and
    digits, the last 9, padded on the left with 0 ("call_1" -> "0000call1"). The template does
    the same in Jinja (data/formats/mistral/chat_template.jinja, macro call_id); a test holds
    the two together."""
    kept = "".join(ch for ch in call_id if ch in _ALPHANUMERIC)
    return ("0" * 9 + kept)[-9:]


def _rules(rules: RowRules | list[str] | tuple[str, ...]) -> RowRules:
    return rules if isinstance(rules, RowRules) else RowRules(markup=tuple(rules))


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def _text(value: Any, where: str) -> str | None:
    """Message content as text: a string, null, or OpenAI text parts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RowError(f"{where}[{i}]: only text parts ({{'type': 'text', 'text': ...}}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise RowError(f"{where}: must be a string, null or a list of text parts, got {type(value).__name__}")


def normalize_tools(tools: Any, where: str = "tools") -> list[dict]:
    """Tools as `[{"type": "function", "function": {"name", "description"?, "parameters"?}}]`."""
    if tools is None:
        return []
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise RowError(f"{where}: a string but not valid JSON ({exc.msg})") from None
    if not isinstance(tools, list):
        raise RowError(f"{where}: must be a list of tool definitions, got {type(tools).__name__}")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        here = f"{where}[{i}]"
        if not isinstance(tool, dict):
            raise RowError(f"{here}: must be an object")
        fn = tool.get("function", tool) if tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict):
            raise RowError(f"{here}: only tools of type 'function' are supported")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise RowError(f"{here}: missing function name")
        if name in seen:
            raise RowError(f"{here}: tool {name!r} is declared twice")
        seen.add(name)
        clean: dict[str, Any] = {"name": name}
        if fn.get("description") is not None:
            if not isinstance(fn["description"], str):
                raise RowError(f"{here}: description of {name!r} must be a string")
            clean["description"] = fn["description"]
        params = fn.get("parameters")
        if params is not None:
            if isinstance(params, str):
                try:
                    params = json.loads(params, parse_constant=_no_constants)
                except json.JSONDecodeError as exc:
                    raise RowError(f"{here}: parameters of {name!r} are not valid JSON ({exc.msg})") from None
                except ValueError as exc:
                    raise RowError(f"{here}: parameters of {name!r} are not valid JSON ({exc})") from None
            if not isinstance(params, dict):
                raise RowError(f"{here}: parameters of {name!r} must be a JSON schema object")
            problem = _schema_problem(strict_json(params, f"{here}: parameters of {name!r}"))
            if problem:
                raise RowError(f"{here}: parameters of {name!r} are not a valid JSON schema: {problem}")
            clean["parameters"] = params
        out.append({"type": "function", "function": clean})
    return out


def _arguments(value: Any, where: str) -> dict:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value, parse_constant=_no_constants)
        except json.JSONDecodeError as exc:
            raise RowError(f"{where}: arguments are not valid JSON ({exc.msg} at char {exc.pos})") from None
        except ValueError as exc:  # NaN / Infinity: Python's json reads them, JSON parsers do not
            raise RowError(f"{where}: arguments are not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise RowError(f"{where}: arguments must be a JSON object, got {type(value).__name__}")
    strict_json(value, f"{where}: arguments")
    return value


def strict_json(value: Any, what: str) -> str:
    """`value` as JSON every parser reads (sorted keys), whichever form it came in: an object read
    from Parquet or a Python list can hold NaN or Infinity, which Python's json writes and no JSON
    parser (nor vLLM's tool parsers) reads back."""
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except ValueError:
        raise RowError(f"{what} hold NaN or Infinity, which is not JSON; write a number, a string or null") from None
    except (TypeError, RecursionError) as exc:
        raise RowError(f"{what} hold a value JSON cannot carry ({type(exc).__name__}: {exc})") from None


@functools.lru_cache(maxsize=4096)
def _schema_problem(schema_json: str) -> str | None:
    """Why a tool's parameters are not a valid JSON schema, or None. Memoized by the schema's
    JSON: datasets repeat the same tools on every row, and checking a schema against the
    metaschema cost two thirds of preparation time before."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(json.loads(schema_json))
    except SchemaError as exc:
        return exc.message
    except (OverflowError, RecursionError) as exc:  # the regex format check: `a{99999999999}`; deep nesting
        return f"{type(exc).__name__}: {exc}"
    return None


def _no_retrieval(uri: str):
    """A tool schema's `$ref` is followed only inside the schema: never to a file or a URL, so a
    data row cannot make Keel read a local file or call a server."""
    from referencing.exceptions import NoSuchResource

    raise NoSuchResource(ref=uri)


@functools.lru_cache(maxsize=4096)
def _validator(schema_json: str):
    from jsonschema import Draft202012Validator
    from referencing import Registry

    return Draft202012Validator(json.loads(schema_json), registry=Registry(retrieve=_no_retrieval))


def check_arguments(args: dict, schema: dict | None, where: str) -> None:
    """Raise RowError when `args` do not validate against the tool's parameters schema (compiled
    once per schema; no $ref outside it followed). Rows, GRPO's schema_valid and keel eval use it."""
    import re

    from referencing.exceptions import Unresolvable

    if not schema:
        return
    try:
        errors = list(_validator(json.dumps(schema, sort_keys=True)).iter_errors(args))
    except Unresolvable as exc:
        raise RowError(f"{where}: the tool's parameters schema has a $ref that does not resolve inside the schema "
                       f"({exc}); Keel follows no $ref to files or URLs: inline the definitions under $defs") from None
    except (re.error, OverflowError) as exc:  # a "pattern" Python's re cannot compile
        raise RowError(f"{where}: the tool's parameters schema has a pattern Python cannot use ({exc})") from None
    error = next(iter(sorted(errors, key=str)), None)
    if error is not None:
        at = "/".join(map(str, error.absolute_path)) or "(top)"
        raise RowError(f"{where}: arguments do not match the tool's parameters schema at {at}: {error.message}")


def _check_no_markup(text: str | None, markup: list[str], where: str) -> None:
    if not text:
        return
    for token in markup:
        if token in text:
            raise RowError(
                f"{where}: contains the literal format token {token!r}; put reasoning in "
                "'reasoning_content' and calls in 'tool_calls' instead of writing the markup"
            )


def _check_not_call_like(text: str, format_name: str, where: str) -> None:
    """With bare JSON calls, vLLM's parser reads text that starts with `{` (streaming) or holds a
    JSON object with a name and arguments (non-streaming) as a tool call."""
    if text.lstrip().startswith("{"):
        raise RowError(f"{where}: starts with '{{', which format {format_name!r} reads as a tool call; "
                       "begin the text with something else")
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch != "{":
            continue
        try:
            obj, _ = decoder.raw_decode(text, i)
        except ValueError:
            continue
        if isinstance(obj, dict) and "name" in obj and ("arguments" in obj or "parameters" in obj):
            raise RowError(f"{where}: holds a JSON object with 'name' and 'arguments', which format "
                           f"{format_name!r} reads as a tool call; put calls in 'tool_calls'")


def validate_conversation(row: Any, rules: RowRules | list[str], dataset_tools: list[dict] | None = None) -> dict:
    """Check one conversation row and return it normalised. Raises RowError.

    `rules` is what the format can express (a plain list is just the markup to refuse).
    """
    rules = _rules(rules)
    markup = list(rules.markup)
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RowError("'messages' must be a non-empty list")
    tools = normalize_tools(row.get("tools")) if row.get("tools") is not None else list(dataset_tools or [])
    if tools and not rules.tools:
        raise RowError(f"tools: format {rules.format_name!r} cannot render tool definitions; remove them or "
                       "pick a format with tool calls")
    schemas = {t["function"]["name"]: t["function"].get("parameters") for t in tools}

    out: list[dict] = []
    pending: list[dict] = []  # tool calls of the last assistant turn not yet answered
    turn_calls: list[dict] = []  # all tool calls of the last assistant turn
    call_order: dict[int, int] = {}  # index in `out` of a tool result -> position of the call it answers
    prev = None
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RowError(f"{where}: must be an object")
        role = msg.get("role")
        if role not in ROLES:
            raise RowError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        content = _text(msg.get("content"), f"{where}.content")
        _check_no_markup(content, markup, f"{where}.content")
        if pending and role != "tool":
            ids = ", ".join(c["id"] or c["function"]["name"] for c in pending)
            raise RowError(f"{where}: the tool calls of the previous assistant turn ({ids}) have no tool result")

        if role == "system":
            if i != 0:
                raise RowError(f"{where}: a system message is only allowed first")
            out.append({"role": "system", "content": content or ""})
        elif role == "user":
            if prev == "user":
                raise RowError(f"{where}: two user messages in a row; merge them into one")
            if content is None:
                raise RowError(f"{where}: a user message needs content")
            out.append({"role": "user", "content": content})
        elif role == "assistant":
            if prev not in ("user", "tool"):
                raise RowError(f"{where}: an assistant message must follow a user or tool message, not {prev or 'nothing'}")
            out.append(_assistant(msg, content, rules, schemas, where))
            turn_calls = out[-1].get("tool_calls", [])
            pending = list(turn_calls)
        else:  # tool
            if prev not in ("assistant", "tool") or (prev == "assistant" and not pending):
                raise RowError(f"{where}: a tool result must follow an assistant message with tool_calls")
            answered = _answer(pending, msg, where)
            if rules.fenced_calls:
                call_order[len(out)] = next(k for k, c in enumerate(turn_calls) if c is answered)
            pending = [c for c in pending if c is not answered]
            out.append({"role": "tool", "content": content or "", **_tool_ids(msg)})
        prev = role

    if prev != "assistant":
        raise RowError(f"the conversation ends with a {prev} message; the last message must be the assistant's")
    if call_order:
        out = _results_in_call_order(out, call_order)
    return {"messages": out, "tools": tools}


def _assistant(msg: dict, content: str | None, rules: RowRules, schemas: dict, where: str) -> dict:
    reasoning = msg.get("reasoning_content", msg.get("reasoning"))
    if reasoning is not None and not isinstance(reasoning, str):
        raise RowError(f"{where}.reasoning_content: must be a string")
    _check_no_markup(reasoning, list(rules.markup), f"{where}.reasoning_content")
    if reasoning and not rules.reasoning:
        raise RowError(f"{where}.reasoning_content: format {rules.format_name!r} has no place for reasoning; "
                       "remove it from the data or pick a format with reasoning (e.g. hermes-qwen3)")
    if content and rules.bare_json_calls:
        _check_not_call_like(content, rules.format_name, f"{where}.content")
    calls_in = msg.get("tool_calls") or []
    if not isinstance(calls_in, list):
        raise RowError(f"{where}.tool_calls: must be a list")
    if calls_in and not rules.tools:  # a row without a tools list reaches here too
        raise RowError(f"{where}.tool_calls: format {rules.format_name!r} has no tool calls; remove the turn "
                       "(and its tool results) from the data or pick a format with tool calls")
    calls = []
    for j, call in enumerate(calls_in):
        here = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict):
            raise RowError(f"{here}: must be an object")
        fn = call.get("function", call)
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise RowError(f"{here}: missing function name")
        if schemas and name not in schemas:
            raise RowError(f"{here}: calls {name!r}, which is not among the row's tools ({', '.join(schemas)})")
        if rules.fenced_calls:
            _check_fenced_name(name, rules, here)
        args = _arguments(fn.get("arguments"), here)
        check_arguments(args, schemas.get(name), here)
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise RowError(f"{here}.id: must be a string")
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
    if calls and rules.listed_calls:
        _check_listed_ids(calls, rules.format_name, where)
    if not content and not reasoning and not calls:
        raise RowError(f"{where}: empty assistant turn (no content, no reasoning_content and no tool_calls)")
    if len(calls) > 1 and not rules.parallel_tool_calls:
        raise RowError(f"{where}.tool_calls: format {rules.format_name!r} takes one tool call per turn, got {len(calls)}")
    if calls and content and not rules.content_with_tool_calls:
        raise RowError(f"{where}: format {rules.format_name!r} cannot hold content next to tool calls (its vLLM "
                       "parser returns only the calls); move the text to a turn of its own or drop it")
    out: dict[str, Any] = {"role": "assistant", "content": content or ""}
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    if calls:
        out["tool_calls"] = calls
    return out


def _check_fenced_name(name: str, rules: RowRules, where: str) -> None:
    """DeepSeek's calls write the name as plain text between a separator token and the line that
    opens the arguments' ```json fence; vLLM's deepseek_v3 parser reads it as everything up to
    the end of that line, so a name with a line break (or markup the tokenizer turns into a
    control token) would come back cut or run into the arguments."""
    for ch in ("\n", "\r"):
        if ch in name:
            raise RowError(f"{where}.function.name: {name!r} holds a line break; format {rules.format_name!r} "
                           "writes the name on the line before the arguments and its parser reads the name up to "
                           "the first line break; rename the tool (in 'tools' too) without line breaks")
    for token in rules.markup:
        if token in name:
            raise RowError(f"{where}.function.name: {name!r} holds the format token {token!r}, which the "
                           "tokenizer reads as that token; rename the tool (in 'tools' too) without it")


def _check_listed_ids(calls: list[dict], format_name: str, where: str) -> None:
    """Mistral's results name the call they answer by a 9-character id the template derives from
    the row's id, so each call needs one, and the calls of one turn need different ones."""
    written: dict[str, str] = {}
    for j, call in enumerate(calls):
        here = f"{where}.tool_calls[{j}]"
        if call["id"] is None:
            raise RowError(f"{here}: format {format_name!r} writes each call's id (its tool results name the call "
                           "they answer by it); add an 'id' to every tool call and the same 'tool_call_id' to "
                           "its tool result")
        short = mistral_call_id(call["id"])
        if short in written:
            raise RowError(f"{here}.id: {call['id']!r} and {written[short]!r} are both written as {short!r} (format "
                           f"{format_name!r} keeps the last 9 letters and digits of an id), so their results "
                           "could not be told apart; give the calls of one turn ids that differ in their last "
                           "9 letters or digits")
        written[short] = call["id"]


def _results_in_call_order(out: list[dict], call_order: dict[int, int]) -> list[dict]:
    """Each run of tool results, put in the order of the calls they answer. A format that writes
    no call ids (fenced: DeepSeek) pairs results with calls only by their order; the row's ids
    (or names) say which result answers which call, so the results are written in that order."""
    out = list(out)
    i = 0
    while i < len(out):
        j = i
        while j < len(out) and out[j]["role"] == "tool":
            j += 1
        if j > i:
            out[i:j] = [out[k] for k in sorted(range(i, j), key=call_order.__getitem__)]
        i = j + 1
    return out


def _tool_ids(msg: dict) -> dict:
    ids = {}
    if msg.get("tool_call_id") is not None:
        ids["tool_call_id"] = msg["tool_call_id"]
    if msg.get("name") is not None:
        ids["name"] = msg["name"]
    return ids


def _answer(pending: list[dict], msg: dict, where: str) -> dict:
    """The pending call a tool result answers: by id, else by name, else the first."""
    if not pending:
        raise RowError(f"{where}: more tool results than tool calls in the previous assistant turn")
    call_id, name = msg.get("tool_call_id"), msg.get("name")
    if call_id is not None:
        for call in pending:
            if call["id"] == call_id:
                return call
        ids = ", ".join(str(c["id"]) for c in pending)
        raise RowError(f"{where}: tool_call_id {call_id!r} matches no pending tool call (pending: {ids})")
    if any(c["id"] is not None for c in pending):
        raise RowError(f"{where}: tool result without tool_call_id, but the calls have ids; add tool_call_id")
    if name is not None:
        for call in pending:
            if call["function"]["name"] == name:
                return call
        raise RowError(f"{where}: tool result for {name!r} matches no pending tool call")
    return pending[0]


def call_of(call: dict) -> dict:
    """A validated tool call as {"name", "arguments" (JSON text)}: how GRPO's references and
    recorded results hold calls."""
    args = call["function"]["arguments"]
    return {"name": call["function"]["name"],
            "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}


def recorded_tool_results(messages: list[dict]) -> list[dict]:
    """The tool calls of validated messages paired with the results that answer them, in the
    order they occur: [{"name", "arguments" (JSON text), "result"}]. The pairing is the one
    validation checked (by tool_call_id, else by name, else by order)."""
    recorded, pending = [], []
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            pending = list(msg.get("tool_calls") or [])
        elif msg["role"] == "tool":
            call = _answer(pending, msg, f"messages[{i}]")
            pending = [c for c in pending if c is not call]
            recorded.append({**call_of(call), "result": msg["content"]})
    return recorded


def _one_answer(value: Any, side: str) -> dict:
    """A preference side: one assistant message (or a list holding exactly one)."""
    if isinstance(value, list):
        if len(value) != 1:
            raise RowError(f"{side}: must be one assistant message, got a list of {len(value)}")
        value = value[0]
    if not isinstance(value, dict) or value.get("role", "assistant") != "assistant":
        raise RowError(f"{side}: must be an assistant message ({{'role': 'assistant', ...}})")
    return {**value, "role": "assistant"}


def validate_preference(row: Any, rules: RowRules | list[str]) -> dict:
    """A preference pair: prompt messages plus a chosen and a rejected assistant turn.

    Each of prompt + chosen and prompt + rejected must be a valid conversation by the same
    rules as SFT rows (so reasoning and tool calls in either answer are checked too).
    Returns {"prompt": [...], "chosen": {...}, "rejected": {...}, "tools": [...]}, normalised.
    """
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        raise RowError("'prompt' must be a non-empty list of messages")
    last_role = prompt[-1].get("role") if isinstance(prompt[-1], dict) else None
    if last_role not in ("user", "tool"):
        raise RowError(f"prompt: must end with a user or tool message, not {last_role!r}")
    out = {}
    for side in ("chosen", "rejected"):
        answer = _one_answer(row.get(side), side)
        try:
            conv = validate_conversation({"messages": [*prompt, answer], "tools": row.get("tools")}, rules)
        except RowError as exc:
            raise RowError(f"prompt + {side}: {exc}") from None
        out[side] = conv["messages"][-1]
        out["prompt"], out["tools"] = conv["messages"][:-1], conv["tools"]
    if out["chosen"] == out["rejected"]:
        raise RowError("chosen and rejected are the same answer; a preference pair needs two different ones")
    return {"prompt": out["prompt"], "chosen": out["chosen"], "rejected": out["rejected"], "tools": out["tools"]}


def validate_document(row: Any, control_tokens: tuple[str, ...] | list[str]) -> str:
    """A document for continued pretraining: non-empty text without the tokenizer's control tokens."""
    text = row.get("text") if isinstance(row, dict) else None
    if not isinstance(text, str):
        raise RowError("a document needs 'text' as a string")
    if not text.strip():
        raise RowError("'text' is empty")
    for token in control_tokens:
        if token in text:
            raise RowError(f"text: contains the literal control token {token!r}, which the tokenizer reads as "
                           "that token (an end of text in the middle of a document); remove or rewrite it")
    return text
