"""Conversation formats, each defined once under data/formats/<name>/.

A format is a chat template plus a spec naming its delimiters, stop tokens and the vLLM
parsers it is served with. The trainer renders with it; `keel serve` reads the copy that
export writes into the model dir.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from data.conversation import RowRules
from data.errors import KeelError
from data.files import read_text, read_yaml

FORMATS_DIR = Path(__file__).resolve().parent
SPEC_FILE = "spec.yaml"
NATIVE = "native"
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
JINJA_COMMENT = re.compile(r"\{#.*?#\}", re.S)


class Delimiters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    open: str
    close: str


class VllmParsers(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    reasoning_parser: str | None = None
    tool_parser: str | None = None


class Supports(BaseModel):
    """What a format can render so that its vLLM parsers give it back unchanged.

    Rows that need more are rejected at validation with the reason (a row the server could
    not parse back would teach the model output the server garbles).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    reasoning: bool
    tools: bool
    parallel_tool_calls: bool
    content_with_tool_calls: bool


class HarmonyPrompt(BaseModel):
    """What vLLM's harmony path puts in the system message of every gpt-oss prompt, pinned so
    that training renders what the server renders (`keel serve` sets VLLM_SYSTEM_START_DATE
    from start_date; a request's reasoning_effort other than this one changes the prompt)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    start_date: str
    reasoning_effort: Literal["low", "medium", "high"] = "medium"

    @model_validator(mode="after")
    def _iso_date(self):
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.start_date):
            raise ValueError(f"harmony.start_date {self.start_date!r}: write the date as YYYY-MM-DD")
        return self


class FormatSpec(BaseModel):
    """What spec.yaml holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    description: str = ""
    # "jinja": the chat template (chat_template, with {% generation %} markers) renders training
    # text and the served prompt. "harmony": OpenAI's harmony encoding renders both, to token ids
    # (gpt-oss; vLLM never reads a chat template for that model type), with the prompt's fixed
    # parts in `harmony`; such a format has no chat template (data/harmony.py).
    renderer: Literal["jinja", "harmony"] = "jinja"
    chat_template: str | None = None
    harmony: HarmonyPrompt | None = None
    think: Delimiters | None = None
    tool_call: Delimiters | None = None
    # "tagged": each call inside the tool_call delimiters. "bare": a turn with calls is only the
    # calls' JSON objects (Llama 3.1 style), so plain content must not look like a call. "list":
    # a turn with calls is only tool_call.open (one token) and then one JSON list of every call,
    # [{"name", "arguments", "id"}, ...], ended by the end-of-turn token (tool_call.close), as
    # Mistral's v0.3 tokenizers write them; each call needs an id, written as Mistral's 9 letters
    # or digits (data.conversation.mistral_call_id). "fenced": each call inside the tool_call
    # delimiters as TYPE + a separator token + NAME + "\n```json\n" + the arguments' JSON on one
    # line + "\n```", the name outside the JSON (DeepSeek's layout); the calls of a turn sit
    # between two more tokens (tool_tokens), so the name must be one line without markup.
    tool_call_json: Literal["tagged", "bare", "list", "fenced"] = "tagged"
    # Tokens of the tool syntax besides tool_call's own delimiters that the tool parser reads in
    # the decoded output (fenced: the section's begin and end and the name separator). Like the
    # delimiters they are one token each, ordinary (not special) so decoding keeps them, and
    # never allowed as text in a message.
    tool_tokens: tuple[str, ...] = ()
    # Where the template writes the tool list: "start" (one fixed place, before the first turn
    # or in the system turn) or "last_user_turn" (Mistral: before the last user message, so it
    # moves as the conversation grows, and a conversation with tools is trained as one example
    # per stretch between user messages; data/render.py split_examples).
    tool_list_at: Literal["start", "last_user_turn"] = "start"
    end_of_turn: str
    stop_tokens: tuple[str, ...]
    control_tokens: tuple[str, ...] = ()
    pad_token: str
    supports: Supports
    # Rendering options (data.history_reasoning, data.train_on in a recipe). The exported spec
    # holds the values training used; the exported template renders history accordingly.
    history_reasoning: Literal["drop", "keep"] = "drop"
    train_on: Literal["all", "last"] = "all"
    # For `native`: the shipped format whose syntax the model's own template writes.
    native_syntax: str | None = None
    vllm: VllmParsers = VllmParsers()

    @property
    def think_tags(self) -> tuple[str, ...]:
        """(open, close) of the reasoning block; () for formats without one."""
        return (self.think.open, self.think.close) if self.think is not None else ()

    @model_validator(mode="after")
    def _consistent(self):
        if self.renderer == "harmony":
            if self.chat_template is not None or self.harmony is None:
                raise ValueError("renderer 'harmony' takes no chat_template and needs harmony: {start_date: YYYY-MM-DD}")
            return self
        if self.chat_template is None:
            raise ValueError("chat_template: name the format's Jinja template file (renderer 'jinja')")
        if self.harmony is not None:
            raise ValueError("harmony: only for renderer 'harmony'")
        if self.tool_call_json == "tagged" and self.supports.tools and self.tool_call is None:
            raise ValueError("tool_call_json 'tagged' needs tool_call delimiters")
        if self.tool_call_json == "list" and self.supports.tools and (
                self.tool_call is None or self.tool_call.close != self.end_of_turn):
            raise ValueError("tool_call_json 'list' needs tool_call delimiters: open, the token before the list of "
                             "calls, and close, the end_of_turn token that ends the list")
        if self.tool_call_json == "fenced" and self.supports.tools and (
                self.tool_call is None or len(self.tool_tokens) != 3):
            raise ValueError("tool_call_json 'fenced' needs tool_call delimiters (the tokens around one call) and "
                             "tool_tokens: [the token before the calls, the token after them, the token between a "
                             "call's type and its name]")
        if self.supports.reasoning and self.think is None:
            raise ValueError("supports.reasoning needs think delimiters")
        return self


