"""Deployment search — ``costmodel search``: which parallel layout, precision and concurrency of a model on a
budget of GPUs meets a TTFT/TPOT service-level objective at the most output tokens/s per GPU.

The space is tensor parallelism (a divisor of the GPUs per node), for a mixture-of-experts model expert
parallelism inside the TP group (``moe_ep`` 1 or ``tp``: vLLM's ``--enable-expert-parallel``) and attention
data parallelism with the experts over all its GPUs (`layouts`), the weight precisions asked for, and the
concurrency per replica; the GPUs left over by one replica hold more replicas (``dp = gpus // (tp x
attention_dp)``), each an independent engine behind a round-robin router that sends it 1/dp of the
clients; disaggregated units of prefill and decode workers are built from the feasible layouts and the best
few simulated (`_disagg_candidates`).  Every candidate is first checked for what it needs (GPUs, divisibility of heads and experts, FP8
tensor cores, weights and the KV cache of its concurrency in memory) and every rejection is counted by
reason; the rest are scored with `serve.serve` on the closed-loop workload, one replica per record, so the
numbers are those ``costmodel serve`` gives for the same record.  What is and is not searched:
docs/search.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from .. import ops, sampling
from ..compiled import CompileTimer, first_alone, parallel_map
from ..errors import InputError
from ..hardware import get_gpu
from ..io import atomic_write, check_output_file, number, print_table, write_frame
from ..memory import max_sequences
from ..model import load_arch, load_model
from . import plotting
from . import scheduler as sch
from . import serve as serve_mod
from . import steady
from .records import KV_CACHE_DTYPES

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# the space a screened search covers by default (`screen`): every client count per replica to 64, then steps of
# 2, 4 and 8 clients to 128, 256 and 512 (160 values: the steady state is smooth in C; --concurrency gives any
# other grid), vLLM's token budgets and running limits around its defaults, and both KV-cache precisions where
# the GPU has fp8 KV rows
SCREEN_CONCURRENCY = tuple(range(1, 65)) + tuple(range(66, 129, 2)) + tuple(range(132, 257, 4)) + \
    tuple(range(264, 513, 8))
SCREEN_BATCHED_TOKENS = (2048, 4096, 8192, 16384)
SCREEN_SEQS = (64, 128, 256, 512, 1024)
SCREEN_KV_DTYPES = ("auto", "fp8")
SIMULATE_TOP = 16  # screened configurations simulated: this many best, and up to this many of the front
SCREEN_MARGIN = 0.1  # a screened configuration is simulated when within the SLOs x (1 + this)
GROUP_ONLY = ("kv_bytes_per_token", "kv_tokens_per_rank")  # a group's fields its scored rows do not carry
DISAGG_TOP = 4  # disaggregated deployments simulated (`_disagg_candidates`)
# what the simulation runs: the steady state of a deployment's own traffic (no benchmark's first-round burst,
# neither the first round's ramp nor the last round's drain in the statistics), two rounds measured
SIM_WORKLOAD = {"rounds": 4, "warmup_rounds": 1, "cooldown_rounds": 1, "benchmark_rounds": 0}
DISAGG_CLIENTS = (1, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256,
                  320, 384, 448, 512)  # per decode rank
DISAGG_MAX_RHO = 0.98  # prefill utilisation above which a unit's clients would mostly queue for prefill
DEFAULT_ENGINE_VERSION = "0.15.1"  # the newest engine the packaged calibration has parameters for
GPU_MEMORY_UTILIZATION = 0.9
GIB = 2.0**30

# rejection reasons (the keys of SearchResult.rejected_counts)
TOO_MANY_GPUS = "needs more GPUs than --gpus"
DIVISIBILITY = "divisibility (heads, KV heads, experts)"
PRECISION = "precision not available"
WEIGHTS_DO_NOT_FIT = "memory: weights and activations do not fit"
KV_DOES_NOT_FIT = "memory: KV cache cannot hold the concurrency's tokens"
REFUSED = "refused by the serving simulation"

PERCENTILES = serve_mod.LATENCY_PERCENTILES  # the percentiles `serve` predicts for TTFT, TPOT and E2E
OBJECTIVES = ("tokens_per_gpu", "min_gpus_for_rate")


@dataclass
class SearchResult:
    """Every candidate of a search: ``rows`` those scored (dicts, `ROW_FIELDS` and more), ``rejected`` those
    refused before scoring ({"tp", "moe_ep", "weights", "concurrency", "reason", "detail"})."""

    query: dict
    rows: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    seconds: float = 0.0  # wall time less compile_seconds
    compile_seconds: float = 0.0  # JAX lowering and XLA compilation (`compiled.CompileTimer`)
    screened: pd.DataFrame | None = None  # with `screen`: every configuration's steady-state estimate
    screen_seconds: float = 0.0  # of `seconds`, the steady-state estimates

    @property
    def scored(self) -> int:
        """Configurations given a prediction: screened (the simulated ones are among them), else simulated."""
        return len(self.screened) if self.screened is not None else len(self.rows)

    @property
    def rejected_counts(self) -> dict:
        return dict(Counter(r["reason"] for r in self.rejected).most_common())

    @property
    def merit(self) -> str:
        """The row field ranked on and plotted against tokens/s per user: output tokens per US$ when every GPU
        type searched has a price, else output tokens/s per GPU."""
        return "output_tokens_per_usd" if self.query.get("usd_per_gpu_hour") else "output_tokens_per_s_per_gpu"

    @property
    def feasible(self) -> list:
        """Scored rows that meet the SLO (and the rate, when one is asked), best first: most `merit`, or with
        objective min_gpus_for_rate fewest GPUs used, then most `merit`."""
        fewest = self.query.get("objective") == "min_gpus_for_rate"
        return sorted((r for r in self.rows if r["meets_slo"]),
                      key=lambda r: (r["gpus_used"] if fewest else 0, -r[self.merit],
                                     -r["output_tokens_per_s_per_user"]))

    @property
    def pareto(self) -> list:
        """The non-dominated feasible rows in `merit` against tokens/s per user, best first."""
        return [r for r in self.feasible if r["pareto"]]

    def mark_pareto(self) -> None:
        ok = [r for r in self.rows if r["meets_slo"]]
        mask = pareto_mask([r[self.merit] for r in ok], [r["output_tokens_per_s_per_user"] for r in ok])
        for r in self.rows:
            r["pareto"] = False
        for r, on in zip(ok, mask):
            r["pareto"] = on


def pareto_mask(xs, ys) -> list[bool]:
    """For points (x, y), both to maximize: whether no other point is at least as good in both and better in
    one."""
    pts = list(zip(xs, ys))
    return [not any(a >= x and b >= y and (a > x or b > y) for a, b in pts) for x, y in pts]


def tp_candidates(gpus_per_node: int) -> list[int]:
    """Tensor-parallel degrees of one replica: the divisors of the GPUs of one node (its NVLink domain)."""
    return [d for d in range(1, gpus_per_node + 1) if gpus_per_node % d == 0]


def _row_layout_name(row: dict, dp: int) -> str:
    """A scored row's layout, a disaggregated unit's as its two pools (times dp units)."""
    if row.get("mode") != "disagg":
        return _layout_name(row["tp"], row["moe_ep"], dp, row["attention_dp"], row["pp"])
    pre = _pool_name(row["prefill_tp"], row["prefill_moe_ep"], row["prefill_attention_dp"])
    dec = _pool_name(row["tp"], row["moe_ep"], row["attention_dp"])
    return (f"disagg {row['prefill_workers']}x prefill {pre} + {row['decode_workers']}x decode {dec}"
            + (f" (x{dp})" if dp > 1 else ""))


def _pool_name(tp: int, moe_ep: int, attention_dp: int) -> str:
    """One worker's layout: "TP2", "TP1 attDP4 EP4"."""
    return _layout_name(tp, moe_ep, 1, attention_dp).removesuffix(" x DP1")


def _layout_name(tp: int, moe_ep: int, dp: int, attention_dp: int = 1, pp: int = 1) -> str:
    return (f"TP{tp}" + (f" PP{pp}" if pp > 1 else "") + (f" attDP{attention_dp}" if attention_dp > 1 else "")
            + (f" EP{moe_ep}" if moe_ep > 1 else "") + f" x DP{dp}")


