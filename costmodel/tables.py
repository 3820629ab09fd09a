"""Kernel tables: load InferSim-schema CSVs from a bench_data folder into arrays, expose them as pure JAX
interpolants of continuous inputs.

Layout read (per GPU folder name, see `hardware.GPU.table_dirs`):
* ``gemm/<gpu>/data.csv``  columns ``m,k,n,latency_us[,mfu][,dtype]``.  Without a ``dtype`` column the
  table is taken as FP8: every InferSim GEMM table was measured with DeepGEMM FP8.
* ``mha/decode/<gpu>/*.csv``  ``dtype,kv_dtype,batch_size,kv_len,latency_us,mfu`` (paged decode).
* ``mha/prefill/<gpu>/*.csv``  ``dtype,[batch_size,]seq_len,latency_us,mfu`` (causal, no cached prefix).
  File names ``{hq}-{hkv}-{d}-tp{T}.csv`` give full-model heads run under TP=T (one GPU's share is
  hq/T, hkv/T); ``{hq}-{hkv}-{d}.csv`` give the heads one GPU ran.  The bf16/fp16 rows make ``decode`` and
  ``prefill``; the FP8-KV-cache rows (`KV_ROWS`) make ``decode_fp8`` and ``prefill_fp8`` the same way.
* ``allreduce/<gpu>/data.csv``  ``kernel,num_gpus,message_bytes,latency_us[,dtype]`` (optional).
* ``moe/<gpu>/data.csv``  fused-MoE curves (`load_moe`, `moe_curve`); ``mla/{prefill,decode}/<gpu>/data.csv``
  MLA attention-module curves (`load_mla`, `mla_curve`).  Both optional, read on request, not by `load_tables`.

Off-grid policy (documented in the README, reported by `costmodel tables`):
* ``latency_us`` is the measurement; ``mfu`` columns are ignored (derived and sometimes rounded to 0).
* Noise: a time larger than one measured for strictly more work is lowered to it (lower envelope).  A time
  that cannot be a measurement is dropped first and its cell refilled like a missing one: more than
  `interp.OUTLIER_FACTOR` below both neighbours on the work axis (`interp.low_outliers`), or, for a GEMM,
  faster than the GPU's peak FLOP/s allows.  Every changed point is an `Adjustment`.
* Refused (`InputError` with file:line and column): non-UTF-8 bytes, rows with more or fewer fields than
  the header, non-numeric, non-finite or non-positive values, unknown GEMM dtypes, files with a header
  only, work axes with fewer than two values, attention folders without a bf16/fp16 row, and GEMM tables
  where more than `MAX_IMPOSSIBLE_SHARE` of the points beat the GPU's peak FLOP/s (wrong units or GPU).
* Ragged grids: a missing cell is filled along its work axis from its measured neighbours (log-log linear
  between them, time proportional to work above; below: the first value, or for decode time proportional
  to kv length down to the layout's smallest measured time); a missing row from the nearest measured row
  scaled by work.  Filled cells are flagged and never reported as measurements.
* Between and beyond measured GEMM shapes (k, n): each measured shape's time is scaled by the work ratio
  k·n / (k_j·n_j) and the scaled logs are blended bilinearly in (log k, log n), held at the edge shapes.
* m, kv_len, seq_len above the grid: time proportional to work (slope 1 in m and kv_len, 2 in seq_len);
  below the grid: the first value for GEMMs (latency floor); proportional to kv_len down to the layout's
  smallest measured time for decode; proportional to seq_len for prefill (the step adds the kernel floor).  Batch beyond the grid: the extra sequences are folded
  into longer equivalent ones with the same total work.
* Head layouts with no file: the nearest measured layout (same head_dim first), with the length rescaled so
  that the work matches: KV bytes for decode (bandwidth-bound), FLOPs for prefill (compute-bound).
"""
from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .errors import InputError
from .hardware import GPU, find_gpu
from .interp import OUTLIER_FACTOR, blend_secondary_axis, fill_work_axis, interp_work_axis, low_outliers, suffix_min
from .io import read_text_utf8
from .model import normalize_dtype
from .ops import per_gpu_heads


# Log-log slope of attention time in length above a table's grid: decode work grows with kv length, prefill
# work with the square of the sequence length.
DECODE_SLOPE_HI, PREFILL_SLOPE_HI = 1.0, 2.0


class GemmTable(NamedTuple):
    """GEMM latency grid of one dtype: log_t[k, n, m] = log(latency_us) on log-scaled axes."""

    log_m: jax.Array
    log_k: jax.Array
    log_n: jax.Array
    log_t: jax.Array


class AttnTable(NamedTuple):
    """Attention latency grids for C head layouts: log_t[c, length, batch] = log(latency_us)."""

    log_len: jax.Array
    log_b: jax.Array
    log_t: jax.Array


class CommTable(NamedTuple):
    """All-reduce latency grid: log_t[gpus, bytes] = log(latency_us)."""

    log_gpus: jax.Array
    log_bytes: jax.Array
    log_t: jax.Array


# Why a measured point was dropped and refilled (`Adjustment.reason`, explained in `Tables.notes`).
DROP_REASONS = {
    "outlier": "more than OUTLIER_FACTOR times below both neighbours on the work axis",
    "beats peak": "faster than the GPU's peak FLOP/s allows",
}


@dataclass
class Adjustment:
    """A measured point changed by the noise policy: lowered to the lower envelope (``reason`` "envelope"), or
    dropped as a measurement error and refilled from its neighbours (`DROP_REASONS`)."""

    table: str
    where: str
    measured_us: float
    used_us: float
    cell: tuple = ()  # index into the table's grid (log_t of the table named ``table``)
    reason: str = "envelope"


class Adjustments(Sequence):
    """The `Adjustment` list of a load, built on first read: a GEMM table lowers tens of thousands of points
    and most loads never list them.  ``append`` adds one now; ``add_lowered`` adds a table's lowered cells,
    labelled later, in their place in the order."""

    def __init__(self):
        self._parts: list = []  # Adjustment, or (name, label, cells [n, ndim], measured [n], used [n])
        self._list: list[Adjustment] | None = None

    def append(self, a: Adjustment) -> None:
        self._parts.append(a)
        self._list = None

    def add_lowered(self, name: str, label, cells: np.ndarray, measured_us: np.ndarray, used_us: np.ndarray):
        self._parts.append((name, label, cells, measured_us, used_us))
        self._list = None

    def _items(self) -> list[Adjustment]:
        if self._list is None:
            out = []
            for p in self._parts:
                if isinstance(p, Adjustment):
                    out.append(p)
                    continue
                name, label, cells, measured, used = p
                out.extend(Adjustment(name, label(ix), m, u, ix) for ix, m, u in
                           zip(map(tuple, cells.tolist()), measured.tolist(), used.tolist()))
            self._list = out
        return self._list

    def __getitem__(self, i):
        return self._items()[i]

    def __len__(self) -> int:
        return len(self._items())


