"""Prompts for reinforcement learning (GRPO): a conversation row becomes a prompt plus a reference.

The row shapes are the ones SFT reads (messages, sharegpt, alpaca, prompt_completion). A row that
ends with an assistant turn gives that turn as the reference (its content and tool calls); the
messages before it are the prompt. A row that ends with a user or tool message is a prompt
without a reference, refused when a reward needs one.

With recorded tool results (grpo.tool_results: recorded, for multi-turn rollouts) a row is a
recorded episode: the prompt ends at the last user message, and the assistant's tool calls and
their tool results after it are what the rollouts replay (a rollout's call that matches a
recorded one gets its recorded result; trainer/techniques/tool_env.py). The reference is still
the last assistant turn.

The prompt is rendered with the format's chat template and `add_generation_prompt`, exactly as
`keel serve` renders the same messages and tools, and tokenized whole as the server tokenizes
it: the ids stored here are the ids the rollouts start from (token in), and the ids the served
model sees for the same conversation (tests/serving/test_grpo_prompts.py checks it against a
live server's /tokenize). Columns, JSON kept as strings so no schema goes through Arrow's struct
unification (FIELD-NOTES, section 1):

    prompt      the rendered prompt text (shown in logs; never re-tokenized)
    prompt_ids  its token ids
    reference   {"content": str | null, "tool_calls": [{"name", "arguments"}]} as JSON, or ""
    tools       the tools' JSON schemas as a JSON list ("[]" without tools)
    messages    the validated prompt messages as JSON (multi-turn rollouts render tool turns after them)
    recorded    the row's tool calls with their results, [{"name", "arguments", "result"}] as JSON
                (arguments as JSON text; every call the row answers, before the reference)

Cached like SFT data (data/prepare.py's cache key, with this module's version on top): local
rank 0 builds, the other ranks wait on the completion marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from data.conversation import RowError, call_of, recorded_tool_results, validate_conversation
from data.errors import KeelError
from data.formats import Format
from data.prepare import COMPLETE_MARKER, PrepOptions, cache_key, default_cache_root, wait_for_marker
from data.shapes import KINDS, detect_shape, to_canonical
from data.sources import open_source

PROMPTS_VERSION = "3"
DATA_FILE = "prompts.arrow"
STATS_FILE = "stats.json"
REJECTED_FILE = "rejected.jsonl"
WAIT_TIMEOUT_S = 3600.0
# Stands in for the missing reference of a prompt-only row, so the row is validated by the same
# rules as a conversation (validate_conversation wants the assistant's turn last); never rendered.
_NO_REFERENCE = {"role": "assistant", "content": "-"}


@dataclass
class PromptStats:
    rows: int = 0
    prompts: int = 0
    with_reference: int = 0
    with_recorded_results: int = 0
    rejected: int = 0
    max_prompt_tokens: int = 0

    @property
    def examples(self) -> int:  # what `keel prepare` reports per second, as for SFT data
        return self.prompts

    def numbers(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


@dataclass
class PreparedPrompts:
    path: Path
    stats: PromptStats
    reused: bool
    kind: str = "prompt"
    packed: bool = False

    @property
    def rejected_file(self) -> Path | None:
        p = self.path / REJECTED_FILE
        return p if p.is_file() else None

    def report_files(self) -> list[Path]:
        return [self.path / STATS_FILE]

    def load(self):
        from datasets import Dataset

        return Dataset.from_file(str(self.path / DATA_FILE))


def split_prompt(conversation: dict) -> tuple[list[dict], dict | None]:
    """(prompt messages, reference) of a canonical conversation row; the reference is the last
    assistant turn, None when the row ends with a user or tool message."""
    messages = conversation.get("messages") or []
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        return messages[:-1], messages[-1]
    return list(messages), None


def reference_of(turn: dict) -> dict:
    """A validated assistant turn as a reward's reference: content and calls (arguments as JSON text)."""
    return {"content": turn.get("content") or None, "tool_calls": [call_of(c) for c in turn.get("tool_calls") or []]}


def prompt_row(raw, shape: str, *, tokenizer, fmt: Format, max_prompt_tokens: int, needs_reference: str | None,
               recorded_results: bool = False) -> dict:
    """One row as a prompt. Raises RowError. `needs_reference`: the reward that needs one, if any.
    `recorded_results`: the row is a recorded episode, its prompt ends at the last user message."""
    from data.render import encode_text, render_text

    canonical = to_canonical(shape, raw)
    if KINDS[shape] != "conversation":
        raise RowError(f"a {shape} row is not a conversation; GRPO prompts are conversations")
    prompt, reference = split_prompt(canonical)
    if reference is None and needs_reference:
        raise RowError(f"no reference: the row ends with a {prompt[-1].get('role') if prompt else 'missing'} "
                       f"message, and grpo.rewards.{needs_reference} compares with the last assistant turn; end "
                       f"the row with the expected assistant turn, or set grpo.rewards.{needs_reference}: 0")
    row = dict(canonical, messages=prompt + [reference if reference is not None else _NO_REFERENCE])
    valid = validate_conversation(row, fmt.row_rules())
    messages, tools = valid["messages"][:-1], valid["tools"]
    if not any(m["role"] == "user" for m in messages):
        raise RowError("the prompt has no user message")
    recorded = recorded_tool_results(messages)
    if recorded_results:
        messages = messages[:max(k for k, m in enumerate(messages) if m["role"] == "user") + 1]
    text = render_text({"messages": messages, "tools": tools or None}, fmt=fmt, add_generation_prompt=True,
                       tokenizer=tokenizer)
    ids = encode_text(tokenizer, text)
    if len(ids) > max_prompt_tokens:
        raise RowError(f"the prompt is {len(ids)} tokens, more than training.seq_len - grpo.max_completion_tokens "
                       f"= {max_prompt_tokens}; shorten it, or raise training.seq_len")
    return {"prompt": text, "prompt_ids": ids,
            "reference": json.dumps(reference_of(valid["messages"][-1])) if reference is not None else "",
            "tools": json.dumps(tools or []), "messages": json.dumps(messages, ensure_ascii=False),
            "recorded": json.dumps(recorded, ensure_ascii=False)}


