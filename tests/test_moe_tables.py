"""Fused-MoE tables: the importer's conversion, the loader and the curve selector."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from costmodel import tables
from costmodel.errors import InputError
from costmodel.tabletools import importer as aic

HEADER = ",".join(tables.MOE_COLUMNS)


def _src_rows(dtype, dist, tokens, lat_ms, kernel="vllm_unquantizedfusedmoe_triton_tritonexperts", ep=1):
    return [dict(framework="VLLM", version="0.24.0", device="GPU", op_name="moe", kernel_source=kernel,
                 moe_dtype=dtype, num_tokens=t, hidden_size=2048, inter_size=768, topk=8, num_experts=128,
                 moe_tp_size=1, moe_ep_size=ep, distribution=dist, latency=lat) for t, lat in zip(tokens, lat_ms)]


def test_convert_moe_units_names_distributions_and_subsampling():
    tokens = [1, 2, 4, 8, 16, 32, 64, 128]
    flat_then_linear = [0.02] * 5 + [0.04, 0.08, 0.16]  # kink at 16: the flat interior points go
    src = pd.DataFrame(
        _src_rows("bfloat16", "power_law_1.2", tokens, flat_then_linear)
        + _src_rows("bfloat16", "balanced", tokens, flat_then_linear)
        + _src_rows("w4a16_mxfp4", "power_law_1.01", [1, 2, 4], [0.5, 0.6, 0.9],
                    kernel="vllm_gptossmxfp4moe_triton_oaitritonmxfp4expertsmonolithic")
        + _src_rows("w4a8_mxfp4_mxfp8", "power_law_1.2", [1, 2], [0.5, 0.6]))
    out, st = aic.convert_moe(src, tol=0.015)
    assert list(out.columns) == list(tables.MOE_COLUMNS)
    assert set(out["distribution"]) == {"power_law_1.2", "power_law_1.01"}
    assert st["distributions_dropped"] == ["balanced"] and st["skipped_dtypes"] == ["w4a8_mxfp4_mxfp8"]
    bf = out[out["dtype"] == "bf16"]
    assert bf["num_tokens"].tolist() == [1, 16, 128]  # ends and the kink
    assert bf["latency_us"].tolist() == pytest.approx([20.0, 20.0, 160.0])  # ms -> us
    assert set(bf["kernel"]) == {"triton"}
    mx = out[out["dtype"] == "mxfp4"]
    assert mx["kernel"].tolist() == ["triton_monolithic"] * 3
    assert mx["latency_us"].tolist() == pytest.approx([500, 600, 900])
    everything, _ = aic.convert_moe(src, tol=None, distributions=None)
    assert len(everything) == 2 * 8 + 3  # both bf16 distributions whole, and mxfp4


def test_convert_moe_refuses_two_kernels_for_one_shape():
    src = pd.DataFrame(_src_rows("fp8", "power_law_1.2", [1, 2], [0.1, 0.2])
                       + _src_rows("fp8", "power_law_1.2", [4], [0.3], kernel="vllm_fp8moe_triton_tritonexperts"))
    with pytest.raises(ValueError, match="several kernels"):
        aic.convert_moe(src)


def test_moe_kernel_names():
    assert aic.moe_kernel_name("vllm_modeloptfp8moe_flashinfer_cutlass_flashinferexperts") == "flashinfer_cutlass"
    assert aic.moe_kernel_name("vllm_fp8moe_flashinfer_trtllm_trtllmfp8expertsmodular") == "flashinfer_trtllm_modular"
    assert (aic.moe_kernel_name("vllm_compressedtensorsw4a4mxfp4moe_marlin_marlinexperts_situ_as_silu")
            == "marlin_situ_as_silu")
    assert aic.moe_kernel_name("vllm_fused_moe") == "vllm_fused_moe"


def test_repo_table_row_converted_by_hand():
    # moe_perf.parquet (h100_sxm, vllm 0.24.0): bfloat16, hidden 2048, inter 768, 128 experts, topk 8,
    # moe_tp 1, moe_ep 8, power_law_1.2, num_tokens 16 -> latency 0.0641215980052948 ms = 64.12 us (4 digits)
    df = tables.load_moe("H100-SXM")
    x, t = tables.moe_curve(df, "bf16", 2048, 768, 128, 8, 1, 8, "power_law_1.2")
    assert t[list(x).index(16)] == pytest.approx(64.12)
    assert x[0] == 1 and x[-1] == 16384 and np.all(np.diff(x) > 0)
    # no distribution asked: power_law_1.2 first
    x2, t2 = tables.moe_curve(df, "bf16", 2048, 768, 128, 8, 1, 8)
    assert np.array_equal(x2, x) and np.array_equal(t2, t)
    assert tables.moe_curve(df, "bf16", 2048, 768, 128, 8, 1, 3) is None  # EP 3 not measured
    assert tables.moe_curve(df, "bf16", 2048, 768, 128, 8, 1, 8, "balanced") is None  # not written
    assert "bf16 hidden=2048 inter=768 experts=128 topk=8" in tables.moe_shapes_text(df, "bf16")


@pytest.mark.parametrize("gpu", ["h100_sxm", "h200_sxm", "b200_sxm", "a100_sxm", "l40s"])
def test_every_imported_gpu_has_a_moe_table(gpu):
    df = tables.load_moe(gpu)
    assert df is not None and len(df) > 1000
    assert set(df["distribution"]) == {"power_law_1.01", "power_law_1.2"}
    assert (df["latency_us"] > 0).all()


def _table(tmp_path: Path, lines: list[str]) -> Path:
    d = tmp_path / "moe" / "h100_sxm"
    d.mkdir(parents=True)
    (d / "data.csv").write_text("\n".join([HEADER] + lines) + "\n")
    return tmp_path


def test_load_moe_none_without_a_table_and_errors_name_file_and_field(tmp_path):
    assert tables.load_moe("H100", tmp_path) is None
    root = _table(tmp_path, ["bf16,1,2048,768,128,8,1,1,power_law_1.2,20,triton",
                             "fp4,2,2048,768,128,8,1,1,power_law_1.2,20,triton"])
    with pytest.raises(InputError, match=r"data\.csv:3: field 'dtype': bad value 'fp4'"):
        tables.load_moe("H100", root)


def test_load_moe_refuses_non_positive_latency_and_duplicates(tmp_path):
    root = _table(tmp_path / "a", ["bf16,1,2048,768,128,8,1,1,power_law_1.2,-1,triton"])
    with pytest.raises(InputError, match=r"data\.csv:2: field 'latency_us'"):
        tables.load_moe("H100", root)
    root = _table(tmp_path / "b", ["bf16,1,2048,768,128,8,1,1,power_law_1.2,20,triton",
                                   "bf16,1,2048,768,128,8,1,1,power_law_1.2,21,triton"])
    with pytest.raises(InputError, match="same shape"):
        tables.load_moe("H100", root)


def test_convert_moe_drops_short_curves_and_keeps_three_points_of_a_straight_line():
    line = [0.001 * t for t in (1, 2, 4, 8, 16, 32)]  # time proportional to tokens: two points would do
    src = pd.DataFrame(_src_rows("bfloat16", "power_law_1.2", [1, 2, 4, 8, 16, 32], line)
                       + _src_rows("bfloat16", "power_law_1.2", [1, 2], [0.1, 0.2], ep=2))
    out, st = aic.convert_moe(src)
    assert out["moe_ep"].unique().tolist() == [1] and len(out) == 3
    assert out["num_tokens"].iloc[0] == 1 and out["num_tokens"].iloc[-1] == 32
    assert [c["num_tokens"] for c in st["short_curves_dropped"]] == [[1, 2]]


def test_moe_leave_one_out_by_hand():
    from costmodel.tabletools.crossval import moe_leave_one_out

    def curve(ep, tokens, lat):
        return pd.DataFrame({"dtype": "bf16", "num_tokens": tokens, "hidden_size": 2048, "inter_size": 768,
                             "num_experts": 128, "topk": 8, "moe_tp": 1, "moe_ep": ep,
                             "distribution": "power_law_1.2", "latency_us": lat, "kernel": "triton"})
    power = curve(1, [1, 4, 16, 64], [10.0, 20.0, 40.0, 80.0])  # t = 10 * x^0.5: exact in log-log
    three = curve(2, [1, 2, 4], [10.0, 30.0, 40.0])  # middle predicted from the line (1, 10)-(4, 40): 20
    res = moe_leave_one_out(pd.concat([power, three], ignore_index=True))
    assert len(res) == 2 + 1
    assert res[res.moe_ep == 1].rel_err.abs().max() < 1e-4
    mid = res[res.moe_ep == 2].iloc[0]
    assert mid.predicted_us == pytest.approx(20.0, rel=1e-4) and mid.rel_err == pytest.approx(20 / 30 - 1, rel=1e-3)