@dataclass
class Tables:
    """Everything loaded for one GPU.  Array fields are pytrees; the rest is static metadata."""

    gpu: GPU
    root: Path
    gemm: dict[str, GemmTable]  # by dtype
    decode: AttnTable | None
    prefill: AttnTable | None
    allreduce: CommTable | None
    decode_heads: list[tuple[int, int, int]] = field(default_factory=list)  # per-GPU (hq, hkv, d)
    prefill_heads: list[tuple[int, int, int]] = field(default_factory=list)
    # the same attention tables from the FP8-KV-cache rows (`KV_ROWS`; None where the GPU has none)
    decode_fp8: AttnTable | None = None
    prefill_fp8: AttnTable | None = None
    decode_fp8_heads: list[tuple[int, int, int]] = field(default_factory=list)
    prefill_fp8_heads: list[tuple[int, int, int]] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # table -> file/folder it came from
    measured: dict[str, pd.DataFrame] = field(default_factory=dict)  # raw measured points per table
    adjustments: Adjustments = field(default_factory=Adjustments)
    filled_cells: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # files read with a tolerance (e.g. a missing header)

    def adjustment_at(self, table: str, cell: tuple) -> Adjustment | None:
        """The `Adjustment` of grid cell ``cell`` of table ``table`` ("gemm/bf16", "decode", ...), if any."""
        if getattr(self, "_by_cell", None) is None:
            self._by_cell = {(a.table, tuple(a.cell)): a for a in self.adjustments}
        return self._by_cell.get((table, tuple(cell)))


# ---------------------------------------------------------------- pure interpolants

def gemm_table_us(t: GemmTable, m, k, n):
    """Table GEMM latency (µs) of one call y[m,n] = x[m,k]·W[k,n] in the table's own dtype.

    Only the (at most 2x2) measured shapes around (k, n) are read: each one's m-series is interpolated,
    scaled by the work ratio k·n / (k_j·n_j), and the scaled logs are blended bilinearly in (log k, log n);
    the result is never below the table's fastest measured call.
    """
    series, offset, w = gemm_shape_blend(t, k, n)
    vals = interp_work_axis(jnp.log(m), t.log_m, series.T, 1.0) + offset  # [4]
    return jnp.exp(jnp.maximum(jnp.sum(w * vals), gemm_log_floor(t)))


def gemm_log_floor(t: GemmTable):
    """Log of the table's fastest measured call: no GEMM is priced below it (launch cost)."""
    return jnp.min(t.log_t)


def gemm_shape_blend(t: GemmTable, k, n, xp=jnp):
    """The measured shapes around (k, n) and how `gemm_table_us` blends them: their log-time m-series
    [4, Nm] (k0n0, k0n1, k1n0, k1n1), the log work ratio added to each [4], and the bilinear weights [4].
    ``xp=np``: the same in numpy on a numpy table (setup of the sweep's lookups)."""
    lk, ln = xp.log(k), xp.log(n)
    ik, wk = bracket(t.log_k, lk, xp)
    i_n, wn = bracket(t.log_n, ln, xp)
    series = t.log_t[ik[:, None], i_n[None, :], :].reshape(4, -1)
    offset = (lk - t.log_k[ik]).repeat(2) + xp.tile(ln - t.log_n[i_n], 2)
    w = xp.outer(xp.stack([1.0 - wk, wk]), xp.stack([1.0 - wn, wn])).reshape(4)
    return series, offset, w


def bracket(grid, x, xp=jnp):
    """Indices of the two grid nodes around x (clamped to the ends) and the weight of the upper one.
    Elementwise over an array ``x``; ``xp=np`` runs the same rule eagerly in numpy (diagnostics)."""
    if grid.shape[0] == 1:
        return xp.zeros(2, xp.int32), xp.float32(0.0)
    i = xp.clip(xp.searchsorted(grid, x) - 1, 0, grid.shape[0] - 2)
    w = xp.clip((x - grid[i]) / (grid[i + 1] - grid[i]), 0.0, 1.0)
    return xp.stack([i, i + 1]), w


def attn_table_us(t: AttnTable, c, batch, length, slope_hi, slope_lo=0.0):
    """Attention latency (µs) of head layout ``c`` for ``batch`` sequences of ``length`` (kv_len for
    decode, seq_len for prefill).  Batches beyond the grid fold into longer equivalent sequences
    (`fold_batch`); lengths beyond the grid follow log-log slopes ``slope_hi`` above and ``slope_lo`` below."""
    b, length = fold_batch(batch, jnp.exp(t.log_b[-1]), length, slope_hi)
    rows = interp_work_axis(jnp.log(length), t.log_len, t.log_t[c], slope_hi, slope_lo)  # [Nb]
    return jnp.exp(blend_secondary_axis(jnp.log(b), t.log_b, rows))


def fold_batch(batch, b_max, length, slope_hi, xp=jnp):
    """``batch`` sequences of ``length`` as at most ``b_max`` sequences of the same total work, where work
    grows as length^slope_hi: (batch clamped to [1, b_max], the equivalent length).  ``xp=np``: in numpy."""
    b = xp.clip(batch, 1.0, b_max)
    ratio = batch / b  # ratio ** (1 / slope_hi), without pow for the usual slopes (pow is a libm call)
    return b, length * (ratio if slope_hi == 1.0 else xp.sqrt(ratio) if slope_hi == 2.0 else ratio ** (1.0 / slope_hi))


def comm_table_us(t: CommTable, gpus, nbytes):
    """Measured all-reduce latency (µs) of ``nbytes`` per GPU over ``gpus`` GPUs."""
    rows = interp_work_axis(jnp.log(nbytes), t.log_bytes, jnp.moveaxis(t.log_t, 1, 0), 1.0)  # [Ng]
    return jnp.exp(_interp_clamped(jnp.log(gpus), t.log_gpus, rows))


def comm_gpu_weights(t: CommTable, gpus) -> np.ndarray:
    """Weights w [Ng] (numpy float32) with `comm_table_us`'s blend over GPU counts == w @ rows (clamped,
    linear in log gpus), for a GPU count known ahead."""
    lg = np.asarray(t.log_gpus, np.float32)
    return np.array([_interp_clamped(np.log(np.float32(gpus)), lg, col, np) for col in np.eye(len(lg))], np.float32)


