"""Time of one vLLM V1 engine step: a mixed batch of chunked prefills and decodes in one forward pass.

A step is a fixed-shape pytree (`Step`): per-request arrays padded to a bucket size with a 0/1 mask, so the
same jitted function evaluates any batch, `jax.vmap` maps it over many steps, and `jax.grad` differentiates
it with respect to the residual parameters, the table values and the (continuous) token counts.

Composition per step (all times in µs):
* GEMMs (QKV, O, gate/up, down) at M = all tokens of the step, per layer;
* attention: prefill chunks and decodes are one varlen kernel per layer in vLLM's FlashAttention backend;
  each part is priced from its table and, when both are present, the smaller fixed cost is counted once;
* bandwidth-bound kernels per layer (RMSNorm x2, RoPE, KV-cache write, activation, Qwen3 q/k norm);
* two TP all-reduces per layer plus one after the vocab-parallel embedding; under attention data
  parallelism, the MoE layers' dispatch and combine over the expert group; under pipeline parallelism,
  pp - 1 hand-offs of the activations between stages (a step is one batch's pass through every stage);
* multi-head latent attention (DeepSeek-V3, Kimi-K2.5): one layer's MLA block from the measured MLA module
  tables in place of the attention projections and kernels (`MLA_PART`);
* embedding, final norm, lm_head and sampling for the requests that emit a token;
* overheads: per step, per layer, per request.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import kernel_time as kt
from .compiled import jit, once
from . import memory, ops
from .errors import InputError
from .hardware import GPU
from .model import DTYPE_BYTES, ModelConfig
from .params import Params
from .interp import suffix_min
from .tables import (DECODE_SLOPE_HI, PREFILL_SLOPE_HI, AttnTable, CommTable, GemmTable, Tables, attn_table_name,
                     bracket, f32_array, fold_batch, gemm_table_us, load_moe, mla_tables_of, moe_curve, moe_shapes,
                     nearest_layout)

BREAKDOWN = ("gemm", "attn_prefill", "attn_decode", "memory_ops", "communication", "lm_head_sampling",
             "overhead")
MOE_PART = "moe"  # the breakdown's extra part for mixture-of-experts models (router, routed and shared experts)
# The expert-load distribution of DeepSeek-style (MLA) models' fused-MoE curves: the one AIConfigurator
# queries for DeepSeek and Kimi (bench_data/README.md "Fused MoE"); other models take `moe_curve`'s default.
MLA_MOE_DISTRIBUTION = "power_law_1.01"
MLA_PART = "mla"  # the breakdown's extra part for MLA models (the MLA module tables; attention parts are 0)
# The kernel vLLM runs per-tensor and per-channel fp8 experts with (compressed-tensors checkpoints, its own
# --quantization fp8) unless told otherwise (VLLM_USE_FLASHINFER_MOE_FP8): its Triton fused MoE.  Where a GPU's
# table measured fp8 experts only with another kernel (Hopper: FlashInfer's CUTLASS, ModelOpt checkpoints'
# path), the Triton curve measured with 128x128 block scales prices them (`moe_curve_of`, docs/model.md).
FP8_EXPERTS_KERNEL = "triton"


class Step(NamedTuple):
    """One engine step, padded: prefilling requests compute ``prefill_new`` tokens after
    ``prefill_cached``; decoding requests have ``decode_ctx`` tokens cached before the step."""

    prefill_new: jax.Array  # [P] tokens
    prefill_cached: jax.Array  # [P] tokens
    prefill_mask: jax.Array  # [P] 1 for a real request, 0 for padding
    decode_ctx: jax.Array  # [D] tokens
    decode_mask: jax.Array  # [D]


class Batch(NamedTuple):
    """A batch as the step model prices it, summarized exactly: GEMMs read token counts, decode attention
    the batch size and the keys attended in all, prefill attention the number of chunks and the query-key
    pairs the kernel computes in all.  This is the one interface between "a batch" and "its time"
    (`summarize` builds it from a padded `Step`; `decode_keys_of_means` and `prefill_of_means` from
    per-request means)."""

    n_decode: jax.Array  # decoding requests
    decode_keys: jax.Array  # keys the decodes attend in all (`ops.decode_keys` summed)
    n_prefill: jax.Array  # prefill chunks
    prefill_tokens: jax.Array  # new tokens of the prefill chunks in all
    prefill_pairs: jax.Array  # query-key pairs per head in all (`ops.prefill_pairs_tiled` summed)

    @property
    def tokens(self):
        """Tokens computed this step: prefill new tokens + one per decode."""
        return self.prefill_tokens + self.n_decode

    @property
    def sampled(self):
        """Requests whose last position goes through lm_head and the sampler."""
        return self.n_prefill + self.n_decode


def summarize(d: ops.Dims, step: Step) -> Batch:
    """The `Batch` of one padded step."""
    new = step.prefill_new * step.prefill_mask
    return Batch(n_decode=jnp.sum(step.decode_mask),
                 decode_keys=jnp.sum(ops.decode_keys(d, step.decode_ctx) * step.decode_mask),
                 n_prefill=jnp.sum(step.prefill_mask), prefill_tokens=jnp.sum(new),
                 prefill_pairs=jnp.sum(ops.prefill_pairs_tiled(d, new, step.prefill_cached) * step.prefill_mask))


def decode_keys_of_means(d: ops.Dims, n_decode, decode_ctx):
    """`Batch.decode_keys` of ``n_decode`` decodes with ``decode_ctx`` cached tokens each."""
    return n_decode * ops.decode_keys(d, decode_ctx)


def prefill_of_means(d: ops.Dims, n_prefill, prefill_new, prefill_cached):
    """`Batch.prefill_tokens` and `Batch.prefill_pairs` of ``n_prefill`` chunks of ``prefill_new`` tokens
    after ``prefill_cached`` cached tokens each."""
    return n_prefill * prefill_new, n_prefill * ops.prefill_pairs_tiled(d, prefill_new, prefill_cached)


class Arrays(NamedTuple):
    """The table arrays one step evaluation reads (a pytree: differentiable)."""

    gemm: GemmTable
    decode: AttnTable
    prefill: AttnTable
    comm: CommTable | None
    moe: kt.MoeCurve | None = None  # the routed experts' fused-MoE call (mixture-of-experts models)
    mla_decode: AttnTable | None = None  # MLA module tables of the model's heads per GPU (one layout, c = 0)
    mla_prefill: AttnTable | None = None


class ModelOnGPU(NamedTuple):
    """One model on one GPU at one TP degree, as numbers (a pytree: may vary across sweeps): the per-GPU
    shapes, the GPU's rates, and which attention-table head layouts price the model's heads."""

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
    moe: bool = False  # mixture-of-experts layers (router GEMM and the fused-MoE call)
    shared_experts: bool = False  # their shared experts (two more GEMMs)
    mixed_attention: bool = False  # sliding-window and full-attention layers (`ops.Dims.sliding_layers`)
    mla: bool = False  # multi-head latent attention priced from the MLA module tables
    pipeline: bool = False  # pipeline stages (pp > 1): the activation hand-offs between them


@dataclass
class Setup:
    """Everything needed to evaluate steps of one model on one GPU at one TP degree."""

    model: ModelConfig
    gpu: GPU
    tp: int
    arrays: Arrays
    on_gpu: ModelOnGPU
    static: Static
    gemm_table_dtype: str
    moe_ep: int = 1
    attention_dp: int = 1
    kv_tables: str = "bf16"  # the attention tables' KV-cache rows read (`kv_table_set`): "bf16" or "fp8"
    pp: int = 1


def setup(model: ModelConfig, tables: Tables, tp: int, moe_ep: int = 1, *, attention_dp: int = 1,
          kv_cache_dtype: str = "auto", pp: int = 1, sampling: dict | None = None) -> Setup:
    """Bind a model, a GPU's tables and a TP degree (and, for a mixture-of-experts model, its expert
    parallelism ``moe_ep`` inside the expert group of tp x ``attention_dp`` GPUs: vLLM's
    ``--data-parallel-size attention_dp --enable-expert-parallel`` is ``moe_ep = tp x attention_dp``); pick
    the GEMM table, attention head layouts (MLA module tables for an MLA model) and fused-MoE curve.  The
    step priced is one attention rank's, every rank taken to run the same batch.

    ``kv_cache_dtype`` is vLLM's ``--kv-cache-dtype``: "auto" (the model's bf16/fp16), "bf16", "fp16" or
    "fp8".  An FP8 KV cache reads the attention tables' FP8-KV rows (`attention_tables`) and stores and
    reads the KV cache at 1 byte per element (`ops.Dims.kv_cache_bytes`).

    ``pp`` pipeline stages (``--pipeline-parallel-size``): the step is one batch's pass through all of them,
    every layer at ``tp`` plus pp - 1 activation hand-offs (`ops.pp_handoff_bytes`).

    ``sampling``: the requests' sampling parameters over the model's generation-config defaults
    (`sampling.merged`), which pick the sampler's filter (`ops.sampler_filter`)."""
    kv = kv_table_set(kv_cache_dtype)
    fb, fk = ops.sampler_filter(model.sampler_filter(sampling))
    d = ops.dims(model, tp, moe_ep, attention_dp, pp)._replace(
        kv_cache_bytes=float(memory.kv_element_bytes(kv_cache_dtype)), filter_bytes=fb, filter_kernels=fk)
    g = kt.choose_gemm_table(tables, model.dtype)
    (dec, dec_heads), (pre, pre_heads) = attention_tables(tables, kv, d, model) if not model.mla else \
        ((tables.decode, tables.decode_heads), (tables.prefill, tables.prefill_heads))
    dc, ds = nearest_layout(dec_heads, d.q_heads, d.kv_heads, d.head_dim, "decode")
    pc, ps = nearest_layout(pre_heads, d.q_heads, d.kv_heads, d.head_dim, "prefill")
    on_gpu = ModelOnGPU(d, g.hw, jnp.int32(dc), jnp.float32(ds), jnp.int32(pc), jnp.float32(ps))
    mla = mla_tables_of(tables.gpu.name, model.num_heads // tp, kv, model.mla_gemm_dtype) if model.mla else (None, None)
    moe = moe_curve_of(model, tables, tp, moe_ep, attention_dp) if model.experts else None
    arrays = Arrays(tables.gemm[g.table_dtype], dec, pre, tables.allreduce, moe, *mla)
    static = Static(g.same_dtype, float(DTYPE_BYTES[g.table_dtype]), g.compute_ratio, tables.allreduce is not None,
                    moe=bool(model.experts), shared_experts=bool(model.shared_intermediate),
                    mixed_attention=bool(d.sliding_layers), mla=model.mla, pipeline=pp > 1)
    return Setup(model, tables.gpu, tp, arrays, on_gpu, static, g.table_dtype, moe_ep, attention_dp, kv, pp)


def kv_table_set(kv_cache_dtype: str) -> str:
    """Which rows of the attention tables a KV-cache dtype reads (`tables.KV_ROWS`): "bf16" (auto, bf16,
    fp16: the bf16/fp16 tables) or "fp8" (vLLM's fp8 names); InputError for a name vLLM does not have."""
    return "fp8" if memory.kv_element_bytes(kv_cache_dtype) == 1 else "bf16"


def attention_tables(tables: Tables, kv: str, d: ops.Dims, model: ModelConfig):
    """((decode table, its head layouts), (prefill table, its head layouts)) of KV-cache rows ``kv``.  An FP8
    KV cache needs the fp8 rows of the very layouts the bf16 tables price the model's heads with; where the
    GPU's tables lack them, InputError (field ``kv_cache_dtype``) naming the GPU and layout."""
    out = []
    for kind in ("decode", "prefill"):
        name = attn_table_name(kind, kv)
        table, heads = getattr(tables, name), getattr(tables, f"{name}_heads")
        if kv != "bf16":
            want = getattr(tables, f"{kind}_heads")
            lay = want[nearest_layout(want, d.q_heads, d.kv_heads, d.head_dim, kind)[0]] if want else None
            if table is None or lay not in heads:
                what = f"head layout {'-'.join(map(str, lay))}" if lay else "any head layout"
                raise InputError(f"the {kind} attention tables of {tables.gpu.name} have no {kv} KV-cache rows for "
                                 f"{what} (per-GPU q-kv-head_dim, the layout that prices {model.name} at "
                                 f"tp={int(d.tp)}), so an {kv} KV cache cannot be priced there", field="kv_cache_dtype")
        out.append((table, heads))
    return out[0], out[1]


def moe_curve_of(model: ModelConfig, tables: Tables, tp: int, moe_ep: int, attention_dp: int = 1) -> kt.MoeCurve:
    """The measured fused-MoE curve of ``model``'s experts on ``tables``' GPU at this layout (the expert
    matrices split ``tp x attention_dp / moe_ep`` ways, the experts ``moe_ep`` ways), with measured times above a time
    measured for more tokens lowered to it (`interp.suffix_min`, the tables' policy), at the expert load
    `tables.moe_curve` prefers (`tables.MOE_DISTRIBUTION_PREFERENCE`).  A shape, precision or
    layout the GPU's MoE table did not measure is refused, naming what it has."""
    df = load_moe(tables.gpu.name)
    where = f"MoE table of {tables.gpu.name}"
    if df is None:
        raise InputError(f"{where}: none ships with costmodel, so the experts of {model.name} cannot be priced",
                         field="gpu")
    dtype = "bf16" if model.expert_dtype == "fp16" else model.expert_dtype
    shape = (model.hidden_size, model.moe_intermediate, model.experts, model.top_k)
    moe_tp = tp * attention_dp // moe_ep
    dist = MLA_MOE_DISTRIBUTION if model.mla else None
    got = None
    if dtype == "fp8":  # vLLM's own fp8 experts kernel is Triton (`FP8_EXPERTS_KERNEL`)
        got = moe_curve(df[df["kernel"] == FP8_EXPERTS_KERNEL], "fp8", *shape, moe_tp, moe_ep, dist) or \
            moe_curve(df[df["kernel"] == FP8_EXPERTS_KERNEL], "fp8_block", *shape, moe_tp, moe_ep, dist)
    got = got or moe_curve(df, dtype, *shape, moe_tp, moe_ep, dist)
    if got is None:
        s = moe_shapes(df, dtype)
        s = s[(s.hidden_size == shape[0]) & (s.inter_size == shape[1]) & (s.num_experts == shape[2])
              & (s.topk == shape[3])]
        have = [f"moe_tp={a} moe_ep={b}" for a, b in sorted(set(zip(s.moe_tp, s.moe_ep)))]
        raise InputError(
            f"{where} has no {dtype} curve for {model.name}'s experts (hidden {shape[0]}, expert intermediate "
            f"{shape[1]}, {shape[2]} experts, top-{shape[3]}) at moe_tp={moe_tp}, moe_ep={moe_ep}; measured: "
            f"{', '.join(have) if have else 'none for this shape'}", field="moe_ep" if have else "model")
    tokens, us = (np.asarray(a, np.float64) for a in got)
    us = suffix_min(us[None, :], (1,))[0]
    return kt.MoeCurve(f32_array(np.log(tokens)), f32_array(np.log(us)))


def _nodes(grid, x) -> np.ndarray:
    """Grid nodes `tables.bracket` (clamped to the ends) gives a nonzero weight for each query: [2, Q] node
    indices, -1 for none.  ``grid`` and ``x`` are log-scaled."""
    x = np.atleast_1d(np.asarray(x, np.float32))
    i, w = bracket(np.asarray(grid), x, np)  # i [2, Q] (or [2] for a one-node grid), w [Q]
    i = np.broadcast_to(np.asarray(i).reshape(2, -1), (2, x.shape[0]))
    w = np.broadcast_to(np.asarray(w), (x.shape[0],))
    return np.stack([np.where(w < 1.0, i[0], -1), np.where(w > 0.0, i[1], -1)])


def _cells(*axes) -> set:
    """Grid cells of per-query node pairs on several axes (each [2, Q] from `_nodes`, or an int for a fixed
    index): the set of index tuples with no missing node."""
    cols = [np.full((1, 1), a) if isinstance(a, (int, np.integer)) else a for a in axes]
    if any(c.shape[1] == 0 for c in cols):
        return set()
    q = max(c.shape[1] for c in cols)
    out = set()
    for choice in np.ndindex(*(c.shape[0] for c in cols)):
        idx = np.stack([np.broadcast_to(c[k], (q,)) for c, k in zip(cols, choice)], axis=1)
        idx = idx[(idx >= 0).all(axis=1)]
        out |= set(map(tuple, np.unique(idx, axis=0).tolist()))
    return out


def cells_read(su: Setup, f: Features) -> dict[str, set]:
    """The measured-grid cells that the table lookups of steps with features ``f`` (a leading steps axis)
    bracket, by table name as in `tables.Adjustment` ("gemm/<dtype>", "decode", "prefill", "allreduce"):
    the grid nodes on either side of each lookup on every axis (a node hit exactly alone; the end node off
    the grid), plus the first cell of the decode layout (the attention kernel's fixed cost).  The
    coordinates are those of `TableLookup`: `kernel_time.decode_table_us`, `prefill_table_us` and
    `tables.attn_table_us`."""
    d, on, a = su.on_gpu.dims, su.on_gpu, su.arrays
    f = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), f)
    out: dict[str, set] = {}
    g = a.gemm
    gemm = out.setdefault(f"gemm/{su.gemm_table_dtype}", set())
    for x in step_gemms(d, Batch(f.n_decode, f.decode_keys, f.n_prefill, f.tokens - f.n_decode, f.prefill_pairs),
                        su.static):
        m = np.log(np.unique(np.maximum(x.m, 1.0)))
        gemm |= _cells(_nodes(g.log_k, np.log(float(x.k))), _nodes(g.log_n, np.log(float(x.n))), _nodes(g.log_m, m))
    keys, pairs = ([], []) if su.static.mla else ([f.decode_keys], [f.prefill_pairs])  # MLA: module tables
    if su.static.mixed_attention:  # the sliding layers read the same tables at their own keys and pairs
        keys.append(np.asarray(ops.sliding_decode_keys(d, f.n_decode, f.decode_keys), np.float64))
        pairs.append(np.asarray(ops.sliding_prefill_pairs(d, f.tokens - f.n_decode, f.prefill_pairs), np.float64))
    for kind, table, c, n, totals, query, slope in (
            ("decode", a.decode, int(on.decode_layout), f.n_decode, keys,
             lambda t: kt.decode_query(f.n_decode, t, on.decode_kv_scale), DECODE_SLOPE_HI),
            ("prefill", a.prefill, int(on.prefill_layout), f.n_prefill, pairs,
             lambda t: kt.prefill_query(f.n_prefill, t, on.prefill_len_scale), PREFILL_SLOPE_HI)):
        sel = n > 0
        name = attn_table_name(kind, su.kv_tables)
        out[name] = set()
        for total in totals:
            batch, length = (np.asarray(v, np.float32) for v in query(total))
            bb, length = fold_batch(batch[sel], np.exp(np.asarray(table.log_b[-1])), length[sel], slope, np)
            out[name] |= _cells(c, _nodes(table.log_len, np.log(length)), _nodes(table.log_b, np.log(bb)))
    if not su.static.mla:  # the attention kernel's fixed cost (MLA models read the MLA module tables instead)
        out[attn_table_name("decode", su.kv_tables)].add((int(on.decode_layout), 0, 0))
    if a.comm is not None and su.tp > 1:
        msg = np.unique(np.concatenate([f.comm_bytes, np.maximum(f.gather_bytes, 1.0)]))
        out["allreduce"] = _cells(_nodes(a.comm.log_gpus, np.log(su.tp)), _nodes(a.comm.log_bytes, np.log(msg)))
    return out


