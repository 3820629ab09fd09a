"""Time of one vLLM V1 engine step: a mixed batch of chunked prefills and decodes in one forward pass.

A step is a fixed-shape pytree (`Step`): per-request arrays padded to a bucket size with a 0/1 mask, so the
same jitted function evaluates any batch, `jax.vmap` maps it over many steps, and `jax.grad` differentiates
it with respect to the residual parameters, the table values and the (continuous) token counts.

Composition per step (all times in µs):
* GEMMs (QKV, O, gate/up, down) at M = all tokens of the step, per layer;
* attention: prefill chunks and decodes are one varlen kernel per layer in vLLM's FlashAttention backend;
  each part is priced from its table and, when both are present, the smaller fixed cost is counted once;
* bandwidth-bound kernels per layer (RMSNorm x2, RoPE, KV-cache write, activation, Qwen3 q/k norm);
* two TP all-reduces per layer plus one after the vocab-parallel embedding;
* embedding, final norm, lm_head and sampling for the requests that emit a token;
* overheads: per step, per layer, per request.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import kernel_time as kt
from . import ops
from .errors import InputError
from .hardware import GPU
from .model import DTYPE_BYTES, ModelConfig
from .params import Params
from .tables import AttnTable, CommTable, GemmTable, Tables, nearest_layout

BREAKDOWN = ("gemm", "attn_prefill", "attn_decode", "memory_ops", "communication", "lm_head_sampling",
             "overhead")


class Step(NamedTuple):
    """One engine step, padded: prefilling requests compute ``prefill_new`` tokens after
    ``prefill_cached``; decoding requests have ``decode_ctx`` tokens cached before the step."""

    prefill_new: jax.Array  # [P] tokens
    prefill_cached: jax.Array  # [P] tokens
    prefill_mask: jax.Array  # [P] 1 for a real request, 0 for padding
    decode_ctx: jax.Array  # [D] tokens
    decode_mask: jax.Array  # [D]


class Arrays(NamedTuple):
    """The table arrays one step evaluation reads (a pytree: differentiable)."""

    gemm: GemmTable
    decode: AttnTable
    prefill: AttnTable
    comm: CommTable | None


class Layout(NamedTuple):
    """Model x GPU x TP specifics as numbers (a pytree: may be vmapped in sweeps)."""

    dims: ops.Dims
    hw: kt.Hardware
    decode_layout: jax.Array  # int index into the decode table's head layouts
    decode_kv_scale: jax.Array  # kv length factor matching KV bytes of the chosen layout
    prefill_layout: jax.Array
    prefill_len_scale: jax.Array  # sequence length factor matching FLOPs of the chosen layout


@dataclass(frozen=True)
class Static:
    """Choices fixed at trace time."""

    gemm_same_dtype: bool
    table_weight_bytes: float
    compute_ratio: float = 1.0  # kt.CROSS_DTYPE_COMPUTE_RATIO for the (table, model) dtypes
    has_comm_table: bool = False  # all-reduce from a measured table (else analytic)


@dataclass
class Setup:
    """Everything needed to evaluate steps of one model on one GPU at one TP degree."""

    model: ModelConfig
    gpu: GPU
    tp: int
    arrays: Arrays
    layout: Layout
    static: Static
    gemm_table_dtype: str


def setup(model: ModelConfig, tables: Tables, tp: int) -> Setup:
    """Bind a model, a GPU's tables and a TP degree; pick the GEMM table and attention head layouts."""
    d = ops.dims(model, tp)
    g = kt.choose_gemm_table(tables, model.dtype)
    dc, ds = nearest_layout(tables.decode_heads, d.q_heads, d.kv_heads, d.head_dim, "decode")
    pc, ps = nearest_layout(tables.prefill_heads, d.q_heads, d.kv_heads, d.head_dim, "prefill")
    layout = Layout(d, g.hw, jnp.int32(dc), jnp.float32(ds), jnp.int32(pc), jnp.float32(ps))
    arrays = Arrays(tables.gemm[g.table_dtype], tables.decode, tables.prefill, tables.allreduce)
    static = Static(g.same_dtype, float(DTYPE_BYTES[g.table_dtype]), g.compute_ratio, tables.allreduce is not None)
    return Setup(model, tables.gpu, tp, arrays, layout, static, g.table_dtype)


class Features(NamedTuple):
    """Parameter-free quantities of one step (counts, table times in µs, FLOPs, bytes).  A step's time is
    `combine(features(step), params)`: fitting evaluates `features` once and `combine` per iteration."""

    tokens: jax.Array  # tokens computed this step (prefill new + one per decode)
    n_prefill: jax.Array
    n_decode: jax.Array
    gemm: kt.GemmFeatures  # [5]: qkv, o, gate_up, down (per layer), lm_head
    attn_prefill_us: jax.Array  # prefill attention table time per layer
    attn_decode_us: jax.Array  # decode attention table time per layer
    attn_floor_us: jax.Array  # fixed cost of the attention kernel (decode table floor)
    kv_bytes: jax.Array  # KV-cache bytes the decodes read per layer
    memory_bytes: jax.Array  # bandwidth-bound kernels of one layer
    head_bytes: jax.Array  # embedding, final norm, logits and sampler traffic
    comm_table_us: jax.Array  # one all-reduce from the measured table (0 without one)
    comm_bytes: jax.Array  # one all-reduce message
    gather_table_us: jax.Array  # the logits all-gather, from the all-reduce table (0 without one or at TP 1)
    gather_bytes: jax.Array  # its all-reduce-equivalent message (`ops.logits_gather_message`)


