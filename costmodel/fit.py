"""Calibration: fit the residual parameters (`params.Params`) to measured step records with optax.

Loss: a Huber loss on log(predicted / measured) per record (records are sums of steps), each (source, kind)
group weighted equally so that one large run does not dominate, plus the Gaussian log-prior of every
parameter (`params.PRIORS`).  Parameters are optimized in log space (positive by construction) with optax's
L-BFGS, the whole loop jitted (`jax.lax.scan`), deterministic for the same inputs.
"""
from __future__ import annotations

import functools
import json
import sys
import time
from datetime import date
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .errors import InputError
from .params import FIELDS, PRIORS, Params, from_log, prior_arrays, to_log

DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "data" / "calibration_h100_vllm.json"
HUBER_DELTA = 0.05  # log-ratio beyond which an error counts linearly (outlier steps)
PRIOR_STRENGTH = 1e-3  # weight of the log-prior against the (weighted mean) data term


def _weights(records) -> np.ndarray:
    keys = [(r.source or r.where.rsplit(":", 1)[0], r.kind) for r in records]
    counts = {k: keys.count(k) for k in set(keys)}
    w = np.array([1.0 / counts[k] for k in keys])
    return w / w.sum()


def make_loss(predictor, records, prior_weight: float = 1.0):
    """(loss(theta, data), predict(theta, data), data) over all records at once; theta = log parameters.

    ``data`` holds each group's parameter-free step features (`step.features`, computed once here) and the
    measurements; per iteration only `step.combine` runs.  It is an argument, not a baked-in constant."""
    from .step import combine
    groups = predictor.features(records)
    statics = [su.static for su, _, _ in groups]
    feats = [(su.layout, f, jnp.asarray(owner)) for su, f, owner in groups]
    data = {"groups": feats, "meas": jnp.asarray([r.measured_us for r in records], jnp.float32),
            "w": jnp.asarray(_weights(records), jnp.float32)}
    mu, sig = prior_arrays()
    n = len(records)

    def predict(theta, data):
        p = from_log(theta)
        total = jnp.zeros(n, jnp.float32)
        for static, (layout, f, owner) in zip(statics, data["groups"]):
            t = jax.vmap(lambda x: combine(x, layout, p, static)[0])(f)
            total = total + jax.ops.segment_sum(t, owner, num_segments=n)
        return total

    def loss(theta, data):
        r = jnp.log(predict(theta, data) / data["meas"])
        fit_term = jnp.sum(data["w"] * optax.huber_loss(r, delta=HUBER_DELTA) / HUBER_DELTA)
        prior = 0.5 * jnp.sum(((theta - mu) / sig) ** 2)
        return fit_term + prior_weight * PRIOR_STRENGTH * prior

    return loss, predict, data


def fit(predictor, records, steps: int = 100, init: Params | None = None):
    """Fit the residual parameters with optax's L-BFGS; returns (Params, report dict)."""
    if any(r.measured_us is None for r in records):
        raise InputError("every record used for fitting needs measured_us", field="measured_us")
    t0 = time.perf_counter()
    loss, predict, data = make_loss(predictor, records)
    jax.block_until_ready(data)
    t_features = time.perf_counter() - t0
    theta0 = to_log(init or Params())
    opt = optax.lbfgs()

    @jax.jit
    def run(theta, data):
        fn = functools.partial(loss, data=data)
        value_and_grad = optax.value_and_grad_from_state(fn)

        def body(carry, _):
            th, st = carry
            val, g = value_and_grad(th, state=st)
            upd, st = opt.update(g, st, th, value=val, grad=g, value_fn=fn)
            return (optax.apply_updates(th, upd), st), val
        (th, _), hist = jax.lax.scan(body, (theta, opt.init(theta)), None, length=steps)
        return th, hist, jnp.linalg.norm(jax.grad(fn)(th))

    theta, hist, gnorm = run(theta0, data)
    hist = np.asarray(hist)
    report = {"optimizer": "optax.lbfgs", "iterations": steps, "loss_start": float(hist[0]),
              "loss_end": float(hist[-1]), "loss_change_last_10pct": float(hist[int(steps * 0.9)] - hist[-1]),
              "grad_norm_end": float(gnorm), "features_seconds": round(t_features, 2),
              "seconds": round(time.perf_counter() - t0, 2)}
    return from_log(theta), report


