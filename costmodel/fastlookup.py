"""The step's table lookups specialised to one model on one GPU at one TP degree, for sweeps.

`FastLookup` provides the methods of `step.TableLookup` (so `step.batch_features` prices a batch through
either), built once per (model, GPU, TP) from the same tables and the same interpolants, as data:

* each GEMM of the model has a fixed (k, n), and `tables.gemm_table_us` blends the m-series of the 2x2
  measured shapes around it (`tables.gemm_shape_blend`) linearly, so each GEMM is one piecewise cubic in
  log m: the blend of those series' monotone splines (`interp.monotone_spline`, interpax's coefficients);
* the all-reduce table's blend over GPU counts (`tables.comm_gpu_weights`) likewise becomes one cubic in
  log bytes for the model's TP degree;
* the attention table's head layout is fixed, and the running max over batch columns of
  `interp.blend_secondary_axis` is resolved ahead: each length cell is split where two columns' cubics
  cross, so that on each piece a column's value is one known column's cubic and a lookup reads two;
* a cell is found by a lookup table on the float32 bucket of x plus a few comparisons (`Finder`), and
  coefficients are read by 1-D gathers: all on scalars per configuration, which XLA vectorizes on CPU;
* a mixture-of-experts model's fused-MoE curve (`kernel_time.moe_table_us`) is one cubic in log tokens, and
  its dispatch/combine under attention data parallelism one cubic in log bytes for the expert group;
* an MLA model's module tables (one layout each) are resolved like the attention tables;
* for integer token counts up to `TOKEN_TABLE`, GEMM, fused-MoE and all-reduce times are read from per-token
  tables, which are these same functions evaluated at every integer.

The physics (which GEMMs, message sizes, how attention arguments are formed) stays in `step`, `ops` and
`kernel_time`; only the evaluation of the tables is specialised here.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from . import kernel_time as kt
from .compiled import once
from . import ops
from .interp import extension, monotone_spline
from .step import Batch, step_gemms
from .tables import AttnTable, CommTable, GemmTable, comm_gpu_weights, fold_batch, gemm_log_floor, gemm_shape_blend

TOKEN_TABLE = 1 << 15  # token counts tabulated per integer for GEMMs and all-reduces
MAX_LUT = 1 << 16  # buckets of a grid's cell lookup table
_BIG = np.float32(3e38)  # padding of grid nodes: never <= a query
_GATHER = jax.lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,))


def _take(arr, i):
    """arr[i] for a 1-D table and indices known to be in bounds (no clamping or negative-index code)."""
    return jax.lax.gather(arr, jnp.expand_dims(i, -1), _GATHER, (1,),
                          mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _poly(planes, i, u):
    """Cubic of cell ``i`` at offset ``u`` from its start; ``planes`` [4, cells]: coefficients of u^3 .. u^0."""
    return ((_take(planes[0], i) * u + _take(planes[1], i)) * u + _take(planes[2], i)) * u + _take(planes[3], i)


def _static(**kw):
    return field(metadata=dict(static=True), **kw)


@jax.tree_util.register_dataclass
@dataclass
class Finder:
    """Cell lookup on a sorted float32 grid whose first and last nodes are the clamping range: bucket
    b = floor((x - lo) · inv) (monotone in x) starts at lut[b] = the number of interior nodes whose own
    bucket is below b (all < x), and ``k`` comparisons add the nodes sharing x's bucket, so `find` returns
    exactly the number of interior nodes <= x."""

    lut: jax.Array  # [L] int32
    nodes: jax.Array  # [interior + 1] float32, padded with _BIG
    lo: jax.Array
    hi: jax.Array
    inv: jax.Array
    lmax: jax.Array
    k: int = _static()

    @staticmethod
    def build(grid) -> "Finder":
        x = np.asarray(grid, np.float32)
        lo, hi, interior = x[0], x[-1], x[1:-1]
        if interior.size == 0:
            return Finder(np.zeros(1, np.int32), np.full(1, _BIG, np.float32), lo, hi, np.float32(0),
                          np.float32(0), 0)
        gaps = np.diff(x.astype(np.float64))
        span = float(hi) - float(lo)
        n = int(min(MAX_LUT, 2 ** math.ceil(math.log2(max(2.0, 2.0 * span / max(gaps[gaps > 0].min(), 1e-30))))))
        inv = np.float32(n / span)
        bn = np.clip(np.floor((interior - lo) * inv), 0, n - 1).astype(np.int64)  # float32 arithmetic as `find`
        lut = np.searchsorted(bn, np.arange(n), side="left").astype(np.int32)
        return Finder(lut, np.concatenate([interior, np.full(1, _BIG, np.float32)]), lo, hi, inv,
                      np.float32(n - 1), int(np.bincount(bn).max()))

    def find(self, xc):
        """Number of interior nodes <= xc (xc within [lo, hi])."""
        b = jnp.clip(jnp.floor((xc - self.lo) * self.inv), 0.0, self.lmax)
        c = _take(self.lut, b.astype(jnp.int32))
        for _ in range(self.k):
            c = c + (_take(self.nodes, c) <= xc).astype(jnp.int32)
        return c

    def locate(self, xq, x0):
        """Cell of ``xq`` clamped to the grid and the offset from the cell's start (``x0`` [cells])."""
        xc = jnp.clip(xq, self.lo, self.hi)
        cell = self.find(xc)
        return cell, xc - _take(x0, cell)


