"""`keel serve` and `keel eval` on a gpt-oss export (format renderer harmony), without a server:
the command line and environment the plan builds, the refusals, the middleware's reasoning
effort, and eval's harmony scores. A real server is tested in
tests/serving/test_harmony_serving.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from data.errors import KeelError
from data.formats import load_format
from data.model_dir import EXPORT_INFO_FILE, FORMAT_DIR
from serving.engine import Target
from serving.evaluate import Case, score_case
from serving.model_source import resolve
from serving.server import plan_served, server_env, vllm_command
from test_middleware import App, call

HARMONY = load_format("harmony")
GPT_OSS = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 64,
           "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 64, "vocab_size": 201088, "max_position_embeddings": 4096, "num_local_experts": 4}
LLAMA = {**GPT_OSS, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def export(d: Path, *, config=GPT_OSS, fmt=HARMONY, start_date: str = "2025-03-04") -> Path:
    """A harmony export as trainer/export.py lays it out (no chat template), its spec's date
    changed from the shipped one so the tests can tell which spec was read."""
    (d / FORMAT_DIR).mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config))
    spec = yaml.safe_load(fmt.spec_yaml())
    if spec.get("harmony"):
        spec["harmony"]["start_date"] = start_date
    (d / FORMAT_DIR / "spec.yaml").write_text(yaml.safe_dump(spec))
    if fmt.chat_template is not None:
        (d / FORMAT_DIR / fmt.spec.chat_template).write_text(fmt.chat_template)
    (d / EXPORT_INFO_FILE).write_text(yaml.safe_dump({"seq_len": 1024, "dtype": "bfloat16"}))
    return d


def test_harmony_export_is_served_with_vllms_harmony_path(tmp_path):
    model = export(tmp_path / "run" / "model")
    cmd = vllm_command(model, host="127.0.0.1", port=8000, target=Target())
    line = " ".join(cmd)
    assert "--reasoning-parser openai_gptoss" in line
    assert "--enable-auto-tool-choice --tool-call-parser openai" in line
    # vLLM never reads a template for gpt_oss and refuses any parser but HarmonyParser
    assert "--chat-template" not in cmd and "--tool-parser-plugin" not in cmd
    plan = plan_served(resolve(str(model)), host="127.0.0.1", port=8000, target=Target())
    assert plan.env["VLLM_SYSTEM_START_DATE"] == "2025-03-04"  # the exported spec's, not the shipped one
    assert plan.env["KEEL_REASONING_EFFORT"] == "medium"
    assert any("VLLM_SYSTEM_START_DATE=2025-03-04" in r for r in plan.reasons)


def test_an_operators_start_date_wins_with_a_warning(tmp_path, monkeypatch):
    model = export(tmp_path / "model")
    monkeypatch.setenv("VLLM_SYSTEM_START_DATE", "2030-12-31")
    plan = plan_served(resolve(str(model)), host="127.0.0.1", port=8000, target=Target())
    assert server_env(None, plan.env)["VLLM_SYSTEM_START_DATE"] == "2030-12-31"
    assert any(r.startswith("warning:") and "2030-12-31" in r and "2025-03-04" in r for r in plan.reasons)


def test_a_format_the_model_type_does_not_render_is_refused(tmp_path):
    # harmony on a model vLLM renders with a chat template (there is none to render with)
    with pytest.raises(KeelError, match=r"keel-format/spec.yaml: format 'harmony'.*model_type 'llama'"):
        vllm_command(export(tmp_path / "a", config=LLAMA), host="h", port=1, target=Target())
    # a Jinja format on gpt_oss: vLLM would ignore the template training rendered with
    with pytest.raises(KeelError, match=r"spec.yaml: vLLM renders every gpt_oss prompt.*'hermes-qwen3'"):
        vllm_command(export(tmp_path / "b", fmt=load_format("hermes-qwen3")), host="h", port=1, target=Target())
    with pytest.raises(KeelError, match=r"--format: vLLM renders every gpt_oss prompt"):
        vllm_command(export(tmp_path / "c"), host="h", port=1, target=Target(), fmt_name="llama3-json")


def test_a_start_date_that_is_not_a_date_names_the_file_and_key(tmp_path):
    with pytest.raises(KeelError, match=r"keel-format/spec.yaml: invalid format spec: harmony.*YYYY-MM-DD"):
        vllm_command(export(tmp_path / "m", start_date="1 Jan 2026"), host="h", port=1, target=Target())


@pytest.fixture
def harmony_middleware(monkeypatch):
    from serving.middleware import KeelMiddleware

    monkeypatch.setenv("KEEL_API_KEY", "k")
    monkeypatch.setenv("KEEL_REASONING_EFFORT", "high")
    app = App()
    return KeelMiddleware(app), app


def test_chat_requests_get_the_trained_reasoning_effort(harmony_middleware):
    mw, app = harmony_middleware
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi é"}]}
    # (/invocations too, by the same path check; left out here: it validates with vLLM's request
    # model, a 20 s import)
    for path in ("/v1/chat/completions", "/v1/chat/completions/render"):
        status, _ = call(mw, path, key="k", body=json.dumps(chat).encode(), chunks=2)
        scope, got = app.seen[-1]
        assert status == 200 and json.loads(got) == {**chat, "reasoning_effort": "high"}
        assert dict(scope["headers"])[b"content-length"] == str(len(got)).encode()
    named = json.dumps({**chat, "reasoning_effort": "low"}).encode()
    call(mw, "/v1/chat/completions", key="k", body=named)
    assert json.loads(app.seen[-1][1])["reasoning_effort"] == "low"  # a request's own choice stands
    for path, body in (("/tokenize", json.dumps(chat).encode()),  # not a generation
                       ("/v1/chat/completions", b"{not json"), ("/v1/completions", b'{"prompt": "x"}')):
        call(mw, path, key="k", body=body)
        assert app.seen[-1][1] == body


def test_without_a_harmony_format_bodies_pass_unchanged(monkeypatch):
    from serving.middleware import KeelMiddleware

    monkeypatch.delenv("KEEL_REASONING_EFFORT", raising=False)
    monkeypatch.delenv("KEEL_API_KEY", raising=False)
    app = App()
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    call(KeelMiddleware(app), "/v1/chat/completions", body=body)
    assert app.seen[-1][1] == body


CASE = Case(0, 2, [{"role": "user", "content": "weather?"}], [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
    {"role": "assistant", "content": "Sunny."})


@pytest.mark.parametrize("raw, content, expected", [
    ("<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant<|channel|>final<|message|>Sunny.<|return|>",
     "Sunny.", True),
    ("<|channel|>final<|message|>Sunny.<|return|>", "Sunny.", False),  # no reasoning first
    ("<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>analysis<|message|>b<|end|>", None, False),
    ("<|channel|>analysis<|message|>Look it up.", None, False),  # reasoning never closed
    ("<|channel|>analysis<|message|>x<|end|>", "<|channel|>final<|message|>Sunny.", False),  # markup in content
])
def test_harmony_reasoning_format(raw, content, expected):
    out = score_case(CASE, reasoning="x", content=content, calls=[], raw=raw, finish="stop", fmt=HARMONY)
    assert out["reasoning_format"] is expected
    assert out["answer_exact_match"] is (content == "Sunny.")


def test_harmony_calls_begun_count_both_header_shapes():
    raw = ("<|channel|>analysis<|message|>x<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary "
           "json<|message|>{\"city\": \"Paris\"}<|call|>")
    out = score_case(CASE, reasoning="x", content=None, calls=[("get_weather", {"city": "Paris"})], raw=raw,
                     finish="stop", fmt=HARMONY)
    assert (out["valid_calls"], out["begun_calls"], out["call_decision"]) == (1, 1, False)
    cut = "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"ci"
    out = score_case(CASE, reasoning=None, content=None, calls=[], raw=cut, finish="length", fmt=HARMONY)
    assert (out["valid_calls"], out["begun_calls"], out["finished"]) == (0, 1, False)  # a cut call counts against


def test_eval_refuses_a_harmony_prompt_without_the_pinned_date(monkeypatch):
    from serving.harmony import client_messages, prompt_ids

    monkeypatch.delenv("VLLM_SYSTEM_START_DATE", raising=False)
    with pytest.raises(KeelError, match="VLLM_SYSTEM_START_DATE is not set"):
        prompt_ids([{"role": "user", "content": "hi"}], None, reasoning_effort="medium")
    sent = client_messages([{"role": "assistant", "content": "", "reasoning_content": "r", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": "é"}}}]}])
    assert sent[0]["reasoning"] == "r" and "reasoning_content" not in sent[0]
    assert sent[0]["tool_calls"][0]["function"]["arguments"] == '{"a": "é"}'