class Format:
    """A loaded format: its spec and the text of its chat template (None for renderer harmony)."""

    def __init__(self, spec: FormatSpec, chat_template: str | None, directory: Path):
        self.spec = spec
        self.chat_template = chat_template
        self.directory = directory

    @property
    def name(self) -> str:
        return self.spec.name

    def single_tokens(self) -> list[str]:
        """Strings the tokenizer must hold as one token each."""
        tokens = list(self.spec.control_tokens)
        for delims in (self.spec.think, self.spec.tool_call):
            if delims is not None:
                tokens += [delims.open, delims.close]
        tokens += [t for t in self.spec.tool_tokens if t not in tokens]
        for tok in (self.spec.end_of_turn, self.spec.pad_token, *self.spec.stop_tokens):
            if tok not in tokens:
                tokens.append(tok)
        return tokens

    def markup_strings(self) -> list[str]:
        """Delimiters that must not appear literally inside plain message text."""
        out = []
        for delims in (self.spec.think, self.spec.tool_call):
            if delims is not None:
                out += [delims.open, delims.close]
        return out + list(self.spec.tool_tokens)

    @property
    def harmony(self) -> bool:
        """Rendered by the harmony encoding (gpt-oss), not by a chat template."""
        return self.spec.renderer == "harmony"

    @property
    def has_generation_markers(self) -> bool:
        if self.chat_template is None:
            return False
        return bool(GENERATION_MARKER.search(JINJA_COMMENT.sub("", self.chat_template)))

    def row_rules(self) -> RowRules:
        """What rows this format can express, for validation."""
        s = self.spec.supports
        return RowRules(markup=tuple(self.markup_strings() + list(self.spec.control_tokens)),
                        format_name=self.name, reasoning=s.reasoning, tools=s.tools,
                        parallel_tool_calls=s.parallel_tool_calls,
                        content_with_tool_calls=s.content_with_tool_calls,
                        bare_json_calls=s.tools and self.spec.tool_call_json == "bare",
                        listed_calls=s.tools and self.spec.tool_call_json == "list",
                        fenced_calls=s.tools and self.spec.tool_call_json == "fenced")

    def with_options(self, *, history_reasoning: str | None = None, train_on: str | None = None) -> "Format":
        """This format with the recipe's rendering options (None: the format's default).

        A history_reasoning other than the template's default is set at the top of the template
        text, so the exported template renders history as training did, whatever the server.
        """
        update: dict = {}
        template = self.chat_template
        if history_reasoning is not None and history_reasoning != self.spec.history_reasoning:
            if not self.spec.supports.reasoning:
                raise KeelError(f"data.history_reasoning: format {self.name!r} renders no reasoning, so there is "
                                "no history reasoning to keep or drop; remove the key")
            if self.harmony:
                raise KeelError(f"data.history_reasoning: format {self.name!r} renders the history as vLLM's "
                                "harmony path sends it, which drops every reasoning before the last final answer; "
                                "remove the key")
            if self.spec.native_syntax is not None or template is None or "history_reasoning" not in template:
                raise KeelError(f"data.history_reasoning: the chat template of format {self.name!r} always "
                                f"renders history reasoning as {self.spec.history_reasoning!r} and has no option "
                                "to change it; remove the key or use a Keel format")
            template = f"{{%- set history_reasoning = {history_reasoning!r} -%}}\n" + template
            update["history_reasoning"] = history_reasoning
        if train_on is not None:
            update["train_on"] = train_on
        return Format(self.spec.model_copy(update=update), template, self.directory)

    def spec_yaml(self) -> str:
        """The spec as training used it (options included), for the exported model dir."""
        header = ("# Written by Keel at export: the format this model was trained with, rendering options\n"
                  "# included. `keel serve` reads it; the chat template beside it is the one training used.\n")
        return header + yaml.safe_dump(self.spec.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_dir(cls, directory: str | Path) -> "Format":
        directory = Path(directory)
        spec_path = directory / SPEC_FILE
        raw = read_yaml(spec_path, what="format spec")
        try:
            spec = FormatSpec.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()
            )
            raise KeelError(f"{spec_path}: invalid format spec: {problems}") from None
        if spec.chat_template is None:
            return cls(spec, None, directory)
        template_path = directory / spec.chat_template
        if not template_path.is_file():
            raise KeelError(f"{spec_path}: chat_template file {template_path} not found")
        template = read_text(template_path, what="chat template")
        return cls(spec, template, directory)


