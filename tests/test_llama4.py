"""Llama-4 Scout (a multimodal wrapper around an MoE text model): the text model's shapes read from
``text_config``, FLOPs and per-GPU shapes counted by hand, the chunked local-attention layers priced as
sliding-window layers of the chunk, and fp8 experts read from vLLM's Triton fp8 curve."""
import jax
import numpy as np
import pytest

from costmodel import Params, get_gpu, load_model, load_tables, ops, step
from costmodel.tables import load_moe, moe_curve

from conftest import shared_model

SCOUT = "llama-4-scout-17b-16e-instruct"
SCOUT_FP8 = "llama-4-scout-17b-16e-instruct-fp8-dynamic"


@pytest.fixture(scope="module")
def h100():
    return load_tables(None, get_gpu("H100"))


def test_text_model_of_the_wrapper():
    m = shared_model(SCOUT)
    assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim) == (5120, 48, 40, 8, 128)
    assert (m.experts, m.top_k, m.moe_intermediate, m.shared_intermediate, m.moe_layers) == (16, 1, 8192, 8192, 48)
    # every layer but each fourth (the NoPE global layers) attends within its 8,192-token chunk
    assert (m.sliding_layers, m.sliding_window) == (36, 8192.0)
    assert m.dtype == "bf16" and m.expert_dtype == "bf16" and m.vocab_size == 202048 and m.qk_norm
    fp8 = shared_model(SCOUT_FP8)  # compressed-tensors: experts fp8, attention and router left bf16
    assert fp8.dtype == "bf16" and fp8.expert_dtype == "fp8"


def test_tp2_shapes_and_routed_flops_by_hand():
    d = ops.dims(shared_model(SCOUT), 2)
    assert (d.q_heads, d.kv_heads, d.moe_inter, d.shared_inter) == (20.0, 4.0, 4096.0, 4096.0)
    assert (d.window, d.sliding_layers, d.sliding_window) == (ops.NO_WINDOW, 36.0, 8192.0)
    # 1,000 tokens, top-1: 1,000 (token, expert) pairs x 2 FLOP x 3 matrices (gate, up, down) x 5120 x 4096
    assert float(ops.moe_routed_flops(d, 1000.0)) == pytest.approx(1000 * 2 * 3 * 5120 * 4096, rel=1e-6)
    shared = ops.moe_gemms(d, 1000.0, True)
    assert (float(shared["shared_gate_up_proj"].n), float(shared["shared_down_proj"].k)) == (8192.0, 4096.0)
    # a decode beyond one chunk attends 8,192 keys in the 36 chunked layers, all of its context in the 12 others
    keys = float(ops.decode_keys(d, 20_000.0))
    assert float(ops.sliding_decode_keys(d, 1.0, keys)) == pytest.approx(8192.0)


def test_fp8_experts_read_the_triton_fp8_curve(h100):
    """At a measured token count the fp8 experts cost what vLLM's Triton kernel measured (the block-scaled
    curve on H100, whose per-tensor fp8 rows come from FlashInfer's CUTLASS kernel only)."""
    df = load_moe("H100-SXM")
    tokens, us = moe_curve(df[df.kernel == step.FP8_EXPERTS_KERNEL], "fp8_block", 5120, 8192, 16, 1, 2, 1)
    cutlass = dict(zip(*moe_curve(df, "fp8", 5120, 8192, 16, 1, 2, 1)))
    su = step.setup(shared_model(SCOUT_FP8), h100, 2)
    lk = step.TableLookup(su.arrays, su.on_gpu)
    floor = np.minimum.accumulate(us[::-1])[::-1]  # the tables' policy: no time above one for more tokens
    for t in (32, 320):
        i = int(np.argmin(np.abs(tokens - t)))
        assert float(lk.moe_us(float(tokens[i]))) == pytest.approx(float(floor[i]), rel=1e-4)
        if int(tokens[i]) in cutlass:
            assert cutlass[int(tokens[i])] > 2 * float(floor[i])


def test_a_scout_step_has_moe_and_attention_parts(h100):
    su = step.setup(shared_model(SCOUT_FP8), h100, 2)
    s = jax.tree_util.tree_map(lambda a: a[0], step.pack_steps([{"prefill": [[2048, 0]], "decode": [1000, 2000]}]))
    total, parts = step.step_time(su.arrays, su.on_gpu, Params(), s, su.static)
    assert np.isfinite(float(total)) and float(parts["moe"]) > 0 and float(parts["attn_prefill"]) > 0
    assert float(total) == pytest.approx(sum(float(v) for v in parts.values()), rel=1e-6)
