"""MLA attention-module tables: conversion, loader, curve selector."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from costmodel import tables
from costmodel.errors import InputError
from costmodel.tabletools import importer as aic
from costmodel.tabletools.crossval import curve_leave_one_out


def test_repo_prefill_curve_joins_the_kernels_vllm_ran_along_the_length():
    # mla_context_module_perf.parquet (h100_sxm, vllm 0.24.0), bf16 KV, bf16 GEMMs, 16 heads, batch 4:
    # isl 1 -> 0.1029 ms (FLASH_ATTN_MLA), isl 1024 -> 0.6882 ms (FLASH_ATTN), isl 32768 -> 43.4516 ms
    df = tables.load_mla("H100", "prefill")
    x, t = tables.mla_curve(df, 16, 4)
    assert x[0] == 1 and t[0] == pytest.approx(102.9)
    assert t[list(x).index(1024)] == pytest.approx(688.2)
    assert x[-1] == 32768 and t[-1] == pytest.approx(43450)
    row = df[(df.num_heads == 16) & (df.batch_size == 4) & (df.kv_dtype == "bf16") & (df.gemm_dtype == "bf16")]
    assert row.set_index("seq_len").kernel[1] == "FLASH_ATTN_MLA" and row.set_index("seq_len").kernel[1024] == "FLASH_ATTN"
    assert tables.mla_curve(df, 16, 4, kv_dtype="fp16") is None


def test_repo_decode_curve_by_hand():
    # mla_generation_module_perf.parquet (h100_sxm): FLASHMLA, fp8 KV, fp8_block GEMMs, 128 heads, batch 8:
    # step 2 -> 0.1834 ms, step 131072 -> 0.5608 ms
    x, t = tables.mla_curve(tables.load_mla("h100_sxm", "decode"), 128, 8, "fp8", "fp8_block")
    assert (x[0], x[-1]) == (2, 131072) and t[0] == pytest.approx(183.4) and t[-1] == pytest.approx(560.8)
    assert np.all(np.diff(x) > 0)


def test_no_mla_table_for_a100_and_unknown_kind():
    assert tables.load_mla("A100", "decode") is None
    with pytest.raises(InputError, match="field 'kind'"):
        tables.load_mla("H100", "context")


def test_convert_mla_filters_prefix_rows_and_keeps_the_faster_kernel_on_overlap():
    base = dict(framework="VLLM", version="0.24.0", device="GPU", op_name="mla_context_module",
                model="deepseek-ai/DeepSeek-V3", architecture="DeepseekV3ForCausalLM", mla_dtype="bfloat16",
                kv_cache_dtype="bfloat16", gemm_type="bfloat16", num_heads=16, batch_size=1, tp_size=1)
    rows = [dict(base, kernel_source="FLASH_ATTN_MLA", isl=i, step=0, latency=lat) for i, lat in
            ((1, 0.1), (16, 0.2), (64, 0.4))]
    rows += [dict(base, kernel_source="FLASH_ATTN", isl=i, step=0, latency=lat) for i, lat in ((64, 0.3), (256, 1.2))]
    rows += [dict(base, kernel_source="FLASH_ATTN", isl=256, step=512, latency=9.0)]  # cached prefix: left out
    out, st = aic.convert_mla(pd.DataFrame(rows), "prefill", tol=None)
    assert list(out.columns) == ["kernel", "dtype", "kv_dtype", "gemm_dtype", "num_heads", "batch_size", "seq_len",
                                 "latency_us"]
    assert out.seq_len.tolist() == [1, 16, 64, 256] and out.latency_us.tolist() == pytest.approx([100, 200, 300, 1200])
    assert out.kernel.tolist() == ["FLASH_ATTN_MLA", "FLASH_ATTN_MLA", "FLASH_ATTN", "FLASH_ATTN"]
    assert st["kernel_overlaps_dropped"] == 1


def test_mla_loader_refuses_duplicates_with_file_and_line(tmp_path):
    d = tmp_path / "mla" / "decode" / "h100_sxm"
    d.mkdir(parents=True)
    (d / "data.csv").write_text("kernel,dtype,kv_dtype,gemm_dtype,num_heads,batch_size,kv_len,latency_us\n"
                                "FLASHMLA,bf16,fp8,bf16,16,1,2,50\nFLASHMLA,bf16,fp8,bf16,16,1,4,55\n"
                                "FLASH_ATTN_MLA,bf16,fp8,bf16,16,1,4,56\n")
    with pytest.raises(InputError, match=r"data\.csv:4: field 'kv_len'"):
        tables.load_mla("H100", "decode", tmp_path)


def test_curve_leave_one_out_groups_by_curve_not_kernel():
    df = pd.DataFrame({"kernel": ["A", "A", "B"], "dtype": "bf16", "kv_dtype": "bf16", "gemm_dtype": "bf16",
                       "num_heads": 16, "batch_size": 1, "seq_len": [1, 4, 16], "latency_us": [10.0, 20.0, 40.0]})
    res = curve_leave_one_out(df, tables.MLA_CURVE_COLUMNS, "seq_len")
    assert len(res) == 1 and res.rel_err.iloc[0] == pytest.approx(0.0, abs=1e-4)  # 10 * x^0.5 exactly

