"""`costmodel bench`: how fast the sweep evaluates step configurations, against a per-configuration loop.

Configurations: mixed prefill/decode batches (0-256 decodes with 0-32k cached tokens each, 0-2 prefill
chunks of 1-8192 new tokens after 0-16k cached, at least one request) of a dense 8B (``llama-3.1-8b``) and a
70B (``llama-3.1-70b``) on H100 at TP 1, 2, 4 and 8, with the repo's tables and physical default parameters.

Measured in one process on the same machine:
* compile: building the per-group tables and compiling the vectorized function;
* vectorized: `sweep.Evaluator` over all configurations after compilation, in chunks, inputs copied in and
  results (total and breakdown, float32) copied out to numpy: evaluations per second, per model and overall;
* loop: the un-vmapped jitted `step.step_time` called once per configuration from Python (padded `Step`
  of the same batches, one compilation, warmed up), on a few hundred 8B configurations;
* agreement: the vectorized results against the loop's, max relative difference;
* peak memory: the process's peak resident set size (``resource.getrusage``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..compiled import cpu_workers, parallel_map
from ..errors import InputError
from ..hardware import get_gpu
from ..io import number, print_table
from ..model import load_model
from ..params import Params
from ..step import Step, setup, step_time
from ..tables import load_tables
from . import sweep as sw

MODELS = ("llama-3.1-8b", "llama-3.1-70b")
TPS = (1, 2, 4, 8)
GPU = "H100"


def _use_all_cores(n: int | None = None):
    """``n`` (default: one per core) CPU devices, set before JAX's backend starts, so that the sweep can shard
    configurations over them; harmless where the backend is a GPU or already started."""
    try:
        jax.config.update("jax_num_cpu_devices", max(n or 0, os.cpu_count() or 1))
    except Exception:  # backend already initialized, or an older JAX
        pass


def mixed_batches(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``n`` random mixed prefill/decode batches as summary columns (float32)."""
    n_decode = rng.integers(0, 257, n)
    n_prefill = rng.integers(0, 3, n)
    n_decode = np.where((n_decode == 0) & (n_prefill == 0), 1, n_decode)
    return {"n_decode": n_decode.astype(np.float32),
            "decode_ctx": rng.integers(0, 32768, n).astype(np.float32),
            "n_prefill": n_prefill.astype(np.float32),
            "prefill_new": rng.integers(1, 8193, n).astype(np.float32),
            "prefill_cached": rng.integers(0, 16385, n).astype(np.float32)}


def _padded_steps(cols: dict, idx: np.ndarray):
    """The same batches as per-request `step.Step`s padded to fixed sizes (P=2 prefills, D=256 decodes)."""
    k = len(idx)
    P, D = 2, 256
    npre, ndec = cols["n_prefill"][idx], cols["n_decode"][idx]
    pm = (np.arange(P)[None, :] < npre[:, None]).astype(np.float32)
    dm = (np.arange(D)[None, :] < ndec[:, None]).astype(np.float32)
    pn = pm * cols["prefill_new"][idx, None]
    pc = pm * cols["prefill_cached"][idx, None]
    dc = dm * cols["decode_ctx"][idx, None]
    return [Step(pn[i], pc[i], pm[i], dc[i], dm[i]) for i in range(k)]


