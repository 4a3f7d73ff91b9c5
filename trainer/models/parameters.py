"""Parameter counts from a model's config.json, by arithmetic: no torch, no transformers.

`keel plan` needs the total, one decoder layer's, the experts' share (a mixture of experts) and
what LoRA adds for the recipe's target modules. Each architecture Keel knows is written out below
as its transformers modules are built (transformers 5: linear layers with their biases, norms,
embeddings, fused expert tensors); tests/unit/test_parameter_counts.py checks every count against
the model instantiated on PyTorch's meta device, exactly, for every kept config and the tiny
models. A model type not written here is refused by name: an estimate from a guessed layout
would be silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from data.errors import KeelError


@dataclass(frozen=True)
class Linear:
    """An nn.Linear: what LoRA's target_modules match (by its own name) and adapt."""
    name: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Weights:
    """Parameters outside any nn.Linear: embeddings, norms, routers, fused expert tensors, sinks."""
    params: int
    experts: bool = False  # inside an MoE layer's experts (a token runs through top-k of them)


Part = Linear | Weights


@dataclass(frozen=True)
class ParameterCounts:
    parts: tuple[tuple[Part, int], ...]  # each part of the model, with how many times it occurs
    layer: int  # parameters of the first decoder layer

    @property
    def total(self) -> int:
        return sum(part.params * n for part, n in self.parts)

    @property
    def experts(self) -> int:
        return sum(part.params * n for part, n in self.parts if isinstance(part, Weights) and part.experts)

    def lora(self, r: int, target_modules: str | list[str]) -> int:
        """Adapter parameters: r x (in + out) for each targeted linear layer. `all-linear` is every
        linear layer but the output head, as PEFT reads it."""
        return sum(r * (part.in_features + part.out_features) * n for part, n in self.parts
                   if isinstance(part, Linear) and part.name != "lm_head"
                   and (target_modules == "all-linear" or part.name in target_modules))


# What transformers' config class of each model type assumes for a field config.json leaves out
# (published multimodal Gemma 3 configs, for one, leave most of their text_config to these).
# head_dim, where not listed, is hidden_size / num_attention_heads; num_key_value_heads, where not
# listed, is num_attention_heads.
DEFAULTS: dict[str, dict] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, head_dim=128),
    "qwen3_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                      num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=4, num_experts=128,
                      num_experts_per_tok=8),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, tie_word_embeddings=True),
    "gemma3": dict(tie_word_embeddings=True),
    "gpt_oss": dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
                    num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=128,
                    num_experts_per_tok=4, attention_bias=True),
}
KNOWN_TYPES = tuple(DEFAULTS)


def with_defaults(config: dict, model_type: str) -> dict:
    """The config as transformers reads it: what it leaves out (or sets to null) takes the model
    type's default."""
    return {**DEFAULTS[model_type], **{k: v for k, v in config.items() if v is not None}}


def _dense_mlp(h: int, intermediate: int, bias: bool = False) -> list[Part]:
    return [Linear("gate_proj", h, intermediate, bias), Linear("up_proj", h, intermediate, bias),
            Linear("down_proj", intermediate, h, bias)]


def _decoder(config: dict, model_type: str) -> list[list[Part]]:
    """Each decoder layer's parts, as transformers builds them for `model_type`."""
    h, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    bias = bool(config.get("attention_bias", False))
    q_bias, kv_bias, o_bias = {"qwen2": (True, True, False), "mistral": (False, False, False)}.get(
        model_type, (bias, bias, bias))
    attention: list[Part] = [Linear("q_proj", h, heads * hd, q_bias), Linear("k_proj", h, kv * hd, kv_bias),
                             Linear("v_proj", h, kv * hd, kv_bias), Linear("o_proj", heads * hd, h, o_bias)]
    if model_type in ("qwen3", "qwen3_moe", "gemma3_text"):
        attention += [Weights(hd), Weights(hd)]  # q_norm, k_norm over the head dim
    if model_type == "gpt_oss":
        attention.append(Weights(heads))  # one sink logit per head
    norms = [Weights(h)] * (4 if model_type == "gemma3_text" else 2)
    intermediate = config["intermediate_size"]
    if model_type == "gpt_oss":
        e = config["num_local_experts"]
        # router (weight and bias; not an nn.Linear); experts: fused gate_up (+ bias) and down (+ bias)
        mlp = [Weights(e * h + e), Weights(e * (h * 2 * intermediate + 2 * intermediate + intermediate * h + h),
                                            experts=True)]
        return [attention + mlp + norms] * layers
    if model_type == "qwen3_moe":
        e = config.get("num_experts") or 0
        moe = config.get("moe_intermediate_size") or intermediate
        dense_only, step = config.get("mlp_only_layers") or [], config.get("decoder_sparse_step") or 1
        out = []
        for i in range(layers):
            sparse = i not in dense_only and e > 0 and (i + 1) % step == 0
            # router (not an nn.Linear), experts' fused gate_up and down
            mlp = [Weights(e * h), Weights(e * 3 * moe * h, experts=True)] if sparse else _dense_mlp(h, intermediate)
            out.append(attention + mlp + norms)
        return out
    return [attention + _dense_mlp(h, intermediate, bool(config.get("mlp_bias", False))) + norms] * layers


