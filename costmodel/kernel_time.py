"""Time of one kernel call (µs) from its table, its FLOPs/bytes and the residual parameters."""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from . import ops
from .interp import interp_work_axis
from .params import Params
from .tables import (DECODE_SLOPE_HI, PREFILL_SLOPE_HI, AttnTable, CommTable, GemmTable, attn_table_us, comm_table_us,
                     gemm_table_us)

SMOOTH_P = 4.0  # order of the smooth max joining compute- and memory-bound times
# Compute-bound efficiency of a query dtype relative to a table of another dtype.  Measured, not fitted: at
# m >= 8192 on InferSim's 8 H100 shapes, vLLM's BF16 GEMMs (AIConfigurator database, bench_data/gemm/h100_sxm)
# reach 1.11-1.31x (median 1.20x) the roofline efficiency of InferSim's FP8 DeepGEMM table.
CROSS_DTYPE_COMPUTE_RATIO = {("fp8", "bf16"): 1.2, ("fp8", "fp16"): 1.2}
MAX_COMPUTE_EFFICIENCY = 0.95
# Log-log slopes of attention time below a table's length grid (above it: `tables.DECODE_SLOPE_HI` and
# `tables.PREFILL_SLOPE_HI`): decode time falls in proportion to kv length (down to the kernel floor), prefill
# time in proportion to the sequence length (MFU falls with it).
DECODE_SLOPE_LO = 1.0
PREFILL_SLOPE_LO = 1.0


class Hardware(NamedTuple):
    """GPU rates used by the step model (dynamic, so sweeps may vary them)."""

    peak_flops: float  # FLOP/s of the model's GEMM dtype
    table_peak_flops: float  # FLOP/s of the GEMM table's dtype
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # one direction, per GPU


def smooth_max(a, b, p=SMOOTH_P):
    """A C-infinity max of positive times: (a^p + b^p)^(1/p); at most 2^(1/p) above max(a, b)."""
    hi = jnp.maximum(a, b)
    return hi * ((a / hi) ** p + (b / hi) ** p) ** (1.0 / p)


def memory_us(nbytes, hw: Hardware, p: Params):
    """Streaming ``nbytes`` at the sustained HBM bandwidth, µs (no launch cost)."""
    return nbytes * (1e6 / (hw.hbm_bytes_per_s * p.hbm_efficiency))


class GemmChoice(NamedTuple):
    """Which GEMM table prices a dtype, and how (see `gemm_combine`)."""

    table_dtype: str
    same_dtype: bool  # the table was measured in the query dtype
    compute_ratio: float  # CROSS_DTYPE_COMPUTE_RATIO when it was not
    hw: Hardware


def choose_gemm_table(tables, dtype: str) -> GemmChoice:
    """The table of ``dtype`` (fp16 reads the bf16 table) if the GPU has one, else the other-dtype transfer
    from the first available table."""
    gpu = tables.gpu
    want = "bf16" if dtype == "fp16" else dtype
    same = want in tables.gemm
    tdt = want if same else sorted(tables.gemm)[0]
    hw = Hardware(gpu.peak_flops(dtype), gpu.peak_flops(tdt), gpu.hbm_bytes_per_s, gpu.nvlink_bytes_per_s)
    ratio = 1.0 if same else CROSS_DTYPE_COMPUTE_RATIO.get((tdt, dtype), 1.0)
    return GemmChoice(tdt, same, ratio, hw)


class GemmFeatures(NamedTuple):
    """Parameter-free quantities of GEMM calls (any shape; arrays broadcast)."""

    table_us: jnp.ndarray  # table interpolant at (m, k, n), table dtype
    flops: jnp.ndarray
    bytes: jnp.ndarray  # HBM bytes in the query dtype
    roof_table_us: jnp.ndarray  # roofline time in the table dtype (peak FLOP/s and bandwidth)


