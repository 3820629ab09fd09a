"""Pipeline parallelism (``pp``) in the step model: a step is one batch's pass through every stage, so it
costs the TP step plus pp - 1 hand-offs of the activations, counted by hand here; the record field and its
validation; serve's interleaved batch lanes."""
import jax
import pytest

from costmodel import InputError, Params, get_gpu, pack_steps, setup, step_time
from costmodel import kernel_time as kt
from costmodel import ops
from costmodel.apps.records import parse_record
from costmodel.apps import serve as sv

STEP = {"prefill": [[2048, 0]], "decode": [1000, 2000]}  # 2,050 tokens


from test_fp8_kv import h100, llama70  # noqa: E402,F401  the same two fixtures (tables, Llama-3.1-70B)


def _time(su):
    s = jax.tree_util.tree_map(lambda a: a[0], pack_steps([STEP]))
    total, parts = step_time(su.arrays, su.on_gpu, Params(), s, su.static)
    return float(total), {k: float(v) for k, v in parts.items()}


def test_handoff_bytes_and_time_by_hand(llama70):
    # hidden states and residual of 2,050 tokens x 8,192 hidden in bf16, split over 4 TP ranks
    d = ops.dims(llama70, 4, pp=2)
    assert float(ops.pp_handoff_bytes(d, 2050.0)) == 2 * 2050 * 8192 * 2 / 4 == 16_793_600
    p, hw = Params(), kt.Hardware(1.0, 1.0, 1.0, 450e9)
    link = 450e9 * p.nvlink_efficiency
    send = p.allreduce_latency_us + 16_793_600 / link * 1e6
    gather = p.allreduce_latency_us + 3 * 16_793_600 / link * 1e6  # the 3 other ranks' shards
    assert float(kt.pp_handoff_us(16_793_600.0, 4.0, hw, p)) == pytest.approx(send + gather, rel=1e-6)
    assert float(kt.pp_handoff_us(16_793_600.0, 1.0, hw, p)) == pytest.approx(send, rel=1e-6)  # no TP gather


@pytest.mark.parametrize("pp", [2, 4])
def test_a_pipelined_step_is_the_tp_step_plus_its_handoffs(h100, llama70, pp):
    one, parts1 = _time(setup(llama70, h100, 4))
    su = setup(llama70, h100, 4, pp=pp)
    many, parts = _time(su)
    d, hw = su.on_gpu.dims, su.on_gpu.hw
    handoff = float(kt.pp_handoff_us(ops.pp_handoff_bytes(d, 2050.0), d.tp, hw, Params()))
    assert handoff > 0 and many - one == pytest.approx((pp - 1) * handoff, rel=1e-4)
    assert parts["communication"] - parts1["communication"] == pytest.approx((pp - 1) * handoff, rel=1e-4)
    assert all(parts[k] == parts1[k] for k in parts if k != "communication")


def test_pp_is_validated(llama70):
    with pytest.raises(InputError, match="field 'pp'"):
        ops.dims(llama70, 4, pp=81)  # 80 layers
    with pytest.raises(InputError, match="field 'pp'"):
        ops.dims(llama70, 4, pp=0)
    rec = {"id": 1, "model": "llama-3.1-70b", "gpu": "H100", "tp": 4, "steps": [STEP]}
    assert parse_record({**rec, "pp": 2}, "f:1").pp == 2 and parse_record(rec, "f:1").pp == 1
    for bad in (0, "2", 1.5, True):
        with pytest.raises(InputError, match=r"f:1.*field 'pp'"):
            parse_record({**rec, "pp": bad}, "f:1")


def test_serve_runs_pp_batch_lanes_on_tp_x_pp_gpus():
    """vLLM keeps pp batches in flight: the simulation is one lane with 1/pp of the clients and of the KV
    cache the memory model gives the stages, its step the whole pipeline's pass."""
    rec = {"id": "p", "model": "llama-3.1-70b", "gpu": "H100", "tp": 2, "pp": 2, "weights": "fp8",
           "engine": {"name": "vllm", "version": "0.15.1"},
           "workload": {"type": "closed", "concurrency": 8, "input_tokens": 256, "output_tokens": 16}}
    dep = sv.resolve(rec, "f:1", workload_options={"rounds": 2})
    arch = sv.load_arch("llama-3.1-70b")
    limits = {"max_num_batched_tokens": 8 + 256 + 1500, "max_num_seqs": 8}  # AIConfigurator's benchmark workers
    whole = sv.estimate_kv_blocks(arch, get_gpu("H100"), 2, 1, {"gpu_memory_utilization": 0.9, **limits}, "fp8",
                                  None, 1, 2)
    assert dep.pp == 2 and dep.gpus == 4 and dep.kv_blocks == whole // 2 and dep.load_share == 2.0
    assert dep.requests.n_users == 4
    out = sv.serve([rec], workload_options={"rounds": 2})[0]
    assert out["simulation"]["pp"] == 2 and out["throughput"]["output_tokens_per_s_per_gpu"] == pytest.approx(
        out["throughput"]["output_tokens_per_s"] / 4)


