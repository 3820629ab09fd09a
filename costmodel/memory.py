"""GPU memory of a vLLM deployment: weights per GPU, KV-cache bytes per token, and the KV-cache capacity.

Everything is in bytes (or tokens / 16-token blocks) per GPU.  The model is `model.Arch`, read from a Hugging
Face ``config.json`` (dense, mixture-of-experts, multi-head latent attention, sliding-window, chunked-local
and Gated-DeltaNet hybrids, multimodal wrappers with a nested ``text_config``).

The capacity follows vLLM V1's start-up (``gpu_worker.determine_available_memory`` in v0.15):

    kv_bytes = gpu_memory_utilization · device memory
               − weights (what loading allocates: parameters, quantisation scales, RoPE cache, MLA copies)
               − activation peak of the profile run (the larger of the forward pass at
                 max_num_batched_tokens and the sampler at min(max_num_seqs, max_num_batched_tokens))
               − non-torch memory allocated after start-up (CUDA modules, cuBLAS, NCCL buffers)
               − CUDA-graph memory (0 for vLLM < 0.21, which captures graphs after sizing the cache)
    blocks   = kv_bytes // (block_size · KV bytes per token of every cache layer), the minimum over
               pipeline stages

The terms, their values and where they come from are in docs/memory.md.  Functions here are plain Python
on integers; `kv_capacity_from_terms` is the jnp form of the last two lines for sweeps.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp

from .errors import InputError
from .hardware import GPU, get_gpu
from .model import Arch, Precision, Quant, as_arch

GiB = 2.0 ** 30
MiB = 2.0 ** 20
VOCAB_PADDING = 64  # vLLM pads embedding / lm_head rows to a multiple of 64 before splitting them over TP
BLOCK_SIZE = 16  # tokens per KV-cache block (vLLM's default on CUDA)

# --- physical constants of the non-weight terms (justified in docs/memory.md) ---------------------------
# Sampler warm-up of the profile run: fp32 [R, V] logits ("units") alive at the peak inside the sort of
# the top-k/top-p sampler: bf16 logits 0.5 + fp32 logits 1 + sort outputs (values 1, int64 indices 2) +
# PyTorch's segmented sort scratch (two int2 index/segment buffers 2 + 2, cub's key output 1, cub's
# alternate key/value buffers 1 + 2).
SAMPLER_FP32_LOGIT_COPIES = 12.5
# Hidden-size tensors of the dummy forward pass still alive while the sampler runs (hidden states and the
# residual stream of all max_num_batched_tokens tokens).
LIVE_HIDDEN_TENSORS = 2
# Non-torch memory the profile run adds on one GPU: CUDA module images of the kernels loaded on first use,
# cuBLAS/cuBLASLt workspaces.  vLLM logs report 0.07-0.26 GiB at TP 1.
NON_TORCH_BYTES = 0.15 * GiB
# NCCL channel buffers, connected lazily at the first collective (after vLLM's start-up snapshot) on a GPU
# that talks to peers: about 9 MiB of receive buffers (Simple 4 MiB + LL128 ~4.6 MiB + LL) per channel and
# peer over ~32 channels.
NCCL_BYTES = 0.30 * GiB

_KV_DTYPE_BYTES = {"auto": None, "bf16": 2, "fp16": 2, "bfloat16": 2, "float16": 2, "half": 2,
                   "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_ds_mla": 1}


# ----------------------------------------------------------------------------------------------------------
# Parallel layout
# ----------------------------------------------------------------------------------------------------------

class Layout(NamedTuple):
    """How one replica is spread over GPUs.

    tp: tensor parallelism of attention and dense layers (query heads, MLP columns, vocabulary rows; KV heads
    split, or replicated when fewer than tp).  pp: pipeline stages (layers split as vLLM does).  dp: whole
    replicas (weights per GPU unchanged).  attention_dp: attention replicated over this many groups of tp
    GPUs while the experts are spread over all tp x attention_dp GPUs.  moe_tp x moe_ep must equal
    tp x attention_dp: each expert's matrices are split moe_tp ways, the experts moe_ep ways.  Default
    (None): moe_tp = tp x attention_dp, moe_ep = 1, which is vLLM without --enable-expert-parallel."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    attention_dp: int = 1
    moe_tp: int | None = None
    moe_ep: int | None = None

    @property
    def expert_group(self) -> int:
        return self.tp * self.attention_dp

    def moe_split(self) -> tuple[int, int]:
        if self.moe_tp is None and self.moe_ep is None:
            return self.expert_group, 1
        mtp = self.moe_tp if self.moe_tp else self.expert_group // (self.moe_ep or 1)
        mep = self.moe_ep if self.moe_ep else self.expert_group // mtp
        return mtp, mep


