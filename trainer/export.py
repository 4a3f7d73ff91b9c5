"""Export a trained model as a serving-ready directory.

The directory holds everything `keel serve` needs and nothing it has to guess: safetensors
weights (LoRA merged), the tokenizer, the exact chat template used in training (also set in
tokenizer_config.json), the format spec, and `keel-export.yaml` with what training knew
(sequence length, base model, technique). It is written under a temporary name and renamed
when complete, so a crashed export never leaves a directory that looks servable.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from data.formats import SPEC_FILE, Format
from data.model_dir import EXPORT_INFO_FILE, FORMAT_DIR


def export_model(model, tokenizer, *, fmt: Format, out_dir: Path, info: dict) -> Path:
    """Write the model dir atomically. `model` is a plain or PEFT model on this process."""
    from peft import PeftModel
    from transformers import GenerationConfig

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in fmt.spec.stop_tokens]
    model.generation_config = GenerationConfig(
        eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
        pad_token_id=tokenizer.convert_tokens_to_ids(fmt.spec.pad_token),
    )
    model.config.eos_token_id = stop_ids[0]
    model.save_pretrained(tmp, safe_serialization=True)

    tokenizer.chat_template = fmt.chat_template
    tokenizer.save_pretrained(tmp)
    (tmp / fmt.spec.chat_template).write_text(fmt.chat_template, encoding="utf-8")
    fmt_dir = tmp / FORMAT_DIR
    fmt_dir.mkdir()
    # The spec as training used it, rendering options included (not the shipped file).
    (fmt_dir / SPEC_FILE).write_text(fmt.spec_yaml(), encoding="utf-8")
    (fmt_dir / fmt.spec.chat_template).write_text(fmt.chat_template, encoding="utf-8")
    (tmp / EXPORT_INFO_FILE).write_text(yaml.safe_dump(info, sort_keys=False), encoding="utf-8")

    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)
    return out_dir

