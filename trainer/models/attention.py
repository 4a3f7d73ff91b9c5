"""Which attention implementation a run uses, chosen by Keel and printed at start, and the check
that packed rows stay per document under it.

The choice (select_attention):

- attention sinks (gpt-oss): eager, the one implementation that adds them (packing is refused
  for these models: trainer/models/config.py);
- a CUDA GPU with flash-attn installed: `flash_attention_2`, whose varlen kernels run each packed
  document alone (transformers reads the restarting position ids);
- CPU with packed rows: Keel's per-document SDPA (`keel_document_sdpa`,
  trainer/models/document_attention.py), unless the model has sliding-window layers, which that
  function does not window: then SDPA with transformers' block-diagonal mask;
- otherwise SDPA (transformers builds a block-diagonal mask from the position ids of packed rows).

Whether packed rows stay per document is a property of transformers' model code and mask
builders, which change between versions. check_packed_attention does not trust a table: it
builds the same architecture shrunk to two layers of width 64 (random weights, on CPU, in
milliseconds) and compares the logits of three documents packed into one row under the chosen
implementation with each document's logits alone under eager attention (transformers' reference
implementation, same weights). If they differ, the run is refused before any weight is
loaded, naming training.packing. flash_attention_2 cannot run on CPU: its probe runs only where
it runs (benchmarks/gpu_check.py runs it on the GPU).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from data.errors import KeelError
from trainer.models.config import has_attention_sinks

FLASH = "flash_attention_2"
SDPA = "sdpa"
EAGER = "eager"
# keel_document_sdpa: trainer/models/document_attention.py (ATTENTION)
DOCUMENT_SDPA = "keel_document_sdpa"


@dataclass(frozen=True)
class AttentionChoice:
    implementation: str
    why: str

    def describe(self) -> str:
        return f"attention: {self.implementation} ({self.why})"


def flash_attention_available() -> bool:
    """flash-attn 2 installed (and a CUDA GPU to run it)."""
    import torch
    from transformers.utils import is_flash_attn_2_available

    return torch.cuda.is_available() and is_flash_attn_2_available()


def _text(config: dict) -> dict:
    return config.get("text_config") or config


def has_sliding_window(config: dict) -> bool:
    """Layers that attend only to the last `sliding_window` tokens (Gemma 3; Mistral when its
    config enables it)."""
    text = _text(config)
    if text.get("layer_types"):
        return any(t == "sliding_attention" for t in text["layer_types"])
    if text.get("use_sliding_window") is False:
        return False
    return bool(text.get("sliding_window")) and text.get("model_type") not in ("qwen2", "qwen3", "qwen3_moe")


def select_attention(config: dict, *, packing: bool, on_gpu: bool, flash_available: bool) -> AttentionChoice:
    """The implementation a run uses (see the module's docstring); pure, so the tests run the
    very logic a GPU run takes with on_gpu / flash_available set."""
    if has_attention_sinks(config):
        return AttentionChoice(EAGER, "attention sinks: the only implementation that adds them")
    if on_gpu and flash_available:
        return AttentionChoice(FLASH, "flash-attn installed: varlen kernels, packed rows attend per document")
    if not on_gpu and packing and not has_sliding_window(config):
        return AttentionChoice(DOCUMENT_SDPA, "CPU, packed rows: SDPA run per document, no cross-document scores")
    why = "flash-attn not installed" if on_gpu else "CPU"
    if packing:
        why += "; packed rows get a block-diagonal mask from their position ids"
        if has_sliding_window(config) and not on_gpu:
            why += " (sliding-window layers: Keel's per-document SDPA does not window)"
    return AttentionChoice(SDPA, why)


# --- the probe ---------------------------------------------------------------------------------

PROBE_WIDTH = 64
PROBE_VOCAB = 256
PROBE_WINDOW = 4  # shorter than a probe document, so sliding-window layers really slide


def shrunk_config(config: dict) -> dict:
    """The same architecture at a size that runs in milliseconds on CPU: two layers, width 64,
    two heads of 32, one key/value head, at most 4 experts, a 256-token vocabulary, and a sliding
    window (where the model has one) shorter than a probe document."""
    c = copy.deepcopy(_text(config))
    c.pop("quantization_config", None)
    layers = 2
    c.update(num_hidden_layers=layers, hidden_size=PROBE_WIDTH, num_attention_heads=2, num_key_value_heads=1,
             head_dim=32, intermediate_size=2 * PROBE_WIDTH, vocab_size=PROBE_VOCAB, tie_word_embeddings=False,
             bos_token_id=None, eos_token_id=None, pad_token_id=None, torch_dtype="float32", dtype="float32")
    if c.get("layer_types"):
        kinds = list(dict.fromkeys(c["layer_types"]))  # keep one layer of each kind
        c["layer_types"] = (kinds * layers)[:layers] if len(kinds) > 1 else kinds * layers
    if c.get("sliding_window_pattern"):
        c["sliding_window_pattern"] = 2  # Gemma 3: layer 0 sliding, layer 1 global
    if c.get("sliding_window") and has_sliding_window(config):
        c["sliding_window"] = PROBE_WINDOW
    if c.get("num_experts") or c.get("num_local_experts"):
        for key in ("num_experts", "num_local_experts"):
            if key in c:
                c[key] = min(c[key], 4)
        c["num_experts_per_tok"] = min(c.get("num_experts_per_tok", 2), 2)
        if "moe_intermediate_size" in c:
            c["moe_intermediate_size"] = PROBE_WIDTH
        c["mlp_only_layers"] = []
        c["decoder_sparse_step"] = 1
    if isinstance(c.get("rope_scaling"), dict) and c["rope_scaling"].get("rope_type") == "llama3":
        c["rope_scaling"] = {**c["rope_scaling"], "original_max_position_embeddings": 64}
    return c


def probe_model(config: dict, implementation: str, *, device: str = "cpu", dtype=None):
    """A random-init model of the shrunk architecture with `implementation` attention, eval mode
    (float32 on CPU unless `dtype`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.models.document_attention import register

    if implementation == DOCUMENT_SDPA:
        register()
    small = shrunk_config(config)
    model_type = small.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in small.items() if k not in ("architectures",)})
    if has_sliding_window(config) and getattr(cfg, "layer_types", None):
        cfg.layer_types = ["sliding_attention", "full_attention"]  # one layer of each kind
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32, attn_implementation=implementation)
    return model.eval()


