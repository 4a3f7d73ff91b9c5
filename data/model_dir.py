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

from data.files import read_yaml
from data.formats import Format

EXPORT_INFO_FILE = "keel-export.yaml"
FORMAT_DIR = "keel-format"
# the artifact of an MLflow registry version that points at an export living elsewhere (a shared
# volume): {"location": PATH}; written by trainer/tracking/tracker.py, followed by serving/pull.py
MODEL_REF_FILE = "keel-model-ref.json"


def read_export_info(model_dir: str | Path) -> dict:
    path = Path(model_dir) / EXPORT_INFO_FILE
    if not path.is_file():
        return {}
    return read_yaml(path, what="export record", expect=dict)


def load_model_format(model_dir: str | Path) -> Format | None:
    """The format a Keel export was trained with, or None for a model Keel did not export."""
    fmt_dir = Path(model_dir) / FORMAT_DIR
    return Format.from_dir(fmt_dir) if fmt_dir.is_dir() else None