def step_gemms(d: ops.Dims, batch: Batch, static: Static | None = None) -> list[ops.Gemm]:
    """The GEMMs of a step: qkv, o, gate_up, down (per layer, M = tokens), lm_head (M = sampled), and for a
    mixture-of-experts model (``static.moe``) the router and shared-expert GEMMs of `ops.moe_gemms`.  An MLA
    model (``static.mla``) has `ops.mla_gemms` (the down-projection, gate_up, down) in place of the first
    four: `attention_gemm_count` says how many of the list are attention projections."""
    layer = ops.mla_gemms(d, batch.tokens) if static is not None and static.mla else ops.layer_gemms(d, batch.tokens)
    out = list(layer.values()) + [ops.lm_head_gemm(d, batch.sampled)]
    if static is not None and static.moe:
        out += list(ops.moe_gemms(d, batch.tokens, static.shared_experts).values())
    return out


class TableLookup(NamedTuple):
    """The table times a step needs, for one `ModelOnGPU`, interpolated from the table arrays at each call
    (differentiable in the table values).  `fastlookup.FastLookup` is the same lookup specialised to fixed
    shapes; both provide the methods below."""

    arrays: Arrays
    on: ModelOnGPU

    def gemm_us(self, gemms: list[ops.Gemm]) -> list:
        """Table time (µs) of each of `step_gemms`."""
        return [gemm_table_us(self.arrays.gemm, g.m, g.k, g.n) for g in gemms]

    def attn_decode_us(self, n_req, total_keys):
        return kt.attn_decode_table_us(self.arrays.decode, self.on.decode_layout, self.on.decode_kv_scale,
                                       n_req, total_keys)

    def attn_prefill_us(self, n_req, total_pairs):
        return kt.attn_prefill_table_us(self.arrays.prefill, self.on.prefill_layout, self.on.prefill_len_scale,
                                        n_req, total_pairs)

    def attn_floor_us(self):
        return kt.attn_floor_us(self.arrays.decode, self.on.decode_layout)

    def moe_us(self, tokens):
        """The routed experts' fused-MoE call of one layer when each attention rank computes ``tokens``
        tokens, table time (µs): the curve read at `ops.moe_tokens`."""
        return kt.moe_table_us(self.arrays.moe, ops.moe_tokens(self.on.dims, tokens))

    def ep_exchange_us(self, tokens):
        """One MoE layer's dispatch and combine under attention data parallelism (`ops.ep_exchange_message`)
        over the tp x attention_dp GPUs, table time (µs; 0 at attention_dp 1 or without a table)."""
        d = self.on.dims
        return jnp.where(d.attention_dp > 1.0, kt.allreduce_table_us(
            self.arrays.comm, d.tp * d.attention_dp, jnp.maximum(ops.ep_exchange_message(d, tokens), 1.0)), 0.0)

    def mla_us(self, batch: Batch):
        """One layer's MLA module tables, table time (µs): (decode, prefill, decode floor, prefill floor)."""
        dec, pre = self.arrays.mla_decode, self.arrays.mla_prefill
        dec_floor, pre_floor = kt.attn_floor_us(dec, 0), kt.attn_floor_us(pre, 0)
        return (kt.mla_decode_us(kt.attn_on(dec, 0), dec_floor, batch.n_decode, batch.decode_keys),
                kt.mla_prefill_us(kt.attn_on(pre, 0), batch.n_prefill, batch.prefill_tokens), dec_floor, pre_floor)

    def layer_allreduce_us(self, tokens):
        """One all-reduce of the hidden states of ``tokens`` tokens over the TP group, table time (µs; 0
        without a table or at TP 1)."""
        return kt.allreduce_table_us(self.arrays.comm, self.on.dims.tp, ops.allreduce_bytes(self.on.dims, tokens))

    def logits_gather_us(self, sampled):
        """The logits all-gather for ``sampled`` requests, table time (µs; `ops.logits_gather_message`)."""
        d = self.on.dims
        return kt.allreduce_table_us(self.arrays.comm, d.tp, jnp.maximum(ops.logits_gather_message(d, sampled), 1.0))


