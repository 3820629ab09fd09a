"""`costmodel fit-serving`: the serving host term is recovered from measurements made with a known value,
each deployment is held out in turn, a calibration's serving block is read (and bad values refused), and
the command writes a calibration that `serve` then uses."""
import json

import numpy as np
import pytest

from costmodel import calibration as calmod
from costmodel.apps import serve as sv
from costmodel.apps import serving_fit as sf
from costmodel.cli import main
from costmodel.errors import InputError

OPTS = {"rounds": 2, "warmup_rounds": 1}
TRUE_US = 60.0


def test_fitted_value_recovers_a_linear_truth():
    """Predictions linear in the term (slopes of rows with more running requests larger) and measurements at
    35 µs: the fit finds 35 within the fine grid's step; a row's weight is its share."""
    grid = (0.0, 40.0, 80.0, 120.0)
    slope = np.array([0.02, 0.05, 0.1])  # ms per µs
    pred = 10.0 + slope[:, None] * np.array(grid)[None, :]
    meas = 10.0 + slope * 35.0
    assert sf.fitted_value(pred, meas, np.ones(3) / 3, grid) == pytest.approx(35.0, abs=0.1)
    meas_off = meas.copy()
    meas_off[0] = 10.0 + slope[0] * 100.0  # one row says 100: the L1 fit keeps the majority's 35
    assert sf.fitted_value(pred, meas_off, np.ones(3) / 3, grid) == pytest.approx(35.0, abs=0.1)
    # a row off by more than a factor of 2 at every value cannot pull the fit, whatever its weight
    meas_far = meas.copy()
    meas_far[2] = meas[2] / 5
    assert sf.fitted_value(pred, meas_far, np.array([0.1, 0.1, 0.8]), grid) == pytest.approx(35.0, abs=0.1)


def _records():
    recs = []
    for tp in (1, 2):
        for c in (4, 16):
            recs.append({"id": f"tp{tp}-c{c}", "model": "llama-3.1-8b", "gpu": "H100", "tp": tp,
                         "engine": {"version": "0.12.0", "max_num_seqs": 64},
                         "workload": {"type": "closed", "concurrency": c, "input_tokens": 256,
                                      "output_tokens": 16}})
    return recs


def test_serving_terms_of_a_calibration(tmp_path):
    assert calmod.serving_terms("none")[0] == {"request_host_us": 0.0}
    base = json.loads(calmod.DEFAULT_CALIBRATION.read_text())
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({**base, "serving": {"request_host_us": 42.5}}))
    terms, desc = calmod.serving_terms(str(path))
    assert terms == {"request_host_us": 42.5} and "42.5" in desc
    path.write_text(json.dumps({**base, "serving": {"request_host_us": -1}}))
    with pytest.raises(InputError, match="serving.request_host_us"):
        calmod.serving_terms(str(path))
    path.write_text(json.dumps({k: v for k, v in base.items() if k != "serving"}))
    assert calmod.serving_terms(str(path))[0] == {"request_host_us": 0.0}


def test_fit_recovers_the_term_holds_out_each_deployment_and_serve_uses_it(tmp_path, capsys):
    """Measurements simulated with 60 µs per request and step: the fit on all finds 60 (± the grid's
    interpolation), so does each fit without one deployment, the held-out predictions then match the
    measured TPOT (uncalibrated, 0 µs, they are too fast), and `serve` with the written calibration gives
    the measured TPOT.  The written file keeps the step calibration it was fitted on."""
    recs = _records()
    truth = {o["id"]: o["predicted"] for o in sv.serve(recs, workload_options=OPTS,
                                                       options=sv.Options(request_host_us=TRUE_US))}
    path = tmp_path / "rec.jsonl"
    path.write_text("".join(json.dumps({**r, "measured": truth[r["id"]]}) + "\n" for r in recs))
    out, preds = tmp_path / "cal.json", tmp_path / "loo.jsonl"
    cache = tmp_path / "grid.json"
    assert main(["fit-serving", str(path), "--out", str(out), "--predictions", str(preds), "--rounds", "2",
                 "--leave-out", "deployment,model", "--grid-cache", str(cache)]) == 0
    cal = json.loads(out.read_text())
    fit = cal["serving"]
    assert fit["request_host_us"] == pytest.approx(TRUE_US, abs=4.0)
    assert cal["params"] == json.loads(calmod.DEFAULT_CALIBRATION.read_text())["params"]
    held = fit["held_out"]["values"]["deployment"]
    assert {h["unit"] for h in held} == {"llama-3.1-8b/H100", "llama-3.1-8b/H100/2"}
    # held out by model: nothing is left to fit on, so the physical default (0)
    assert fit["held_out"]["values"]["model"] == [{"unit": "llama-3.1-8b", "rows": 4, "request_host_us": 0.0}]
    for h in held:
        assert h["rows"] == 2 and h["request_host_us"] == pytest.approx(TRUE_US, abs=4.0)
    loo = {o["id"]: o for o in map(json.loads, preds.read_text().splitlines())}
    assert set(loo) == {r["id"] for r in recs}
    for i, m in truth.items():
        assert loo[i]["predicted"]["tpot_mean_ms"] == pytest.approx(m["tpot_mean_ms"], rel=0.02)
    errors = {(e["unit"], e["metric"]): e for e in fit["held_out"]["errors"]}
    assert errors[("all", "tpot_mean_ms")]["uncalibrated_mape_pct"] > 3 * errors[("all", "tpot_mean_ms")][
        "held_out_deployment_mape_pct"]
    assert set(json.loads(cache.read_text())["runs"][0]) == {r["id"] for r in recs}
    o, = sv.serve(recs[:1], calibration=str(out), workload_options=OPTS)
    assert o["predicted"]["tpot_mean_ms"] == pytest.approx(truth[recs[0]["id"]]["tpot_mean_ms"], rel=0.02)
    assert main(["fit-serving", str(path), "--out", str(tmp_path / "x.json"), "--calibration", "none"]) == 2
    assert "fits on top of a step calibration" in capsys.readouterr().err


def test_grid_cache_is_kept_only_for_the_same_records_and_options(tmp_path, monkeypatch):
    """The grid's simulations are reused for the same records and serving options; a changed option (here the
    requests' sampling) or record simulates again."""
    calls = []
    monkeypatch.setattr(sf, "_serve", lambda items, g, **kw: calls.append(g) or {str(r["id"]): {} for r, _ in items})
    items = [({"id": "a", "model": "llama-2-7b"}, "r:1")]
    cache = tmp_path / "grid.json"
    sf._grid_runs(items, [0.0, 40.0], cache, {"workload_options": {"rounds": 2}})
    sf._grid_runs(items, [0.0, 40.0], cache, {"workload_options": {"rounds": 2}})
    assert len(calls) == 2
    sf._grid_runs(items, [0.0, 40.0], cache, {"workload_options": {"rounds": 2, "sampling": {"top_p": 0.9}}})
    assert len(calls) == 4
    sf._grid_runs([({"id": "a", "model": "llama-3.1-8b"}, "r:1")], [0.0, 40.0], cache,
                  {"workload_options": {"rounds": 2, "sampling": {"top_p": 0.9}}})
    assert len(calls) == 6
