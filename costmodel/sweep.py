"""Sweeps at scale: millions of step configurations per second in one jitted, vmapped function.

A *space* of configurations is either named axes (their Cartesian product) or a table (pandas DataFrame):

* group columns, fixed per (model, GPU, TP, calibration, dtype): ``model`` (packaged name or path), ``gpu``,
  ``tp`` (default 1), ``calibration`` (``none`` | ``default`` | PATH, default ``default`` as in
  ``costmodel predict``), ``dtype`` (default: the model config's);
* the batch, summarized (decode attention is priced from the batch size and the total keys, prefill
  attention from the number of chunks and the total query-key pairs, GEMMs from the token count, so these
  summaries are exact):
  - ``n_decode`` decoding requests with ``decode_ctx`` cached tokens each (mean), or ``decode_keys`` keys
    attended in all (``sum(min(ctx + 1, window))``);
  - ``n_prefill`` prefill chunks of ``prefill_new`` new tokens after ``prefill_cached`` cached tokens
    each, or ``prefill_tokens`` new tokens and ``prefill_pairs`` query-key pairs (as the kernel computes
    them, `ops.prefill_pairs_tiled`) in all;
  - or, in a table, a ``step`` column with one step in the record schema
    ``{"prefill": [[new, cached], ...], "decode": [ctx, ...]}``, summarized exactly (`summarize_steps`).

The space is evaluated in fixed-size chunks (bounded memory; the configuration axis sharded over all local
devices), results streamed to Parquet or CSV chunk files written atomically, so an interrupted sweep resumes
at the first missing chunk, and merged into one file at the end.  Per (model, GPU, TP) group each GEMM's
m-series is precomputed once (the 2x2 shape blend of `tables.gemm_table_us` is linear in its cubic Hermite
values and slopes), and attention/all-reduce tables are reduced to the group's head layout and TP, so one
evaluation is a handful of 1-D cubic interpolations; `step.combine` then prices it exactly as `step_time`.

    import costmodel.sweep as sw
    df = sw.sweep({"model": "llama-3.1-8b", "gpu": "H100", "tp": [1, 2, 4, 8],
                   "n_decode": [1, 8, 64, 256], "decode_ctx": [1024, 8192]})
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import interpax
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from . import kernels, ops, tables as tables_mod
from .errors import InputError
from .hardware import get_gpu
from .model import ModelConfig, load_model, normalize_dtype
from .params import Params
from .step import BREAKDOWN, Features, Layout, Setup, Static, combine, setup, validate_step

GROUP_AXES = ("model", "gpu", "tp", "calibration", "dtype")
GROUP_DEFAULTS = {"tp": 1, "calibration": "default", "dtype": None}
BATCH_COLUMNS = ("n_decode", "decode_ctx", "decode_keys", "n_prefill", "prefill_new", "prefill_cached",
                 "prefill_tokens", "prefill_pairs")
RESULT_COLUMNS = ("step_us",) + BREAKDOWN
DEFAULT_CHUNK = 1 << 20
_BIG = np.float32(3e38)  # padding of grid nodes: never <= a query


# ---------------------------------------------------------------- per-group precomputation

def _cells(x, y, s):
    """Cubic Hermite cells of a series on grid ``x`` [N] with values ``y`` [N, ...] and slopes ``s``
    (as interpax evaluates them): per cell i (between x[i] and x[i+1]) x0, 1/dx and the coefficients of
    c0 + c1 t + c2 t^2 + c3 t^3 in t = (x - x0)/dx."""
    x = np.asarray(x, np.float32)
    dx = x[1:] - x[:-1]
    dxi = np.where(dx == 0, np.float32(0), np.float32(1) / np.where(dx == 0, 1, dx)).astype(np.float32)
    y, s = np.asarray(y, np.float64), np.asarray(s, np.float32)
    shape = (-1,) + (1,) * (y.ndim - 1)
    f0, f1 = y[:-1], y[1:]
    fx0 = (s[:-1] * dx.reshape(shape)).astype(np.float64)
    fx1 = (s[1:] * dx.reshape(shape)).astype(np.float64)
    coef = np.stack([f0, fx0, -3 * f0 + 3 * f1 - 2 * fx0 - fx1, 2 * f0 - 2 * f1 + fx0 + fx1], axis=-1)
    return x[:-1], dxi, coef.astype(np.float32)


def _slopes(x, f):
    """interpax's monotone (PCHIP-type) node slopes along axis 0, as `interp.interp_work_axis` uses."""
    return np.asarray(interpax.approx_df(jnp.asarray(x), jnp.asarray(f), "monotonic", axis=0))


def _gemm_series(t: tables_mod.GemmTable, k: float, n: float):
    """The (log m)-series of a GEMM of fixed (k, n): values and slopes of the blend in `gemm_table_us`."""
    lk, ln = jnp.log(jnp.float32(k)), jnp.log(jnp.float32(n))
    ik, wk = tables_mod._bracket(t.log_k, lk)
    i_n, wn = tables_mod._bracket(t.log_n, ln)
    series = np.asarray(t.log_t[ik[:, None], i_n[None, :], :].reshape(4, -1), np.float64)  # [4, Nm]
    off = np.asarray((lk - t.log_k[ik]).repeat(2) + jnp.tile(ln - t.log_n[i_n], 2), np.float64)
    w = np.asarray(jnp.outer(jnp.stack([1.0 - wk, wk]), jnp.stack([1.0 - wn, wn])).reshape(4), np.float64)
    slopes = _slopes(t.log_m, jnp.asarray(series.T, jnp.float32)).astype(np.float64)  # [Nm, 4]
    return (w[:, None] * (series + off[:, None])).sum(0), slopes @ w


def _interp_weights(xq: float, xp) -> np.ndarray:
    """Weights w with jnp.interp(xq, xp, fp) == w @ fp (clamped, as `tables._interp_clamped`)."""
    xp = jnp.asarray(xp)
    if xp.shape[0] == 1:
        return np.ones(1)
    return np.asarray(jax.vmap(lambda e: jnp.interp(jnp.float32(xq), xp, e))(jnp.eye(xp.shape[0])), np.float64)


