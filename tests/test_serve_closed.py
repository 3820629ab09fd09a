"""Closed-loop estimates in vmapped chunks: the batched path gives each record's own numbers, and the loop's
batching helpers (the two-level prefix sum, the cond that runs under vmap only where some row needs it) equal
what they replace."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from costmodel import compiled
from costmodel.apps import scheduler as sch
from costmodel.apps import serve as sv


def _closed(i, c, isl, osl, **engine):
    return {"id": f"c{i}", "model": "llama-2-7b", "gpu": "H100", "tp": 1,
            "engine": {"name": "vllm", "version": "0.12.0", "max_num_batched_tokens": 2048, "max_num_seqs": 64,
                       **engine},
            "workload": {"type": "closed", "concurrency": c, "input_tokens": isl, "output_tokens": osl}}


def test_vmapped_chunks_equal_per_record():
    """Closed loops of several concurrencies, prompt and answer lengths, KV capacities (one holding every
    client's prompt but not two answers: it preempts) and scheduling modes, served in one batch (vmapped chunks, sorted by window and work) give the
    numbers each record gets alone."""
    # two windows (2 and 4 clients), so that the batch splits into chunks; few shapes, few compilations
    recs = [_closed(0, 2, 300, 12), _closed(1, 4, 700, 20, async_scheduling=True), _closed(2, 4, 1500, 8),
            _closed(3, 4, 100, 400, observed_kv_blocks={"gpu_kv_blocks": 40}), _closed(4, 2, 100, 16)]
    opts = {"rounds": 3}
    together = sv.serve(recs, calibration="none", workload_options=opts, batch=8)
    for rec, o in zip(recs, together):
        alone, = sv.serve([rec], calibration="none", workload_options=opts, batch=1)
        assert o["id"] == alone["id"]
        for k in ("ttft_mean_ms", "tpot_mean_ms", "e2e_mean_ms", "ttft_p99_ms"):
            assert o["predicted"][k] == pytest.approx(alone["predicted"][k], rel=1e-5), (rec["id"], k)
        assert o["throughput"]["output_tokens_per_s"] == pytest.approx(alone["throughput"]["output_tokens_per_s"],
                                                                       rel=1e-5)
        assert o["simulation"]["steps"] == alone["simulation"]["steps"]
        assert o["kv_cache"]["preemptions"] == alone["kv_cache"]["preemptions"]
        assert o["simulation"]["complete"] and o["simulation"]["finished"] == o["simulation"]["requests"]
    assert together[3]["kv_cache"]["preemptions"] > 0  # the small cache did preempt


def test_threads_give_each_record_its_own_numbers(monkeypatch):
    """Records run one by one on several threads (the CPU default) give, in the records' order, the numbers
    they get on one thread."""
    recs = [_closed(0, 2, 300, 12), _closed(1, 4, 700, 20), _closed(2, 4, 1500, 8), _closed(3, 2, 100, 16)]
    opts = {"rounds": 3}
    monkeypatch.setattr(compiled, "cpu_workers", lambda: 1)
    one = sv.serve(recs, calibration="none", workload_options=opts, batch=1)
    monkeypatch.setattr(compiled, "cpu_workers", lambda: 3)
    runs = []
    real = sv.first_alone
    monkeypatch.setattr(sv, "first_alone", lambda key, fn: real(key, lambda: runs.append(key) or fn()))
    threaded = sv.serve(recs, calibration="none", workload_options=opts, batch=1)
    assert [o["id"] for o in threaded] == [r["id"] for r in recs]
    for a, b in zip(one, threaded):
        assert a["predicted"] == b["predicted"] and a["simulation"]["steps"] == b["simulation"]["steps"]
    assert runs and all(k[0] == 1 for k in runs)  # every record ran alone, never in a vmapped chunk


def test_first_call_of_a_program_runs_before_the_others():
    """`compiled.first_alone`: a second call with the same key starts once the first (its compilation) has
    finished; a call with another key does not wait."""
    import threading
    import time
    key, other, log = object(), object(), []

    def slow():
        log.append("first starts")
        time.sleep(0.3)
        log.append("first ends")

    t = threading.Thread(target=compiled.first_alone, args=(key, slow))
    t.start()
    time.sleep(0.05)
    compiled.first_alone(other, lambda: log.append("other key"))
    compiled.first_alone(key, lambda: log.append("same key"))
    t.join()
    assert log == ["first starts", "other key", "first ends", "same key"]


@pytest.mark.parametrize("n", [1, 3, 16, 17, 64, 128, 1024])
def test_two_level_prefix_sum(n):
    x = np.random.default_rng(n).integers(-5, 1000, (n, 3)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(sch._cumsum0(jnp.asarray(x))), np.cumsum(x, 0))


def test_cond_rows_under_vmap():
    """Mapped, `_cond_rows` applies the branch to exactly the rows whose predicate holds (and to none when no
    row's does), as a per-row `jax.lax.cond`; unmapped arguments are broadcast."""
    def fn(carry, held):
        a, b = carry
        return a * held[0] + 1, b - held[1]

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 4)).astype(np.float32), rng.integers(0, 9, (6, 2)).astype(np.int32)
    scale = np.float32(3.0)
    for pred in (np.array([True, False, True, False, False, True]), np.zeros(6, bool)):
        got = jax.vmap(lambda p, x, y: sch._cond_rows(p, fn, (x, y), (scale, y[0])))(pred, a, b)
        for i in range(6):
            want = jax.lax.cond(pred[i], fn, lambda c, h: c, (a[i], b[i]), (scale, b[i][0]))
            np.testing.assert_allclose(np.asarray(got[0][i]), np.asarray(want[0]))
            np.testing.assert_array_equal(np.asarray(got[1][i]), np.asarray(want[1]))


