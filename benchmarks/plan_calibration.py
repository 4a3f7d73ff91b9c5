"""Calibrate `keel plan`'s memory model against measured peaks on CPU.

For a tiny and a ~100M-parameter Llama-shaped config x {full, lora} x {ddp, zero3}, run two
training processes under torchrun (gloo) through Keel's own builders (trainer/build.py,
trainer/sft.py: the TRL trainer, DeepSpeed config and LoRA that `keel train` uses) on fixed-length
synthetic rows, and measure per rank:

    measured = peak RSS during training steps 2..N  -  RSS before the model was built

(Linux: /proc/self/clear_refs "5" resets the peak after step 1, when the optimizer states
exist; VmHWM is then the peak of the steps that follow.) The model is built by `from_config`
(random init): the tensors are the ones `from_pretrained` leaves, without the file pages a
safetensors load maps in. The setup peak (model build, DeepSpeed partitioning) is recorded
too: under ZeRO-3 Keel builds the whole model on every rank before DeepSpeed shards it.

The planner's estimate is `trainer.plan.estimate` for the same recipe on a CPU cluster of 2
(fp32, no GPU overhead). Results: benchmarks/results/plan_calibration.{csv,md}.

    flock /tmp/keel-bench.lock python benchmarks/plan_calibration.py     # all cases (~40 min on 2 busy cores)
    python benchmarks/plan_calibration.py --estimate-only benchmarks/results/plan_calibration.csv
                                               # planner changed: new estimates, same measurements
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
QUICKSTART = REPO / "recipes" / "quickstart" / "sft-tool-calling.yaml"
MIB = 1024**2

CONFIGS = {
    # the quickstart's tiny model shape, and a ~100M one (GPT-2-small-like widths, Llama blocks)
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64, vocab_size=4096),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, head_dim=64, vocab_size=32000),
}
SEQ_LEN, MICRO_BATCH, STEPS = 512, 2, 5


def config_dict(name: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 4096,
            "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, **CONFIGS[name]}


def case_overrides(model_dir: str, peft: str, strategy: str) -> list[str]:
    return [f"model.path={model_dir}", f"peft.kind={peft}", f"distributed.strategy={strategy}",
            f"training.seq_len={SEQ_LEN}", f"training.micro_batch_size={MICRO_BATCH}", "training.grad_accum=1",
            f"training.max_steps={STEPS}", "training.precision=fp32", "checkpoint.every_steps=1000000"]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _tokenizer():
    """A minimal tokenizer: the rows are token ids already; TRL only needs a pad token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<pad>")


