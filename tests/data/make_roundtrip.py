"""Writes tests/data/roundtrip.jsonl: conversations chosen to break a format's round trip.

    python tests/data/make_roundtrip.py

Each conversation is built from the hard cases below, in a fixed order, so the file is the
same every time: unicode text and unicode escapes in the JSON, empty reasoning, `{}`
arguments, parallel calls, nested JSON arguments, the format's own markup (`</tool_call>`,
`<think>`, `<|im_end|>`, `<|eot_id|>`) inside JSON string arguments, multi-turn conversations
with tool results, and text with braces that is not a call. tests/unit/test_roundtrip.py
renders every one with every format and parses it back with vLLM's parsers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "roundtrip.jsonl"

TOOLS = [
    {"type": "function", "function": {
        "name": "search", "description": "Search notes. Écrit en français aussi: « recherche ».",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "limit": {"type": "integer"},
            "filters": {"type": "object", "properties": {
                "tags": {"type": "array", "items": {"type": "string"}},
                "range": {"type": "object", "properties": {"from": {"type": "string"}, "to": {"type": "string"}}}}}},
            "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "now", "description": "The current time. Takes no arguments.",
        "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "write_file", "description": "Write text to a file.",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string"}, "text": {"type": "string"}, "overwrite": {"type": "boolean"},
            "mode": {"type": ["integer", "null"]}},
            "required": ["path", "text"]}}},
]

# Values for string arguments: each one has broken some parser or template somewhere.
TRICKY_STRINGS = [
    "plain words",
    "naïve café – 東京 – Привет – مرحبا – 🙂🚀",
    "a </tool_call> inside an argument",
    "<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>",
    "thinking <think>aloud</think> in a value",
    "end of turn <|im_end|> and <|eot_id|> as text",
    "quotes \" and backslashes \\ and a tab\tand a newline\nin one",
    "braces { } [ ] and a colon: inside",
    "",
    "   leading and trailing spaces   ",
    "\\u00e9 written as an escape, not a character",
    "emoji with joiners 👩‍💻 and flags 🇫🇷",
]
# Message text must not hold the format's markup (validation refuses it); only these.
PLAIN = [s for s in TRICKY_STRINGS if "<" not in s]
CONTENTS = [
    "Done.",
    "Voilà : c'est fait ✅",
    "Use {} for an empty object and [] for a list.",
    "Line one\nLine two\n\nLine four",
    "日本語の回答です。",
    "The answer is 42, not {\"name\": 42}.",
    "Trailing spaces stay   ",
    "Tabs\tstay\ttoo",
]
REASONINGS = [
    "I should search first.",
    "",  # empty reasoning: rendered as <think></think>
    "Reasoning with unicode: ∑ x² ≤ ∞, naïve.",
    "Two steps:\n1. look\n2. answer",
    "Quotes \"inside\" reasoning and a brace {",
]


def call(cid: str, name: str, args: dict, as_text: bool) -> dict:
    # Half the rows carry arguments as JSON text (OpenAI's shape), half as objects.
    arguments = json.dumps(args, ensure_ascii=(cid.endswith("1"))) if as_text else args
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


def arguments_for(k: int) -> tuple[str, dict]:
    s = TRICKY_STRINGS[k % len(TRICKY_STRINGS)]
    shapes = [
        ("search", {"query": s}),
        ("now", {}),
        ("search", {"query": s, "limit": 3, "filters": {"tags": [s, "b"], "range": {"from": "2024-01-01", "to": s}}}),
        ("write_file", {"path": f"/tmp/ü{k}.txt", "text": s, "overwrite": k % 2 == 0, "mode": None}),
        ("write_file", {"path": "notes.md", "text": s, "mode": 420}),
    ]
    return shapes[k % len(shapes)]


def assistant(k: int, calls: list[dict] | None = None, content: str | None = None) -> dict:
    msg = {"role": "assistant", "content": content if content is not None else ("" if calls else CONTENTS[k % len(CONTENTS)])}
    if k % 3 != 2:  # a third of the turns carry no reasoning key at all
        msg["reasoning_content"] = REASONINGS[k % len(REASONINGS)]
    if calls:
        msg["tool_calls"] = calls
    return msg


def conversation(k: int) -> dict:
    messages = [{"role": "system", "content": "You help with notes. Réponds brièvement."}] if k % 2 else []
    messages.append({"role": "user", "content": f"Request {k}: {PLAIN[k % len(PLAIN)]} ?"})
    n_calls = [0, 1, 2, 3][k % 4]
    if n_calls:
        calls = []
        for j in range(n_calls):
            name, args = arguments_for(k + j)
            calls.append(call(f"c{k}_{j}", name, args, as_text=(k + j) % 2 == 0))
        content = "Let me look that up." if k % 5 == 0 else None  # text next to calls
        messages.append(assistant(k, calls, content))
        for j, c in reversed(list(enumerate(calls))) if k % 7 == 0 else enumerate(calls):  # results out of order
            messages.append({"role": "tool", "tool_call_id": c["id"],
                             "content": json.dumps({"ok": True, "echo": PLAIN[(k + j) % len(PLAIN)]}, ensure_ascii=False)})
        messages.append(assistant(k + 1))
    else:
        messages.append(assistant(k))
    if k % 3 == 0:  # a second user turn: history before it
        messages.append({"role": "user", "content": "And one more thing — merci!"})
        name, args = arguments_for(k + 5)
        if k % 2 == 0:
            messages.append(assistant(k + 2, [call(f"d{k}", name, args, as_text=True)]))
            messages.append({"role": "tool", "tool_call_id": f"d{k}", "content": "{}"})
        messages.append(assistant(k + 4))
    return {"messages": messages, "tools": TOOLS}


def expressible(row: dict, supports) -> dict:
    """The row as a format with these `supports` can hold it: reasoning and text next to calls
    removed where the format has no place for them (validation refuses such rows; that refusal
    is tested in tests/unit/test_conversation.py)."""
    row = copy.deepcopy(row)
    if not supports.tools:  # a format without tools (gemma3): only the conversation's text turns
        row["messages"] = [m for m in row["messages"] if m["role"] != "tool" and not m.get("tool_calls")]
        row.pop("tools", None)
    for m in row["messages"]:
        if m["role"] == "assistant":
            if not supports.reasoning:
                m.pop("reasoning_content", None)
            if m.get("tool_calls") and not supports.content_with_tool_calls:
                m["content"] = ""
    return row


def main(n: int = 60) -> None:
    rows = [conversation(k) for k in range(n)]
    with open(OUT, "w", encoding="utf-8") as f:
        for k, row in enumerate(rows):
            # some lines keep non-ASCII as \\uXXXX escapes in the file, some as UTF-8
            f.write(json.dumps(row, ensure_ascii=k % 4 == 1) + "\n")
    print(f"wrote {len(rows)} conversations to {OUT}")


if __name__ == "__main__":
    main()