def features(arrays: Arrays, layout: Layout, step: Step, static: Static) -> Features:
    d, hw = layout.dims, layout.hw
    n_pre = jnp.sum(step.prefill_mask)
    n_dec = jnp.sum(step.decode_mask)
    new = step.prefill_new * step.prefill_mask
    tokens = jnp.sum(new) + n_dec
    sampled = n_pre + n_dec  # each request's last position goes through lm_head and the sampler
    gl = list(ops.layer_gemms(d, tokens).values()) + [ops.lm_head_gemm(d, sampled)]
    # A Python loop, not a nested vmap: XLA:CPU (jax 0.10.2) returned wrong table values for a vmap over
    # the five GEMMs inside a vmap over more than ~6500 steps (tests/test_step_batching.py guards this).
    per = [kt.gemm_features(arrays.gemm, x, d.weight_bytes, static.table_weight_bytes, hw) for x in gl]
    gf = kt.GemmFeatures(*(jnp.stack([jnp.asarray(getattr(p_, f), jnp.float32) for p_ in per])
                                for f in kt.GemmFeatures._fields))
    pairs = jnp.sum(ops.prefill_pairs_tiled(d, new, step.prefill_cached) * step.prefill_mask)
    keys = jnp.sum(ops.decode_keys(d, step.decode_ctx) * step.decode_mask)
    msg = ops.allreduce_bytes(d, tokens)
    gather = ops.logits_gather_message(d, sampled)
    return Features(
        tokens=tokens, n_prefill=n_pre, n_decode=n_dec, gemm=gf,
        attn_prefill_us=kt.attn_prefill_table_us(arrays.prefill, layout.prefill_layout,
                                                      layout.prefill_len_scale, n_pre, pairs),
        attn_decode_us=kt.attn_decode_table_us(arrays.decode, layout.decode_layout, layout.decode_kv_scale,
                                                    n_dec, keys),
        attn_floor_us=kt.attn_floor_us(arrays.decode, layout.decode_layout),
        kv_bytes=ops.kv_read_bytes(d, keys),
        memory_bytes=sum(ops.memory_ops_bytes(d, tokens).values()),
        head_bytes=ops.embedding_bytes(d, tokens) + ops.sampling_bytes(d, sampled),
        comm_table_us=kt.allreduce_table_us(arrays.comm, d.tp, msg), comm_bytes=msg,
        gather_table_us=kt.allreduce_table_us(arrays.comm, d.tp, jnp.maximum(gather, 1.0)), gather_bytes=gather)


def combine(f: Features, layout: Layout, params: Params, static: Static):
    """Step time (µs) and breakdown from the step's features and the residual parameters."""
    d, hw, p = layout.dims, layout.hw, params
    g = kt.gemm_combine(f.gemm, hw, p, static.gemm_same_dtype, static.compute_ratio)  # [5]
    has_pre, has_dec = f.n_prefill > 0, f.n_decode > 0
    # One varlen kernel per layer serves prefills and decodes.  Its fixed cost in the engine is the decode
    # table's floor (smallest time) times attn_fixed_scale.  Decode-only: t_dec (`kt.decode_cold_us`).
    # Prefill-only: the fixed cost + what the prefill table adds above its floor.  Both: t_dec + that.
    floor = f.attn_floor_us * p.attn_decode_scale
    fixed = f.attn_floor_us * p.attn_fixed_scale
    t_dec = jnp.where(has_dec, kt.decode_cold_us(f.attn_decode_us, fixed, f.kv_bytes, hw, p),
                      jnp.where(has_pre, fixed, 0.0))
    t_pre = jnp.where(has_pre, jnp.maximum(f.attn_prefill_us * p.attn_prefill_scale - floor, 0.0), 0.0)
    memory = kt.memory_us(f.memory_bytes, hw, p) + ops.memory_kernels_per_layer(d) * p.kernel_floor_us
    comm = kt.allreduce_combine(f.comm_table_us, static.has_comm_table, d.tp, f.comm_bytes, hw, p)
    gather = kt.allreduce_combine(f.gather_table_us, static.has_comm_table, d.tp, f.gather_bytes, hw, p)
    head = g[4] + kt.memory_us(f.head_bytes, hw, p) + 4.0 * p.kernel_floor_us  # embed, norm, sampler
    per_layer = p.layer_overhead_us + jnp.where(has_pre, p.prefill_layer_overhead_us, 0.0)
    overhead = p.step_overhead_us + p.request_overhead_us * (f.n_prefill + f.n_decode) + per_layer * d.layers
    parts = {
        "gemm": d.layers * jnp.sum(g[:4]),
        "attn_prefill": d.layers * t_pre,
        "attn_decode": d.layers * t_dec,
        "memory_ops": d.layers * memory,
        "communication": (2.0 * d.layers + 1.0) * comm + gather,
        "lm_head_sampling": head,
        "overhead": overhead,
    }
    return sum(parts.values()), parts


