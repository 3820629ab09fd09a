"""Tests for costmodel.aiconfigurator (AIConfigurator kernel-DB importer).

All but the last test run on a tiny synthetic systems/ tree that mimics the
package layout (CSV-formatted ``*_perf.txt`` tables, as older releases
shipped), so they need neither ``aiconfigurator-core`` nor pyarrow."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from costmodel.tabletools import importer as aic

GEMM_COLS = ["m", "k", "n", "latency_us", "mfu", "dtype"]
DECODE_COLS = ["dtype", "kv_dtype", "batch_size", "kv_len", "latency_us", "mfu"]
PREFILL_COLS = ["dtype", "batch_size", "seq_len", "latency_us", "mfu"]
AR_COLS = ["kernel", "num_gpus", "message_bytes", "latency_us", "dtype"]

BF16_PEAK = 989e12
FP8_PEAK = 1978e12


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)


def _gemm_rows(dtype, n, k, ms, lat_ms):
    return [
        dict(framework="VLLM", version="x", device="GPU", op_name="gemm", kernel_source="ks",
             gemm_dtype=dtype, m=m, n=n, k=k, latency=lat)
        for m, lat in zip(ms, lat_ms)
    ]


def _attn_row(op, b, isl, hq, hkv, d, kvd, step, lat, window=0):
    return dict(framework="VLLM", version="x", device="GPU", op_name=op, kernel_source="vllm_flash_attn_fa3",
                batch_size=b, isl=isl, num_heads=hq, num_key_value_heads=hkv, head_dim=d, beam_width=1,
                attn_dtype="bfloat16", kv_cache_dtype=kvd, step=step, window_size=window, latency=lat)


@pytest.fixture()
def systems(tmp_path: Path) -> Path:
    root = tmp_path / "systems"
    root.mkdir()
    (root / "h100_sxm.yaml").write_text(
        "data_dir: data/h100_sxm\ngpu:\n  bfloat16_tc_flops: 989000000000000 # 989TFLOPS\n"
        "  fp8_tc_flops: 1978000000000000\n"
    )
    data = root / "data" / "h100_sxm"
    # two versions: 0.10.0 must win over 0.9.0 (numeric, not lexical, order)
    _write(data / "gemm/vllm/0.9.0/gemm_perf.txt", _gemm_rows("bfloat16", 2048, 4096, [1, 64], [9.0, 9.0]))
    ms = [1, 2, 4, 8, 16, 32, 64, 128]
    rows = _gemm_rows("bfloat16", 2048, 4096, ms, [0.01] * 6 + [0.05, 0.1])
    rows += _gemm_rows("fp8", 2048, 4096, ms, [0.005] * 6 + [0.025, 0.05])
    rows += _gemm_rows("fp8_block", 2048, 4096, ms, [0.004] * 8)
    _write(data / "gemm/vllm/0.10.0/gemm_perf.txt", rows)
    gen = [
        _attn_row("generation_attention", 1, 1, 32, 8, 128, "bfloat16", 4095, 0.01687),
        _attn_row("generation_attention", 64, 1, 32, 8, 128, "bfloat16", 4095, 0.3536),
        _attn_row("generation_attention", 64, 1, 32, 8, 128, "fp8", 4095, 0.2104),
        _attn_row("generation_attention", 64, 1, 32, 8, 128, "bfloat16", 4095, 0.2, window=128),
        _attn_row("generation_attention", 64, 1, 96, 8, 128, "bfloat16", 4095, 0.9),  # not a default layout
    ]
    _write(data / "attention/vllm/0.10.0/generation_attention_perf.txt", gen)
    ctx = [
        _attn_row("context_attention", 1, 4096, 32, 8, 128, "bfloat16", 0, 0.2643),
        _attn_row("context_attention", 1, 4096, 32, 8, 128, "fp8", 0, 0.3096),
        _attn_row("context_attention", 1, 4096, 32, 8, 128, "bfloat16", 1024, 0.5),  # cached prefix
        _attn_row("context_attention", 2, 1024, 8, 8, 128, "bfloat16", 0, 0.02),
    ]
    _write(data / "attention/vllm/0.10.0/context_attention_perf.txt", ctx)
    ar = [
        dict(framework="vLLM", version="x", device="GPU", op_name="all_reduce", kernel_source="vLLM_custom_graph",
             allreduce_dtype="bfloat16", num_gpus=8, message_size=1024, latency=0.0042, backend="vllm_graph"),
        dict(framework="vLLM", version="x", device="GPU", op_name="all_reduce", kernel_source="vLLM_custom_eager",
             allreduce_dtype="bfloat16", num_gpus=8, message_size=1024, latency=0.02, backend="vllm_eager"),
    ]
    _write(data / "comm/vllm/0.10.0/custom_allreduce_perf.txt", ar)
    nccl = [
        dict(framework="TRTLLM", version="2.29.2", device="GPU", op_name="all_reduce", kernel_source="NCCL",
             nccl_dtype="half", num_gpus=4, message_size=1024, latency=0.01),
        dict(framework="TRTLLM", version="2.29.2", device="GPU", op_name="all_reduce", kernel_source="NCCL",
             nccl_dtype="int8", num_gpus=4, message_size=1024, latency=0.01),
        dict(framework="TRTLLM", version="2.29.2", device="GPU", op_name="all_gather", kernel_source="NCCL",
             nccl_dtype="half", num_gpus=4, message_size=1024, latency=0.01),
    ]
    _write(data / "comm/nccl/2.29.2/nccl_perf.txt", nccl)
    return root


def test_gemm_units_mfu_and_columns(systems, tmp_path):
    out = tmp_path / "bd"
    s = aic.import_aiconfigurator("h100_sxm", out_dir=out, systems_dir=systems, tol=None)
    assert s["sources"]["gemm_perf"]["version"] == "0.10.0"
    g = pd.read_csv(out / "gemm/h100_sxm/data.csv")
    assert list(g.columns) == GEMM_COLS
    assert set(g["dtype"]) == {"bf16", "fp8"}  # fp8_block skipped
    row = g[(g.dtype == "bf16") & (g.m == 64)].iloc[0]
    assert (row.k, row.n) == (4096, 2048)
    assert row.latency_us == pytest.approx(50.0)  # 0.05 ms
    # 2*64*4096*2048 / (50e-6 s * 989e12) = 0.021713...
    assert row.mfu == pytest.approx(0.021713, rel=5e-3)
    row = g[(g.dtype == "fp8") & (g.m == 128)].iloc[0]
    assert row.mfu == pytest.approx(2 * 128 * 4096 * 2048 / (50e-6 * FP8_PEAK), rel=5e-3)


def test_gemm_subsampling_keeps_kinks(systems, tmp_path):
    out = tmp_path / "bd"
    s = aic.import_aiconfigurator("h100_sxm", out_dir=out, systems_dir=systems, tol=0.015)
    g = pd.read_csv(out / "gemm/h100_sxm/data.csv")
    bf = sorted(g[g.dtype == "bf16"].m)
    # flat 1..32 collapses to its ends; the kink at 32 and the ramp survive
    assert bf == [1, 32, 64, 128]
    st = s["stats"]["gemm"]["dtypes"]["bf16"]
    assert st["rows"] == 8 and st["rows_kept"] == 4 and st["drop_err_max"] <= 0.015


def test_loglog_subsample_power_law_and_kink():
    x = np.array([1, 2, 4, 8, 16, 32, 64.0])
    keep = aic.loglog_subsample(x, (3.0 * x**1.5)[None], 0.01)
    assert keep.tolist() == [True, False, False, False, False, False, True]
    y = np.where(x <= 8, 1.0, x / 8)
    keep = aic.loglog_subsample(x, y[None], 0.01)
    assert keep[3] and keep[0] and keep[-1]
    assert aic._interp_errors(x, y[None], keep).max() <= 0.01


def test_attention_tables(systems, tmp_path):
    out = tmp_path / "bd"
    s = aic.import_aiconfigurator("h100", out_dir=out, systems_dir=systems)  # alias -> h100_sxm
    dec = pd.read_csv(out / "mha/decode/h100_sxm/32-8-128.csv")
    assert list(dec.columns) == DECODE_COLS
    assert len(dec) == 3  # windowed row dropped
    r = dec[(dec.batch_size == 64) & (dec.kv_dtype == "bf16")].iloc[0]
    assert r.kv_len == 4095 and r["dtype"] == "bf16"
    assert r.latency_us == pytest.approx(353.6)
    assert r.mfu == pytest.approx(4 * 32 * 128 * 4095 * 64 / (353.6e-6 * BF16_PEAK), rel=5e-3)
    assert "fp8" in set(dec.kv_dtype)
    assert not (out / "mha/decode/h100_sxm/96-8-128.csv").exists()  # not a requested layout
    pre = pd.read_csv(out / "mha/prefill/h100_sxm/32-8-128.csv")
    assert list(pre.columns) == PREFILL_COLS
    assert len(pre) == 2  # prefix row dropped
    r = pre[pre.dtype == "bf16"].iloc[0]
    assert (r.batch_size, r.seq_len, r.latency_us) == (1, 4096, pytest.approx(264.3))
    assert r.mfu == pytest.approx(4 * 32 * 128 * 4096**2 / 2 / (264.3e-6 * BF16_PEAK), rel=5e-3)
    assert (out / "mha/prefill/h100_sxm/8-8-128.csv").exists()
    assert s["stats"]["prefill"]["prefix_rows_dropped"] == 1
    # head_layouts override, with head_dim defaulting to 128
    out2 = tmp_path / "bd2"
    aic.import_aiconfigurator("h100_sxm", out_dir=out2, systems_dir=systems, head_layouts=[(96, 8)])
    assert [p.name for p in (out2 / "mha/decode/h100_sxm").iterdir()] == ["96-8-128.csv"]


def test_allreduce_bytes_and_kernels(systems, tmp_path):
    out = tmp_path / "bd"
    aic.import_aiconfigurator("h100_sxm", out_dir=out, systems_dir=systems)
    ar = pd.read_csv(out / "allreduce/h100_sxm/data.csv")
    assert list(ar.columns) == AR_COLS
    got = {(r.kernel, r.num_gpus, r.message_bytes, r.dtype): r.latency_us for r in ar.itertuples()}
    assert got == {
        ("custom_allreduce", 8, 2048, "bf16"): pytest.approx(4.2),  # 1024 bf16 elements
        ("custom_allreduce_eager", 8, 2048, "bf16"): pytest.approx(20.0),
        ("nccl", 4, 2048, "fp16"): pytest.approx(10.0),  # half; int8 and all_gather skipped
    }


def test_peaks_from_the_system_yaml_else_costmodel_hardware(systems, tmp_path):
    assert aic._read_peaks(systems, "h100_sxm") == ({"bf16": BF16_PEAK, "fp8": 1978e12}, "systems/h100_sxm.yaml")
    assert aic._read_peaks(tmp_path, "a100_sxm") == ({"bf16": 312e12}, "costmodel.hardware")
    assert aic._read_peaks(tmp_path, "b300_sxm") == ({}, "costmodel.hardware")


def test_source_md_and_summary(systems, tmp_path):
    out = tmp_path / "bd"
    s = aic.import_aiconfigurator("h100_sxm", out_dir=out, systems_dir=systems, package_version="9.9")
    md = (out / "SOURCE_h100_sxm.md").read_text()
    assert "Apache" in md and "aiconfigurator-core" in md and "9.9" in md and "0.10.0" in md
    assert s["total_bytes"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def test_version_and_engine_fallback(systems, tmp_path):
    s = aic.import_aiconfigurator("h100_sxm", version="0.9.5", out_dir=tmp_path / "a", systems_dir=systems)
    assert s["sources"]["gemm_perf"]["version"] == "0.9.0"
    assert any("0.9.5" in n for n in s["notes"])
    s = aic.import_aiconfigurator("h100_sxm", engine="sglang", out_dir=tmp_path / "b", systems_dir=systems)
    assert s["sources"]["gemm_perf"]["engine"] == "vllm"
    assert any("no sglang data" in n for n in s["notes"])
    with pytest.raises(ValueError, match="no AIConfigurator data"):
        aic.import_aiconfigurator("z999", out_dir=tmp_path / "c", systems_dir=systems)


def test_missing_package_message(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "aiconfigurator_core", None)
    with pytest.raises(RuntimeError, match=r"pip install 'costmodel\[aiconfigurator\]'"):
        aic.import_aiconfigurator("h100_sxm", out_dir=tmp_path)


def test_cli_glue(systems, tmp_path, capsys):
    p = argparse.ArgumentParser()
    aic.add_arguments(p)
    args = p.parse_args(["--gpu", "h100_sxm", "--out", str(tmp_path / "o"), "--systems-dir", str(systems)])
    assert args.engine == "vllm" and args.version is None
    assert aic.run(args) == 0
    assert (tmp_path / "o/gemm/h100_sxm/data.csv").exists()
    args = p.parse_args(["--gpu", "nope", "--out", str(tmp_path / "o"), "--systems-dir", str(systems)])
    assert aic.run(args) == 1


def test_real_package_h100(tmp_path):
    pytest.importorskip("aiconfigurator_core")
    pytest.importorskip("pyarrow")
    out = tmp_path / "bd"
    s = aic.import_aiconfigurator("h100_sxm", out_dir=out)
    g = pd.read_csv(out / "gemm/h100_sxm/data.csv")
    assert list(g.columns) == GEMM_COLS
    assert g["mfu"].max() < 1.0 and s["stats"]["gemm"]["rows_mfu_gt_1"] == 0
    c = g[(g.dtype == "bf16") & (g.k == 8192) & (g.n == 8192)].sort_values("m")
    big = c[c.m >= 512]
    assert big.latency_us.is_monotonic_increasing or big.latency_us.iloc[-1] > 10 * big.latency_us.iloc[0]
    dec = pd.read_csv(out / "mha/decode/h100_sxm/32-8-128.csv")
    assert list(dec.columns) == DECODE_COLS and (dec.kv_len == 4095).any()
    ar = pd.read_csv(out / "allreduce/h100_sxm/data.csv")
    assert set(ar.kernel) >= {"custom_allreduce", "nccl"}


def _add_engine(systems: Path, engine: str, version: str, factor: float, ms, extra_m=()):
    """A BF16 GEMM collection of another engine: the vLLM fixture curve times ``factor``."""
    base = dict(zip([1, 2, 4, 8, 16, 32, 64, 128], [0.01] * 6 + [0.05, 0.1]))
    rows = _gemm_rows("bfloat16", 2048, 4096, list(ms), [base[m] * factor for m in ms])
    rows += _gemm_rows("bfloat16", 2048, 4096, list(extra_m), [1.0] * len(extra_m))
    _write(systems / "data/h100_sxm/gemm" / engine / version / "gemm_perf.txt", rows)


def test_bf16_gemm_consensus_is_the_per_shape_median_on_the_engines_grid(systems, tmp_path):
    all_m = [1, 2, 4, 8, 16, 32, 64, 128]
    _add_engine(systems, "sglang", "0.5.0", 1.10, all_m, extra_m=[256])  # 256: not on vLLM's grid
    _add_engine(systems, "trtllm", "1.0.0", 1.04, [1, 64])
    s = aic.import_aiconfigurator("h100_sxm", out_dir=tmp_path / "c", systems_dir=systems, tol=None)
    g = pd.read_csv(tmp_path / "c/gemm/h100_sxm/data.csv")
    bf = g[g.dtype == "bf16"].set_index("m").latency_us
    assert sorted(bf.index) == all_m
    base = dict(zip(all_m, [10.0] * 6 + [50.0, 100.0]))  # µs
    for m in all_m:  # median of (1, 1.10, 1.04) where trtllm measured, else of (1, 1.10)
        assert bf[m] == pytest.approx(base[m] * (1.04 if m in (1, 64) else 1.05), rel=1e-3), m
    fp8 = g[(g.dtype == "fp8") & (g.m == 128)].latency_us.iloc[0]
    assert fp8 == pytest.approx(50.0)  # other dtypes stay the requested engine's
    c = s["bf16_consensus"]["collections"]
    assert set(c) == {"vllm/0.10.0", "sglang/0.5.0", "trtllm/1.0.0"} and c["trtllm/1.0.0"]["shapes"] == 2
    md = (tmp_path / "c/SOURCE_h100_sxm.md").read_text()
    assert "median over these collections" in md and "grid of 8 shapes" in md
    s = aic.import_aiconfigurator("h100_sxm", out_dir=tmp_path / "v", systems_dir=systems, tol=None,
                                  bf16_consensus=False)
    g = pd.read_csv(tmp_path / "v/gemm/h100_sxm/data.csv")
    assert g[(g.dtype == "bf16") & (g.m == 64)].latency_us.iloc[0] == pytest.approx(50.0)
    assert "bf16_consensus" not in s


def test_collection_report_ratios(systems):
    from costmodel.tabletools.crossval import collection_report
    _add_engine(systems, "sglang", "0.5.0", 1.10, [1, 2, 4, 8, 16, 32, 64, 128])
    rows = {r["latency of"]: r for r in collection_report("h100_sxm", systems_dir=systems)}
    assert rows["sglang/0.5.0"]["over"] == "vllm/0.10.0" and rows["sglang/0.5.0"]["median"] == "1.100"
    assert rows["sglang/0.5.0"]["shapes"] == 8 and rows["vllm/0.9.0"]["shapes"] == 2
