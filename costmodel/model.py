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
    key = str(value).lower()
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

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def with_dtype(self, dtype: str) -> "ModelConfig":
        return replace(self, dtype=normalize_dtype(dtype))

    @classmethod
    def from_dict(cls, cfg: dict, name: str, where: str) -> "ModelConfig":
        """Build from a parsed config.json; `where` names the file for error messages."""
        if "text_config" in cfg and "hidden_size" not in cfg:
            raise InputError("multimodal configs (text_config) are not supported yet", where, "text_config")
        archs = cfg.get("architectures") or []
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
            v = cfg[key]
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InputError(f"must be a positive integer, got {v!r}", where, key)
            return v

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = need("num_key_value_heads") if "num_key_value_heads" in cfg else heads
        head_dim = need("head_dim") if cfg.get("head_dim") else hidden // heads
        if heads % kv_heads:
            raise InputError(f"num_attention_heads={heads} is not a multiple of {kv_heads}", where,
                             "num_key_value_heads")
        window = cfg.get("sliding_window")
        if cfg.get("use_sliding_window") is False or not window:
            window = math.inf
        dtype = normalize_dtype(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16", where, "torch_dtype")
        if cfg.get("quantization_config", {}).get("quant_method") == "fp8":
            dtype = "fp8"
        return cls(
            name=name, arch=arch, hidden_size=hidden, num_layers=need("num_hidden_layers"),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            intermediate_size=need("intermediate_size"), vocab_size=need("vocab_size"),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), dtype=dtype,
            sliding_window=float(window), qk_norm=cfg.get("model_type") == "qwen3",
        )


def shared_dir() -> Path:
    """The read-only shared material: `COSTMODEL_SHARED`, default `../shared` beside the repo root."""
    env = os.environ.get("COSTMODEL_SHARED")
    return Path(env) if env else Path(__file__).resolve().parent.parent.parent / "shared"


def default_model_configs_dir() -> Path:
    """Model configs shipped in the package, for the embedded defaults."""
    return Path(__file__).resolve().parent / "data" / "model_configs"


def load_model(name_or_path: str, configs_dir: str | Path | None = None, where: str | None = None) -> ModelConfig:
    """Load a model by folder name under `configs_dir` (or the packaged configs), or by a path to a
    config.json or to the folder holding it."""
    p = Path(name_or_path)
    candidates = [p / "config.json", p] if (p.is_dir() or p.suffix == ".json") else []
    for d in ([Path(configs_dir)] if configs_dir else []) + [default_model_configs_dir()]:
        candidates.append(d / str(name_or_path) / "config.json")
    for c in candidates:
        if c.is_file():
            return ModelConfig.from_dict(read_json(c), name=p.name if p.suffix != ".json" else p.parent.name,
                                         where=str(c))
    looked = configs_dir if configs_dir else default_model_configs_dir()
    raise InputError(f"no config.json for model '{name_or_path}' under {looked}", where, "model")