class Features(NamedTuple):
    """Parameter-free quantities of one step (counts, table times in µs, FLOPs, bytes).  A step's time is
    `combine(features(step), params)`: fitting evaluates `features` once and `combine` per iteration."""

    tokens: jax.Array  # tokens computed this step (prefill new + one per decode)
    n_prefill: jax.Array
    n_decode: jax.Array
    gemm: kt.GemmFeatures  # [5]: qkv, o, gate_up, down (per layer), lm_head (+ `ops.moe_gemms` for MoE models)
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
    decode_keys: jax.Array  # `Batch.decode_keys` (where the decode table is read: `cells_read`)
    prefill_pairs: jax.Array  # `Batch.prefill_pairs`
    moe_us: jax.Array  # the routed experts' fused-MoE call per MoE layer, table time (0 for a dense model)
    # a sliding-window layer of a model that mixes layer kinds (`Static.mixed_attention`; else 0): the same
    # kernels at the keys and pairs the window leaves (`ops.sliding_decode_keys`, `ops.sliding_prefill_pairs`)
    sliding_prefill_us: jax.Array  # prefill attention table time per sliding layer
    sliding_decode_us: jax.Array  # decode attention table time per sliding layer
    sliding_kv_bytes: jax.Array  # KV-cache bytes the decodes read per sliding layer
    # MLA models (`Static.mla`; else 0): one layer's MLA module, table times, and the tables' smallest times
    mla_decode_us: jax.Array = 0.0
    mla_prefill_us: jax.Array = 0.0
    mla_decode_floor_us: jax.Array = 0.0
    mla_prefill_floor_us: jax.Array = 0.0
    # attention data parallelism: one MoE layer's dispatch + combine (`ops.ep_exchange_message`)
    ep_table_us: jax.Array = 0.0  # from the all-reduce table (0 without one or at attention_dp 1)
    ep_bytes: jax.Array = 0.0  # its all-reduce-equivalent message


