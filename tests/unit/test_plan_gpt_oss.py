"""`keel plan` on gpt-oss-20b (its kept config, published values): the MXFP4 checkpoint is
planned as the bf16 weights Keel dequantizes it to, the experts as a mixture (all held, top-4
active), and eager attention's score matrices (gpt-oss's sinks rule out flash attention) as
activations that grow with seq_len squared."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.plan import Cluster, GIB, estimate, model_shape, plan, render

from trainer.models.config import load_config
from trainer.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "gpt-oss" / "gpt-oss-20b-sft-lora.yaml"
ONE_H100 = Cluster(gpu="h100-80gb", nodes=1, gpus_per_node=1)


def test_gpt_oss_20b_is_planned_as_dequantized_bf16_experts_with_eager_attention_scores():
    config = load_config("openai/gpt-oss-20b")
    assert config["quantization_config"]["quant_method"] == "mxfp4"  # as published
    recipe = load_recipe(RECIPE)
    shape = model_shape(config, recipe.peft)
    assert shape.mxfp4 and shape.eager_attention and (shape.experts, shape.experts_per_token) == (32, 4)
    assert shape.params / 1e9 == pytest.approx(20.9, rel=0.02)
    assert shape.active / 1e9 == pytest.approx(4.2, rel=0.05)  # the model card's 3.6B active + embeddings
    est = estimate(recipe, shape, ONE_H100)
    # the frozen base in bf16 (2 bytes per parameter), not fp32: 84 GB would not fit one H100
    assert est.weights == pytest.approx(2 * (shape.params - shape.trainable) + 4 * shape.trainable)
    # attention scores: 64 heads x 4096^2 x 2 bytes = 2 GiB per layer; with checkpointing three live
    scores = 64 * 4096 ** 2 * 2
    assert scores == 2 * GIB
    no_sinks = shape.__class__(**{**shape.__dict__, "eager_attention": False})
    plain = estimate(recipe, no_sinks, ONE_H100)
    assert est.activations - plain.activations == pytest.approx(3 * scores)
    assert est.activations_no_ckpt - plain.activations_no_ckpt == pytest.approx((24 + 2) * scores)
    text = render(plan(recipe, ONE_H100, config))
    assert "verdict    fits" in text
    assert "MXFP4 checkpoint: experts dequantized to bf16" in text and "32 experts, 4 per token" in text
    assert "eager attention" in text and "seq_len^2 x 64 heads" in text


def test_eager_scores_grow_with_the_square_of_seq_len_and_8192_needs_more_than_one_h100():
    config = load_config("openai/gpt-oss-20b")
    short, long = (load_recipe(RECIPE, [f"training.seq_len={n}"]) for n in (2048, 8192))
    shape = model_shape(config, short.peft)
    a, b = (estimate(r, shape, ONE_H100) for r in (short, long))
    # logits and per-token activations scale 4x from 2048 to 8192, the scores 16x
    assert b.activations > 5 * a.activations
    result = plan(long, ONE_H100, config)
    assert not result.fits and result.suggestion
