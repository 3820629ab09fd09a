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

from conftest import shared_model

CONC = (1, 8, 32)
# the search and `serve` given the same options (two rounds, so no cool-down: fast to simulate); the search's
# own, `SIM_WORKLOAD`: `test_search_simulates_without_the_ramp_and_the_drain`
OPTS = {"rounds": 2, "benchmark_rounds": 0, "cooldown_rounds": 0}
# pipelines: `test_pipeline_*`; disaggregated units: `test_disaggregated_units_equal_serve`
SPACE = dict(isl=256, osl=32, concurrency=CONC, workload_options=OPTS, pp=1, disagg=False)


@pytest.fixture(scope="module")
def res():
    return sr.search("qwen3-8b", "H100", 2, **SPACE)


def test_disaggregated_units_equal_serve():
    """With disaggregation, the two GPUs also make one prefill and one decode worker; the row's numbers are
    those `serve` gives its record, and its command line is a launch sketch of both pools."""
    full = sr.search("qwen3-8b", "H100", 2, **{**SPACE, "disagg": True})
    rows = [r for r in full.rows if r["mode"] == "disagg"]
    assert rows and {r["layout"] for r in rows} == {"disagg 1x prefill TP1 + 1x decode TP1"}
    assert {(r["tp"], r["dp"]) for r in full.rows if r["mode"] == "agg"} == {(1, 2), (2, 1)}
    for r in rows:
        assert r["gpus_used"] == 2 and r["unit_gpus"] == 2
        rec = {"id": "pd", "model": "qwen3-8b", "gpu": "H100", "mode": "disagg", "weights": "bf16",
               "engine": {"name": "vllm", "version": "0.15.1", "gpu_memory_utilization": 0.9,
                          "max_num_batched_tokens": r["max_num_batched_tokens"], "max_num_seqs": r["max_num_seqs"],
                          "kv_cache_dtype": r["kv_cache_dtype"]},
               "prefill": {"num_workers": 1, "tp_size": 1, "max_num_seqs": r["prefill_max_num_seqs"],
                           "max_num_batched_tokens": r["prefill_max_num_batched_tokens"]},
               "decode": {"num_workers": 1, "tp_size": 1},
               "workload": {"type": "closed", "concurrency": r["concurrency_per_replica"], "input_tokens": 256,
                            "output_tokens": 32}}
        out, = sv.serve([rec], workload_options=OPTS)
        assert r["tpot_mean_ms"] == pytest.approx(out["predicted"]["tpot_mean_ms"], rel=1e-9)
        assert r["ttft_mean_ms"] == pytest.approx(out["predicted"]["ttft_mean_ms"], rel=1e-9)
        assert r["output_tokens_per_s_per_gpu"] == pytest.approx(out["throughput"]["output_tokens_per_s_per_gpu"])
        cmd = sr.vllm_command(full, r)
        assert cmd.startswith("prefill (1x): vllm serve qwen3-8b") and cmd.count("NixlConnector") == 2


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
                    weights=["bf16"], pp=1)
    assert res.rows == []
    by_tp = {r["tp"]: r["reason"] for r in res.rejected}
    assert by_tp == {1: sr.WEIGHTS_DO_NOT_FIT, 2: sr.WEIGHTS_DO_NOT_FIT, 3: sr.DIVISIBILITY, 6: sr.TOO_MANY_GPUS}
    assert res.rejected_counts == {sr.WEIGHTS_DO_NOT_FIT: 4, sr.DIVISIBILITY: 2, sr.TOO_MANY_GPUS: 2}
    assert "num_attention_heads=64" in next(r["detail"] for r in res.rejected if r["tp"] == 3)
    assert sr.no_result_message(res).startswith("no feasible configuration: rejected 4 memory")


