"""Kernel tables: load InferSim-schema CSVs from a bench_data folder into arrays, expose them as pure JAX
interpolants of continuous inputs.

Layout read (per GPU folder name, see `hardware.GPU.table_dirs`):
* ``gemm/<gpu>/data.csv``  columns ``m,k,n,latency_us[,mfu][,dtype]``.  Without a ``dtype`` column the
  table is taken as FP8: every InferSim GEMM table was measured with DeepGEMM FP8.
* ``mha/decode/<gpu>/*.csv``  ``dtype,kv_dtype,batch_size,kv_len,latency_us,mfu`` (paged decode).
* ``mha/prefill/<gpu>/*.csv``  ``dtype,[batch_size,]seq_len,latency_us,mfu`` (causal, no cached prefix).
  File names ``{hq}-{hkv}-{d}-tp{T}.csv`` give full-model heads run under TP=T (one GPU's share is
  hq/T, hkv/T); ``{hq}-{hkv}-{d}.csv`` give the heads one GPU ran.
* ``allreduce/<gpu>/data.csv``  ``kernel,num_gpus,message_bytes,latency_us[,dtype]`` (optional).

Off-grid policy (documented in the README, reported by `costmodel tables`):
* ``latency_us`` is the measurement; ``mfu`` columns are ignored (derived and sometimes rounded to 0).
* Noise: a time larger than one measured for strictly more work is lowered to it (lower envelope).
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

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .errors import InputError
from .hardware import GPU
from .interp import blend_secondary_axis, fill_work_axis, interp_work_axis, suffix_min
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


@dataclass
class Adjustment:
    """A measured point changed by the noise policy."""

    table: str
    where: str
    measured_us: float
    used_us: float


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
    sources: dict[str, str] = field(default_factory=dict)  # table -> file/folder it came from
    measured: dict[str, pd.DataFrame] = field(default_factory=dict)  # raw measured points per table
    adjustments: list[Adjustment] = field(default_factory=list)
    filled_cells: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # files read with a tolerance (e.g. a missing header)


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


def gemm_shape_blend(t: GemmTable, k, n):
    """The measured shapes around (k, n) and how `gemm_table_us` blends them: their log-time m-series
    [4, Nm] (k0n0, k0n1, k1n0, k1n1), the log work ratio added to each [4], and the bilinear weights [4]."""
    lk, ln = jnp.log(k), jnp.log(n)
    ik, wk = _bracket(t.log_k, lk)
    i_n, wn = _bracket(t.log_n, ln)
    series = t.log_t[ik[:, None], i_n[None, :], :].reshape(4, -1)
    offset = (lk - t.log_k[ik]).repeat(2) + jnp.tile(ln - t.log_n[i_n], 2)
    w = jnp.outer(jnp.stack([1.0 - wk, wk]), jnp.stack([1.0 - wn, wn])).reshape(4)
    return series, offset, w


def _bracket(grid, x):
    """Indices of the two grid nodes around x (clamped to the ends) and the weight of the upper one."""
    if grid.shape[0] == 1:
        return jnp.zeros(2, jnp.int32), jnp.float32(0.0)
    i = jnp.clip(jnp.searchsorted(grid, x) - 1, 0, grid.shape[0] - 2)
    w = jnp.clip((x - grid[i]) / (grid[i + 1] - grid[i]), 0.0, 1.0)
    return jnp.stack([i, i + 1]), w


def attn_table_us(t: AttnTable, c, batch, length, slope_hi, slope_lo=0.0):
    """Attention latency (µs) of head layout ``c`` for ``batch`` sequences of ``length`` (kv_len for
    decode, seq_len for prefill).  Batches beyond the grid fold into longer equivalent sequences
    (`fold_batch`); lengths beyond the grid follow log-log slopes ``slope_hi`` above and ``slope_lo`` below."""
    b, length = fold_batch(batch, jnp.exp(t.log_b[-1]), length, slope_hi)
    rows = interp_work_axis(jnp.log(length), t.log_len, t.log_t[c], slope_hi, slope_lo)  # [Nb]
    return jnp.exp(blend_secondary_axis(jnp.log(b), t.log_b, rows))


def fold_batch(batch, b_max, length, slope_hi):
    """``batch`` sequences of ``length`` as at most ``b_max`` sequences of the same total work, where work
    grows as length^slope_hi: (batch clamped to [1, b_max], the equivalent length)."""
    b = jnp.clip(batch, 1.0, b_max)
    ratio = batch / b  # ratio ** (1 / slope_hi), without pow for the usual slopes (pow is a libm call)
    return b, length * (ratio if slope_hi == 1.0 else jnp.sqrt(ratio) if slope_hi == 2.0 else ratio ** (1.0 / slope_hi))


def comm_table_us(t: CommTable, gpus, nbytes):
    """Measured all-reduce latency (µs) of ``nbytes`` per GPU over ``gpus`` GPUs."""
    rows = interp_work_axis(jnp.log(nbytes), t.log_bytes, jnp.moveaxis(t.log_t, 1, 0), 1.0)  # [Ng]
    return jnp.exp(_interp_clamped(jnp.log(gpus), t.log_gpus, rows))


def comm_gpu_weights(t: CommTable, gpus):
    """Weights w [Ng] with `comm_table_us`'s blend over GPU counts == w @ rows (clamped, linear in log gpus)."""
    eye = jnp.eye(t.log_gpus.shape[0], dtype=jnp.float32)
    return jax.vmap(lambda col: _interp_clamped(jnp.log(gpus), t.log_gpus, col), in_axes=1)(eye)


