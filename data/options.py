"""Command-line options checked where they enter, one rule and one message each, whichever
command takes them (`keel train`, `launch`, `deploy`, `pull`, `tiny-model`): a count, a
Kubernetes name, an MLflow model URI, an output path.

Here, in data/, because every package's commands use them (serving's pull and keel's deploy
both read `models:/NAME/VERSION`), and every package may import data.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from data.errors import KeelError
from data.redaction import redact_text

# Kubernetes keeps replica and node counts as int32; torchrun's are C ints.
MAX_COUNT = 2**31 - 1
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MODEL_URI = re.compile(r"^models:/(?P<name>[^/\s]+)/(?P<version>[0-9]+)$")


def check_count(value: int, flag: str, *, minimum: int = 1) -> int:
    """A count of processes, nodes, replicas, layers...: a whole number from `minimum` to 2^31-1."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_COUNT:
        raise KeelError(f"{flag} {value}: expected a whole number from {minimum} to {MAX_COUNT:,}")
    return value


def check_namespace(value: str | None, flag: str = "--namespace") -> str | None:
    """A Kubernetes namespace: a DNS-1123 label (lowercase letters, digits, '-'; at most 63)."""
    if value is not None and (not _DNS_LABEL.match(value) or len(value) > 63):
        raise KeelError(f"{flag} {value!r}: expected a Kubernetes namespace: lowercase letters, digits and '-', "
                        "starting and ending with a letter or digit, at most 63 characters")
    return value


def check_model_uri(uri: str, flag: str = "MODEL_URI") -> str:
    """models:/NAME/VERSION, VERSION a registry version number."""
    if uri.startswith("models:/") and not MODEL_URI.match(uri):
        raise KeelError(f"{flag} {uri!r}: expected models:/NAME/VERSION, VERSION a number (the registered "
                        "model's version, as `keel train` printed it)")
    return uri


def check_output_dir(path: str | Path, flag: str) -> Path:
    """A directory to write into: it may exist (as a directory) or not yet; a file there is refused."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise KeelError(f"{flag} {str(path)!r}: is a file, not a directory; pass a directory path (it is created "
                        "if missing)")
    return path


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose own errors (`invalid int value: '...'`) are redacted like Keel's: an
    option given a URL with a password in the wrong place must not print the password."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {redact_text(message)}\n")