def worker(args) -> None:
    """One rank: build, train STEPS steps, write the measured peaks."""
    import gc

    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

    from trainer.build import build_peft_config, training_args
    from trainer.recipe import load_recipe
    from trainer.sft import build_sft_trainer
    from trainer.train import dist_env, init_process_group

    # Everything the trainer imports is imported before the baseline: the measurement is the
    # training state and the runtime's working memory, not module code.
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    from trainer.sft import make_sft_trainer_class

    make_sft_trainer_class()
    rank, local_rank, world = dist_env()
    recipe = load_recipe(QUICKSTART, case_overrides(args.model_dir, args.peft, args.strategy))
    init_process_group(recipe.distributed, rank=rank, local_rank=local_rank, world=world)
    torch.manual_seed(0)
    vocab = CONFIGS[args.config]["vocab_size"]
    rows = [{"input_ids": ids, "labels": ids} for ids in
            torch.randint(10, vocab, (MICRO_BATCH * world * (STEPS + 1), SEQ_LEN)).tolist()]
    dataset = Dataset.from_list(rows)
    gc.collect()
    baseline = _status("VmRSS")
    _reset_peak()

    cfg = AutoConfig.for_model(**config_dict(args.config))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    peaks = {}

    class Peaks(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == 1:
                peaks["setup_and_step1"] = _status("VmHWM")
                _reset_peak()

    targs = training_args(training=recipe.training, checkpoint=recipe.checkpoint, distributed=recipe.distributed,
                          model=model, output_dir=str(Path(args.model_dir) / f"out-{rank}"), has_eval=False)
    targs["logging_steps"] = 10**6
    trainer = build_sft_trainer(model=model, tokenizer=_tokenizer(), peft_config=build_peft_config(recipe.peft),
                                args=targs, packed=False, train_dataset=dataset, eval_dataset=None,
                                callbacks=[Peaks()])
    trainer.train()
    peaks["steps"] = _status("VmHWM")
    out = {"rank": rank, "baseline": baseline, "setup_peak": peaks["setup_and_step1"] - baseline,
           "train_peak": peaks["steps"] - baseline}
    Path(args.out).with_suffix(f".rank{rank}.json").write_text(json.dumps(out))


def estimate_for(config: str, peft: str, strategy: str, model_dir: str):
    from trainer.plan import Cluster, model_shape, estimate
    from trainer.recipe import load_recipe

    recipe = load_recipe(QUICKSTART, case_overrides(model_dir, peft, strategy))
    shape = model_shape(config_dict(config), recipe.peft)
    return estimate(recipe, shape, Cluster(gpu="cpu", nodes=1, gpus_per_node=2)), shape


def run_case(config: str, peft: str, strategy: str, tmp: Path) -> dict:
    model_dir = tmp / f"{config}-{peft}-{strategy}"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config_dict(config)))
    out = model_dir / "result"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(Path(__file__).resolve()), "--worker", "--config", config, "--peft", peft, "--strategy", strategy,
           "--model-dir", str(model_dir), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{config}/{peft}/{strategy} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    ranks = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in (0, 1)]
    est, shape = estimate_for(config, peft, strategy, str(model_dir))
    measured = max(r["train_peak"] for r in ranks)
    return {"config": config, "params_m": round(shape.params / 1e6, 2), "peft": peft, "strategy": strategy,
            "seq_len": SEQ_LEN, "micro_batch": MICRO_BATCH,
            "est_weights_mib": round(est.weights / MIB, 1), "est_grads_mib": round(est.gradients / MIB, 1),
            "est_optimizer_mib": round(est.optimizer / MIB, 1), "est_activations_mib": round(est.activations / MIB, 1),
            "est_overhead_mib": round(est.overhead / MIB, 1), "estimated_mib": round(est.total / MIB, 1),
            "measured_mib": round(measured / MIB, 1),
            "measured_ranks_mib": "/".join(f"{r['train_peak'] / MIB:.0f}" for r in ranks),
            "setup_peak_mib": round(max(r["setup_peak"] for r in ranks) / MIB, 1),
            "error_pct": round(100 * (est.total - measured) / measured, 1)}


NOTES = """## What the CPU model is, and where it misses

The estimate (`trainer.plan.estimate` with `--gpu cpu`) counts, per process: fp32 weights,
gradients and two AdamW moments; DDP's gradient buckets (a second copy of the trainable
gradients: accelerate leaves gradient_as_bucket_view off); under ZeRO-3 a 1/N partition of
weights, gradients and moments plus DeepSpeed's fp32 master partition, the parameters kept
gathered (stage3_max_live_parameters defaults to 1e9, so these models stay whole) and the
reduce bucket (up to every trainable gradient once more); activations of 8*hidden +
4*intermediate fp32 values per layer and token plus 16 bytes per vocabulary entry and token
for the logits (logits, log-softmax, and their gradients at the peak of backward); 5% for the
allocator. Two constants are fitted: the runtime's own working memory (36 MiB) to the tiny
model's full ddp run, and DeepSpeed's engine (68 MiB more) to its full zero3 run; the other six
cases are predictions (the two fitted rows agree by construction).

The first-principles pieces were found by measuring, not by fitting per case: the GPU
arithmetic applied unchanged (bf16 values, a 2 GiB CUDA context) was off by +45% to +1400% here; the fixes were fp32
activations, the CPU cross-entropy's log-softmax, DDP's buckets, DeepSpeed's master partition,
live parameters and reduce bucket. Saved-tensor hooks on the 100M model (one forward, batch
2 x 512) count 831 MiB kept for backward with full fine-tuning and 755 MiB with LoRA, against
the model's 922 MiB (672 per-layer + 250 logits and log-probabilities): the activation term is
right to about 10% and errs high.

Target (within 15% on every case) not met for LoRA at 100M: -18.7% (ddp) and -30.6% (zero3).
LoRA keeps fewer activations than full fine-tuning (measured above) and its states are
1.7 MiB, so the missing 400-870 MiB are not tensors the model names; they appear only when
many short-lived full-size buffers are allocated and freed (LoRA's extra forward tensors;
ZeRO-3's per-layer gather and release) and are consistent with glibc malloc's dynamic mmap
threshold keeping freed large blocks in the heap (fragmentation counted in RSS). That is a
hypothesis, not yet tested: a run with a fixed MALLOC_MMAP_THRESHOLD_ would test it (it did not
get the shared benchmark lock in time). On GPUs the
caching allocator behaves differently, so the CPU excess is not carried into the GPU figures.
ZeRO-3's setup peak is the whole fp32 model on every rank: Keel builds the model before the
DeepSpeed config exists (no zero.Init), so CPU memory at load time is not sharded.
""".splitlines()


