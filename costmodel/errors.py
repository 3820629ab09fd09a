"""One exception type for bad user input, always with a location."""
from __future__ import annotations


class InputError(ValueError):
    """Bad input: the message names the file, line (when known) and field."""

    def __init__(self, message: str, where: str | None = None, field: str | None = None):
        parts = [p for p in (where, f"field '{field}'" if field else None) if p]
        super().__init__(": ".join(parts + [message]) if parts else message)
