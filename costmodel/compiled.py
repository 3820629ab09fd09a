"""Compiler options in one place: run-once computations compiled for compile time (`once`), long-running
programs compiled for run time on CPU (`jit`).

Setup work (a model's spline coefficients for a sweep, the features of a set of records) runs once per
table shapes or per record set and takes milliseconds, while XLA's default optimisation takes seconds to
compile it.  `once` compiles such a function at XLA -O0 and, on CPU, with the legacy loop emitters (XLA:CPU's
fusion emitters take about two thirds of the compile time); the values agree with a default compilation to
float32 rounding (relative 1e-6).

`jit` is `jax.jit` for the programs that run long (the serving loop, the steady-state estimate, the fit's
L-BFGS loop, predict's step function): default optimisation, and on CPU `CPU_OPTIONS`.  XLA:CPU's YNNPACK
fusion would run the step model's reductions op by op (10x slower).  Its fusion emitters, against the legacy loop
emitters (2-core x86 machine, jax 0.10.2, 2026-12-07): the serving loop compiles in 1.1-1.5x the time; a
serve of 1 to 64 closed loops takes 14-24 % longer, compilation included; after compilation 256 closed loops
in one call run 4 % and 4,096 run 15 % faster; the sweep's chunk evaluates 3-7 % more configurations per
second with them, so it keeps them (`jit(fn, legacy_emitters=False)`).  The test suite took 5.5 min
with them off, 7.9 with them on (at XLA's default backend optimisation level, before the suite moved to level 0).
"""
from __future__ import annotations

import functools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np

LEGACY_EMITTERS = {"xla_cpu_use_fusion_emitters": False}  # XLA:CPU's loop emitters instead of its fusion emitters
GENERIC_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
COMPILER_OPTIONS = {**GENERIC_OPTIONS, **LEGACY_EMITTERS}
NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}
CPU_OPTIONS = {**NO_YNN, **LEGACY_EMITTERS}
_EXE: dict = {}
_CPU_OPTIONS_OK: list = []  # [bool] once probed: whether this XLA takes CPU_OPTIONS


def cpu_options(legacy_emitters: bool = True) -> dict | None:
    """`CPU_OPTIONS` (``legacy_emitters`` false: `NO_YNN` only) where the default backend is the CPU and its
    XLA takes them (probed once with a tiny program), else None."""
    if jax.default_backend() != "cpu":
        return None
    if not _CPU_OPTIONS_OK:
        try:
            jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(compiler_options=CPU_OPTIONS)
            _CPU_OPTIONS_OK.append(True)
        except Exception:  # an XLA without these options
            _CPU_OPTIONS_OK.append(False)
    if not _CPU_OPTIONS_OK[0]:
        return None
    return CPU_OPTIONS if legacy_emitters else NO_YNN


def jit(fn, legacy_emitters: bool = True, **kwargs):
    """``jax.jit(fn, **kwargs)`` compiled with `cpu_options` (call it at run time, not at import: it starts
    JAX's backend); its ``.lower(...).compile()`` takes the same options.  Called inside another jitted
    function, where JAX refuses compiler options, it is a plain ``jax.jit``: the outer program is compiled
    with the outer options."""
    options = cpu_options(legacy_emitters)
    if options is None:
        return jax.jit(fn, **kwargs)
    return _WithOptions(jax.jit(fn, compiler_options=options, **kwargs), jax.jit(fn, **kwargs))


