"""Converters from the dataset shapes people have into Keel's canonical rows.

`data.shape` in a recipe picks one; `auto` (the default) looks at the first row's keys:

    messages           {"messages": [...], "tools": [...]}           OpenAI chat messages
    sharegpt           {"conversations": [{"from", "value"}], "system"?, "tools"?}
    alpaca             {"instruction", "input"?, "output", "system"?, "history"?}
    prompt_completion  {"prompt", "completion"}   TRL; strings or lists of messages
    preference         {"prompt"?, "chosen", "rejected"}   TRL; strings or lists of messages
    text               {"text"}                   documents for continued pretraining

Canonical rows are of three kinds: conversations ({"messages", "tools"}), preference pairs
({"prompt", "chosen", "rejected", "tools"}) and documents ({"text"}). Columns that hold JSON
as text (CSV cells, Parquet string columns) are parsed here.
"""

from __future__ import annotations

import json
from typing import Any

from data.conversation import RowError
from data.errors import KeelError

SHAPES = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "preference", "text")
KINDS = {"messages": "conversation", "sharegpt": "conversation", "alpaca": "conversation",
         "prompt_completion": "conversation", "preference": "preference", "text": "document"}
# The keys that mark a shape, in the order `auto` reports them.
SHAPE_KEYS = (("messages", ("messages",)), ("sharegpt", ("conversations",)), ("preference", ("chosen", "rejected")),
              ("prompt_completion", ("prompt", "completion")), ("alpaca", ("instruction", "output")),
              ("text", ("text",)))
# ShareGPT speaker names as the common datasets and LLaMA-Factory write them.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "function_call": "function_call", "observation": "tool",
                  "tool": "tool"}


def detect_shape(row: Any, where: str) -> str:
    """The shape of a dataset from its first row's keys (data.shape: auto)."""
    if not isinstance(row, dict):
        raise KeelError(f"{where}: the first row is not an object, so data.shape: auto cannot tell its shape")
    matches = [shape for shape, keys in SHAPE_KEYS if all(k in row for k in keys)]
    if len(matches) == 1:
        return matches[0]
    expected = "; ".join(f"{shape}: {' + '.join(keys)}" for shape, keys in SHAPE_KEYS)
    if not matches:
        raise KeelError(f"{where}: cannot tell the data's shape from the first row's keys "
                        f"({', '.join(map(str, row)) or 'none'}). Expected keys: {expected}. "
                        "Rename the columns or set data.shape")
    raise KeelError(f"{where}: the first row's keys fit several shapes ({', '.join(matches)}); "
                    f"set data.shape to the one you mean")


def _json_text(value: Any, key: str) -> Any:
    """A value that may arrive as JSON text (CSV, Parquet string columns) as its Python value."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError(f"{key}: a string that is not valid JSON ({exc.msg} at char {exc.pos})") from None
    return value


def _message_list(value: Any, key: str) -> list:
    value = _json_text(value, key)
    if not isinstance(value, list) or not value:
        raise RowError(f"'{key}' must be a non-empty list of messages, got {type(value).__name__}")
    return value


def _text_or_messages(value: Any, key: str, role: str) -> list[dict]:
    """TRL's prompt / completion / chosen / rejected: a string (one `role` message) or messages."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value) if value.lstrip().startswith("[") else None
        except json.JSONDecodeError:
            parsed = None  # text that happens to start with '[' is text
        if isinstance(parsed, list) and parsed and all(isinstance(m, dict) and "role" in m for m in parsed):
            return parsed
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value:
        return value
    raise RowError(f"'{key}' must be a string or a non-empty list of messages, got {type(value).__name__}")


def _with_tools(row: dict, out: dict) -> dict:
    if row.get("tools") is not None:
        out["tools"] = row["tools"]  # normalize_tools parses JSON text
    return out


def _sharegpt_calls(value: Any, where: str, turn: int) -> list[dict]:
    value = _json_text(value, f"{where}.value")
    calls = value if isinstance(value, list) else [value]
    out = []
    for k, call in enumerate(calls):
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise RowError(f"{where}.value: a function_call must be JSON {{'name': ..., 'arguments': {{...}}}}")
        args = call.get("arguments", call.get("parameters"))
        out.append({"id": f"call_{turn}_{k}", "type": "function",
                    "function": {"name": call["name"], "arguments": args}})
    return out


def from_sharegpt(row: dict) -> dict:
    turns = _message_list(row.get("conversations"), "conversations")
    messages: list[dict] = []
    if row.get("system"):
        messages.append({"role": "system", "content": row["system"]})
    pending: list[str] = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError(f"{where}: a ShareGPT turn needs 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise RowError(f"{where}.from: {turn['from']!r} is not a ShareGPT speaker ({', '.join(SHAREGPT_ROLES)})")
        if role == "function_call":
            calls = _sharegpt_calls(turn["value"], where, i)
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" not in messages[-1]:
                messages[-1]["tool_calls"] = calls  # "gpt" text, then its call: one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            pending = [c["id"] for c in calls]
        elif role == "tool":
            ids = {"tool_call_id": pending.pop(0)} if pending else {}
            messages.append({"role": "tool", "content": turn["value"], **ids})
        else:
            messages.append({"role": role, "content": turn["value"]})
    return _with_tools(row, {"messages": messages})


def from_alpaca(row: dict) -> dict:
    instruction, extra, output = row.get("instruction"), row.get("input"), row.get("output")
    if not isinstance(instruction, str) or not instruction:
        raise RowError("'instruction' must be a non-empty string")
    if not isinstance(output, str):
        raise RowError("'output' must be a string")
    if extra is not None and not isinstance(extra, str):
        raise RowError("'input' must be a string")
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    history = _json_text(row.get("history"), "history") or []
    for k, pair in enumerate(history if isinstance(history, list) else [None]):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise RowError(f"history[{k}]: must be a [question, answer] pair")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return _with_tools(row, {"messages": messages})


def from_prompt_completion(row: dict) -> dict:
    prompt = _text_or_messages(row.get("prompt"), "prompt", "user")
    completion = _text_or_messages(row.get("completion"), "completion", "assistant")
    return _with_tools(row, {"messages": prompt + completion})


def from_preference(row: dict) -> dict:
    chosen = _text_or_messages(row.get("chosen"), "chosen", "assistant")
    rejected = _text_or_messages(row.get("rejected"), "rejected", "assistant")
    if row.get("prompt") is not None:
        prompt = _text_or_messages(row["prompt"], "prompt", "user")
    else:  # TRL's implicit prompt: two whole conversations that share their start
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    return _with_tools(row, {"prompt": prompt, "chosen": chosen, "rejected": rejected})


def from_messages(row: dict) -> dict:
    return _with_tools(row, {"messages": _message_list(row.get("messages"), "messages")})


def from_text(row: dict) -> dict:
    return {"text": row.get("text")}


CONVERTERS = {"messages": from_messages, "sharegpt": from_sharegpt, "alpaca": from_alpaca,
              "prompt_completion": from_prompt_completion, "preference": from_preference, "text": from_text}


def to_canonical(shape: str, row: Any) -> dict:
    """One row of `shape` as a canonical row. Raises RowError."""
    if not isinstance(row, dict):
        raise RowError(f"a row must be an object, got {type(row).__name__}")
    return CONVERTERS[shape](row)
