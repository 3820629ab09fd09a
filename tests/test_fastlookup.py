"""`fastlookup.FastLookup` gives the table times of `step.TableLookup`, method by method, at random batch
quantities inside and outside the tables' grids (float32 precision), in both of its modes."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from costmodel import get_gpu, load_model, load_tables, ops, setup
from costmodel.fastlookup import TOKEN_TABLE, specialise
from costmodel.step import TableLookup, step_gemms, Batch
from costmodel.compiled import jit


@pytest.fixture(scope="module", params=[("llama-3.1-8b", "H100", 2), ("qwen3-8b", "A100", 1)])
def pair(request):
    model, gpu, tp = request.param
    su = setup(load_model(model), load_tables(None, get_gpu(gpu)), tp)
    a = su.arrays
    fast = specialise(a.gemm, a.decode, a.prefill, a.comm, su.on_gpu)
    return su, TableLookup(a, su.on_gpu), fast


def _methods(lookup, d, tokens, sampled, n_dec, keys, n_pre, pairs):
    gl = step_gemms(d, Batch(n_dec, keys, n_pre, tokens - n_dec, pairs))
    return jnp.stack(lookup.gemm_us(gl) + [lookup.attn_decode_us(n_dec, keys), lookup.attn_prefill_us(n_pre, pairs),
                                           lookup.attn_floor_us(), lookup.layer_allreduce_us(tokens),
                                           lookup.logits_gather_us(sampled)])


def test_fast_lookup_equals_table_lookup(pair):
    su, slow, fast = pair
    d = su.on_gpu.dims
    rng = np.random.default_rng(0)
    n = 400
    n_dec = np.floor(np.exp(rng.uniform(0, np.log(2048), n))).astype(np.float32)
    n_pre = np.floor(np.exp(rng.uniform(0, np.log(64), n))).astype(np.float32)
    tokens = np.floor(n_dec + n_pre * np.exp(rng.uniform(0, np.log(20000), n))).astype(np.float32)
    keys = (n_dec * np.exp(rng.uniform(0, np.log(3e5), n))).astype(np.float32)
    pairs = (n_pre * np.exp(rng.uniform(0, np.log(1e9), n))).astype(np.float32)
    sampled = n_dec + n_pre
    args = (d, tokens, sampled, n_dec, keys, n_pre, pairs)
    f = jit(jax.vmap(lambda lk, *b: _methods(lk, d, *b), in_axes=(None, 0, 0, 0, 0, 0, 0)))
    want = np.asarray(f(slow, *args[1:]))
    got = np.asarray(f(fast, *args[1:]))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    assert (tokens <= TOKEN_TABLE).mean() > 0.5
    inside = tokens <= TOKEN_TABLE
    got_int = np.asarray(f(dataclasses.replace(fast, int_tokens=True), *(a[inside] for a in args[1:])))
    np.testing.assert_allclose(got_int, want[inside], rtol=2e-5, atol=1e-6)


def test_specialised_lookup_is_a_pytree_with_static_shape_data(pair):
    _, _, fast = pair
    leaves, tree = jax.tree_util.tree_flatten(fast)
    assert all(hasattr(x, "shape") for x in leaves)
    assert jax.tree_util.tree_unflatten(tree, leaves).gemm.cells == fast.gemm.cells
    assert np.all(np.diff(np.asarray(fast.decode.finder.nodes)[:-1]) >= 0)


def test_setup_side_blends_equal_the_lookups_own(pair):
    """The GEMM shape blend and the all-reduce's GPU-count weights that `specialise` computes in numpy equal
    the JAX ones that `tables.gemm_table_us` and `tables.comm_table_us` use, inside and outside the grids."""
    from costmodel.tables import GemmTable, comm_gpu_weights, comm_table_us, gemm_shape_blend
    su = pair[0]
    gemm = su.arrays.gemm
    gemm_np = GemmTable(*(np.asarray(a) for a in gemm))
    for k, n in ((64.0, 64.0), (5120.0, 1536.0), (4096.0, 14336.0), (3e5, 7e5)):
        for a, b in zip(gemm_shape_blend(gemm_np, np.float32(k), np.float32(n), np),
                        gemm_shape_blend(gemm, jnp.float32(k), jnp.float32(n))):
            np.testing.assert_allclose(a, np.asarray(b), rtol=1e-6, atol=1e-6)
    comm = su.arrays.comm
    if comm is None:
        return
    rows = jnp.moveaxis(comm.log_t, 1, 0)[3]  # one message size's log times over the GPU counts
    for gpus in (1.0, 2.0, 3.0, 4.0, 8.0, 16.0):
        w = comm_gpu_weights(comm, gpus)
        assert w.dtype == np.float32 and w.sum() == pytest.approx(1.0)
        exact = float(jnp.log(comm_table_us(comm, gpus, jnp.exp(comm.log_bytes[3]))))
        assert float(w @ np.asarray(rows)) == pytest.approx(exact, rel=1e-5, abs=1e-5)