def layouts(model, gpus_per_node: int, pps=None) -> list[tuple[int, int, int, int]]:
    """(tp, pp, attention_dp, moe_ep) of one replica inside one node: every TP degree (`tp_candidates`) and
    pipeline stages of it that the node holds (``tp x pp`` GPUs, stages in one NVLink domain: the hand-offs
    are priced at NVLink bandwidth); for a mixture-of-experts model also its experts over the TP group
    (``moe_ep = tp``: vLLM's --enable-expert-parallel) and attention data parallelism over attention_dp ranks
    of tp GPUs with the experts over all of them (``moe_ep = tp x attention_dp``, one stage).  ``pps``: the
    pipeline degrees to keep (None: all)."""
    out = []
    for tp in tp_candidates(gpus_per_node):
        for pp in tp_candidates(gpus_per_node // tp):
            if pps is not None and pp not in pps:
                continue
            out += [(tp, pp, 1, ep) for ep in (sorted({1, tp}) if model.experts else [1])]
        if model.experts:
            out += [(tp, 1, att, tp * att) for att in tp_candidates(gpus_per_node // tp) if att > 1]
    return out


def _precision_problem(model, weights: str, gpu) -> str | None:
    if weights == "fp8" and gpu.fp8_flops <= 0:
        return f"{gpu.name} has no FP8 tensor cores"
    if model.dtype == "fp8" and weights != "fp8":
        return f"the {model.name} checkpoint stores fp8 weights; vLLM does not serve them as {weights}"
    return None


def _compact(values: list) -> list | str:
    """Sorted integers as given, or, when they are runs of more than 3 equally spaced values, the runs as
    "FIRST-LAST" (step 1) or "FIRST-LAST/STEP", comma-separated ("1-64,66-128/2")."""
    runs, i = [], 0
    while i < len(values):
        j = i + 1
        if j < len(values):
            step = values[j] - values[i]
            while j + 1 < len(values) and values[j + 1] - values[j] == step:
                j += 1
        if j - i + 1 > 3:
            runs.append(f"{values[i]}-{values[j]}" + (f"/{step}" if step != 1 else ""))
            i = j + 1
        else:
            runs.append(None)
            i += 1
    return values if None in runs else ",".join(runs)


def _options(value, default, name) -> list:
    """A search axis from an int, a list of them, or None (``default``)."""
    vals = default if value is None else [value] if isinstance(value, int) and not isinstance(value, bool) else value
    vals = sorted(set(vals))
    if not vals or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals):
        raise InputError(f"must be positive integers, got {value!r}", field=name)
    return vals


def search(model: str, gpu: str, gpus: int, *, isl: int, osl: int, ttft_ms: float | None = None,
           tpot_ms: float | None = None, concurrency=None, rate: float | None = None,
           weights=None, gpus_per_node: int = 8, gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION,
           max_num_batched_tokens=None, max_num_seqs=None, kv_cache_dtypes=None,
           engine_version: str = DEFAULT_ENGINE_VERSION, model_configs=None, bench_data=None,
           calibration: str = "default", workload_options: dict | None = None, e2e_ms: float | None = None,
           percentile: int | None = None, objective: str = "tokens_per_gpu",
           usd_per_gpu_hour: float | None = None, screen: bool = False,
           simulate_top: int = SIMULATE_TOP, pp=None, part: tuple[int, int] = (0, 1),
           disagg: bool = True) -> SearchResult:
    """Search the deployments of ``model`` on ``gpus`` GPUs of type ``gpu`` for a closed loop of ``isl``
    input and ``osl`` output tokens per request (module doc).  ``concurrency``: clients per replica to try
    (default `DEFAULT_CONCURRENCY`, with ``screen`` `SCREEN_CONCURRENCY`); ``rate``: requests/s the whole
    deployment must sustain (a row meets it when dp x the replica's predicted request rate reaches it);
    ``weights``: precisions to try (default: the checkpoint's); ``max_num_batched_tokens``,
    ``max_num_seqs``: an engine limit or a list to try (default vLLM's for the GPU, with ``screen``
    `SCREEN_BATCHED_TOKENS` and `SCREEN_SEQS`); ``kv_cache_dtypes``: KV-cache precisions to try (default
    auto, with ``screen`` `SCREEN_KV_DTYPES`); ``pp``: pipeline degrees to try, an int or a list (default
    every one whose stages fit in a node).  SLOs on TTFT, TPOT and E2E; None leaves that one open.
    ``percentile`` (50, 90 or 99) checks TTFT, TPOT and E2E against that percentile instead of the mean.
    ``objective``: "tokens_per_gpu" (every replica the budget holds, dp = gpus // tp) or "min_gpus_for_rate"
    (needs ``rate``: dp = the replicas the rate needs, at most gpus // tp; best = fewest GPUs).
    ``usd_per_gpu_hour``: the GPU's price; rows then carry ``usd_per_hour`` and ``output_tokens_per_usd``
    and rank by the latter.

    ``screen``: every configuration first gets the closed-loop steady-state estimate (`steady`, thousands
    per second; `SearchResult.screened`); those within the SLOs x (1 + `SCREEN_MARGIN`) on its means — the
    ``simulate_top`` best and up to ``simulate_top`` of their Pareto front — are then simulated, and the
    simulated ones are the result's rows.  Without it every configuration is simulated.

    ``disagg``: also score disaggregated prefill/decode pools built from the feasible layouts
    (`_disagg_candidates`; `DISAGG_TOP` of them are simulated; in a split search by part 0, from every part's
    layouts).

    ``part`` (index, count): this process's share of a search split over ``count`` processes — the layouts
    whose position in `layouts` is ``index`` modulo ``count`` (`merge_parts` joins the parts)."""
    t0 = time.perf_counter()
    g = get_gpu(gpu)
    for name, v in (("gpus", gpus), ("gpus_per_node", gpus_per_node), ("isl", isl), ("osl", osl),
                    ("simulate_top", simulate_top)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"must be a positive integer, got {v!r}", field=name)
    if percentile is not None and percentile not in PERCENTILES:
        raise InputError(f"must be one of {', '.join(map(str, PERCENTILES))} (the percentiles the serving "
                         f"simulation predicts), got {percentile!r}", field="percentile")
    if objective not in OBJECTIVES:
        raise InputError(f"must be one of {', '.join(OBJECTIVES)}, got {objective!r}", field="objective")
    if objective == "min_gpus_for_rate" and rate is None:
        raise InputError("objective min_gpus_for_rate needs the requests/s to sustain", field="rate")
    if usd_per_gpu_hour is not None and not usd_per_gpu_hour > 0:
        raise InputError(f"must be a positive US$ per GPU-hour, got {usd_per_gpu_hour!r}", field="price")
    d_tokens, d_seqs = serve_mod.default_batch_limits(g)
    concurrency = _options(concurrency, SCREEN_CONCURRENCY if screen else DEFAULT_CONCURRENCY, "concurrency")
    budgets = _options(max_num_batched_tokens, SCREEN_BATCHED_TOKENS if screen else [d_tokens],
                       "max_num_batched_tokens")
    seqs = _options(max_num_seqs, SCREEN_SEQS if screen else [d_seqs], "max_num_seqs")
    pps = None if pp is None else _options(pp, None, "pp")
    p_index, p_count = part
    if isinstance(p_count, bool) or not isinstance(p_count, int) or p_count < 1:
        raise InputError(f"must be a positive integer, got {p_count!r}", field="process_count")
    if isinstance(p_index, bool) or not isinstance(p_index, int) or not 0 <= p_index < p_count:
        raise InputError(f"must be in 0..{p_count - 1}, got {p_index!r}", field="process_index")
    kv_dtypes = list(dict.fromkeys(kv_cache_dtypes or (SCREEN_KV_DTYPES if screen else ("auto",))))
    for k in kv_dtypes:
        if k not in KV_CACHE_DTYPES:
            raise InputError(f"must be one of {', '.join(KV_CACHE_DTYPES)}, got {k!r}", field="kv_cache_dtypes")
    base = load_model(model, model_configs)
    arch = load_arch(model, model_configs)
    weights = list(dict.fromkeys(weights or [base.dtype]))
    for w in weights:
        if w not in serve_mod.WEIGHT_DTYPES:
            raise InputError(f"must be one of {', '.join(serve_mod.WEIGHT_DTYPES)}, got {w!r}", field="weights")
    engine = {"name": "vllm", "version": engine_version, "gpu_memory_utilization": gpu_memory_utilization}
    samp = (workload_options or {}).get("sampling")
    query = {"model": model, "gpu": g.name, "gpus": gpus, "gpus_per_node": gpus_per_node, "isl": isl,
             "osl": osl, "ttft_ms": ttft_ms, "tpot_ms": tpot_ms, "e2e_ms": e2e_ms, "statistic": statistic(percentile),
             "rate": rate, "objective": objective, "concurrency": _compact(concurrency),
             "usd_per_gpu_hour": {g.name: usd_per_gpu_hour} if usd_per_gpu_hour else None,
             "weights": weights, "checkpoint_weights": base.dtype, "kv_cache_dtypes": kv_dtypes,
             "pp": pps or "every degree whose stages fit in a node",
             "screen": screen, "sampling": samp,
             "simulation": {k: v for k, v in sim_workload(workload_options).items() if k != "sampling"},
             "engine": {**engine, "max_num_batched_tokens": budgets if len(budgets) > 1 else budgets[0],
                        "max_num_seqs": seqs if len(seqs) > 1 else seqs[0]}}
    if p_count > 1:
        query["part"] = [p_index, p_count]
    result = SearchResult(query)
    sim = serve_mod.Simulator(bench_data, calibration)

    mine = [True]  # whether the layout at hand is this part's (every part checks every layout for disaggregation)

    def reject(layout, w, reason, detail, cs=concurrency, kvd="auto", tokens=None, seq=None):
        if not mine[0]:
            return
        tp, pp, att, ep = layout
        result.rejected += [{"tp": tp, "pp": pp, "attention_dp": att, "moe_ep": ep, "weights": w, "kv_cache_dtype": kvd,
                             "max_num_batched_tokens": tokens, "max_num_seqs": seq, "concurrency": c,
                             "reason": reason, "detail": detail} for c in cs]

    groups = []  # (record without workload, row without results, concurrencies that fit) of this part's layouts
    every_group = []  # ... of every layout: the pools of disaggregated units
    per_engine = len(budgets) * len(seqs)
    for w in weights:
        m = base.with_dtype(serve_mod.WEIGHT_DTYPES[w])
        for li, layout in enumerate(layouts(base, gpus_per_node, pps)):
            mine[0] = li % p_count == p_index
            if not (mine[0] or disagg and p_index == 0):
                continue
            tp, pp, att, ep = layout
            every = concurrency * per_engine * len(kv_dtypes)
            if tp * pp * att > gpus:
                reject(layout, w, TOO_MANY_GPUS, f"tp={tp} x attention_dp={att} > gpus={gpus}"
                       if att > 1 else f"tp={tp} x pp={pp} > gpus={gpus}" if pp > 1 else f"tp={tp} > gpus={gpus}",
                       every)
                continue
            problem = _precision_problem(base, w, g)
            if problem:
                reject(layout, w, PRECISION, problem, every)
                continue
            try:
                ops.dims(m, tp, ep, att, pp)
            except InputError as e:
                reject(layout, w, DIVISIBILITY, str(e), every)
                continue
            for kvd in kv_dtypes:
                if kvd == "fp8" and sim.tables(g).decode_fp8 is None:
                    reject(layout, w, PRECISION, f"no fp8 KV-cache attention rows for {g.name}",
                           concurrency * per_engine, kvd)
                    continue
                for tokens in budgets:
                    for seq in seqs:
                        eng = {**engine, "max_num_batched_tokens": tokens, "max_num_seqs": seq, "kv_cache_dtype": kvd}
                        why = dict(kvd=kvd, tokens=tokens, seq=seq)
                        try:
                            cap = serve_mod.kv_capacity(arch, g, tp, ep, eng, m.dtype, m.expert_dtype or None, att,
                                                        pp)
                        except InputError as e:
                            reject(layout, w, REFUSED, f"KV-cache capacity: {e}", **why)
                            continue
                        if not cap.fits:
                            reject(layout, w, WEIGHTS_DO_NOT_FIT,
                                   f"weights {cap.weight_bytes / GIB:.1f} GiB + activations "
                                   f"{cap.activation_bytes / GIB:.1f} GiB + non-torch {cap.non_torch_bytes / GIB:.1f}"
                                   f" GiB per GPU leave no KV cache in {gpu_memory_utilization:g} x "
                                   f"{cap.memory_bytes / GIB:.1f} GiB", **why)
                            continue
                        most = max_sequences(cap, isl + osl)
                        # a rank's pp lanes share its cache
                        fit = [c for c in concurrency if serve_mod.rank_clients(c, att) <= most]
                        if len(fit) < len(concurrency):
                            reject(layout, w, KV_DOES_NOT_FIT, f"{cap.tokens} KV tokens per rank hold at most "
                                   f"{most} requests of {isl + osl} tokens", [c for c in concurrency if c not in fit],
                                   **why)
                        if not fit:
                            continue
                        rec = {"model": model, "gpu": gpu, "tp": tp, "pp": pp, "attention_dp": att, "moe_ep": ep,
                               "weights": w, "engine": eng, **({"sampling": samp} if samp else {})}
                        row = {"gpu": g.name, "tp": tp, "pp": pp, "attention_dp": att, "moe_ep": ep, "weights": w,
                               "kv_cache_dtype": kvd, "max_num_seqs": seq, "max_num_batched_tokens": tokens,
                               "gpu_memory_utilization": gpu_memory_utilization,
                               "weights_bytes_per_gpu": cap.weight_bytes, "kv_pool_bytes_per_gpu": cap.kv_bytes,
                               "kv_bytes_per_token": cap.kv_bytes_per_token, "kv_tokens_per_rank": cap.tokens}
                        every_group.append((rec, row, fit))
                        if mine[0]:
                            groups.append((rec, row, fit))

    def candidate(rec, row, c):
        per_rank = serve_mod.rank_clients(c, row["attention_dp"])
        kvd = "" if row["kv_cache_dtype"] == "auto" else f"-kv{row['kv_cache_dtype']}"
        rid = (f"{row['weights']}-tp{row['tp']}-pp{row['pp']}-att{row['attention_dp']}-ep{row['moe_ep']}{kvd}-"
               f"b{row['max_num_batched_tokens']}-s{row['max_num_seqs']}-c{c}")
        r = {**rec, "id": rid, "workload": {"type": "closed", "concurrency": c, "input_tokens": isl,
                                            "output_tokens": osl}}
        out = {k: v for k, v in row.items() if k not in GROUP_ONLY}
        return r, {**out, "concurrency_per_replica": c,
                   "kv_needed_bytes_per_gpu": per_rank * (isl + osl) * row["kv_bytes_per_token"]}

    with CompileTimer() as compiling:
        if screen:
            t_screen = time.perf_counter()
            with CompileTimer() as screen_compiling:
                result.screened = _screen(sim, groups, gpus, isl, osl, objective, rate, usd_per_gpu_hour,
                                          model_configs)
            result.screened["meets_slo"] = _meets(result.screened, "mean", ttft_ms, tpot_ms, e2e_ms, rate)
            chosen = _to_simulate(result.screened, ttft_ms, tpot_ms, e2e_ms, rate, simulate_top, result.merit)
            candidates = [candidate(groups[int(gi)][0], groups[int(gi)][1], int(c)) for gi, c in chosen]
            result.screen_seconds = time.perf_counter() - t_screen - screen_compiling.seconds
        else:
            candidates = [candidate(rec, row, c) for rec, row, fit in groups for c in fit]
        if disagg and p_index == 0 and every_group:
            candidates += _disagg_candidates(sim, every_group, gpus, isl, osl, ttft_ms, tpot_ms, DISAGG_TOP, model_configs,
                                             arch)
        outs = serve_mod.serve([r for r, _ in candidates], model_configs,
                               workload_options=sim_workload(workload_options), simulator=sim) if candidates else []
    result.compile_seconds = compiling.seconds
    for (rec, row), out in zip(candidates, outs):
        if "refused" in out:
            reject((row["tp"], row["pp"], row["attention_dp"], row["moe_ep"]), row["weights"], REFUSED, out["refused"],
                   [rec["workload"]["concurrency"]], row["kv_cache_dtype"], row["max_num_batched_tokens"],
                   row["max_num_seqs"])
            continue
        p, t = out["predicted"], out["throughput"]
        replica = _replica_gpus(row)
        budget = gpus // replica
        dp = budget if objective == "tokens_per_gpu" else \
            min(budget, max(1, math.ceil(rate / t["requests_per_s"] - 1e-9)))
        row.setdefault("mode", "agg")
        row.update({"layout": _row_layout_name(row, dp), "dp": dp,
                    "gpus_used": replica * dp,
                    "concurrency_total": row["concurrency_per_replica"] * dp})
        row.update({k: p[k] for k in serve_mod.METRICS})
        row.update({
            "output_tokens_per_s_per_gpu": t["output_tokens_per_s_per_gpu"],
            "output_tokens_per_s_per_user": t["output_tokens_per_s_per_user"],
            "output_tokens_per_s_total": t["output_tokens_per_s"] * dp,
            "requests_per_s_total": t["requests_per_s"] * dp,
            "kv_peak_used_fraction": out["kv_cache"]["peak_used"], "preemptions": out["kv_cache"]["preemptions"],
            "notes": "; ".join(out["notes"])})
        if usd_per_gpu_hour:
            row["usd_per_hour"] = row["gpus_used"] * usd_per_gpu_hour
            row["output_tokens_per_usd"] = row["output_tokens_per_s_total"] * 3600 / row["usd_per_hour"]
        row["meets_slo"] = bool(_meets(row, query["statistic"], ttft_ms, tpot_ms, e2e_ms, rate))
        result.rows.append(row)
    result.mark_pareto()
    result.seconds = time.perf_counter() - t0 - result.compile_seconds
    return result


def sim_workload(workload_options: dict | None = None) -> dict:
    """The workload options `serve` runs the search's configurations with: `SIM_WORKLOAD` under the given ones
    (a `serve` of a reported row's record with these options gives its numbers)."""
    return {**SIM_WORKLOAD, **{k: v for k, v in (workload_options or {}).items() if v is not None}}


def _meets(r, stat: str, ttft_ms, tpot_ms, e2e_ms, rate, margin: float = 0.0):
    """Whether a row (dict) or rows (DataFrame) meet the SLOs on the statistic ``stat`` (TPOT: the mean's
    percentile) and the rate, each SLO loosened by ``margin``."""
    ok = True
    for metric, slo in ((f"ttft_{stat}", ttft_ms), (f"tpot_{stat}", tpot_ms), (f"e2e_{stat}", e2e_ms)):
        if slo is not None:
            ok = ok & (r[f"{metric}_ms"] <= slo * (1 + margin))
    if rate is not None:
        ok = ok & (r["requests_per_s_total"] >= rate)
    return ok


def _replica_gpus(row) -> int:
    """GPUs of one replica of a row's layout: tp x pp x attention_dp, or a disaggregated unit's (both pools)."""
    return row.get("unit_gpus") or row["tp"] * row["pp"] * row["attention_dp"]


def _screen(sim, groups, gpus, isl, osl, objective, rate, usd_per_gpu_hour, model_configs):
    """The steady-state estimate (`steady`) of every (group, concurrency): one DataFrame row each, with the
    group's index (``group``) and the serving metrics' means under `serve`'s names."""
    by_static: dict = {}
    probes: dict = {}
    for gi, (rec, row, fit) in enumerate(groups):
        dep, (static, lk, on, params) = _probe(sim, probes, rec, row, isl, osl, model_configs)
        c = np.asarray(fit, np.int64)
        per_rank = serve_mod.rank_clients(c, row["attention_dp"] * row["pp"])  # as `serve.resolve` splits them
        blocks = serve_mod.lane_kv_blocks(row["kv_tokens_per_rank"] // serve_mod.BLOCK_TOKENS, row["pp"])
        eng = sim.engine(dataclasses.replace(dep, max_batched_tokens=row["max_num_batched_tokens"],
                                             max_seqs=row["max_num_seqs"], kv_blocks=blocks))
        cl = steady.closed_loop(eng, per_rank, isl, osl)
        c = c.astype(np.float64)
        by_static.setdefault((static, id(lk)), (static, sch.StepModel(lk, on, params), []))[2].append((gi, c, cl))
    cols: dict = {}

    def add(**kv):
        for k, v in kv.items():
            cols.setdefault(k, []).append(v)

    def estimate(entry):
        static, sm, members = entry
        cl = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *[m[2] for m in members])
        return first_alone(("steady", static, len(cl.clients)), lambda: jax.tree_util.tree_map(
            lambda a: np.asarray(a, np.float64), steady.compiled(static)(sm, cl)))
    # one call per step model, on as many threads as there are cores
    for (static, sm, members), est in zip(by_static.values(), parallel_map(estimate, list(by_static.values()))):
        at = 0
        for gi, c, _ in members:
            sl = slice(at, at + len(c))
            at += len(c)
            row = groups[gi][1]
            n = len(c)
            share = c / serve_mod.rank_clients(c, row["attention_dp"] * row["pp"])
            rank_gpus = _replica_gpus(row)
            req_s = est.requests_per_s[sl] * share
            budget = gpus // rank_gpus
            dp = np.full(n, budget) if objective == "tokens_per_gpu" else \
                np.minimum(budget, np.maximum(1, np.ceil(rate / req_s - 1e-9))).astype(int)
            add(group=np.full(n, gi), **{k: np.full(n, row[k]) for k in (
                "gpu", "tp", "pp", "attention_dp", "moe_ep", "weights", "kv_cache_dtype", "max_num_batched_tokens",
                "max_num_seqs")}, concurrency_per_replica=c.astype(int), dp=dp, gpus_used=dp * rank_gpus,
                ttft_mean_ms=est.ttft_s[sl] * 1e3, tpot_mean_ms=est.tpot_s[sl] * 1e3, e2e_mean_ms=est.e2e_s[sl] * 1e3,
                output_tokens_per_s_per_gpu=req_s * osl / rank_gpus,
                output_tokens_per_s_per_user=1.0 / est.tpot_s[sl],
                output_tokens_per_s_total=req_s * osl * dp, requests_per_s_total=req_s * dp)
    if not cols:
        return pd.DataFrame()
    f = pd.DataFrame({k: np.concatenate(v) for k, v in cols.items()})
    if usd_per_gpu_hour:
        f["usd_per_hour"] = f["gpus_used"] * usd_per_gpu_hour
        f["output_tokens_per_usd"] = f["output_tokens_per_s_total"] * 3600 / f["usd_per_hour"]
    return f


def _probe(sim, probes: dict, rec: dict, row: dict, isl: int, osl: int, model_configs):
    """(deployment, step model) of a group's record at one client, one per layout, weights and KV-cache
    precision (cached in ``probes``)."""
    key = (row["tp"], row["pp"], row["attention_dp"], row["moe_ep"], row["weights"], row["kv_cache_dtype"])
    if key not in probes:
        probe = {**rec, "id": "probe", "workload": {"type": "closed", "concurrency": 1, "input_tokens": isl,
                                                      "output_tokens": osl}}
        dep = serve_mod.resolve(probe, "search", model_configs, workload_options={"rounds": 2})
        probes[key] = (dep, sim.step_model(dep))
    return probes[key]


def _disagg_candidates(sim, groups, gpus, isl, osl, ttft_ms, tpot_ms, top, model_configs, arch) -> list:
    """Disaggregated deployments to simulate: (record, row) pairs, ``top`` at most.

    Pools are the feasible single-stage layouts (pp 1) of one weight and KV-cache precision, the decode
    pool at its highest running limit, the prefill pool at the smallest token budget that holds a whole
    prompt (else the largest) and its lowest running limit, among the limits that fit.  A prefill worker of
    layout P and a decode worker of layout D make a unit of n_p x P + n_d x D GPUs within the budget, the
    decode ranks running b clients each (the concurrencies that fit D's KV cache).  A closed form ranks them: the decode step of b requests gives TPOT; a cycle is TTFT + (OSL -
    1) TPOT, C = b x n_d x attention_dp(D) clients complete C / cycle requests per second, which the prefill
    workers serve with utilisation rho (prompts one at a time: n_p x attention_dp(P) / prefill); TTFT is
    the prefill plus a wait of rho prefills (a closed loop's few clients queue far less than an open loop's
    M/D/1 wait at the same utilisation), the KV transfer, the decode worker's first step and the client- and
    ingress-side time.  Units whose prefill utilisation exceeds `DISAGG_MAX_RHO` are
    skipped; the best (most output tokens/s per GPU) within the SLOs of each (P, D) pair, then overall, are
    simulated (`serve.run_disaggregated`)."""
    o = sim.options
    fixed_s = (2 * o.ingress_ms + o.client_ms) / 1e3
    probes: dict = {}
    pools = {}
    chosen: dict = {}  # per precision and layout, the group with the highest running limit (decode)
    prefill_limits: dict = {}  # ... (token budget, running limit) of the prefill pool (docstring)
    for rec, row, fit in groups:
        key = (row["weights"], row["kv_cache_dtype"], row["tp"], row["attention_dp"], row["moe_ep"])
        if row["pp"] != 1:
            continue
        if key not in chosen or row["max_num_seqs"] > chosen[key][1]["max_num_seqs"]:
            chosen[key] = (rec, row, fit)
        b, n = row["max_num_batched_tokens"], row["max_num_seqs"]
        rank = (b >= isl, -b if b >= isl else b, -n)  # one whole prompt per step at least, few batched together
        if key not in prefill_limits or rank > prefill_limits[key][0]:
            prefill_limits[key] = (rank, b, n)
    for (w, kvd, *lay), (rec, row, fit) in chosen.items():
        key, lay = (w, kvd), tuple(lay)
        pools.setdefault(key, {})
        dep, sm = _probe(sim, probes, rec, row, isl, osl, model_configs)
        # clients per decode rank: what its KV cache holds, within the running limit (no queue at decode)
        b_list = [b for b in DISAGG_CLIENTS if b <= min(max(fit), row["max_num_seqs"])]
        pre_s = sim.phase_s(dep, *sm, batch=1)[0]
        dec_s = np.array([sim.phase_s(dep, *sm, batch=b)[1] for b in b_list])
        # over NVLink when the unit fits one node, as `serve.resolve_disaggregated` decides it
        xfer = {same: serve_mod.kv_transfer_s(arch, dep.gpu, {"tp": row["tp"], "attention_dp": row["attention_dp"]},
                                              isl, row["kv_cache_dtype"], same) for same in (True, False)}
        pools[key][lay] = (rec, row, pre_s, np.array(b_list), dec_s, xfer)
    found = []
    for key, by_layout in pools.items():
        for lp, (rec_p, row_p, pre_s, *_) in by_layout.items():
            w_p = _replica_gpus(row_p)
            for ld, (rec_d, row_d, _, bs, dec_s, xfers) in by_layout.items():
                w_d = _replica_gpus(row_d)
                best = None
                for n_p in range(1, (gpus - w_d) // w_p + 1):
                    for n_d in range(1, (gpus - n_p * w_p) // w_d + 1):
                        unit = n_p * w_p + n_d * w_d
                        xfer = xfers[unit <= serve_mod.GPUS_PER_NODE]
                        clients = bs * n_d * row_d["attention_dp"]
                        cycle = fixed_s + pre_s + xfer + (osl - 1) * dec_s
                        x = clients / cycle
                        rho = x * pre_s / (n_p * row_p["attention_dp"])
                        ttft = fixed_s + pre_s * (1 + rho) + xfer + dec_s
                        ok = (rho <= DISAGG_MAX_RHO) & (ttft * 1e3 <= (ttft_ms or np.inf)) & \
                            (dec_s * 1e3 <= (tpot_ms or np.inf))
                        tok_gpu = np.where(ok, x * osl / unit, -np.inf)
                        i = int(np.argmax(tok_gpu))
                        if np.isfinite(tok_gpu[i]) and (best is None or tok_gpu[i] > best[0]):
                            best = (tok_gpu[i], n_p, n_d, int(clients[i]), int(bs[i]))
                if best:
                    found.append((best, rec_d, row_p, row_d))
    found.sort(key=lambda f: -f[0][0])
    out = []
    for (tok_gpu, n_p, n_d, clients, b), rec_d, row_p, row_d in found[:top]:
        pool = lambda r, n: {"num_workers": n, "tp_size": r["tp"], "pp_size": 1,  # noqa: E731
                             "attention_dp_size": r["attention_dp"], "moe_ep_size": r["moe_ep"]}
        _, budget, seqs = prefill_limits[(row_p["weights"], row_p["kv_cache_dtype"], row_p["tp"],
                                          row_p["attention_dp"], row_p["moe_ep"])]
        rid = (f"{row_d['weights']}-kv{row_d['kv_cache_dtype']}-disagg-{n_p}x"
               f"{_pool_name(row_p['tp'], row_p['moe_ep'], row_p['attention_dp'])}-{n_d}x"
               f"{_pool_name(row_d['tp'], row_d['moe_ep'], row_d['attention_dp'])}-c{clients}")
        rec = {**{k: v for k, v in rec_d.items() if k not in ("tp", "pp", "attention_dp", "moe_ep")},
               "id": rid.replace(" ", ""), "mode": "disagg", "decode": pool(row_d, n_d),
               "prefill": {**pool(row_p, n_p), "max_num_batched_tokens": budget, "max_num_seqs": seqs},
               "workload": {"type": "closed", "concurrency": clients, "input_tokens": isl, "output_tokens": osl}}
        row = {k: v for k, v in row_d.items() if k not in GROUP_ONLY}
        row.update({"mode": "disagg", "prefill_tp": row_p["tp"], "prefill_attention_dp": row_p["attention_dp"],
                    "prefill_max_num_batched_tokens": budget, "prefill_max_num_seqs": seqs,
                    "prefill_moe_ep": row_p["moe_ep"], "prefill_workers": n_p, "decode_workers": n_d,
                    "unit_gpus": n_p * _replica_gpus(row_p) + n_d * _replica_gpus(row_d),
                    "concurrency_per_replica": clients,
                    "kv_needed_bytes_per_gpu": b * (isl + osl) * row_d["kv_bytes_per_token"]})
        out.append((rec, row))
    return out


def _to_simulate(screened: pd.DataFrame, ttft_ms, tpot_ms, e2e_ms, rate, top: int, merit: str) -> list:
    """(group, concurrency) of the screened configurations to simulate: among those within the SLOs x (1 +
    `SCREEN_MARGIN`), ``top`` of the best by ``merit`` (the best of each layout and weight precision first,
    then the next best overall) and up to ``top`` of their Pareto front (``merit`` against tokens/s per
    user), spread evenly along it."""
    if screened.empty:
        return []
    near = screened[_meets(screened, "mean", ttft_ms, tpot_ms, e2e_ms, rate, SCREEN_MARGIN)]
    if near.empty:  # nothing near the objective: the simulation shows how far the closest ones are
        near = screened.nsmallest(top, "tpot_mean_ms")
    ranked = near.sort_values([merit, "output_tokens_per_s_per_user"], ascending=False)
    # the best of each layout first (the screen's errors are mostly per layout), then the next best overall
    per_layout = ranked.drop_duplicates(["tp", "pp", "attention_dp", "moe_ep", "weights"])
    best = pd.concat([per_layout, ranked]).drop_duplicates(["group", "concurrency_per_replica"]).head(top)
    users = ranked["output_tokens_per_s_per_user"].to_numpy()
    front = ranked[users > np.maximum.accumulate(np.concatenate([[-np.inf], users[:-1]]))]
    if len(front) > top:
        front = front.iloc[np.unique(np.linspace(0, len(front) - 1, top).round().astype(int))]
    chosen = pd.concat([best, front]).drop_duplicates(["group", "concurrency_per_replica"])
    return list(zip(chosen["group"], chosen["concurrency_per_replica"]))


def scored_frame(result: SearchResult) -> pd.DataFrame:
    """Every scored configuration, one row each, ``estimate`` saying by what: "simulation" (the rows), or,
    with screening, "steady state" for those only screened."""
    sim = pd.DataFrame(result.rows).assign(estimate="simulation")
    if result.screened is None:
        return sim
    key = ["gpu", "tp", "pp", "attention_dp", "moe_ep", "weights", "kv_cache_dtype", "max_num_batched_tokens",
           "max_num_seqs", "concurrency_per_replica"]
    steady_rows = result.screened.drop(columns="group").assign(estimate="steady state")
    if not sim.empty:
        done = steady_rows.set_index(key).index.isin(sim.set_index(key).index)
        steady_rows = steady_rows[~done]
    return pd.concat([sim, steady_rows], ignore_index=True)


def statistic(percentile: int | None) -> str:
    """The latency statistic an SLO is checked against: "mean", "p50", "p90" or "p99" (the ``ttft_<it>_ms``
    key)."""
    return f"p{percentile}" if percentile else "mean"


def search_many(model: str, gpus_by_type: dict, *, prices: dict | None = None, **options) -> SearchResult:
    """`search` for each GPU type of ``gpus_by_type`` ({"H100": 8, "H200": 8}: the GPUs of that type the
    deployment may use) with ``prices`` ({"H100": 2.5}: US$ per GPU-hour; every type or none), as one
    result: the rows of every type (each with its ``gpu``), ranked and with one Pareto front over all of
    them (by output tokens per US$ when priced); ``options`` are `search`'s keywords."""
    if not gpus_by_type:
        raise InputError("name at least one GPU type", field="gpu")
    prices = dict(prices or {})
    for name, price in prices.items():
        if name not in gpus_by_type:
            raise InputError(f"a price for {name}, which is not searched (GPU types: {', '.join(gpus_by_type)})",
                             field="price")
        if isinstance(price, bool) or not isinstance(price, (int, float)) or not price > 0:
            raise InputError(f"{name}: must be a positive US$ per GPU-hour, got {price!r}", field="price")
    missing = [name for name in gpus_by_type if name not in prices]
    if prices and missing:
        raise InputError(f"no price for {', '.join(missing)}: give every GPU type a price or none", field="price")
    results = [search(model, gpu, n, usd_per_gpu_hour=prices.get(gpu), **options) for gpu, n in gpus_by_type.items()]
    if len(results) == 1:
        return results[0]
    queries = [r.query for r in results]
    query = {**queries[0], "gpu": [q["gpu"] for q in queries], "gpus": [q["gpus"] for q in queries],
             "engine": {q["gpu"]: q["engine"] for q in queries},
             "usd_per_gpu_hour": {q["gpu"]: p for q in queries for p in (q["usd_per_gpu_hour"] or {}).values()}
             or None}
    return _joined(query, results, [[dict(x, gpu=r.query["gpu"]) for x in r.rejected] for r in results], sum)


def _joined(query: dict, results: list, rejected: list, seconds) -> SearchResult:
    """One result of several: their rows, rejections (one list per result), screened frames, ``seconds``
    (sum or max) of their times, the front over all rows."""
    screened = [r.screened for r in results if r.screened is not None]
    merged = SearchResult(query, [row for r in results for row in r.rows], [x for rj in rejected for x in rj],
                          seconds(r.seconds for r in results), seconds(r.compile_seconds for r in results),
                          pd.concat(screened, ignore_index=True) if screened else None,
                          seconds(r.screen_seconds for r in results))
    merged.mark_pareto()
    return merged


def part_path(out: str | None, index: int, count: int) -> Path:
    """Where part ``index`` of ``count`` of a split search is kept: beside ``--out`` (default search.json)."""
    base = Path(out or "search.json")
    return base.with_name(f"{base.stem}.p{index}-of-{count}.json")


def save_part(result: SearchResult, path) -> None:
    """One part of a split search, as JSON (rows, rejections, screened configurations, times)."""
    def plain(v):
        return v.item() if isinstance(v, np.generic) else str(v)
    doc = {"query": result.query, "rows": result.rows, "rejected": result.rejected, "seconds": result.seconds,
           "compile_seconds": result.compile_seconds, "screen_seconds": result.screen_seconds,
           "screened": None if result.screened is None else result.screened.to_dict("records")}
    atomic_write(path, lambda fh: fh.write(json.dumps(doc, default=plain)))


def merge_parts(paths: list) -> SearchResult:
    """The search whose parts `save_part` wrote to ``paths`` (every part of one split search): rows,
    rejections and screened configurations joined, the front recomputed; ``seconds`` the slowest part's
    (the parts run side by side).  InputError names a missing part or parts of different searches."""
    results = []
    for p in paths:
        if not Path(p).is_file():
            raise InputError("part of the split search not found (run every --process-index first)", str(p))
        d = json.loads(Path(p).read_text())
        results.append(SearchResult(d["query"], d["rows"], d["rejected"], d["seconds"], d["compile_seconds"],
                                    None if d["screened"] is None else pd.DataFrame(d["screened"]),
                                    d["screen_seconds"]))
    queries = [{k: v for k, v in r.query.items() if k != "part"} for r in results]
    if any(q != queries[0] for q in queries[1:]):
        raise InputError("the parts are not one search's (their queries differ)", str(paths[0]))
    return _joined({**queries[0], "parts": len(results)}, results, [r.rejected for r in results], max)


def vllm_command(result: SearchResult, row: dict) -> str:
    """The ``vllm serve`` command line of a scored row; for a disaggregated unit a launch sketch: each pool's
    workers with vLLM's NIXL KV connector, behind a prefill/decode proxy (vLLM's example proxy or Dynamo)."""
    if row.get("mode") == "disagg":
        pre = {**row, "mode": "agg", "tp": row["prefill_tp"], "pp": 1, "attention_dp": row["prefill_attention_dp"],
               "moe_ep": row["prefill_moe_ep"], "dp": 1, "max_num_seqs": row["prefill_max_num_seqs"],
               "max_num_batched_tokens": row["prefill_max_num_batched_tokens"]}
        kv = """--kv-transfer-config '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'"""
        return (f"prefill ({row['prefill_workers']}x): {vllm_command(result, pre)} {kv}; "
                f"decode ({row['decode_workers']}x): {vllm_command(result, {**row, 'mode': 'agg', 'dp': 1})} {kv}; "
                "a prefill/decode proxy in front" + (f" (x {row['dp']} such units)" if row["dp"] > 1 else ""))
    q = result.query
    parts = ["vllm serve", q["model"], f"--tensor-parallel-size {row['tp']}"]
    if row.get("pp", 1) > 1:
        parts.append(f"--pipeline-parallel-size {row['pp']}")
    att = row.get("attention_dp", 1)
    if att > 1 or row["dp"] > 1:  # attention-DP ranks share one expert group; replicas of it are servers apart
        parts.append(f"--data-parallel-size {att if att > 1 else row['dp']}")
    if row["moe_ep"] > 1:
        parts.append("--enable-expert-parallel")
    parts += [f"--max-num-seqs {row['max_num_seqs']}", f"--max-num-batched-tokens {row['max_num_batched_tokens']}",
              f"--gpu-memory-utilization {row['gpu_memory_utilization']:g}"]
    if row["weights"] == "fp8" and q["checkpoint_weights"] != "fp8":
        parts.append("--quantization fp8")
    if row.get("kv_cache_dtype", "auto") != "auto":
        parts.append(f"--kv-cache-dtype {row['kv_cache_dtype']}")
    if q.get("sampling"):  # the requests' defaults the search priced, for clients that send none
        parts.append(f"--override-generation-config '{json.dumps(q['sampling'], separators=(',', ':'))}'")
    if att > 1 and row["dp"] > 1:
        parts.append(f"(x {row['dp']} such servers behind a router)")
    return " ".join(parts)


def no_result_message(result: SearchResult) -> str | None:
    """Why a search has no configuration to recommend (one line), or None when it has one."""
    if not result.rows:
        why = ", ".join(f"{n} {reason}" for reason, n in result.rejected_counts.items())
        return f"no feasible configuration: rejected {why} (--explain lists them)"
    if not result.feasible:
        q = result.query
        stat = q["statistic"]
        best_ttft = min(r[f"ttft_{stat}_ms"] for r in result.rows)
        best_tpot = min(r[f"tpot_{stat}_ms"] for r in result.rows)
        best_rate = max(r["requests_per_s_total"] for r in result.rows)
        return (f"none of the {len(result.rows)} scored configurations meets the objective (ttft_ms={q['ttft_ms']}, "
                f"tpot_ms={q['tpot_ms']}, e2e_ms={q['e2e_ms']}, statistic={stat}, rate={q['rate']}); the lowest "
                f"predicted {stat} TTFT is {best_ttft:.1f} ms, {stat} TPOT {best_tpot:.2f} ms, the highest request "
                f"rate {best_rate:.2f}/s")
    return None


def _table_row(result: SearchResult, rank: int, r: dict) -> dict:
    """One line of the ranked table; the TTFT and E2E columns are named by the statistic the SLO used."""
    q, stat = result.query, result.query["statistic"]
    several = isinstance(q["gpu"], list)
    eng = q["engine"] if not several else next(iter(q["engine"].values()))
    varied = {k: r[k] for k in ("kv_cache_dtype", "max_num_batched_tokens", "max_num_seqs")
              if (k == "kv_cache_dtype" and len(q.get("kv_cache_dtypes") or ()) > 1)
              or isinstance(eng.get(k), list)}
    names = {"kv_cache_dtype": "kv", "max_num_batched_tokens": "budget", "max_num_seqs": "seqs"}
    return {"rank": rank, **({"gpu": r["gpu"]} if several else {}), "layout": r["layout"], "weights": r["weights"],
            **{names[k]: v for k, v in varied.items()}, "conc": r["concurrency_per_replica"], **({"gpus": r["gpus_used"]} if several or q["objective"] !=
                                                      "tokens_per_gpu" else {}),
            f"ttft_{stat}_ms": r[f"ttft_{stat}_ms"], f"tpot_{stat}_ms": r[f"tpot_{stat}_ms"],
            **({f"e2e_{stat}_ms": r[f"e2e_{stat}_ms"]} if q["e2e_ms"] else {}),
            "tok_s_gpu": r["output_tokens_per_s_per_gpu"], "tok_s_user": r["output_tokens_per_s_per_user"],
            "tok_s_total": r["output_tokens_per_s_total"],
            **({"usd_h": r["usd_per_hour"], "tok_per_usd": r["output_tokens_per_usd"]} if q["usd_per_gpu_hour"]
               else {}),
            "weights_gib": r["weights_bytes_per_gpu"] / GIB, "kv_pool_gib": r["kv_pool_bytes_per_gpu"] / GIB,
            "kv_need_gib": r["kv_needed_bytes_per_gpu"] / GIB, "pareto": "*" if r["pareto"] else ""}


def summary(result: SearchResult, top: int) -> dict:
    """The machine-readable summary (``--json``)."""
    feasible = result.feasible
    stat = result.query["statistic"]
    keep = ("gpu", "layout", "tp", "pp", "attention_dp", "moe_ep", "dp", "gpus_used", "weights", "concurrency_per_replica",
            "concurrency_total", "ttft_mean_ms", f"ttft_{stat}_ms", "tpot_mean_ms", f"tpot_{stat}_ms",
            f"e2e_{stat}_ms",
            "output_tokens_per_s_per_gpu", "output_tokens_per_s_per_user", "output_tokens_per_s_total",
            "requests_per_s_total", "usd_per_hour", "output_tokens_per_usd", "weights_bytes_per_gpu",
            "kv_pool_bytes_per_gpu")
    brief = lambda r: {**{k: r[k] for k in keep if k in r}, "vllm_command": vllm_command(result, r)}  # noqa: E731
    return {"query": result.query, "configurations_considered": result.scored + len(result.rejected),
            "configurations_scored": result.scored, "configurations_simulated": len(result.rows),
            "feasible": len(feasible), "rejected": result.rejected_counts, "seconds": round(result.seconds, 2),
            "screen_seconds": round(result.screen_seconds, 3), "compile_seconds": round(result.compile_seconds, 2),
            "pareto": [brief(r) for r in result.pareto], "ranked": [brief(r) for r in feasible[:top]],
            "best": brief(feasible[0]) if feasible else None}


def plot(result: SearchResult, path) -> str:
    """The scored rows and the Pareto front as a PNG; the line to print (also when matplotlib is missing)."""
    plt = plotting.pyplot()
    if plt is None:
        return plotting.MISSING
    fig, ax = plt.subplots(figsize=(7, 5))
    for ok, style in ((False, dict(c="0.75", s=12, label="misses the objective")),
                      (True, dict(c="tab:blue", s=18, label="meets the objective"))):
        rs = [r for r in result.rows if r["meets_slo"] == ok]
        ax.scatter([r["output_tokens_per_s_per_user"] for r in rs], [r[result.merit] for r in rs], **style)
    front = sorted(result.pareto, key=lambda r: r["output_tokens_per_s_per_user"])
    ax.plot([r["output_tokens_per_s_per_user"] for r in front], [r[result.merit] for r in front],
            "-o", c="tab:red", label="Pareto front")
    for r in front:
        ax.annotate(f"{r['gpu']} {r['layout']} c{r['concurrency_per_replica']}",
                    (r["output_tokens_per_s_per_user"], r[result.merit]), fontsize=7)
    q = result.query
    ax.set_xlabel("output tokens/s per user")
    ax.set_ylabel("output tokens per US$" if result.merit == "output_tokens_per_usd" else "output tokens/s per GPU")
    ax.set_title(f"{q['model']} on {_fleet(q)}, ISL {q['isl']} / OSL {q['osl']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


# ---------------------------------------------------------------- the command

def _fleet(q: dict) -> str:
    """"8 x H100-SXM" or, for several GPU types, "8 x H100-SXM or 8 x H200"."""
    pairs = zip(q["gpus"], q["gpu"]) if isinstance(q["gpu"], list) else [(q["gpus"], q["gpu"])]
    return " or ".join(f"{n} x {g}" for n, g in pairs)


def _prices(text: str | None) -> dict | None:
    """--price H100=2.5,H200=3.8 -> {"H100": 2.5, "H200": 3.8} (positivity is `search_many`'s check)."""
    if text is None:
        return None
    out = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise InputError(f"must be GPU=US$ per GPU-hour, comma-separated, got {item!r}", field="price") from None
    return out


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of positive integers, got {text!r}")
    return vals


def add_search_arguments(sp) -> None:
    sp.add_argument("--model", required=True, help="a folder of --model-configs (or of the packaged configs)")
    sp.add_argument("--model-configs", default=None,
                    help="folder of <model>/config.json (default: configs shipped in the package)")
    sp.add_argument("--gpu", required=True, type=lambda s: [g.strip() for g in s.split(",") if g.strip()],
                    help="GPU type (H100, H200, A100, L40S, B200, ...) or several, comma-separated: each is searched")
    sp.add_argument("--gpus", type=number(int, 1), required=True,
                    help="GPUs the deployment may use (of each type searched)")
    sp.add_argument("--price", default=None,
                    help="US$ per GPU-hour of every GPU type searched, e.g. H100=2.5,H200=3.8: rank by output "
                         "tokens per US$ (default: by tokens/s per GPU)")
    sp.add_argument("--gpus-per-node", type=number(int, 1), default=8,
                    help="GPUs of one node: the largest tensor-parallel group and pipeline (default 8)")
    sp.add_argument("--pp", type=_int_list, default=None,
                    help="pipeline-parallel degrees to try, comma-separated (default: every one whose stages fit "
                         "in a node)")
    sp.add_argument("--no-disagg", dest="disagg", action="store_false",
                    help="leave out disaggregated prefill/decode pools (default: the best few are simulated)")
    sp.add_argument("--isl", type=number(int, 1), required=True, help="input tokens per request")
    sp.add_argument("--osl", type=number(int, 1), required=True, help="output tokens per request")
    sp.add_argument("--ttft-ms", type=number(float, 0, low_open=True), default=None,
                    help="SLO on the time to first token (mean, or --percentile) (default: none)")
    sp.add_argument("--tpot-ms", type=number(float, 0, low_open=True), default=None,
                    help="SLO on the mean time per output token (default: none)")
    sp.add_argument("--e2e-ms", type=number(float, 0, low_open=True), default=None,
                    help="SLO on the end-to-end request latency (mean, or --percentile) (default: none)")
    sp.add_argument("--percentile", type=int, default=None,
                    help="50, 90 or 99: check the TTFT, TPOT and E2E SLOs against this percentile instead of "
                         "the mean")
    sp.add_argument("--rate", type=number(float, 0, low_open=True), default=None,
                    help="requests/s the deployment must sustain (all replicas together)")
    sp.add_argument("--objective", choices=OBJECTIVES, default="tokens_per_gpu",
                    help="tokens_per_gpu: most output tokens/s per GPU (or per US$) on the whole budget; "
                         "min_gpus_for_rate: fewest GPUs that meet the SLO at --rate (default tokens_per_gpu)")
    sp.add_argument("--concurrency", type=_int_list, default=None,
                    help="clients per replica to try, comma-separated (default 1,2,4,...,256; with --screen "
                         "every one to 64, then steps of 2, 4, 8 to 512)")
    sp.add_argument("--screen", action="store_true",
                    help="estimate every configuration by the closed-loop steady state first and simulate only "
                         "the best and the Pareto front (--simulate-top); widens the default space to every "
                         "concurrency up to 512, budgets 2048-16384, running limits 64-1024 and both KV-cache "
                         "precisions (docs/search.md)")
    sp.add_argument("--simulate-top", type=number(int, 1), default=SIMULATE_TOP,
                    help=f"with --screen: configurations simulated, the best and of the front (default {SIMULATE_TOP})")
    sp.add_argument("--kv-cache-dtypes", type=lambda s: [w.strip() for w in s.split(",") if w.strip()],
                    default=None, help="KV-cache precisions to try, of auto, bf16, fp16, fp8 (default auto; with "
                                       "--screen auto,fp8)")
    sp.add_argument("--weights", type=lambda s: [w.strip() for w in s.split(",") if w.strip()], default=None,
                    help="weight precisions to try, comma-separated, of bf16, fp16, fp8 (default: the checkpoint's)")
    sp.add_argument("--gpu-memory-utilization", type=number(float, 0, 1, low_open=True),
                    default=GPU_MEMORY_UTILIZATION, help="vLLM's --gpu-memory-utilization (default 0.9)")
    sp.add_argument("--max-num-batched-tokens", type=_int_list, default=None,
                    help="vLLM's token budget per step, or several comma-separated (default: vLLM's for the GPU; "
                         "with --screen 2048,4096,8192,16384)")
    sp.add_argument("--max-num-seqs", type=_int_list, default=None,
                    help="vLLM's sequences per step, or several comma-separated (default: vLLM's for the GPU; "
                         "with --screen 64,128,256,512,1024)")
    sp.add_argument("--engine-version", default=DEFAULT_ENGINE_VERSION,
                    help=f"vLLM version whose calibration prices the steps (default {DEFAULT_ENGINE_VERSION})")
    sampling.add_argument(sp)
    sp.add_argument("--rounds", type=number(int, 2), default=None,
                    help="closed loop: requests per client, the first and the last left out (default "
                         f"{SIM_WORKLOAD['rounds']})")
    sp.add_argument("--bench-data", default=None, help="kernel tables folder (default: the repo's bench_data/)")
    sp.add_argument("--calibration", default="default", help="none | default | PATH (as for predict)")
    sp.add_argument("--top", type=number(int, 1), default=10, help="configurations in the ranked table (default 10)")
    sp.add_argument("--explain", action="store_true", help="list the rejected candidates by reason")
    sp.add_argument("--out", default=None, help="every scored row to this .parquet or .csv file")
    sp.add_argument("--plot", default=None, help="the Pareto front as a PNG (needs matplotlib)")
    sp.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    sp.add_argument("--process-index", type=number(int, 0), default=None,
                    help="this process's part of a search split over --process-count processes: the layouts "
                         "k with k mod count = index, kept beside --out (default: jax.process_index())")
    sp.add_argument("--process-count", type=number(int, 1), default=None,
                    help="processes the search is split over (default: jax.process_count())")
    sp.add_argument("--merge", action="store_true",
                    help="join the --process-count parts kept beside --out and report them as one search")


def run_search(args) -> int:
    fmt = None
    if args.out:
        check_output_file(args.out)
        fmt = {".parquet": "parquet", ".csv": "csv"}.get(Path(args.out).suffix.lower())
        if fmt is None:
            raise InputError("must end in .parquet or .csv", args.out, "out")
    if args.plot:
        check_output_file(args.plot, "plot")
    count = jax.process_count() if args.process_count is None else args.process_count
    index = jax.process_index() if args.process_index is None else args.process_index
    if args.merge:
        res = merge_parts([part_path(args.out, i, count) for i in range(count)])
        return _report(res, args, fmt)
    if not 0 <= index < count:
        raise InputError(f"must be in 0..{count - 1}, got {index}", field="process_index")
    res = search_many(args.model, dict.fromkeys(args.gpu, args.gpus), prices=_prices(args.price), isl=args.isl,
                      osl=args.osl, ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms, e2e_ms=args.e2e_ms,
                      percentile=args.percentile, objective=args.objective, concurrency=args.concurrency,
                      rate=args.rate, weights=args.weights, gpus_per_node=args.gpus_per_node,
                      gpu_memory_utilization=args.gpu_memory_utilization,
                      max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                      engine_version=args.engine_version, model_configs=args.model_configs,
                      bench_data=args.bench_data, calibration=args.calibration,
                      workload_options={"rounds": args.rounds, "sampling": args.sampling}, screen=args.screen,
                      simulate_top=args.simulate_top, kv_cache_dtypes=args.kv_cache_dtypes, pp=args.pp,
                      part=(index, count), disagg=args.disagg)
    if count > 1:
        path = part_path(args.out, index, count)
        save_part(res, path)
        print(f"part {index} of {count}: {res.scored} configurations scored, {len(res.rows)} simulated, "
              f"{len(res.rejected)} rejected -> {path} (join the parts with --merge)")
        return 0
    return _report(res, args, fmt)


def _report(res: SearchResult, args, fmt) -> int:
    if args.out and (res.rows or res.screened is not None):
        write_frame(args.out, scored_frame(res), fmt)
    if args.json:
        print(json.dumps(summary(res, args.top), indent=1))
    else:
        _print_report(res, args)
    if args.explain:
        _print_rejections(res, sys.stderr if args.json else sys.stdout)
    problem = no_result_message(res)
    if problem:
        raise InputError(problem)
    if args.plot:
        print(plot(res, args.plot), file=sys.stderr if args.json else sys.stdout)
    return 0


def _print_report(res: SearchResult, args) -> None:
    q = res.query
    considered = res.scored + len(res.rejected)
    stat = q["statistic"]
    goal = [f"{stat} TTFT <= {q['ttft_ms']:g} ms" if q["ttft_ms"] else "",
            f"mean TPOT <= {q['tpot_ms']:g} ms" if q["tpot_ms"] else "",
            f"{stat} E2E <= {q['e2e_ms']:g} ms" if q["e2e_ms"] else "",
            f">= {q['rate']:g} requests/s" if q["rate"] else ""]
    prices = q["usd_per_gpu_hour"]
    print(f"costmodel search: {q['model']} on {_fleet(q)}, ISL {q['isl']} / OSL {q['osl']}, "
          f"objective: {', '.join(x for x in goal if x) or 'none'}"
          + (", fewest GPUs" if q["objective"] == "min_gpus_for_rate" else "")
          + (f"; US$ per GPU-hour: {', '.join(f'{g} {p:g}' for g, p in prices.items())}" if prices else ""))
    if res.screened is not None:
        print(f"  {considered} configurations, {res.scored} screened by the steady-state estimate "
              f"({res.screen_seconds:.2f} s), {int(res.screened['meets_slo'].sum())} of them within the objective; "
              f"{len(res.rows)} simulated, {len(res.feasible)} meet the objective, {len(res.pareto)} on the Pareto "
              f"front ({res.seconds:.1f} s in all, and {res.compile_seconds:.1f} s compiling)")
    else:
        print(f"  {considered} configurations, {len(res.rows)} scored, {len(res.feasible)} meet the objective, "
              f"{len(res.pareto)} on the Pareto front ({res.seconds:.1f} s, and {res.compile_seconds:.1f} s "
              "compiling)")
    for reason, n in res.rejected_counts.items():
        print(f"  rejected {n}: {reason}")
    print("  each replica (DP) is an independent engine behind a round-robin router; conc = clients per replica")
    feasible = res.feasible
    if not feasible:
        return
    merit = "output tokens per US$" if res.merit == "output_tokens_per_usd" else "output tokens/s per GPU"
    order = f"fewest GPUs, then {merit}" if q["objective"] == "min_gpus_for_rate" else merit
    print(f"Ranked by {order} (* = on the Pareto front of {merit} vs tokens/s per user; latencies: {stat}, "
          f"TPOT mean):")
    print_table([_table_row(res, i, r) for i, r in enumerate(feasible[:args.top], 1)])
    print("Pareto front:")
    print_table([_table_row(res, feasible.index(r) + 1, r) for r in res.pareto])
    print("vllm serve for the top configurations:")
    for i, r in enumerate(feasible[:3], 1):
        on = f"on {r['gpus_used']} x {r['gpu']}, " if isinstance(q["gpu"], list) else ""
        print(f"  {i}. {vllm_command(res, r)}  # {on}{r['concurrency_total']} concurrent clients in all")
    if args.out and res.rows:
        print(f"wrote {len(res.rows)} rows to {args.out}")


def _print_rejections(res: SearchResult, stream) -> None:
    by: dict = {}
    for r in res.rejected:
        by.setdefault((r["reason"], r["detail"]), []).append(r)
    print("Rejected candidates (configurations: layout x weights x concurrency):", file=stream)
    for (reason, detail), rs in sorted(by.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
        layouts = sorted({(f"{r['gpu']} " if "gpu" in r else "") + f"{r['weights']} TP{r['tp']}"
                          + (f" EP{r['moe_ep']}" if r["moe_ep"] > 1 else "") for r in rs})
        if reason == KV_DOES_NOT_FIT:
            layouts = [f"{x}, concurrency {','.join(str(r['concurrency']) for r in rs)}" for x in layouts]
        print(f"  {len(rs):4d}  {reason}: {detail} [{', '.join(layouts)}]", file=stream)
