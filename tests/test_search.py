"""Deployment search: candidates rejected by reason before scoring (memory, divisibility, GPUs, precision, KV
for the concurrency), scored rows equal to `serve` on the equivalent records, the Pareto front non-dominated,
the SLO and rate filters, and the command line.  One small space (Qwen3-8B on 2 x H100, TP 1-2, three
concurrencies, 256/32 tokens, two rounds) is compiled once and reused."""
import json

import pandas as pd
import pytest

from costmodel import memory
from costmodel.apps import search as sr
from costmodel.apps import serve as sv
from costmodel.cli import main

CONC = (1, 8, 32)
OPTS = {"rounds": 2}
SPACE = dict(isl=256, osl=32, concurrency=CONC, workload_options=OPTS)


@pytest.fixture(scope="module")
def res():
    return sr.search("qwen3-8b", "H100", 2, **SPACE)


def test_space_and_rejections_by_reason(res):
    assert {(r["tp"], r["dp"]) for r in res.rows} == {(1, 2), (2, 1)}
    assert {r["concurrency_per_replica"] for r in res.rows} == set(CONC)
    assert len(res.rows) == 6
    # TP 4 and 8 on a budget of 2 GPUs: every concurrency of each, counted once
    assert res.rejected_counts == {sr.TOO_MANY_GPUS: 2 * len(CONC)}
    for r in res.rows:
        assert r["concurrency_total"] == r["concurrency_per_replica"] * r["dp"]
        assert r["kv_needed_bytes_per_gpu"] < r["kv_pool_bytes_per_gpu"]


def test_memory_divisibility_and_gpu_rejections():
    # Llama-3.1-70B in bf16: 131 GiB of weights on one 80 GB H100, 66 GiB each on two; 64 query heads do not
    # split three ways; TP6 needs more than three GPUs.  Nothing is left to score.
    res = sr.search("llama-3.1-70b", "H100", 3, isl=256, osl=32, concurrency=(1, 4), gpus_per_node=6,
                    weights=["bf16"])
    assert res.rows == []
    by_tp = {r["tp"]: r["reason"] for r in res.rejected}
    assert by_tp == {1: sr.WEIGHTS_DO_NOT_FIT, 2: sr.WEIGHTS_DO_NOT_FIT, 3: sr.DIVISIBILITY, 6: sr.TOO_MANY_GPUS}
    assert res.rejected_counts == {sr.WEIGHTS_DO_NOT_FIT: 4, sr.DIVISIBILITY: 2, sr.TOO_MANY_GPUS: 2}
    assert "num_attention_heads=64" in next(r["detail"] for r in res.rejected if r["tp"] == 3)
    assert sr.no_result_message(res).startswith("no feasible configuration: rejected 4 memory")


def test_kv_for_the_concurrency_and_fp8_without_tensor_cores():
    cap = memory.kv_capacity_tokens("llama-3.1-8b", 1, "H100", 0.9, max_num_batched_tokens=8192, max_num_seqs=1024,
                                    weights="bf16")
    assert cap.fits and 64 * (32000 + 32) > cap.tokens  # the memory model's own numbers, not the search's
    res = sr.search("llama-3.1-8b", "H100", 1, isl=32000, osl=32, concurrency=(64,))
    assert res.rows == [] and res.rejected_counts == {sr.KV_DOES_NOT_FIT: 1, sr.TOO_MANY_GPUS: 3}
    most = cap.blocks // -(-(32000 + 32) // 16)  # whole 16-token blocks per request
    assert 0 < most < 64 and f"at most {most} requests" in res.rejected[0]["detail"]
    res = sr.search("llama-3.1-8b", "A100", 1, isl=256, osl=32, concurrency=(1,), weights=["fp8"])
    assert res.rejected_counts == {sr.PRECISION: 1, sr.TOO_MANY_GPUS: 3}


def test_scored_rows_equal_serve_on_the_equivalent_records(res):
    recs = [{"id": f"r{i}", "model": "qwen3-8b", "gpu": "H100", "tp": r["tp"], "moe_ep": 1, "weights": "bf16",
             "engine": {"name": "vllm", "version": "0.15.1", "gpu_memory_utilization": 0.9},
             "workload": {"type": "closed", "concurrency": r["concurrency_per_replica"], "input_tokens": 256,
                          "output_tokens": 32}} for i, r in enumerate(res.rows)]
    outs = sv.serve(recs, workload_options=OPTS)
    for r, o in zip(res.rows, outs):
        assert r["ttft_mean_ms"] == pytest.approx(o["predicted"]["ttft_mean_ms"], rel=1e-9)
        assert r["tpot_mean_ms"] == pytest.approx(o["predicted"]["tpot_mean_ms"], rel=1e-9)
        assert r["output_tokens_per_s_per_gpu"] == pytest.approx(o["throughput"]["output_tokens_per_s_per_gpu"])
        assert r["output_tokens_per_s_total"] == pytest.approx(r["dp"] * o["throughput"]["output_tokens_per_s"])


