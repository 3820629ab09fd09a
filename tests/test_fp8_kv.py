"""FP8 KV cache (``kv_cache_dtype``) in the step model: attention read from the tables' FP8-KV rows, KV-cache
bytes at 1 byte per element, the record field, and refusals where no FP8-KV rows were measured."""
import json

import jax
import numpy as np
import pandas as pd
import pytest

from costmodel import InputError, Params, get_gpu, load_model, load_tables, pack_steps, setup, step_time
from costmodel import step
from costmodel.apps.records import Predictor, parse_record
from costmodel.tables import default_bench_data


@pytest.fixture(scope="module")
def h100():
    return load_tables(None, get_gpu("H100"))


@pytest.fixture(scope="module")
def llama70():
    return load_model("llama-3.1-70b")


def _one(steps: list[dict]):
    return jax.tree_util.tree_map(lambda a: a[0], pack_steps(steps))


def _features(su, s: dict):
    return step.features(su.arrays, su.on_gpu, _one([s]), su.static)


def test_decode_attention_reads_the_fp8_rows_at_a_measured_point(h100, llama70):
    """Llama-3.1-70B at TP 4 runs per-GPU heads 16-2-128; 32 decodes over kv_len 8191 (8190 cached + the new
    token) is a measured point of that file: fp8 KV prices it at the fp8 row, bf16 at the bf16 row."""
    df = pd.read_csv(default_bench_data() / "mha/decode/h100_sxm/16-2-128.csv")
    at = df[(df.batch_size == 32) & (df.kv_len == 8191)].set_index("kv_dtype").latency_us
    for kv, rows in (("fp8", "fp8"), ("auto", "bf16")):
        su = setup(llama70, h100, 4, kv_cache_dtype=kv)
        got = float(_features(su, {"decode": [8190] * 32}).attn_decode_us)
        assert got == pytest.approx(at[rows], rel=1e-5)
    assert at["fp8"] < at["bf16"]


def test_cold_kv_and_kv_write_bytes_halve(h100, llama70):
    """40 decodes of 640 cached tokens each attend 641 keys: per layer a GPU reads K and V of its 2 KV heads x
    128 dims for 25,640 keys, 2 bytes each (bf16) or 1 (fp8); the KV write stores the 40 new tokens' K and V
    at that precision after reading them in bf16."""
    keys = 40 * 641
    kv_read = {"auto": 2 * 2 * 128 * keys * 2, "fp8": 2 * 2 * 128 * keys * 1}  # 26,255,360 and 13,127,680 bytes
    s = {"decode": [640] * 40}
    f = {kv: _features(setup(llama70, h100, 4, kv_cache_dtype=kv), s) for kv in ("auto", "fp8")}
    for kv in kv_read:
        assert float(f[kv].kv_bytes) == kv_read[kv]
    # kv_cache_write: 40 tokens x 512 elements, read at 2 bytes and stored at 2 (bf16) or 1 (fp8)
    assert float(f["auto"].memory_bytes) - float(f["fp8"].memory_bytes) == 40 * 2 * 2 * 128 * 1


def test_fp8_kv_long_context_decode_is_no_slower(h100, llama70):
    """Half the KV bytes: a long-context decode batch is no slower with an FP8 KV cache, and its decode
    attention is faster; GEMMs and communication do not change."""
    s = {"decode": [32000] * 64}
    out = {}
    for kv in ("auto", "fp8"):
        su = setup(llama70, h100, 4, kv_cache_dtype=kv)
        out[kv] = step_time(su.arrays, su.on_gpu, Params(), _one([s]), su.static)
    (t16, p16), (t8, p8) = out["auto"], out["fp8"]
    assert float(t8) <= float(t16)
    assert float(p8["attn_decode"]) < float(p16["attn_decode"])
    for part in ("gemm", "communication"):
        assert float(p8[part]) == float(p16[part])


