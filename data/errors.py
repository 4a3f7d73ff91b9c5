"""The error type every Keel package raises for a user's mistake."""


class KeelError(Exception):
    """A mistake the user can fix: bad recipe, bad data row, missing file.

    The message says what is wrong, where (file, key, row) and how to fix it. The CLI prints
    it without a traceback and exits non-zero.
    """
