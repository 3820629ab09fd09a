"""CLI: predict and kernels on real inputs; bad input gives a one-line error with file:line and no output.

The commands run in this process (`cli`), so that they share the tables and compilations of the other tests;
`test_entry_point` runs the real `python -m costmodel.cli` in a fresh process."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from costmodel.cli import main


@pytest.fixture
def cli(capsys):
    """``cli(*args)``: `costmodel ARGS` in this process -> (returncode, stdout, stderr) like `subprocess.run`."""
    def call(*args):
        capsys.readouterr()  # drop what earlier calls printed
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return call


def test_predict_default_example(tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    assert main(["predict", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 6 and all(x["predicted_us"] > 0 for x in lines)
    b = lines[0]["breakdown_us"]
    assert sum(b.values()) == pytest.approx(lines[0]["predicted_us"], rel=1e-4)


def _write(tmp_path, lines):
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


GOOD = '{"id": "a", "model": "llama-2-7b", "gpu": "h100_sxm", "tp": 1, "steps": [{"prefill": [[10, 0]], "decode": []}]}'


@pytest.mark.parametrize("bad,needle", [
    ('{"id": "b", "model": "llama-2-7b", "gpu": "H100", "tp": 1, "steps": [{"prefill": [[-3, 0]]}]}', "prefill.new"),
    ('{"id": "b", "model": "llama-2-7b", "gpu": "H100", "tp": 1, "steps": [{"prefill": [], "decode": []}]}', "no requests"),
    ('{"id": "b", "model": "llama-2-7b", "gpu": "H100", "tp": 1, "steps": [{"decode": [1.5]}]}', "decode"),
    ('{"id": "b", "model": "nope", "gpu": "H100", "tp": 1, "steps": [{"decode": [1]}]}', "model"),
    ('{"id": "b", "model": "llama-2-7b", "gpu": "V100", "tp": 1, "steps": [{"decode": [1]}]}', "V100"),
    ('{"id": "b", "model": "llama-2-7b", "gpu": "H100", "steps": [{"decode": [1]}]}', "'tp'"),
    ('{"id": "b", "model": "llama-2-7b", "gpu": "H100", "tp": 1, "steps": [', "malformed JSON"),
    ('{"id": "b", "model": "llama-2-7b", "gpu": "H100", "tp": 1, "steps": [{"decode": [1]}], "timing": "gpu"}',
     "'timing'"),
    ('{"id": "b", "model": "llama-2-7b", "gpu": "H100", "tp": 1, "steps": [{"decode": [1]}], '
     '"async_scheduling": "yes"}', "'async_scheduling'"),
])
def test_bad_records(tmp_path, cli, bad, needle):
    p = _write(tmp_path, [GOOD, bad])
    out = tmp_path / "o.jsonl"
    r = cli("predict", str(p), "--out", str(out), "--calibration", "none")
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and f"{p}:2" in err[0] and needle in err[0]
    assert not out.exists() and not list(tmp_path.glob(".o.jsonl*"))


def test_entry_point(tmp_path):
    """`python -m costmodel.cli` in a fresh process: `predict` on the default example exits 0, writes its six
    records and keeps its compiled programs in the cache folder (`COSTMODEL_CACHE_DIR`); a bad record exits 2
    with one line on stderr naming file:line, and writes nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["COSTMODEL_CACHE_DIR"] = str(tmp_path / "cache")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "costmodel.cli", *args], capture_output=True, text=True,
                              env=env)
    out = tmp_path / "o.jsonl"
    r = run("predict", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 6 and f"wrote {out}" in r.stdout
    assert any((tmp_path / "cache" / "jax").iterdir())  # at least one compiled program kept
    p = _write(tmp_path, [GOOD, '{"id": "b", "model": "llama-2-7b", "gpu": "H100", "tp": 1, "steps": ['])
    bad_out = tmp_path / "bad.jsonl"
    r = run("predict", str(p), "--out", str(bad_out), "--calibration", "none")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and f"{p}:2" in err[0] and "malformed JSON" in err[0]
    assert not bad_out.exists() and r.stdout == ""


def test_predict_prints_mape(tmp_path, cli):
    p = _write(tmp_path, [GOOD[:-1] + ', "measured_us": 8000, "kind": "prefill"}'])
    r = cli("predict", str(p), "--calibration", "none")
    assert r.returncode == 0 and "MAPE" in r.stdout and "prefill" in r.stdout


def test_calibration_for_other_gpu_carries_host_terms_only(tmp_path, cli):
    """A calibration fitted on H200 gives an H100 record its host-side terms only, and says so; with
    --allow-other-gpu all of it."""
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"gpu": "H200-SXM", "params": {"step_overhead_us": 100.0, "gemm_scale": 3.0}}))
    recs = _write(tmp_path, [GOOD])
    outs = {}
    for extra in ([], ["--allow-other-gpu"], None):
        out = tmp_path / f"p{len(outs)}.jsonl"
        args = ["--calibration", "none"] if extra is None else ["--calibration", str(cal), *extra]
        r = cli("predict", str(recs), *args, "--out", str(out))
        assert r.returncode == 0, r.stderr
        outs[None if extra is None else tuple(extra)] = (json.loads(out.read_text().splitlines()[0])["predicted_us"],
                                                         r.stdout)
    host, full, none = outs[()][0], outs[("--allow-other-gpu",)][0], outs[None][0]
    assert "host-side terms only" in outs[()][1]
    # step_overhead_us 100 instead of the default 250 (one step); gemm_scale 3 only with --allow-other-gpu
    assert host == pytest.approx(none - 150.0, rel=1e-5) and full > 2 * host