@dataclass
class Group:
    """One (model, GPU, TP, calibration, dtype) of a sweep."""

    key: tuple
    setup: Setup
    params: Params
    calibration: str  # description


def _attn_tables(t: tables_mod.AttnTable, c: int):
    x = np.asarray(t.log_len)
    f = np.asarray(t.log_t[c], np.float32)  # [Nl, Nb]
    x0, dxi, coef = _cells(x, f, _slopes(x, f))
    lb = np.asarray(t.log_b, np.float32)
    return dict(x=x, x0=x0, dxi=dxi, coef=coef, b=lb)  # coef [Nl-1, Nb, 4]


def group_arrays(g: Group) -> dict:
    """The per-group arrays and scalars the fast evaluation reads (numpy, unpadded)."""
    su, p = g.setup, g.params
    d, hw = su.layout.dims, su.layout.hw
    gt = su.arrays.gemm
    gl = list(ops.layer_gemms(d, 1.0).values()) + [ops.lm_head_gemm(d, 1.0)]
    ser = [_gemm_series(gt, float(x.k), float(x.n)) for x in gl]
    xm = np.asarray(gt.log_m)
    x0, dxi, coef = _cells(xm, np.stack([s[0] for s in ser], 1), np.stack([s[1] for s in ser], 1))  # [Nc, 5, 4]
    out = {"m_int": xm[1:-1], "m_x0": x0, "m_dxi": dxi, "gemm_coef": coef[:, :4], "head_coef": coef[:, 4]}
    sc = {"m_lo": xm[0], "m_hi": xm[-1]}
    for f in ops.Dims._fields:
        sc["d_" + f] = getattr(d, f)
    for f in kernels.Hardware._fields:
        sc["hw_" + f] = getattr(hw, f)
    for f in Params._fields:
        sc["p_" + f] = getattr(p, f)
    for i, x in enumerate(gl):
        sc[f"k{i}"], sc[f"n{i}"] = x.k, x.n
    sc["table_weight_bytes"] = su.static.table_weight_bytes
    for kind, t, c in (("dec", su.arrays.decode, int(su.layout.decode_layout)),
                       ("pre", su.arrays.prefill, int(su.layout.prefill_layout))):
        a = _attn_tables(t, c)
        out[f"{kind}_int"], out[f"{kind}_x0"], out[f"{kind}_dxi"] = a["x"][1:-1], a["x0"], a["dxi"]
        out[f"{kind}_coef"] = a["coef"]
        lb = a["b"]
        out[f"{kind}_bint"], out[f"{kind}_bx0"] = lb[1:-1], lb[:-1]
        out[f"{kind}_bdx"] = lb[1:] - lb[:-1]
        sc.update({f"{kind}_lo": a["x"][0], f"{kind}_hi": a["x"][-1], f"{kind}_blo": lb[0], f"{kind}_bhi": lb[-1],
                   f"{kind}_bmax": float(jnp.exp(jnp.float32(lb[-1])))})
    sc["dec_scale"] = float(su.layout.decode_kv_scale)
    sc["pre_scale"] = float(su.layout.prefill_len_scale)
    sc["attn_floor"] = float(kernels.attn_floor_us(su.arrays.decode, su.layout.decode_layout))
    comm = su.arrays.comm
    if comm is not None:
        xb = np.asarray(comm.log_bytes)
        rows = np.asarray(jnp.moveaxis(comm.log_t, 1, 0), np.float32)  # [Nbytes, Ng]
        w = _interp_weights(float(jnp.log(jnp.maximum(jnp.float32(d.tp), 2.0))), comm.log_gpus)
        cx0, cdxi, ccoef = _cells(xb, rows.astype(np.float64) @ w, _slopes(xb, rows).astype(np.float64) @ w)
        out.update(comm_int=xb[1:-1], comm_x0=cx0, comm_dxi=cdxi, comm_coef=ccoef)
        sc.update(comm_lo=xb[0], comm_hi=xb[-1], comm_table=1.0)
    else:
        out.update(comm_int=np.zeros(0, np.float32), comm_x0=np.zeros(1, np.float32),
                   comm_dxi=np.zeros(1, np.float32), comm_coef=np.zeros((1, 4), np.float32))
        sc.update(comm_lo=0.0, comm_hi=0.0, comm_table=0.0)
    out["scal"] = sc
    return out


class GroupTables(NamedTuple):
    """One group's arrays, padded to the shapes common to a sweep (so one compilation serves all groups)."""

    scal: jax.Array  # [K] scalars named by `Mode.names`
    arrays: dict  # name -> array


def _pad_to(a: np.ndarray, shape, fill) -> np.ndarray:
    out = np.full(shape, fill, np.float32)
    out[tuple(slice(0, s) for s in a.shape)] = a
    return out


def _planes(coef: np.ndarray) -> np.ndarray:
    """[Ncell, ..., 4] -> [..., 4, Ncell]: one contiguous row per (series, coefficient), for 1-D gathers."""
    return np.ascontiguousarray(np.moveaxis(coef, 0, -1))


def stack_groups(groups: list[Group]) -> tuple[list[GroupTables], list[str]]:
    """Per-group arrays (`group_arrays`), padded to common shapes: grids with _BIG (never counted), cells
    and batch columns by repeating the last one."""
    per = [group_arrays(g) for g in groups]
    names = list(per[0]["scal"])
    keys = [k for k in per[0] if k != "scal"]
    for a in per:
        for k in ("dec_coef", "pre_coef"):  # [Nc, Nb, 4]: at least 2 batch columns, the last repeated
            v = a[k]
            if v.shape[1] < 2:
                a[k] = np.concatenate([v, v[:, -1:]], 1)
        for k in ("dec_bx0", "pre_bx0"):
            if a[k].size == 0:
                a[k] = np.zeros(1, np.float32)
        for k in ("dec_bdx", "pre_bdx"):
            if a[k].size == 0:
                a[k] = np.ones(1, np.float32)
    shapes = {k: tuple(max(np.shape(a[k])[i] for a in per) for i in range(np.ndim(per[0][k]))) for k in keys}
    out = []
    for a in per:
        arrs = {}
        for k in keys:
            v = np.asarray(a[k], np.float32)
            if k.endswith(("_int", "_bint")):
                v = _pad_to(v, shapes[k], _BIG)
            else:  # cells / batch columns: repeat the last (never selected, or equal to the last real one)
                for ax, n in enumerate(shapes[k]):
                    if v.shape[ax] < n:
                        last = np.take(v, [-1], axis=ax) if v.shape[ax] else np.zeros_like(np.take(v, [0], axis=ax))
                        v = np.concatenate([v] + [last] * (n - v.shape[ax]), axis=ax)
            if k.endswith("_coef"):
                v = _planes(v)
            arrs[k] = v
        out.append(GroupTables(np.asarray([float(a["scal"][n]) for n in names], np.float32), arrs))
    return out, names