@jax.tree_util.register_dataclass
@dataclass
class Series:
    """S piecewise cubics on one grid (log x): ``planes`` [4, S · cells], series s's cell i at s · cells + i."""

    finder: Finder
    x0: jax.Array  # [cells] start of each cell
    planes: jax.Array
    cells: int = _static()

    @staticmethod
    def build(x, coef, finder: Finder | None = None) -> "Series":
        """From grid ``x`` [N] and coefficients ``coef`` [4, N-1, S] (interpax's `.c` layout; numpy, or JAX
        inside a jitted setup function with a prebuilt ``finder``)."""
        planes = coef.swapaxes(1, 2).reshape(4, -1).astype(np.float32)  # [4, S·cells]
        return Series(Finder.build(x) if finder is None else finder, x[:-1].astype(np.float32), planes,
                      x.shape[0] - 1)

    def __call__(self, s: int, xq, slope_hi):
        """Series ``s`` at log value ``xq``: the cubic inside the grid, log-log slope ``slope_hi`` above."""
        cell, u = self.finder.locate(xq, self.x0)
        return _poly(self.planes, cell + s * self.cells, u) + extension(xq, self.finder.lo, self.finder.hi, slope_hi)


@jax.tree_util.register_dataclass
@dataclass
class RefinedAttn:
    """One head layout of an attention table with the running max over batch columns resolved: pieces of
    log length (cells split where columns cross), each with one cubic per batch column; ``planes``
    [4, pieces · nb], piece p's column j at p · nb + j."""

    finder: Finder  # over piece boundaries in log length
    x0: jax.Array  # [pieces] start of the table cell each piece lies in (the cubics' origin)
    planes: jax.Array
    bfinder: Finder  # over the batch grid (log)
    bx0: jax.Array  # [Nb-1] batch grid nodes
    bdx: jax.Array  # [Nb-1] their spacing
    bmax: jax.Array  # largest batch of the grid
    nb: int = _static()

    def __call__(self, batch, length, slope_hi, slope_lo):
        """`tables.attn_table_us` of this head layout (µs)."""
        b, length = fold_batch(batch, self.bmax, length, slope_hi)
        xq = jnp.log(length)
        cell, u = self.finder.locate(xq, self.x0)
        lb = jnp.clip(jnp.log(b), self.bfinder.lo, self.bfinder.hi)
        j = self.bfinder.find(lb)
        base = cell * self.nb + j
        v0, v1 = _poly(self.planes, base, u), _poly(self.planes, base + 1, u)
        w = (lb - _take(self.bx0, j)) / _take(self.bdx, j)
        return jnp.exp(v0 + w * (v1 - v0) + extension(xq, self.finder.lo, self.finder.hi, slope_hi, slope_lo))