def gemm_features(table_us, g: ops.Gemm, weight_bytes, table_weight_bytes, hw: Hardware) -> GemmFeatures:
    """The features of GEMM ``g`` whose table time is ``table_us``."""
    flops = ops.gemm_flops(g)
    roof = smooth_max(flops / hw.table_peak_flops,
                      ops.gemm_bytes(g, table_weight_bytes) / hw.hbm_bytes_per_s) * 1e6
    return GemmFeatures(table_us, flops, ops.gemm_bytes(g, weight_bytes), roof)


def gemm_combine(f: GemmFeatures, hw: Hardware, p: Params, same_dtype: bool, compute_ratio: float = 1.0):
    """GEMM latency (µs) from its features.

    Same dtype as the table: the table interpolant.  Another dtype (e.g. a BF16 model on InferSim's FP8
    H100 table): the table's efficiency relative to its own roofline, eta = roofline_table / measured,
    times ``compute_ratio`` (`CROSS_DTYPE_COMPUTE_RATIO`, capped at `MAX_COMPUTE_EFFICIENCY`), is taken as
    the compute efficiency of the query dtype, while the memory-bound side is priced from the query dtype's
    bytes at the sustained HBM bandwidth (weight streaming is a different kernel, so its efficiency does
    not carry over): time = smooth_max(FLOPs / (peak · eta), bytes / BW + floor).
    """
    if same_dtype:
        return f.table_us * p.gemm_scale
    eta = jnp.minimum(f.roof_table_us / f.table_us * compute_ratio, MAX_COMPUTE_EFFICIENCY)
    t_compute = f.flops / (hw.peak_flops * eta) * 1e6
    t_memory = memory_us(f.bytes, hw, p) + p.gemm_floor_us
    return smooth_max(t_compute, t_memory) * p.gemm_scale


def gemm_us(table: GemmTable, g: ops.Gemm, weight_bytes, table_weight_bytes, hw: Hardware, p: Params,
            same_dtype: bool, compute_ratio: float = 1.0):
    """GEMM latency (µs) of one call; see `gemm_combine`."""
    return gemm_combine(gemm_features(gemm_table_us(table, g.m, g.k, g.n), g, weight_bytes, table_weight_bytes, hw),
                        hw, p, same_dtype,
                        compute_ratio)


def attn_floor_us(table: AttnTable, c):
    """The smallest time in a layout's table (one short sequence): the kernel's fixed cost."""
    return jnp.exp(table.log_t[c, 0, 0])


def attn_decode_table_us(table: AttnTable, c, kv_scale, n_req, total_keys):
    """Paged decode attention for ``n_req`` sequences reading ``total_keys`` keys in all, table time (µs),
    on head layout ``c`` of ``table`` (see `decode_table_us`)."""
    return decode_table_us(attn_on(table, c), attn_floor_us(table, c), kv_scale, n_req, total_keys)


def attn_on(table: AttnTable, c):
    """Head layout ``c`` of an attention table as a function (batch, length, slope_hi, slope_lo) -> µs."""
    return lambda batch, length, slope_hi, slope_lo: attn_table_us(table, c, batch, length, slope_hi, slope_lo)


def decode_table_us(attn, floor_us, kv_scale, n_req, total_keys):
    """Paged decode attention for ``n_req`` sequences reading ``total_keys`` keys in all (µs), from a
    table function ``attn`` (`attn_on`) whose kv lengths are scaled by ``kv_scale``.  Below the table's
    kv grid the time falls in proportion to kv length (bandwidth-bound work), never below ``floor_us``
    (the layout's smallest measured time: the kernel's fixed cost)."""
    t = attn(*decode_query(n_req, total_keys, kv_scale), DECODE_SLOPE_HI, DECODE_SLOPE_LO)
    return jnp.where(n_req > 0, jnp.maximum(t, floor_us), 0.0)


def decode_query(n_req, total_keys, kv_scale):
    """Where a decode call reads its table: (sequences, kv length scaled to the layout), at least 1 each."""
    n = jnp.maximum(n_req, 1.0)
    return n, jnp.maximum(total_keys / n, 1.0) * kv_scale


