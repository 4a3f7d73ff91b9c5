"""`keel eval MODEL DATA`: held-out conversations through vLLM's offline engine, scored.

Each assistant turn of each conversation in DATA is a case: the messages before it are the
prompt, the turn is the reference. Prompts are rendered with the model dir's own format (the
template training used; tests/serving/test_history.py proves the server renders the same; for
a harmony format, vLLM's own harmony rendering, as its chat server does: serving/harmony.py),
generated greedily by `vllm.LLM` with the engine settings `keel serve` would use, and parsed
by the same parser class the server composes from the format spec (Keel's plugin included), so
a score here is a score of what the server returns.

Scores (n is the number of cases or calls each is taken over):
    tool_call_validity    calls the model wrote that parse and fit a declared tool's schema,
                          over every call it began (a call cut or garbled counts against it)
    call_decision         the model called tools exactly when the reference did
    tool_name_match       on reference turns with calls: the same tool names (as a multiset)
    arguments_match       on reference turns with calls: the same names with the same arguments
    reasoning_format      (formats with reasoning) the output opens with the think delimiter (or
                          the generation prompt does, as DeepSeek-R1's) and closes it once, and no delimiter is left in the content (harmony: it
                          opens with one analysis message, ended by <|end|>, and no harmony
                          markup is left in the content)
    answer_exact_match    on reference turns that answer in text: the same text
    finished              the turn ended with its end-of-turn token, not max_tokens
    reward_<name>         the rewards `technique: grpo` trains with (data/rewards.py: tool_call,
                          schema_valid, format, answer_match), read from the generated token ids
                          as a GRPO run reads its rollouts: a GRPO run's rewards on held-out prompts
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data.options import ArgumentParser
from data.errors import KeelError
from data.model_config import read_model_config

GRPO_REWARDS = ("tool_call", "schema_valid", "format", "answer_match")
METRICS = ("tool_call_validity", "call_decision", "tool_name_match", "arguments_match", "reasoning_format",
           "answer_exact_match", "finished", *(f"reward_{name}" for name in GRPO_REWARDS))


@dataclass
class Case:
    conversation: int
    turn: int
    messages: list[dict]
    tools: list[dict] | None
    reference: dict
    prompt_ids: list[int] = field(default_factory=list)
    result: dict = field(default_factory=dict)


def load_cases(path: str | Path, fmt, limit: int | None = None) -> list[Case]:
    from data.conversation import RowError, validate_conversation
    from data.prepare import read_jsonl

    cases, problems = [], []
    for n, (place, row) in enumerate(read_jsonl(Path(path))):
        if limit is not None and n >= limit:
            break
        try:
            conv = validate_conversation(row, fmt.row_rules())
        except RowError as exc:
            problems.append(f"{place}: {exc}")
            continue
        for i, msg in enumerate(conv["messages"]):
            if msg["role"] == "assistant" and i > 0:
                cases.append(Case(n, i, conv["messages"][:i], conv.get("tools") or None, msg))
    if problems:
        raise KeelError(f"{path}: {len(problems)} invalid rows:\n  " + "\n  ".join(problems[:10]))
    if not cases:
        raise KeelError(f"{path}: no assistant turns to evaluate")
    return cases


def _canonical(calls) -> list[tuple[str, str]]:
    return sorted((name, json.dumps(args, sort_keys=True)) for name, args in calls)


def score_case(case: Case, *, reasoning: str | None, content: str | None, calls: list[tuple[str, dict]], raw: str,
               finish: str, fmt) -> dict:
    from data.conversation import RowError, check_arguments

    schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in case.tools or []}
    valid = 0
    for name, args in calls:
        if name in schemas:
            try:  # the same check as training-row validation and GRPO's schema_valid reward
                check_arguments(args, schemas[name], "arguments")
                valid += 1
            except RowError:
                pass
    spec = fmt.spec
    if fmt.harmony:
        from serving.harmony import begun_calls

        begun = begun_calls(raw)
    else:
        begun = raw.count(spec.tool_call.open) if spec.tool_call else len(calls)
    ref_calls = [(c["function"]["name"], c["function"]["arguments"]) for c in case.reference.get("tool_calls") or []]
    out = {"reasoning": reasoning, "content": content, "calls": calls, "finish": finish,
           "valid_calls": valid, "begun_calls": max(begun, len(calls)),
           "call_decision": bool(calls) == bool(ref_calls), "finished": finish == "stop"}
    if ref_calls:
        out["tool_name_match"] = Counter(n for n, _ in calls) == Counter(n for n, _ in ref_calls)
        out["arguments_match"] = _canonical(calls) == _canonical(ref_calls)
    elif case.reference.get("content"):
        out["answer_exact_match"] = (content or "").strip() == case.reference["content"].strip()
    if spec.supports.reasoning and fmt.harmony:
        from serving.harmony import reasoning_format

        out["reasoning_format"] = reasoning_format(raw, content)
    elif spec.supports.reasoning and spec.think:
        from data.completion import read_output

        # the GRPO format reward's rule (data/completion.py), the prompt's own opening tag included
        out["reasoning_format"] = (read_output(raw, fmt).reasoning_well_formed
                                   and not any(d in (content or "") for d in spec.think_tags))
    return out


def grpo_rewards(case: Case, token_ids, *, tokenizer, fmt) -> dict:
    """The GRPO rewards of one generated turn, where they apply to its reference (tool rewards on
    turns with calls, answer_match on turns that answer in text; none for harmony formats)."""
    from data.completion import parseable_tool_calls
    from data.prompts import reference_of
    from data.rewards import read_completion, score

    if fmt.harmony:
        return {}
    scored = read_completion(list(token_ids), tokenizer=tokenizer, fmt=fmt)
    ref = reference_of(case.reference)
    out = {}
    for name in GRPO_REWARDS:
        if name in ("tool_call", "schema_valid") and not (parseable_tool_calls(fmt) and ref["tool_calls"]):
            continue
        if name == "answer_match" and (ref["tool_calls"] or not ref["content"]):
            continue
        out[f"reward_{name}"] = score(name, scored, reference=ref, tools=case.tools or [], fmt=fmt)
    return out


def summarize(cases: list[Case]) -> dict[str, tuple[float, int]]:
    """metric -> (value, n)."""
    results = [c.result for c in cases]
    begun = sum(r["begun_calls"] for r in results)
    out = {"tool_call_validity": (sum(r["valid_calls"] for r in results) / begun if begun else float("nan"), begun)}
    for metric in METRICS[1:]:
        values = [r[metric] for r in results if metric in r]
        out[metric] = (sum(values) / len(values) if values else float("nan"), len(values))
    return out


def table(summary: dict[str, tuple[float, int]]) -> str:
    lines = [f"{'metric':<22} {'value':>7} {'n':>6}", "-" * 37]
    lines += [f"{name:<22} {value:>7.3f} {n:>6}" for name, (value, n) in summary.items()]
    return "\n".join(lines)


def _engine(served):
    """vllm.LLM for the model (a base, or an adapter export on its base), as keel serve configures it."""
    from serving.engine import Target
    from serving.server import detect_target, plan_served

    target = detect_target()
    plan = plan_served(served, host="127.0.0.1", port=0, target=target)
    for key, value in plan.env.items():
        os.environ.setdefault(key, value)
    from serving.engine import engine_settings

    config = read_model_config(served.base_dir / "config.json")
    settings = engine_settings(config, served.export_info, target if target.gpus else Target(), served.adapters)
    from vllm import LLM

    # as keel serve loads it (serving/server.py load_safety_args): safetensors only, model code only
    # when training ran it
    kwargs = {"max_model_len": settings.max_model_len, "dtype": settings.dtype, "seed": 0,
              "load_format": "safetensors", "trust_remote_code": served.export_info.trust_remote_code}
    if settings.tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = settings.tensor_parallel_size
    if settings.gpu_memory_utilization:
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
    lora = None
    if served.adapters:
        from vllm.lora.request import LoRARequest

        kwargs.update(enable_lora=True, max_lora_rank=settings.max_lora_rank, max_loras=1)
        adapter = served.adapters[0]
        lora = LoRARequest(adapter.name, 1, adapter.path)
    llm = LLM(model=str(served.base_dir), **kwargs)
    return llm, served, settings, lora


def evaluate(model: str, data: str, *, limit: int | None = None, max_tokens: int = 256) -> tuple[list[Case], dict]:
    from vllm import SamplingParams
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.inputs import TokensPrompt
    from vllm.parser import ParserManager
    from vllm.tool_parsers import ToolParserManager

    from data.render import render_text
    from serving.server import PARSER_PLUGIN

    from serving.model_source import resolve

    served = resolve(model)
    fmt = served.fmt
    if fmt is None:
        raise KeelError(f"{model}: not a Keel export (no keel-format/); keel eval scores with the model's format")
    cases = load_cases(data, fmt, limit)  # bad data fails before the engine starts
    llm, served, settings, lora = _engine(served)
    from data.model_loading import LoadPolicy, load_tokenizer

    if fmt.harmony:
        # as the server renders gpt-oss: vLLM's harmony functions, the date pinned by _engine's env
        from serving import harmony

        def prompt_of(case):
            return harmony.prompt_ids(case.messages, case.tools, reasoning_effort=fmt.spec.harmony.reasoning_effort)
    else:
        tokenizer = load_tokenizer(served.template_dir, LoadPolicy(
            trust_remote_code=served.export_info.trust_remote_code), key="model")
        special = dict(tokenizer.special_tokens_map)

        def prompt_of(case):
            text = render_text({"messages": case.messages, "tools": case.tools}, fmt=fmt, add_generation_prompt=True,
                               special_tokens=special)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
    prompts, params, kept = [], [], []
    for case in cases:
        case.prompt_ids = prompt_of(case)
        room = settings.max_model_len - len(case.prompt_ids)
        if room <= 0:
            case.result = {"skipped": "prompt beyond the context length"}
            continue
        prompts.append(TokensPrompt(prompt_token_ids=case.prompt_ids))
        params.append(SamplingParams(temperature=0, max_tokens=min(max_tokens, room), skip_special_tokens=False))
        kept.append(case)
    outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
    engine_tokenizer = llm.get_tokenizer()
    if fmt.harmony:
        parser_cls = harmony.parser_class(fmt)
    else:
        ToolParserManager.import_tool_parser(PARSER_PLUGIN)
        parser_cls = ParserManager.get_parser(tool_parser_name=fmt.spec.vllm.tool_parser,
                                              reasoning_parser_name=fmt.spec.vllm.reasoning_parser,
                                              enable_auto_tools=True, tokenizer=engine_tokenizer)
    for case, output in zip(kept, outputs):
        gen = output.outputs[0]
        request = ChatCompletionRequest(model="keel", messages=[{"role": "user", "content": "x"}], tools=case.tools,
                                        tool_choice="auto" if case.tools else None)
        if fmt.harmony:
            reasoning, content, calls = harmony.parse_output(parser_cls, engine_tokenizer, request, gen.text,
                                                             gen.token_ids)
        elif parser_cls is None:
            reasoning, content, calls = None, gen.text, []
        else:
            parser = parser_cls(engine_tokenizer, request.tools, chat_template_kwargs={})
            parser.set_prompt_token_ids(case.prompt_ids)
            reasoning, content, calls = parser.parse(gen.text, request, enable_auto_tools=True,
                                                     model_output_token_ids=gen.token_ids)
        parsed = [(c.name, json.loads(c.arguments)) for c in calls or []]
        case.result = score_case(case, reasoning=reasoning, content=content, calls=parsed, raw=gen.text,
                                 finish=gen.finish_reason or "", fmt=fmt)
        case.result.update(grpo_rewards(case, gen.token_ids, tokenizer=engine_tokenizer, fmt=fmt))
    scored = [c for c in cases if "skipped" not in c.result]
    return cases, summarize(scored)


def log_to_mlflow(run_id: str, summary: dict, cases: list[Case], tracking_uri: str | None) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        raise KeelError(f"--mlflow-run {run_id}: no such run at {client.tracking_uri} ({exc})") from None
    for name, (value, n) in summary.items():
        if value == value:  # NaN: nothing to score
            client.log_metric(run_id, f"eval.{name}", value)
        client.log_metric(run_id, f"eval.{name}.n", n)
    client.log_text(run_id, table(summary) + "\n", "eval/summary.txt")
    client.log_text(run_id, "".join(json.dumps(case_row(c), ensure_ascii=False) + "\n" for c in cases),
                    "eval/cases.jsonl")


def case_row(case: Case) -> dict:
    return {"conversation": case.conversation, "turn": case.turn, "reference": case.reference, **case.result}


def main(argv: list[str] | None = None) -> int:
    import sys

    p = ArgumentParser(prog="keel eval", description="Score a model on held-out conversations with vLLM's "
                                "offline engine and the server's own parsers.")
    p.add_argument("model", help="model dir exported by `keel train` (or an adapter export), or models:/NAME/VERSION")
    p.add_argument("data", help="held-out conversations (JSONL, OpenAI messages with tools)")
    p.add_argument("--limit", type=int, default=None, help="only the first N conversations")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--mlflow-run", default=None, metavar="RUN_ID",
                   help="log the scores (eval.*) and every case to this MLflow run")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--out", type=Path, default=None, help="write every case with its output and scores (JSONL)")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not Path(a.data).is_file():
        raise KeelError(f"{a.data}: no such file")
    cases, summary = evaluate(a.model, a.data, limit=a.limit, max_tokens=a.max_tokens)
    skipped = sum("skipped" in c.result for c in cases)
    print(f"\n{len(cases) - skipped} turns scored" + (f", {skipped} skipped (prompt beyond the context)" if skipped
                                                       else ""))
    print(table(summary))
    if a.out:
        a.out.write_text("".join(json.dumps(case_row(c), ensure_ascii=False) + "\n" for c in cases))
    if a.mlflow_run:
        log_to_mlflow(a.mlflow_run, summary, cases, a.tracking_uri)
        print(f"[keel] logged eval.* to MLflow run {a.mlflow_run}")
    return 0
