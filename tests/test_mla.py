"""DeepSeek-V3/R1 and Kimi-K2.5 in the step model: MLA priced from the measured MLA module tables, shared and
routed experts, attention data parallelism with expert parallelism, counted by hand from the configs."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costmodel import InputError, memory, ops, step
from costmodel import kernel_time as kt
from costmodel.hardware import get_gpu
from costmodel.model import load_model
from costmodel.params import Params
from costmodel.tables import load_mla, load_tables, mla_curve, mla_tables_of
from costmodel.compiled import jit

from conftest import shared_model

LAYERS, DENSE, MOE = 61, 3, 58  # DeepSeek-V3: first_k_dense_replace = 3
H, Q_LORA, KV_LORA, ROPE = 7168, 1536, 512, 64


@pytest.fixture(scope="module")
def ds():
    return shared_model("deepseek_v3")


@pytest.fixture(scope="module")
def kimi():
    return shared_model("kimi-k2.5")


@pytest.fixture(scope="module")
def h200():
    return load_tables(None, get_gpu("h200_sxm"))


@pytest.fixture(scope="module")
def dp8(ds, h200):
    """DeepSeek-V3 at attention-DP 8 + EP 8 on H200 (tp 1 per rank)."""
    return step.setup(ds, h200, 1, 8, attention_dp=8)


def _batch_fn(su):
    """Step time and parts of ``su`` at (decodes, cached tokens each, prefill chunks, new tokens each): one
    compilation for every batch."""
    def f(n_dec, ctx, n_pre, new, arrays=su.arrays):
        d = su.on_gpu.dims
        tokens, pairs = step.prefill_of_means(d, n_pre, new, 0.0)
        b = step.Batch(n_dec, step.decode_keys_of_means(d, n_dec, ctx), n_pre, tokens, pairs)
        return step.combine(step.batch_features(step.TableLookup(arrays, su.on_gpu), su.on_gpu, b, su.static),
                            su.on_gpu, Params(), su.static)
    return jit(f)


@pytest.fixture(scope="module")
def dp8_fn(dp8):
    return _batch_fn(dp8)


def test_config_fields(ds, kimi):
    assert (ds.arch, ds.num_heads, ds.q_lora_rank, ds.kv_lora_rank, ds.qk_rope_head_dim) == \
        ("DeepseekV3ForCausalLM", 128, Q_LORA, KV_LORA, ROPE)
    assert (ds.num_layers, ds.moe_layers, ds.experts, ds.top_k, ds.moe_intermediate) == (LAYERS, MOE, 256, 8, 2048)
    assert (ds.shared_intermediate, ds.intermediate_size, ds.dtype, ds.expert_dtype) == (2048, 18432, "fp8", "fp8_block")
    assert ds.mla and ds.mla_gemm_dtype == "fp8_block"
    # Kimi-K2.5: the text model of a multimodal wrapper; 64 heads, one dense layer, INT4 experts, bf16 attention
    assert (kimi.num_heads, kimi.moe_layers, kimi.experts, kimi.dtype, kimi.expert_dtype) == (64, 60, 384, "bf16",
                                                                                            "int4_wo")


def test_counts_by_hand(ds):
    d = ops.dims(ds, 1, 8, attention_dp=8)
    assert (d.q_heads, d.mla_latent, d.moe_inter, d.moe_ep, d.attention_dp) == (128.0, 2112.0, 2048.0, 8.0, 8.0)
    t = 100.0
    g = ops.mla_gemms(d, t)
    assert list(g) == ["mla_a_proj", "gate_up_proj", "down_proj"]
    assert float(ops.gemm_flops(g["mla_a_proj"])) == 2 * 100 * 7168 * (1536 + 512 + 64)
    assert float(ops.gemm_flops(g["gate_up_proj"])) == 2 * 100 * 7168 * 2 * 18432  # dense layers, tp 1
    assert float(ops.gemm_flops(g["down_proj"])) == 2 * 100 * 18432 * 7168
    m = ops.moe_gemms(d, t, shared=True)
    assert float(ops.gemm_flops(m["router"])) == 2 * 100 * 7168 * 256
    assert float(ops.gemm_flops(m["shared_gate_up_proj"])) == 2 * 100 * 7168 * 2 * 2048
    assert float(ops.gemm_flops(m["shared_down_proj"])) == 2 * 100 * 2048 * 7168
    # 8 ranks x 100 tokens enter the MoE layer, top-8 over 8 GPUs: 800 (token, expert) pairs per GPU
    assert float(ops.moe_tokens(d, t)) == 800 and float(ops.moe_routed_pairs(d, t)) == 800
    assert float(ops.moe_routed_flops(d, t)) == pytest.approx(2 * 800 * 3 * 7168 * 2048)
    # all-gather + reduce-scatter of the 800 gathered hidden states (bf16)
    assert float(ops.ep_exchange_message(d, t)) == 800 * 7168 * 2
    assert float(ops.ep_exchange_message(ops.dims(ds, 8, 8), t)) == 0.0
    mem = ops.memory_ops_bytes(d, t)  # RoPE and the latent KV write are inside the MLA module
    assert float(mem["rope"]) == 0.0 and float(mem["kv_cache_write"]) == 0.0


def test_weight_bytes_per_gpu_by_hand(shared):
    """Experts over 8 GPUs (32 each, whole) and MLA attention replicated on every attention-DP rank."""
    w = memory.weight_bytes_per_gpu(str(shared / "model_configs/deepseek_v3"), memory.Layout(tp=1, attention_dp=8,
                                                                                              moe_ep=8))
    blk = lambda k, n: k * n + 4 * math.ceil(k / 128) * math.ceil(n / 128)  # fp8 + a fp32 scale per 128x128 # noqa
    expert = blk(7168, 2 * 2048) + blk(2048, 7168)
    assert w.experts == 58 * 32 * expert
    attn = (blk(7168, 1536) + 2 * 1536 + blk(1536, 128 * 192) + blk(7168, 512 + 64) + 2 * 512
            + blk(512, 128 * (128 + 128)) + blk(128 * 128, 7168))
    assert w.attention == 61 * attn
    w8 = memory.weight_bytes_per_gpu(str(shared / "model_configs/deepseek_v3"), memory.Layout(tp=8, moe_ep=8))
    assert w8.experts == w.experts and w8.attention < w.attention


def test_mla_time_is_the_measured_module(dp8_fn):
    """At the largest measured points (nothing above lowers them) one layer of MLA costs what the table
    measured: decode at batch 1024, kv 32768; prefill at batch 256, seq 512 (H200, 128 heads, fp8_block)."""
    def point(kind, batch, length):
        c = mla_curve(load_mla("h200_sxm", kind), 128, batch, "bf16", "fp8_block")
        return float(c[1][list(c[0]).index(length)])
    _, parts = dp8_fn(1024.0, 32767.0, 0.0, 1.0)
    assert float(parts["mla"]) / LAYERS == pytest.approx(point("decode", 1024, 32768), rel=1e-4)
    _, parts = dp8_fn(0.0, 0.0, 256.0, 512.0)
    assert float(parts["mla"]) / LAYERS == pytest.approx(point("prefill", 256, 512), rel=1e-4)
    assert float(parts["attn_prefill"]) == float(parts["attn_decode"]) == 0.0


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 2000), ctx=st.integers(0, 100_000), new=st.integers(1, 16_000), grow=st.floats(1.01, 4.0))
def test_positive_and_monotone(dp8_fn, n, ctx, new, grow):
    base, parts = dp8_fn(float(n), float(ctx), 1.0, float(new))
    assert float(base) > 0 and all(float(v) >= 0 for v in parts.values())
    for more in ((n * grow, ctx, 1.0, new), (n, ctx * grow + 1, 1.0, new), (n, ctx, 1.0, new * grow)):
        t, p = dp8_fn(*map(float, more))
        assert float(t) >= float(base) * (1 - 1e-5)
        assert float(p["mla"]) >= float(parts["mla"]) * (1 - 1e-5)


def test_gradients_are_finite(dp8, dp8_fn):
    """d(step time) / d(cached tokens) and / d(MLA decode table values) in one compilation."""
    def total(ctx, log_t):
        arrays = dp8.arrays._replace(mla_decode=dp8.arrays.mla_decode._replace(log_t=log_t))
        return dp8_fn(64.0, ctx, 1.0, 512.0, arrays)[0]
    g_ctx, g_t = jax.grad(total, argnums=(0, 1))(2000.0, dp8.arrays.mla_decode.log_t)
    assert np.isfinite(float(g_ctx)) and float(g_ctx) > 0
    assert np.all(np.isfinite(np.asarray(g_t))) and float(jnp.sum(g_t)) > 0


def test_dispatch_combine_is_an_allreduce_of_the_gathered_bytes(dp8, dp8_fn):
    """Per MoE layer: one all-reduce of tokens x 8 ranks x hidden x 2 bytes over the 8 GPUs (tp 1: no TP
    all-reduce); the fused-MoE curve read at 8x the rank's tokens."""
    _, parts = dp8_fn(100.0, 1000.0, 0.0, 1.0)
    d = dp8.on_gpu.dims
    ep = float(kt.allreduce_us(dp8.arrays.comm, 8.0, 100.0 * 8 * 7168 * 2, dp8.on_gpu.hw, Params()))
    assert float(parts["communication"]) == pytest.approx(MOE * ep, rel=1e-5)
    assert float(step.TableLookup(dp8.arrays, dp8.on_gpu).moe_us(100.0)) == \
        pytest.approx(float(kt.moe_table_us(dp8.arrays.moe, 800.0)), rel=1e-6)
    assert d.tp == 1.0