def packed_equals_solo(model, reference=None, *, lengths=(11, 7, 9), tolerance: float = 1e-4) -> tuple[bool, float]:
    """(equal, largest difference): logits of documents packed into one row (position ids
    restarting, no attention mask: what the padding-free collator passes) against each document's
    logits alone from `reference` (the same weights under eager attention, transformers' reference
    implementation, so an implementation that drops part of the model, a sliding window say,
    differs too; `model` itself when None)."""
    import torch

    reference = model if reference is None else reference
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    docs = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]
    ids = torch.cat(docs).unsqueeze(0).to(device)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)
    worst = 0.0
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0].float().cpu()
        start = 0
        for doc in docs:
            alone = reference(input_ids=doc.unsqueeze(0).to(next(reference.parameters()).device),
                              use_cache=False).logits[0].float().cpu()
            worst = max(worst, float((packed[start:start + len(doc)] - alone).abs().max()))
            start += len(doc)
    return worst <= tolerance, worst


MIXES_DOCUMENTS = (
    "training.packing: with {implementation} attention, transformers {version}'s {model_type} model does not keep "
    "packed examples apart (a probe of the same architecture gave packed logits {worst:.3g} away from each "
    "example's logits alone under eager attention); set training.packing: false")


def log_attention(config: dict, *, packing: bool) -> AttentionChoice:
    """select_attention for this machine; rank 0 prints the choice. With packing, the probe
    (check_packed_attention) runs first and refuses an implementation that mixes documents."""
    import os

    import torch

    choice = select_attention(config, packing=packing, on_gpu=torch.cuda.is_available(),
                              flash_available=flash_attention_available())
    note = ""
    if packing:
        try:
            worst = check_packed_attention(config, choice.implementation)
        except KeelError:
            raise
        except Exception as exc:  # an architecture the probe cannot shrink (remote code, a new model type)
            worst = None
            note = (f"; packed rows NOT probed ({type(exc).__name__}: {str(exc)[:120]}): trusting transformers' "
                    "packed-sequence masks")
        else:
            note = ("; packed rows per document (probe: no GPU here to run it)" if worst is None
                    else f"; packed rows per document (probe: largest logit difference {worst:.1e})")
    if os.environ.get("RANK", "0") == "0":
        print(f"[keel] {choice.describe()}{note}", flush=True)
    return choice


def check_packed_attention(config: dict, implementation: str) -> float | None:
    """Refuse packing where `implementation` would mix the documents of a packed row (KeelError);
    returns the probe's largest logit difference, or None where the probe cannot run here
    (flash attention without a GPU)."""
    import torch
    import transformers

    if implementation == FLASH and not torch.cuda.is_available():
        return None
    # flash attention runs on a GPU in bf16 only: there the probe and its reference run so too
    where = dict(device="cuda", dtype=torch.bfloat16) if implementation == FLASH else {}
    model = probe_model(config, implementation, **where)
    reference = probe_model(config, EAGER, **where)  # the same weights (same seed), transformers' reference attention
    equal, worst = packed_equals_solo(model, reference, tolerance=5e-2 if implementation == FLASH else 1e-4)
    if not equal:
        raise KeelError(MIXES_DOCUMENTS.format(implementation=implementation, version=transformers.__version__,
                                               model_type=_text(config).get("model_type"), worst=worst))
    return worst
