"""FLOPs and bytes of each operator of a dense decoder layer, per GPU under tensor parallelism.

Shapes are the sharded ones one GPU runs (Megatron-style TP as in vLLM): QKV and gate/up are split by
columns, O and down by rows; query heads are split, KV heads are split or replicated when fewer than TP.
All functions are pure `jax.numpy` on scalars (or arrays that broadcast), so they vmap and differentiate.
FLOPs count a multiply-add as 2.  Bytes are HBM traffic.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from .errors import InputError
from .model import DTYPE_BYTES, ModelConfig

ACT_BYTES = 2.0  # activations and KV cache are bf16/fp16
NO_WINDOW = 1e12  # "full attention" as a finite window (inf would turn 0-token padding into NaN)
QUERY_TILE = 128.0  # query rows of one FlashAttention-3 tile (head_dim 128, Hopper)


class Dims(NamedTuple):
    """Per-GPU shapes of one model under TP (floats so that sweeps can vary them)."""

    hidden: float  # hidden size (not split)
    layers: float
    q_heads: float  # query heads on one GPU
    kv_heads: float  # KV heads on one GPU (replicated when the model has fewer than TP)
    head_dim: float
    inter: float  # intermediate size on one GPU
    vocab: float  # vocabulary rows of lm_head on one GPU
    tp: float
    weight_bytes: float  # bytes per weight element (2 bf16/fp16, 1 fp8)
    window: float  # sliding-window length in tokens (inf = full attention)
    qk_norm: float  # 1 when q and k are RMS-normalized per head (Qwen3)


def per_gpu_heads(q_heads: int, kv_heads: int, head_dim: int, tp: int) -> tuple[int, int, int] | None:
    """(query heads, KV heads, head_dim) one GPU runs under tensor parallelism ``tp``, as vLLM shards
    attention: the query heads split ``tp`` ways, the KV heads too, or, when fewer than ``tp``, replicated so
    that each GPU keeps one.  None when ``tp`` cannot shard them (it divides the query heads, and the KV heads
    when there are at least ``tp``, or is a multiple of the KV heads when there are fewer: vLLM's rule)."""
    if min(q_heads, kv_heads, head_dim, tp) < 1 or q_heads % tp or (kv_heads >= tp and kv_heads % tp) or \
            (kv_heads < tp and tp % kv_heads):
        return None
    return q_heads // tp, max(kv_heads // tp, 1), head_dim


def per_gpu_layouts(models, tps) -> tuple[tuple[int, int, int], ...]:
    """The distinct `per_gpu_heads` of ``models`` [(query heads, KV heads, head_dim)] at each TP degree of
    ``tps`` that can shard them, sorted."""
    return tuple(sorted({h for hq, hkv, d in models for tp in tps if (h := per_gpu_heads(hq, hkv, d, tp))}))


def dims(cfg: ModelConfig, tp: int) -> Dims:
    """Per-GPU shapes of ``cfg`` under tensor parallelism ``tp``."""
    heads = per_gpu_heads(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, tp)
    bad = [f"{k}={v}" for k, v in (("num_attention_heads", cfg.num_heads),
                                    ("intermediate_size", cfg.intermediate_size)) if tp < 1 or v % tp]
    if bad:
        raise InputError(f"tp={tp} must divide {' and '.join(bad)} of {cfg.name}", field="tp")
    if heads is None:  # KV heads neither split evenly nor replicated evenly
        raise InputError(f"tp={tp} must divide num_key_value_heads={cfg.num_kv_heads} of {cfg.name}, or be a "
                         "multiple of it (vLLM splits KV heads evenly or replicates them)", field="tp")
    q_heads, kv_heads, head_dim = heads
    return Dims(
        hidden=float(cfg.hidden_size), layers=float(cfg.num_layers), q_heads=float(q_heads),
        kv_heads=float(kv_heads), head_dim=float(head_dim),
        inter=cfg.intermediate_size / tp, vocab=float(-(-cfg.vocab_size // tp)), tp=float(tp),
        weight_bytes=float(DTYPE_BYTES[cfg.dtype]), window=min(float(cfg.sliding_window), NO_WINDOW),
        qk_norm=float(cfg.qk_norm),
    )


class Gemm(NamedTuple):
    """One GEMM y[m,n] = x[m,k]·W[k,n]."""

    m: jnp.ndarray
    k: jnp.ndarray
    n: jnp.ndarray


def gemm_flops(g: Gemm):
    return 2.0 * g.m * g.k * g.n


def gemm_bytes(g: Gemm, weight_bytes):
    """Read x and W, write y (activations in bf16)."""
    return (g.m * g.k) * ACT_BYTES + g.k * g.n * weight_bytes + g.m * g.n * ACT_BYTES


def layer_gemms(d: Dims, tokens) -> dict[str, Gemm]:
    """The four GEMMs of one decoder layer at M = tokens of the step."""
    qkv_n = (d.q_heads + 2.0 * d.kv_heads) * d.head_dim
    return {
        "qkv_proj": Gemm(tokens, d.hidden, qkv_n),
        "o_proj": Gemm(tokens, d.q_heads * d.head_dim, d.hidden),
        "gate_up_proj": Gemm(tokens, d.hidden, 2.0 * d.inter),
        "down_proj": Gemm(tokens, d.inter, d.hidden),
    }


def lm_head_gemm(d: Dims, sampled) -> Gemm:
    """lm_head for the requests that emit a token this step (vLLM computes logits for those only)."""
    return Gemm(sampled, d.hidden, d.vocab)


def prefill_pairs(d: Dims, new, cached):
    """Causal query-key pairs per head of a chunk of ``new`` tokens after ``cached`` tokens:
    new·cached + new·(new+1)/2, limited to ``new·window`` under a sliding window."""
    full = new * cached + new * (new + 1.0) / 2.0
    return jnp.minimum(full, new * d.window)


def prefill_pairs_tiled(d: Dims, new, cached):
    """Query-key pairs the attention kernel computes: like `prefill_pairs` but a chunk shorter than one
    query tile still fills a whole tile of ``QUERY_TILE`` rows (padding rows cost compute).  With paged KV,
    FlashAttention-3 packs the query heads that share a KV head into the tile's rows (PackGQA), so a tile
    holds ``QUERY_TILE / (q_heads / kv_heads)`` tokens."""
    return prefill_pairs(d, jnp.maximum(new, QUERY_TILE * d.kv_heads / d.q_heads), cached)


def decode_keys(d: Dims, ctx):
    """Keys one decoding query attends to: ctx cached tokens + itself (within the window)."""
    return jnp.minimum(ctx + 1.0, d.window)


def attention_flops(d: Dims, pairs):
    """QK^T and PV: 2 GEMM-like products of head_dim per query-key pair per query head."""
    return 4.0 * d.q_heads * d.head_dim * pairs


def kv_read_bytes(d: Dims, keys):
    """K and V bytes read for ``keys`` cached tokens on one GPU."""
    return 2.0 * d.kv_heads * d.head_dim * keys * ACT_BYTES


def memory_ops_bytes(d: Dims, tokens) -> dict[str, jnp.ndarray]:
    """HBM bytes of the bandwidth-bound kernels of one layer at ``tokens`` tokens.

    rmsnorm: two fused add+RMSNorm kernels (read x and residual, write both);
    rope: read and write q and k; kv_cache_write: read new k, v and store them into the paged cache;
    activation: SiLU(gate)·up reads 2·inter, writes inter; qk_norm (Qwen3): read and write q and k.
    """
    qk = (d.q_heads + d.kv_heads) * d.head_dim
    return {
        "rmsnorm": 2.0 * (4.0 * tokens * d.hidden * ACT_BYTES + d.hidden * ACT_BYTES),
        "rope": 2.0 * tokens * qk * ACT_BYTES,
        "kv_cache_write": 2.0 * tokens * 2.0 * d.kv_heads * d.head_dim * ACT_BYTES,
        "activation": 3.0 * tokens * d.inter * ACT_BYTES,
        "qk_norm": d.qk_norm * 2.0 * tokens * qk * ACT_BYTES,
    }


def memory_kernels_per_layer(d: Dims):
    """Launches of bandwidth-bound kernels per layer: 2 RMSNorm, RoPE, KV write, activation (+ q/k norm)."""
    return 5.0 + d.qk_norm


def allreduce_bytes(d: Dims, tokens):
    """Message of one TP all-reduce of the hidden states (bytes per GPU)."""
    return tokens * d.hidden * ACT_BYTES


def logits_gather_message(d: Dims, sampled):
    """The logits all-gather of one step under TP, as the all-reduce message that moves the same bytes
    (bytes per GPU; 0 at TP 1).  vLLM V1 all-gathers lm_head's vocab-parallel logits (model dtype) so that
    every rank holds ``vocab · tp`` logits per sampled request, S bytes in all.  A ring all-gather moves
    (tp-1)/tp · S bytes per GPU, half of what an all-reduce of S bytes moves (2 (tp-1)/tp · S), so it is
    priced as an all-reduce of S/2 bytes."""
    return jnp.where(d.tp > 1.0, sampled * d.vocab * d.tp * ACT_BYTES / 2.0, 0.0)


def embedding_bytes(d: Dims, tokens):
    """Embedding gather (read rows, write activations) plus the final RMSNorm."""
    return 2.0 * tokens * d.hidden * ACT_BYTES + 2.0 * tokens * d.hidden * ACT_BYTES


def sampling_bytes(d: Dims, sampled):
    """Logits traffic after lm_head: three fp32 passes over the full vocabulary per sampled request.  Under
    TP, vLLM V1 all-gathers the vocab-parallel logits and every rank runs the sampler on all of them, so
    the passes cover ``vocab · tp`` entries, not one GPU's shard."""
    return 3.0 * sampled * d.vocab * d.tp * 4.0


def weight_bytes_per_gpu(d: Dims):
    """Weight bytes one GPU holds: decoder layers plus embedding and lm_head shards."""
    per_layer = sum(g.k * g.n for g in layer_gemms(d, 1.0).values())
    return d.layers * per_layer * d.weight_bytes + 2.0 * d.vocab * d.hidden * d.weight_bytes
