"""Cross-validation of the kernel tables.

    python -m costmodel.tabletools.crossval [--bench-data DIR ...] [--points 300] [--seed 0] [--no-loo] [--no-cross]
                                 [--no-moe]
                                 [--cross A B] [--gpu H100] [--collections GPU]... [--out FILE.md]

1. **Leave-one-out (LOO) interpolation error**, per bench_data folder, GPU and kernel type (GEMM per dtype,
   decode, prefill, all-reduce): one measured cell is removed, the table is rebuilt by the loader's own
   builders (`tables.load_gemm`, `load_attention`, `load_allreduce`, reading CSVs written to a temporary
   folder) and the rebuilt table's interpolant (`gemm_table_us`, `attn_table_us` with the slopes
   `kernel_time` uses, `comm_table_us`) predicts the removed cell.  A cell is one grid point of the loader
   (duplicates, e.g. one per-GPU head layout measured in two InferSim files, keep their minimum, as the
   loader does); attention uses the bf16/bf16 rows the loader reads; the error is against the raw measured
   value (before the noise policy).  Rebuilding costs ~0.1 s, so at most ``--points`` cells per kernel
   type are drawn at random (fixed ``--seed``).

   To keep a rebuild fast the CSV written holds the held-out cell's own series (same (dtype, k, n) for
   GEMM, same per-GPU head layout for attention) plus, for every grid value (m; kv_len/seq_len and batch)
   that series lacks, one real cell of another series carrying it.  The loader fills, cleans and
   interpolates each series on the union grid independently of the other series' values, so the
   prediction is the one the full table minus the cell gives (checked in tests/test_crossval.py).

2. **Cross-source error** (``--gpu``, default H100; ``--cross A B`` picks the two folders, e.g. the repo's
   tables and a folder written by ``python -m costmodel.tabletools.measure``).  By default, on H100: InferSim's
   measured points (``../shared/bench_data``: FP8 DeepGEMM GEMM, FA3 decode and prefill, per-GPU heads = file heads / T) priced from the repo's AIConfigurator-derived
   tables, and the repo's points priced from InferSim's tables, with the pricing of ``costmodel kernels``
   (`apps.kernel_calls`: `kt.gemm_us` incl. the FP8-table -> BF16 transfer, `kt.attn_decode_us`,
   `kt.attn_prefill_us` on the nearest head layout, default `Params`).  "in range" restricts to
   points inside the predicting table's measured range (GEMM m, k, n; attention: same per-GPU layout
   measured, length and batch within that layout's range).

3. **Fused-MoE curves** (``--no-moe`` skips): per GPU and dtype of ``moe/<gpu>/data.csv``, every interior
   point of every measured curve (one shape, moe_tp x moe_ep and distribution) is dropped in turn and
   predicted from the rest of its curve by the library's monotone interpolation along the work axis
   (`interp.interp_work_axis` on log num_tokens vs log latency, as along GEMM m).  All points, no sampling.
   The MLA-module tables (``mla/{prefill,decode}/<gpu>``) get the same along seq_len / kv_len.

4. **Engine collections** (``--collections GPU``, needs ``aiconfigurator-core``): AIConfigurator's BF16 GEMM
   collections of one GPU (one per engine and version, the same cuBLAS call) as latency ratios to the newest
   vLLM one, and the folders under ``bench_data/measured/`` against each collection (`collection_report`).

Errors are relative, pred / measured - 1: median and 90th percentile of |err|, and the signed median
(bias; > 0 = over-predicted).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .. import kernel_time as kt
from .. import ops
from ..errors import InputError
from ..hardware import get_gpu
from ..io import write_text
from ..model import DTYPE_BYTES
from ..params import Params
from ..interp import interp_work_axis
from ..tables import (MLA_CURVE_COLUMNS, MLA_KINDS, MOE_SHAPE_COLUMNS, attn_table_us, comm_table_us, default_bench_data, gemm_table_us,
                     load_allreduce, load_attention, load_gemm, load_mla, load_moe, load_tables,
                     nearest_layout)
from .importer import _safe_version_key, gemm_collections

PROG = "python -m costmodel.tabletools.crossval"
LENGTH = {"decode": "kv_len", "prefill": "seq_len"}
SLOPES = {"decode": (kt.DECODE_SLOPE_HI, kt.DECODE_SLOPE_LO), "prefill": (kt.PREFILL_SLOPE_HI, kt.PREFILL_SLOPE_LO)}


# ---------------------------------------------------------------- measured cells

def discover(root: Path) -> dict[str, dict[str, Path]]:
    """GPU folder name -> {kind: path} for every table the loader would read under ``root``."""
    root = Path(root)
    found: dict[str, dict[str, Path]] = {}
    for kind, sub, fname in (("gemm", "gemm", "data.csv"), ("decode", "mha/decode", None),
                             ("prefill", "mha/prefill", None), ("allreduce", "allreduce", "data.csv")):
        base = root / sub
        if not base.is_dir():
            continue
        for d in sorted(p for p in base.iterdir() if p.is_dir()):
            path = d / fname if fname else d
            if (fname and path.is_file()) or (not fname and any(d.glob("*.csv"))):
                found.setdefault(d.name, {})[kind] = path
    return found


def measured_cells(kind: str, path: Path) -> pd.DataFrame:
    """The loader's measured grid cells of one table (duplicates at their minimum, as the loader keeps)."""
    if kind == "gemm":
        _, df, _ = load_gemm(Path(path))
        return df.groupby(["dtype", "k", "n", "m"], as_index=False)["latency_us"].min()
    if kind in LENGTH:
        table, _, df, _ = load_attention(Path(path), kind)
        if table is None:
            return pd.DataFrame(columns=["hq", "hkv", "d", LENGTH[kind], "batch_size", "latency_us"])
        return df.groupby(["hq", "hkv", "d", LENGTH[kind], "batch_size"], as_index=False)["latency_us"].min()
    if kind == "allreduce":
        _, df = load_allreduce(Path(path))
        return df.groupby(["num_gpus", "message_bytes"], as_index=False)["latency_us"].min()
    raise ValueError(kind)