def test_benchmark_rounds_weigh_the_burst_and_the_drain_one_round_in_R():
    """With ``benchmark_rounds`` R the latency means are a benchmark's of R rounds: the first-round burst's
    1/R, the last round's (the drain) 1/R and the steady rounds' (R - 2)/R.  The burst is what a one-round
    simulation with every client together gives, the steady rounds what the simulation gives with its last
    round left out (each priced independently here); the rate follows from the same mean E2E."""
    rec = _closed(0, 4, 1500, 12)
    R = 5
    mixed, = sv.serve([rec], calibration="none", workload_options={"rounds": 3, "benchmark_rounds": R})
    steady, = sv.serve([rec], calibration="none", workload_options={"rounds": 3, "benchmark_rounds": 0})
    inner, = sv.serve([rec], calibration="none", workload_options={"rounds": 3, "benchmark_rounds": 0,
                                                                   "cooldown_rounds": 1})
    burst, = sv.serve([rec], calibration="none",
                      workload_options={"rounds": 1, "warmup_rounds": 0, "start": "together"})
    assert "benchmark_rounds" not in steady["simulation"] and "benchmark_rounds" not in burst["simulation"]
    assert mixed["simulation"]["benchmark_rounds"] == R
    assert mixed["simulation"]["burst_ttft_mean_ms"] == pytest.approx(burst["predicted"]["ttft_mean_ms"], rel=1e-4)
    for k in ("ttft_mean_ms", "e2e_mean_ms", "tpot_mean_ms"):
        drain = 2 * steady["predicted"][k] - inner["predicted"][k]  # rounds 2 and 3 measured, C requests each
        want = ((R - 2) * inner["predicted"][k] + drain + burst["predicted"][k]) / R
        assert mixed["predicted"][k] == pytest.approx(want, rel=1e-4), k
    # a benchmark of one round is its burst alone
    one, = sv.serve([rec], calibration="none", workload_options={"rounds": 3, "benchmark_rounds": 1})
    assert one["predicted"]["tpot_mean_ms"] == pytest.approx(burst["predicted"]["tpot_mean_ms"], rel=1e-4)
    # four 1,500-token prompts under a 2,048-token budget queue behind each other in the burst
    assert burst["predicted"]["ttft_mean_ms"] > steady["predicted"]["ttft_mean_ms"]
    # the rate follows from the benchmark's mean E2E (Little's law): the burst round's slower requests lower it
    t = mixed["throughput"]
    assert t["requests_per_s"] == pytest.approx(4 / (mixed["predicted"]["e2e_mean_ms"] / 1e3), rel=1e-4)
    assert t["requests_per_s"] < steady["throughput"]["requests_per_s"]
    assert mixed["throughput"]["output_tokens_per_s_per_user"] == pytest.approx(1e3 / mixed["predicted"]["itl_mean_ms"],
                                                                             rel=1e-4)