def bench(n_configs: int = 10_000_000, loop_configs: int = 300, chunk: int = 1 << 20, call_size: int | None = None,
          devices: int | None = None, seed: int = 0, bench_data=None, progress: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    groups = [{"model": m, "gpu": GPU, "tp": tp, "calibration": "none"} for m in MODELS for tp in TPS]
    per = -(-n_configs // len(groups))
    cols = mixed_batches(per * len(groups), rng)
    gidx = np.repeat(np.arange(len(groups), dtype=np.int32), per)  # contiguous per group, as an axes sweep
    space = sw.ArraySpace(groups, gidx, cols)

    t0 = time.perf_counter()
    ev = sw.Evaluator(space, call_size or min(chunk, sw.DEFAULT_CALL), bench_data=bench_data, devices=devices)
    g, b, _ = space.rows(0, min(space.n, ev.call_size))
    ev(g, b)  # compiles (one executable serves every group)
    compile_s = time.perf_counter() - t0

    # vectorized, after compilation
    batch = _batch(space)
    rates, total_n, total_s, checksum = {}, 0, 0.0, 0.0

    def consume(h):
        return sum(float(np.nansum(vals[0], dtype=np.float64)) for _, vals in ev.fetch_parts(h))

    for mi, model in enumerate(MODELS):
        lo, hi = mi * len(TPS) * per, (mi + 1) * len(TPS) * per
        t0 = time.perf_counter()
        for start in range(lo, hi, chunk):
            stop = min(hi, start + chunk)
            checksum += consume(ev.submit(gidx[start:stop], [x[start:stop] for x in batch]))
        dt = time.perf_counter() - t0
        rates[model] = (hi - lo) / dt
        total_n += hi - lo
        total_s += dt
        if progress:
            print(f"  {model}: {hi - lo:,} configurations in {dt:.2f} s", file=sys.stderr)

    split = _call_split(ev, gidx, batch, len(groups) - 1)

    # the per-configuration loop: un-vmapped jitted step_time, one configuration per call, 8B over TP 1-8
    tables = load_tables(bench_data, get_gpu(GPU))
    sus = {tp: setup(load_model(MODELS[0]), tables, tp) for tp in TPS}
    fn = jax.jit(lambda a, lay, p, s, st: step_time(a, lay, p, s, st)[0], static_argnums=4)  # one compilation
    idx = rng.choice(len(TPS) * per, size=min(loop_configs, len(TPS) * per), replace=False)  # 8B rows
    steps = _padded_steps(cols, idx)
    steps = [jax.tree_util.tree_map(jnp.asarray, s) for s in steps]
    tps = [groups[gidx[i]]["tp"] for i in idx]
    for tp in TPS:  # compile and warm up outside the timing
        float(fn(sus[tp].arrays, sus[tp].on_gpu, Params(), steps[0], sus[tp].static))
    p = Params()
    t0 = time.perf_counter()
    loop = [float(fn(sus[tp].arrays, sus[tp].on_gpu, p, s, sus[tp].static)) for tp, s in zip(tps, steps)]
    loop_s = time.perf_counter() - t0
    loop_rate = len(idx) / loop_s

    # agreement of the vectorized evaluation with the loop on the same configurations
    vec = ev(gidx[idx], [x[idx] for x in batch])[0]
    max_rel = float(np.max(np.abs(vec / np.asarray(loop) - 1.0)))

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    if sys.platform == "darwin":
        peak /= 1024.0
    dev = jax.local_devices()
    return {
        "evals_per_s": total_n / total_s,
        "evals_per_s_by_model": rates,
        "loop_evals_per_s": loop_rate,
        "speedup": rates[MODELS[0]] / loop_rate,
        "compile_s": compile_s,
        "compile_cache": jax.config.jax_compilation_cache_dir,  # None: compile_s compiled from scratch
        "peak_rss_mb": peak,
        "n_configs": total_n,
        "loop_configs": len(idx),
        "max_rel_diff_vs_loop": max_rel,
        "chunk": chunk,
        "call_size": ev.call_size,
        "devices": ev.n_devices,
        "platform": f"{dev[0].platform} x{len(dev)}",
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "checksum": checksum,
        "call_split": split,
    }


def _call_split(ev, gidx, batch, group: int, reps: int = 5) -> dict:
    """Where the time of one full kernel call of ``group``'s rows goes (median seconds of ``reps``): copying
    its inputs to the device, evaluating them there, and copying the step times and breakdown back."""
    rows = np.flatnonzero(gidx == group)[:ev.call_size]
    part = [ev._pad(np.asarray(b[rows], np.float32), 1.0) for b in batch]
    integral = ev._integral(part)
    args = ev.tables[group][integral]
    ins = jax.block_until_ready(jax.device_put(part, ev._sh))
    fn = ev.executable(group, integral, ins)
    res = jax.block_until_ready(fn(args[0], args[1], *ins))
    t_in, t_eval, t_out = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        ins = jax.block_until_ready(jax.device_put(part, ev._sh))
        t1 = time.perf_counter()
        res = jax.block_until_ready(fn(args[0], args[1], *ins))
        t2 = time.perf_counter()
        host = [np.array(r) for r in res]
        t3 = time.perf_counter()
        t_in.append(t1 - t0), t_eval.append(t2 - t1), t_out.append(t3 - t2)
    med = lambda v: float(np.median(v))  # noqa: E731
    return {"configs": int(ev.call_size), "copy_in_s": med(t_in), "eval_s": med(t_eval), "copy_out_s": med(t_out),
            "in_bytes": int(sum(p.nbytes for p in part)), "out_bytes": int(sum(h.nbytes for h in host))}


def _batch(space):
    return sw._batch_inputs(space.columns, space.decode_total, space.prefill_total, space.n)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", type=number(int, 1), default=10_000_000,
                        help="configurations to evaluate (split over 8B/70B x TP 1,2,4,8; default 10,000,000)")
    parser.add_argument("--loop-configs", type=number(int, 1), default=300, help="configurations for the per-call loop")
    parser.add_argument("--chunk", type=number(int, 1), default=1 << 20, help="configurations per chunk")
    parser.add_argument("--call-size", type=number(int, 1), default=None,
                        help="configurations per kernel call (default: sweep.DEFAULT_CALL)")
    parser.add_argument("--devices", type=number(int, 1), default=None,
                        help="local devices to shard over (default: all; on CPU one per core)")
    parser.add_argument("--bench-data", default=None, help="kernel tables folder (default: the repo's bench_data/)")
    parser.add_argument("--seed", type=number(int, 0), default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--serve", action="store_true",
                        help="time the serving simulation instead: one open-loop experiment and a vmapped call of "
                             "closed-loop estimates (--estimates, --rounds)")
    parser.add_argument("--estimates", type=number(int, 1), default=4096, help="--serve: closed-loop estimates")
    parser.add_argument("--rounds", type=number(int, 2), default=4, help="--serve: requests per closed-loop client")
    parser.add_argument("--search", action="store_true",
                        help="run issue #17's search queries with costmodel search and, when it can be run, "
                             "AIConfigurator (docs/search.md)")
    parser.add_argument("--queries", default="a,b,c", help="--search: which of the queries a, b, c (default all)")
    parser.add_argument("--aiconfigurator-python", default=None,
                        help="--search: the Python of an environment where aiconfigurator is installed "
                             "(default: this one, when it imports aiconfigurator)")
    parser.add_argument("--model-configs", default=None,
                        help="--search: folder of <model>/config.json (default: the shared model configs)")
    parser.add_argument("--against", default=None, metavar="DIR",
                        help="compare with another checkout of costmodel (DIR holds its costmodel/ package): run "
                             "this bench with the options given, from this checkout and from DIR in turn, --pairs "
                             "times, and report the paired differences")
    parser.add_argument("--pairs", type=number(int, 1), default=10, help="--against: alternating pairs of runs")


def run_bench(args) -> int:
    if getattr(args, "search", False):
        names = [n.strip() for n in args.queries.split(",") if n.strip()]
        bad = [n for n in names if n not in SEARCH_QUERIES]
        if bad or not names:
            raise InputError(f"must be a comma-separated list of {', '.join(SEARCH_QUERIES)}, got {args.queries!r}",
                             field="--queries")
        r = bench_search(names, model_configs=args.model_configs, bench_data=args.bench_data,
                         aic_python=aiconfigurator_python(args.aiconfigurator_python), progress=not args.json)
        print(json.dumps(r)) if args.json else print_search(r)
        return 0
    if getattr(args, "serve", False):
        for name, low in (("estimates", 1), ("rounds", 2)):  # callers other than the CLI
            v = getattr(args, name, None)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise InputError(f"must be an integer >= {low}, got {v!r}", field="--" + name)
        r = bench_serve(args.bench_data, args.estimates, args.rounds, progress=not args.json)
        print(json.dumps(r)) if args.json else print_serve(r)
        return 0
    for name in ("configs", "loop_configs", "chunk", "call_size", "devices", "seed"):  # callers other than the CLI
        v = getattr(args, name, None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "seed" else 1)):
            raise InputError(f"must be an integer >= {0 if name == 'seed' else 1}, got {v!r}",
                             field="--" + name.replace("_", "-"))
    if getattr(args, "against", None):
        r = bench_against(args.against, args.pairs, _passed_options(args), progress=not args.json)
        print(json.dumps(r)) if args.json else print_against(r)
        return 0
    if args.devices and args.devices > 1:
        _use_all_cores(args.devices)  # CPU: by default one device (XLA already threads its loops)
    r = bench(args.configs, args.loop_configs, args.chunk, call_size=args.call_size, devices=args.devices, seed=args.seed,
              bench_data=args.bench_data, progress=not args.json)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"costmodel bench: {r['n_configs']:,} mixed prefill/decode steps of {' and '.join(MODELS)} on {GPU}, "
          f"TP {', '.join(map(str, TPS))}; {r['platform']} ({r['cpu_count']} cores), chunk {r['chunk']:,}")
    for m, v in r["evals_per_s_by_model"].items():
        print(f"  vectorized {m:>14}: {v / 1e6:8.2f} M evaluations/s")
    print(f"  vectorized {'all':>14}: {r['evals_per_s'] / 1e6:8.2f} M evaluations/s")
    print(f"  python loop ({MODELS[0]}, {r['loop_configs']} calls of the jitted step function): "
          f"{r['loop_evals_per_s']:,.0f} evaluations/s")
    print(f"  speed-up ({MODELS[0]}): {r['speedup']:,.0f}x    compile: {r['compile_s']:.2f} s    "
          f"peak RSS: {r['peak_rss_mb']:.0f} MB    max rel. diff vs loop: {r['max_rel_diff_vs_loop']:.1e}")
    c = r["call_split"]
    print(f"  one call of {c['configs']:,} ({MODELS[-1]}, TP {TPS[-1]}): copy in {c['copy_in_s'] * 1e3:.2f} ms "
          f"({c['in_bytes'] / 1e6:.0f} MB), evaluate {c['eval_s'] * 1e3:.2f} ms "
          f"({c['configs'] / c['eval_s'] / 1e6:,.0f} M/s), copy out {c['copy_out_s'] * 1e3:.2f} ms "
          f"({c['out_bytes'] / 1e6:.0f} MB)")
    return 0