def test_attention_dp_1_changes_nothing(shared, h200):
    """An existing MoE model at attention_dp=1 prices exactly as before (the default)."""
    m = load_model("qwen3-30b-a3b", shared / "model_configs")
    s = step.pack_steps([{"decode": [100, 2000, 9000], "prefill": [[700, 300]]}])
    a = step.setup(m, h200, 2, 2)
    b = step.setup(m, h200, 2, 2, attention_dp=1)
    fn = step.make_step_fn(a.static)
    (ta, pa), (tb, pb) = fn(a.arrays, a.on_gpu, Params(), s), fn(b.arrays, b.on_gpu, Params(), s)
    assert float(ta[0]) == float(tb[0]) and all(float(pa[k][0]) == float(pb[k][0]) for k in pa)
    assert "mla" not in pa


def test_bad_layouts_and_models_are_refused(ds, kimi, h200, shared):
    with pytest.raises(InputError, match="moe_ep=3 must divide tp x attention_dp = 8"):
        ops.dims(ds, 1, 3, attention_dp=8)
    with pytest.raises(InputError, match="moe_ep=256 must divide the 384 experts"):
        ops.dims(kimi, 8, 256, attention_dp=32)
    with pytest.raises(InputError, match="attention_dp=2 needs a mixture-of-experts model"):
        ops.dims(load_model("llama-3.1-8b"), 1, attention_dp=2)
    with pytest.raises(InputError, match="field 'attention_dp'.*positive integer"):
        ops.dims(ds, 1, attention_dp=0)
    with pytest.raises(InputError, match="no MLA decode table for A100.*h200_sxm"):
        step.setup(ds.with_dtype("bf16"), load_tables(None, get_gpu("a100_sxm")), 8)
    with pytest.raises(InputError, match="no curves at 3 heads per GPU.*measured heads per GPU: 1, 2, 4"):
        mla_tables_of("h200_sxm", 3, "bf16", "bf16")
    for name, what in (("deepseek-v2-lite", "DeepSeek-V2's multi-head latent attention"),
                       ("deepseek_v3.2", "DeepSeek sparse attention"), ("glm-5.2-fp8", "DeepSeek sparse attention")):
        with pytest.raises(InputError, match=f"{name}/config.json.*{what}.*not supported yet"):
            load_model(name, shared / "model_configs")


