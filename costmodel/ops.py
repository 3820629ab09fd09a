"""FLOPs and bytes of each operator of a decoder layer (dense or mixture-of-experts), per GPU under tensor and
expert parallelism.

Shapes are the sharded ones one GPU runs (Megatron-style TP as in vLLM): QKV and gate/up are split by
columns, O and down by rows; query heads are split, KV heads are split or replicated when fewer than TP.
A mixture-of-experts layer (vLLM's fused MoE) replaces the dense MLP by a router GEMM, the routed experts
(each token's ``top_k`` experts; the experts split ``moe_ep`` ways, each expert's matrices ``tp / moe_ep``
ways) and, in some models, shared experts that every token passes through (a dense MLP, TP-split).
All functions are pure `jax.numpy` on scalars (or arrays that broadcast), so they vmap and differentiate.
FLOPs count a multiply-add as 2.  Bytes are HBM traffic.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from .errors import InputError
from .model import DTYPE_BYTES, ModelConfig

ACT_BYTES = 2.0  # activations are bf16/fp16 (the KV cache too, unless `Dims.kv_cache_bytes` says fp8)
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
    moe_layers: float = 0.0  # layers whose MLP is a mixture of experts (the others have a dense MLP)
    experts: float = 0.0  # routed experts per MoE layer (whole model)
    top_k: float = 0.0  # experts each token is routed to
    moe_inter: float = 0.0  # one expert's intermediate size on one GPU (split tp / moe_ep ways)
    shared_inter: float = 0.0  # intermediate size of the shared experts on one GPU (0 if none)
    moe_ep: float = 1.0  # expert parallelism: the experts are spread over this many GPUs
    # A model that mixes sliding-window and full-attention layers (gpt-oss): ``window`` is then full attention
    # (the batch is summarized as the full layers see it) and these layers attend within ``sliding_window``.
    sliding_layers: float = 0.0  # layers attending within sliding_window (0 when every layer attends alike)
    sliding_window: float = NO_WINDOW  # tokens each query of those layers attends to at most
    # attention data parallelism: this many groups of ``tp`` GPUs each run attention on their own requests and
    # the MoE layers run over all tp x attention_dp GPUs (a step is one rank's; ranks are taken as balanced)
    attention_dp: float = 1.0
    # multi-head latent attention: outputs of the fused q_a/kv_a down-projection (q_lora_rank + kv_lora_rank
    # + qk_rope_head_dim elements, replicated on every GPU); 0 without MLA
    mla_latent: float = 0.0
    kv_cache_bytes: float = ACT_BYTES  # bytes per KV-cache element: 2 bf16/fp16, 1 fp8 (`kv_cache_dtype`)
    # pipeline parallelism: the layers are split over this many stages of tp GPUs; a step is one batch's pass
    # through every stage (all ``layers``), with pp - 1 hand-offs of its activations (`pp_handoff_bytes`)
    pp: float = 1.0
    # the sampler's top-k/top-p filter (`sampler_filter`): bytes per vocabulary entry per sampled request, and
    # kernels per step (0 without a filter)
    filter_bytes: float = 0.0
    filter_kernels: float = 0.0

    @property
    def dense_layers(self):
        """Layers with a dense MLP."""
        return self.layers - self.moe_layers

    @property
    def full_layers(self):
        """Layers attending within ``window`` (all of them unless the model mixes in sliding-window layers)."""
        return self.layers - self.sliding_layers


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


def dims(cfg: ModelConfig, tp: int, moe_ep: int = 1, attention_dp: int = 1, pp: int = 1) -> Dims:
    """Per-GPU shapes of ``cfg`` under tensor parallelism ``tp`` and, for a mixture-of-experts model, expert
    parallelism ``moe_ep`` inside the expert group of tp x ``attention_dp`` GPUs (vLLM's
    ``--enable-expert-parallel``: ``moe_ep = tp x attention_dp``; ``--data-parallel-size`` is
    ``attention_dp``), with the layers over ``pp`` pipeline stages (``--pipeline-parallel-size``)."""
    if isinstance(pp, bool) or not isinstance(pp, int) or not 1 <= pp <= cfg.num_layers:
        raise InputError(f"must be an integer from 1 to the {cfg.num_layers} layers of {cfg.name}, got {pp!r}",
                         field="pp")
    heads = per_gpu_heads(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, tp)
    bad = [f"{k}={v}" for k, v in (("num_attention_heads", cfg.num_heads),
                                    ("intermediate_size", cfg.intermediate_size)) if tp < 1 or v % tp]
    if bad:
        raise InputError(f"tp={tp} must divide {' and '.join(bad)} of {cfg.name}", field="tp")
    moe_tp = moe_split(cfg, tp, moe_ep, attention_dp)
    if heads is None:  # KV heads neither split evenly nor replicated evenly
        raise InputError(f"tp={tp} must divide num_key_value_heads={cfg.num_kv_heads} of {cfg.name}, or be a "
                         "multiple of it (vLLM splits KV heads evenly or replicates them)", field="tp")
    q_heads, kv_heads, head_dim = heads
    window = min(float(cfg.sliding_window), NO_WINDOW)
    mixed = 0 < cfg.sliding_layers < cfg.num_layers
    return Dims(
        hidden=float(cfg.hidden_size), layers=float(cfg.num_layers), q_heads=float(q_heads),
        kv_heads=float(kv_heads), head_dim=float(head_dim),
        inter=cfg.intermediate_size / tp, vocab=float(-(-cfg.vocab_size // tp)), tp=float(tp),
        weight_bytes=float(DTYPE_BYTES[cfg.dtype]), window=NO_WINDOW if mixed else window,
        qk_norm=float(cfg.qk_norm), moe_layers=float(cfg.moe_layers), experts=float(cfg.experts),
        top_k=float(cfg.top_k), moe_inter=cfg.moe_intermediate / moe_tp, shared_inter=cfg.shared_intermediate / tp,
        moe_ep=float(moe_ep), sliding_layers=float(cfg.sliding_layers) if mixed else 0.0,
        sliding_window=window if mixed else NO_WINDOW, attention_dp=float(attention_dp),
        mla_latent=float(cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim) if cfg.mla else 0.0,
        pp=float(pp),
    )


def moe_split(cfg: ModelConfig, tp: int, moe_ep: int, attention_dp: int = 1) -> int:
    """The TP degree of each expert's matrices (``tp x attention_dp / moe_ep``), after checking that the layout
    can shard the model's experts; 1 for a dense model (which only accepts ``moe_ep = attention_dp = 1``)."""
    if isinstance(attention_dp, bool) or not isinstance(attention_dp, int) or attention_dp < 1:
        raise InputError(f"must be a positive integer, got {attention_dp!r}", field="attention_dp")
    if not cfg.experts:
        for field, v in (("moe_ep", moe_ep), ("attention_dp", attention_dp)):
            if v != 1:
                raise InputError(f"{field}={v} needs a mixture-of-experts model; {cfg.name} is dense", field=field)
        return 1
    group = tp * attention_dp
    if moe_ep < 1 or group % moe_ep:
        where = f"tp={tp}" if attention_dp == 1 else f"tp x attention_dp = {group}"
        raise InputError(f"moe_ep={moe_ep} must divide {where} (experts are spread inside the expert group)",
                         field="moe_ep")
    if cfg.experts % moe_ep:
        raise InputError(f"moe_ep={moe_ep} must divide the {cfg.experts} experts of {cfg.name}", field="moe_ep")
    moe_tp = group // moe_ep
    if cfg.moe_intermediate % moe_tp or cfg.shared_intermediate % tp:
        split = f"tp/moe_ep={moe_tp}" if attention_dp == 1 else f"tp x attention_dp / moe_ep = {moe_tp}"
        raise InputError(f"{split} must divide moe_intermediate_size={cfg.moe_intermediate} of "
                         f"{cfg.name} (and tp={tp} its shared experts' {cfg.shared_intermediate})", field="tp")
    return moe_tp


