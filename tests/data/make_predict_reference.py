"""Write tests/data/predict_reference.json: `costmodel predict` totals per record, computed once by the code
of commit 789f114 (before the sweep's fast path was folded into the core), so that later code can be checked
against them (tests/test_predict_reference.py).  Run from the repo root with ../shared beside it:

    python tests/data/make_predict_reference.py
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED = Path(os.environ.get("COSTMODEL_SHARED", "../shared"))
CASES = {  # name -> predict arguments (besides --calibration and --out)
    "example": [],
    "isolated_requests": [str(SHARED / "ground_truth/isolated_requests.jsonl"),
                          "--model-configs", str(SHARED / "model_configs")],
    "loaded_steps": [str(SHARED / "ground_truth/loaded_steps.jsonl"), "--model-configs", str(SHARED / "model_configs")],
    "loaded_steps_infersim": [str(SHARED / "ground_truth/loaded_steps.jsonl"), "--model-configs",
                              str(SHARED / "model_configs"), "--bench-data", str(SHARED / "bench_data")],
}


def main() -> None:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in CASES.items():
            for cal in ("none", "default"):
                path = Path(tmp) / f"{name}_{cal}.jsonl"
                subprocess.run([sys.executable, "-m", "costmodel.cli", "predict", *args, "--calibration", cal,
                                "--out", str(path)], check=True, capture_output=True)
                rows = [json.loads(x) for x in path.read_text().splitlines()]
                out.setdefault(name, {})[cal] = {r["id"]: r["predicted_us"] for r in rows}
    Path(__file__).with_name("predict_reference.json").write_text(json.dumps(out, indent=0) + "\n")


if __name__ == "__main__":
    main()
