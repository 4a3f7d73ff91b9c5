"""Training throughput, Keel against TRL's SFTTrainer, side by side in one run.

    flock /tmp/keel-bench.lock env PYTHONPATH=. python benchmarks/train_throughput.py

Each cell (a model and a data set) trains fresh copies of the same random-init model on the
same tokenized examples, one epoch, so every configuration trains the same loss-bearing tokens:

    keel              Keel's training path (trainer/techniques/sft.py) on Keel-packed rows (training.packing):
                      padding-free micro-batches, attention per document, loss on trained tokens
    trl_default       TRL SFTTrainer, padded batches of examples (its default collation)
    trl_packing       TRL packing=True (bfd rows of seq_len)
    trl_padding_free  TRL padding_free=True without packing (max_length=None in TRL 1.16)

All get the same learning rate, seq_len, seed and about the same tokens per optimizer step
(--tokens-per-step: Keel and TRL packing take that many tokens of rows, the others that many
tokens' worth of examples at the data's mean length); fp32; gradient checkpointing off for all
(TRL's default turns it on, which would only slow TRL down). TRL gets the examples Keel prepared
(input_ids and Keel's labels, which TRL keeps as given), so nobody tokenizes during the timed run.
Runs are interleaved (keel, trl_default, trl_packing, trl_padding_free, keel, ...) and each
cell is repeated; reports take medians. Trained tokens are counted by one function,
`count_tokens`, on every micro-batch each trainer's collator produces.

Throughput is measured from the end of the first optimizer step to the end of the last; time
to first step is from the trainer's construction to the end of its first step (TRL's dataset
preparation included; Keel's cached preparation is timed once, apart).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = ("keel", "trl_default", "trl_packing", "trl_padding_free")
PEERS = CONFIGS[1:]
# A CPU-realistic small Llama, random init (throughput does not depend on weight values): ~60M
# parameters with a 32k vocabulary; the tiny tokenizer uses the first ids of it.
LLAMA_60M = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)


def count_tokens(batch: dict) -> dict[str, int]:
    """The one count every configuration is measured by: trained = positions whose next token
    is loss-bearing (a label != -100 after the shift, so an example's first token never counts),
    real = tokens that are not padding, positions = the batch's size in tokens."""
    labels = batch["labels"]
    positions = labels.numel()
    real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else positions
    return {"trained": int((labels[..., 1:] != -100).sum()), "real": real, "positions": positions}


class CountingCollator:
    """Wraps a trainer's collator; keeps count_tokens of every micro-batch, in order."""

    def __init__(self, inner):
        self.inner, self.counts = inner, []

    def __call__(self, rows):
        batch = self.inner(rows)
        self.counts.append(count_tokens(batch))
        return batch


class PeakMemory:
    """Peak resident memory of this process above its level at start, sampled every 10 ms (CPU);
    torch's peak allocated memory on a GPU."""

    def __init__(self):
        import psutil
        import torch

        self.cuda = torch.cuda.is_available()
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.proc.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()

    def _sample(self):
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def finish(self) -> float:
        import torch

        if self.cuda:
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        self.stop.set()
        self.thread.join()
        return max(0, self.peak - self.base) / 2**20


def step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.losses = [], []

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    return StepClock()


def build_trainer(config: str, *, model_dir: str, data: dict, batch: dict, lr: float, seq_len: int, out: Path,
                  callbacks, bf16: bool = False, attn_implementation: str | None = None):
    """One configuration's trainer on a fresh copy of the model (fp32 weights; `bf16`: computed
    under bf16 autocast; `attn_implementation`: the same for every configuration, default
    transformers' choice)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **extra)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    common = dict(output_dir=str(out), num_train_epochs=1, learning_rate=lr, lr_scheduler_type="constant",
                  report_to="none", use_cpu=not torch.cuda.is_available(), save_strategy="no", logging_steps=1,
                  disable_tqdm=True, seed=0, data_seed=0, gradient_checkpointing=False, bf16=bf16)
    if config == "keel":
        from trainer.techniques.sft import build_sft_trainer

        return build_sft_trainer(model=model, tokenizer=tokenizer, peft_config=None, packed=True,
                                 args={**common, "per_device_train_batch_size": batch["rows"],
                                       "remove_unused_columns": False},
                                 train_dataset=data["keel"], eval_dataset=None, callbacks=callbacks)
    from trl import SFTConfig, SFTTrainer

    kind = {"trl_default": dict(max_length=seq_len, per_device_train_batch_size=batch["examples"]),
            "trl_packing": dict(packing=True, max_length=seq_len, per_device_train_batch_size=batch["rows"]),
            "trl_padding_free": dict(padding_free=True, max_length=None,
                                     per_device_train_batch_size=batch["examples"])}[config]
    return SFTTrainer(model=model, args=SFTConfig(**common, **kind), train_dataset=data["trl"],
                      processing_class=tokenizer, callbacks=callbacks)


def run_one(config: str, cell: dict, *, lr: float, seq_len: int, out: Path, bf16: bool = False,
            attn_implementation: str | None = None) -> dict:
    import gc

    import torch

    gc.collect()
    clock = step_clock()
    memory = PeakMemory()
    t0 = time.perf_counter()
    trainer = build_trainer(config, model_dir=cell["model_dir"], data=cell["data"], batch=cell["batch"], lr=lr,
                            seq_len=seq_len, out=out, callbacks=[clock], bf16=bf16,
                            attn_implementation=attn_implementation)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()
    peak_mib = memory.finish()
    steps = len(clock.times)
    assert steps >= 3 and len(counter.counts) >= steps, (config, steps, len(counter.counts))
    timed = counter.counts[1:steps]  # micro-batches of steps 2..N (grad_accum 1: one per step)
    seconds = clock.times[-1] - clock.times[0]
    trained, real, positions = (sum(c[k] for c in timed) for k in ("trained", "real", "positions"))
    row = {"config": config, "steps": steps, "seconds": round(seconds, 3),
           "trained_tokens": sum(c["trained"] for c in counter.counts[:steps]),
           "trained_tokens_per_s": round(trained / seconds, 1), "total_tokens_per_s": round(real / seconds, 1),
           "padding_fraction": round(1 - real / positions, 4), "peak_memory_mib": round(peak_mib, 1),
           "time_to_first_step_s": round(clock.times[0] - t0, 3), "first_loss": clock.losses[0] if clock.losses else None,
           "mfu": ""}
    if torch.cuda.is_available():  # full fine-tuning of a dense model: 6 x params FLOPs per token
        from trainer.models.flops import device_peak_flops, training_flops_per_token

        per_token = training_flops_per_token(trained=sum(p.numel() for p in trainer.model.parameters()))
        peak = os.environ.get("KEEL_PEAK_FLOPS") or device_peak_flops(torch.cuda.get_device_name())
        if peak:  # a GPU Keel has no figure for: set KEEL_PEAK_FLOPS
            row["mfu"] = round(per_token * real / seconds / float(peak), 4)
    del trainer
    return row


# ------------------------------------------------------------------------------------ setup


def build_models(work: Path, which: list[str]) -> dict[str, str]:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trainer.models.tiny import build_tiny_model

    tiny = str(build_tiny_model(work / "tiny"))
    models = {"tiny": tiny}
    if "llama60m" in which:
        import torch

        tok = AutoTokenizer.from_pretrained(tiny)
        torch.manual_seed(0)
        config = LlamaConfig(**LLAMA_60M, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
        model.save_pretrained(work / "llama60m")
        tok.save_pretrained(work / "llama60m")
        models["llama60m"] = str(work / "llama60m")
    return models


def long_documents(n: int, seed: int) -> list[dict]:
    """CPT documents: slices of the repository's prose corpus with log-normal lengths."""
    words = (REPO / "data" / "corpus" / "prose.txt").read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        length = max(20, min(len(words) - 1, int(rng.lognormvariate(5.0, 0.9))))
        start = rng.randrange(0, len(words) - length)
        docs.append({"text": " ".join(words[start:start + length])})
    return docs


def prepare_cell(kind: str, *, n: int, model_dir: str, seq_len: int, work: Path) -> tuple[dict, dict]:
    """Keel's packed rows and TRL's tokenized examples of the same data, and preparation facts."""
    from datasets import Dataset

    from data.formats import load_format
    from data.prepare import PrepOptions, prepare_file
    from data.synthetic import generate_conversations, write_jsonl

    path = work / f"{kind}-{n}.jsonl"
    write_jsonl(generate_conversations(n, seed=0, long_tail=True) if kind == "chat" else long_documents(n, seed=0),
                path)
    kwargs = dict(tokenizer_dir=model_dir, fmt=load_format("hermes-qwen3"), seq_len=seq_len,
                  cache_root=work / "cache", num_proc=1)
    plain = prepare_file(path, options=PrepOptions(packing=False), **kwargs)
    t0 = time.perf_counter()
    packed = prepare_file(path, options=PrepOptions(packing=True), **kwargs)
    prep_s = time.perf_counter() - t0
    ds = plain.load()
    trl = Dataset.from_dict({"input_ids": ds["input_ids"], "labels": ds["labels"]})  # TRL keeps given labels
    facts = {"examples": len(ds), "tokens": plain.stats.tokens, "trained_tokens": plain.stats.trained_tokens,
             "packed_rows": packed.stats.sequences, "keel_prep_pack_s": round(prep_s, 2),
             "mean_example_tokens": round(plain.stats.tokens / len(ds), 1)}
    return {"keel": packed.load(), "trl": trl}, facts


# ------------------------------------------------------------------------------------ report


def summarize(rows: list[dict], cells: list[str]) -> dict:
    """Per cell: medians per config, and per-repeat Keel/peer ratios (median, min, max)."""
    metrics = ("trained_tokens_per_s", "total_tokens_per_s", "padding_fraction", "peak_memory_mib",
               "time_to_first_step_s", "mfu")
    out = {}
    for cell in cells:
        mine = [r for r in rows if r["cell"] == cell]
        repeats = sorted({r["repeat"] for r in mine})
        by = {(r["config"], r["repeat"]): r for r in mine}
        med = {c: {m: statistics.median(float(by[c, k][m] or 0) for k in repeats) for m in metrics} for c in CONFIGS}
        ratios = {}
        for peer in PEERS + ("trl_best",):
            for m in metrics:
                vals = []
                for k in repeats:
                    if peer == "trl_best":
                        other = max(float(by[p, k]["trained_tokens_per_s"]) for p in PEERS)
                        if m != "trained_tokens_per_s":
                            continue
                    else:
                        other = float(by[peer, k][m] or 0)
                    mine_v = float(by["keel", k][m] or 0)
                    if other:
                        vals.append(mine_v / other)
                if vals:
                    ratios[f"{m}/{peer}"] = (statistics.median(vals), min(vals), max(vals))
        best_peer = max(PEERS, key=lambda p: med[p]["trained_tokens_per_s"])
        out[cell] = {"median": med, "ratios": ratios, "best_peer": best_peer}
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("trained_tokens_per_s", "total_tokens_per_s", "peak_memory_mib", "time_to_first_step_s")
    cells = list(summary)
    fig, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 4), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        width = 0.8 / len(PEERS)
        for i, peer in enumerate(PEERS):
            vals = [summary[cell]["ratios"].get(f"{m}/{peer}", (0, 0, 0)) for m in metrics]
            xs = [j + i * width for j in range(len(metrics))]
            ax.bar(xs, [v[0] for v in vals], width, label=f"Keel / {peer}",
                   yerr=[[v[0] - v[1] for v in vals], [v[2] - v[0] for v in vals]], capsize=2)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(1.5, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))])
        ax.set_xticklabels(["trained tok/s", "total tok/s", "peak mem", "time to 1st step"], fontsize=8)
        ax.set_title(cell, fontsize=9)
        ax.set_ylabel("Keel / TRL (median of repeats)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_markdown(path: Path, *, summary: dict, record: dict, headline_cell: str) -> float:
    head = summary[headline_cell]["ratios"]["trained_tokens_per_s/trl_best"]
    lines = [f"# Training throughput: Keel vs TRL SFTTrainer ({record['date']})", "",
             f"keel_vs_trl_best_trained_tokens_per_s: {head[0]:.2f}", "",
             f"Headline cell: {headline_cell}; the median over {record['repeats']} repeats of Keel's trained tokens/s "
             f"over the best TRL configuration's in the same repeat (range {head[1]:.2f}-{head[2]:.2f}).", "",
             f"- command: `{record['command']}`",
             f"- machine: {record['machine']}. Runs were interleaved (keel, trl_default, trl_packing, "
             "trl_padding_free, keel, ...), so drift of the machine hits every configuration alike; the "
             "benchmark held /tmp/keel-bench.lock while measuring, but other work on the machine can still add "
             "noise to single runs: read medians.",
             f"- versions: {', '.join(f'{k} {v}' for k, v in record['versions'].items())}",
             f"- settings: {json.dumps(record['settings'])}", ""]
    for cell, s in summary.items():
        f = record["cells"][cell]
        lines += [f"## {cell}", "",
                  f"{f['examples']} examples, {f['tokens']} tokens, {f['trained_tokens']} trained; mean "
                  f"{f['mean_example_tokens']} tokens per example; Keel packs them into {f['packed_rows']} rows "
                  f"(its cached preparation took {f['keel_prep_pack_s']} s, outside the timed runs). Micro-batch: "
                  f"{f['batch']['rows']} rows (keel, trl_packing) or {f['batch']['examples']} examples "
                  "(trl_default, trl_padding_free).", "",
                  "| config | trained tok/s | total tok/s | padding | peak mem MiB | time to 1st step s | "
                  "first loss |", "|---|---|---|---|---|---|---|"]
        first = {c: statistics.median(float(r["first_loss"] or 0) for r in record["rows"]
                                      if r["cell"] == cell and r["config"] == c) for c in CONFIGS}
        for c in CONFIGS:
            m = s["median"][c]
            lines.append(f"| {c} | {m['trained_tokens_per_s']:.0f} | {m['total_tokens_per_s']:.0f} | "
                         f"{m['padding_fraction']:.1%} | {m['peak_memory_mib']:.0f} | {m['time_to_first_step_s']:.2f} | "
                         f"{first[c]:.4f} |")
        lines += ["", "Keel / peer (median of per-repeat ratios, min-max):", "",
                  "| peer | trained tok/s | total tok/s | peak mem | time to 1st step |", "|---|---|---|---|---|"]
        for peer in PEERS:
            r = s["ratios"]
            cellv = [r.get(f"{m}/{peer}") for m in ("trained_tokens_per_s", "total_tokens_per_s", "peak_memory_mib",
                                                    "time_to_first_step_s")]
            lines.append(f"| {peer} | " + " | ".join(f"{v[0]:.2f} ({v[1]:.2f}-{v[2]:.2f})" if v else "n/a"
                                                     for v in cellv) + " |")
        best = s["ratios"]["trained_tokens_per_s/trl_best"]
        lines += ["", f"Keel / best TRL configuration per repeat, trained tok/s: {best[0]:.2f} "
                  f"({best[1]:.2f}-{best[2]:.2f}); best TRL by median: {s['best_peer']}.", ""]
    lines += ["First loss: the first logged step's loss. keel and trl_packing batch the same bfd rows, and "
              "trl_default and trl_padding_free the same examples, so within each pair it should agree to ~1e-5 "
              "(a check that both train the same thing). MFU is reported on GPUs only (CSV column `mfu`).", ""]
    path.write_text("\n".join(lines) + record.get("notes", ""))
    return head[0]


def report_only(a) -> int:
    """The report of an interrupted run: the cells and repeats in which every config finished."""
    stem = Path(a.out) / f"train_throughput-{a.tag}"
    with open(f"{stem}.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["repeat"] = int(r["repeat"])
    done = {(r["cell"], r["repeat"]) for r in rows
            if all(any(x["cell"] == r["cell"] and x["repeat"] == r["repeat"] and x["config"] == c for x in rows)
                   for c in CONFIGS)}
    rows = [r for r in rows if (r["cell"], r["repeat"]) in done]
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    facts = json.loads(Path(f"{stem}.cells.json").read_text())
    import torch
    import transformers
    import trl

    repeats = {c: len({r["repeat"] for r in rows if r["cell"] == c}) for c in cells}
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "flock /tmp/keel-bench.lock env PYTHONPATH=. python benchmarks/train_throughput.py "
                         "(interrupted; report rebuilt with --report)",
              "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, torch threads {a.threads}, no GPU",
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "trl": trl.__version__},
              "settings": {"seq_len": a.seq_len, "tokens_per_step": a.tokens_per_step, "lr": a.lr,
                           "repeats done per cell": repeats, "precision": "fp32", "gradient_checkpointing": False},
              "repeats": repeats[cells[0]], "cells": {c: facts[c] for c in cells}, "rows": rows, "notes": ""}
    summary = summarize(rows, cells)
    plot(summary, Path(f"{stem}.png"))
    head = write_markdown(Path(f"{stem}.md"), summary=summary, record=record, headline_cell=cells[0])
    print(f"keel_vs_trl_best_trained_tokens_per_s: {head:.2f}  -> {stem}.md")
    return 0