class _WithOptions:
    """A jitted function with compiler options, and the same without them for calls inside another jit."""

    def __init__(self, top, nested):
        self.top, self.nested = top, nested
        functools.update_wrapper(self, top)

    def __call__(self, *args, **kwargs):
        try:
            return self.top(*args, **kwargs)
        except ValueError as e:
            if "compiler_options" not in str(e):
                raise
            return self.nested(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.top.lower(*args, **kwargs)


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


def cpu_workers() -> int:
    """Threads that run compiled calls at once: on CPU the cores this process may use (XLA:CPU runs a loop of
    small kernels on one core: calls on separate threads run side by side), 1 on an accelerator."""
    if jax.default_backend() != "cpu":
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parallel_map(fn, items: list, workers: int | None = None) -> list:
    """``[fn(x) for x in items]`` on ``workers`` threads (default `cpu_workers`), in order."""
    workers = min(workers or cpu_workers(), len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def programs(fn):
    """``functools.lru_cache`` for functions that build jitted programs, safe across threads: two threads
    asking for the same program get one jitted function (so one compilation per shape), not one each."""
    cached = functools.lru_cache(maxsize=None)(fn)
    lock = threading.Lock()

    @functools.wraps(fn)
    def get(*args, **kwargs):
        with lock:
            return cached(*args, **kwargs)
    get.cache_clear = cached.cache_clear
    return get


_FIRST_RUNS: dict = {}  # program key -> set once its first call (its compilation) has finished
_FIRST_LOCK = threading.Lock()


def first_alone(key, fn):
    """``fn()``; the first call with ``key`` finishes before any other with it starts, so that threads
    running the same program compile it once."""
    with _FIRST_LOCK:
        ev = _FIRST_RUNS.get(key)
        first = ev is None
        if first:
            ev = _FIRST_RUNS[key] = threading.Event()
    if not first:
        ev.wait()
    try:
        return fn()
    finally:
        if first:
            ev.set()


CACHE_ENV = "COSTMODEL_CACHE_DIR"  # costmodel's cache folder; "off" (or "0", "none", "false", "") turns it off
CACHE_MIN_COMPILE_S = 0.1  # programs that take less than this to compile are not kept


def compile_cache_dir(env=None) -> Path | None:
    """Where the command line keeps its compiled programs between runs (JAX's persistent compilation
    cache): ``$COSTMODEL_CACHE_DIR/jax``, else ``$XDG_CACHE_HOME/costmodel/jax``, else
    ``~/.cache/costmodel/jax``; None where ``COSTMODEL_CACHE_DIR`` says off or JAX's own cache is set
    (``JAX_COMPILATION_CACHE_DIR``: that one is used as it is)."""
    env = os.environ if env is None else env
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    v = env.get(CACHE_ENV)
    if v is not None and v.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    base = Path(v) if v else Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "costmodel"
    return base / "jax"


def enable_compile_cache(env=None) -> Path | None:
    """Keep compiled programs between runs in `compile_cache_dir` (a program compiled once is loaded, not
    compiled, by the next process: a repeated `costmodel search` or `serve` starts seconds sooner); returns
    the folder, or None where it stays off (see `compile_cache_dir`, or JAX's cache already configured, or
    the folder cannot be made).  Call it before the first compilation."""
    d = compile_cache_dir(env)
    if d is None or jax.config.jax_compilation_cache_dir:
        return None
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)
    return d


def split_scalars(tree):
    """``tree``'s float32 0-d leaves gathered into one vector: (other leaves, scalars [S] float32, spec for
    `join_scalars`).  A compiled call that takes one vector in place of S scalars dispatches faster: a
    sweep's group carries about 120 (its dimensions, hardware and parameters)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    scalar = tuple(np.ndim(x) == 0 and np.asarray(x).dtype == np.float32 for x in leaves)
    arrays = tuple(x for x, s in zip(leaves, scalar) if not s)
    return arrays, np.asarray([x for x, s in zip(leaves, scalar) if s], np.float32), (treedef, scalar)


def join_scalars(arrays, scalars, spec):
    """The tree that `split_scalars` split (inside a jitted function: scalars become slices of the vector)."""
    treedef, scalar = spec
    it, k, leaves = iter(arrays), 0, []
    for s in scalar:
        if s:
            leaves.append(scalars[k])
            k += 1
        else:
            leaves.append(next(it))
    return jax.tree_util.tree_unflatten(treedef, leaves)


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration")


class CompileTimer:
    """Wall seconds JAX spends lowering and compiling programs (its own duration events; tracing, which
    nests, is not counted) inside ``with CompileTimer() as t:``, in ``t.seconds``: what a timing "after
    compilation" subtracts.  Compilations that overlap (threads) count once: the union of their intervals."""

    def __init__(self):
        self._intervals: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def _listen(self, event: str, duration_s: float, **_) -> None:
        if event in _COMPILE_EVENTS:
            end = time.perf_counter()
            with self._lock:
                self._intervals.append((end - duration_s, end))

    @property
    def seconds(self) -> float:
        total, reach = 0.0, -np.inf
        for lo, hi in sorted(self._intervals):
            total += max(hi - max(lo, reach), 0.0)
            reach = max(reach, hi)
        return total

    def __enter__(self) -> "CompileTimer":
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)
