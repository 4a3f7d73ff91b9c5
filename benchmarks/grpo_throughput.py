"""GRPO throughput on CPU, Keel against TRL's own GRPOTrainer on the same prompts, in one run.

    flock /tmp/keel-bench.lock env PYTHONPATH=. python benchmarks/grpo_throughput.py

Both train fresh copies of the same random-init Llama (built by `keel tiny-model`'s builder,
--hidden and --layers below) on the same tool-calling prompts (data/synthetic.py
generate_tool_prompts), with the same GRPO settings, one process, fp32:

    keel   trainer/techniques/grpo.py: Keel's prepared prompt ids (data/prompts.py), rewards read
           from completion ids with the server's parser (the tool_call reward)
    trl    TRL's GRPOTrainer as its users run it: the same rendered prompt text, tokenized by TRL,
           and a reward function of the usual kind (the decoded text contains the right call)

A random-init model rarely stops early, so completions run to max_completion_tokens for both and
generation work is the same. Generation time is the time spent in `_generate_single_turn`
(timed the same way for both); training time is the rest of each optimizer step (reward, log
probabilities, loss, backward, optimizer). Runs are interleaved (keel, trl, keel, trl, ...) and
the report takes medians over the steps of a run (first step left out: warm-up) and then over
repeats, so a step slowed by another job on the machine does not decide the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def timed_class(base):
    class Timed(base):
        def _generate_single_turn(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super()._generate_single_turn(*args, **kwargs)
            self._bench_gen_s += time.perf_counter() - t0
            ids = out[0]
            self._bench_gen_tokens += sum(len(x) for x in ids)
            return out
    return Timed


class StepClock:
    """Per optimizer step: wall time, generation time and tokens (from the timed trainer)."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                clock.t0 = time.perf_counter()
                clock.trainer._bench_gen_s, clock.trainer._bench_gen_tokens = 0.0, 0

            def on_step_end(self, args, state, control, **kw):
                t = clock.trainer
                clock.steps.append({"wall_s": time.perf_counter() - clock.t0, "gen_s": t._bench_gen_s,
                                    "gen_tokens": t._bench_gen_tokens})
        self.callback = CB()
        self.steps: list[dict] = []
        self.trainer = None


