import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (a fixed seed, no example database), so that a rare
# counterexample shows up as a reproducible failure on every machine, never as a flaky CI run.
settings.register_profile("costmodel", derandomize=True)
settings.load_profile("costmodel")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("COSTMODEL_SHARED", REPO.parent / "shared"))

# A persistent JAX compilation cache for this test session (an empty folder, removed at the end), set through
# the environment before JAX is imported so that the CLI and sweep subprocesses and the notebook kernels use
# it too: a program compiled once (by another jitted function object, e.g. a fit's L-BFGS loop or a sweep's
# chunk function, or by another process) is loaded instead of compiled again.  Every compilation is cached
# (no minimum time or size).  A cache folder set by the caller is used as it is and kept.
_JAX_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _JAX_CACHE = tempfile.mkdtemp(prefix="costmodel-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    if "jax" in sys.modules:  # imported before this file (by a plugin): it has read its settings already
        import jax
        jax.config.update("jax_compilation_cache_dir", _JAX_CACHE)
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
        jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                          int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


# XLA's backend (LLVM) optimisation level 0 for this session: the same programs, compiled about twice as fast
# and run slower, with the same results (the whole suite passes at either level).  The tests that a
# miscompilation would break run again at the default level in a subprocess
# (tests/test_default_optimization.py).  COSTMODEL_TESTS_XLA_DEFAULT=1, or a level in XLA_FLAGS, keeps the
# caller's level.
XLA_O0 = "--xla_backend_optimization_level=0"
if os.environ.get("COSTMODEL_TESTS_XLA_DEFAULT") != "1" and \
        "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_O0}".strip()


def pytest_sessionfinish(session, exitstatus):
    if _JAX_CACHE:
        shutil.rmtree(_JAX_CACHE, ignore_errors=True)


def need_shared():
    if not (SHARED / "bench_data").is_dir():
        pytest.skip(f"shared material not found at {SHARED} (set COSTMODEL_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def shared():
    return need_shared()


def shared_model(name: str):
    """The step model's view of a config in ``../shared/model_configs`` (skips the test without it)."""
    from costmodel.model import load_model
    return load_model(name, need_shared() / "model_configs")


@pytest.fixture(scope="session")
def h100_infersim(shared):
    from costmodel import get_gpu, load_tables
    return load_tables(shared / "bench_data", get_gpu("H100"))


@pytest.fixture(scope="session")
def h100_repo():
    from costmodel import get_gpu, load_tables
    return load_tables(REPO / "bench_data", get_gpu("H100"))


class Interrupted(Exception):
    """Raised by `sweep_stopped_after` to stop a sweep between chunks."""


def sweep_stopped_after(sw, chunk: int, *args, **kw) -> None:
    """Run ``sw.sweep(*args, **kw)`` and stop it right after chunk ``chunk`` has been written."""
    def stop(k):
        if k == chunk:
            raise Interrupted
    with pytest.raises(Interrupted):
        sw.sweep(*args, on_chunk=stop, **kw)


@pytest.fixture(scope="session")
def predictor():
    """One `Predictor` on the packaged model configs and the repo's tables for every test that only reads it:
    its tables are loaded once.  (Compilations are shared by all predictors anyway: they are cached per
    `Static` and input shapes.)"""
    from costmodel.apps.records import Predictor
    return Predictor()