def batch_features(lookup, on: ModelOnGPU, batch: Batch, static: Static) -> Features:
    """The features of a summarized batch, its table times read through ``lookup`` (`TableLookup` or
    `fastlookup.FastLookup`)."""
    d, hw = on.dims, on.hw
    tokens, sampled = batch.tokens, batch.sampled
    gl = step_gemms(d, batch, static)
    # A Python loop, not a nested vmap: XLA:CPU (jax 0.10.2) returned wrong table values for a vmap over
    # the five GEMMs inside a vmap over more than ~6500 steps (tests/test_step_batching.py guards this).
    per = [kt.gemm_features(t, g, d.weight_bytes, static.table_weight_bytes, hw)
           for t, g in zip(lookup.gemm_us(gl), gl)]
    gf = kt.GemmFeatures(*(jnp.stack([jnp.asarray(getattr(p_, f), jnp.float32) for p_ in per])
                           for f in kt.GemmFeatures._fields))
    msg = ops.allreduce_bytes(d, tokens)
    gather = ops.logits_gather_message(d, sampled)
    zero = jnp.zeros_like(jnp.asarray(tokens, jnp.float32))
    if static.mla:  # the MLA module tables replace the attention kernels (and the projections but one)
        mla = dict(zip(("mla_decode_us", "mla_prefill_us", "mla_decode_floor_us", "mla_prefill_floor_us"),
                       lookup.mla_us(batch)))
        attn = dict(attn_prefill_us=zero, attn_decode_us=zero, attn_floor_us=zero, kv_bytes=zero)
    else:
        mla = dict.fromkeys(("mla_decode_us", "mla_prefill_us", "mla_decode_floor_us", "mla_prefill_floor_us"), zero)
        attn = dict(attn_prefill_us=lookup.attn_prefill_us(batch.n_prefill, batch.prefill_pairs),
                    attn_decode_us=lookup.attn_decode_us(batch.n_decode, batch.decode_keys),
                    attn_floor_us=lookup.attn_floor_us(), kv_bytes=ops.kv_read_bytes(d, batch.decode_keys))
    ep = dict(ep_table_us=lookup.ep_exchange_us(tokens), ep_bytes=ops.ep_exchange_message(d, tokens)) \
        if static.moe else dict(ep_table_us=zero, ep_bytes=zero)
    if static.mixed_attention:
        s_keys = ops.sliding_decode_keys(d, batch.n_decode, batch.decode_keys)
        s_pairs = ops.sliding_prefill_pairs(d, batch.prefill_tokens, batch.prefill_pairs)
        sliding = dict(sliding_prefill_us=lookup.attn_prefill_us(batch.n_prefill, s_pairs),
                       sliding_decode_us=lookup.attn_decode_us(batch.n_decode, s_keys),
                       sliding_kv_bytes=ops.kv_read_bytes(d, s_keys))
    else:
        sliding = dict(sliding_prefill_us=zero, sliding_decode_us=zero, sliding_kv_bytes=zero)
    return Features(
        tokens=tokens, n_prefill=batch.n_prefill, n_decode=batch.n_decode, gemm=gf, **attn,
        memory_bytes=ops.memory_ops_total_bytes(d, tokens),
        head_bytes=ops.embedding_bytes(d, tokens) + ops.sampling_bytes(d, sampled),
        comm_table_us=lookup.layer_allreduce_us(tokens), comm_bytes=msg,
        gather_table_us=lookup.logits_gather_us(sampled), gather_bytes=gather,
        decode_keys=batch.decode_keys, prefill_pairs=batch.prefill_pairs,
        moe_us=lookup.moe_us(tokens) if static.moe else zero, **sliding, **mla, **ep)


