"""Sweeps at scale: millions of step configurations per second in one jitted, vmapped function.

A *space* of configurations is either named axes (their Cartesian product) or a table (pandas DataFrame):

* group columns, fixed per (model, GPU, TP, calibration, dtype): ``model`` (packaged name or path), ``gpu``,
  ``tp`` (default 1), ``calibration`` (``none`` | ``default`` | PATH, default ``default`` as in
  ``costmodel predict``: the pooled parameters; ``default@0.15`` those fitted for vLLM 0.15), ``dtype``
  (default: the model config's);
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

The space is evaluated in fixed-size chunks (bounded memory; each kernel call's configuration axis sharded
over the local devices), results streamed to Parquet or CSV chunk files written atomically, so that an
interrupted sweep resumes at the missing chunks, and merged into one file at the end; a sweep may be split
over processes/hosts by chunk (``process_index``/``process_count``, `merge_shards`).

Each group is priced by the step model itself (`step.batch_features` and `step.combine` on the batch
summary `step.Batch`), with the group's kernel tables specialised to its fixed shapes once at setup
(`fastlookup.FastLookup`: per-GEMM cubics, per-token tables, resolved attention maxima, lookup-table cell
finders); tests compare sweeps with `step.step_time` to float32 precision.

    import costmodel.apps.sweep as sw
    df = sw.sweep({"model": "llama-3.1-8b", "gpu": "H100", "tp": [1, 2, 4, 8],
                   "n_decode": [1, 8, 64, 256], "decode_ctx": [1024, 8192]})
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .. import ops
from .. import tables as tables_mod
from ..calibration import resolve_calibration
from ..errors import InputError
from ..fastlookup import TOKEN_TABLE, FastLookup, common_shapes, specialise
from ..hardware import get_gpu
from ..io import atomic_write, write_frame, write_json
from ..model import ModelConfig, load_model, normalize_dtype
from ..params import Params
from ..step import (
    BREAKDOWN,
    Batch,
    ModelOnGPU,
    Setup,
    Static,
    batch_features,
    combine,
    decode_keys_of_means,
    pack_steps,
    prefill_of_means,
    setup,
    summarize,
)

GROUP_AXES = ("model", "gpu", "tp", "calibration", "dtype")
GROUP_DEFAULTS = {"tp": 1, "calibration": "default", "dtype": None}
BATCH_COLUMNS = ("n_decode", "decode_ctx", "decode_keys", "n_prefill", "prefill_new", "prefill_cached",
                 "prefill_tokens", "prefill_pairs")
RESULT_COLUMNS = ("step_us",) + BREAKDOWN
DEFAULT_CHUNK = 1 << 20


# ---------------------------------------------------------------- the fast step function

@dataclass
class Group:
    """One (model, GPU, TP, calibration, dtype) of a sweep."""

    key: tuple
    setup: Setup
    params: Params
    calibration: str  # description

    def lookup(self) -> FastLookup:
        a = self.setup.arrays
        return specialise(a.gemm, a.decode, a.prefill, a.comm, self.setup.on_gpu)


@dataclass(frozen=True)
class Mode:
    """How a sweep gives its batches (static per compiled function)."""

    decode_total: bool  # batch gives decode_keys (else decode_ctx per request)
    prefill_total: bool  # batch gives prefill_tokens, prefill_pairs (else prefill_new, prefill_cached)


def fast_chunk(mode: Mode, static: Static, lookup: FastLookup, on: ModelOnGPU, params: Params, b0, b1, b2, b3, b4):
    """Step times of a chunk of configurations of one group: a tuple (total, *`BREAKDOWN`) of [C] (µs);
    the batch columns b0..b4 are read as `Mode` says.  The step model itself (`step.batch_features`,
    `step.combine`), with the group's tables specialised (`fastlookup`)."""
    def one(n_dec, dec, n_pre, pre_a, pre_b):
        d = on.dims
        keys = dec if mode.decode_total else decode_keys_of_means(d, n_dec, dec)
        tokens, pairs = (pre_a, pre_b) if mode.prefill_total else prefill_of_means(d, n_pre, pre_a, pre_b)
        total, parts = combine(batch_features(lookup, on, Batch(n_dec, keys, n_pre, tokens, pairs), static),
                               on, params, static)
        return [total] + [parts[k] for k in BREAKDOWN]

    ok = (b0 + b2) > 0
    return tuple(jnp.where(ok, v, jnp.nan) for v in jax.vmap(one)(b0, b1, b2, b3, b4))


