"""Loading a model or tokenizer from a model directory, safe by default.

Two things in a model directory can run code or unpickle objects in the loading process:
Python files that `auto_map` in config.json / tokenizer_config.json points at (transformers'
`trust_remote_code`), and pickle-based weights (`pytorch_model.bin`, `*.pt`, ...). Keel runs
neither unless the recipe says so: `model.trust_remote_code: true` and `model.allow_pickle:
true`. Every from_pretrained call in trainer/, data/ and serving/ goes through here (an
invariant test checks that no other module calls from_pretrained).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data.errors import KeelError
from data.files import read_json

SAFE_WEIGHTS = (".safetensors",)
# What torch.load / pickle read: a file of any of these can run code when loaded.
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class LoadPolicy:
    """What loading a model dir may do beyond reading configs, tokenizers and safetensors."""

    trust_remote_code: bool = False
    allow_pickle: bool = False


def weight_files(model_dir: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle-based weight files) directly in `model_dir`."""
    files = [p for p in model_dir.iterdir() if p.is_file()] if model_dir.is_dir() else []
    safe = sorted(p for p in files if p.name.endswith(SAFE_WEIGHTS))
    pickled = sorted(p for p in files if p.name.endswith(PICKLE_WEIGHTS) and "training_args" not in p.name)
    return safe, pickled


def check_weight_files(model_dir: str | Path, policy: LoadPolicy, *, key: str = "model.path",
                       allow: str = "set model.allow_pickle: true in the recipe") -> None:
    """Refuse a local model dir whose weights exist only in pickle-based files (unless allowed)."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        return  # a hub id: from_pretrained(use_safetensors=True) refuses pickle weights there
    safe, pickled = weight_files(path)
    if pickled and not safe and not policy.allow_pickle:
        names = ", ".join(p.name for p in pickled[:3])
        raise KeelError(
            f"{key}: {path} holds its weights only in pickle-based files ({names}); loading those can run "
            "arbitrary code. Convert them to safetensors (load the model once where you trust it and "
            f"save_pretrained, which writes model.safetensors), or {allow} if you trust where the files "
            "came from."
        )


def _refused_remote_code(exc: ValueError, path: str, key: str) -> KeelError | None:
    if "trust_remote_code" not in str(exc):
        return None
    return KeelError(
        f"{key}: {path} needs its own Python code to load (auto_map in its config points at .py files), and "
        "Keel does not run a model's code unless told to. Read that code, then set model.trust_remote_code: "
        "true in the recipe if you trust it, or use a model transformers supports natively."
    )


# What transformers builds a tokenizer from; a model dir holds at least one of them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
TOKENIZER_JSON = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")


def tokenizer_problem(model_dir: str | Path, key: str = "model.path") -> str | None:
    """Why a local model dir has no tokenizer to load (None: it has, or it is not a local dir)."""
    path = Path(model_dir).expanduser()
    if not path.is_dir() or any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    return (f"{key}: {path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer the "
            "model was trained with into it (tokenizer.save_pretrained(DIR))")


def _unreadable_tokenizer(path: str | Path, exc: Exception, key: str) -> KeelError:
    """A tokenizer transformers could not build, said in one line naming the file at fault where one is."""
    local = Path(path).expanduser()
    if problem := tokenizer_problem(local, key):
        return KeelError(problem)
    for name in TOKENIZER_JSON if local.is_dir() else ():
        if (local / name).is_file():
            read_json(local / name, what="tokenizer file", expect=dict, max_bytes=MAX_TOKENIZER_BYTES)  # names it
    why = " ".join(str(exc).split())[:300]
    return KeelError(f"{key}: cannot load the tokenizer from {path} ({type(exc).__name__}: {why}); is it a complete "
                     "model directory with the tokenizer it was trained with?")


# a tokenizer.json of a 200k vocabulary is about 30 MiB
MAX_TOKENIZER_BYTES = 256 << 20


def load_tokenizer(path: str | Path, policy: LoadPolicy = LoadPolicy(), *, key: str = "model.path"):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=policy.trust_remote_code)
    except ValueError as exc:
        refused = _refused_remote_code(exc, str(path), key)
        if refused is None:
            raise _unreadable_tokenizer(path, exc, key) from None
        raise refused from None
    except KeelError:
        raise
    except Exception as exc:  # transformers and tokenizers raise anything from OSError to a bare Exception
        raise _unreadable_tokenizer(path, exc, key) from None


def load_causal_lm(path: str | Path, policy: LoadPolicy = LoadPolicy(), *, key: str = "model.path", **kwargs):
    """AutoModelForCausalLM.from_pretrained under the policy: safetensors only, no model code,
    unless the policy allows them."""
    from transformers import AutoModelForCausalLM

    check_weight_files(path, policy, key=key)
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path), trust_remote_code=policy.trust_remote_code,
            use_safetensors=None if policy.allow_pickle else True, **kwargs)
    except ValueError as exc:
        refused = _refused_remote_code(exc, str(path), key)
        if refused is None:
            raise
        raise refused from None
    except OSError as exc:
        if policy.allow_pickle or "safetensors" not in str(exc):
            raise
        raise KeelError(f"{key}: {path} has no safetensors weights ({exc}); Keel loads safetensors only unless "
                        "model.allow_pickle: true") from None