def features(arrays: Arrays, on: ModelOnGPU, step: Step, static: Static) -> Features:
    """The features of one padded step, from the table arrays."""
    return batch_features(TableLookup(arrays, on), on, summarize(on.dims, step), static)


def combine(f: Features, on: ModelOnGPU, params: Params, static: Static):
    """Step time (µs) and breakdown from the step's features and the residual parameters."""
    d, hw, p = on.dims, on.hw, params
    g = kt.gemm_combine(f.gemm, hw, p, static.gemm_same_dtype, static.compute_ratio)  # [5] (+ MoE GEMMs)
    has_pre, has_dec = f.n_prefill > 0, f.n_decode > 0
    # One varlen kernel per layer serves prefills and decodes.  Its fixed cost in the engine is the decode
    # table's floor (smallest time) times attn_fixed_scale.  Decode-only: t_dec (`kt.decode_cold_us`).
    # Prefill-only: the fixed cost + what the prefill table adds above its floor.  Both: t_dec + that.
    floor = f.attn_floor_us * p.attn_decode_scale
    fixed = f.attn_floor_us * p.attn_fixed_scale

    def attention(decode_us, kv_bytes, prefill_us):  # one layer's decode and prefill parts (µs)
        t_dec = jnp.where(has_dec, kt.decode_cold_us(decode_us, fixed, kv_bytes, hw, p),
                          jnp.where(has_pre, fixed, 0.0))
        return t_dec, jnp.where(has_pre, jnp.maximum(prefill_us * p.attn_prefill_scale - floor, 0.0), 0.0)

    t_dec, t_pre = attention(f.attn_decode_us, f.kv_bytes, f.attn_prefill_us)
    if static.mla:  # the MLA module tables (`MLA_PART`)
        attn_pre = attn_dec = jnp.zeros_like(t_dec)
    elif static.mixed_attention:  # full layers at the batch's keys and pairs, sliding layers within the window
        s_dec, s_pre = attention(f.sliding_decode_us, f.sliding_kv_bytes, f.sliding_prefill_us)
        attn_pre = d.full_layers * t_pre + d.sliding_layers * s_pre
        attn_dec = d.full_layers * t_dec + d.sliding_layers * s_dec
    else:
        attn_pre, attn_dec = d.layers * t_pre, d.layers * t_dec
    memory = kt.memory_us(f.memory_bytes, hw, p) + ops.memory_kernels_per_layer(d) * p.kernel_floor_us
    comm = kt.allreduce_combine(f.comm_table_us, static.has_comm_table, d.tp, f.comm_bytes, hw, p)
    gather = kt.allreduce_combine(f.gather_table_us, static.has_comm_table, d.tp, f.gather_bytes, hw, p)
    per_layer = p.layer_overhead_us + jnp.where(has_pre, p.prefill_layer_overhead_us, 0.0)
    overhead = p.step_overhead_us + p.request_overhead_us * (f.n_prefill + f.n_decode) + per_layer * d.layers
    na = attention_gemm_count(static)  # g: attention projections, gate_up, down, lm_head, MoE GEMMs
    head = g[na + 2] + kt.memory_us(f.head_bytes, hw, p) + (4.0 + d.filter_kernels) * p.kernel_floor_us  # embed, norm, sampler
    parts = {
        "gemm": (d.layers * jnp.sum(g[:4]) if not static.moe  # attention projections; dense MLP layers' own
                 else d.layers * (g[0] if static.mla else g[0] + g[1]) + d.dense_layers * (g[na] + g[na + 1])),
        "attn_prefill": attn_pre,
        "attn_decode": attn_dec,
        "memory_ops": d.layers * memory,
        "communication": (2.0 * d.layers + 1.0) * comm + gather,
        "lm_head_sampling": head,
        "overhead": overhead,
    }
    if static.moe:  # router, routed experts (the fused-MoE call, an engine GEMM like the others), shared experts
        parts["moe"] = d.moe_layers * (f.moe_us * p.gemm_scale + jnp.sum(g[na + 3:], axis=0))
        ep = kt.allreduce_combine(f.ep_table_us, static.has_comm_table, d.tp * d.attention_dp, f.ep_bytes, hw, p)
        parts["communication"] = parts["communication"] + d.moe_layers * jnp.where(d.attention_dp > 1.0, ep, 0.0)
    if static.pipeline:  # pp - 1 hand-offs of the activations between stages
        parts["communication"] = parts["communication"] + (d.pp - 1.0) * kt.pp_handoff_us(
            ops.pp_handoff_bytes(d, f.tokens), d.tp, hw, p)
    if static.mla:  # one layer's MLA module, table time (no fitted scale: no measured MLA step to fit it to)
        parts[MLA_PART] = d.layers * kt.mla_layer_us(f.mla_decode_us, f.mla_prefill_us, f.mla_decode_floor_us,
                                                       f.mla_prefill_floor_us)
    return sum(parts.values()), parts