def write_results(rows: list[dict]) -> None:
    import torch
    import transformers
    import trl

    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "plan_calibration.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    worst = max(rows, key=lambda r: abs(r["error_pct"]))
    lines = [
        "# keel plan: estimated vs measured memory per process (CPU, 2 ranks, gloo)",
        "",
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by "
        "`flock /tmp/keel-bench.lock python benchmarks/plan_calibration.py` on a 2-core, 24 GiB machine; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}. Estimates are "
        "recomputed from the measured CSV with `--estimate-only` when the planner changes (measurements of "
        "2026-11-26 13:58-14:35 UTC).",
        "",
        f"Each case: seq_len {SEQ_LEN}, micro batch {MICRO_BATCH}, {STEPS} steps, fp32, AdamW. Measured: the larger "
        "of the two ranks' peak RSS during steps 2..N minus RSS before the model was built. Setup peak: the same "
        "from model build through step 1 (model build, DeepSpeed partitioning, first optimizer step).",
        "",
        "| config | params | peft | strategy | estimated MiB | measured MiB (rank0/rank1) | error | setup peak MiB |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {r['config']} | {r['params_m']}M | {r['peft']} | {r['strategy']} | {r['estimated_mib']:.0f} | "
          f"{r['measured_mib']:.0f} ({r['measured_ranks_mib']}) | {r['error_pct']:+.1f}% | {r['setup_peak_mib']:.0f} |"
          for r in rows],
        "",
        f"Largest error: {worst['error_pct']:+.1f}% ({worst['config']}, {worst['peft']}, {worst['strategy']}). "
        "Component estimates are in plan_calibration.csv.",
        "",
        *NOTES,
    ]
    (RESULTS / "plan_calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--config", choices=sorted(CONFIGS))
    p.add_argument("--peft", choices=["none", "lora"])
    p.add_argument("--strategy", choices=["ddp", "zero3"])
    p.add_argument("--model-dir")
    p.add_argument("--out")
    p.add_argument("--only", help="comma list of config/peft/strategy cases, e.g. tiny/none/ddp")
    p.add_argument("--estimate-only", help="JSON measurements from an earlier run: recompute estimates")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.estimate_only:
        old = list(csv.DictReader(open(args.estimate_only)))
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for r in old:
                est, shape = estimate_for(r["config"], r["peft"], r["strategy"], tmp)
                measured = float(r["measured_mib"])
                r.update(est_weights_mib=round(est.weights / MIB, 1), est_grads_mib=round(est.gradients / MIB, 1),
                         est_optimizer_mib=round(est.optimizer / MIB, 1),
                         est_activations_mib=round(est.activations / MIB, 1),
                         est_overhead_mib=round(est.overhead / MIB, 1), estimated_mib=round(est.total / MIB, 1),
                         error_pct=round(100 * (est.total / MIB - measured) / measured, 1))
                r["params_m"], r["measured_mib"], r["setup_peak_mib"] = (float(r["params_m"]), measured,
                                                                          float(r["setup_peak_mib"]))
                rows.append(r)
        write_results(rows)
        return
    cases = [(c, pe, s) for c in CONFIGS for pe in ("none", "lora") for s in ("ddp", "zero3")]
    if args.only:
        cases = [tuple(x.split("/")) for x in args.only.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            row = run_case(*case, Path(tmp))
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_results(rows)


if __name__ == "__main__":
    main()
