"""Fit the serving simulation's host-side term to measured serving records — ``costmodel fit-serving``.

The term is ``request_host_us`` (`serve.Options`, `scheduler.host_step_us`): the host's work per scheduled
request per step that the engine does not overlap with the GPU — scheduling, input preparation, output
processing and sending each request's new token to the API server.  The step records cannot show it (their
engine schedules asynchronously, which hides it behind the GPU step); a closed loop on a synchronous engine
shows it as a TPOT gap that grows with the number of running requests and not with TP (docs/serving.md).

Each record is simulated at the values of ``grid_us``; its predicted mean TPOT is linear between them
(piecewise-linear interpolation: the term adds to every step, so TPOT is nearly linear in it).  The fitted
value minimizes the mean over deployments (each weighted equally) of the mean |log(predicted / measured)|
of their rows' mean TPOT, capped at a factor of 2 (`CAP`), on a fine grid over [0, max(grid_us)] (one
parameter: the search is exact).  TTFT is
not fitted: it depends on how the benchmark's clients fall into step, an assumption (`--start`), more than on
this term.

Held out: each deployment (model, GPU, layout, precisions: one experiment) — or with ``by="model"`` each
model — is fitted without, then simulated at its own fitted value; those are the predictions the report and
``--predictions`` give.
"""
from __future__ import annotations

import hashlib
import json
import time
from datetime import date
from pathlib import Path

import numpy as np

from .. import sampling
from ..calibration import DEFAULT_CALIBRATION, calibration_path
from ..errors import InputError
from ..io import add_pricing_arguments, atomic_write, check_output_file, print_table, read_json, refuse_overwrite, write_json
from . import serve as sv

GRID_US = (0.0, 40.0, 80.0, 120.0)
FINE_STEPS = 1201
HOLDOUT = ("deployment", "model")
# A record off by more than a factor of 2 is misspecified (a limit or setting it does not state: a server that
# admitted far fewer than its clients, another engine) and tells nothing about a per-request term: beyond this
# |log error| its loss is flat, so it cannot pull the fit (a capped L1, a redescending M-estimator).
CAP = float(np.log(2.0))
METRICS = ("tpot_mean_ms", "ttft_mean_ms")


def deployment_key(rec: dict, by: str = "deployment") -> tuple:
    """The unit held out together: a record's model, or its deployment (model, GPU, layout, precisions and
    KV-cache precision: one experiment's sweep over load, whatever engine version each of its rows names)."""
    if by == "model":
        return (rec.get("model"),)
    eng = rec.get("engine") or {}
    return tuple(str(rec.get(k)) for k in ("model", "gpu", "tp", "pp", "dp", "attention_dp", "moe_ep", "mode",
                                            "weights", "moe_weights")) + (str(eng.get("kv_cache_dtype")),)


def _label(key: tuple) -> str:
    return "/".join(k for k in key if k not in ("None", "1", "agg"))


def fitted_value(pred: np.ndarray, measured: np.ndarray, weight: np.ndarray, grid_us=GRID_US) -> float:
    """The value on [0, max(grid_us)] (µs) minimizing sum(weight x min(|log(pred(s) / measured)|, `CAP`)),
    with ``pred`` [rows, len(grid_us)] the predictions at ``grid_us``, interpolated linearly in between."""
    fine = np.linspace(0.0, grid_us[-1], FINE_STEPS)
    at = np.stack([np.interp(fine, grid_us, p) for p in pred])  # [rows, fine]
    loss = np.sum(weight[:, None] * np.minimum(np.abs(np.log(at / measured[:, None])), CAP), 0)
    return float(fine[int(np.argmin(loss))])


def _serve(items, host_us: float, **kw) -> dict:
    outs = sv.serve(items, options=sv.Options(request_host_us=host_us), **kw)
    return {o["id"]: o for o in outs}


