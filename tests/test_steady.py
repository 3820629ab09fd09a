"""Closed-loop steady state (`apps.steady`): one client by hand from the step model, agreement with the
scheduler simulation, properties (finite and positive, TPOT and throughput non-decreasing in clients,
the mapped call equals one point at a time, the host term adds under synchronous scheduling)."""
import dataclasses

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costmodel.apps import scheduler as sch
from costmodel.apps import serve as sv
from costmodel.apps import steady
from costmodel.compiled import jit

REC = {"id": "x", "model": "llama-2-7b", "gpu": "H100", "tp": 1,
       "engine": {"version": "0.12.0", "max_num_batched_tokens": 2048, "max_num_seqs": 64},
       "workload": {"type": "closed", "concurrency": 1, "input_tokens": 512, "output_tokens": 64}}


@pytest.fixture(scope="module")
def deployment():
    sim = sv.Simulator(calibration="none", options=sv.Options(request_host_us=0.0))
    dep = sv.resolve(REC, "test", workload_options={"rounds": 3})
    static, lk, on, params = sim.step_model(dep)
    return sim, dep, static, sch.StepModel(lk, on, params)


def points(dep, clients, P=512, O=64, host_us=0.0, is_async=False):
    eng = sv.Simulator(options=sv.Options(request_host_us=host_us)).engine(
        dataclasses.replace(dep, async_scheduling=is_async))
    return steady.closed_loop(eng, clients, P, O)


def step_s(static, sm, n_dec, ctx, n_pre, new):
    d = sm.on.dims
    from costmodel import ops
    return float(sch._step_us(sm, static, np.float32(n_dec), np.float32(n_dec * float(ops.decode_keys(d, ctx))),
                              np.float32(n_pre), np.float32(new),
                              np.float32(n_pre * float(ops.prefill_pairs_tiled(d, new, 0.0))))) * 1e-6


def test_one_client_by_hand(deployment):
    """One client: each request runs alone on an idle engine, so TTFT = ingress + its prefill step + client,
    TPOT = a one-decode step at the mean context P + O/2, and it finishes O / (TTFT + (O-1) TPOT) tokens/s."""
    _, dep, static, sm = deployment
    est = jax.tree_util.tree_map(np.asarray, steady.compiled(static)(sm, points(dep, [1.0])))
    P, O = 512, 64
    tpot = step_s(static, sm, 1.0, P + O / 2, 0.0, 0.0)
    ttft = sv.INGRESS_MS / 1e3 + step_s(static, sm, 0.0, P, 1.0, P) + sv.CLIENT_MS / 1e3
    assert est.tpot_s[0] == pytest.approx(tpot, rel=1e-3)
    assert est.ttft_s[0] == pytest.approx(ttft, rel=1e-3)
    assert est.output_tokens_per_s[0] == pytest.approx(O / (ttft + (O - 1) * tpot), rel=2e-3)
    assert est.queue_s[0] == pytest.approx(0.0, abs=1e-6)


def test_agrees_with_the_simulation():
    """TPOT within 8 % and output tokens/s within 10 % of the scheduler simulation's from 1 to 48 clients."""
    recs = [dict(REC, id=f"c{c}", workload=dict(REC["workload"], concurrency=c)) for c in (1, 8, 48)]
    outs = sv.serve(recs, calibration="none", options=sv.Options(request_host_us=0.0),
                    workload_options={"rounds": 4})
    sim = sv.Simulator(calibration="none", options=sv.Options(request_host_us=0.0))
    dep = sv.resolve(REC, "test", workload_options={"rounds": 3})
    static, lk, on, params = sim.step_model(dep)
    est = steady.compiled(static)(sch.StepModel(lk, on, params), points(dep, [1.0, 8.0, 48.0]))
    for i, (c, o) in enumerate(zip((1, 8, 48), outs)):
        p = o["predicted"]
        assert float(est.tpot_s[i]) * 1e3 == pytest.approx(p["tpot_mean_ms"], rel=0.08)
        # a client completes a request per E2E: the simulated requests' steady rate
        assert float(est.output_tokens_per_s[i]) == pytest.approx(c * 64 / (p["e2e_mean_ms"] / 1e3), rel=0.1)


@settings(max_examples=12, deadline=None)
@given(P=st.integers(16, 8000), O=st.integers(2, 2000), host=st.sampled_from([0.0, 50.0]),
       is_async=st.booleans())
def test_properties(deployment, P, O, host, is_async):
    """Finite and positive; TPOT and TTFT non-decreasing in clients (up to float32 rounding), total throughput
    too up to 2 % (where the running limit binds, the mean field's mixed steps can cost a little more than the
    requests they add); the mapped call equals estimating each point alone."""
    _, dep, static, sm = deployment
    clients = [1.0, 2.0, 4.0, 16.0, 64.0, 256.0]
    est = jax.tree_util.tree_map(np.asarray, steady.compiled(static)(sm, points(dep, clients, P, O, host, is_async)))
    for v in est:
        assert np.all(np.isfinite(v)) and np.all(v >= 0)
    assert np.all(est.tpot_s > 0) and np.all(est.ttft_s > 0)
    for name, tol in (("tpot_s", 1e-3), ("ttft_s", 1e-3), ("output_tokens_per_s", 0.02)):
        v = getattr(est, name)
        assert np.all(np.diff(v) >= -tol * v[:-1]), name
    one = jit(steady.estimate, static_argnums=1)(sm, static, jax.tree_util.tree_map(
        lambda a: a[3], points(dep, clients, P, O, host, is_async)))
    assert float(one.tpot_s) == pytest.approx(float(est.tpot_s[3]), rel=1e-5)


def test_host_term_adds_under_synchronous_scheduling(deployment):
    """16 clients decoding: synchronous scheduling adds about 50 µs x the requests in each step to TPOT;
    async scheduling hides it behind the GPU step."""
    _, dep, static, sm = deployment
    f = steady.compiled(static)
    base = f(sm, points(dep, [16.0]))
    sync = f(sm, points(dep, [16.0], host_us=50.0))
    asyn = f(sm, points(dep, [16.0], host_us=50.0, is_async=True))
    asyn0 = f(sm, points(dep, [16.0], is_async=True))
    grown = float(sync.tpot_s[0] - base.tpot_s[0])
    assert 0.7 * 16 * 50e-6 < grown < 1.05 * 16 * 50e-6
    assert float(asyn.tpot_s[0]) == pytest.approx(float(asyn0.tpot_s[0]), rel=1e-4)