def _crossings(P: np.ndarray, width: float) -> list[float]:
    """Offsets u in (0, width) where two of the cubics P [Nb, 4] (coefficients of u^3 .. u^0) cross: the real
    eigenvalues of each difference's companion matrix (as `np.roots`), all cubic pairs in one call."""
    a, b = np.triu_indices(P.shape[0], 1)
    D = P[a] - P[b]
    cubic = np.abs(D[:, 0]) > 1e-300
    C = D[cubic]
    A = np.zeros((len(C), 3, 3))
    A[:, 0, :] = -C[:, 1:] / C[:, :1]
    A[:, 1, 0] = A[:, 2, 1] = 1.0
    roots = [np.linalg.eigvals(A).ravel()] if len(C) else []
    rest = D[~cubic]  # lower degree: quadratics by their companion matrices too, linear ones directly
    quad = np.abs(rest[:, 1]) > 1e-300
    Q, L = rest[quad], rest[~quad]
    if len(Q):
        A2 = np.zeros((len(Q), 2, 2))
        A2[:, 0, :] = -Q[:, 2:] / Q[:, 1:2]
        A2[:, 1, 0] = 1.0
        roots.append(np.linalg.eigvals(A2).ravel())
    lin = np.abs(L[:, 2]) > 1e-300
    roots.append(-L[lin, 3] / L[lin, 2])
    r = np.concatenate(roots)
    r = r[np.abs(r.imag) < 1e-9].real
    return sorted(set(float(v) for v in r if 1e-9 * width < v < (1 - 1e-9) * width))


SLIVER = 1e-3  # pieces narrower than this (log length) are merged into a neighbour ...
SLIVER_TOL = 1e-6  # ... where that moves no column's log time by more than this


def _merge_slivers(P: np.ndarray, segs: list) -> list:
    """Pieces [lo, hi, argmax list] of one cell with the slivers merged into a neighbour (`SLIVER`): a
    crossing next to a node or to another crossing (columns that coincide up to float32 rounding cross
    anywhere) adds a piece that changes no value but deepens the cell finder and its lookup table."""
    def err(am, lo, hi):  # largest change of a column's log time on [lo, hi] under the argmax list ``am``
        u = np.linspace(lo, hi, 5)
        v = P @ np.stack([u ** 3, u * u, u, np.ones_like(u)])  # [Nb, 5]
        return float(np.max(np.abs(np.maximum.accumulate(v, axis=0) - v[am])))

    out = []
    for k, (lo, hi, am) in enumerate(segs):
        if out and out[-1][2] == am:
            out[-1][1] = hi
        elif hi - lo < SLIVER and len(segs) > 1:
            if out and err(out[-1][2], lo, hi) <= SLIVER_TOL:
                out[-1][1] = hi
            elif k + 1 < len(segs) and err(segs[k + 1][2], lo, hi) <= SLIVER_TOL:
                segs[k + 1][0] = lo
            else:
                out.append([lo, hi, am])
        else:
            out.append([lo, hi, am])
    return out


def refine_attention(coef: np.ndarray, t: AttnTable):
    """A head layout of ``t`` whose cubics are ``coef`` [4, Nl-1, Nb] as pieces on which the running max over
    batch columns is one column's cubic: (piece boundaries [P+1], piece origins [P], coefficients [P, Nb, 4],
    log batch grid [Nb])."""
    x = np.asarray(t.log_len, np.float32)
    nodes, x0, rc = [x[0]], [], []
    for i in range(len(x) - 1):
        P = coef[:, i, :].T  # [Nb, 4]
        width = float(x[i + 1]) - float(x[i])
        cuts = [0.0] + _crossings(P, width) + [width]
        segs = []
        for lo_u, hi_u in zip(cuts[:-1], cuts[1:]):
            m = 0.5 * (lo_u + hi_u)
            v = P @ np.array([m ** 3, m * m, m, 1.0])
            am, best = [], 0
            for j in range(len(v)):
                if v[j] > v[best]:
                    best = j
                am.append(best)
            segs.append([lo_u, hi_u, am])
        for _, hi_u, am in _merge_slivers(P, segs):
            nodes.append(x[i + 1] if hi_u >= width else np.float32(float(x[i]) + hi_u))
            x0.append(x[i])
            rc.append(P[am])
    return np.asarray(nodes, np.float32), np.asarray(x0, np.float32), np.asarray(rc), np.asarray(t.log_b, np.float32)