def fit_serving(items, measured: dict, by=("deployment",), grid_us=GRID_US, grid_cache=None, **serve_kw) -> dict:
    """Fit ``request_host_us`` on ``items`` ((record, "file:line") pairs without their measured blocks;
    ``measured`` {id: measured block}) and hold each unit out in turn, for each kind of unit in ``by``
    (`HOLDOUT`).

    Returns {"request_host_us": fitted on all, "held_out": {kind: [{unit, rows, value fitted without it}]},
    "rows": [{id, unit (of the first kind), metric, measured, uncalibrated, held_out_<kind>...}] (ms;
    uncalibrated = at 0 µs), "predictions": {kind: {id: serve output at its unit's held-out value}},
    "refused": {id: reason}}.  ``grid_cache``: a JSON file of the grid's predictions, read when it holds
    this grid and these records, else written.  ``serve_kw`` goes to `serve.serve` (model_configs,
    bench_data, calibration, workload_options, ...)."""
    by = (by,) if isinstance(by, str) else tuple(by)
    for kind in by:
        if kind not in HOLDOUT:
            raise InputError(f"must be one of {', '.join(HOLDOUT)}, got {kind!r}", field="leave-out")
    if len(grid_us) < 2 or grid_us[0] != 0.0 or any(b <= a for a, b in zip(grid_us, grid_us[1:])):
        raise InputError("must start at 0 and increase", field="grid_us")
    runs = _grid_runs(items, list(grid_us), grid_cache, serve_kw)
    refused = {i: o["refused"] for i, o in runs[0].items() if "refused" in o}
    priced = [rec for rec, _ in items if str(rec["id"]) not in refused
              and isinstance((measured.get(str(rec["id"])) or {}).get("tpot_mean_ms"), (int, float))]
    if not priced:
        raise InputError("no priced record has a measured tpot_mean_ms to fit", field="measured")
    ids = [str(r["id"]) for r in priced]
    pred = np.array([[run[i]["predicted"]["tpot_mean_ms"] for run in runs] for i in ids], np.float64)
    meas = np.array([measured[i]["tpot_mean_ms"] for i in ids], np.float64)

    def weights_of(units):
        count = {u: units.count(u) for u in set(units)}
        return np.array([1.0 / count[u] for u in units]), count
    deployments = [deployment_key(r) for r in priced]
    value_all = fitted_value(pred, meas, weights_of(deployments)[0], grid_us)
    held, predictions, loo_of = {}, {}, {}
    for kind in by:
        units = [deployment_key(r, kind) for r in priced]
        _, count = weights_of(units)
        loo = {}
        for u in sorted(count):
            keep = np.array([x != u for x in units])
            w = weights_of([d for d, k in zip(deployments, keep) if k])[0]
            loo[u] = fitted_value(pred[keep], meas[keep], w, grid_us) if keep.any() else 0.0
        held[kind] = [{"unit": _label(u), "rows": count[u], "request_host_us": round(loo[u], 2)} for u in sorted(count)]
        predictions[kind] = {}
        for v in sorted(set(loo.values())):
            unit_items = [(rec, w) for rec, w in items if str(rec["id"]) in set(ids)
                          and loo[deployment_key(rec, kind)] == v]
            predictions[kind].update(_serve(unit_items, v, **serve_kw))
        loo_of[kind] = units
    out_rows = []
    for j, (i, u) in enumerate(zip(ids, deployments)):
        for m in METRICS:
            mv = (measured.get(i) or {}).get(m)
            if isinstance(mv, (int, float)) and mv > 0:
                out_rows.append({"id": i, "unit": _label(u), "metric": m, "measured": float(mv),
                                 "uncalibrated": runs[0][i]["predicted"][m],
                                 **{f"held_out_{k}": predictions[k][i]["predicted"][m] for k in by}})
    return {"request_host_us": value_all, "held_out": held, "rows": out_rows, "predictions": predictions,
            "refused": refused, "grid_us": list(grid_us), "by": list(by)}


def _grid_runs(items, grid_us: list, cache, serve_kw) -> list[dict]:
    """`serve` outputs {id: output} at each grid value, from ``cache`` when it holds this grid, these records
    (ids, and a digest of the records and of the serving options), else simulated (and written to ``cache``
    when given)."""
    ids = [str(r["id"]) for r, _ in items]
    digest = hashlib.sha256(json.dumps([[r for r, _ in items], serve_kw], sort_keys=True, default=str)
                            .encode()).hexdigest()
    if cache is not None and Path(cache).is_file():
        got = read_json(cache)
        if got.get("grid_us") == grid_us and got.get("ids") == ids and got.get("inputs") == digest:
            return got["runs"]
    runs = [_serve(items, g, **serve_kw) for g in grid_us]
    if cache is not None:
        write_json(cache, {"grid_us": grid_us, "ids": ids, "inputs": digest, "runs": runs})
    return runs


