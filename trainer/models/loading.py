"""The model a run trains: the base model (+ quantization) and its adapters.

Each takes only the sections it needs, keyword-only, so what a builder depends on is visible
in its signature.
"""

from __future__ import annotations

import os
from typing import Any

from data.errors import KeelError
from trainer.arguments import check_device_support, compute_precision
from trainer.models.attention import DOCUMENT_SDPA, log_attention
from trainer.models.config import is_mxfp4, model_config, has_attention_sinks


def load_base_model(path: str, policy, *, dtype, config: dict | None = None, quantization_config=None,
                    attn_implementation: str | None = None):
    """The base model in `dtype`, loaded as training loads it: eager attention for a model with
    attention sinks; MXFP4 experts dequantized (transformers' Mxfp4Config(dequantize=True): the
    blocks and scales become bf16 weights on CPU and GPU alike, no kernels fetched; then cast, so
    every weight has one dtype) unless another `quantization_config` (QLoRA's 4-bit) is given.
    Used for the trained model, DPO's reference copy and export's rebuilt model."""
    from data.model_loading import load_causal_lm

    config = model_config(str(path)) if config is None else config
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        if attn_implementation == DOCUMENT_SDPA:
            from trainer.models.document_attention import register

            register()
        kwargs["attn_implementation"] = attn_implementation
    if has_attention_sinks(config):
        kwargs["attn_implementation"] = "eager"
    dequantize = quantization_config is None and is_mxfp4(config)
    if dequantize:
        from transformers import Mxfp4Config

        quantization_config = Mxfp4Config(dequantize=True)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = load_causal_lm(path, policy, **kwargs)
    if dequantize:
        model = model.to(dtype)  # dequantization writes bf16 whatever `dtype` asked
    return model


def base_dtype_name(*, peft, training, distributed=None) -> str:
    """'bf16' or 'fp32': the dtype the base model's weights are held in while training.

    On a bf16 run (GPUs) the base is held in bf16 wherever the field's practice does so: a LoRA
    base is frozen, so no optimizer ever reads it in fp32 (its adapters stay fp32: PEFT upcasts
    them, and the Trainer computes under bf16 autocast), and full fine-tuning under DeepSpeed ZeRO
    holds bf16 weights with an fp32 master copy of its own (an fp32 load would only be cast down).
    Full fine-tuning under ddp or fsdp2 keeps fp32 weights: they are the optimizer's master copy.
    QLoRA's base is 4-bit (computing in bf16); fp32 runs (CPU by default) hold fp32."""
    if peft.kind == "qlora":
        return "nf4"
    if compute_precision(training) != "bf16":
        return "fp32"
    if peft.kind == "lora":
        return "bf16"
    strategy = getattr(distributed, "strategy", "ddp")
    return "bf16" if strategy.startswith("zero") else "fp32"


def build_model(*, model_section, peft, training, distributed=None):
    """The base model, in the dtype it trains in (base_dtype_name); 4-bit for QLoRA.

    gpt-oss: eager attention, the implementation that honours its attention sinks; an MXFP4
    checkpoint is dequantized at load and held as the run computes: bf16 for a LoRA base on a
    bf16 run (the frozen 20B then takes ~42 GB, not ~84 GB in fp32), fp32 otherwise."""
    import torch

    config = model_config(model_section.path)
    if is_mxfp4(config) and peft.kind == "qlora":
        raise KeelError(f"peft.kind: qlora quantizes the base to 4-bit NF4, but {model_section.path} is stored "
                        "in MXFP4 (quantization_config.quant_method mxfp4), which Keel dequantizes to bf16 for "
                        "training; use peft.kind: lora (the bf16 base is frozen)")
    check_device_support(peft=peft, training=training)
    held = base_dtype_name(peft=peft, training=training, distributed=distributed)
    if os.environ.get("RANK", "0") == "0":
        print(f"[keel] base model weights held in {held}"
              + {"bf16": " (frozen under LoRA, adapters in fp32)" if peft.kind == "lora" else
                 " (DeepSpeed keeps the fp32 master copy)",
                 "fp32": "", "nf4": " (QLoRA, computing in bf16)"}[held], flush=True)
    # Keel chooses the attention implementation (trainer/models/attention.py) and, for packed rows,
    # refuses one that would mix the examples of a row, before any weight is loaded.
    attention = log_attention(config, packing=training.packing).implementation if config else None
    if peft.kind != "qlora":
        dtype = torch.bfloat16 if held == "bf16" else torch.float32
        return load_base_model(model_section.path, model_section.load_policy, dtype=dtype, config=config,
                               attn_implementation=attention)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = load_base_model(model_section.path, model_section.load_policy, dtype=torch.bfloat16, config=config,
                            quantization_config=nf4, attn_implementation=attention)

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=training.gradient_checkpointing)


def build_peft_config(peft):
    """LoRA config from the recipe's peft section (None for full fine-tuning)."""
    if peft.kind == "none":
        return None
    from peft import LoraConfig

    return LoraConfig(r=peft.r, lora_alpha=peft.alpha, lora_dropout=peft.dropout,
                      target_modules=peft.target_modules, task_type="CAUSAL_LM")