def test_pipeline_fits_a_model_that_tensor_parallelism_cannot_and_equals_serve():
    # Llama-3.1-70B in bf16 on 3 GPUs: TP3 cannot split its 64 heads and TP1/TP2 cannot hold its weights,
    # but three pipeline stages of one GPU hold 27, 27 and 26 of its 80 layers
    res = sr.search("llama-3.1-70b", "H100", 3, isl=256, osl=32, concurrency=(1, 4), gpus_per_node=6,
                    weights=["bf16"], workload_options=OPTS)
    assert {(r["tp"], r["pp"], r["dp"]) for r in res.rows} == {(1, 3, 1)}
    by = {(r["tp"], r["pp"]): r["reason"] for r in res.rejected}
    assert by[(1, 1)] == by[(1, 2)] == by[(2, 1)] == sr.WEIGHTS_DO_NOT_FIT and by[(3, 1)] == sr.DIVISIBILITY
    assert by[(1, 6)] == by[(2, 3)] == by[(3, 2)] == by[(6, 1)] == sr.TOO_MANY_GPUS
    row = max(res.rows, key=lambda r: r["concurrency_per_replica"])
    assert row["gpus_used"] == 3 and row["layout"] == "TP1 PP3 x DP1"
    assert "--pipeline-parallel-size 3" in sr.vllm_command(res, row)
    rec = {"id": "pp3", "model": "llama-3.1-70b", "gpu": "H100", "tp": 1, "pp": 3, "weights": "bf16",
           "engine": {"name": "vllm", "version": "0.15.1", "gpu_memory_utilization": 0.9},
           "workload": {"type": "closed", "concurrency": 4, "input_tokens": 256, "output_tokens": 32}}
    out = sv.serve([rec], workload_options=OPTS)[0]
    assert row["tpot_mean_ms"] == pytest.approx(out["predicted"]["tpot_mean_ms"], rel=1e-9)
    assert row["output_tokens_per_s_per_gpu"] == pytest.approx(out["throughput"]["output_tokens_per_s_per_gpu"])
    assert out["simulation"]["pp"] == 3 and any("pipeline" in n for n in out["notes"])


def test_kv_for_the_concurrency_and_fp8_without_tensor_cores():
    cap = memory.kv_capacity_tokens("llama-3.1-8b", 1, "H100", 0.9, max_num_batched_tokens=8192, max_num_seqs=1024,
                                    weights="bf16")
    assert cap.fits and 64 * (32000 + 32) > cap.tokens  # the memory model's own numbers, not the search's
    res = sr.search("llama-3.1-8b", "H100", 1, isl=32000, osl=32, concurrency=(64,), pp=1)
    assert res.rows == [] and res.rejected_counts == {sr.KV_DOES_NOT_FIT: 1, sr.TOO_MANY_GPUS: 3}
    most = cap.blocks // -(-(32000 + 32) // 16)  # whole 16-token blocks per request
    assert 0 < most < 64 and f"at most {most} requests" in res.rejected[0]["detail"]
    res = sr.search("llama-3.1-8b", "A100", 1, isl=256, osl=32, concurrency=(1,), weights=["fp8"], pp=1)
    assert res.rejected_counts == {sr.PRECISION: 1, sr.TOO_MANY_GPUS: 3}


def test_search_simulates_without_the_ramp_and_the_drain():
    """By default the search's simulation leaves each client's first and last round out of the statistics
    (`SIM_WORKLOAD`, recorded in the query), and a reported row is what `serve` gives its record with
    `search.sim_workload` of the same options."""
    assert sr.sim_workload({"rounds": 3, "sampling": None}) == {**sr.SIM_WORKLOAD, "rounds": 3}
    res = sr.search("qwen3-8b", "H100", 1, isl=256, osl=32, concurrency=(8,), pp=1, disagg=False,
                    workload_options={"rounds": 3})
    assert res.query["simulation"] == {**sr.SIM_WORKLOAD, "rounds": 3}
    row, = res.rows
    rec = {"id": "r", "model": "qwen3-8b", "gpu": "H100", "tp": 1, "weights": "bf16",
           "engine": {"name": "vllm", "version": "0.15.1", "gpu_memory_utilization": 0.9},
           "workload": {"type": "closed", "concurrency": 8, "input_tokens": 256, "output_tokens": 32}}
    steady, = sv.serve([rec], workload_options=sr.sim_workload({"rounds": 3}))
    drained, = sv.serve([rec], workload_options={"rounds": 3, "benchmark_rounds": 0})
    assert row["tpot_mean_ms"] == pytest.approx(steady["predicted"]["tpot_mean_ms"], rel=1e-9)
    assert row["ttft_mean_ms"] == pytest.approx(steady["predicted"]["ttft_mean_ms"], rel=1e-9)
    assert steady["predicted"]["tpot_mean_ms"] != drained["predicted"]["tpot_mean_ms"]


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
               "--explain", "--pp", "1", "--no-disagg"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    s = json.loads(cap.out)
    assert s["configurations_scored"] == 6 and s["configurations_considered"] == 12 and s["feasible"] == 6
    assert s["seconds"] > 0 and s["compile_seconds"] >= 0
    assert s["best"]["output_tokens_per_s_per_gpu"] == pytest.approx(res.feasible[0]["output_tokens_per_s_per_gpu"])
    assert "--tensor-parallel-size" in s["best"]["vllm_command"]
    assert "needs more GPUs" in cap.err
    df = pd.read_csv(out)
    assert len(df) == 6 and {"ttft_mean_ms", "tpot_mean_ms", "weights_bytes_per_gpu", "pareto"} <= set(df.columns)


