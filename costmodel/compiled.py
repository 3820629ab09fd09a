"""Compiling run-once computations for compile time rather than run time.

Setup work (a model's spline coefficients for a sweep, the features of a set of records) runs once per
table shapes or per record set and takes milliseconds, while XLA's default optimisation takes seconds to
compile it.  `once` compiles such a function at XLA -O0 and, on CPU, with the legacy loop emitters (XLA:CPU's
fusion emitters take about two thirds of the compile time); the values agree with a default compilation to
float32 rounding (relative 1e-6).
"""
from __future__ import annotations

import jax
import numpy as np

GENERIC_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
COMPILER_OPTIONS = {**GENERIC_OPTIONS, "xla_cpu_use_fusion_emitters": False}
_EXE: dict = {}


def once(fn, *args):
    """``fn(*args)`` for a jitted function ``fn``, compiled with `COMPILER_OPTIONS` where the backend takes
    them (else with the backend-generic ones, else plainly), once per argument structure and shapes (bool
    arguments are static: not passed to the compiled call)."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    key = (fn, tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))
    if key not in _EXE:
        lowered = fn.lower(*args)
        for options in (COMPILER_OPTIONS, GENERIC_OPTIONS, None):
            try:
                _EXE[key] = lowered.compile(compiler_options=options)
                break
            except Exception:  # a backend without these options
                if options is None:
                    raise
    return _EXE[key](*[a for a in args if not isinstance(a, bool)])


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration")


class CompileTimer:
    """Seconds JAX spends lowering and compiling programs (its own duration events; tracing, which nests, is
    not counted) inside ``with CompileTimer() as t:``, in ``t.seconds``: what a timing "after compilation"
    subtracts."""

    def __init__(self):
        self.seconds = 0.0

    def _listen(self, event: str, duration_s: float, **_) -> None:
        if event in _COMPILE_EVENTS:
            self.seconds += duration_s

    def __enter__(self) -> "CompileTimer":
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)
