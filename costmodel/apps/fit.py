"""Calibration: fit the residual parameters (`params.Params`) to measured step records with optax.

Loss: a Huber loss on log(predicted / measured) per record (records are sums of steps), each (source, kind)
group weighted equally so that one large run does not dominate, plus the Gaussian log-prior of every
parameter (`params.PRIORS`).  Parameters are optimized in log space (positive by construction) with optax's
L-BFGS, the whole loop jitted (`jax.lax.scan`), deterministic for the same inputs.

First one pooled parameter set is fitted to all records.  When the records come from more than one engine
version (`params.engine_key` of ``vllm_version``), each version then also gets its own parameters, fitted
jointly as shared values plus a per-version deviation in log space with a zero-mean prior
(`ENGINE_SPREAD`): a version's data moves only the terms it constrains; the rest (e.g. all-reduce terms for
a version seen only at TP 1) stay shared.  The pooled set serves records of other or unstated versions.
The result is a `params.Calibration`.
"""
from __future__ import annotations

import functools
import sys
import time
from datetime import date

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..calibration import calibration_to_dict, portable_sources
from ..compiled import jit
from ..errors import InputError
from ..io import check_output_file, print_table, refuse_overwrite, write_json
from ..params import FIELDS, PRIORS, Calibration, Params, from_log, prior_arrays, to_log
from ..step import combine
from .records import Predictor, below_floor_warning, previous_step_note, read_records, with_sampling
# Log-ratio beyond which an error counts linearly.  Step-time noise is a ~1 % core with a tail of slow steps
# (host stalls, up to +25 %); a delta near the core's width makes the fit follow the median, not the tail.
HUBER_DELTA = 0.02
PRIOR_STRENGTH = 1e-3  # weight of the log-prior against the (weighted mean) data term
ENGINE_SPREAD = 1.0  # prior σ of an engine version's log-deviation from the pooled value, in units of the
#                      parameter's own prior σ: versions may differ as much as the prior's plausible range


def _weights(records) -> np.ndarray:
    keys = [(r.source or r.where.rsplit(":", 1)[0], r.kind) for r in records]
    counts = {k: keys.count(k) for k in set(keys)}
    w = np.array([1.0 / counts[k] for k in keys])
    return w / w.sum()


def fit_engines(records, per_engine: bool = True) -> list[str]:
    """Engine versions that get their own parameters: those of the records, when there are at least two."""
    keys = sorted({r.engine for r in records if r.engine})
    return keys if per_engine and len(keys) > 1 else []


def make_loss(predictor, records, engines=(), groups=None):
    """(loss(theta, data), predict(theta, data), data) over all records at once.

    theta = the shared log parameters (under their prior), followed by one log-deviation vector per engine
    in ``engines`` (zero-mean prior); records of other engines get the shared values.  ``data`` holds each
    group's parameter-free step features (`step.features`, computed once: pass ``groups`` =
    `Predictor.features` to reuse them), each step's engine row, the measurements and ``per_engine`` (1.0;
    0.0 switches the deviations off, so the same compiled loss fits the pooled set); per iteration only
    `step.combine` runs.  It is an argument, not a baked-in constant."""
    engines = list(engines)
    row = np.array([1 + engines.index(r.engine) if r.engine in engines else 0 for r in records])
    groups = predictor.features(records) if groups is None else groups
    statics = [su.static for su, _, _ in groups]
    feats = [(su.on_gpu, f, jnp.asarray(owner), jnp.asarray(row[owner])) for su, f, owner in groups]
    data = {"groups": feats, "meas": jnp.asarray([r.measured_us for r in records], jnp.float32),
            "w": jnp.asarray(_weights(records), jnp.float32), "per_engine": jnp.float32(1.0)}
    mu, sig = prior_arrays()
    n, V, P = len(records), len(engines), len(FIELDS)

    def deviations(theta, data):
        return theta[P:].reshape(V, P) * data["per_engine"]

    def predict(theta, data):
        rows_params = theta[None, :P] + jnp.concatenate([jnp.zeros((1, P)), deviations(theta, data)])
        total = jnp.zeros(n, jnp.float32)
        for static, (layout, f, owner, rows) in zip(statics, data["groups"]):
            th = jnp.exp(rows_params[rows])  # [steps, P]
            p = Params(*(th[:, i] for i in range(P)))
            t = jax.vmap(lambda x, q: combine(x, layout, q, static)[0])(f, p)
            total = total + jax.ops.segment_sum(t, owner, num_segments=n)
        return total

    def loss(theta, data):
        r = jnp.log(predict(theta, data) / data["meas"])
        fit_term = jnp.sum(data["w"] * optax.huber_loss(r, delta=HUBER_DELTA) / HUBER_DELTA)
        prior = jnp.sum(((theta[:P] - mu) / sig) ** 2) + jnp.sum((deviations(theta, data) / (ENGINE_SPREAD * sig)) ** 2)
        return fit_term + PRIOR_STRENGTH * 0.5 * prior

    return loss, predict, data


