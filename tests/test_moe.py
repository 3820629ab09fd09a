"""Mixture-of-experts models in the step model: shapes read from config.json, operator counts checked by hand,
the fused-MoE table lookup, and what is refused."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costmodel import InputError, ops, step
from costmodel.hardware import get_gpu
from costmodel.model import MOE_ARCHS, SUPPORTED_ARCHS, load_model
from costmodel.params import Params
from costmodel.tables import load_moe, load_tables, moe_curve

from conftest import shared_model


@pytest.fixture(scope="module")
def mixtral():
    return shared_model("mixtral-8x7b-v0.1")


@pytest.fixture(scope="module")
def qwen3_moe():
    return shared_model("qwen3-30b-a3b")


def test_moe_fields_from_config(mixtral, qwen3_moe):
    assert (mixtral.experts, mixtral.top_k, mixtral.moe_intermediate, mixtral.moe_layers) == (8, 2, 14336, 32)
    assert (mixtral.shared_intermediate, mixtral.expert_dtype, mixtral.qk_norm) == (0, "bf16", False)
    assert (qwen3_moe.experts, qwen3_moe.top_k, qwen3_moe.moe_intermediate, qwen3_moe.moe_layers) == (128, 8, 768, 48)
    assert qwen3_moe.qk_norm and qwen3_moe.with_dtype("fp8").expert_dtype == "fp8"
    assert qwen3_moe.with_expert_dtype("fp8_block").dtype == "bf16"


def test_mixtral_tp2_counts_by_hand(mixtral):
    d = ops.dims(mixtral, 2)
    assert (d.moe_inter, d.experts, d.top_k, d.moe_ep, float(d.dense_layers)) == (7168.0, 8.0, 2.0, 1.0, 0.0)
    router = ops.moe_gemms(d, 100.0, shared=False)
    assert list(router) == ["router"]
    assert float(ops.gemm_flops(router["router"])) == 2 * 100 * 4096 * 8
    # 100 tokens x top-2 = 200 (token, expert) pairs; gate/up 2 x 7168 outputs and down 4096 outputs per pair
    assert float(ops.moe_routed_flops(d, 100.0)) == pytest.approx(2 * 200 * (4096 * 2 * 7168 + 7168 * 4096))
    # one token picks 2 of 8 experts: 8 (1 - (7/8)^2) = 1.875 expected distinct experts
    assert float(ops.moe_active_experts(d, 1.0)) == pytest.approx(1.875, rel=1e-6)
    assert float(ops.moe_routed_weight_bytes(d, 1.0, 2.0)) == pytest.approx(1.875 * 3 * 4096 * 7168 * 2, rel=1e-6)
    # the routed experts' activation is inside the fused-MoE call: no dense activation kernel remains
    assert float(ops.memory_ops_bytes(d, 10.0)["activation"]) == 0.0


def test_qwen3_moe_ep_counts_by_hand(qwen3_moe):
    d = ops.dims(qwen3_moe, 4, moe_ep=4)  # experts 32 per GPU, each expert whole (moe_tp 1)
    assert (d.moe_inter, d.moe_ep, d.q_heads, d.kv_heads) == (768.0, 4.0, 8.0, 1.0)
    assert float(ops.moe_routed_pairs(d, 64.0)) == 64 * 8 / 4
    assert float(ops.moe_routed_flops(d, 64.0)) == pytest.approx(2 * 128 * 3 * 2048 * 768)
    # many tokens reach every local expert
    assert float(ops.moe_active_experts(d, 4096.0)) == pytest.approx(32.0)


def test_layouts_that_cannot_shard_the_experts_are_refused(mixtral, qwen3_moe):
    with pytest.raises(InputError, match="moe_ep=3 must divide tp=4"):
        ops.dims(mixtral, 4, moe_ep=3)
    with pytest.raises(InputError, match="moe_ep=16 must divide the 8 experts"):
        ops.dims(mixtral, 16, moe_ep=16)
    with pytest.raises(InputError, match="needs a mixture-of-experts model"):
        ops.dims(load_model("llama-3.1-8b"), 2, moe_ep=2)


def test_every_shared_config_predicts_or_says_why(shared):
    """Each architecture in the shared configs either loads for the step model or is refused naming what is
    missing (the README's support table lists the same)."""
    reasons = ("not supported yet",)
    for cfg in sorted((shared / "model_configs").glob("*/config.json")):
        try:
            m = load_model(cfg.parent.name, shared / "model_configs")
        except InputError as e:
            assert any(r in str(e) for r in reasons) and cfg.name in str(e), str(e)
            continue
        assert m.arch in SUPPORTED_ARCHS
        assert (m.experts > 0) == (m.arch in MOE_ARCHS), m.name


@pytest.fixture(scope="module")
def h100():
    return load_tables(None, get_gpu("h100_sxm"))


def _time(su, decode=(), prefill=()):
    s = step.pack_steps([{"decode": list(decode), "prefill": [list(p) for p in prefill]}])
    t, parts = step.make_step_fn(su.static)(su.arrays, su.on_gpu, Params(), s)
    return float(t[0]), {k: float(v[0]) for k, v in parts.items()}


def test_fused_moe_time_is_the_measured_curve(mixtral, h100):
    """At a measured token count the experts cost exactly what the table measured (one layer, µs)."""
    su = step.setup(mixtral, h100, 2)
    tokens, us = moe_curve(load_moe("h100_sxm"), "bf16", 4096, 14336, 8, 2, 2, 1)
    n, us = int(tokens[-1]), float(us[-1])  # the largest count: nothing above lowers it
    got = float(step.TableLookup(su.arrays, su.on_gpu).moe_us(jnp.float32(n)))
    assert got == pytest.approx(us, rel=1e-4)
    t, parts = _time(su, prefill=[(n, 0)])
    assert parts["moe"] > 32 * us  # the routed experts of 32 layers plus the router GEMMs
    assert t == pytest.approx(sum(parts.values()), rel=1e-5)


def test_unmeasured_layout_names_what_the_table_has(mixtral, h100):
    with pytest.raises(InputError, match="no fp8 curve .* at moe_tp=1, moe_ep=8; measured: moe_tp="):
        step.setup(mixtral.with_expert_dtype("fp8"), h100, 8, moe_ep=8)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 20000), st.integers(1, 4000))
