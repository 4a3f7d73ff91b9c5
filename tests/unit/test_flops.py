"""One home for FLOPs facts (trainer/models/flops.py): `keel plan`'s step time and the tracker's
MFU count the same training FLOPs per token (6 per trained, 4 per frozen parameter a token passes
through) over the same GPU peaks. A mixture of experts counts the experts a token is routed to; a
LoRA run counts the frozen base's forward and input gradients, and the adapters' full backward."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.models.config import load_config
from trainer.models.flops import GPU_PEAKS, PEAK_BF16_FLOPS, device_peak_flops
from trainer.models.parameters import parameter_counts
from trainer.plan import ASSUMED_MFU, GPUS, Cluster, plan
from trainer.recipe import load_recipe
from trainer.tracking.tracker import mfu
from trainer.train import mfu_flops_per_token

REPO = Path(__file__).resolve().parents[2]
EIGHT_H100 = Cluster(gpu="h100-80gb", nodes=1, gpus_per_node=8)
H100 = "NVIDIA H100 80GB HBM3"


def planned_and_tracked(recipe) -> tuple[int, float, float]:
    """FLOPs per token as keel plan counts them and as the training run hands them to its tracker,
    and the MFU the tracker reports for 24,000 tokens/s on 8 H100s."""
    step = plan(recipe, EIGHT_H100, load_config(recipe.model.path)).step
    tracked = mfu_flops_per_token(recipe)
    return step.model_flops_per_token, tracked, mfu(24_000, flops_per_token=tracked, world=8, device_name=H100)


def test_a_mixture_of_experts_counts_the_experts_a_token_is_routed_to():
    recipe = load_recipe(REPO / "recipes" / "qwen3" / "qwen3-30b-a3b-sft-lora.yaml", ["peft.kind=none"])
    counts = parameter_counts(load_config("Qwen/Qwen3-30B-A3B"))
    active = counts.total - round(counts.experts * (1 - 8 / 128))  # 8 of 128 experts per token
    planned, tracked, util = planned_and_tracked(recipe)
    assert planned == tracked == 6 * active
    assert 6 * 3.2e9 < tracked < 6 * 3.5e9  # "A3B": about 3.3B of 30.5B parameters active
    assert util == pytest.approx(6 * active * 24_000 / (8 * 989e12))


def test_lora_counts_the_frozen_base_forward_and_input_gradients_and_the_adapters_backward():
    recipe = load_recipe(REPO / "recipes" / "qwen3" / "qwen3-8b-sft-lora.yaml")
    assert recipe.peft.target_modules == "all-linear"
    r = recipe.peft.r
    # Qwen3 8B: hidden 4096, 32 query and 8 key/value heads of 128, MLP 12288, 36 layers
    adapters = 36 * r * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 12288) * 3)
    base = parameter_counts(load_config("Qwen/Qwen3-8B")).total
    assert 8.1e9 < base < 8.3e9
    planned, tracked, util = planned_and_tracked(recipe)
    assert planned == tracked == 4 * base + 6 * adapters
    assert util == pytest.approx((4 * base + 6 * adapters) * 24_000 / (8 * 989e12))


def test_lora_on_a_mixture_of_experts_counts_both():
    recipe = load_recipe(REPO / "recipes" / "qwen3" / "qwen3-30b-a3b-sft-lora.yaml")
    counts = parameter_counts(load_config("Qwen/Qwen3-30B-A3B"))
    active = counts.total - round(counts.experts * (1 - 8 / 128))
    adapters = counts.lora(recipe.peft.r, recipe.peft.target_modules)
    planned, tracked, _ = planned_and_tracked(recipe)
    assert planned == tracked == 4 * active + 6 * adapters


def test_plan_and_tracker_read_one_peak_table():
    assert set(PEAK_BF16_FLOPS) == set(GPUS)  # every `keel plan --gpu` kind has its peak
    for gpu in GPU_PEAKS:
        assert device_peak_flops(f"NVIDIA {gpu.device_name}") == PEAK_BF16_FLOPS[gpu.kind], gpu
    # names as torch reports them; the L40S is not taken for an L4, nor an A10G for an A100
    assert device_peak_flops("NVIDIA L40S") == 362e12 and device_peak_flops("NVIDIA L4") == 121e12
    assert device_peak_flops("NVIDIA A10G") == PEAK_BF16_FLOPS["a10g-24gb"] == 70e12
    assert device_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    recipe = load_recipe(REPO / "recipes" / "qwen3" / "qwen3-0.6b-sft-full.yaml")
    step = plan(recipe, Cluster(gpu="a10g-24gb", gpus_per_node=1), load_config(recipe.model.path)).step
    assert step.compute_s == pytest.approx(step.flops / (70e12 * ASSUMED_MFU))