def attention_gemm_count(static: Static) -> int:
    """How many of `step_gemms` are attention projections: 2 (qkv, o), 1 for MLA (its down-projection)."""
    return 1 if static.mla else 2


def step_time(arrays: Arrays, on: ModelOnGPU, params: Params, step: Step, static: Static):
    """Predicted time of one step (µs) and its breakdown by operator class (dict of µs)."""
    return combine(features(arrays, on, step, static), on, params, static)


@functools.lru_cache(maxsize=None)
def _features_fn(static: Static):
    return jax.jit(jax.vmap(lambda a, on, s: features(a, on, s, static), in_axes=(None, None, 0)))


def pad_steps(steps: Step, n_prefill: int, n_decode: int) -> Step:
    """Widen the padded request axes of a batch of steps to ``n_prefill`` / ``n_decode`` columns."""
    def wide(a, n):
        return jnp.pad(a, ((0, 0), (0, n - a.shape[1])))
    return Step(wide(steps.prefill_new, n_prefill), wide(steps.prefill_cached, n_prefill),
                wide(steps.prefill_mask, n_prefill), wide(steps.decode_ctx, n_decode),
                wide(steps.decode_mask, n_decode))


def batched_features(arrays: Arrays, on: ModelOnGPU, steps: Step, static: Static, n_prefill: int,
                     n_decode: int, chunk: int = 4096) -> Features:
    """`features` of many steps in fixed-size chunks of fixed width, so that every model, TP degree and
    batch of one GPU reuses a single compilation (`compiled.once`: features are computed once per record
    set, so they are compiled for compile time)."""
    steps = pad_steps(steps, n_prefill, n_decode)
    n = steps.prefill_new.shape[0]
    fn = _features_fn(static)
    out = []
    for lo in range(0, n, chunk):
        part = jax.tree_util.tree_map(lambda a: a[lo:lo + chunk], steps)
        short = chunk - part.prefill_new.shape[0]
        if short:  # repeat the first step to fill the chunk; the copies are dropped below
            part = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, jnp.repeat(a[:1], short, axis=0)]), part)
        out.append(jax.tree_util.tree_map(lambda a: a[:chunk - short], once(fn, arrays, on, part)))
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *out)


