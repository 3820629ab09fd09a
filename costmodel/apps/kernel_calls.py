"""`costmodel kernels`: one kernel call per CSV row, priced with the default (uncalibrated) parameters.

Columns by ``op``: ``gemm`` (m, n, k, dtype); ``attn_decode`` (batch_size, kv_len, num_heads, num_kv_heads,
head_dim, dtype; heads per GPU; kv_len = keys each sequence attends over); ``attn_prefill`` (batch_size,
seq_len, cached, num_heads, num_kv_heads, head_dim, dtype).  Other columns pass through unchanged.
"""
from __future__ import annotations

import io
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pandas as pd

from .. import kernel_time as kt
from .. import ops
from ..errors import InputError
from ..hardware import get_gpu
from ..model import DTYPE_BYTES, normalize_dtype
from ..params import Params
from ..step import MAX_TOKENS
from ..tables import load_tables, nearest_layout, read_csv_text

NEEDS = {
    "gemm": ("m", "n", "k"),
    "attn_decode": ("batch_size", "kv_len", "num_heads", "num_kv_heads", "head_dim"),
    "attn_prefill": ("batch_size", "seq_len", "num_heads", "num_kv_heads", "head_dim"),
}


def _num(df, i, col, where, minimum):
    v = df.at[i, col] if col in df.columns else np.nan
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = np.nan
    if not np.isfinite(x) or x < minimum or x != int(x):
        raise InputError(f"must be an integer >= {minimum}, got {v!r}", where, col)
    if x > MAX_TOKENS:
        raise InputError(f"{v} is more than the limit of {MAX_TOKENS:.0e}", where, col)
    return x


def predict_kernel_csv(path: str | Path, gpu_name: str, bench_data=None) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", str(path))
    text, lines = read_csv_text(path)  # UTF-8, as many fields in every row as in the header
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except Exception as e:
        raise InputError(f"cannot parse CSV: {e}", str(path)) from None
    if "op" not in df.columns:
        raise InputError("missing column 'op'", str(path))
    if df.empty:
        raise InputError("no query rows (a header only)", str(path))
    tables = load_tables(bench_data, get_gpu(gpu_name))
    gpu, p = tables.gpu, Params()
    out = np.zeros(len(df))
    for i in range(len(df)):
        op, where = df.at[i, "op"].strip(), f"{path}:{lines[i + 1]}"
        if op not in NEEDS:
            raise InputError(f"unknown op {op!r} (expected {', '.join(NEEDS)})", where, "op")
        v = {c: _num(df, i, c, where, 1) for c in NEEDS[op]}
        dtype = normalize_dtype(df.at[i, "dtype"] or "bf16", where) if "dtype" in df.columns else "bf16"
        if op == "gemm":
            out[i] = _gemm(tables, gpu, p, v["m"], v["k"], v["n"], dtype)
        else:
            hq, hkv, d = v["num_heads"], v["num_kv_heads"], v["head_dim"]
            if hq % hkv:
                raise InputError(f"num_heads={hq:.0f} is not a multiple of num_kv_heads={hkv:.0f} (each KV head "
                                 "serves a whole group of query heads)", where, "num_kv_heads")
            dims = ops.Dims(0.0, 0.0, hq, hkv, d, 0.0, 0.0, 1.0, 2.0, ops.NO_WINDOW, 0.0)
            if op == "attn_decode":
                c, s = nearest_layout(tables.decode_heads, hq, hkv, d, "decode")
                out[i] = float(kt.attn_decode_us(tables.decode, c, s, v["batch_size"],
                                                      v["batch_size"] * v["kv_len"], p))
            else:
                has_cached = "cached" in df.columns and df.at[i, "cached"].strip() != ""
                cached = _num(df, i, "cached", where, 0) if has_cached else 0.0
                c, s = nearest_layout(tables.prefill_heads, hq, hkv, d, "prefill")
                pairs = float(ops.prefill_pairs(dims, v["seq_len"], cached)) * v["batch_size"]
                dc, _ = nearest_layout(tables.decode_heads, hq, hkv, d, "decode")
                out[i] = float(kt.attn_prefill_call_us(tables.prefill, c, s, tables.decode, dc,
                                                            v["batch_size"], pairs, p))
    res = df.copy()
    res["predicted_us"] = np.round(out, 3)
    return res


def _gemm(tables, gpu, p, m, k, n, dtype):
    c = kt.choose_gemm_table(tables, dtype)
    g = ops.Gemm(jnp.float32(m), jnp.float32(k), jnp.float32(n))
    return float(kt.gemm_us(tables.gemm[c.table_dtype], g, float(DTYPE_BYTES[dtype]),
                                 float(DTYPE_BYTES[c.table_dtype]), c.hw, p, c.same_dtype, c.compute_ratio))
