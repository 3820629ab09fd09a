"""Disaggregated serving: the KV transfer counted by hand, the pools' closed loops and how the client's
latencies compose from them, the default clients, and bad input."""
import json

import numpy as np
import pytest

from costmodel import memory
from costmodel.apps import serve as sv
from costmodel.errors import InputError
from costmodel.hardware import get_gpu
from costmodel.model import load_arch

ISL, OSL, C = 500, 20, 4


def _record(**over):
    rec = {"id": "pd", "model": "llama-2-7b", "gpu": "H100", "mode": "disagg",
           "engine": {"name": "vllm", "version": "0.12.0", "max_num_batched_tokens": 2048, "max_num_seqs": 64},
           "prefill": {"num_workers": 1, "tp_size": 1}, "decode": {"num_workers": 1, "tp_size": 1},
           "workload": {"type": "closed", "concurrency": C, "input_tokens": ISL, "output_tokens": OSL}}
    rec.update(over)
    return rec


def test_kv_transfer_by_hand():
    """Llama-3.1-8B (32 layers, 8 KV heads of 128) to a TP2 decode worker: each GPU pulls its 4 KV heads,
    32 x 2 x 4 x 128 x 2 bytes = 65,536 bytes per token, 1,000 tokens = 65.536 MB, over NVLink (450 GB/s one
    way) inside a node or a 50 GB/s network adapter beyond it, plus the fixed 1 ms."""
    arch, gpu = load_arch("llama-3.1-8b"), get_gpu("H100")
    assert memory.kv_bytes_per_token(arch, {"tp": 2}) == 65_536
    t_node = sv.kv_transfer_s(arch, gpu, {"tp": 2}, 1000, "auto", same_node=True)
    t_net = sv.kv_transfer_s(arch, gpu, {"tp": 2}, 1000, "auto", same_node=False)
    assert t_node == pytest.approx(1e-3 + 65.536e6 / 450e9, rel=1e-9)
    assert t_net == pytest.approx(1e-3 + 65.536e6 / 50e9, rel=1e-9)


@pytest.fixture(scope="module")
def served():
    sim = sv.Simulator(calibration="none")
    dd = sv.resolve_disaggregated(_record(), "test", workload_options={"rounds": 4})
    agg = sv.resolve(_record(mode="agg", tp=1, prefill=None, decode=None), "test", workload_options={"rounds": 4})
    (dd, rp, rd), = sv.run_disaggregated(sim, [dd])
    return sim, dd, rp, rd, sv.disaggregated_statistics(dd, rp, rd, sim.options), agg


