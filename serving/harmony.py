"""gpt-oss (formats with renderer harmony) as vLLM's chat server handles it, for `keel eval`.

vLLM serves model type gpt_oss without a chat template: a chat request becomes harmony
messages (the system message with the pinned start date and the reasoning effort, a developer
message with the client's system text and the tools, then the turns), rendered to token ids by
the harmony encoding; the output ids are parsed by harmony's own parser (vLLM's HarmonyParser).
`keel eval` must score what the server returns, so it builds prompts and parses outputs here
with those same vLLM functions, called in the order vLLM's chat renderer calls them
(vllm/renderers/online_renderer.py `_make_request_with_harmony` in 0.32), never with a copy.

The start date comes from $VLLM_SYSTEM_START_DATE, which `keel serve` and `keel eval` both set
from the format's harmony.start_date (serving/server.py plan_served).
"""

from __future__ import annotations

import json

# Unset, vLLM writes today's date into the system message: a prompt built without it is refused.
START_DATE_ENV = "VLLM_SYSTEM_START_DATE"


def client_messages(messages: list[dict]) -> list[dict]:
    """Keel's conversation rows as an OpenAI client sends them: reasoning under `reasoning`,
    call arguments as JSON text."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant":
            if "reasoning_content" in m:
                reasoning = m.pop("reasoning_content")
                if reasoning is not None and m.get("reasoning") is None:
                    m["reasoning"] = reasoning
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": (
                    c["function"]["arguments"] if isinstance(c["function"]["arguments"], str)
                    else json.dumps(c["function"]["arguments"], ensure_ascii=False))}} for c in m["tool_calls"]]
        out.append(m)
    return out


def chat_request(messages: list[dict], tools: list[dict] | None, *, reasoning_effort: str | None = None):
    """The ChatCompletionRequest vLLM's server would build from this conversation (tool_choice auto)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest(model="keel", messages=client_messages(messages), tools=tools or None,
                                 tool_choice="auto" if tools else None, reasoning_effort=reasoning_effort)


def prompt_ids(messages: list[dict], tools: list[dict] | None, *, reasoning_effort: str | None) -> list[int]:
    """The prompt token ids vLLM's chat server renders for these messages and tools (ending in
    `<|start|>assistant`, where the model writes)."""
    import os

    from data.errors import KeelError

    if not os.environ.get(START_DATE_ENV):
        raise KeelError(f"${START_DATE_ENV} is not set: vLLM would write today's date into the harmony prompt; "
                        "set it to the format's harmony.start_date (keel eval and keel serve do)")
    from vllm.entrypoints.openai.parser.harmony_utils import (build_harmony_preamble,
                                                              extract_instructions_from_messages,
                                                              parse_chat_inputs_to_harmony_messages,
                                                              render_for_completion)
    from vllm.tokenizers.mistral import maybe_serialize_tool_calls

    request = chat_request(messages, tools, reasoning_effort=reasoning_effort)
    maybe_serialize_tool_calls(request)  # as the server does: tool_calls out of pydantic's lazy iterator
    instructions, rest = extract_instructions_from_messages(list(request.messages))
    include_tools = request.tools is not None  # tool_choice is auto (never none) whenever tools are given
    preamble = build_harmony_preamble(instructions=instructions, tools=request.tools if include_tools else None,
                                      reasoning_effort=request.reasoning_effort, with_custom_tools=include_tools)
    return list(render_for_completion(preamble + parse_chat_inputs_to_harmony_messages(rest)))


def parser_class(fmt):
    """vLLM's HarmonyParser, composed as the server composes it from the format's parser names."""
    from vllm.parser import ParserManager

    return ParserManager.get_parser(tool_parser_name=fmt.spec.vllm.tool_parser or "openai",
                                    reasoning_parser_name=fmt.spec.vllm.reasoning_parser or "openai_gptoss",
                                    enable_auto_tools=True, is_harmony=True)


def parse_output(parser_cls, tokenizer, request, text: str, token_ids) -> tuple[str | None, str | None, list]:
    """(reasoning, content, calls) of one output, read from its token ids as the server reads them."""
    parser = parser_cls(tokenizer, request.tools)
    return parser.parse(text, request, enable_auto_tools=True, model_output_token_ids=list(token_ids))


# Harmony's header and end tokens; none may be left in parsed text.
MARKUP = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>")
ANALYSIS_OPEN = "<|channel|>analysis<|message|>"


def reasoning_format(raw: str, content: str | None) -> bool:
    """Harmony's reasoning shape: the output opens with one analysis message, closed by <|end|>,
    and no harmony markup is left in the content."""
    text = raw.lstrip()
    return (text.startswith(ANALYSIS_OPEN) and text.count(ANALYSIS_OPEN) == 1
            and "<|end|>" in text[len(ANALYSIS_OPEN):]
            and not any(m in (content or "") for m in MARKUP))


def begun_calls(raw: str) -> int:
    """Calls the model began: messages addressed to a function (either header shape)."""
    return raw.count("to=functions.")