# ---------------------------------------------------------------- `costmodel bench --against DIR`
# Two checkouts timed in turn on one machine, so that drift in the machine's speed falls on both alike.

COMPARED = ("evals_per_s", "compile_s")  # what --against compares (the bench's --json keys)
_PASSED = ("configs", "loop_configs", "chunk", "call_size", "devices", "bench_data", "seed")


def _passed_options(args) -> list[str]:
    """The sweep-bench options of ``args`` as command-line words, for both checkouts' runs."""
    out = []
    for name in _PASSED:
        v = getattr(args, name, None)
        if v is not None:
            out += ["--" + name.replace("_", "-"), str(v)]
    return out


def paired_summary(now, other, seed: int = 0) -> dict:
    """A figure measured in alternating runs of this checkout (``now``) and another (``other``), pair by pair:
    both medians, the per-pair ratio now / other − 1 (median, mean, pairs where now is higher) and a 90 %
    bootstrap interval (2,000 resamples) of that median ratio."""
    a, b = np.asarray(now, np.float64), np.asarray(other, np.float64)
    r = a / b - 1.0
    boot = np.median(np.random.default_rng(seed).choice(r, (2000, r.size)), axis=1)
    return {"now_median": float(np.median(a)), "other_median": float(np.median(b)),
            "ratio_median": float(np.median(r)), "ratio_mean": float(r.mean()), "now_higher": int((r > 0).sum()),
            "pairs": int(r.size), "ratio_interval_90": [float(np.percentile(boot, 5)), float(np.percentile(boot, 95))]}


def _checkout_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _bench_json(root: Path, options: list[str]) -> dict:
    """`costmodel bench --json` with ``options``, run by this Python with ``root``'s package first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    p = subprocess.run([sys.executable, "-m", "costmodel.cli", "bench", "--json", *options], cwd=root, env=env,
                       capture_output=True, text=True)
    lines = p.stdout.strip().splitlines()
    if p.returncode or not lines:
        why = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"costmodel bench failed in {root} (exit {p.returncode}): {why}", field="--against")
    return json.loads(lines[-1])


def bench_against(other_dir, pairs: int, options: list[str], run=_bench_json, progress: bool = False) -> dict:
    """`costmodel bench --json` with ``options`` from this checkout and from ``other_dir`` in turn, ``pairs``
    times (this one first in each pair); `paired_summary` of each of `COMPARED`.  ``run(root, options)``
    returns one run's JSON object."""
    other = Path(other_dir).resolve()
    if not (other / "costmodel" / "cli.py").is_file():
        raise InputError(f"{other_dir} holds no costmodel/cli.py (a checkout of costmodel is expected)",
                         field="--against")
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
        raise InputError(f"must be an integer >= 1, got {pairs!r}", field="--pairs")
    runs = {"now": [], "other": []}
    for i in range(pairs):
        for side, root in (("now", _checkout_root()), ("other", other)):
            runs[side].append(run(root, options))
        if progress:
            print(f"  pair {i + 1}/{pairs}: " + ", ".join(f"{k} {runs['now'][-1][k]:.4g} / {runs['other'][-1][k]:.4g}"
                                                        for k in COMPARED), file=sys.stderr)
    return {"against": str(other), "options": options, "pairs": pairs,
            **{k: paired_summary([r[k] for r in runs["now"]], [r[k] for r in runs["other"]]) for k in COMPARED},
            "runs": {side: [{k: r[k] for k in COMPARED} for r in v] for side, v in runs.items()}}