def _lbfgs(loss, steps: int):
    """A jitted run of optax's L-BFGS for ``steps`` iterations (one `lax.scan`):
    run(theta, data) -> (theta, loss history, final |grad|)."""
    opt = optax.lbfgs()

    @jit
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

    return run


def fit(predictor, records, steps: int = 100, init: Params | None = None, per_engine: bool = True):
    """Fit the residual parameters with optax's L-BFGS; returns (`Calibration`, report dict).

    ``pooled``: one parameter set for all records.  With ``per_engine`` and records of two or more engine
    versions, also one set per version, fitted jointly as shared values plus per-version log-deviations
    under a zero-mean prior (`ENGINE_SPREAD`), so a version's data moves only the terms it constrains.  The
    pooled set serves records of other or unstated versions."""
    missing = [r for r in records if r.measured_us is None]
    if missing:
        raise InputError(f"every record used for fitting needs measured_us ({len(missing)} of {len(records)} lack it)",
                         missing[0].where, "measured_us")
    t0 = time.perf_counter()
    engines = fit_engines(records, per_engine)
    loss, _, data = make_loss(predictor, records, engines)
    jax.block_until_ready(data)
    t_features = time.perf_counter() - t0
    P, dev0 = len(FIELDS), jnp.zeros(len(engines) * len(FIELDS))
    run = _lbfgs(loss, steps)  # one compilation for both fits
    theta, hist, gnorm = run(jnp.concatenate([to_log(init or Params()), dev0]), dict(data, per_engine=jnp.float32(0.0)))
    pooled = theta[:P]
    report = {"optimizer": "optax.lbfgs", "iterations": steps, "loss_start": float(hist[0]),
              "loss_end": float(hist[-1]), "loss_change_last_10pct": float(hist[int(steps * 0.9)] - hist[-1]),
              "grad_norm_end": float(gnorm), "engines": engines}
    by_engine = {}
    if engines:  # start at the pooled fit
        theta, hist_e, gnorm_e = run(jnp.concatenate([pooled, dev0]), data)
        by_engine = {e: from_log(theta[:P] + theta[P * (i + 1):P * (i + 2)]) for i, e in enumerate(engines)}
        report.update(engine_loss_start=float(hist_e[0]), engine_loss_end=float(hist_e[-1]),
                      engine_grad_norm_end=float(gnorm_e))
    report.update(features_seconds=round(t_features, 2), seconds=round(time.perf_counter() - t0, 2))
    return Calibration(from_log(pooled), by_engine), report


def leave_one_run_out(predictor, records, steps: int = 100, per_engine: bool = True) -> list[dict]:
    """For each run (``source``): fit on all other runs, report MAPE on the held-out run per kind, next to the
    uncalibrated and the all-runs-fitted MAPE of the same records.  ``params`` says which of the held-out
    fit's parameter sets the run got: its engine version's, or the pooled ones (its version unseen)."""
    sources = sorted({r.source or "-" for r in records})
    full, _ = fit(predictor, records, steps=steps, per_engine=per_engine)
    rows = []
    for src in sources:
        test = [r for r in records if (r.source or "-") == src]
        train = [r for r in records if (r.source or "-") != src]
        held, _ = fit(predictor, train, steps=steps, per_engine=per_engine)
        engines = sorted({held.set_for(r.engine) for r in test} - {None})
        preds = {name: predictor.predict(test, p)[0] for name, p in
                 (("none", Params()), ("held_out", held), ("all_runs", full))}
        for kind in sorted({r.kind or "-" for r in test}):
            idx = [i for i, r in enumerate(test) if (r.kind or "-") == kind]
            meas = np.array([test[i].measured_us for i in idx])
            row = {"held_out_run": src, "kind": kind, "n": len(idx), "params": ",".join(engines) or "pooled"}
            for name, pr in preds.items():
                row[f"mape_{name}_pct"] = float(np.mean(np.abs(pr[idx] / meas - 1)) * 100)
            rows.append(row)
    return rows


def _names(values, limit: int = 8) -> str:
    """``values`` sorted and joined, the first ``limit`` of them and how many more."""
    v = sorted(values)
    return ", ".join(v[:limit]) + (f", ... ({len(v) - limit} more)" if len(v) > limit else "")