def make_step_fn(static: Static):
    """A jitted, vmapped step-time function over a leading axis of steps:
    f(arrays, on, params, steps) -> (total_us [S], breakdown {name: [S]})."""
    def one(arrays, on, params, step):
        return step_time(arrays, on, params, step, static)
    return jit(jax.vmap(one, in_axes=(None, None, None, 0)))


# ---------------------------------------------------------------- building padded steps

def bucket(n: int) -> int:
    """Padded length for n requests: the next power of two (at least 1), to reuse compilations."""
    return 1 << max(0, int(n) - 1).bit_length()


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


# The largest token count a step may state: far beyond any context a model serves, small enough that the
# step model's float32 arithmetic stays finite, and no larger than the window that stands for full attention
# (`ops.NO_WINDOW`), so that no count is clamped.
MAX_TOKENS = int(ops.NO_WINDOW)


def _count(v, loc, field, minimum):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(f"must be an integer >= {minimum}, got {v!r}", loc, field)
    if isinstance(v, float) and not math.isfinite(v):
        raise InputError(f"must be a finite integer >= {minimum}, got {v!r}", loc, field)
    if v != int(v) or v < minimum:
        raise InputError(f"must be an integer >= {minimum}, got {v!r}", loc, field)
    if v > MAX_TOKENS:
        try:
            shown = f"{float(v):.4g}"
        except OverflowError:  # an int beyond float range
            shown = f"a {len(str(v))}-digit number of"
        raise InputError(f"{shown} tokens is more than the limit of {MAX_TOKENS:.0e}", loc, field)
    return int(v)


def validate_step(s, loc: str) -> tuple[list[tuple[int, int]], list[int]]:
    if not isinstance(s, dict):
        raise InputError(f"a step must be an object, got {type(s).__name__}", loc, "steps")
    pre, dec = s.get("prefill", []) or [], s.get("decode", []) or []
    if not isinstance(pre, list) or not isinstance(dec, list):
        raise InputError("prefill and decode must be lists", loc, "steps")
    out = []
    for e in pre:
        if not isinstance(e, (list, tuple)) or len(e) != 2:
            raise InputError(f"a prefill entry must be [new, cached], got {e!r}", loc, "prefill")
        out.append((_count(e[0], loc, "prefill.new", 1), _count(e[1], loc, "prefill.cached", 0)))
    ctx = [_count(c, loc, "decode", 0) for c in dec]
    if not out and not ctx:
        raise InputError("step has no requests", loc, "steps")
    return out, ctx
