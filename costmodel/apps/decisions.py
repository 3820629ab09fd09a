"""Decision quality of the serving predictions — ``costmodel regret``: would a user who picks a deployment by
the model's predictions have picked well?

On closed-loop measurements (the schema of the shared ``serving_concurrency.jsonl``), rows are grouped by
model, GPU, weight precisions and ISL/OSL; a group with at least ``min_configs`` priced rows gets a TPOT
objective at the median of its measured mean TPOTs.  The model picks the row with the most *predicted* output
tokens/s per GPU among those it *predicts* within the objective; the pick's regret is
1 − (its measured tokens/s per GPU ÷ the most measured tokens/s per GPU within the objective), and 1 (100 %)
when the pick misses the objective when measured or when the model predicts no row within it.  Rows the
model refuses, and rows repeating another's layout, concurrency and measurements, are left out of the
groups and counted.

Measured tokens/s per GPU of a closed loop of C clients (each sends its next request when the previous one
has finished): every client completes one request of OSL output tokens per mean request latency
TTFT + (OSL − 1) x TPOT, so C x OSL / latency output tokens/s over the deployment's GPUs (tp x pp x
attention-DP x DP, or the workers of both pools of a disaggregated one) — AIConfigurator's own relation for
these rows.  The predicted tokens/s per GPU is `serve.serve`'s (``throughput.output_tokens_per_s_per_gpu``),
the number `costmodel search` ranks by.  docs/search.md has the results.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .. import sampling
from ..errors import InputError
from ..io import (add_pricing_arguments, atomic_write, check_output_file, number, print_table,
    read_json_lines, refuse_overwrite)
from . import serve as serve_mod

MIN_CONFIGS = 4


def gpus_of(rec: dict) -> int:
    """GPUs of a deployment record: tp x pp x attention-DP x DP of one pool, or the sum over the workers of a
    disaggregated record's ``prefill`` and ``decode`` pools."""
    def pool(p, workers=1):
        n = workers
        for k in ("tp_size", "pp_size", "attention_dp_size", "tp", "pp", "attention_dp", "dp"):
            n *= int(p.get(k) or 1)
        return n
    if rec.get("mode") == "disagg":
        return sum(pool(rec[k], int(rec[k].get("num_workers") or 1)) for k in ("prefill", "decode"))
    return pool(rec)


def closed_loop_tokens_per_s_per_gpu(ttft_ms: float, tpot_ms: float, concurrency: int, osl: int, gpus: int) -> float:
    """Output tokens/s per GPU of a closed loop: ``concurrency`` clients each finishing one request of ``osl``
    tokens per TTFT + (osl − 1) x TPOT."""
    return concurrency * osl / ((ttft_ms + (osl - 1) * tpot_ms) / 1e3) / gpus


def as_served(rec: dict, client_connection_limit: int | None = None) -> dict:
    """The record without its ``measured`` block, as the server sees it: a benchmark client that holds at
    most ``client_connection_limit`` connections (aiohttp's default pool is 100) keeps at most that many
    requests at the server, the rest waiting on its side, so the server runs a closed loop of
    min(C, limit) clients — same TPOT and throughput; only the client's TTFT adds the wait."""
    out = {k: v for k, v in rec.items() if k != "measured"}
    c = (rec.get("workload") or {}).get("concurrency")
    if client_connection_limit and isinstance(c, int) and c > client_connection_limit:
        out["workload"] = dict(rec["workload"], concurrency=client_connection_limit)
    return out


def group_key(rec: dict, by_engine: bool = False) -> tuple:
    """(model, GPU, weights, MoE weights, ISL, OSL) of a record, and its engine version with ``by_engine``."""
    w = rec["workload"]
    key = (rec["model"], rec["gpu"], rec.get("weights"), rec.get("moe_weights"), w["input_tokens"],
           w["output_tokens"])
    return key + ((rec.get("engine") or {}).get("version"),) if by_engine else key


