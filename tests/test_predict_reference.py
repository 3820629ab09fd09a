"""`costmodel predict` gives the numbers it gave before the sweep's fast path was folded into the core:
per record within 1e-5 (relative) of tests/data/predict_reference.json (made once by
tests/data/make_predict_reference.py from the code of that time), with and without calibration."""
import json
from pathlib import Path

import pytest

from costmodel.cli import main

from conftest import SHARED, need_shared

REFERENCE = json.loads((Path(__file__).parent / "data" / "predict_reference.json").read_text())
CASES = {
    "example": [],
    "isolated_requests": ["ground_truth/isolated_requests.jsonl", "--model-configs", "model_configs"],
    "loaded_steps": ["ground_truth/loaded_steps.jsonl", "--model-configs", "model_configs"],
    "loaded_steps_infersim": ["ground_truth/loaded_steps.jsonl", "--model-configs", "model_configs",
                              "--bench-data", "bench_data"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_predictions_match_reference(case, tmp_path, capsys):
    args = CASES[case]
    if args:
        need_shared()
        args = [a if a.startswith("--") else str(SHARED / a) for a in args]
    for cal in ("none", "default"):
        out = tmp_path / f"{cal}.jsonl"
        assert main(["predict", *args, "--calibration", cal, "--out", str(out)]) == 0
        got = {r["id"]: r["predicted_us"] for r in map(json.loads, out.read_text().splitlines())}
        ref = REFERENCE[case][cal]
        assert got.keys() == ref.keys()
        worst = max(abs(got[k] / v - 1.0) for k, v in ref.items())
        assert worst <= 1e-5, f"{case} calibration={cal}: max relative difference {worst:.2e}"
    capsys.readouterr()