@jax.tree_util.register_dataclass
@dataclass
class FastLookup:
    """The table times of one model on one GPU at one TP degree (`step.TableLookup`'s methods), specialised.
    Build with `specialise`; `common_shapes` pads several to one shape so one compilation serves them."""

    gemm: Series  # G series in log m, `step.step_gemms` order: qkv, o, gate_up, down, lm_head (+ MoE GEMMs)
    gemm_log_floor: jax.Array
    tok_gemm: jax.Array  # [G, TOKEN_TABLE + 1] µs at every integer m (index 0 unused)
    decode: RefinedAttn
    decode_kv_scale: jax.Array
    decode_floor_us: jax.Array
    prefill: RefinedAttn
    prefill_len_scale: jax.Array
    comm: Series  # 1 series in log bytes, for the model's TP degree
    tok_comm: jax.Array  # [TOKEN_TABLE + 1] layer all-reduce µs at every integer token count
    tok_gather: jax.Array  # [TOKEN_TABLE + 1] logits all-gather µs at every integer number of sampled requests
    moe: Series  # 1 series in log tokens: the fused-MoE call (a placeholder, never read, for a dense model)
    tok_moe: jax.Array  # [TOKEN_TABLE + 1] fused-MoE µs at every integer token count (of one attention rank)
    ep: Series  # 1 series in log bytes: the all-reduce table for the tp x attention_dp GPUs of the expert group
    tok_ep: jax.Array  # [TOKEN_TABLE + 1] MoE dispatch + combine µs at every integer token count (of one rank)
    mla_decode: RefinedAttn  # the MLA module tables (placeholders, never read, without MLA)
    mla_prefill: RefinedAttn
    mla_floor_us: jax.Array  # [2] their smallest times (decode, prefill)
    dims: ops.Dims
    has_comm: bool = _static()
    int_tokens: bool = _static(default=False)  # read GEMM and all-reduce times from the per-token tables

    def gemm_us(self, gemms: list[ops.Gemm]) -> list:
        if self.int_tokens:
            return [_take(self.tok_gemm[i], g.m.astype(jnp.int32)) for i, g in enumerate(gemms)]
        return [self._gemm(i, jnp.log(g.m)) for i, g in enumerate(gemms)]

    def _gemm(self, i, log_m):
        return _gemm_us(self.gemm, self.gemm_log_floor, i, log_m)

    def attn_decode_us(self, n_req, total_keys):
        return kt.decode_table_us(self.decode, self.decode_floor_us, self.decode_kv_scale, n_req, total_keys)

    def attn_prefill_us(self, n_req, total_pairs):
        return kt.prefill_table_us(self.prefill, self.prefill_len_scale, n_req, total_pairs)

    def attn_floor_us(self):
        return self.decode_floor_us

    def layer_allreduce_us(self, tokens):
        if self.int_tokens:
            return self._tp_only(_take(self.tok_comm, tokens.astype(jnp.int32)))
        return self._tp_only(self._comm(ops.allreduce_bytes(self.dims, tokens)))

    def logits_gather_us(self, sampled):
        if self.int_tokens:
            return self._tp_only(_take(self.tok_gather, sampled.astype(jnp.int32)))
        return self._tp_only(self._comm(jnp.maximum(ops.logits_gather_message(self.dims, sampled), 1.0)))

    def moe_us(self, tokens):
        if self.int_tokens:
            return _take(self.tok_moe, tokens.astype(jnp.int32))
        return _moe_us(self.moe, ops.moe_tokens(self.dims, tokens))

    def ep_exchange_us(self, tokens):
        d = self.dims
        if self.int_tokens:
            t = _take(self.tok_ep, tokens.astype(jnp.int32))
        else:
            t = _comm_us(self.ep, jnp.maximum(ops.ep_exchange_message(d, tokens), 1.0))
        return jnp.where(d.attention_dp > 1.0, t, 0.0) if self.has_comm else jnp.zeros_like(t)

    def mla_us(self, batch: Batch):
        dec_floor, pre_floor = self.mla_floor_us[0], self.mla_floor_us[1]
        return (kt.mla_decode_us(self.mla_decode, dec_floor, batch.n_decode, batch.decode_keys),
                kt.mla_prefill_us(self.mla_prefill, batch.n_prefill, batch.prefill_tokens), dec_floor, pre_floor)

    def _comm(self, nbytes):
        return _comm_us(self.comm, nbytes)

    def _tp_only(self, t):
        """As `kernel_time.allreduce_table_us`: 0 without a table or at TP 1."""
        return jnp.where(self.dims.tp > 1.0, t, 0.0) if self.has_comm else jnp.zeros_like(t)


