"""What the kernel tables of one GPU cover, per op and precision (`costmodel tables`' ``coverage``)."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from ..tables import MLA_CURVE_COLUMNS, MLA_KINDS, Tables, load_mla, load_moe, moe_shapes


def _range(values) -> str:
    v = sorted(set(int(x) for x in values))
    return f"{v[0]}..{v[-1]} ({len(v)} values)" if v else "none"


def gemm_coverage(df: pd.DataFrame) -> dict:
    """Per dtype: measured (k, n) shapes, m range, rows."""
    out = {}
    for dt, g in df.groupby("dtype"):
        out[str(dt)] = {"shapes_kn": int(g.groupby(["k", "n"]).ngroups), "m": _range(g["m"]), "rows": int(len(g))}
    return out


def attention_coverage(df: pd.DataFrame, kind: str) -> dict:
    """The head layouts (file names: ``hq-hkv-d`` per GPU, or ``-tpT`` for full-model heads under TP T), and
    per (dtype, kv dtype) how many of them and the length and batch ranges."""
    length = "kv_len" if kind == "decode" else "seq_len"
    keys = ["dtype", "kv_dtype"] if "kv_dtype" in df.columns else ["dtype"]
    out = {"layouts": sorted(df["layout"].unique(), key=lambda s: tuple(int(x) for x in re.findall(r"\d+", s)))}
    for k, g in df.groupby(keys):
        label = "/".join(map(str, k if isinstance(k, tuple) else (k,)))
        out[label] = {"layouts": int(g["layout"].nunique()), length: _range(g[length])}
        if "batch_size" in g.columns:
            out[label]["batch_size"] = _range(g["batch_size"])
    return out


def allreduce_coverage(df: pd.DataFrame) -> dict:
    """Per kernel: the GPU counts and the message size range (bytes)."""
    return {str(k): {"num_gpus": sorted(int(x) for x in g["num_gpus"].unique()),
                     "message_bytes": _range(g["message_bytes"])} for k, g in df.groupby("kernel")}


def moe_coverage(df: pd.DataFrame) -> dict:
    """Per dtype: (hidden, inter, experts, topk) shapes with their moe_tp x moe_ep pairs, distributions,
    kernels and the num_tokens range."""
    out = {}
    for dt, g in df.groupby("dtype"):
        s = moe_shapes(g)
        shapes = {}
        for (h, i, e, k), c in s.groupby(["hidden_size", "inter_size", "num_experts", "topk"]):
            pairs = sorted({(int(a), int(b)) for a, b in zip(c.moe_tp, c.moe_ep)})
            shapes[f"{h}/{i}/{e}x{k}"] = " ".join(f"{a}x{b}" for a, b in pairs)
        out[str(dt)] = {"curves": int(len(s)), "shapes (hidden/inter/experts x topk: tp x ep)": shapes,
                        "distributions": sorted(g["distribution"].unique()), "kernels": sorted(g["kernel"].unique()),
                        "num_tokens": _range(g["num_tokens"])}
    return out


def mla_coverage(df: pd.DataFrame, kind: str) -> dict:
    """Per (dtype, kv dtype, GEMM dtype): heads, batch sizes, length range, kernels."""
    length = MLA_KINDS[kind]
    out = {}
    for k, g in df.groupby(["dtype", "kv_dtype", "gemm_dtype"]):
        out["/".join(k)] = {"curves": int(g.groupby(list(MLA_CURVE_COLUMNS)).ngroups),
                            "num_heads": sorted(int(x) for x in g["num_heads"].unique()),
                            "batch_size": _range(g["batch_size"]), length: _range(g[length]),
                            "kernels": sorted(g["kernel"].unique())}
    return out


def _attention_files(folder: Path) -> pd.DataFrame:
    """Every row of an attention folder's CSVs (all dtypes, not only those the step model reads), with the
    file's name as ``layout``."""
    parts = [pd.read_csv(f).assign(layout=f.stem) for f in sorted(folder.glob("*.csv"))]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def coverage(t: Tables, root: str | Path | None = None) -> dict:
    """Coverage per op and precision of the GPU's tables: the files `load_tables` read into ``t`` (every
    dtype in them, also those the step model does not read) plus the fused-MoE and MLA tables under
    ``root`` (default: ``t.root``); an op without a table is absent."""
    root = Path(root) if root is not None else t.root
    out = {}
    if "gemm" in t.measured:
        out["gemm"] = gemm_coverage(t.measured["gemm"])
    for kind in ("decode", "prefill"):
        src = t.sources.get(kind)
        rows = _attention_files(Path(src)) if src else pd.DataFrame()
        if len(rows) and "dtype" in rows.columns:
            out[f"attention_{kind}"] = attention_coverage(rows, kind)
    src = t.sources.get("allreduce")
    if src:
        ar = pd.read_csv(src)
        out["allreduce"] = allreduce_coverage(ar if "kernel" in ar.columns else ar.assign(kernel="allreduce"))
    name = t.gpu.name
    moe = load_moe(name, root)
    if moe is not None:
        out["moe"] = moe_coverage(moe)
    for kind in MLA_KINDS:
        mla = load_mla(name, kind, root)
        if mla is not None:
            out[f"mla_{kind}"] = mla_coverage(mla, kind)
    return out