# XLA:CPU's YNNPACK fusion would take over the reduction in `combine` and everything after it, op by op
# (10x slower here); plain fused loops are used instead.
COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


class _Compiled:
    """fast_chunk compiled for one (mode, static, devices); with several devices the configuration axis is
    sharded over them (`jax.shard_map` on a 1-D mesh of the local devices), group tables replicated."""

    def __init__(self, mode: Mode, static: Static, n_devices: int):
        fn = functools.partial(fast_chunk, mode, static)
        self.rep = self.sh = None
        if n_devices > 1:
            from jax.sharding import Mesh, NamedSharding
            from jax.sharding import PartitionSpec as P
            mesh = Mesh(np.asarray(jax.local_devices()[:n_devices]), ("c",))
            self.rep, self.sh = NamedSharding(mesh, P()), NamedSharding(mesh, P("c"))
            fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(), P()) + (P("c"),) * 5, out_specs=P("c"))
            self.jit = jax.jit(fn, in_shardings=(self.rep,) * 3 + (self.sh,) * 5, out_shardings=self.sh)
        else:
            self.jit = jax.jit(fn)
        self._exe = {}

    def __call__(self, lookup, on, params, *b):
        leaves, tree = jax.tree_util.tree_flatten((lookup, on, params, b))
        key = (tree, tuple((np.shape(x), str(np.asarray(x).dtype) if not hasattr(x, "dtype") else str(x.dtype))
                           for x in leaves))
        if key not in self._exe:
            lowered = self.jit.lower(lookup, on, params, *b)
            try:
                self._exe[key] = lowered.compile(compiler_options=COMPILER_OPTIONS if _on_cpu() else None)
            except Exception:  # an XLA without the option: compile plainly
                self._exe[key] = lowered.compile()
        return self._exe[key](lookup, on, params, *b)


def _on_cpu() -> bool:
    return jax.local_devices()[0].platform == "cpu"


@functools.cache
def _compiled(mode: Mode, static: Static, n_devices: int) -> _Compiled:
    return _Compiled(mode, static, n_devices)


def _as_arrays(on: ModelOnGPU) -> ModelOnGPU:
    """A group's `ModelOnGPU` as float32/int32 scalars, so that every group shares one compilation."""
    return jax.tree_util.tree_map(lambda v: np.asarray(v, np.int32 if np.issubdtype(np.asarray(v).dtype, np.integer)
                                                       else np.float32), on)


# ---------------------------------------------------------------- groups

class _Resolver:
    """Loads models, tables and calibrations once and builds `Group`s."""

    def __init__(self, model_configs=None, bench_data=None, allow_other_gpu=False, tables=None):
        self.model_configs, self.bench_data, self.allow_other_gpu = model_configs, bench_data, allow_other_gpu
        self._tables, self._models = dict(tables or {}), {}

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
        params, desc = resolve_calibration(str(cal), [g.name], allow_other_gpu=self.allow_other_gpu,
                                           table_sources={g.name: self._tables[g.name].sources})
        cal = params.get(g.name)
        return Group(key, su, cal.pooled if cal else Params(), desc)


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
            if k == "dtype" and vals == [None]:
                continue
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


def _group_columns(group_keys: list[tuple], g: np.ndarray, skip=()) -> dict:
    """Output columns of the group axes (categoricals; tp as int32) for rows of groups ``g``; ``dtype``
    only where some group overrides it."""
    cols = {}
    for i, k in enumerate(GROUP_AXES):
        vals = [key[i] for key in group_keys]
        if k in skip or (k == "dtype" and all(v is None for v in vals)):
            continue
        if k == "tp":
            cols[k] = np.asarray(vals, np.int32)[g]
        else:
            codes, uniq = pd.factorize(pd.Index([("" if v is None else str(v)) for v in vals]))
            cols[k] = pd.Categorical.from_codes(codes[g], categories=uniq)
    return cols