def _interp_clamped(x, xp, fp):
    return fp[0] if xp.shape[0] == 1 else jnp.interp(x, xp, fp)


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


def _read_csv(path: Path, required: tuple[str, ...], schema: tuple[str, ...] | None = None,
              notes: list[str] | None = None) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
        if schema and not set(required) <= set(df.columns) and len(df.columns) == len(schema) and \
                _looks_like_data(df.columns):
            df = pd.read_csv(path, header=None, names=list(schema))
            if notes is not None:
                notes.append(f"{path}: no header row; read with InferSim's columns {','.join(schema)}")
    except Exception as e:  # pandas raises several types for malformed files
        raise InputError(f"cannot parse CSV: {e}", str(path)) from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"missing column(s) {missing}", str(path))
    for c in required:
        if c in ("dtype", "kv_dtype", "kernel"):
            continue
        vals = pd.to_numeric(df[c], errors="coerce")
        bad = vals.isna() | (vals <= 0)
        if bad.any():
            row = int(np.argmax(bad.to_numpy()))
            raise InputError(f"non-positive or non-numeric value {df[c].iloc[row]!r}", f"{path}:{row + 2}", c)
        df[c] = vals.astype(float)
    return df


def _looks_like_data(header) -> bool:
    """A header row that is really a data row: a dtype name or a number in its first cell."""
    first = str(header[0]).strip().lower()
    try:
        float(first)
        return True
    except ValueError:
        return first in ("bf16", "fp16", "fp8")


def _log_grid(values) -> np.ndarray:
    return np.log(np.array(sorted(set(float(v) for v in values))))


def _index(grid_log: np.ndarray, values) -> np.ndarray:
    return np.searchsorted(grid_log, np.log(np.asarray(values, dtype=float)) - 1e-9)


def _clean(name: str, t: np.ndarray, axes, label, adjustments: list[Adjustment]) -> np.ndarray:
    cleaned = suffix_min(t, axes)
    for idx in zip(*np.nonzero(~np.isnan(t) & (np.abs(cleaned - t) > 1e-9 * t))):
        adjustments.append(Adjustment(name, label(idx), float(t[idx]), float(cleaned[idx])))
    return cleaned


def load_gemm(path: Path, adjustments: list[Adjustment]) -> tuple[dict[str, GemmTable], pd.DataFrame, int]:
    df = _read_csv(path, ("m", "k", "n", "latency_us"))
    df["dtype"] = df["dtype"].astype(str).str.lower() if "dtype" in df.columns else "fp8"
    out, filled = {}, 0
    for dtype, d in df.groupby("dtype"):
        lm, lk, ln = _log_grid(d.m), _log_grid(d.k), _log_grid(d.n)
        raw = np.full((len(lk), len(ln), len(lm)), np.nan)
        d = d.groupby(["k", "n", "m"], as_index=False)["latency_us"].min()
        raw[_index(lk, d.k), _index(ln, d.n), _index(lm, d.m)] = d.latency_us
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
        filled += int(np.isnan(raw).sum())
        m_, k_, n_ = np.exp(lm), np.exp(lk), np.exp(ln)
        t = _clean(f"gemm/{dtype}", np.exp(grid), (2,),
                   lambda ix: f"m={m_[ix[2]]:.0f} k={k_[ix[0]]:.0f} n={n_[ix[1]]:.0f}", adjustments)
        # cells that were filled must not be lowered below... (fill already monotone); keep raw NaNs filled
        out[dtype] = GemmTable(*(jnp.asarray(a, jnp.float32) for a in (lm, lk, ln, np.log(t))))
    return out, df, filled