def _siglip_vision(config: dict) -> list[tuple[Part, int]]:
    """Gemma 3's vision tower (SigLIP's vision transformer), as transformers builds it."""
    h, inter = config.get("hidden_size", 768), config.get("intermediate_size", 3072)
    layers, channels = config.get("num_hidden_layers", 12), config.get("num_channels", 3)
    patch, image = config.get("patch_size", 16), config.get("image_size", 224)
    mlp = [Linear("fc1", h, inter, True), Linear("fc2", inter, h, True)]
    layer = [Weights(2 * h), *(Linear(n, h, h, True) for n in ("q_proj", "k_proj", "v_proj", "out_proj")),
             Weights(2 * h), *mlp]
    parts: list[tuple[Part, int]] = [(Weights(channels * patch * patch * h + h), 1),  # patch embedding (a conv)
                                     (Weights((image // patch) ** 2 * h), 1),  # position embedding
                                     *((p, layers) for p in layer), (Weights(2 * h), 1)]  # post layer norm
    if config.get("vision_use_head", True):  # attention pooling: probe, in-projection, out_proj, norm, MLP
        parts += [(Weights(h + 3 * h * h + 3 * h), 1), (Linear("out_proj", h, h, True), 1), (Weights(2 * h), 1),
                  *((p, 1) for p in mlp)]
    return parts


def text_config(config: dict) -> dict:
    """The language model's config, with its model type's defaults: the config itself, or a
    multimodal config's text_config (Gemma 3)."""
    if config.get("model_type") == "gemma3":
        return with_defaults({"model_type": "gemma3_text", **(config.get("text_config") or {})}, "gemma3_text")
    return with_defaults(config, config["model_type"]) if config.get("model_type") in DEFAULTS else config


def parameter_counts(config: dict) -> ParameterCounts:
    """What AutoModelForCausalLM.from_config(config) holds, counted from the config's numbers.
    Gemma 3's multimodal config (model_type gemma3) loads with its vision tower and projector,
    which are held and trained too: they are counted (the text config alone has neither)."""
    model_type = config.get("model_type")
    if model_type is None:
        raise KeelError("model config has no model_type; keel plan needs the model's config.json")
    if model_type not in KNOWN_TYPES:
        raise KeelError(f"model_type {model_type!r}: keel plan counts parameters from config.json for the model "
                        f"types Keel knows ({', '.join(KNOWN_TYPES)}) and has no layout for this one, so it cannot "
                        "size the run; train without a plan, or add the architecture's layout to "
                        "trainer/models/parameters.py (tests/unit/test_parameter_counts.py checks it)")
    config = with_defaults(config, model_type)
    text, text_type, parts = config, model_type, []
    if model_type == "gemma3":
        text, text_type = text_config(config), "gemma3_text"
        vision = config.get("vision_config") or {}
        parts = _siglip_vision(vision)
        # projector: the vision-to-text projection and its RMS norm
        parts.append((Weights(vision.get("hidden_size", 768) * text["hidden_size"] + vision.get("hidden_size", 768)),
                      1))
    h, vocab = text["hidden_size"], text["vocab_size"]
    tied = text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
    decoder = _decoder(text, text_type)
    parts.append((Weights(vocab * h), 1))  # token embeddings
    parts += [(part, 1) for layer in decoder for part in layer]
    parts.append((Weights(h), 1))  # final norm
    if not tied:
        parts.append((Linear("lm_head", h, vocab), 1))
    return ParameterCounts(parts=tuple(parts), layer=sum(p.params for p in decoder[0]))


def experts_and_top_k(config: dict) -> tuple[int, int]:
    """Experts per MoE layer and how many of them a token is routed to; (0, 0) for a dense model."""
    text = text_config(config)
    experts = text.get("num_experts") or text.get("num_local_experts") or 0
    top_k = text.get("num_experts_per_tok") or 0
    return (experts, top_k) if experts and top_k else (0, 0)


def active_parameters(config: dict, counts: ParameterCounts | None = None) -> int:
    """Parameters a token passes through: all of them, less the experts it is not routed to (every
    expert's weights are still held, trained and sharded)."""
    counts = counts or parameter_counts(config)
    experts, top_k = experts_and_top_k(config)
    if not experts:
        return counts.total
    return counts.total - round(counts.experts * (1 - top_k / experts))
