"""Keel's CPU fast path for padding-free batches: attention per document, loss on trained tokens.

Packed rows reach the model as one flattened sequence whose position ids restart at every
example (TRL's padding-free collator). Two things make that slow on CPU with stock transformers,
and both are replaced here by hand because no library does them on CPU:

- attention: SDPA gets a block-diagonal [T, T] mask over the whole micro-batch, so it computes
  (and back-propagates) every cross-document score only to mask it away; with 16 examples in a
  micro-batch that is ~16x the useful attention FLOPs. `document_sdpa` cuts the sequence at the
  position-id restarts and runs causal SDPA on each document alone (what flash attention's varlen
  kernels do on GPUs), and its mask function builds no mask at all.
- loss: the LM head projects every position onto the vocabulary, though chat SFT trains only
  the assistant's tokens. `trained_positions_loss` asks the model for logits only at the
  positions whose next token is trained (`logits_to_keep` with indices) and sums their
  cross-entropy; TRL's fused LM head does the same with Triton on GPUs, and a per-tile torch
  loop without it that is slower than the full head (trainer/techniques/sft.py).

Both give the same loss as the padded per-example path (tests/unit/test_fast_path.py).
"""

from __future__ import annotations

from data.errors import KeelError

ATTENTION = "keel_document_sdpa"


def _document_lengths(position_ids) -> list[int]:
    """Lengths of the documents of a flattened [1, T] sequence: a new one starts at position 0."""
    import torch

    starts = (position_ids[0] == 0).nonzero().flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    bounds = torch.cat([starts, starts.new_tensor([position_ids.shape[1]])])
    return bounds.diff().tolist()


def document_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """An attention function (transformers' AttentionInterface): causal SDPA per document of a
    flattened batch; anything else (a padding mask, a batch of several rows) goes to stock SDPA."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    lengths = _document_lengths(position_ids)
    gqa = key.shape[1] != query.shape[1]
    # query [1, heads, T, head_dim]; key/value [1, kv_heads, T, head_dim]
    outputs = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                              enable_gqa=gqa)
               for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def document_mask(*args, attention_mask=None, **kwargs):
    """No mask for flattened batches (document_sdpa reads the position ids); SDPA's mask when a
    padding mask is given."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Register the attention function and its mask under ATTENTION; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, document_sdpa)
    AttentionMaskInterface.register(ATTENTION, document_mask)
    return ATTENTION


def has_sinks(model) -> bool:
    """Attention with learned sinks (gpt-oss): document_sdpa has no place for them."""
    return any(hasattr(module, "sinks") for module in model.modules())


def use_document_attention(model) -> None:
    """Switch a (PEFT-wrapped or plain) transformers model to document_sdpa."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if has_sinks(base):
        # SDPA has no sink column: training would silently drop a part of the model
        raise KeelError(f"{type(base).__name__} has attention sinks, which Keel's per-document SDPA ignores; "
                        "it trains with eager attention on unpacked rows (training.packing: false)")
    base.set_attn_implementation(register())


def trained_positions_loss(model, inputs: dict, num_items_in_batch=None):
    """Sum of cross-entropy over the trained next-token positions of a [1, T] batch, divided by
    num_items_in_batch (the trained tokens of the whole optimizer step) or by this batch's
    trained tokens. The logits of untrained positions are never computed."""
    import torch
    import torch.nn.functional as F

    labels = inputs.pop("labels")
    assert labels.shape[0] == 1, "trained_positions_loss takes flattened [1, T] batches"
    targets = labels[0, 1:]
    keep = (targets != -100).nonzero().flatten()  # position t predicts token t + 1
    outputs = model(**inputs, logits_to_keep=keep)
    logits = outputs.logits[0].float()
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    denominator = num_items_in_batch if num_items_in_batch is not None else keep.numel()
    return loss / torch.as_tensor(denominator, device=loss.device).clamp(min=1), outputs