# ---------------------------------------------------------------- leave-one-out

@dataclass(frozen=True)
class _Spec:
    series: tuple[str, ...]  # columns identifying the interpolated series a cell belongs to
    axes: tuple[str, ...]  # grid axes whose union over all series the loader uses


SPECS = {"gemm": _Spec(("k", "n"), ("m",)),
         "decode": _Spec(("hq", "hkv", "d"), ("kv_len", "batch_size")),
         "prefill": _Spec(("hq", "hkv", "d"), ("seq_len", "batch_size")),
         "allreduce": None}  # small: rebuilt whole


def reduced_cells(cells: pd.DataFrame, i, kind: str) -> pd.DataFrame:
    """``cells`` without row ``i``, cut down to row i's series plus one carrier cell for every grid value
    the series lacks (see the module docstring).  The whole rest when the series would be empty."""
    rest = cells.drop(index=i)
    spec = SPECS[kind]
    if spec is None:
        return rest
    mask = np.ones(len(rest), bool)
    for c in spec.series:
        mask &= rest[c].to_numpy() == cells.at[i, c]
    series, others = rest[mask], rest[~mask]
    if series.empty:
        return rest
    keep = []
    for ax in spec.axes:
        have = set(series[ax]) | set(others.loc[keep, ax]) if keep else set(series[ax])
        for v in sorted(set(others[ax]) - have):
            keep.append(others.index[np.argmax(others[ax].to_numpy() == v)])
    return pd.concat([series, others.loc[keep]])


def _write_table(kind: str, cells: pd.DataFrame, folder: Path) -> Path:
    """Write ``cells`` into ``folder`` in the bench_data schema; return what the builder reads."""
    if kind == "gemm":
        p = folder / "data.csv"
        cells[["m", "k", "n", "latency_us", "dtype"]].to_csv(p, index=False)
        return p
    if kind == "allreduce":
        p = folder / "data.csv"
        cells[["num_gpus", "message_bytes", "latency_us"]].to_csv(p, index=False)
        return p
    d = folder / kind
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    cols = ["batch_size", LENGTH[kind], "latency_us"]
    for (hq, hkv, hd), g in cells.groupby(["hq", "hkv", "d"]):
        out = g[cols].assign(dtype="bf16")
        if kind == "decode":
            out = out.assign(kv_dtype="bf16")
        out.to_csv(d / f"{int(hq)}-{int(hkv)}-{int(hd)}.csv", index=False)
    return d


