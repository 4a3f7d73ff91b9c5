"""The `keel` command. Each subcommand's work lives in the package that owns it; heavy
libraries (torch, transformers, vllm, mlflow) are imported only by the subcommand that needs
them, so `keel --help` and `keel validate` start at once."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from data.errors import KeelError

USAGE = """usage: keel COMMAND [ARGS]

commands:
  tiny-model OUT_DIR        build a tiny random-init base model and tokenizer locally
  validate RECIPE...        check recipes (schema, cross-field rules; --check-paths for files)
  prepare RECIPE [k=v ...]  validate, render and tokenize the recipe's data into the cache
  train RECIPE [k=v ...]    train under torchrun (--nproc-per-node, --nnodes, ...)
  serve MODEL_DIR           serve an exported model with vLLM's OpenAI server
  quickstart                tiny model -> train on 2 processes -> serve -> ask for a tool call

`keel COMMAND --help` shows each command's options."""


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"keel {prog}", description=description)


def cmd_tiny_model(argv: list[str]) -> int:
    p = _parser("tiny-model", "Build a tiny random-init causal LM and a BPE tokenizer trained on text the repository ships.")
    p.add_argument("out_dir")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen3"])
    p.add_argument("--format", default="hermes-qwen3", help="format whose delimiters become single tokens")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (a multiple of 64; head_dim is 64)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from trainer.tiny_model import build_tiny_model

    build_tiny_model(a.out_dir, arch=a.arch, fmt_name=a.format, vocab_size=a.vocab_size,
                     hidden=a.hidden, layers=a.layers, seed=a.seed)
    return 0


def cmd_validate(argv: list[str]) -> int:
    p = _parser("validate", "Check recipes without running them.")
    p.add_argument("recipes", nargs="+")
    p.add_argument("--check-paths", action="store_true",
                   help="also check that local paths exist (hub ids and s3:// URIs are checked at run time)")
    a = p.parse_args(argv)
    from trainer.recipe import check_paths, load_recipe

    failed = 0
    for path in a.recipes:
        try:
            recipe = load_recipe(path)
            if a.check_paths:
                check_paths(recipe, path)
            print(f"ok: {path}")
        except KeelError as exc:
            failed += 1
            print(f"keel: error: {exc}", file=sys.stderr)
    return 2 if failed else 0


def _recipe_and_overrides(p: argparse.ArgumentParser, argv: list[str]):
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.max_steps=10")
    return p.parse_intermixed_args(argv)


def cmd_prepare(argv: list[str]) -> int:
    a = _recipe_and_overrides(_parser("prepare", "Validate, render and tokenize a recipe's data into the cache."), argv)
    from trainer.recipe import check_paths, load_recipe
    from trainer.train import prepared_split, recipe_format

    recipe = load_recipe(a.recipe, a.overrides)
    check_paths(recipe, a.recipe)
    fmt = recipe_format(recipe)
    for split in ["train"] + (["eval"] if recipe.data.eval else []):
        prep = prepared_split(recipe, split, local_rank=0, fmt=fmt)
        s = prep.stats
        print(f"{split}: {'reused' if prep.reused else 'built'} cache {prep.path}: {s.rows} rows, {s.examples} examples, "
              f"{s.tokens} tokens ({s.trained_tokens} trained), {s.truncated} truncated, {s.rejected} rejected"
              + (f" (listed in {prep.rejected_file})" if prep.rejected_file else ""))
    return 0


def torchrun_command(recipe: str, overrides: list[str], *, nproc_per_node: int, nnodes: int, node_rank: int,
                     master_addr: str | None, master_port: int, max_restarts: int) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}",
           f"--max-restarts={max_restarts}"]
    if nnodes > 1:
        if not master_addr:
            raise KeelError("--nnodes > 1 needs --master-addr (the address of the node with --node-rank 0)")
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={master_addr}",
                f"--master-port={master_port}"]
    else:
        cmd += ["--standalone"]  # a free port of its own: several jobs can share a machine
    return cmd + ["-m", "trainer", recipe, *overrides]


def cmd_train(argv: list[str]) -> int:
    p = _parser("train", "Train under torchrun: `torchrun -m trainer RECIPE ...` on each node.")
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes on this node (default: GPUs, else 1)")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default=None)
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--max-restarts", type=int, default=0)
    a = _recipe_and_overrides(p, argv)
    from trainer.recipe import check_paths, load_recipe

    # Everything a user can get wrong is checked here, before any process starts.
    recipe = load_recipe(a.recipe, a.overrides)
    check_paths(recipe, a.recipe)
    nproc = a.nproc_per_node or _gpu_count() or 1
    # Prepare the data once, before the process group exists (ranks then only read the cache).
    cmd_prepare([a.recipe, *a.overrides])
    cmd = torchrun_command(a.recipe, a.overrides, nproc_per_node=nproc, nnodes=a.nnodes, node_rank=a.node_rank,
                           master_addr=a.master_addr, master_port=a.master_port, max_restarts=a.max_restarts)
    print("[keel] " + " ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def cmd_serve(argv: list[str]) -> int:
    from serving.server import main

    return main(argv)


def cmd_quickstart(argv: list[str]) -> int:
    from trainer.quickstart import main

    return main(argv)


COMMANDS = {
    "tiny-model": cmd_tiny_model,
    "validate": cmd_validate,
    "prepare": cmd_prepare,
    "train": cmd_train,
    "serve": cmd_serve,
    "quickstart": cmd_quickstart,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        import difflib

        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"keel: unknown command {argv[0]!r}{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return command(argv[1:])
    except KeelError as exc:
        print(f"keel: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