def error_table(rows: list[dict], by=("deployment",)) -> list[dict]:
    """Per deployment and metric, and over all of them: rows, MAPE uncalibrated and held out by each kind of
    unit (%), and the held-out signed median (%, the first kind)."""
    out = []
    units = sorted({r["unit"] for r in rows})
    for u in units + [None]:
        for m in METRICS:
            sel = [r for r in rows if r["metric"] == m and (u is None or r["unit"] == u)]
            if not sel:
                continue
            keys = ["uncalibrated"] + [f"held_out_{k}" for k in by]
            err = {k: np.array([100 * (r[k] / r["measured"] - 1) for r in sel]) for k in keys}
            out.append({"unit": u or "all", "metric": m, "n": len(sel),
                        **{f"{k}_mape_pct": round(float(np.mean(np.abs(e))), 1) for k, e in err.items()},
                        f"held_out_{by[0]}_signed_median_pct": round(float(np.median(err[keys[1]])), 1)})
    return out


def add_fit_serving_arguments(sp) -> None:
    sp.add_argument("records", help="serving records with measured blocks (JSON Lines, docs/serving.md)")
    add_pricing_arguments(sp, "the step calibration the fit runs on and copies into --out: default | PATH")
    sp.add_argument("--out", required=True, help="write the calibration with its fitted serving block here")
    sp.add_argument("--leave-out", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                    default=["deployment"], help="what is held out in turn for the report: deployment, model or "
                                                 "both, comma-separated (default deployment)")
    sp.add_argument("--predictions", default=None,
                    help="write the predictions held out by the first --leave-out kind here (JSON Lines, "
                         "`costmodel serve --out` format)")
    sp.add_argument("--grid-cache", default=None,
                    help="keep the grid's simulations in this JSON file and reuse them when it matches")
    sp.add_argument("--exclude-gpu", action="append", default=[],
                    help="drop records on this GPU before reading them (repeatable)")
    sp.add_argument("--rounds", type=int, default=10, help="closed loop: requests per client (default 10)")
    sv.add_closed_loop_limits_argument(sp)
    sampling.add_argument(sp)


def run_fit_serving(args) -> int:
    for name in ("out", "predictions"):
        if getattr(args, name):
            check_output_file(getattr(args, name), name)
            refuse_overwrite(getattr(args, name), [args.records], name)
    base = calibration_path(args.calibration)
    if args.calibration.startswith("none"):
        raise InputError("fit-serving fits on top of a step calibration: give default or a file", field="calibration")
    base = DEFAULT_CALIBRATION if base is None else base
    cal = read_json(base)
    kept = sv._records_kept(args.records, tuple(args.exclude_gpu))
    measured = {str(r.get("id")): r.get("measured") or {} for r, _ in kept}
    items = sv.read_serving_records(args.records, tuple(args.exclude_gpu))
    t0 = time.perf_counter()
    res = fit_serving(items, measured, by=args.leave_out, grid_cache=args.grid_cache,
                      model_configs=args.model_configs, bench_data=args.bench_data, calibration=args.calibration,
                      allow_other_gpu=args.allow_other_gpu,
                      workload_options={"rounds": args.rounds, "closed_loop_limits": args.closed_loop_limits,
                                        "sampling": args.sampling})
    took = time.perf_counter() - t0
    table = error_table(res["rows"], res["by"])
    print(f"costmodel fit-serving: {len(items)} records, {len(res['refused'])} refused; request_host_us "
          f"{res['request_host_us']:.1f} fitted on all ({took:.0f} s); each unit held out in turn:")
    for kind, values in res["held_out"].items():
        print(f"by {kind}:")
        print_table(values)
    print_table(table)
    cal["serving"] = {"request_host_us": round(res["request_host_us"], 2),
                      "fitted_on": date.today().isoformat(), "data": Path(args.records).name,
                      "excluded_gpus": list(args.exclude_gpu), "grid_us": res["grid_us"],
                      "held_out": {"values": res["held_out"], "errors": table}}
    write_json(args.out, cal)
    if args.predictions:
        preds = res["predictions"][res["by"][0]]
        atomic_write(args.predictions, lambda fh: fh.writelines(
            json.dumps(preds.get(str(r["id"])) or {"id": str(r["id"]), "refused": res["refused"].get(
                str(r["id"]), "no measured tpot_mean_ms")}) + "\n" for r, _ in items))
        print(f"wrote {args.predictions}")
    print(f"wrote {args.out}")
    return 0
