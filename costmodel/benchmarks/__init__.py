"""Kernel benchmark harness: measures GEMM and attention latencies on the local GPU and writes them as
bench_data tables in the schema `costmodel.tables` reads.

    python -m costmodel.benchmarks --out DIR --gpu-name h100_sxm [--grid small|full]

See `harness` for what is measured and how.
"""
from .harness import GRIDS, Grid, main, run_benchmarks, time_call

__all__ = ["GRIDS", "Grid", "main", "run_benchmarks", "time_call"]