def test_sweep_pp_axis_equals_predict(h100):
    """A sweep table with a ``pp`` column gives `predict`'s step times and communication for the same
    records, and writes the column back."""
    import numpy as np
    import pandas as pd
    from costmodel.apps import sweep as sw
    from costmodel.apps.records import Predictor
    rng = np.random.default_rng(3)
    n = 12
    df = pd.DataFrame({"model": "llama-3.1-8b", "gpu": "H100", "tp": 2, "calibration": "none",
                       "pp": rng.choice([1, 2, 4], n), "n_decode": rng.integers(1, 64, n),
                       "decode_ctx": rng.integers(0, 8_000, n), "n_prefill": rng.integers(0, 2, n),
                       "prefill_new": rng.integers(1, 4_000, n), "prefill_cached": 0})
    got = sw.sweep(df, tables={"H100-SXM": h100})
    recs = [parse_record({"id": str(i), "model": "llama-3.1-8b", "gpu": "H100", "tp": 2, "pp": int(r.pp),
                          "steps": [{"prefill": [[int(r.prefill_new), 0]] * int(r.n_prefill),
                                     "decode": [int(r.decode_ctx)] * int(r.n_decode)}]}, f"row {i}")
            for i, r in enumerate(df.itertuples())]
    pred = Predictor()
    pred._tables["H100-SXM"] = h100
    total, parts = pred.predict(recs, Params())
    np.testing.assert_allclose(got.step_us, total, rtol=1e-5)
    np.testing.assert_allclose(got.communication, parts["communication"], rtol=1e-5)
    assert list(got.pp) == list(df.pp)


def test_record_layout_fields_dp_and_moe_tp():
    """A step record's ``dp`` (replicas: a step is one replica's) is validated and changes nothing; ``moe_tp``
    is checked against tp x attention_dp / moe_ep for a mixture-of-experts model, not read for a dense one."""
    from costmodel.apps.records import Predictor
    from conftest import need_shared
    base = {"id": "m", "model": "qwen3-30b-a3b", "gpu": "H100", "tp": 2, "moe_ep": 2, "steps": [{"decode": [100]}]}
    assert parse_record({**base, "dp": 4}, "f:1").setup_key == parse_record(base, "f:1").setup_key
    with pytest.raises(InputError, match="field 'dp'"):
        parse_record({**base, "dp": 0}, "f:1")
    pred = Predictor(model_configs=need_shared() / "model_configs")
    ok = parse_record({**base, "moe_tp": 1}, "f:2")  # 2 x 1 / 2
    pred.setup_for(ok)
    with pytest.raises(InputError, match=r"f:3.*field 'moe_tp'.*= 1"):
        pred.setup_for(parse_record({**base, "moe_tp": 2}, "f:3"))
    dense = parse_record({"id": "d", "model": "llama-3.1-8b", "gpu": "H100", "tp": 2, "moe_tp": 7,
                          "steps": [{"decode": [100]}]}, "f:4")
    pred.setup_for(dense)  # no experts: moe_tp states nothing about them


def test_serve_checks_a_stated_moe_tp():
    from conftest import need_shared
    rec = {"id": "m", "model": "qwen3-30b-a3b", "gpu": "H100", "tp": 2, "moe_ep": 2, "moe_tp": 2,
           "engine": {"name": "vllm", "version": "0.15.1"},
           "workload": {"type": "closed", "concurrency": 2, "input_tokens": 64, "output_tokens": 4}}
    cfg = need_shared() / "model_configs"
    with pytest.raises(InputError, match=r"f:7.*field 'moe_tp'"):
        sv.resolve(rec, "f:7", cfg)
    assert sv.resolve({**rec, "moe_tp": 1}, "f:7", cfg).moe_ep == 2
