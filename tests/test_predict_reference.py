"""`costmodel predict` gives the numbers it gave before the sweep's fast path was folded into the core:
per record within 1e-5 (relative) of tests/data/predict_reference.json (made once by
tests/data/make_predict_reference.py from the code of that time), with and without calibration.  Since
then a calibration carries its host-side terms to records of other GPUs (`params.HOST_FIELDS`; they got the
physical defaults before), so with ``default`` only the records of its own GPU (H100) are compared."""
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
        if cal == "default":
            other = _other_gpu_ids(args)
            ref = {k: v for k, v in ref.items() if k not in other}
        worst = max(abs(got[k] / v - 1.0) for k, v in ref.items())
        assert worst <= 1e-5, f"{case} calibration={cal}: max relative difference {worst:.2e}"
    capsys.readouterr()


def _other_gpu_ids(args) -> set:
    """Ids of the records (the packaged example without ``args``) on another GPU than the default
    calibration's."""
    import costmodel
    from costmodel.calibration import DEFAULT_CALIBRATION, read_calibration
    from costmodel.hardware import get_gpu
    path = Path(args[0]) if args else Path(costmodel.__file__).parent / "data" / "example_steps.jsonl"
    fitted_on = read_calibration(DEFAULT_CALIBRATION)["gpu"]
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["id"] for r in recs if get_gpu(r["gpu"]).name != fitted_on}
