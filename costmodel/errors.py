"""One exception type for bad user input, always with a location, and one warning type for input that is
priced but suspicious."""
from __future__ import annotations

import contextlib
import sys
import warnings


class InputError(ValueError):
    """Bad input: the message names the file, line (when known) and field."""

    def __init__(self, message: str, where: str | None = None, field: str | None = None):
        parts = [p for p in (where, f"field '{field}'" if field else None) if p]
        super().__init__(": ".join(parts + [message]) if parts else message)


class InputWarning(UserWarning):
    """Input that is priced, but probably not what was meant (named like `InputError`)."""

    def __init__(self, message: str, where: str | None = None, field: str | None = None):
        parts = [p for p in (where, f"field '{field}'" if field else None) if p]
        super().__init__(": ".join(parts + [message]) if parts else message)


def warn(message: str, where: str | None = None, field: str | None = None) -> None:
    """Emit an `InputWarning` (Python's warnings machinery: callers may filter or record it)."""
    warnings.warn(InputWarning(message, where, field), stacklevel=2)


@contextlib.contextmanager
def warnings_as_lines(stream=None):
    """Within the block, print every `InputWarning` as one line ``costmodel: warning: ...`` (to stderr)."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, InputWarning):
            print(f"costmodel: warning: {message}", file=stream or sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        original = warnings.showwarning
        warnings.simplefilter("always", InputWarning)
        warnings.showwarning = show
        yield


def json_type(v) -> str:
    """What a parsed JSON value is, in JSON's words."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true/false"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(v), "a number")
