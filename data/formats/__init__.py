"""Conversation formats, each defined once under data/formats/<name>/.

A format is a chat template plus a spec naming its delimiters, stop tokens and the vLLM
parsers it is served with. The trainer renders with it; `keel serve` reads the copy that
export writes into the model dir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from data.errors import KeelError

FORMATS_DIR = Path(__file__).resolve().parent
SPEC_FILE = "spec.yaml"


class Delimiters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    open: str
    close: str


class VllmParsers(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    reasoning_parser: str | None = None
    tool_parser: str | None = None


class FormatSpec(BaseModel):
    """What spec.yaml holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    description: str = ""
    chat_template: str
    think: Delimiters | None = None
    tool_call: Delimiters | None = None
    end_of_turn: str
    stop_tokens: tuple[str, ...]
    control_tokens: tuple[str, ...] = ()
    pad_token: str
    history_reasoning: Literal["drop", "keep"] = "drop"
    vllm: VllmParsers = VllmParsers()


class Format:
    """A loaded format: its spec and the text of its chat template."""

    def __init__(self, spec: FormatSpec, chat_template: str, directory: Path):
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
        return out

    @classmethod
    def from_dir(cls, directory: str | Path) -> "Format":
        directory = Path(directory)
        spec_path = directory / SPEC_FILE
        try:
            raw = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KeelError(f"{spec_path}: format spec not found") from None
        except yaml.YAMLError as exc:
            raise KeelError(f"{spec_path}: not valid YAML: {exc}") from None
        try:
            spec = FormatSpec.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()
            )
            raise KeelError(f"{spec_path}: invalid format spec: {problems}") from None
        template_path = directory / spec.chat_template
        try:
            template = template_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise KeelError(f"{spec_path}: chat_template file {template_path} not found") from None
        return cls(spec, template, directory)


def available_formats() -> list[str]:
    return sorted(p.parent.name for p in FORMATS_DIR.glob(f"*/{SPEC_FILE}"))


def load_format(name: str) -> Format:
    """The format shipped under data/formats/<name>/."""
    if name not in available_formats():
        raise KeelError(
            f"unknown format {name!r}; available: {', '.join(available_formats())}"
        )
    return Format.from_dir(FORMATS_DIR / name)
