"""gpt-oss (`GptOssForCausalLM`) in the step model: mxfp4 experts with bf16 attention, and layers that alternate a
128-token sliding window with full attention, priced from one batch summary."""
import copy
import dataclasses
import math

import pytest

from costmodel import InputError, ops, step
from costmodel.hardware import get_gpu
from costmodel.io import read_json
from costmodel.model import ModelConfig, load_model
from costmodel.params import Params
from costmodel.tables import load_tables


@pytest.fixture(scope="module")
def gpt_oss(shared):
    return load_model("gpt-oss-120b", shared / "model_configs")


@pytest.fixture(scope="module")
def cfg(shared):
    return read_json(shared / "model_configs" / "gpt-oss-120b" / "config.json")


@pytest.fixture(scope="module")
def h100():
    return load_tables(None, get_gpu("h100_sxm"))


def test_config_reads_mxfp4_experts_and_mixed_layers(gpt_oss):
    m = gpt_oss
    assert (m.dtype, m.expert_dtype) == ("bf16", "mxfp4")  # attention, router, lm_head stay bf16
    assert (m.experts, m.top_k, m.moe_intermediate, m.moe_layers) == (128, 4, 2880, 36)
    assert (m.sliding_window, m.sliding_layers, m.num_layers) == (128.0, 18, 36)
    assert (m.num_heads, m.num_kv_heads, m.head_dim) == (64, 8, 64)


def test_gpt_oss_20b_loads(cfg):
    small = {**cfg, "num_hidden_layers": 24, "num_local_experts": 32, "layer_types": cfg["layer_types"][:24]}
    m = ModelConfig.from_dict(small, "gpt-oss-20b", "config.json")
    assert (m.num_layers, m.sliding_layers, m.experts, m.expert_dtype) == (24, 12, 32, "mxfp4")


def test_layer_types_other_than_attention_are_refused(cfg):
    bad = {**cfg, "layer_types": ["linear_attention"] + cfg["layer_types"][1:]}
    with pytest.raises(InputError, match="layer_types.*linear_attention"):
        ModelConfig.from_dict(bad, "x", "config.json")
    with pytest.raises(InputError, match="one type per layer"):
        ModelConfig.from_dict({**cfg, "layer_types": cfg["layer_types"][:10]}, "x", "config.json")


def test_layer_types_all_one_kind_keep_one_window(cfg):
    sliding = ModelConfig.from_dict({**cfg, "layer_types": ["sliding_attention"] * 36}, "x", "config.json")
    full = ModelConfig.from_dict({**cfg, "layer_types": ["full_attention"] * 36}, "x", "config.json")
    assert (sliding.sliding_window, sliding.sliding_layers) == (128.0, 0)
    assert (full.sliding_window, full.sliding_layers) == (math.inf, 0)
    assert ops.dims(sliding, 2).window == 128.0 and ops.dims(full, 2).window == ops.NO_WINDOW


def test_mxfp4_is_still_refused_for_a_dense_model(shared):
    dense = read_json(shared / "model_configs" / "llama-3.1-8b" / "config.json")
    dense = {**copy.deepcopy(dense), "quantization_config": {"quant_method": "mxfp4"}}
    with pytest.raises(InputError, match="mxfp4"):
        ModelConfig.from_dict(dense, "x", "config.json")


def test_tp2_dims_by_hand(gpt_oss):
    d = ops.dims(gpt_oss, 2)
    assert (d.q_heads, d.kv_heads, d.head_dim) == (32.0, 4.0, 64.0)
    assert (d.experts, d.top_k, d.moe_inter, d.moe_ep) == (128.0, 4.0, 2880 / 2, 1.0)
    assert (d.layers, d.sliding_layers, float(d.full_layers), d.sliding_window) == (36.0, 18.0, 18.0, 128.0)
    assert d.window == ops.NO_WINDOW  # the batch is summarized as the full layers see it
    assert d.weight_bytes == 2.0


