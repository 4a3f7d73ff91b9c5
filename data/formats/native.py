"""The `native` format: the base model's own chat template, checked before it is trusted.

Models such as Qwen3 or Llama 3.1 ship a tools-capable chat template. With `model.format:
native`, Keel renders training rows with that template and serves with it, so the model keeps
the prompt format it was pretrained on. What the template writes for tool calls and reasoning
is the syntax of a shipped format (`model.native_syntax`, or picked from the model type):
that format's delimiters, stop tokens and vLLM parser names are used with the model's text.

A template is probed, not assumed: Keel renders small probe conversations and looks for the
probe's text. What it renders becomes the format's `supports` (so a row needing more, say
reasoning the template silently drops, is rejected with the reason), and whether it keeps
reasoning of turns before the last user message becomes its `history_reasoning`.
A template without `{% generation %}` markers still works: the loss mask then comes from
rendering each assistant turn's prompt (data/render.py, `assistant_spans`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data.errors import KeelError
from data.files import read_json, read_text
from data.model_config import read_model_config

# model_type in config.json -> the shipped format whose syntax that family's template writes
SYNTAX_BY_MODEL_TYPE = {"llama": "llama3-json", "qwen2": "hermes-qwen3", "qwen3": "hermes-qwen3",
                        "qwen3_moe": "hermes-qwen3", "gemma3": "gemma3", "gemma3_text": "gemma3"}
PROBE_TOOL = {"type": "function", "function": {
    "name": "keel_probe_tool", "description": "keel probe",
    "parameters": {"type": "object", "properties": {"keel_probe_param": {"type": "string"}}}}}


def _call(value: str, k: int = 0) -> dict:
    return {"id": f"keel_probe_{k}", "type": "function",
            "function": {"name": "keel_probe_tool", "arguments": {"keel_probe_param": value}}}


@dataclass(frozen=True)
class TemplateProbe:
    tools: bool
    parallel_tool_calls: bool
    content_with_tool_calls: bool
    reasoning: bool
    history_reasoning: str  # "keep" | "drop"


def _render(template: str, messages: list[dict], tools: list | None, special_tokens: dict) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        return render_jinja_template(conversations=[messages], tools=tools, chat_template=template,
                                     **special_tokens)[0][0]
    except Exception:  # a template that raises (raise_exception, undefined names) cannot render it
        return ""


def probe_template(template: str, special_tokens: dict | None = None) -> TemplateProbe:
    """What a chat template renders, found by rendering probe conversations."""
    kw = special_tokens or {}
    user = {"role": "user", "content": "keel probe question"}
    tools_text = _render(template, [user, {"role": "assistant", "content": "ok"}], [PROBE_TOOL], kw)
    call_turn = [user, {"role": "assistant", "content": "", "tool_calls": [_call("keel-probe-value")]},
                 {"role": "tool", "tool_call_id": "keel_probe_0", "content": "keel-probe-result"},
                 {"role": "assistant", "content": "done"}]
    call_text = _render(template, call_turn, [PROBE_TOOL], kw)
    tools = ("keel_probe_tool" in tools_text and "keel_probe_param" in tools_text
             and "keel-probe-value" in call_text and "keel-probe-result" in call_text)
    parallel = _render(template, [user, {"role": "assistant", "content": "", "tool_calls": [
        _call("keel-probe-first"), _call("keel-probe-second", 1)]}], [PROBE_TOOL], kw)
    mixed = _render(template, [user, {"role": "assistant", "content": "keel-probe-content",
                                      "tool_calls": [_call("keel-probe-value")]}], [PROBE_TOOL], kw)
    reasoning_text = _render(template, [user, {"role": "assistant", "reasoning_content": "keel-probe-reasoning",
                                               "content": "ok"}], None, kw)
    history_text = _render(template, [user, {"role": "assistant", "reasoning_content": "keel-probe-early",
                                             "content": "ok"}, user,
                                      {"role": "assistant", "reasoning_content": "keel-probe-late", "content": "ok"}],
                           None, kw)
    return TemplateProbe(
        tools=tools,
        parallel_tool_calls=tools and "keel-probe-first" in parallel and "keel-probe-second" in parallel,
        content_with_tool_calls=tools and "keel-probe-content" in mixed and "keel-probe-value" in mixed,
        reasoning="keel-probe-reasoning" in reasoning_text,
        history_reasoning="keep" if "keel-probe-early" in history_text else "drop",
    )


def model_chat_template(model_dir: Path) -> str:
    """The chat template a model directory carries: chat_template.jinja or tokenizer_config.json."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return read_text(jinja, what="chat template")
    config = model_dir / "tokenizer_config.json"
    template = read_json(config, what="tokenizer config", expect=dict).get("chat_template") if config.is_file() else None
    if isinstance(template, list):  # named templates: the tool-use one if there is one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("tool_use") or named.get("default")
    if not isinstance(template, str) or not template.strip():
        raise KeelError(f"model.format native: {model_dir} has no chat template (neither chat_template.jinja "
                        "nor tokenizer_config.json's chat_template); pick a Keel format instead")
    return template


def _syntax_for(model_dir: Path, syntax: str | None) -> str:
    if syntax is not None:
        return syntax
    config = model_dir / "config.json"
    model_type = read_model_config(config).get("model_type") if config.is_file() else None
    if model_type not in SYNTAX_BY_MODEL_TYPE:
        raise KeelError(f"model.format native: Keel does not know the tool-call syntax of model type "
                        f"{model_type!r}; set model.native_syntax to the shipped format the model's template "
                        f"follows ({', '.join(sorted(set(SYNTAX_BY_MODEL_TYPE.values())))})")
    return SYNTAX_BY_MODEL_TYPE[model_type]


def special_tokens_of(model_dir: Path, *, trust_remote_code: bool = False) -> dict:
    """bos_token, eos_token, ...: what transformers' apply_chat_template hands every template."""
    from data.model_loading import LoadPolicy, load_tokenizer

    return dict(load_tokenizer(model_dir, LoadPolicy(trust_remote_code=trust_remote_code)).special_tokens_map)


def load_native_format(model_path: str | Path, *, syntax: str | None = None, trust_remote_code: bool = False):
    from data.formats import NATIVE, Format, Supports, load_format

    model_dir = Path(model_path).expanduser()
    if not model_dir.is_dir():
        raise KeelError(f"model.format native: {model_path} is not a local model directory")
    template = model_chat_template(model_dir)
    base = load_format(_syntax_for(model_dir, syntax))
    probe = probe_template(template, special_tokens_of(model_dir, trust_remote_code=trust_remote_code))
    supports = Supports(reasoning=probe.reasoning and base.spec.supports.reasoning,
                        tools=probe.tools and base.spec.supports.tools,
                        parallel_tool_calls=probe.parallel_tool_calls and base.spec.supports.parallel_tool_calls,
                        content_with_tool_calls=probe.content_with_tool_calls and base.spec.supports.content_with_tool_calls)
    spec = base.spec.model_copy(update={
        "name": NATIVE, "native_syntax": base.name, "chat_template": "chat_template.jinja",
        "description": f"the base model's own chat template ({model_dir}), with the syntax of {base.name}",
        "supports": supports,
        # without reasoning there is nothing to keep or drop: the syntax format's value stands
        "history_reasoning": probe.history_reasoning if supports.reasoning else base.spec.history_reasoning,
    })
    return Format(spec, template, model_dir)
