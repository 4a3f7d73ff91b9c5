"""Training examples for the harmony format (gpt-oss), rendered as vLLM serves them.

vLLM serves model type gpt_oss without a chat template: for a chat-completions request it
builds OpenAI harmony messages and renders them to token ids with the harmony encoding
(vllm/renderers/online_renderer.py `_make_request_with_harmony`, helpers in
vllm/entrypoints/openai/parser/harmony_utils.py), then parses the generated ids with harmony's
parser. This module is Keel's own copy of that message building, so that data preparation
does not need vLLM installed; tests/unit/test_harmony_format.py holds it to vLLM's functions
token for token. What vLLM does, and so what this does:

  system     harmony's default system message (model identity, knowledge cutoff) with the
             format's pinned conversation start date (the server pins it with
             VLLM_SYSTEM_START_DATE) and reasoning effort
  developer  the row's system text as `# Instructions` and its tools as a TypeScript
             namespace `functions`; written only when there is either
  user       a user message
  assistant  with a tool call: commentary(content) if any, then analysis(reasoning) if any,
             then the call: a commentary message to `functions.NAME`, content type json;
             otherwise: analysis(reasoning) if any, then final(content) if any
  tool       a message from `functions.NAME` (the name of the call it answers) on the
             commentary channel, to the assistant
  then       every analysis message before the last final answer is dropped, the
             conversation is rendered for completion by the assistant (ending
             `<|start|>assistant`), and each call in the history gets the legacy header
             `<|start|>assistant to=functions.NAME<|channel|>commentary json<|message|>`.

What the model is trained to write after that prompt (the ids vLLM's HarmonyParser turns back
into the row's reasoning_content, content and tool call): the turn's reasoning on the analysis
channel, then either the final answer ending `<|return|>`, or the content as a commentary
preamble and the call ending `<|call|>`; the messages of one turn are joined by
`<|start|>assistant` headers, which are trained too.

Two choices, and why:
- The call is trained with the legacy header (`assistant to=functions.NAME<|channel|>commentary
  json`), the layout vLLM writes for every call in a prompt's history, not harmony's newer
  `<|channel|>commentary to=functions.NAME <|constrain|>json`. The model then writes its calls
  the way it will read them back in every later prompt (vLLM rewrites the newer layout in history
  because gpt-oss echoes it as a malformed header with the recipient twice); HarmonyParser and the
  structural tags of tool_choice required/named accept both; and in a tool loop the prompt of the
  turn after a call extends the trained text, so the whole loop is one example.
- A turn with reasoning, content and a call is trained in the order gpt-oss writes it (analysis,
  then the preamble, then the call), not in the order vLLM puts it back in the history
  (preamble before analysis): the parser gives the same reasoning and content either way, and
  the history order is what the next turn's prompt holds anyway. Such a turn's later turns are
  then not a continuation of its example, so they start a new one (below).

Examples: turns are trained in one example as long as the prompt vLLM builds for each turn
begins with the example so far (the prompt's new tokens, a tool result, are not trained);
otherwise the turn starts a new example from its own prompt. That joins a tool loop and splits
at each user message after a final answer (vLLM then drops the earlier reasoning and the
answer's `<|return|>` reads `<|end|>` in the history).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from data.conversation import RowError
from data.errors import KeelError
# the library (imported lazily: a KeelError names the fix when it is missing), the encoding and
# its special tokens' names, loaded once per process
from data.harmony_tokenizer import harmony_encoding as encoding
from data.harmony_tokenizer import harmony_lib as _lib
from data.harmony_tokenizer import special_token_names

SPECIAL_TEXT = re.compile(r"<\|[^<>|\s]{1,40}\|>")


def library_version() -> str:
    """The installed openai_harmony distribution and version (prepared data's cache key holds it)."""
    import importlib.metadata as metadata

    _lib()
    dists = metadata.packages_distributions().get("openai_harmony") or ["openai_harmony"]
    try:
        return f"{dists[0]} {metadata.version(dists[0])}"
    except metadata.PackageNotFoundError:
        return f"{dists[0]} unknown"


@lru_cache(maxsize=1)
def _ids() -> dict[str, int]:
    enc = encoding()
    names = ("<|start|>", "<|channel|>", "<|constrain|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>")
    return {name: enc.encode(name, allowed_special="all")[0] for name in names}


@lru_cache(maxsize=1)
def special_names() -> frozenset[str]:
    """Every special token of o200k_harmony, as text (<|start|>, ..., <|reserved_200017|>, ...)."""
    return frozenset(special_token_names())


# ---------------------------------------------------------------------------------------------
# Validation: what harmony cannot carry.

def _no_special(text, where: str) -> None:
    if not text:
        return
    names = special_names()
    for match in SPECIAL_TEXT.finditer(text):
        if match.group(0) in names:
            raise RowError(f"{where}: contains {match.group(0)!r}, the text of a harmony control token (gpt-oss's "
                           "tokenizer has it as a special token, so a model trained on it could end a message "
                           "there); remove or rewrite it")


def check_tool_name(name: str, where: str) -> None:
    """vLLM writes a call as `to=functions.NAME` in the header and the parser reads the name back
    up to the next space or control token."""
    if not name or any(ch.isspace() for ch in name) or "<|" in name or "|>" in name:
        raise RowError(f"{where}: tool name {name!r} cannot be written in harmony's `to=functions.NAME` header "
                       "(vLLM's parser reads the name up to a space or control token); rename the tool (in "
                       "'tools' and in the calls) to letters, digits, '_', '-' or '.'")


def check_conversation(conversation: dict) -> None:
    """Harmony's own rules for a validated conversation (on top of validate_conversation's):
    no harmony control-token text anywhere, tool names that survive `to=functions.NAME`, and
    call ids that name one tool (vLLM finds a tool result's author by its call id)."""
    for i, tool in enumerate(conversation.get("tools") or []):
        fn = tool["function"]
        check_tool_name(fn["name"], f"tools[{i}].function.name")
        _no_special(fn["name"], f"tools[{i}].function.name")
        _no_special(fn.get("description"), f"tools[{i}].function.description")
        if fn.get("parameters") is not None:
            _no_special(json.dumps(fn["parameters"], ensure_ascii=False), f"tools[{i}].function.parameters")
    _check_messages(conversation["messages"], "messages")


def _check_messages(messages: list[dict], label: str, first: int = 0) -> None:
    names_by_id: dict[str, str] = {}
    for k, msg in enumerate(messages):
        where = f"{label}[{first + k}]"
        _no_special(msg.get("content"), f"{where}.content")
        _no_special(msg.get("reasoning_content"), f"{where}.reasoning_content")
        for j, call in enumerate(msg.get("tool_calls") or []):
            here = f"{where}.tool_calls[{j}]"
            name = call["function"]["name"]
            check_tool_name(name, f"{here}.function.name")
            _no_special(name, f"{here}.function.name")
            _no_special(json.dumps(call["function"]["arguments"], ensure_ascii=False), f"{here}.function.arguments")
            call_id = call.get("id")
            if call_id is not None:
                if names_by_id.get(call_id, name) != name:
                    raise RowError(f"{here}.id: {call_id!r} is also the id of a call to {names_by_id[call_id]!r}; "
                                   "vLLM names a tool result after the tool whose call has its id, looking over the "
                                   "whole conversation, so it would write the wrong tool; give each call its own id")
                names_by_id[call_id] = name


def check_preference(pair: dict) -> None:
    check_conversation({"messages": [*pair["prompt"], pair["chosen"]], "tools": pair["tools"]})
    check_conversation({"messages": [*pair["prompt"], pair["rejected"]], "tools": pair["tools"]})


# ---------------------------------------------------------------------------------------------
# vLLM's message building (harmony_utils), for Keel's validated rows.

def arguments_text(arguments: dict) -> str:
    """A call's arguments as the client sends them back in the history: the string vLLM's parser
    returned for the call (json.dumps of the parsed JSON), so training writes exactly it."""
    return json.dumps(arguments)


def preamble(fmt, instructions: str | None, tools: list[dict] | None) -> list:
    """vLLM's build_harmony_preamble: the system message, and a developer message when there are
    instructions or tools."""
    h = _lib()
    settings = fmt.spec.harmony
    system = (h.SystemContent.new()
              .with_reasoning_effort(h.ReasoningEffort(settings.reasoning_effort.capitalize()))
              .with_conversation_start_date(settings.start_date))
    out = [h.Message.from_role_and_content(h.Role.SYSTEM, system)]
    if instructions or tools:
        developer = h.DeveloperContent.new()
        if instructions is not None:
            developer = developer.with_instructions(instructions)
        if tools:
            developer = developer.with_function_tools([
                h.ToolDescription.new(name=t["function"]["name"], description=t["function"].get("description") or "",
                                      parameters=t["function"].get("parameters"))
                for t in tools])
        out.append(h.Message.from_role_and_content(h.Role.DEVELOPER, developer))
    return out


def _tool_names(messages: list[dict]) -> dict:
    """vLLM's call id -> tool name map, over the whole conversation (the last call with an id wins)."""
    names = {}
    for msg in messages:
        for call in msg.get("tool_calls") or []:
            names[call.get("id")] = call["function"]["name"]
    return names


def history_messages(messages: list[dict]) -> list:
    """vLLM's parse_chat_inputs_to_harmony_messages for the messages after the system one."""
    h = _lib()
    names = _tool_names(messages)
    out = []
    pending: list[dict] = []  # the call of the last assistant turn, for a result without an id
    for msg in messages:
        role = msg["role"]
        if role == "assistant" and msg.get("tool_calls"):
            if msg.get("content"):
                out.append(h.Message.from_role_and_content(h.Role.ASSISTANT, msg["content"]).with_channel("commentary"))
            if msg.get("reasoning_content"):
                out.append(h.Message.from_role_and_content(h.Role.ASSISTANT, msg["reasoning_content"])
                           .with_channel("analysis"))
            for call in msg["tool_calls"]:
                out.append(_call_message(call))
            pending = list(msg["tool_calls"])
        elif role == "tool":
            # vLLM looks the name up by tool_call_id; a row whose result names its call another way
            # (Keel pairs them at validation) gets the name of that call, which is what vLLM writes
            # when the request carries the call's id, as OpenAI clients always send it.
            call_id = msg.get("tool_call_id")
            if call_id is not None:
                name = names.get(call_id, "")
            else:  # one call per turn (harmony): the result answers it
                name = pending[0]["function"]["name"] if pending else ""
            out.append(h.Message.from_author_and_content(h.Author.new(h.Role.TOOL, f"functions.{name}"), msg["content"])
                       .with_channel("commentary").with_recipient("assistant"))
        elif role == "assistant":
            if msg.get("reasoning_content"):
                out.append(h.Message.from_role_and_content(h.Role.ASSISTANT, msg["reasoning_content"])
                           .with_channel("analysis"))
            if msg.get("content"):
                out.append(h.Message.from_role_and_content(h.Role.ASSISTANT, msg["content"]).with_channel("final"))
        elif role == "user":
            out.append(h.Message.from_role_and_content(h.Role.USER, msg["content"]))
        else:
            raise KeelError(f"harmony: a {role} message after the first message cannot be rendered")
    return out


def _call_message(call: dict):
    h = _lib()
    return (h.Message.from_role_and_content(h.Role.ASSISTANT, arguments_text(call["function"]["arguments"]))
            .with_channel("commentary").with_recipient(f"functions.{call['function']['name']}")
            .with_content_type("json"))


def _drop_analysis(msgs: list) -> list:
    """vLLM's auto_drop_analysis_messages: no analysis before the last assistant final message."""
    last = max((i for i, m in enumerate(msgs) if m.author.role.value == "assistant" and m.channel == "final"),
               default=-1)
    return [m for i, m in enumerate(msgs) if not (i < last and m.channel == "analysis")]


def legacy_call_headers(ids: list[int]) -> list[int]:
    """vLLM's _use_legacy_tool_call_headers: every assistant header
    `<|start|>assistant<|channel|>CHANNEL to=RECIPIENT <|constrain|>TYPE<|message|>` becomes
    `<|start|>assistant to=RECIPIENT<|channel|>CHANNEL TYPE<|message|>`."""
    enc, t = encoding(), _ids()
    start, channel_tok, constrain, message = t["<|start|>"], t["<|channel|>"], t["<|constrain|>"], t["<|message|>"]
    result = list(ids)
    index = 0
    while index < len(result):
        if result[index] != start:
            index += 1
            continue
        try:
            header_end = result.index(message, index + 1)
            channel_index = result.index(channel_tok, index + 1, header_end)
            constrain_index = result.index(constrain, channel_index + 1, header_end)
        except ValueError:
            index += 1
            continue
        author = enc.decode(result[index + 1:channel_index])
        channel_and_recipient = enc.decode(result[channel_index + 1:constrain_index])
        content_type = enc.decode(result[constrain_index + 1:header_end])
        if author != "assistant" or " to=" not in channel_and_recipient or not channel_and_recipient.endswith(" "):
            index = header_end + 1
            continue
        channel, recipient = channel_and_recipient[:-1].split(" to=", 1)
        if not channel or not recipient or not content_type:
            index = header_end + 1
            continue
        header = ([start] + enc.encode(f"assistant to={recipient}") + [channel_tok]
                  + enc.encode(f"{channel} {content_type}") + [message])
        result[index:header_end + 1] = header
        index += len(header)
    return result


def prompt_ids(fmt, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """The ids vLLM's chat completions sends to the engine for these messages (a validated row's,
    up to the turn to answer) and tools: render_for_completion of the built messages."""
    h = _lib()
    instructions, rest = None, list(messages)
    if rest and rest[0]["role"] == "system":
        instructions, rest = rest[0]["content"], rest[1:]
    msgs = _drop_analysis(preamble(fmt, instructions, tools) + history_messages(rest))
    ids = encoding().render_conversation_for_completion(
        h.Conversation.from_messages(msgs), h.Role.ASSISTANT,
        config=h.RenderConversationConfig(auto_drop_analysis=False))
    return legacy_call_headers(list(ids))


def written_ids(turn: dict, where: str) -> list[int]:
    """What the model writes after the prompt's `<|start|>assistant` for this assistant turn."""
    h = _lib()
    enc, t = encoding(), _ids()
    msgs = []
    if turn.get("reasoning_content"):
        msgs.append(h.Message.from_role_and_content(h.Role.ASSISTANT, turn["reasoning_content"]).with_channel("analysis"))
    calls = turn.get("tool_calls") or []
    if calls:
        if turn.get("content"):
            msgs.append(h.Message.from_role_and_content(h.Role.ASSISTANT, turn["content"]).with_channel("commentary"))
        msgs += [_call_message(c) for c in calls]
    elif turn.get("content"):
        msgs.append(h.Message.from_role_and_content(h.Role.ASSISTANT, turn["content"]).with_channel("final"))
    else:
        raise RowError(f"{where}: an assistant turn with reasoning_content only; gpt-oss ends a turn with a final "
                       "answer (content) or a tool call, and generation would not stop after the reasoning; add "
                       "the answer or the call")
    ids: list[int] = []
    for m in msgs:
        ids += legacy_call_headers(list(enc.render(m)))
    head = [t["<|start|>"], enc.encode("assistant")[0]]
    if ids[:2] != head:
        raise KeelError(f"harmony: a rendered assistant message does not begin with <|start|>assistant ({ids[:4]})")
    ids = ids[2:]
    if not calls:
        if ids[-1] != t["<|end|>"]:
            raise KeelError("harmony: a rendered final message does not end with <|end|>")
        ids[-1] = t["<|return|>"]  # what generation stops on; the history reads <|end|>
    elif ids[-1] != t["<|call|>"]:
        raise KeelError("harmony: a rendered tool call does not end with <|call|>")
    return ids


def trained_turns(messages: list[dict], train_on: str) -> list[int]:
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return assistants[-1:] if train_on == "last" else assistants


def render_conversation(conversation: dict, fmt) -> list[tuple[list[int], list[int]]]:
    """(input_ids, trained mask) of each example of a validated conversation."""
    check_conversation(conversation)
    messages, tools = conversation["messages"], conversation.get("tools") or None
    examples: list[tuple[list[int], list[bool]]] = []
    ids: list[int] = []
    mask: list[bool] = []
    for i in trained_turns(messages, fmt.spec.train_on):
        prompt = prompt_ids(fmt, messages[:i], tools)
        written = written_ids(messages[i], f"messages[{i}]")
        if ids and prompt[:len(ids)] == ids:  # the served prompt continues this example
            mask += [False] * (len(prompt) - len(ids))
        else:
            if ids:
                examples.append((ids, mask))
            mask = [False] * len(prompt)
        ids = prompt + written
        mask += [True] * len(written)
    if ids:
        examples.append((ids, mask))
    return examples


def render_preference(pair: dict, fmt) -> tuple[list[int], list[int], list[int]]:
    """Prompt, chosen and rejected ids of a validated preference pair."""
    check_preference(pair)
    where = f"messages[{len(pair['prompt'])}]"
    prompt = prompt_ids(fmt, pair["prompt"], pair["tools"] or None)
    return (prompt, written_ids(pair["chosen"], f"chosen ({where})"),
            written_ids(pair["rejected"], f"rejected ({where})"))


def render_text(conversation: dict, fmt, *, add_generation_prompt: bool = False) -> str:
    """Text of the served prompt for the conversation (add_generation_prompt), else of the
    conversation as its last turn is trained (that turn's prompt and what the model writes)."""
    enc = encoding()
    messages, tools = conversation["messages"], conversation.get("tools") or None
    if add_generation_prompt:
        return enc.decode_utf8(prompt_ids(fmt, messages, tools))
    last = trained_turns(messages, "last")
    if not last:
        return enc.decode_utf8(prompt_ids(fmt, messages, tools))
    i = last[0]
    return enc.decode_utf8(prompt_ids(fmt, messages[:i], tools) + written_ids(messages[i], f"messages[{i}]"))
