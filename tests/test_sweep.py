"""Sweeps: the fast per-group evaluation equals the general step model (float32 precision), summarized and
per-request batches agree, sweep = Predictor.predict = a Python loop, chunked output resumes without
recomputing, process splits and device sharding give the same rows, the command line and the bench run."""
import argparse
import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

import costmodel as cm
from costmodel.apps import sweep as sw
from costmodel.errors import InputError
from costmodel.params import Params
from costmodel.apps.records import _step_fn
from costmodel.step import pad_steps
from costmodel.compiled import jit

from conftest import sweep_stopped_after

RTOL = 1e-5  # float32: the two paths round differently (float32 sums over requests, log/exp order)
REPO = Path(__file__).resolve().parent.parent
MIXTRAL = str(Path(os.environ.get("COSTMODEL_SHARED", REPO.parent / "shared")) / "model_configs" / "mixtral-8x7b-v0.1")


def _random_batches(rng, n, tps=(1, 2, 4)):
    """Mixed batches in the per-request-equal ("mean") form, with edge cases: tiny contexts and chunks
    (below the tables' grids), huge ones (above), decode-only, prefill-only."""
    df = pd.DataFrame({
        "tp": rng.choice(tps, n),
        "n_decode": rng.integers(0, 40, n),
        "decode_ctx": np.where(rng.random(n) < 0.3, rng.integers(0, 20, n), rng.integers(0, 200_000, n)),
        "n_prefill": rng.integers(0, 3, n),
        "prefill_new": np.where(rng.random(n) < 0.3, rng.integers(1, 64, n), rng.integers(1, 40_000, n)),
        "prefill_cached": rng.integers(0, 30_000, n),
    })
    df.loc[(df.n_decode == 0) & (df.n_prefill == 0), "n_decode"] = 1
    return df


def _as_steps(df):
    return [{"prefill": [[int(r.prefill_new), int(r.prefill_cached)]] * int(r.n_prefill),
             "decode": [int(r.decode_ctx)] * int(r.n_decode)} for r in df.itertuples()]


def _ref_fn(su, steps, params=None, rows=1024):
    """`step.step_time` via `records._step_fn` on steps padded to fixed shapes (1024 rows, 4 prefill and 64
    decode columns), so that every reference evaluation of one GPU shares a compilation."""
    n = steps.prefill_new.shape[0]
    steps = pad_steps(steps, 4, 64)
    steps = jax.tree_util.tree_map(lambda a: np.pad(np.asarray(a), ((0, rows - n), (0, 0)), mode="edge"), steps)
    t, br = _step_fn(su.static)(su.arrays, su.on_gpu, params or Params(), steps)
    return np.asarray(t)[:n], {k: np.asarray(v)[:n] for k, v in br.items()}


def _reference(df, model, tables, params=None):
    """The general path (`step_time` over padded per-request steps) for every row at its TP."""
    steps = cm.pack_steps(_as_steps(df))
    out = np.zeros(len(df))
    parts = {k: np.zeros(len(df)) for k in sw.RESULT_COLUMNS[1:]}
    for tp in sorted(df.tp.unique()):
        sel = df.tp.to_numpy() == tp
        t, br = _ref_fn(cm.setup(cm.load_model(model), tables, int(tp)), steps, params)
        out[sel] = t[sel]
        for k in br:
            parts[k][sel] = br[k][sel]
    return out, parts


@pytest.fixture(scope="module")
def h100():
    return cm.load_tables(None, cm.get_gpu("H100"))


@pytest.mark.parametrize("model,gpu,tokens", [("llama-3.1-8b", "H100", "any"), ("llama-3.1-8b", "H100", "int"),
                                              ("qwen3-8b", "A100", "any"), (MIXTRAL, "H100", "any")])
def test_fast_path_equals_step_time(model, gpu, tokens):
    """Precomputed per-GEMM m-series, refined attention tables and LUT cell search (token counts beyond the
    per-token tables: "any"), or the per-token GEMM/all-reduce tables ("int"), == `step_time`."""
    df = _random_batches(np.random.default_rng(1), 600)
    if tokens == "int":
        df["prefill_new"] = np.minimum(df.prefill_new, 10_000)
    else:
        df.loc[0, ["n_prefill", "prefill_new"]] = 1, sw.TOKEN_TABLE + 1
    tables = cm.load_tables(None, cm.get_gpu(gpu))
    sp = sw.make_space(df, {"model": model, "gpu": gpu, "calibration": "none"})
    out = sw.run(sp, tables={tables.gpu.name: tables}, collect=True)
    got = out["frame"]
    general, per_token = out["info"].calls
    assert (general == 0 and per_token > 0) if tokens == "int" else general > 0
    ref, parts = _reference(df, model, tables)
    np.testing.assert_allclose(got.step_us.to_numpy(), ref, rtol=RTOL)
    for k in sw.RESULT_COLUMNS[1:]:
        np.testing.assert_allclose(got[k].to_numpy(), parts[k], rtol=RTOL, atol=1e-3)