def test_moe_step_time_positive_and_monotone_in_tokens(mixtral_h100_setup, n, extra):
    su = mixtral_h100_setup
    f = jax.jit(lambda x: step.TableLookup(su.arrays, su.on_gpu).moe_us(x))
    a, b = float(f(jnp.float32(n))), float(f(jnp.float32(n + extra)))
    assert 0 < a <= b * (1 + 1e-6) and math.isfinite(b)


@pytest.fixture(scope="module")
def mixtral_h100_setup(mixtral, h100):
    return step.setup(mixtral, h100, 2)


def test_moe_gradient_is_finite(mixtral_h100_setup):
    su = mixtral_h100_setup
    s = step.pack_steps([{"decode": [500] * 8, "prefill": [[300, 0]]}])

    def total(log_us):
        arrays = su.arrays._replace(moe=su.arrays.moe._replace(log_us=log_us))
        return step.step_time(arrays, su.on_gpu, Params(), jax.tree_util.tree_map(lambda a: a[0], s), su.static)[0]
    g = jax.grad(total)(su.arrays.moe.log_us)
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.sum(g)) > 0


def test_sweep_of_moe_and_dense_groups_equals_predict(shared, h100):
    """A sweep mixing MoE (gpt-oss with its sliding-window layers among them) and dense groups (one padded
    lookup shape for all) gives `predict`'s step times, attention and MoE parts (integer token counts: the
    per-token tables)."""
    from costmodel.apps import sweep as sw
    from costmodel.apps.records import Predictor, parse_record
    rng = np.random.default_rng(7)
    n = 24
    df = pd.DataFrame({"model": rng.choice(["qwen3-30b-a3b", "mixtral-8x7b-v0.1", "gpt-oss-120b", "llama-3.1-8b"], n),
                       "gpu": "H100", "tp": 2, "calibration": "none",
                       "n_decode": rng.integers(0, 64, n), "decode_ctx": rng.integers(0, 20_000, n),
                       "n_prefill": rng.integers(0, 3, n), "prefill_new": rng.integers(1, 20_000, n),
                       "prefill_cached": rng.integers(0, 5_000, n)})
    df.loc[(df.n_decode == 0) & (df.n_prefill == 0), "n_decode"] = 1
    got = sw.sweep(df, model_configs=shared / "model_configs", tables={"H100-SXM": h100})
    steps = [{"prefill": [[int(r.prefill_new), int(r.prefill_cached)]] * int(r.n_prefill),
              "decode": [int(r.decode_ctx)] * int(r.n_decode)} for r in df.itertuples()]
    records = [parse_record({"id": str(i), "model": r.model, "gpu": "H100", "tp": 2, "steps": [s]}, f"row {i}")
               for i, (r, s) in enumerate(zip(df.itertuples(), steps))]
    pred = Predictor(model_configs=shared / "model_configs")
    pred._tables["H100-SXM"] = h100
    total, parts = pred.predict(records, Params())
    np.testing.assert_allclose(got.step_us, total, rtol=1e-5)
    np.testing.assert_allclose(got.moe, parts["moe"], rtol=1e-5)
    np.testing.assert_allclose(got.attn_decode, parts["attn_decode"], rtol=1e-5)  # gpt-oss: sliding + full layers
    assert (got.moe[df.model == "llama-3.1-8b"] == 0).all() and (got.moe[df.model != "llama-3.1-8b"] > 0).all()
