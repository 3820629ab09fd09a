"""`costmodel` command line: predict, kernels, tables, fit, import-aiconfigurator."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from . import sampling
from .apps import bench, decisions, search, serve, serving_fit, sweep
from .apps.tables_info import coverage
from .apps.fit import run_fit_cli
from .apps.kernel_calls import predict_kernel_csv
from .apps.records import (Predictor, below_floor_warning, mape_table, previous_step_note, read_records,
                           with_sampling)
from .calibration import calibration_path, parameter_sets_used, resolve_calibration
from .compiled import enable_compile_cache
from .errors import InputError, warnings_as_lines
from .hardware import get_gpu
from .io import (ALLOW_OTHER_GPU_HELP, atomic_write, check_output_file, number, print_table,
    refuse_overwrite, write_frame, write_json)
from .tables import load_tables
from .tabletools import importer as aiconfigurator


def cmd_predict(args) -> int:
    if args.out:  # refused before any work: nothing is written
        meta_path = str(args.out) + ".meta.json"
        inputs = [args.records, calibration_path(args.calibration)]
        for path, field in ((args.out, "out"), (meta_path, "out (its .meta.json)")):
            check_output_file(path, field)
            refuse_overwrite(path, inputs, field)
    records = with_sampling(read_records(args.records), args.sampling)
    pred = Predictor(args.model_configs, args.bench_data)
    sources = {t.gpu.name: t.sources for t in (pred.tables(r.gpu, r.where) for r in records)}
    sources = dict(sorted(sources.items()))  # by GPU name
    params, cal_name = resolve_calibration(args.calibration, list(sources), allow_other_gpu=args.allow_other_gpu,
                                           table_sources=sources)
    total, parts, floor = pred.predict(records, params, with_floor=True)
    used = parameter_sets_used(records, params)
    if args.out:
        def write(fh):
            for i, r in enumerate(records):
                row = {"id": r.id, "predicted_us": round(float(total[i]), 3),
                       "breakdown_us": {k: round(float(v[i]), 3) for k, v in parts.items()}}
                if r.times_previous_step:
                    row["timed_steps"] = r.timed_steps
                fh.write(json.dumps(row) + "\n")
        meta = {"records": str(args.records), "calibration": cal_name, "parameter_sets": used, "tables": sources}
        atomic_write(args.out, write)
        write_json(meta_path, meta)
    print(f"costmodel predict: {len(records)} records, calibration={cal_name}")
    print("  parameters: " + ", ".join(f"{k} ({n} records)" for k, n in used.items()))
    for note in (previous_step_note(records)[1], pred.sampler_note(records)):
        if note:
            print(note)
    for g, src in sources.items():
        print(f"  tables for {g}: " + ", ".join(f"{k}={v}" for k, v in src.items()))
    rows = mape_table(records, total)
    if rows:
        print("MAPE against measured_us:")
        print_table(rows)
    warning = below_floor_warning(records, floor)
    if warning:
        print(warning, file=sys.stderr)
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_kernels(args) -> int:
    check_output_file(args.out)
    refuse_overwrite(args.out, [args.queries])
    df = predict_kernel_csv(args.queries, args.gpu, args.bench_data)
    write_frame(args.out, df)
    print(f"wrote {len(df)} rows to {args.out}")
    return 0


def cmd_tables(args) -> int:
    t = load_tables(args.bench_data, get_gpu(args.gpu))
    info = {"gpu": t.gpu.name, "root": str(t.root), "sources": t.sources, "gemm": {}, "adjusted_points": {},
            "filled_cells": t.filled_cells}
    for dt, g in t.gemm.items():
        info["gemm"][dt] = {"m": _span(g.log_m), "k": _span(g.log_k), "n": _span(g.log_n),
                            "shapes": int(g.log_k.shape[0] * g.log_n.shape[0])}
    for kind in ("decode", "prefill"):
        a = getattr(t, kind)
        info[kind] = {"head_layouts_per_gpu": ["-".join(map(str, h)) for h in getattr(t, f"{kind}_heads")],
                      "length": _span(a.log_len), "batch": _span(a.log_b)}
    if t.allreduce is not None:
        info["allreduce"] = {"gpus": _span(t.allreduce.log_gpus), "bytes": _span(t.allreduce.log_bytes)}
    by = {}
    for a in t.adjustments:
        by.setdefault(a.table, []).append(a.measured_us / a.used_us - 1)
    info["adjusted_points"] = {k: {"n": len(v), "median_pct": round(float(np.median(v)) * 100, 2),
                                   "max_pct": round(float(np.max(v)) * 100, 1)} for k, v in by.items()}
    info["notes"] = t.notes
    info["coverage"] = coverage(t)
    print(json.dumps(info, indent=1))
    return 0


def _span(log_grid) -> str:
    g = np.exp(np.asarray(log_grid))
    return f"{len(g)} values {g.min():.0f}..{g.max():.0f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="costmodel", description=__doc__)
    p.add_argument("--debug", action="store_true",
                   help="on an unexpected error, show Python's traceback instead of a one-line message")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, records=True):
        if records:
            sp.add_argument("records", nargs="?", default=str(Path(__file__).parent / "data" / "example_steps.jsonl"),
                            help="step records, JSON Lines (schema: README; default: the packaged example)")
        sp.add_argument("--model-configs", default=None,
                        help="folder of <model>/config.json (default: configs shipped in the package)")
        sp.add_argument("--bench-data", default=None,
                        help="kernel tables folder (default: the repo's bench_data/); mix sources with "
                             "DIR,gemm=DIR2,decode=DIR3,prefill=DIR4,allreduce=DIR5")

    sp = sub.add_parser("predict", help="predict step records")
    common(sp)
    sp.add_argument("--calibration", default="default",
                    help="none | default | PATH to a calibration JSON; append @VERSION (e.g. default@0.15) to use "
                         "that engine version's parameters for every record instead of each record's vllm_version")
    sp.add_argument("--allow-other-gpu", action="store_true", help=ALLOW_OTHER_GPU_HELP)
    sampling.add_argument(sp)
    sp.add_argument("--out", default=None, help="write one JSON line per record here")
    sp.set_defaults(func=cmd_predict)

    sp = sub.add_parser("kernels", help="predict single kernel calls from a CSV of queries")
    sp.add_argument("queries")
    sp.add_argument("--gpu", required=True)
    sp.add_argument("--bench-data", default=None)
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_kernels)

    sp = sub.add_parser("tables", help="list the kernel tables loaded for a GPU, their grids, provenance and "
                                       "coverage per op and precision (GEMM, attention, all-reduce, MoE, MLA)")
    sp.add_argument("--gpu", required=True)
    sp.add_argument("--bench-data", default=None)
    sp.set_defaults(func=cmd_tables)

    sp = sub.add_parser("fit", help="fit the residual parameters to step records")
    sp.add_argument("records", nargs="+")
    sp.add_argument("--model-configs", default=None)
    sp.add_argument("--bench-data", default=None)
    sp.add_argument("--out", required=True, help="calibration JSON to write")
    sp.add_argument("--holdout", default=None, help="comma-separated source names held out of the fit")
    sp.add_argument("--steps", type=number(int, 1), default=100, help="L-BFGS iterations (at least 1)")
    sp.add_argument("--leave-one-run-out", action="store_true",
                    help="fit once per run without it and report held-out MAPE (writes the table to --out)")
    sp.add_argument("--pooled", action="store_true",
                    help="one parameter set for all records, not one per engine version (vllm_version)")
    sampling.add_argument(sp)
    sp.set_defaults(func=run_fit_cli)

    for name, help_, add, run in (
            ("sweep", "evaluate a space of step configurations (YAML/JSON spec) to Parquet/CSV",
             sweep.add_sweep_arguments, sweep.run_sweep),
            ("bench", "time the vectorized sweep against a per-configuration loop", bench.add_bench_arguments,
             bench.run_bench),
            ("serve", "serving estimates (TTFT, TPOT/ITL, E2E, throughput) of deployments under load",
             serve.add_serve_arguments, serve.run_serve),
            ("fit-serving", "fit the serving simulation's host-side term to measured serving records (each "
                            "deployment held out in turn for the report)", serving_fit.add_fit_serving_arguments,
             serving_fit.run_fit_serving),
            ("search", "deployments of a model on a GPU budget that meet TTFT/TPOT objectives: Pareto front, "
                       "ranked table, vllm serve command lines", search.add_search_arguments, search.run_search),
            ("regret", "decision quality on closed-loop measurements: regret of the configuration the predictions "
                       "pick under a TPOT objective, per group", decisions.add_regret_arguments,
             decisions.run_regret)):
        sp = sub.add_parser(name, help=help_)
        add(sp)
        sp.set_defaults(func=run)

    sp = sub.add_parser("import-aiconfigurator", help="convert AIConfigurator's kernel database to bench_data")
    aiconfigurator.add_arguments(sp)
    sp.set_defaults(func=aiconfigurator.run)
    for sp in sub.choices.values():  # --debug after the command too
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    """Run one command; returns the exit status: 0 done, 2 refused input or an error (one line on stderr,
    ``costmodel: error: ...``; ``--debug`` shows the traceback of an unexpected one), 130 interrupted."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or argparse's usage error (already printed)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    if args.cmd != "bench":  # the benchmark times compilation from scratch
        enable_compile_cache()
    try:
        with warnings_as_lines():
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("costmodel: interrupted", file=sys.stderr)
        return 130
    except (InputError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"costmodel: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # last resort: one line, not a traceback
        if args.debug:
            raise
        what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        what = " ".join(what.split())
        print(f"costmodel: error: {what} (rerun with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