def read_measured(path) -> list[tuple[dict, str]]:
    """(record, "file:line") of a closed-loop records file, each with a usable ``measured`` block (mean TTFT
    and TPOT, ms) and workload; bad input stops with the field and line."""
    out = read_json_lines(path)
    for rec, where in out:
        for key in ("id", "model", "gpu", "workload", "measured"):
            kinds = dict if key in ("workload", "measured") else str if key in ("model", "gpu") else (str, int)
            if not isinstance(rec.get(key), kinds):
                raise InputError("missing or not the right type", where, key)
        w, m = rec["workload"], rec["measured"]
        if w.get("type") != "closed":
            raise InputError("must be a closed loop ({'type': 'closed', ...})", where, "workload")
        for key in ("input_tokens", "output_tokens"):
            if isinstance(w.get(key), bool) or not isinstance(w.get(key), int) or w[key] < 1:
                raise InputError(f"must be a positive integer, got {w.get(key)!r}", where, f"workload.{key}")
        for key in ("ttft_mean_ms", "tpot_mean_ms"):
            if isinstance(m.get(key), bool) or not isinstance(m.get(key), (int, float)) or not m[key] > 0:
                raise InputError(f"must be a positive number, got {m.get(key)!r}", where, f"measured.{key}")
    return out


@dataclass
class Regret:
    """``groups``: one dict per group of at least `MIN_CONFIGS` priced rows (key, rows, SLO, pick, best,
    regret); ``refused``: {id: reason} of rows the model refuses; ``small``: rows of groups too small;
    ``duplicates``: rows repeating another row's layout, concurrency and measurements, left out."""

    groups: list = field(default_factory=list)
    refused: dict = field(default_factory=dict)
    small: int = 0
    unpriced: int = 0
    duplicates: int = 0

    @property
    def mean_regret(self) -> float | None:
        return float(np.mean([g["regret"] for g in self.groups])) if self.groups else None

    @property
    def misses(self) -> int:
        """Groups whose pick misses the objective when measured (or that have no pick)."""
        return sum(g["missed"] for g in self.groups)


def regret(records, predictions, min_configs: int = MIN_CONFIGS, by_engine: bool = False) -> Regret:
    """Decision quality (module doc).  ``records``: closed-loop records with ``measured`` (dicts, or
    (dict, location) pairs as `read_measured` gives); ``predictions``: `serve.serve` outputs (a list in any
    order, or {id: output}); a record without a prediction is counted as ``unpriced``.  ``by_engine``: groups
    also by the engine version (``engine.version``: a decision is made for one engine)."""
    items = [r if isinstance(r, tuple) else (r, f"record {i}") for i, r in enumerate(records)]
    preds = predictions if isinstance(predictions, dict) else {str(p["id"]): p for p in predictions}
    out = Regret()
    groups: dict = {}
    seen = set()
    for rec, where in items:
        p = preds.get(str(rec["id"]))
        if p is None:
            out.unpriced += 1
            continue
        if "refused" in p:
            out.refused[str(rec["id"])] = p["refused"]
            continue
        w, m = rec["workload"], rec["measured"]
        c = w.get("concurrency")
        if c is None and rec.get("mode") == "disagg":  # the clients `serve` simulated for it
            try:
                c = serve_mod.disaggregated_clients(rec, where)[0]
            except serve_mod.Refusal as e:
                raise InputError(str(e), where, "workload") from None
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise InputError(f"must be a positive integer, got {c!r}", where, "workload.concurrency")
        pred_tpot = p["predicted"]["tpot_mean_ms"]
        pred_tput = p["throughput"]["output_tokens_per_s_per_gpu"]
        if pred_tpot is None or pred_tput is None:
            out.unpriced += 1
            continue
        key = group_key(rec, by_engine)
        same = (key, gpus_of(rec), rec.get("tp", 1), rec.get("moe_ep") or 1, c,
                float(m["ttft_mean_ms"]), float(m["tpot_mean_ms"]))
        if same in seen:  # the same measurement listed twice (under two ids): one configuration
            out.duplicates += 1
            continue
        seen.add(same)
        groups.setdefault(key, []).append({
            "id": str(rec["id"]), "tp": rec.get("tp", 1), "moe_ep": rec.get("moe_ep") or 1, "concurrency": c,
            "gpus": gpus_of(rec), "measured_tpot_ms": float(m["tpot_mean_ms"]),
            "measured_ttft_ms": float(m["ttft_mean_ms"]),
            "measured_tok_s_gpu": closed_loop_tokens_per_s_per_gpu(m["ttft_mean_ms"], m["tpot_mean_ms"], c,
                                                                   w["output_tokens"], gpus_of(rec)),
            "predicted_tpot_ms": float(pred_tpot), "predicted_ttft_ms": float(p["predicted"]["ttft_mean_ms"]),
            "predicted_tok_s_gpu": float(pred_tput)})
    for key, rows in groups.items():
        if len(rows) < min_configs:
            out.small += len(rows)
            continue
        slo = float(np.median([r["measured_tpot_ms"] for r in rows]))
        within = [r for r in rows if r["measured_tpot_ms"] <= slo]
        best = max(within, key=lambda r: r["measured_tok_s_gpu"])
        chosen = [r for r in rows if r["predicted_tpot_ms"] <= slo]
        pick = max(chosen, key=lambda r: r["predicted_tok_s_gpu"]) if chosen else None
        missed = pick is None or pick["measured_tpot_ms"] > slo
        reg = 1.0 if missed else 1.0 - pick["measured_tok_s_gpu"] / best["measured_tok_s_gpu"]
        out.groups.append({"model": key[0], "gpu": key[1], "weights": key[2], "moe_weights": key[3],
                           "isl": key[4], "osl": key[5], "engine": str(key[6]) if by_engine else None,
                           "rows": len(rows), "slo_tpot_ms": slo,
                           "within_measured": len(within), "within_predicted": len(chosen), "pick": pick,
                           "best": best, "regret": reg, "missed": missed,
                           "rows_detail": sorted(rows, key=lambda r: (r["tp"], r["moe_ep"], r["concurrency"]))})
    out.groups.sort(key=lambda g: (g["model"], str(g["weights"]), g["isl"], g["osl"]))
    return out


