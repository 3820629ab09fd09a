"""Bad command lines and unsafe outputs: each refused with one line `costmodel: error: ...` and exit status 2,
before anything is written; inputs are never overwritten; an import that fails part-way leaves its target as
it was; calibration files and parameters are checked where they come from the user."""
import json
import os
import shutil
from pathlib import Path

import pytest

from costmodel import cli, io
from costmodel.apps.records import Predictor, parse_record
from costmodel.calibration import DEFAULT_CALIBRATION, read_calibration, resolve_calibration
from costmodel.cli import main
from costmodel.errors import InputError
from costmodel.params import Params
from costmodel.tabletools import importer as aic
from test_aiconfigurator import systems  # noqa: F401  (the synthetic AIConfigurator tree)

EXAMPLE = Path(cli.__file__).parent / "data" / "example_steps.jsonl"
REC = {"id": "a", "model": "llama-2-7b", "gpu": "H100", "tp": 1, "steps": [{"decode": [100, 200]}],
       "measured_us": 5000.0, "kind": "decode", "source": "run1"}


def _records(path: Path, recs) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _refused(capsys, argv, *needles) -> str:
    """main(argv) exits 2 with one line on stderr naming each of ``needles``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("costmodel: error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# 1: an output that is an input -------------------------------------------------------------------------------

@pytest.mark.parametrize("link", ["same", "symlink", "hardlink", "meta"])
def test_predict_out_naming_an_input_is_refused(tmp_path, capsys, link):
    recs = _records(tmp_path / "r.jsonl", [REC])
    before = recs.read_bytes()
    out = tmp_path / "o.jsonl"
    if link == "same":
        out = recs
    elif link == "symlink":
        out.symlink_to(recs)
    elif link == "hardlink":
        os.link(recs, out)
    else:  # OUT.meta.json is the records file
        recs = _records(tmp_path / "o.jsonl.meta.json", [REC])
        before = recs.read_bytes()
    _refused(capsys, ["predict", str(recs), "--out", str(out), "--calibration", "none"], "is the input")
    assert recs.read_bytes() == before and not (tmp_path / "o.jsonl.meta.json.meta.json").exists()


def test_predict_out_naming_the_calibration_is_refused(tmp_path, capsys):
    recs = _records(tmp_path / "r.jsonl", [REC])
    cal = tmp_path / "cal.json"
    shutil.copy(DEFAULT_CALIBRATION, cal)
    _refused(capsys, ["predict", str(recs), "--calibration", f"{cal}@0.15", "--out", str(cal)], "is the input")
    assert cal.read_bytes() == DEFAULT_CALIBRATION.read_bytes()


def test_fit_and_kernels_out_naming_an_input_are_refused(tmp_path, capsys):
    recs = _records(tmp_path / "r.jsonl", [REC])
    before = recs.read_bytes()
    _refused(capsys, ["fit", str(recs), "--out", str(recs)], "is the input")
    _refused(capsys, ["fit", str(EXAMPLE), str(recs), "--out", str(recs), "--leave-one-run-out"], "is the input")
    assert recs.read_bytes() == before
    q = tmp_path / "q.csv"
    q.write_text("op,m,n,k\ngemm,1,4096,4096\n")
    _refused(capsys, ["kernels", str(q), "--gpu", "H100", "--out", str(q)], "is the input")
    assert q.read_text() == "op,m,n,k\ngemm,1,4096,4096\n"


def test_import_out_overlapping_its_source_is_refused(systems, capsys):  # noqa: F811
    before = _files(systems)
    for out in (systems, systems / "data", systems.parent):
        _refused(capsys, ["import-aiconfigurator", "--gpu", "h100_sxm", "--systems-dir", str(systems),
                          "--out", str(out)], "the input", "write the output elsewhere")
    assert _files(systems) == before


def test_refuse_overwrite_helper(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("x")
    io.refuse_overwrite(tmp_path / "b.txt", [a, None])  # another file: fine
    with pytest.raises(InputError, match="field 'spec'.*is the input"):
        io.refuse_overwrite(tmp_path / "." / "a.txt", [a], "spec")
    io.refuse_overwrite(tmp_path / "out", [a])  # a file folder mode does not apply to
    with pytest.raises(InputError, match="overlaps"):
        io.refuse_overwrite(tmp_path, [a], folder=True)


# 2: --holdout of a source no record has ---------------------------------------------------------------------

def test_fit_holdout_matching_no_record_is_refused(tmp_path, capsys):
    recs = _records(tmp_path / "r.jsonl", [REC, dict(REC, id="b", source="run2")])
    out = tmp_path / "cal.json"
    _refused(capsys, ["fit", str(recs), "--out", str(out), "--holdout", "run3,run1"],
             "field 'holdout'", "run3", "run1, run2")
    assert not out.exists()


# 3: numeric options --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["import-aiconfigurator", "--gpu", "h100", "--tol", "nan"], "--tol"),
    (["import-aiconfigurator", "--gpu", "h100", "--tol", "-0.1"], "--tol"),
    (["import-aiconfigurator", "--gpu", "h100", "--tol", "1.5"], "--tol"),
    (["fit", "r.jsonl", "--out", "c.json", "--steps", "0"], "--steps"),
    (["fit", "r.jsonl", "--out", "c.json", "--steps", "-3"], "--steps"),
    (["fit", "r.jsonl", "--out", "c.json", "--steps", "2.5"], "--steps"),
    (["bench", "--configs", "0"], "--configs"),
    (["bench", "--configs", "1e9"], "--configs"),
    (["bench", "--chunk", "-1"], "--chunk"),
    (["bench", "--call-size", "0"], "--call-size"),
    (["bench", "--devices", "0"], "--devices"),
    (["bench", "--loop-configs", "0"], "--loop-configs"),
    (["bench", "--seed", "-1"], "--seed"),
])
def test_numeric_options_out_of_range_are_refused(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"argument {needle}: must be" in err


def test_number_type():
    assert io.number(int, 1)("7") == 7 and io.number(float, 0, 1, high_open=True)("0") == 0.0
    for bad in ("inf", "nan", "1", "x"):
        with pytest.raises(Exception, match="must be a finite number >= 0 and < 1"):
            io.number(float, 0, 1, high_open=True)(bad)


def test_bench_checks_values_from_python_callers():
    import argparse
    from costmodel.apps import bench
    p = argparse.ArgumentParser()
    bench.add_bench_arguments(p)
    args = p.parse_args([])
    args.call_size = 0
    with pytest.raises(InputError, match="--call-size"):
        bench.run_bench(args)


def test_leave_one_run_out_with_one_run_is_refused(tmp_path, capsys):
    recs = _records(tmp_path / "r.jsonl", [REC, dict(REC, id="b")])
    out = tmp_path / "loro.json"
    _refused(capsys, ["fit", str(recs), "--out", str(out), "--leave-one-run-out"], "at least two runs")
    _refused(capsys, ["fit", str(recs), "--out", str(out), "--leave-one-run-out", "--holdout", "run1"],
             "do not go together")
    assert not out.exists()


def test_import_tol_checked_in_python_too(systems, tmp_path):  # noqa: F811
    with pytest.raises(InputError, match="tol"):
        aic.import_aiconfigurator("h100_sxm", out_dir=tmp_path / "bd", systems_dir=systems, tol=float("nan"))
    assert not (tmp_path / "bd").exists()


# 4: an import failing part-way -------------------------------------------------------------------------------

def test_import_failing_part_way_leaves_the_target_unchanged(systems, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "bd"
    aic.import_aiconfigurator("h100_sxm", out_dir=out, systems_dir=systems, tol=None)
    (out / "gemm" / "b200_sxm").mkdir()
    (out / "gemm" / "b200_sxm" / "data.csv").write_text("another GPU's tables\n")
    before = _files(out)

    def fail(parts):
        raise RuntimeError("simulated failure after GEMM and attention were converted")
    monkeypatch.setattr(aic, "finish_allreduce", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        aic.import_aiconfigurator("h100_sxm", out_dir=out, systems_dir=systems, tol=0.015)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bd", "systems"]  # no build folder left

    monkeypatch.undo()  # a complete import replaces the GPU's tables as a whole, other GPUs' stay
    s = aic.import_aiconfigurator("h100_sxm", out_dir=out, systems_dir=systems, head_layouts=[(96, 8)])
    assert [p.name for p in (out / "mha/decode/h100_sxm").iterdir()] == ["96-8-128.csv"]
    assert (out / "gemm/b200_sxm/data.csv").read_text() == "another GPU's tables\n"
    assert all(Path(f).stat().st_size == v["bytes"] for f, v in s["files"].items())
    assert any("kept the existing mha/prefill/h100_sxm" in n for n in s["notes"])  # no 96-8 prefill table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bd", "systems"]


def test_import_keeps_kinds_it_has_none_of(systems, tmp_path):  # noqa: F811
    out = tmp_path / "bd"
    aic.import_aiconfigurator("h100_sxm", out_dir=out, systems_dir=systems)
    ar = (out / "allreduce/h100_sxm/data.csv").read_bytes()
    shutil.rmtree(systems / "data/h100_sxm/comm")
    s = aic.import_aiconfigurator("h100_sxm", out_dir=out, systems_dir=systems)
    assert (out / "allreduce/h100_sxm/data.csv").read_bytes() == ar
    assert any("kept the existing allreduce/h100_sxm" in n for n in s["notes"])


# 5: outputs that cannot be written ---------------------------------------------------------------------------

def _commands(tmp_path, out):
    recs = _records(tmp_path / "r.jsonl", [REC])
    q = tmp_path / "q.csv"
    q.write_text("op,m,n,k\ngemm,1,4096,4096\n")
    return {"predict": ["predict", str(recs), "--calibration", "none", "--out", str(out)],
            "kernels": ["kernels", str(q), "--gpu", "H100", "--out", str(out)],
            "fit": ["fit", str(recs), "--out", str(out)]}


@pytest.mark.parametrize("command", ["predict", "kernels", "fit"])
@pytest.mark.parametrize("case", ["existing folder", "under a file", "read-only folder"])
def test_unwritable_out_is_refused_and_nothing_written(tmp_path, capsys, monkeypatch, command, case):
    if case == "existing folder":
        out = tmp_path / "outdir"
        out.mkdir()
    elif case == "under a file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "sub" / "o.json"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        out = ro / "o.json"

        def no_write(*a, **k):  # a read-only folder, also where the tests run as root
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(io.tempfile, "mkstemp", no_write)
    argv = _commands(tmp_path, out)[command]
    before = _files(tmp_path)
    _refused(capsys, argv, str(out))
    assert _files(tmp_path) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_really_refused(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _refused(capsys, _commands(tmp_path, ro / "o.jsonl")["predict"], "cannot write")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("case", ["a file", "under a file"])
def test_import_unwritable_out_is_refused(systems, tmp_path, capsys, case):  # noqa: F811
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" if case == "a file" else tmp_path / "afile" / "bd"
    _refused(capsys, ["import-aiconfigurator", "--gpu", "h100_sxm", "--systems-dir", str(systems),
                      "--out", str(out)], str(out))
    assert (tmp_path / "afile").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "systems"]


# 6, 7, 8: calibrations -----------------------------------------------------------------------------------------

def test_fit_on_two_gpus_is_refused(tmp_path, capsys):
    recs = _records(tmp_path / "r.jsonl", [REC, dict(REC, id="b", gpu="H200")])
    out = tmp_path / "cal.json"
    _refused(capsys, ["fit", str(recs), "--out", str(out)], "2 GPUs", "H100-SXM, H200-SXM", "its own file")
    assert not out.exists()


def _calibration(tmp_path, **changes) -> Path:
    cal = json.loads(DEFAULT_CALIBRATION.read_text())
    cal.update(changes)
    p = tmp_path / "cal.json"
    p.write_text(json.dumps(cal))
    return p


def test_calibration_gpu_by_alias(tmp_path):
    for name in ("h100", "H100", "h100_sxm"):
        p = _calibration(tmp_path, gpu=name)
        assert read_calibration(p)["gpu"] == "H100-SXM"
        cals, _ = resolve_calibration(str(p), ["H100-SXM"])
        assert set(cals) == {"H100-SXM"}


@pytest.mark.parametrize("change,needle", [
    ({"gpu": ["H100-SXM", "H200-SXM"]}, "field 'gpu': fitted on several GPUs"),
    ({"gpu": "V100"}, "field 'gpu': unknown GPU 'V100'"),
    ({"params": {"gemm_scale": "abc"}}, "field 'params.gemm_scale'"),
    ({"params": {"hbm_efficiency": 0}}, "field 'params.hbm_efficiency'"),
    ({"params": [1, 2]}, "field 'params'"),
    ({"by_engine": {"0.15": {"gemm_scale": None}}}, "field 'by_engine.0.15.gemm_scale'"),
])
def test_bad_calibration_file_is_one_line(tmp_path, capsys, change, needle):
    p = _calibration(tmp_path, **change)
    recs = _records(tmp_path / "r.jsonl", [REC])
    line = _refused(capsys, ["predict", str(recs), "--calibration", str(p)], str(p), needle)
    assert "Traceback" not in line


def test_params_validated():
    assert Params().validated() == Params()
    assert Params(step_overhead_us=0.0).validated().step_overhead_us == 0.0  # a term switched off
    for bad in (dict(gemm_scale=-1.0), dict(hbm_efficiency=0.0), dict(nvlink_efficiency=0.0),
                dict(step_overhead_us=float("inf")), dict(comm_scale="x")):
        with pytest.raises(InputError, match=f"field '{next(iter(bad))}'"):
            Params(**bad).validated()


def test_predictor_refuses_bad_params():
    r = parse_record(dict(REC), "r:1")
    with pytest.raises(InputError, match="field 'gemm_scale'"):
        Predictor().predict([r], Params(gemm_scale=-1.0))


# 9: the last-resort handler ----------------------------------------------------------------------------------

def test_unexpected_error_is_one_line_and_debug_shows_it(monkeypatch, capsys):
    def boom(args):
        raise ZeroDivisionError("division by zero\nsecond line")
    monkeypatch.setattr(cli, "cmd_tables", boom)
    line = _refused(capsys, ["tables", "--gpu", "H100"], "ZeroDivisionError: division by zero second line",
                    "(rerun with --debug for the traceback)")
    assert line.count("\n") == 0
    for argv in (["--debug", "tables", "--gpu", "H100"], ["tables", "--gpu", "H100", "--debug"]):
        with pytest.raises(ZeroDivisionError):
            main(argv)


def test_interrupt_exits_130(monkeypatch, capsys):
    def stop(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_tables", stop)
    assert main(["tables", "--gpu", "H100"]) == 130
    assert capsys.readouterr().err.strip() == "costmodel: interrupted"


def test_argparse_errors_return_status(capsys):
    assert main(["predict", "--no-such-option"]) == 2
    assert main(["--help"]) == 0


# 10: other inputs --------------------------------------------------------------------------------------------

def test_model_configs_not_a_folder_is_refused(tmp_path, capsys):
    recs = _records(tmp_path / "r.jsonl", [REC])
    f = tmp_path / "afile"
    f.write_text("x")
    for mc in (f, tmp_path / "missing"):
        _refused(capsys, ["predict", str(recs), "--model-configs", str(mc)], "field 'model_configs'", str(mc))
        _refused(capsys, ["fit", str(recs), "--out", str(tmp_path / "c.json"), "--model-configs", str(mc)],
                 "field 'model_configs'")


@pytest.mark.parametrize("argv,needle", [
    (["predict", "{recs}", "--bench-data", "{tmp}/missing"], "does not exist"),
    (["predict", "{recs}", "--calibration", "{tmp}/missing.json"], "no such calibration file"),
    (["predict", "{tmp}/empty.jsonl"], "no records"),
    (["tables", "--gpu", "V100"], "unknown GPU 'V100'"),
    (["kernels", "{tmp}/missing.csv", "--gpu", "H100", "--out", "{tmp}/k.csv"], "no such file"),
    (["fit", "{tmp}/nomeasure.jsonl", "--out", "{tmp}/c.json"], "nomeasure.jsonl:1: field 'measured_us'"),
])
def test_other_bad_inputs_are_one_line(tmp_path, capsys, argv, needle):
    recs = _records(tmp_path / "r.jsonl", [REC])
    (tmp_path / "empty.jsonl").write_text("")
    _records(tmp_path / "nomeasure.jsonl", [{k: v for k, v in REC.items() if k != "measured_us"}])
    argv = [a.format(recs=recs, tmp=tmp_path) for a in argv]
    _refused(capsys, argv, needle)
    assert not (tmp_path / "k.csv").exists() and not (tmp_path / "c.json").exists()
