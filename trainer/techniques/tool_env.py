"""Multi-turn tool use in a GRPO rollout: the model's tool calls are executed and their results
fed back within one rollout, up to grpo.max_turns assistant turns; the loss is taken only on what
the model wrote.

Each turn boundary is the format contract's: the tokens between the end of an assistant turn and
the next generation are what the format's chat template renders for the tool results plus the
generation prompt (the rendering of the conversation with the results, minus the rendering
without them), so the rolled-out sequence is token for token what the server would render for
the same conversation (checked by tests/unit/test_grpo_env.py). Model tokens are kept as sampled,
never re-tokenized; only the inserted tool turns are tokenized, from text the template wrote.

Tool results come from one of two sources (grpo.tool_results):
- module: Python functions in a module the recipe names (grpo.tools_module, behind
  grpo.trust_python_code): a call runs the function of that name with its arguments; its return
  value (text, or JSON for anything else) is the tool result. An unknown tool or a raised
  exception becomes an error result the model sees, as a client would send it.
- recorded: the tool calls recorded in the prompt's row with their results (data/prompts.py): a
  call whose name and arguments (compared as JSON values, as the tool_call reward compares them)
  equal a recorded call's gets that call's recorded result, the first one recorded if several
  match; any other call gets an error result naming the call. No code of the user's runs.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from data.completion import read_output
from data.formats import Format
from data.rewards import json_value

# call_tool(name, arguments as JSON text) -> the tool result's text
CallTool = Callable[[str, str], str]


@dataclass
class Rollout:
    """One rollout: completion ids after the prompt, env_mask (1: the model wrote it, 0: inserted
    tool results and turn headers), and where each assistant turn starts."""

    completion_ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    turn_starts: list[int] = field(default_factory=list)
    tool_calls: int = 0


def load_tools(module_name: str) -> dict:
    from data.errors import KeelError

    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise KeelError(f"grpo.tools_module: cannot import {module_name!r} ({exc}); put it on PYTHONPATH") from None
    return {name: fn for name, fn in vars(module).items() if callable(fn) and not name.startswith("_")}


def run_tool(tools: dict, name: str, arguments: str) -> str:
    fn = tools.get(name)
    if fn is None:
        return json.dumps({"error": f"unknown tool {name!r}"})
    try:
        result = fn(**json.loads(arguments))
    except Exception as exc:  # noqa: BLE001 - the model sees the failure, as a client would report it
        return json.dumps({"error": f"{type(exc).__name__}: {exc}"})
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


def module_tools(tools: dict) -> CallTool:
    """Calls answered by running the functions of grpo.tools_module."""
    return lambda name, arguments: run_tool(tools, name, arguments)


def recorded_results(recorded: list[dict]) -> CallTool:
    """Calls answered from the row's recorded calls ({"name", "arguments", "result"})."""

    def call_tool(name: str, arguments: str) -> str:
        args = json_value(arguments)
        for call in recorded:
            if call["name"] == name and json_value(call["arguments"]) == args:
                return call["result"]
        return json.dumps({"error": f"no recorded result for this call: the data records no call of {name!r} with "
                                    f"the arguments {arguments}"}, ensure_ascii=False)

    return call_tool


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def tool_turn_ids(*, messages: list[dict], tools: list[dict], results: list[dict], fmt: Format, tokenizer) -> list[int]:
    """Token ids the template puts between an assistant turn that made calls and the next
    generation: the tool results' turns and the generation prompt."""
    from data.render import encode_text, render_text

    before = render_text({"messages": messages, "tools": tools or None}, fmt=fmt, tokenizer=tokenizer)
    after = render_text({"messages": messages + results, "tools": tools or None}, fmt=fmt, tokenizer=tokenizer,
                        add_generation_prompt=True)
    # the model's turn ends with the end-of-turn token (a stop token, one special token); what the
    # template writes after it (a newline) belongs to the inserted part, which tokenizes on its own
    eot = fmt.spec.end_of_turn
    before = before[:before.rindex(eot) + len(eot)]
    if not after.startswith(before):
        raise ValueError(f"format {fmt.name!r}: the template does not render tool results as an append")
    return encode_text(tokenizer, after[len(before):])


def roll_out(*, prompt_messages: list[dict], prompt_ids: list[int], tools: list[dict], generate,
             call_tool: CallTool, fmt: Format, tokenizer, max_turns: int, max_tokens: int) -> Rollout:
    """`generate(ids, budget) -> new ids` samples one assistant turn (ending with a stop token, or
    cut at `budget`); `call_tool` answers each call the model makes (module_tools, recorded_results)."""
    from data.rewards import read_completion

    out = Rollout()
    messages = list(prompt_messages)
    for turn in range(max_turns):
        budget = max_tokens - len(out.completion_ids)
        if budget <= 0:
            break
        out.turn_starts.append(len(out.completion_ids))
        new = list(generate(prompt_ids + out.completion_ids, budget))[:budget]
        out.completion_ids += new
        out.env_mask += [1] * len(new)
        scored = read_completion(new, tokenizer=tokenizer, fmt=fmt)
        if not scored.ended or not scored.output.calls or turn == max_turns - 1:
            break
        calls = [{"id": f"call_{turn}_{k}", "type": "function",
                  "function": {"name": c.name, "arguments": c.arguments}} for k, c in enumerate(scored.output.calls)]
        messages.append({"role": "assistant", "content": scored.output.content or "",
                         "reasoning": scored.output.reasoning or "", "tool_calls": calls})
        results = [{"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"],
                    "content": call_tool(c["function"]["name"], c["function"]["arguments"])} for c in calls]
        out.tool_calls += len(calls)
        inserted = tool_turn_ids(messages=messages, tools=tools, results=results, fmt=fmt, tokenizer=tokenizer)
        if len(out.completion_ids) + len(inserted) >= max_tokens:
            break
        out.completion_ids += inserted
        out.env_mask += [0] * len(inserted)
        messages += results
    return out


def last_turn(completion_ids: list[int], turn_starts: list[int] | None) -> list[int]:
    """The ids of the rollout's last assistant turn (what the rewards score)."""
    return list(completion_ids[turn_starts[-1]:]) if turn_starts else list(completion_ids)