def _interp_clamped(x, grid, fp, xp=jnp):
    return fp[0] if grid.shape[0] == 1 else xp.interp(x, grid, fp)


# ---------------------------------------------------------------- loading

_HEADS = re.compile(r"^(\d+)-(\d+)-(\d+)(?:-tp(\d+))?$")


def find_gpu_dir(root: Path, kind: str, gpu: GPU) -> Path | None:
    for name in gpu.table_dirs:
        d = root / kind / name
        if d.is_dir():
            return d
    return None


SCHEMAS = {  # InferSim column order, used to read a file whose header row is missing
    "gemm": ("m", "k", "n", "latency_us", "mfu"),
    "decode": ("dtype", "kv_dtype", "batch_size", "kv_len", "latency_us", "mfu"),
    "prefill": ("dtype", "seq_len", "latency_us", "mfu"),
}


def read_csv_text(path: Path) -> tuple[str, list[int]]:
    """A CSV file's text (UTF-8) and the file line of each non-blank line, after checking that every row has
    as many fields as the first; InputError with file:line otherwise."""
    text = read_text_utf8(path)
    lines = text.splitlines()
    numbers = [i + 1 for i, line in enumerate(lines) if line.strip()]
    if not numbers:
        raise InputError("empty file", str(path))
    kept = [lines[i - 1] for i in numbers]
    if '"' not in text:  # no quoted fields: a row's fields are its commas + 1 (csv.reader below agrees)
        commas = [line.count(",") for line in kept]
        if commas.count(commas[0]) == len(commas):
            return text, numbers
    rows = csv.reader(kept)
    first = None
    for lineno, row in zip(numbers, rows):
        if first is None:
            first = row
        elif len(row) != len(first):
            raise InputError(f"{len(row)} fields, but the first row has {len(first)} ({','.join(first)[:80]})",
                             f"{path}:{lineno}")
    return text, numbers


NUMERIC_COLUMNS_SKIP = ("dtype", "kv_dtype", "kernel")


