"""Models Keel knows offline: their architecture configs and the formats they can be served with.

`trainer/models/architectures/models.yaml` maps a hub id to a kept config.json (the published values,
written out: no download) and to the chat family of the model's published tokenizer and
template. A recipe that names such a hub id is planned (`keel plan`) and checked against the
model's positions without touching the hub; training still reads the real model.

Which Keel formats fit a chat family follows from the format's single tokens (data/render.py,
check_tokenizer): every control token and delimiter of the format must be one token of the
model's tokenizer, or vLLM's parsers cannot match them. A family whose published tokenizer
lacks them cannot be served with that format; the recipe is refused at validation instead of
at the first data-preparation step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from data.files import read_yaml
from data.model_config import read_model_config

ARCHITECTURES_DIR = Path(__file__).resolve().parent / "architectures"


@dataclass(frozen=True)
class ChatFamily:
    formats: tuple[str, ...]  # Keel formats (and `native`) the model can be trained and served with
    why_not: str  # what the published tokenizer/template has instead, for the error


CHAT_FAMILIES = {
    "llama3": ChatFamily(("llama3-json", "native"),
                         "its tokenizer has Llama 3's header tokens (<|start_header_id|>, <|eot_id|>) but no ChatML "
                         "tokens (<|im_start|>, <|im_end|>) nor <think>/<tool_call> tokens"),
    "qwen3": ChatFamily(("hermes-qwen3", "native"),
                        "its tokenizer has the ChatML, <think> and <tool_call> tokens but none of Llama 3's header "
                        "tokens (<|start_header_id|>, <|eot_id|>)"),
    "mistral": ChatFamily(("mistral",),
                          "its tokenizer has Mistral's control tokens ([INST], [/INST], [TOOL_CALLS], "
                          "[AVAILABLE_TOOLS], [TOOL_RESULTS]) but no ChatML tokens (<|im_start|>, <|im_end|>), none "
                          "of Llama 3's header tokens (<|start_header_id|>, <|eot_id|>) and no <think>/<tool_call> "
                          "tokens; `native` is not offered: Keel has no native syntax for model type mistral (the "
                          "published templates put the system message in the last user turn, where it moves as "
                          "the conversation grows)"),
    "gemma3": ChatFamily(("gemma3", "native"),
                         "its tokenizer has Gemma's turn tokens (<start_of_turn>, <end_of_turn>) but no ChatML "
                         "tokens (<|im_start|>, <|im_end|>), none of Llama 3's header tokens (<|start_header_id|>, "
                         "<|eot_id|>) and no <think>/<tool_call> tokens"),
    "deepseek-r1": ChatFamily(("deepseek-r1",),
                              "the distilled tokenizer renames the base model's control tokens to DeepSeek's "
                              "(<｜User｜>, <｜Assistant｜>, <｜end▁of▁sentence｜>), so neither ChatML nor Llama 3 "
                              "header turns fit; `native` would pair the model's own template (no place for "
                              "reasoning_content) with the tool syntax of the base's model type (qwen2 or llama), "
                              "which the distilled model does not write"),
    "harmony": ChatFamily(("harmony",),
                          "gpt-oss speaks OpenAI's harmony format (<|start|>, <|channel|>, <|message|>, analysis/final "
                          "channels), which vLLM renders and parses through the harmony encoding for model type "
                          "gpt_oss, never through a chat template; `native` is not offered (vLLM ignores the "
                          "model's template on that path)"),
}


@dataclass(frozen=True)
class KnownModel:
    hub_id: str
    config_file: Path
    chat: str

    def config(self) -> dict:
        return read_model_config(self.config_file)

    @property
    def family(self) -> ChatFamily:
        return CHAT_FAMILIES[self.chat]


@lru_cache(maxsize=1)
def known_models() -> dict[str, KnownModel]:
    index = read_yaml(ARCHITECTURES_DIR / "models.yaml", what="model index", expect=dict)
    return {hub_id: KnownModel(hub_id, ARCHITECTURES_DIR / entry["config"], entry["chat"])
            for hub_id, entry in index.items()}


def known_model(model_path: str) -> KnownModel | None:
    """The kept entry for a hub id (`org/name`); None otherwise. A local directory that happens
    to be named like a hub id wins (it is what training reads)."""
    if path_kind(model_path) != "hub":
        return None
    return known_models().get(model_path)


def format_problem(model_path: str, fmt: str) -> str | None:
    """Why `fmt` cannot serve the known model at `model_path` (None: it can, or the model is unknown)."""
    known = known_model(model_path)
    if known is None or fmt in known.family.formats:
        return None
    fix = (f"use model.format: {' or '.join(known.family.formats)}" if known.family.formats else
           "Keel cannot serve this model family with a matching reasoning/tool format yet; train a family "
           "that has one (llama with llama3-json, qwen3 with hermes-qwen3, gemma3 with gemma3, "
           "DeepSeek-R1-Distill with deepseek-r1, gpt-oss with harmony)")
    return (f"model.format: {fmt!r} does not fit {known.hub_id} (chat family {known.chat}): {known.family.why_not}; "
            f"{fix}")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def path_kind(value: str) -> Literal["local", "hub", "uri"]:
    """How a model or data location is read.

    `scheme://...` is a URI (s3://, gs://, ...); a path that exists, or that starts with
    `/`, `./`, `../` or `~`, is local; `org/name` otherwise is a hub id.
    """
    if "://" in value:
        return "uri"
    if value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists():
        return "local"
    return "hub" if _HUB_ID.match(value) else "local"
