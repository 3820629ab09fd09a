"""Invariants of the step model (hypothesis): positive, finite, monotone, vmap == loop, finite gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from costmodel import Params, load_model, pack_steps, setup, step_time
from costmodel.apps.records import _step_fn
from costmodel.compiled import jit
from costmodel.step import Step, pad_steps

SET = dict(max_examples=15, deadline=None)


@pytest.fixture(scope="module")
def su(h100_infersim):
    return setup(load_model("llama-3.1-8b"), h100_infersim, 2)


@pytest.fixture(scope="module")
def su_repo(h100_repo):
    return setup(load_model("qwen3-8b"), h100_repo, 1)


steps_st = st.fixed_dictionaries({
    "prefill": st.lists(st.tuples(st.integers(1, 4096), st.integers(0, 20000)).map(list), max_size=4),
    "decode": st.lists(st.integers(0, 60000), max_size=40),
}).filter(lambda s: s["prefill"] or s["decode"])


# Every drawn step is padded to these widths (at least steps_st's 4 prefills and 40 decodes, plus the one
# decode test_monotone_in_tokens_and_context adds), so that each jitted function below compiles once per
# setup instead of evaluating op by op.
WIDTHS = (4, 64)


def _one(s) -> Step:
    return jax.tree_util.tree_map(lambda a: a[0], pad_steps(pack_steps([s]), *WIDTHS))


def _time(su, s, params=Params()):
    return float(_single_fn(su.static)(su.arrays, su.on_gpu, params, _one(s)))


@settings(**SET)
@given(steps_st)
def test_positive_finite(su, s):
    t = _time(su, s)
    assert np.isfinite(t) and t > 0


@settings(**SET)
@given(steps_st, st.integers(1, 512), st.integers(1, 5000))
def test_monotone_in_tokens_and_context(su, s, more_new, more_ctx):
    t0 = _time(su, s)
    if s["prefill"]:
        bigger = {"prefill": [[s["prefill"][0][0] + more_new, s["prefill"][0][1]]] + s["prefill"][1:],
                  "decode": s["decode"]}
        assert _time(su, bigger) >= t0 * (1 - 1e-4)
        cached = {"prefill": [[s["prefill"][0][0], s["prefill"][0][1] + more_ctx]] + s["prefill"][1:],
                  "decode": s["decode"]}
        assert _time(su, cached) >= t0 * (1 - 1e-4)
    if s["decode"]:
        longer = {"prefill": s["prefill"], "decode": [s["decode"][0] + more_ctx] + s["decode"][1:]}
        assert _time(su, longer) >= t0 * (1 - 1e-4)
    # a new decode request at least as long as the mean (a shorter one lowers the mean kv length the batch
    # is priced at; the table's batch axis is not exactly additive there: a known limitation)
    mean = int(np.ceil(np.mean(s["decode"]))) if s["decode"] else 0
    added = {"prefill": s["prefill"], "decode": s["decode"] + [mean + more_ctx]}
    assert _time(su, added) >= t0 * (1 - 1e-4)


@settings(max_examples=10, deadline=None)
@given(st.lists(steps_st, min_size=1, max_size=6))
def test_vmap_equals_python_loop(su_repo, steps):
    # fixed shapes (6 steps, 4 prefill and 64 decode slots) so that both sides compile once
    packed = pad_steps(pack_steps(steps + [steps[0]] * (6 - len(steps))), 4, 64)
    batched, _ = _step_fn(su_repo.static)(su_repo.arrays, su_repo.on_gpu, Params(), packed)
    batched = np.asarray(batched)[:len(steps)]
    one = _single_fn(su_repo.static)
    loop = [float(one(su_repo.arrays, su_repo.on_gpu, Params(), jax.tree_util.tree_map(lambda a: a[i], packed)))
            for i in range(len(steps))]
    np.testing.assert_allclose(np.asarray(batched), loop, rtol=1e-5)


_SINGLE = {}
_GRAD = {}


def _single_fn(static):
    """One step at a time (jitted once per padded width), for the Python-loop side of the comparison."""
    if static not in _SINGLE:
        _SINGLE[static] = jit(lambda a, lay, p, s: step_time(a, lay, p, s, static)[0])
    return _SINGLE[static]


def _grad_fn(static):
    """The gradient of one step's time with respect to the parameters, the tables and the step (jitted)."""
    if static not in _GRAD:
        f = lambda p, a, lay, s: step_time(a, lay, p, s, static)[0]  # noqa: E731
        _GRAD[static] = jit(jax.grad(f, argnums=(0, 1, 3)))
    return _GRAD[static]