def decode_cold_us(table_us, fixed_us, kv_bytes, hw: Hardware, p: Params):
    """Decode attention in the engine (µs): the table time times ``attn_decode_scale``, but never less than
    the call's fixed cost in the engine (``fixed_us``) plus the KV-cache bytes at the GPU's peak HBM
    bandwidth.  The engine reads each layer's KV cache once per step, from HBM; a benchmark that repeats one
    call over the same cache finds it in L2 when it fits (up to ~50 MB on H100) and times those points below
    what HBM allows.  Peak, not sustained, bandwidth: the bound never overrides a measurement made from HBM."""
    return jnp.maximum(table_us * p.attn_decode_scale, fixed_us + kv_bytes * (1e6 / hw.hbm_bytes_per_s))


def attn_decode_us(table: AttnTable, c, kv_scale, n_req, total_keys, p: Params):
    """Decode attention time (µs) of the benchmarked kernel, with the fitted scale (the step model also
    applies `decode_cold_us`)."""
    return attn_decode_table_us(table, c, kv_scale, n_req, total_keys) * p.attn_decode_scale


def attn_prefill_table_us(table: AttnTable, c, len_scale, n_req, total_pairs):
    """Causal prefill attention of ``n_req`` chunks with ``total_pairs`` query-key pairs per head, table
    time (µs), on head layout ``c`` of ``table`` (see `prefill_table_us`)."""
    return prefill_table_us(attn_on(table, c), len_scale, n_req, total_pairs)


def prefill_table_us(attn, len_scale, n_req, total_pairs):
    """Causal prefill attention of ``n_req`` chunks with ``total_pairs`` query-key pairs per head (µs), from
    a table function ``attn`` (`attn_on`) whose sequence lengths are scaled by ``len_scale``: each chunk is
    priced as the uncached sequence with the same mean number of pairs.  Below the grid the time falls in
    proportion to the length, down to the kernel floor applied by the caller."""
    t = attn(*prefill_query(n_req, total_pairs, len_scale), PREFILL_SLOPE_HI, PREFILL_SLOPE_LO)
    return jnp.where(n_req > 0, t, 0.0)


def prefill_query(n_req, total_pairs, len_scale):
    """Where a prefill call reads its table: (chunks, the uncached sequence length with the chunks' mean
    query-key pairs, scaled to the layout)."""
    n = jnp.maximum(n_req, 1.0)
    return n, jnp.sqrt(2.0 * jnp.maximum(total_pairs / n, 0.5)) * len_scale


def attn_prefill_us(table: AttnTable, c, len_scale, n_req, total_pairs, p: Params):
    """Prefill attention time (µs) with the fitted scale."""
    return attn_prefill_table_us(table, c, len_scale, n_req, total_pairs) * p.attn_prefill_scale


def attn_prefill_call_us(prefill: AttnTable, c, len_scale, decode: AttnTable, c_dec, n_req, total_pairs,
                         p: Params):
    """One prefill attention call on its own (µs): the prefill table time, never below the attention
    kernel's fixed cost (the decode table's floor for the same heads), as in the step model."""
    return jnp.maximum(attn_prefill_us(prefill, c, len_scale, n_req, total_pairs, p),
                       attn_floor_us(decode, c_dec) * p.attn_decode_scale)


def allreduce_table_us(comm: CommTable | None, tp, nbytes):
    """Measured all-reduce time (µs) of ``nbytes`` over ``tp`` GPUs; 0 without a table or for tp = 1."""
    if comm is None:
        return jnp.zeros_like(jnp.asarray(nbytes, jnp.float32))
    return jnp.where(tp > 1.0, comm_table_us(comm, jnp.maximum(tp, 2.0), nbytes), 0.0)


def allreduce_combine(table_us, has_table: bool, tp, nbytes, hw: Hardware, p: Params):
    """One all-reduce (µs): the measured table time when there is one, otherwise ring-algorithm bytes
    2·(tp-1)/tp · nbytes at the NVLink bandwidth times its efficiency plus a fixed latency; times
    ``comm_scale``.  0 for tp = 1."""
    if has_table:
        t = table_us
    else:
        t = p.allreduce_latency_us + 2.0 * (tp - 1.0) / tp * nbytes / (
            hw.nvlink_bytes_per_s * p.nvlink_efficiency) * 1e6
    return jnp.where(tp > 1.0, t * p.comm_scale, 0.0)