def check_moe_tp(cfg: ModelConfig, tp: int, moe_ep: int, attention_dp: int, moe_tp) -> None:
    """A record's stated ``moe_tp`` (each expert's TP degree) against the layout's, tp x attention_dp /
    moe_ep (`moe_split`): InputError naming the field when a mixture-of-experts model's differ.  None or 0
    states nothing; a dense model has no experts, so its ``moe_tp`` is not read."""
    if moe_tp is None or moe_tp == 0 or not cfg.experts:
        return
    want = moe_split(cfg, tp, moe_ep, attention_dp)
    if isinstance(moe_tp, bool) or not isinstance(moe_tp, int) or moe_tp != want:
        raise InputError(f"must be tp x attention_dp / moe_ep = {tp} x {attention_dp} / {moe_ep} = {want} for "
                         f"{cfg.name}'s experts, got {moe_tp!r}", field="moe_tp")


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


def mla_gemms(d: Dims, tokens) -> dict[str, Gemm]:
    """The GEMMs of one MLA decoder layer priced outside the MLA module table (`kernel_time.mla_decode_us`):
    the fused q_a/kv_a down-projection (hidden -> q_lora + kv_lora + rope, replicated on every GPU) and the
    MLP's gate/up and down (the dense layers' own; `moe_gemms` for the MoE layers).  q_b, kv_b, the attention
    and o_proj are inside the table."""
    return {
        "mla_a_proj": Gemm(tokens, d.hidden, d.mla_latent),
        "gate_up_proj": Gemm(tokens, d.hidden, 2.0 * d.inter),
        "down_proj": Gemm(tokens, d.inter, d.hidden),
    }


