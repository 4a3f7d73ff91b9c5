"""Model facts read from a model's config.json: no torch, no transformers import (except
`model_config`'s fallback for a hub id Keel does not keep). The planner, the recipe's checks and
the loader all read them here."""

from __future__ import annotations

from pathlib import Path

from data.errors import KeelError
from data.model_config import read_model_config
from trainer.models.known import known_model


def load_config(model_path: str) -> dict:
    """The model's config.json: from a local directory, or kept in trainer/models/architectures/ for the
    hub ids Keel knows (never fetched from the hub)."""
    known = known_model(model_path)
    if known is not None:
        return known.config()
    p = Path(model_path).expanduser()
    if not (p / "config.json").is_file():
        raise KeelError(f"model.path: {model_path!r}: keel plan reads the model's config.json and found none there; "
                        "point model.path at a local model directory, or at a hub id Keel keeps the config of "
                        "(trainer/models/architectures/models.yaml; other hub ids need the config downloaded first)")
    return read_model_config(p / "config.json")


def model_config(model_path: str) -> dict:
    """The base model's config.json as a dict: what `keel plan` reads (a local directory's, or the
    kept one of a hub id Keel knows: load_config), else the hub's (config only; no
    weights, no model code)."""
    if known_model(model_path) is not None or (Path(model_path).expanduser() / "config.json").is_file():
        return load_config(model_path)  # a malformed config.json is the user's to fix, not a hub lookup
    from transformers import PretrainedConfig

    try:
        return PretrainedConfig.get_config_dict(model_path)[0]
    except (OSError, ValueError):
        return {}  # loading the model reports what is missing


def has_attention_sinks(config: dict) -> bool:
    """gpt-oss: every attention head has a learned sink logit (a softmax column no key fills).
    transformers' eager attention adds it; SDPA cannot (gpt-oss declares no SDPA), flash-attention-2
    drops it silently, and Keel's CPU packed attention (document_attention.py) has no place for it."""
    return config.get("model_type") == "gpt_oss"


PACKING_WITH_SINKS = (
    "training.packing: {what} has attention sinks (model type gpt_oss), which only eager attention adds here, "
    "and packed examples need a mask that keeps them apart: transformers' GptOss model builds its mask without "
    "the restarting position ids, so packed examples would attend to each other, while flash attention's varlen "
    "kernels and Keel's per-document SDPA (CPU) would drop the sinks; set training.packing: false")


def packing_problem(config: dict, packing: bool, what: str) -> str | None:
    """Why packed rows cannot train this model correctly (None: they can)."""
    if packing and has_attention_sinks(config):
        return PACKING_WITH_SINKS.format(what=what)
    return None


def is_mxfp4(config: dict) -> bool:
    """A checkpoint whose experts are stored in MXFP4 (*_blocks, *_scales), as gpt-oss is published."""
    quant = config.get("quantization_config") or {}
    return isinstance(quant, dict) and quant.get("quant_method") == "mxfp4"