def write_csv(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", default="tiny:chat,tiny:cpt,llama60m:chat",
                   help="model:data pairs; models tiny, llama60m; data chat, cpt")
    p.add_argument("--examples", default="tiny:chat=32,tiny:cpt=60,llama60m:chat=6,llama60m:cpt=30",
                   help="examples (chat) or documents (cpt) per cell")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--tokens-per-step", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads; default: every CPU this process may use. On a machine other jobs share, "
                        "pass 1: a descheduled second thread stalls every op")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--tag", default=time.strftime("%Y%m%d"))
    p.add_argument("--report", action="store_true",
                   help="only rebuild .md/.png from this tag's .csv (complete repeats of each cell)")
    a = p.parse_args(argv)
    if a.report:
        return report_only(a)
    import torch
    import transformers
    import trl

    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    cells = a.cells.split(",")
    sizes = dict(item.split("=") for item in a.examples.split(","))
    work = Path(tempfile.mkdtemp(prefix="keel-train-throughput-"))
    models = build_models(work, [c.split(":")[0] for c in cells])
    setup = {}
    for cell in cells:
        model, kind = cell.split(":")
        data, facts = prepare_cell(kind, n=int(sizes[cell]), model_dir=models[model], seq_len=a.seq_len, work=work)
        batch = {"rows": max(1, a.tokens_per_step // a.seq_len),
                 "examples": max(1, round(a.tokens_per_step / facts["mean_example_tokens"]))}
        setup[cell] = {"model_dir": models[model], "data": data, "batch": batch}
        facts["batch"] = batch
        setup[cell]["facts"] = facts
        print(json.dumps({"cell": cell, **facts}), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"train_throughput-{a.tag}"
    Path(f"{stem}.cells.json").write_text(json.dumps({c: setup[c]["facts"] for c in cells}, indent=1) + "\n")
    rows = []
    for repeat in range(a.repeats):
        for cell in cells:
            for config in CONFIGS:
                r = run_one(config, setup[cell], lr=a.lr, seq_len=a.seq_len, out=work / "out")
                r.update(cell=cell, repeat=repeat)
                print(json.dumps(r), flush=True)
                rows.append(r)
                write_csv(rows, Path(f"{stem}.csv"))  # after every run: an interrupted run keeps what it measured
    summary = summarize(rows, cells)
    cpu = platform.processor() or platform.machine()
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "flock /tmp/keel-bench.lock env PYTHONPATH=. python benchmarks/train_throughput.py "
                         + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": (f"{cpu}, {len(os.sched_getaffinity(0))} CPUs, torch threads {a.threads}, "
                          f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}"),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "trl": trl.__version__},
              "settings": {"seq_len": a.seq_len, "tokens_per_step": a.tokens_per_step, "lr": a.lr,
                           "repeats": a.repeats, "precision": "fp32", "gradient_checkpointing": False},
              "repeats": a.repeats, "cells": {c: setup[c]["facts"] for c in cells}, "rows": rows,
              "notes": f"Whole run: {time.perf_counter() - t_start:.0f} s.\n"}
    plot(summary, Path(f"{stem}.png"))
    head = write_markdown(Path(f"{stem}.md"), summary=summary, record=record, headline_cell=cells[0])
    print(f"keel_vs_trl_best_trained_tokens_per_s: {head:.2f}  -> {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