def summarize_steps(steps: list, model: ModelConfig | str, model_configs=None) -> dict[str, np.ndarray]:
    """Exact batch summaries (`step.Batch`) of steps in the record schema for ``model`` (its sliding window,
    if any): float32 arrays, one value per step, named as the batch columns."""
    m = load_model(model, model_configs) if isinstance(model, str) else model
    d = ops.dims(m, 1)  # pairs and keys do not depend on TP
    if not steps:
        return {k: np.zeros(0, np.float32) for k in Batch._fields}
    b = _summarize_fn(pack_steps(steps), d)
    return {k: np.asarray(v, np.float32) for k, v in zip(Batch._fields, b)}


@jax.jit
def _summarize_fn(steps, d):
    return jax.vmap(summarize, in_axes=(None, 0))(d, steps)


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
        cols.update(_group_columns(self.group_keys, g, skip=set(part.columns)))
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


class ArraySpace(Space):
    """Configurations as arrays: ``groups`` (dicts with model, gpu[, tp, calibration, dtype]), the group of
    each configuration (``group_index``) and the batch columns (same length)."""

    def __init__(self, groups: list[dict], group_index, columns: dict):
        self.group_keys = [_norm_key(*({**GROUP_DEFAULTS, **gr}[k] for k in GROUP_AXES)) for gr in groups]
        self.g = np.asarray(group_index, np.int32)
        self.columns = {k: np.asarray(v) for k, v in columns.items()}
        unknown = set(self.columns) - set(BATCH_COLUMNS)
        if unknown:
            raise InputError(f"unknown batch column(s) {sorted(unknown)}", field="columns")
        self.n = len(self.g)
        if any(len(v) != self.n for v in self.columns.values()):
            raise InputError("group_index and every column need the same length", field="columns")
        if self.n and (self.g.min() < 0 or self.g.max() >= len(groups)):
            raise InputError("group_index out of range", field="group_index")
        self.decode_total, self.prefill_total = _batch_mode(self.columns)

    def rows(self, start, stop):
        g = self.g[start:stop]
        part = {k: v[start:stop] for k, v in self.columns.items()}
        cols = {"config_id": np.arange(start, stop, dtype=np.int64), **_group_columns(self.group_keys, g)}
        cols.update(part)
        return g, _batch_inputs(part, self.decode_total, self.prefill_total, stop - start), cols

    def fingerprint(self):
        h = hashlib.sha256(self.g.tobytes())
        for k in sorted(self.columns):
            h.update(k.encode())
            h.update(np.ascontiguousarray(self.columns[k]).tobytes())
        return json.dumps({"arrays": h.hexdigest(), "groups": self.group_keys}, default=str)


def make_space(space, defaults: dict | None = None, model_configs=None) -> Space:
    if isinstance(space, Space):
        return space
    if isinstance(space, pd.DataFrame):
        return FrameSpace(space, defaults, model_configs)
    if isinstance(space, dict):
        return AxesSpace({**(defaults or {}), **space})
    raise InputError(f"a sweep space is a dict of axes or a DataFrame, got {type(space).__name__}")


# ---------------------------------------------------------------- running

DEFAULT_CALL = 1 << 17  # configurations per kernel call (intermediates of 512 KiB: fastest on a 2-core CPU)