def predict_from_cells(kind: str, cells: pd.DataFrame, query: pd.Series, folder: Path) -> float:
    """Build the table of ``cells`` with the loader and predict the cell ``query``."""
    path = _write_table(kind, cells, folder)
    if kind == "gemm":
        tabs, _, _ = load_gemm(path)
        return float(gemm_table_us(tabs[query["dtype"]], float(query.m), float(query.k), float(query.n)))
    if kind == "allreduce":
        tab, _ = load_allreduce(path)
        return float(comm_table_us(tab, float(query.num_gpus), float(query.message_bytes)))
    tab, heads, _, _ = load_attention(path, kind)
    c = heads.index((int(query.hq), int(query.hkv), int(query.d)))
    hi, lo = SLOPES[kind]
    return float(attn_table_us(tab, c, float(query.batch_size), float(query[LENGTH[kind]]), hi, lo))


def leave_one_out(kind: str, cells: pd.DataFrame, points: int | None = 300, seed: int = 0,
                  full_rebuild: bool = False) -> pd.DataFrame:
    """LOO predictions of (a sample of) ``cells`` of one table kind (GEMM: one dtype).

    Returns the sampled cells with ``predicted_us`` and ``rel_err`` = predicted / measured - 1."""
    cells = cells.reset_index(drop=True)
    idx = np.arange(len(cells))
    if points is not None and len(idx) > points:
        idx = np.sort(np.random.default_rng(seed).choice(idx, points, replace=False))
    pred = np.empty(len(idx))
    with tempfile.TemporaryDirectory(prefix="costmodel-loo-") as tmp:
        for j, i in enumerate(idx):
            red = cells.drop(index=i) if full_rebuild else reduced_cells(cells, i, kind)
            pred[j] = predict_from_cells(kind, red, cells.loc[i], Path(tmp))
    out = cells.loc[idx].copy()
    out["predicted_us"] = pred
    out["rel_err"] = pred / out.latency_us.to_numpy() - 1.0
    return out


def summarize(rel) -> dict:
    rel = np.asarray(rel, float)
    rel = rel[np.isfinite(rel)]
    if rel.size == 0:
        return {"n": 0, "median_abs": np.nan, "p90_abs": np.nan, "bias": np.nan}
    a = np.abs(rel)
    return {"n": int(rel.size), "median_abs": float(np.median(a)), "p90_abs": float(np.percentile(a, 90)),
            "bias": float(np.median(rel))}


def loo_report(roots: list[Path], points: int = 300, seed: int = 0, log=None) -> list[dict]:
    """LOO summary rows for every GPU folder and kernel type under each bench_data root."""
    rows = []
    for root in roots:
        for gpu, kinds in discover(root).items():
            for kind, path in kinds.items():
                try:
                    cells = measured_cells(kind, path)
                except InputError as e:  # one unreadable file: report it, go on with the other tables
                    rows.append({"bench_data": _label(root), "gpu": gpu, "kernel": kind, "cells": 0,
                                 "note": f"not loadable: {e}"})
                    if log:
                        log(f"  LOO {_label(root)} {gpu} {kind}: not loadable: {e}")
                    continue
                groups = cells.groupby("dtype") if kind == "gemm" else [(None, cells)]
                for dtype, g in groups:
                    t0 = time.perf_counter()
                    res = leave_one_out(kind, g, points, seed)
                    label = f"gemm {dtype}" if dtype else kind
                    rows.append({"bench_data": _label(root), "gpu": gpu, "kernel": label, "cells": len(g),
                                 **summarize(res.rel_err)})
                    if log:
                        log(f"  LOO {_label(root)} {gpu} {label}: {len(res)}/{len(g)} cells in "
                            f"{time.perf_counter() - t0:.0f} s")
    return rows


# ---------------------------------------------------------------- fused-MoE curves


