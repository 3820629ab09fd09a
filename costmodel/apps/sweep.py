"""Sweeps at scale: millions of step configurations per second in one jitted, vmapped function.

A *space* of configurations is either named axes (their Cartesian product) or a table (pandas DataFrame):

* group columns, fixed per (model, GPU, TP, calibration, dtype): ``model`` (packaged name or path), ``gpu``,
  ``tp`` (default 1), ``calibration`` (``none`` | ``default`` | PATH, default ``default`` as in
  ``costmodel predict``: the pooled parameters; ``default@0.15`` those fitted for vLLM 0.15), ``dtype``
  (default: the model config's), ``moe_ep`` and ``attention_dp`` (expert parallelism and attention data
  parallelism of a mixture-of-experts model as in `step.setup`; default 1, written as output columns only
  where some group sets them), ``kv_cache_dtype`` (`records.KV_CACHE_DTYPES`, default auto; written only
  where some group sets another), ``pp`` (pipeline stages, `step.setup`: the step is one batch's pass
  through all of them; default 1, written where some group sets it);
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
import os
import re
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

from .. import memory, ops
from .. import tables as tables_mod
from ..calibration import resolve_calibration
from ..compiled import jit, join_scalars, split_scalars
from ..errors import InputError
from ..fastlookup import TOKEN_TABLE, FastLookup, as_scalars, common_shapes, of_setup
from ..hardware import get_gpu
from ..io import ALLOW_OTHER_GPU_HELP, atomic_write, write_frame, write_json
from ..model import ModelConfig, load_arch, load_model, normalize_dtype
from ..params import Params
from ..step import (
    BREAKDOWN,
    MLA_PART,
    MOE_PART,
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
from .records import KV_CACHE_DTYPES, KV_CHECK

GROUP_AXES = ("model", "gpu", "tp", "calibration", "dtype", "moe_ep", "attention_dp", "kv_cache_dtype", "pp")
GROUP_DEFAULTS = {"tp": 1, "calibration": "default", "dtype": None, "moe_ep": 1, "attention_dp": 1,
                  "kv_cache_dtype": "auto", "pp": 1}
LAYOUT_AXES = ("moe_ep", "attention_dp", "pp")  # written as output columns only where some group is not at 1
BATCH_COLUMNS = ("n_decode", "decode_ctx", "decode_keys", "n_prefill", "prefill_new", "prefill_cached",
                 "prefill_tokens", "prefill_pairs")
RESULT_COLUMNS = ("step_us",) + BREAKDOWN + (MOE_PART, MLA_PART)  # MOE_PART, MLA_PART: 0 for models without
KV_FITS = "kv_fits"  # the column saying whether a configuration's KV cache fits (`kv_fits`)
DEFAULT_CHUNK = 1 << 20


# ---------------------------------------------------------------- the fast step function

@dataclass
class Group:
    """One (model, GPU, TP, calibration, dtype) of a sweep."""

    key: tuple
    setup: Setup
    params: Params
    calibration: str  # description
    kv: memory.KVCapacity | None = None  # KV-cache pool at vLLM's defaults (`records.KV_CHECK`); None: not modelled

    def lookup(self) -> FastLookup:
        return of_setup(self.setup)


@dataclass(frozen=True)
class Mode:
    """How a sweep gives its batches (static per compiled function)."""

    decode_total: bool  # batch gives decode_keys (else decode_ctx per request)
    prefill_total: bool  # batch gives prefill_tokens, prefill_pairs (else prefill_new, prefill_cached)


def extra_parts(static: Static) -> tuple[str, ...]:
    """The parts beyond `BREAKDOWN` that a model's steps have (`MOE_PART`, `MLA_PART`); the others are 0."""
    return tuple(k for k, has in ((MOE_PART, static.moe), (MLA_PART, static.mla)) if has)


def fast_chunk(mode: Mode, static: Static, lookup: FastLookup, on: ModelOnGPU, params: Params, b0, b1, b2, b3, b4):
    """Step times of a chunk of configurations of one group: a tuple (total, *`BREAKDOWN`, *`extra_parts`)
    of [C] (µs); the batch columns b0..b4 are read as `Mode` says.  The step model itself
    (`step.batch_features`, `step.combine`), with the group's tables specialised (`fastlookup`)."""
    def one(n_dec, dec, n_pre, pre_a, pre_b):
        d = on.dims
        keys = dec if mode.decode_total else decode_keys_of_means(d, n_dec, dec)
        tokens, pairs = (pre_a, pre_b) if mode.prefill_total else prefill_of_means(d, n_pre, pre_a, pre_b)
        total, parts = combine(batch_features(lookup, on, Batch(n_dec, keys, n_pre, tokens, pairs), static),
                               on, params, static)
        return [total] + [parts[k] for k in BREAKDOWN + extra_parts(static)]

    ok = (b0 + b2) > 0
    return tuple(jnp.where(ok, v, jnp.nan) for v in jax.vmap(one)(b0, b1, b2, b3, b4))


class _Compiled:
    """fast_chunk compiled for one (mode, static, devices), its group tables passed as `compiled.split_scalars`
    gives them; with several devices the configuration axis is sharded over them (`jax.shard_map` on a 1-D
    mesh of the local devices), group tables replicated."""

    def __init__(self, mode: Mode, static: Static, n_devices: int):
        self.mode, self.static = mode, static
        self.rep = self.sh = self.mesh = None
        if n_devices > 1:
            from jax.sharding import Mesh, NamedSharding
            from jax.sharding import PartitionSpec as P
            self.mesh = Mesh(np.asarray(jax.local_devices()[:n_devices]), ("c",))
            self.rep, self.sh = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P("c"))
        self._jits, self._exe = {}, {}

    def _jit(self, spec):
        if spec not in self._jits:
            def fn(arrays, scalars, *b):
                return fast_chunk(self.mode, self.static, *join_scalars(arrays, scalars, spec), *b)
            # the chunk keeps XLA:CPU's fusion emitters: 3-7 % more evaluations per second (`compiled`)
            if self.mesh is not None:
                from jax.sharding import PartitionSpec as P
                fn = jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), P()) + (P("c"),) * 5, out_specs=P("c"))
                self._jits[spec] = jit(fn, legacy_emitters=False, in_shardings=(self.rep,) * 2 + (self.sh,) * 5,
                                       out_shardings=self.sh)
            else:
                self._jits[spec] = jit(fn, legacy_emitters=False)
        return self._jits[spec]

    def executable(self, tables, *b):
        """The compiled function of ``tables`` ((arrays, scalars, spec) of `compiled.split_scalars`) and batch
        columns ``b`` of these shapes and dtypes (compiled once); call it as ``f(arrays, scalars, *b)``."""
        arrays, scalars, spec = tables
        key = (spec, tuple((np.shape(x), str(x.dtype)) for x in (*arrays, scalars, *b)))
        if key not in self._exe:
            self._exe[key] = self._jit(spec).lower(arrays, scalars, *b).compile()
        return self._exe[key]


def _on_cpu() -> bool:
    return jax.local_devices()[0].platform == "cpu"