class Evaluator:
    """Compiled fast evaluation of a space's groups.  `submit(g, batch)` dispatches rows of any groups
    (asynchronously, in calls of ``call_size`` rows of one group each, sharded over ``devices`` local
    devices); `fetch(handle)` returns [8, k]: ``step_us`` and the `BREAKDOWN` (µs)."""

    def __init__(self, space: Space, call_size: int = DEFAULT_CALL, model_configs=None, bench_data=None,
                 allow_other_gpu=False, devices: int | None = None, tables: dict | None = None):
        res = _Resolver(model_configs, bench_data, allow_other_gpu, tables)
        self.groups = [res.group(k) for k in space.group_keys]
        self.mode = Mode(space.decode_total, space.prefill_total)
        n_local = len(jax.local_devices())
        n_dev = n_local if devices is None else max(1, min(int(devices), n_local))
        self.n_devices = n_dev
        self.call_size = int(math.ceil(max(int(call_size), 1) / n_dev) * n_dev)
        self.serial = _on_cpu()
        self._fns, self.tables = [], []
        self.calls = {False: 0, True: 0}  # kernel calls by path (True: per-token tables)
        for gr, lk in zip(self.groups, common_shapes([gr.lookup() for gr in self.groups])):
            fn = _compiled(self.mode, gr.setup.static, n_dev)
            self._fns.append(fn)
            self._sh = fn.sh
            rest = (_as_arrays(gr.setup.on_gpu), jax.tree_util.tree_map(np.float32, gr.params))
            self.tables.append({integral: jax.device_put((dataclasses.replace(lk, int_tokens=integral),) + rest, fn.rep)
                                for integral in (False, True)})

    def _pad(self, a: np.ndarray, fill):
        if a.shape[0] == self.call_size:
            return a
        out = np.full(self.call_size, fill, a.dtype)
        out[:a.shape[0]] = a
        return out

    def submit(self, g: np.ndarray, batch: list[np.ndarray]):
        """Dispatch rows (any groups; fastest when each group's rows are contiguous); returns a handle
        for `fetch`."""
        g = np.asarray(g)
        k = g.shape[0]
        batch = [np.asarray(b, np.float32) for b in batch]
        if k == 0:
            return 0, []
        cuts = np.flatnonzero(g[1:] != g[:-1]) + 1  # runs of one group
        if len(cuts) <= 64:
            segments = [(slice(lo, hi), int(g[lo])) for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), k])]
        else:  # interleaved groups: gather each group's rows
            segments = [(np.nonzero(g == gi)[0], int(gi)) for gi in np.unique(g)]
        calls = []
        for sel, gi in segments:
            n = sel.stop - sel.start if isinstance(sel, slice) else len(sel)
            for lo in range(0, n, self.call_size):
                hi = min(n, lo + self.call_size)
                rows = slice(sel.start + lo, sel.start + hi) if isinstance(sel, slice) else sel[lo:hi]
                part = [self._pad(b[rows], 1.0) for b in batch]
                ins = jax.device_put(part, self._sh)
                integral = self._integral(part)
                self.calls[integral] += 1
                res = self._fns[gi](*self.tables[gi][integral], *ins)
                if self.serial:  # one execution at a time: concurrent ones thrash the caches on CPU
                    jax.block_until_ready(res)
                else:  # start the device-to-host copies now, so they overlap later calls
                    for r in res:
                        r.copy_to_host_async()
                calls.append((rows, hi - lo, res))
        return k, calls

    def _integral(self, b: list[np.ndarray]) -> bool:
        """Whether every token count (and requests sampled) is an integer within the per-token tables."""
        tokens = (b[3] if self.mode.prefill_total else b[2] * b[3]) + b[0]
        with np.errstate(invalid="ignore"):
            return bool(tokens.max(initial=0) <= TOKEN_TABLE and (b[0] + b[2]).max(initial=0) <= TOKEN_TABLE
                        and np.array_equal(tokens, np.floor(tokens)) and np.array_equal(b[0], np.floor(b[0]))
                        and np.array_equal(b[2], np.floor(b[2])))

    def fetch_parts(self, handle):
        """Per dispatched call: (rows, [total, *breakdown] as numpy views of the results)."""
        return [(rows, [np.asarray(r)[:n] for r in res]) for rows, n, res in handle[1]]

    def fetch(self, handle) -> list[np.ndarray]:
        """[step_us, *BREAKDOWN], each a float32 array over the submitted rows."""
        k = handle[0]
        parts = self.fetch_parts(handle)
        if len(parts) == 1:
            return parts[0][1]
        if all(isinstance(rows, slice) for rows, _ in parts):  # one group, rows in order
            return [np.concatenate([v[i] for _, v in parts]) for i in range(len(RESULT_COLUMNS))]
        out = [np.empty(k, np.float32) for _ in RESULT_COLUMNS]
        for rows, vals in parts:
            for o, v in zip(out, vals):
                o[rows] = v
        return out

    def __call__(self, g: np.ndarray, batch: list[np.ndarray]) -> np.ndarray:
        """[8, k]: step_us and the breakdown."""
        return np.stack(self.fetch(self.submit(g, batch))) if len(g) else np.zeros((len(RESULT_COLUMNS), 0),
                                                                                      np.float32)


