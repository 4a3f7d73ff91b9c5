"""Packing: examples bin-packed into rows of seq_len with no attention across examples.

The proof is on the model: an example's logits inside a packed row, batched by TRL's
padding-free collator exactly as the trainer batches it, equal its logits alone (fp32), and
the loss per trained token equals the padded path's on the same examples. Negative controls
show both halves matter: without restarting position ids, or with a plain causal mask over
the row, the logits differ.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from data.formats import load_format
from data.packing import SEQ_LENGTHS, pack_examples, pack_window
from data.prepare import PrepOptions, prepare_file
from data.synthetic import generate_conversations, write_jsonl

FMT = load_format("hermes-qwen3")
SEQ_LEN = 2048


@pytest.fixture(scope="module")
def long_tail_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("packing") / "long-tail.jsonl"
    write_jsonl(generate_conversations(48, seed=3, long_tail=True), path)
    return path


@pytest.fixture(scope="module")
def prepared_pair(long_tail_data, tiny_model, tmp_path_factory):
    """The same data prepared unpacked and packed. (The tiny tokenizer spends ~350 tokens on the
    tool schemas, so examples are 400 to a few thousand tokens long.)"""
    root = tmp_path_factory.mktemp("packing-cache")
    kwargs = dict(tokenizer_dir=tiny_model, fmt=FMT, seq_len=SEQ_LEN, cache_root=root, num_proc=1)
    return (prepare_file(long_tail_data, options=PrepOptions(packing=False), **kwargs),
            prepare_file(long_tail_data, options=PrepOptions(packing=True), **kwargs))


def test_best_fit_decreasing_fills_the_fullest_row_that_fits():
    # 5 opens row 0 (room 3); 4 opens row 1 (room 4); 3 fills row 0; 3 -> row 1 (room 1);
    # 2 opens row 2; 1 goes to the row with the least room that fits it: row 1
    assert pack_examples([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    rng = random.Random(0)
    lengths = [min(512, int(rng.lognormvariate(4.5, 1.0)) + 1) for _ in range(2000)]
    rows = pack_examples(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each example once
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert len(rows) <= -(-sum(lengths) // 512) * 1.05  # within 5% of the bound no packing can beat
    assert rows == pack_examples(lengths, 512)  # deterministic
    with pytest.raises(ValueError, match="packing needs 1..512"):
        pack_examples([513], 512)


def split_rows(ds) -> list[tuple[tuple, tuple]]:
    """The (input_ids, labels) of every example inside packed rows."""
    out = []
    for ids, labels, lengths in zip(ds["input_ids"], ds["labels"], ds[SEQ_LENGTHS]):
        assert sum(lengths) == len(ids) <= SEQ_LEN
        start = 0
        for n in lengths:
            out.append((tuple(ids[start:start + n]), tuple(labels[start:start + n])))
            start += n
    return out


def test_packed_cache_holds_the_same_examples_in_fewer_rows(prepared_pair):
    plain, packed = prepared_pair
    assert (plain.packed, packed.packed) == (False, True) and plain.path != packed.path
    examples = list(zip(map(tuple, plain.load()["input_ids"]), map(tuple, plain.load()["labels"])))
    assert sorted(split_rows(packed.load())) == sorted(examples)
    a, b = plain.stats, packed.stats
    assert (a.examples, a.tokens, a.trained_tokens, a.truncated) == (b.examples, b.tokens, b.trained_tokens, b.truncated)
    assert a.sequences == a.examples and a.padding_fraction is None
    assert b.sequences == len(packed.load()) < b.examples / 2
    assert b.padding_fraction == pytest.approx(1 - b.tokens / (b.sequences * SEQ_LEN), abs=1e-6)
    assert 0 <= b.padding_fraction < 0.1


def test_preference_pairs_are_never_packed(tiny_model, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Hi {i}?", "chosen": "Hello!", "rejected": "Go away."}) + "\n"
                            for i in range(5)))
    prepared = prepare_file(data, tokenizer_dir=tiny_model, fmt=FMT, seq_len=512, cache_root=tmp_path / "c",
                            options=PrepOptions(packing=True))
    assert prepared.kind == "preference" and not prepared.packed and prepared.stats.padding_fraction is None
    assert prepared.load().column_names == ["prompt_ids", "chosen_ids", "rejected_ids"] and len(prepared.load()) == 5


def test_documents_pack_and_a_long_one_fills_whole_rows(tiny_model, tmp_path):
    data = tmp_path / "docs.jsonl"
    long_text = " ".join(f"sentence {i} about the weather." for i in range(120))
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in [long_text, "short one", "another short one"]))
    kwargs = dict(tokenizer_dir=tiny_model, fmt=FMT, seq_len=128, cache_root=tmp_path / "c")
    plain = prepare_file(data, **kwargs)
    packed = prepare_file(data, options=PrepOptions(packing=True), **kwargs)
    assert packed.kind == "document" and packed.packed
    ds = packed.load()
    assert sorted(sum(ds[SEQ_LENGTHS], [])) == sorted(len(x) for x in plain.load()["input_ids"])
    assert ds["labels"] == ds["input_ids"]  # every token of a document is trained
    assert len(ds) < len(plain.load())


def _collate(rows: list[dict], padding_free: bool) -> dict:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)(rows)


def _model(path, attn: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()


def _examples(prepared, indices) -> list[dict[str, np.ndarray]]:
    ds = prepared.load()
    return [{k: np.asarray(ds[i][k], dtype=np.int32) for k in ("input_ids", "labels")} for i in indices]


@pytest.fixture(scope="module")
def varied(prepared_pair) -> list[dict[str, np.ndarray]]:
    """Five examples of different lengths, from shortest to longest (they pack into several rows)."""
    plain = prepared_pair[0]
    lengths = [len(x) for x in plain.load()["input_ids"]]
    by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return _examples(plain, [by_length[k * (len(lengths) - 1) // 4] for k in range(5)])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_example_logits_in_a_packed_row_equal_its_logits_alone(tiny_model, varied, attn):
    model = _model(tiny_model, attn)
    columns = pack_window(varied, SEQ_LEN)
    rows = [{k: columns[k][r].tolist() for k in columns} for r in range(len(columns["input_ids"]))]
    assert len(rows) >= 2 and any(len(r[SEQ_LENGTHS]) >= 2 for r in rows)
    batch = _collate(rows, padding_free=True)  # the trainer's micro-batch of packed rows
    assert "attention_mask" not in batch
    ids, positions = batch["input_ids"], batch["position_ids"]
    starts = (positions[0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
    segments = list(zip(starts, starts[1:]))
    assert len(segments) == len(varied)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        no_restart = model(input_ids=ids, use_cache=False).logits[0]
        causal = model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids),
                       use_cache=False).logits[0]
        for k, (a, b) in enumerate(segments):
            alone = model(input_ids=ids[:, a:b], use_cache=False).logits[0]
            torch.testing.assert_close(packed[a:b], alone, atol=1e-5, rtol=1e-5)
            if k > 0:  # negative controls: an example after the first sees the ones before it
                assert (no_restart[a:b] - alone).abs().max() > 1e-2
                assert (causal[a:b] - alone).abs().max() > 1e-2


def test_loss_per_trained_token_is_the_same_packed_or_padded(tiny_model, varied):
    model = _model(tiny_model, "sdpa")
    columns = pack_window(varied, SEQ_LEN)
    rows = [{k: columns[k][r].tolist() for k in columns} for r in range(len(columns["input_ids"]))]
    packed = _collate(rows, padding_free=True)
    padded = _collate([{k: v.tolist() for k, v in ex.items()} for ex in varied], padding_free=False)
    # the same tokens are trained: each example's first label never is (nothing predicts it)
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        loss_packed = model(**packed, use_cache=False).loss
        loss_padded = model(**padded, use_cache=False).loss
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=1e-6)


def test_the_trainer_batches_packed_rows_padding_free_and_trains(tiny_model, prepared_pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.models.document_attention import ATTENTION
    from trainer.techniques.sft import build_sft_trainer

    packed = prepared_pair[1]
    trainer = build_sft_trainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
        tokenizer=AutoTokenizer.from_pretrained(tiny_model), peft_config=None, packed=True,
        args=dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                  report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, remove_unused_columns=False,
                  disable_tqdm=True),
        train_dataset=packed.load(), eval_dataset=None, callbacks=[])
    assert trainer.data_collator.padding_free
    assert trainer.model.config._attn_implementation == ATTENTION  # Keel's CPU fast path (test_fast_path.py)
    result = trainer.train()
    assert np.isfinite(result.training_loss) and trainer.state.global_step == 2