def _gemm_us(gemm: Series, log_floor, i, log_m):
    """GEMM ``i`` at log m (µs), never below the table's fastest call."""
    return jnp.exp(jnp.maximum(gemm(i, log_m, 1.0), log_floor))


def _comm_us(comm: Series, nbytes):
    """The all-reduce of ``nbytes`` per GPU (µs)."""
    return jnp.exp(comm(0, jnp.log(nbytes), 1.0))


def _moe_us(moe: Series, tokens):
    """`kernel_time.moe_table_us` of the specialised curve (µs)."""
    return jnp.exp(moe(0, jnp.log(jnp.maximum(tokens, 1.0)), kt.MOE_SLOPE_HI))


_NO_MOE = kt.MoeCurve(np.arange(2, dtype=np.float32), np.zeros(2, np.float32))  # a dense model's placeholder curve
_NO_MLA = AttnTable(np.arange(2, dtype=np.float32), np.arange(2, dtype=np.float32),
                    np.zeros((1, 2, 2), np.float32))  # placeholder MLA table of a model without MLA


def specialise(gemm: GemmTable, decode: AttnTable, prefill: AttnTable, comm: CommTable | None, on,
               moe: kt.MoeCurve | None = None, static=None, mla: tuple = (None, None)) -> FastLookup:
    """The `FastLookup` of a `step.ModelOnGPU` ``on`` on these tables (unpadded: see `common_shapes`);
    ``moe`` and ``static`` (`step.Static`) for a mixture-of-experts model, ``mla`` (decode, prefill MLA
    module tables) for an MLA model."""
    d = ops.Dims(*(np.float32(v) for v in on.dims))
    gl = step_gemms(d, Batch(*(np.float32(1.0),) * 5), static)
    dec_c, pre_c = int(on.decode_layout), int(on.prefill_layout)
    comm_x = np.asarray(comm.log_bytes, np.float32) if comm is not None else np.zeros(2, np.float32)
    has_moe, has_mla = moe is not None, any(t is not None for t in mla)
    moe = _NO_MOE if moe is None else kt.MoeCurve(*(np.asarray(a, np.float32) for a in moe))
    mla = tuple(_NO_MLA if t is None else AttnTable(*(np.asarray(a, np.float32) for a in t)) for t in mla)
    finders = (Finder.build(np.asarray(gemm.log_m, np.float32)), Finder.build(comm_x),
               Finder.build(moe.log_tokens))
    # the all-reduce's blend over GPU counts for the TP group and the expert group
    comm_w = np.stack([comm_gpu_weights(comm, max(float(g), 2.0)) for g in (d.tp, d.tp * d.attention_dp)]) \
        if comm is not None else np.zeros((2, 1), np.float32)
    gemm_np = GemmTable(*(np.asarray(a) for a in gemm))
    series, offset, w = (np.stack(v) for v in zip(*(gemm_shape_blend(gemm_np, np.float32(g.k), np.float32(g.n), np)
                                                     for g in gl)))
    gc, cc, dc, pc, mc, floor, tok, ec, mlc, floors = jax.tree_util.tree_map(np.asarray, once(
        _splines, gemm, decode, prefill, comm, series.astype(np.float32), offset.astype(np.float32),
        w.astype(np.float32), comm_w, np.int32(dec_c),
        np.int32(pre_c), finders, d, comm is not None, moe, mla, has_moe, has_mla))
    f32 = np.float32
    return FastLookup(Series.build(np.asarray(gemm.log_m, np.float32), gc, finders[0]), f32(floor),
                      _per_token(tok["tok_gemm"]), _refined(dc.astype(np.float64), decode), f32(on.decode_kv_scale),
                      floors[0], _refined(pc.astype(np.float64), prefill),
                      f32(on.prefill_len_scale), Series.build(comm_x, cc[..., None], finders[1]),
                      _per_token(tok["tok_comm"]), _per_token(tok["tok_gather"]),
                      Series.build(moe.log_tokens, mc[..., None], finders[2]), _per_token(tok["tok_moe"]),
                      Series.build(comm_x, ec[..., None], finders[1]), _per_token(tok["tok_ep"]),
                      _refined(mlc[0].astype(np.float64), mla[0]), _refined(mlc[1].astype(np.float64), mla[1]),
                      floors[1:], d, comm is not None)


