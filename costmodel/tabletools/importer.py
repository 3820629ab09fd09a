"""Import NVIDIA AIConfigurator's measured kernel database into InferSim-schema CSVs.

The PyPI package ``aiconfigurator-core`` (Apache-2.0, NVIDIA) ships measured
per-kernel latencies under ``aiconfigurator_core/systems/data/<system>/<family>/
<framework>/<version>/<table>.parquet`` (older releases used CSV-formatted
``<table>.txt`` files with the same columns; both are read here).  Facts about
the source format that this converter relies on (checked against the package's
collector scripts and the data itself):

* ``latency`` is in **milliseconds** for one kernel call (CUDA-graph replay
  time divided by the number of calls in the graph).
* GEMM (``gemm_perf``): ``y[m, n] = x[m, k] @ W^T`` with W stored ``[n, k]``
  (vLLM ``RowParallelLinear(input_size=k, output_size=n)``); ``gemm_dtype`` is
  ``bfloat16`` / ``fp8`` (per-tensor scaled CUTLASS, activation quant
  included) / ``fp8_block`` (128x128 block-scaled, several kernels) / ``nvfp4``.
* Context attention (``context_attention_perf``): ``batch_size`` sequences of
  ``isl`` new tokens each, causal, ``step`` = cached prefix (always 0 here).
  ``num_heads`` / ``num_key_value_heads`` are per-GPU head counts.
* Generation attention (``generation_attention_perf``): ``isl`` = 1 query
  token, ``step`` = sequence length held in the paged KV cache including the
  new token (collector: ``seq_lens=[step]``, ``query_lens=[1]``); grid values
  are ``2**j - 1``.
* All-reduce (``custom_allreduce_perf`` and ``nccl_perf``): ``message_size`` is
  the number of **elements** per GPU (the nccl collector divides nccl-tests'
  byte size by the element size), so bytes = elements * sizeof(dtype).
* MLA modules (``mla_context_module_perf``, ``mla_generation_module_perf``):
  vLLM's whole MLA attention block of one layer on one GPU for DeepSeek-V3's
  geometry, ``num_heads`` = heads on that GPU (``tp_size`` is always 1);
  context: ``batch_size`` sequences of ``isl`` new tokens (``step`` 0);
  generation: one new token per sequence, ``step`` = KV length.  In
  AIConfigurator it stands in for the q/kv projections, the attention and
  the output projection together (``sdk/models/deepseek.py``).
* Fused MoE (``moe_perf``): one GPU's expert computation of one MoE layer
  (grouped gate/up GEMM, activation, grouped down GEMM) for ``num_tokens``
  tokens, each routed to ``topk`` of ``num_experts`` experts, the GPU holding
  ``num_experts / moe_ep_size`` experts with ``inter_size / moe_tp_size`` of
  each one's intermediate width.  ``num_tokens`` counts the tokens of all
  attention-DP ranks feeding the layer: AIConfigurator's MoE op looks the
  table up at (tokens on one attention rank) x ``attention_dp_size``.  The
  router GEMM, shared experts and the EP dispatch/combine are separate ops
  (``sdk/models/blocks/moe.py``), not in this time.  ``distribution`` is the
  expert-load skew the collector drew the routing from.

The package is optional: it is imported inside :func:`import_aiconfigurator`
only when no explicit ``systems_dir`` is given.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
import sys
import tempfile
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distribution_version
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ..errors import InputError
from ..hardware import find_gpu
from ..io import check_output_dir, number, refuse_overwrite, write_frame, write_provenance
from ..ops import per_gpu_layouts

__all__ = [
    "DEFAULT_HEAD_LAYOUTS",
    "GPU_ALIASES",
    "add_arguments",
    "import_aiconfigurator",
    "loglog_subsample",
    "run",
]

PACKAGE = "aiconfigurator-core"
_MISSING_MSG = "aiconfigurator-core is not installed: pip install 'costmodel[aiconfigurator]'"

GPU_ALIASES = {
    "h100": "h100_sxm",
    "h200": "h200_sxm",
    "b200": "b200_sxm",
    "b300": "b300_sxm",
    "a100": "a100_sxm",
}

# Source dtype -> output dtype.  ``fp8`` is vLLM's per-tensor FP8 path
# (CutlassFP8ScaledMMLinearKernel: what ``--quantization fp8`` and per-tensor
# FP8 checkpoints use).  ``fp8_block`` (DeepSeek-style 128x128 block scales,
# several competing kernels) and ``nvfp4`` are not exported.
GEMM_DTYPES = {"bfloat16": "bf16", "fp8": "fp8"}
# Source MoE dtype -> output dtype (``w4a8_mxfp4_mxfp8`` and other source dtypes are not exported).
MOE_DTYPES = {"bfloat16": "bf16", "fp8": "fp8", "fp8_block": "fp8_block", "int4_wo": "int4_wo",
              "w4a16_mxfp4": "mxfp4", "nvfp4": "nvfp4"}
# The expert-load distributions AIConfigurator's model classes query: power_law with alpha 1.2 (MOEModel:
# Mixtral, Qwen3-MoE, gpt-oss, ...) and alpha 1.01 (DeepSeek, Kimi, MiniMax-M3, Nemotron-H, hybrid MoE).
# ``balanced`` is only read when a user overrides the workload distribution, so it is left out by default.
MOE_DISTRIBUTIONS = ("power_law_1.01", "power_law_1.2")
MOE_COLUMNS = ["dtype", "num_tokens", "hidden_size", "inter_size", "num_experts", "topk", "moe_tp", "moe_ep",
               "distribution", "latency_us", "kernel"]
MOE_MIN_POINTS = 3
MOE_SHAPE = ["dtype", "hidden_size", "inter_size", "num_experts", "topk", "moe_tp", "moe_ep", "distribution"]
ATTN_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "fp8": "fp8", "half": "fp16"}
COMM_DTYPES = {"bfloat16": ("bf16", 2), "float16": ("fp16", 2), "half": ("fp16", 2),
               "float32": ("fp32", 4), "int8": ("int8", 1)}

ENGINE_FALLBACK = ("vllm", "sglang", "trtllm")

# (name, query heads, kv heads, head_dim) of common models: dense, then mixture-of-experts.
COMMON_MODELS = (
    ("Llama-2-7B", 32, 32, 128),
    ("Llama-3-8B / Mistral-7B / Qwen3-8B / Mistral-Nemo / Mixtral-8x7B", 32, 8, 128),
    ("Llama-2/3-70B / CodeLlama-34B", 64, 8, 128),
    ("Qwen2.5-7B", 28, 4, 128),
    ("Qwen3-14B", 40, 8, 128),
    ("Yi-34B", 56, 8, 128),
    ("Qwen2.5-1.5B", 12, 2, 128),
    ("Qwen2.5-3B", 16, 2, 128),
    ("Mixtral-8x22B / MiniMax-M2.5", 48, 8, 128),
    ("Qwen3-30B-A3B", 32, 4, 128),
    ("Qwen3-235B-A22B", 64, 4, 128),
    ("gpt-oss-20b / gpt-oss-120b", 64, 8, 64),
)


# their per-GPU (hq, hkv, d) at TP 1, 2, 4 and 8
DEFAULT_HEAD_LAYOUTS = per_gpu_layouts([(hq, hkv, d) for _, hq, hkv, d in COMMON_MODELS], (1, 2, 4, 8))


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _version_key(v: str):
    try:
        from packaging.version import Version

        return (0, Version(v))
    except Exception:  # non-PEP440 names sort after by their numbers
        return (1, tuple(int(x) for x in re.findall(r"\d+", v)), v)


def _safe_version_key(v: str):
    # Mixed (Version, tuple) keys are not comparable; map everything to a tuple.
    k = _version_key(v)
    if k[0] == 0:
        rel = k[1].release
        pre = k[1].pre
        return (rel, 0 if pre else 1, pre[1] if pre else 0, k[1].dev is None)
    return (k[1], 0, 0, False)


def _table_path(vdir: Path, table: str) -> Path | None:
    for ext in (".parquet", ".txt", ".csv"):
        p = vdir / f"{table}{ext}"
        if p.is_file():
            return p
    return None


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    df = pd.read_csv(path, skipinitialspace=True)
    df.columns = [c.strip() for c in df.columns]
    return df


def _find_table(sysdata: Path, family: str, engine: str, table: str, version: str | None):
    """Return (engine, version, path, note) of the table to use, or None."""
    engines = [engine] + [e for e in ENGINE_FALLBACK if e != engine]
    for eng in engines:
        edir = sysdata / family / eng
        if not edir.is_dir():
            continue
        cands = []
        for vdir in edir.iterdir():
            p = _table_path(vdir, table) if vdir.is_dir() else None
            if p is not None:
                cands.append((vdir.name, p))
        if not cands:
            continue
        cands.sort(key=lambda c: _safe_version_key(c[0]))
        note = ""
        if version is None:
            ver, path = cands[-1]
        else:
            exact = [c for c in cands if c[0] == version]
            if exact:
                ver, path = exact[0]
            else:
                older = [c for c in cands if _safe_version_key(c[0]) <= _safe_version_key(version)]
                if not older:
                    continue
                ver, path = older[-1]
                note = f"version {version} not measured for {family}/{table}; used {ver}"
        if eng != engine:
            note = (note + "; " if note else "") + f"no {engine} data for {family}/{table}; used {eng}"
        return eng, ver, path, note
    return None


def _read_peaks(systems_dir: Path, gpu: str) -> tuple[dict, str]:
    """Dense peak FLOP/s by dtype for ``mfu``: the system YAML's, else `costmodel.hardware`'s."""
    known = find_gpu(gpu)
    peaks = known.dense_peaks() if known is not None else {}
    src = "costmodel.hardware"
    y = systems_dir / f"{gpu}.yaml"
    if y.is_file():
        found = {}
        for line in y.read_text().splitlines():
            m = re.match(r"\s*(bfloat16|fp8)_tc_flops:\s*([0-9.eE+]+)", line)
            if m:
                found["bf16" if m.group(1) == "bfloat16" else "fp8"] = float(m.group(2))
        if found:
            peaks.update(found)
            src = f"systems/{gpu}.yaml"
    return peaks, src


def _runtime_meta(path: Path) -> str:
    meta = path.parent / "collection_meta.yaml"
    if not meta.is_file():
        return ""
    txt = meta.read_text()
    m = re.search(r"runtime:\s*\n\s*framework:\s*(\S+)\s*\n\s*version:\s*(\S+)", txt)
    return f"{m.group(1)} {m.group(2)}" if m else ""


def _median_dedup(df: pd.DataFrame, keys: list[str], value: str = "latency") -> tuple[pd.DataFrame, int]:
    n0 = len(df)
    out = df.groupby(keys, as_index=False, sort=True)[value].median()
    return out, n0 - len(out)


def loglog_subsample(x: np.ndarray, Y: np.ndarray, tol: float) -> np.ndarray:
    """Boolean keep-mask over the sorted grid ``x`` (shape [n]) shared by all
    curves ``Y`` (shape [c, n]): Douglas-Peucker in log-log space.  End points
    are kept; a segment's interior is dropped only when log-log linear
    interpolation between the segment ends reproduces every interior point of
    every curve within relative error ``tol``; otherwise the worst point is
    kept and both halves are refined.  So every dropped point is reconstructed
    within ``tol`` from its final kept neighbours."""
    x = np.asarray(x, dtype=float)
    Y = np.atleast_2d(np.asarray(Y, dtype=float))
    n = x.size
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return keep
    keep[0] = keep[-1] = True
    lx, lY = np.log(x), np.log(Y)
    stack = [(0, n - 1)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        t = (lx[i + 1 : j] - lx[i]) / (lx[j] - lx[i])
        pred = lY[:, [i]] + (lY[:, [j]] - lY[:, [i]]) * t
        err = np.abs(np.expm1(pred - lY[:, i + 1 : j])).max(axis=0)
        w = int(np.argmax(err))
        if err[w] > tol:
            k = i + 1 + w
            keep[k] = True
            stack += [(i, k), (k, j)]
    return keep


def _interp_errors(x, Y, keep) -> np.ndarray:
    """Relative errors of the dropped points reconstructed from kept ones."""
    lx, lY = np.log(np.asarray(x, float)), np.log(np.atleast_2d(np.asarray(Y, float)))
    drop = ~keep
    if not drop.any():
        return np.zeros(0)
    errs = [np.abs(np.expm1(np.interp(lx[drop], lx[keep], row[keep]) - row[drop])) for row in lY]
    return np.concatenate(errs)


def _sig(v: float, digits: int) -> str:
    """``v`` rounded to ``digits`` significant digits, positional notation."""
    return np.format_float_positional(float(v), precision=digits, unique=True, fractional=False, trim="-")


def _fmt_csv(df: pd.DataFrame, path: Path, float_cols: dict[str, int]) -> int:
    """Write ``df`` with the given columns rounded to N significant digits; returns the file's size."""
    df = df.copy()
    for c, digits in float_cols.items():
        df[c] = [_sig(v, digits) for v in df[c].to_numpy()]
    return write_frame(path, df, lineterminator="\n").stat().st_size