def test_pools_and_composition(served):
    """The prefill pool answers one token per request; the decode worker computes only the prompt's tokens
    after its last whole block; no request is lost in either pool; the client's TTFT and E2E are the prefill
    request + transfer + the decode worker's first or last token + client time."""
    sim, dd, rp, rd, out, _ = served
    n = len(dd.decode.requests)
    assert len(dd.prefill.requests) == n == C * 4
    assert np.all(dd.prefill.requests.output_tokens == 1) and np.all(dd.decode.requests.output_tokens == OSL)
    for r in (rp, rd):
        assert bool(r["complete"]) and np.all(np.isfinite(r["done_s"]))
    tail = ISL - 16 * ((ISL - 1) // 16)
    assert float(rd["prefill_tokens"]) == n * tail  # no preemption here: each computes its tail once
    assert float(rp["prefill_tokens"]) == n * ISL
    m = dd.prefill.requests.measured
    lead = np.mean(rp["done_s"][m] - rp["send_s"][m]) + dd.transfer_s + sim.options.client_ms / 1e3
    md = dd.decode.requests.measured
    want_ttft = (lead + np.mean(rd["first_s"][md] - rd["send_s"][md])) * 1e3
    want_e2e = (lead + np.mean(rd["done_s"][md] - rd["send_s"][md])) * 1e3
    assert out["predicted"]["ttft_mean_ms"] == pytest.approx(want_ttft, rel=1e-4)
    assert out["predicted"]["e2e_mean_ms"] == pytest.approx(want_e2e, rel=1e-4)
    assert out["pools"]["prefill"]["gpus"] == 1 and out["pools"]["decode"]["gpus"] == 1
    tput = out["throughput"]
    assert tput["output_tokens_per_s_per_gpu"] == pytest.approx(tput["output_tokens_per_s"] / 2, rel=1e-3)


def test_closed_loop_cycle(served):
    """Each pool's clients spend the rest of the cycle in the other pool: the think times are the other
    pool's mean request time plus the transfer, and C clients complete C / cycle requests per second
    (Little's law, the cycle being E2E; the decode pool's rate is its clients over its own cycle, which the
    settled think time makes the same within `DISAGG_SETTLED`)."""
    _, dd, rp, rd, out, _ = served
    t_p = sv._mean_duration_s(rp, dd.prefill.requests)
    t_d = sv._mean_duration_s(rd, dd.decode.requests)
    assert dd.rounds >= 1 and dd.rounds_change <= sv.DISAGG_SETTLED
    assert dd.decode.think_s == pytest.approx(t_p + dd.transfer_s, rel=sv.DISAGG_SETTLED)
    assert dd.prefill.think_s == pytest.approx(t_d + dd.transfer_s, rel=sv.DISAGG_SETTLED)
    rate = out["throughput"]["requests_per_s"]
    assert rate * out["predicted"]["e2e_mean_ms"] / 1e3 == pytest.approx(C, rel=2 * sv.DISAGG_SETTLED)


def test_disaggregated_decodes_faster_than_aggregated(served):
    """With the prompts computed elsewhere, the decode worker's steps carry no prefill chunks: TPOT below
    the aggregated engine's on one GPU with the same clients; TTFT above the transfer and a prefill alone."""
    sim, dd, _, _, out, agg = served
    (a, res), = sim.run([agg])
    agg_out = sv.statistics(a, res, sim.options)
    assert out["predicted"]["tpot_mean_ms"] < agg_out["predicted"]["tpot_mean_ms"]
    alone = sim.request_duration_s(dd.prefill, *sim.step_model(dd.prefill))  # ingress + prefill + client
    assert out["predicted"]["ttft_mean_ms"] / 1e3 > alone + dd.transfer_s


def test_default_clients_and_note():
    """concurrency null: AIConfigurator's convention, decode batch_size x num_workers x attention_dp_size."""
    rec = _record(decode={"num_workers": 2, "tp_size": 1, "batch_size": 3},
                  workload={"type": "closed", "concurrency": None, "input_tokens": ISL, "output_tokens": OSL})
    dd = sv.resolve_disaggregated(rec, "test")
    assert dd.clients == 6 and "AIConfigurator's convention" in dd.notes[0]
    assert dd.decode.requests.n_users == 3 and dd.prefill.requests.n_users == 6  # per decode worker / prefill


def test_pool_engine_limits():
    """A pool's own token budget and running limit replace the record's engine's for that pool only."""
    rec = _record(prefill={"num_workers": 1, "tp_size": 1, "max_num_batched_tokens": 8192, "max_num_seqs": 8})
    dd = sv.resolve_disaggregated(rec, "test")
    assert (dd.prefill.max_batched_tokens, dd.prefill.max_seqs) == (8192, 8)
    assert (dd.decode.max_batched_tokens, dd.decode.max_seqs) == (2048, 64)


@pytest.mark.parametrize("mutate,needle", [
    (lambda r: r["prefill"].update(max_num_seqs=0), "field 'prefill.max_num_seqs'"),
    (lambda r: r["prefill"].update(tp=2), "field 'prefill.tp'"),
    (lambda r: r["decode"].update(num_workers=0), "field 'decode.num_workers'"),
    (lambda r: r.pop("decode"), "field 'decode'"),
    (lambda r: r.update(prefill=[1]), "field 'prefill'"),
    (lambda r: r.update(mode="split"), "field 'mode'"),
    (lambda r: r.update(tp=2), "field 'tp'"),
])
def test_bad_input(mutate, needle):
    rec = json.loads(json.dumps(_record()))
    mutate(rec)
    with pytest.raises(InputError, match=needle):
        sv.serve([(rec, "recs.jsonl:3")], calibration="none")


def test_open_loop_refused():
    rec = _record(workload={"type": "inference_perf_shared_prefix", "stages": [{"rate": 1.0, "duration_s": 5}]})
    out, = sv.serve([rec], calibration="none")
    assert "closed-loop" in out["refused"]


def test_plot_curve_of_a_disaggregated_record():
    """A disaggregated record without concurrency is drawn at the clients the simulation ran, labelled by its
    pools."""
    from costmodel.apps import plotting
    rec = _record(workload={"type": "closed", "concurrency": None, "input_tokens": ISL, "output_tokens": OSL},
                  measured={"ttft_mean_ms": 300.0, "tpot_mean_ms": 9.0})
    out = {"id": "pd", "predicted": {"ttft_mean_ms": 280.0, "tpot_mean_ms": 8.5}, "simulation": {"clients": 6}}
    curve, = plotting.serving_curves([rec], [out])
    assert curve["x"] == [6] and "1x prefill TP1 + 1x decode TP1" in curve["label"]
    assert curve["ttft_ms"] == ([280.0], [300.0]) and curve["tpot_ms"] == ([8.5], [9.0])


def test_pools_without_limits_keep_vllms_defaults():
    """A disaggregated record's pools are not AIConfigurator's aggregated benchmark workers: without limits
    they take vLLM's defaults (`serve.default_batch_limits`), not the closed loop's benchmark limits."""
    dd = sv.resolve_disaggregated(_record(engine={"name": "vllm", "version": "0.12.0"}), "test")
    for dep in (dd.prefill, dd.decode):
        assert (dep.max_batched_tokens, dep.max_seqs) == sv.default_batch_limits(get_gpu("H100"))
