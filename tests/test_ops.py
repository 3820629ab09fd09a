"""FLOP and byte counts checked against numbers computed by hand for real models."""
import dataclasses
import math

import pytest

from costmodel import InputError, ops
from costmodel.model import load_model


def test_llama2_7b_tp1_hand_counts():
    m = load_model("llama-2-7b")  # packaged config: h=4096, 32 layers, 32/32 heads, I=11008, V=32000
    d = ops.dims(m, 1)
    g = ops.layer_gemms(d, 100.0)
    # QKV: n = (32 + 2*32) * 128 = 12288; FLOPs = 2 * 100 * 4096 * 12288
    assert float(ops.gemm_flops(g["qkv_proj"])) == pytest.approx(2 * 100 * 4096 * 12288)
    assert float(ops.gemm_flops(g["o_proj"])) == pytest.approx(2 * 100 * 4096 * 4096)
    assert float(ops.gemm_flops(g["gate_up_proj"])) == pytest.approx(2 * 100 * 4096 * 22016)
    assert float(ops.gemm_flops(g["down_proj"])) == pytest.approx(2 * 100 * 11008 * 4096)
    # bytes of QKV in fp16: x 100*4096*2 + W 4096*12288*2 + y 100*12288*2
    assert float(ops.gemm_bytes(g["qkv_proj"], d.weight_bytes)) == pytest.approx(
        819200 + 100663296 + 2457600)
    # prefill chunk of 64 new tokens after 1024 cached: 64*1024 + 64*65/2 pairs per head
    pairs = float(ops.prefill_pairs(d, 64.0, 1024.0))
    assert pairs == 64 * 1024 + 2080
    assert float(ops.attention_flops(d, pairs)) == pytest.approx(4 * 32 * 128 * pairs)
    # decode with 1000 cached: 1001 keys; K+V bytes = 2 * 32 heads * 128 * 1001 * 2
    assert float(ops.kv_read_bytes(d, ops.decode_keys(d, 1000.0))) == 2 * 32 * 128 * 1001 * 2
    assert float(ops.allreduce_bytes(d, 100.0)) == 100 * 4096 * 2


def test_qwen3_14b_tp2_uses_explicit_head_dim(shared):
    m = load_model("qwen3-14b", shared / "model_configs")
    assert (m.head_dim, m.num_heads, m.num_kv_heads, m.hidden_size) == (128, 40, 8, 5120)
    d = ops.dims(m, 2)
    assert (d.q_heads, d.kv_heads, d.inter, d.vocab) == (20, 4, 8704, 75968)
    g = ops.layer_gemms(d, 10.0)
    assert (float(g["qkv_proj"].n), float(g["o_proj"].k)) == ((20 + 8) * 128, 20 * 128)
    assert float(ops.gemm_flops(g["gate_up_proj"])) == pytest.approx(2 * 10 * 5120 * 17408)
    assert float(ops.gemm_flops(g["down_proj"])) == pytest.approx(2 * 10 * 8704 * 5120)
    # Qwen3 q/k RMSNorm: read + write (20 + 4) heads * 128 per token in bf16
    assert float(ops.memory_ops_bytes(d, 10.0)["qk_norm"]) == 2 * 10 * 24 * 128 * 2
    # one layer's bandwidth-bound kernels at 10 tokens, by hand: 2 RMSNorms 2*(4*10*5120*2 + 5120*2), RoPE
    # 2*10*24*128*2, KV write 10*2*4*128*(2+2), SiLU-and-mul 3*10*8704*2, q/k norm as above
    mem = ops.memory_ops_bytes(d, 10.0)
    assert float(mem["rmsnorm"]) == 2 * (4 * 10 * 5120 * 2 + 5120 * 2)
    assert float(mem["kv_cache_write"]) == 10 * 2 * 4 * 128 * (2 + 2)
    assert float(mem["activation"]) == 3 * 10 * 8704 * 2
    by_hand = 2 * (4 * 10 * 5120 * 2 + 5120 * 2) + 2 * 10 * 24 * 128 * 2 + 10 * 2 * 4 * 128 * 4 + 3 * 10 * 8704 * 2 \
        + 2 * 10 * 24 * 128 * 2
    assert float(sum(mem.values())) == by_hand
    assert float(ops.memory_ops_total_bytes(d, 10.0)) == by_hand
    # lm_head is split (75968 rows here), but the sampler runs on the all-gathered logits of the full
    # 151936-token vocabulary: 3 fp32 passes for each of 8 sampled requests
    assert float(ops.sampling_bytes(d, 8.0)) == 3 * 8 * 151936 * 4
    # that all-gather: 8 requests x 151936 bf16 logits = 2,430,976 bytes gathered on each GPU, priced as an
    # all-reduce of half of it; no gather at TP 1
    assert float(ops.logits_gather_message(d, 8.0)) == 8 * 151936 * 2 / 2
    assert float(ops.logits_gather_message(ops.dims(m, 1), 8.0)) == 0.0


