"""Training speed of packed rows against padded batches on the tiny model (CPU).

    PYTHONPATH=. python benchmarks/packing_speed.py --model runs/tiny --rows 2000 --steps 24

Same long-tailed synthetic conversations, prepared once unpacked and once packed (seq_len
1024); each layout trains a fresh copy of the same model for --steps optimizer steps in this
process, one thread, runs interleaved (A B C A B C); tokens/s counts the examples' real
tokens (no padding), measured after --warmup steps.

    padded        micro-batches of examples padded to the longest, attention mask (Keel's default)
    packed-flat   TRL's padding-free collator: a micro-batch of packed rows flattened into one
                  sequence, position ids restarting per example, block-diagonal mask (what
                  flash attention's varlen kernels take on GPUs)
    packed-rows   packed rows kept as the batch dimension ([rows, longest row]), position ids
                  restarting per example, no attention mask: SDPA's mask is block-diagonal per row
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Timer:
    """A TrainerCallback: wall time and real tokens of the steps after warmup."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        self.warmup, self.t0, self.tokens0 = warmup, None, 0
        outer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == outer.warmup:
                    outer.t0 = time.perf_counter()
                    outer.tokens0 = outer.trainer._total_train_tokens

        self.callback = _CB()


def run(layout: str, prepared, model_dir: str, steps: int, warmup: int, batch: int, out_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.techniques.sft import build_sft_trainer

    torch.manual_seed(0)
    timer = Timer(warmup)
    args = dict(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-3,
                report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, remove_unused_columns=False,
                disable_tqdm=True, seed=0, data_seed=0)
    trainer = build_sft_trainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                tokenizer=AutoTokenizer.from_pretrained(model_dir), peft_config=None,
                                packed=layout != "padded", args=args, train_dataset=prepared.load(),
                                eval_dataset=None, callbacks=[timer.callback], packed_layout=layout)
    timer.trainer = trainer
    trainer.train()
    dt = time.perf_counter() - timer.t0
    tokens = trainer._total_train_tokens - timer.tokens0
    return {"layout": layout, "micro_batch": batch, "steps_timed": steps - warmup, "seconds": round(dt, 2),
            "tokens": tokens, "tokens_per_s": round(tokens / dt, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--padded-batch", type=int, default=8)
    p.add_argument("--packed-batch", type=int, default=4)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "packing_speed.json"))
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from data.formats import load_format
    from data.prepare import PrepOptions, prepare_file
    from data.synthetic import generate_conversations, write_jsonl

    work = Path(tempfile.mkdtemp(prefix="keel-packing-speed-"))
    data = work / "rows.jsonl"
    write_jsonl(generate_conversations(a.rows, seed=0, long_tail=True), data)
    fmt = load_format("hermes-qwen3")
    prep = {packing: prepare_file(data, tokenizer_dir=a.model, fmt=fmt, seq_len=1024, cache_root=work / "cache",
                                  options=PrepOptions(packing=packing)) for packing in (False, True)}
    results = []
    for repeat in range(a.repeats):
        for layout in ("padded", "packed-flat", "packed-rows"):
            packed = layout != "padded"
            r = run(layout, prep[packed], a.model, a.steps, a.warmup, a.packed_batch if packed else a.padded_batch,
                    work / f"out-{layout}-{repeat}")
            r["repeat"] = repeat
            print(json.dumps(r), flush=True)
            results.append(r)
    import transformers
    import trl

    record = {"command": "PYTHONPATH=. python benchmarks/packing_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPUs (shared), torch threads 1",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
              "data": {"rows": a.rows, "examples": prep[False].stats.examples, "packed_rows": prep[True].stats.sequences,
                       "padding_fraction_packed": prep[True].stats.padding_fraction, "seq_len": 1024},
              "results": results}
    Path(a.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