@jax.jit
def _loo_along_work_axis(lx, ly):
    """Log latency at each interior node of one curve (log x ``lx``, log y ``ly``, shape [n]) predicted by
    `interp_work_axis` from the other n-1 nodes; shape [n-2]."""
    n = lx.shape[0]
    keep = np.array([[j for j in range(n) if j != i] for i in range(1, n - 1)])  # static: n is a shape
    return jax.vmap(lambda k, q: interp_work_axis(q, lx[k], ly[k], 1.0))(keep, lx[1:-1])


def curve_leave_one_out(df: pd.DataFrame, keys, x: str) -> pd.DataFrame:
    """Every interior point of every curve (rows sharing ``keys``, ascending along column ``x``) with
    ``predicted_us`` from the rest of its curve and ``rel_err`` = predicted / measured - 1."""
    parts = []
    for _, c in df.groupby(list(keys), sort=False):
        if len(c) < 3:
            continue
        c = c.sort_values(x)
        lx = jnp.log(jnp.asarray(c[x].to_numpy(float)))
        ly = jnp.log(jnp.asarray(c["latency_us"].to_numpy(float)))
        pred = np.exp(np.asarray(_loo_along_work_axis(lx, ly)))
        inner = c.iloc[1:-1].copy()
        inner["predicted_us"] = pred
        parts.append(inner)
    if not parts:
        return df.iloc[:0].assign(predicted_us=[], rel_err=[])
    out = pd.concat(parts)
    out["rel_err"] = out["predicted_us"] / out["latency_us"] - 1.0
    return out


def moe_leave_one_out(df: pd.DataFrame) -> pd.DataFrame:
    """`curve_leave_one_out` of a `tables.load_moe` frame along num_tokens."""
    return curve_leave_one_out(df, MOE_SHAPE_COLUMNS, "num_tokens")


def mla_loo_report(roots: list[Path], log=None) -> list[dict]:
    """MLA-module LOO along the length (seq_len / kv_len) per bench_data root, GPU, kind, kv and GEMM dtype."""
    rows = []
    for root in roots:
        for kind, length in MLA_KINDS.items():
            for folder in sorted(p for p in (Path(root) / "mla" / kind).glob("*") if (p / "data.csv").is_file()):
                try:
                    df = load_mla(folder.name, kind, root)
                except InputError as e:
                    rows.append({"bench_data": _label(root), "gpu": folder.name, "kind": kind, "note": f"not loadable: {e}"})
                    continue
                res = curve_leave_one_out(df, MLA_CURVE_COLUMNS, length)
                for (kv, gd), g in res.groupby(["kv_dtype", "gemm_dtype"]):
                    sub = df[(df.kv_dtype == kv) & (df.gemm_dtype == gd)]
                    rows.append({"bench_data": _label(root), "gpu": folder.name, "kind": kind, "kv_dtype": kv,
                                 "gemm_dtype": gd, "kernels": " ".join(sorted(sub.kernel.unique())),
                                 "curves": int(sub.groupby(list(MLA_CURVE_COLUMNS)).ngroups), **summarize(g.rel_err)})
    return rows


def moe_loo_report(roots: list[Path], log=None) -> list[dict]:
    """MoE LOO summary rows per bench_data root, GPU and dtype."""
    rows = []
    for root in roots:
        for folder in sorted(p for p in (Path(root) / "moe").glob("*") if (p / "data.csv").is_file()):
            t0 = time.perf_counter()
            try:
                df = load_moe(folder.name, root)
            except InputError as e:
                rows.append({"bench_data": _label(root), "gpu": folder.name, "dtype": "–", "note": f"not loadable: {e}"})
                continue
            res = moe_leave_one_out(df)
            for dtype, g in res.groupby("dtype"):
                rows.append({"bench_data": _label(root), "gpu": folder.name, "dtype": dtype,
                             "curves": int(df[df["dtype"] == dtype].groupby(list(MOE_SHAPE_COLUMNS)).ngroups),
                             **summarize(g.rel_err)})
            if log:
                log(f"  MoE LOO {_label(root)} {folder.name}: {len(res)} points in {time.perf_counter() - t0:.0f} s")
    return rows


