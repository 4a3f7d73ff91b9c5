"""Supervised fine-tuning on Keel-prepared data, with TRL's SFTTrainer underneath."""

from __future__ import annotations


def make_sft_trainer_class():
    """TRL's SFTTrainer, with the model's own loss where TRL's fused LM head would run without Triton.

    TRL 1.16 always computes the loss through a chunked, fused LM head. Without Triton (on CPU)
    it falls back to a per-tile torch loop over every position that made a training step of the
    tiny model about 6x slower than the model's own cross-entropy (measured here: 5+ s vs 0.8 s
    for 16 x 450 tokens), with the same losses. Where Triton runs (GPU), TRL's path is kept: it
    saves logits memory.
    """
    import torch
    from transformers import Trainer
    from trl import SFTTrainer

    from trainer.models.document_attention import trained_positions_loss

    class KeelSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            real_tokens = inputs.pop(REAL_TOKENS, None)  # from PackedRowsCollator: not a model input
            if torch.cuda.is_available():
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            labels = inputs["labels"]
            if model.training and flattened(inputs):
                # Padding-free batch: the logits of the trained positions only (document_attention.py)
                loss, outputs = trained_positions_loss(model, inputs, num_items_in_batch)
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss scales it
                loss = (loss, outputs) if return_outputs else loss
            else:
                # Trainer.compute_loss: the model's loss over num_items_in_batch (the trained tokens of
                # every rank and accumulation step), scaled back for DDP's gradient averaging.
                loss = Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                if real_tokens is not None:
                    seen = real_tokens.to(labels.device)
                elif "attention_mask" in inputs:
                    seen = inputs["attention_mask"].sum()
                else:
                    seen = torch.tensor(labels.numel(), device=labels.device)
                trained = (labels[..., 1:] != -100).sum()
                counts = self.accelerator.gather_for_metrics(torch.stack([seen, trained]).view(1, 2)).sum(0)
                self._total_train_tokens += int(counts[0])
                self._total_trained_tokens = getattr(self, "_total_trained_tokens", 0) + int(counts[1])
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
                self._metrics["train"]["num_trained_tokens"] = [self._total_trained_tokens]
            return loss

    return KeelSFTTrainer


REAL_TOKENS = "keel_real_tokens"


def flattened(inputs: dict) -> bool:
    """A padding-free micro-batch: one [1, T] sequence of examples with restarting position ids."""
    return ("position_ids" in inputs and "attention_mask" not in inputs and "labels" in inputs
            and inputs["input_ids"].shape[0] == 1)


class PackedRowsCollator:
    """Packed rows as a [rows, longest row] batch: position ids restart at every example (from
    `seq_lengths`), the first label of each example is not trained (nothing before it in the
    example predicts it), and no attention mask is passed, so transformers builds a causal mask
    that is block-diagonal within each row (masking_utils.find_packed_sequence_indices). Padding
    after a row's last example gets position 0 at every token: each pad is a sequence of its
    own, never attended to by real tokens, and untrained."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), -100, dtype=torch.long)
        positions = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            positions[i, :n] = torch.cat([torch.arange(int(k)) for k in row["seq_lengths"]])
        labels[positions == 0] = -100
        real = torch.tensor(sum(len(r["input_ids"]) for r in rows))
        return {"input_ids": ids, "labels": labels, "position_ids": positions, REAL_TOKENS: real}


def build_sft_trainer(*, model, tokenizer, peft_config, args: dict, packed: bool, train_dataset, eval_dataset,
                      callbacks, packed_layout: str = "packed-flat"):
    """TRL's SFTTrainer on prepared data: padded batches, or packed rows (`packed`: the prepared
    rows carry `seq_lengths`, data/packing.py)."""
    from trl import SFTConfig

    rows_layout = packed and packed_layout == "packed-rows"
    if packed:
        from data.errors import KeelError
        from trainer.models.config import PACKING_WITH_SINKS
        from trainer.models.document_attention import has_sinks

        if has_sinks(model):  # validation refuses it first (trainer/recipe.py); never train it silently
            raise KeelError(PACKING_WITH_SINKS.format(what=type(model).__name__))
    config = SFTConfig(
        **args,
        # Data is prepared (rendered, tokenized, truncated, packed, labels built) by Keel; TRL
        # only batches it.
        dataset_kwargs={"skip_prepare_dataset": True},
        # Packed rows: TRL's padding-free collator concatenates a micro-batch's rows into one
        # sequence whose position ids restart at every example (from `seq_lengths`) and passes
        # no attention mask, so transformers keeps attention inside each example (flash
        # attention's varlen kernels, or a block-diagonal mask for SDPA/eager). Unpacked
        # examples: padded batches with an attention mask.
        padding_free=packed and not rows_layout,
        max_length=None,
    )
    collator = PackedRowsCollator(tokenizer.pad_token_id) if rows_layout else None
    if packed and not rows_layout:
        import torch

        if not torch.cuda.is_available():  # GPUs keep flash attention's varlen kernels and TRL's fused head
            from trainer.models.attention import DOCUMENT_SDPA, select_attention
            from trainer.models.document_attention import use_document_attention

            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            # the choice build_model made (trainer/models/attention.py): not for sliding-window layers
            if select_attention(base.config.to_dict(), packing=True, on_gpu=False,
                                flash_available=False).implementation == DOCUMENT_SDPA:
                use_document_attention(model)
    return make_sft_trainer_class()(
        model=model, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset, data_collator=collator,
        processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
    )
