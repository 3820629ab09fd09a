"""Residual parameters of the step-time model: physical defaults and priors.

Every parameter is positive.  `Params` holds the values used by the model (µs, fractions, scales);
fitting works on their logs (`to_log` / `from_log`) so positivity holds by construction, and each has a
prior (default and a plausible range, read as ±2σ in log space) that regularizes a fit on little data.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from .errors import InputError


class Params(NamedTuple):
    """Residual terms.  Defaults are physical (see `PRIORS`), not fitted."""

    gemm_scale: float = 1.0  # multiplies table-derived GEMM time (engine vs isolated benchmark)
    attn_prefill_scale: float = 1.0  # multiplies prefill attention time
    attn_decode_scale: float = 1.0  # multiplies decode attention time
    hbm_efficiency: float = 0.87  # sustained / peak HBM bandwidth for streaming kernels
    kernel_floor_us: float = 2.0  # fixed time of one small memory-bound kernel (norm, rope, act, kv write)
    gemm_floor_us: float = 4.0  # fixed time of one GEMM when priced from bytes (other-dtype table)
    layer_overhead_us: float = 1.0  # extra per decoder layer per step (launch gaps)
    step_overhead_us: float = 250.0  # per engine step: scheduling, input preparation, sampler set-up
    request_overhead_us: float = 5.0  # per request in the step: metadata, sampling, output handling
    allreduce_latency_us: float = 8.0  # fixed latency of one TP all-reduce
    nvlink_efficiency: float = 0.7  # achieved / peak NVLink bandwidth in an all-reduce
    comm_scale: float = 1.0  # multiplies all-reduce time (measured table or analytic)
    prefill_layer_overhead_us: float = 2.0  # extra per layer in steps with prefill tokens (piecewise graphs)
    attn_fixed_scale: float = 1.0  # fixed cost of an attention call in the engine / the table's smallest time

    def validated(self, where: str | None = None) -> "Params":
        """These parameters, refused (`errors.InputError` naming the field) unless every one is a finite number
        (or array of them), not negative, and the efficiencies (`DIVISORS`, bandwidths are divided by them)
        positive: else times come out negative or infinite.  Zero elsewhere switches a term off.  Called where
        parameters come from the user (`apps.records.Predictor.predict`; calibration files are stricter: all
        positive); call it on parameters built by hand before `step.step_time` or `step.make_step_fn`, which
        do not check."""
        for k, v in zip(self._fields, self):
            try:
                a = np.asarray(v, dtype=np.float64)
            except (TypeError, ValueError):
                a = np.asarray(np.nan)
            low_ok = np.all(a > 0) if k in DIVISORS else np.all(a >= 0)
            if a.size == 0 or not np.all(np.isfinite(a)) or not low_ok:
                want = "a positive number" if k in DIVISORS else "a number >= 0"
                raise InputError(f"must be {want}, got {v!r}", where, k)
        return self


DIVISORS = ("hbm_efficiency", "nvlink_efficiency")  # bandwidth x efficiency divides bytes: never zero


class Prior(NamedTuple):
    default: float
    low: float  # plausible range, taken as the 2σ interval in log space
    high: float
    why: str


PRIORS: dict[str, Prior] = {
    "gemm_scale": Prior(1.0, 0.8, 1.25, "isolated GEMM benchmarks vs the same GEMM inside the engine"),
    "attn_prefill_scale": Prior(1.0, 0.6, 1.6, "benchmark kernel (FA3, batch 1) vs vLLM's varlen call"),
    "attn_decode_scale": Prior(1.0, 0.6, 1.6, "benchmark kernel vs vLLM's paged decode"),
    "hbm_efficiency": Prior(0.87, 0.75, 0.95, "decode-attention tables imply 2.9-3.15 TB/s of 3.35 on H100"),
    "kernel_floor_us": Prior(2.0, 1.0, 5.0, "a small kernel's launch+ramp under CUDA graphs"),
    "gemm_floor_us": Prior(4.0, 2.0, 8.0, "small-m GEMM time minus its weight read, FP8 H100 table"),
    "layer_overhead_us": Prior(1.0, 0.05, 20.0, "gaps between kernels per layer (piecewise graphs)"),
    "step_overhead_us": Prior(250.0, 50.0, 2000.0, "vLLM V1 CPU work not hidden behind the GPU"),
    "request_overhead_us": Prior(5.0, 0.5, 50.0, "per-request host work and sampling"),
    "allreduce_latency_us": Prior(8.0, 3.0, 25.0, "vLLM custom all-reduce on NVLink, small messages"),
    "nvlink_efficiency": Prior(0.7, 0.4, 0.95, "all-reduce bus bandwidth / NVLink peak"),
    "comm_scale": Prior(1.0, 0.7, 1.6, "all-reduce in the engine vs its isolated benchmark"),
    "prefill_layer_overhead_us": Prior(2.0, 0.2, 40.0, "attention outside CUDA graphs in mixed steps"),
    "attn_fixed_scale": Prior(1.0, 0.5, 3.0, "InferSim's H100 decode tables start 1.8x higher than AIConfigurator's"),
}

FIELDS = Params._fields


def to_log(p: Params) -> jnp.ndarray:
    """Parameters as a vector of logs (the unconstrained fitting space); zeros become log(1e-6)."""
    return jnp.log(jnp.maximum(jnp.asarray([float(v) for v in p], jnp.float32), 1e-6))


def from_log(v) -> Params:
    """Inverse of `to_log`, as Python floats."""
    return Params(*(float(x) for x in np.exp(np.asarray(v, np.float64))))


def prior_arrays(names=FIELDS):
    """(mean, sigma) of each parameter's log, from its plausible range as a ±2σ interval."""
    mu = [math.log(PRIORS[n].default) for n in names]
    sig = [(math.log(PRIORS[n].high) - math.log(PRIORS[n].low)) / 4 for n in names]
    return jnp.asarray(mu, jnp.float32), jnp.asarray(sig, jnp.float32)