def _short(r: dict | None) -> str:
    if r is None:
        return "none"
    return f"TP{r['tp']}" + (f" EP{r['moe_ep']}" if r["moe_ep"] > 1 else "") + f" c{r['concurrency']}"


def table(res: Regret) -> list[dict]:
    """One row per group, for printing."""
    rows = []
    for g in res.groups:
        p, b = g["pick"], g["best"]
        rows.append({"model": g["model"], "weights": g["weights"], "isl/osl": f"{g['isl']}/{g['osl']}",
                     **({"engine": g["engine"]} if g["engine"] is not None else {}),
                     "rows": g["rows"], "slo_tpot_ms": g["slo_tpot_ms"], "pick": _short(p),
                     "pick_tpot_ms": p["measured_tpot_ms"] if p else None,
                     "pick_pred_tpot_ms": p["predicted_tpot_ms"] if p else None,
                     "pick_tok_s_gpu": p["measured_tok_s_gpu"] if p else None, "best": _short(b),
                     "best_tok_s_gpu": b["measured_tok_s_gpu"], "regret_pct": 100 * g["regret"],
                     "miss": "MISS" if g["missed"] else ""})
    return rows


def summary(res: Regret) -> dict:
    """The machine-readable result (``--json``)."""
    return {"groups": len(res.groups), "mean_regret": res.mean_regret, "misses": res.misses,
            "refused_rows": len(res.refused), "rows_in_small_groups": res.small, "unpriced_rows": res.unpriced,
            "duplicate_rows": res.duplicates,
            "table": table(res)}


# ---------------------------------------------------------------- the command

