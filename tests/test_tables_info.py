"""`costmodel tables`: coverage per op and precision."""
import json

from costmodel.cli import main


def test_tables_command_lists_coverage_per_op_and_precision(capsys):
    assert main(["tables", "--gpu", "H100"]) == 0
    cov = json.loads(capsys.readouterr().out)["coverage"]
    assert set(cov) == {"gemm", "attention_decode", "attention_prefill", "allreduce", "moe", "mla_prefill",
                        "mla_decode"}
    assert set(cov["gemm"]) == {"bf16", "fp8"} and cov["gemm"]["bf16"]["shapes_kn"] == 483
    assert {"bf16/bf16", "bf16/fp8"} <= set(cov["attention_decode"]) and "64-8-128" in cov["attention_decode"]["layouts"]
    assert cov["allreduce"]["custom_allreduce"]["num_gpus"] == [2, 4, 8]
    assert set(cov["moe"]) == {"bf16", "fp8", "fp8_block", "int4_wo", "mxfp4"}
    assert cov["moe"]["bf16"]["shapes (hidden/inter/experts x topk: tp x ep)"]["2048/768/128x8"].startswith("1x1 1x2")
    assert cov["mla_decode"]["bf16/fp8/fp8_block"]["kernels"] == ["FLASHMLA"]
    assert main(["tables", "--gpu", "A100"]) == 0
    cov = json.loads(capsys.readouterr().out)["coverage"]
    assert "fp8" not in cov["gemm"] and "mla_decode" not in cov and list(cov["moe"]) == ["bf16"]