# ---------------------------------------------------------------- pricing (as `costmodel kernels`)

def price_gemm(tables, m, k, n, dtype: str) -> np.ndarray:
    """`apps.kernel_calls._gemm` vectorized: GEMM time (µs) of each (m, k, n) in ``dtype``."""
    p, c = Params(), kt.choose_gemm_table(tables, dtype)
    table, wb, twb = tables.gemm[c.table_dtype], float(DTYPE_BYTES[dtype]), float(DTYPE_BYTES[c.table_dtype])
    f = jax.jit(jax.vmap(lambda m, k, n: kt.gemm_us(table, ops.Gemm(m, k, n), wb, twb, c.hw, p,
                                                         c.same_dtype, c.compute_ratio)))
    return np.asarray(f(*(jnp.asarray(np.asarray(v, np.float32)) for v in (m, k, n))), float)


def price_attention(tables, kind: str, pts: pd.DataFrame) -> np.ndarray:
    """`apps.kernel_calls` attention pricing of each row (hq, hkv, d per GPU, batch_size, kv_len|seq_len)."""
    p = Params()
    table, layouts = getattr(tables, kind), getattr(tables, f"{kind}_heads")
    c, s = np.zeros(len(pts), np.int32), np.zeros(len(pts), np.float32)
    cd = np.zeros(len(pts), np.int32)  # decode layout: the attention kernel's fixed cost
    for (hq, hkv, d), g in pts.groupby(["hq", "hkv", "d"]):  # nearest measured layout, as apps.kernel_calls
        i = pts.index.get_indexer(g.index)
        c[i], s[i] = nearest_layout(layouts, float(hq), float(hkv), float(d), kind)
        cd[i] = nearest_layout(tables.decode_heads, float(hq), float(hkv), float(d), "decode")[0]
    if kind == "decode":
        def one(c, s, b, L):
            return kt.attn_decode_us(table, c, s, b, b * L, p)
    else:
        dims = ops.Dims(0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, ops.NO_WINDOW, 0.0)  # pairs use the window only

        def one(c, s, b, L, c_dec):
            return kt.attn_prefill_call_us(table, c, s, tables.decode, c_dec, b,
                                                ops.prefill_pairs(dims, L, 0.0) * b, p)
    args = (c, s, pts.batch_size.to_numpy(np.float32), pts[LENGTH[kind]].to_numpy(np.float32))
    if kind == "decode":
        return np.asarray(jax.jit(jax.vmap(one))(*(jnp.asarray(a) for a in args)), float)
    return np.asarray(jax.jit(jax.vmap(one))(*(jnp.asarray(a) for a in args + (cd,))), float)


def _in_range_gemm(pts, ref):
    ok = np.ones(len(pts), bool)
    for c in ("m", "k", "n"):  # noqa: B007
        ok &= (pts[c].to_numpy() >= ref[c].min()) & (pts[c].to_numpy() <= ref[c].max())
    return ok


def _in_range_attn(pts, ref, kind):
    col, ok = LENGTH[kind], np.zeros(len(pts), bool)
    for key, r in ref.groupby(["hq", "hkv", "d"]):
        m = ((pts.hq == key[0]) & (pts.hkv == key[1]) & (pts.d == key[2])).to_numpy().copy()
        m &= (pts[col].to_numpy() >= r[col].min()) & (pts[col].to_numpy() <= r[col].max())
        m &= (pts.batch_size.to_numpy() >= r.batch_size.min()) & (pts.batch_size.to_numpy() <= r.batch_size.max())
        ok |= m
    return ok