def test_fast_path_other_dtype_table_and_analytic_allreduce(h100):
    """A BF16 model on an FP8-only GEMM table (cross-dtype transfer) without an all-reduce table."""
    t = copy.copy(h100)
    t.gemm, t.allreduce = {"fp8": h100.gemm["fp8"]}, None
    df = _random_batches(np.random.default_rng(2), 400, tps=(1, 2, 8))
    got = sw.sweep(df, defaults={"model": "llama-3.1-8b", "gpu": "H100", "calibration": "none"},
                   tables={"H100-SXM": t})
    np.testing.assert_allclose(got.step_us.to_numpy(), _reference(df, "llama-3.1-8b", t)[0], rtol=RTOL)


def test_summarized_equals_per_request(h100):
    """Per-request steps (a `step` column), their summaries (count, total keys, chunks, tokens, pairs) and
    the general model agree; the per-request-equal form equals the summaries of equal requests."""
    rng = np.random.default_rng(3)
    steps = []
    for _ in range(300):
        s = {"prefill": [[int(rng.integers(1, 5000)), int(rng.integers(0, 20000))] for _ in range(rng.integers(0, 5))],
             "decode": [int(c) for c in rng.integers(0, 60000, rng.integers(0, 50))]}
        steps.append(s if s["prefill"] or s["decode"] else {"decode": [7]})
    base = {"model": "llama-3.1-8b", "gpu": "H100", "tp": 2, "calibration": "none"}
    per_request = sw.sweep(pd.DataFrame({"step": steps}), defaults=base, tables={"H100-SXM": h100})
    summary = pd.DataFrame(sw.summarize_steps(steps, "llama-3.1-8b"))
    summarized = sw.sweep(summary, defaults=base, tables={"H100-SXM": h100})
    su = cm.setup(cm.load_model("llama-3.1-8b"), h100, 2)
    ref = _ref_fn(su, cm.pack_steps(steps))[0]
    np.testing.assert_allclose(per_request.step_us, ref, rtol=RTOL)
    np.testing.assert_allclose(summarized.step_us, ref, rtol=RTOL)
    # equal requests: (n, mean ctx) / (n, new, cached) per request == their exact summaries
    eq = _random_batches(rng, 300, tps=(2,))
    mean_form = sw.sweep(eq, defaults=base, tables={"H100-SXM": h100})
    summ = pd.DataFrame(sw.summarize_steps(_as_steps(eq), "llama-3.1-8b"))
    np.testing.assert_allclose(mean_form.step_us, sw.sweep(summ, defaults=base, tables={"H100-SXM": h100}).step_us,
                               rtol=RTOL)


def test_sweep_predict_and_loop_agree(h100):
    """`sweep`, `records.Predictor.predict` and a Python loop of jitted `step_time` calls, with the shipped
    calibration on H100, for bf16 and fp8 KV-cache groups (``kv_cache_dtype``)."""
    from costmodel.calibration import resolve_calibration
    from costmodel.apps.records import Predictor, parse_record
    df = _random_batches(np.random.default_rng(4), 60, tps=(1, 2, 4, 8)).assign(model="llama-3.1-8b", gpu="H100")
    df["kv_cache_dtype"] = np.where(np.arange(len(df)) % 2, "fp8", "auto")
    got = sw.sweep(df, defaults={"calibration": "default"}, tables={"H100-SXM": h100})
    records = [parse_record({"id": str(i), "model": r.model, "gpu": r.gpu, "tp": int(r.tp), "steps": [s],
                             "kv_cache_dtype": r.kv_cache_dtype}, f"row {i}")
               for i, (r, s) in enumerate(zip(df.itertuples(), _as_steps(df)))]
    params, _ = resolve_calibration("default", ["H100-SXM"], table_sources={"H100-SXM": h100.sources})
    pred = Predictor()
    pred._tables["H100-SXM"] = h100
    predicted, _ = pred.predict(records, params)
    p = params["H100-SXM"].pooled  # records without vllm_version get the pooled parameters, as the sweep does
    fn = jit(lambda a, lay, pp, s, st: cm.step_time(a, lay, pp, s, st)[0], static_argnums=4)
    packed = cm.pack_steps(_as_steps(df))  # common widths: one compilation for the loop
    sus = {(tp, kv): cm.setup(cm.load_model("llama-3.1-8b"), h100, int(tp), kv_cache_dtype=kv)
           for tp in df.tp.unique() for kv in ("auto", "fp8")}
    loop = []
    for i, r in enumerate(df.itertuples()):
        one = jax.tree_util.tree_map(lambda a, i=i: a[i], packed)
        su = sus[r.tp, r.kv_cache_dtype]
        loop.append(float(fn(su.arrays, su.on_gpu, p, one, su.static)))
    np.testing.assert_allclose(got.step_us, predicted, rtol=RTOL)
    np.testing.assert_allclose(got.step_us, loop, rtol=RTOL)