# --------------------------------------------------------------------------
# converters (pure pandas; unit-tested on synthetic frames)
# --------------------------------------------------------------------------


def convert_gemm(src: pd.DataFrame, peaks: dict, tol: float | None = 0.015):
    """Source gemm_perf rows -> (m,k,n,latency_us,mfu,dtype) frame + stats."""
    df = src[src["gemm_dtype"].isin(GEMM_DTYPES)].copy()
    df["dtype"] = df["gemm_dtype"].map(GEMM_DTYPES)
    df = df[df["dtype"].isin(peaks)]
    df, ndup = _median_dedup(df, ["dtype", "n", "k", "m"])
    stats = {"source_rows": int(len(src)), "duplicates_merged": int(ndup), "dtypes": {}}
    parts = []
    for dt, g in df.groupby("dtype", sort=True):
        g = g.sort_values(["n", "k", "m"])
        st = {"rows": int(len(g)), "m_values": int(g["m"].nunique()), "curves": int(g.groupby(["n", "k"]).ngroups)}
        if tol is not None:
            masks, errs = [], []
            for _, c in g.groupby(["n", "k"], sort=False):
                ms, lat = c["m"].to_numpy(), c["latency"].to_numpy()[None]
                keep = loglog_subsample(ms, lat, tol) if len(ms) > 2 else np.ones(len(ms), bool)
                masks.append(keep)
                errs.append(_interp_errors(ms, lat, keep))
            g = g[np.concatenate(masks)]
            errs = np.concatenate(errs) if errs else np.zeros(0)
            st.update(
                rows_kept=int(len(g)),
                drop_err_max=float(errs.max()) if errs.size else 0.0,
                drop_err_median=float(np.median(errs)) if errs.size else 0.0,
            )
        else:
            st.update(rows_kept=int(len(g)))
        stats["dtypes"][dt] = st
        parts.append(g)
    out = pd.concat(parts) if parts else df.iloc[:0]
    out = out.assign(latency_us=out["latency"] * 1e3)
    peak = out["dtype"].map(peaks).astype(float)
    out["mfu"] = 2.0 * out["m"] * out["k"] * out["n"] / (out["latency_us"] * 1e-6 * peak)
    stats["max_mfu"] = float(out["mfu"].max()) if len(out) else 0.0
    stats["rows_mfu_gt_1"] = int((out["mfu"] > 1.0).sum())
    out = out.sort_values(["dtype", "n", "k", "m"])[["m", "k", "n", "latency_us", "mfu", "dtype"]]
    return out.reset_index(drop=True), stats