def test_sliding_only_and_dense_models_keep_their_path(shared):
    mistral = ops.dims(load_model("mistral-7b-v0.1", shared / "model_configs"), 1)
    assert (mistral.window, mistral.sliding_layers) == (4096.0, 0.0)
    llama = ops.dims(load_model("llama-3.1-8b", shared / "model_configs"), 1)
    assert (llama.window, llama.sliding_layers) == (ops.NO_WINDOW, 0.0)


def test_sliding_caps_by_hand(gpt_oss):
    d = ops.dims(gpt_oss, 2)
    s = step.pack_steps([{"decode": [10, 500, 2000], "prefill": [[100, 0], [300, 1000]]}])
    b = step.summarize(d, step.Step(*(a[0] for a in s)))
    assert float(b.decode_keys) == 11 + 501 + 2001
    assert float(ops.sliding_decode_keys(d, b.n_decode, b.decode_keys)) == 3 * 128  # 267 exactly: a bound
    # a query tile holds 128 / (32 / 4) = 16 tokens: both chunks fill theirs
    assert float(b.prefill_pairs) == 100 * 101 / 2 + 300 * 1000 + 300 * 301 / 2
    assert float(ops.sliding_prefill_pairs(d, b.prefill_tokens, b.prefill_pairs)) == 400 * 128
    # every decode past the window: the cap is exact
    assert float(ops.sliding_decode_keys(d, 2.0, 5000.0)) == 256.0
    assert float(ops.sliding_decode_keys(d, 2.0, 100.0)) == 100.0


def _time(su, s):
    t, parts = step.make_step_fn(su.static)(su.arrays, su.on_gpu, Params(), s)
    return float(t[0]), {k: float(v[0]) for k, v in parts.items()}


def test_step_at_tp2_on_h100(gpt_oss, h100):
    su = step.setup(gpt_oss, h100, 2)
    assert su.static.mixed_attention and su.static.moe
    full = step.setup(dataclasses.replace(gpt_oss, sliding_layers=0, sliding_window=math.inf), h100, 2)
    assert not full.static.mixed_attention
    s = step.pack_steps([{"decode": [3000] * 32, "prefill": [[2000, 500]]}])
    t, parts = _time(su, s)
    t_full, parts_full = _time(full, s)
    assert parts["moe"] > 0 and t == pytest.approx(sum(parts.values()), rel=1e-5)
    for k in ("attn_decode", "attn_prefill"):
        assert 0 < parts[k] < parts_full[k], k
    same = set(parts) - {"attn_decode", "attn_prefill"}
    assert all(parts[k] == pytest.approx(parts_full[k], rel=1e-6) for k in same)


def test_short_contexts_price_alike_in_both_layer_kinds(gpt_oss, h100):
    """Below the window a sliding layer attends to every key, as a full layer does."""
    su = step.setup(gpt_oss, h100, 2)
    full = step.setup(dataclasses.replace(gpt_oss, sliding_layers=0, sliding_window=math.inf), h100, 2)
    s = step.pack_steps([{"decode": [50] * 8, "prefill": [[100, 0]]}])
    assert _time(su, s)[0] == pytest.approx(_time(full, s)[0], rel=1e-6)


def test_serve_accepts_the_checkpoints_mxfp4_experts(shared):
    from costmodel.apps import serve
    rec = {"id": "a", "model": "gpt-oss-120b", "gpu": "H100", "tp": 2, "weights": "mxfp4", "moe_weights": "mxfp4",
           "workload": {"type": "closed", "concurrency": 4, "input_tokens": 128, "output_tokens": 16}}
    dep = serve.resolve(rec, "row 1", shared / "model_configs")
    assert (dep.model.dtype, dep.model.expert_dtype) == ("bf16", "mxfp4")
    with pytest.raises(serve.Refusal, match="weights 'mxfp4'"):
        serve.resolve({**rec, "model": "llama-3.1-8b", "moe_weights": None}, "row 2",
                               shared / "model_configs")
