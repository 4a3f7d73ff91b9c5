"""A model's output read back as the server reads it: reasoning, content and tool calls.

The tagged-JSON tool-call syntax (hermes-qwen3) is parsed here once, by the functions Keel's
vLLM tool parser uses (serving/parsers.py imports them from this module), so a GRPO reward for
"a well-formed tool call" means exactly "a parsed `tool_calls` entry in the API". Reasoning is
split at the format's think delimiters, as vLLM's think-style reasoning parsers do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from data.formats import Format


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as OpenAI's API carries it


def parse_call(raw: str) -> ParsedCall | None:
    """The call inside one pair of delimiters, or None when it is not a valid call."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and obj["name"]
            and isinstance(obj.get("arguments"), dict)):
        return None
    return ParsedCall(obj["name"], json.dumps(obj["arguments"], ensure_ascii=False))


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def first_tag(text: str, tags: tuple[str, ...], pos: int) -> tuple[int, str]:
    """(index, tag) of the earliest of `tags` in `text` from `pos`; (-1, "") when none is there."""
    found = [(i, tag) for tag in tags if (i := text.find(tag, pos)) >= 0]
    return min(found) if found else (-1, "")


def split_output(text: str, open_tag: str, close_tag: str,
                 dropped: tuple[str, ...] = ()) -> tuple[str, list[str], list[str]]:
    """(text outside any call, complete calls' raw JSON, a cut call's raw JSON if the text ends
    inside one). Markup never reaches the first element: a stray closing tag is dropped too, and so
    is each tag in `dropped` outside a call (a format's think tags, written after the reasoning
    ended: vLLM's qwen3 parser drops a repeated `</think>` from a whole answer, not from a stream)."""
    content, calls, cut = [], [], []
    pos, strays = 0, (close_tag, *dropped)
    while True:
        start = text.find(open_tag, pos)
        stray, tag = first_tag(text, strays, pos)
        if 0 <= stray and (start < 0 or stray < start):
            content.append(text[pos:stray])
            pos = stray + len(tag)
            continue
        if start < 0:
            content.append(text[pos:])
            break
        content.append(text[pos:start])
        end = text.find(close_tag, start + len(open_tag))
        if end < 0:
            cut.append(text[start + len(open_tag):])
            break
        calls.append(text[start + len(open_tag):end])
        pos = end + len(close_tag)
    return "".join(content), calls, cut


@dataclass(frozen=True)
class ReadOutput:
    """One completion as the API would return it, plus what the parsers dropped."""

    reasoning: str | None
    content: str | None
    calls: list[ParsedCall] = field(default_factory=list)
    invalid_calls: int = 0  # calls inside the delimiters whose JSON is not a call (dropped by the server)
    cut_call: bool = False  # the text ended inside a call
    # formats with think delimiters: a think block opened once (by the output, or by the generation
    # prompt as DeepSeek-R1's does, not both) and closed once; True for formats without them
    reasoning_well_formed: bool = True


def parseable_tool_calls(fmt: Format) -> bool:
    """Whether Keel reads this format's tool calls itself (tagged JSON between delimiters)."""
    spec = fmt.spec
    return bool(spec.supports.tools and spec.tool_call is not None and spec.tool_call_json == "tagged")


def read_output(text: str, fmt: Format) -> ReadOutput:
    """`text`: the completion decoded with special tokens kept, the end-of-turn token removed."""
    spec = fmt.spec
    reasoning, well_formed = None, True
    if spec.think is not None:
        from data.render import generation_prompt_opens_reasoning

        open_tag, close_tag = spec.think.open, spec.think.close
        stripped = text.lstrip()
        opened_here = stripped.startswith(open_tag)
        well_formed = False
        if opened_here or close_tag in text:
            # the opening tag may live in the generation prompt (then the output starts inside it)
            body = stripped[len(open_tag):] if opened_here else text
            end = body.find(close_tag)
            if end < 0:
                reasoning, text = body, ""
            else:
                reasoning, text = body[:end], body[end + len(close_tag):]
                well_formed = (opened_here != generation_prompt_opens_reasoning(fmt)
                               and open_tag not in body and close_tag not in text)
            reasoning = reasoning.strip() or None
    calls, invalid, cut = [], 0, False
    if parseable_tool_calls(fmt):
        text, raws, cuts = split_output(text, spec.tool_call.open, spec.tool_call.close, dropped=spec.think_tags)
        for raw in raws:
            call = parse_call(raw.strip())
            if call is None:
                invalid += 1
            else:
                calls.append(call)
        cut = bool(cuts)
    content = text.strip() or None
    return ReadOutput(reasoning=reasoning, content=content, calls=calls, invalid_calls=invalid, cut_call=cut,
                      reasoning_well_formed=well_formed)