def run_fit_cli(args) -> int:
    check_output_file(args.out)  # refused before any work: nothing is written
    refuse_overwrite(args.out, args.records)
    records = with_sampling([r for f in args.records for r in read_records(f)], getattr(args, "sampling", None))
    pred = Predictor(args.model_configs, args.bench_data)
    gpus = sorted({pred.tables(r.gpu, r.where).gpu.name for r in records})
    if len(gpus) > 1:
        raise InputError(f"records are on {len(gpus)} GPUs ({', '.join(gpus)}); a calibration holds one GPU's "
                         "parameters: fit each GPU's records into its own file", field="gpu")
    sources = {r.source or "" for r in records}
    if args.leave_one_run_out:
        if args.holdout:
            raise InputError("--holdout and --leave-one-run-out do not go together (the latter holds out each "
                             "run in turn)", field="holdout")
        if len({r.source or "-" for r in records}) < 2:
            raise InputError("--leave-one-run-out needs records of at least two runs (their 'source'); "
                             f"all are from {next(iter(sources)) or 'no stated source'}", field="leave-one-run-out")
        rows = leave_one_run_out(pred, records, steps=args.steps, per_engine=not args.pooled)
        print("leave-one-run-out MAPE (%): uncalibrated, fitted without the run, fitted on all runs")
        print_table(rows)
        write_json(args.out, rows)
        print(f"wrote {args.out}")
        return 0
    hold = set(args.holdout.split(",")) if args.holdout else set()
    unknown = hold - sources
    if unknown:
        raise InputError(f"no records of source(s) {_names(unknown)}; the records' sources are: "
                         f"{_names(s or '(none)' for s in sources)}", field="holdout")
    train = [r for r in records if (r.source or "") not in hold]
    test = [r for r in records if (r.source or "") in hold]
    if not train:
        raise InputError("--holdout leaves no records to fit on", field="holdout")
    params, report = fit(pred, train, steps=args.steps, per_engine=not args.pooled)
    report["records_timed_as_previous_step"], note = previous_step_note(train)
    print(f"fit: {len(train)} records, {report['iterations']} iterations, loss {report['loss_start']:.4f} -> "
          f"{report['loss_end']:.4f}, |grad| {report['grad_norm_end']:.2e}" + (
              f"; per engine version ({', '.join(report['engines'])}): loss {report['engine_loss_start']:.4f} -> "
              f"{report['engine_loss_end']:.4f}, |grad| {report['engine_grad_norm_end']:.2e}"
              if report["engines"] else "") + f"; {report['seconds']} s")
    if note:
        print(note)
    print("parameters (fitted vs prior" + (", pooled and per engine version):" if params.by_engine else "):"))
    print_table([{"name": k, "fitted" if not params.by_engine else "pooled": float(params.pooled[i]),
                  **{f"vLLM {e}": float(p[i]) for e, p in params.by_engine.items()},
                  "prior": PRIORS[k].default, "range": f"{PRIORS[k].low:g}..{PRIORS[k].high:g}"}
                 for i, k in enumerate(FIELDS)])
    summary = {}
    for name, subset in (("train", train), ("held-out", test)):
        if subset:
            total, _, floor = pred.predict(subset, params, with_floor=True)
            warning = below_floor_warning(subset, floor)
            if warning:
                print(f"{name} records: {warning}", file=sys.stderr)
            rows = [dict(r, source=name) for r in mape_by_source(subset, total)]
            print(f"{name} MAPE:")
            print_table(rows)
            summary[name] = rows
    tabs = {g: portable_sources(pred.tables(g).sources) for g in gpus}
    cal = {"gpu": gpus[0], "engine": sorted({str(r.extra.get("vllm_version", "?")) for r in train}),
           "tables": tabs, "data": [str(f) for f in args.records], "holdout": sorted(hold),
           "fitted_on": date.today().isoformat(), **calibration_to_dict(params),
           "priors": {k: PRIORS[k]._asdict() for k in FIELDS}, "report": report, "mape": summary}
    write_json(args.out, cal)
    print(f"wrote {args.out}")
    return 0


def mape_by_source(records, total) -> list[dict]:
    groups = {}
    for r, p in zip(records, total):
        groups.setdefault((r.source or "-", r.kind or "-"), []).append(abs(p - r.measured_us) / r.measured_us * 100)
    return [{"run": s, "kind": k, "n": len(v), "mape_pct": float(np.mean(v))} for (s, k), v in sorted(groups.items())]