def test_pareto_mask_by_hand():
    assert sr.pareto_mask([1, 2, 3, 1, 2], [3, 2, 1, 1, 2]) == [True, True, True, False, True]


def test_pareto_front_is_non_dominated_and_covers_the_rest(res):
    feas, front = res.feasible, res.pareto
    assert front and len(front) < len(feas)

    def dominates(a, b):
        ka = (a["output_tokens_per_s_per_gpu"], a["output_tokens_per_s_per_user"])
        kb = (b["output_tokens_per_s_per_gpu"], b["output_tokens_per_s_per_user"])
        return ka[0] >= kb[0] and ka[1] >= kb[1] and ka != kb
    for p in front:
        assert not any(dominates(q, p) for q in feas)
    for q in feas:
        if q not in front:
            assert any(dominates(p, q) for p in front)


def test_slo_and_rate_filters(res):
    tpots = sorted(r["tpot_mean_ms"] for r in res.rows)
    ttfts = sorted(r["ttft_mean_ms"] for r in res.rows)
    tpot_ms, ttft_ms = tpots[len(tpots) // 2], ttfts[-2]
    slo = sr.search("qwen3-8b", "H100", 2, ttft_ms=ttft_ms, tpot_ms=tpot_ms, **SPACE)
    want = {(r["tp"], r["concurrency_per_replica"]) for r in res.rows
            if r["tpot_mean_ms"] <= tpot_ms and r["ttft_mean_ms"] <= ttft_ms}
    assert 0 < len(want) < len(res.rows)
    assert {(r["tp"], r["concurrency_per_replica"]) for r in slo.feasible} == want
    assert all(r["pareto"] is False for r in slo.rows if not r["meets_slo"])
    rates = sorted(r["requests_per_s_total"] for r in res.rows)
    rate = (rates[2] + rates[3]) / 2
    fast = sr.search("qwen3-8b", "H100", 2, rate=rate, **SPACE)
    assert len(fast.feasible) == 3 and all(r["requests_per_s_total"] >= rate for r in fast.feasible)


def test_vllm_command(res):
    best = res.feasible[0]
    cmd = sr.vllm_command(res, best)
    assert cmd.startswith("vllm serve qwen3-8b ") and f"--tensor-parallel-size {best['tp']}" in cmd
    assert ("--data-parallel-size 2" in cmd) == (best["dp"] == 2)
    assert "--enable-expert-parallel" not in cmd and "--quantization" not in cmd
    assert "--max-num-seqs 1024" in cmd and "--gpu-memory-utilization 0.9" in cmd
    fp8 = dict(best, weights="fp8", moe_ep=2, tp=2, dp=1)
    cmd = sr.vllm_command(res, fp8)
    assert "--quantization fp8" in cmd and "--enable-expert-parallel" in cmd and "--data-parallel" not in cmd


def test_plot(res, tmp_path):
    msg = sr.plot(res, tmp_path / "p.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "not installed" in msg
    else:
        assert (tmp_path / "p.png").stat().st_size > 0


def test_cli_json_and_out(res, tmp_path, capsys):
    out = tmp_path / "rows.csv"
    rc = main(["search", "--model", "qwen3-8b", "--gpu", "H100", "--gpus", "2", "--isl", "256", "--osl", "32",
               "--concurrency", "1,8,32", "--rounds", "2", "--tpot-ms", "1000", "--out", str(out), "--json",
               "--explain"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    s = json.loads(cap.out)
    assert s["configurations_scored"] == 6 and s["configurations_considered"] == 12 and s["feasible"] == 6
    assert s["best"]["output_tokens_per_s_per_gpu"] == pytest.approx(res.feasible[0]["output_tokens_per_s_per_gpu"])
    assert "--tensor-parallel-size" in s["best"]["vllm_command"]
    assert "needs more GPUs" in cap.err
    df = pd.read_csv(out)
    assert len(df) == 6 and {"ttft_mean_ms", "tpot_mean_ms", "weights_bytes_per_gpu", "pareto"} <= set(df.columns)


@pytest.mark.parametrize("args, words", [
    (["--model", "no-such-model", "--gpu", "H100"], "no config.json for model"),
    (["--model", "qwen3-8b", "--gpu", "X9"], "unknown GPU"),
    (["--model", "llama-3.1-70b", "--gpu", "H100", "--weights", "bf16"], "no feasible configuration"),
    (["--model", "qwen3-8b", "--gpu", "H100", "--out", "x.txt"], ".parquet or .csv"),
    (["--model", "qwen3-8b", "--gpu", "H100", "--weights", "int4"], "field 'weights'"),
])
def test_cli_bad_input_is_one_line(args, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["search", "--gpus", "1", "--isl", "256", "--osl", "32", "--concurrency", "1", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and words in err, err