@functools.cache
def _compiled(mode: Mode, static: Static, n_devices: int) -> _Compiled:
    return _Compiled(mode, static, n_devices)


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
        model, gpu, tp, cal, dtype, moe_ep, attention_dp, kv_cache_dtype, pp = key
        if isinstance(tp, bool) or not float(tp).is_integer() or int(tp) < 1:
            raise InputError(f"must be a positive integer, got {tp!r}", field="tp")
        g = get_gpu(gpu)
        if g.name not in self._tables:
            self._tables[g.name] = tables_mod.load_tables(self.bench_data, g)
        m = self.model(model, normalize_dtype(dtype) if dtype else None)
        su = setup(m, self._tables[g.name], int(tp), moe_ep, attention_dp=attention_dp, kv_cache_dtype=kv_cache_dtype,
                   pp=pp)
        params, desc = resolve_calibration(str(cal), [g.name], allow_other_gpu=self.allow_other_gpu,
                                           table_sources={g.name: self._tables[g.name].sources})
        cal = params.get(g.name)
        try:
            kv = memory.kv_capacity_tokens(load_arch(str(model), self.model_configs),
                                           memory.Layout(tp=int(tp), pp=pp, attention_dp=attention_dp, moe_ep=moe_ep),
                                           g,
                                           weights=normalize_dtype(dtype) if dtype else None,
                                           kv_cache_dtype=kv_cache_dtype, **KV_CHECK)
        except InputError:
            kv = None
        return Group(key, su, cal.pooled if cal else Params(), desc, kv)


def _norm_key(model, gpu, tp, cal, dtype, moe_ep=1, attention_dp=1, kv_cache_dtype="auto", pp=1,
              where: str | None = None) -> tuple:
    """A group's key, checked: ``tp``, ``moe_ep``, ``attention_dp``, ``pp`` positive integers (2.7, "2" or True are
    refused, never rounded), ``model``, ``gpu`` and ``calibration`` given, ``calibration`` none | default |
    an existing file, ``kv_cache_dtype`` one of `records.KV_CACHE_DTYPES`."""
    dtype = None if _missing(dtype) else str(dtype)
    for name, v in (("model", model), ("gpu", gpu), ("calibration", cal)):
        if _missing(v) or str(v).strip() == "":
            raise InputError("empty value", where, name)
    for name, v in (("tp", tp), ("moe_ep", moe_ep), ("attention_dp", attention_dp), ("pp", pp)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or not math.isfinite(v) or not float(v).is_integer() or v < 1:
            raise InputError(f"must be a positive integer, got {v!r}", where, name)
    _check_calibration_choice(str(cal), where)
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise InputError(f"must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}", where, "kv_cache_dtype")
    return (str(model), str(gpu), int(tp), str(cal), dtype, int(moe_ep), int(attention_dp), kv_cache_dtype, int(pp))


def _missing(v) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and math.isnan(v))


def _check_calibration_choice(cal: str, where: str | None):
    from ..calibration import _split_choice
    base, _ = _split_choice(cal)
    if base in ("none", "default"):
        return
    p = Path(base)
    if not p.is_file():
        what = "a folder, not a calibration file" if p.is_dir() else "no such calibration file"
        raise InputError(f"{what}: {cal!r} (none, default or a calibration file's path, each optionally "
                         f"@VERSION, e.g. default@0.15)", where, "calibration")


# ---------------------------------------------------------------- spaces

MAX_AXIS_VALUES = 10_000_000  # values of one axis (a range/linspace/geomspace is sized before it is built)
MAX_GROUPS = 100_000  # (model, GPU, TP, calibration, dtype) groups of one sweep: each is set up on its own


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _yaml_number(x):
    """``x``, or the number a string such as ``"1e3"`` spells (YAML 1.1 reads ``1e3`` without a dot as a
    string); other values as they are."""
    if isinstance(x, str):
        try:
            v = float(x.strip())
        except ValueError:
            return x
        return int(v) if v.is_integer() and abs(v) < 2**53 else v
    return x