def moe_gemms(d: Dims, tokens, shared: bool) -> dict[str, Gemm]:
    """The dense GEMMs of one mixture-of-experts layer at M = tokens: the router (replicated on every GPU, n =
    experts) and, when the model has shared experts, their gate/up and down projections (TP-split).  The
    routed experts are one fused-MoE call priced from its own table (`moe_routed_flops`).  ``shared``: the model
    has shared experts (a static choice, as the list's length is)."""
    out = {"router": Gemm(tokens, d.hidden, d.experts)}
    if shared:
        out["shared_gate_up_proj"] = Gemm(tokens, d.hidden, 2.0 * d.shared_inter)
        out["shared_down_proj"] = Gemm(tokens, d.shared_inter, d.hidden)
    return out


def moe_tokens(d: Dims, tokens):
    """Tokens entering one MoE layer when each attention rank computes ``tokens``: tokens · attention_dp (the
    ranks' tokens are gathered over the expert group; the fused-MoE table's ``num_tokens``)."""
    return tokens * d.attention_dp


def moe_routed_pairs(d: Dims, tokens):
    """(token, expert) pairs one GPU computes in the routed experts: `moe_tokens` · top_k spread evenly over
    the ``moe_ep`` GPUs of the expert group (``tokens``: one attention rank's)."""
    return moe_tokens(d, tokens) * d.top_k / d.moe_ep


def moe_routed_flops(d: Dims, tokens):
    """FLOPs of the routed experts on one GPU: gate/up (2 · moe_inter outputs) and down per routed pair."""
    return 2.0 * moe_routed_pairs(d, tokens) * 3.0 * d.hidden * d.moe_inter


def moe_active_experts(d: Dims, tokens):
    """Expected local experts that at least one of ``tokens`` tokens is routed to (uniform routing: each of
    the tokens · top_k choices misses a given expert with probability 1 - 1/experts)."""
    miss = jnp.exp(moe_tokens(d, tokens) * d.top_k * jnp.log1p(-1.0 / jnp.maximum(d.experts, 2.0)))
    return d.experts / d.moe_ep * (1.0 - miss)


def moe_routed_weight_bytes(d: Dims, tokens, expert_weight_bytes):
    """Expert weight bytes one GPU reads in a MoE layer: the matrices of the experts that tokens reach."""
    return moe_active_experts(d, tokens) * 3.0 * d.hidden * d.moe_inter * expert_weight_bytes


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


def sliding_decode_keys(d: Dims, n_decode, decode_keys):
    """Keys the decodes attend in all in a sliding-window layer of a model that mixes layer kinds, from the
    full layers' total ``decode_keys`` of ``n_decode`` decodes: min(decode_keys, n_decode · sliding_window).
    Exact when every decode has at least ``sliding_window`` - 1 cached tokens, or none has; otherwise an
    upper bound (the cap applies to the total, not to each decode)."""
    return jnp.minimum(decode_keys, n_decode * d.sliding_window)


