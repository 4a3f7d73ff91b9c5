"""What `keel serve` was asked to serve, resolved to a base model dir and its LoRA adapters.

    keel serve RUN/model                 a merged export (or any model dir with config.json)
    keel serve RUN/model --adapter A=DIR  that base with LoRA adapters, each served as its name
    keel serve ADAPTER_RUN/model          an adapter export: its base (keel-export.yaml base_model)
                                          plus the adapter
    keel serve models:/NAME/VERSION       pulled from the MLflow registry first (also s3://...)

The format (chat template, parsers) and the training facts (seq_len, dtype) come from the
Keel export being served: the base's when it is one, else the adapters'. Every adapter must
share it, since one server renders every request with one template.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from data.errors import KeelError
from data.files import read_json
from data.formats import Format, load_format
from data.model_dir import FORMAT_DIR, ExportInfo, load_model_format, read_export_info
from serving.engine import AdapterInfo

ADAPTER_CONFIG = "adapter_config.json"
URI_PREFIXES = ("models:/", "runs:/", "s3://", "gs://", "http://", "https://", "mlflow-artifacts:/")


@dataclass
class ServedModel:
    base_dir: Path
    fmt: Format | None
    template_dir: Path | None  # the Keel export whose chat template is served
    export_info: ExportInfo
    adapters: list[AdapterInfo] = field(default_factory=list)
    name: str | None = None  # the base's served name (None: vLLM's default, the path)


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def default_name(path: Path) -> str:
    """RUN/model -> RUN (the run says what it is; every export is called 'model')."""
    path = path.resolve()
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def pulled_dir(uri: str) -> Path:
    root = Path(os.environ.get("KEEL_CACHE", Path.home() / ".cache" / "keel")) / "models"
    tail = uri.split(":/", 1)[-1].strip("/").replace("/", "-")[-60:]
    return root / f"{tail}-{hashlib.sha256(uri.encode()).hexdigest()[:10]}"


def fetch(source: str) -> Path:
    """A local dir for `source`: itself, or where a URI was pulled to."""
    if source.startswith(URI_PREFIXES):
        from serving.pull import pull_model

        return pull_model(source, pulled_dir(source))
    path = Path(source).expanduser()
    if not path.is_dir():
        raise KeelError(f"{source}: no such model directory (nor a models:/NAME/VERSION or s3:// URI)")
    return path


def adapter_info(name: str, path: Path) -> AdapterInfo:
    try:
        rank = int(read_json(path / ADAPTER_CONFIG, what="adapter config", expect=dict)["r"])
    except (ValueError, KeyError, TypeError, OverflowError) as exc:
        raise KeelError(f"{path / ADAPTER_CONFIG}: not a PEFT LoRA config with a rank 'r' ({exc})") from None
    return AdapterInfo(name=name, path=str(path.resolve()), rank=rank)


def _adapter_base(adapter_dir: Path) -> Path:
    info = read_export_info(adapter_dir)
    base = info.base_model
    if not base:
        raise KeelError(f"{adapter_dir}: a LoRA adapter without keel-export.yaml base_model; serve its base model "
                        f"and add it with --adapter NAME={adapter_dir}")
    path = Path(str(base)).expanduser()
    if not (path / "config.json").is_file():
        raise KeelError(f"{adapter_dir}: its base model {base} (keel-export.yaml base_model) is not a model "
                        f"directory here; serve the base and add the adapter with --adapter NAME={adapter_dir}")
    return path


def _parse_adapter(arg: str) -> tuple[str | None, str]:
    name, sep, path = arg.partition("=")
    return (name, path) if sep else (None, arg)


def resolve(source: str, *, adapters: list[str] = (), fmt_name: str | None = None,
            name: str | None = None) -> ServedModel:
    path = fetch(source)
    named: list[tuple[str, Path]] = []
    if is_adapter_dir(path):
        base = _adapter_base(path)
        adapter_name = name or (source.split("/")[1] if source.startswith("models:/") else default_name(path))
        named.append((adapter_name, path))
        name = None
    else:
        base = path
        if not (base / "config.json").is_file():
            raise KeelError(f"{source}: not a model directory (no config.json); pass the 'model' directory a "
                            "`keel train` run exported, e.g. runs/NAME/model")
        if name is None and source.startswith("models:/"):
            name = source.split("/")[1]
    for arg in adapters:
        adapter_name, adapter_src = _parse_adapter(arg)
        adapter_dir = fetch(adapter_src)
        if not is_adapter_dir(adapter_dir):
            raise KeelError(f"--adapter {arg}: {adapter_dir} holds no {ADAPTER_CONFIG}; export the adapter with "
                            "output.merge_lora: false")
        named.append((adapter_name or default_name(adapter_dir), adapter_dir))
        trained_on = read_export_info(adapter_dir).base_model
        if trained_on and Path(str(trained_on)).expanduser().resolve() != base.resolve():
            print(f"[keel] warning: adapter {adapter_dir} was trained on {trained_on}, served here on {base}",
                  flush=True)
    seen = [n for n, _ in named]
    if len(set(seen)) != len(seen) or (name and name in seen):
        raise KeelError(f"served model names must differ: {', '.join(([name] if name else []) + seen)}; "
                        "name adapters with --adapter NAME=DIR")
    # The export that carries the format and the training facts: the adapter being served when
    # the source is one, else the base when Keel exported it, else the adapters.
    order = [path, base] if path != base else [base]
    exports = [d for d in [*order, *(d for _, d in named)] if (d / FORMAT_DIR).is_dir()]
    exports = list(dict.fromkeys(exports))
    template_dir = exports[0] if exports else None
    fmt = load_format(fmt_name) if fmt_name else (load_model_format(template_dir) if template_dir else None)
    if not fmt_name:
        for d in exports[1:]:
            other = load_model_format(d)
            if other.chat_template != fmt.chat_template or other.spec != fmt.spec:
                raise KeelError(f"{d} was trained with a different format or template than {template_dir}; one "
                                "server renders every request with one template, so serve them separately")
    info = read_export_info(template_dir) if template_dir else ExportInfo()
    return ServedModel(base_dir=base, fmt=fmt, template_dir=template_dir, export_info=info,
                       adapters=[adapter_info(n, d) for n, d in named], name=name)