def test_default_and_bf16_are_unchanged(h100, llama70):
    s = _one([{"prefill": [[1000, 3000]], "decode": [500, 9000]}])
    base = setup(llama70, h100, 4)
    t0 = float(step_time(base.arrays, base.on_gpu, Params(), s, base.static)[0])
    for kv in ("auto", "bf16", "fp16"):
        su = setup(llama70, h100, 4, kv_cache_dtype=kv)
        assert su.arrays.decode is h100.decode and su.arrays.prefill is h100.prefill
        assert float(step_time(su.arrays, su.on_gpu, Params(), s, su.static)[0]) == t0
    fp8 = setup(llama70, h100, 4, kv_cache_dtype="fp8")
    assert fp8.arrays.decode is h100.decode_fp8 and fp8.arrays.prefill is h100.prefill_fp8


def test_a100_has_no_fp8_rows_and_is_refused(llama70):
    a100 = load_tables(None, get_gpu("A100"))
    assert a100.decode_fp8 is None and a100.prefill_fp8 is None
    with pytest.raises(InputError, match=r"field 'kv_cache_dtype'.*A100.*no fp8 KV-cache rows.*16-2-128") as e:
        setup(llama70, a100, 4, kv_cache_dtype="fp8")
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="field 'kv_cache_dtype'.*unknown kv_cache_dtype 'int4'"):
        setup(llama70, a100, 4, kv_cache_dtype="int4")


def test_a_layout_without_fp8_rows_is_refused(h100, llama70):
    """Fp8 rows are needed for the very layout the bf16 tables price the model with."""
    import copy
    t = copy.copy(h100)
    t.decode_fp8_heads = [h for h in h100.decode_fp8_heads if h != (16, 2, 128)]
    with pytest.raises(InputError, match=r"decode attention tables of H100-SXM have no fp8 KV-cache rows for head "
                                         r"layout 16-2-128"):
        setup(llama70, t, 4, kv_cache_dtype="fp8")


def test_record_field(tmp_path, h100):
    base = {"id": "a", "model": "llama-3.1-70b", "gpu": "H100", "tp": 4, "steps": [{"decode": [32000] * 8}]}
    assert parse_record(base, "f.jsonl:1").kv_cache_dtype == "auto"
    for bad in ("int8", 8, None, "FP8"):
        with pytest.raises(InputError, match=r"^f.jsonl:3: field 'kv_cache_dtype': must be one of auto, bf16, "
                                             r"fp16, fp8"):
            parse_record({**base, "kv_cache_dtype": bad}, "f.jsonl:3")
    recs = [parse_record({**base, "id": kv, "kv_cache_dtype": kv}, f"f.jsonl:{i}")
            for i, kv in enumerate(("auto", "bf16", "fp8"))]
    pred = Predictor()
    pred._tables["H100-SXM"] = h100
    got, _ = pred.predict(recs, {"H100-SXM": Params()})
    assert got[0] == got[1] and got[2] < got[0]
    # the memory check sizes the pool at the record's KV precision: fp8 holds twice the tokens
    cap = {r.kv_cache_dtype: pred.kv_capacity(r) for r in recs}
    assert cap["fp8"].tokens >= 2 * cap["auto"].tokens - 2 * 16


def test_mla_reads_the_fp8_kv_module_tables(shared):
    """DeepSeek-V3 at attention-DP 8 + EP 8 on H200: the MLA module tables' kv_dtype fp8 curves."""
    from costmodel.tables import mla_tables_of
    ds = load_model("deepseek_v3", shared / "model_configs")
    h200 = load_tables(None, get_gpu("h200_sxm"))
    su = setup(ds, h200, 1, 8, attention_dp=8, kv_cache_dtype="fp8")
    dec, pre = mla_tables_of("H200-SXM", ds.num_heads, "fp8", ds.mla_gemm_dtype)
    np.testing.assert_array_equal(np.asarray(su.arrays.mla_decode.log_t), np.asarray(dec.log_t))
    bf = setup(ds, h200, 1, 8, attention_dp=8)
    assert not np.array_equal(np.asarray(bf.arrays.mla_decode.log_t), np.asarray(dec.log_t))
