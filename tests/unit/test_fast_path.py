"""Keel's CPU fast path (trainer/models/document_attention.py) trains exactly what the plain path trains.

On the same examples, packed rows flattened by the trainer's padding-free collator, attention per
document and logits only at trained positions, give the same loss per trained token and the same
gradients as padded per-example batches with the model's own loss (fp32; tolerance 1e-5
relative, float summation order is the only difference). Negative control: the same flattened
batch with plain causal attention over it (documents seeing each other) gives a different loss.
That the trainer takes this path for packed data on CPU is checked in test_packing.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.formats import load_format
from data.packing import pack_window
from data.prepare import PrepOptions, prepare_file
from data.synthetic import generate_conversations, write_jsonl

SEQ_LEN = 2048


@pytest.fixture(scope="module")
def examples(tiny_model, tmp_path_factory) -> list[dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("fast-path")
    write_jsonl(generate_conversations(5, seed=5), root / "rows.jsonl")
    prepared = prepare_file(root / "rows.jsonl", tokenizer_dir=tiny_model, fmt=load_format("hermes-qwen3"),
                            seq_len=SEQ_LEN, cache_root=root / "cache", num_proc=1, options=PrepOptions())
    ds = prepared.load()
    return [{k: np.asarray(ds[i][k], dtype=np.int64) for k in ("input_ids", "labels")} for i in range(len(ds))]


def _model(path, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)


def _loss_and_grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fast_path_loss_and_gradients_equal_the_padded_path(tiny_model, examples):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from trainer.models.document_attention import trained_positions_loss, use_document_attention

    columns = pack_window(examples, SEQ_LEN)
    rows = [{k: columns[k][r].tolist() for k in columns} for r in range(len(columns["input_ids"]))]
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)  # what the trainer batches
    padded = DataCollatorForLanguageModeling(pad_token_id=0)([{k: v.tolist() for k, v in ex.items()}
                                                               for ex in examples])
    trained = int((padded["labels"][:, 1:] != -100).sum())
    assert trained == int((flat["labels"][:, 1:] != -100).sum()) and 0 < trained < flat["input_ids"].numel() // 2

    plain = _model(tiny_model)
    loss_plain, grads_plain = _loss_and_grads(plain, lambda: plain(**padded, use_cache=False).loss)

    fast = _model(tiny_model)
    use_document_attention(fast)
    loss_fast, grads_fast = _loss_and_grads(
        fast, lambda: trained_positions_loss(fast, {**flat, "use_cache": False})[0])
    torch.testing.assert_close(loss_fast, loss_plain, rtol=1e-5, atol=1e-6)
    assert grads_fast.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_fast[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # negative control: one causal sequence over all the documents trains something else
    with torch.no_grad():
        leaky = plain(input_ids=flat["input_ids"], labels=flat["labels"], use_cache=False).loss
    assert (leaky - loss_plain).abs() > 1e-3