def add_regret_arguments(sp) -> None:
    sp.add_argument("records", help="closed-loop serving records with measured mean TTFT/TPOT (JSON Lines)")
    add_pricing_arguments(sp, "none | default | PATH (as for serve)")
    sp.add_argument("--predictions", default=None,
                    help="reuse these predictions (the --out file of `costmodel serve` on the same records) "
                         "instead of predicting")
    sp.add_argument("--save-predictions", default=None, help="write the predictions here (JSON Lines)")
    sp.add_argument("--min-configs", type=number(int, 2), default=MIN_CONFIGS,
                    help=f"smallest group scored (default {MIN_CONFIGS})")
    serve_mod.add_closed_loop_limits_argument(sp)
    sampling.add_argument(sp)
    sp.add_argument("--client-connection-limit", type=number(int, 1), default=None,
                    help="requests the benchmark client keeps in flight at most (e.g. 100, aiohttp's default "
                         "connection pool); more clients than that are priced as that many (docs/search.md)")
    sp.add_argument("--by-engine", action="store_true",
                    help="group also by engine version (rows measured on another engine are another decision)")
    sp.add_argument("--exclude-gpu", action="append", default=[],
                    help="drop records on this GPU before reading them (repeatable)")
    sp.add_argument("--json", action="store_true", help="print one JSON object")


def read_predictions(path) -> list[dict]:
    """`serve` output lines (``--out``), each with ``id`` and ``predicted``/``throughput`` or ``refused``."""
    out = []
    for o, where in read_json_lines(path):
        if "id" not in o:
            raise InputError("missing required field", where, "id")
        if "refused" not in o and not (isinstance(o.get("predicted"), dict) and isinstance(o.get("throughput"), dict)):
            raise InputError("needs 'predicted' and 'throughput' (or 'refused')", where, "predicted")
        out.append(o)
    return out


def run_regret(args) -> int:
    for option, given in (("closed-loop-limits", args.closed_loop_limits != serve_mod.CLOSED_LOOP_LIMITS[0]),
                          ("sampling", bool(args.sampling))):
        if args.predictions and given:
            raise InputError("applies when regret predicts the records itself, not to --predictions", field=option)
    if args.save_predictions:
        check_output_file(args.save_predictions, "save-predictions")
        refuse_overwrite(args.save_predictions, [args.records], "save-predictions")
    skip = set()
    for g in args.exclude_gpu:
        skip.add(serve_mod.get_gpu(g).name)
    items = [(r, w) for r, w in read_measured(args.records) if not skip or _gpu_name(r) not in skip]
    t0 = time.perf_counter()
    if args.predictions:
        preds, how = read_predictions(args.predictions), f"predictions from {args.predictions}"
    else:
        stripped = [(as_served(r, args.client_connection_limit), w) for r, w in items]
        preds = serve_mod.serve(stripped, args.model_configs, args.bench_data, args.calibration,
                                args.allow_other_gpu,
                                workload_options={"closed_loop_limits": args.closed_loop_limits,
                                                  "sampling": args.sampling})
        how = "calibration: " + "; ".join(f"{g}: {d}" for g, d in serve_mod.serve.calibration_used.items())
    if args.client_connection_limit:
        how += f"; at most {args.client_connection_limit} requests in flight per client"
    took = time.perf_counter() - t0
    if args.save_predictions:
        atomic_write(args.save_predictions, lambda fh: fh.writelines(json.dumps(o) + "\n" for o in preds))
    res = regret(items, preds, args.min_configs, args.by_engine)
    if args.json:
        print(json.dumps({**summary(res), "seconds": round(took, 1), "predictions": how}, indent=1))
        return 0
    print(f"costmodel regret: {len(items)} records, {len(res.refused)} refused, {res.duplicates} duplicates, "
          f"{res.small} in groups of fewer than {args.min_configs}, {len(res.groups)} groups ({took:.1f} s; {how})")
    print_table(table(res))
    if res.groups:
        print(f"mean regret {100 * res.mean_regret:.1f} % over {len(res.groups)} groups, {res.misses} SLO misses")
    reasons: dict = {}
    for i, why in res.refused.items():
        reasons.setdefault(why, []).append(i)
    for why, ids in reasons.items():
        print(f"  refused {len(ids)} ({ids[0]}{', ...' if len(ids) > 1 else ''}): {why}", file=sys.stderr)
    return 0


def _gpu_name(rec: dict) -> str | None:
    try:
        return serve_mod.get_gpu(str(rec.get("gpu", ""))).name
    except InputError:
        return None
