"""Files: JSON read with errors that name the file and line; writes that are atomic (never a partial file
presented as complete) of text, JSON, frames and the provenance notes of table folders; plain-text tables on
stdout."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

from .errors import InputError


def read_json(path: str | Path):
    """The content of a JSON file; malformed JSON raises `errors.InputError` naming the file and line."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON: {e.msg}", f"{path}:{e.lineno}") from None


def atomic_write(path: str | Path, write: Callable, *, mode: str = "w") -> Path:
    """Write ``path`` through a temporary file in the same folder, renamed over ``path`` when ``write``
    returns, so that a failed run leaves no partial file (the temporary one is removed) and readers see the
    old file or the new one.  ``write`` gets the open temporary file (``mode`` ``"w"`` text or ``"wb"``
    binary), or with ``mode="path"`` its path, for writers that open a file by name (Parquet).  The file
    gets the usual permissions of a new file (0666 less the umask).  Missing folders are created."""
    if mode not in ("w", "wb", "path"):
        raise ValueError(f"mode must be 'w', 'wb' or 'path', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode == "path":
            os.close(fd)
            write(tmp)
        else:
            with os.fdopen(fd, mode) as fh:
                write(fh)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """``text`` to ``path``, atomically."""
    return atomic_write(path, lambda fh: fh.write(text))


def write_json(path: str | Path, obj) -> Path:
    """``obj`` as indented JSON (one space a level) to ``path``, atomically."""
    return atomic_write(path, lambda fh: json.dump(obj, fh, indent=1))


def write_frame(path: str | Path, df: pd.DataFrame, fmt: str = "csv", **csv_options) -> Path:
    """``df`` without its index to ``path`` as ``fmt`` ``"csv"`` (``csv_options`` go to `DataFrame.to_csv`)
    or ``"parquet"``, atomically."""
    if fmt == "parquet":
        return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False), mode="path")
    if fmt == "csv":
        return atomic_write(path, lambda fh: df.to_csv(fh, index=False, **csv_options))
    raise ValueError(f"fmt must be 'csv' or 'parquet', got {fmt!r}")


def write_provenance(folder: str | Path, gpu: str, lines: Iterable[str]) -> Path:
    """The provenance note of a table folder's ``gpu`` tables, ``FOLDER/SOURCE_<gpu>.md``: a title and
    ``lines`` (Markdown: who made the tables, from what, how), atomically."""
    text = "\n".join([f"# Provenance of `{gpu}` tables", "", *lines])
    return write_text(Path(folder) / f"SOURCE_{gpu}.md", text if text.endswith("\n") else text + "\n")


def print_table(rows: list[dict]) -> None:
    """Rows of equal keys as aligned columns on stdout (floats with two decimals); nothing when empty."""
    if not rows:
        return
    cols = list(rows[0])
    width = [max(len(c), *(len(_cell(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, width)))
    for r in rows:
        print("  ".join(_cell(r[c]).ljust(w) for c, w in zip(cols, width)))


def _cell(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)
