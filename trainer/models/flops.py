"""FLOPs facts, once: each GPU's dense bf16 peak, and the training FLOPs per token that both
`keel plan`'s step time (trainer/plan.py) and the tracker's MFU (trainer/tracking/tracker.py)
count.

Training FLOPs per token (attention scores not counted, as in the PaLM paper's appendix B MFU):

    6 per trained parameter on the token's path: forward 2, backward 4 (the gradient of the
      layer's input, 2, and of its weight, 2);
    4 per frozen parameter on the token's path: forward 2 and the input-gradient half of backward,
      2. Under LoRA the frozen base still passes the gradient back to the adapters of earlier
      layers, but computes no weight gradient of its own.

"On the path": a mixture of experts counts the experts a token is routed to (top-k of them),
not every expert held (trainer/models/parameters.py, active_parameters). LoRA adapters are
counted whole as on the path: Keel's targets are attention and dense linear layers (the fused
expert tensors of transformers 5 are not linear layers and take no adapter). Gradient
checkpointing's recomputed forward is not model FLOPs (it is the hardware's extra work), so MFU
leaves it out; the planner's step time adds it on top, as it adds DPO's reference forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.models.parameters import active_parameters, parameter_counts


@dataclass(frozen=True)
class Gpu:
    kind: str  # the name `keel plan --gpu` takes
    device_name: str  # what torch.cuda.get_device_name() contains for it
    peak_bf16_flops: float  # dense (no 2:4 sparsity), bf16 inputs, fp32 accumulation


# Vendor figures, dense. The A10G is AWS's variant of the A10: NVIDIA publishes no datasheet for
# it, and its tensor throughput is not the A10's. The A10 datasheet's 125 TFLOP/s is 72 SMs x
# 1.695 GHz x 1,024 dense bf16 FLOPs per SM per clock (full-rate fp32 accumulation, as on the
# A40: 84 x 1.74 GHz x 1,024 = its datasheet's 149.7). The A10G is specified at 70 TFLOP/s dense
# bf16 (140 with sparsity) beside 35 TFLOP/s fp32: 80 SMs x ~1.71 GHz x 512, the half-rate fp32
# accumulation of GeForce Ampere parts; its CUDA cores are faster than the A10's, its tensor
# cores slower.
GPU_PEAKS = (
    Gpu("h100-80gb", "H100", 989e12),
    Gpu("h200-141gb", "H200", 989e12),
    Gpu("b200-180gb", "B200", 2250e12),
    Gpu("a100-80gb", "A100", 312e12),
    Gpu("a100-40gb", "A100", 312e12),
    Gpu("l40s-48gb", "L40S", 362e12),  # before the L4: "L4" is part of "NVIDIA L40S"
    Gpu("l4-24gb", "L4", 121e12),
    Gpu("a10g-24gb", "A10G", 70e12),
)
PEAK_BF16_FLOPS = {gpu.kind: gpu.peak_bf16_flops for gpu in GPU_PEAKS}


def device_peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of the GPU torch names `device_name`; None for one Keel has no figure for."""
    return next((gpu.peak_bf16_flops for gpu in GPU_PEAKS if gpu.device_name in device_name), None)


def training_flops_per_token(*, trained: int, frozen: int = 0) -> int:
    """FLOPs one trained-through token costs: 6 per trained and 4 per frozen parameter on its path."""
    return 6 * trained + 4 * frozen


def model_flops_per_token(config: dict, peft) -> int:
    """Training FLOPs per token for a model's config.json and a recipe's peft section: every active
    parameter trained (full fine-tuning), or the active base frozen and the adapters trained."""
    counts = parameter_counts(config)
    active = active_parameters(config, counts)
    if peft.kind == "none":
        return training_flops_per_token(trained=active)
    return training_flops_per_token(trained=counts.lora(peft.r, peft.target_modules), frozen=active)