def step_time(arrays: Arrays, layout: Layout, params: Params, step: Step, static: Static):
    """Predicted time of one step (µs) and its breakdown by operator class (dict of µs)."""
    return combine(features(arrays, layout, step, static), layout, params, static)


@functools.lru_cache(maxsize=None)
def _features_fn(static: Static):
    return jax.jit(jax.vmap(lambda a, lay, s: features(a, lay, s, static), in_axes=(None, None, 0)))


def pad_steps(steps: Step, n_prefill: int, n_decode: int) -> Step:
    """Widen the padded request axes of a batch of steps to ``n_prefill`` / ``n_decode`` columns."""
    def wide(a, n):
        return jnp.pad(a, ((0, 0), (0, n - a.shape[1])))
    return Step(wide(steps.prefill_new, n_prefill), wide(steps.prefill_cached, n_prefill),
                wide(steps.prefill_mask, n_prefill), wide(steps.decode_ctx, n_decode),
                wide(steps.decode_mask, n_decode))


def batched_features(arrays: Arrays, layout: Layout, steps: Step, static: Static, n_prefill: int,
                     n_decode: int, chunk: int = 4096) -> Features:
    """`features` of many steps in fixed-size chunks of fixed width, so that every model, TP degree and
    batch of one GPU reuses a single compilation."""
    steps = pad_steps(steps, n_prefill, n_decode)
    n = steps.prefill_new.shape[0]
    fn = _features_fn(static)
    out = []
    for lo in range(0, n, chunk):
        part = jax.tree_util.tree_map(lambda a: a[lo:lo + chunk], steps)
        short = chunk - part.prefill_new.shape[0]
        if short:  # repeat the first step to fill the chunk; the copies are dropped below
            part = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, jnp.repeat(a[:1], short, axis=0)]), part)
        out.append(jax.tree_util.tree_map(lambda a: a[:chunk - short], fn(arrays, layout, part)))
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *out)


def make_step_fn(static: Static):
    """A jitted, vmapped step-time function over a leading axis of steps:
    f(arrays, layout, params, steps) -> (total_us [S], breakdown {name: [S]})."""
    def one(arrays, layout, params, step):
        return step_time(arrays, layout, params, step, static)
    return jax.jit(jax.vmap(one, in_axes=(None, None, None, 0)))


# ---------------------------------------------------------------- building padded steps

def bucket(n: int) -> int:
    """Padded length for n requests: the next power of two (at least 1), to reuse compilations."""
    return 1 << max(0, int(n - 1).bit_length())


def pack_steps(steps: list[dict], where: list[str] | None = None) -> Step:
    """Pad a list of steps in the record schema ({"prefill": [[new, cached], ...], "decode": [ctx, ...]})
    into one `Step` with a leading axis.  Validates every value (non-negative integers, non-empty step)."""
    S = len(steps)
    P = bucket(max((len(s.get("prefill", [])) for s in steps), default=1))
    D = bucket(max((len(s.get("decode", [])) for s in steps), default=1))
    pn, pc, pm = np.zeros((S, P), np.float32), np.zeros((S, P), np.float32), np.zeros((S, P), np.float32)
    dc, dm = np.zeros((S, D), np.float32), np.zeros((S, D), np.float32)
    for i, s in enumerate(steps):
        loc = where[i] if where else f"step {i}"
        pre, dec = validate_step(s, loc)
        for j, (n, c) in enumerate(pre):
            pn[i, j], pc[i, j], pm[i, j] = n, c, 1.0
        dc[i, :len(dec)], dm[i, :len(dec)] = dec, 1.0
    return Step(*(jnp.asarray(a) for a in (pn, pc, pm, dc, dm)))


def _count(v, loc, field, minimum):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < minimum:
        raise InputError(f"must be an integer >= {minimum}, got {v!r}", loc, field)
    return int(v)


def validate_step(s, loc: str) -> tuple[list[tuple[int, int]], list[int]]:
    if not isinstance(s, dict):
        raise InputError(f"a step must be an object, got {type(s).__name__}", loc, "steps")
    pre, dec = s.get("prefill", []) or [], s.get("decode", []) or []
    if not isinstance(pre, list) or not isinstance(dec, list):
        raise InputError("prefill and decode must be lists", loc, "steps")
    out = []
    for e in pre:
        if not isinstance(e, (list, tuple)) or len(e) < 2:
            raise InputError(f"a prefill entry must be [new, cached], got {e!r}", loc, "prefill")
        out.append((_count(e[0], loc, "prefill.new", 1), _count(e[1], loc, "prefill.cached", 0)))
    ctx = [_count(c, loc, "decode", 0) for c in dec]
    if not out and not ctx:
        raise InputError("step has no requests", loc, "steps")
    return out, ctx