def _read_csv(path: Path, required: tuple[str, ...], schema: tuple[str, ...] | None = None,
              notes: list[str] | None = None, dtype_column: bool = False,
              optional: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read one table CSV and check it: every ``required`` column present, numeric ones (and the
    ``optional`` numeric columns present) finite and positive, at least one data row; with
    ``dtype_column``, a ``dtype`` column (if any) normalized to bf16/fp16/fp8."""
    text, numbers = read_csv_text(path)
    header = 1
    try:
        df = pd.read_csv(io.StringIO(text))
        if schema and not set(required) <= set(df.columns) and len(df.columns) == len(schema) and \
                _looks_like_data(df.columns):
            df = pd.read_csv(io.StringIO(text), header=None, names=list(schema))
            header = 0
            if notes is not None:
                notes.append(f"{path}: no header row; read with InferSim's columns {','.join(schema)}")
    except Exception as e:  # pandas raises several types for malformed files
        raise InputError(f"cannot parse CSV: {e}", str(path)) from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"missing column(s) {missing}", str(path))
    if df.empty:
        raise InputError("no data rows (a header only)", str(path))
    lines = numbers[header:]  # file line of each row
    for c in list(required) + [c for c in optional if c in df.columns]:
        if c in NUMERIC_COLUMNS_SKIP:
            continue
        vals = pd.to_numeric(df[c], errors="coerce")
        with np.errstate(invalid="ignore"):
            for bad, what in ((vals.isna(), "non-numeric"), (~np.isfinite(vals), "non-finite"), (vals <= 0, "non-positive")):
                if bad.any():
                    row = int(np.argmax(bad.to_numpy()))
                    v = df[c].iloc[row]
                    raise InputError(f"{what} value {v!r}" if isinstance(v, str) else f"{what} value {v}",
                                     f"{path}:{lines[row]}", c)
        df[c] = vals.astype(float)
    if dtype_column and "dtype" in df.columns:
        col, names = df["dtype"], {}
        for v in col.unique():  # each distinct name once; an error names the first row that has it
            at = col.isna() if not isinstance(v, str) and pd.isna(v) else col == v
            names[v] = normalize_dtype(v if isinstance(v, str) else "", f"{path}:{lines[int(np.argmax(at.to_numpy()))]}")
        df["dtype"] = col.map(names)
    return df


def _looks_like_data(header) -> bool:
    """A header row that is really a data row: a dtype name or a number in its first cell."""
    first = str(header[0]).strip().lower()
    try:
        float(first)
        return True
    except ValueError:
        return first in ("bf16", "fp16", "fp8")


def f32_array(a) -> jax.Array:
    """``a`` as a float32 JAX array, rounded by numpy and transferred as it is (`jnp.asarray` compiles a
    program per new shape: 10 ms each)."""
    return jax.device_put(np.asarray(a, np.float32))


def _log_grid(values) -> np.ndarray:
    return np.log(np.unique(np.asarray(values, dtype=float)))


def _index(grid_log: np.ndarray, values) -> np.ndarray:
    return np.searchsorted(grid_log, np.log(np.asarray(values, dtype=float)) - 1e-9)


def _clean(name: str, t: np.ndarray, axes, label, adjustments: Adjustments | None,
           dropped: dict | None = None) -> np.ndarray:
    """The lower envelope of ``t`` along ``axes`` (`suffix_min`), with an `Adjustment` in ``adjustments``
    (None: not kept) for each cell it lowers and for each cell in ``dropped`` (cell -> (measured µs,
    reason): measurements the loader dropped and refilled before)."""
    cleaned = suffix_min(t, axes)
    if adjustments is None:
        return cleaned
    dropped = dropped or {}
    lowered = ~np.isnan(t) & (np.abs(cleaned - t) > 1e-9 * t)
    for idx in dropped:
        lowered[idx] = False
    adjustments.add_lowered(name, label, np.argwhere(lowered), t[lowered], cleaned[lowered])
    for idx, (measured, reason) in sorted(dropped.items()):
        adjustments.append(Adjustment(name, label(idx), measured, float(cleaned[idx]), idx, reason))
    return cleaned


def _drop_outliers(raw: np.ndarray, x: np.ndarray, axis: int, also: np.ndarray | None = None,
                   also_reason: str = "beats peak") -> dict:
    """Set to NaN, in place, the measured cells of ``raw`` that `interp.low_outliers` flags along ``axis``
    (grid ``x``) and those where ``also`` is true; returns cell -> (measured value, reason)."""
    mask = np.apply_along_axis(lambda v: low_outliers(v, x), axis, raw)
    reasons = {}
    for idx in zip(*np.nonzero(mask)):
        reasons[tuple(map(int, idx))] = (float(raw[idx]), "outlier")
    if also is not None:
        for idx in zip(*np.nonzero(also & ~np.isnan(raw))):
            reasons[tuple(map(int, idx))] = (float(raw[idx]), also_reason)
    for idx in reasons:
        raw[idx] = np.nan
    return reasons


# A GEMM table in which more than this share of the points beats the GPU's peak FLOP/s is refused (wrong
# units or another GPU's table); below it, such points are dropped as measurement errors.
MAX_IMPOSSIBLE_SHARE = 0.1


def load_gemm(path: Path, adjustments: Adjustments | None = None, gpu: GPU | None = None,
              notes: list[str] | None = None) -> tuple[dict[str, GemmTable], pd.DataFrame, int]:
    """Load a GEMM table (one `GemmTable` per dtype), recording changed points in ``adjustments`` (None: not
    kept).  With ``gpu``, points faster than its peak FLOP/s are dropped as impossible (too many of them:
    InputError)."""
    df = _read_csv(path, ("m", "k", "n", "latency_us"), dtype_column=True)
    if "dtype" not in df.columns:
        df["dtype"] = "fp8"
    out, filled = {}, 0
    for dtype, d in df.groupby("dtype"):
        lm, lk, ln = _log_grid(d.m), _log_grid(d.k), _log_grid(d.n)
        if len(lm) < 2:
            raise InputError(f"{dtype} rows need at least two values of m to interpolate between, found "
                             f"{len(lm)}", str(path), "m")
        raw = np.full((len(lk), len(ln), len(lm)), np.nan)
        d = d.groupby(["k", "n", "m"], as_index=False)["latency_us"].min()
        raw[_index(lk, d.k), _index(ln, d.n), _index(lm, d.m)] = d.latency_us
        m_, k_, n_ = np.exp(lm), np.exp(lk), np.exp(ln)
        ms, ks, ns = ([f"{v:.0f}" for v in a] for a in (m_, k_, n_))
        label = lambda ix: f"m={ms[ix[2]]} k={ks[ix[0]]} n={ns[ix[1]]}"  # noqa: E731
        beats_peak = None
        if gpu is not None and (dtype != "fp8" or gpu.fp8_flops > 0):
            roof_us = 2.0 * k_[:, None, None] * n_[None, :, None] * m_[None, None, :] / gpu.peak_flops(dtype) * 1e6
            beats_peak = raw < roof_us
            n_bad, n_meas = int(beats_peak.sum()), int((~np.isnan(raw)).sum())
            if n_bad > MAX_IMPOSSIBLE_SHARE * n_meas:
                ix = tuple(np.argwhere(beats_peak)[0])
                raise InputError(f"{n_bad} of {n_meas} {dtype} times are faster than {gpu.name}'s peak FLOP/s "
                                 f"allows (e.g. {label(ix)}: {raw[ix]:.4g} µs < {roof_us[ix]:.4g} µs): are the "
                                 "times in µs, and measured on this GPU?", str(path), "latency_us")
        dropped = _drop_outliers(raw, lm, 2, beats_peak)
        grid = np.log(raw)
        for i in range(len(lk)):
            for j in range(len(ln)):
                grid[i, j] = fill_work_axis(grid[i, j], lm, 1.0)
        measured_shapes = [(i, j) for i in range(len(lk)) for j in range(len(ln)) if not np.isnan(grid[i, j]).all()]
        for i in range(len(lk)):  # shapes never measured: nearest measured shape, scaled by work k·n
            for j in range(len(ln)):
                if np.isnan(grid[i, j]).all():
                    a, b = min(measured_shapes, key=lambda s: abs(lk[s[0]] - lk[i]) + abs(ln[s[1]] - ln[j]))
                    grid[i, j] = grid[a, b] + (lk[i] - lk[a]) + (ln[j] - ln[b])
        filled += int(np.isnan(raw).sum()) - len(dropped)
        t = _clean(f"gemm/{dtype}", np.exp(grid), (2,), label, adjustments, dropped)
        _note_dropped(notes, f"gemm/{dtype}", path, label, dropped, t)
        out[dtype] = GemmTable(*(f32_array(a) for a in (lm, lk, ln, np.log(t))))
    return out, df, filled


def _note_dropped(notes, table, path, label, dropped, used):
    if notes is None:
        return
    for idx, (measured, reason) in sorted(dropped.items()):
        why = DROP_REASONS[reason].replace("OUTLIER_FACTOR", f"{OUTLIER_FACTOR:g}")
        notes.append(f"{path}: {table} {label(idx)}: {measured:.4g} µs dropped as a measurement error ({why}), "
                     f"refilled as {used[idx]:.4g} µs")


def _attn_files(folder: Path, notes: list[str] | None = None) -> list[tuple[tuple[int, int, int], Path]]:
    """The head-layout files of an attention folder with their per-GPU heads; others are skipped with a note."""
    files = []
    for f in sorted(folder.glob("*.csv")):
        mt = _HEADS.match(f.stem)
        heads = per_gpu_heads(int(mt[1]), int(mt[2]), int(mt[3]), int(mt[4] or 1)) if mt else None
        if heads is None:
            if notes is not None:
                notes.append(f"{f}: skipped: not named HQ-HKV-D.csv or HQ-HKV-D-tpT.csv with T splitting the "
                             "heads evenly")
            continue
        files.append((heads, f))
    return files


# The rows of an attention table that each KV-cache precision reads, per column: bf16/fp16 activations and KV
# cache; or an FP8 KV cache: decode rows with ``kv_dtype`` fp8 (bf16/fp16 queries), prefill rows with
# ``dtype`` fp8 (vLLM's FP8-KV-cache path, where FlashAttention-3 also runs Q in fp8).
KV_ROWS = {
    "bf16": {"decode": {"dtype": ("bf16", "fp16"), "kv_dtype": ("bf16", "fp16")},
             "prefill": {"dtype": ("bf16", "fp16"), "kv_dtype": ("bf16", "fp16")}},
    "fp8": {"decode": {"dtype": ("bf16", "fp16"), "kv_dtype": ("fp8",)},
            "prefill": {"dtype": ("fp8",)}},
}


def attn_table_name(kind: str, kv: str = "bf16") -> str:
    """The name of an attention table (`Tables` field, `Adjustment.table`): "decode", "prefill", or with an
    FP8 KV cache "decode_fp8", "prefill_fp8"."""
    return kind if kv == "bf16" else f"{kind}_{kv}"


def load_attention(folder: Path, kind: str, adjustments: Adjustments | None = None, notes: list[str] | None = None,
                   kv: str = "bf16", frames_read: dict | None = None):
    """Load all head layouts of one attention kind ('decode' or 'prefill') into one AttnTable, from the rows
    of KV-cache precision ``kv`` (`KV_ROWS`).  A folder without bf16 rows is refused; one without fp8 rows
    gives no fp8 table (None), and files without them are skipped silently (the step refuses fp8 there).
    ``frames_read``: {file: checked frame} shared between the calls for one folder, so each file is parsed
    once."""
    length_col = "kv_len" if kind == "decode" else "seq_len"
    slope = DECODE_SLOPE_HI if kind == "decode" else PREFILL_SLOPE_HI
    name, rows = attn_table_name(kind, kv), KV_ROWS[kv][kind]
    frames, files, other_dtypes = [], _attn_files(folder, notes if kv == "bf16" else None), set()
    kept = []
    for heads, f in files:
        read = None if frames_read is None else frames_read.get(f)
        if read is None:
            df = _read_csv(f, (length_col, "latency_us"), SCHEMAS[kind], notes if kv == "bf16" else None,
                           optional=("batch_size",))
            if "batch_size" not in df.columns:
                df["batch_size"] = 1.0
            read = df, {c: df[c].astype(str).str.strip().str.lower() for c in ("dtype", "kv_dtype") if c in df.columns}
            if frames_read is not None:
                frames_read[f] = read
        df, dtypes = read
        keep = np.ones(len(df), bool)
        for col, allowed in rows.items():
            if col in dtypes:
                ok = dtypes[col].isin(allowed).to_numpy()
                other_dtypes |= {f"{col}={v}" for v in df.loc[keep & ~ok, col].astype(str).unique()}
                keep &= ok
        if not keep.any():
            if notes is not None and kv == "bf16":
                notes.append(f"{f}: skipped, no rows with bf16/fp16 activations and KV cache")
            continue
        frames.append(df[keep])
        kept.append((heads, f.name))
    if not frames:
        if files and kv == "bf16":
            raise InputError(f"no rows with bf16/fp16 activations and KV cache in {len(files)} file(s) (found "
                             f"{', '.join(sorted(other_dtypes))}); the step model prices bf16/fp16 attention",
                             str(folder), "dtype")
        return None, [], None, 0
    df = pd.concat(frames, ignore_index=True)
    rows_per_file = [len(x) for x in frames]
    for i, col in enumerate(("hq", "hkv", "d")):  # each file's head layout and name, set on the joined rows
        df[col] = np.repeat([h[i] for h, _ in kept], rows_per_file)
    df["file"] = np.repeat([file_name for _, file_name in kept], rows_per_file)
    heads = sorted(set(zip(df.hq, df.hkv, df.d)))
    ll, lb = _log_grid(df[length_col]), _log_grid(df.batch_size)
    if len(ll) < 2:
        raise InputError(f"needs at least two values of {length_col} to interpolate between, found {len(ll)}",
                         str(folder), length_col)
    raw = np.full((len(heads), len(ll), len(lb)), np.nan)
    g = df.groupby(["hq", "hkv", "d", length_col, "batch_size"], as_index=False)["latency_us"].min()
    ci = [heads.index(h) for h in zip(g.hq, g.hkv, g.d)]
    raw[ci, _index(ll, g[length_col]), _index(lb, g.batch_size)] = g.latency_us
    n_missing = int(np.isnan(raw).sum())
    dropped = _drop_outliers(raw, ll, 1)
    grid = np.log(raw)
    slope_lo = 1.0 if kind == "decode" else 0.0  # decode: kv-proportional down to the layout's floor
    for c in range(len(heads)):
        floor = np.nanmin(grid[c])
        for j in range(len(lb)):
            grid[c, :, j] = fill_work_axis(grid[c, :, j], ll, slope, slope_lo, floor)
        have = [j for j in range(len(lb)) if not np.isnan(grid[c, :, j]).all()]
        for j in range(len(lb)):  # batch rows never measured: nearest row, time proportional to batch
            if np.isnan(grid[c, :, j]).all():
                near = min(have, key=lambda h: abs(lb[h] - lb[j]))
                grid[c, :, j] = grid[c, :, near] + (lb[j] - lb[near])
    L, B = np.exp(ll), np.exp(lb)
    label = lambda ix: f"{'-'.join(map(str, heads[ix[0]]))} batch={B[ix[2]]:.0f} {length_col}={L[ix[1]]:.0f}"  # noqa: E731
    t = _clean(name, np.exp(grid), (1, 2), label, adjustments, dropped)
    _note_dropped(notes, name, folder, label, dropped, t)
    table = AttnTable(f32_array(ll), f32_array(lb), f32_array(np.log(t)))
    return table, heads, df, n_missing


def load_allreduce(path: Path, adjustments: Adjustments | None = None, notes: list[str] | None = None):
    """Load an all-reduce table.  Only outliers dropped and refilled are reported in ``adjustments`` (the
    lower envelope's changes are not)."""
    df = _read_csv(path, ("num_gpus", "message_bytes", "latency_us"))
    if "kernel" in df.columns and (df["kernel"] == "custom_allreduce").any():
        df = df[df["kernel"] == "custom_allreduce"]  # what vLLM calls under CUDA graphs (it picks NCCL itself)
    g = df.groupby(["num_gpus", "message_bytes"], as_index=False)["latency_us"].min()
    lg, lby = _log_grid(g.num_gpus), _log_grid(g.message_bytes)
    if len(lby) < 2:
        raise InputError(f"needs at least two values of message_bytes to interpolate between, found {len(lby)}",
                         str(path), "message_bytes")
    raw = np.full((len(lg), len(lby)), np.nan)
    raw[_index(lg, g.num_gpus), _index(lby, g.message_bytes)] = g.latency_us
    dropped = _drop_outliers(raw, lby, 1)
    grid = np.log(raw)
    for i in range(len(lg)):
        grid[i] = fill_work_axis(grid[i], lby, 1.0)
    t = suffix_min(np.exp(grid), (1,))
    G, S = np.exp(lg), np.exp(lby)
    label = lambda ix: f"gpus={G[ix[0]]:.0f} message_bytes={S[ix[1]]:.0f}"  # noqa: E731
    for idx, (measured, reason) in sorted(dropped.items()):
        if adjustments is not None:
            adjustments.append(Adjustment("allreduce", label(idx), measured, float(t[idx]), idx, reason))
    _note_dropped(notes, "allreduce", path, label, dropped, t)
    return CommTable(*(f32_array(a) for a in (lg, lby, np.log(t)))), df


def default_bench_data() -> Path:
    """The repo's own bench_data/ (beside the package), the default table source."""
    return Path(__file__).resolve().parent.parent / "bench_data"


TABLE_KINDS = ("gemm", "decode", "prefill", "allreduce")


def parse_bench_data(spec: str | Path | None) -> dict[str, Path]:
    """Table folder per kind from ``DIR`` or ``DIR,kind=DIR2,...`` (kinds: gemm, decode, prefill, allreduce;
    a spec of only ``kind=DIR`` parts takes the rest from the repo's bench_data)."""
    base, over = default_bench_data(), {}
    for part in ([] if spec is None else str(spec).split(",")):
        if "=" in part:
            kind, folder = part.split("=", 1)
            if kind not in TABLE_KINDS:
                raise InputError(f"unknown table kind '{kind}' (expected {', '.join(TABLE_KINDS)})",
                                 field="bench_data")
            over[kind] = Path(folder)
        elif part:
            base = Path(part)
    roots = {k: over.get(k, base) for k in TABLE_KINDS}
    for folder in set(roots.values()):
        if not folder.is_dir():
            raise InputError(f"bench_data folder {folder} does not exist (pass --bench-data DIR; InferSim's "
                             f"tables are in ../shared/bench_data)", field="bench_data")
    return roots


def load_tables(bench_data: str | Path | None, gpu: GPU) -> Tables:
    """Load every table the bench_data folder(s) have for ``gpu``; see `parse_bench_data` for mixing sources."""
    roots = parse_bench_data(bench_data)
    root = roots["gemm"]
    adj = Adjustments()
    tables = Tables(gpu=gpu, root=root, gemm={}, decode=None, prefill=None, allreduce=None, adjustments=adj)
    d = find_gpu_dir(root, "gemm", gpu)
    if d is not None and (d / "data.csv").is_file():
        tables.gemm, tables.measured["gemm"], tables.filled_cells["gemm"] = load_gemm(d / "data.csv", adj, gpu,
                                                                                      tables.notes)
        tables.sources["gemm"] = str(d / "data.csv")
    frames_read: dict = {}  # each attention file is parsed once for its bf16 and its fp8 KV-cache rows
    for kind, kv in (("decode", "bf16"), ("prefill", "bf16"), ("decode", "fp8"), ("prefill", "fp8")):
        d = find_gpu_dir(roots[kind], f"mha/{kind}", gpu)
        if d is None:
            continue
        table, heads, df, nfill = load_attention(d, kind, adj, tables.notes, kv, frames_read)
        if table is not None:
            name = attn_table_name(kind, kv)
            setattr(tables, name, table)
            setattr(tables, f"{name}_heads", heads)
            tables.measured[name], tables.filled_cells[name], tables.sources[name] = df, nfill, str(d)
    d = find_gpu_dir(roots["allreduce"], "allreduce", gpu)
    if d is not None and (d / "data.csv").is_file():
        tables.allreduce, tables.measured["allreduce"] = load_allreduce(d / "data.csv", adj, tables.notes)
        tables.sources["allreduce"] = str(d / "data.csv")
    missing = [k for k, v in (("gemm", tables.gemm), ("mha/decode", tables.decode),
                              ("mha/prefill", tables.prefill)) if not v]
    if missing:
        raise InputError(f"no {', '.join(missing)} table for {gpu.name} under {sorted(set(map(str, roots.values())))} (looked for folders "
                         f"{', '.join(gpu.table_dirs)})", field="gpu")
    return tables


def nearest_layout(layouts: list[tuple[int, int, int]], hq: float, hkv: float, d: float, kind: str):
    """Pick the measured per-GPU head layout closest to (hq, hkv, d) and the factor that rescales the
    sequence length so the work matches: KV bytes (decode) or attention FLOPs (prefill)."""
    def score(lay):
        q, kv, dd = lay
        main = abs(math.log(kv / hkv)) if kind == "decode" else abs(math.log(q / hq))
        return 10 * abs(math.log(dd / d)) + main + 0.5 * abs(math.log((q / kv) / (hq / hkv)))

    c = min(range(len(layouts)), key=lambda i: score(layouts[i]))
    q, kv, dd = layouts[c]
    scale = (hkv * d) / (kv * dd) if kind == "decode" else math.sqrt((hq * d) / (q * dd))
    return c, scale


# ---------------------------------------------------------------- fused MoE tables

MOE_COLUMNS = ("dtype", "num_tokens", "hidden_size", "inter_size", "num_experts", "topk", "moe_tp", "moe_ep",
               "distribution", "latency_us", "kernel")
MOE_INT_COLUMNS = ("num_tokens", "hidden_size", "inter_size", "num_experts", "topk", "moe_tp", "moe_ep")
MOE_SHAPE_COLUMNS = ("dtype", "hidden_size", "inter_size", "num_experts", "topk", "moe_tp", "moe_ep", "distribution")
MOE_DTYPES = ("bf16", "fp8", "fp8_block", "int4_wo", "mxfp4", "nvfp4")
# The expert-load distribution a curve is taken from when none is asked for, first measured one wins:
# AIConfigurator's generic MoE models (Mixtral, Qwen3-MoE, gpt-oss) query power_law_1.2, its DeepSeek-style
# models power_law_1.01.
MOE_DISTRIBUTION_PREFERENCE = ("power_law_1.2", "power_law_1.01", "balanced")

_TABLE_CACHE: dict = {}


def _gpu_table_file(gpu: str, data_dir, parts: tuple[str, ...]) -> Path | None:
    """``DATA_DIR/<parts>/<gpu folder>/data.csv`` for the first of the GPU's table folder names
    (`hardware.GPU.table_dirs`; a name `hardware` does not know is taken as the folder name) that has one."""
    root = Path(data_dir) if data_dir is not None else default_bench_data()
    known = find_gpu(gpu)
    names = known.table_dirs if known is not None else (str(gpu),)
    for name in names:
        f = root.joinpath(*parts, name, "data.csv")
        if f.is_file():
            return f
    return None


def _cached_frame(path: Path, read):
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _TABLE_CACHE:
        _TABLE_CACHE[key] = read(path)
    return _TABLE_CACHE[key]


def _check_labels(df: pd.DataFrame, path: Path, column: str, allowed: tuple[str, ...] | None) -> None:
    """Every value of the text column ``column`` non-empty and, with ``allowed``, one of them; InputError
    naming the file line otherwise (a header line, then one line per row)."""
    vals = df[column]
    bad = vals.isna() | (vals.astype(str).str.strip() == "")
    if allowed is not None:
        bad |= ~vals.isin(allowed)
    if bad.any():
        row = int(np.argmax(bad.to_numpy()))
        want = f" (expected one of {', '.join(allowed)})" if allowed is not None else ""
        raise InputError(f"bad value {vals.iloc[row]!r}{want}", f"{path}:{row + 2}", column)


def _read_moe(path: Path) -> pd.DataFrame:
    numeric = tuple(c for c in MOE_COLUMNS if c not in ("dtype", "distribution", "kernel"))
    text, _ = read_csv_text(path)
    head = pd.read_csv(io.StringIO(text), nrows=0).columns
    missing = [c for c in MOE_COLUMNS if c not in head]
    if missing:
        raise InputError(f"missing column(s) {missing}", str(path))
    df = _read_csv(path, numeric + ("dtype", "kernel"))
    for c in MOE_INT_COLUMNS:
        frac = df[c] != np.round(df[c])
        if frac.any():
            row = int(np.argmax(frac.to_numpy()))
            raise InputError(f"not a whole number: {df[c].iloc[row]}", f"{path}:{row + 2}", c)
        df[c] = df[c].astype(np.int64)
    df["distribution"] = df["distribution"].astype(str)
    _check_labels(df, path, "dtype", MOE_DTYPES)
    _check_labels(df, path, "distribution", None)
    _check_labels(df, path, "kernel", None)
    dup = df.duplicated(list(MOE_SHAPE_COLUMNS) + ["num_tokens"])
    if dup.any():
        row = int(np.argmax(dup.to_numpy()))
        raise InputError("a second row for the same shape and num_tokens", f"{path}:{row + 2}", "num_tokens")
    return df[list(MOE_COLUMNS)].sort_values(list(MOE_SHAPE_COLUMNS) + ["num_tokens"]).reset_index(drop=True)


def load_moe(gpu: str, data_dir=None) -> pd.DataFrame | None:
    """The fused-MoE table of ``gpu`` (a `hardware` GPU name or a table folder name) from
    ``DATA_DIR/moe/<gpu>/data.csv`` (default: the repo's bench_data/), or None when there is none.

    One row per measured point, columns `MOE_COLUMNS`: ``latency_us`` is one GPU's expert computation of one
    MoE layer (grouped gate/up GEMM, activation, grouped down GEMM; no router GEMM, shared experts or EP
    dispatch/combine) for ``num_tokens`` tokens entering the layer, summed over the attention-DP ranks that
    feed it; that GPU holds ``num_experts / moe_ep`` experts with ``inter_size / moe_tp`` of each one's
    intermediate width.  Sorted by shape, then num_tokens.  The frame is shared between calls: do not
    modify it.  InputError (file:line, column) for a malformed file."""
    path = _gpu_table_file(gpu, data_dir, ("moe",))
    return None if path is None else _cached_frame(path, _read_moe)


def moe_shapes(df: pd.DataFrame, dtype: str | None = None) -> pd.DataFrame:
    """The measured MoE shapes (`MOE_SHAPE_COLUMNS` plus ``points``, ``min_tokens``, ``max_tokens``), of one
    dtype or all."""
    if dtype is not None:
        df = df[df["dtype"] == dtype]
    g = df.groupby(list(MOE_SHAPE_COLUMNS), sort=True)["num_tokens"]
    return g.agg(points="size", min_tokens="min", max_tokens="max").reset_index()


def moe_shapes_text(df: pd.DataFrame, dtype: str | None = None, limit: int = 40) -> str:
    """The measured (hidden, inter, experts, topk) shapes, each with its (moe_tp, moe_ep) pairs, as one line
    for an error message: ``dtype hidden/inter/experts/topk tp x ep ...; ...``."""
    s = moe_shapes(df, dtype)
    if s.empty:
        return f"no {dtype} MoE shapes" if dtype else "no MoE shapes"
    out = []
    for (dt, h, i, e, k), g in s.groupby(["dtype", "hidden_size", "inter_size", "num_experts", "topk"]):
        par = sorted({(int(a), int(b)) for a, b in zip(g["moe_tp"], g["moe_ep"])})
        out.append(f"{dt} hidden={h} inter={i} experts={e} topk={k} (tp x ep: "
                   f"{' '.join(f'{a}x{b}' for a, b in par)})")
    more = f"; ... {len(out) - limit} more" if len(out) > limit else ""
    return "; ".join(out[:limit]) + more


def moe_curve(df: pd.DataFrame, dtype: str, hidden: int, inter: int, experts: int, topk: int, moe_tp: int,
              moe_ep: int, distribution: str | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(num_tokens ascending, latency_us) of the one measured curve of that exact shape in a `load_moe`
    frame, or None when it was not measured.  ``distribution`` None takes the first measured of
    `MOE_DISTRIBUTION_PREFERENCE` (then any other, by name)."""
    sel = df[(df["dtype"] == dtype) & (df["hidden_size"] == int(hidden)) & (df["inter_size"] == int(inter))
             & (df["num_experts"] == int(experts)) & (df["topk"] == int(topk)) & (df["moe_tp"] == int(moe_tp))
             & (df["moe_ep"] == int(moe_ep))]
    if sel.empty:
        return None
    have = set(sel["distribution"])
    if distribution is None:
        order = [d for d in MOE_DISTRIBUTION_PREFERENCE if d in have] + sorted(have - set(MOE_DISTRIBUTION_PREFERENCE))
        distribution = order[0]
    elif distribution not in have:
        return None
    c = sel[sel["distribution"] == distribution].sort_values("num_tokens")
    return c["num_tokens"].to_numpy(np.int64), c["latency_us"].to_numpy(np.float64)


# ---------------------------------------------------------------- MLA module tables

MLA_KINDS = {"prefill": "seq_len", "decode": "kv_len"}  # kind -> length column
MLA_CURVE_COLUMNS = ("dtype", "kv_dtype", "gemm_dtype", "num_heads", "batch_size")
MLA_DTYPES = ("bf16", "fp16", "fp8", "fp8_block", "nvfp4")


def _read_mla(path: Path, kind: str) -> pd.DataFrame:
    length = MLA_KINDS[kind]
    cols = ("kernel",) + MLA_CURVE_COLUMNS + (length, "latency_us")
    text, _ = read_csv_text(path)
    missing = [c for c in cols if c not in pd.read_csv(io.StringIO(text), nrows=0).columns]
    if missing:
        raise InputError(f"missing column(s) {missing}", str(path))
    df = _read_csv(path, ("num_heads", "batch_size", length, "latency_us", "kernel"))
    for c in ("num_heads", "batch_size", length):
        frac = df[c] != np.round(df[c])
        if frac.any():
            row = int(np.argmax(frac.to_numpy()))
            raise InputError(f"not a whole number: {df[c].iloc[row]}", f"{path}:{row + 2}", c)
        df[c] = df[c].astype(np.int64)
    for c in ("dtype", "kv_dtype", "gemm_dtype"):
        _check_labels(df, path, c, MLA_DTYPES)
    _check_labels(df, path, "kernel", None)
    dup = df.duplicated(list(MLA_CURVE_COLUMNS) + [length])
    if dup.any():
        row = int(np.argmax(dup.to_numpy()))
        raise InputError("a second row for the same curve and length", f"{path}:{row + 2}", length)
    return df[list(cols)].sort_values(list(MLA_CURVE_COLUMNS) + [length]).reset_index(drop=True)


def load_mla(gpu: str, kind: str, data_dir=None) -> pd.DataFrame | None:
    """The MLA attention-module table of ``gpu`` for ``kind`` "prefill" or "decode" from
    ``DATA_DIR/mla/<kind>/<gpu>/data.csv`` (default: the repo's bench_data/), or None when there is none.

    One row per measured point, columns ``kernel``, `MLA_CURVE_COLUMNS`, ``seq_len`` | ``kv_len``,
    ``latency_us``: one layer's whole MLA block (q/kv projections, attention, output projection) on one GPU
    for DeepSeek-V3's geometry with ``num_heads`` heads on that GPU; prefill: ``batch_size`` sequences of
    ``seq_len`` new tokens, no cached prefix; decode: one new token per sequence over ``kv_len`` cached
    tokens.  ``kernel`` is the vLLM backend that ran the point (it changes along a prefill curve).  Shared
    between calls: do not modify.  InputError (file:line, column) for a malformed file."""
    if kind not in MLA_KINDS:
        raise InputError(f"unknown MLA table kind {kind!r} (expected prefill or decode)", field="kind")
    path = _gpu_table_file(gpu, data_dir, ("mla", kind))
    return None if path is None else _cached_frame(path, lambda p: _read_mla(p, kind))


def mla_curve(df: pd.DataFrame, num_heads: int, batch_size: int, kv_dtype: str = "bf16",
              gemm_dtype: str = "bf16", dtype: str = "bf16") -> tuple[np.ndarray, np.ndarray] | None:
    """(length ascending, latency_us) of one measured curve of a `load_mla` frame (whatever kernel ran each
    length), or None when it was not measured."""
    sel = df[(df["num_heads"] == int(num_heads)) & (df["batch_size"] == int(batch_size))
             & (df["kv_dtype"] == kv_dtype) & (df["gemm_dtype"] == gemm_dtype) & (df["dtype"] == dtype)]
    if sel.empty:
        return None
    length = "seq_len" if "seq_len" in sel.columns else "kv_len"
    return sel[length].to_numpy(np.int64), sel["latency_us"].to_numpy(np.float64)


def mla_table(df: pd.DataFrame, num_heads: int, kv_dtype: str = "bf16", gemm_dtype: str = "bf16",
              dtype: str = "bf16") -> AttnTable | None:
    """The MLA module curves of a `load_mla` frame for ``num_heads`` heads per GPU at these dtypes, as an
    `AttnTable` of one head layout (c = 0): log µs over the frame's whole length grid (the union of every
    curve's lengths, so that every MLA table of one GPU and kind has one shape) x its batch sizes; None when
    those curves were not measured.  Lengths a curve lacks (the tables are subsampled where log-log linear
    interpolation reproduces them within 1.5 %) are filled log-log linearly between its measured neighbours,
    held below its first and grown in proportion to length (decode) or its square (prefill) beyond its last;
    then the lower envelope over length and batch (`interp.suffix_min`, the tables' policy) is kept."""
    length = "seq_len" if "seq_len" in df.columns else "kv_len"
    slope = PREFILL_SLOPE_HI if length == "seq_len" else DECODE_SLOPE_HI
    ll, lb = _log_grid(df[length]), _log_grid(df.batch_size)
    grid = np.full((len(ll), len(lb)), np.nan)
    for j, b in enumerate(np.exp(lb)):
        got = mla_curve(df, num_heads, int(round(b)), kv_dtype, gemm_dtype, dtype)
        if got is None:
            return None
        grid[_index(ll, got[0]), j] = np.log(got[1])
        grid[:, j] = fill_work_axis(grid[:, j], ll, slope)
    t = suffix_min(np.exp(grid)[None], (1, 2))
    return AttnTable(*(f32_array(a) for a in (ll, lb, np.log(t))))


def mla_tables_of(gpu: str, num_heads: int, kv_dtype: str, gemm_dtype: str, data_dir=None) -> tuple[AttnTable, AttnTable]:
    """(decode, prefill) `mla_table` of ``gpu`` at ``num_heads`` heads per GPU, bf16 attention; refused
    (`InputError` naming what is measured) where the GPU has no MLA table or not at these heads and dtypes."""
    out = []
    for kind in ("decode", "prefill"):
        df = load_mla(gpu, kind, data_dir)
        if df is None:
            have = sorted(p.parent.name for p in (Path(data_dir) if data_dir is not None else default_bench_data())
                          .glob(f"mla/{kind}/*/data.csv"))
            raise InputError(f"no MLA {kind} table for {gpu} (measured: {', '.join(have) or 'none'}), so "
                             "multi-head latent attention cannot be priced on it", field="gpu")
        t = mla_table(df, num_heads, kv_dtype, gemm_dtype)
        if t is None:
            have = sorted(set(zip(df.num_heads, df.kv_dtype, df.gemm_dtype)))
            heads = sorted({h for h, _, _ in have})
            dts = sorted({f"kv {k}/gemm {g}" for _, k, g in have})
            raise InputError(f"the MLA {kind} table of {gpu} has no curves at {num_heads} heads per GPU with kv "
                             f"{kv_dtype} and {gemm_dtype} projections (measured heads per GPU: "
                             f"{', '.join(map(str, heads))}; dtypes: {', '.join(dts)})", field="tp")
        out.append(t)
    return out[0], out[1]
