"""`costmodel` command line: predict, kernels, tables, fit, import-aiconfigurator."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from .errors import InputError


def _atomic_write(path: str | Path, write) -> None:
    """Write through a temporary file in the same folder and rename, so a failed run leaves no partial
    file presented as complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            write(fh)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _print_table(rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    fmt = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, fmt)))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(w) for c, w in zip(cols, fmt)))


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def cmd_predict(args) -> int:
    from .apps.fit import parameter_sets_used, resolve_calibration
    from .apps.records import Predictor, below_floor_warning, mape_table, previous_step_note, read_records

    records = read_records(args.records)
    pred = Predictor(args.model_configs, args.bench_data)
    gpus = sorted({pred.tables(r.gpu, r.where).gpu.name for r in records})
    params, cal_name = resolve_calibration(args.calibration, gpus, allow_other_gpu=args.allow_other_gpu,
                                           table_sources={g: pred._tables[g].sources for g in gpus})
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
        tabs = {g: pred._tables[g] for g in gpus}
        meta = {"records": str(args.records), "calibration": cal_name, "parameter_sets": used,
                "tables": {g: t.sources for g, t in tabs.items()}}
        _atomic_write(str(args.out) + ".meta.json", lambda fh: json.dump(meta, fh, indent=1))
        _atomic_write(args.out, write)
    tabs = {g: pred._tables[g] for g in gpus}
    print(f"costmodel predict: {len(records)} records, calibration={cal_name}")
    print("  parameters: " + ", ".join(f"{k} ({n} records)" for k, n in used.items()))
    note = previous_step_note(records)[1]
    if note:
        print(note)
    for g, t in tabs.items():
        print(f"  tables for {g}: " + ", ".join(f"{k}={v}" for k, v in t.sources.items()))
    rows = mape_table(records, total)
    if rows:
        print("MAPE against measured_us:")
        _print_table(rows)
    warning = below_floor_warning(records, floor)
    if warning:
        print(warning, file=sys.stderr)
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_kernels(args) -> int:
    from .apps.kernel_calls import predict_kernel_csv
    df = predict_kernel_csv(args.queries, args.gpu, args.bench_data)
    _atomic_write(args.out, lambda fh: df.to_csv(fh, index=False))
    print(f"wrote {len(df)} rows to {args.out}")
    return 0


def cmd_tables(args) -> int:
    from .hardware import get_gpu
    from .tables import load_tables
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
    print(json.dumps(info, indent=1))
    return 0


def _span(log_grid) -> str:
    g = np.exp(np.asarray(log_grid))
    return f"{len(g)} values {g.min():.0f}..{g.max():.0f}"


def cmd_fit(args) -> int:
    from .apps.fit import run_fit_cli
    return run_fit_cli(args)


def cmd_import(args) -> int:
    from .tabletools import importer as aiconfigurator
    return aiconfigurator.run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="costmodel", description=__doc__)
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
    sp.add_argument("--allow-other-gpu", action="store_true", help="use a calibration fitted on another GPU")
    sp.add_argument("--out", default=None, help="write one JSON line per record here")
    sp.set_defaults(func=cmd_predict)

    sp = sub.add_parser("kernels", help="predict single kernel calls from a CSV of queries")
    sp.add_argument("queries")
    sp.add_argument("--gpu", required=True)
    sp.add_argument("--bench-data", default=None)
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_kernels)

    sp = sub.add_parser("tables", help="list the kernel tables loaded for a GPU, their grids and provenance")
    sp.add_argument("--gpu", required=True)
    sp.add_argument("--bench-data", default=None)
    sp.set_defaults(func=cmd_tables)

    sp = sub.add_parser("fit", help="fit the residual parameters to step records")
    sp.add_argument("records", nargs="+")
    sp.add_argument("--model-configs", default=None)
    sp.add_argument("--bench-data", default=None)
    sp.add_argument("--out", required=True, help="calibration JSON to write")
    sp.add_argument("--holdout", default=None, help="comma-separated source names held out of the fit")
    sp.add_argument("--steps", type=int, default=100, help="L-BFGS iterations")
    sp.add_argument("--leave-one-run-out", action="store_true",
                    help="fit once per run without it and report held-out MAPE (writes the table to --out)")
    sp.add_argument("--pooled", action="store_true",
                    help="one parameter set for all records, not one per engine version (vllm_version)")
    sp.set_defaults(func=cmd_fit)

    from .apps import bench as _bench
    from .apps import sweep as _sweep
    sp = sub.add_parser("sweep", help="evaluate a space of step configurations (YAML/JSON spec) to Parquet/CSV")
    _sweep.add_sweep_arguments(sp)
    sp.set_defaults(func=_sweep.run_sweep)
    sp = sub.add_parser("bench", help="time the vectorized sweep against a per-configuration loop")
    _bench.add_bench_arguments(sp)
    sp.set_defaults(func=_bench.run_bench)

    from .apps import serve as _serve
    sp = sub.add_parser("serve", help="serving estimates (TTFT, TPOT/ITL, E2E, throughput) of deployments under load")
    _serve.add_serve_arguments(sp)
    sp.set_defaults(func=_serve.run_serve)

    sp = sub.add_parser("import-aiconfigurator", help="convert AIConfigurator's kernel database to bench_data")
    from .tabletools import importer as aiconfigurator
    aiconfigurator.add_arguments(sp)
    sp.set_defaults(func=cmd_import)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        print(f"costmodel: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"costmodel: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