@settings(max_examples=10, deadline=None)
@given(steps_st)
def test_gradients_finite(su, s):
    gp, ga, gs = _grad_fn(su.static)(Params(), su.arrays, su.on_gpu, _one(s))
    for leaf in jax.tree_util.tree_leaves((gp, ga, gs)):
        assert np.isfinite(np.asarray(leaf)).all()
    assert float(gp.step_overhead_us) == pytest.approx(1.0)


def test_breakdown_sums_to_total(su):
    s = {"prefill": [[300, 100]], "decode": [100, 2000]}
    t, parts = step_time(su.arrays, su.on_gpu, Params(),
                         jax.tree_util.tree_map(lambda a: a[0], pack_steps([s])), su.static)
    assert float(sum(parts.values())) == pytest.approx(float(t), rel=1e-6)
    assert float(parts["communication"]) > 0 and float(parts["attn_prefill"]) >= 0


def test_communication_counts_layer_allreduces_and_logits_gather(h100_repo):
    """Llama-3.1-8B at TP 2, 3 decodes: 2 all-reduces per layer plus the embedding's, each of 3 tokens x 4096
    x 2 bytes, and one all-gather of 3 x 128256 bf16 logits (769,536 bytes), priced as an all-reduce of
    384,768 bytes."""
    from costmodel import kernel_time as kernels
    su2 = setup(load_model("llama-3.1-8b"), h100_repo, 2)
    s = jax.tree_util.tree_map(lambda a: a[0], pack_steps([{"decode": [100, 200, 300]}]))
    comm = step_time(su2.arrays, su2.on_gpu, Params(), s, su2.static)[1]["communication"]
    ar = lambda nbytes: float(kernels.allreduce_us(su2.arrays.comm, 2.0, nbytes, su2.on_gpu.hw, Params()))  # noqa: E731
    assert float(comm) == pytest.approx(65 * ar(3 * 4096 * 2) + ar(3 * 128256 * 2 / 2), rel=1e-5)
    assert ar(3 * 128256 * 2 / 2) > ar(3 * 4096 * 2)


def test_decode_attention_cold_kv_bound_by_hand(h100_repo):
    """Llama-3.1-70B at TP 4 (2 KV heads of 128 per GPU), 40 decodes with 640 cached tokens each, on H100:
    the KV cache read per layer is 40 · 641 keys · 2 (K, V) · 2 heads · 128 · 2 bytes = 26,255,360 bytes,
    7.837 µs at 3.35 TB/s.  The table (a benchmark that re-reads one cache, L2-resident at 26 MB) prices the
    call below the table floor + 7.837 µs, so the step takes the bound; 8x the batch (210 MB, read from HBM
    in the benchmark too) keeps the table time."""
    from costmodel import kernel_time as kernels
    su = setup(load_model("llama-3.1-70b"), h100_repo, 4)
    c, s = su.on_gpu.decode_layout, su.on_gpu.decode_kv_scale
    floor = float(kernels.attn_floor_us(su.arrays.decode, c))
    for batch, bound_wins in ((40, True), (320, False)):
        kv_bytes = batch * 641 * 2 * 2 * 128 * 2
        assert batch != 40 or kv_bytes == 26_255_360
        table = float(kernels.attn_decode_table_us(su.arrays.decode, c, s, batch, batch * 641.0))
        bound = floor + kv_bytes / 3350e9 * 1e6
        assert (bound > table) == bound_wins, (table, bound)
        _, parts = step_time(su.arrays, su.on_gpu, Params(),
                             jax.tree_util.tree_map(lambda a: a[0], pack_steps([{"decode": [640] * batch}])),
                             su.static)
        assert float(parts["attn_decode"]) == pytest.approx(80 * max(table, bound), rel=1e-5)
    # attn_fixed_scale: the engine's fixed cost of the call as a multiple of the table's floor
    _, parts = step_time(su.arrays, su.on_gpu, Params(attn_fixed_scale=2.0),
                         jax.tree_util.tree_map(lambda a: a[0], pack_steps([{"decode": [640] * 40}])), su.static)
    assert float(parts["attn_decode"]) == pytest.approx(80 * (2 * floor + 26_255_360 / 3350e9 * 1e6), rel=1e-5)
