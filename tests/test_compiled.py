"""`compiled.once` gives what a default compilation gives; `CompileTimer` counts compilations only."""
import jax
import jax.numpy as jnp
import numpy as np

from costmodel.compiled import CompileTimer, once


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
