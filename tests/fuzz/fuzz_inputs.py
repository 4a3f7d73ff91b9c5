"""Coverage-guided fuzzing (atheris, libFuzzer) of what Keel reads from users: recipes, data rows,
JSON Lines files. Any exception but a KeelError is a crash: libFuzzer stops and writes the
input to crash-<hash> in the working directory.

Not part of any pytest tier. Run one target (docs/testing.md, "Hostile inputs and fuzzing"; results in
benchmarks/results/fuzz.md):

    PYTHONPATH=. python tests/fuzz/fuzz_inputs.py recipe -runs=100000
    PYTHONPATH=. python tests/fuzz/fuzz_inputs.py conversation -runs=100000
    PYTHONPATH=. python tests/fuzz/fuzz_inputs.py jsonl -runs=100000
    PYTHONPATH=. python tests/fuzz/fuzz_inputs.py files -runs=100000

Keel's own modules are instrumented for coverage; the libraries they call are not (faster,
and their coverage is not what is under test).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["data", "trainer.recipe"]):
    from data.conversation import RowRules, validate_conversation, validate_document, validate_preference
    from data.errors import KeelError
    from data.files import parse_json, parse_yaml
    from data.model_config import read_model_config
    from data.formats import available_formats, load_format
    from data.render import render_conversation
    from data.shapes import KINDS, detect_shape, to_canonical
    from data.sources import open_source
    from trainer.recipe import parse_recipe

KEYS = ["messages", "role", "content", "tool_calls", "function", "name", "arguments", "tools", "type", "parameters",
        "tool_call_id", "id", "reasoning_content", "text", "conversations", "from", "value", "system", "instruction",
        "input", "output", "history", "prompt", "completion", "chosen", "rejected", "properties", "required", "$ref",
        "pattern", "file", "image_url", "url", "model", "path", "format", "data", "train", "training", "max_steps",
        "learning_rate", "output", "dir", "peft", "kind", "dpo", "distributed", "strategy"]
WORDS = ["user", "assistant", "system", "tool", "human", "gpt", "function_call", "observation", "function", "text",
         "get_weather", "<think>", "</think>", "<tool_call>", "{", "[", "{\"a\": 1}", "object", "string", "#/x",
         "file:///etc/passwd", "hermes-qwen3", "native", "lora", "zero3"]
RULES = [RowRules()] + [load_format(n).row_rules() for n in available_formats() if n != "native"]
HARMONY = load_format("harmony")

REPO = Path(__file__).resolve().parents[2]


def value(fdp: atheris.FuzzedDataProvider, depth: int = 0):
    """A JSON value steered by the fuzzer, with Keel's key names and words common in it."""
    kind = fdp.ConsumeIntInRange(0, 9 if depth < 6 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeInt(4)
    if kind == 3:
        return fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeFloat()
    if kind == 4:
        return WORDS[fdp.ConsumeIntInRange(0, len(WORDS) - 1)]
    if kind == 5:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 24))
    if kind in (6, 7):
        return {(KEYS[fdp.ConsumeIntInRange(0, len(KEYS) - 1)] if fdp.ConsumeBool()
                 else fdp.ConsumeUnicodeNoSurrogates(4)): value(fdp, depth + 1)
                for _ in range(fdp.ConsumeIntInRange(0, 5))}
    if kind == 8:
        return [value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    return json.dumps(value(fdp, depth + 1))  # JSON as text, as CSV cells and Parquet strings hold it


def keel_errors_only(fn, *args):
    try:
        return fn(*args)
    except KeelError:
        return None


def fuzz_recipe(data: bytes) -> None:
    if data[:1] and data[0] & 1:
        import yaml

        fdp = atheris.FuzzedDataProvider(data[1:])
        text, overrides = yaml.safe_dump(value(fdp)), [fdp.ConsumeUnicodeNoSurrogates(30) for _ in range(2)]
    else:  # YAML text, then NUL-separated key=value overrides: the seed is the quickstart recipe
        text, *overrides = data[1:].decode("utf-8", errors="replace").split("\x00")
    keel_errors_only(parse_recipe, text, "fuzz.yaml", overrides)


def fuzz_conversation(data: bytes) -> None:
    if len(data) < 3:
        return
    rules, shape = RULES[data[1] % len(RULES)], sorted(KINDS)[data[2] % len(KINDS)]
    if data[0] & 1:
        row = value(atheris.FuzzedDataProvider(data[3:]))
    else:  # JSON text: the seeds are real rows, which libFuzzer mutates
        try:
            row = json.loads(data[3:])
        except (ValueError, RecursionError):  # not a row: the JSONL reader reports those (target jsonl)
            return
    conv = keel_errors_only(validate_conversation, row, rules)
    if conv is not None and rules.format_name == "harmony":  # rendered by the harmony library, no tokenizer needed
        keel_errors_only(lambda c: render_conversation(c, tokenizer=None, fmt=HARMONY), conv)
    keel_errors_only(validate_preference, row, rules)
    keel_errors_only(detect_shape, row, "fuzz.jsonl:1")
    canonical = keel_errors_only(to_canonical, shape, row)
    if canonical is not None:
        check = {"conversation": validate_conversation, "preference": validate_preference,
                 "document": lambda r, _rules: validate_document(r, ("<|im_end|>",))}[KINDS[shape]]
        keel_errors_only(check, canonical, rules)


_FS = None


def fuzz_jsonl(data: bytes) -> None:
    global _FS
    if _FS is None:
        import fsspec

        _FS = fsspec.filesystem("memory")
    _FS.pipe("/fuzz.jsonl", data)
    rules = RULES[0]
    for where, row in keel_errors_only(lambda: list(open_source("memory:///fuzz.jsonl").rows())) or []:
        assert where.startswith("memory:///fuzz.jsonl:"), where
        if isinstance(row, dict):
            shape = keel_errors_only(detect_shape, row, where)
            canonical = keel_errors_only(to_canonical, shape, row) if shape else None
            if canonical is not None and KINDS[shape] == "conversation":
                keel_errors_only(validate_conversation, canonical, rules)


_CONFIG = None


def fuzz_files(data: bytes) -> None:
    """Bytes as a JSON or YAML file Keel reads (data/files.py), and as a model's config.json."""
    global _CONFIG
    if _CONFIG is None:
        _CONFIG = Path(tempfile.mkdtemp(prefix="keel-fuzz-files-")) / "config.json"
    text = data.decode("utf-8", errors="replace")
    keel_errors_only(parse_json, text, "fuzz.json")
    keel_errors_only(parse_yaml, text, "fuzz.yaml")
    _CONFIG.write_bytes(data)
    keel_errors_only(read_model_config, _CONFIG)


TARGETS = {"recipe": fuzz_recipe, "conversation": fuzz_conversation, "jsonl": fuzz_jsonl, "files": fuzz_files}


def seed_corpus(target: str) -> str:
    """A fresh corpus directory seeded with real inputs: the quickstart recipe, example rows."""
    out = Path(tempfile.mkdtemp(prefix=f"keel-fuzz-{target}-"))
    rows = (REPO / "data" / "examples" / "tool-calling.jsonl").read_bytes().splitlines()[:8]
    if target == "recipe":
        import yaml

        # without its comments (483 bytes, not 1.2 KB): PyYAML is pure Python, so shorter inputs run faster
        recipe = yaml.safe_dump(yaml.safe_load((REPO / "recipes" / "quickstart" / "sft-tool-calling.yaml")
                                               .read_text())).encode()
        seeds = [b"\x00" + recipe, b"\x00" + recipe + b"\x00training.max_steps=3\x00peft.kind=lora"]
    elif target == "conversation":
        seeds = [b"\x00\x00\x00" + row for row in rows]
    elif target == "files":
        config = (REPO / "trainer" / "models" / "architectures").glob("*.json")
        seeds = [p.read_bytes() for p in sorted(config)[:4]] + [b"a: &a [x, x]\nb: [*a, *a]\n", b'{"a": 1}']
    else:
        seeds = [b"\n".join(rows[:3]) + b"\n", rows[0]]
    for i, seed in enumerate(seeds):
        (out / f"seed-{i}").write_bytes(seed)
    return str(out)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python {sys.argv[0]} {{{','.join(TARGETS)}}} [-runs=N] [libFuzzer options] [CORPUS_DIR]")
    name = sys.argv.pop(1)
    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        argv.append(seed_corpus(name))
    print(f"[fuzz] target {name}; libFuzzer prints 'Done N runs' (inputs tried) at the end", flush=True)
    atheris.Setup(argv, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