def test_burst_round_is_one_round_of_the_clients_at_once():
    from costmodel.apps import workloads as wl
    r = wl.closed_loop({"concurrency": 3, "input_tokens": 10, "output_tokens": 4}, "t", rounds=4)
    b = wl.burst_round(r)
    assert len(b) == 3 and b.n_users == 3 and b.benchmark_rounds == 0 and b.start == "together"
    assert not b.gate.any() and (b.succ == -1).all() and b.measured.all() and (b.offset_s == 0).all()
    assert r.benchmark_rounds == wl.BENCHMARK_ROUNDS
    assert wl.closed_loop({"concurrency": 3, "input_tokens": 10, "output_tokens": 4}, "t",
                          start="together").benchmark_rounds == 0
    with pytest.raises(sv.InputError, match="benchmark_rounds"):
        wl.closed_loop({"concurrency": 3, "input_tokens": 10, "output_tokens": 4}, "t", benchmark_rounds=-1)


def _bare(c, isl, osl, **over):
    """A closed loop whose record gives no engine limits."""
    rec = {"id": "b", "model": "llama-3.1-8b", "gpu": "H100", "tp": 1, "engine": {"name": "vllm", "version": "0.12.0"},
           "workload": {"type": "closed", "concurrency": c, "input_tokens": isl, "output_tokens": osl}}
    rec.update(over)
    return rec


def test_closed_loop_without_limits_runs_as_aiconfigurator_benchmarks_it():
    """A closed loop of C clients whose record gives no limits gets the limits AIConfigurator's generator gives
    the workers it benchmarks: max_num_seqs = C per replica, max_num_batched_tokens = that + ISL + 1500, and
    the KV cache the memory model gives at those limits (a sampler warm-up of C requests, not 1024)."""
    from costmodel import memory
    from costmodel.hardware import get_gpu
    from costmodel.model import load_arch

    dep = sv.resolve(_bare(16, 4096, 256), "t")
    assert (dep.max_seqs, dep.max_batched_tokens) == (16, 16 + 4096 + 1500)
    assert any("AIConfigurator" in n and "max_num_seqs 16" in n for n in dep.notes)
    cap = memory.kv_capacity_tokens(load_arch("llama-3.1-8b"), memory.Layout(tp=1), get_gpu("H100"), 0.9,
                                    max_num_batched_tokens=5612, max_num_seqs=16)
    assert dep.kv_blocks == cap.tokens // 16
    vllm = sv.resolve(_bare(16, 4096, 256), "t", workload_options={"closed_loop_limits": "vllm"})
    assert (vllm.max_batched_tokens, vllm.max_seqs) == sv.default_batch_limits(get_gpu("H100")) == (8192, 1024)
    assert vllm.kv_blocks < dep.kv_blocks  # 1024 dummy requests' logits over a 128k vocabulary in the warm-up
    assert not any("AIConfigurator" in n for n in vllm.notes)
    # replicas behind a router: each worker's batch is its share, ceil(C / dp)
    two = sv.resolve(_bare(5, 1000, 100, dp=2), "t")
    assert (two.max_seqs, two.max_batched_tokens) == (3, 3 + 1000 + 1500)


def test_a_records_own_limits_win_and_other_workloads_keep_vllms():
    rec = _bare(16, 4096, 256)
    rec["engine"]["max_num_seqs"] = 64
    dep = sv.resolve(rec, "t")
    assert (dep.max_seqs, dep.max_batched_tokens) == (64, 16 + 4096 + 1500)  # the missing one only
    rec["engine"]["max_num_batched_tokens"] = 2048
    dep = sv.resolve(rec, "t")
    assert (dep.max_seqs, dep.max_batched_tokens) == (64, 2048)
    assert not any("AIConfigurator" in n for n in dep.notes)
    open_loop = _bare(16, 4096, 256, workload={"type": "inference_perf_shared_prefix", "stages": [
        {"rate": 1.0, "duration_s": 10}], "num_unique_system_prompts": 2, "num_users_per_system_prompt": 2,
        "system_prompt_len": 100, "question_len": 200, "output_len": 20})
    dep = sv.resolve(open_loop, "t")
    assert (dep.max_batched_tokens, dep.max_seqs) == (8192, 1024)
    from costmodel.errors import InputError
    with pytest.raises(InputError, match="closed_loop_limits"):
        sv.resolve(_bare(16, 4096, 256), "t", workload_options={"closed_loop_limits": "sglang"})


