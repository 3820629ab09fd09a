"""Benchmark harness: the writer produces tables the loader reads; the GPU path runs where there is a GPU."""
import numpy as np
import pandas as pd
import pytest

from costmodel import get_gpu, load_tables
from costmodel.tabletools.measure import GRIDS, main, time_call
from costmodel.tabletools.measure import NO_GPU_MESSAGE, gpu_devices
from costmodel.tables import attn_table_us, gemm_table_us

HAS_GPU = bool(gpu_devices())


def _check_loadable(root, gpu_folder, grid):
    t = load_tables(root, get_gpu(gpu_folder))
    assert t.sources["gemm"].endswith(f"gemm/{gpu_folder}/data.csv")
    gemm = pd.read_csv(root / "gemm" / gpu_folder / "data.csv")
    assert list(gemm.columns) == ["m", "k", "n", "latency_us", "mfu", "dtype"]
    assert (gemm.latency_us > 0).all() and (gemm.mfu > 0).all()
    assert len(gemm[gemm.dtype == "bf16"]) == len(grid.gemm_m) * len(grid.gemm_kn)
    # the loader reproduces every measured point (after its noise policy, which only lowers)
    used = {a.where: a.used_us for a in t.adjustments if a.table == "gemm/bf16"}
    bf = gemm[gemm.dtype == "bf16"]
    pred = [float(gemm_table_us(t.gemm["bf16"], float(r.m), float(r.k), float(r.n))) for r in bf.itertuples()]
    expect = [used.get(f"m={r.m:.0f} k={r.k:.0f} n={r.n:.0f}", r.latency_us) for r in bf.itertuples()]
    np.testing.assert_allclose(pred, expect, rtol=1e-4)
    for kind, col in (("decode", "kv_len"), ("prefill", "seq_len")):
        heads = getattr(t, f"{kind}_heads")
        assert heads == sorted(getattr(grid, f"{kind}_layouts"))
        for hq, hkv, d in heads:
            df = pd.read_csv(root / "mha" / kind / gpu_folder / f"{hq}-{hkv}-{d}.csv")
            assert (df.latency_us > 0).all() and (df.dtype == "bf16").all()
            lengths = grid.decode_kv if kind == "decode" else grid.prefill_seq
            assert len(df) == len(getattr(grid, f"{kind}_batch")) * len(lengths)
        tab = getattr(t, kind)
        assert np.isfinite(np.asarray(tab.log_t)).all()
        assert float(attn_table_us(tab, 0, 1.0, float(df[col].iloc[0]), 1.0)) > 0
    assert (root / f"SOURCE_{gpu_folder}.md").is_file()
    return t