def _key(source, tokenizer_dir: Path, fmt: Format, seq_len: int, shape: str, extra: dict) -> str:
    base = cache_key(source, tokenizer_dir, fmt, seq_len, PrepOptions(shape=shape))
    h = hashlib.sha256(f"keel-prompts-v{PROMPTS_VERSION}|{base}|{json.dumps(extra, sort_keys=True)}".encode())
    return "prompts-" + h.hexdigest()[:20]


def prepare_prompts(data: str | Path, *, tokenizer_dir: str | Path, fmt: Format, seq_len: int,
                    max_completion_tokens: int, needs_reference: str | None, recorded_results: bool = False,
                    split: str = "train",
                    cache_root: str | Path | None = None, shape: str = "auto", on_invalid: str = "error",
                    build: bool = True, trust_remote_code: bool = False,
                    timeout_s: float = WAIT_TIMEOUT_S) -> PreparedPrompts:
    """The prompts of one data location, from the cache or built here (`build`: this process
    prepares; the others wait for the completion marker). `recorded_results`: rows are recorded
    episodes (prompt_row)."""
    tokenizer_dir = Path(tokenizer_dir)
    source = open_source(str(data), key=f"data.{split}")
    root = Path(cache_root) if cache_root else default_cache_root()
    extra = {"max_completion_tokens": max_completion_tokens, "needs_reference": needs_reference,
             "on_invalid": on_invalid, "recorded_results": recorded_results}
    final = root / _key(source, tokenizer_dir, fmt, seq_len, shape, extra)
    if (final / COMPLETE_MARKER).exists():
        return _read(final)
    if not build:
        wait_for_marker(final, timeout_s, "prepared prompts")
        return _read(final)
    from data.model_loading import LoadPolicy, load_tokenizer
    from data.render import check_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir, LoadPolicy(trust_remote_code=trust_remote_code))
    check_tokenizer(tokenizer, fmt, f"data.{split}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        stats = _build(source, tmp, tokenizer=tokenizer, fmt=fmt, max_prompt_tokens=seq_len - max_completion_tokens,
                       needs_reference=needs_reference, recorded_results=recorded_results, shape=shape,
                       on_invalid=on_invalid, split=split)
        (tmp / STATS_FILE).write_text(json.dumps(asdict(stats), indent=2))
        (tmp / COMPLETE_MARKER).write_text("prepared\n")
        try:
            tmp.rename(final)
        except OSError:  # another process published the same prompts first; theirs are identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PreparedPrompts(final, stats, reused=False)


def _build(source, tmp: Path, *, tokenizer, fmt: Format, max_prompt_tokens: int, needs_reference: str | None,
           recorded_results: bool, shape: str, on_invalid: str, split: str) -> PromptStats:
    from datasets import Dataset

    stats, rows, errors = PromptStats(), [], []
    for where, raw in source.rows():
        stats.rows += 1
        try:
            if isinstance(raw, RowError):
                raise raw
            if shape == "auto":
                shape = detect_shape(raw, f"data.{split} {where}")
            row = prompt_row(raw, shape, tokenizer=tokenizer, fmt=fmt, max_prompt_tokens=max_prompt_tokens,
                             needs_reference=needs_reference, recorded_results=recorded_results)
        except RowError as exc:
            errors.append((where, str(exc)))
            continue
        rows.append(row)
        stats.max_prompt_tokens = max(stats.max_prompt_tokens, len(row["prompt_ids"]))
        stats.with_reference += bool(row["reference"])
        stats.with_recorded_results += row["recorded"] != "[]"
    stats.rejected = len(errors)
    if errors and on_invalid == "error":
        shown = "\n".join(f"  - {where}: {why}" for where, why in errors[:5])
        more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise KeelError(f"data.{split}: {len(errors)} of {stats.rows} rows cannot be GRPO prompts:\n{shown}{more}\n"
                        "Fix them, or set data.on_invalid: skip to leave them out (listed in rejected.jsonl)")
    if errors:
        with open(tmp / REJECTED_FILE, "w") as f:
            for where, why in errors:
                f.write(json.dumps({"where": where, "reason": why}) + "\n")
    if not rows:
        raise KeelError(f"data.{split}: no usable prompt in {source.location}")
    if recorded_results and not stats.with_recorded_results:
        raise KeelError(f"data.{split}: grpo.tool_results is recorded, but no row of {source.location} records a tool "
                        "call with its result (an assistant turn with tool_calls followed by its role 'tool' "
                        "messages); add them to the rows, or set grpo.tool_results: module with grpo.tools_module")
    stats.prompts = len(rows)
    _write_arrow(Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]}), tmp / DATA_FILE)
    return stats


def _write_arrow(ds, path: Path) -> None:
    from datasets.arrow_writer import ArrowWriter

    with ArrowWriter(path=str(path)) as writer:
        writer.write_table(ds.data.table)
        writer.finalize()


def _read(path: Path) -> PreparedPrompts:
    stats = PromptStats(**json.loads((path / STATS_FILE).read_text()))
    return PreparedPrompts(path, stats, reused=True)