def test_sweep_engine_version_calibration(h100):
    """`calibration: default@0.15` sweeps with the set the shipped calibration holds for vLLM 0.15, as
    `predict` gives records that say vllm_version 0.15.x; plain `default` is the pooled set."""
    from costmodel.apps.records import Predictor, parse_record
    df = _random_batches(np.random.default_rng(5), 12, tps=(2,)).assign(model="llama-3.1-8b", gpu="H100")
    records = [parse_record({"id": str(i), "model": "llama-3.1-8b", "gpu": "H100", "tp": 2, "steps": [s],
                             "vllm_version": v}, f"row {i}")
               for v in ("0.15.1", None) for i, s in enumerate(_as_steps(df))]
    pred = Predictor()
    pred._tables["H100-SXM"] = h100
    from costmodel.calibration import resolve_calibration
    cal, _ = resolve_calibration("default", ["H100-SXM"], table_sources={"H100-SXM": h100.sources})
    assert "0.15" in cal["H100-SXM"].by_engine
    predicted, _ = pred.predict(records, cal)
    for choice, want in (("default@0.15", predicted[:12]), ("default", predicted[12:])):
        got = sw.sweep(df, defaults={"calibration": choice}, tables={"H100-SXM": h100})
        np.testing.assert_allclose(got.step_us, want, rtol=RTOL)
    assert not np.allclose(predicted[:12], predicted[12:], rtol=0.01)


AXES = {"model": ["llama-3.1-8b", "llama-3.1-70b"], "gpu": "H100", "tp": [2, 8], "calibration": "none",
        "n_decode": {"range": [0, 65, 16]}, "decode_ctx": {"geomspace": [100, 30000, 4]}, "n_prefill": [0, 1],
        "prefill_new": [256, 4096], "prefill_cached": [0, 1000]}


@pytest.fixture(scope="module")
def axes_full(h100):
    return sw.sweep(AXES, tables={"H100-SXM": h100})


def test_axes_space(axes_full):
    n = 2 * 2 * 5 * 4 * 2 * 2 * 2
    assert len(axes_full) == n and axes_full.config_id.tolist() == list(range(n))
    empty = (axes_full.n_decode == 0) & (axes_full.n_prefill == 0)
    assert axes_full.step_us[empty].isna().all() and axes_full.step_us[~empty].gt(0).all()
    assert list(axes_full.columns[-len(sw.RESULT_COLUMNS) - 1:]) == list(sw.RESULT_COLUMNS) + [sw.KV_FITS]
    assert sorted(axes_full.decode_ctx.unique()) == [100, 669, 4481, 30000]
    with pytest.raises(InputError, match="unknown axis"):
        sw.make_space({**AXES, "n_decodes": [1]})
    with pytest.raises(InputError, match="not both"):
        sw.make_space({**AXES, "decode_keys": [1]})
    with pytest.raises(InputError, match=">= 0"):
        sw.make_space({**AXES, "decode_ctx": [-1]})


def test_resume_after_interruption(tmp_path, h100, axes_full):
    """Interrupted after chunk 1: the rerun computes only the missing chunks, leaves the finished chunk
    files untouched, and the merged result equals the uninterrupted run."""
    out = tmp_path / "r.parquet"
    kw = dict(chunk_size=100, tables={"H100-SXM": h100}, keep_parts=True)
    sweep_stopped_after(sw, 1, AXES, out, **kw)
    parts = tmp_path / "r.parquet.parts"
    first = {p.name: p.stat().st_mtime_ns for p in parts.glob("chunk-*.parquet")}
    assert sorted(first) == ["chunk-000000.parquet", "chunk-000001.parquet"] and not out.exists()
    seen = []
    df = sw.sweep(AXES, out, on_chunk=seen.append, **kw)
    assert seen == [2, 3, 4, 5, 6] and df.attrs["sweep"].computed == seen
    assert {p: (parts / p).stat().st_mtime_ns for p in first} == first
    pd.testing.assert_frame_equal(df, axes_full, check_categorical=False, check_dtype=False)
    # a different space never resumes from these parts
    df2 = sw.sweep({**AXES, "tp": [4]}, out, **kw)
    assert df2.attrs["sweep"].computed == list(range(4)) and len(df2) == len(axes_full) // 2