# ---------------------------------------------------------------- the fast step function
# XLA on CPU vectorizes elementwise loops over the configuration axis well and small per-configuration vectors
# badly, so the evaluation below is written on scalars per configuration: unrolled comparisons find cells,
# 1-D gathers read coefficients.

def _cell(xc, interior):
    """Index of the cell holding xc: the number of interior grid nodes <= xc (padding never counts)."""
    c = jnp.zeros(jnp.shape(xc), jnp.int32)
    for j in range(interior.shape[0]):
        c = c + (interior[j] <= xc).astype(jnp.int32)
    return c


def _herm(xq, lo, hi, interior, x0, dxi, planes, slope_hi, slope_lo=0.0):
    """Monotone cubic interpolation as `interp.interp_work_axis`, from precomputed cells.  ``planes``
    [S..., 4, Ncell] holds S series on the same grid; returns a list (flattened S) of values."""
    xc = jnp.clip(xq, lo, hi)
    cell = _cell(xc, interior)
    t = (xc - x0[cell]) * dxi[cell]
    ext = slope_hi * jnp.maximum(xq - hi, 0.0) + slope_lo * jnp.minimum(xq - lo, 0.0)
    flat = planes.reshape(-1, 4, planes.shape[-1])
    return [c[0][cell] + t * (c[1][cell] + t * (c[2][cell] + t * c[3][cell])) + ext for c in flat]


def _attn(T, S, kind, batch, length, slope_hi, slope_lo=0.0):
    """`tables.attn_table_us` for the group's head layout."""
    b = jnp.clip(batch, 1.0, S(f"{kind}_bmax"))
    length = length * (batch / b) ** (1.0 / slope_hi)
    rows = _herm(jnp.log(length), S(f"{kind}_lo"), S(f"{kind}_hi"), T[f"{kind}_int"], T[f"{kind}_x0"],
                 T[f"{kind}_dxi"], T[f"{kind}_coef"], slope_hi, slope_lo)  # Nb values
    vals = [rows[0]]
    for r in rows[1:]:
        vals.append(jnp.maximum(vals[-1], r))  # running max over batch sizes
    lb = jnp.clip(jnp.log(b), S(f"{kind}_blo"), S(f"{kind}_bhi"))
    j = _cell(lb, T[f"{kind}_bint"])
    v0 = vals[0]
    v1 = vals[1]
    for i in range(1, len(vals) - 1):
        v0 = jnp.where(j == i, vals[i], v0)
        v1 = jnp.where(j == i, vals[i + 1], v1)
    bx0, bdx = T[f"{kind}_bx0"][j], T[f"{kind}_bdx"][j]
    return jnp.exp(v0 + (lb - bx0) / bdx * (v1 - v0))


@dataclass(frozen=True)
class Mode:
    """Static choices of one compiled sweep function."""

    decode_total: bool  # batch gives decode_keys (else decode_ctx per request)
    prefill_total: bool  # batch gives prefill_tokens, prefill_pairs (else prefill_new, prefill_cached)
    names: tuple  # scalar names (GroupTables.scal)


def _features(mode: Mode, T: dict, S, b0, b1, b2, b3, b4) -> dict:
    """`step.features` of one configuration from its batch summary (scalars; GEMM values per GEMM)."""
    d = ops.Dims(*(S("d_" + f) for f in ops.Dims._fields))
    hw = kernels.Hardware(*(S("hw_" + f) for f in kernels.Hardware._fields))
    n_dec, n_pre = b0, b2
    keys = b1 if mode.decode_total else n_dec * ops.decode_keys(d, b1)
    if mode.prefill_total:
        new_total, pairs = b3, b4
    else:
        new_total, pairs = n_pre * b3, n_pre * ops.prefill_pairs_tiled(d, b3, b4)
    tokens = new_total + n_dec
    sampled = n_pre + n_dec
    out = {"tokens": tokens, "n_prefill": n_pre, "n_decode": n_dec}
    # GEMMs: one cubic per GEMM on its precomputed (log m)-series
    layer = _herm(jnp.log(tokens), S("m_lo"), S("m_hi"), T["m_int"], T["m_x0"], T["m_dxi"], T["gemm_coef"], 1.0)
    head = _herm(jnp.log(sampled), S("m_lo"), S("m_hi"), T["m_int"], T["m_x0"], T["m_dxi"], T["head_coef"], 1.0)
    for i, v in enumerate(layer + head):
        g = ops.Gemm(sampled if i == 4 else tokens, S(f"k{i}"), S(f"n{i}"))
        out[f"table_us{i}"] = jnp.exp(v)
        out[f"flops{i}"] = ops.gemm_flops(g)
        out[f"bytes{i}"] = ops.gemm_bytes(g, d.weight_bytes)
        out[f"roof{i}"] = kernels.smooth_max(out[f"flops{i}"] / hw.table_peak_flops, ops.gemm_bytes(
            g, S("table_weight_bytes")) / hw.hbm_bytes_per_s) * 1e6
    # attention (`kernels.attn_*_table_us`)
    nd = jnp.maximum(n_dec, 1.0)
    t_dec = _attn(T, S, "dec", nd, jnp.maximum(keys / nd, 1.0) * S("dec_scale"), 1.0)
    out["attn_decode_us"] = jnp.where(n_dec > 0, t_dec, 0.0)
    npf = jnp.maximum(n_pre, 1.0)
    seq = jnp.sqrt(2.0 * jnp.maximum(pairs / npf, 0.5))
    t_pre = _attn(T, S, "pre", npf, seq * S("pre_scale"), 2.0, kernels.PREFILL_SLOPE_LO)
    out["attn_prefill_us"] = jnp.where(n_pre > 0, t_pre, 0.0)
    msg = ops.allreduce_bytes(d, tokens)
    t_comm, = _herm(jnp.log(msg), S("comm_lo"), S("comm_hi"), T["comm_int"], T["comm_x0"], T["comm_dxi"],
                    T["comm_coef"], 1.0)
    out["comm_table_us"] = jnp.where((d.tp > 1.0) & (S("comm_table") > 0), jnp.exp(t_comm), 0.0)
    out["comm_bytes"] = msg
    out["memory_bytes"] = sum(ops.memory_ops_bytes(d, tokens).values())
    out["head_bytes"] = ops.embedding_bytes(d, tokens) + ops.sampling_bytes(d, sampled)
    return out


