"""The exported model directory: the contract between the trainer and the server.

    config.json, model.safetensors      weights (LoRA merged), as save_pretrained writes them
    tokenizer.json, tokenizer_config.json   the tokenizer, chat template included
    chat_template.jinja                 the exact template used in training
    keel-format/spec.yaml + template    the format spec (delimiters, stop tokens, vLLM parsers)
    keel-export.yaml                    what training knew: seq_len, base model, technique

The trainer writes it (trainer/export.py); the server reads only this directory, never a recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError

from data.errors import KeelError
from data.files import quote, read_yaml
from data.formats import Format

EXPORT_INFO_FILE = "keel-export.yaml"
FORMAT_DIR = "keel-format"
# the artifact of an MLflow registry version that points at an export living elsewhere (a shared
# volume): {"location": PATH}; written by trainer/tracking/tracker.py, followed by serving/pull.py
MODEL_REF_FILE = "keel-model-ref.json"


class ExportInfo(BaseModel):
    """keel-export.yaml: what training knew that serving needs. One typed model, written by the
    export (trainer/export.py) and read by serving; a model dir Keel did not export has none,
    and reads as all defaults. Keys a newer Keel adds are kept and ignored."""

    model_config = ConfigDict(extra="allow", frozen=True)

    base_model: str | None = None  # model.path the run started from (an adapter's base)
    format: str | None = None  # the format's name (its spec is in keel-format/)
    technique: Literal["sft", "cpt", "dpo", "grpo"] | None = None
    peft: Literal["none", "lora", "qlora"] | None = None
    adapter: bool = False  # an unmerged LoRA adapter, not a whole model
    seq_len: PositiveInt | None = None  # training's context length: the served max_model_len
    world_size: PositiveInt | None = None
    trust_remote_code: bool = False  # keel serve passes vLLM --trust-remote-code only then
    dtype: Literal["bfloat16", "float16", "float32"] | None = None  # what training computed in
    mlflow_run_id: str | None = None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


def read_export_info(model_dir: str | Path) -> ExportInfo:
    """The export's keel-export.yaml (defaults when there is none); a file that is not a mapping
    of the expected keys is a KeelError naming it and the key."""
    path = Path(model_dir) / EXPORT_INFO_FILE
    if not path.is_file():
        return ExportInfo()
    try:
        raw = read_yaml(path, what="export record")
    except KeelError as exc:
        raise KeelError(f"{exc}; re-export the model, or restore the file the trainer wrote") from None
    if not isinstance(raw, dict):
        raise KeelError(f"{path}: expected a mapping of export facts (seq_len, dtype, ...), found "
                        f"{type(raw).__name__}; re-export the model, or restore the file the trainer wrote")
    try:
        return ExportInfo(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        raise KeelError(f"{path}: {key}: {err['msg']} (found {quote(err.get('input'))}); re-export the model, or "
                        "restore the file the trainer wrote") from None
    except TypeError:  # a key that is not a string (`1: 2`) cannot be a keyword
        raise KeelError(f"{path}: every key must be a name such as seq_len; re-export the model, or restore the "
                        "file the trainer wrote") from None


def load_model_format(model_dir: str | Path) -> Format | None:
    """The format a Keel export was trained with, or None for a model Keel did not export."""
    fmt_dir = Path(model_dir) / FORMAT_DIR
    return Format.from_dir(fmt_dir) if fmt_dir.is_dir() else None
