"""Direct preference optimisation on Keel-prepared pairs, with TRL's DPOTrainer underneath.

Keel prepares each pair once (prompt, chosen and rejected token ids, rendered with the
format's template exactly as the server will render the prompt), so TRL's own tokenization
is skipped. The reference model is the base model with adapters disabled under LoRA/QLoRA
(no second copy in memory), or a frozen copy for full fine-tuning, unless the recipe asks
for a copy explicitly.
"""

from __future__ import annotations


def make_dpo_trainer_class():
    from trl import DPOTrainer

    class KeelDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # Already tokenized by Keel (data/prepare.py); TRL would re-render from text.
            if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return KeelDPOTrainer


def build_dpo_trainer(*, model, tokenizer, peft_config, dpo, model_path: str, args: dict, train_dataset,
                      eval_dataset, callbacks, load_policy=None):
    import torch
    from trl import DPOConfig

    from data.model_loading import LoadPolicy
    from trainer.models.loading import load_base_model

    config = DPOConfig(
        **args,
        beta=dpo.beta,
        loss_type=[dpo.loss_type],
        max_length=None,  # pairs are truncated when prepared (the prompt is kept whole)
        precompute_ref_log_probs=False,
    )
    ref_model = None
    if dpo.reference == "copy" or (dpo.reference == "auto" and peft_config is None):
        # A frozen copy of the starting weights. TRL would also build one from the model's
        # name, but loading it here makes its dtype and source explicit.
        ref_model = load_base_model(model_path, load_policy or LoadPolicy(), dtype=torch.float32)
        ref_model.requires_grad_(False).eval()
    return make_dpo_trainer_class()(
        model=model, ref_model=ref_model, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
    )
