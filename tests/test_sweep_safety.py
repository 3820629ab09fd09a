"""Sweeps fail safely: resuming never reuses chunks computed from since-changed inputs; sizes are known
(and limited) before anything runs; an output is written by one sweep at a time and a killed run's
temporary files go on the next run; every bad spec is a one-line error naming the field (and line)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from costmodel import cli
from costmodel.apps import sweep as sw
from costmodel.calibration import DEFAULT_CALIBRATION

from conftest import sweep_stopped_after
from costmodel.errors import InputError

REPO = Path(__file__).resolve().parent.parent
SMALL = {"model": "llama-3.1-8b", "gpu": "H100", "calibration": "none", "n_decode": [1, 8, 64],
         "decode_ctx": [100, 5000]}


@pytest.fixture(scope="module")
def h100():
    import costmodel as cm
    return {"H100-SXM": cm.load_tables(None, cm.get_gpu("H100"))}


def _main(argv, capsys):
    """`costmodel ARGV`: (exit code, stdout, stderr); a traceback would fail the test."""
    rc = cli.main(argv)
    o = capsys.readouterr()
    return rc, o.out, o.err


def _one_line_error(capsys, argv, *needles):
    rc, out, err = _main(argv, capsys)
    assert rc == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("costmodel: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _spec(tmp_path, text, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


# ---------------------------------------------------------------- 1. the resume key holds the inputs' contents

def test_resume_recomputes_chunks_of_a_changed_calibration(tmp_path, h100):
    cal = json.loads(DEFAULT_CALIBRATION.read_text())
    cal_path = tmp_path / "cal.json"
    cal_path.write_text(json.dumps(cal))
    space = {**SMALL, "calibration": str(cal_path)}
    out = tmp_path / "r.parquet"
    kw = dict(chunk_size=2, tables=h100, keep_parts=True)
    sweep_stopped_after(sw, 1, space, out, **kw)
    cal["params"]["gemm_scale"] *= 2
    cal_path.write_text(json.dumps(cal))
    df = sw.sweep(space, out, **kw)
    info = df.attrs["sweep"]
    assert info.computed == [0, 1, 2]  # the two stored chunks were stale
    assert any("2 chunk(s) recomputed" in n and f"calibration {cal_path}" in n for n in info.notes), info.notes
    fresh = sw.sweep(space, tables=h100)
    np.testing.assert_array_equal(df.step_us.to_numpy(), fresh.step_us.to_numpy())
    # unchanged inputs: everything resumes
    again = sw.sweep(space, out, **kw)
    assert again.attrs["sweep"].computed == [] and not again.attrs["sweep"].notes


def test_input_hashes_name_tables_model_config_and_code(tmp_path, h100):
    ev = sw.Evaluator(sw.make_space({**SMALL, "calibration": "default"}), tables=h100)
    keys = sw.input_hashes(ev)
    assert "costmodel code" in keys and "model config llama-3.1-8b" in keys and "calibration default" in keys
    assert any(k.startswith("H100-SXM gemm table") for k in keys) and any("decode table" in k for k in keys)
    # a model config folder whose config changes changes its key
    src = REPO / "costmodel" / "data" / "model_configs" / "llama-3.1-8b" / "config.json"
    (tmp_path / "m" / "llama-3.1-8b").mkdir(parents=True)
    cfg = json.loads(src.read_text())
    (tmp_path / "m" / "llama-3.1-8b" / "config.json").write_text(json.dumps(cfg))
    k1 = sw.input_hashes(sw.Evaluator(sw.make_space(SMALL), model_configs=tmp_path / "m", tables=h100))
    cfg["intermediate_size"] += 256
    (tmp_path / "m" / "llama-3.1-8b" / "config.json").write_text(json.dumps(cfg))
    k2 = sw.input_hashes(sw.Evaluator(sw.make_space(SMALL), model_configs=tmp_path / "m", tables=h100))
    assert [k for k in k1 if k1[k] != k2[k]] == ["model config llama-3.1-8b"]


# ---------------------------------------------------------------- 2. sizes without materializing them; limits

def test_huge_space_refused_at_once_with_size_and_estimate():
    axes = {"model": "llama-3.1-8b", "gpu": "H100", **{k: {"range": [0, 10_000]} for k in
            ("n_decode", "decode_ctx", "n_prefill", "prefill_new", "prefill_cached")}}
    sp = sw.make_space(axes)
    assert sp.n == 10**20  # a Python int, no int64 wrap
    with pytest.raises(InputError, match=r"100,000,000,000,000,000,000 configurations.*--max-configs"):
        sw.sweep(axes)
    with pytest.raises(InputError, match="64-bit"):
        sw.plan(axes, max_configs=10**30)
    # 1e15 configurations: planned (no list of chunks), refused by default, allowed when raised
    axes15 = {**axes, "prefill_cached": [0], "n_prefill": {"range": [0, 1000]}}
    assert sw.make_space(axes15).n == 10**15
    with pytest.raises(InputError, match="above the limit"):
        sw.plan(axes15)
    with pytest.raises(InputError, match="raise the chunk size"):
        sw.plan(axes15, max_configs=10**16)
    pl = sw.plan(axes15, max_configs=10**16, chunk_size=1 << 30)
    assert pl.n_configs == 10**15 and pl.n_chunks == -(-10**15 // (1 << 30)) and pl.eta_s > 1e8


def test_axis_sized_before_it_is_built():
    with pytest.raises(InputError, match="at most 10,000,000"):
        sw.make_space({**SMALL, "decode_ctx": {"range": [0, 10**15]}})
    with pytest.raises(InputError, match="at most 10,000,000"):
        sw.make_space({**SMALL, "decode_ctx": {"linspace": [0, 1, 10**12]}})


def test_dry_run_prints_size_eta_chunks_and_writes_nothing(tmp_path, capsys):
    spec = _spec(tmp_path, """
        axes:
          model: llama-3.1-8b
          gpu: H100
          n_decode: {range: [0, 1000]}
          decode_ctx: {range: [0, 1000]}
          prefill_new: {range: [1, 1001]}
          n_prefill: [1]
        out: big.parquet
    """)
    rc, out, err = _main(["sweep", spec, "--dry-run"], capsys)
    assert rc == 0, err
    assert "1,000,000,000 configurations" in out and "954 chunk(s)" in out and "estimated 24 min" in out
    assert os.listdir(tmp_path) == ["spec.yaml"]
    _one_line_error(capsys, ["sweep", spec, "--max-configs", "1e8"], "above the limit of 100,000,000",
                    "--max-configs")
    assert os.listdir(tmp_path) == ["spec.yaml"]


def test_size_and_estimate_printed_before_the_sweep(tmp_path, capsys):
    spec = _spec(tmp_path, f"""
        axes: {json.dumps(SMALL)}
        out: r.csv
    """)
    rc, out, err = _main(["sweep", spec, "--chunk-size", "4"], capsys)
    assert rc == 0, err
    assert "6 configurations (1 groups), 2 chunk(s) of 4; estimated 0 s" in err.splitlines()[0]


def test_in_memory_result_limited(monkeypatch):
    monkeypatch.setattr(sw, "MAX_IN_MEMORY", 5)
    with pytest.raises(InputError, match="too many to return in memory"):
        sw.sweep(SMALL)


# ---------------------------------------------------------------- 3. temporaries of a killed run

def test_stale_temporaries_of_this_output_removed(tmp_path, h100):
    out = tmp_path / "r.parquet"
    stale = [tmp_path / ".r.parquet.abc12_xy.tmp", tmp_path / "r.parquet.parts" / ".chunk-000001.parquet.zzzzzzzz.tmp"]
    keep = [tmp_path / ".other.parquet.abc12_xy.tmp", tmp_path / ".r.parquet.abc.tmp", tmp_path / "notes.tmp"]
    (tmp_path / "r.parquet.parts").mkdir()
    for p in stale + keep:
        p.write_bytes(b"x" * 1000)
    df = sw.sweep(SMALL, out, chunk_size=4, tables=h100)
    assert len(df) == 6 and not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    assert any("temporary" in n for n in df.attrs["sweep"].notes)
    assert not (tmp_path / "r.parquet.lock").exists()


def test_kill_during_merge_leaves_nothing_after_rerun(tmp_path):
    """kill -9 in the middle of the merge: the rerun gives the uninterrupted rows and no temporary file."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from costmodel.apps import sweep as sw
        real = sw._merge
        def merge(parts, out, fmt):
            def write(tmp):
                open(tmp, "wb").write(b"partial" * 1000)
                os.kill(os.getpid(), signal.SIGKILL)
            sw.atomic_write(out, write, mode="path")
        sw._merge = merge
        sw.sweep({SMALL!r}, sys.argv[1], chunk_size=4, return_df=False)
    """)
    out = tmp_path / "r.csv"
    r = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert [p.name for p in tmp_path.glob(".r.csv.*.tmp")] and (tmp_path / "r.csv.lock").exists()
    df = sw.sweep(SMALL, out, chunk_size=4)
    assert df.attrs["sweep"].computed == []  # both chunks were stored before the kill
    np.testing.assert_allclose(df.step_us.to_numpy(), sw.sweep(SMALL).step_us.to_numpy(), rtol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]


# ---------------------------------------------------------------- 4. one sweep per output

def test_second_sweep_on_a_locked_output_refused(tmp_path, capsys):
    spec = _spec(tmp_path, f"""
        axes: {json.dumps(SMALL)}
        out: r.parquet
    """)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from costmodel.apps import sweep as sw
        with sw._OutputLock(Path({str(tmp_path / 'r.parquet')!r})):
            print("locked", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = _one_line_error(capsys, ["sweep", spec], "being written by another sweep", f"pid {holder.pid}")
        assert "r.parquet.lock" in line and not (tmp_path / "r.parquet").exists()
        with pytest.raises(sw.SweepLocked):
            sw.sweep(SMALL, tmp_path / "r.parquet")
    finally:
        holder.kill()  # SIGKILL: the lock file stays, the lock goes with the process
        holder.wait()
    assert (tmp_path / "r.parquet.lock").exists()
    rc, out, err = _main(["sweep", spec], capsys)
    assert rc == 0, err
    assert (tmp_path / "r.parquet").is_file() and not (tmp_path / "r.parquet.lock").exists()


def test_lock_in_one_process_and_merge_shards_locked(tmp_path):
    out = tmp_path / "r.csv"
    with sw._OutputLock(out):
        with pytest.raises(sw.SweepLocked, match="pid"):
            sw._OutputLock(out).__enter__()
    with sw._OutputLock(out):  # released and taken again
        pass


def test_merge_shards_refuses_shards_of_different_sweeps(tmp_path, h100):
    out = tmp_path / "r.csv"
    sw.sweep(SMALL, out, chunk_size=2, process_index=0, process_count=2, tables=h100, return_df=False)
    sw.sweep(SMALL, out, chunk_size=3, process_index=1, process_count=2, tables=h100, return_df=False)
    with pytest.raises(InputError, match="not one sweep's"):
        sw.merge_shards(out, 2)
    assert not out.exists()


# ---------------------------------------------------------------- 5. spec validation: one line, the field

@pytest.mark.parametrize("body,needles", [
    ("axes: {model: llama-3.1-8b, gpu: H100,\n  n_decode: {range: [0, 10, 0]}}", ["spec.yaml:2", "n_decode", "step must not be 0"]),
    ("axes:\n  model: llama-3.1-8b\n  gpu: H100\n  tp: 2.7\n  n_decode: [1]", ["spec.yaml:4", "'tp'", "2.7"]),
    ("axes:\n  model: llama-3.1-8b\n  gpu: H100\n  tp: two\n  n_decode: [1]", ["spec.yaml:4", "'tp'", "'two'"]),
    ("axes:\n  model: llama-3.1-8b\n  gpu: H100\n  n_decode: [1]\nchunk_size: big", ["spec.yaml:5", "chunk_size", "'big'"]),
    ("axes:\n  model: llama-3.1-8b\n  gpu: H100\n  n_decode: [1]\nchunk_size: 2.5", ["chunk_size", "2.5"]),
    ("axes:\n  model: llama-3.1-8b\n  gpu: H100\n  calibration: defualt\n  n_decode: [1]",
     ["spec.yaml:4", "calibration", "no such calibration file: 'defualt'"]),
    ("axes:\n  model: llama-3.1-8b\n  gpu: H100\n  n_decode: [1]\ndefaults: calibration none", ["spec.yaml:5", "defaults", "mapping"]),
    ("axes: llama-3.1-8b on H100", ["spec.yaml:1", "axes", "mapping"]),
    ("", ["empty spec file"]),
    ("# nothing yet\n", ["empty spec file"]),
    ("axes:\n  model: llama-3.1-8b\n  gpu: H100\n  n_decode: [1]\nchunksize: 8", ["spec.yaml:5", "unknown key", "did you mean 'chunk_size'"]),
    ("axes:\n  model: llama-3.1-8b\n  gpu: H100\n  n_decode: [1, .nan]", ["spec.yaml:4", "n_decode", "finite"]),
    ("axes:\n  model: llama-3.1-8b\n  gpu: H100\n  n_decode: [1, .inf]", ["n_decode", "finite"]),
    ("axes:\n  model: llama-3.1-8b\n  gpu: H100\n  n_decode: [4, -1]", ["spec.yaml:4", "n_decode", ">= 0"]),
    ("axes:\n  model: llama-3.1-8b\n  gpu: H100\n  n_decode: [1, x]", ["spec.yaml:4", "n_decode", "numbers"]),
    ("axes:\n  model: llama-3.1-8b\n  gpu: H100\n  n_decode: [true]", ["n_decode", "numbers"]),
    ("axes:\n  model: llama-3.1-8b\n  gpu: H100\n  n_decode: {geomspace: [0, 10, 3]}", ["n_decode", "> 0"]),
    ("axes:\n  model: llama-3.1-8b\n  gpu: H100\n  n_decode: {linspace: [1, 10, -3]}", ["n_decode", "positive integer"]),
    ("axes:\n  model: llama-3.1-8b\n  gpu: H100\n  n_decode: [1]\nallow_other_gpu: maybe", ["allow_other_gpu", "true or false"]),
    ("axes:\n  model: llama-3.1-8b\n  gpu: H100\n  n_decode: [1]\nbench_data: {a: 1}", ["bench_data", "path"]),
])
def test_bad_spec_is_one_line_error(tmp_path, capsys, body, needles):
    spec = _spec(tmp_path, body)
    _one_line_error(capsys, ["sweep", spec, "--out", str(tmp_path / "o.parquet")], *needles)
    assert sorted(os.listdir(tmp_path)) == ["spec.yaml"]


def test_bad_spec_json_names_the_line(tmp_path, capsys):
    spec = _spec(tmp_path, '{"axes": {"model": "llama-3.1-8b",\n "gpu": "H100",\n "tp": 2.5,\n "n_decode": [1]}}',
                 "spec.json")
    _one_line_error(capsys, ["sweep", spec, "--out", str(tmp_path / "o.csv")], "spec.json:3", "'tp'")


@pytest.mark.parametrize("csv,needles", [
    ("model,gpu,tp,n_decode,decode_ctx\nllama-3.1-8b,H100,2,1,10\nllama-3.1-8b,H100,,1,10\n", ["cfg.csv:3", "'tp'", "empty cell"]),
    ("model,gpu,tp,n_decode,decode_ctx\nllama-3.1-8b,H100,2.7,1,10\n", ["cfg.csv:2", "'tp'", "2.7"]),
    ("model,gpu,n_decode,decode_ctx\n", ["cfg.csv", "no rows"]),
    ("", ["cfg.csv", "empty configs file"]),
    ("model,gpu,n_decode,decode_ctx\nllama-3.1-8b,H100,1,10\nllama-3.1-8b,H100,x,10\n", ["cfg.csv:3", "n_decode", "'x'"]),
    ("model,gpu,n_decode,decode_ctx\nllama-3.1-8b,H100,1,10\nllama-3.1-8b,H100,1,inf\n", ["cfg.csv:3", "decode_ctx", "finite"]),
    ("model,gpu,n_decode,decode_ctx\nllama-3.1-8b,H100,1,10\nllama-3.1-8b,H100,-2,10\n", ["cfg.csv:3", "n_decode", ">= 0"]),
    ("model,gpu,n_decode,decode_ctx\nllama-3.1-8b,H100,1,\n", ["cfg.csv:2", "decode_ctx", "empty cell"]),
    ("model,gpu,calibration,n_decode\nllama-3.1-8b,H100,nosuch.json,1\n", ["cfg.csv:2", "calibration", "nosuch.json"]),
])
def test_bad_configs_table_is_one_line_error(tmp_path, capsys, csv, needles):
    (tmp_path / "cfg.csv").write_text(csv)
    spec = _spec(tmp_path, "configs: cfg.csv\ndefaults: {calibration: none}\n")
    _one_line_error(capsys, ["sweep", spec, "--out", str(tmp_path / "o.csv")], *needles)
    assert sorted(os.listdir(tmp_path)) == ["cfg.csv", "spec.yaml"]


def test_bad_out_is_one_line_error_and_nothing_written(tmp_path, capsys):
    spec = _spec(tmp_path, f"axes: {json.dumps(SMALL)}\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.parquet").mkdir()
    _one_line_error(capsys, ["sweep", spec, "--out", str(tmp_path / "afile" / "o.parquet")], "afile is a file", "'out'")
    _one_line_error(capsys, ["sweep", spec, "--out", str(tmp_path / "adir.parquet")], "is a folder", "'out'")
    _one_line_error(capsys, ["sweep", spec, "--out", str(tmp_path / "o.txt")], ".parquet or .csv")
    assert sorted(os.listdir(tmp_path)) == ["adir.parquet", "afile", "spec.yaml"]
    assert not os.listdir(tmp_path / "adir.parquet")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_out_in_read_only_folder(tmp_path, capsys):
    spec = _spec(tmp_path, f"axes: {json.dumps(SMALL)}\n")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _one_line_error(capsys, ["sweep", spec, "--out", str(ro / "o.parquet")], "cannot write in folder", "'out'")
        assert not os.listdir(ro)
    finally:
        ro.chmod(0o755)


def test_out_not_writable_one_line(tmp_path, capsys, monkeypatch):
    """As a user without write permission sees it (os.access says no), whoever runs the tests."""
    spec = _spec(tmp_path, f"axes: {json.dumps(SMALL)}\n")
    real = os.access
    monkeypatch.setattr(sw.os, "access", lambda p, m: False if Path(p) == tmp_path / "ro" else real(p, m))
    (tmp_path / "ro").mkdir()
    _one_line_error(capsys, ["sweep", spec, "--out", str(tmp_path / "ro" / "o.parquet")], "cannot write in folder")
    assert not os.listdir(tmp_path / "ro")


# ---------------------------------------------------------------- 6. more of the same kinds

def test_bad_counts_on_the_command_line(tmp_path, capsys):
    spec = _spec(tmp_path, f"axes: {json.dumps(SMALL)}\nout: o.csv\n")
    for argv, needle in [(["--chunk-size", "0"], "chunk_size"), (["--chunk-size", "-5"], "chunk_size"),
                         (["--devices", "0"], "devices"), (["--process-count", "0"], "process_count"),
                         (["--process-count", "2", "--process-index", "2"], "process_index")]:
        _one_line_error(capsys, ["sweep", spec, *argv], needle)
    assert sorted(os.listdir(tmp_path)) == ["spec.yaml"]


def test_python_api_refuses_bad_sizes():
    for kw, needle in [({"chunk_size": "big"}, "chunk_size"), ({"chunk_size": 2.5}, "chunk_size"),
                       ({"chunk_size": True}, "chunk_size"), ({"max_configs": -1}, "max_configs"),
                       ({"devices": 0}, "devices")]:
        with pytest.raises(InputError, match=needle):
            sw.sweep(SMALL, **kw)
    with pytest.raises(InputError, match="'tp'"):
        sw.sweep(pd.DataFrame({"tp": [2.5], "n_decode": [1]}), defaults={"model": "llama-3.1-8b", "gpu": "H100"})
    with pytest.raises(InputError, match="defaults"):
        sw.sweep(pd.DataFrame({"n_decode": [1]}), defaults="llama")


def test_parts_path_is_a_file(tmp_path, capsys):
    spec = _spec(tmp_path, f"axes: {json.dumps(SMALL)}\nout: o.csv\n")
    (tmp_path / "o.csv.parts").write_text("x")
    _one_line_error(capsys, ["sweep", spec], "o.csv.parts", "is a file")


@pytest.mark.parametrize("csv,needles", [
    ('model,gpu,step\nllama-3.1-8b,H100,"{""decode"": [100, 200]}"\nllama-3.1-8b,H100,"{""decode"": [1,"\n',
     ["cfg.csv:3", "'step'", "malformed JSON"]),
    ('model,gpu,step\nllama-3.1-8b,H100,"{""prefill"": [[0, 5]]}"\n', ["cfg.csv:2", "'step'", "new >= 1"]),
    ('model,gpu,step\nllama-3.1-8b,H100,"{""decodes"": [5]}"\n', ["cfg.csv:2", "'step'"]),
    ("model,gpu,n_decode,decode_ctxx\nllama-3.1-8b,H100,1,100\n", ["decode_ctxx", "did you mean 'decode_ctx'"]),
    ("model,gpu,n_decode,step_us\nllama-3.1-8b,H100,1,100\n", ["step_us", "result column"]),
    ("model,gpu,n_decode,config_id\nllama-3.1-8b,H100,1,7\n", ["config_id", "result column"]),
])
def test_table_columns_and_step_cells_checked(tmp_path, capsys, csv, needles):
    (tmp_path / "cfg.csv").write_text(csv)
    spec = _spec(tmp_path, "configs: cfg.csv\ndefaults: {calibration: none}\n")
    _one_line_error(capsys, ["sweep", spec, "--out", str(tmp_path / "o.csv")], *needles)


def test_step_column_from_csv_as_json_text(tmp_path, capsys, h100):
    (tmp_path / "cfg.csv").write_text('model,gpu,label,step\nllama-3.1-8b,H100,a,"{""decode"": [100, 200]}"\n')
    spec = _spec(tmp_path, "configs: cfg.csv\ndefaults: {calibration: none}\nout: o.csv\n")
    rc, out, err = _main(["sweep", spec], capsys)
    assert rc == 0, err
    got = pd.read_csv(tmp_path / "o.csv")
    want = sw.sweep(pd.DataFrame({"step": [{"decode": [100, 200]}]}),
                    defaults={"model": "llama-3.1-8b", "gpu": "H100", "calibration": "none"}, tables=h100)
    assert got.label.tolist() == ["a"]
    np.testing.assert_allclose(got.step_us, want.step_us, rtol=1e-6)


def test_table_defaults_must_be_group_columns(tmp_path, capsys):
    (tmp_path / "cfg.csv").write_text("model,gpu,n_decode,decode_ctx\nllama-3.1-8b,H100,1,100\n")
    spec = _spec(tmp_path, "configs: cfg.csv\ndefaults: {tpp: 2}\n")
    _one_line_error(capsys, ["sweep", spec, "--out", str(tmp_path / "o.csv")], "unknown default", "tpp")


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_damaged_stored_chunk_recomputed(tmp_path, h100, fmt):
    """A chunk file emptied or cut short (a machine crash before it reached the disk) is recomputed on
    resume, not merged."""
    out = tmp_path / f"r.{fmt}"
    kw = dict(chunk_size=2, tables=h100, keep_parts=True)
    full = sw.sweep(SMALL, out, **kw)
    parts = tmp_path / f"r.{fmt}.parts"
    (parts / f"chunk-000001.{fmt}").write_bytes(b"")
    p2 = parts / f"chunk-000002.{fmt}"
    p2.write_bytes(p2.read_bytes()[:-10])
    df = sw.sweep(SMALL, out, **kw)
    assert df.attrs["sweep"].computed == [1, 2]
    assert any("2 stored chunk(s) unreadable" in n for n in df.attrs["sweep"].notes)
    pd.testing.assert_frame_equal(df, full)


def test_progress_prints_the_plan_first(h100, capsys):
    sw.sweep(SMALL, chunk_size=4, tables=h100, progress=True)
    assert capsys.readouterr().err.startswith("costmodel sweep: 6 configurations (1 groups), 2 chunk(s) of 4;")


@pytest.mark.parametrize("body,name,needles", [
    ("axes:\n  model: llama-3.1-8b\n  gpu: H100\n  tp: 2\n  n_decode: [1]\n  tp: 4\n", "spec.yaml",
     ["spec.yaml:6", "'axes.tp'", "given twice (also at line 4)"]),
    ("axes: {model: llama-3.1-8b, gpu: H100, n_decode: [1]}\nout: a.csv\nout: b.csv\n", "spec.yaml",
     ["spec.yaml:3", "'out'", "twice"]),
    ('{"axes": {"model": "llama-3.1-8b", "gpu": "H100", "tp": 2, "tp": 4, "n_decode": [1]}}', "spec.json",
     ["spec.json", "'tp'", "twice"]),
])
def test_key_given_twice_refused(tmp_path, capsys, body, name, needles):
    """YAML and JSON keep the last of two equal keys without a word: refused."""
    spec = _spec(tmp_path, body, name)
    _one_line_error(capsys, ["sweep", spec, "--out", str(tmp_path / "o.csv")], *needles)


def test_yaml_exponent_numbers_read_as_numbers(tmp_path, capsys):
    """YAML 1.1 reads 1e3 (no dot) as a string; batch values, range bounds and chunk_size take it as the
    number it spells."""
    spec = _spec(tmp_path, """
        axes:
          model: llama-3.1-8b
          gpu: H100
          n_decode: [1e1]
          decode_ctx: {range: [0, 2e3, 1e3]}
        chunk_size: 1e6
        out: o.csv
    """)
    rc, out, err = _main(["sweep", spec, "--dry-run"], capsys)
    assert rc == 0 and "2 configurations" in out and "chunk(s) of 1,000,000" in out, err
    sp = sw.space_from_spec(sw.load_spec(spec))
    assert sp.batch_axes[0][1].tolist() == [10.0] and sp.batch_axes[1][1].tolist() == [0.0, 1000.0]


def test_ctrl_c_releases_the_lock_and_resumes(tmp_path, h100):
    out = tmp_path / "r.parquet"

    def interrupt(k):
        if k == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        sw.sweep(SMALL, out, chunk_size=2, tables=h100, on_chunk=interrupt)
    assert not (tmp_path / "r.parquet.lock").exists() and not out.exists()
    df = sw.sweep(SMALL, out, chunk_size=2, tables=h100)
    assert df.attrs["sweep"].computed == [2]
    np.testing.assert_array_equal(df.step_us.to_numpy(), sw.sweep(SMALL, tables=h100).step_us.to_numpy())
