"""Monotone, differentiable interpolation on log-scaled grids (pure JAX).

Tables are stored as log latency on log-scaled axes.  Along the *work* axis of a table (tokens, kv length,
GEMM m) we use a monotone piecewise-cubic Hermite interpolant (interpax's ``monotonic`` method, PCHIP-type):
C1, exact at the nodes, monotone wherever the nodes are.  Across a secondary axis (batch size) values are
blended linearly in log space and then made non-decreasing with a cumulative max, so the result is monotone in
both axes.  Outside the grid: below the first node the value is held (a latency floor); above the last node it
continues with a fixed log-log slope given by the physics (1 = time proportional to work).
"""
from __future__ import annotations

import interpax
import jax
import jax.numpy as jnp
import numpy as np


def interp_work_axis(xq, x, f, slope_hi, slope_lo=0.0):
    """Interpolate ``f`` (shape [Nx, ...]) at scalar ``xq`` along axis 0 with grid ``x`` (all log-scaled).

    Monotone cubic inside [x0, x_last]; log-log slope ``slope_lo`` below (0 = a floor) and ``slope_hi``
    above.  Returns shape f.shape[1:].
    """
    xc = jnp.clip(xq, x[0], x[-1])
    inside = interpax.interp1d(jnp.reshape(xc, (1,)), x, f, method="monotonic")[0]
    return inside + extension(xq, x[0], x[-1], slope_hi, slope_lo)


def extension(xq, lo, hi, slope_hi, slope_lo=0.0):
    """What `interp_work_axis` adds outside the grid [lo, hi] (log units): log-log slopes beyond its ends."""
    return slope_hi * jnp.maximum(xq - hi, 0.0) + slope_lo * jnp.minimum(xq - lo, 0.0)


def monotone_spline(x, f) -> interpax.CubicHermiteSpline:
    """The interpolant of `interp_work_axis` inside the grid as a piecewise polynomial (data): interpax's
    cubic Hermite spline with its monotone node slopes, along axis 0 of ``f``.  ``.c`` [4, Nx-1, ...] holds
    the coefficients of (x - x_i)^3 .. (x - x_i)^0 per cell."""
    return interpax.CubicHermiteSpline(x, f, interpax.approx_df(x, f, "monotonic", axis=0), axis=0, check=False)


def blend_secondary_axis(bq, b, values):
    """Linear blend in log space over a secondary axis ``b`` (shape [Nb]) of ``values`` [Nb] at ``bq``,
    clamped to the grid, after a running max so that the result is non-decreasing in ``bq``."""
    values = jax.lax.cummax(values, axis=0)
    if values.shape[0] == 1:
        return values[0]
    return jnp.interp(jnp.clip(bq, b[0], b[-1]), b, values)


def suffix_min(t: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Lower every value to the minimum over all cells with at least as much work along ``axes``.

    A measured time larger than a time measured for strictly more work is a measurement artifact
    (warm-up, clock ramp, launch jitter only ever add time), so the lower envelope is kept.
    NaN (missing) cells are ignored and stay NaN.
    """
    out = np.where(np.isnan(t), np.inf, t)
    for ax in axes:
        out = np.flip(np.minimum.accumulate(np.flip(out, ax), axis=ax), ax)
    return np.where(np.isnan(t), np.nan, out)


def fill_work_axis(t: np.ndarray, x: np.ndarray, slope_hi: float, slope_lo: float = 0.0,
                   floor: float = -np.inf) -> np.ndarray:
    """Fill NaN cells of a 1-D series ``t`` over log grid ``x`` (both log-scaled): linear in log-log between
    measured neighbours, log-log slope ``slope_lo`` below the first measured node (never below ``floor``,
    log µs) and ``slope_hi`` above the last.  A series with no measured cell is returned unchanged."""
    ok = ~np.isnan(t)
    if not ok.any():
        return t
    xs, ts = x[ok], t[ok]
    out = np.interp(x, xs, ts)  # holds the end values outside
    above, below = x > xs[-1], x < xs[0]
    out[above] = ts[-1] + slope_hi * (x[above] - xs[-1])
    out[below] = np.maximum(ts[0] + slope_lo * (x[below] - xs[0]), floor)
    return out


# A measured time more than this factor below both of its neighbours on the work axis (the neighbour with
# more work scaled down in proportion to work) is taken as a measurement error, not as noise.  The repo's
# tables hold genuine isolated dips of up to 6x (B200 FP8 GEMMs at k >= 51200 and small m, where a faster
# kernel is picked at some m), which must stay measurements.
OUTLIER_FACTOR = 8.0


def low_outliers(t: np.ndarray, x: np.ndarray, factor: float = OUTLIER_FACTOR) -> np.ndarray:
    """Mask of the measured cells of a 1-D series ``t`` (time, NaN = not measured) over the log work grid
    ``x`` that are isolated low outliers: more than ``factor`` times below the measured neighbour with less
    work (time does not fall when work grows) and more than ``factor`` times below the measured neighbour
    with more work scaled down to this cell's work (time grows at most in proportion to work).  Only cells
    with a measured neighbour on both sides are judged; a drop that the next point confirms (a faster
    kernel taking over) is kept."""
    ok = np.flatnonzero(~np.isnan(t))
    out = np.zeros(t.shape, bool)
    for a, i, b in zip(ok[:-2], ok[1:-1], ok[2:]):
        if t[i] * factor < t[a] and t[i] * factor < t[b] * np.exp(x[i] - x[b]):
            out[i] = True
    return out