def _attn_filter(src: pd.DataFrame) -> pd.DataFrame:
    df = src
    if "window_size" in df:
        df = df[df["window_size"] == 0]
    if "beam_width" in df:
        df = df[df["beam_width"] == 1]
    return df


def _layout_mask(df: pd.DataFrame, layouts) -> pd.Series:
    if layouts == "all":
        return pd.Series(True, index=df.index)
    keys = set(map(tuple, layouts))
    trip = zip(df["num_heads"], df["num_key_value_heads"], df["head_dim"])
    return pd.Series([t in keys for t in trip], index=df.index)


def convert_decode(src: pd.DataFrame, bf16_peak: float, layouts=DEFAULT_HEAD_LAYOUTS):
    """generation_attention rows -> {(hq,hkv,d): frame(dtype,kv_dtype,batch_size,kv_len,latency_us,mfu)}."""
    df = _attn_filter(src)
    df = df[df["isl"] == 1]
    df = df[_layout_mask(df, layouts)].copy()
    df["dtype"] = df["attn_dtype"].map(ATTN_DTYPES)
    df["kv_dtype"] = df["kv_cache_dtype"].map(ATTN_DTYPES)
    df = df.dropna(subset=["dtype", "kv_dtype"])
    df["kv_len"] = df["step"]  # seq_lens=[step], query_lens=[1]: attends over `step` tokens
    keys = ["num_heads", "num_key_value_heads", "head_dim", "dtype", "kv_dtype", "batch_size", "kv_len"]
    df, ndup = _median_dedup(df, keys)
    df["latency_us"] = df["latency"] * 1e3
    df["mfu"] = (4.0 * df["num_heads"] * df["head_dim"] * df["kv_len"] * df["batch_size"]
                 / (df["latency_us"] * 1e-6 * bf16_peak))
    out = {}
    for (hq, hkv, d), g in df.groupby(["num_heads", "num_key_value_heads", "head_dim"]):
        out[(int(hq), int(hkv), int(d))] = g[
            ["dtype", "kv_dtype", "batch_size", "kv_len", "latency_us", "mfu"]
        ].reset_index(drop=True)
    return out, {"duplicates_merged": int(ndup)}


def convert_prefill(src: pd.DataFrame, bf16_peak: float, layouts=DEFAULT_HEAD_LAYOUTS):
    """context_attention rows (prefix 0 only) -> {(hq,hkv,d): frame(dtype,batch_size,seq_len,latency_us,mfu)}.

    ``dtype`` is ``bf16`` for the bf16-KV-cache path and ``fp8`` for vLLM's
    FP8-KV-cache path (there FA3 also quantizes Q to fp8).  mfu always uses
    the bf16 peak."""
    df = _attn_filter(src)
    n_prefix = int((df["step"] != 0).sum()) if "step" in df else 0
    if "step" in df:
        df = df[df["step"] == 0]
    df = df[_layout_mask(df, layouts)].copy()
    df["dtype"] = df["kv_cache_dtype"].map(ATTN_DTYPES)
    df = df.dropna(subset=["dtype"])
    df["seq_len"] = df["isl"]
    keys = ["num_heads", "num_key_value_heads", "head_dim", "dtype", "batch_size", "seq_len"]
    df, ndup = _median_dedup(df, keys)
    df["latency_us"] = df["latency"] * 1e3
    df["mfu"] = (4.0 * df["num_heads"] * df["head_dim"] * (df["seq_len"] ** 2 / 2.0) * df["batch_size"]
                 / (df["latency_us"] * 1e-6 * bf16_peak))
    out = {}
    for (hq, hkv, d), g in df.groupby(["num_heads", "num_key_value_heads", "head_dim"]):
        out[(int(hq), int(hkv), int(d))] = g[["dtype", "batch_size", "seq_len", "latency_us", "mfu"]].reset_index(
            drop=True
        )
    return out, {"duplicates_merged": int(ndup), "prefix_rows_dropped": n_prefix}


def convert_custom_allreduce(src: pd.DataFrame) -> pd.DataFrame:
    """custom_allreduce_perf -> (kernel,num_gpus,message_bytes,latency_us,dtype).

    kernel ``custom_allreduce`` = the engine's all-reduce entry point replayed
    in a CUDA graph (vLLM: tensor_model_parallel_all_reduce, which itself picks
    custom-AR / NCCL by size); ``custom_allreduce_eager`` = eager mode (its
    timing includes an input ``clone()``)."""
    df = src[src["op_name"] == "all_reduce"] if "op_name" in src else src
    tag = df["backend"] if "backend" in df else df["kernel_source"]
    tag = tag.astype(str) + " " + df["kernel_source"].astype(str)
    kernel = np.where(tag.str.contains("eager", case=False), "custom_allreduce_eager", "custom_allreduce")
    dt = df["allreduce_dtype"].map(lambda s: COMM_DTYPES.get(s, (None, 0)))
    out = pd.DataFrame(
        {
            "kernel": kernel,
            "num_gpus": df["num_gpus"].astype(int).to_numpy(),
            "message_bytes": (df["message_size"].astype(np.int64) * dt.map(lambda t: t[1])).to_numpy(),
            "latency": df["latency"].to_numpy(),
            "dtype": dt.map(lambda t: t[0]).to_numpy(),
        }
    )
    return out.dropna(subset=["dtype"])