def run_one(kind: str, *, model_dir: Path, prompts, args, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from data.formats import load_format
    from trainer.techniques.grpo import ClosedReward, make_grpo_trainer_class, stop_token_ids

    torch.manual_seed(0)
    fmt = load_format("hermes-qwen3")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    clock = StepClock()
    config = GRPOConfig(output_dir=str(work / kind), max_steps=args.steps, learning_rate=1e-4,
                        per_device_train_batch_size=args.batch, num_generations=args.group,
                        max_completion_length=args.completion_tokens, temperature=1.0, beta=0.0,
                        logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                        remove_unused_columns=False, seed=0, disable_tqdm=True,
                        generation_kwargs={"eos_token_id": stop_token_ids(tok, fmt)})
    if kind == "keel":
        from trainer.recipe import GrpoSection

        grpo = GrpoSection(rewards={"tool_call": 1.0}, num_generations=args.group,
                           max_completion_tokens=args.completion_tokens)
        reward = ClosedReward("tool_call", tokenizer=tok, fmt=fmt, grpo=grpo)
        cls = timed_class(make_grpo_trainer_class())
        data = prompts["keel"]
    else:
        def right_tool(completions, reference, **_):
            return [float(f'"name": "{json.loads(r)["tool_calls"][0]["name"]}"' in c) for c, r in
                    zip(completions, reference)]
        reward, cls, data = right_tool, timed_class(GRPOTrainer), prompts["trl"]
    trainer = cls(model=model, reward_funcs=[reward], args=config, train_dataset=data, processing_class=tok,
                  callbacks=[clock.callback])
    clock.trainer = trainer
    trainer.train()
    steps = clock.steps[1:]  # the first step warms up
    seqs = args.batch  # completions per step in one process
    prompt_tokens = statistics.mean(len(x) for x in prompts["keel"]["prompt_ids"])
    # medians over steps: a step slowed by another job on the machine does not skew the run
    gen = [s["gen_tokens"] / s["gen_s"] for s in steps]
    train = [(s["gen_tokens"] + prompt_tokens * seqs) / (s["wall_s"] - s["gen_s"]) for s in steps]
    return {"kind": kind, "generation_tokens_per_s": statistics.median(gen),
            "training_tokens_per_s": statistics.median(train),
            "step_s": statistics.median(s["wall_s"] for s in steps), "steps": len(steps),
            "completion_tokens_per_step": statistics.mean(s["gen_tokens"] for s in steps)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--completion-tokens", type=int, default=48)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / f"grpo_throughput-{time.strftime('%Y%m%d')}"))
    args = p.parse_args()

    from datasets import Dataset

    from data.formats import load_format
    from data.prompts import prepare_prompts
    from data.synthetic import generate_tool_prompts, write_jsonl
    from load_client import machine, versions
    from trainer.models.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    model_dir = build_tiny_model(work / "model", hidden=args.hidden, layers=args.layers)
    write_jsonl(generate_tool_prompts(64, seed=3), work / "prompts.jsonl")
    fmt = load_format("hermes-qwen3")
    t0 = time.perf_counter()
    keel_prompts = prepare_prompts(work / "prompts.jsonl", tokenizer_dir=model_dir, fmt=fmt, seq_len=512,
                                   max_completion_tokens=args.completion_tokens, needs_reference="tool_call",
                                   cache_root=work / "cache").load()
    prep_s = time.perf_counter() - t0
    trl_prompts = Dataset.from_dict({"prompt": keel_prompts["prompt"], "reference": keel_prompts["reference"]})
    prompts = {"keel": keel_prompts, "trl": trl_prompts}
    info = {"machine": machine(), "versions": versions("torch", "transformers", "trl", "peft", "accelerate"),
            "args": vars(args), "keel_prompt_preparation_s": prep_s}
    results = []
    for r in range(args.repeats):
        for kind in ("keel", "trl"):
            res = run_one(kind, model_dir=model_dir, prompts=prompts, args=args, work=work)
            res["repeat"] = r
            print(json.dumps(res), flush=True)
            results.append(res)
    med = {k: {m: statistics.median(x[m] for x in results if x["kind"] == k)
               for m in ("generation_tokens_per_s", "training_tokens_per_s", "step_s")} for k in ("keel", "trl")}
    ratio = {m: med["keel"][m] / med["trl"][m] for m in ("generation_tokens_per_s", "training_tokens_per_s")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".json").write_text(json.dumps({"info": info, "runs": results, "median": med, "ratio": ratio},
                                                   indent=2))
    plot(med, Path(str(out) + ".png"))
    write_md(Path(str(out) + ".md"), info, results, med, ratio)
    print(json.dumps({"median": med, "keel/trl": ratio}, indent=2))
    return 0


def plot(med: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, metric, title in zip(axes, ("generation_tokens_per_s", "training_tokens_per_s"),
                                 ("generation tokens/s", "training tokens/s")):
        ax.bar(["keel", "trl"], [med["keel"][metric], med["trl"][metric]], color=["#2a6", "#888"])
        ax.set_title(title)
    fig.suptitle("GRPO on CPU, same prompts and settings (median)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_md(path: Path, info: dict, results: list, med: dict, ratio: dict) -> None:
    a = info["args"]
    lines = [f"# GRPO throughput, Keel vs TRL GRPOTrainer ({info['machine']['date']})", "",
             "Command: `flock /tmp/keel-bench.lock env PYTHONPATH=. python benchmarks/grpo_throughput.py`", "",
             f"Machine: {info['machine'].get('cpu')}, {info['machine'].get('cores')} cores, "
             f"{info['machine'].get('memory_gib')} GiB; load average at start {info['machine'].get('load_average_at_start')}"
             " (other jobs shared the machine).", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()), "",
             f"Model: random-init Llama, hidden {a['hidden']}, {a['layers']} layers, the tiny tokenizer; "
             f"{a['batch']} completions per step (group {a['group']}), {a['completion_tokens']} completion tokens, "
             f"{a['steps']} steps per run (first left out), {a['repeats']} interleaved repeats, one process, fp32; "
             "medians over steps, then over repeats.", "",
             "| | generation tokens/s | training tokens/s | step s |", "|---|---|---|---|"]
    for k in ("keel", "trl"):
        m = med[k]
        lines.append(f"| {k} | {m['generation_tokens_per_s']:.0f} | {m['training_tokens_per_s']:.0f} | {m['step_s']:.2f} |")
    lines += ["", f"Ratio keel/trl: generation {ratio['generation_tokens_per_s']:.2f}x, "
                  f"training {ratio['training_tokens_per_s']:.2f}x.", "",
              "Both use the same generation (transformers' generate) and the same loss code (TRL's); Keel differs in "
              "where prompt ids come from (prepared once, the served rendering) and in its rewards (parsed from ids). "
              "A ratio near 1 is the expected result: Keel's guarantees cost no throughput.", "",
              f"Keel's prompt preparation (once, cached; not in the timed steps): {info['keel_prompt_preparation_s']:.2f} s "
              "for 64 prompts.", "",
              "Runs:", "", "```"] + [json.dumps(r) for r in results] + ["```", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