def as_layout(layout: Layout | dict | int | None) -> Layout:
    if layout is None:
        return Layout()
    if isinstance(layout, Layout):
        return layout
    if isinstance(layout, int):
        return Layout(tp=layout)
    if isinstance(layout, dict):
        known = set(Layout._fields)
        extra = [k for k in layout if k not in known]
        if extra:
            raise InputError(f"unknown layout field (known: {', '.join(Layout._fields)})", field=extra[0])
        vals = {k: (None if v in (None, 0) and k in ("moe_tp", "moe_ep") else v) for k, v in layout.items()}
        return Layout(**vals)
    raise InputError(f"layout must be a Layout, dict or int, got {type(layout).__name__}", field="layout")


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Layers of each pipeline stage as vLLM splits them: num_layers // pp each, the remainder going one
    by one to the stages before the last (the last stage also holds lm_head)."""
    parts = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        parts[-i] += 1
    out, start = [], 0
    for n in parts:
        out.append(range(start, start + n))
        start += n
    return out


def validate(a: Arch, lay: Layout) -> None:
    """Raise InputError when the layout does not divide the model."""
    for f in Layout._fields:
        v = getattr(lay, f)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InputError(f"must be a positive integer, got {v!r}", field=f)
    tp = lay.tp
    if lay.pp > a.layers:
        raise InputError(f"pp={lay.pp} exceeds the {a.layers} layers of {a.name}", field="pp")
    if a.heads % tp:
        raise InputError(f"tp={tp} must divide num_attention_heads={a.heads} of {a.name}", field="tp")
    if not a.mla and a.kv_heads % tp and tp % a.kv_heads:
        raise InputError(f"tp={tp} and num_key_value_heads={a.kv_heads} of {a.name} must divide one another",
                         field="tp")
    if "dense" in a.mlp_types and a.intermediate % tp:
        raise InputError(f"tp={tp} must divide intermediate_size={a.intermediate} of {a.name}", field="tp")
    if a.shared_intermediate % tp:
        raise InputError(f"tp={tp} must divide the shared-expert size {a.shared_intermediate} of {a.name}",
                         field="tp")
    if a.lin_v_heads and (a.lin_v_heads % tp or a.lin_k_heads % tp):
        raise InputError(f"tp={tp} must divide the linear-attention heads ({a.lin_k_heads} key, "
                         f"{a.lin_v_heads} value) of {a.name}", field="tp")
    if a.experts:
        mtp, mep = lay.moe_split()
        if mtp * mep != lay.expert_group:
            raise InputError(f"moe_tp x moe_ep = {mtp} x {mep} must equal tp x attention_dp = {lay.expert_group}",
                             field="moe_ep")
        if a.experts % mep:
            raise InputError(f"moe_ep={mep} must divide the {a.experts} experts of {a.name}", field="moe_ep")
        if a.moe_intermediate % mtp:
            raise InputError(f"moe_tp={mtp} must divide the expert size {a.moe_intermediate} of {a.name}",
                             field="moe_tp")
    elif lay.moe_ep not in (None, 1):
        raise InputError(f"{a.name} has no experts to split", field="moe_ep")


# ----------------------------------------------------------------------------------------------------------
# Weights per GPU
# ----------------------------------------------------------------------------------------------------------

class WeightBytes(NamedTuple):
    """Bytes one GPU holds after loading (the most loaded pipeline stage unless a stage is asked for)."""

    embedding: float
    lm_head: float
    attention: float  # projections (+ biases, sinks, q/k norms), MLA, linear attention, DSA indexer
    dense_mlp: float
    shared_experts: float
    experts: float  # routed experts with their quantisation scales
    router: float
    norms: float  # layer norms and the final norm
    vision: float  # vision tower and projector (estimate, split over tp)
    rope_cache: float  # RoPE cos/sin cache vLLM builds at load: positions x rotary_dim x 2 bytes
    mla_absorbed: float  # MLA: the bf16 W_UK / W_UV copies of kv_b_proj made after loading
    total: float


def _layer_attention_bytes(a: Arch, kind: str, tp: int) -> float:
    q = a.quant.attention
    hb = a.quant.high.element_bytes  # biases, norms, sinks: model dtype
    H = a.hidden
    if kind == "linear":
        nk, nv, dk, dv = a.lin_k_heads // tp, a.lin_v_heads // tp, a.lin_k_dim, a.lin_v_dim
        conv_dim = 2 * nk * dk + nv * dv
        b = q.matrix_bytes(H, 2 * nk * dk + 2 * nv * dv + 2 * nv)  # in_proj_qkvz + in_proj_ba
        b += hb * (conv_dim * a.conv_kernel + 2 * nv + dv)  # conv1d, dt_bias + A_log, gated norm
        return b + q.matrix_bytes(nv * dv, H)  # out_proj
    if a.mla:
        hl = a.heads // tp
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        b = 0.0
        if a.q_lora_rank:
            b += q.matrix_bytes(H, a.q_lora_rank) + hb * a.q_lora_rank + q.matrix_bytes(a.q_lora_rank, hl * qk)
        else:
            b += q.matrix_bytes(H, hl * qk)
        b += q.matrix_bytes(H, a.kv_lora_rank + a.qk_rope_head_dim) + hb * a.kv_lora_rank
        b += q.matrix_bytes(a.kv_lora_rank, hl * (a.qk_nope_head_dim + a.v_head_dim))
        b += q.matrix_bytes(hl * a.v_head_dim, H)
        if a.index_heads:
            b += q.matrix_bytes(a.q_lora_rank or H, a.index_heads * a.index_head_dim)
            b += q.matrix_bytes(H, a.index_head_dim) + hb * 2 * a.index_head_dim + hb * H * a.index_heads
        return b
    hl = a.heads // tp
    kvl = max(a.kv_heads // tp, 1)
    d = a.head_dim
    qn = hl * d * (2 if a.attn_output_gate else 1)
    b = q.matrix_bytes(H, qn + 2 * kvl * d) + q.matrix_bytes(hl * d, H)
    b += hb * ((qn + 2 * kvl * d) * a.qkv_bias + H * a.o_bias + hl * a.sinks)
    return b + hb * a.qk_norm_params / (tp if a.qk_norm_params > 2 * d else 1)


def _layer_mlp_bytes(a: Arch, kind: str, lay: Layout) -> dict:
    q, H, hb = a.quant, a.hidden, a.quant.high.element_bytes
    if kind == "dense":
        i = a.intermediate // lay.tp
        return {"dense_mlp": q.dense_mlp.matrix_bytes(H, 2 * i) + q.dense_mlp.matrix_bytes(i, H)}
    mtp, mep = lay.moe_split()
    e = a.experts // mep
    i = a.moe_intermediate // mtp
    experts = e * (q.experts.matrix_bytes(H, 2 * i) + q.experts.matrix_bytes(i, H))
    if a.expert_bias:
        experts += hb * e * (2 * i + H)
    si = a.shared_intermediate // lay.tp
    shared = q.shared_experts.matrix_bytes(H, 2 * si) + q.shared_experts.matrix_bytes(si, H) if si else 0.0
    shared += hb * H * a.shared_gate
    router = hb * H * a.experts + hb * a.experts * (a.router_bias + a.router_correction_bias)
    return {"experts": experts, "shared_experts": shared, "router": router}


def weight_bytes_per_gpu(model: str | Path | dict | Arch, layout: Layout | dict | int | None = None,
                         weights: str | None = None, moe_weights: str | None = None, *,
                         stage: int | None = None, include_vision: bool = True) -> WeightBytes:
    """Weight bytes one GPU holds under ``layout``, by term.  ``weights`` / ``moe_weights`` override the
    checkpoint's precision (see `precision`).  With pipeline parallelism the most loaded stage is returned
    unless ``stage`` is given.  ``include_vision=False`` leaves out a multimodal model's vision tower (vLLM
    does not build it when every modality's limit_mm_per_prompt is 0).  MTP / next-n prediction layers are
    not counted: vLLM loads them only for speculative decoding."""
    a = as_arch(model, weights, moe_weights)
    lay = as_layout(layout)
    validate(a, lay)
    stages = stage_layers(a.layers, lay.pp)
    if stage is not None:
        if not 0 <= stage < lay.pp:
            raise InputError(f"stage must be in 0..{lay.pp - 1}, got {stage}", field="stage")
        return _stage_weights(a, lay, stage, stages[stage], include_vision)
    return max((_stage_weights(a, lay, s, r, include_vision) for s, r in enumerate(stages)), key=lambda w: w.total)


@functools.lru_cache(maxsize=4096)  # a search asks for the same layouts' weights once per engine limit
def _stage_weights(a: Arch, lay: Layout, s: int, layers: range, include_vision: bool) -> WeightBytes:
    tp, H, hb = lay.tp, a.hidden, a.quant.high.element_bytes
    first, last = s == 0, s == lay.pp - 1
    vocab_rows = math.ceil(math.ceil(a.vocab / VOCAB_PADDING) * VOCAB_PADDING / tp)
    emb = hb * vocab_rows * H if first else 0.0
    head = hb * vocab_rows * H if last and (not a.tie_embeddings or not first) else 0.0
    terms = dict(attention=0.0, dense_mlp=0.0, shared_experts=0.0, experts=0.0, router=0.0)
    for i in layers:
        terms["attention"] += _layer_attention_bytes(a, a.attn_types[i], tp)
        for k, v in _layer_mlp_bytes(a, a.mlp_types[i], lay).items():
            terms[k] += v
    norms = hb * H * (2 * len(layers) + last)
    vision = hb * a.vision_params / tp if include_vision and first else 0.0
    buf = 0.0 if a.quant.high.kind == "count" else hb  # buffers are not parameters
    rope = buf * a.rope_positions * a.rotary_dim
    absorbed = 0.0
    if a.mla:
        absorbed = buf * len(layers) * a.kv_lora_rank * (a.heads // tp) * (a.qk_nope_head_dim + a.v_head_dim)
    total = emb + head + sum(terms.values()) + norms + vision + rope + absorbed
    return WeightBytes(embedding=emb, lm_head=head, norms=norms, vision=vision, rope_cache=rope,
                       mla_absorbed=absorbed, total=total, **terms)


def param_count(model: str | Path | dict | Arch, include_vision: bool = True) -> int:
    """Parameters of the model (language model, plus the vision estimate), one unsplit replica, embedding
    and lm_head counted once each (once in all when tied)."""
    a = as_arch(model)._replace(quant=Quant(*(Precision("count"),) * 5, "count"))
    return int(round(weight_bytes_per_gpu(a, Layout(), include_vision=include_vision).total))


# ----------------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------------

def kv_dtype_bytes(a: Arch, kv_cache_dtype: str = "auto") -> int:
    return kv_element_bytes(kv_cache_dtype)


def kv_element_bytes(kv_cache_dtype: str = "auto") -> int:
    """Bytes per KV-cache element of vLLM's ``--kv-cache-dtype`` (auto: the bf16/fp16 activations, 2);
    InputError (field ``kv_cache_dtype``) for a name vLLM does not have."""
    key = str(kv_cache_dtype).lower()
    if key not in _KV_DTYPE_BYTES:
        raise InputError(f"unknown kv_cache_dtype '{kv_cache_dtype}' (expected auto, bf16, fp16 or fp8)",
                         field="kv_cache_dtype")
    b = _KV_DTYPE_BYTES[key]
    return 2 if b is None else b


def layer_kv_bytes_per_token(a: Arch, kind: str, tp: int, kv_cache_dtype: str = "auto") -> float:
    """KV-cache bytes one layer stores per token on one GPU.

    GQA: K and V of the GPU's KV heads (replicated heads count on every GPU that holds them).  MLA: the
    compressed latent (kv_lora_rank) and the shared RoPE key (qk_rope_head_dim), one vector per token that
    every TP rank keeps whole: vLLM's MLA backends give the cache one KV head, never split by TP.  With fp8 it
    is 1 byte per element, except DeepSeek sparse attention's fp8_ds_mla layout: 512 fp8 latent values, four
    fp32 scales and the 64 RoPE values in bf16 = 656 bytes.  The DSA indexer adds its key cache: index_head_dim
    fp8 values and one fp32 scale per 128 = 132 bytes.  Linear-attention layers keep a fixed state per
    sequence instead (`linear_state_bytes_per_seq`) and nothing per token."""
    if kind == "linear":
        return 0.0
    b = kv_dtype_bytes(a, kv_cache_dtype)
    if a.mla:
        if a.index_heads:
            latent = 656.0 if b == 1 else 2.0 * (a.kv_lora_rank + a.qk_rope_head_dim)
            return latent + a.index_head_dim + 4.0 * math.ceil(a.index_head_dim / 128)
        return float(b * (a.kv_lora_rank + a.qk_rope_head_dim))
    return float(2 * max(a.kv_heads // tp, 1) * a.head_dim * b)


def kv_bytes_per_token(model: str | Path | dict | Arch, layout: Layout | dict | int | None = None,
                       kv_cache_dtype: str = "auto", *, context_tokens: int | None = None,
                       stage: int | None = None) -> float:
    """KV-cache bytes per token on one GPU (its pipeline stage's layers; the most loaded stage by default).

    ``context_tokens=None``: every attention layer stores every token, the way vLLM sizes the pool and
    reports "GPU KV cache size" in tokens.  With ``context_tokens=n``: the mean bytes per token of one
    sequence of n tokens when sliding-window layers keep at most ``window`` tokens and chunked-local layers
    at most ``chunk`` tokens (block rounding left out), as vLLM's hybrid allocator holds them."""
    a = as_arch(model)
    lay = as_layout(layout)
    validate(a, lay)
    stages = stage_layers(a.layers, lay.pp)
    rngs = [stages[stage]] if stage is not None else stages
    best = 0.0
    for rng in rngs:
        tot = 0.0
        for i in rng:
            kind = a.attn_types[i]
            per = layer_kv_bytes_per_token(a, kind, lay.tp, kv_cache_dtype)
            if context_tokens is not None and context_tokens > 0:
                cap = a.window if kind == "sliding" else a.chunk if kind == "chunked" else 0
                if cap:
                    per *= min(1.0, cap / context_tokens)
            tot += per
        best = max(best, tot)
    return best


def linear_state_bytes_per_seq(model: str | Path | dict | Arch, layout: Layout | dict | int | None = None) -> float:
    """Recurrent state one sequence holds in the linear-attention layers of one GPU (Gated DeltaNet:
    the (kernel-1)-token convolution state in the model dtype and a k_dim x v_dim fp32 state per value
    head), summed over all layers of the model's linear type.  0 for attention-only models."""
    a = as_arch(model)
    lay = as_layout(layout)
    validate(a, lay)
    n = sum(t == "linear" for t in a.attn_types)
    if not n:
        return 0.0
    nk, nv = a.lin_k_heads // lay.tp, a.lin_v_heads // lay.tp
    conv = (a.conv_kernel - 1) * (2 * nk * a.lin_k_dim + nv * a.lin_v_dim) * 2.0
    ssm = nv * a.lin_k_dim * a.lin_v_dim * 4.0
    return n * (conv + ssm)


# ----------------------------------------------------------------------------------------------------------
# Non-weight terms and the capacity
# ----------------------------------------------------------------------------------------------------------

def activation_peak_bytes(model: str | Path | dict | Arch, layout: Layout | dict | int | None = None, *,
                          max_num_batched_tokens: int = 8192, max_num_seqs: int = 256,
                          last_stage: bool = True) -> float:
    """Peak torch memory above the weights in vLLM's profile run on one GPU: a dummy forward pass of
    T = max_num_batched_tokens tokens, then (on the last pipeline stage) a sampler warm-up of
    R = min(max_num_seqs, T) requests over the full vocabulary.

    forward: T tokens x 2 bytes x (LIVE_HIDDEN_TENSORS x hidden + the largest per-layer intermediate:
    gate/up output and SiLU output of a dense MLP (3 x intermediate / tp), of the routed experts
    (top_k x (3 x expert size / moe_tp + hidden), fused-MoE caches) plus the shared expert, or q, k, v and
    the attention output).  sampler: SAMPLER_FP32_LOGIT_COPIES x R x vocab x 4 bytes plus the
    LIVE_HIDDEN_TENSORS hidden-size tensors of the forward pass that are still alive."""
    a = as_arch(model)
    lay = as_layout(layout)
    validate(a, lay)
    T = _positive_int(max_num_batched_tokens, "max_num_batched_tokens")
    R = min(_positive_int(max_num_seqs, "max_num_seqs"), T)
    act, H, tp = 2.0, a.hidden, lay.tp
    hidden_live = LIVE_HIDDEN_TENSORS * T * H * act
    widest = 0.0
    if "dense" in a.mlp_types:
        widest = max(widest, 3.0 * a.intermediate / tp)
    if "moe" in a.mlp_types:
        mtp, _ = lay.moe_split()
        widest = max(widest, a.top_k * (3.0 * a.moe_intermediate / mtp + H) + 3.0 * a.shared_intermediate / tp)
    if a.mla:
        hl = a.heads / tp
        widest = max(widest, hl * (a.qk_nope_head_dim + a.qk_rope_head_dim) * 2 + hl * a.v_head_dim)
    else:
        hl, kvl = a.heads / tp, max(a.kv_heads // tp, 1)
        widest = max(widest, (2.0 * hl + 2.0 * kvl) * a.head_dim)
    forward = hidden_live + T * act * widest
    sampler = SAMPLER_FP32_LOGIT_COPIES * R * a.vocab * 4.0 + hidden_live if last_stage else 0.0
    return max(forward, sampler)


def non_torch_bytes(layout: Layout | dict | int | None = None) -> float:
    """Non-torch memory the profile run adds on one GPU: NON_TORCH_BYTES, plus NCCL_BYTES when the GPU
    exchanges data with peers (tp, pp, attention_dp or expert parallelism above 1)."""
    lay = as_layout(layout)
    talks = lay.tp > 1 or lay.pp > 1 or lay.attention_dp > 1 or (lay.moe_ep or 1) > 1
    return NON_TORCH_BYTES + (NCCL_BYTES if talks else 0.0)


class KVCapacity(NamedTuple):
    """KV-cache capacity of one deployment and the terms it comes from (bytes per GPU; the binding
    pipeline stage)."""

    memory_bytes: float  # device memory as the driver reports it
    budget_bytes: float  # gpu_memory_utilization x memory_bytes
    weight_bytes: float  # everything loading allocates (WeightBytes.total)
    activation_bytes: float  # activation peak of the profile run
    non_torch_bytes: float
    cuda_graph_bytes: float
    kv_bytes: float  # what is left for the KV cache (negative: the weights do not fit)
    kv_bytes_per_token: float  # every cache layer of the stage storing every token
    block_size: int
    blocks: int  # blocks in the pool (vLLM's num_gpu_blocks)
    groups: int  # KV-cache groups sharing the pool (1 unless the hybrid allocator splits layer types)
    tokens: int  # vLLM's "GPU KV cache size": blocks // groups x block_size
    weights: WeightBytes

    @property
    def fits(self) -> bool:
        """Whether the weights and profile-run peak leave room for at least one block."""
        return self.blocks > 0


def kv_capacity_from_terms(memory_bytes, gpu_memory_utilization, weight_bytes, activation_bytes, non_torch,
                           cuda_graph_bytes, bytes_per_block):
    """jnp form of the capacity: blocks = floor((util x memory - weights - activation - non-torch - graphs)
    / bytes per block), at least 0.  Broadcasts over arrays, for sweeps; float32, so a result can be one block
    off the exact integer arithmetic of `kv_capacity_tokens` when it falls on a block boundary."""
    f = [jnp.asarray(x, dtype=jnp.float32) for x in (memory_bytes, gpu_memory_utilization, weight_bytes,
                                                     activation_bytes, non_torch, cuda_graph_bytes, bytes_per_block)]
    mem, util, w, act, nt, cg, per_block = f
    kv = jnp.ceil(mem * util) - w - act - nt - cg
    return jnp.maximum(jnp.floor(kv / per_block), 0.0)


def _positive_int(v, field: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise InputError(f"must be a positive integer, got {v!r}", field=field)
    return v


def _groups(a: Arch, layers: range, hybrid: bool) -> tuple[int, int]:
    """(layers sharing one block id, number of groups) of vLLM's KV-cache grouping for one stage."""
    kinds = [a.attn_types[i] for i in layers if a.attn_types[i] != "linear"]
    if not kinds:
        return 0, 0
    counts: dict[str, int] = {}
    for k in kinds:
        counts[k] = counts.get(k, 0) + 1
    if not hybrid or len(counts) == 1:
        return len(kinds), 1
    lo, hi = min(counts.values()), max(counts.values())
    size = hi if hi < 1.25 * lo else lo
    return size, sum(math.ceil(c / size) for c in counts.values())


def kv_capacity_tokens(model: str | Path | dict | Arch, layout: Layout | dict | int | None = None,
                       gpu: str | GPU = "H100", gpu_memory_utilization: float = 0.9, *,
                       max_num_batched_tokens: int = 8192, max_num_seqs: int = 256,
                       kv_cache_dtype: str = "auto", weights: str | None = None,
                       moe_weights: str | None = None, block_size: int = BLOCK_SIZE,
                       hybrid_allocator: bool | None = None, include_vision: bool = True,
                       cuda_graph_bytes: float = 0.0) -> KVCapacity:
    """KV-cache capacity of a deployment in blocks and tokens, with the terms that decide it.

    ``hybrid_allocator``: whether vLLM's hybrid KV-cache manager keeps sliding-window / chunked-local layers in
    groups of their own (None: vLLM 0.15's default, on unless the model has chunked-local attention; a KV
    connector such as CPU offloading turns it off).  With it the pool's blocks are shared by the groups and the
    reported token capacity is blocks // groups x block_size; without it every layer is a full-attention layer.
    ``cuda_graph_bytes``: CUDA-graph memory charged before the cache (0 for vLLM < 0.21; later versions profile
    it by default).  Models with linear-attention (Gated DeltaNet) layers are refused: vLLM enlarges the
    attention block so that a page also holds a recurrent state, which is not modelled."""
    a = as_arch(model, weights, moe_weights)
    lay = as_layout(layout)
    validate(a, lay)
    g = gpu if isinstance(gpu, GPU) else get_gpu(gpu)
    if not g.memory_bytes:
        raise InputError(f"no device memory known for {g.name}", field="gpu")
    util = gpu_memory_utilization
    if not isinstance(util, (int, float)) or isinstance(util, bool) or not 0.0 < util <= 1.0:
        raise InputError(f"must be in (0, 1], got {util!r}", field="gpu_memory_utilization")
    _positive_int(block_size, "block_size")
    if "linear" in a.attn_types:
        raise InputError(f"{a.name} has linear-attention (Gated DeltaNet) layers: vLLM sizes their pages to the "
                         "recurrent state, which the capacity model does not describe yet", field="model")
    if hybrid_allocator is None:
        hybrid_allocator = "chunked" not in a.attn_types
    stages = stage_layers(a.layers, lay.pp)
    budget = float(math.ceil(g.memory_bytes * util))
    best = None
    for s, rng in enumerate(stages):
        w = _stage_weights(a, lay, s, rng, include_vision)
        act = activation_peak_bytes(a, lay, max_num_batched_tokens=max_num_batched_tokens,
                                    max_num_seqs=max_num_seqs, last_stage=s == len(stages) - 1)
        nt = non_torch_bytes(lay)
        kv = budget - w.total - act - nt - cuda_graph_bytes
        per_token = kv_bytes_per_token(a, lay, kv_cache_dtype, stage=s)
        size, n_groups = _groups(a, rng, hybrid_allocator)
        page = layer_kv_bytes_per_token(a, a.attn_types[rng[0]], lay.tp, kv_cache_dtype) * block_size
        if n_groups > 1:
            blocks = max(int(kv // page // size), 0)
        else:
            blocks = max(int(kv // (per_token * block_size)), 0)
        cap = KVCapacity(memory_bytes=g.memory_bytes, budget_bytes=budget, weight_bytes=w.total,
                         activation_bytes=act, non_torch_bytes=nt, cuda_graph_bytes=float(cuda_graph_bytes),
                         kv_bytes=kv, kv_bytes_per_token=per_token, block_size=block_size, blocks=blocks,
                         groups=max(n_groups, 1), tokens=blocks // max(n_groups, 1) * block_size, weights=w)
        if best is None or cap.blocks < best.blocks:
            best = cap
    return best


def sequence_blocks(capacity: KVCapacity, tokens) -> int:
    """Blocks one sequence of ``tokens`` tokens (cached + new) holds in the pool: whole blocks in every KV
    group (full-attention accounting: the bound vLLM's scheduler can rely on)."""
    return -(-int(tokens) // capacity.block_size) * capacity.groups


def batch_fits(capacity: KVCapacity, context_tokens) -> bool:
    """Whether sequences of these lengths (tokens each) fit in the pool at once (`sequence_blocks`)."""
    return sum(sequence_blocks(capacity, n) for n in context_tokens) <= capacity.blocks


def max_sequences(capacity: KVCapacity, tokens) -> int:
    """How many sequences of ``tokens`` tokens each fit in the pool at once (`sequence_blocks`)."""
    return capacity.blocks // sequence_blocks(capacity, tokens)