def engine_version(version) -> tuple[int, int] | None:
    """(major, minor) of an engine version string ("0.15.1 (fork)" -> (0, 15)), or None when there is none."""
    m = re.match(r"\s*v?(\d+)\.(\d+)", str(version)) if version is not None else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def engine_key(version) -> str | None:
    """The engine version a calibration is keyed by: ``major.minor`` of a version string ("0.15.1 (fork)"
    -> "0.15"), or None when there is none."""
    v = engine_version(version)
    return f"{v[0]}.{v[1]}" if v else None


class Calibration(NamedTuple):
    """Fitted parameters of one GPU: ``pooled`` over all the data, and per engine version (`engine_key`)
    where the fit had records of more than one version.  A record of an engine not in ``by_engine``, or of
    no stated engine, gets the pooled values."""

    pooled: Params
    by_engine: dict  # engine key -> Params
    host_side_only: bool = False  # carried from the GPU it was fitted on: only `HOST_FIELDS` were fitted

    def set_for(self, engine: str | None) -> str | None:
        """Which set a record of ``engine`` gets: the engine key when there is one for it, else None (pooled)."""
        return engine if engine in self.by_engine else None

    def params_for(self, engine: str | None) -> Params:
        key = self.set_for(engine)
        return self.pooled if key is None else self.by_engine[key]

    def host_only(self) -> "Calibration":
        """This calibration with only its `HOST_FIELDS` kept and the physical defaults elsewhere: what it
        carries to a GPU it was not fitted on."""
        def keep(p: Params) -> Params:
            return Params(**{k: getattr(p, k) for k in HOST_FIELDS})
        return Calibration(keep(self.pooled), {e: keep(p) for e, p in self.by_engine.items()}, True)


# The engine's CPU-side terms: the host's work per step and per request and the launches of the layers that
# run outside CUDA graphs.  They depend on the host CPU and the engine version, not on the GPU, so a
# calibration carries them to GPUs it was not fitted on (`Calibration.host_only`); the kernel-side terms
# (scales, floors, efficiencies, communication) stay at their physical defaults there.
HOST_FIELDS = ("step_overhead_us", "request_overhead_us", "prefill_layer_overhead_us")