def test_csv_output_and_process_split(tmp_path, h100, axes_full):
    """Two 'hosts' (process_index 0 and 1 of 2) evaluate disjoint chunks; their union equals one run."""
    out = tmp_path / "r.csv"
    for i in range(2):
        sw.sweep(AXES, out, chunk_size=100, process_index=i, process_count=2, tables={"H100-SXM": h100},
                 return_df=False)
    shards = [pd.read_csv(sw.shard_path(out, i, 2)) for i in range(2)]
    assert not set(shards[0].config_id) & set(shards[1].config_id)
    merged = pd.read_csv(sw.merge_shards(out, 2))
    assert merged.config_id.tolist() == list(range(len(axes_full)))
    np.testing.assert_allclose(merged.step_us, axes_full.step_us, rtol=1e-6)  # CSV text round trip
    assert not (tmp_path / "r.p0-of-2.csv.parts").exists()


def test_sharded_over_four_cpu_devices(tmp_path):
    """The configuration axis sharded over 4 (forced host) devices gives the single-device results."""
    script = textwrap.dedent("""
        import json, numpy as np, jax
        from costmodel.apps import sweep as sw
        axes = {"model": "llama-3.1-8b", "gpu": "H100", "tp": [1, 4], "calibration": "none",
                "n_decode": [1, 7, 64], "decode_ctx": [10, 5000], "n_prefill": [0, 2], "prefill_new": [300]}
        sp = sw.make_space(axes)
        ev = sw.Evaluator(sp, call_size=16, devices=4)
        g, b, _ = sp.rows(0, sp.n)
        h = ev.submit(g, b)
        res = h[1][0][3][0]
        four = ev.fetch(h)[0]
        one = sw.sweep(axes, devices=1).step_us.to_numpy()
        print(json.dumps({"devices": ev.n_devices, "n_shards": len(res.sharding.device_set),
                          "max_rel": float(np.max(np.abs(four / one - 1)))}))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["devices"] == 4 and res["n_shards"] == 4 and res["max_rel"] < 1e-6


def _cli(add, run, argv):
    p = argparse.ArgumentParser()
    add(p)
    return run(p.parse_args(argv))


def test_cli_spec_yaml_and_json(tmp_path, capsys):
    (tmp_path / "spec.yaml").write_text(textwrap.dedent("""
        axes:
          model: llama-3.1-8b
          gpu: H100
          tp: [1, 2]
          n_decode: {range: [1, 33, 8]}
          decode_ctx: [512, 8192]
        defaults: {calibration: none}
        out: res.parquet
    """))
    assert _cli(sw.add_sweep_arguments, sw.run_sweep, [str(tmp_path / "spec.yaml"), "--chunk-size", "5"]) == 0
    df = pd.read_parquet(tmp_path / "res.parquet")
    assert len(df) == 16 and df.step_us.gt(0).all() and "wrote" in capsys.readouterr().out
    pd.DataFrame({"model": ["llama-3.1-70b"] * 3, "tp": [4, 8, 8], "n_decode": [1, 16, 0], "decode_keys": [100, 1e5, 0],
                  "n_prefill": [0, 1, 2], "prefill_tokens": [0, 1000, 300],
                  "prefill_pairs": [0, 6e5, 2e5]}).to_csv(tmp_path / "cfg.csv", index=False)
    (tmp_path / "spec.json").write_text(json.dumps({"configs": "cfg.csv", "defaults": {"gpu": "H200"}}))
    assert _cli(sw.add_sweep_arguments, sw.run_sweep,
                [str(tmp_path / "spec.json"), "--out", str(tmp_path / "o.csv")]) == 0
    assert pd.read_csv(tmp_path / "o.csv").step_us.gt(0).all()
    for text, msg in [("axes: [1, 2", "malformed YAML"), ("axes: {model: x}\nconfigs: a.csv", "exactly one"),
                      ("axis: {}", "unknown key")]:
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(InputError, match=msg):
            _cli(sw.add_sweep_arguments, sw.run_sweep, [str(tmp_path / "bad.yaml"), "--out", "x.parquet"])


def test_bench_json(capsys):
    from costmodel.apps import bench
    assert _cli(bench.add_bench_arguments, bench.run_bench,
                ["--configs", "20000", "--loop-configs", "20", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("evals_per_s", "loop_evals_per_s", "compile_s", "peak_rss_mb"):
        assert r[k] > 0
    assert r["max_rel_diff_vs_loop"] < RTOL and r["n_configs"] >= 20000
    c = r["call_split"]
    assert c["configs"] == r["call_size"] and min(c["copy_in_s"], c["eval_s"], c["copy_out_s"]) > 0
    assert c["in_bytes"] == 5 * 4 * c["configs"] and c["out_bytes"] == (1 + len(sw.BREAKDOWN)) * 4 * c["configs"]  # float32; dense models: no MoE or MLA part


def test_bench_against_pairs_runs_and_summarizes_them(tmp_path, capsys):
    """`costmodel bench --against DIR`: this checkout and DIR run in turn, pair by pair; the summary by hand."""
    from costmodel.apps import bench
    s = bench.paired_summary([2.0, 3.0, 4.0], [1.0, 3.0, 2.0])  # ratios 1, 0, 1
    assert (s["now_median"], s["other_median"], s["ratio_median"], s["now_higher"], s["pairs"]) == (3.0, 2.0, 1.0, 2, 3)
    assert s["ratio_mean"] == pytest.approx(2 / 3) and 0.0 <= s["ratio_interval_90"][0] <= s["ratio_interval_90"][1] <= 1.0
    other = tmp_path / "old"
    with pytest.raises(InputError, match="field '--against'.*no costmodel/cli.py"):
        bench.bench_against(other, 2, [])
    (other / "costmodel").mkdir(parents=True)
    (other / "costmodel" / "cli.py").write_text("")
    calls = []

    def run(root, options):  # this checkout twice as fast, compiling in the same time
        calls.append((root, tuple(options)))
        return {"evals_per_s": 2e7 if root != other else 1e7, "compile_s": 1.5, "checksum": 0.0}
    r = bench.bench_against(other, 3, ["--configs", "1000"], run=run)
    assert [c[0] == other for c in calls] == [False, True] * 3 and {c[1] for c in calls} == {("--configs", "1000")}
    assert r["evals_per_s"]["ratio_median"] == 1.0 and r["evals_per_s"]["now_higher"] == 3
    assert r["compile_s"]["ratio_median"] == 0.0 and r["compile_s"]["now_higher"] == 0
    assert r["runs"]["other"] == [{"evals_per_s": 1e7, "compile_s": 1.5}] * 3
    bench.print_against(r)
    assert "+100.00 %" in capsys.readouterr().out
    with pytest.raises(InputError, match="field '--against'"):
        _cli(bench.add_bench_arguments, bench.run_bench, ["--against", str(tmp_path / "nowhere"), "--pairs", "1"])


def test_kv_fits_marks_configurations_whose_kv_cache_does_not_fit(h100):
    """Llama-3.1-70B's BF16 weights (141 GB) leave no KV cache on one 80 GB H100; Llama-3.1-8B at TP 1 holds
    one 1,000-token decode but not 256 decodes of 30,000 tokens (256 x 1,876 blocks, more than the whole
    80 GB)."""
    df = sw.sweep({"model": ["llama-3.1-70b", "llama-3.1-8b"], "gpu": "H100", "tp": [1], "n_decode": [1, 256],
                   "decode_ctx": [1000, 30000], "calibration": "none"}, tables={"H100-SXM": h100})
    fits = dict(zip(zip(df.model, df.n_decode, df.decode_ctx), df.kv_fits))
    assert not any(v for (m, _, _), v in fits.items() if m == "llama-3.1-70b")
    assert fits[("llama-3.1-8b", 1, 1000)] and not fits[("llama-3.1-8b", 256, 30000)]
    cap = cm.memory.kv_capacity_tokens("llama-3.1-8b", 1, cm.get_gpu("H100"), **sw.KV_CHECK)
    n = cap.blocks // (30001 // 16 + 1)  # decodes of 30,000 cached tokens that just fit, and one more
    df = sw.sweep({"model": "llama-3.1-8b", "gpu": "H100", "n_decode": [n, n + 1], "decode_ctx": [30000],
                   "calibration": "none"}, tables={"H100-SXM": h100})
    assert df.kv_fits.tolist() == [True, False]
