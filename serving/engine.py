"""vLLM engine settings derived from the model and the deployment target, not guessed.

`engine_settings(config, export_info, target, adapters)` takes what a model dir holds
(config.json as a dict, keel-export.yaml as a dict, the LoRA adapters to serve) and where it
will run (GPU count and memory, or CPU) and returns the settings with the reason for each.
It reads no files and imports nothing heavy, so it is unit-tested on real architecture configs
(an 8B and a 70B Llama) on a machine without a GPU.

Memory arithmetic, per GPU with tensor parallelism over `tp` GPUs:
    weights     total weight bytes / tp (measured from the safetensors when the dir has them,
                else estimated from the architecture)
    KV cache    2 (K and V) x layers x kv heads per GPU x head_dim x dtype bytes, per token
    headroom    CUDA context, CUDA graphs and activations: HEADROOM_GIB, kept out of
                gpu_memory_utilization
The model must fit with room for at least one sequence of max_model_len tokens of KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from data.errors import KeelError
from data.model_dir import ExportInfo

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# vLLM's accepted --max-lora-rank values (vllm/config/lora.py MaxLoRARanks, v0.32).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Left outside gpu_memory_utilization for the CUDA context, CUDA graphs and activation buffers;
# vLLM's own default (0.9) leaves 8 GiB of an 80 GiB GPU, more than needed, and too little of
# a 16 GiB one. Clamped so small GPUs still get most of their memory and big ones keep a margin.
HEADROOM_GIB = 3.0
UTILIZATION_RANGE = (0.80, 0.95)
# CPU backend: KV cache space (VLLM_CPU_KVCACHE_SPACE, GiB) for this many full-length sequences,
# at least 1 GiB (vLLM's CPU default of 4 GiB per process is sized for big hosts).
CPU_KV_SEQUENCES = 16
GIB = 1024 ** 3


@dataclass(frozen=True)
class Target:
    """Where the server runs: `gpus` GPUs of `gpu_memory_gib` each, or the CPU (gpus=0)."""

    gpus: int = 0
    gpu_memory_gib: float | None = None

    def __post_init__(self):
        if self.gpus < 0:
            raise KeelError(f"GPU count must be 0 (CPU) or more, got {self.gpus}")
        if self.gpus and not self.gpu_memory_gib:
            raise KeelError("a GPU target needs the memory of one GPU (GiB)")


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    rank: int


@dataclass
class EngineSettings:
    max_model_len: int
    dtype: str
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    cpu_kvcache_space_gib: int | None = None
    max_lora_rank: int | None = None
    max_loras: int | None = None
    kv_cache_tokens: int | None = None  # estimated KV capacity (GPU), for the log line
    reasons: list[str] = field(default_factory=list)

    def args(self) -> list[str]:
        """vLLM command-line arguments (env settings such as the CPU KV space are separate)."""
        out = ["--max-model-len", str(self.max_model_len), "--dtype", self.dtype]
        if self.tensor_parallel_size > 1:
            out += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.gpu_memory_utilization is not None:
            out += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:.2f}"]
        if self.max_lora_rank is not None:
            out += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras)]
        return out


def _text_config(config: dict) -> dict:
    # Multimodal and some newer configs nest the language model's settings.
    return config.get("text_config") or config


def config_dtype(config: dict) -> str | None:
    dtype = _text_config(config).get("dtype") or _text_config(config).get("torch_dtype") or config.get("dtype")
    return str(dtype) if dtype else None


def head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def estimate_parameters(config: dict) -> int:
    """Parameter count of a Llama-style decoder from its config (attention + gated MLP)."""
    cfg = _text_config(config)
    hidden, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = head_dim(cfg)
    inter = cfg.get("intermediate_size") or 4 * hidden
    attention = hidden * heads * hd * 2 + hidden * kv * hd * 2
    mlp = 3 * hidden * inter
    embeddings = vocab * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp + 2 * hidden) + embeddings + hidden


def kv_bytes_per_token(config: dict, dtype: str, tp: int) -> int:
    """KV cache bytes per token on one GPU (kv heads split over tp, replicated when fewer)."""
    cfg = _text_config(config)
    kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    kv_per_gpu = max(1, math.ceil(kv / tp))
    return 2 * cfg["num_hidden_layers"] * kv_per_gpu * head_dim(cfg) * DTYPE_BYTES.get(dtype, 2)


def tensor_parallel_size(config: dict, gpus: int) -> int:
    """The most GPUs, up to `gpus`, that split the attention heads evenly (vLLM requires it)."""
    heads = _text_config(config)["num_attention_heads"]
    return max(tp for tp in range(1, gpus + 1) if heads % tp == 0)


def lora_rank(ranks: list[int]) -> int:
    top = max(ranks)
    for allowed in LORA_RANKS:
        if allowed >= top:
            return allowed
    raise KeelError(f"LoRA rank {top} is above the largest rank vLLM serves ({LORA_RANKS[-1]})")


def _max_model_len(config: dict, info: ExportInfo, reasons: list[str]) -> int:
    positions = _text_config(config).get("max_position_embeddings")
    seq_len = info.seq_len
    if seq_len and positions and seq_len > positions:
        raise KeelError(f"keel-export.yaml seq_len {seq_len} is longer than the model's {positions} positions "
                        "(max_position_embeddings in config.json); the export is inconsistent")
    if seq_len:
        reasons.append(f"max_model_len {seq_len}: the context length training used (keel-export.yaml seq_len); "
                       "longer prompts were never seen in training")
        return int(seq_len)
    if not positions:
        raise KeelError("config.json has no max_position_embeddings and keel-export.yaml no seq_len: "
                        "pass --max-model-len after `--`")
    reasons.append(f"max_model_len {positions}: the model's positions (max_position_embeddings; no training "
                   "seq_len recorded)")
    return int(positions)


def engine_settings(config: dict, export_info: ExportInfo, target: Target, adapters: list[AdapterInfo] = (),
                    weight_bytes: int | None = None) -> EngineSettings:
    """The vLLM settings for this model on this target, each with its reason."""
    reasons: list[str] = []
    max_len = _max_model_len(config, export_info, reasons)
    dtype = str(export_info.dtype or config_dtype(config) or "bfloat16")
    if dtype not in DTYPE_BYTES:
        raise KeelError(f"unsupported dtype {dtype!r} for serving; expected one of {', '.join(DTYPE_BYTES)}")
    reasons.append(f"dtype {dtype}: as trained (vLLM's CPU backend would otherwise downcast float32)")
    settings = EngineSettings(max_model_len=max_len, dtype=dtype, reasons=reasons)
    if adapters:
        settings.max_lora_rank = lora_rank([a.rank for a in adapters])
        settings.max_loras = len(adapters)
        reasons.append(f"max_lora_rank {settings.max_lora_rank}: the largest adapter rank "
                       f"({max(a.rank for a in adapters)}) rounded up to a rank vLLM accepts; "
                       f"max_loras {len(adapters)}: every adapter can be in one batch")
    params = estimate_parameters(config)
    weights = weight_bytes if weight_bytes else params * DTYPE_BYTES[dtype]
    if target.gpus == 0:
        kv = kv_bytes_per_token(config, dtype, 1) * max_len * CPU_KV_SEQUENCES
        settings.cpu_kvcache_space_gib = max(1, math.ceil(kv / GIB))
        reasons.append(f"CPU KV cache {settings.cpu_kvcache_space_gib} GiB: {CPU_KV_SEQUENCES} sequences of "
                       f"{max_len} tokens")
        return settings
    tp = tensor_parallel_size(config, target.gpus)
    mem = target.gpu_memory_gib * GIB
    util = min(max(1 - HEADROOM_GIB / target.gpu_memory_gib, UTILIZATION_RANGE[0]), UTILIZATION_RANGE[1])
    per_gpu_weights = weights / tp
    kv_token = kv_bytes_per_token(config, dtype, tp)
    free = util * mem - per_gpu_weights
    if free < kv_token * max_len:
        need = (per_gpu_weights + kv_token * max_len) / util / GIB
        raise KeelError(
            f"the model does not fit: {weights / GIB:.1f} GiB of {dtype} weights over {tp} GPU(s) of "
            f"{target.gpu_memory_gib:g} GiB leave no room for one {max_len}-token sequence of KV cache "
            f"(about {need:.0f} GiB per GPU needed); use more GPUs or a shorter --max-model-len")
    settings.tensor_parallel_size = tp
    settings.gpu_memory_utilization = round(util, 2)
    settings.kv_cache_tokens = int(free // kv_token)
    reasons.append(f"tensor_parallel_size {tp}: {target.gpus} GPU(s), {_text_config(config)['num_attention_heads']} "
                   "attention heads split evenly")
    reasons.append(f"gpu_memory_utilization {settings.gpu_memory_utilization:.2f}: {HEADROOM_GIB:g} GiB of "
                   f"{target.gpu_memory_gib:g} GiB left for CUDA context, graphs and activations; "
                   f"{per_gpu_weights / GIB:.1f} GiB weights per GPU, KV cache for about "
                   f"{settings.kv_cache_tokens} tokens")
    return settings