def of_setup(su) -> FastLookup:
    """The `FastLookup` of a `step.Setup` (unpadded)."""
    a = su.arrays
    return specialise(a.gemm, a.decode, a.prefill, a.comm, su.on_gpu, a.moe, su.static, (a.mla_decode, a.mla_prefill))


def as_scalars(tree):
    """A pytree of numbers (a `step.ModelOnGPU`, `Params`) as float32/int32 numpy scalars, so that every
    group of a sweep or deployment of a serving run passes the same types to one compilation."""
    return jax.tree_util.tree_map(
        lambda v: np.asarray(v, np.int32 if np.issubdtype(np.asarray(v).dtype, np.integer) else np.float32), tree)


def _per_token(v: np.ndarray) -> np.ndarray:
    """A per-token table indexed by the count itself (entry 0, never read, repeats entry 1)."""
    return np.concatenate([v[..., :1], v], axis=-1)


@functools.partial(jax.jit, static_argnums=(12, 15, 16))
def _splines(gemm, decode, prefill, comm, series, offset, w, comm_w, dec_c, pre_c, finders, d, has_comm, moe, mla,
             has_moe, has_mla):
    """What `specialise` computes, in one compilation per table shapes: interpax's spline coefficients of
    the G GEMMs' blended log-m cubics [4, Nm-1, G] from their `tables.gemm_shape_blend` (``series``
    [G, 4, Nm], ``offset`` and ``w`` [G, 4]; the blend of the neighbouring shapes' splines is the spline of
    the blend), of the all-reduce's log-bytes cubic for the TP group [4, Nb-1] (``comm_w`` [2, Ng]: the
    `tables.comm_gpu_weights` of the TP group and of the expert group), of the two attention
    head layouts [4, Nl-1, Nb], of the fused-MoE curve [4, Nt-1], the GEMM table's log floor, the per-token
    tables (index m - 1): the lookup's own GEMM, all-reduce and fused-MoE functions (`_gemm_us`, `_comm_us`,
    `_moe_us`) at every integer, the all-reduce's cubic for the expert group [4, Nb-1] and the two MLA
    tables' cubics (decode, prefill) [4, Nl-1, Nb] each.  Without ``has_moe`` (``has_mla``) the MoE (MLA)
    outputs are zeros of their placeholders' shapes, never read.  Last, the attention tables' smallest times
    (`kernel_time.attn_floor_us`: decode layout, MLA decode, MLA prefill) [3]."""
    n_gemms = series.shape[0]
    c = monotone_spline(gemm.log_m, series.reshape(n_gemms * 4, -1).T).c.reshape(4, -1, n_gemms, 4)
    gc = jnp.einsum("pigs,gs->pig", c, w).at[3].add(jnp.sum(offset * w, axis=1))
    # the all-reduce table's cubics per GPU count [4, Nb-1, Ng], blended for tp here and for the expert group below
    comm_c = monotone_spline(comm.log_bytes, jnp.moveaxis(comm.log_t, 1, 0)).c if has_comm else None
    cc = comm_c @ comm_w[0] if has_comm else jnp.zeros((4, 1))
    dc = monotone_spline(decode.log_len, decode.log_t[dec_c]).c
    pc = monotone_spline(prefill.log_len, prefill.log_t[pre_c]).c
    floor = gemm_log_floor(gemm)
    m = jnp.arange(1, TOKEN_TABLE + 1, dtype=jnp.float32)
    gemm_s = Series.build(gemm.log_m, gc, finders[0])
    none = jnp.zeros(TOKEN_TABLE, jnp.float32)
    tok = {"tok_gemm": _gemm_us(gemm_s, floor, jnp.arange(n_gemms)[:, None], jnp.log(m)),
           "tok_comm": none, "tok_gather": none, "tok_moe": none, "tok_ep": none}
    mc = jnp.zeros((4, moe.log_tokens.shape[0] - 1))
    if has_moe:
        mc = monotone_spline(moe.log_tokens, moe.log_us).c
        tok["tok_moe"] = _moe_us(Series.build(moe.log_tokens, mc[..., None], finders[2]), ops.moe_tokens(d, m))
    mlc = [monotone_spline(t.log_len, t.log_t[0]).c if has_mla else
           jnp.zeros((4, t.log_len.shape[0] - 1, t.log_b.shape[0])) for t in mla]
    ec = jnp.zeros((4, comm.log_bytes.shape[0] - 1 if has_comm else 1))
    if has_comm:
        comm_s = Series.build(comm.log_bytes, cc[..., None], finders[1])
        tok["tok_comm"] = _comm_us(comm_s, ops.allreduce_bytes(d, m))
        tok["tok_gather"] = _comm_us(comm_s, jnp.maximum(ops.logits_gather_message(d, m), 1.0))
    if has_comm and has_moe:
        ec = comm_c @ comm_w[1]
        tok["tok_ep"] = _comm_us(Series.build(comm.log_bytes, ec[..., None], finders[1]),
                                 jnp.maximum(ops.ep_exchange_message(d, m), 1.0))
    floors = jnp.stack([kt.attn_floor_us(decode, dec_c)] + [kt.attn_floor_us(t, 0) for t in mla]).astype(jnp.float32)
    return gc, cc, dc, pc, mc, floor, tok, ec, mlc, floors