def pp_handoff_us(nbytes, tp, hw: Hardware, p: Params):
    """One pipeline-stage hand-off (µs) of ``nbytes`` per GPU (`ops.pp_handoff_bytes`): a point-to-point send
    at the NVLink bandwidth times its efficiency plus the all-reduce's fixed latency, then the receiving TP
    group's all-gather of the tp shards ((tp - 1) x ``nbytes`` per GPU); times ``comm_scale``.  Analytic: no
    measured point-to-point table ships, and stages are taken to sit in one NVLink domain."""
    link = hw.nvlink_bytes_per_s * p.nvlink_efficiency
    t = p.allreduce_latency_us + nbytes / link * 1e6
    gather = jnp.where(tp > 1.0, p.allreduce_latency_us + (tp - 1.0) * nbytes / link * 1e6, 0.0)
    return (t + gather) * p.comm_scale


def allreduce_us(comm: CommTable | None, tp, nbytes, hw: Hardware, p: Params):
    """One all-reduce of ``nbytes`` per GPU over ``tp`` GPUs (µs); see `allreduce_combine`."""
    return allreduce_combine(allreduce_table_us(comm, tp, nbytes), comm is not None, tp, nbytes, hw, p)


class MoeCurve(NamedTuple):
    """The fused-MoE call of one model's routed experts (one layer, one GPU, at one layout and precision),
    measured over the tokens entering the layer: log tokens [T] and log µs [T]."""

    log_tokens: jnp.ndarray
    log_us: jnp.ndarray


MOE_SLOPE_HI = 1.0  # beyond the largest measured token count the experts are compute-bound: time ∝ tokens


def moe_table_us(curve: MoeCurve, tokens):
    """The routed experts of one layer at ``tokens`` tokens (µs): monotone in tokens, held below the first
    measured count, proportional to tokens beyond the last."""
    return jnp.exp(interp_work_axis(jnp.log(jnp.maximum(tokens, 1.0)), curve.log_tokens, curve.log_us, MOE_SLOPE_HI))


def mla_decode_us(attn, floor_us, n_req, total_keys):
    """One layer's MLA module for ``n_req`` decodes attending ``total_keys`` keys in all (µs), from a table
    function ``attn`` (`attn_on` of an MLA table, `tables.mla_table`): the measured module at batch n_req
    and the mean kv length (each decode's cached tokens + itself), as `decode_table_us` reads a decode
    table (interpolated over batch sizes, never below the module's smallest measured time ``floor_us``)."""
    return decode_table_us(attn, floor_us, 1.0, n_req, total_keys)


def mla_prefill_us(attn, n_req, prefill_tokens):
    """One layer's MLA module for ``n_req`` prefill chunks of ``prefill_tokens`` new tokens in all (µs): the
    measured module at batch n_req and the chunks' mean new tokens as seq_len (the table's uncached prefill).
    The projections see exactly the step's tokens; attention over a chunk's cached prefix is not counted."""
    n = jnp.maximum(n_req, 1.0)
    t = attn(n, jnp.maximum(prefill_tokens / n, 1.0), PREFILL_SLOPE_HI, PREFILL_SLOPE_LO)
    return jnp.where(n_req > 0, t, 0.0)


def mla_layer_us(decode_us, prefill_us, decode_floor_us, prefill_floor_us):
    """One layer's MLA time (µs) in a step with both decodes and prefill chunks (either may be 0): their module
    times added, with the smaller of the two modules' fixed costs (each table's smallest time) counted once
    when both run (vLLM runs the projections once for all tokens and splits only the attention)."""
    both = (decode_us > 0) & (prefill_us > 0)
    return decode_us + prefill_us - jnp.where(both, jnp.minimum(decode_floor_us, prefill_floor_us), 0.0)