def print_against(r: dict) -> None:
    print(f"costmodel bench --against {r['against']}: {r['pairs']} alternating pairs of `costmodel bench "
          f"{' '.join(r['options'])}` (this checkout first in each pair)")
    rows = []
    for k in COMPARED:
        s = r[k]
        lo, hi = s["ratio_interval_90"]
        rows.append({"figure": k, "this checkout (median)": f"{s['now_median']:.4g}",
                     "other (median)": f"{s['other_median']:.4g}",
                     "per pair this/other - 1: median": f"{100 * s['ratio_median']:+.2f} %",
                     "mean": f"{100 * s['ratio_mean']:+.2f} %", "this higher": f"{s['now_higher']}/{s['pairs']}",
                     "90 % interval of the median": f"{100 * lo:+.2f} % .. {100 * hi:+.2f} %"})
    print_table(rows)


# ---------------------------------------------------------------- serve: `costmodel bench --serve`
# Self-contained (the sweep benchmark above does not use it): how fast `scheduler.simulate` runs one open-loop
# experiment and many closed-loop estimates in one vmapped call.

# The shared open-loop file's Llama-2-7B TP1 codegen run (vLLM 0.15.1, inference-perf): 3,000 + 6,000 requests
# over 1,200 s.
SERVE_OPEN_RECORD = {
    "id": "llama-2-7b-tp1-codegen", "model": "llama-2-7b", "gpu": "H100", "tp": 1, "weights": "bf16",
    "engine": {"version": "0.15.1", "max_num_batched_tokens": 2048, "max_num_seqs": 128, "max_model_len": 4096,
               "observed_kv_blocks": {"gpu_kv_blocks": 7463}},
    "workload": {"type": "inference_perf_shared_prefix", "stages": [{"rate": 5.0, "duration_s": 600},
                                                                    {"rate": 10.0, "duration_s": 600}],
                 "seed": 42, "num_unique_system_prompts": 11, "num_users_per_system_prompt": 4,
                 "system_prompt_len": 100, "question_len": 466, "output_len": 247, "enable_multi_turn_chat": True}}
# closed-loop estimates: one deployment's step model, every combination below (engine limits x workload)
SERVE_CLOSED_MODEL, SERVE_CLOSED_TP = "llama-3.1-70b", 4
STEADY_ESTIMATES = 100_000  # closed-loop steady-state estimates timed in one call
SERVE_CLOSED_GRID = {"concurrency": (4, 8, 16, 32), "input_tokens": (1024, 4096), "output_tokens": (128, 256),
                     "limits": ((2048, 256), (8192, 1024))}  # (max_num_batched_tokens, max_num_seqs)