def test_record_layouts_are_validated(tmp_path, shared):
    from costmodel.apps.records import Predictor, read_records
    rec = {"id": "a", "model": "deepseek_v3", "gpu": "H200", "tp": 1, "steps": [{"decode": [100]}]}
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({**rec, "attention_dp": "8"}) + "\n")
    with pytest.raises(InputError, match=r"r.jsonl:1: field 'attention_dp': must be a positive integer"):
        read_records(p)
    p.write_text(json.dumps({**rec, "attention_dp": 8, "moe_ep": 3}) + "\n")
    r = read_records(p)[0]
    assert r.attention_dp == 8
    with pytest.raises(InputError, match=r"r.jsonl:1: field 'moe_ep': moe_ep=3 must divide tp x attention_dp = 8"):
        Predictor(model_configs=shared / "model_configs").setup_for(r)


def test_sweep_of_deepseek_equals_predict(shared, h200):
    """A sweep of DeepSeek-V3 at attention-DP 8 + EP 8 gives `predict`'s step times and its MLA, MoE and
    communication parts."""
    from costmodel.apps import sweep as sw
    from costmodel.apps.records import Predictor, parse_record
    rng = np.random.default_rng(5)
    n = 8
    df = pd.DataFrame({"model": "deepseek_v3", "gpu": "H200", "tp": 1, "moe_ep": 8, "attention_dp": 8,
                       "calibration": "none", "n_decode": rng.integers(1, 128, n),
                       "decode_ctx": rng.integers(0, 20_000, n), "n_prefill": rng.integers(0, 2, n),
                       "prefill_new": rng.integers(1, 4_000, n), "prefill_cached": 0})
    got = sw.sweep(df, model_configs=shared / "model_configs", tables={"H200-SXM": h200})
    records = [parse_record({"id": str(i), "model": "deepseek_v3", "gpu": "H200", "tp": 1, "moe_ep": 8,
                             "attention_dp": 8, "steps": [{"prefill": [[int(r.prefill_new), 0]] * int(r.n_prefill),
                                                           "decode": [int(r.decode_ctx)] * int(r.n_decode)}]},
                            f"row {i}") for i, r in enumerate(df.itertuples())]
    pred = Predictor(model_configs=shared / "model_configs")
    pred._tables["H200-SXM"] = h200
    total, parts = pred.predict(records, Params())
    np.testing.assert_allclose(got.step_us, total, rtol=1e-5)
    for k in ("mla", "moe", "communication"):
        np.testing.assert_allclose(got[k], parts[k], rtol=1e-5)
    assert (got.attention_dp == 8).all() and (got.mla > 0).all()
