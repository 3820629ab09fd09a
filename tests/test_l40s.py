"""L40S: its imported tables load and `costmodel predict` prices a dense model on it."""
import json

import pytest

from costmodel.cli import main
from costmodel.hardware import get_gpu
from costmodel.tables import load_tables

RECORDS = [
    {"id": "l40s-tp1", "model": "llama-2-7b", "gpu": "l40s", "tp": 1,
     "steps": [{"prefill": [[512, 0]], "decode": [100, 200]}]},
    {"id": "l40s-tp2", "model": "llama-2-7b", "gpu": "L40S", "tp": 2,
     "steps": [{"prefill": [], "decode": [1000, 2000, 300]}]},
    {"id": "h100-tp1", "model": "llama-2-7b", "gpu": "h100_sxm", "tp": 1,
     "steps": [{"prefill": [[512, 0]], "decode": [100, 200]}]},
]


def test_l40s_spec_is_a_pcie_card():
    g = get_gpu("l40s")
    assert g.name == "L40S" and g.table_dirs == ("l40s",)
    assert g.bf16_flops == pytest.approx(362e12, rel=1e-3) and g.fp8_flops == pytest.approx(733e12, rel=1e-3)
    assert g.hbm_bytes_per_s == pytest.approx(864e9) and g.nvlink_bytes_per_s == pytest.approx(32e9)  # PCIe 4.0


def test_l40s_tables_load_from_the_repo():
    t = load_tables(None, get_gpu("l40s"))
    assert set(t.gemm) == {"bf16", "fp8"} and t.decode and t.prefill and t.allreduce is not None
    assert all(str(v).rstrip("/").split("/")[-1] in ("l40s", "data.csv") for v in t.sources.values())


def test_predict_dense_model_on_l40s(tmp_path):
    rec, out = tmp_path / "r.jsonl", tmp_path / "o.jsonl"
    rec.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    assert main(["predict", str(rec), "--out", str(out), "--calibration", "none"]) == 0
    got = {x["id"]: x for x in map(json.loads, out.read_text().splitlines())}
    l1, l2, h1 = got["l40s-tp1"], got["l40s-tp2"], got["h100-tp1"]
    assert all(x["predicted_us"] > 0 for x in got.values())
    # 2.7x less BF16 peak and 3.9x less bandwidth: the same step is well over twice as slow on an L40S
    assert l1["predicted_us"] > 2.5 * h1["predicted_us"]
    assert l1["breakdown_us"]["gemm"] > 2.5 * h1["breakdown_us"]["gemm"]
    assert l2["breakdown_us"]["communication"] > 0 and l1["breakdown_us"]["communication"] == 0
