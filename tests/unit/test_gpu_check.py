"""benchmarks/gpu_check.py's cheap parts (the whole dry run takes about 4 minutes on 2 cores, so
it is a named command, `make gpu-check-dry-run`, outside the test tiers): without a GPU it
refuses to measure and points at --dry-run; a wrong --only is one error line; the report is
written from a result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def test_without_a_gpu_it_refuses_to_measure_and_names_the_dry_run(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keel: error: ") and "--dry-run" in err[0]


def test_an_unknown_step_is_one_error_line(capsys, tmp_path):
    assert gpu_check.main(["--dry-run", "--only", "train,bench", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["keel: error: --only: unknown step(s) bench; use train, plan, serve"]
    assert not list(tmp_path.iterdir())


def test_the_report_names_the_dry_run_and_every_step(tmp_path):
    result = {"dry_run": True, "date": "2026-12-04 10:00 UTC", "command": "python benchmarks/gpu_check.py --dry-run",
              "wall_s": 200.0, "section_s": {"train": 20, "plan": 50, "serve": 130},
              "shapes": gpu_check.shapes(True), "versions": {"torch": "2.13.0"},
              "train": {"attention": "keel_document_sdpa", "attention_why": "CPU", "packed_probe_max_logit_diff": 2e-7,
                        "median_trained_tokens_per_s": {"keel": 2.0, "trl_packing": 1.0, "trl_padding_free": 1.5},
                        "median_mfu": {"keel": None, "trl_packing": None, "trl_padding_free": None},
                        "best_trl": "trl_padding_free", "keel_over_best_trl": 1.333},
              "plan": {"gpu_kind": "cpu", "compared": "...", "cases": {
                  "none": {"predicted": {"total_gib": 1.0}, "measured": {"peak_rss_above_start_gib": 2.0},
                           "predicted_over_measured": 0.5},
                  "qlora": {"skipped": "needs a CUDA GPU"}}},
              "serve": {"median_output_tokens_per_s": {"bare": 10.0, "keel": 9.0}, "start_s": {"bare": 60, "keel": 61},
                        "keel_over_bare": 0.9, "bare_command": "python -m vllm ..."}}
    gpu_check.write_report(tmp_path / "gpu_check-dryrun", result)
    md = (tmp_path / "gpu_check-dryrun.md").read_text()
    assert md.startswith("# GPU check (CPU dry run: not GPU figures)")
    for text in ("Keel / best TRL (trl_padding_free): **1.333**", "| qlora | - | - | skipped: needs a CUDA GPU |",
                 "keel / bare: **0.9**", "| torch | 2.13.0 |"):
        assert text in md
    assert json.loads((tmp_path / "gpu_check-dryrun.json").read_text())["dry_run"] is True
