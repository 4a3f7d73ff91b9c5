"""A model's config.json, read once for every reader (the planner, the recipe's checks, formats,
the server): strict JSON, and the sizes that build tensors checked before anything builds them."""

from __future__ import annotations

from pathlib import Path

from data.errors import KeelError
from data.files import quote, read_json

CONFIG_FILE = "config.json"
# Sizes in a config.json that build tensors: each a positive integer, none beyond what any model
# has (a hidden size of 2^40 is a corrupt file, and torch would fail on it with a C++ dump).
CONFIG_SIZES = {"hidden_size": 1 << 20, "intermediate_size": 1 << 22, "moe_intermediate_size": 1 << 22,
                "num_hidden_layers": 10_000, "num_attention_heads": 1 << 16, "num_key_value_heads": 1 << 16,
                "head_dim": 1 << 16, "vocab_size": 1 << 24, "max_position_embeddings": 1 << 31,
                "num_local_experts": 1 << 16, "num_experts": 1 << 16, "num_experts_per_tok": 1 << 16}
# parameters a config may describe (the largest published models hold a few 10^12)
MAX_PARAMETERS = 10 ** 14


def read_model_config(config_file: str | Path) -> dict:
    """A model's config.json as a dict, its sizes checked: what every reader of one goes through."""
    config = read_json(config_file, what="model config", expect=dict)
    for where, section in (("", config), ("text_config.", config.get("text_config"))):
        if not isinstance(section, dict):
            if section is not None:
                raise KeelError(f"{config_file}: text_config must be a JSON object, got {quote(section)}")
            continue
        for key, limit in CONFIG_SIZES.items():
            value = section.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise KeelError(f"{config_file}: {where}{key} is {quote(value)}; expected a whole number from 1 to "
                                f"{limit:,} (is the config.json corrupt?)")
        _check_heads(config_file, where, section)
        hidden, layers = section.get("hidden_size") or 0, section.get("num_hidden_layers") or 0
        wide = max(section.get("intermediate_size") or 0, 4 * hidden) * max(section.get("num_local_experts")
                                                                           or section.get("num_experts") or 1, 1)
        params = layers * (4 * hidden * hidden + 3 * hidden * wide) + 2 * hidden * (section.get("vocab_size") or 0)
        if params > MAX_PARAMETERS:
            raise KeelError(f"{config_file}: its sizes describe about {params:.1e} parameters, beyond any model "
                            f"({MAX_PARAMETERS:.0e}); is the config.json corrupt?")
    return config



def _check_heads(config_file, where: str, section: dict) -> None:
    """Attention heads that fit together: key/value heads divide the query heads (each key/value
    head serves a whole group), and without an explicit head_dim the hidden size splits evenly
    over the heads (as transformers and vLLM derive head_dim). Otherwise building the model fails
    deep inside torch with a shape error."""
    heads, kv = section.get("num_attention_heads"), section.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise KeelError(f"{config_file}: {where}num_key_value_heads {kv} does not divide num_attention_heads "
                        f"{heads}; each key/value head serves a whole group of query heads (is the config.json "
                        "corrupt, or edited by hand?)")
    hidden = section.get("hidden_size")
    if heads and hidden and section.get("head_dim") is None and hidden % heads:
        raise KeelError(f"{config_file}: {where}hidden_size {hidden} is not a multiple of num_attention_heads "
                        f"{heads} and no head_dim is given; set head_dim, or a head count that divides hidden_size")
