"""`python -m data synthetic` writes the shipped example data exactly (the quickstart's training
set and the tests' corpus can be regenerated and reviewed), and refuses bad arguments in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def data_cmd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_regenerates_the_shipped_examples_byte_for_byte(tmp_path):
    out = tmp_path / "tool-calling.jsonl"
    res = data_cmd("synthetic", "--n", "400", "--seed", "0", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == (REPO / "data" / "examples" / "tool-calling.jsonl").read_bytes()


def test_bad_arguments_are_one_line_errors_and_write_nothing(tmp_path):
    (tmp_path / "taken.jsonl").mkdir()  # an --out that cannot be written: a directory
    for args, message in [(["--n", "0"], "--n 0"), (["--n", "-3"], "--n -3"),
                          (["--out", str(tmp_path / "taken.jsonl")], "Is a directory")]:
        argv = ["synthetic", "--n", "3", "--out", str(tmp_path / "x.jsonl")]
        for flag, value in zip(args[::2], args[1::2]):
            argv[argv.index(flag) + 1] = value
        res = data_cmd(*argv)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.count("\n") == 1 and [p.name for p in tmp_path.rglob("*")] == ["taken.jsonl"]