def sliding_prefill_pairs(d: Dims, prefill_tokens, prefill_pairs):
    """Query-key pairs per head in all in a sliding-window layer of a model that mixes layer kinds, from the
    full layers' total ``prefill_pairs`` of chunks with ``prefill_tokens`` new tokens: min(prefill_pairs,
    prefill_tokens · sliding_window).  Exact when every chunk has at least ``sliding_window`` tokens before
    it (and fills a query tile), or none reaches the window; otherwise an upper bound."""
    return jnp.minimum(prefill_pairs, prefill_tokens * d.sliding_window)


def attention_flops(d: Dims, pairs):
    """QK^T and PV: 2 GEMM-like products of head_dim per query-key pair per query head."""
    return 4.0 * d.q_heads * d.head_dim * pairs


def kv_read_bytes(d: Dims, keys):
    """K and V bytes read for ``keys`` cached tokens on one GPU."""
    return keys * (2.0 * d.kv_heads * d.head_dim * d.kv_cache_bytes)


def memory_ops_bytes(d: Dims, tokens) -> dict[str, jnp.ndarray]:
    """HBM bytes of the bandwidth-bound kernels of one layer at ``tokens`` tokens.

    rmsnorm: two fused add+RMSNorm kernels (read x and residual, write both);
    rope: read and write q and k; kv_cache_write: read new k, v and store them into the paged cache at
    ``kv_cache_bytes`` per element (both 0
    for MLA: inside the MLA module table, with its q_a/kv_a norms);
    activation: SiLU(gate)·up reads 2·inter, writes inter (dense MLP layers and shared experts; the routed
    experts' activation is inside the fused-MoE call); qk_norm (Qwen3): read and write q and k.  Averaged over
    the layers when dense and MoE layers differ.
    """
    out = {k: tokens * v for k, v in memory_ops_bytes_per_token(d).items()}
    out["rmsnorm"] = out["rmsnorm"] + rmsnorm_weight_bytes(d)
    return out


def rmsnorm_weight_bytes(d: Dims):
    """The weight vectors the two RMSNorms of a layer read (bytes), whatever the tokens."""
    return 2.0 * d.hidden * ACT_BYTES


def memory_ops_bytes_per_token(d: Dims) -> dict[str, jnp.ndarray]:
    """`memory_ops_bytes` per token of the step (bytes), by kernel, without `rmsnorm_weight_bytes`.  The
    step multiplies their sum by the tokens once (`memory_ops_total_bytes`: one multiply per configuration of
    a sweep, not one per kernel and factor)."""
    qk = (d.q_heads + d.kv_heads) * d.head_dim
    act_inter = jnp.where(d.moe_layers > 0, (d.dense_layers * d.inter + d.moe_layers * d.shared_inter) / d.layers,
                          d.inter)
    mla = d.mla_latent > 0
    return {
        "rmsnorm": 2.0 * 4.0 * d.hidden * ACT_BYTES,
        "rope": jnp.where(mla, 0.0, 2.0 * qk * ACT_BYTES),
        "kv_cache_write": jnp.where(mla, 0.0, 2.0 * d.kv_heads * d.head_dim * (ACT_BYTES + d.kv_cache_bytes)),
        "activation": 3.0 * act_inter * ACT_BYTES,
        "qk_norm": d.qk_norm * 2.0 * qk * ACT_BYTES,
    }


def memory_ops_total_bytes(d: Dims, tokens):
    """The sum of `memory_ops_bytes` over the kernels: one layer's bandwidth-bound kernels (bytes)."""
    return tokens * sum(memory_ops_bytes_per_token(d).values()) + rmsnorm_weight_bytes(d)


def memory_kernels_per_layer(d: Dims):
    """Launches of bandwidth-bound kernels per layer: 2 RMSNorm, RoPE, KV write, activation (+ q/k norm; + the
    router's top-k softmax in MoE layers, averaged over the layers); MLA's RoPE and KV write are inside its
    module table."""
    n = 5.0 + d.qk_norm + d.moe_layers / d.layers
    return jnp.where(d.mla_latent > 0, n - 2.0, n)


def allreduce_bytes(d: Dims, tokens):
    """Message of one TP all-reduce of the hidden states (bytes per GPU)."""
    return tokens * (d.hidden * ACT_BYTES)


