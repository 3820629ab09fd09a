"""Files: JSON read with errors that name the file and line; writes that are atomic (never a partial file
presented as complete) of text, JSON, frames and the provenance notes of table folders; checks, before any work,
that an output path can be written and replaces no input (`check_output_file`, `check_output_dir`,
`refuse_overwrite`); argparse types for numeric options (`number`); plain-text tables on stdout."""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

from .errors import InputError


def read_text_utf8(path: str | Path) -> str:
    """A file's text as UTF-8 (a leading byte-order mark is dropped); `errors.InputError` at the first byte
    that is not UTF-8, naming its line."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise InputError(f"not UTF-8 text: byte 0x{data[e.start]:02x} at column {col} (save the file as UTF-8)",
                         f"{path}:{line}") from None


def read_json(path: str | Path):
    """The content of a JSON file (UTF-8); malformed JSON raises `errors.InputError` naming the file and line."""
    try:
        return json.loads(read_text_utf8(path))
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON: {e.msg}", f"{path}:{e.lineno}") from None


def read_json_lines(path: str | Path) -> list[tuple[dict, str]]:
    """(object, "file:line") for each non-blank line of a JSON Lines file; a missing file, malformed JSON or a
    line that is not a JSON object raises `errors.InputError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", str(path))
    out = []
    for lineno, line in enumerate(read_text_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"malformed JSON: {e.msg} (column {e.colno})", where) from None
        if not isinstance(obj, dict):
            raise InputError("a record must be a JSON object", where)
        out.append((obj, where))
    return out


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


def _nearest_existing(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    return p


def _check_parent(path: Path, field: str) -> None:
    """The nearest existing folder above ``path`` must be a folder (not a file) and writable (probed by
    creating and removing a temporary file there, so read-only file systems count too)."""
    anc = _nearest_existing(path.parent)
    if not anc.is_dir():
        raise InputError(f"cannot write under {anc}: it is a file, not a folder", str(path), field)
    try:
        fd, tmp = tempfile.mkstemp(dir=anc, prefix=".costmodel-probe.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise InputError(f"cannot write in folder {anc}: {e.strerror or e}", str(path), field) from None


def check_output_file(path: str | Path, field: str = "out") -> Path:
    """Refuse (`errors.InputError`), before any work, an output file path that names a folder, lies under a
    file, or whose folder cannot be written; returns it as a Path.  Missing folders are allowed (the writers
    create them)."""
    if path is None or str(path).strip() == "":
        raise InputError("empty output path", field=field)
    p = Path(path)
    if p.is_dir():
        raise InputError("is a folder; name a file to write", str(path), field)
    _check_parent(p, field)
    return p


def check_output_dir(path: str | Path, field: str = "out") -> Path:
    """Refuse (`errors.InputError`), before any work, an output folder that is a file, lies under a file, or
    cannot be written in (or, when missing, its nearest existing parent); returns it as a Path."""
    if path is None or str(path).strip() == "":
        raise InputError("empty output path", field=field)
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError("is a file; name a folder to write into", str(path), field)
    _check_parent(p / ".probe", field)
    return p


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):  # one inode: the same path, a symlink or a hard link
            return True
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwrite(out: str | Path, inputs: Iterable, field: str = "out", *, folder: bool = False) -> None:
    """Refuse (`errors.InputError`) an output that would replace one of ``inputs`` (paths; None entries are
    skipped): ``out`` names the same file (the same real path through symlinks, or the same inode, as a hard
    link).  With ``folder`` (``out`` is a folder the command writes into), also an input inside ``out`` or
    ``out`` inside an input folder."""
    out_p = Path(out)
    real_out = Path(os.path.realpath(out_p))
    for inp in inputs:
        if inp is None:
            continue
        in_p = Path(inp)
        if _same_file(out_p, in_p):
            raise InputError(f"is the input {inp}; write the output elsewhere", str(out), field)
        if folder:
            real_in = Path(os.path.realpath(in_p))
            if real_in.is_relative_to(real_out) or real_out.is_relative_to(real_in):
                raise InputError(f"overlaps the input {inp}; write the output elsewhere", str(out), field)


def number(kind: type = float, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False, name: str | None = None) -> Callable[[str], float]:
    """An argparse ``type`` for a numeric option: ``kind`` (int or float), finite, within [``low``, ``high``]
    (either end open with ``low_open`` / ``high_open``; None: unbounded).  A bad value becomes argparse's
    one-line error naming the option: ``argument --tol: must be a finite number in [0, 1), got 'nan'``."""
    what = "an integer" if kind is int else "a finite number"
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    rng = " and ".join(x for x in (lo, hi) if x)
    want = f"{what}{' ' + rng if rng else ''}"

    def parse(text: str):
        try:
            v = int(text) if kind is int else float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        if not math.isfinite(v) or (low is not None and (v <= low if low_open else v < low)) or (
                high is not None and (v >= high if high_open else v > high)):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return v

    parse.__name__ = name or ("int" if kind is int else "float")
    return parse


ALLOW_OTHER_GPU_HELP = ("apply a calibration in full to records of GPUs it was not fitted on (default: only its "
                        "host-side terms there)")


def add_pricing_arguments(sp, calibration_help: str = "none | default | PATH (as for predict)") -> None:
    """The options of every command that prices records: --model-configs, --bench-data, --calibration and
    --allow-other-gpu."""
    sp.add_argument("--model-configs", default=None,
                    help="folder of <model>/config.json (default: configs shipped in the package)")
    sp.add_argument("--bench-data", default=None, help="kernel tables folder (default: the repo's bench_data/)")
    sp.add_argument("--calibration", default="default", help=calibration_help)
    sp.add_argument("--allow-other-gpu", action="store_true", help=ALLOW_OTHER_GPU_HELP)