def _axis_values(name, v, where: str | None = None) -> list:
    """An axis: a scalar, a list, or {"range": [start, stop, step]} (stop excluded), {"linspace": [a, b, n]},
    {"geomspace": [a, b, n]} (rounded to integers, duplicates dropped) for the batch axes.  Sized before
    it is built: more than `MAX_AXIS_VALUES` values is refused."""
    def bad(msg):
        return InputError(msg, where, name)

    if isinstance(v, dict):
        if len(v) != 1:
            raise bad(f"an axis spec has one key (range, linspace or geomspace), got {sorted(v)}")
        (kind, a), = v.items()
        if kind not in ("range", "linspace", "geomspace") or not isinstance(a, (list, tuple)):
            raise bad(f"unknown axis spec {v!r} (range: [start, stop, step], linspace/geomspace: "
                      f"[start, stop, num])")
        a = [_yaml_number(x) for x in a]
        if not all(_is_number(x) and math.isfinite(x) for x in a):
            raise bad(f"{kind} takes finite numbers, got {list(a)!r}")
        if kind == "range":
            if not 1 <= len(a) <= 3:
                raise bad(f"range is [stop], [start, stop] or [start, stop, step], got {list(a)!r}")
            start, stop, step = (0, a[0], 1) if len(a) == 1 else (a[0], a[1], 1) if len(a) == 2 else a
            if step == 0:
                raise bad(f"a range step must not be 0, got {list(a)!r}")
            count = max(0, math.ceil((stop - start) / step))
        else:
            if len(a) != 3:
                raise bad(f"{kind} is [start, stop, num], got {list(a)!r}")
            count = a[2]
            if not float(count).is_integer() or count < 1:
                raise bad(f"{kind}'s num must be a positive integer, got {count!r}")
            if kind == "geomspace" and (a[0] <= 0 or a[1] <= 0):
                raise bad(f"geomspace takes start and stop > 0, got {list(a)!r}")
        if count > MAX_AXIS_VALUES:
            raise bad(f"{kind} {list(a)!r} has {count:,} values; an axis has at most {MAX_AXIS_VALUES:,}")
        if kind == "range":
            out = np.arange(start, stop, step).tolist()
        elif kind == "linspace":
            out = np.linspace(a[0], a[1], int(count)).tolist()
        else:
            out = sorted(set(np.rint(np.geomspace(a[0], a[1], int(count))).astype(np.int64).tolist()))
    elif isinstance(v, (list, tuple, range, np.ndarray, pd.Index, pd.Series)):
        if len(v) > MAX_AXIS_VALUES:
            raise bad(f"{len(v):,} values; an axis has at most {MAX_AXIS_VALUES:,}")
        out = list(v)
    else:
        out = [v]
    if not out:
        raise bad("an axis needs at least one value")
    if name in BATCH_COLUMNS:
        out = [_yaml_number(x) for x in out]
        for x in out:
            if not _is_number(x):
                raise bad(f"must be numbers, got {x!r}")
        arr = np.asarray(out, np.float64)
        if (~np.isfinite(arr) | (arr < 0)).any():
            raise bad(f"must be finite numbers >= 0, got {out if len(out) <= 20 else arr[~np.isfinite(arr) | (arr < 0)][:5].tolist()}")
    elif name in ("model", "gpu", "calibration", "dtype"):
        for x in out:
            if isinstance(x, (dict, list)) or (x is None and name != "dtype"):
                raise bad(f"must be names, got {x!r}")
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

    def __init__(self, axes: dict, lines: dict | None = None):
        """``lines``: where each axis was given ({name: "FILE:LINE"}), for error messages."""
        if not isinstance(axes, dict):
            raise InputError(f"axes are a mapping of axis name to values, got {type(axes).__name__}", field="axes")
        lines = lines or {}
        unknown = set(axes) - set(GROUP_AXES) - set(BATCH_COLUMNS)
        if unknown:
            k = sorted(map(str, unknown))[0]
            raise InputError(f"unknown axis {sorted(map(str, unknown))} (group axes: {', '.join(GROUP_AXES)}; batch "
                             f"axes: {', '.join(BATCH_COLUMNS)})", lines.get(k), "axes")
        for k in ("model", "gpu"):
            if k not in axes:
                raise InputError("missing required axis", lines.get("axes"), k)
        self.group_axes = [(k, _axis_values(k, axes.get(k, GROUP_DEFAULTS.get(k)), lines.get(k))) for k in GROUP_AXES]
        self.batch_axes = [(k, np.asarray(_axis_values(k, v, lines.get(k)), np.float64)) for k, v in axes.items()
                           if k in BATCH_COLUMNS]
        if not self.batch_axes:
            raise InputError("no batch axis (n_decode, decode_ctx, n_prefill, prefill_new, ...)", lines.get("axes"),
                             "axes")
        self.decode_total, self.prefill_total = _batch_mode([k for k, _ in self.batch_axes])
        self.gshape = tuple(len(v) for _, v in self.group_axes)
        self.bshape = tuple(len(v) for _, v in self.batch_axes)
        self.n = math.prod(self.gshape + self.bshape)  # a Python int: no overflow, nothing materialized
        n_groups = math.prod(self.gshape)
        if n_groups > MAX_GROUPS:
            raise InputError(f"{n_groups:,} groups (model x gpu x tp x calibration x dtype x moe_ep x attention_dp x "
                             f"kv_cache_dtype x pp); a sweep has at most "
                             f"{MAX_GROUPS:,}, each set up on its own", lines.get("axes"), "axes")
        for k, vals in self.group_axes:  # each value once (cheap), then the product
            for v in vals:
                _norm_key(*[v if kk == k else (GROUP_DEFAULTS.get(kk) or "x") if kk != "tp" else 1
                            for kk in GROUP_AXES], where=lines.get(k))
        self.group_keys = [_norm_key(*(vals[i] for (_, vals), i in zip(self.group_axes, ix)))
                           for ix in np.ndindex(*self.gshape)]
        self._axes = axes

    def rows(self, start, stop):
        idx = np.arange(start, stop, dtype=np.int64)
        digits = np.unravel_index(idx, self.gshape + self.bshape)
        ng = len(self.gshape)
        g = np.ravel_multi_index(digits[:ng], self.gshape).astype(np.int32) if ng else np.zeros(len(idx), np.int32)
        cols = {"config_id": idx}
        for (k, vals), dgt in zip(self.group_axes, digits[:ng]):
            if (k, vals) in (("dtype", [None]), ("kv_cache_dtype", ["auto"])):
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
    and ``kv_cache_dtype`` only where some group overrides them."""
    cols = {}
    for i, k in enumerate(GROUP_AXES):
        vals = [key[i] for key in group_keys]
        if k in skip or (k == "dtype" and all(v is None for v in vals)) or (k in LAYOUT_AXES and all(v == 1 for v in vals)) \
                or (k == "kv_cache_dtype" and all(v == "auto" for v in vals)):
            continue
        if k in ("tp",) + LAYOUT_AXES:
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

    def __init__(self, df: pd.DataFrame, defaults: dict | None = None, model_configs=None, source: str | None = None):
        """``source``: the file the table was read from, so that errors name its line (CSV) or row."""
        if defaults is not None and not isinstance(defaults, dict):
            raise InputError(f"must be a mapping of group column to value, got {defaults!r}", field="defaults")
        unknown = sorted(set(defaults or {}) - set(GROUP_AXES))
        if unknown:
            raise InputError(f"unknown default(s) {unknown}: a table's defaults are group columns "
                             f"({', '.join(GROUP_AXES)})", field="defaults")
        defaults = {**GROUP_DEFAULTS, **(defaults or {})}
        for k in ("model", "gpu"):
            if k not in df.columns and k not in defaults:
                raise InputError("missing column (or pass it as a default)", source, k)
        self._check_columns(df, source)
        self.df = df.reset_index(drop=True)
        self._check_cells(source)
        if "step" in self.df.columns:
            self.df["step"] = self._parsed_steps(source)
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
        self.group_keys = []
        for i, k in enumerate(uniq):
            row = int(np.argmax(codes == i))
            self.group_keys.append(_norm_key(*k, where=self._where(row, source)))
        self.model_configs = model_configs
        self._defaults = {k: v for k, v in defaults.items()}

    @staticmethod
    def _where(row: int, source: str | None) -> str:
        if source is None:
            return f"row {row}"
        return f"{source}:{row + 2}" if str(source).lower().endswith(".csv") else f"{source} row {row}"

    @staticmethod
    def _check_columns(df, source):
        """Result column names are refused (they would be overwritten, or overwrite ``config_id``), and so is
        a column one letter or so from a known one (``decode_ctxx``: read as absent, i.e. 0, otherwise);
        other columns are carried through to the output."""
        import difflib
        known = list(GROUP_AXES) + list(BATCH_COLUMNS) + ["step"]
        for c in map(str, df.columns):
            if c in ("config_id",) + RESULT_COLUMNS:
                raise InputError("is a result column; rename it", source, c)
            if c not in known:
                near = difflib.get_close_matches(c, known, 1, 0.85)
                if near:
                    raise InputError(f"unknown column (did you mean {near[0]!r}?); rename it", source, c)

    def _parsed_steps(self, source) -> list:
        """The ``step`` cells as dicts (a CSV holds them as JSON text), each checked: {"prefill": [[new, cached],
        ...], "decode": [ctx, ...]} with counts >= 0 and at least one new token a chunk."""
        out = []
        for i, v in enumerate(self.df["step"].tolist()):
            def bad(msg):
                return InputError(msg, self._where(i, source), "step")
            if isinstance(v, str):
                try:
                    v = json.loads(v)
                except json.JSONDecodeError as e:
                    raise bad(f"malformed JSON step: {e.msg}") from None
            if not isinstance(v, dict) or set(v) - {"prefill", "decode"}:
                raise bad(f'a step is {{"prefill": [[new, cached], ...], "decode": [ctx, ...]}}, got {v!r}')
            pre, dec = v.get("prefill") or [], v.get("decode") or []
            if not isinstance(pre, list) or not all(isinstance(c, (list, tuple)) and len(c) == 2 and all(
                    _is_number(x) and math.isfinite(x) and x >= 0 for x in c) and c[0] >= 1 for c in pre):
                raise bad(f"prefill is a list of [new >= 1, cached >= 0] pairs, got {pre!r}")
            if not isinstance(dec, list) or not all(_is_number(x) and math.isfinite(x) and x >= 0 for x in dec):
                raise bad(f"decode is a list of cached-token counts >= 0, got {dec!r}")
            out.append(v)
        return out

    def _check_cells(self, source):
        """Every cell of the group and batch columns given, batch values finite numbers >= 0 (an empty tp
        cell, a word among the numbers: refused with the row, never rounded or read as 0)."""
        for k in self.df.columns:
            if k in ("model", "gpu", "tp", "calibration"):
                bad = self.df[k].isna().to_numpy()
                if bad.any():
                    raise InputError("empty cell", self._where(int(np.argmax(bad)), source), k)
            elif k in BATCH_COLUMNS:
                col = self.df[k]
                if pd.api.types.is_bool_dtype(col):
                    raise InputError("must be numbers, got true/false", source, k)
                numeric = pd.api.types.is_numeric_dtype(col)
                num = col if numeric else pd.to_numeric(col, errors="coerce")
                v = num.to_numpy(np.float64)
                bad = ~np.isfinite(v) | (v < 0)
                if bad.any():
                    i = int(np.argmax(bad))
                    got = col.iloc[i]
                    what = "empty cell" if _missing(got) else f"must be a finite number >= 0, got {got!r}"
                    raise InputError(what, self._where(i, source), k)
                if not numeric:
                    self.df[k] = v

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
        model, _, _, _, dtype = self.group_keys[gi][:5]
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

def kv_fits(groups: list[Group], mode: Mode, g: np.ndarray, b: list[np.ndarray]) -> pd.arrays.BooleanArray:
    """Whether each configuration's requests fit in its group's KV-cache pool at once (`memory.batch_fits`:
    each request's cached + new tokens in whole blocks; decodes hold ctx + 1).  Given as totals
    (``decode_keys``, ``prefill_tokens``) the batch is taken as one request of each total, a lower bound.
    NA where the memory model does not describe the group's model."""
    kv = [gr.kv for gr in groups]
    blocks = np.array([c.blocks if c else -1 for c in kv], np.float64)[g]
    size = np.array([c.block_size if c else 1 for c in kv], np.float64)[g]
    per = np.array([c.groups if c else 1 for c in kv], np.float64)[g]
    n_dec, dec, n_pre, pre_a, pre_b = (np.asarray(x, np.float64) for x in b)
    need = (np.ceil(dec / size) if mode.decode_total else n_dec * np.ceil((dec + 1.0) / size)) + \
        (np.ceil(pre_a / size) if mode.prefill_total else n_pre * np.ceil((pre_a + pre_b) / size))
    return pd.arrays.BooleanArray(need * per <= blocks, blocks < 0)


DEFAULT_CALL = 1 << 17  # configurations per kernel call (intermediates of 512 KiB: fastest on a 2-core CPU)


class Evaluator:
    """Compiled fast evaluation of a space's groups.  `submit(g, batch)` dispatches rows of any groups
    (asynchronously, in calls of ``call_size`` rows of one group each, sharded over ``devices`` local
    devices); `fetch(handle)` returns [10, k]: ``step_us``, the `BREAKDOWN`, the MoE and MLA parts (µs)."""

    def __init__(self, space: Space, call_size: int = DEFAULT_CALL, model_configs=None, bench_data=None,
                 allow_other_gpu=False, devices: int | None = None, tables: dict | None = None):
        res = _Resolver(model_configs, bench_data, allow_other_gpu, tables)
        self.groups = [res.group(k) for k in space.group_keys]
        self.table_sources = {name: dict(t.sources) for name, t in res._tables.items()}  # files each GPU's tables came from
        self.mode = Mode(space.decode_total, space.prefill_total)
        n_local = len(jax.local_devices())
        n_dev = n_local if devices is None else max(1, min(int(devices), n_local))
        self.n_devices = n_dev
        self.call_size = int(math.ceil(max(int(call_size), 1) / n_dev) * n_dev)
        self.serial = _on_cpu()
        self._fns, self.tables, self._exes, self._zero_columns = [], [], {}, {}
        self._columns = [("step_us",) + BREAKDOWN + extra_parts(gr.setup.static) for gr in self.groups]
        self.calls = {False: 0, True: 0}  # kernel calls by path (True: per-token tables)
        for gr, lk in zip(self.groups, common_shapes([gr.lookup() for gr in self.groups])):
            fn = _compiled(self.mode, gr.setup.static, n_dev)
            self._fns.append(fn)
            self._sh = fn.sh
            rest = (as_scalars(gr.setup.on_gpu), as_scalars(gr.params))
            self.tables.append({})
            for integral in (False, True):
                arrays, scalars, spec = split_scalars((dataclasses.replace(lk, int_tokens=integral),) + rest)
                self.tables[-1][integral] = (*jax.device_put((arrays, scalars), fn.rep), spec)

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
                args = self.tables[gi][integral]
                res = self.executable(gi, integral, ins)(args[0], args[1], *ins)
                if self.serial:  # one execution at a time: concurrent ones thrash the caches on CPU
                    jax.block_until_ready(res)
                else:  # start the device-to-host copies now, so they overlap later calls
                    for r in res:
                        r.copy_to_host_async()
                calls.append((rows, hi - lo, gi, res))
        return k, calls

    def executable(self, gi: int, integral: bool, ins):
        """The compiled call of group ``gi`` on its per-token (``integral``) or cubic path for device inputs
        ``ins``, looked up once: every call has the same shapes (padded to ``call_size``).  Call it as
        ``f(*self.tables[gi][integral][:2], *ins)``."""
        exe = self._exes.get((gi, integral))
        if exe is None:
            exe = self._exes[gi, integral] = self._fns[gi].executable(self.tables[gi][integral], *ins)
        return exe

    def _integral(self, b: list[np.ndarray]) -> bool:
        """Whether every token count (and requests sampled) is an integer within the per-token tables."""
        tokens = (b[3] if self.mode.prefill_total else b[2] * b[3]) + b[0]
        with np.errstate(invalid="ignore"):
            return bool(tokens.max(initial=0) <= TOKEN_TABLE and (b[0] + b[2]).max(initial=0) <= TOKEN_TABLE
                        and np.array_equal(tokens, np.floor(tokens)) and np.array_equal(b[0], np.floor(b[0]))
                        and np.array_equal(b[2], np.floor(b[2])))

    def fetch_parts(self, handle):
        """Per dispatched call: (rows, the `RESULT_COLUMNS` as numpy arrays; views of the results, zeros for
        the parts its model does not have)."""
        out = []
        for rows, n, gi, res in handle[1]:
            vals = dict(zip(self._columns[gi], res))
            out.append((rows, [np.asarray(vals[c])[:n] if c in vals else self._zeros(n) for c in RESULT_COLUMNS]))
        return out

    def _zeros(self, n: int) -> np.ndarray:
        """A read-only float32 array of ``n`` zeros, shared by the parts no configuration of a call has."""
        z = self._zero_columns.get(n)
        if z is None:
            z = self._zero_columns[n] = np.zeros(n, np.float32)
            z.flags.writeable = False
        return z

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
        """[10, k]: step_us and the breakdown (`RESULT_COLUMNS`)."""
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
    _check_out(out)
    import contextlib
    with contextlib.ExitStack() as held:
        held.enter_context(_OutputLock(out))  # no other merge into out ...
        for sh in shards:  # ... and no shard being rewritten meanwhile
            held.enter_context(_OutputLock(sh))
        _clean_temporaries(out, None)
        read = pd.read_parquet if fmt == "parquet" else pd.read_csv
        df = pd.concat([read(s) for s in shards], ignore_index=True).sort_values("config_id", kind="stable")
        ids = df["config_id"].to_numpy()
        if not np.array_equal(ids, np.arange(len(ids))):
            dup = int(ids[np.argmax(ids[1:] == ids[:-1]) + 1]) if len(ids) > 1 and (ids[1:] == ids[:-1]).any() else None
            what = f"configuration {dup} is in two shards" if dup is not None else \
                "configurations are missing from every shard"
            raise InputError(f"the {process_count} shard files are not one sweep's ({what}); rerun the processes "
                             f"with the same spec and --process-count", field="out")
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
    notes: list = dataclasses.field(default_factory=list)  # what was redone or cleaned up, and why


# ---------------------------------------------------------------- size, limits, time estimate

DEFAULT_MAX_CONFIGS = 10**10  # refused above unless raised (--max-configs, sweep(max_configs=))
MAX_CONFIG_ID = 2**62  # config_id is an int64: never more, whatever the limit
MAX_CHUNKS = 1_000_000  # chunks of one sweep (one file each): raise chunk_size beyond
MAX_IN_MEMORY = 10**8  # configurations returned as a DataFrame (about 100 bytes a row); more: write a file
RATE_ESTIMATE = 700_000  # configurations/s end to end, for the estimate printed before a sweep (2-core CPU,
                         # setup and Parquet writing included; docs/sweeps.md)


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:,.1f} days"


