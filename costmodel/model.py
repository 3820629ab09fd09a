"""Model architecture read from a Hugging Face `config.json`: `Arch` (every shape the memory model needs, for
dense, MoE, MLA, sliding-window and hybrid models) and `ModelConfig` (the view the step model prices)."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from . import sampling
from .errors import InputError, json_type
from .io import read_json

DENSE_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# Mixture-of-experts models with standard (GQA) attention and no shared experts or with TP-split ones.
GQA_MOE_ARCHS = ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "MiniMaxM2ForCausalLM", "GptOssForCausalLM")
# Mixture-of-experts models with multi-head latent attention (MLA) of the geometry the MLA tables measure
# (`MLA_GEOMETRY`): DeepSeek-V3/R1 and Kimi-K2/K2.5 (whose text model is a DeepseekV3ForCausalLM).
MLA_ARCHS = ("DeepseekV3ForCausalLM",)
# Llama-4 (Scout, Maverick): a multimodal wrapper around an MoE text model with a shared expert and chunked
# local attention in three of four layers; only the text model is priced (`ModelConfig._llama4`).
LLAMA4_ARCHS = ("Llama4ForConditionalGeneration", "Llama4ForCausalLM")
MOE_ARCHS = GQA_MOE_ARCHS + MLA_ARCHS + LLAMA4_ARCHS
SUPPORTED_ARCHS = DENSE_ARCHS + MOE_ARCHS
# The MLA geometry of the measured MLA module tables (bench_data/README.md "MLA attention modules"):
# DeepSeek-V3's hidden size, q/kv LoRA ranks and head dims.  Heads per GPU are a table axis.
MLA_GEOMETRY = {"hidden_size": 7168, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64, "v_head_dim": 128}
# Keys whose presence marks an architecture the dense model does not describe yet.
_UNSUPPORTED_KEYS = {  # attention kinds first: they are what a refused MoE model lacks most often
    "kv_lora_rank": "multi-head latent attention (MLA)", "layer_types": "hybrid attention layers",
    "linear_num_value_heads": "linear attention", "num_local_experts": "mixture-of-experts",
    "num_experts": "mixture-of-experts", "n_routed_experts": "mixture-of-experts",
}
# Why a mixture-of-experts architecture outside MOE_ARCHS is refused: what its attention needs beyond the tables.
_WHY_NOT = {
    "Qwen3NextForCausalLM": "Qwen3-Next is not supported yet: its Gated DeltaNet linear-attention layers have no "
                            "measured table",
    "DeepseekV2ForCausalLM": "DeepSeek-V2's multi-head latent attention is not supported yet: the MLA tables "
                             "measure DeepSeek-V3's geometry (hidden 7168, q_lora_rank 1536, kv_lora_rank 512), "
                             "this model has another (e.g. no q_lora_rank)",
    "DeepseekV32ForCausalLM": "DeepSeek sparse attention (DSA, index_n_heads) is not supported yet: its "
                              "lightning indexer and sparse MLA kernel have no measured table",
    "GlmMoeDsaForCausalLM": "DeepSeek sparse attention (DSA, index_n_heads) is not supported yet: its "
                            "lightning indexer and sparse MLA kernel have no measured table",
}
_DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
           "float8": "fp8", "fp8": "fp8", "float8_e4m3fn": "fp8"}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}
# How routed experts can be stored (fp8_block: fp8 with a scale per 128x128 block; int4_wo: 4-bit weight-only).
MOE_WEIGHTS = ("bf16", "fp16", "fp8", "fp8_block", "mxfp4", "int4_wo")


def normalize_dtype(value: str, where: str | None = None, field: str = "dtype") -> str:
    key = str(value).strip().lower()
    if key not in _DTYPES:
        raise InputError(f"unknown dtype '{value}' (expected one of bf16, fp16, fp8)", where, field)
    return _DTYPES[key]


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of a dense decoder-only transformer (full model, before tensor parallelism)."""

    name: str
    arch: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool
    dtype: str  # weight/GEMM dtype: bf16, fp16 or fp8
    sliding_window: float = math.inf  # tokens each query attends to at most (inf = full attention)
    qk_norm: bool = False  # Qwen3 RMS-normalizes q and k per head
    max_position_embeddings: float = math.inf  # longest context the model was built for (inf = unstated)
    # mixture of experts (all 0 for a dense model)
    experts: int = 0  # routed experts per MoE layer
    top_k: int = 0  # experts per token
    moe_intermediate: int = 0  # one expert's intermediate size
    shared_intermediate: int = 0  # all shared experts of a layer together (0 if none)
    moe_layers: int = 0  # layers whose MLP is a mixture of experts
    expert_dtype: str = ""  # how the routed experts are stored: bf16, fp16, fp8, fp8_block, mxfp4, int4_wo
    # layers that attend within `sliding_window` while the others attend fully (gpt-oss: every other layer);
    # 0 when every layer attends alike (all within `sliding_window`, or all fully when it is inf)
    sliding_layers: int = 0
    # multi-head latent attention (all 0 without MLA): LoRA ranks and head dims (elements)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    # vLLM's per-request sampling defaults from the checkpoint's generation_config.json (`sampling`), as items;
    # None when the model folder has no generation_config.json (vLLM's own defaults then)
    sampling_defaults: tuple | None = None

    def sampler_filter(self, given: dict | None = None) -> str:
        """The filter vLLM's sampler runs over this model's vocabulary (`sampling.FILTERS`) for requests sampled
        with ``given`` parameters over the model's generation-config defaults."""
        return sampling.merged(self.sampling_defaults, given).filter(self.vocab_size)

    @property
    def mla(self) -> bool:
        """Multi-head latent attention (`MLA_ARCHS`)."""
        return self.kv_lora_rank > 0

    @property
    def mla_gemm_dtype(self) -> str:
        """The projection dtype of the MLA tables that prices this model's attention: fp8_block for fp8
        (DeepSeek-V3's checkpoint stores 128x128 block-scaled fp8; the tables measure no per-tensor fp8), bf16
        for bf16 and fp16."""
        return "fp8_block" if self.dtype == "fp8" else "bf16"

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def with_expert_dtype(self, expert_dtype: str) -> "ModelConfig":
        """The mixture-of-experts model with its routed experts stored as ``expert_dtype`` (`MOE_WEIGHTS`)."""
        if not self.experts:
            raise InputError(f"{self.name} has no experts", field="moe_weights")
        if expert_dtype not in MOE_WEIGHTS:
            raise InputError(f"must be one of {', '.join(MOE_WEIGHTS)}, got {expert_dtype!r}", field="moe_weights")
        return replace(self, expert_dtype=expert_dtype)

    def with_dtype(self, dtype: str) -> "ModelConfig":
        """The model with every GEMM weight (experts included) stored as ``dtype``; fp8 keeps experts that the
        checkpoint already stores as 128x128 block-scaled fp8 (`with_expert_dtype` picks per-tensor fp8)."""
        dt = normalize_dtype(dtype)
        expert = self.expert_dtype if (dt == "fp8" and self.expert_dtype == "fp8_block") else dt
        return replace(self, dtype=dt, expert_dtype=expert if self.experts else "")

    @classmethod
    def from_dict(cls, cfg: dict, name: str, where: str) -> "ModelConfig":
        """Build from a parsed config.json; `where` names the file for error messages."""
        if not isinstance(cfg, dict):
            raise InputError(f"a model config must be a JSON object, got {json_type(cfg)}", where)
        text = cfg.get("text_config") if "hidden_size" not in cfg else None
        top_arch = cfg.get("architectures")
        if isinstance(top_arch, list) and top_arch and top_arch[0] in LLAMA4_ARCHS:
            return cls._llama4(cfg, top_arch[0], name, where)
        if isinstance(text, dict) and (text.get("architectures") or [None])[0] in MLA_ARCHS:
            return cls._mla(cfg, text["architectures"][0], name, where)  # Kimi-K2.5: the text model is priced
        if "text_config" in cfg and "hidden_size" not in cfg:
            raise InputError("multimodal configs (text_config) are not supported yet", where, "text_config")
        archs = cfg.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise InputError(f'must be a list of names like ["LlamaForCausalLM"], got {archs!r}', where,
                             "architectures")
        arch = archs[0] if archs else cfg.get("model_type", "?")
        if arch in MLA_ARCHS:
            return cls._mla(cfg, arch, name, where)
        for key, what in _UNSUPPORTED_KEYS.items():
            if key == "layer_types" and _attention_layer_types(cfg.get(key)):
                continue  # sliding-window and full-attention layers are priced (`sliding_layers`)
            if cfg.get(key) and not (arch in MOE_ARCHS and what == "mixture-of-experts"):
                shown = cfg[key]
                if key == "layer_types" and isinstance(shown, list):  # name the first layer type not priced
                    shown = next((t for t in shown if t not in _ATTENTION_LAYER_TYPES), shown)
                why = _WHY_NOT.get(arch, f"{what} ({key}={shown!r}) is not supported yet")
                raise InputError(f"{why}; supported: {', '.join(SUPPORTED_ARCHS)}", where, key)
        if arch not in SUPPORTED_ARCHS:
            raise InputError(f"architecture '{arch}' is not supported yet; supported: "
                             f"{', '.join(SUPPORTED_ARCHS)}", where, "architectures")

        def need(key):
            if key not in cfg or cfg[key] is None:
                raise InputError("missing required key", where, key)
            return positive_int(cfg[key], where, key)

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = need("num_key_value_heads") if cfg.get("num_key_value_heads") is not None else heads
        if cfg.get("head_dim") is not None:
            head_dim = need("head_dim")
        elif hidden % heads:
            raise InputError(f"missing, and hidden_size={hidden} is not a multiple of num_attention_heads={heads}",
                             where, "head_dim")
        else:
            head_dim = hidden // heads
        if heads % kv_heads:
            raise InputError(f"num_attention_heads={heads} is not a multiple of {kv_heads}", where,
                             "num_key_value_heads")
        window = cfg.get("sliding_window")
        if cfg.get("use_sliding_window") is False or window is None:
            window = math.inf
        elif isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise InputError(f"must be a positive integer (tokens) or null for full attention, got {window!r}",
                             where, "sliding_window")
        sliding = 0
        if cfg.get("layer_types"):
            window, sliding = _layer_windows(cfg, need("num_hidden_layers"), window, where)
        max_pos = cfg.get("max_position_embeddings")
        max_pos = math.inf if max_pos is None else positive_int(max_pos, where, "max_position_embeddings")
        tie = cfg.get("tie_word_embeddings", False)
        if tie is not None and not isinstance(tie, bool):
            raise InputError(f"must be true or false, got {tie!r}", where, "tie_word_embeddings")
        dtype = normalize_dtype(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16", where, "torch_dtype")
        if arch in MOE_ARCHS and _quant_method(cfg.get("quantization_config")) in _FP4:
            dtype = _moe_fp4_dtype(arch_from_config(cfg, name, where), where)
        else:
            dtype = quantized_weight_dtype(cfg.get("quantization_config"), where) or dtype
        return cls(
            name=name, arch=arch, hidden_size=hidden, num_layers=need("num_hidden_layers"),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            intermediate_size=need("intermediate_size"), vocab_size=need("vocab_size"),
            tie_embeddings=bool(tie), dtype=dtype, sliding_window=float(window),
            qk_norm=cfg.get("model_type") == "qwen3", max_position_embeddings=float(max_pos),
        ) if arch not in MOE_ARCHS else cls(
            name=name, arch=arch, hidden_size=hidden, num_layers=need("num_hidden_layers"),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            intermediate_size=need("intermediate_size"), vocab_size=need("vocab_size"),
            tie_embeddings=bool(tie), dtype=dtype, sliding_window=float(window),
            max_position_embeddings=float(max_pos), sliding_layers=sliding,
            **_moe_fields(arch_from_config(cfg, name, where)))

    @classmethod
    def _llama4(cls, cfg: dict, arch: str, name: str, where: str) -> "ModelConfig":
        """A Llama-4 text model, read through `arch_from_config` (the vision tower is not priced): routed
        experts and one shared expert of the expert size in the MoE layers, ``intermediate_size_mlp`` in the
        dense ones; the chunked local-attention layers (``attention_chunk_size``, every layer but each fourth)
        priced as sliding-window layers of the chunk (exact while a context is within one chunk, an upper bound
        beyond: a chunked layer attends the current chunk only).  Attention, router and lm_head keep the
        attention weights' precision (the fp8 checkpoints leave them bf16); experts their own."""
        a = arch_from_config(cfg, name, where)
        kind = a.quant.attention.kind
        if kind not in DTYPE_BYTES:
            raise InputError(f"attention weights in {kind} are not priced (bf16, fp16, fp8 are)", where,
                             "quantization_config")
        chunked = a.attn_types.count("chunked")
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
        return cls(
            name=name, arch=arch, hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
            num_kv_heads=a.kv_heads, head_dim=a.head_dim, intermediate_size=a.intermediate, vocab_size=a.vocab,
            tie_embeddings=a.tie_embeddings, dtype=kind,
            sliding_window=float(a.chunk) if chunked else math.inf,
            sliding_layers=chunked if 0 < chunked < a.layers else 0,
            max_position_embeddings=float(text.get("max_position_embeddings") or math.inf),
            **{**_moe_fields(a), "qk_norm": bool(text.get("use_qk_norm"))})

    @classmethod
    def _mla(cls, cfg: dict, arch: str, name: str, where: str) -> "ModelConfig":
        """A DeepSeek-V3-style model (`MLA_ARCHS`): MLA attention of the measured geometry (`MLA_GEOMETRY`),
        ``first_k_dense_replace`` dense layers, shared and routed experts; read through `arch_from_config`
        (a multimodal wrapper's ``text_config``: only the text model is priced, not the vision tower)."""
        a = arch_from_config(cfg, name, where)
        if a.index_heads:
            raise InputError(f"{_WHY_NOT['DeepseekV32ForCausalLM']}; supported: {', '.join(SUPPORTED_ARCHS)}",
                             where, "index_n_heads")
        got = {"hidden_size": a.hidden, "q_lora_rank": a.q_lora_rank, "kv_lora_rank": a.kv_lora_rank,
               "qk_nope_head_dim": a.qk_nope_head_dim, "qk_rope_head_dim": a.qk_rope_head_dim,
               "v_head_dim": a.v_head_dim}
        for key, want in MLA_GEOMETRY.items():
            if got[key] != want:
                raise InputError(f"MLA with {key}={got[key]} is not supported yet: the MLA tables measure "
                                 f"DeepSeek-V3's geometry ({', '.join(f'{k} {v}' for k, v in MLA_GEOMETRY.items())})",
                                 where, key)
        kinds = {_GEMM_DTYPE.get(p.kind, p.kind) for p in (a.quant.attention, a.quant.dense_mlp, a.quant.shared_experts)}
        if len(kinds) != 1 or not kinds <= set(DTYPE_BYTES):
            raise InputError(f"attention, dense-MLP and shared-expert weights in {', '.join(sorted(kinds))} are not "
                             "priced (one of bf16, fp16, fp8 for all three is)", where, "quantization_config")
        return cls(
            name=name, arch=arch, hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
            num_kv_heads=a.heads, head_dim=a.qk_nope_head_dim + a.qk_rope_head_dim, intermediate_size=a.intermediate,
            vocab_size=a.vocab, tie_embeddings=a.tie_embeddings, dtype=kinds.pop(),
            max_position_embeddings=float(cfg.get("max_position_embeddings")
                                          or (cfg.get("text_config") or {}).get("max_position_embeddings")
                                          or math.inf),
            q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank, qk_rope_head_dim=a.qk_rope_head_dim,
            **_moe_fields(a))


# The GEMM dtype of a weight precision priced as a whole-matrix dtype (block-scaled fp8 runs fp8 GEMMs).
_GEMM_DTYPE = {"fp8_block": "fp8"}


_ATTENTION_LAYER_TYPES = ("sliding_attention", "full_attention")


def _attention_layer_types(types) -> bool:
    """Whether a config's ``layer_types`` lists only softmax-attention layers (sliding-window or full)."""
    return isinstance(types, list) and bool(types) and all(t in _ATTENTION_LAYER_TYPES for t in types)


def _layer_windows(cfg: dict, layers: int, window: float, where: str) -> tuple[float, int]:
    """(``ModelConfig.sliding_window``, ``ModelConfig.sliding_layers``) from a ``layer_types`` list of
    sliding-window and full-attention layers: every layer sliding keeps the window for all (0 sliding
    layers: one kind of layer), none sliding is full attention, a mix keeps the window for the sliding
    layers only."""
    types = cfg["layer_types"]
    if len(types) != layers:
        raise InputError(f"must list one type per layer ({layers}), got {len(types)}", where, "layer_types")
    n = types.count("sliding_attention")
    if n and not math.isfinite(window):
        raise InputError("layer_types has sliding_attention layers but no sliding window is set", where,
                         "sliding_window")
    if n == 0:
        return math.inf, 0
    return window, (0 if n == layers else n)


def _quant_method(q) -> str:
    """A ``quantization_config``'s quant_method, lower case ("" when there is none)."""
    m = q.get("quant_method") if isinstance(q, dict) else None
    return m.lower() if isinstance(m, str) else ""


def _moe_fp4_dtype(a: "Arch", where: str) -> str:
    """The GEMM dtype of a mixture-of-experts checkpoint whose routed experts are 4-bit floats (gpt-oss's
    mxfp4): vLLM quantises only the experts, so attention, router, embeddings and lm_head keep the
    attention precision of `Arch.quant`; the experts' precision is `ModelConfig.expert_dtype`."""
    kind = a.quant.attention.kind
    if kind not in DTYPE_BYTES:
        raise InputError(f"attention weights in {kind} are not priced (bf16, fp16, fp8 are)", where,
                         "quantization_config")
    return kind


def _moe_fields(a: "Arch") -> dict:
    """The mixture-of-experts fields of `ModelConfig` (and its q/k norm), from the architecture reader."""
    expert_dtype = {"int4": "int4_wo"}.get(a.quant.experts.kind, a.quant.experts.kind)
    return dict(experts=a.experts, top_k=a.top_k, moe_intermediate=a.moe_intermediate,
                shared_intermediate=a.shared_intermediate, moe_layers=a.mlp_types.count("moe"),
                expert_dtype=expert_dtype, qk_norm=a.qk_norm_params > 0)


def positive_int(v, where: str | None, field: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise InputError(f"must be a positive integer, got {v!r}", where, field)
    return v


# Weight formats of `quantization_config` that the step model cannot price yet (its GEMM tables are bf16/fp16
# and fp8), by `quant_method`.
_WEIGHT_ONLY_INT = ("awq", "awq_marlin", "gptq", "gptq_marlin", "gptq_marlin_24", "gptq_bitblas", "marlin",
                    "bitblas", "hqq", "aqlm", "exl2", "squeezellm", "moe_wna16", "auto-round", "int4")
_FP4 = ("mxfp4", "nvfp4", "modelopt_fp4", "fp4")
_FP8_METHODS = ("fp8", "fbgemm_fp8", "ptpc_fp8")


def quantized_weight_dtype(q, where: str | None = None) -> str | None:
    """The GEMM weight dtype a Hugging Face ``quantization_config`` gives: "fp8" for FP8 weights (``fp8``,
    ``fbgemm_fp8``, ``ptpc_fp8``, ``modelopt`` FP8, ``compressed-tensors`` with 8-bit float weights), None
    without quantization (absent, null or empty).  Every other format raises `InputError` naming it: the
    step model has no tables for 4-bit, integer or sparse weights, nor for a quantized KV cache, and pricing
    them as bf16 would be silently wrong."""
    field = "quantization_config"
    if q is None or q == {}:
        return None
    if not isinstance(q, dict):
        raise InputError(f"must be an object or null, got {json_type(q)}", where, field)
    method = q.get("quant_method")
    if not isinstance(method, str) or not method:
        raise InputError(f"has no quant_method (got {method!r}); cannot tell how the weights are stored",
                         where, field + ".quant_method")
    method = method.lower()
    field += ".quant_method"
    if q.get("kv_cache_scheme") or q.get("kv_cache_quant_algo"):
        raise InputError(f"a quantized KV cache ({method}) is not supported yet: the step model prices a "
                         "bf16/fp16 KV cache", where, "quantization_config.kv_cache_scheme")
    if method in _FP8_METHODS:
        return "fp8"
    if method == "modelopt":
        algo = str(q.get("quant_algo", "")).upper()
        if algo == "FP8":
            return "fp8"
        raise InputError(f"modelopt quant_algo {algo or None!r} is not supported yet (fp8 weights are)",
                         where, "quantization_config.quant_algo")
    if method in _WEIGHT_ONLY_INT:
        bits = q.get("bits", q.get("w_bit", 4 if method.startswith(("awq", "gptq", "marlin", "int4")) else None))
        raise InputError(f"{f'{bits}-bit ' if bits else ''}weight-only ({method}) is not supported yet; supported: "
                         "bf16, fp16 and fp8 weights", where, field)
    if method in _FP4:
        raise InputError(f"4-bit floating-point weights ({method}) are not supported yet; supported: bf16, "
                         "fp16 and fp8 weights", where, field)
    if method == "bitsandbytes":
        bits = 4 if q.get("load_in_4bit") else 8
        raise InputError(f"{bits}-bit bitsandbytes weights are not supported yet; supported: bf16, fp16 and "
                         "fp8 weights", where, field)
    if method == "compressed-tensors":
        return _compressed_tensors_dtype(q, where)
    raise InputError(f"quantization method '{method}' is not supported yet; supported: bf16, fp16 and fp8 "
                     f"weights ({', '.join(_FP8_METHODS)}, modelopt FP8, compressed-tensors float8)", where, field)


def _compressed_tensors_dtype(q: dict, where: str | None) -> str:
    field = "quantization_config.config_groups"
    if q.get("sparsity_config"):
        raise InputError("sparse weights (compressed-tensors sparsity_config) are not supported yet", where,
                         "quantization_config.sparsity_config")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise InputError("compressed-tensors config without config_groups: cannot tell how the weights are "
                         "stored", where, field)
    kinds = set()
    for name, g in groups.items():
        w = g.get("weights") if isinstance(g, dict) else None
        if not isinstance(w, dict):
            raise InputError("has no weights scheme", where, f"{field}.{name}.weights")
        kinds.add((str(w.get("type", "int")).lower(), w.get("num_bits")))
    if kinds == {("float", 8)}:
        return "fp8"
    desc = ", ".join(f"{bits}-bit {t}" for t, bits in sorted(kinds, key=str))
    raise InputError(f"compressed-tensors {desc} weights are not supported yet; supported: bf16, fp16 and "
                     "8-bit float (fp8) weights", where, field)


def shared_dir() -> Path:
    """The read-only shared material: `COSTMODEL_SHARED`, default `../shared` beside the repo root."""
    env = os.environ.get("COSTMODEL_SHARED")
    return Path(env) if env else Path(__file__).resolve().parent.parent.parent / "shared"


def default_model_configs_dir() -> Path:
    """Model configs shipped in the package, for the embedded defaults."""
    return Path(__file__).resolve().parent / "data" / "model_configs"


def config_path(name_or_path: str | Path, configs_dir: str | Path | None = None, more_dirs=()) -> Path | None:
    """The config.json of a model: a path to it or to its folder, or a folder name under ``configs_dir``, the
    packaged configs or ``more_dirs`` (in that order); None when there is none."""
    p = Path(name_or_path)
    candidates = [p / "config.json", p] if (p.is_dir() or p.suffix == ".json") else []
    for d in ([Path(configs_dir)] if configs_dir else []) + [default_model_configs_dir(), *map(Path, more_dirs)]:
        candidates.append(d / str(name_or_path) / "config.json")
    return next((c for c in candidates if c.is_file()), None)


def load_model(name_or_path: str, configs_dir: str | Path | None = None, where: str | None = None) -> ModelConfig:
    """Load a model by folder name under `configs_dir` (or the packaged configs), or by a path to a
    config.json or to the folder holding it."""
    c = config_path(name_or_path, configs_dir)
    if c is not None:
        p = Path(name_or_path)
        m = ModelConfig.from_dict(read_json(c), name=p.name if p.suffix != ".json" else p.parent.name, where=str(c))
        defaults = sampling.generation_defaults(c)
        return m if defaults is None else replace(m, sampling_defaults=tuple(sorted(defaults.items())))
    looked = configs_dir if configs_dir else default_model_configs_dir()
    raise InputError(f"no config.json for model '{name_or_path}' under {looked}", where, "model")


# ----------------------------------------------------------------------------------------------------------
# Precision of stored weights
# ----------------------------------------------------------------------------------------------------------

class Precision(NamedTuple):
    """How one weight matrix is stored.  ``kind``: bf16, fp16, fp32, fp8 (per-output-channel fp32 scale),
    fp8_block (fp32 scale per 128x128 block), mxfp4 (4-bit e2m1 + one e8m0 byte per 32 weights: 4.25
    bits), nvfp4 (4-bit + one fp8 scale per 16: 4.5 bits), int4 (weight-only, packed 4-bit + a bf16 scale
    per ``group`` weights along the input dimension, plus a 4-bit zero point per group when
    ``zero_point``)."""

    kind: str
    group: int = 0
    zero_point: bool = False

    def matrix_bytes(self, k: int, n: int) -> float:
        """Bytes of a k x n matrix (k = input features, n = output features) with its scales."""
        kind = self.kind
        if kind == "count":  # parameters, not bytes
            return float(k * n)
        if kind in ("bf16", "fp16"):
            return 2.0 * k * n
        if kind == "fp32":
            return 4.0 * k * n
        if kind == "fp8":
            return 1.0 * k * n + 4.0 * n
        if kind == "fp8_block":
            return 1.0 * k * n + 4.0 * math.ceil(k / 128) * math.ceil(n / 128)
        if kind == "mxfp4":
            return k * n / 2.0 + math.ceil(k / 32) * n
        if kind == "nvfp4":
            return k * n / 2.0 + math.ceil(k / 16) * n + 4.0
        if kind == "int4":
            groups = math.ceil(k / self.group) * n
            return k * n / 2.0 + 2.0 * groups + (0.5 * groups if self.zero_point else 0.0)
        raise InputError(f"unknown weight precision '{kind}'", field="weights")

    @property
    def element_bytes(self) -> float:
        """Bytes of one unquantised element (biases, norms, embeddings in this precision)."""
        return {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "count": 1.0}.get(self.kind, 2.0)

    @property
    def label(self) -> str:
        return f"int4_wo_g{self.group}" if self.kind == "int4" else self.kind


_PRECISION_NAMES = ("bf16", "fp16", "fp32", "fp8", "fp8_block", "mxfp4", "nvfp4", "int4_wo", "int4_wo_g<N>")


def precision(name: str | Precision, field: str = "weights") -> Precision:
    """Parse a precision name: bf16, fp16, fp32, fp8, fp8_block, mxfp4, nvfp4, int4_wo (group 128) or
    int4_wo_g<N> (group N)."""
    if isinstance(name, Precision):
        return name
    key = str(name).lower().replace("-", "_")
    if key in ("bfloat16", "float16", "half", "float32"):
        key = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}[key]
    if key in ("bf16", "fp16", "fp32", "fp8", "fp8_block", "mxfp4", "nvfp4"):
        return Precision(key)
    m = re.fullmatch(r"int4(?:_wo)?(?:_g(\d+))?", key)
    if m:
        return Precision("int4", int(m.group(1) or 128))
    raise InputError(f"unknown weight precision '{name}' (expected one of {', '.join(_PRECISION_NAMES)})",
                     field=field)


class Quant(NamedTuple):
    """Precision of each class of weights."""

    attention: Precision  # q/k/v/o, MLA projections, linear-attention projections, DSA indexer
    dense_mlp: Precision  # dense MLP layers
    shared_experts: Precision
    experts: Precision  # routed experts
    high: Precision  # embedding, lm_head, router, norms, biases: the model dtype
    source: str  # where it came from: "config" (quantization_config / torch_dtype) or "override"


# ----------------------------------------------------------------------------------------------------------
# Architecture read from config.json
# ----------------------------------------------------------------------------------------------------------

class Arch(NamedTuple):
    """Shapes that decide memory, for the whole model (before any parallelism)."""

    name: str
    model_type: str
    dtype: str  # model dtype: bf16 or fp16 (activations, KV cache "auto", unquantised weights)
    hidden: int
    vocab: int
    tie_embeddings: bool
    attn_types: tuple  # per layer: "full", "sliding", "chunked" (Llama-4 local) or "linear" (Gated DeltaNet)
    mlp_types: tuple  # per layer: "dense" or "moe"
    heads: int
    kv_heads: int
    head_dim: int
    window: int  # sliding-window tokens (0 if none)
    chunk: int  # chunked-local attention chunk tokens (0 if none)
    qkv_bias: bool
    o_bias: bool
    qk_norm_params: int  # q/k norm weights per layer
    attn_output_gate: bool  # q projection also produces a per-channel output gate (Qwen3-Next / 3.5)
    sinks: bool  # one learned attention sink per head (gpt-oss)
    # multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): mla = kv_lora_rank > 0
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    index_heads: int  # DeepSeek sparse attention indexer (DeepSeek-V3.2, GLM-5): 0 if none
    index_head_dim: int
    # MLP
    intermediate: int  # dense MLP layers
    moe_intermediate: int  # one routed expert
    experts: int
    top_k: int
    shared_intermediate: int  # all shared experts of a layer together (0 if none)
    shared_gate: bool  # sigmoid gate on the shared expert (Qwen2-MoE / Qwen3-Next)
    router_bias: bool
    router_correction_bias: bool  # e_score_correction_bias (DeepSeek-V3 noaux_tc, MiniMax-M2)
    expert_bias: bool  # biases on expert matrices (gpt-oss)
    # Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5)
    lin_k_heads: int
    lin_v_heads: int
    lin_k_dim: int
    lin_v_dim: int
    conv_kernel: int
    # RoPE cos/sin cache that vLLM builds on the GPU at load time
    rope_positions: int
    rotary_dim: int
    vision_params: int  # vision tower + projector, estimated (0 if none)
    quant: Quant

    @property
    def layers(self) -> int:
        return len(self.attn_types)

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0


def _cfg_int(cfg: dict, key: str, where: str, default: Any = None, positive: bool = True) -> int:
    v = cfg.get(key, default)
    if v is None:
        raise InputError("missing required key", where, key)
    if not isinstance(v, int) or isinstance(v, bool) or v < (1 if positive else 0):
        raise InputError(f"must be a {'positive' if positive else 'non-negative'} integer, got {v!r}", where, key)
    return v


def _dtype_of(cfg: dict, top: dict, where: str) -> str:
    raw = cfg.get("torch_dtype") or cfg.get("dtype") or top.get("torch_dtype") or top.get("dtype") or "bfloat16"
    if str(raw).lower() in ("float32", "fp32"):
        return "bf16"  # vLLM's dtype "auto" serves fp32 checkpoints in 16-bit
    d = normalize_dtype(raw, where, "torch_dtype")
    if d == "fp8":
        raise InputError("torch_dtype fp8 is a weight format: say it in quantization_config", where, "torch_dtype")
    return d


def _matches(patterns: list, *needles: str) -> bool:
    """Whether a quantisation ignore list names a module class (plain substrings or 're:' regexes)."""
    for pat in patterns or []:
        p = str(pat)
        if p.startswith("re:"):
            body = p[3:]
            if any(re.search(body, n) for n in needles):
                return True
        elif any(n in p for n in needles):
            return True
    return False


def _quant_from_config(qc: dict | None, dtype: str, where: str) -> Quant:
    high = Precision(dtype)
    if not qc:
        return Quant(high, high, high, high, high, "config")
    method = str(qc.get("quant_method", "")).lower()
    field = "quantization_config.quant_method"
    if method == "fp8":
        p = Precision("fp8_block") if qc.get("weight_block_size") else Precision("fp8")
        skip = qc.get("modules_to_not_convert") or qc.get("ignored_layers") or []
        attn = high if _matches(skip, "self_attn") else p  # linear_attn.conv1d & co. stay in their class
        return Quant(attn, p, p, p, high, "config")
    if method == "mxfp4":
        # vLLM's Mxfp4 method quantises the experts only; attention, router, embeddings stay 16-bit
        return Quant(high, high, high, Precision("mxfp4"), high, "config")
    if method in ("awq", "gptq", "awq_marlin", "gptq_marlin"):
        bits = qc.get("bits", qc.get("w_bit", 4))
        if bits != 4:
            raise InputError(f"only 4-bit {method} is modelled, got bits={bits}", where, "quantization_config.bits")
        g = qc.get("group_size", qc.get("q_group_size", 128))
        g = 128 if g in (None, -1) else int(g)
        p = Precision("int4", g, zero_point=not qc.get("sym", False) or method.startswith("awq"))
        return Quant(p, p, p, p, high, "config")
    if method == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        if not groups:
            raise InputError("compressed-tensors without config_groups", where, "quantization_config.config_groups")
        w = next(iter(groups.values())).get("weights") or {}
        bits, typ = w.get("num_bits"), w.get("type")
        if bits == 8 and typ == "float":
            p = Precision("fp8_block") if w.get("block_structure") or w.get("strategy") == "block" else Precision("fp8")
        elif bits == 4 and typ == "int":
            p = Precision("int4", int(w.get("group_size") or 128), zero_point=not w.get("symmetric", True))
        elif bits == 4 and typ == "float":
            p = Precision("nvfp4")
        else:
            raise InputError(f"compressed-tensors weights num_bits={bits} type={typ} are not modelled", where,
                             "quantization_config.config_groups")
        ig = qc.get("ignore") or []
        attn = high if _matches(ig, "self_attn.q_proj", "self_attn.qkv_proj", "self_attn.o_proj") else p
        shared = high if _matches(ig, "shared_experts.gate_proj", "shared_expert.gate_proj",
                                  "mlp.shared_experts.down_proj") else p
        dense = high if _matches(ig, "mlp.gate_proj", "mlp.down_proj", "mlp.gate_up_proj") else p
        return Quant(attn, dense, shared, p, high, "config")
    raise InputError(f"quantization method '{qc.get('quant_method')}' is not modelled (known: fp8, "
                     "compressed-tensors, mxfp4, awq, gptq)", where, field)


def _quant_override(base: Quant, weights: str | None, moe_weights: str | None) -> Quant:
    """Apply per-call precisions.  ``weights`` names the precision of the linear layers (attention, dense
    MLP, shared experts) and, unless ``moe_weights`` is given, of the routed experts too.  A name that
    matches the checkpoint's own format keeps the checkpoint's per-module choices (its ignore lists);
    mxfp4 only ever applies to routed experts (as in vLLM).  Embeddings, lm_head, router and norms stay in
    the model dtype."""
    if weights is None and moe_weights is None:
        return base
    q = base
    if weights is not None:
        p = precision(weights, "weights")
        same = p.kind == base.experts.kind or (p.kind == "fp8" and base.experts.kind == "fp8_block")
        if not same:
            lin = base.high if p.kind == "mxfp4" else p
            q = Quant(lin, lin, lin, p, base.high, "override")
    if moe_weights is not None:
        p = precision(moe_weights, "moe_weights")
        if not (p.kind == q.experts.kind or (p.kind == "fp8" and q.experts.kind == "fp8_block")):
            q = q._replace(experts=p, source="override")
    return q


def _vision_params(vc: dict | None, text_hidden: int) -> int:
    """Parameters of a ViT-style vision tower and its projector into the language model, estimated from
    ``vision_config``: per layer 4h² + 2hi (attention and MLP matrices) plus biases and two norms; patch and
    position embeddings; a projector (Llama-4's pixel-shuffle MLP + linear, a 2x2 patch merger, or a single
    linear).  Accurate to a few per cent, which is well under 1 % of any model here."""
    if not vc:
        return 0
    h = vc.get("hidden_size") or vc.get("vt_hidden_size") or vc.get("embed_dim")
    i = vc.get("intermediate_size") or vc.get("vt_intermediate_size") or (4 * h if h else None)
    n = vc.get("num_hidden_layers") or vc.get("vt_num_hidden_layers") or vc.get("depth")
    if not (h and i and n):
        return 0
    per_layer = 4 * h * h + 2 * h * i + 4 * h + i + h + 4 * h
    p = vc.get("patch_size", 14)
    total = n * per_layer + vc.get("num_channels", 3) * p * p * h
    if vc.get("image_size"):
        total += ((vc["image_size"] // p) ** 2 + 1) * h
    if vc.get("projector_input_dim"):  # Llama-4: pixel-shuffle MLP, then the multimodal projector
        total += i * vc["projector_input_dim"] + vc["projector_input_dim"] * vc.get("projector_output_dim", 0)
        total += vc.get("vision_output_dim", vc.get("projector_output_dim", 0)) * text_hidden
    elif vc.get("merge_kernel_size"):  # patch merger over k x k patches
        mk = vc["merge_kernel_size"]
        d = (vc.get("mm_hidden_size") or h) * int(mk[0]) * int(mk[1])
        total += d * d + d * text_hidden
    else:
        total += h * text_hidden
    return int(total)


def arch_from_config(cfg: dict, name: str = "model", where: str = "config.json") -> Arch:
    """Read the shapes that decide memory from a parsed config.json.  Multimodal wrappers: the language
    model is read from ``text_config``; the vision tower is estimated from ``vision_config``."""
    if not isinstance(cfg, dict):
        raise InputError("config.json must be a JSON object", where)
    top = cfg
    vision = None
    if isinstance(cfg.get("text_config"), dict):
        vision = cfg.get("vision_config")
        cfg = {**cfg["text_config"]}
        for k in ("quantization_config", "tie_word_embeddings"):
            if k not in cfg and k in top:
                cfg[k] = top[k]
    mt = str(cfg.get("model_type") or top.get("model_type") or "")
    dtype = _dtype_of(cfg, top, where)
    hidden = _cfg_int(cfg, "hidden_size", where)
    L = _cfg_int(cfg, "num_hidden_layers", where)
    vocab = _cfg_int(cfg, "vocab_size", where)
    heads = _cfg_int(cfg, "num_attention_heads", where)
    kv_heads = _cfg_int(cfg, "num_key_value_heads", where) if cfg.get("num_key_value_heads") is not None else heads
    head_dim = _cfg_int(cfg, "head_dim", where) if cfg.get("head_dim") else hidden // heads

    # --- attention type of each layer ---
    window = chunk = 0
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != L:
            raise InputError(f"must list one type per layer ({L})", where, "layer_types")
        table = {"full_attention": "full", "sliding_attention": "sliding", "linear_attention": "linear"}
        bad = [t for t in layer_types if t not in table]
        if bad:
            raise InputError(f"unknown layer type '{bad[0]}' (known: {', '.join(table)})", where, "layer_types")
        attn = tuple(table[t] for t in layer_types)
        if "sliding" in attn:
            window = _cfg_int(cfg, "sliding_window", where)
    elif cfg.get("full_attention_interval") and cfg.get("linear_num_value_heads"):
        k = _cfg_int(cfg, "full_attention_interval", where)
        attn = tuple("full" if (i + 1) % k == 0 else "linear" for i in range(L))
    elif cfg.get("attention_chunk_size"):
        chunk = _cfg_int(cfg, "attention_chunk_size", where)
        nope = cfg.get("no_rope_layers") or [int((i + 1) % 4 != 0) for i in range(L)]
        if len(nope) != L:
            raise InputError(f"must list one flag per layer ({L})", where, "no_rope_layers")
        attn = tuple("chunked" if nope[i] else "full" for i in range(L))
    elif cfg.get("sliding_window") and cfg.get("use_sliding_window", True) is not False:
        window = _cfg_int(cfg, "sliding_window", where)
        start = cfg.get("max_window_layers", 0) if "use_sliding_window" in cfg else 0
        attn = tuple("sliding" if i >= (start or 0) else "full" for i in range(L))
    else:
        attn = ("full",) * L

    # --- MLA ---
    mla = bool(cfg.get("kv_lora_rank"))
    q_lora = kv_lora = nope_d = rope_d = v_d = 0
    if mla:
        kv_lora = _cfg_int(cfg, "kv_lora_rank", where)
        q_lora = cfg.get("q_lora_rank") or 0
        nope_d = _cfg_int(cfg, "qk_nope_head_dim", where)
        rope_d = _cfg_int(cfg, "qk_rope_head_dim", where)
        v_d = _cfg_int(cfg, "v_head_dim", where)
    index_heads = cfg.get("index_n_heads") or 0
    index_dim = cfg.get("index_head_dim") or 0

    # --- MLP type of each layer, experts ---
    n_exp = (cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts")
             or cfg.get("num_routed_experts") or 0)
    top_k = cfg.get("num_experts_per_tok") or cfg.get("experts_per_token") or (1 if n_exp else 0)
    inter = cfg.get("intermediate_size") or 0
    moe_inter = shared = 0
    shared_gate = False
    if not n_exp:
        mlp = ("dense",) * L
        moe_inter = 0
    elif "first_k_dense_replace" in cfg or "n_shared_experts" in cfg or "num_shared_experts" in cfg:
        first = cfg.get("first_k_dense_replace", 0) or 0
        freq = cfg.get("moe_layer_freq", 1) or 1
        mlp = tuple("moe" if i >= first and i % freq == 0 else "dense" for i in range(L))
        moe_inter = _cfg_int(cfg, "moe_intermediate_size", where)
        shared = (cfg.get("n_shared_experts") or cfg.get("num_shared_experts") or 0) * moe_inter
    elif mt.startswith("llama4"):
        step = cfg.get("interleave_moe_layer_step", 1) or 1
        moe_layers = cfg.get("moe_layers")
        mlp = tuple("moe" if (moe_layers is not None and i in moe_layers)
                    or (moe_layers is None and (i + 1) % step == 0) else "dense" for i in range(L))
        moe_inter = _cfg_int(cfg, "intermediate_size", where)
        shared = moe_inter  # one shared expert of the expert size in every MoE layer
        inter = cfg.get("intermediate_size_mlp") or inter
    elif "moe_intermediate_size" in cfg:  # Qwen2/3-MoE, Qwen3-Next, Qwen3.5
        step = cfg.get("decoder_sparse_step", 1) or 1
        only = set(cfg.get("mlp_only_layers") or [])
        mlp = tuple("moe" if i not in only and (i + 1) % step == 0 else "dense" for i in range(L))
        moe_inter = _cfg_int(cfg, "moe_intermediate_size", where)
        shared = cfg.get("shared_expert_intermediate_size") or 0
        shared_gate = shared > 0
    else:  # Mixtral, gpt-oss, MiniMax-M2: intermediate_size is the expert's
        mlp = ("moe",) * L
        moe_inter = _cfg_int(cfg, "intermediate_size", where)
        shared = cfg.get("shared_intermediate_size") or 0
    if "dense" in mlp and not inter:
        raise InputError("missing required key", where, "intermediate_size")
    if n_exp and top_k > n_exp:
        raise InputError(f"num_experts_per_tok={top_k} exceeds the {n_exp} experts", where, "num_experts_per_tok")

    # --- Gated DeltaNet ---
    lin = dict(lin_k_heads=0, lin_v_heads=0, lin_k_dim=0, lin_v_dim=0, conv_kernel=0)
    if "linear" in attn:
        lin = dict(lin_k_heads=_cfg_int(cfg, "linear_num_key_heads", where),
                   lin_v_heads=_cfg_int(cfg, "linear_num_value_heads", where),
                   lin_k_dim=_cfg_int(cfg, "linear_key_head_dim", where),
                   lin_v_dim=_cfg_int(cfg, "linear_value_head_dim", where),
                   conv_kernel=_cfg_int(cfg, "linear_conv_kernel_dim", where))

    # --- norms, biases, gates ---
    qk_norm = 0
    if mt.startswith("qwen3") or mt.startswith("qwen3_5"):
        qk_norm = 2 * head_dim
    if cfg.get("use_qk_norm") and cfg.get("qk_norm_type") == "per_layer":
        qk_norm = (heads + kv_heads) * head_dim
    qkv_bias = bool(cfg.get("attention_bias")) or mt in ("qwen2", "qwen2_moe")
    o_bias = bool(cfg.get("attention_bias")) and mt not in ("qwen2", "qwen2_moe")
    gate = bool(cfg.get("attn_output_gate", mt == "qwen3_next"))

    # --- RoPE cache: [positions, rotary_dim] in the model dtype (vLLM get_rope) ---
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    positions = cfg.get("max_position_embeddings") or 0
    if str(rs.get("rope_type", rs.get("type", ""))) in ("yarn", "deepseek_yarn") and rs.get("factor"):
        positions = int(rs.get("original_max_position_embeddings", positions) * rs["factor"])
    rot = rope_d if mla else int(head_dim * (rs.get("partial_rotary_factor") or cfg.get("partial_rotary_factor")
                                              or 1.0))
    if cfg.get("rotary_dim"):
        rot = cfg["rotary_dim"]

    quant = _quant_from_config(cfg.get("quantization_config"), dtype, where)
    return Arch(
        name=name, model_type=mt, dtype=dtype, hidden=hidden, vocab=vocab,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), attn_types=attn, mlp_types=mlp,
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, window=window, chunk=chunk, qkv_bias=qkv_bias,
        o_bias=o_bias, qk_norm_params=qk_norm, attn_output_gate=gate, sinks=mt == "gpt_oss",
        q_lora_rank=q_lora, kv_lora_rank=kv_lora, qk_nope_head_dim=nope_d, qk_rope_head_dim=rope_d,
        v_head_dim=v_d, index_heads=index_heads, index_head_dim=index_dim, intermediate=inter,
        moe_intermediate=moe_inter, experts=n_exp, top_k=top_k, shared_intermediate=shared,
        shared_gate=shared_gate, router_bias=mt == "gpt_oss",
        router_correction_bias=cfg.get("topk_method") == "noaux_tc" or bool(cfg.get("use_routing_bias")),
        expert_bias=mt == "gpt_oss", **lin, rope_positions=int(positions), rotary_dim=int(rot),
        vision_params=_vision_params(vision, hidden), quant=quant,
    )


def load_arch(name_or_path: str | Path, configs_dir: str | Path | None = None) -> Arch:
    """An `Arch` from a model folder name (under ``configs_dir``, the packaged configs, or the shared
    ``model_configs``) or a path to a config.json or its folder."""
    dirs = ([Path(configs_dir)] if configs_dir else []) + [default_model_configs_dir(), shared_dir() / "model_configs"]
    c = config_path(name_or_path, configs_dir, [shared_dir() / "model_configs"])
    if c is None:
        raise InputError(f"no config.json for model '{name_or_path}' under {', '.join(map(str, dirs))}",
                         field="model")
    return arch_from_config(read_json(c), name=c.parent.name, where=str(c))


def as_arch(model: str | Path | dict | Arch, weights: str | None = None, moe_weights: str | None = None) -> Arch:
    """Accept a name/path, a parsed config.json or an `Arch`, with optional precision overrides."""
    if isinstance(model, Arch):
        a = model
    elif isinstance(model, dict):
        a = arch_from_config(model)
    else:
        a = load_arch(model)
    q = _quant_override(a.quant, weights, moe_weights)
    return a if q is a.quant else a._replace(quant=q)