def bench_serve(bench_data=None, closed_estimates: int = 4096, rounds: int = 4, reps: int = 3,
                progress: bool = False) -> dict:
    """Seconds per open-loop experiment (`SERVE_OPEN_RECORD`, after compilation, best of ``reps``) and
    closed-loop estimates per second: ``closed_estimates`` (deployment, concurrency, ISL, OSL) points of
    `SERVE_CLOSED_GRID` (repeated, each with its own random client start), each C clients x ``rounds``
    requests, in one vmapped `scheduler.simulate` call plus the per-point mean TTFT and TPOT (numpy), and
    again in one call per window (clients' bucket); wall and process CPU seconds are medians of ``reps``
    calls after a first (compiling) one.  Also the step model's share of a loop iteration: its
    ``DECODE_STEPS`` entries priced for every estimate in one vmapped call."""
    from . import scheduler as sch
    from . import serve as sv
    from . import workloads as wlm

    out = {}
    sim = sv.Simulator(bench_data)
    times, res = [], None
    for i in range(reps + 1):
        dep = sv.resolve(SERVE_OPEN_RECORD, "bench")
        t0 = time.perf_counter()
        (dep, res), = sim.run([dep])
        sv.statistics(dep, res)
        times.append(time.perf_counter() - t0)
        if progress:
            print(f"  open loop {'(compiling)' if i == 0 else ''}: {times[-1]:.2f} s", file=sys.stderr)
    out["open"] = {"requests": len(dep.requests), "engine_s": float(res["end_s"]), "steps": int(res["steps"]),
                   "iterations": int(res["iterations"]), "window": int(res["window"]),
                   "first_call_s": times[0], "s": min(times[1:])}

    # closed loop: the unique points priced once for their start spread, then repeated with other seeds
    tables = load_tables(bench_data, get_gpu(GPU))
    su = setup(load_model(SERVE_CLOSED_MODEL), tables, SERVE_CLOSED_TP)
    from ..fastlookup import as_scalars, of_setup
    lk = of_setup(su)
    import dataclasses
    lk = dataclasses.replace(lk, int_tokens=True)
    sm = sch.StepModel(lk, as_scalars(su.on_gpu), as_scalars(Params()))
    g = SERVE_CLOSED_GRID
    points = [(c, i, o, lim) for c in g["concurrency"] for i in g["input_tokens"] for o in g["output_tokens"]
              for lim in g["limits"]]
    base = []
    for c, isl, osl, (tokens, seqs) in points:
        rec = {"id": "p", "model": SERVE_CLOSED_MODEL, "gpu": GPU, "tp": SERVE_CLOSED_TP,
               "engine": {"version": "0.12.0", "max_num_batched_tokens": tokens, "max_num_seqs": seqs},
               "workload": {"type": "closed", "concurrency": c, "input_tokens": isl, "output_tokens": osl}}
        dep = sv.resolve(rec, "bench", workload_options={"rounds": rounds})
        base.append((dep, sim.request_duration_s(dep, su.static, lk, sm.on, sm.params)))
    client = sim.options.client_ms / 1e3
    stack = lambda xs: jax.tree_util.tree_map(lambda *a: np.stack(a), *xs)  # noqa: E731

    def call(members, threads: bool = False):
        """One vmapped `scheduler.simulate` call of the estimates ``members`` (indices): padded to their largest
        request count and window, one step model (tables and parameters) shared by all of them.  ``threads``:
        instead, one un-vmapped call per estimate (the same padding) on `compiled.cpu_workers` threads, as
        `serve` runs them on CPU."""
        R = max(len(base[n % len(base)][0].requests) for n in members)
        U = max(base[n % len(base)][0].requests.n_users for n in members)
        W = min(sv._bucket(2 * U, 16), R)
        wls, engines, measured = [], [], []
        for n in members:
            dep, cycle = base[n % len(base)]
            r = wlm.stagger_start(dep.requests, cycle, seed=n)
            wls.append(sv._padded(r, R, 1))
            engines.append(sim.engine(dep))
            measured.append(np.pad(r.measured, (0, R - len(r))))
        wl_b, eng_b, measured = stack(wls), stack(engines), np.stack(measured)
        osl = wl_b.output_tokens.astype(np.float64)
        kw = dict(static=su.static, window=W, n_users=sv._bucket(U), n_groups=1,
                  max_iterations=sim.options.max_iterations)
        if threads:
            def fn(sm, eng_b, wl_b):
                return stack(parallel_map(lambda i: jax.tree_util.tree_map(np.asarray, sch.simulate(
                    sm, engines[i], wls[i], **kw)), range(len(members))))
        else:
            fn = jax.vmap(lambda s, e, w: sch.simulate(s, e, w, **kw), in_axes=(None, 0, 0))  # simulate is jitted

        def once():
            r = fn(sm, eng_b, wl_b)
            send, first, done = (np.asarray(x, np.float64) for x in (r.send_s, r.first_s, r.done_s))
            m = measured & np.isfinite(done)
            with np.errstate(invalid="ignore"):  # padding rows: inf - inf, masked out
                ttft_ms = np.sum(np.where(m, first - send + client, 0.0), 1) / np.sum(m, 1) * 1e3
                tpot_ms = np.sum(np.where(m, (done - first) / np.maximum(osl - 1, 1), 0.0), 1) / np.sum(m, 1) * 1e3
            return r, ttft_ms, tpot_ms

        t0 = time.perf_counter()
        once()
        first_s = time.perf_counter() - t0
        ts, cpu = [], []
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            r, ttft_ms, tpot_ms = once()
            ts.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        it = np.asarray(r.iterations)
        return {"estimates": len(members), "window": W, "requests_per_estimate_max": R, "first_call_s": first_s,
                "s": float(np.median(ts)), "cpu_s": float(np.median(cpu)), "iterations_max": int(it.max()),
                "iterations_mean": float(it.mean()), "steps_mean": float(np.mean(np.asarray(r.steps))),
                "complete": bool(np.all(np.asarray(r.complete))), "overflow": bool(np.any(np.asarray(r.overflow))),
                "ttft_ms": ttft_ms, "tpot_ms": tpot_ms}

    everything = list(range(closed_estimates))
    one = call(everything)
    threaded = call(everything, threads=True)
    threaded_same = bool(np.allclose(threaded["ttft_ms"], one["ttft_ms"], rtol=1e-5) and
                         np.allclose(threaded["tpot_ms"], one["tpot_ms"], rtol=1e-5))
    # the same estimates in one call per window (the clients' bucket), each padded to its own shapes only
    by_window: dict = {}
    for n in everything:
        by_window.setdefault(sv._bucket(2 * base[n % len(base)][0].requests.n_users, 16), []).append(n)
    parts = {w: call(m) for w, m in sorted(by_window.items())}
    same = all(np.allclose(p["ttft_ms"], one["ttft_ms"][m], rtol=1e-5) and
               np.allclose(p["tpot_ms"], one["tpot_ms"][m], rtol=1e-5) for p, m in zip(parts.values(),
                                                                                     by_window.values()))
    # the step model's own share: pricing the loop's ``DECODE_STEPS`` entries of one iteration, vmapped
    price = jax.jit(jax.vmap(jax.vmap(lambda *b: sch._step_us(sm, su.static, *b))))
    k = sch.DECODE_STEPS
    rng = np.random.default_rng(0)
    n_dec = rng.integers(1, 33, (closed_estimates, k)).astype(np.float32)
    args = (n_dec, n_dec * 2000.0, (rng.random((closed_estimates, k)) < 0.1).astype(np.float32))
    args += (args[2] * 1024.0, args[2] * 1024.0 * 1536.0)
    jax.block_until_ready(price(*args))
    pt = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(price(*args))
        pt.append(time.perf_counter() - t0)
    # the closed-loop steady state (`steady`) of the same points, many of them in one vmapped call
    from . import steady
    n_steady = max(closed_estimates, STEADY_ESTIMATES)
    pts = [base[n % len(base)][0] for n in range(n_steady)]
    engines = [sim.engine(d) for d in pts]
    cl = steady.ClosedLoop(*(np.asarray(v, np.float32) for v in (
        [d.requests.n_users for d in pts], [d.requests.prompt_tokens[0] for d in pts],
        [d.requests.output_tokens[0] for d in pts])), stack(engines))
    fn = steady.compiled(su.static)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(sm, cl))
    steady_first = time.perf_counter() - t0
    st_times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        est = jax.block_until_ready(fn(sm, cl))
        st_times.append(time.perf_counter() - t0)
    sim_tpot = [np.median(one["tpot_ms"][[n for n in everything if n % len(base) == i]]) for i in range(len(base))]
    diff = [100 * (float(est.tpot_s[i]) * 1e3 / sim_tpot[i] - 1) for i in range(len(base))]
    out["steady"] = {"estimates": n_steady, "first_call_s": steady_first, "s": float(np.median(st_times)),
                     "estimates_per_s": n_steady / float(np.median(st_times)),
                     "tpot_vs_simulation_median_abs_pct": float(np.median(np.abs(diff))),
                     "tpot_vs_simulation_max_abs_pct": float(np.max(np.abs(diff)))}
    iters = one["iterations_max"]
    out["closed"] = {"estimates": closed_estimates, "unique_points": len(points), "model": SERVE_CLOSED_MODEL,
                     "tp": SERVE_CLOSED_TP, "rounds": rounds, "requests_per_estimate_max": one["requests_per_estimate_max"],
                     "window": one["window"],
                     "requests": int(sum(len(d.requests) for d, _ in base) * closed_estimates / len(base)),
                     "iterations_max": iters, "iterations_mean": one["iterations_mean"],
                     "steps_mean": one["steps_mean"], "complete": one["complete"], "overflow": one["overflow"],
                     "first_call_s": one["first_call_s"], "s": one["s"], "cpu_s": one["cpu_s"],
                     "estimates_per_s": closed_estimates / one["s"],
                     "us_per_estimate_iteration": one["s"] / closed_estimates / iters * 1e6,
                     "decode_steps": k, "step_model_us_per_iteration": float(np.median(pt)) / closed_estimates * 1e6,
                     "ttft_ms_median": float(np.median(one["ttft_ms"])),
                     "tpot_ms_median": float(np.median(one["tpot_ms"])),
                     "by_window": {str(w): {k: v for k, v in p.items() if k not in ("ttft_ms", "tpot_ms")}
                                   for w, p in parts.items()},
                     "by_window_s": sum(p["s"] for p in parts.values()),
                     "by_window_first_call_s": sum(p["first_call_s"] for p in parts.values()),
                     "by_window_estimates_per_s": closed_estimates / sum(p["s"] for p in parts.values()),
                     "by_window_same_results": bool(same),
                     "threads": cpu_workers(), "threaded_s": threaded["s"], "threaded_cpu_s": threaded["cpu_s"],
                     "threaded_first_call_s": threaded["first_call_s"],
                     "threaded_estimates_per_s": closed_estimates / threaded["s"],
                     "threaded_same_results": threaded_same}
    dev = jax.local_devices()
    out.update(platform=f"{dev[0].platform} x{len(dev)}", cpu_count=os.cpu_count(), jax=jax.__version__)
    return out