def test_kv_heads_replicated_beyond_tp():
    m = load_model("llama-3.1-8b")  # 8 KV heads
    assert ops.dims(m, 8).kv_heads == 1 and ops.dims(m, 4).kv_heads == 2


def test_per_gpu_heads_one_rule_for_model_tables_and_grids():
    """The per-GPU head layout under TP (`ops.per_gpu_heads`) serves the model (`dims`), the table loader's
    ``-tpT`` files and the importer's and measuring harness's layout lists."""
    assert ops.per_gpu_heads(64, 8, 128, 4) == (16, 2, 128)
    assert ops.per_gpu_heads(32, 4, 128, 8) == (4, 1, 128)  # KV heads replicated: one per GPU
    assert ops.per_gpu_heads(28, 4, 128, 8) is None  # query heads do not split 8 ways
    assert ops.per_gpu_heads(48, 12, 128, 8) is None  # neither split nor replicated evenly
    assert ops.per_gpu_layouts([(32, 8, 128), (28, 4, 128)], (1, 8)) == ((4, 1, 128), (28, 4, 128), (32, 8, 128))
    m = load_model("llama-3.1-70b")
    d = ops.dims(m, 8)
    assert (d.q_heads, d.kv_heads, d.head_dim) == ops.per_gpu_heads(m.num_heads, m.num_kv_heads, m.head_dim, 8)
    odd = dataclasses.replace(m, num_heads=48, num_kv_heads=12, intermediate_size=28672)
    with pytest.raises(InputError, match="tp=8 must divide num_key_value_heads=12"):
        ops.dims(odd, 8)


def test_sliding_window_caps_keys(shared):
    m = load_model("mistral-7b-v0.1", shared / "model_configs")
    d = ops.dims(m, 1)
    assert float(ops.decode_keys(d, 10000.0)) == 4096
    assert float(ops.prefill_pairs(d, 100.0, 10000.0)) == 100 * 4096
    assert math.isinf(load_model("llama-2-7b").sliding_window)


def test_prefill_tile_padding_counts_packed_gqa_heads():
    # A chunk shorter than a 128-row FA3 query tile pads it.  Llama-2-7B is MHA (one query head per KV
    # head), so 64 new tokens after 1000 cached are computed as 128 rows: 128*1000 + 128*129/2 pairs.
    mha = ops.dims(load_model("llama-2-7b"), 1)
    assert float(ops.prefill_pairs_tiled(mha, 64.0, 1000.0)) == 128 * 1000 + 8256
    # Llama-3.1-8B has 4 query heads per KV head; packed, a tile holds 128/4 = 32 tokens, so a 64-token
    # chunk fills two tiles with no padding, and a 20-token chunk is padded to 32.
    gqa = ops.dims(load_model("llama-3.1-8b"), 1)
    assert float(ops.prefill_pairs_tiled(gqa, 64.0, 1000.0)) == 64 * 1000 + 2080
    assert float(ops.prefill_pairs_tiled(gqa, 20.0, 1000.0)) == 32 * 1000 + 528
