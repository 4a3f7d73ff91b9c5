"""`keel tiny-model OUT --arch gpt_oss`: a tiny gpt-oss that vLLM's CPU path can serve (head_dim 64,
sizes multiples of 32, sliding window on the even layers where vLLM puts it, yarn rope and stop
ids as published) with gpt-oss's own tokenizer; and its export with the harmony format, which has
no chat template: the model dir carries the format's spec and the stop ids, and no template."""

from __future__ import annotations

import json

import pytest

from data.errors import KeelError


def test_gpt_oss_takes_the_harmony_format_and_only_it(tmp_path):
    from trainer.models.tiny import build_tiny_model

    with pytest.raises(KeelError, match="--arch gpt_oss is trained and served with the harmony format only"):
        build_tiny_model(tmp_path / "a", arch="gpt_oss", fmt_name="hermes-qwen3")
    with pytest.raises(KeelError, match="only --arch gpt_oss is served through harmony"):
        build_tiny_model(tmp_path / "b", arch="qwen3", fmt_name="harmony")
    with pytest.raises(KeelError, match="--hidden 80: must be a multiple of 32"):
        build_tiny_model(tmp_path / "c", arch="gpt_oss", hidden=80)
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.slow  # builds the 201,088-token harmony tokenizer (~10 s) and a 26M-parameter model
def test_tiny_gpt_oss_is_shaped_for_vllm_and_exports_without_a_chat_template(tmp_path):
    import torch
    from transformers import AutoConfig

    from data.formats import load_format
    from data.harmony_tokenizer import same_ids_as_harmony
    from data.model_dir import ExportInfo, load_model_format
    from data.model_loading import load_causal_lm, load_tokenizer
    from trainer.export import write_model_dir
    from trainer.models.tiny import build_tiny_model

    out = build_tiny_model(tmp_path / "tiny", arch="gpt_oss", hidden=64)
    config = AutoConfig.for_model(**json.loads((out / "config.json").read_text()))
    assert config.model_type == "gpt_oss" and config.vocab_size == 201088
    assert config.head_dim == 64 and config.hidden_size % 32 == 0 and config.intermediate_size % 32 == 0
    assert config.layer_types == ["sliding_attention", "full_attention"]  # vLLM: sliding iff layer_idx % 2 == 0
    assert (config.num_local_experts, config.num_experts_per_tok) == (4, 2)
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 32.0
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [200002, 199999, 200012] and generation["pad_token_id"] == 199999
    tokenizer = load_tokenizer(out)
    assert same_ids_as_harmony(tokenizer) is None
    model = load_causal_lm(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.layers[0].self_attn.sinks.shape == (config.num_attention_heads,)

    fmt = load_format("harmony")
    assert fmt.chat_template is None
    export = write_model_dir(model, tokenizer, fmt=fmt, out_dir=tmp_path / "export", info=ExportInfo(format="harmony"))
    assert not list(export.rglob("*.jinja"))
    assert "chat_template" not in json.loads((export / "tokenizer_config.json").read_text())
    assert load_model_format(export).harmony
    stops = json.loads((export / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(stops) == [199999, 200002, 200012]  # <|endoftext|>, <|return|>, <|call|>
    assert json.loads((export / "config.json").read_text())["eos_token_id"] == 200002