def print_serve(r: dict) -> None:
    o, c = r["open"], r["closed"]
    print(f"costmodel bench --serve: {r['platform']} ({r['cpu_count']} cores)")
    print(f"  open loop ({SERVE_OPEN_RECORD['id']}, {o['requests']:,} requests, {o['engine_s']:,.0f} s of engine "
          f"time, {o['steps']:,} steps in {o['iterations']:,} loop iterations, window {o['window']}): "
          f"{o['s']:.2f} s after compilation (first call {o['first_call_s']:.1f} s)")
    print(f"  closed loop ({c['model']} TP {c['tp']}, {c['estimates']:,} estimates of C clients x {c['rounds']} "
          f"requests, {c['requests']:,} requests, {c['iterations_mean']:,.0f} loop iterations on average, at most "
          f"{c['iterations_max']:,}, window {c['window']}): {c['s']:.2f} s in one vmapped call "
          f"(CPU {c['cpu_s']:.2f} s) = {c['estimates_per_s']:,.0f} estimates/s (first call {c['first_call_s']:.1f} s)"
          f"{'' if c['complete'] else '  INCOMPLETE'}{'  OVERFLOW' if c['overflow'] else ''}")
    print(f"    {c['us_per_estimate_iteration']:.1f} us per estimate and loop iteration, of which the step model "
          f"(pricing an iteration's {c['decode_steps']} entries) {c['step_model_us_per_iteration']:.2f} us")
    st = r["steady"]
    print(f"  closed-loop steady state (the same points, mean field, `apps.steady`): {st['estimates']:,} estimates "
          f"in {st['s']:.3f} s in one vmapped call = {st['estimates_per_s']:,.0f} estimates/s (first call "
          f"{st['first_call_s']:.1f} s); mean TPOT vs the simulation's: median |difference| "
          f"{st['tpot_vs_simulation_median_abs_pct']:.1f} %, at most {st['tpot_vs_simulation_max_abs_pct']:.1f} %")
    parts = ", ".join(f"window {w}: {p['estimates']:,} in {p['s']:.2f} s ({p['iterations_max']:,} iterations)"
                      for w, p in c["by_window"].items())
    print(f"  one call per window ({parts}): {c['by_window_s']:.2f} s = {c['by_window_estimates_per_s']:,.0f} "
          f"estimates/s (first calls {c['by_window_first_call_s']:.1f} s); same TTFT and TPOT as the single call: "
          f"{'yes' if c['by_window_same_results'] else 'NO'}")
    print(f"  one un-vmapped call per estimate on {c['threads']} threads (as `serve` runs them on CPU): "
          f"{c['threaded_s']:.2f} s (CPU {c['threaded_cpu_s']:.2f} s) = {c['threaded_estimates_per_s']:,.0f} "
          f"estimates/s (first call {c['threaded_first_call_s']:.1f} s); same TTFT and TPOT as the vmapped call: "
          f"{'yes' if c['threaded_same_results'] else 'NO'}")


