"""Model architecture read from a Hugging Face `config.json` (dense decoder-only transformers)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import InputError
from .io import read_json

SUPPORTED_ARCHS = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
)
# Keys whose presence marks an architecture the dense model does not describe yet.
_UNSUPPORTED_KEYS = {
    "num_local_experts": "mixture-of-experts", "num_experts": "mixture-of-experts",
    "n_routed_experts": "mixture-of-experts", "kv_lora_rank": "multi-head latent attention (MLA)",
    "layer_types": "hybrid attention layers", "linear_num_value_heads": "linear attention",
}
_DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
           "float8": "fp8", "fp8": "fp8", "float8_e4m3fn": "fp8"}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}


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

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def with_dtype(self, dtype: str) -> "ModelConfig":
        return replace(self, dtype=normalize_dtype(dtype))

    @classmethod
    def from_dict(cls, cfg: dict, name: str, where: str) -> "ModelConfig":
        """Build from a parsed config.json; `where` names the file for error messages."""
        if not isinstance(cfg, dict):
            raise InputError(f"a model config must be a JSON object, got {json_type(cfg)}", where)
        if "text_config" in cfg and "hidden_size" not in cfg:
            raise InputError("multimodal configs (text_config) are not supported yet", where, "text_config")
        archs = cfg.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise InputError(f'must be a list of names like ["LlamaForCausalLM"], got {archs!r}', where,
                             "architectures")
        for key, what in _UNSUPPORTED_KEYS.items():
            if cfg.get(key):
                raise InputError(f"{what} ({key}={cfg[key]!r}) is not supported yet; supported: dense "
                                 f"{', '.join(SUPPORTED_ARCHS)}", where, key)
        arch = archs[0] if archs else cfg.get("model_type", "?")
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
        max_pos = cfg.get("max_position_embeddings")
        max_pos = math.inf if max_pos is None else positive_int(max_pos, where, "max_position_embeddings")
        tie = cfg.get("tie_word_embeddings", False)
        if tie is not None and not isinstance(tie, bool):
            raise InputError(f"must be true or false, got {tie!r}", where, "tie_word_embeddings")
        dtype = normalize_dtype(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16", where, "torch_dtype")
        dtype = quantized_weight_dtype(cfg.get("quantization_config"), where) or dtype
        return cls(
            name=name, arch=arch, hidden_size=hidden, num_layers=need("num_hidden_layers"),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            intermediate_size=need("intermediate_size"), vocab_size=need("vocab_size"),
            tie_embeddings=bool(tie), dtype=dtype, sliding_window=float(window),
            qk_norm=cfg.get("model_type") == "qwen3", max_position_embeddings=float(max_pos),
        )


def json_type(v) -> str:
    """What a parsed JSON value is, in JSON's words."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true/false"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(v), "a number")


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
        return ModelConfig.from_dict(read_json(c), name=p.name if p.suffix != ".json" else p.parent.name,
                                     where=str(c))
    looked = configs_dir if configs_dir else default_model_configs_dir()
    raise InputError(f"no config.json for model '{name_or_path}' under {looked}", where, "model")

