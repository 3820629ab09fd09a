"""cm.load_calibration: the parameter set `costmodel predict` gives a record, for the Python API."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest

import costmodel as cm
from costmodel.calibration import DEFAULT_CALIBRATION, read_calibration
from costmodel.cli import main
from costmodel.step import pad_steps

EXAMPLE = Path(cm.__file__).parent / "data" / "example_steps.jsonl"
SHIPPED = read_calibration(DEFAULT_CALIBRATION)["_calibration"]

_TABLES, _FNS = {}, {}


def _python_us(rec: dict, params: cm.Params, width: tuple[int, int]) -> float:
    """A record's µs on the Python path of the README: setup + make_step_fn over its steps (padded to one
    ``width`` of prefill and decode slots, so that every record shares a compilation)."""
    gpu = cm.get_gpu(rec["gpu"])
    if gpu.name not in _TABLES:
        _TABLES[gpu.name] = cm.load_tables(None, gpu)
    su = cm.setup(cm.load_model(rec["model"]), _TABLES[gpu.name], rec["tp"])
    steps = pad_steps(cm.pack_steps(rec["steps"]), *width)
    fn = _FNS.setdefault(su.static, cm.make_step_fn(su.static))
    return float(fn(su.arrays, su.on_gpu, params, steps)[0].sum())


def _predict(tmp_path, records: Path, *args) -> dict:
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(records), "--out", str(out), *args]) == 0
    return {row["id"]: row["predicted_us"] for row in map(json.loads, out.read_text().splitlines())}


@pytest.mark.parametrize("vllm_version", [None, "0.11.0"])
def test_python_path_equals_predict(tmp_path, vllm_version):
    """For the packaged example (H100 records and one H200 record; pooled, or one engine version's set), the
    Python path with load_calibration prices every record as `costmodel predict` does."""
    recs = [json.loads(line) for line in EXAMPLE.read_text().splitlines() if line.strip()]
    records = EXAMPLE
    if vllm_version:  # 0.11 schedules synchronously: each record times its own steps
        records = tmp_path / "steps.jsonl"
        records.write_text("".join(json.dumps(dict(r, vllm_version=vllm_version)) + "\n" for r in recs))
    predicted = _predict(tmp_path, records)
    every = cm.pack_steps([s for r in recs for s in r["steps"]])
    width = (every.prefill_new.shape[1], every.decode_ctx.shape[1])
    for r in recs:
        params = cm.load_calibration("default", r["gpu"], vllm_version=vllm_version)
        np.testing.assert_allclose(_python_us(r, params, width), predicted[r["id"]], rtol=1e-5, err_msg=r["id"])


def test_which_set(tmp_path):
    assert cm.load_calibration("none") == cm.Params()
    assert cm.load_calibration("none", "H200", vllm_version="0.15.1") == cm.Params()
    assert cm.load_calibration() == SHIPPED.pooled
    assert cm.load_calibration(vllm_version="0.15.1") == SHIPPED.by_engine["0.15"]
    assert cm.load_calibration(vllm_version="0.9") == SHIPPED.pooled  # a version it has no set for
    assert cm.load_calibration("default@0.15") == cm.load_calibration("default@0.15", vllm_version="0.11") \
        == SHIPPED.by_engine["0.15"]
    # on another GPU: the host-side terms only (physical defaults for the kernel-side ones), as predict
    host = cm.Params(step_overhead_us=SHIPPED.pooled.step_overhead_us,
                     request_overhead_us=SHIPPED.pooled.request_overhead_us,
                     prefill_layer_overhead_us=SHIPPED.pooled.prefill_layer_overhead_us)
    assert cm.load_calibration("default", "H200") == host != cm.Params()
    assert cm.load_calibration("default", "H200", allow_other_gpu=True) == SHIPPED.pooled
    with pytest.raises(cm.InputError, match="'none' has no engine versions"):
        cm.load_calibration("none@0.15")

    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"gpu": "H100-SXM", "params": {"step_overhead_us": 300.0},
                                "by_engine": {"0.15": {"step_overhead_us": 200.0}}}))
    assert cm.load_calibration(str(path), "h100_sxm") == cm.Params(step_overhead_us=300.0)
    assert cm.load_calibration(str(path), vllm_version="0.15") == cm.Params(step_overhead_us=200.0)
    assert cm.load_calibration(f"{path}@0.15", "H100") == cm.Params(step_overhead_us=200.0)
    with pytest.raises(cm.InputError, match="no parameters for engine version 0.11"):
        cm.load_calibration(f"{path}@0.11")
    assert cm.load_calibration(str(path), "H200") == cm.Params(step_overhead_us=300.0)  # a host-side term
    assert cm.load_calibration(str(path), "H200", vllm_version="0.15") == cm.Params(step_overhead_us=200.0)
    assert cm.load_calibration(str(path), "H200", allow_other_gpu=True) == cm.Params(step_overhead_us=300.0)


def test_default_needs_the_repo_tables(shared):
    """The shipped calibration belongs to the repo's tables: with other tables predict uses the defaults."""
    assert cm.load_calibration("default", "H100", bench_data=shared / "bench_data") == cm.Params()
    assert cm.load_calibration("default", "H100", bench_data=cm.tables.default_bench_data()) == SHIPPED.pooled
