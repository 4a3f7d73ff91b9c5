"""The error type every Keel package raises for a user's mistake."""

from data.redaction import redact_text


class KeelError(Exception):
    """A mistake the user can fix: bad recipe, bad data row, missing file.

    The message says what is wrong, where (file, key, row) and how to fix it. The CLI prints
    it without a traceback and exits non-zero.
    """

    def __init__(self, *args):
        # A message that names a location never carries the credentials it held (see
        # data/redaction.py): every place that prints or logs a KeelError shows it redacted.
        super().__init__(*(redact_text(a) if isinstance(a, str) else a for a in args))


def print_error(error: BaseException | str, *, rank: int | None = None) -> None:
    """The one way a Keel command reports a user's mistake: `keel: error: MESSAGE` on stderr
    (`keel: error (rank N): ...` from a training process), redacted like every KeelError."""
    import sys

    where = "" if rank is None else f" (rank {rank})"
    print(f"keel: error{where}: {redact_text(str(error)).strip()}", file=sys.stderr, flush=True)