def leave_one_run_out(predictor, records, steps: int = 100) -> list[dict]:
    """For each run (``source``): fit on all other runs, report MAPE on the held-out run per kind, next to the
    uncalibrated and the all-runs-fitted MAPE of the same records."""
    sources = sorted({r.source or "-" for r in records})
    full, _ = fit(predictor, records, steps=steps)
    rows = []
    for src in sources:
        test = [r for r in records if (r.source or "-") == src]
        train = [r for r in records if (r.source or "-") != src]
        held, _ = fit(predictor, train, steps=steps)
        preds = {name: predictor.predict(test, p)[0] for name, p in
                 (("none", Params()), ("held_out", held), ("all_runs", full))}
        for kind in sorted({r.kind or "-" for r in test}):
            idx = [i for i, r in enumerate(test) if (r.kind or "-") == kind]
            meas = np.array([test[i].measured_us for i in idx])
            row = {"held_out_run": src, "kind": kind, "n": len(idx)}
            for name, pr in preds.items():
                row[f"mape_{name}_pct"] = float(np.mean(np.abs(pr[idx] / meas - 1)) * 100)
            rows.append(row)
    return rows


def params_to_dict(p: Params) -> dict:
    return {k: float(v) for k, v in zip(FIELDS, p)}


def params_from_dict(d: dict, where: str) -> Params:
    unknown = set(d) - set(FIELDS)
    if unknown:
        raise InputError(f"unknown parameter(s) {sorted(unknown)}", where, "params")
    vals = {}
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
            raise InputError(f"must be a positive number, got {v!r}", where, f"params.{k}")
        vals[k] = float(v)
    return Params(**vals)


