"""Accuracy on the shared ground truth (vLLM on H100), with the tables and calibration the README names."""
import numpy as np
import pytest

from costmodel.calibration import resolve_calibration
from costmodel.apps.records import Predictor, mape_table, read_records


@pytest.fixture(scope="module")
def records(shared):
    return {f: read_records(shared / "ground_truth" / f"{f}.jsonl") for f in ("isolated_requests", "loaded_steps")}


def _mape(shared, records, bench, calibration):
    """MAPE per file and kind.  Both files are predicted in one call (one compilation for their common widths;
    a record's time does not depend on the others in its batch): the rows per file are those of one call per
    file."""
    pred = Predictor(shared / "model_configs", bench)
    params, _ = resolve_calibration(calibration, ["H100-SXM"])
    recs = [r for rs in records.values() for r in rs]
    total, _ = pred.predict(recs, params)
    rows = [r for r in mape_table(recs, total) if r["file"] != "all"]
    assert {r["file"] for r in rows} == {f"{f}.jsonl" for f in records}
    return rows


def test_uncalibrated_on_infersim_tables(shared, records):
    """Issue 2: physical defaults only, InferSim's H100 tables: MAPE <= 8 % for each file and kind."""
    rows = _mape(shared, records, shared / "bench_data", "none")
    for r in rows:
        assert r["mape_pct"] <= 8.0, r


def test_default_calibration_on_repo_tables(shared, records):
    rows = _mape(shared, records, None, "default")
    for r in rows:
        assert r["mape_pct"] <= 8.0, r