def _attn_files(folder: Path) -> list[tuple[tuple[int, int, int], Path]]:
    files = []
    for f in sorted(folder.glob("*.csv")):
        mt = _HEADS.match(f.stem)
        if not mt:
            continue
        heads = per_gpu_heads(int(mt[1]), int(mt[2]), int(mt[3]), int(mt[4] or 1))
        if heads is not None:  # a file of full-model heads under a TP degree that cannot shard them: skipped
            files.append((heads, f))
    return files


def load_attention(folder: Path, kind: str, adjustments: list[Adjustment], notes: list[str] | None = None):
    """Load all head layouts of one attention kind ('decode' or 'prefill') into one AttnTable."""
    length_col = "kv_len" if kind == "decode" else "seq_len"
    slope = DECODE_SLOPE_HI if kind == "decode" else PREFILL_SLOPE_HI
    frames = []
    for heads, f in _attn_files(folder):
        df = _read_csv(f, (length_col, "latency_us"), SCHEMAS[kind], notes)
        if "batch_size" not in df.columns:
            df["batch_size"] = 1.0
        df["batch_size"] = pd.to_numeric(df["batch_size"], errors="coerce")
        for col in ("dtype", "kv_dtype"):  # bf16/fp16 activations and KV cache only
            if col in df.columns:
                df = df[df[col].astype(str).str.lower().isin(["bf16", "fp16"])]
        df = df.assign(hq=heads[0], hkv=heads[1], d=heads[2], file=f.name)
        frames.append(df)
    if not frames:
        return None, [], None, 0
    df = pd.concat(frames, ignore_index=True)
    heads = sorted(set(zip(df.hq, df.hkv, df.d)))
    ll, lb = _log_grid(df[length_col]), _log_grid(df.batch_size)
    raw = np.full((len(heads), len(ll), len(lb)), np.nan)
    g = df.groupby(["hq", "hkv", "d", length_col, "batch_size"], as_index=False)["latency_us"].min()
    ci = [heads.index(h) for h in zip(g.hq, g.hkv, g.d)]
    raw[ci, _index(ll, g[length_col]), _index(lb, g.batch_size)] = g.latency_us
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
    t = _clean(f"{kind}", np.exp(grid), (1, 2),
               lambda ix: f"{'-'.join(map(str, heads[ix[0]]))} batch={B[ix[2]]:.0f} {length_col}={L[ix[1]]:.0f}",
               adjustments)
    table = AttnTable(jnp.asarray(ll, jnp.float32), jnp.asarray(lb, jnp.float32), jnp.asarray(np.log(t), jnp.float32))
    return table, heads, df, int(np.isnan(raw).sum())


def load_allreduce(path: Path):
    df = _read_csv(path, ("num_gpus", "message_bytes", "latency_us"))
    if "kernel" in df.columns and (df["kernel"] == "custom_allreduce").any():
        df = df[df["kernel"] == "custom_allreduce"]  # what vLLM calls under CUDA graphs (it picks NCCL itself)
    g = df.groupby(["num_gpus", "message_bytes"], as_index=False)["latency_us"].min()
    lg, lby = _log_grid(g.num_gpus), _log_grid(g.message_bytes)
    raw = np.full((len(lg), len(lby)), np.nan)
    raw[_index(lg, g.num_gpus), _index(lby, g.message_bytes)] = g.latency_us
    grid = np.log(raw)
    for i in range(len(lg)):
        grid[i] = fill_work_axis(grid[i], lby, 1.0)
    t = suffix_min(np.exp(grid), (1,))
    return CommTable(*(jnp.asarray(a, jnp.float32) for a in (lg, lby, np.log(t)))), df


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
    adj: list[Adjustment] = []
    tables = Tables(gpu=gpu, root=root, gemm={}, decode=None, prefill=None, allreduce=None, adjustments=adj)
    d = find_gpu_dir(root, "gemm", gpu)
    if d is not None and (d / "data.csv").is_file():
        tables.gemm, tables.measured["gemm"], tables.filled_cells["gemm"] = load_gemm(d / "data.csv", adj)
        tables.sources["gemm"] = str(d / "data.csv")
    for kind in ("decode", "prefill"):
        d = find_gpu_dir(roots[kind], f"mha/{kind}", gpu)
        if d is None:
            continue
        table, heads, df, nfill = load_attention(d, kind, adj, tables.notes)
        if table is not None:
            setattr(tables, kind, table)
            setattr(tables, f"{kind}_heads", heads)
            tables.measured[kind], tables.filled_cells[kind], tables.sources[kind] = df, nfill, str(d)
    d = find_gpu_dir(roots["allreduce"], "allreduce", gpu)
    if d is not None and (d / "data.csv").is_file():
        tables.allreduce, tables.measured["allreduce"] = load_allreduce(d / "data.csv")
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