def load_calibration(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError("no such calibration file", str(path))
    try:
        cal = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON: {e.msg}", f"{path}:{e.lineno}") from None
    if not isinstance(cal, dict) or "params" not in cal or "gpu" not in cal:
        raise InputError("a calibration needs 'gpu' and 'params'", str(path))
    cal["_params"] = params_from_dict(cal["params"], str(path))
    return cal


def _table_kinds(sources: dict) -> dict:
    """Which table set each kind came from: 'repo' for the repo's bench_data, else the folder's name."""
    from .tables import default_bench_data
    repo = str(default_bench_data())
    return {k: "repo" if str(v).startswith(repo) else str(v) for k, v in sources.items()}


def resolve_calibration(choice: str, gpus: list[str], allow_other_gpu: bool = False,
                        table_sources: dict | None = None):
    """({GPU name: Params}, description) for --calibration none | default | PATH.

    ``default`` applies the shipped calibration to the records on its GPU and the physical defaults to the
    others; a calibration file named by PATH is refused for records on another GPU unless
    ``allow_other_gpu``, which applies it to every GPU."""
    if choice == "none":
        return {}, "none (physical defaults)"
    if choice == "default":
        if not DEFAULT_CALIBRATION.is_file():
            return {}, "default = none (no calibration shipped)"
        cal = load_calibration(DEFAULT_CALIBRATION)
        if allow_other_gpu:
            return {g: cal["_params"] for g in gpus}, f"default ({DEFAULT_CALIBRATION.name}) on all GPUs"
        here = _table_kinds((table_sources or {}).get(cal["gpu"], {}))
        if any(v != "repo" for v in here.values()):  # fitted on the repo's tables: meaningless on others
            return {}, (f"none (the default calibration was fitted on the repo's bench_data; "
                        f"{cal['gpu']} tables here come from elsewhere)")
        other = [g for g in gpus if g != cal["gpu"]]
        note = f"; physical defaults for {', '.join(other)}" if other else ""
        return {cal["gpu"]: cal["_params"]}, f"default ({DEFAULT_CALIBRATION.name}) for {cal['gpu']}{note}"
    cal = load_calibration(choice)
    other = [g for g in gpus if g != cal["gpu"]]
    if other and not allow_other_gpu:
        raise InputError(f"calibration was fitted on {cal['gpu']}, records are on {', '.join(other)}; pass "
                         f"--allow-other-gpu to use it anyway", choice, "gpu")
    return {g: cal["_params"] for g in gpus}, f"{choice} (fitted on {cal['gpu']})"


def run_fit_cli(args) -> int:
    from .cli import _atomic_write, _print_table
    from .records import Predictor, below_floor_warning, read_records

    records = [r for f in args.records for r in read_records(f)]
    if args.leave_one_run_out:
        rows = leave_one_run_out(Predictor(args.model_configs, args.bench_data), records, steps=args.steps)
        print("leave-one-run-out MAPE (%): uncalibrated, fitted without the run, fitted on all runs")
        _print_table(rows)
        _atomic_write(args.out, lambda fh: json.dump(rows, fh, indent=1))
        print(f"wrote {args.out}")
        return 0
    hold = set(args.holdout.split(",")) if args.holdout else set()
    train = [r for r in records if (r.source or "") not in hold]
    test = [r for r in records if (r.source or "") in hold]
    if not train:
        raise InputError("--holdout leaves no records to fit on", field="holdout")
    pred = Predictor(args.model_configs, args.bench_data)
    gpus = sorted({pred.tables(r.gpu, r.where).gpu.name for r in records})
    params, report = fit(pred, train, steps=args.steps)
    print(f"fit: {len(train)} records, {report['iterations']} iterations, loss {report['loss_start']:.4f} -> "
          f"{report['loss_end']:.4f}, |grad| {report['grad_norm_end']:.2e}, {report['seconds']} s")
    print("parameters (fitted vs prior):")
    _print_table([{"name": k, "fitted": float(v), "prior": PRIORS[k].default,
                   "range": f"{PRIORS[k].low:g}..{PRIORS[k].high:g}"} for k, v in zip(FIELDS, params)])
    summary = {}
    for name, subset in (("train", train), ("held-out", test)):
        if subset:
            total, _, floor = pred.predict(subset, params, with_floor=True)
            warning = below_floor_warning(subset, floor)
            if warning:
                print(f"{name} records: {warning}", file=sys.stderr)
            rows = [dict(r, source=name) for r in mape_by_source(subset, total)]
            print(f"{name} MAPE:")
            _print_table(rows)
            summary[name] = rows
    tabs = {g: pred._tables[g].sources for g in gpus}
    cal = {"gpu": gpus[0] if len(gpus) == 1 else gpus, "engine": sorted({str(r.extra.get("vllm_version", "?"))
                                                                          for r in train}),
           "tables": tabs, "data": [str(f) for f in args.records], "holdout": sorted(hold),
           "fitted_on": date.today().isoformat(), "params": params_to_dict(params),
           "priors": {k: PRIORS[k]._asdict() for k in FIELDS}, "report": report, "mape": summary}
    _atomic_write(args.out, lambda fh: json.dump(cal, fh, indent=1))
    print(f"wrote {args.out}")
    return 0


def mape_by_source(records, total) -> list[dict]:
    groups = {}
    for r, p in zip(records, total):
        groups.setdefault((r.source or "-", r.kind or "-"), []).append(abs(p - r.measured_us) / r.measured_us * 100)
    return [{"run": s, "kind": k, "n": len(v), "mape_pct": float(np.mean(v))} for (s, k), v in sorted(groups.items())]