# ---------------------------------------------------------------- search: `costmodel bench --search`
# The three AIConfigurator queries of issue #17, run with `search.search` and, when it can be run, with
# AIConfigurator's own ``aiconfigurator cli default`` (a separate package, never a dependency: run from the
# Python given by --aiconfigurator-python, or this one when it imports ``aiconfigurator``).  Its fp8 query
# reads a local copy of its Llama-3.1-70B config with an fp8 ``quantization_config`` (its default mode infers
# the precision from the model config); query (c)'s ISL/OSL and SLOs are not given by the issue: those of (a).

SEARCH_QUERIES = {
    "a": {"model": "llama-3.1-70b", "gpu": "H100", "gpus": 8, "isl": 4000, "osl": 500, "ttft_ms": 1000.0,
          "tpot_ms": 30.0, "weights": ["bf16"],
          "aiconfigurator": {"model_path": "meta-llama/Meta-Llama-3.1-70B", "system": "h100_sxm"}},
    "b": {"model": "llama-3.1-70b", "gpu": "H100", "gpus": 8, "isl": 1024, "osl": 1024, "ttft_ms": 1000.0,
          "tpot_ms": 30.0, "weights": ["fp8"],
          "aiconfigurator": {"model_path": "meta-llama/Meta-Llama-3.1-70B", "system": "h100_sxm", "fp8": True}},
    "c": {"model": "deepseek_v3", "gpu": "H200", "gpus": 8, "isl": 4000, "osl": 500, "ttft_ms": 1000.0,
          "tpot_ms": 30.0, "weights": None,
          "aiconfigurator": {"model_path": "deepseek-ai/DeepSeek-V3", "system": "h200_sxm"}},
}
AIC_TIMEOUT_S = 900


def aiconfigurator_python(given: str | None = None) -> str | None:
    """The Python that runs AIConfigurator: ``given``, else this one when ``aiconfigurator`` imports here, else
    None."""
    import importlib.util
    if given:
        return given
    return sys.executable if importlib.util.find_spec("aiconfigurator") else None


def _search_front(rows: list[dict]) -> list[dict]:
    """Brief Pareto rows of ours (tokens/s per GPU, per user, TTFT, TPOT, layout)."""
    def engine(r):
        kv = r.get("kv_cache_dtype", "auto")
        return (f" kv {kv}" if kv != "auto" else "") + (f" budget {r['max_num_batched_tokens']} seqs "
                                                        f"{r['max_num_seqs']}" if "max_num_seqs" in r else "")
    return [{"layout": f"{r['layout']} {r['weights']}{engine(r)} c{r['concurrency_per_replica']}",
             "tok_s_gpu": r["output_tokens_per_s_per_gpu"], "tok_s_user": r["output_tokens_per_s_per_user"],
             "ttft_ms": r["ttft_mean_ms"], "tpot_ms": r["tpot_mean_ms"]} for r in rows]


def run_our_search(q: dict, model_configs=None, bench_data=None, rounds: int | None = None) -> dict:
    """`search.search` on one query, twice in this process: the first call compiles, the second is timed
    (``seconds``); ``compile_seconds`` the difference.  A model the step model refuses gives ``refused``."""
    from . import search as sr
    kw = dict(isl=q["isl"], osl=q["osl"], ttft_ms=q["ttft_ms"], tpot_ms=q["tpot_ms"], weights=q["weights"],
              model_configs=model_configs, bench_data=bench_data, workload_options={"rounds": rounds}, screen=True)
    try:
        t0 = time.perf_counter()
        sr.search(q["model"], q["gpu"], q["gpus"], **kw)
        first = time.perf_counter() - t0
    except InputError as e:
        return {"refused": str(e)}
    t0 = time.perf_counter()
    res = sr.search(q["model"], q["gpu"], q["gpus"], **kw)
    took = time.perf_counter() - t0
    feas = res.feasible
    return {"configurations_considered": res.scored + len(res.rejected), "configurations_scored": res.scored,
            "configurations_simulated": len(res.rows), "screen_seconds": res.screen_seconds,
            "feasible": len(feas), "seconds": took, "compile_seconds": max(first - took, 0.0),
            "best": _search_front(feas[:1])[0] if feas else None, "pareto": _search_front(res.pareto)}


def _aic_layout(r: dict, mode: str) -> str:
    if mode == "disagg":
        return (f"disagg {int(r['(p)workers'])}x prefill {r['(p)parallel']} + {int(r['(d)workers'])}x decode "
                f"{r['(d)parallel']} c{int(r['concurrency'])}")
    return f"agg {r['parallel']} c{int(r['concurrency'])}"