def fast_chunk(mode: Mode, static: Static, T: dict, scal, b0, b1, b2, b3, b4):
    """Step times of a chunk of configurations of one group: [8, C] = total and `BREAKDOWN` (µs)."""
    idx = {n: i for i, n in enumerate(mode.names)}

    def S(name):
        return scal[idx[name]]

    f = jax.vmap(lambda *b: _features(mode, T, S, *b))(b0, b1, b2, b3, b4)
    gemm = kernels.GemmFeatures(*(jnp.stack([f[f"{n}{i}"] for i in range(5)]) for n in ("table_us", "flops", "bytes",
                                                                                          "roof")))  # [5, C]
    feats = Features(**{k: (gemm if k == "gemm" else S("attn_floor") if k == "attn_floor_us" else f[k])
                        for k in Features._fields})
    axes = Features(**{k: (kernels.GemmFeatures(1, 1, 1, 1) if k == "gemm" else None if k == "attn_floor_us" else 0)
                       for k in Features._fields})
    d = ops.Dims(*(S("d_" + n) for n in ops.Dims._fields))
    hw = kernels.Hardware(*(S("hw_" + n) for n in kernels.Hardware._fields))
    p = Params(*(S("p_" + n) for n in Params._fields))
    zero = jnp.float32(0)
    layout = Layout(d, hw, jnp.int32(0), zero, jnp.int32(0), zero)
    total, parts = jax.vmap(lambda x: combine(x, layout, p, static), in_axes=(axes,))(feats)
    ok = (b0 + b2) > 0
    return jnp.stack([jnp.where(ok, v, jnp.nan) for v in [total] + [parts[k] for k in BREAKDOWN]])


@functools.lru_cache(maxsize=None)
def _compiled(mode: Mode, static: Static, n_devices: int):
    """jit(fast_chunk); with several devices the configuration axis is sharded over them.
    Returns (fn, replicated sharding, sharded sharding) (shardings None on one device)."""
    fn = functools.partial(fast_chunk, mode, static)
    if n_devices <= 1:
        return jax.jit(fn), None, None
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.asarray(jax.local_devices()[:n_devices]), ("c",))
    rep, sh = NamedSharding(mesh, P()), NamedSharding(mesh, P("c"))
    return (jax.jit(fn, in_shardings=(rep, rep) + (sh,) * 5, out_shardings=NamedSharding(mesh, P(None, "c"))),
            rep, sh)


# ---------------------------------------------------------------- groups

class _Resolver:
    """Loads models, tables and calibrations once and builds `Group`s."""

    def __init__(self, model_configs=None, bench_data=None, allow_other_gpu=False):
        self.model_configs, self.bench_data, self.allow_other_gpu = model_configs, bench_data, allow_other_gpu
        self._tables, self._models = {}, {}

    def model(self, name, dtype=None) -> ModelConfig:
        key = (str(name), dtype)
        if key not in self._models:
            m = load_model(str(name), self.model_configs)
            self._models[key] = m.with_dtype(dtype) if dtype else m
        return self._models[key]

    def group(self, key: tuple) -> Group:
        model, gpu, tp, cal, dtype = key
        if isinstance(tp, bool) or not float(tp).is_integer() or int(tp) < 1:
            raise InputError(f"must be a positive integer, got {tp!r}", field="tp")
        g = get_gpu(gpu)
        if g.name not in self._tables:
            self._tables[g.name] = tables_mod.load_tables(self.bench_data, g)
        m = self.model(model, normalize_dtype(dtype) if dtype else None)
        su = setup(m, self._tables[g.name], int(tp))
        from .fit import resolve_calibration
        params, desc = resolve_calibration(str(cal), [g.name], allow_other_gpu=self.allow_other_gpu)
        return Group(key, su, params.get(g.name, Params()), desc)


def _norm_key(model, gpu, tp, cal, dtype) -> tuple:
    dtype = None if dtype is None or (isinstance(dtype, float) and math.isnan(dtype)) else str(dtype)
    return (str(model), str(gpu), int(tp), str(cal), dtype)


# ---------------------------------------------------------------- spaces

def _axis_values(name, v) -> list:
    """An axis: a scalar, a list, or {"range": [start, stop, step]} (stop excluded), {"linspace": [a, b, n]},
    {"geomspace": [a, b, n]} (rounded to integers, duplicates dropped) for the batch axes."""
    if isinstance(v, dict):
        if len(v) != 1:
            raise InputError(f"an axis spec has one key (range, linspace or geomspace), got {sorted(v)}",
                             field=name)
        (kind, a), = v.items()
        if kind not in ("range", "linspace", "geomspace") or not isinstance(a, (list, tuple)):
            raise InputError(f"unknown axis spec {v!r} (range: [start, stop, step], linspace/geomspace: "
                             f"[start, stop, num])", field=name)
        try:
            if kind == "range":
                out = np.arange(*a).tolist()
            elif kind == "linspace":
                out = np.linspace(a[0], a[1], int(a[2])).tolist()
            else:
                out = sorted(set(np.rint(np.geomspace(a[0], a[1], int(a[2]))).astype(np.int64).tolist()))
        except (TypeError, ValueError, IndexError) as e:
            raise InputError(f"bad axis spec {v!r}: {e}", field=name) from None
    elif isinstance(v, (list, tuple, range, np.ndarray, pd.Index, pd.Series)):
        out = list(v)
    else:
        out = [v]
    if not out:
        raise InputError("an axis needs at least one value", field=name)
    return out