def _fmt_of(path: Path) -> str:
    suf = path.suffix.lower()
    if suf in (".parquet", ".pq"):
        return "parquet"
    if suf == ".csv":
        return "csv"
    raise InputError(f"output must end in .parquet or .csv, got {path.name!r}", field="out")


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
    atomic_write(out, write, mode="path")


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
    write_frame(out, df.reset_index(drop=True), fmt)
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
    calls: tuple = (0, 0)  # kernel calls (general path, per-token-table path)


def sweep(space, out: str | Path | None = None, *, chunk_size: int = DEFAULT_CHUNK, defaults: dict | None = None,
          model_configs=None, bench_data=None, allow_other_gpu: bool = False, progress: bool = False,
          process_index: int | None = None, process_count: int | None = None, keep_parts: bool = False,
          return_df: bool = True, devices: int | None = None, tables: dict | None = None,
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
    ``tables``: already loaded `tables.Tables` by GPU name (default: loaded from ``bench_data``).
    """
    sp = make_space(space, defaults, model_configs)
    info = run(sp, out, chunk_size=chunk_size, model_configs=model_configs, bench_data=bench_data,
               allow_other_gpu=allow_other_gpu, progress=progress, process_index=process_index,
               process_count=process_count, keep_parts=keep_parts, devices=devices, on_chunk=on_chunk,
               collect=return_df and out is None, tables=tables)
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
        devices=None, on_chunk=None, collect=False, call_size=DEFAULT_CALL, tables=None) -> dict:
    """The chunk loop behind `sweep`; returns {"info": SweepInfo[, "frame": DataFrame]}."""
    t0 = time.perf_counter()
    if process_count is None:
        process_count = jax.process_count()
    if process_index is None:
        process_index = jax.process_index() if process_count == jax.process_count() else 0
    if not (0 <= process_index < process_count):
        raise InputError(f"process_index {process_index} not in [0, {process_count})", field="process_index")
    C = max(int(chunk_size), 1)
    ev = Evaluator(sp, min(call_size, C), model_configs, bench_data, allow_other_gpu, devices, tables)
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
            write_json(mpath, manifest)
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
            write_frame(parts_dir / f"chunk-{k:06d}.{fmt}", df, fmt)
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
            write_frame(target, pd.DataFrame({**cols, **{c: np.zeros(0, np.float32) for c in RESULT_COLUMNS}}), fmt)
        if not keep_parts:
            shutil.rmtree(parts_dir, ignore_errors=True)
    info = SweepInfo(sp.n, C, mine, computed, time.perf_counter() - t0, None if target is None else str(target),
                     ev.n_devices, (ev.calls[False], ev.calls[True]))
    outd = {"info": info}
    if collect:
        if frames:
            outd["frame"] = pd.concat(frames, ignore_index=True)
        else:
            g, b, cols = sp.rows(0, 0)
            outd["frame"] = pd.DataFrame({**cols, **{c: np.zeros(0, np.float32) for c in RESULT_COLUMNS}})
    return outd


# ---------------------------------------------------------------- spec files and the command line

SPEC_KEYS = {"axes", "configs", "defaults", "chunk_size", "out", "model_configs", "bench_data", "allow_other_gpu"}


def load_spec(path: str | Path) -> dict:
    """Read a sweep spec (YAML or JSON): ``axes`` (named axes, their product) or ``configs`` (a CSV/Parquet
    table, one configuration per row; paths relative to the spec), optional ``defaults`` (group columns
    absent from the table or axes), ``chunk_size``, ``out``, ``model_configs``, ``bench_data``,
    ``allow_other_gpu``."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such spec file", str(path))
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            try:
                spec = yaml.safe_load(text)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
                raise InputError(f"malformed YAML: {getattr(e, 'problem', e)}", where) from None
        else:
            spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON: {e.msg}", f"{path}:{e.lineno}") from None
    if not isinstance(spec, dict):
        raise InputError("a sweep spec is a mapping", str(path))
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise InputError(f"unknown key(s) {sorted(unknown)} (known: {', '.join(sorted(SPEC_KEYS))})", str(path))
    if ("axes" in spec) == ("configs" in spec):
        raise InputError("give exactly one of 'axes' and 'configs'", str(path))
    for key in ("configs", "out", "model_configs", "bench_data"):
        if spec.get(key) is not None and not Path(str(spec[key])).is_absolute():
            spec[key] = str(path.parent / str(spec[key]))
    spec["_where"] = str(path)
    return spec