def available_formats() -> list[str]:
    """Shipped formats, plus `native` (the base model's own chat template)."""
    return sorted(p.parent.name for p in FORMATS_DIR.glob(f"*/{SPEC_FILE}")) + [NATIVE]


def load_format(name: str) -> Format:
    """The format shipped under data/formats/<name>/."""
    if name == NATIVE:
        raise KeelError("format 'native' comes from a model directory; use resolve_format(..., model_path=...)")
    if name not in available_formats():
        raise KeelError(
            f"unknown format {name!r}; available: {', '.join(available_formats())}"
        )
    return Format.from_dir(FORMATS_DIR / name)


def resolve_format(name: str, *, model_path: str | Path | None = None, native_syntax: str | None = None,
                   history_reasoning: str | None = None, train_on: str | None = None,
                   trust_remote_code: bool = False) -> Format:
    """The format a recipe asks for, with its rendering options applied."""
    if name == NATIVE:
        from data.formats.native import load_native_format

        if model_path is None:
            raise KeelError("format 'native' needs the model directory whose chat template it uses")
        fmt = load_native_format(model_path, syntax=native_syntax, trust_remote_code=trust_remote_code)
    else:
        if native_syntax is not None:
            raise KeelError(f"model.native_syntax is only for model.format: native (the format is {name!r}); remove it")
        fmt = load_format(name)
    return fmt.with_options(history_reasoning=history_reasoning, train_on=train_on)