def convert_nccl(src: pd.DataFrame) -> pd.DataFrame:
    df = src[(src["op_name"] == "all_reduce") & (src["nccl_dtype"].isin(["half", "bfloat16", "float16"]))]
    dt = df["nccl_dtype"].map(lambda s: COMM_DTYPES[s])
    return pd.DataFrame(
        {
            "kernel": "nccl",
            "num_gpus": df["num_gpus"].astype(int).to_numpy(),
            "message_bytes": (df["message_size"].astype(np.int64) * dt.map(lambda t: t[1])).to_numpy(),
            "latency": df["latency"].to_numpy(),
            "dtype": dt.map(lambda t: t[0]).to_numpy(),
        }
    )


def finish_allreduce(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    df = pd.concat(parts, ignore_index=True)
    df, _ = _median_dedup(df, ["kernel", "num_gpus", "dtype", "message_bytes"])
    df["latency_us"] = df["latency"] * 1e3
    return df.sort_values(["kernel", "num_gpus", "message_bytes"])[
        ["kernel", "num_gpus", "message_bytes", "latency_us", "dtype"]
    ].reset_index(drop=True)


def moe_kernel_name(source: str) -> str:
    """Source ``kernel_source`` -> the short ``kernel`` column: vLLM's MoE backend.  The source names read
    ``vllm_<quant method>_<backend>_<experts class>[_<suffix>]`` (e.g.
    ``vllm_modeloptfp8moe_flashinfer_cutlass_flashinferexperts``); the short name keeps the backend, a
    ``monolithic``/``modular`` variant of the experts class and any suffix (``flashinfer_cutlass``,
    ``flashinfer_trtllm_monolithic``, ``marlin_situ_as_silu``).  Names of another form are kept whole."""
    parts = str(source).split("_")
    if parts[0] != "vllm" or len(parts) < 4 or not any("experts" in t for t in parts[2:]):
        return str(source)
    i = next(j for j in range(2, len(parts)) if "experts" in parts[j])
    variant = parts[i].split("experts", 1)[1]
    return "_".join(parts[2:i] + ([variant] if variant else []) + parts[i + 1:])


def convert_moe(src: pd.DataFrame, tol: float | None = 0.015, distributions=MOE_DISTRIBUTIONS):
    """moe_perf rows -> (MOE_COLUMNS frame, stats).  ``distributions``: the ``distribution`` values kept
    (``None``: all).  With ``tol``, each curve's interior ``num_tokens`` points are dropped where log-log
    linear interpolation from the kept neighbours reproduces them within ``tol`` (`loglog_subsample`)."""
    df = src[src["moe_dtype"].isin(MOE_DTYPES)]
    if distributions is not None:
        df = df[df["distribution"].isin(distributions)]
    df = df.assign(dtype=df["moe_dtype"].map(MOE_DTYPES), moe_tp=df["moe_tp_size"].astype(int),
                   moe_ep=df["moe_ep_size"].astype(int), kernel=df["kernel_source"].map(moe_kernel_name))
    skipped = sorted(set(map(str, src["moe_dtype"])) - set(MOE_DTYPES))
    stats = {"source_rows": int(len(src)), "skipped_dtypes": skipped,
             "distributions": sorted(map(str, df["distribution"].unique())),
             "distributions_dropped": sorted(set(map(str, src["distribution"])) - set(df["distribution"])),
             "dtypes": {}}
    kernels = df.groupby(MOE_SHAPE)["kernel_source"].nunique()
    if (kernels > 1).any():  # one curve per shape is what the loader serves
        raise ValueError(f"moe_perf: {int((kernels > 1).sum())} shapes were measured with several kernels")
    df, ndup = _median_dedup(df, MOE_SHAPE + ["kernel", "num_tokens"])
    stats["duplicates_merged"] = int(ndup)
    # A curve needs three points for the monotone cubic along num_tokens; shorter ones are incomplete
    # collections (a single num_tokens, or a few smallest ones).
    size = df.groupby(MOE_SHAPE)["num_tokens"].transform("size")
    short = df[size < MOE_MIN_POINTS]
    stats["short_curves_dropped"] = [
        {**dict(zip(MOE_SHAPE, k)), "num_tokens": sorted(map(int, g["num_tokens"]))}
        for k, g in short.groupby(MOE_SHAPE)]
    df = df[size >= MOE_MIN_POINTS]
    parts = []
    for dt, g in df.groupby("dtype", sort=True):
        g = g.sort_values(MOE_SHAPE + ["num_tokens"])
        st = {"rows": int(len(g)), "curves": int(g.groupby(MOE_SHAPE).ngroups),
              "kernels": sorted(map(str, g["kernel"].unique())), "shapes": int(g.groupby(MOE_SHAPE[1:5]).ngroups)}
        errs = []
        if tol is not None:
            masks = []
            for _, c in g.groupby(MOE_SHAPE, sort=False):
                x, lat = c["num_tokens"].to_numpy(), c["latency"].to_numpy()[None]
                keep = loglog_subsample(x, lat, tol)
                if keep.sum() < MOE_MIN_POINTS:  # a straight line: keep its worst-fitting interior point too
                    lx, ly = np.log(x), np.log(lat[0])
                    err = np.abs(ly - np.interp(lx, lx[[0, -1]], ly[[0, -1]]))
                    keep[1 + int(np.argmax(err[1:-1]))] = True
                masks.append(keep)
                errs.append(_interp_errors(x, lat, keep))
            g = g[np.concatenate(masks)]
        errs = np.concatenate(errs) if errs else np.zeros(0)
        st.update(rows_kept=int(len(g)), drop_err_max=float(errs.max()) if errs.size else 0.0,
                  drop_err_median=float(np.median(errs)) if errs.size else 0.0)
        stats["dtypes"][dt] = st
        parts.append(g)
    out = pd.concat(parts) if parts else df.iloc[:0]
    out = out.assign(latency_us=out["latency"] * 1e3)
    return out[MOE_COLUMNS].reset_index(drop=True), stats


MLA_PHASES = {"prefill": ("mla_context_module_perf", "isl", "seq_len"),
              "decode": ("mla_generation_module_perf", "step", "kv_len")}
# One curve = one (dtype, kv_dtype, gemm_dtype, num_heads, batch_size) along the length; vLLM runs different
# kernels on different stretches of it (short prefills on the MLA decode kernel, long ones on FA varlen),
# recorded per row in ``kernel``.
MLA_CURVE = ["dtype", "kv_dtype", "gemm_dtype", "num_heads", "batch_size"]


def mla_columns(phase: str) -> list[str]:
    return ["kernel"] + MLA_CURVE + [MLA_PHASES[phase][2], "latency_us"]


def convert_mla(src: pd.DataFrame, phase: str, tol: float | None = 0.015):
    """mla_*_module_perf rows -> (``mla_columns(phase)`` frame, stats).  ``kernel`` = source ``kernel_source``,
    ``dtype`` = ``mla_dtype``, ``gemm_dtype`` = ``gemm_type``; length = ``isl`` (prefill, only rows without a
    cached prefix) or ``step`` (decode).  With ``tol`` each curve is subsampled along the length like the
    GEMM curves."""
    _, src_len, length = MLA_PHASES[phase]
    df = src
    if phase == "prefill" and "step" in df:
        df = df[df["step"] == 0]
    if phase == "decode" and "isl" in df:
        df = df[df["isl"] == 1]
    names = {"bfloat16": "bf16", "fp8": "fp8", "fp8_block": "fp8_block", "float16": "fp16", "nvfp4": "nvfp4"}
    df = df.assign(kernel=df["kernel_source"].astype(str), dtype=df["mla_dtype"].map(names),
                   kv_dtype=df["kv_cache_dtype"].map(names), gemm_dtype=df["gemm_type"].map(names),
                   **{length: df[src_len].astype(int)}).dropna(subset=["dtype", "kv_dtype", "gemm_dtype"])
    df, ndup = _median_dedup(df, ["kernel"] + MLA_CURVE + [length])
    # where two kernels measured the same point, keep the faster (none do in the 0.24.0 data)
    n0 = len(df)
    df = df.sort_values("latency").drop_duplicates(MLA_CURVE + [length]).sort_values(MLA_CURVE + [length])
    overlaps = n0 - len(df)
    errs, masks = [], []
    for _, c in df.groupby(MLA_CURVE, sort=False):
        x, lat = c[length].to_numpy(), c["latency"].to_numpy()[None]
        keep = np.ones(len(x), bool)
        if tol is not None and len(x) > MOE_MIN_POINTS:
            keep = loglog_subsample(x, lat, tol)
            if keep.sum() < MOE_MIN_POINTS:
                keep[len(x) // 2] = True
            errs.append(_interp_errors(x, lat, keep))
        masks.append(keep)
    out = df[np.concatenate(masks)] if masks else df
    errs = np.concatenate(errs) if errs else np.zeros(0)
    stats = {"source_rows": int(len(src)), "rows": int(len(df)), "rows_kept": int(len(out)),
             "duplicates_merged": int(ndup), "kernel_overlaps_dropped": int(overlaps),
             "curves": int(df.groupby(MLA_CURVE).ngroups),
             "kernels": sorted(map(str, df["kernel"].unique())), "models": sorted(map(str, src["model"].unique()))
             if "model" in src else [], "drop_err_max": float(errs.max()) if errs.size else 0.0,
             "drop_err_median": float(np.median(errs)) if errs.size else 0.0}
    out = out.assign(latency_us=out["latency"] * 1e3)
    return out[mla_columns(phase)].reset_index(drop=True), stats


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------


SOURCE_DTYPE = {"bf16": "bfloat16", "fp8": "fp8"}


def _latency_by_shape(df: pd.DataFrame, source_dtype: str) -> pd.Series:
    """gemm_perf rows of one source dtype -> latency (source ms) per (m, n, k), repeated rows by median."""
    return df[df["gemm_dtype"] == source_dtype].groupby(["m", "n", "k"])["latency"].median()


def gemm_collections(gpu: str, dtype: str = "bf16", systems_dir: Path | None = None) -> pd.DataFrame:
    """Every engine collection's GEMM latency (µs) of ``dtype`` on ``gpu``: one column per 'engine/version',
    rows indexed by (m, n, k), repeated rows reduced to their median, NaN where a collection lacks the shape."""
    systems_dir = Path(systems_dir) if systems_dir else _locate_systems_dir()[0]
    cols = {}
    for edir in sorted((systems_dir / "data" / gpu / "gemm").glob("*/*")):
        path = _table_path(edir, "gemm_perf") if edir.is_dir() else None
        if path is None:
            continue
        lat = _latency_by_shape(_read_table(path), SOURCE_DTYPE[dtype])
        if len(lat):
            cols[f"{edir.parent.name}/{edir.name}"] = lat * 1e3
    if not cols:
        raise InputError(f"no {dtype} GEMM table for '{gpu}'", str(systems_dir / "data" / gpu / "gemm"), "gpu")
    return pd.DataFrame(cols)


def bf16_gemm_consensus(src: pd.DataFrame, src_key: str, sysdata: Path, systems_dir: Path,
                        summary: dict) -> pd.DataFrame:
    """``src`` (the gemm_perf rows of collection ``src_key`` = 'engine/version') with each BF16 row's latency
    replaced by the median, at that (m, n, k), over ``src`` and the newest BF16 GEMM collection of every other
    engine that measured the shape.  The grid stays ``src``'s.

    Every engine times the same kernel for BF16 (``torch`` linear, i.e. cuBLAS) but on its own machine and
    day; the collections differ by a few per cent in the median (vLLM's the fastest on
    all four GPUs; ``python -m costmodel.tabletools.crossval --collections GPU``), and the median is the estimate least
    moved by one machine's offset.  Adds the collections and each one's median ratio to the consensus to
    ``summary``."""
    own = _latency_by_shape(src, "bfloat16")
    if own.empty:
        return src
    per = {src_key: (own, None)}
    for eng in ("vllm", "sglang", "trtllm"):
        if eng == src_key.split("/", 1)[0]:
            continue
        hit = _find_table(sysdata, "gemm", eng, "gemm_perf", None)
        if hit is None or hit[0] != eng:  # _find_table falls back to other engines; we want each one once
            continue
        lat = _latency_by_shape(_read_table(hit[2]), "bfloat16")
        if len(lat):
            per[f"{eng}/{hit[1]}"] = (lat, hit[2])
    if len(per) < 2:
        return src
    wide = pd.DataFrame({k: v[0] for k, v in per.items()}).loc[per[src_key][0].index]
    med = wide.median(axis=1, skipna=True)
    cons = med.rename("latency").reset_index().assign(gemm_dtype="bfloat16")
    summary["bf16_consensus"] = {
        "collections": {k: {"file": str(v[1].relative_to(systems_dir.parent)) if v[1] else
                            summary["sources"]["gemm_perf"]["file"], "shapes": int(wide[k].notna().sum()),
                            "median_ratio_to_consensus": float((wide[k] / med).median())}
                        for k, v in per.items()},
        "shapes": int(len(cons)),
    }
    return pd.concat([src[src["gemm_dtype"] != "bfloat16"], cons], ignore_index=True)


def _locate_systems_dir() -> tuple[Path, str]:
    try:
        import aiconfigurator_core  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on environment
        raise RuntimeError(_MISSING_MSG) from e
    try:
        ver = distribution_version(PACKAGE)
    except PackageNotFoundError:  # pragma: no cover
        ver = "unknown"
    return Path(aiconfigurator_core.__file__).parent / "systems", ver


def import_aiconfigurator(
    gpu: str,
    engine: str = "vllm",
    version: str | None = None,
    out_dir: str | Path = "bench_data",
    head_layouts: Iterable | str | None = None,
    *,
    systems_dir: str | Path | None = None,
    package_version: str | None = None,
    tol: float | None = 0.015,
    bf16_consensus: bool = True,
    moe_distributions: Sequence[str] | None = MOE_DISTRIBUTIONS,
    moe_tol: float | None = None,
) -> dict:
    """Convert one GPU's AIConfigurator tables into ``out_dir`` (InferSim schema).

    gpu: source system name (``h100_sxm``, ``h200_sxm``, ``b200_sxm``,
    ``a100_sxm``, ...; short aliases like ``b200`` accepted).  engine:
    ``vllm`` / ``sglang`` / ``trtllm`` (a family missing for that engine falls
    back to the next engine, noted in the summary).  version: engine version,
    ``None`` = newest measured per table.  head_layouts: iterable of
    per-GPU ``(hq, hkv[, head_dim])`` (head_dim defaults to 128), ``"all"``,
    or ``None`` for :data:`DEFAULT_HEAD_LAYOUTS`.  systems_dir: a directory
    laid out like ``aiconfigurator_core/systems`` (for tests); if omitted the
    installed package is used.  tol: relative tolerance of the GEMM m-grid
    subsampling (``None`` disables it).  bf16_consensus: BF16 GEMM latency = per-shape median over the
    newest collection of every engine (each times the same cuBLAS call through ``torch`` linear; see
    `bf16_gemm_consensus`) instead of the requested engine's alone.  moe_distributions: the expert-load
    ``distribution`` values of the MoE table written (``None``: every one measured); moe_tol: the same
    subsampling of the MoE curves along ``num_tokens`` (``None``, the default: every measured point is kept;
    the curves climb steeply at small token counts, where dropped points cost several per cent).

    Returns a summary dict (files written, sizes, versions, stats)."""
    if systems_dir is None:
        systems_dir, pkg_ver = _locate_systems_dir()
    else:
        systems_dir, pkg_ver = Path(systems_dir), "unknown"
    if package_version:
        pkg_ver = package_version
    gpu = GPU_ALIASES.get(gpu.lower(), gpu.lower())
    sysdata = systems_dir / "data" / gpu
    if not sysdata.is_dir():
        have = sorted(p.name for p in (systems_dir / "data").iterdir()) if (systems_dir / "data").is_dir() else []
        raise ValueError(f"no AIConfigurator data for gpu {gpu!r}; available: {', '.join(have)}")
    if head_layouts is None:
        layouts = DEFAULT_HEAD_LAYOUTS
    elif head_layouts == "all":
        layouts = "all"
    else:
        layouts = tuple((int(t[0]), int(t[1]), int(t[2]) if len(t) > 2 else 128) for t in head_layouts)

    out = Path(out_dir)
    check_output_dir(out)
    refuse_overwrite(out, [systems_dir], folder=True)
    for name, v in (("tol", tol), ("moe_tol", moe_tol)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1):
            raise InputError(f"must be a number in [0, 1) or None, got {v!r}", field=name)
    peaks, peak_src = _read_peaks(systems_dir, gpu)
    summary: dict = {
        "gpu": gpu, "engine": engine, "package": PACKAGE, "package_version": pkg_ver,
        "peaks": peaks, "peak_source": peak_src, "tol": tol, "moe_tol": moe_tol, "files": {}, "sources": {}, "notes": [], "stats": {},
    }

    def use(family, table, eng=engine, ver=version):
        hit = _find_table(sysdata, family, eng, table, ver)
        if hit is None:
            summary["notes"].append(f"no {family}/{table} data for {gpu}")
            return None
        e, v, p, note = hit
        if note:
            summary["notes"].append(note)
        df = _read_table(p)
        summary["sources"][table] = {
            "engine": e, "version": v, "file": str(p.relative_to(systems_dir.parent)),
            "runtime": _runtime_meta(p), "rows": int(len(df)),
            "kernels": sorted(map(str, df["kernel_source"].unique())) if "kernel_source" in df else [],
            "device": sorted(map(str, df["device"].unique())) if "device" in df else [],
        }
        return df

    def record(path: Path, size: int, rows: int):  # under its final name
        summary["files"][str(out / path.relative_to(build))] = {"bytes": size, "rows": rows}

    # Built in a temporary folder beside the target and swapped in only when complete: a failure part-way
    # leaves the target as it was.
    target = Path(os.path.realpath(out))  # a symlinked folder: beside the real one, in its file system
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.import-"))
    try:
        # GEMM -------------------------------------------------------------
        src = use("gemm", "gemm_perf")
        if src is not None and bf16_consensus:
            used = summary["sources"]["gemm_perf"]
            src = bf16_gemm_consensus(src, f"{used['engine']}/{used['version']}", sysdata, systems_dir, summary)
        if src is not None:
            g, st = convert_gemm(src, peaks, tol)
            summary["stats"]["gemm"] = st
            p = build / "gemm" / gpu / "data.csv"
            record(p, _fmt_csv(g, p, {"latency_us": 4, "mfu": 3}), len(g))

        # attention --------------------------------------------------------
        bf16_peak = peaks["bf16"]
        for phase, table, convert in (("decode", "generation_attention_perf", convert_decode),
                                      ("prefill", "context_attention_perf", convert_prefill)):
            src = use("attention", table)
            if src is None:
                continue
            tabs, st = convert(src, bf16_peak, layouts)
            st["layouts"] = sorted(tabs)
            summary["stats"][phase] = st
            for (hq, hkv, d), t in sorted(tabs.items()):
                p = build / "mha" / phase / gpu / f"{hq}-{hkv}-{d}.csv"
                record(p, _fmt_csv(t, p, {"latency_us": 4, "mfu": 3}), len(t))
        if layouts != "all":
            for ph in ("decode", "prefill"):
                if ph in summary["stats"]:
                    miss = sorted(set(layouts) - set(summary["stats"][ph]["layouts"]))
                    summary["stats"][ph]["layouts_not_measured"] = miss

        # all-reduce -------------------------------------------------------
        parts = []
        src = use("comm", "custom_allreduce_perf")
        if src is not None:
            parts.append(convert_custom_allreduce(src))
        nccl = _find_table(sysdata, "comm", "nccl", "nccl_perf", None)
        if nccl is not None:
            e, v, pth, _ = nccl
            df = _read_table(pth)
            summary["sources"]["nccl_perf"] = {
                "engine": "nccl", "version": v, "file": str(pth.relative_to(systems_dir.parent)),
                "runtime": f"NCCL {v} (nccl-tests all_reduce_perf)", "rows": int(len(df)), "kernels": ["NCCL"],
                "device": sorted(map(str, df["device"].unique())) if "device" in df else [],
            }
            parts.append(convert_nccl(df))
        if parts:
            ar = finish_allreduce(parts)
            p = build / "allreduce" / gpu / "data.csv"
            record(p, _fmt_csv(ar, p, {"latency_us": 4}), len(ar))

        # fused MoE ---------------------------------------------------------
        src = use("moe", "moe_perf")
        if src is not None:
            moe, st = convert_moe(src, moe_tol, moe_distributions)
            summary["stats"]["moe"] = st
            if len(moe):
                p = build / "moe" / gpu / "data.csv"
                record(p, _fmt_csv(moe, p, {"latency_us": 4}), len(moe))

        # MLA modules (the requested engine's only: another engine's module is another implementation) ----
        for phase, (table, _, _) in MLA_PHASES.items():
            hit = _find_table(sysdata, "mla", engine, table, version)
            if hit is None or hit[0] != engine:
                continue
            src = use("mla", table)
            tab, st = convert_mla(src, phase, tol)
            summary["stats"][f"mla_{phase}"] = st
            if len(tab):
                p = build / "mla" / phase / gpu / "data.csv"
                record(p, _fmt_csv(tab, p, {"latency_us": 4}), len(tab))

        # kinds this import has none of: the target's own tables for the GPU stay ------------------------
        for rel in _gpu_parts(gpu):
            if not (build / rel).exists() and (out / rel).exists() and rel.suffix != ".md":
                summary["notes"].append(f"kept the existing {rel.as_posix()} (this import has no such tables)")

        # provenance -------------------------------------------------------
        p = write_provenance(build, gpu, _provenance_lines(summary, layouts))
        record(p, p.stat().st_size, 0)
        _swap_in(build, target, gpu)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    summary["total_bytes"] = sum(f["bytes"] for f in summary["files"].values())
    return summary


def _gpu_parts(gpu: str) -> list[Path]:
    """What an import writes for ``gpu``, relative to the table folder: one folder per table kind and the
    provenance note."""
    return [Path("gemm") / gpu, Path("mha") / "decode" / gpu, Path("mha") / "prefill" / gpu,
            Path("allreduce") / gpu, Path("moe") / gpu, Path("mla") / "prefill" / gpu, Path("mla") / "decode" / gpu,
            Path(f"SOURCE_{gpu}.md")]


def _swap_in(build: Path, out: Path, gpu: str) -> None:
    """Move the parts of ``gpu`` built under ``build`` into ``out``, each replacing the one there (renames in
    one file system); on a failure the parts already moved are put back."""
    old = build / ".old"
    done = []
    try:
        for rel in _gpu_parts(gpu):
            if not (build / rel).exists():
                continue
            dest, keep = out / rel, old / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            had = dest.exists() or dest.is_symlink()
            if had:
                keep.parent.mkdir(parents=True, exist_ok=True)
                os.replace(dest, keep)
            done.append((rel, had))
            os.replace(build / rel, dest)
    except BaseException:
        for rel, had in reversed(done):
            dest = out / rel
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest, ignore_errors=True)
            elif dest.exists() or dest.is_symlink():
                dest.unlink()
            if had:
                os.replace(old / rel, dest)
        raise


def _provenance_lines(s: dict, layouts) -> list[str]:
    """The lines of the provenance note (`io.write_provenance`) below its title."""
    today = _dt.date.today().isoformat()
    L = [
        f"Imported on {today} by `costmodel import-aiconfigurator` from the PyPI package "
        f"`{s['package']}` version {s['package_version']} (NVIDIA AIConfigurator; "
        "`aiconfigurator_core/systems/data/`). Requested engine: "
        f"`{s['engine']}`.",
        "",
        "## Licence and attribution",
        "",
        "The measurements are NVIDIA's, distributed in `aiconfigurator-core` under the Apache License, "
        "Version 2.0 (SPDX: Apache-2.0; Copyright (c) 2025-2026 NVIDIA CORPORATION & AFFILIATES). "
        "These CSVs are a modified derivative: values were converted (ms to us, elements to bytes), "
        "filtered, merged and subsampled as described below, and columns were renamed. "
        "They are provided on an \"AS IS\" basis, without warranties or conditions of any kind; "
        "see http://www.apache.org/licenses/LICENSE-2.0 for the full terms.",
        "",
        "## Source tables",
        "",
        "| table | engine | version | runtime (collection_meta) | rows | kernels | device | file |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t, m in s["sources"].items():
        L.append(
            f"| {t} | {m['engine']} | {m['version']} | {m['runtime']} | {m['rows']} | "
            f"{', '.join(m['kernels'])} | {', '.join(m['device'])} | `{m['file']}` |"
        )
    L += ["", f"Peak FLOP/s for `mfu`: {s['peaks']} (from {s['peak_source']}).", ""]
    c = s.get("bf16_consensus")
    if c:
        L += [f"BF16 GEMM (`bfloat16` rows): on the requested engine's grid of {c['shapes']} shapes, each "
              "latency is the median over these collections of the same `torch` linear (cuBLAS) call that "
              "measured the shape, not the requested engine's alone (they differ by a few per cent in the median; "
              "`--no-bf16-consensus` turns this off):", "",
              "| collection | shapes on that grid | median latency / consensus | file |", "|---|---|---|---|"]
        L += [f"| {k} | {v['shapes']} | {v['median_ratio_to_consensus']:.3f} | `{v['file']}` |"
              for k, v in c["collections"].items()]
        L += [""]
    if s["notes"]:
        L += ["## Notes", ""] + [f"* {n}" for n in s["notes"]] + [""]
    L += ["## Conversion", ""]
    g = s["stats"].get("gemm")
    tol_txt = "none" if s.get("tol") is None else f"{s['tol']:.1%}"
    if g:
        kept = ", ".join(g["dtypes"]) or "none"
        L.append(f"* GEMM: dtypes written: {kept} (source `bfloat16` -> bf16; source `fp8` -> fp8 = vLLM "
                 "per-tensor-scaled CUTLASS FP8, activation quantization included); `fp8_block`, `nvfp4` "
                 "and other source dtypes skipped. Latency = one `RowParallelLinear.forward` (y = x W^T).")
        for dt, st in g["dtypes"].items():
            L.append(
                f"  * {dt}: {st['rows']} rows ({st['curves']} (n,k) curves over {st['m_values']} m values); "
                f"kept {st['rows_kept']} rows ({st['rows_kept'] / max(st['rows'], 1):.1%}). Per (n,k) curve, "
                f"interior m points were dropped where log-log linear interpolation in m from the kept "
                f"neighbours reproduces them (Douglas-Peucker, tol {tol_txt}); reconstruction error of "
                f"the dropped points: max {st.get('drop_err_max', 0):.2%}, median {st.get('drop_err_median', 0):.2%}. "
                "The m grid is therefore ragged across (n,k)."
            )
        L.append(f"  * max mfu {g['max_mfu']:.3f}; rows with mfu>1: {g['rows_mfu_gt_1']}.")
    for ph in ("decode", "prefill"):
        st = s["stats"].get(ph)
        if st:
            lay = ", ".join(f"{a}-{b}-{c}" for a, b, c in st["layouts"])
            L.append(f"* {ph} attention: window_size 0, beam 1 only; layouts written: {lay}.")
            if st.get("layouts_not_measured"):
                miss = ", ".join(f"{a}-{b}-{c}" for a, b, c in st["layouts_not_measured"])
                L.append(f"  * requested but not measured: {miss}.")
            if st.get("prefix_rows_dropped"):
                L.append(f"  * {st['prefix_rows_dropped']} rows with a cached prefix (step>0) dropped.")
            if st.get("duplicates_merged"):
                L.append(f"  * {st['duplicates_merged']} duplicate rows merged by median.")
    m = s["stats"].get("moe")
    if m:
        dists = ", ".join(m["distributions"]) or "none"
        L.append("* fused MoE: source `moe_dtype` -> `dtype`: " + ", ".join(f"{a} -> {b}" for a, b in MOE_DTYPES.items())
                 + f"; not exported: {', '.join(m['skipped_dtypes']) or 'none'}. Distributions written: {dists}"
                 + (f"; dropped: {', '.join(m['distributions_dropped'])} (AIConfigurator's model classes query "
                    "power_law_1.2 or power_law_1.01)" if m["distributions_dropped"] else "") + ". "
                 "`kernel` = vLLM's MoE backend, shortened from the source `kernel_source` listed above (quant-method "
                 "class and experts class dropped, a monolithic/modular variant kept). `num_tokens` = tokens entering "
                 "the layer summed over the attention-DP ranks (AIConfigurator queries tokens per rank x "
                 "attention_dp_size); the time is one GPU's experts only (no router GEMM, shared experts or "
                 "EP dispatch/combine).")
        for dt, st in m["dtypes"].items():
            kept = ("every point kept (no subsampling along num_tokens)" if s.get("moe_tol") is None else
                    f"kept {st['rows_kept']} rows ({st['rows_kept'] / max(st['rows'], 1):.1%}) by the same log-log "
                    f"subsampling along num_tokens (tol {s['moe_tol']:.1%}); reconstruction error of the dropped "
                    f"points: max {st['drop_err_max']:.2%}, median {st['drop_err_median']:.2%}")
            L.append(f"  * {dt}: {st['rows']} rows ({st['curves']} curves, {st['shapes']} (hidden, inter, experts, "
                     f"topk) shapes; kernels {', '.join(st['kernels'])}); {kept}.")
        if m.get("short_curves_dropped"):
            L.append(f"  * {len(m['short_curves_dropped'])} curves with fewer than {MOE_MIN_POINTS} num_tokens points "
                     "dropped (incomplete collections; nothing to interpolate along): " + "; ".join(
                         f"{c['dtype']} {c['hidden_size']}/{c['inter_size']}/{c['num_experts']}x{c['topk']} "
                         f"tp{c['moe_tp']} ep{c['moe_ep']} {c['distribution']} tokens {c['num_tokens']}"
                         for c in m["short_curves_dropped"]) + ".")
        if m.get("duplicates_merged"):
            L.append(f"  * {m['duplicates_merged']} duplicate rows merged by median.")
    for phase in MLA_PHASES:
        st = s["stats"].get(f"mla_{phase}")
        if st:
            L.append(f"* MLA {phase} module ({', '.join(st['models'])} geometry; `num_heads` per GPU): {st['rows']} rows, "
                     f"{st['curves']} curves (dtype, kv_dtype, gemm_dtype, num_heads, batch_size; `kernel` per row = the vLLM "
                     f"backend that ran that length), kernels "
                     f"{', '.join(st['kernels'])}; kept {st['rows_kept']} rows by the same log-log subsampling along "
                     f"{MLA_PHASES[phase][2]} (tol {tol_txt}); reconstruction error of the dropped points: max "
                     f"{st['drop_err_max']:.2%}, median {st['drop_err_median']:.2%}."
                     + (" Prefill: rows with a cached prefix (step > 0) left out." if phase == "prefill" else
                        " `kv_len` = source `step`."))
    L += [
        "* decode: `kv_len` = source `step` (sequence length in the KV cache incl. the new token; "
        "grid 2^j-1). prefill: `dtype` fp8 = FP8-KV-cache path.",
        "* allreduce: `message_bytes` = source `message_size` (elements) x element size; "
        "`custom_allreduce` = engine all-reduce under CUDA graph, `custom_allreduce_eager` = eager "
        "(includes an input clone), `nccl` = nccl-tests all_reduce_perf (fp16).",
        "",
    ]
    return L


# --------------------------------------------------------------------------
# argparse glue
# --------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--gpu", required=True, help="AIConfigurator system name, e.g. h100_sxm, h200_sxm, b200_sxm, a100_sxm")
    parser.add_argument("--engine", default="vllm", choices=["vllm", "sglang", "trtllm"])
    parser.add_argument("--version", default=None, help="engine version (default: newest measured)")
    parser.add_argument("--out", default="bench_data", help="output directory (default: bench_data)")
    parser.add_argument("--all-head-layouts", action="store_true",
                        help="write every measured attention head layout instead of the common-model set")
    parser.add_argument("--tol", type=number(float, 0, 1, high_open=True), default=0.015,
                        help="GEMM m-grid subsampling tolerance (relative; 0 disables)")
    parser.add_argument("--moe-tol", type=number(float, 0, 1, high_open=True), default=0.0,
                        help="MoE num_tokens subsampling tolerance (relative; 0, the default, keeps every point)")
    parser.add_argument("--no-bf16-consensus", action="store_true",
                        help="take BF16 GEMMs from the requested engine's collection alone instead of the "
                             "per-shape median over every engine's collection")
    parser.add_argument("--moe-distributions", default=",".join(MOE_DISTRIBUTIONS),
                        help="comma-separated expert-load distributions of the MoE table, or 'all' "
                             f"(default: {','.join(MOE_DISTRIBUTIONS)})")
    parser.add_argument("--systems-dir", default=None,
                        help="read a directory laid out like aiconfigurator_core/systems instead of the installed package")


def _distributions(spec: str | None):
    if spec is None:
        return MOE_DISTRIBUTIONS
    return None if spec.strip() == "all" else tuple(x.strip() for x in spec.split(",") if x.strip())


def run(args) -> int:
    try:
        s = import_aiconfigurator(
            args.gpu, engine=args.engine, version=args.version, out_dir=args.out,
            head_layouts="all" if getattr(args, "all_head_layouts", False) else None,
            tol=(getattr(args, "tol", 0.015) or None),
            systems_dir=getattr(args, "systems_dir", None),
            bf16_consensus=not getattr(args, "no_bf16_consensus", False),
            moe_distributions=_distributions(getattr(args, "moe_distributions", None)),
            moe_tol=(getattr(args, "moe_tol", 0.0) or None),
        )
    except InputError:
        raise  # the command line's one-line error, exit status 2
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(s['files'])} files, {s['total_bytes'] / 1e6:.2f} MB for {s['gpu']} "
          f"({s['package']} {s['package_version']})")
    for n in s["notes"]:
        print(f"note: {n}")
    return 0