def space_from_spec(spec: dict) -> Space:
    where = spec.get("_where")
    try:
        if "axes" in spec:
            if not isinstance(spec["axes"], dict):
                raise InputError("'axes' must be a mapping of axis name to values", field="axes")
            return make_space(spec["axes"], spec.get("defaults"), spec.get("model_configs"))
        cfg = Path(spec["configs"])
        if not cfg.is_file():
            raise InputError("no such configs file", str(cfg), "configs")
        df = pd.read_parquet(cfg) if cfg.suffix.lower() in (".parquet", ".pq") else pd.read_csv(cfg)
        return make_space(df, spec.get("defaults"), spec.get("model_configs"))
    except InputError as e:
        if e.args and where and where not in str(e):
            raise InputError(str(e), where) from None
        raise


def add_sweep_arguments(parser) -> None:
    parser.add_argument("spec", help="sweep spec, YAML or JSON (axes or a configs table; see docs)")
    parser.add_argument("--out", default=None, help="results file, .parquet or .csv (default: the spec's 'out')")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help=f"configurations per chunk file (default: the spec's or {DEFAULT_CHUNK:,})")
    parser.add_argument("--model-configs", default=None, help="folder of <model>/config.json")
    parser.add_argument("--bench-data", default=None, help="kernel tables folder (default: the repo's bench_data/)")
    parser.add_argument("--allow-other-gpu", action="store_true", help="use a calibration fitted on another GPU")
    parser.add_argument("--process-index", type=int, default=None,
                        help="this process's share of a split sweep (default: jax.process_index())")
    parser.add_argument("--process-count", type=int, default=None,
                        help="processes the sweep is split over (default: jax.process_count())")
    parser.add_argument("--merge", action="store_true",
                        help="only merge the --process-count shard files of a split sweep into --out")
    parser.add_argument("--devices", type=int, default=None, help="local devices to shard over (default: all)")
    parser.add_argument("--keep-parts", action="store_true", help="keep the chunk files after merging")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction,
                        default=None, help="progress bar on stderr (default: when stderr is a terminal)")


def run_sweep(args) -> int:
    spec = load_spec(args.spec)
    out = args.out or spec.get("out")
    if not out:
        raise InputError("no output file: pass --out or set 'out' in the spec", args.spec, "out")
    _fmt_of(Path(out))
    if args.merge:
        if not args.process_count or args.process_count < 2:
            raise InputError("--merge needs --process-count N (N >= 2)", field="process_count")
        path = merge_shards(out, args.process_count)
        print(f"costmodel sweep: merged {args.process_count} shards into {path}")
        return 0
    sp = space_from_spec(spec)
    chunk = args.chunk_size or spec.get("chunk_size") or DEFAULT_CHUNK
    if int(chunk) < 1:
        raise InputError("must be a positive integer", args.spec, "chunk_size")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    stored = []
    try:
        r = run(sp, out, chunk_size=int(chunk), model_configs=args.model_configs or spec.get("model_configs"),
                bench_data=args.bench_data or spec.get("bench_data"),
                allow_other_gpu=args.allow_other_gpu or bool(spec.get("allow_other_gpu")), progress=progress,
                process_index=args.process_index, process_count=args.process_count, keep_parts=args.keep_parts,
                devices=args.devices, on_chunk=stored.append)
    except KeyboardInterrupt:
        print(f"costmodel sweep: interrupted; {len(stored)} chunk(s) stored this run; run the same command again "
              f"to resume", file=sys.stderr)
        return 130
    info = r["info"]
    n_mine = sum(min(info.chunk_size, info.n_configs - k * info.chunk_size) for k in info.chunks)
    resumed = len(info.chunks) - len(info.computed)
    print(f"costmodel sweep: {n_mine:,} of {info.n_configs:,} configurations ({len(sp.group_keys)} groups) in "
          f"{info.seconds:.1f} s ({n_mine / max(info.seconds, 1e-9):,.0f}/s incl. setup and writing); "
          f"chunks: {len(info.computed)} computed, {resumed} resumed; {info.devices} device(s)")
    print(f"wrote {info.out}")
    return 0