def _refined(coef: np.ndarray, t: AttnTable) -> RefinedAttn:
    nodes, x0, coef, lb = refine_attention(coef, t)
    coef = np.moveaxis(coef, 2, 0).reshape(4, -1)  # [4, pieces · Nb]
    bx0 = lb[:-1] if lb.size > 1 else lb[:1]
    bdx = (lb[1:] - lb[:-1]) if lb.size > 1 else np.ones(1, np.float32)
    refined = RefinedAttn(Finder.build(nodes), x0, coef.astype(np.float32), Finder.build(lb), bx0, bdx,
                          np.float32(np.exp(lb[-1])), lb.size)
    return _widen(refined, max(2, lb.size))  # a lookup reads columns j and j + 1


def common_shapes(lookups: list[FastLookup]) -> list[FastLookup]:
    """Pad lookups to the same array shapes and static fields, so that one compilation serves all: grid
    nodes with _BIG (never counted), lookup depths to the largest, attention batch strides to the widest,
    series strides to the longest; everything else by repeating its last entry (never read)."""
    gcells = max(x.gemm.cells for x in lookups)
    ccells = max(x.comm.cells for x in lookups)
    mcells = max(x.moe.cells for x in lookups)
    ecells = max(x.ep.cells for x in lookups)
    attn = ("decode", "prefill", "mla_decode", "mla_prefill")
    nb = {k: max(2, max(getattr(x, k).nb for x in lookups)) for k in attn}
    lookups = [dataclasses.replace(x, gemm=_restride(x.gemm, gcells), comm=_restride(x.comm, ccells),
                                   moe=_restride(x.moe, mcells), ep=_restride(x.ep, ecells),
                                   **{k: _widen(getattr(x, k), nb[k]) for k in attn})
               for x in lookups]
    ks = [max(col) for col in zip(*([f.k for f in _finders(x)] for x in lookups))]
    lookups = [_with_depths(x, ks) for x in lookups]
    flat = [jax.tree_util.tree_flatten_with_path(x) for x in lookups]
    treedef = flat[0][1]
    shapes = [tuple(max(s) for s in zip(*(np.shape(leaves[i][1]) for leaves, _ in flat)))
              for i in range(len(flat[0][0]))]
    out = []
    for leaves, _ in flat:
        new = []
        for (path, v), target in zip(leaves, shapes):
            v = np.asarray(v)
            if v.shape != target:
                if jax.tree_util.keystr(path).endswith(".nodes"):
                    v = np.concatenate([v, np.full(target[0] - v.shape[0], _BIG, np.float32)])
                else:
                    v = _pad_last(v, target)
            new.append(v)
        out.append(jax.tree_util.tree_unflatten(treedef, new))
    return out