def test_benchmark_limits_only_for_well_formed_closed_loops():
    assert sv.benchmark_limits({"type": "closed", "concurrency": 8, "input_tokens": 1024}) == (8 + 1024 + 1500, 8)
    assert sv.benchmark_limits({"type": "closed", "concurrency": 8, "input_tokens": 1024}, 3) == (3 + 1024 + 1500, 3)
    for w in ({"type": "closed", "concurrency": None, "input_tokens": 1024},
              {"type": "closed", "concurrency": 8, "input_tokens": 0}, {"type": "trace"}, None):
        assert sv.benchmark_limits(w) is None


def test_every_command_that_simulates_records_takes_closed_loop_limits():
    from costmodel.cli import build_parser
    p = build_parser()
    for argv in (["serve", "r.jsonl"], ["fit-serving", "r.jsonl", "--out", "c.json"], ["regret", "r.jsonl"]):
        assert p.parse_args(argv).closed_loop_limits == "aiconfigurator"
        assert p.parse_args(argv + ["--closed-loop-limits", "vllm"]).closed_loop_limits == "vllm"
        with pytest.raises(SystemExit):
            p.parse_args(argv + ["--closed-loop-limits", "sglang"])


def test_regret_refuses_closed_loop_limits_with_read_predictions(tmp_path, capsys):
    """--closed-loop-limits shapes predictions regret makes, so with --predictions it is refused, not ignored."""
    from costmodel.cli import main
    rec = tmp_path / "r.jsonl"
    rec.write_text("")
    pred = tmp_path / "p.jsonl"
    pred.write_text("")
    assert main(["regret", str(rec), "--predictions", str(pred)]) == 0
    assert main(["regret", str(rec), "--predictions", str(pred), "--closed-loop-limits", "vllm"]) != 0
    assert "closed-loop-limits" in capsys.readouterr().err


def test_cooldown_leaves_out_the_drain():
    """A closed loop's last round runs on an engine that the clients done before it leave lighter: counted
    (cool-down 0, as a benchmark counts it) it lowers TPOT, more so the fewer rounds; left out (cool-down 1)
    three rounds give the steady state that six give."""
    rec = _closed(0, 32, 1000, 64, max_num_seqs=64)
    tpot = {}
    for rounds, cool in ((3, 0), (3, 1), (6, 1)):
        o, = sv.serve([rec], calibration="none", workload_options={"rounds": rounds, "cooldown_rounds": cool,
                                                                   "benchmark_rounds": 0})
        tpot[rounds, cool] = o["predicted"]["tpot_mean_ms"]
    assert tpot[3, 1] == pytest.approx(tpot[6, 1], rel=0.01)
    assert tpot[3, 0] < tpot[3, 1] * 0.99


def test_cooldown_rounds_in_the_measured_mask():
    from costmodel.apps import workloads as wl
    from costmodel.errors import InputError
    w = {"type": "closed", "concurrency": 3, "input_tokens": 10, "output_tokens": 5}
    r = wl.closed_loop(w, "x", rounds=4, cooldown_rounds=1)
    assert r.measured.tolist() == [False] * 3 + [True] * 6 + [False] * 3 and not r.notes
    r = wl.closed_loop(w, "x", rounds=2, cooldown_rounds=1)  # warm-up first, then one round to measure
    assert r.measured.tolist() == [False] * 3 + [True] * 3 and "0 of cool-down, not 1" in r.notes[0]
    with pytest.raises(InputError, match="cooldown_rounds"):
        wl.closed_loop(w, "x", cooldown_rounds=-1)