def test_cpu_tiny_grid_writes_loadable_tables(tmp_path, capsys):
    if HAS_GPU:
        pytest.skip("a GPU is present: --allow-cpu would measure it, covered by the GPU test")
    assert main(["--out", str(tmp_path), "--gpu-name", "h100_sxm", "--allow-cpu", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "tiny grid on the CPU" in out and "wrote" in out
    _check_loadable(tmp_path, "h100_sxm", GRIDS["tiny"])
    src = (tmp_path / "SOURCE_h100_sxm.md").read_text()
    assert "median" in src and "xla" in src


def test_no_gpu_measures_nothing_and_exits_0(tmp_path, capsys):
    if HAS_GPU:
        pytest.skip("a GPU is present")
    assert main(["--out", str(tmp_path / "bd"), "--gpu-name", "h100_sxm"]) == 0
    assert NO_GPU_MESSAGE in capsys.readouterr().out
    assert not (tmp_path / "bd").exists()


def test_time_call_reports_median_microseconds():
    import time

    calls = []

    def fn():
        calls.append(1)
        time.sleep(1e-3)
        return 0

    us = time_call(fn, sync=lambda out: None, repeats=3, warmup=1, target_s=2e-3)
    assert 900 < us < 20000 and len(calls) >= 2 + 1 + 3


@pytest.mark.skipif(not HAS_GPU, reason="no GPU: the real small grid needs one")
def test_gpu_small_grid(tmp_path):
    dev = gpu_devices()[0]
    assert main(["--out", str(tmp_path), "--gpu-name", "h100_sxm", "--grid", "small", "--repeats", "5"]) == 0
    t = _check_loadable(tmp_path, "h100_sxm", GRIDS["small"])
    gemm = pd.read_csv(tmp_path / "gemm" / "h100_sxm" / "data.csv")
    big = gemm[(gemm.dtype == "bf16") & (gemm.m == gemm.m.max())]
    # a large bf16 GEMM reaches a sensible fraction of the (H100) peak; more is impossible
    assert (big.mfu > 0.05).all() and (big.mfu < 1.5).all(), dev.device_kind
    assert "decode" in t.sources and "prefill" in t.sources


def test_shapes_of_models_by_hand():
    from costmodel.tabletools.measure import grid_for_models, parse_shapes_of
    # Llama-3.1-8B: hidden 4096, intermediate 14336, 32 heads, 8 KV heads, head_dim 128
    model, tps = parse_shapes_of("llama-3.1-8b:1,2")
    assert tps == (1, 2) and parse_shapes_of("llama-3.1-8b")[1] == (1,)
    g = grid_for_models(GRIDS["small"], [(model, tps)])
    assert set(g.gemm_kn) == {(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096),  # TP1: QKV, O, gate_up, down
                              (4096, 3072), (2048, 4096), (4096, 14336), (7168, 4096)}  # TP2
    assert g.decode_layouts == g.prefill_layouts == ((16, 4, 128), (32, 8, 128))
    assert g.gemm_m == GRIDS["small"].gemm_m and g.decode_kv == GRIDS["small"].decode_kv
    for bad in ("llama-3.1-8b:x", "llama-3.1-8b:0"):
        with pytest.raises(ValueError, match="TP degrees"):
            parse_shapes_of(bad)


def test_replicas_share_one_gib():
    from costmodel.tabletools.measure import MAX_REPLICAS, replicas
    assert replicas(1e3) == MAX_REPLICAS == 8
    assert replicas(2 ** 28) == 4 and replicas(2 ** 30) == 1 and replicas(2 ** 34) == 1


def test_kernels_flag_measures_only_those(tmp_path, capsys):
    if HAS_GPU:
        pytest.skip("a GPU is present")
    assert main(["--out", str(tmp_path), "--gpu-name", "h100_sxm", "--allow-cpu", "--repeats", "1",
                 "--kernels", "gemm"]) == 0
    assert (tmp_path / "gemm" / "h100_sxm" / "data.csv").is_file() and not (tmp_path / "mha").exists()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--gpu-name", "h100_sxm", "--kernels", "gemm,moe"])
    assert main(["--out", str(tmp_path / "x"), "--gpu-name", "h100_sxm", "--allow-cpu",
                 "--shapes-of", "no-such-model:1"]) == 2
    assert "--shapes-of" in capsys.readouterr().err


@pytest.mark.parametrize("folder,gpu", [("h100_sxm_2026-11-26", "H100"), ("h200_sxm_2026-11-26", "H200")])
def test_measured_bf16_gemm_agrees_with_imported_tables(folder, gpu):
    """Two independent measurements of cuBLAS BF16 GEMMs (this harness on a lent GPU, AIConfigurator's
    database in bench_data/) agree: the imported tables price the measured points within 10 % (median)."""
    from pathlib import Path

    from costmodel.tabletools.crossval import measured_cells, price_gemm
    repo = Path(__file__).resolve().parent.parent / "bench_data"
    pts = measured_cells("gemm", repo / "measured" / folder / "gemm" / f"{gpu.lower()}_sxm" / "data.csv")
    pts = pts[pts.dtype == "bf16"]
    assert len(pts) >= 32
    rel = price_gemm(load_tables(repo, get_gpu(gpu)), pts.m, pts.k, pts.n, "bf16") / pts.latency_us.to_numpy() - 1
    assert np.isfinite(rel).all() and np.median(np.abs(rel)) < 0.10