def _finders(x: FastLookup) -> list[Finder]:
    return [x.gemm.finder, x.comm.finder, x.decode.finder, x.decode.bfinder, x.prefill.finder, x.prefill.bfinder,
            x.moe.finder, x.ep.finder, x.mla_decode.finder, x.mla_decode.bfinder, x.mla_prefill.finder,
            x.mla_prefill.bfinder]


def _with_depths(x: FastLookup, ks: list[int]) -> FastLookup:
    """``x`` with its finders' comparison depths set to ``ks`` (in `_finders` order)."""
    fd = [dataclasses.replace(f, k=k) for f, k in zip(_finders(x), ks)]
    return dataclasses.replace(
        x, gemm=dataclasses.replace(x.gemm, finder=fd[0]), comm=dataclasses.replace(x.comm, finder=fd[1]),
        decode=dataclasses.replace(x.decode, finder=fd[2], bfinder=fd[3]),
        prefill=dataclasses.replace(x.prefill, finder=fd[4], bfinder=fd[5]),
        moe=dataclasses.replace(x.moe, finder=fd[6]), ep=dataclasses.replace(x.ep, finder=fd[7]),
        mla_decode=dataclasses.replace(x.mla_decode, finder=fd[8], bfinder=fd[9]),
        mla_prefill=dataclasses.replace(x.mla_prefill, finder=fd[10], bfinder=fd[11]))


def _pad_last(v: np.ndarray, target: tuple) -> np.ndarray:
    """Pad ``v`` to ``target`` along every axis by repeating its last entry."""
    for a, n in enumerate(target):
        if v.shape[a] < n:
            v = np.concatenate([v] + [np.take(v, [-1], axis=a)] * (n - v.shape[a]), axis=a)
    return v


def _restride(s: Series, cells: int) -> Series:
    """A series set with ``cells`` cells per series (planes re-laid out; extra cells repeat the last)."""
    if s.cells == cells:
        return s
    p = np.asarray(s.planes).reshape(4, -1, s.cells)
    p = _pad_last(p, (4, p.shape[1], cells)).reshape(4, -1)
    return dataclasses.replace(s, planes=p, x0=_pad_last(np.asarray(s.x0), (cells,)), cells=cells)


def _widen(a: RefinedAttn, nb: int) -> RefinedAttn:
    """An attention lookup with batch stride ``nb`` (extra columns repeat the last one)."""
    if a.nb == nb:
        return a
    p = np.asarray(a.planes).reshape(4, -1, a.nb)
    return dataclasses.replace(a, planes=_pad_last(p, (4, p.shape[1], nb)).reshape(4, -1), nb=nb)