def _batch_mode(cols) -> tuple[bool, bool]:
    cols = set(cols)
    if "decode_ctx" in cols and "decode_keys" in cols:
        raise InputError("give decode_ctx (per request) or decode_keys (total), not both", field="decode_keys")
    if cols & {"prefill_new", "prefill_cached"} and cols & {"prefill_tokens", "prefill_pairs"}:
        raise InputError("give prefill_new/prefill_cached (per chunk) or prefill_tokens/prefill_pairs (totals), "
                         "not both", field="prefill_tokens")
    if ("prefill_tokens" in cols) != ("prefill_pairs" in cols):
        raise InputError("prefill_tokens and prefill_pairs go together", field="prefill_pairs")
    return "decode_keys" in cols, "prefill_tokens" in cols


def _batch_inputs(cols: dict, decode_total: bool, prefill_total: bool, n: int) -> list[np.ndarray]:
    def col(name):
        v = cols.get(name)
        return np.zeros(n, np.float32) if v is None else np.asarray(v, np.float32)
    return [col("n_decode"), col("decode_keys" if decode_total else "decode_ctx"), col("n_prefill"),
            col("prefill_tokens" if prefill_total else "prefill_new"),
            col("prefill_pairs" if prefill_total else "prefill_cached")]


def _check_batch(b: list[np.ndarray], prefill_total: bool, first_id: int):
    names = ("n_decode", "decode", "n_prefill", "prefill_tokens" if prefill_total else "prefill_new",
             "prefill_pairs" if prefill_total else "prefill_cached")
    for name, a in zip(names, b):
        bad = ~np.isfinite(a) | (a < 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise InputError(f"must be a finite number >= 0, got {a[i]!r}", f"configuration {first_id + i}", name)
    need = (b[2] > 0) & (b[3] < (b[2] if prefill_total else 1))
    if need.any():
        i = int(np.argmax(need))
        raise InputError("a prefill chunk computes at least one new token", f"configuration {first_id + i}",
                         "prefill_tokens" if prefill_total else "prefill_new")


class Space:
    """A sweep space: ``n`` configurations, their groups, and how to produce rows [start, stop)."""

    n: int
    group_keys: list[tuple]
    decode_total: bool
    prefill_total: bool

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, list[np.ndarray], dict]:
        """(group index [k] int32, the 5 batch inputs [k] float32, output columns {name: array})."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError


class AxesSpace(Space):
    """The Cartesian product of named axes; group axes vary slowest, then batch axes in the given order."""

    def __init__(self, axes: dict):
        unknown = set(axes) - set(GROUP_AXES) - set(BATCH_COLUMNS)
        if unknown:
            raise InputError(f"unknown axis {sorted(unknown)} (group axes: {', '.join(GROUP_AXES)}; batch axes: "
                             f"{', '.join(BATCH_COLUMNS)})", field="axes")
        for k in ("model", "gpu"):
            if k not in axes:
                raise InputError("missing required axis", field=k)
        self.group_axes = [(k, _axis_values(k, axes.get(k, GROUP_DEFAULTS.get(k)))) for k in GROUP_AXES]
        self.batch_axes = [(k, np.asarray(_axis_values(k, v), np.float64)) for k, v in axes.items()
                           if k in BATCH_COLUMNS]
        if not self.batch_axes:
            raise InputError("no batch axis (n_decode, decode_ctx, n_prefill, prefill_new, ...)", field="axes")
        self.decode_total, self.prefill_total = _batch_mode([k for k, _ in self.batch_axes])
        self.gshape = tuple(len(v) for _, v in self.group_axes)
        self.bshape = tuple(len(v) for _, v in self.batch_axes)
        self.n = int(np.prod(self.gshape + self.bshape, dtype=np.int64))
        self.group_keys = [_norm_key(*(vals[i] for (_, vals), i in zip(self.group_axes, ix)))
                           for ix in np.ndindex(*self.gshape)]
        # validate whole axes up front (cheap): each batch combination is checked per chunk too
        for k, v in self.batch_axes:
            if (~np.isfinite(v) | (v < 0)).any():
                raise InputError(f"must be finite numbers >= 0, got {v.tolist()}", field=k)
        self._axes = axes

    def rows(self, start, stop):
        idx = np.arange(start, stop, dtype=np.int64)
        digits = np.unravel_index(idx, self.gshape + self.bshape)
        ng = len(self.gshape)
        g = np.ravel_multi_index(digits[:ng], self.gshape).astype(np.int32) if ng else np.zeros(len(idx), np.int32)
        cols = {"config_id": idx}
        for (k, vals), dgt in zip(self.group_axes, digits[:ng]):
            if k == "tp":
                cols[k] = np.asarray(vals, np.int32)[dgt]
            else:
                cats = [("" if v is None else str(v)) for v in vals]
                cols[k] = pd.Categorical.from_codes(dgt, categories=pd.Index(cats).unique()) \
                    if len(set(cats)) == len(cats) else np.asarray(cats, object)[dgt]
        bcols = {}
        for (k, vals), dgt in zip(self.batch_axes, digits[ng:]):
            bcols[k] = vals[dgt]
            cols[k] = (vals.astype(np.int64) if np.all(vals == np.rint(vals)) else vals.astype(np.float32))[dgt]
        return g, _batch_inputs(bcols, self.decode_total, self.prefill_total, len(idx)), cols

    def fingerprint(self):
        return json.dumps({"axes": {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                    for k, v in [(k, _axis_values(k, v)) for k, v in self._axes.items()]}},
                          sort_keys=True, default=str)


def summarize_steps(steps: list, model: ModelConfig | str, model_configs=None) -> dict[str, np.ndarray]:
    """Exact batch summaries of steps in the record schema for ``model`` (its sliding window, if any):
    n_decode, decode_keys (sum of min(ctx + 1, window)), n_prefill, prefill_tokens, prefill_pairs
    (sum of `ops.prefill_pairs_tiled`), float32 arrays, one value per step."""
    m = load_model(model, model_configs) if isinstance(model, str) else model
    d = ops.dims(m, 1)  # pairs and keys do not depend on TP
    n = len(steps)
    pn, pc, po, dc, do = [], [], [], [], []
    for i, s in enumerate(steps):
        pre, dec = validate_step(s, f"step {i}")
        for new, cached in pre:
            pn.append(new)
            pc.append(cached)
            po.append(i)
        dc += dec
        do += [i] * len(dec)
    po, do = np.asarray(po, np.int64), np.asarray(do, np.int64)
    pairs = np.asarray(ops.prefill_pairs_tiled(d, jnp.asarray(pn, jnp.float32), jnp.asarray(pc, jnp.float32)))
    keys = np.asarray(ops.decode_keys(d, jnp.asarray(dc, jnp.float32)))
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return {"n_decode": f32(np.bincount(do, minlength=n)), "decode_keys": f32(np.bincount(do, keys, n)),
            "n_prefill": f32(np.bincount(po, minlength=n)),
            "prefill_tokens": f32(np.bincount(po, np.asarray(pn, np.float64), n)),
            "prefill_pairs": f32(np.bincount(po, pairs.astype(np.float64), n))}


class FrameSpace(Space):
    """A table of configurations (one row each), group columns taken from ``defaults`` where absent."""

    def __init__(self, df: pd.DataFrame, defaults: dict | None = None, model_configs=None):
        defaults = {**GROUP_DEFAULTS, **(defaults or {})}
        for k in ("model", "gpu"):
            if k not in df.columns and k not in defaults:
                raise InputError("missing column (or pass it as a default)", field=k)
        self.df = df.reset_index(drop=True)
        self.n = len(self.df)
        self.per_request = "step" in self.df.columns
        batch = [c for c in self.df.columns if c in BATCH_COLUMNS]
        if self.per_request:
            if batch:
                raise InputError(f"a 'step' column replaces the batch columns {batch}", field="step")
            self.decode_total = self.prefill_total = True
        else:
            if not batch:
                raise InputError(f"no batch column (one of {', '.join(BATCH_COLUMNS)} or 'step')", field="columns")
            self.decode_total, self.prefill_total = _batch_mode(batch)
        gcols = []
        for k in GROUP_AXES:
            if k in self.df.columns:
                gcols.append(self.df[k].astype(object).where(self.df[k].notna(), None))
            else:
                gcols.append(pd.Series([defaults.get(k)] * self.n, dtype=object))
        keys = pd.Series(list(zip(*[c.tolist() for c in gcols])), dtype=object) if self.n else pd.Series([], dtype=object)
        codes, uniq = pd.factorize(keys)
        self.codes = codes.astype(np.int32)
        self.group_keys = [_norm_key(*k) for k in uniq]
        self.model_configs = model_configs
        self._defaults = {k: v for k, v in defaults.items()}

    def rows(self, start, stop):
        part = self.df.iloc[start:stop]
        g = self.codes[start:stop]
        k = stop - start
        if self.per_request:
            s = {c: np.zeros(k, np.float32) for c in ("n_decode", "decode_keys", "n_prefill", "prefill_tokens",
                                                        "prefill_pairs")}
            steps = part["step"].tolist()
            for gi in np.unique(g):
                sel = np.nonzero(g == gi)[0]
                summ = summarize_steps([steps[i] for i in sel], self._model(gi), self.model_configs)
                for c in s:
                    s[c][sel] = summ[c]
            b = _batch_inputs(s, True, True, k)
        else:
            b = _batch_inputs({c: part[c].to_numpy(np.float64) for c in part.columns if c in BATCH_COLUMNS},
                              self.decode_total, self.prefill_total, k)
        cols = {"config_id": np.arange(start, stop, dtype=np.int64)}
        for c in part.columns:
            if c != "step":
                cols[c] = part[c].to_numpy()
        return g, b, cols

    def _model(self, gi):
        model, _, _, _, dtype = self.group_keys[gi]
        m = load_model(model, self.model_configs)
        return m.with_dtype(dtype) if dtype else m

    def fingerprint(self):
        h = hashlib.sha256()
        df = self.df.copy()
        if self.per_request:
            df["step"] = df["step"].map(lambda s: json.dumps(s, sort_keys=True))
        h.update(pd.util.hash_pandas_object(df.astype(str), index=True).to_numpy().tobytes())
        h.update(json.dumps(list(df.columns)).encode())
        return json.dumps({"frame": h.hexdigest(), "defaults": self._defaults}, sort_keys=True, default=str)


def make_space(space, defaults: dict | None = None, model_configs=None) -> Space:
    if isinstance(space, Space):
        return space
    if isinstance(space, pd.DataFrame):
        return FrameSpace(space, defaults, model_configs)
    if isinstance(space, dict):
        return AxesSpace({**(defaults or {}), **space})
    raise InputError(f"a sweep space is a dict of axes or a DataFrame, got {type(space).__name__}")


# ---------------------------------------------------------------- running

DEFAULT_CALL = 1 << 16  # configurations per kernel call (cache-sized intermediates)


class Evaluator:
    """Compiled fast evaluation of a space's groups.  `submit(g, batch)` dispatches rows of any groups
    (asynchronously, in calls of ``call_size`` rows of one group each, sharded over ``devices`` local
    devices); `fetch(handle)` returns [8, k]: ``step_us`` and the `BREAKDOWN` (µs)."""

    def __init__(self, space: Space, call_size: int = DEFAULT_CALL, model_configs=None, bench_data=None,
                 allow_other_gpu=False, devices: int | None = None):
        res = _Resolver(model_configs, bench_data, allow_other_gpu)
        self.groups = [res.group(k) for k in space.group_keys]
        tabs, names = stack_groups(self.groups)
        self.mode = Mode(space.decode_total, space.prefill_total, tuple(names))
        n_local = len(jax.local_devices())
        n_dev = n_local if devices is None else max(1, min(int(devices), n_local))
        self.n_devices = n_dev
        self.call_size = int(math.ceil(max(int(call_size), 1) / n_dev) * n_dev)
        self._fns, self.tables = [], []
        for gr, t in zip(self.groups, tabs):
            fn, rep, sh = _compiled(self.mode, gr.setup.static, n_dev)
            self._fns.append(fn)
            self._sh = sh
            self.tables.append(jax.device_put((t.arrays, t.scal), rep) if rep is not None
                               else jax.device_put((t.arrays, t.scal)))

    def _pad(self, a: np.ndarray, fill):
        if a.shape[0] == self.call_size:
            return a
        out = np.full(self.call_size, fill, a.dtype)
        out[:a.shape[0]] = a
        return out

    def submit(self, g: np.ndarray, batch: list[np.ndarray]):
        g = np.asarray(g)
        k = g.shape[0]
        batch = [np.asarray(b, np.float32) for b in batch]
        calls = []
        groups = np.unique(g) if k else []
        for gi in groups:
            sel = None if len(groups) == 1 else np.nonzero(g == gi)[0]
            n = k if sel is None else len(sel)
            for lo in range(0, n, self.call_size):
                hi = min(n, lo + self.call_size)
                rows = slice(lo, hi) if sel is None else sel[lo:hi]
                ins = [self._pad(b[rows], 1.0) for b in batch]
                if self._sh is not None:
                    ins = [jax.device_put(a, self._sh) for a in ins]
                arrays, scal = self.tables[gi]
                calls.append((rows, hi - lo, self._fns[gi](arrays, scal, *ins)))
        return k, calls

    def fetch(self, handle) -> np.ndarray:
        k, calls = handle
        out = np.empty((len(RESULT_COLUMNS), k), np.float32)
        for rows, n, res in calls:
            out[:, rows] = np.asarray(res)[:, :n]
        return out

    def __call__(self, g: np.ndarray, batch: list[np.ndarray]) -> np.ndarray:
        return self.fetch(self.submit(g, batch))


def _fmt_of(path: Path) -> str:
    suf = path.suffix.lower()
    if suf in (".parquet", ".pq"):
        return "parquet"
    if suf == ".csv":
        return "csv"
    raise InputError(f"output must end in .parquet or .csv, got {path.name!r}", field="out")


def _write_atomic(path: Path, write: Callable[[str], None]):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_frame(df: pd.DataFrame, path: Path, fmt: str):
    if fmt == "parquet":
        _write_atomic(path, lambda tmp: df.to_parquet(tmp, index=False))
    else:
        _write_atomic(path, lambda tmp: df.to_csv(tmp, index=False))


def _merge(parts: list[Path], out: Path, fmt: str):
    """Concatenate chunk files into ``out`` (streamed: one chunk in memory at a time), atomically."""
    def write(tmp):
        if fmt == "csv":
            with open(tmp, "wb") as fo:
                for i, p in enumerate(parts):
                    with open(p, "rb") as fi:
                        if i:
                            fi.readline()  # header once
                        shutil.copyfileobj(fi, fo, 1 << 20)
            return
        import pyarrow.parquet as pq
        writer = None
        try:
            for p in parts:
                t = pq.read_table(p)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, t.schema)
                elif t.schema != writer.schema:
                    t = t.cast(writer.schema)
                writer.write_table(t)
        finally:
            if writer is not None:
                writer.close()
    _write_atomic(out, write)


def shard_path(out: str | Path, process_index: int, process_count: int) -> Path:
    """The file one process of a split sweep writes: ``results.parquet`` -> ``results.p0-of-2.parquet``."""
    out = Path(out)
    if process_count <= 1:
        return out
    return out.with_name(f"{out.stem}.p{process_index}-of-{process_count}{out.suffix}")


def merge_shards(out: str | Path, process_count: int) -> Path:
    """Merge the files of a sweep split over ``process_count`` processes into ``out``, rows in
    configuration order (each shard is sorted; chunks were dealt round-robin)."""
    out = Path(out)
    fmt = _fmt_of(out)
    shards = [shard_path(out, i, process_count) for i in range(process_count)]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise InputError(f"missing shard file(s) {missing}", field="out")
    read = pd.read_parquet if fmt == "parquet" else pd.read_csv
    df = pd.concat([read(s) for s in shards], ignore_index=True).sort_values("config_id", kind="stable")
    _write_frame(df.reset_index(drop=True), out, fmt)
    return out


class _Progress:
    def __init__(self, total: int, enabled: bool, stream=None):
        self.total, self.enabled, self.done, self.t0 = total, enabled, 0, time.perf_counter()
        self.stream = stream or sys.stderr

    def update(self, n: int, skipped: bool = False):
        self.done += n
        if not self.enabled:
            return
        el = time.perf_counter() - self.t0
        frac = self.done / max(self.total, 1)
        bar = "#" * int(30 * frac)
        eta = el / frac - el if frac > 0 else 0.0
        self.stream.write(f"\rsweep [{bar:<30}] {self.done:,}/{self.total:,} configs "
                          f"{self.done / max(el, 1e-9) / 1e6:.1f} M/s ETA {eta:.0f}s" + (" (resumed)" if skipped else ""))
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class SweepInfo:
    """What a sweep did (returned in ``df.attrs['sweep']`` and by `run`)."""

    n_configs: int
    chunk_size: int
    chunks: list  # chunk indices of this process
    computed: list  # chunk indices evaluated in this run (the others were resumed from files)
    seconds: float
    out: str | None
    devices: int


def sweep(space, out: str | Path | None = None, *, chunk_size: int = DEFAULT_CHUNK, defaults: dict | None = None,
          model_configs=None, bench_data=None, allow_other_gpu: bool = False, progress: bool = False,
          process_index: int | None = None, process_count: int | None = None, keep_parts: bool = False,
          return_df: bool = True, devices: int | None = None,
          on_chunk: Callable[[int], None] | None = None) -> pd.DataFrame | None:
    """Evaluate every configuration of ``space`` (dict of axes, DataFrame or `Space`).

    Returns a DataFrame: the configuration columns, ``config_id`` (row of the space), ``step_us`` and the
    breakdown columns `step.BREAKDOWN` (µs, float32); a configuration with no request gives NaN.  With
    ``out`` (``.parquet`` or ``.csv``) chunks are written to ``OUT.parts/`` as they finish and merged into
    ``out`` at the end; a rerun with the same space and options resumes from the chunk files.  With
    ``process_count`` > 1 this process evaluates chunks ``k`` with ``k % process_count == process_index``
    and writes `shard_path` (merge with `merge_shards`); by default both come from ``jax.process_index()``
    / ``jax.process_count()`` (one file per host under ``jax.distributed``).  ``on_chunk(k)`` is called
    after chunk k is stored.  ``devices``: how many local devices to shard each chunk over (default all).
    """
    sp = make_space(space, defaults, model_configs)
    info = run(sp, out, chunk_size=chunk_size, model_configs=model_configs, bench_data=bench_data,
               allow_other_gpu=allow_other_gpu, progress=progress, process_index=process_index,
               process_count=process_count, keep_parts=keep_parts, devices=devices, on_chunk=on_chunk,
               collect=return_df and out is None)
    if not return_df:
        return None
    if out is None:
        df = info.pop("frame")
    else:
        path = Path(info["info"].out)
        df = pd.read_parquet(path) if _fmt_of(path) == "parquet" else pd.read_csv(path)
    df.attrs["sweep"] = info["info"]
    return df


def run(sp: Space, out=None, *, chunk_size=DEFAULT_CHUNK, model_configs=None, bench_data=None,
        allow_other_gpu=False, progress=False, process_index=None, process_count=None, keep_parts=False,
        devices=None, on_chunk=None, collect=False, call_size=DEFAULT_CALL) -> dict:
    """The chunk loop behind `sweep`; returns {"info": SweepInfo[, "frame": DataFrame]}."""
    t0 = time.perf_counter()
    if process_count is None:
        process_count = jax.process_count()
    if process_index is None:
        process_index = jax.process_index() if process_count == jax.process_count() else 0
    if not (0 <= process_index < process_count):
        raise InputError(f"process_index {process_index} not in [0, {process_count})", field="process_index")
    C = max(int(chunk_size), 1)
    ev = Evaluator(sp, min(call_size, C), model_configs, bench_data, allow_other_gpu, devices)
    n_chunks = -(-sp.n // C)
    mine = [k for k in range(n_chunks) if k % process_count == process_index]
    target = parts_dir = fmt = None
    done: set[int] = set()
    if out is not None:
        target = shard_path(out, process_index, process_count)
        fmt = _fmt_of(target)
        parts_dir = target.with_name(target.name + ".parts")
        manifest = {"space": hashlib.sha256(sp.fingerprint().encode()).hexdigest(), "n": sp.n, "chunk_size": C,
                    "process": [process_index, process_count], "format": fmt,
                    "bench_data": str(bench_data), "model_configs": str(model_configs),
                    "allow_other_gpu": allow_other_gpu, "version": 1}
        mpath = parts_dir / "manifest.json"
        if parts_dir.is_dir():
            old = None
            try:
                old = json.loads(mpath.read_text())
            except (OSError, json.JSONDecodeError):
                pass
            if old != manifest:
                print(f"costmodel sweep: {parts_dir} is from another sweep; starting over", file=sys.stderr)
                shutil.rmtree(parts_dir)
        parts_dir.mkdir(parents=True, exist_ok=True)
        if not mpath.is_file():
            _write_atomic(mpath, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
        done = {k for k in mine if (parts_dir / f"chunk-{k:06d}.{fmt}").is_file()}
    frames, computed = [], []
    bar = _Progress(sum(min(C, sp.n - k * C) for k in mine), progress)
    pending = None  # (k, rows cols, device result): overlap the next chunk's input build with this one's compute

    def finish(k, cols, res):
        vals = ev.fetch(res)
        df = pd.DataFrame(cols)
        for i, name in enumerate(RESULT_COLUMNS):
            df[name] = vals[i]
        if parts_dir is not None:
            _write_frame(df, parts_dir / f"chunk-{k:06d}.{fmt}", fmt)
        if collect:
            frames.append(df)
        computed.append(k)
        bar.update(len(df))
        if on_chunk is not None:
            on_chunk(k)

    try:
        for k in mine:
            lo, hi = k * C, min(sp.n, (k + 1) * C)
            if k in done:
                if collect:
                    frames.append(pd.read_parquet(parts_dir / f"chunk-{k:06d}.{fmt}") if fmt == "parquet"
                                  else pd.read_csv(parts_dir / f"chunk-{k:06d}.{fmt}"))
                bar.update(hi - lo, skipped=True)
                continue
            g, b, cols = sp.rows(lo, hi)
            _check_batch(b, sp.prefill_total, lo)
            res = ev.submit(g, b)
            if pending is not None:
                finish(*pending)
            pending = (k, cols, res)
        if pending is not None:
            finish(*pending)
            pending = None
    finally:
        bar.close()
    if target is not None:
        files = [parts_dir / f"chunk-{k:06d}.{fmt}" for k in mine]
        if files:
            _merge(files, target, fmt)
        else:  # this process has no chunk: an empty file with the columns
            g, b, cols = sp.rows(0, 0)
            _write_frame(pd.DataFrame({**cols, **{c: np.zeros(0, np.float32) for c in RESULT_COLUMNS}}), target, fmt)
        if not keep_parts:
            shutil.rmtree(parts_dir, ignore_errors=True)
    info = SweepInfo(sp.n, C, mine, computed, time.perf_counter() - t0, None if target is None else str(target),
                     ev.n_devices)
    outd = {"info": info}
    if collect:
        if frames:
            outd["frame"] = pd.concat(frames, ignore_index=True)
        else:
            g, b, cols = sp.rows(0, 0)
            outd["frame"] = pd.DataFrame({**cols, **{c: np.zeros(0, np.float32) for c in RESULT_COLUMNS}})
    return outd
