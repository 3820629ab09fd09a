"""`compiled.once` and `compiled.jit` give what a default compilation gives (`jit` also inside another jit, under
`jax.grad` and `jax.vmap`); `CompileTimer` counts compilations only."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from costmodel.compiled import CompileTimer, cpu_options, jit, once


def test_once_equals_default_compilation():
    f = jax.jit(lambda x, y: jnp.exp(jnp.log1p(x) * y).sum(axis=0))
    x, y = np.linspace(0.1, 5.0, 96, dtype=np.float32).reshape(12, 8), np.float32(1.7)
    np.testing.assert_allclose(np.asarray(once(f, x, y)), np.asarray(f(x, y)), rtol=1e-6)
    assert np.asarray(once(f, x, y)).shape == (8,)  # the second call reuses the executable


def test_compile_timer_counts_compilation_not_runs():
    f = jax.jit(lambda x: jnp.cumsum(jnp.sin(x)) * 3.0)
    x = jnp.arange(37.0)
    with CompileTimer() as first:
        f(x).block_until_ready()
    with CompileTimer() as again:  # compiled already: nothing to count
        f(x).block_until_ready()
    assert first.seconds > 0.0 and again.seconds == 0.0


def test_compile_timer_counts_overlapping_compilations_once(monkeypatch):
    """Compilations on two threads at once count as the wall time they cover together."""
    ends = iter([10.0, 10.5, 20.0])
    monkeypatch.setattr("costmodel.compiled.time.perf_counter", lambda: next(ends))
    t = CompileTimer()
    for d in (1.0, 1.0, 2.0):  # (9, 10), (9.5, 10.5): 1.5 s together; (18, 20) apart
        t._listen("/jax/core/compile/backend_compile_duration", d)
    t._listen("/jax/core/some_other_duration", 5.0)
    assert t.seconds == pytest.approx(3.5)


def test_jit_equals_default_compilation_alone_and_nested():
    g = lambda x, y: jnp.sum(jnp.where(x > 1.0, jnp.exp(jnp.log1p(x) * y), x * y), axis=0)  # noqa: E731
    x, y = np.linspace(0.1, 5.0, 96, dtype=np.float32).reshape(12, 8), np.float32(1.7)
    f, ref = jit(g), jax.jit(g)
    np.testing.assert_allclose(np.asarray(f(x, y)), np.asarray(ref(x, y)), rtol=1e-6)
    # inside another jitted function (where JAX refuses compiler options), under grad, and under vmap
    outer = jax.jit(lambda x, y: f(x, y).sum() * 2.0)
    assert float(outer(x, y)) == pytest.approx(2.0 * float(ref(x, y).sum()), rel=1e-6)
    grad = jax.jit(jax.grad(lambda y: f(x, y).sum()))(y)
    np.testing.assert_allclose(float(grad), float(jax.grad(lambda y: ref(x, y).sum())(y)), rtol=1e-5)
    mapped = jax.vmap(f, in_axes=(0, None))(np.stack([x, 2 * x]), y)
    np.testing.assert_allclose(np.asarray(mapped[1]), np.asarray(ref(2 * x, y)), rtol=1e-6)
    assert jax.default_backend() != "cpu" or cpu_options() is not None  # this XLA takes the CPU options


def test_split_scalars_round_trip_inside_jit():
    """The float32 scalars of a tree travel as one vector and come back in their places; other leaves (arrays,
    int32 scalars) pass unchanged, and the jitted function gives what it gives on the tree itself."""
    from costmodel.compiled import join_scalars, split_scalars
    from costmodel.params import Params
    tree = ({"a": np.float32(2.5), "b": np.arange(4, dtype=np.float32), "i": np.int32(3)},
            jax.tree_util.tree_map(np.float32, Params()))
    arrays, scalars, spec = split_scalars(tree)
    assert scalars.dtype == np.float32 and len(scalars) == 1 + len(Params._fields)
    assert len(arrays) == 2  # the [4] array and the int32 scalar
    back = join_scalars(arrays, scalars, spec)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def f(t):
        return t[0]["a"] * t[0]["b"] * t[0]["i"] + t[1].step_overhead_us
    packed = jax.jit(lambda a, s: f(join_scalars(a, s, spec)))
    np.testing.assert_array_equal(np.asarray(packed(arrays, scalars)), np.asarray(jax.jit(f)(tree)))


def test_compile_cache_folder_follows_the_environment(tmp_path):
    """The command line's compilation cache: under COSTMODEL_CACHE_DIR, else XDG_CACHE_HOME, else ~/.cache;
    off when asked, and left to JAX where its own cache folder is set."""
    from pathlib import Path
    from costmodel.compiled import compile_cache_dir
    assert compile_cache_dir({"COSTMODEL_CACHE_DIR": str(tmp_path)}) == tmp_path / "jax"
    assert compile_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "costmodel" / "jax"
    assert compile_cache_dir({}) == Path.home() / ".cache" / "costmodel" / "jax"
    for off in ("off", "0", "", "none", "FALSE"):
        assert compile_cache_dir({"COSTMODEL_CACHE_DIR": off}) is None
    assert compile_cache_dir({"JAX_COMPILATION_CACHE_DIR": str(tmp_path), "COSTMODEL_CACHE_DIR": "x"}) is None