def cross_source(root_a: Path, root_b: Path, gpu_name: str = "H100") -> list[dict]:
    """Points of each source priced from the other source's tables (both directions)."""
    gpu = get_gpu(gpu_name)
    tables = {r: load_tables(r, gpu) for r in (root_a, root_b)}
    cells = {r: {k: measured_cells(k, Path(t.sources[k])).reset_index(drop=True) for k in ("gemm", "decode", "prefill")}
             for r, t in tables.items()}
    rows = []
    for pts_root, tab_root in ((root_a, root_b), (root_b, root_a)):
        tab, pts, ref = tables[tab_root], cells[pts_root], cells[tab_root]
        for dtype, g in pts["gemm"].groupby("dtype"):
            pred = price_gemm(tab, g.m, g.k, g.n, dtype)
            tdt = dtype if dtype in tab.gemm else sorted(tab.gemm)[0]
            ok = _in_range_gemm(g, ref["gemm"][ref["gemm"].dtype == tdt])
            via = "" if tdt == dtype else f" (from {tdt} table)"
            rows.append(_cross_row(pts_root, tab_root, f"gemm {dtype}{via}", pred / g.latency_us.to_numpy() - 1, ok))
        for kind in ("decode", "prefill"):
            g = pts[kind]
            pred = price_attention(tab, kind, g)
            ok = _in_range_attn(g, ref[kind], kind)
            rows.append(_cross_row(pts_root, tab_root, kind, pred / g.latency_us.to_numpy() - 1, ok))
    return rows


def _cross_row(pts_root, tab_root, kernel, rel, ok) -> dict:
    rel = np.asarray(rel, float)
    a, b = summarize(rel), summarize(rel[ok])
    return {"points": _label(pts_root), "tables": _label(tab_root), "kernel": kernel,
            "n": a["n"], "median_abs": a["median_abs"], "p90_abs": a["p90_abs"], "bias": a["bias"],
            "n_in_range": b["n"], "in_range_median_abs": b["median_abs"], "in_range_p90_abs": b["p90_abs"],
            "in_range_bias": b["bias"]}


def floors(roots: list[Path], gpu_name: str = "H100") -> list[dict]:
    """Smallest measured times: the fixed cost each source's kernels (and timing method) carry."""
    rows = []
    for root in roots:
        t = load_tables(root, get_gpu(gpu_name))
        g = measured_cells("gemm", Path(t.sources["gemm"]))
        row = {"bench_data": _label(root), "gpu": Path(t.sources["gemm"]).parent.name}
        for dt, gg in g.groupby("dtype"):
            row[f"gemm {dt} min"] = float(gg.latency_us.min())
        for kind in ("decode", "prefill"):
            c = measured_cells(kind, Path(t.sources[kind]))
            mins = c.groupby(["hq", "hkv", "d"]).latency_us.min()
            row[f"{kind} min (median over layouts)"] = float(mins.median())
            row[f"{kind} smallest {LENGTH[kind]}"] = int(c[LENGTH[kind]].min())
        rows.append(row)
    return rows


def collection_report(gpu: str, measured: list[Path] = (), dtype: str = "bf16",
                      systems_dir: Path | None = None) -> list[dict]:
    """AIConfigurator's engine collections of one GPU's ``dtype`` GEMM against the newest vLLM one (the
    default import), and ``measured`` bench_data folders against every collection, at shapes both hold.
    Each row: latency ratio (row's source / ``over``), median and 10th/90th percentiles, as text."""
    cols = gemm_collections(gpu, dtype, systems_dir)
    vllm = sorted((c for c in cols if c.startswith("vllm/")), key=lambda c: _safe_version_key(c.split("/", 1)[1]))
    ref = vllm[-1] if vllm else cols.columns[0]

    def row(what, against, num, den):
        r = (num / den).dropna()
        q = [f"{r.quantile(x):.3f}" if len(r) else "–" for x in (0.5, 0.1, 0.9)]
        return {"gpu": gpu, "latency of": what, "over": against, "shapes": int(len(r)),
                "median": q[0], "p10": q[1], "p90": q[2]}

    rows = [row(c, ref, cols[c], cols[ref]) for c in cols if c != ref]
    for root in measured:
        path = Path(root) / "gemm" / gpu / "data.csv"
        pts = measured_cells("gemm", path)
        pts = pts[pts.dtype == dtype].set_index(["m", "n", "k"]).latency_us
        rows += [row(_label(root), c, pts, cols[c].reindex(pts.index)) for c in cols]
    return rows


# ---------------------------------------------------------------- output