def pp_handoff_bytes(d: Dims, tokens):
    """What one GPU sends to its peer in the next pipeline stage per hand-off (bytes): vLLM passes the hidden
    states and the residual (2 x tokens x hidden, activation dtype) and splits them over the TP ranks, each
    sending 1/tp; the receiving stage all-gathers them over its TP group (`kernel_time.pp_handoff_us`)."""
    return 2.0 * tokens * d.hidden * ACT_BYTES / d.tp


def ep_exchange_message(d: Dims, tokens):
    """The dispatch and combine of one MoE layer under attention data parallelism, as the all-reduce message
    that moves the same bytes (bytes per GPU; 0 at attention_dp 1).  vLLM's default all2all backend for DP +
    EP all-gathers the hidden states of every rank's ``tokens`` over the expert group before the experts and
    reduce-scatters their outputs after: S = tokens · attention_dp · hidden · 2 bytes gathered.  A ring
    all-reduce of S bytes is exactly a reduce-scatter then an all-gather of S, so the pair is priced as one
    all-reduce of S over the tp x attention_dp GPUs."""
    return jnp.where(d.attention_dp > 1.0, moe_tokens(d, tokens) * d.hidden * ACT_BYTES, 0.0)


def logits_gather_message(d: Dims, sampled):
    """The logits all-gather of one step under TP, as the all-reduce message that moves the same bytes
    (bytes per GPU; 0 at TP 1).  vLLM V1 all-gathers lm_head's vocab-parallel logits (model dtype) so that
    every rank holds ``vocab · tp`` logits per sampled request, S bytes in all.  A ring all-gather moves
    (tp-1)/tp · S bytes per GPU, half of what an all-reduce of S bytes moves (2 (tp-1)/tp · S), so it is
    priced as an all-reduce of S/2 bytes."""
    return sampled * jnp.where(d.tp > 1.0, d.vocab * d.tp * ACT_BYTES / 2.0, 0.0)


def embedding_bytes(d: Dims, tokens):
    """Embedding gather (read rows, write activations) plus the final RMSNorm."""
    return tokens * (4.0 * d.hidden * ACT_BYTES)


def sampling_bytes(d: Dims, sampled):
    """Logits traffic after lm_head: three fp32 passes over the full vocabulary per sampled request, and the
    top-k/top-p filter's `Dims.filter_bytes` per entry when the requests use one.  Under TP, vLLM V1
    all-gathers the vocab-parallel logits and every rank runs the sampler on all of them, so the passes cover
    ``vocab · tp`` entries, not one GPU's shard."""
    return sampled * ((3.0 * 4.0 + d.filter_bytes) * d.vocab * d.tp)


# vLLM V1's PyTorch top-k/top-p filter over [requests, vocabulary] fp32 logits, HBM bytes per vocabulary entry
# per sampled request and kernels per step.
# "top_p" sorts (PyTorch's sort of rows shorter than a million entries: one radix sort of every entry with an
# 8-byte (segment, index) payload, then a stable regroup by segment):
#   fill (segment, index) 8 + radix sort of 4-byte keys with 8-byte values (histogram 4, four 8-bit digit
#   passes each reading and writing 12) 100 + regroup on the segment bits (one pass: histogram 8, 16) 24 +
#   gather into sorted values and int64 indices (read 8 + 4, write 4 + 8) 24                        = 156
#   top-p mask: softmax of the sorted row (12), cumsum in place (8), compare (5), masked fill (9)     =  34
#   scatter back to vocabulary order (clone 8; read index 8 and value 4, write 4)                    =  24
#   about 18 kernels (fill, 6 for the key sort, 3 for the regroup, gather, softmax, cumsum, compare, last column,
#   masked fill, clone, scatter)
# "top_k" alone selects without sorting: torch.topk's radix select (about four reads 16), the k-th value per
# row, compare (5) and masked fill (9): 30 bytes, about 6 kernels.
SAMPLER_FILTERS = {"none": (0.0, 0.0), "top_k": (30.0, 6.0), "top_p": (214.0, 18.0)}


def sampler_filter(kind: str) -> tuple[float, float]:
    """(`Dims.filter_bytes`, `Dims.filter_kernels`) of a sampler filter (`sampling.FILTERS`)."""
    return SAMPLER_FILTERS[kind]
