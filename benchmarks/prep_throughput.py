"""Data preparation: Keel's `prepare_file` against TRL's own SFT preprocessing, same data, same
tokenizer, same chat template, packed rows of the same length, runs interleaved.

    PYTHONPATH=. python benchmarks/prep_throughput.py --model runs/tiny --rows 4000 --num-proc 1 2 all

`--num-proc all` is every CPU the process may use (Keel's default, data.num_proc unset); a value
that repeats another (all = 2 on a 2-core machine) is run once.

Data: long-tailed synthetic tool-calling conversations (data/synthetic.py, long_tail=True).
Both sides read the conversations and produce packed token rows with a loss mask on what the
assistant writes:

    keel   prepare_file(packing=True): JSON Lines file -> validate, render (hermes-qwen3, whose
           template is also the tiny model's own), mask, truncate, pack (best-fit decreasing),
           Arrow file on disk. Timed from the file to the published cache, fingerprint included.
    trl    SFTTrainer._prepare_dataset(packing=True, packing_strategy="bfd",
           assistant_only_loss=True, dataset_num_proc=N) on an in-memory `datasets.Dataset`
           (apply_chat_template with the {% generation %} mask, labels, packing). Timed from the
           Dataset, so reading the file is not counted for TRL.

What TRL needed: `tools` kept as a JSON string column (TRL 1.16 json.loads it), because as
objects Arrow merges every tool's parameters into one struct. The `messages` column is still Arrow structs, which adds null keys to messages
(a user turn gains reasoning_content: null); for this template that renders the same text
(checked on the first 200 rows by this script before timing).

Reported per run: conversations per second, and per packed row the tokens and trained
tokens. The trained tokens differ by design: Keel drops the reasoning of turns before the
last user message as the server renders them and makes each such stretch its own example
(data/render.py), TRL trains every assistant turn of the whole conversation once.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"


def keel_run(data: Path, model: str, seq_len: int, num_proc: int, work: Path) -> dict:
    from data.formats import load_format
    from data.prepare import PrepOptions, prepare_file

    root = work / f"keel-cache-{num_proc}"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    prepared = prepare_file(data, tokenizer_dir=model, fmt=load_format("hermes-qwen3"), seq_len=seq_len,
                            cache_root=root, options=PrepOptions(packing=True), num_proc=num_proc)
    seconds = time.perf_counter() - t0
    s = prepared.stats
    return {"seconds": seconds, "rows": s.rows, "packed_rows": s.sequences, "tokens": s.tokens,
            "trained_tokens": s.trained_tokens}


def trl_trainer(model: str, seq_len: int, num_proc: int, work: Path):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(output_dir=str(work / "trl-out"), max_length=seq_len, packing=True, packing_strategy="bfd",
                       assistant_only_loss=True, dataset_num_proc=num_proc if num_proc > 1 else None,
                       report_to="none", use_cpu=True)
    probe = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}])
    return SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), args=config,
                      train_dataset=probe, processing_class=AutoTokenizer.from_pretrained(model))


def trl_run(rows: list[dict], model: str, seq_len: int, num_proc: int, work: Path) -> dict:
    from datasets import Dataset

    trainer = trl_trainer(model, seq_len, num_proc, work)
    dataset = Dataset.from_list(rows)
    t0 = time.perf_counter()
    packed = trainer._prepare_dataset(dataset, trainer.processing_class, trainer.args, packing=True,
                                      formatting_func=None, dataset_name="train")
    seconds = time.perf_counter() - t0
    labels = packed.with_format("numpy")["labels"]
    trained = sum(int((row != -100).sum()) for row in labels)
    tokens = sum(len(row) for row in labels)
    return {"seconds": seconds, "rows": len(rows), "packed_rows": len(packed), "tokens": tokens,
            "trained_tokens": trained}


def check_trl_renders_the_same(rows: list[dict], model: str) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    sample = rows[:200]
    for plain, arrow in zip(sample, Dataset.from_list(sample)):
        a = tok.apply_chat_template(plain["messages"], tools=json.loads(plain["tools"]), tokenize=False)
        b = tok.apply_chat_template(arrow["messages"], tools=json.loads(arrow["tools"]), tokenize=False)
        if a != b:
            raise SystemExit("Arrow's struct columns change TRL's rendering here; the comparison would be unfair")


def _median_rate(runs: list[dict]) -> float:
    rates = sorted(r["conversations_per_s"] for r in runs)
    return rates[len(rates) // 2]


def write_results(records: list[dict], meta: dict, stem: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    summary = {}
    for r in records:
        summary.setdefault((r["tool"], r["num_proc"]), []).append(r)
    lines = [f"# Data preparation: Keel vs TRL ({meta['date']})", "", "```", meta["command"], "```", "",
             f"- machine: {meta['machine']}", f"- versions: {meta['versions']}",
             f"- data: {meta['data']}", "",
             "| tool | num_proc | runs | conversations/s (median) | packed rows | tokens/row | trained tokens/row |",
             "|---|---|---|---|---|---|---|"]
    for (tool, num_proc), runs in sorted(summary.items()):
        last = runs[-1]
        lines.append(f"| {tool} | {num_proc} | {len(runs)} | {_median_rate(runs):.1f} | {last['packed_rows']} | "
                     f"{last['tokens_per_row']:.1f} | {last['trained_tokens_per_row']:.1f} |")
    pairs = [(num_proc, summary[("keel", num_proc)], summary[("trl", num_proc)])
             for num_proc in sorted({n for _, n in summary})
             if ("keel", num_proc) in summary and ("trl", num_proc) in summary]
    lines.append("")
    for num_proc, k, t in pairs:
        lines.append(f"- num_proc {num_proc}: Keel/TRL conversations/s = {_median_rate(k) / _median_rate(t):.2f}; "
                     "trained tokens per packed row Keel/TRL = "
                     f"{k[-1]['trained_tokens_per_row'] / t[-1]['trained_tokens_per_row']:.2f}")
    lines.append("")
    for num_proc, k, t in pairs:
        lines.append(f"keel_vs_trl_prep_conversations_per_s: {_median_rate(k) / _median_rate(t):.2f} "
                     f"(num_proc {num_proc})  ")
    if meta.get("all_cores"):
        lines += ["", f"num_proc all = {meta['all_cores']} CPUs here."]
    if meta.get("profile"):
        lines += ["", f"Where Keel's time goes: {meta['profile']}."]
    lines += ["", meta["notes"], ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(summary)
    labels = [f"{tool}\nnum_proc {n}" for tool, n in keys]
    colors = ["#4878a8" if tool == "keel" else "#c44e52" for tool, _ in keys]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    medians = [sorted(r["conversations_per_s"] for r in summary[k])[len(summary[k]) // 2] for k in keys]
    axes[0].bar(labels, medians, color=colors)
    axes[0].set_ylabel("conversations / s (median)")
    axes[1].bar(labels, [summary[k][-1]["trained_tokens_per_row"] for k in keys], color=colors)
    axes[1].set_ylabel("trained tokens per packed row")
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"Keel vs TRL preparation, {meta['data']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=100)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="a model dir with a hermes-qwen3 tokenizer (keel tiny-model)")
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--num-proc", nargs="+", default=["1", "2", "all"], help="worker counts; 'all': every usable CPU")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--stem", default="prep_throughput")
    a = p.parse_args(argv)
    load_at_start = os.getloadavg()[0]
    all_cores = len(os.sched_getaffinity(0))
    a.num_proc = list(dict.fromkeys(all_cores if n == "all" else int(n) for n in a.num_proc))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import torch
    import transformers
    import trl

    from data.synthetic import generate_conversations, write_jsonl

    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="keel-prep-bench-"))
    conversations = generate_conversations(a.rows, seed=0, long_tail=True)
    data = work / "rows.jsonl"
    write_jsonl(conversations, data)
    trl_rows = [{"messages": c["messages"], "tools": json.dumps(c["tools"])} for c in conversations]
    check_trl_renders_the_same(trl_rows, a.model)

    records = []
    for repeat in range(a.repeats):
        for num_proc in a.num_proc:
            for tool in ("keel", "trl"):  # interleaved: machine load drifts between runs
                r = (keel_run(data, a.model, a.seq_len, num_proc, work) if tool == "keel"
                     else trl_run(trl_rows, a.model, a.seq_len, num_proc, work))
                record = {"tool": tool, "num_proc": num_proc, "repeat": repeat, "conversations": r["rows"],
                          "seconds": round(r["seconds"], 2), "conversations_per_s": round(r["rows"] / r["seconds"], 1),
                          "packed_rows": r["packed_rows"], "tokens_per_row": round(r["tokens"] / r["packed_rows"], 1),
                          "trained_tokens_per_row": round(r["trained_tokens"] / r["packed_rows"], 1)}
                print(json.dumps(record), flush=True)
                records.append(record)
    meta = {"date": date.today().isoformat(),
            "command": "PYTHONPATH=. python benchmarks/prep_throughput.py " + " ".join(argv),
            "machine": f"{platform.machine()} Linux, {len(os.sched_getaffinity(0))} CPU cores shared with other "
                       f"jobs (load average at start {load_at_start:.1f}, at end {os.getloadavg()[0]:.1f})",
            "versions": f"python {platform.python_version()}, torch {torch.__version__}, transformers "
                        f"{transformers.__version__}, trl {trl.__version__}, datasets {datasets.__version__}",
            "all_cores": all_cores, "profile": "prep_profile.md (cProfile, before and after each round of the issue 18 work)",
            "data": f"{a.rows} long-tailed synthetic conversations, seq_len {a.seq_len}, tiny model's tokenizer",
            "notes": __doc__.split("What TRL needed:")[1].strip().replace("\n", " ")}
    write_results(records, meta, a.stem)
    print(f"wrote {RESULTS / a.stem}.csv/.md/.png")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