@dataclass
class SweepPlan:
    """A sweep's size before it runs (`plan`): configurations, groups, chunks (of this process) and an
    estimate of the time at `RATE_ESTIMATE`."""

    n_configs: int
    n_groups: int
    chunk_size: int
    n_chunks: int
    chunks_here: int
    configs_here: int
    eta_s: float
    out: str | None

    def describe(self) -> str:
        here = "" if self.configs_here == self.n_configs else f" ({self.configs_here:,} in this process)"
        return (f"{self.n_configs:,} configurations{here} ({self.n_groups} groups), {self.chunks_here:,} chunk(s) of "
                f"{self.chunk_size:,}; estimated {_duration(self.eta_s)} at ~{RATE_ESTIMATE / 1e6:.1f} M/s"
                + (f" -> {self.out}" if self.out else ""))


def _positive_int(v, field: str, where: str | None = None) -> int:
    if isinstance(v, (bool, np.bool_)) or not _is_number(v) or not math.isfinite(v) or not float(v).is_integer() \
            or v < 1:
        raise InputError(f"must be a positive integer, got {v!r}", where, field)
    return int(v)


def _size_plan(sp: Space, chunk_size, process_index, process_count, max_configs, out=None):
    """(SweepPlan, chunk size, process index, process count), refusing a space above ``max_configs`` (or
    `MAX_CONFIG_ID`), more than `MAX_CHUNKS` chunks or a bad split; sizes are Python ints, nothing is
    materialized."""
    C = _positive_int(chunk_size, "chunk_size")
    if process_count is None:
        process_count = jax.process_count()
    process_count = _positive_int(process_count, "process_count")
    if process_index is None:
        process_index = jax.process_index() if process_count == jax.process_count() else 0
    if isinstance(process_index, bool) or not isinstance(process_index, (int, np.integer)) \
            or not 0 <= process_index < process_count:
        raise InputError(f"process_index {process_index!r} not in [0, {process_count})", field="process_index")
    n = int(sp.n)
    limit = DEFAULT_MAX_CONFIGS if max_configs is None else _positive_int(max_configs, "max_configs")
    eta = n / RATE_ESTIMATE
    if n > limit:
        raise InputError(f"the space has {n:,} configurations (about {n:.1e}; estimated {_duration(eta)} at "
                         f"~{RATE_ESTIMATE / 1e6:.1f} M/s), above the limit of {limit:,}; shrink the axes or raise "
                         f"the limit (--max-configs N, or max_configs=N in Python)", field="max_configs")
    if n > MAX_CONFIG_ID:
        raise InputError(f"the space has {n:,} configurations (about {n:.1e}); a sweep numbers them with 64-bit "
                         f"integers and takes at most {MAX_CONFIG_ID:,}", field="axes")
    n_chunks = -(-n // C)
    if n_chunks > MAX_CHUNKS:
        raise InputError(f"{n:,} configurations in chunks of {C:,} make {n_chunks:,} chunks; at most "
                         f"{MAX_CHUNKS:,}: raise the chunk size", field="chunk_size")
    here = len(range(process_index, n_chunks, process_count))
    last = n_chunks - 1
    configs_here = here * C - (C * (last + 1) - n if n_chunks and last % process_count == process_index else 0)
    plan = SweepPlan(n, len(sp.group_keys), C, n_chunks, here, configs_here, configs_here / RATE_ESTIMATE,
                     None if out is None else str(shard_path(out, process_index, process_count)))
    return plan, C, process_index, process_count


def plan(space, out=None, *, chunk_size: int = DEFAULT_CHUNK, defaults: dict | None = None, model_configs=None,
         process_index: int | None = None, process_count: int | None = None,
         max_configs: int | None = DEFAULT_MAX_CONFIGS) -> SweepPlan:
    """What `sweep` would do, without doing it (``costmodel sweep --dry-run``): the size, the chunks and a
    time estimate; the same refusals (a space above ``max_configs``, a bad ``out``)."""
    sp = make_space(space, defaults, model_configs)
    pl, *_ = _size_plan(sp, chunk_size, process_index, process_count, max_configs, out)
    if out is not None:
        _check_out(Path(pl.out))
    return pl


# ---------------------------------------------------------------- the output: checks, lock, temporaries

def _check_out(path: Path):
    """Refuse, before anything is written, an output that is a folder, under a file or in a folder this
    process cannot write."""
    _fmt_of(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; name a .parquet or .csv file", field="out")
    p = path.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir():
        raise InputError(f"{p} is a file, so {path} cannot be created under it", field="out")
    if not os.access(p, os.W_OK | os.X_OK):
        raise InputError(f"cannot write in folder {p} (permission denied)", field="out")
    parts = path.with_name(path.name + ".parts")
    if parts.exists() and not parts.is_dir():
        raise InputError(f"{parts} (the chunk folder of {path.name}) is a file; remove it", field="out")


class SweepLocked(InputError):
    """Another sweep is writing the same output."""


class _OutputLock:
    """``OUT.lock``: an exclusive `fcntl.flock` lock on a file holding the holder's pid, host and start
    time.  The kernel releases it when the holder exits, however it exits (kill -9 included), so a lock
    file left behind is simply taken over; the file is removed on release."""

    def __init__(self, target: Path):
        self.path = target.with_name(target.name + ".lock")
        self.fd = None

    def __enter__(self):
        import fcntl
        import socket
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create folder {self.path.parent}: {e.strerror}", field="out") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise InputError(f"cannot create {self.path}: {e.strerror}", field="out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                try:
                    h = json.loads(holder)
                    who = f"pid {h['pid']} on {h['host']}, started {h['started']}"
                except (ValueError, KeyError, TypeError):
                    who = "another process"
                raise SweepLocked(f"{self.path.name[:-5]} is being written by another sweep ({who}; lock "
                                  f"{self.path}); wait for it to finish or choose another output",
                                  field="out") from None
            try:  # the previous holder may have removed the file between our open and flock: retry
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None


def _temp_pattern(name: str) -> re.Pattern:
    """The names `io.atomic_write` gives the temporary files of ``name`` (``.NAME.XXXXXXXX.tmp``)."""
    return re.compile(rf"^\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp$")


def _clean_temporaries(target: Path, parts_dir: Path | None) -> list[str]:
    """Remove the temporary files an interrupted (killed) run of this output left: only
    ``.OUT.XXXXXXXX.tmp`` beside ``OUT`` and the chunk/manifest temporaries in its parts folder; called
    with the output's lock held, so no other sweep is writing them."""
    gone = []
    pats = [(target.parent, _temp_pattern(target.name))]
    if parts_dir is not None and parts_dir.is_dir():
        pats.append((parts_dir, re.compile(r"^\.(chunk-\d{6,}\.(parquet|csv)|manifest\.json)\.[a-z0-9_]{8}\.tmp$")))
    for folder, pat in pats:
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if pat.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                gone.append(str(p))
    if gone:
        print(f"costmodel sweep: removed {len(gone)} temporary file(s) of an interrupted run: "
              f"{', '.join(Path(g).name for g in gone[:3])}{' ...' if len(gone) > 3 else ''}", file=sys.stderr)
    return gone


# ---------------------------------------------------------------- the resume key

CODE_MODULES = ("step", "kernel_time", "ops", "fastlookup", "tables", "interp", "hardware", "params", "model",
                "calibration", "apps/sweep")  # the code a sweep's numbers come from


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _hash_path(path: Path, cache: dict) -> str:
    """The contents of a file, or of every file under a folder (names and bytes)."""
    path = Path(path)
    if path not in cache:
        h = hashlib.sha256()
        if path.is_file():
            h.update(path.read_bytes())
        elif path.is_dir():
            for f in sorted(q for q in path.rglob("*") if q.is_file()):
                h.update(str(f.relative_to(path)).encode() + b"\0")
                h.update(f.read_bytes())
        else:
            h.update(b"missing")
        cache[path] = h.hexdigest()[:16]
    return cache[path]


@functools.cache
def _code_hash() -> str:
    from .. import __version__
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(f"costmodel {__version__} jax {jax.__version__}".encode())
    for m in CODE_MODULES:
        f = root / f"{m}.py"
        h.update(f.read_bytes() if f.is_file() else b"missing")
    return h.hexdigest()[:16]


def input_hashes(ev: Evaluator) -> dict[str, str]:
    """What a sweep's numbers depend on besides its space and options, by name: the contents of the kernel
    tables loaded for each GPU, each model's config (as read), each calibration file, and the package's
    version and evaluation code.  Part of the resume key: chunks computed under other inputs are redone."""
    from ..calibration import DEFAULT_CALIBRATION, _split_choice
    cache: dict = {}
    out = {"costmodel code": _code_hash()}
    for gr in ev.groups:
        model, gpu, tp, cal, dtype = gr.key[:5]
        m = gr.setup.model
        out[f"model config {model}"] = _sha(json.dumps(dataclasses.asdict(m), sort_keys=True, default=str).encode())
        for kind, src in sorted(ev.table_sources.get(gr.setup.gpu.name, {}).items()):
            out[f"{gr.setup.gpu.name} {kind} table {src}"] = _hash_path(Path(src), cache)
        base, _ = _split_choice(cal)
        if base != "none":
            f = DEFAULT_CALIBRATION if base == "default" else Path(base)
            out[f"calibration {cal}"] = _hash_path(f, cache) + "/" + _sha(
                json.dumps([float(x) for x in gr.params]).encode())
    return out


# ---------------------------------------------------------------- sweeping

def sweep(space, out: str | Path | None = None, *, chunk_size: int = DEFAULT_CHUNK, defaults: dict | None = None,
          model_configs=None, bench_data=None, allow_other_gpu: bool = False, progress: bool = False,
          process_index: int | None = None, process_count: int | None = None, keep_parts: bool = False,
          return_df: bool = True, devices: int | None = None, tables: dict | None = None,
          on_chunk: Callable[[int], None] | None = None,
          max_configs: int | None = DEFAULT_MAX_CONFIGS) -> pd.DataFrame | None:
    """Evaluate every configuration of ``space`` (dict of axes, DataFrame or `Space`).

    Returns a DataFrame: the configuration columns, ``config_id`` (row of the space), ``step_us`` and the
    breakdown columns `step.BREAKDOWN` (µs, float32); a configuration with no request gives NaN.  With
    ``out`` (``.parquet`` or ``.csv``) chunks are written to ``OUT.parts/`` as they finish and merged into
    ``out`` at the end; a rerun with the same space, options and input files resumes from the chunk files
    (chunks computed from since-changed tables, model configs or calibrations are redone).  ``OUT.lock``
    keeps a second sweep off the same output.  With
    ``process_count`` > 1 this process evaluates chunks ``k`` with ``k % process_count == process_index``
    and writes `shard_path` (merge with `merge_shards`); by default both come from ``jax.process_index()``
    / ``jax.process_count()`` (one file per host under ``jax.distributed``).  ``on_chunk(k)`` is called
    after chunk k is stored.  ``devices``: how many local devices to shard each chunk over (default all).
    ``tables``: already loaded `tables.Tables` by GPU name (default: loaded from ``bench_data``).
    A space of more than ``max_configs`` configurations is refused (`errors.InputError`; `plan` gives
    the size and a time estimate without running).
    """
    sp = make_space(space, defaults, model_configs)
    if progress:
        pl, *_ = _size_plan(sp, chunk_size, process_index, process_count, max_configs, out)
        print(f"costmodel sweep: {pl.describe()}", file=sys.stderr)
    info = run(sp, out, chunk_size=chunk_size, model_configs=model_configs, bench_data=bench_data,
               allow_other_gpu=allow_other_gpu, progress=progress, process_index=process_index,
               process_count=process_count, keep_parts=keep_parts, devices=devices, on_chunk=on_chunk,
               collect=return_df and out is None, tables=tables, max_configs=max_configs)
    if not return_df:
        return None
    if out is None:
        df = info.pop("frame")
    else:
        path = Path(info["info"].out)
        df = pd.read_parquet(path) if _fmt_of(path) == "parquet" else pd.read_csv(path)
    df.attrs["sweep"] = info["info"]
    return df


def _chunk_ok(path: Path, fmt: str, rows: int) -> bool:
    """Whether a stored chunk file is whole: ``rows`` rows (Parquet: from its footer; CSV: counted lines,
    the header and a final newline)."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq
            return pq.read_metadata(path).num_rows == rows
        lines, last = 0, b""
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                lines += block.count(b"\n")
                last = block[-1:]
        return last == b"\n" and lines == rows + 1
    except Exception:
        return False


def _chunk_name(k: int, fmt: str) -> str:
    return f"chunk-{k:06d}.{fmt}"


def run(sp: Space, out=None, *, chunk_size=DEFAULT_CHUNK, model_configs=None, bench_data=None,
        allow_other_gpu=False, progress=False, process_index=None, process_count=None, keep_parts=False,
        devices=None, on_chunk=None, collect=False, call_size=DEFAULT_CALL, tables=None,
        max_configs=DEFAULT_MAX_CONFIGS) -> dict:
    """The chunk loop behind `sweep`; returns {"info": SweepInfo[, "frame": DataFrame]}."""
    t0 = time.perf_counter()
    pl, C, process_index, process_count = _size_plan(sp, chunk_size, process_index, process_count, max_configs, out)
    if collect and sp.n > MAX_IN_MEMORY:
        raise InputError(f"{sp.n:,} configurations are too many to return in memory (at most {MAX_IN_MEMORY:,}); "
                         f"write them to a file (out=...)", field="out")
    if devices is not None:
        devices = _positive_int(devices, "devices")
    if out is None:
        return _run(sp, None, C, pl, process_index, process_count, t0, model_configs, bench_data, allow_other_gpu,
                    progress, keep_parts, devices, on_chunk, collect, call_size, tables)
    target = shard_path(out, process_index, process_count)
    _check_out(target)
    with _OutputLock(target):
        return _run(sp, target, C, pl, process_index, process_count, t0, model_configs, bench_data,
                    allow_other_gpu, progress, keep_parts, devices, on_chunk, collect, call_size, tables)


def _run(sp, target, C, pl, process_index, process_count, t0, model_configs, bench_data, allow_other_gpu, progress,
         keep_parts, devices, on_chunk, collect, call_size, tables) -> dict:
    notes: list[str] = []
    parts_dir = fmt = None
    if target is not None:
        fmt = _fmt_of(target)
        parts_dir = target.with_name(target.name + ".parts")
        gone = _clean_temporaries(target, parts_dir)
        if gone:
            notes.append(f"removed {len(gone)} temporary file(s) of an interrupted run")
    ev = Evaluator(sp, min(call_size, C), model_configs, bench_data, allow_other_gpu, devices, tables)
    n_chunks = pl.n_chunks
    mine = range(process_index, n_chunks, process_count)
    done: set[int] = set()
    if target is not None:
        core = {"space": hashlib.sha256(sp.fingerprint().encode()).hexdigest(), "n": sp.n, "chunk_size": C,
                "process": [process_index, process_count], "format": fmt,
                "bench_data": str(bench_data), "model_configs": str(model_configs),
                "allow_other_gpu": allow_other_gpu, "version": 2}
        inputs = input_hashes(ev)
        manifest = {**core, "inputs": inputs}
        mpath = parts_dir / "manifest.json"
        chunk_pat = re.compile(rf"^chunk-(\d{{6,}})\.{fmt}$")

        def stored():
            return sorted(p for p in parts_dir.iterdir() if chunk_pat.match(p.name))
        if parts_dir.is_dir():
            old = None
            try:
                old = json.loads(mpath.read_text())
            except (OSError, json.JSONDecodeError):
                pass
            if not isinstance(old, dict) or {k: old.get(k) for k in core} != core:
                print(f"costmodel sweep: {parts_dir} is from another sweep; starting over", file=sys.stderr)
                shutil.rmtree(parts_dir)
            elif old.get("inputs") != inputs:
                before = old.get("inputs") or {}
                changed = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
                stale = stored()
                for p in stale:  # the chunks first, then the manifest: a kill in between redoes this
                    p.unlink()
                msg = (f"{len(stale)} chunk(s) recomputed: {'; '.join(changed[:4])}"
                       f"{f' and {len(changed) - 4} more' if len(changed) > 4 else ''} changed since they were computed")
                print(f"costmodel sweep: {msg}", file=sys.stderr)
                notes.append(msg)
                write_json(mpath, manifest)
        parts_dir.mkdir(parents=True, exist_ok=True)
        if not mpath.is_file():
            write_json(mpath, manifest)
        done = {k for k in (int(chunk_pat.match(p.name).group(1)) for p in stored())
                if k < n_chunks and k % process_count == process_index}
        broken = [k for k in sorted(done) if not _chunk_ok(parts_dir / _chunk_name(k, fmt), fmt,
                                                           min(sp.n, (k + 1) * C) - k * C)]
        if broken:  # e.g. emptied by a crash of the machine before the file reached the disk
            for k in broken:
                (parts_dir / _chunk_name(k, fmt)).unlink()
            done -= set(broken)
            msg = (f"{len(broken)} stored chunk(s) unreadable or of the wrong length, recomputed: "
                   f"{', '.join(_chunk_name(k, fmt) for k in broken[:3])}{' ...' if len(broken) > 3 else ''}")
            print(f"costmodel sweep: {msg}", file=sys.stderr)
            notes.append(msg)
    frames, computed = [], []
    bar = _Progress(pl.configs_here, progress)
    pending = None  # (k, rows cols, device result): overlap the next chunk's input build with this one's compute

    def finish(k, cols, res, fits):
        vals = ev.fetch(res)
        df = pd.DataFrame(cols)
        for i, name in enumerate(RESULT_COLUMNS):
            df[name] = vals[i]
        df[KV_FITS] = fits
        if parts_dir is not None:
            write_frame(parts_dir / _chunk_name(k, fmt), df, fmt)
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
                    p = parts_dir / _chunk_name(k, fmt)
                    frames.append(pd.read_parquet(p) if fmt == "parquet" else pd.read_csv(p))
                bar.update(hi - lo, skipped=True)
                continue
            g, b, cols = sp.rows(lo, hi)
            _check_batch(b, sp.prefill_total, lo)
            res = ev.submit(g, b)
            if pending is not None:
                finish(*pending)
            pending = (k, cols, res, kv_fits(ev.groups, ev.mode, g, b))
        if pending is not None:
            finish(*pending)
            pending = None
    finally:
        bar.close()
    if target is not None:
        files = [parts_dir / _chunk_name(k, fmt) for k in mine]
        if files:
            _merge(files, target, fmt)
        else:  # this process has no chunk: an empty file with the columns
            g, b, cols = sp.rows(0, 0)
            write_frame(target, pd.DataFrame({**cols, **{c: np.zeros(0, np.float32) for c in RESULT_COLUMNS},
                                        KV_FITS: pd.array([], dtype="boolean")}), fmt)
        if not keep_parts:
            shutil.rmtree(parts_dir, ignore_errors=True)
    info = SweepInfo(sp.n, C, list(mine), computed, time.perf_counter() - t0, None if target is None else str(target),
                     ev.n_devices, (ev.calls[False], ev.calls[True]), notes)
    outd = {"info": info}
    if collect:
        if frames:
            outd["frame"] = pd.concat(frames, ignore_index=True)
        else:
            g, b, cols = sp.rows(0, 0)
            outd["frame"] = pd.DataFrame({**cols, **{c: np.zeros(0, np.float32) for c in RESULT_COLUMNS},
                                        KV_FITS: pd.array([], dtype="boolean")})
    return outd


# ---------------------------------------------------------------- spec files and the command line

SPEC_KEYS = {"axes", "configs", "defaults", "chunk_size", "out", "model_configs", "bench_data", "allow_other_gpu"}
SPEC_TYPES = {"axes": dict, "configs": str, "defaults": dict, "out": str, "model_configs": str, "bench_data": str,
              "allow_other_gpu": bool}


def _key_lines(path: Path, text: str, yaml_file: bool) -> dict[str, str]:
    """Where each top-level key (and each key of ``axes`` and ``defaults``, as ``axes.tp``) is given:
    {key: "FILE:LINE"}; {} where the text cannot say."""
    lines: dict[str, str] = {}
    if yaml_file:
        import yaml
        try:
            node = yaml.compose(text)
        except yaml.YAMLError:
            return lines
        def note(key, mark):
            at = f"{path}:{mark.line + 1}"
            if key in lines:  # YAML keeps the last silently: refuse
                raise InputError(f"given twice (also at line {lines[key].rsplit(':', 1)[1]})", at, key)
            lines[key] = at
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = str(k.value)
                note(key, k.start_mark)
                if key in ("axes", "defaults") and isinstance(v, yaml.MappingNode):
                    for kk, _ in v.value:
                        note(f"{key}.{kk.value}", kk.start_mark)
        return lines
    for m in re.finditer(r'"((?:[^"\\]|\\.)*)"\s*:', text):
        lines.setdefault(m.group(1), f"{path}:{text.count(chr(10), 0, m.start()) + 1}")
    return lines


def load_spec(path: str | Path) -> dict:
    """Read a sweep spec (YAML or JSON): ``axes`` (named axes, their product) or ``configs`` (a CSV/Parquet
    table, one configuration per row; paths relative to the spec), optional ``defaults`` (group columns
    absent from the table or axes), ``chunk_size``, ``out``, ``model_configs``, ``bench_data``,
    ``allow_other_gpu``.  Each key is checked (type, value) with an error naming the file, line and key;
    an unknown key is refused."""
    path = Path(path)
    if path.is_dir():
        raise InputError("is a folder, not a spec file", str(path))
    if not path.is_file():
        raise InputError("no such spec file", str(path))
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the spec: {e}", str(path)) from None
    if not text.strip():
        raise InputError("empty spec file (give 'axes' or 'configs')", str(path))
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    try:
        if yaml_file:
            import yaml
            try:
                spec = yaml.safe_load(text)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
                raise InputError(f"malformed YAML: {getattr(e, 'problem', e)}", where) from None
        else:
            def no_twice(pairs):
                seen = set()
                for k, _ in pairs:
                    if k in seen:
                        raise InputError("given twice in one object", str(path), k)
                    seen.add(k)
                return dict(pairs)
            spec = json.loads(text, object_pairs_hook=no_twice)
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON: {e.msg}", f"{path}:{e.lineno}") from None
    if spec is None:
        raise InputError("empty spec file (give 'axes' or 'configs')", str(path))
    if not isinstance(spec, dict):
        raise InputError(f"a sweep spec is a mapping (axes: ... or configs: ...), got {type(spec).__name__}",
                         str(path))
    lines = _key_lines(path, text, yaml_file)
    unknown = sorted(str(k) for k in set(spec) - SPEC_KEYS)
    if unknown:
        import difflib
        hint = difflib.get_close_matches(unknown[0], sorted(SPEC_KEYS), 1)
        raise InputError(f"unknown key(s) {unknown}{f' (did you mean {hint[0]!r}?)' if hint else ''} (known: "
                         f"{', '.join(sorted(SPEC_KEYS))})", lines.get(unknown[0], str(path)))
    if ("axes" in spec) == ("configs" in spec):
        raise InputError("give exactly one of 'axes' and 'configs'", str(path))
    for key, typ in SPEC_TYPES.items():
        v = spec.get(key)
        if key not in spec or (v is None and key not in ("axes", "configs")):
            continue
        if not isinstance(v, typ) or (typ is str and not v.strip()):
            want = {dict: "a mapping", str: "a file or folder path", bool: "true or false"}[typ]
            raise InputError(f"must be {want}, got {v!r}", lines.get(key, str(path)), key)
    if spec.get("chunk_size") is not None:
        spec["chunk_size"] = _positive_int(_yaml_number(spec["chunk_size"]), "chunk_size",
                                           lines.get("chunk_size", str(path)))
    for key in ("configs", "out", "model_configs", "bench_data"):
        if spec.get(key) is not None and not Path(str(spec[key])).is_absolute():
            spec[key] = str(path.parent / str(spec[key]))
    spec["_where"] = str(path)
    spec["_lines"] = lines
    return spec


def space_from_spec(spec: dict) -> Space:
    where = spec.get("_where")
    lines = spec.get("_lines") or {}
    try:
        if "axes" in spec:
            if not isinstance(spec["axes"], dict):
                raise InputError("'axes' must be a mapping of axis name to values", field="axes")
            defaults = spec.get("defaults") or {}
            if not isinstance(defaults, dict):
                raise InputError(f"must be a mapping, got {defaults!r}", lines.get("defaults"), "defaults")
            at = {k: lines.get(f"defaults.{k}") or lines.get(k) for k in defaults}
            at.update({k: lines.get(f"axes.{k}") or lines.get(k) for k in spec["axes"]})
            at = {k: v for k, v in at.items() if v}
            at["axes"] = lines.get("axes", where)
            return AxesSpace({**defaults, **spec["axes"]}, lines=at)
        cfg = Path(spec["configs"])
        if not cfg.is_file():
            raise InputError("no such configs file", str(cfg), "configs")
        try:
            df = pd.read_parquet(cfg) if cfg.suffix.lower() in (".parquet", ".pq") else pd.read_csv(cfg)
        except pd.errors.EmptyDataError:
            raise InputError("empty configs file (a header row and one configuration a row)", str(cfg),
                             "configs") from None
        except Exception as e:  # a file pandas/pyarrow cannot parse
            raise InputError(f"cannot read the configs table: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                             str(cfg), "configs") from None
        if len(df) == 0:
            raise InputError("the configs table has a header but no rows", str(cfg), "configs")
        return FrameSpace(df, spec.get("defaults"), spec.get("model_configs"), source=str(cfg))
    except InputError as e:
        if e.args and where and where not in str(e):
            raise InputError(str(e), where) from None
        raise


def _count(text: str) -> int:
    """A command-line count: 10000000000, 1e10 or 10**10."""
    t = text.strip().replace("_", "").replace(",", "")
    try:
        if "**" in t:
            a, b = t.split("**")
            v = int(a) ** int(b)
        else:
            v = float(t) if any(c in t for c in ".eE") else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}") from None
    if not math.isfinite(v) or v < 1 or not float(v).is_integer():
        raise argparse.ArgumentTypeError(f"not a positive count: {text!r}")
    return int(v)


def add_sweep_arguments(parser) -> None:
    parser.add_argument("spec", help="sweep spec, YAML or JSON (axes or a configs table; see docs)")
    parser.add_argument("--out", default=None, help="results file, .parquet or .csv (default: the spec's 'out')")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help=f"configurations per chunk file (default: the spec's or {DEFAULT_CHUNK:,})")
    parser.add_argument("--model-configs", default=None, help="folder of <model>/config.json")
    parser.add_argument("--bench-data", default=None, help="kernel tables folder (default: the repo's bench_data/)")
    parser.add_argument("--allow-other-gpu", action="store_true", help=ALLOW_OTHER_GPU_HELP)
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
    parser.add_argument("--max-configs", type=_count, default=DEFAULT_MAX_CONFIGS,
                        help=f"refuse a space of more configurations (default {DEFAULT_MAX_CONFIGS:.0e}; e.g. 1e12)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the size, chunks and a time estimate, and exit without writing anything")


def run_sweep(args) -> int:
    spec = load_spec(args.spec)
    out = args.out or spec.get("out")
    if not out:
        raise InputError("no output file: pass --out or set 'out' in the spec", args.spec, "out")
    _fmt_of(Path(out))
    for name in ("process_count", "devices", "chunk_size"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise InputError(f"must be a positive integer, got {v}", field=name)
    if args.merge:
        if not args.process_count or args.process_count < 2:
            raise InputError("--merge needs --process-count N (N >= 2)", field="process_count")
        path = merge_shards(out, args.process_count)
        print(f"costmodel sweep: merged {args.process_count} shards into {path}")
        return 0
    sp = space_from_spec(spec)
    chunk = args.chunk_size if args.chunk_size is not None else spec.get("chunk_size") or DEFAULT_CHUNK
    pl, *_ = _size_plan(sp, chunk, args.process_index, args.process_count, args.max_configs, out)
    _check_out(Path(pl.out))
    if args.dry_run:
        print(f"costmodel sweep: dry run: {pl.describe()}; nothing written")
        return 0
    print(f"costmodel sweep: {pl.describe()}", file=sys.stderr)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    stored = []
    try:
        r = run(sp, out, chunk_size=int(chunk), model_configs=args.model_configs or spec.get("model_configs"),
                bench_data=args.bench_data or spec.get("bench_data"),
                allow_other_gpu=args.allow_other_gpu or bool(spec.get("allow_other_gpu")), progress=progress,
                process_index=args.process_index, process_count=args.process_count, keep_parts=args.keep_parts,
                devices=args.devices, on_chunk=stored.append, max_configs=args.max_configs)
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