def test_kernels_csv(tmp_path, cli, shared):
    q = tmp_path / "q.csv"
    q.write_text("id,op,m,n,k,batch_size,kv_len,seq_len,cached,num_heads,num_kv_heads,head_dim,dtype\n"
                 "g1,gemm,8192,6144,2048,,,,,,,,fp8\n"
                 "g2,gemm,100,8192,8192,,,,,,,,bf16\n"
                 "d1,attn_decode,,,,16,4096,,,32,8,128,bf16\n"
                 "p1,attn_prefill,,,,1,,4096,0,32,8,128,bf16\n")
    out = tmp_path / "o.csv"
    r = cli("kernels", str(q), "--gpu", "H100", "--bench-data", str(shared / "bench_data"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    import pandas as pd
    df = pd.read_csv(out)
    assert list(df.id) == ["g1", "g2", "d1", "p1"] and (df.predicted_us > 0).all()
    assert df.predicted_us[0] == pytest.approx(173.366, rel=1e-4)  # a measured InferSim FP8 point
    assert df.predicted_us[3] == pytest.approx(217.585, rel=1e-3)  # measured 32-8-128 prefill, seq 4096


def test_kernels_bad_row(tmp_path, cli):
    q = tmp_path / "q.csv"
    q.write_text("op,m,n,k\ngemm,8,8,8\ngemm,-1,8,8\n")
    r = cli("kernels", str(q), "--gpu", "H100", "--out", str(tmp_path / "o.csv"))
    assert r.returncode != 0 and f"{q}:3" in r.stderr and "'m'" in r.stderr
    assert not (tmp_path / "o.csv").exists()


def test_tables_command(cli):
    r = cli("tables", "--gpu", "H100")
    assert r.returncode == 0
    info = json.loads(r.stdout)
    assert "bf16" in info["gemm"] and info["decode"]["head_layouts_per_gpu"]


def test_predict_records_table_sources(tmp_path, cli, shared):
    out = tmp_path / "o.jsonl"
    r = cli("predict", str(_write(tmp_path, [GOOD])), "--out", str(out),
            "--bench-data", f"gemm={shared / 'bench_data'}")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "o.jsonl.meta.json").read_text())
    src = meta["tables"]["H100-SXM"]
    assert src["gemm"].startswith(str(shared)) and "h100_sxm" in src["decode"]
    assert "gemm=" in r.stdout


def test_default_calibration_not_applied_to_other_tables(tmp_path, cli, shared):
    r = cli("predict", str(_write(tmp_path, [GOOD])), "--bench-data", str(shared / "bench_data"))
    assert r.returncode == 0 and "calibration=none (the default calibration was fitted on the repo" in r.stdout


def test_roofline_floor_by_hand_and_impossible_records_are_named(tmp_path, capsys, predictor):
    from costmodel.apps.records import parse_record, roofline_floor_us
    # Llama-3.1-8B, TP1, one decode token: the GEMMs must at least read every weight once at 3.35 TB/s.
    # Per layer: QKV 4096x6144 + O 4096x4096 + gate_up 4096x28672 + down 14336x4096 = 218,103,808 weights;
    # x 32 layers, + lm_head 4096 x 128256, x 2 bytes = 14,982,053,888 bytes -> 4472.25 µs (activations add ~0)
    rec = parse_record({"id": "d", "model": "llama-3.1-8b", "gpu": "H100", "tp": 1,
                        "steps": [{"prefill": [], "decode": [100]}]}, "x:1")
    floor = roofline_floor_us(predictor.features([rec]), 1)
    assert floor[0] == pytest.approx((32 * 218_103_808 + 4096 * 128_256) * 2 / 3.35e12 * 1e6, rel=2e-3)
    decode = '{"id": "%s", "model": "llama-3.1-8b", "gpu": "H100", "tp": 1, "steps": [{"decode": [100]}], "measured_us": %d}'
    p = _write(tmp_path, [decode % ("ok", 7000), decode % ("fast", 3000)])
    assert main(["predict", str(p), "--calibration", "none"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 record(s)" in err[0] and f"{p}:2" in err[0] and f"{p}:1" not in err[0]


def test_predict_reports_parameter_sets(tmp_path):
    """Each record gets its engine version's parameters from the shipped calibration; the output says which."""
    p = _write(tmp_path, [GOOD[:-1] + ', "vllm_version": "0.15.1"}', GOOD.replace('"a"', '"b"'),
                          GOOD.replace('"a"', '"c"').replace("h100_sxm", "H200")])
    out = tmp_path / "o.jsonl"
    assert main(["predict", str(p), "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "o.jsonl.meta.json").read_text())
    assert meta["parameter_sets"] == {"H100-SXM: vLLM 0.15": 1, "H100-SXM: pooled": 1, "H200-SXM: pooled, host-side terms only": 1}
    pred = [json.loads(x)["predicted_us"] for x in out.read_text().splitlines()]
    assert pred[0] != pytest.approx(pred[1], rel=1e-3)  # same step, different parameter sets
