"""Keel chooses the attention implementation (trainer/models/attention.py), and packed rows stay
per document under every implementation it can choose, for every architecture of the catalogue.

The selection is run as a GPU run takes it (on_gpu / flash_available set), and each
implementation it picks that runs here (SDPA, eager, Keel's per-document SDPA; flash attention
needs a GPU: benchmarks/gpu_check.py probes it there) is checked by the probe the trainer itself
runs before loading: logits of documents packed into one row equal each document's logits alone
(a random-init copy of the architecture shrunk to two layers). A change in transformers that
made packed examples see each other would fail here, and the trainer would refuse the run."""

from __future__ import annotations

import pytest

from data.errors import KeelError
from trainer.models.attention import (DOCUMENT_SDPA, EAGER, FLASH, SDPA, check_packed_attention, has_sliding_window,
                                      probe_model, packed_equals_solo, select_attention)
from trainer.models.known import known_models

# every architecture the catalogue's models have (their kept config.json, by file name)
ARCHITECTURES = {known.config_file.stem: known.config() for known in known_models().values()}
# (on_gpu, flash_available): every machine a run can take
MACHINES = [(True, True), (True, False), (False, False)]


def _distinct() -> dict[str, dict]:
    """One config per distinct architecture shape that matters here (model type, sliding window)."""
    out = {}
    for name, config in ARCHITECTURES.items():
        text = config.get("text_config") or config
        out.setdefault((text.get("model_type"), has_sliding_window(config)), (name, config))
    return {name: config for name, config in out.values()}


DISTINCT = _distinct()


def test_the_choice_for_each_machine():
    llama, gemma = ARCHITECTURES_BY_TYPE("llama"), ARCHITECTURES_BY_TYPE("gemma3_text")
    gpt_oss = ARCHITECTURES_BY_TYPE("gpt_oss")
    assert select_attention(llama, packing=True, on_gpu=True, flash_available=True).implementation == FLASH
    assert select_attention(llama, packing=True, on_gpu=True, flash_available=False).implementation == SDPA
    assert select_attention(llama, packing=False, on_gpu=False, flash_available=False).implementation == SDPA
    assert select_attention(llama, packing=True, on_gpu=False, flash_available=False).implementation == DOCUMENT_SDPA
    # Keel's per-document SDPA does not window: sliding-window layers take SDPA's mask on CPU
    assert select_attention(gemma, packing=True, on_gpu=False, flash_available=False).implementation == SDPA
    for on_gpu, flash in MACHINES:  # sinks: eager everywhere
        assert select_attention(gpt_oss, packing=False, on_gpu=on_gpu, flash_available=flash).implementation == EAGER


def ARCHITECTURES_BY_TYPE(model_type: str) -> dict:
    return next(c for c in ARCHITECTURES.values() if (c.get("text_config") or c).get("model_type") == model_type)


@pytest.mark.parametrize("name", sorted(DISTINCT))
def test_packed_rows_stay_per_document_under_every_implementation_keel_selects(name):
    config = DISTINCT[name]
    chosen = {select_attention(config, packing=True, on_gpu=on_gpu, flash_available=flash).implementation
              for on_gpu, flash in MACHINES}
    runnable = chosen - {FLASH}
    if (config.get("text_config") or config).get("model_type") == "gpt_oss":
        # sinks: eager is chosen, and the probe finds packed examples mixed, so packing is refused
        with pytest.raises(KeelError, match=r"training\.packing: .*set training\.packing: false"):
            check_packed_attention(config, EAGER)
        return
    assert runnable, name
    for implementation in sorted(runnable | {SDPA, EAGER}):  # what Keel selects, and what transformers offers here
        worst = check_packed_attention(config, implementation)
        assert worst is not None and worst < 1e-4, (name, implementation, worst)


def test_the_probe_sees_a_window_dropped_and_an_implementation_that_mixes_documents():
    """Negative controls: Keel's per-document SDPA on a sliding-window model (it has no window,
    which is why select_attention does not pick it there), and an attention that ignores the mask
    transformers builds from restarting position ids, as a regression in transformers would."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    gemma = ARCHITECTURES_BY_TYPE("gemma3_text")
    with pytest.raises(KeelError, match=f"training.packing: with {DOCUMENT_SDPA} attention"):
        check_packed_attention(gemma, DOCUMENT_SDPA)

    def causal_only(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    AttentionInterface.register("keel_test_causal_only", causal_only)
    AttentionMaskInterface.register("keel_test_causal_only", sdpa_mask)
    llama = ARCHITECTURES_BY_TYPE("llama")
    with pytest.raises(KeelError, match=r"^training\.packing: with keel_test_causal_only attention, transformers "):
        check_packed_attention(llama, "keel_test_causal_only")
    equal, worst = packed_equals_solo(probe_model(llama, "keel_test_causal_only"), probe_model(llama, EAGER))
    assert not equal and worst > 1e-2


def test_build_model_prints_the_choice_and_loads_with_it(tiny_model, capsys):
    from trainer.models.loading import build_model
    from trainer.recipe import load_recipe
    from tests.unit.test_bf16_lora import QUICKSTART

    r = load_recipe(QUICKSTART, [f"model.path={tiny_model}", "training.packing=true", "training.precision=fp32"])
    model = build_model(model_section=r.model, peft=r.peft, training=r.training, distributed=r.distributed)
    out = capsys.readouterr().out
    assert f"[keel] attention: {DOCUMENT_SDPA} (CPU, packed rows" in out and "packed rows per document (probe" in out
    assert model.config._attn_implementation == DOCUMENT_SDPA
    r = load_recipe(QUICKSTART, [f"model.path={tiny_model}", "training.packing=false", "training.precision=fp32"])
    model = build_model(model_section=r.model, peft=r.peft, training=r.training, distributed=r.distributed)
    assert "[keel] attention: sdpa (CPU)" in capsys.readouterr().out
    assert model.config._attn_implementation == SDPA


def test_an_architecture_the_probe_cannot_build_is_trained_with_a_warning_not_refused(capsys):
    """Remote code or a model type transformers does not know here: the probe cannot shrink it, so
    the run says so at start and trusts transformers' packed-sequence masks."""
    from trainer.models.attention import log_attention

    choice = log_attention({"model_type": "keel_unknown_arch", "hidden_size": 64}, packing=True)
    assert choice.implementation == DOCUMENT_SDPA
    assert "packed rows NOT probed" in capsys.readouterr().out
