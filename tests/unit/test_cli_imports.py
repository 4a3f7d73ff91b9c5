"""`keel --help`, `keel validate` and `keel plan` answer at once: none of them imports the heavy
libraries (torch alone takes seconds to import on a small machine). Each command runs in a fresh
interpreter, through keel.cli.main as the `keel` script calls it, which then reports every module
it has imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "transformers", "vllm", "mlflow", "deepspeed", "trl", "peft", "datasets"}
RECIPE = "recipes/qwen3/qwen3-30b-a3b-sft-lora.yaml"  # a kept hub id; a mixture of experts under LoRA
REPORT = ("import contextlib, io, json, sys\n"
          "from keel.cli import main\n"
          "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
          "    rc = main(json.loads(sys.argv[1]))\n"
          "print(json.dumps({'rc': rc, 'out': out.getvalue(), 'modules': sorted(sys.modules)}))\n")


def run_keel(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", REPORT, json.dumps(args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("args", [("--help",), ("validate", RECIPE), ("plan", RECIPE), ("plan", RECIPE, "--gpu", "cpu")],
                         ids=" ".join)
def test_command_imports_none_of_the_heavy_libraries(args):
    result = run_keel(*args)
    # usage, "ok: ...", or a plan with its verdict (a MoE 30B does not fit a CPU: exit status 1)
    assert result["rc"] == 0 or (args[-1] == "cpu" and result["rc"] == 1 and "does NOT fit" in result["out"])
    assert result["out"]
    imported = {name.split(".")[0] for name in result["modules"]}
    assert not imported & HEAVY, sorted(imported & HEAVY)


def test_the_check_sees_a_heavy_import(tmp_path, tiny_model):
    """Negative control: `keel prepare` tokenizes, so it loads transformers' tokenizer code; the
    same check sees it."""
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join((REPO / "data" / "examples" / "tool-calling.jsonl").read_text().splitlines()[:4]) + "\n")
    result = run_keel("prepare", "recipes/quickstart/sft-tool-calling.yaml", f"model.path={tiny_model}",
                      f"data.train={data}", f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=1")
    assert result["rc"] == 0
    assert "transformers" in {name.split(".")[0] for name in result["modules"]}
