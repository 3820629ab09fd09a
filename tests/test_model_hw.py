import json

import pytest

from costmodel import GPUS, InputError, get_gpu
from costmodel.hardware import find_gpu
from costmodel.model import load_model


@pytest.mark.parametrize("name", ["H100", "h100_sxm", "H100-SXM", "h100 sxm"])
def test_gpu_aliases(name):
    assert get_gpu(name).name == "H100-SXM"


def test_unknown_gpu():
    with pytest.raises(InputError, match="unknown GPU 'V100'"):
        get_gpu("V100")
    assert find_gpu("V100") is None and find_gpu("b200_sxm") is GPUS["B200"]


def test_dense_peaks_by_dtype():
    """The mfu denominators of imported and measured tables: FP8 only where the GPU has FP8 tensor cores."""
    assert get_gpu("H100").dense_peaks() == {"bf16": 989.4e12, "fp8": 1978.9e12}
    assert get_gpu("a100_sxm").dense_peaks() == {"bf16": 312e12}


@pytest.mark.parametrize("model,key", [("deepseek_v3.2", "sparse attention .DSA"),
                                       ("deepseek-v2-lite", "DeepSeek-V3's geometry"),
                                       ("qwen3-next-80b-a3b", "linear-attention")])
def test_unsupported_architectures_name_what_is_missing(shared, model, key):
    with pytest.raises(InputError, match=key):
        load_model(model, shared / "model_configs")


def test_all_dense_shared_configs_load(shared):
    for name in ["llama-2-7b-hf", "llama-2-70b-hf", "codellama-34b-instruct-hf", "mistral-7b-v0.1",
                 "qwen2.5-7b-instruct", "qwen3-8b", "qwen3-14b", "yi-34b", "mistral-nemo-instruct-2407"]:
        m = load_model(name, shared / "model_configs")
        assert m.num_heads * m.head_dim > 0


def test_missing_key(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                            "hidden_size": 64}))
    with pytest.raises(InputError, match="num_attention_heads"):
        load_model("m", tmp_path)