def test_cli_report_names_the_statistic_price_and_gpus(res, capsys):
    rc = main(["search", "--model", "qwen3-8b", "--gpu", "H100", "--gpus", "2", "--isl", "256", "--osl", "32",
               "--concurrency", "1,8,32", "--rounds", "2", "--ttft-ms", "10000", "--e2e-ms", "10000",
               "--percentile", "99", "--price", "H100=2", "--objective", "min_gpus_for_rate", "--rate", "1",
               "--pp", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "p99 TTFT <= 10000 ms, p99 E2E <= 10000 ms, >= 1 requests/s, fewest GPUs" in out
    assert "Ranked by fewest GPUs, then output tokens per US$" in out
    header = next(line for line in out.splitlines() if line.startswith("rank"))
    assert header.split()[:6] == ["rank", "layout", "weights", "conc", "gpus", "ttft_p99_ms"]
    assert {"e2e_p99_ms", "usd_h", "tok_per_usd"} <= set(header.split())


@pytest.mark.parametrize("args, words", [
    (["--model", "no-such-model", "--gpu", "H100"], "no config.json for model"),
    (["--model", "qwen3-8b", "--gpu", "X9"], "unknown GPU"),
    (["--model", "llama-3.1-70b", "--gpu", "H100", "--weights", "bf16"], "no feasible configuration"),
    (["--model", "qwen3-8b", "--gpu", "H100", "--out", "x.txt"], ".parquet or .csv"),
    (["--model", "qwen3-8b", "--gpu", "H100", "--weights", "int4"], "field 'weights'"),
    (["--model", "qwen3-8b", "--gpu", "H100", "--price", "H200=2"], "field 'price': a price for H200"),
    (["--model", "qwen3-8b", "--gpu", "H100,H200", "--price", "H100=2"], "field 'price': no price for H200"),
    (["--model", "qwen3-8b", "--gpu", "H100", "--price", "H100=0"], "field 'price'"),
    (["--model", "qwen3-8b", "--gpu", "H100", "--price", "H100"], "field 'price': must be GPU="),
    (["--model", "qwen3-8b", "--gpu", "H100", "--objective", "min_gpus_for_rate"], "field 'rate'"),
    (["--model", "qwen3-8b", "--gpu", "H100", "--percentile", "75"], "field 'percentile'"),
])
def test_cli_bad_input_is_one_line(args, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["search", "--gpus", "1", "--isl", "256", "--osl", "32", "--concurrency", "1", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and words in err, err


# ---------------------------------------------------------------- decision quality (costmodel regret)

def _closed(i, tp, c, ttft, tpot, osl=11, model="m"):
    return {"id": f"{model}-{osl}-{i}", "model": model, "gpu": "H100", "weights": "bf16", "tp": tp,
            "workload": {"type": "closed", "concurrency": c, "input_tokens": 100, "output_tokens": osl},
            "measured": {"ttft_mean_ms": ttft, "tpot_mean_ms": tpot}}


# measured (TP, C, TTFT, TPOT) of one group, OSL 11: a client finishes a request per TTFT + 10 x TPOT, so
# tokens/s per GPU = C x 11 / latency / TP: 55, 146.67, 110, 352.  Median TPOT 25 ms: A and B within, B best.
HAND = [(1, 1, 100.0, 10.0), (1, 4, 100.0, 20.0), (2, 8, 100.0, 30.0), (1, 16, 100.0, 40.0)]


def _pred(rec, tpot, tput):
    return {"id": rec["id"], "predicted": {"tpot_mean_ms": tpot, "ttft_mean_ms": 100.0},
            "throughput": {"output_tokens_per_s_per_gpu": tput}}


def _hand_example():
    recs, preds = [], []
    # (predicted TPOT, predicted tokens/s per GPU) per row of HAND, one group per OSL-free label:
    # group "miss": C is predicted within 25 ms and fastest, measured 30 ms -> a miss, 100 %;
    # group "a": A has the most predicted throughput within -> 1 - 55 / 146.67 = 62.5 %;  group "b": B -> 0 %.
    plans = {"miss": [(12, 50), (24, 100), (22, 120), (60, 300)],
             "a": [(12, 200), (24, 100), (40, 120), (60, 300)],
             "b": [(12, 50), (24, 100), (40, 120), (60, 300)]}
    for model, plan in plans.items():
        for i, ((tp, c, ttft, tpot), (p_tpot, p_tput)) in enumerate(zip(HAND, plan)):
            rec = _closed(i, tp, c, ttft, tpot, model=model)
            recs.append(rec)
            preds.append(_pred(rec, p_tpot, p_tput))
    refused = _closed(9, 1, 2, 100.0, 15.0, model="b")  # refused: left out of group "b"
    small = [_closed(i, 1, i + 1, 50.0, 5.0, osl=33) for i in range(3)]  # three rows: too small a group
    twice = dict(recs[0], id="a-again")  # group "a"'s first row listed again under another id: left out
    recs += [refused, twice] + small
    preds += [{"id": refused["id"], "refused": "not modelled"}, _pred(twice, 1.0, 1e6)]
    preds += [_pred(r, 5.0, 10.0) for r in small]
    return recs, preds


def test_regret_by_hand():
    from costmodel.apps import decisions as dq
    assert dq.closed_loop_tokens_per_s_per_gpu(100.0, 30.0, 8, 11, 2) == pytest.approx(110.0)
    recs, preds = _hand_example()
    res = dq.regret(recs, preds)
    by = {g["model"]: g for g in res.groups}
    assert set(by) == {"miss", "a", "b"} and res.small == 3 and list(res.refused) == ["b-11-9"]
    assert res.duplicates == 1 and all(g["rows"] == 4 for g in res.groups)
    for g in res.groups:
        assert g["slo_tpot_ms"] == 25.0 and g["best"]["id"].endswith("-1")
        assert g["best"]["measured_tok_s_gpu"] == pytest.approx(4 * 11 / 0.3)
    assert by["miss"]["missed"] and by["miss"]["regret"] == 1.0 and by["miss"]["pick"]["tp"] == 2
    assert not by["a"]["missed"] and by["a"]["regret"] == pytest.approx(0.625)
    assert by["b"]["regret"] == pytest.approx(0.0)
    assert res.mean_regret == pytest.approx((1.0 + 0.625 + 0.0) / 3) and res.misses == 1
    # by engine version: group "a" measured on two engines is two groups, too small to score
    two = [dict(r, engine={"version": "0.1" if r["id"].endswith(("-0", "-1")) else "0.2"}) if r["model"] == "a"
           else r for r in recs]
    assert dq.regret(two, preds).mean_regret == res.mean_regret
    assert {g["model"] for g in dq.regret(two, preds, by_engine=True).groups} == {"miss", "b"}
    # the model predicting nothing within the objective is a miss too
    none = dq.regret(recs, [dict(p, predicted={"tpot_mean_ms": 99.0, "ttft_mean_ms": 1.0}) if "predicted" in p
                            else p for p in preds])
    assert none.misses == 3 and none.mean_regret == 1.0 and none.groups[0]["pick"] is None


def test_regret_takes_a_disaggregated_rows_clients_as_serve_does():
    """A disaggregated record whose concurrency is null (AIConfigurator's disaggregated benchmarks) counts
    with the clients `serve` simulates for it (the decode pool's batch_size x num_workers x attention DP):
    measured tokens/s per GPU = C x OSL / (TTFT + (OSL - 1) x TPOT) / GPUs of both pools."""
    from costmodel.apps import decisions as dq
    rows = [_closed(i, 1, i + 1, 50.0, 5.0, osl=33) for i in range(3)]
    dis = dict(_closed(3, 1, None, 50.0, 5.0, osl=33), mode="disagg",
               prefill={"num_workers": 1, "tp_size": 1}, decode={"num_workers": 2, "tp_size": 1, "batch_size": 3})
    del dis["tp"]
    res = dq.regret(rows + [dis], [_pred(r, 5.0, 10.0) for r in rows] + [_pred(dis, 4.0, 50.0)])
    g, = res.groups
    assert g["rows"] == 4 and g["pick"]["id"] == dis["id"]
    assert g["pick"]["measured_tok_s_gpu"] == pytest.approx(6 * 33 / 0.21 / 3)


def test_regret_cli_and_bad_input(tmp_path, capsys):
    recs, preds = _hand_example()
    rp, pp = tmp_path / "recs.jsonl", tmp_path / "preds.jsonl"
    rp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    pp.write_text("".join(json.dumps(p) + "\n" for p in preds))
    assert main(["regret", str(rp), "--predictions", str(pp), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["groups"] == 3 and s["misses"] == 1 and s["refused_rows"] == 1
    assert s["mean_regret"] == pytest.approx(1.625 / 3)
    bad = dict(recs[1], measured={"ttft_mean_ms": 1.0})
    rp.write_text(json.dumps(recs[0]) + "\n" + json.dumps(bad) + "\n")
    assert main(["regret", str(rp), "--predictions", str(pp)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "recs.jsonl:2" in err and "measured.tpot_mean_ms" in err, err


# ---------------------------------------------------------------- costmodel bench --search (issue #17's queries)

def test_bench_search_skips_aiconfigurator_and_reports_a_refusal(monkeypatch, capsys):
    import importlib.util

    from costmodel.apps import bench
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "aiconfigurator" else find(name, *a))
    assert bench.aiconfigurator_python() is None
    monkeypatch.setitem(bench.SEARCH_QUERIES, "c", dict(bench.SEARCH_QUERIES["c"], model="no-such-model"))
    assert main(["bench", "--search", "--queries", "c", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["c"]
    assert "no config.json for model" in r["costmodel"]["refused"]
    assert "not importable" in r["aiconfigurator"]["skipped"]
    assert main(["bench", "--search", "--queries", "c"]) == 0
    out = capsys.readouterr().out
    assert "costmodel: refused" in out and "aiconfigurator: aiconfigurator is not importable" in out


def test_aiconfigurator_output_is_read(tmp_path):
    """Its log's counts and seconds and its pareto.csv files, filtered by the SLOs, from a stand-in program."""
    import stat
    import sys

    from costmodel.apps import bench
    fake = tmp_path / "fakepython"
    fake.write_text(f"""#!{sys.executable}
import os, sys
save = sys.argv[sys.argv.index("--save-dir") + 1]
os.makedirs(save + "/m/agg"); os.makedirs(save + "/m/disagg")
open(save + "/m/agg/pareto.csv", "w").write(
    "concurrency,ttft,tpot,tokens/s/gpu_cluster,tokens/s/user,parallel\\n"
    "8,500,20,100,50,tp8pp1\\n16,600,25,150,40,tp8pp1\\n64,700,70,300,14,tp4pp1\\n")
open(save + "/m/disagg/pareto.csv", "w").write(
    "concurrency,ttft,tpot,tokens/s/gpu_cluster,tokens/s/user,(p)workers,(p)parallel,(d)workers,(d)parallel\\n"
    "52,900,24,160,41,2,tp2pp1,1,tp4pp1\\n")
print("Experiment agg completed with 112 results.", file=sys.stderr)
print("Experiment disagg completed with 9 results.")
print("All experiments completed in 17.5 seconds")
""")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    r = bench.run_aiconfigurator(bench.SEARCH_QUERIES["a"], str(fake), tmp_path / "w")
    assert r["configurations_scored"] == 121 and r["by_mode"] == {"agg": 112, "disagg": 9}
    assert r["reported_seconds"] == 17.5 and r["seconds"] > 0
    assert [p["tok_s_gpu"] for p in r["pareto"]] == [160.0, 100.0]  # TPOT 70 > 30 out; 150 @ 40 dominated
    assert r["best"]["layout"] == "disagg 2x prefill tp2pp1 + 1x decode tp4pp1 c52"


# ---------------------------------------------------------------- GPU types with prices, percentiles, fewest GPUs

def _key(r):
    return (r["gpu"], r["tp"], r["concurrency_per_replica"])


def test_prices_give_tokens_per_usd_and_rank_by_them(res):
    both = sr.search_many("qwen3-8b", {"H100": 2, "H200": 2}, prices={"H100": 2.5, "H200": 3.8}, **SPACE)
    assert {r["gpu"] for r in both.rows} == {"H100-SXM", "H200-SXM"} and len(both.rows) == 12
    assert both.rejected_counts == {sr.TOO_MANY_GPUS: 12} and both.merit == "output_tokens_per_usd"
    h100 = {_key(r): r for r in res.rows}
    for r in both.rows:
        price = {"H100-SXM": 2.5, "H200-SXM": 3.8}[r["gpu"]]
        assert r["usd_per_hour"] == pytest.approx(r["gpus_used"] * price)
        assert r["output_tokens_per_usd"] == pytest.approx(r["output_tokens_per_s_total"] * 3600 / (2 * price))
        if r["gpu"] == "H100-SXM":  # the same numbers as the H100-only search
            assert r["output_tokens_per_s_total"] == pytest.approx(h100[_key(r)]["output_tokens_per_s_total"])
    usd = [r["output_tokens_per_usd"] for r in both.feasible]
    assert usd == sorted(usd, reverse=True)
    # the front is over every GPU type, in tokens per US$ against tokens/s per user
    assert sr.pareto_mask([r["output_tokens_per_usd"] for r in both.feasible],
                          [r["output_tokens_per_s_per_user"] for r in both.feasible]) == \
        [r["pareto"] for r in both.feasible]
    # a very expensive GPU type drops to the end; without prices the ranking is by tokens/s per GPU
    for dear, cheap in (("H100", "H200"), ("H200", "H100")):
        ranked = sr.search_many("qwen3-8b", {"H100": 2, "H200": 2}, prices={dear: 1000.0, cheap: 1.0},
                                **SPACE).feasible
        assert [r["gpu"] for r in ranked] == [f"{cheap}-SXM"] * 6 + [f"{dear}-SXM"] * 6
    free = sr.search_many("qwen3-8b", {"H100": 2, "H200": 2}, **SPACE)
    assert free.merit == "output_tokens_per_s_per_gpu" and "usd_per_hour" not in free.rows[0]
    tput = [r["output_tokens_per_s_per_gpu"] for r in free.feasible]
    assert tput == sorted(tput, reverse=True)
    s = sr.summary(both, 3)
    assert s["best"]["output_tokens_per_usd"] == max(usd) and s["best"]["gpu"] == "H100-SXM"
    assert len(s["ranked"]) == 3 and "usd_per_hour" in s["ranked"][0]


@pytest.mark.parametrize("prices, words", [
    ({"H200": 3.0}, "a price for H200, which is not searched"),
    ({"H100": 2.0}, "no price for L40S"),
    ({"H100": 2.0, "L40S": 0.0}, "L40S: must be a positive"),
    ({"H100": -1.0, "L40S": 1.0}, "H100: must be a positive"),
])
def test_bad_prices_are_refused_with_the_field(prices, words):
    with pytest.raises(sr.InputError, match="field 'price'") as e:
        sr.search_many("qwen3-8b", {"H100": 1, "L40S": 1}, prices=prices, **SPACE)
    assert words in str(e.value)


def test_percentile_checks_the_p90(res):
    # a configuration whose mean TTFT meets the SLO and whose p90 does not
    row = max(res.rows, key=lambda r: r["ttft_p90_ms"] - r["ttft_mean_ms"])
    assert row["ttft_p90_ms"] > row["ttft_mean_ms"]
    slo = (row["ttft_mean_ms"] + row["ttft_p90_ms"]) / 2
    p90 = sr.search("qwen3-8b", "H100", 2, ttft_ms=slo, percentile=90, **SPACE)
    assert p90.query["statistic"] == "p90"
    assert {(r["tp"], r["concurrency_per_replica"]) for r in p90.feasible} == \
        {(r["tp"], r["concurrency_per_replica"]) for r in res.rows if r["ttft_p90_ms"] <= slo}
    picked = next(r for r in p90.rows if (r["tp"], r["concurrency_per_replica"]) ==
                  (row["tp"], row["concurrency_per_replica"]))
    assert picked["meets_slo"] is False
    mean = sr.search("qwen3-8b", "H100", 2, ttft_ms=slo, **SPACE)
    assert next(r for r in mean.rows if (r["tp"], r["concurrency_per_replica"]) ==
                (row["tp"], row["concurrency_per_replica"]))["meets_slo"] is True
    with pytest.raises(sr.InputError, match="field 'percentile'"):
        sr.search("qwen3-8b", "H100", 2, percentile=75, **SPACE)
    # TPOT too is checked against the percentile: an objective between a row's mean and p99 TPOT
    row = max(res.rows, key=lambda r: r["tpot_p99_ms"] - r["tpot_mean_ms"])
    assert row["tpot_p99_ms"] > row["tpot_mean_ms"]
    slo = (row["tpot_mean_ms"] + row["tpot_p99_ms"]) / 2
    p99 = sr.search("qwen3-8b", "H100", 2, tpot_ms=slo, percentile=99, **SPACE)
    assert {(r["tp"], r["concurrency_per_replica"]) for r in p99.feasible} == \
        {(r["tp"], r["concurrency_per_replica"]) for r in res.rows if r["tpot_p99_ms"] <= slo}


def test_min_gpus_for_rate_picks_the_fewest_gpus(res):
    # each replica's predicted request rate from the whole-budget rows (dp = 2 // tp)
    per_replica = {(r["tp"], r["concurrency_per_replica"]): r["requests_per_s_total"] / r["dp"] for r in res.rows}
    tp1 = sorted(v for (tp, _), v in per_replica.items() if tp == 1)
    rate = (tp1[-1] + tp1[-2]) / 2  # one TP1 replica reaches it at its largest concurrency only
    fewest = sr.search("qwen3-8b", "H100", 2, rate=rate, objective="min_gpus_for_rate", **SPACE)
    by_hand = {}
    for (tp, c), v in per_replica.items():
        need = -(-rate // v)
        if need <= 2 // tp:
            by_hand[(tp, c)] = tp * need
    got = {(r["tp"], r["concurrency_per_replica"]): r["gpus_used"] for r in fewest.feasible}
    assert got == by_hand and min(by_hand.values()) == 1
    best = fewest.feasible[0]
    assert best["gpus_used"] == 1 and best["dp"] == 1 and best["layout"] == "TP1 x DP1"
    assert best["requests_per_s_total"] >= rate
    assert "--data-parallel-size" not in sr.vllm_command(fewest, best)
    ties = [r for r in fewest.feasible if r["gpus_used"] == best["gpus_used"]]
    assert best["output_tokens_per_s_per_gpu"] == max(r["output_tokens_per_s_per_gpu"] for r in ties)
    with pytest.raises(sr.InputError, match="field 'rate'"):
        sr.search("qwen3-8b", "H100", 2, objective="min_gpus_for_rate", **SPACE)


def test_moe_layouts_with_attention_data_parallelism(shared):
    """A mixture-of-experts model on 2 GPUs: (tp, pp, attention_dp, moe_ep) TP1, TP1 x PP2, TP2 with and
    without its experts over the group, and TP1 x attention-DP 2 with the experts over both; the attention-DP
    row is what `serve` gives the same record, its GPUs are tp x attention_dp, and its vllm command names the
    data-parallel size."""
    cfg = shared / "model_configs"
    assert sr.layouts(shared_model("qwen3-30b-a3b"), 2) == [(1, 1, 1, 1), (1, 2, 1, 1), (1, 1, 2, 2), (2, 1, 1, 1),
                                                            (2, 1, 1, 2)]
    assert sr.layouts(shared_model("qwen3-30b-a3b"), 2, pps=[1]) == [(1, 1, 1, 1), (1, 1, 2, 2), (2, 1, 1, 1),
                                                                     (2, 1, 1, 2)]
    res = sr.search("qwen3-30b-a3b", "H100", 2, isl=256, osl=32, concurrency=(4,), workload_options=OPTS,
                    calibration="none", model_configs=cfg, pp=1)
    att = next(r for r in res.rows if r["attention_dp"] == 2)
    assert (att["tp"], att["moe_ep"], att["dp"], att["gpus_used"]) == (1, 2, 1, 2)
    rec = {"id": "x", "model": "qwen3-30b-a3b", "gpu": "H100", "tp": 1, "attention_dp": 2, "moe_ep": 2,
           "weights": att["weights"], "engine": dict(res.query["engine"], name="vllm",
                                                      version=sr.DEFAULT_ENGINE_VERSION),
           "workload": {"type": "closed", "concurrency": 4, "input_tokens": 256, "output_tokens": 32}}
    o, = sv.serve([rec], model_configs=cfg, calibration="none", workload_options=OPTS)
    assert att["tpot_mean_ms"] == pytest.approx(o["predicted"]["tpot_mean_ms"], rel=1e-6)
    assert att["output_tokens_per_s_per_gpu"] == pytest.approx(o["throughput"]["output_tokens_per_s_per_gpu"],
                                                               rel=1e-6)
    assert "--data-parallel-size 2 --enable-expert-parallel" in sr.vllm_command(res, att)


def test_screened_search_simulates_the_best_and_reports_serve_numbers():
    """With screening every configuration of the wider space (concurrency 1-24, two token budgets, two
    running limits, both KV-cache precisions) gets a steady-state estimate; the best and the front are
    simulated, and those rows are `serve`'s numbers for the same records.  The frame of every scored
    configuration says which estimate each row carries."""
    space = dict(isl=256, osl=32, workload_options=OPTS, concurrency=list(range(1, 25)),
                 max_num_batched_tokens=[2048, 8192], max_num_seqs=[16, 64], tpot_ms=12.0)
    res = sr.search("qwen3-8b", "H100", 1, screen=True, simulate_top=3, **space)
    assert res.screened is not None and res.scored == len(res.screened) == 24 * 2 * 2 * 2
    assert set(res.screened["kv_cache_dtype"]) == {"auto", "fp8"}
    assert 0 < len(res.rows) <= 6 and res.screen_seconds > 0
    screened = res.screened.set_index(["tp", "kv_cache_dtype", "max_num_batched_tokens", "max_num_seqs",
                                       "concurrency_per_replica"])
    for r in res.rows:  # simulated: within the SLO on their steady-state means (with the margin)
        key = (r["tp"], r["kv_cache_dtype"], r["max_num_batched_tokens"], r["max_num_seqs"],
               r["concurrency_per_replica"])
        assert screened.loc[key, "tpot_mean_ms"] <= 12.0 * (1 + sr.SCREEN_MARGIN)
    recs = [{"id": f"r{i}", "model": "qwen3-8b", "gpu": "H100", "tp": r["tp"], "weights": "bf16",
             "engine": {"version": "0.15.1", "gpu_memory_utilization": 0.9, "kv_cache_dtype": r["kv_cache_dtype"],
                        "max_num_batched_tokens": r["max_num_batched_tokens"], "max_num_seqs": r["max_num_seqs"]},
             "workload": {"type": "closed", "concurrency": r["concurrency_per_replica"], "input_tokens": 256,
                          "output_tokens": 32}} for i, r in enumerate(res.rows)]
    for r, o in zip(res.rows, sv.serve(recs, workload_options=OPTS)):
        assert r["tpot_mean_ms"] == pytest.approx(o["predicted"]["tpot_mean_ms"], rel=1e-9)
        assert r["ttft_mean_ms"] == pytest.approx(o["predicted"]["ttft_mean_ms"], rel=1e-9)
    frame = sr.scored_frame(res)
    assert len(frame) == res.scored and (frame["estimate"] == "simulation").sum() == len(res.rows)
    s = sr.summary(res, 3)
    assert s["configurations_scored"] == res.scored and s["configurations_simulated"] == len(res.rows)
    assert s["query"]["concurrency"] == "1-24" and sr._compact([1, 2, 4, 8]) == [1, 2, 4, 8]
    assert sr._compact(list(sr.SCREEN_CONCURRENCY)) == "1-64,66-128/2,132-256/4,264-512/8"
    if any(r["kv_cache_dtype"] == "fp8" for r in res.feasible):
        r = next(r for r in res.feasible if r["kv_cache_dtype"] == "fp8")
        assert "--kv-cache-dtype fp8" in sr.vllm_command(res, r)


def test_to_simulate_takes_the_best_of_each_layout_first():
    """With room for two, the screen's best of layout TP4 and the best of TP2 (not on the front) are
    simulated, not TP4's two best (the screen's errors are mostly per layout); the front adds two of its
    three points, spread along it."""
    rows = [(4, 1, 10, 1000.0, 30.0), (4, 1, 11, 990.0, 31.0), (4, 1, 12, 980.0, 32.0), (2, 1, 13, 900.0, 25.0)]
    df = pd.DataFrame([{"group": g, "tp": tp, "pp": pp, "attention_dp": 1, "moe_ep": 1, "weights": "bf16",
                        "concurrency_per_replica": c, "output_tokens_per_s_per_gpu": m,
                        "output_tokens_per_s_per_user": u, "tpot_mean_ms": 20.0, "ttft_mean_ms": 100.0,
                        "e2e_mean_ms": 1000.0, "requests_per_s_total": 1.0}
                       for g, (tp, pp, c, m, u) in enumerate(rows)])
    chosen = sr._to_simulate(df, None, 25.0, None, None, 2, "output_tokens_per_s_per_gpu")
    assert sorted(chosen) == [(0, 10), (2, 12), (3, 13)]


def test_a_search_split_over_processes_merges_to_the_single_process_result(tmp_path, capsys):
    """Two processes take alternate layouts; their parts, joined, hold the one-process search's rows (every
    configuration simulated without screening), rejections and front; the command line writes and joins the
    parts beside --out."""
    space = dict(isl=256, osl=32, concurrency=(8,), workload_options=OPTS)
    whole = sr.search("qwen3-8b", "H100", 2, **space)
    paths = []
    for i in range(2):
        part = sr.search("qwen3-8b", "H100", 2, part=(i, 2), **space)
        assert part.query["part"] == [i, 2] and 0 < len(part.rows) < len(whole.rows)
        paths.append(tmp_path / f"s.p{i}-of-2.json")
        sr.save_part(part, paths[-1])
    merged = sr.merge_parts(paths)
    key = lambda r: (r["mode"], r["tp"], r["pp"], r["concurrency_per_replica"])  # noqa: E731
    assert sorted(map(key, merged.rows)) == sorted(map(key, whole.rows))
    by = {key(r): r for r in whole.rows}
    for r in merged.rows:
        assert r["tpot_mean_ms"] == by[key(r)]["tpot_mean_ms"] and r["pareto"] == by[key(r)]["pareto"]
    assert merged.rejected_counts == whole.rejected_counts
    with pytest.raises(sr.InputError, match="not found"):
        sr.merge_parts([paths[0], tmp_path / "missing.json"])
    out = tmp_path / "rows.csv"
    args = ["search", "--model", "qwen3-8b", "--gpu", "H100", "--gpus", "2", "--isl", "256", "--osl", "32",
            "--concurrency", "8", "--rounds", "2", "--out", str(out), "--process-count", "2"]
    assert main(args + ["--process-index", "0"]) == 0 and main(args + ["--process-index", "1"]) == 0
    assert (tmp_path / "rows.p1-of-2.json").is_file() and not out.exists()
    capsys.readouterr()
    assert main(args + ["--merge", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["configurations_scored"] == len(whole.rows) and len(pd.read_csv(out)) == len(whole.rows)
