"""Prefix stability for the formats beside hermes-qwen3 (tests/serving/test_history.py covers
that one on the shared server): for each, a tiny model is written out by the export's own
writer (no training: its weights do not matter here) and served with `keel serve`, and the
prompt the server renders (POST /tokenize, the messages before an assistant turn and the tools,
as a client sends them) must be, token for token, the prefix of the training render's ids that
preceded that turn. The deepseek-r1 and mistral cases hold tool calls and results in the
history (their round trip through vLLM's parsers is tests/unit/test_roundtrip.py). One server per
format, so slow (about 70 s each on 2 cores)."""

from __future__ import annotations

import pytest
import requests

from conftest import API_KEY, export_untrained, free_port, keel_cmd, start_server, stop
from data.conversation import validate_conversation
from data.formats import resolve_format
from data.model_dir import load_model_format
from data.render import render_conversation, split_examples
from test_history import as_client_sends, multi_turn_rows, trained_starts
from tests.data.make_roundtrip import expressible

pytestmark = [pytest.mark.serving, pytest.mark.slow]

# (case id, model.format, tiny model built for, native_syntax)
CASES = [("llama3-json", "llama3-json", "llama3-json", None),
         ("native-llama3", "native", "llama3-json", None),
         # tool calls and their results in the history: DeepSeek-R1's tool tokens (and reasoning
         # opened by the prompt), Mistral's [AVAILABLE_TOOLS] before the last user turn and 9-character ids
         ("deepseek-r1", "deepseek-r1", "deepseek-r1", None),
         ("mistral", "mistral", "mistral", None)]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_served_prompt_is_the_training_prefix(case, tiny_model_for, keel_env, tmp_path):
    from transformers import AutoTokenizer

    _, fmt_name, model_fmt, syntax = case
    base = tiny_model_for(model_fmt)
    # the export's own writer on the untrained base: which weights it has does not matter here
    model_dir = export_untrained(base, resolve_format(fmt_name, model_path=base, native_syntax=syntax),
                                 tmp_path / "run" / "model")
    fmt = load_model_format(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    port = free_port()
    proc, url = start_server(keel_cmd("serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                                      "--api-key", API_KEY), log=tmp_path / "server.log", env=keel_env, port=port)
    try:
        model_name = requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"},
                                  timeout=30).json()["data"][0]["id"]
        checked = with_tool_results = 0
        for row in multi_turn_rows(3):
            conv = validate_conversation(expressible(row, fmt.spec.supports), fmt.row_rules())
            examples = render_conversation(conv, tokenizer=tokenizer, fmt=fmt)
            for example, (_end, trained_turns) in zip(examples, split_examples(conv["messages"], fmt, conv["tools"])):
                for index, start in zip(trained_turns, trained_starts(example.labels)):
                    body = {"model": model_name, "tools": conv["tools"], "add_generation_prompt": True,
                            "messages": as_client_sends(conv["messages"][:index], "reasoning")}
                    r = requests.post(url + "/tokenize", json=body, timeout=60,
                                      headers={"Authorization": f"Bearer {API_KEY}"})
                    assert r.status_code == 200, r.text
                    served = r.json()["tokens"]
                    if served != example.input_ids[:start]:
                        pytest.fail(f"{fmt_name}: turn {index} renders differently:\n"
                                    f"served:  {tokenizer.decode(served)[-300:]!r}\n"
                                    f"trained: {tokenizer.decode(example.input_ids[:start])[-300:]!r}")
                    checked += 1
                    with_tool_results += any(m["role"] == "tool" for m in conv["messages"][:index])
        assert checked >= 6
        if fmt.spec.supports.tools:  # the prompts held tool calls and their results
            assert with_tool_results >= 3
    finally:
        stop(proc)