def _label(root: Path) -> str:
    root = Path(root).resolve()
    if root == default_bench_data().resolve():
        return "repo"
    try:
        return os.path.relpath(root)
    except ValueError:
        return str(root)


def markdown(rows: list[dict], pct: tuple[str, ...] = ()) -> str:
    if not rows:
        return "(none)\n"
    cols = list(dict.fromkeys(c for r in rows for c in r))

    def fmt(c, v):
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return "–"
        if c in pct:
            return f"{100 * v:+.1f} %" if "bias" in c else f"{100 * v:.1f} %"
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(c, r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


PCT = ("median_abs", "p90_abs", "bias", "in_range_median_abs", "in_range_p90_abs", "in_range_bias")


def _shared_bench_data() -> Path | None:
    base = Path(os.environ.get("COSTMODEL_SHARED", default_bench_data().parent.parent / "shared"))
    return base / "bench_data" if (base / "bench_data").is_dir() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description="Leave-one-out interpolation error of kernel tables, "
                                 "and the H100 cross-source error between two bench_data folders.")
    ap.add_argument("--bench-data", action="append", type=Path,
                    help="bench_data folder (repeatable); default: the repo's and ../shared/bench_data "
                         "(or $COSTMODEL_SHARED/bench_data) when present")
    ap.add_argument("--points", type=int, default=300, help="cells sampled per kernel type (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-loo", action="store_true")
    ap.add_argument("--no-cross", action="store_true")
    ap.add_argument("--no-moe", action="store_true", help="skip the fused-MoE and MLA curves' leave-one-out")
    ap.add_argument("--cross", nargs=2, type=Path, metavar=("A", "B"),
                    help="the two bench_data folders of the cross-source check (default: the first two)")
    ap.add_argument("--gpu", default="H100", help="GPU of the cross-source check and kernel floors (default H100)")
    ap.add_argument("--collections", action="append", default=[], metavar="GPU",
                    help="compare AIConfigurator's engine collections of this GPU's bf16 GEMM (e.g. h100_sxm; "
                         "needs aiconfigurator-core) with each other and with bench_data/measured/*")
    ap.add_argument("--out", type=Path, help="also write the markdown report here")
    args = ap.parse_args(argv)
    roots = args.bench_data or [r for r in (default_bench_data(), _shared_bench_data()) if r is not None]
    for r in roots:
        if not r.is_dir():
            print(f"{PROG}: error: bench_data folder {r} does not exist", file=sys.stderr)
            return 2
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    parts = [f"Command: `{' '.join([PROG] + (argv if argv is not None else sys.argv[1:]))}`\n"]
    try:
        if not args.no_loo:
            rows = loo_report(roots, args.points, args.seed, log)
            parts += [f"\n### Leave-one-out interpolation error (up to {args.points} random cells per kernel "
                      f"type, seed {args.seed})\n\n", markdown(rows, PCT)]
        if not args.no_moe:
            rows = moe_loo_report(roots, log)
            parts += ["\n### Fused MoE: leave-one-out along num_tokens (every interior point of every curve)\n\n",
                      markdown(rows, PCT)]
            parts += ["\n### MLA modules: leave-one-out along the length (every interior point of every curve)\n\n",
                      markdown(mla_loo_report(roots, log), PCT)]
        cross = args.cross or (roots[:2] if len(roots) >= 2 else None)
        if not args.no_cross and cross:
            parts += [f"\n### {args.gpu} cross-source error (points of one folder priced from the other's "
                      "tables)\n\n", markdown(cross_source(*cross, gpu_name=args.gpu), PCT),
                      "\n### Kernel floors (smallest measured µs)\n\n", markdown(floors(list(cross), args.gpu))]
        for gpu in args.collections:
            measured = sorted(p for p in (default_bench_data() / "measured").glob("*")
                              if (p / "gemm" / gpu / "data.csv").is_file())
            parts += [f"\n### {gpu}: bf16 GEMM, engine collections and our measurements (latency ratios)\n\n",
                      markdown(collection_report(gpu, measured))]
    except (InputError, RuntimeError) as e:  # RuntimeError: aiconfigurator-core not installed
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    text = "".join(parts)
    print(text)
    if args.out:
        write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