def run_aiconfigurator(q: dict, python: str, workdir, timeout_s: float = AIC_TIMEOUT_S) -> dict:
    """``aiconfigurator cli default`` on one query in a subprocess: its configurations per mode (from its log),
    its own reported seconds and the wall time, and its Pareto front within the SLOs (its ``pareto.csv``
    files, tokens/s per GPU of the whole cluster against tokens/s per user)."""
    import re

    import pandas as pd
    from .search import pareto_mask
    a = q["aiconfigurator"]
    workdir = Path(workdir)
    model_path = a["model_path"]
    if a.get("fp8"):  # its default mode takes the precision from the model config
        cfg = subprocess.run([python, "-c", "import json, sys, aiconfigurator_core, pathlib; p = pathlib.Path("
                              "aiconfigurator_core.__file__).parent / 'model_configs' / (sys.argv[1].replace('/', "
                              "'--') + '_config.json'); print(p.read_text())", model_path],
                             capture_output=True, text=True, timeout=120)
        if cfg.returncode:
            return {"failed": f"its config of {model_path}: {cfg.stderr.strip().splitlines()[-1:]}"}
        local = workdir / (model_path.split("/")[-1] + "-fp8")
        local.mkdir(parents=True, exist_ok=True)
        c = json.loads(cfg.stdout)
        c["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
        (local / "config.json").write_text(json.dumps(c))
        model_path = str(local)
    save = workdir / "out"
    cmd = [python, "-c", "import sys; from aiconfigurator.main import main; sys.exit(main(sys.argv[1:]))",
           "cli", "default", "--model-path", model_path, "--total-gpus", str(q["gpus"]), "--system", a["system"],
           "--backend", "vllm", "--isl", str(q["isl"]), "--osl", str(q["osl"]), "--ttft", f"{q['ttft_ms']:g}",
           "--tpot", f"{q['tpot_ms']:g}", "--save-dir", str(save)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"failed": f"no answer in {timeout_s:g} s"}
    wall = time.perf_counter() - t0
    log = p.stdout + p.stderr
    counts = {m: int(n) for m, n in re.findall(r"Experiment (\w+) completed with (\d+) results", log)}
    own = re.findall(r"All experiments completed in ([\d.]+) seconds", log)
    if p.returncode or not counts:
        last = [ln for ln in log.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        return {"failed": f"exit status {p.returncode}: {last[0][:300]}", "seconds": wall}
    rows = []
    for mode in counts:
        for f in save.glob(f"**/{mode}/pareto.csv"):
            df = pd.read_csv(f)
            df = df[(df["ttft"] <= q["ttft_ms"]) & (df["tpot"] <= q["tpot_ms"])]
            rows += [{"layout": _aic_layout(r, mode), "tok_s_gpu": float(r["tokens/s/gpu_cluster"]),
                      "tok_s_user": float(r["tokens/s/user"]), "ttft_ms": float(r["ttft"]),
                      "tpot_ms": float(r["tpot"])} for r in df.to_dict("records")]
    mask = pareto_mask([r["tok_s_gpu"] for r in rows], [r["tok_s_user"] for r in rows])
    front = sorted((r for r, on in zip(rows, mask) if on), key=lambda r: -r["tok_s_gpu"])
    return {"configurations_scored": sum(counts.values()), "by_mode": counts, "seconds": wall,
            "reported_seconds": float(own[-1]) if own else None, "best": front[0] if front else None,
            "pareto": front}


def bench_search(names=("a", "b", "c"), queries: dict | None = None, model_configs=None, bench_data=None,
                 aic_python: str | None = None, rounds: int | None = None, progress: bool = False) -> dict:
    """Each query (`SEARCH_QUERIES`, or ``queries``) with `search.search` and, when ``aic_python`` is given,
    AIConfigurator: {name: {"query", "costmodel", "aiconfigurator"}}; ``aiconfigurator`` is {"skipped": why}
    without it."""
    import tempfile
    from ..model import shared_dir
    queries = queries or SEARCH_QUERIES
    if model_configs is None and (shared_dir() / "model_configs").is_dir():
        model_configs = shared_dir() / "model_configs"
    out = {}
    for name in names:
        q = queries[name]
        if progress:
            print(f"  query ({name}): {q['model']} on {q['gpus']} x {q['gpu']}, ISL {q['isl']} / OSL {q['osl']}",
                  file=sys.stderr)
        ours = run_our_search(q, model_configs, bench_data, rounds)
        if aic_python:
            with tempfile.TemporaryDirectory() as tmp:
                theirs = run_aiconfigurator(q, aic_python, tmp)
        else:
            theirs = {"skipped": "aiconfigurator is not importable here (--aiconfigurator-python PYTHON runs it "
                                 "from another environment)"}
        out[name] = {"query": {k: v for k, v in q.items() if k != "aiconfigurator"}, "costmodel": ours,
                     "aiconfigurator": theirs}
    return out


def print_search(r: dict) -> None:
    print("costmodel bench --search: issue #17's queries, costmodel search against AIConfigurator")
    for name, x in r.items():
        q, ours, theirs = x["query"], x["costmodel"], x["aiconfigurator"]
        print(f"({name}) {q['model']} {','.join(q['weights'] or ['checkpoint'])} on {q['gpus']} x {q['gpu']}, "
              f"ISL {q['isl']} / OSL {q['osl']}, TTFT <= {q['ttft_ms']:g} ms, TPOT <= {q['tpot_ms']:g} ms")
        if "refused" in ours:
            print(f"  costmodel: refused: {ours['refused']}")
        else:
            print(f"  costmodel:      {ours['configurations_scored']:6d} configurations scored by the steady state "
                  f"({ours['configurations_considered']} considered) in {ours['screen_seconds']:.2f} s, "
                  f"{ours['configurations_simulated']} of them simulated; {ours['seconds']:7.2f} s in all after "
                  f"compilation, tables loaded (compile {ours['compile_seconds']:.1f} s)")
        if "configurations_scored" in theirs:
            print(f"  aiconfigurator: {theirs['configurations_scored']:6d} configurations scored "
                  f"({', '.join(f'{n} {m}' for m, n in theirs['by_mode'].items())}) in {theirs['seconds']:7.2f} s "
                  f"wall (it reports {theirs['reported_seconds']} s)")
            if "seconds" in ours:
                print(f"  ratio: {ours['configurations_scored'] / theirs['configurations_scored']:.2f}x the "
                      f"configurations, {theirs['seconds'] / ours['seconds']:.2f}x sooner in all "
                      f"({theirs['seconds'] / max(ours['screen_seconds'], 1e-9):.0f}x for the screening alone; "
                      f"issue #17 asks >= 100x and >= 10x)")
        else:
            print(f"  aiconfigurator: {theirs.get('skipped') or theirs.get('failed')}")
        for who, res in (("costmodel", ours), ("aiconfigurator", theirs)):
            if res.get("pareto"):
                print(f"  {who} Pareto front within the SLOs (best first):")
                print_table([{"layout": p["layout"], "tok_s_gpu": p["tok_s_gpu"], "tok_s_user": p["tok_s_user"],
                              "ttft_ms": p["ttft_ms"], "tpot_ms": p["tpot_ms"]} for p in res["pareto"]])
