"""Serving estimates: TTFT, TPOT/ITL, E2E, throughput and KV-cache use of a deployment under load —
``costmodel serve``.

Each record (the schema of the shared ``serving_*.jsonl`` files; its ``measured`` block is ignored) names a
model, a GPU, a parallel layout, an engine and a workload.  The workload becomes request arrays
(`workloads`), the engine vLLM V1's scheduler over engine steps (`scheduler.simulate`), each step priced by
the step model (`step.batch_features` / `step.combine` on the deployment's `fastlookup.FastLookup`), and
the per-request times client-side statistics as the benchmarks computed them.  What is and is not
modelled: docs/serving.md.

Client-side time is two physical terms: ``ingress_ms`` from the client's send to the scheduler seeing the
request (HTTP, tokenization, hand-off to the engine core; the isolated requests show 1.8-2.0 ms of server
queueing and scheduling before the first step), and ``client_ms`` added once to TTFT and E2E (HTTP and
streaming both ways and the client's own work; client TTFT - server TTFT = 9 ms in the isolated requests).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from dataclasses import dataclass, field

import jax
import numpy as np

from .. import memory, ops, sampling
from ..calibration import resolve_calibration, serving_terms
from ..compiled import first_alone, jit, parallel_map
from ..errors import InputError
from ..io import (add_pricing_arguments, atomic_write, check_output_file, number, print_table,
    read_json_lines, refuse_overwrite)
from ..fastlookup import TOKEN_TABLE, as_scalars, common_shapes, of_setup
from ..hardware import GPU, get_gpu
from ..model import load_arch, load_model
from ..params import Params, engine_key, engine_version
from ..step import setup
from ..tables import load_tables
from . import plotting
from .records import KV_CACHE_DTYPES
from . import scheduler as sch
from . import workloads as wl_mod

ASYNC_SCHEDULING_SINCE = (0, 14)  # vLLM schedules asynchronously by default from v0.14.0
BLOCK_TOKENS = 16
INGRESS_MS = 2.0
CLIENT_MS = 9.0
STAGE_INTERVAL_S = 1.0  # inference-perf's default pause between load stages
LATENCY_PERCENTILES = (50, 90, 99)  # of TTFT, TPOT and E2E over the measured requests
METRICS = ("ttft_mean_ms", "tpot_mean_ms", "itl_mean_ms", "e2e_mean_ms") + tuple(
    f"{m}_p{q}_ms" for m in ("ttft", "tpot", "e2e") for q in LATENCY_PERCENTILES)
# weights a record may name for the whole model; a mixture-of-experts model whose checkpoint stores its routed
# experts in another precision (gpt-oss: mxfp4) is also accepted under that name, as the checkpoint is
WEIGHT_DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp8": "fp8"}


# ---------------------------------------------------------------- engine settings

def _kind(expert_dtype: str) -> str:
    """A record's name for an expert precision: fp8 covers per-tensor and 128x128 block-scaled fp8 (a
    record's ``moe_weights: fp8`` keeps a block-scaled checkpoint's blocks)."""
    return "fp8" if expert_dtype == "fp8_block" else expert_dtype


def default_batch_limits(gpu: GPU) -> tuple[int, int]:
    """vLLM V1's defaults for the OpenAI server (engine/arg_utils.py): 8192 tokens and 1024 sequences per
    step on GPUs with >= 70 GiB (except A100), else 2048 and 256."""
    big = gpu.hbm_capacity_bytes * 2**30 / 1e9 >= 70 * 2**30 and "A100" not in gpu.name
    return (8192, 1024) if big else (2048, 256)


CLOSED_LOOP_LIMITS = ("aiconfigurator", "vllm")  # where a closed loop's missing engine limits come from
BENCHMARK_EXTRA_TOKENS = 1500  # AIConfigurator's benchmark budget: batch size + ISL + this many tokens


def benchmark_limits(workload, replicas: int = 1) -> tuple[int, int] | None:
    """The engine limits AIConfigurator's generator gives the vLLM workers it benchmarks at a fixed
    concurrency (its ``rule_plugin/benchmark/vllm.rule``, aggregated workers): ``max_num_seqs`` = the
    worker's batch size B = ceil(C / replicas) of a closed loop's C clients, and ``max_num_batched_tokens`` =
    B + ISL + 1500, as (max_num_batched_tokens, max_num_seqs); None for a workload that is not a well-formed
    closed loop."""
    if not isinstance(workload, dict) or workload.get("type") != "closed":
        return None
    c, isl = workload.get("concurrency"), workload.get("input_tokens")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (c, isl)):
        return None
    b = rank_clients(c, replicas)
    return b + isl + BENCHMARK_EXTRA_TOKENS, b


def kv_capacity(arch, gpu: GPU, tp: int, moe_ep: int, engine: dict, weights: str | None = None,
                moe_weights: str | None = None, attention_dp: int = 1, pp: int = 1) -> memory.KVCapacity:
    """The memory model's KV-cache capacity of a deployment (`memory.kv_capacity_tokens`: weights,
    profile-run activations, non-torch memory and, from vLLM 0.21, CUDA graphs) at the engine's
    ``gpu_memory_utilization`` and batch limits (vLLM's defaults where the engine gives none); with
    ``attention_dp`` > 1 one rank's (its tp GPUs hold the attention weights and 1/(tp x attention_dp) of the
    experts); the KV cache in the engine's ``kv_cache_dtype`` (default auto: the model's bf16/fp16); with
    ``pp`` stages the tokens the most loaded stage holds."""
    tokens, seqs = default_batch_limits(gpu)
    return memory.kv_capacity_tokens(arch, memory.Layout(tp=tp, pp=pp, moe_ep=moe_ep, attention_dp=attention_dp),
                                     gpu,
                                     engine.get("gpu_memory_utilization") or 0.9,
                                     max_num_batched_tokens=engine.get("max_num_batched_tokens") or tokens,
                                     max_num_seqs=engine.get("max_num_seqs") or seqs, weights=weights,
                                     moe_weights=moe_weights, kv_cache_dtype=engine.get("kv_cache_dtype") or "auto")


def estimate_kv_blocks(arch, gpu: GPU, tp: int, moe_ep: int, engine: dict, weights: str | None = None,
                       moe_weights: str | None = None, attention_dp: int = 1, pp: int = 1) -> int:
    """KV-cache blocks of a deployment (one attention-DP rank's) whose record gives none
    (``engine.observed_kv_blocks``), from the memory model (`kv_capacity`); blocks of the full-attention pool
    the scheduler draws from."""
    cap = kv_capacity(arch, gpu, tp, moe_ep, engine, weights, moe_weights, attention_dp, pp)
    return max(cap.tokens // BLOCK_TOKENS, 0)


@dataclass
class Deployment:
    """A record resolved to what the simulation needs."""

    id: str
    where: str
    record: dict
    model: object
    gpu: GPU
    tp: int
    engine_version: str | None
    max_batched_tokens: int
    max_seqs: int
    kv_blocks: int
    kv_source: str
    prefix_caching: bool
    async_scheduling: bool
    max_model_len: int | None
    requests: wl_mod.Requests
    notes: list = field(default_factory=list)
    moe_ep: int = 1  # GPUs of the expert group (tp x attention_dp) a mixture-of-experts model's experts span
    attention_dp: int = 1  # engine-core ranks of tp GPUs each; the simulation is one rank's (`rank_workload`)
    load_share: float = 1.0  # the deployment's load over the simulated rank's: totals are the rank's x this
    dp: int = 1  # whole replicas (independent engines) behind a round-robin router
    kv_cache_dtype: str = "auto"  # `records.KV_CACHE_DTYPES`: priced from the matching attention tables
    pp: int = 1  # pipeline stages of tp GPUs; the simulation is one of pp interleaved batch lanes
    think_s: float = 0.0  # a closed-loop client's time elsewhere between this engine's answer and its next
    #                       request (the other pool of a disaggregated deployment), not part of the latency
    sampling: tuple = ()  # the record's ``sampling`` (`sampling.parse`) as items, over the model's defaults

    @property
    def gpus(self) -> int:
        """Every GPU of the deployment (the simulated lane or rank carries 1/load_share of its load)."""
        return self.tp * self.pp * self.attention_dp * self.dp


class Refusal(Exception):
    """A record this version cannot price (the reason is reported in its output line)."""


def _num(v, where, name, kind=int, minimum=1):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)) or v < minimum:
        raise InputError(f"must be a {'positive integer' if kind is int else 'positive number'}, got {v!r}",
                         where, name)
    return kind(v)


def rank_clients(clients, ranks):
    """Closed-loop clients of the busiest of ``ranks`` balanced ranks or lanes: ceil(clients / ranks) (ints or
    integer arrays)."""
    return -(-clients // ranks)


def lane_kv_blocks(kv_blocks: int, pp: int) -> int:
    """KV blocks of one of the ``pp`` batch lanes of a pipelined engine: the lanes share the stages' cache."""
    return kv_blocks // pp


def rank_workload(w, ranks: int) -> tuple[dict, float]:
    """The workload one of ``ranks`` balanced engine ranks receives — attention-DP ranks (vLLM's data-parallel
    load balancer spreads requests over them) times whole replicas (a round-robin router) — and the
    deployment's load over it: a closed loop's C clients become ceil(C / N) (the busiest rank's), the load
    share C / ceil(C / N) (N where N divides C); an open loop's stage rates are divided by N, the share N
    (arrivals at rate / N of the record's process: for Poisson arrivals burstier than a round-robin split of
    one Poisson stream, so latency errs high).  A workload that is not a dict, or an unknown or malformed
    one, is returned as it is for `workloads.from_record` to refuse."""
    if ranks == 1 or not isinstance(w, dict):
        return w, 1.0
    c = w.get("concurrency")
    if w.get("type") == "closed" and isinstance(c, int) and not isinstance(c, bool) and c >= 1:
        per_rank = rank_clients(c, ranks)
        return {**w, "concurrency": per_rank}, c / per_rank
    stages = w.get("stages")
    if isinstance(stages, list) and all(isinstance(st, dict) and isinstance(st.get("rate"), (int, float))
                                        and not isinstance(st.get("rate"), bool) for st in stages):
        return {**w, "stages": [{**st, "rate": st["rate"] / ranks} for st in stages]}, float(ranks)
    return w, float(ranks)


def resolve(rec: dict, where: str, model_configs=None, kv_blocks_fn=None, workload_options=None) -> Deployment:
    """Validate a record and resolve its deployment; `Refusal` for what this version does not model,
    `InputError` for bad input.  ``workload_options``: `workloads.from_record`'s, ``sampling`` (the requests'
    sampling parameters where the record's own ``sampling`` leaves a key out), and ``closed_loop_limits``:
    where a closed loop's engine limits come from when its record gives none, ``"aiconfigurator"`` (default:
    `benchmark_limits`) or ``"vllm"`` (vLLM's defaults, `default_batch_limits`, as for other workloads)."""
    workload_options = dict(workload_options or {})
    limits = workload_options.pop("closed_loop_limits", CLOSED_LOOP_LIMITS[0])
    given = workload_options.pop("sampling", None)
    if limits not in CLOSED_LOOP_LIMITS:
        raise InputError(f"must be one of {', '.join(CLOSED_LOOP_LIMITS)}, got {limits!r}", where,
                         "closed_loop_limits")
    if not isinstance(rec, dict):
        raise InputError("a record must be a JSON object", where)
    for key in ("id", "model", "gpu", "workload"):
        if key not in rec:
            raise InputError("missing required field", where, key)
    mode = rec.get("mode", "agg")
    if mode != "agg":
        raise InputError(f"must be 'agg' or 'disagg', got {mode!r}", where, "mode")
    tp = _num(rec.get("tp", 1), where, "tp")
    pp = _num(rec.get("pp") or 1, where, "pp")
    dp = _num(rec.get("dp") or 1, where, "dp")
    dp_att = rec.get("attention_dp")
    dp_att = 1 if dp_att is None else dp_att  # checked with the layout (`ops.dims`)
    moe_ep = _num(rec.get("moe_ep") or 1, where, "moe_ep")
    try:
        gpu = get_gpu(rec["gpu"])
    except InputError as e:
        raise InputError(str(e), where, "gpu") from None
    weights = rec.get("weights")
    try:
        model = load_model(str(rec["model"]), model_configs)
    except InputError as e:
        raise Refusal(f"model {rec['model']}: {e}") from None
    if weights is not None and not (model.experts and weights == _kind(model.expert_dtype)
                                    and weights not in WEIGHT_DTYPES):
        if weights not in WEIGHT_DTYPES:
            raise Refusal(f"weights '{weights}' are not priced yet (bf16, fp16, fp8, or the routed experts' "
                          "own precision of a mixture-of-experts checkpoint)")
        model = model.with_dtype(WEIGHT_DTYPES[weights])
    moe_weights = rec.get("moe_weights")
    if moe_weights is not None and model.experts and moe_weights != _kind(model.expert_dtype):
        try:
            model = model.with_expert_dtype(moe_weights)
        except InputError as e:
            raise InputError(str(e), where, "moe_weights") from None
    try:
        ops.dims(model, tp, moe_ep, dp_att, pp)
        ops.check_moe_tp(model, tp, moe_ep, dp_att, rec.get("moe_tp"))
    except InputError as e:
        raise InputError(str(e), where) from None
    samp = sampling.fill(sampling.parse(rec["sampling"], where) if rec.get("sampling") is not None else None,
                         sampling.parse(given, where) if given else None)
    eng = rec.get("engine") or {}
    if not isinstance(eng, dict):
        raise InputError("must be an object", where, "engine")
    version = eng.get("version")
    bench = benchmark_limits(rec["workload"], dp) if limits == "aiconfigurator" else None
    d_tokens, d_seqs = bench or default_batch_limits(gpu)
    max_tokens = _num(eng.get("max_num_batched_tokens"), where, "engine.max_num_batched_tokens")
    max_seqs = _num(eng.get("max_num_seqs"), where, "engine.max_num_seqs")
    limit_notes = []
    if bench is not None and not (max_tokens and max_seqs):
        limit_notes.append(f"engine limits as AIConfigurator benchmarks a closed loop (the record gives none): "
                           f"max_num_seqs {max_seqs or d_seqs}, max_num_batched_tokens {max_tokens or d_tokens}")
    max_tokens, max_seqs = max_tokens or d_tokens, max_seqs or d_seqs
    block = _num(eng.get("block_size"), where, "engine.block_size") or BLOCK_TOKENS
    if block != BLOCK_TOKENS:
        raise Refusal(f"engine.block_size={block}: only 16-token blocks are modelled")
    if eng.get("chunked_prefill") is False:
        raise Refusal("chunked prefill disabled is not modelled yet")
    prefix = eng.get("prefix_caching")
    prefix = True if prefix is None else bool(prefix)
    is_async = eng.get("async_scheduling")
    if is_async is None:
        v = engine_version(version)
        is_async = v is not None and v >= ASYNC_SCHEDULING_SINCE
    util = _num(eng.get("gpu_memory_utilization"), where, "engine.gpu_memory_utilization", float, 0.0) or 0.9
    kv_dtype = eng.get("kv_cache_dtype") or "auto"
    if kv_dtype not in KV_CACHE_DTYPES:
        raise InputError(f"must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_dtype!r}", where,
                         "engine.kv_cache_dtype")
    max_model_len = _num(eng.get("max_model_len"), where, "engine.max_model_len")
    notes = limit_notes
    kind, src = model.sampler_filter(samp), "the given" if samp else "the model's"
    if kind != "none":
        notes.append(f"sampler: {kind.replace('_', '-')} filter over the {model.vocab_size:,}-entry vocabulary for every "
                     f"request ({src} sampling parameters; docs/serving.md)")
    elif not samp and model.sampling_defaults is None:
        notes.append("sampler: no top-k/top-p filter priced (the record gives no sampling and the model folder has no "
                     "generation_config.json, whose defaults vLLM would apply; docs/serving.md)")
    observed = (eng.get("observed_kv_blocks") or {}).get("gpu_kv_blocks")
    if observed is not None:
        kv_blocks, kv_source = _num(observed, where, "engine.observed_kv_blocks.gpu_kv_blocks"), "observed"
    else:
        if kv_blocks_fn is not None:
            kv_blocks = int(kv_blocks_fn(model, gpu, tp, eng))
        else:
            try:
                kv_blocks = estimate_kv_blocks(load_arch(str(rec["model"]), model_configs), gpu, tp, moe_ep,
                                               {**eng, "gpu_memory_utilization": util, "max_num_seqs": max_seqs,
                                                "max_num_batched_tokens": max_tokens}, model.dtype,
                                               model.expert_dtype or None, dp_att, pp)
            except InputError as e:
                raise Refusal(f"KV-cache capacity: {e}") from None
        kv_source = "estimated"
    if pp > 1:  # the pp batches in flight share the cache: each lane is simulated with its share
        kv_blocks = lane_kv_blocks(kv_blocks, pp)
        notes.append(f"pipeline parallelism: {pp} batches in flight, each simulated as a lane with 1/{pp} of the "
                     "requests and KV cache and the pipeline's full pass as its step (docs/serving.md)")
    if (eng.get("cpu_offload_gib") or 0) > 0:
        notes.append(f"CPU KV offload ({eng['cpu_offload_gib']} GiB) is not modelled")
    workload, share = rank_workload(rec["workload"], dp_att * dp * pp)
    requests = wl_mod.from_record(workload, where, max_model_len, **(workload_options or {}))
    if not len(requests):
        raise Refusal("the workload sends no request")
    if kv_blocks * BLOCK_TOKENS < int(requests.prompt_tokens.max()) + int(requests.output_tokens.max()):
        raise Refusal(f"{kv_blocks} KV blocks ({kv_source}) cannot hold one request")
    return Deployment(str(rec["id"]), where, rec, model, gpu, tp, version, max_tokens, max_seqs, kv_blocks,
                      kv_source, prefix, bool(is_async), max_model_len, requests, notes + requests.notes, moe_ep,
                      dp_att, share, dp, kv_dtype, pp, sampling=tuple(sorted(samp.items())))


# ---------------------------------------------------------------- simulation

@dataclass(frozen=True)
class Options:
    """The simulation's client- and host-side terms: ``ingress_ms`` and ``client_ms`` (module docstring),
    ``request_host_us`` the host's work per scheduled request per step that the engine does not overlap with
    the GPU (`scheduler.host_step_us`; None: the serving calibration's, `calibration.serving_terms`), and the load
    generator's pause between stages."""
    ingress_ms: float = INGRESS_MS
    client_ms: float = CLIENT_MS
    stage_interval_s: float = STAGE_INTERVAL_S
    request_host_us: float | None = None
    max_iterations: int = 2_000_000


def _bucket(n: int, lo: int = 1) -> int:
    return 1 << max(int(math.ceil(math.log2(max(n, lo, 1)))), 0)


def _window(dep: Deployment) -> int:
    """Requests scheduled per step, to start with: a closed loop's clients over two rounds, else 64 (the
    per-step work grows with it).  A run whose queue outgrows it is run again with a window four times as
    large (`scheduler.Result.overflow`)."""
    r = dep.requests
    need = 2 * r.n_users if r.kind == "closed" else 64
    return min(_bucket(need, 64), _bucket(len(r)))


class Simulator:
    """Loads tables, calibrations and step lookups once; runs deployments, vmapped where their shapes
    agree."""

    def __init__(self, bench_data=None, calibration: str = "default", allow_other_gpu: bool = False,
                 options: Options = Options()):
        self.bench_data, self.calibration, self.allow_other_gpu = bench_data, calibration, allow_other_gpu
        self._cal, self.calibration_used = {}, {}
        # step models are shared by the simulators of one process that read the same tables and calibration
        self._step_models = _STEP_MODELS.setdefault((str(bench_data), str(calibration), allow_other_gpu), {})
        if options.request_host_us is None:
            terms, desc = serving_terms(calibration)
            options = dataclasses.replace(options, request_host_us=terms["request_host_us"])
            self.calibration_used["serving host terms"] = desc
        else:
            self.calibration_used["serving host terms"] = f"request_host_us {options.request_host_us:g} (given)"
        self.options = options

    def tables(self, gpu: GPU):
        return _tables(self.bench_data, gpu)

    def params(self, gpu: GPU, version) -> Params:
        if gpu.name not in self._cal:
            cal, desc = resolve_calibration(self.calibration, [gpu.name], allow_other_gpu=self.allow_other_gpu,
                                       table_sources={gpu.name: self.tables(gpu).sources})
            self._cal[gpu.name] = cal.get(gpu.name)
            self.calibration_used[gpu.name] = desc
        c = self._cal[gpu.name]
        return c.params_for(engine_key(version)) if c else Params()

    def step_model(self, dep: Deployment):
        """(static, lookup, model on GPU, parameters) of a deployment's step model, built once per model, GPU,
        layout and calibration key and shared by the deployments that name them."""
        key = (dep.model, dep.gpu.name, dep.tp, dep.moe_ep, dep.attention_dp, dep.kv_cache_dtype, dep.pp,
               engine_key(dep.engine_version), dep.sampling)
        if key not in self._step_models:
            su = setup(dep.model, self.tables(dep.gpu), dep.tp, dep.moe_ep, attention_dp=dep.attention_dp,
                       kv_cache_dtype=dep.kv_cache_dtype, pp=dep.pp, sampling=dict(dep.sampling))
            self._step_models[key] = (su.static, of_setup(su), as_scalars(su.on_gpu),
                                      as_scalars(self.params(dep.gpu, dep.engine_version)))
        return self._step_models[key]

    def phase_s(self, dep: Deployment, static, lk, on, params, batch: float | None = None) -> tuple[float, float]:
        """(a prompt's prefill alone, a decode step of ``batch`` requests at the middle context) in seconds,
        host work included (step model); ``batch`` defaults to min(clients, max_num_seqs)."""
        r, o = dep.requests, self.options
        isl, osl = float(r.prompt_tokens[0]), float(r.output_tokens[0])
        b = float(min(r.n_users, dep.max_seqs) if batch is None else batch)
        d = ops.dims(dep.model, dep.tp, dep.moe_ep, dep.attention_dp, dep.pp)
        sm = sch.StepModel(lk, on, params)
        fn = _step_time_fn(static)
        pre = float(fn(sm, 0.0, 0.0, 1.0, isl, float(ops.prefill_pairs_tiled(d, isl, 0.0))))
        dec = float(fn(sm, b, b * float(ops.decode_keys(d, isl + osl / 2)), 0.0, 0.0, 0.0))
        return tuple(float(sch.host_step_us(t, n, o.request_host_us, dep.async_scheduling)) * 1e-6
                     for t, n in ((pre, 1.0), (dec, b)))

    def request_duration_s(self, dep: Deployment, static, lk, on, params) -> float:
        """One closed-loop request's duration from send to the client's reading its last token, with every
        client's request decoding beside it: ingress + its prefill alone + (OSL − 1) decode steps of
        min(C, max_num_seqs) requests at the middle context + client time (`phase_s`)."""
        o = self.options
        pre, dec = self.phase_s(dep, static, lk, on, params)
        return (o.ingress_ms + o.client_ms) / 1e3 + pre + (float(dep.requests.output_tokens[0]) - 1) * dec

    def engine(self, dep: Deployment) -> sch.Engine:
        o = self.options
        return sch.Engine(np.int32(dep.max_batched_tokens), np.int32(dep.max_seqs), np.int32(dep.kv_blocks),
                          np.int32(BLOCK_TOKENS), np.bool_(dep.prefix_caching), np.bool_(dep.async_scheduling),
                          np.float32(o.ingress_ms / 1e3), np.float32(o.client_ms / 1e3 + dep.think_s),
                          np.float32(o.stage_interval_s), np.float32(o.request_host_us))

    def run(self, deps: list[Deployment], batch: int | None = None) -> list[tuple[Deployment, dict]]:
        """Simulate every deployment; returns (deployment, per-request and engine results as numpy).

        Deployments of one step model run ``batch`` at a time in one vmapped call (default `sim_batch`: one on
        CPU, 16 on an accelerator), and those calls run on `compiled.cpu_workers` threads."""
        batch = batch or sim_batch()
        prepared = [(dep,) + self.step_model(dep) for dep in deps]
        for dep, static, lk, on, params in prepared:
            if dep.requests.kind == "closed" and dep.requests.start != "together":
                dep.requests = wl_mod.stagger_start(dep.requests, self.request_duration_s(dep, static, lk, on, params)
                                                    + dep.think_s)
        groups: dict = {}
        for p in prepared:
            groups.setdefault(p[1], []).append(p)
        chunks = []
        for static, members in groups.items():
            lookups = common_shapes([m[2] for m in members])
            int_tokens = all(m[0].max_batched_tokens + m[0].max_seqs <= TOKEN_TABLE for m in members)
            lookups = [dataclasses.replace(lk, int_tokens=int_tokens) for lk in lookups]
            items = [(m[0], sch.StepModel(lk, m[3], m[4])) for m, lk in zip(members, lookups)]
            # a vmapped chunk runs every member at the largest member's window, request count and loop
            # iterations: chunks of one window and request bucket, in order of expected work
            items.sort(key=lambda x: (x[0].requests.kind, _window(x[0]), _bucket(len(x[0].requests), 256),
                                      _expected_work(x[0])))
            chunks += [(static, items[lo:lo + batch]) for lo in range(0, len(items), batch)]
        out = {}
        # the longest first, so that the threads finish together
        chunks.sort(key=lambda c: -max(_expected_work(m[0]) * _window(m[0]) for m in c[1]))
        done = parallel_map(lambda c: self._run_chunk(*c), chunks)
        for (_, chunk), results in zip(chunks, done):
            for (dep, _), res in zip(chunk, results):
                out[id(dep)] = (dep, res)
        return [out[id(d)] for d in deps]

    def _run_chunk(self, static, chunk):
        deps = [c[0] for c in chunk]
        R = _bucket(max(len(d.requests) for d in deps), 256)
        W = min(max(_window(d) for d in deps), R)
        while True:
            out = self._run_window(static, chunk, R, W)
            if W >= R or not any(o["overflow"] for o in out):
                return out
            W = min(4 * W, R)

    def _run_window(self, static, chunk, R, W):
        deps = [c[0] for c in chunk]
        U = _bucket(max(d.requests.n_users for d in deps), 1)
        G = _bucket(max(d.requests.n_groups for d in deps), 1)
        S = max(len(d.requests.stage_requests) for d in deps)
        wls = [_padded(d.requests, R, S) for d in deps]
        engines = [self.engine(d) for d in deps]
        sms = [c[1] for c in chunk]
        kw = dict(static=static, window=W, n_users=U, n_groups=G, max_iterations=self.options.max_iterations)
        key = (len(chunk), R, S, tuple(sorted(kw.items())))  # the program: its first call runs alone
        to_numpy = functools.partial(jax.tree_util.tree_map, np.asarray)
        if len(chunk) == 1:
            res = [first_alone(key, lambda: to_numpy(sch.simulate(sms[0], engines[0], wls[0], **kw)))]
        else:
            stack = lambda xs: jax.tree_util.tree_map(lambda *a: np.stack(a), *xs)  # noqa: E731
            mapped = jax.vmap(lambda sm, e, w: sch.simulate(sm, e, w, **kw))
            # one transfer, then numpy slices (not one dispatch each)
            r = first_alone(key, lambda: to_numpy(mapped(stack(sms), stack(engines), stack(wls))))
            res = [jax.tree_util.tree_map(lambda a, i=i: a[i], r) for i in range(len(chunk))]
        out = []
        for d, rs in zip(deps, res):
            n = len(d.requests)
            rs = {k: np.asarray(v) for k, v in rs._asdict().items()}
            out.append({**{k: (v[:n] if v.ndim and v.shape[0] == R else v) for k, v in rs.items()}, "window": W})
        return out


_STEP_MODELS: dict = {}  # (bench_data, calibration, allow_other_gpu) -> `Simulator.step_model`'s cache


def sim_batch() -> int:
    """Deployments per vmapped simulation call: 1 on CPU, where a vmapped call costs as much per member as
    the members one by one (more when their steps fall out of line), 16 on an accelerator."""
    return 1 if jax.default_backend() == "cpu" else 16


@functools.lru_cache(maxsize=None)
def _tables(bench_data, gpu: GPU):
    """A GPU's tables, read once per process (they are not modified after loading)."""
    return load_tables(bench_data, gpu)


@functools.lru_cache(maxsize=None)
def _step_time_fn(static):
    return jit(lambda sm, n_dec, keys, n_pre, tokens, pairs: sch._step_us(sm, static, n_dec, keys, n_pre, tokens,
                                                                             pairs))


def _expected_work(dep: Deployment) -> float:
    r = dep.requests
    return float(r.output_tokens.sum()) / max(dep.max_seqs, 1)


def _padded(r: wl_mod.Requests, R: int, S: int) -> sch.Workload:
    n = len(r)

    def p(a, fill, dtype):
        out = np.full(R, fill, dtype)
        out[:n] = a
        return out
    stage_requests = np.zeros(S, np.int32)
    stage_requests[:len(r.stage_requests)] = r.stage_requests
    return sch.Workload(
        offset_s=p(r.offset_s, np.inf, np.float32), stage=p(r.stage, 0, np.int32), gate=p(r.gate, False, bool),
        succ=p(r.succ, -1, np.int32), prompt_tokens=p(r.prompt_tokens, 1, np.int32),
        output_tokens=p(r.output_tokens, 1, np.int32), user=p(r.user, -1, np.int32),
        group=p(r.group, -1, np.int32), sys_tokens=p(r.sys_tokens, 0, np.int32), reuse=p(r.reuse, False, bool),
        valid=p(np.ones(n, bool), False, bool), stage_requests=stage_requests,
        preloaded=p(0 if r.preloaded is None else r.preloaded, 0, np.int32))


# ---------------------------------------------------------------- statistics

def _latency_stats(ttft, e2e, out_tokens) -> dict:
    """Means and `LATENCY_PERCENTILES` (numpy's linear percentiles) in ms; ITL as the benchmarks' reports
    derive it, (mean E2E − mean TTFT) / (mean output tokens − 1); TPOT per request (E2E − TTFT) / (output
    tokens − 1), its mean and percentiles over the requests with more than one output token."""
    if len(ttft) == 0:
        return {k: None for k in METRICS}
    o = out_tokens.astype(np.float64)
    tpot = np.where(o > 1, (e2e - ttft) / np.maximum(o - 1, 1), 0.0)
    out = {"ttft_mean_ms": float(ttft.mean()), "tpot_mean_ms": float(tpot.mean()),
           "itl_mean_ms": float((e2e.mean() - ttft.mean()) / max(o.mean() - 1, 1)), "e2e_mean_ms": float(e2e.mean())}
    many = tpot[o > 1] if (o > 1).any() else tpot
    for name, v in (("ttft", ttft), ("tpot", many), ("e2e", e2e)):
        out.update({f"{name}_p{q}_ms": float(np.percentile(v, q)) for q in LATENCY_PERCENTILES})
    return out


def _requests_per_s(dep: Deployment, res: dict, m, e2e_s, client_s: float) -> float | None:
    """The deployment's requests per second from the measured requests ``m`` (E2E ``e2e_s`` with client time).
    Closed loop: each client sends its next request when it has read the last one (and spent ``think_s``
    elsewhere), so C clients complete C / (mean E2E + think) requests per second (Little's law: the steady
    rate, without the ramps at the start and end of the run).  Open loop: the requests answered over the
    span from the first send to the last answer."""
    r = dep.requests
    if not m.any():
        return None
    if r.kind == "closed":
        return r.n_users * dep.load_share / (float(np.mean(e2e_s)) + dep.think_s)
    send = res["send_s"].astype(np.float64)
    span = float(np.max(res["done_s"][m] + client_s) - np.min(send[m]))
    return float(m.sum()) * dep.load_share / span if span > 0 else None


def _latencies_ms(res: dict, client_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per request: TTFT and E2E at the client (ms), and whether it finished."""
    send = res["send_s"].astype(np.float64)
    return ((res["first_s"] - send + client_s) * 1e3, (res["done_s"] - send + client_s) * 1e3,
            np.isfinite(res["done_s"]))


def statistics(dep: Deployment, res: dict, options: Options = Options(), burst: dict | None = None) -> dict:
    """The record's output line (without ``id``): predictions under the keys of ``measured``, throughput,
    KV-cache use, and how the simulation went.  ``burst``: the results of the closed loop's
    `workloads.burst_round`, whose requests then weigh 1/R of the latency statistics, the simulation's last
    round (the drain, when measured) 1/R and its other measured rounds (R − 2)/R (R = ``benchmark_rounds``;
    without a measured drain they weigh (R − 1)/R), and so does the mean E2E the closed loop's rate follows
    from."""
    r = dep.requests
    client = options.client_ms / 1e3
    ttft, e2e, finished = _latencies_ms(res, client)
    m = r.measured & finished
    lat = (ttft[m], e2e[m], r.output_tokens[m])
    tb, eb, fb = _latencies_ms(burst, client) if burst is not None else (None, None, None)
    if burst is not None:
        # the benchmark's R rounds: the burst, R - 2 steady rounds and the drain (its last round, when clients
        # that are done leave the others a lighter engine); integer weights per request: steady R - 2, drain
        # and burst n (the simulation's n steady rounds); without a measured drain, all measured rounds R - 1
        C, R = r.n_users, r.benchmark_rounds
        drain = m & (np.arange(len(r)) // C == len(r) // C - 1)
        n = int(round((m & ~drain).sum() / C))
        if drain.any() and n >= 1 and R >= 2:
            parts = [(m & ~drain, R - 2), (drain, n)]
        else:
            parts, n = [(m, R - 1)], max(int(round(m.sum() / C)), 1)
        cols = [(ttft, e2e, r.output_tokens, mask, w) for mask, w in parts] + \
            [(tb, eb, r.output_tokens[:len(tb)], fb, n)]
        lat = tuple(np.concatenate([np.repeat(c[k][c[3]], c[4]) for c in cols]) for k in range(3))
    pred = _latency_stats(*lat)
    if r.kind == "open":
        pred["stages"] = [_latency_stats(ttft[m & (r.stage == s)], e2e[m & (r.stage == s)],
                                         r.output_tokens[m & (r.stage == s)]) for s in range(len(r.stage_requests))]
    req_s = _requests_per_s(dep, res, m, lat[1] / 1e3, client)
    out_s = req_s * float(r.output_tokens[m].mean()) if req_s else None
    tput = {"requests_per_s": req_s, "output_tokens_per_s": out_s,
            "output_tokens_per_s_per_gpu": out_s / dep.gpus if out_s else None,
            "output_tokens_per_s_per_user": (1e3 / pred["itl_mean_ms"]) if pred.get("itl_mean_ms") else None}
    end = float(res["end_s"])
    kv = {"blocks": dep.kv_blocks, "source": dep.kv_source,
          "mean_used": float(res["kv_block_s"]) / end / dep.kv_blocks if end > 0 else 0.0,
          "peak_used": float(res["kv_peak_blocks"]) / dep.kv_blocks,
          "prefix_hit_tokens_mean": float(res["hit_tokens"][m].mean()) if m.any() else 0.0,
          "preemptions": int(res["preemptions"].sum())}
    sim = {"requests": len(r), "measured_requests": int(m.sum()), "finished": int(finished.sum()),
           "rejected": r.rejected, "steps": int(res["steps"]), "engine_s": end,
           "busy_fraction": float(res["busy_s"]) / end if end > 0 else 0.0,
           "complete": bool(res["complete"]), "overflow": bool(res["overflow"]), "window": int(res["window"]),
           "async_scheduling": dep.async_scheduling, "max_num_batched_tokens": dep.max_batched_tokens,
           "max_num_seqs": dep.max_seqs, "attention_dp": dep.attention_dp, "dp": dep.dp, "pp": dep.pp,
           "load_share": dep.load_share}
    notes = list(dep.notes)
    if burst is not None:
        sim["benchmark_rounds"] = r.benchmark_rounds
        sim["burst_ttft_mean_ms"] = float(tb[fb].mean()) if fb.any() else None
        if not burst["complete"]:
            notes.append("the first-round burst's simulation stopped before every request finished")
    if not res["complete"]:
        notes.append("the simulation stopped before every request finished (iteration limit or a request "
                     "that can never be scheduled)")
    if res["overflow"]:
        notes.append("more requests waited than the simulation window holds: queueing is underestimated")
    return {"predicted": _round(pred), "throughput": _round(tput), "kv_cache": _round(kv), "simulation": sim,
            "notes": notes}


def _round(x):
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_round(v) for v in x]
    if isinstance(x, float):
        return round(x, 4) if math.isfinite(x) else None
    return x


# ---------------------------------------------------------------- disaggregated prefill and decode

POOL_FIELDS = ("num_workers", "tp_size", "pp_size", "attention_dp_size", "moe_tp_size", "moe_ep_size", "batch_size")
POOL_ENGINE_FIELDS = ("max_num_batched_tokens", "max_num_seqs")  # a pool's own engine limits, over ``engine``
DISAGG_ROUNDS = 3  # alternating simulations of the two pools at most (`run_disaggregated`)
DISAGG_DAMPING = 0.5  # weight of a round's simulated times in the next round's think times
DISAGG_SETTLED = 0.02  # ... stopping once Tp + Td (`run_disaggregated`) changed by at most this fraction
KV_TRANSFER_FIXED_MS = 1.0  # per request: the hand-off through the router and the transfer's set-up and notice
INTERNODE_BYTES_PER_S = 50e9  # one 400 Gb/s network adapter per GPU, one direction
GPUS_PER_NODE = 8


@dataclass
class Disaggregated:
    """A disaggregated deployment: ``prefill`` and ``decode`` are one rank of each pool, simulated as closed
    loops of their share of the ``clients`` (`run_disaggregated`); ``transfer_s`` moves one prompt's KV."""

    id: str
    where: str
    record: dict
    prefill: Deployment
    decode: Deployment
    clients: int
    transfer_s: float
    notes: list = field(default_factory=list)
    rounds: int = 0  # alternating rounds run
    rounds_change: float = float("nan")  # relative change of Tp + Td (`run_disaggregated`) in the last round

    @property
    def gpus(self) -> int:
        return self.prefill.gpus + self.decode.gpus


def _pool_record(rec: dict, role: str, where: str, clients: int, output_tokens: int) -> dict:
    """The aggregated record of one pool of a disaggregated record: its layout, ``num_workers`` replicas, the
    record's model, GPU, weights and engine, and a closed loop of the deployment's clients."""
    pool = rec.get(role)
    if not isinstance(pool, dict):
        raise InputError("must be an object with the pool's layout", where, role)
    for k in pool:
        if k not in POOL_FIELDS + POOL_ENGINE_FIELDS:
            raise InputError(f"unknown field (known: {', '.join(POOL_FIELDS + POOL_ENGINE_FIELDS)})", where,
                             f"{role}.{k}")
    eng = rec.get("engine") or {}
    if not isinstance(eng, dict):
        raise InputError("must be an object", where, "engine")
    own = {k: _num(pool[k], where, f"{role}.{k}") for k in POOL_ENGINE_FIELDS if pool.get(k) is not None}
    # AIConfigurator writes 0 for the expert split it leaves to the layout (`ops.check_moe_tp`)
    n = {k: _num(1 if pool.get(k) is None or (k == "moe_ep_size" and pool[k] == 0) else pool[k], where,
                 f"{role}.{k}") for k in POOL_FIELDS if k != "moe_tp_size"}
    moe_tp = pool.get("moe_tp_size") or None
    w = rec["workload"]
    return {**{k: v for k, v in rec.items() if k not in ("mode", "prefill", "decode", "dp")}, "mode": "agg",
            "engine": {**eng, **own}, "tp": n["tp_size"], "pp": n["pp_size"], "attention_dp": n["attention_dp_size"],
            "moe_ep": n["moe_ep_size"], "moe_tp": moe_tp, "dp": n["num_workers"],
            "workload": {"type": "closed", "concurrency": clients, "input_tokens": w.get("input_tokens"),
                         "output_tokens": output_tokens}}


def disaggregated_clients(rec: dict, where: str) -> tuple[int, str | None]:
    """A disaggregated closed loop's clients: ``workload.concurrency``, or when null AIConfigurator's
    convention for its disaggregated benchmarks, the decode pool's batch_size x num_workers x
    attention_dp_size (each decode rank running batch_size requests); the note says which."""
    w = rec.get("workload")
    if not isinstance(w, dict) or w.get("type") != "closed":
        raise Refusal("disaggregated deployments are modelled for closed-loop workloads only")
    if w.get("concurrency") is not None:
        return _num(w["concurrency"], where, "workload.concurrency"), None
    dec = rec.get("decode") if isinstance(rec.get("decode"), dict) else {}
    c = 1
    for k in ("batch_size", "num_workers", "attention_dp_size"):
        c *= _num(dec.get(k, 1) or 1, where, f"decode.{k}")
    return c, (f"workload.concurrency is null: {c} clients, the decode pool's batch_size x num_workers x "
               "attention_dp_size (AIConfigurator's convention)")


def kv_transfer_s(arch, gpu: GPU, decode_layout: dict, prompt_tokens: int, kv_cache_dtype: str,
                  same_node: bool) -> float:
    """Seconds to move one prompt's KV cache from a prefill worker to a decode worker: every decode GPU pulls
    its own share (`memory.kv_bytes_per_token` of the decode layout: its KV heads, its stage's layers, window
    caps at this length) over its own link at once, NVLink when both pools sit in one node (`same_node`:
    their GPUs together at most `GPUS_PER_NODE`), else one network adapter per GPU (`INTERNODE_BYTES_PER_S`),
    plus `KV_TRANSFER_FIXED_MS`."""
    per_gpu_bytes = prompt_tokens * memory.kv_bytes_per_token(arch, decode_layout, kv_cache_dtype,
                                                             context_tokens=prompt_tokens)
    link = gpu.nvlink_bytes_per_s if same_node else INTERNODE_BYTES_PER_S
    return KV_TRANSFER_FIXED_MS / 1e3 + per_gpu_bytes / link


def resolve_disaggregated(rec: dict, where: str, model_configs=None, kv_blocks_fn=None,
                          workload_options=None) -> Disaggregated:
    """Validate a ``mode: "disagg"`` record and resolve one rank of each pool (module section above)."""
    for key in ("id", "model", "gpu", "workload", "prefill", "decode"):
        if key not in rec:
            raise InputError("missing required field", where, key)
    for key in ("tp", "pp", "dp", "attention_dp", "moe_tp", "moe_ep"):
        if rec.get(key) is not None:
            raise InputError("a disaggregated record's layout is its pools' (prefill.tp_size, decode.tp_size, ...)",
                             where, key)
    clients, note = disaggregated_clients(rec, where)
    osl = rec["workload"].get("output_tokens")
    deps = {}
    for role, out in (("prefill", 1), ("decode", osl)):
        try:
            deps[role] = resolve(_pool_record(rec, role, where, clients, out), where, model_configs, kv_blocks_fn,
                                 {**(workload_options or {}), "closed_loop_limits": "vllm"})
        except Refusal as e:
            raise Refusal(f"{role} pool: {e}") from None
    pre, dec = deps["prefill"], deps["decode"]
    # the pools' clients are coupled through each other's steady times: no first-round burst
    pre.requests = dataclasses.replace(pre.requests, benchmark_rounds=0)
    dec.requests = dataclasses.replace(dec.requests, preloaded=dec.requests.prompt_tokens.copy(), benchmark_rounds=0)
    isl = int(dec.requests.prompt_tokens[0])
    layout = {"tp": dec.tp, "pp": dec.pp, "attention_dp": dec.attention_dp}
    gpus = pre.gpus + dec.gpus
    xfer = kv_transfer_s(load_arch(str(rec["model"]), model_configs), dec.gpu, layout, isl, dec.kv_cache_dtype,
                         gpus <= GPUS_PER_NODE)
    notes = [note] if note else []
    if note is None and rec["decode"].get("batch_size") is not None:
        notes.append("decode.batch_size is not used: workload.concurrency gives the clients")
    if (rec["prefill"].get("batch_size") or 1) != 1:
        notes.append("prefill.batch_size is not used: the token budget decides how many prompts a prefill step "
                     "carries")
    notes.append(f"disaggregated: {pre.dp} prefill worker(s) of {pre.gpus // pre.dp} GPUs and {dec.dp} decode "
                 f"worker(s) of {dec.gpus // dec.dp} GPUs; KV transfer {xfer * 1e3:.2f} ms per request over "
                 f"{'NVLink' if gpus <= GPUS_PER_NODE else 'the network'} (docs/serving.md)")
    return Disaggregated(str(rec["id"]), where, rec, pre, dec, clients, xfer, notes)


def _mean_duration_s(res: dict, r: wl_mod.Requests) -> float:
    """Mean time from a measured request's send to its last token (s)."""
    m = r.measured & np.isfinite(res["done_s"])
    return float(np.mean(res["done_s"][m] - res["send_s"][m])) if m.any() else float("nan")


def run_disaggregated(sim: Simulator, dds: list, batch: int | None = None) -> list[tuple[Disaggregated, dict, dict]]:
    """Simulate disaggregated deployments: (deployment, prefill result, decode result) each.

    A client's cycle is: send, the prefill worker's whole request (ingress, queue, prompt, first token: Tp),
    the KV transfer (Tx), the decode worker's request (ingress, queue, last prompt block, every output token:
    Td), client time, next send.  Each pool is a closed loop whose clients spend the rest of the cycle
    elsewhere (`Deployment.think_s`: Tx + Td for the prefill pool, Tp + Tx for the decode pool).  Tp and Td
    start from the step model's closed forms (`Simulator.request_duration_s`) and move halfway
    (`DISAGG_DAMPING`) to each round's simulations of both pools (every deployment's pools in one batched
    `Simulator.run`), until Tp + Td changes by at most `DISAGG_SETTLED` or after `DISAGG_ROUNDS` rounds (the
    returned results are the last round's; `Disaggregated.rounds_change` is its relative change, reported with a note when it
    exceeds `DISAGG_SETTLED`)."""
    if not dds:
        return []
    client_s = sim.options.client_ms / 1e3
    tp, td = {}, {}
    for dd in dds:
        tp[id(dd)] = sim.request_duration_s(dd.prefill, *sim.step_model(dd.prefill)) - client_s
        td[id(dd)] = sim.request_duration_s(dd.decode, *sim.step_model(dd.decode)) - client_s
    final, todo = {}, list(dds)
    for round_ in range(1, DISAGG_ROUNDS + 1):
        for dd in todo:
            dd.prefill.think_s = dd.transfer_s + td[id(dd)]
            dd.decode.think_s = tp[id(dd)] + dd.transfer_s
            dd.rounds = round_
        results = sim.run([d for dd in todo for d in (dd.prefill, dd.decode)], batch=batch)
        left = []
        for i, dd in enumerate(todo):
            rp, rd = results[2 * i][1], results[2 * i + 1][1]
            new_p = _mean_duration_s(rp, dd.prefill.requests)
            new_d = _mean_duration_s(rd, dd.decode.requests)
            # what the think times depend on: the client's cycle outside its client time
            dd.rounds_change = abs((new_p + new_d) / (tp[id(dd)] + td[id(dd)]) - 1.0)
            # damped: near a balance of the pools the undamped update swings between a prefill queue and none
            tp[id(dd)] = DISAGG_DAMPING * new_p + (1 - DISAGG_DAMPING) * tp[id(dd)]
            td[id(dd)] = DISAGG_DAMPING * new_d + (1 - DISAGG_DAMPING) * td[id(dd)]
            final[id(dd)] = (dd, rp, rd)
            if not dd.rounds_change <= DISAGG_SETTLED:
                left.append(dd)
        todo = left
        if not todo:
            break
    return [final[id(dd)] for dd in dds]


def disaggregated_statistics(dd: Disaggregated, res_p: dict, res_d: dict, options: Options = Options()) -> dict:
    """The output line of a disaggregated deployment: the decode pool's `statistics` with the client's
    latencies (TTFT = Tp + Tx + the decode worker's first token + client time; E2E = Tp + Tx + Td + client
    time; a prefill and a decode request paired in order, the pools' requests being independent), throughput
    per GPU over both pools, and each pool's own block under ``pools``."""
    pre, dec = dd.prefill, dd.decode
    out_p, out_d = statistics(pre, res_p, options), statistics(dec, res_d, options)
    mp = pre.requests.measured & np.isfinite(res_p["done_s"])
    md = dec.requests.measured & np.isfinite(res_d["done_s"])
    n = int(min(mp.sum(), md.sum()))
    t_p = (res_p["done_s"] - res_p["send_s"])[mp][:n].astype(np.float64)
    first_d = (res_d["first_s"] - res_d["send_s"])[md][:n].astype(np.float64)
    done_d = (res_d["done_s"] - res_d["send_s"])[md][:n].astype(np.float64)
    lead = t_p + dd.transfer_s + options.client_ms / 1e3
    pred = _latency_stats((lead + first_d) * 1e3, (lead + done_d) * 1e3, dec.requests.output_tokens[md][:n])
    tput = dict(out_d["throughput"])
    if tput.get("output_tokens_per_s"):
        tput["output_tokens_per_s_per_gpu"] = tput["output_tokens_per_s"] / dd.gpus
    tput["output_tokens_per_s_per_user"] = 1e3 / pred["itl_mean_ms"] if pred.get("itl_mean_ms") else None
    notes = list(dd.notes) + [n_ for n_ in out_p["notes"] + out_d["notes"] if n_ not in dd.notes]
    if not dd.rounds_change <= DISAGG_SETTLED:
        notes.append(f"the pools' mean request times (prefill + decode) still changed by "
                     f"{100 * dd.rounds_change:.1f} % in the last of {dd.rounds} alternating rounds")
    sim = {**out_d["simulation"], "clients": dd.clients, "kv_transfer_ms": dd.transfer_s * 1e3,
           "rounds": dd.rounds, "last_round_change": dd.rounds_change}
    pools = {role: {"gpus": d.gpus, "workers": d.dp, "tp": d.tp, "pp": d.pp, "attention_dp": d.attention_dp,
                    "requests_per_s": o["throughput"].get("requests_per_s"), "kv_cache": o["kv_cache"],
                    "busy_fraction": o["simulation"]["busy_fraction"]}
             for role, d, o in (("prefill", pre, out_p), ("decode", dec, out_d))}
    return {"predicted": _round(pred), "throughput": _round(tput), "kv_cache": out_d["kv_cache"],
            "simulation": _round(sim), "pools": _round(pools), "notes": notes}


# ---------------------------------------------------------------- records and the command

def _records_kept(path, exclude_gpus: tuple[str, ...]) -> list[tuple[dict, str]]:
    """The (record, "file:line") of a JSON Lines file less those on ``exclude_gpus`` (a GPU name no one
    knows is kept: its record is refused later, with its line)."""
    skip = {get_gpu(g).name for g in exclude_gpus}

    def excluded(rec) -> bool:
        try:
            return bool(skip) and get_gpu(rec.get("gpu", "")).name in skip
        except InputError:
            return False
    return [(rec, where) for rec, where in read_json_lines(path) if not excluded(rec)]


def read_serving_records(path, exclude_gpus: tuple[str, ...] = ()) -> list[tuple[dict, str]]:
    """(record, "file:line") for each line; records on ``exclude_gpus`` are dropped before anything else
    reads them."""
    out, seen = [], set()
    for rec, where in _records_kept(path, exclude_gpus):
        rec = {k: v for k, v in rec.items() if k != "measured"}
        if "id" not in rec:
            raise InputError("missing required field", where, "id")
        if rec["id"] in seen:
            raise InputError(f"duplicate id {rec['id']!r}", where, "id")
        seen.add(rec["id"])
        out.append((rec, where))
    return out


def serve(records, model_configs=None, bench_data=None, calibration: str = "default",
          allow_other_gpu: bool = False, options: Options = Options(), workload_options: dict | None = None,
          kv_blocks_fn=None, batch: int | None = None, simulator: Simulator | None = None) -> list[dict]:
    """Serving estimates for one record (a dict) or many (dicts, or (dict, location) pairs): one output
    dict per record, ``{"id", "predicted", "throughput", "kv_cache", "simulation", "notes"}`` or
    ``{"id", "refused": reason}``.  ``simulator``: a `Simulator` whose loaded tables and step models to use
    (its own tables, calibration and options then replace ``bench_data``, ``calibration``,
    ``allow_other_gpu`` and ``options``)."""
    if isinstance(records, dict):
        records = [records]
    items = [r if isinstance(r, tuple) else (r, f"record {i}") for i, r in enumerate(records)]
    sim = simulator or Simulator(bench_data, calibration, allow_other_gpu, options)
    outs, deps, dds = [], [], []
    for rec, where in items:
        try:
            if isinstance(rec, dict) and rec.get("mode") == "disagg":
                dd = resolve_disaggregated(rec, where, model_configs, kv_blocks_fn, workload_options)
                pools = [dd.prefill, dd.decode]
            else:
                dd = resolve(rec, where, model_configs, kv_blocks_fn, workload_options)
                pools = [dd]
            try:  # what the GPU's tables lack: an MoE shape, precision or layout, fp8 KV-cache rows, ...
                for dep in pools:
                    sim.step_model(dep)
            except InputError as e:
                raise Refusal(str(e)) from None
            (dds if isinstance(dd, Disaggregated) else deps).append(dd)
            outs.append(dd)
        except Refusal as e:
            outs.append({"id": str(rec.get("id")), "refused": str(e)})
    # a closed loop measured as a benchmark whose first round is a burst: that round simulated on its own
    benched = [d for d in deps if d.requests.kind == "closed" and d.requests.benchmark_rounds > 0]
    bursts = [dataclasses.replace(d, requests=wl_mod.burst_round(d.requests), notes=[]) for d in benched]
    ran = sim.run(deps + bursts, batch=batch)
    burst_of = {id(d): res for d, (_, res) in zip(benched, ran[len(deps):])}
    results = {id(d): statistics(d, res, sim.options, burst_of.get(id(d))) for d, res in ran[:len(deps)]}
    results.update({id(dd): disaggregated_statistics(dd, rp, rd, sim.options)
                    for dd, rp, rd in run_disaggregated(sim, dds, batch)})
    final = [{"id": o.id, **results[id(o)]} if isinstance(o, (Deployment, Disaggregated)) else o for o in outs]
    serve.calibration_used = sim.calibration_used
    return final


def compare(path, outs: list[dict], exclude_gpus: tuple[str, ...] = ()) -> list[dict]:
    """Predicted against the ``measured`` blocks of the records file (for accuracy reports; the prediction
    never reads them): one row per priced record and measured metric (top level), with the error in %."""
    measured = {str(rec.get("id")): rec.get("measured") or {} for rec, _ in _records_kept(path, exclude_gpus)}
    rows = []
    for o in outs:
        m = measured.get(o["id"], {})
        for k in METRICS:
            if "predicted" in o and isinstance(m.get(k), (int, float)) and o["predicted"].get(k):
                rows.append({"id": o["id"], "metric": k, "measured": m[k], "predicted": o["predicted"][k],
                             "error_pct": 100.0 * (o["predicted"][k] / m[k] - 1.0)})
    return rows


def error_summary(rows: list[dict]) -> list[dict]:
    """Per metric: records, MAPE, median |error| and signed median error (%)."""
    out = []
    for k in METRICS:
        e = np.array([r["error_pct"] for r in rows if r["metric"] == k])
        if len(e):
            out.append({"metric": k, "n": len(e), "mape_pct": float(np.mean(np.abs(e))),
                        "median_abs_pct": float(np.median(np.abs(e))), "signed_median_pct": float(np.median(e))})
    return out


def add_closed_loop_limits_argument(sp) -> None:
    """--closed-loop-limits, for every command that simulates serving records (`resolve`)."""
    sp.add_argument("--closed-loop-limits", choices=CLOSED_LOOP_LIMITS, default=CLOSED_LOOP_LIMITS[0],
                    help="closed loop whose record gives no max_num_seqs / max_num_batched_tokens: AIConfigurator's "
                         "benchmark workers (default: clients, clients + ISL + 1500) or vLLM's defaults")


def add_serve_arguments(sp) -> None:
    sp.add_argument("records", help="serving records, JSON Lines (schema: docs/serving.md)")
    add_pricing_arguments(sp, "none | default | PATH (as for predict)")
    sp.add_argument("--out", default=None, help="write one JSON line per record here")
    sp.add_argument("--client-ms", type=number(float, 0), default=CLIENT_MS,
                    help=f"client-side time added to TTFT and E2E (default {CLIENT_MS})")
    sp.add_argument("--ingress-ms", type=number(float, 0), default=INGRESS_MS,
                    help=f"client send -> visible to the scheduler (default {INGRESS_MS})")
    sp.add_argument("--request-host-us", type=number(float, 0), default=None,
                    help="host time per scheduled request per step that the engine does not overlap with the GPU "
                         "(default: the calibration's serving terms, `costmodel fit-serving`; 0 with none)")
    sp.add_argument("--multi-turn", choices=("repeat", "accumulate"), default="repeat",
                    help="what a chat user's later turn sends (docs/serving.md; default repeat)")
    sp.add_argument("--rounds", type=number(int, 1), default=10, help="closed loop: requests per client (default 10)")
    sp.add_argument("--warmup-rounds", type=number(int, 0), default=1,
                    help="closed loop: each client's first requests left out of the statistics (default 1)")
    sp.add_argument("--cooldown-rounds", type=number(int, 0), default=0,
                    help="closed loop: each client's last requests left out of the statistics (the drain, when "
                         "the clients that have finished leave the others a lighter engine; default 0)")
    sp.add_argument("--start", choices=wl_mod.START, default="random",
                    help="closed loop: clients' first requests at random times within one request's duration "
                         "(default), evenly over it, or all at once (docs/serving.md)")
    sp.add_argument("--benchmark-rounds", type=number(int, 0), default=wl_mod.BENCHMARK_ROUNDS,
                    help="closed loop: latencies as a benchmark of this many requests per client measures them, "
                         f"its first round all clients at once (default {wl_mod.BENCHMARK_ROUNDS}, aiperf as "
                         "AIConfigurator runs it; 0: the steady state only)")
    add_closed_loop_limits_argument(sp)
    sampling.add_argument(sp)
    sp.add_argument("--arrivals", choices=("constant", "poisson"), default="constant",
                    help="inference-perf load type whose timer draws the send times (default constant)")
    sp.add_argument("--exclude-gpu", action="append", default=[],
                    help="drop records on this GPU before reading them (repeatable)")
    sp.add_argument("--compare", action="store_true",
                    help="print the errors against the records' measured blocks (read after predicting)")
    sp.add_argument("--plot", default=None, metavar="PNG",
                    help="draw TTFT and TPOT/ITL against clients or request rate, with the measured points "
                         "where the records have them (needs matplotlib)")


def run_serve(args) -> int:
    for name in ("out", "plot"):
        if getattr(args, name):
            check_output_file(getattr(args, name), name)
            refuse_overwrite(getattr(args, name), [args.records], name)
    items = read_serving_records(args.records, tuple(args.exclude_gpu))
    t0 = time.perf_counter()
    outs = serve(items, args.model_configs, args.bench_data, args.calibration, args.allow_other_gpu,
                 Options(ingress_ms=args.ingress_ms, client_ms=args.client_ms, request_host_us=args.request_host_us),
                 {"multi_turn": args.multi_turn, "rounds": args.rounds, "warmup_rounds": args.warmup_rounds,
                  "cooldown_rounds": args.cooldown_rounds, "start": args.start, "arrivals": args.arrivals,
                  "benchmark_rounds": args.benchmark_rounds, "closed_loop_limits": args.closed_loop_limits,
                  "sampling": args.sampling})
    took = time.perf_counter() - t0
    if args.out:
        atomic_write(args.out, lambda fh: fh.writelines(json.dumps(o) + "\n" for o in outs))
    priced = [o for o in outs if "predicted" in o]
    print(f"costmodel serve: {len(outs)} records, {len(priced)} priced, {len(outs) - len(priced)} refused "
          f"({took:.1f} s); calibration: " + "; ".join(f"{g}: {d}" for g, d in serve.calibration_used.items()))
    rows = [{"id": o["id"][:48], "ttft_ms": o["predicted"]["ttft_mean_ms"],
             "itl_ms": o["predicted"]["itl_mean_ms"], "e2e_ms": o["predicted"]["e2e_mean_ms"],
             "out_tok_s": o["throughput"]["output_tokens_per_s"]} for o in priced]
    print_table(rows)
    reasons: dict = {}
    for o in outs:
        if "refused" in o:
            why = o["refused"]
            why = next((p for p in why.split(": ") if "not supported" in p), why)
            reasons.setdefault(why, []).append(o["id"])
    for why, ids in reasons.items():
        print(f"  refused {len(ids)} ({ids[0]}{', ...' if len(ids) > 1 else ''}): {why}", file=sys.stderr)
    if args.compare:
        summary = error_summary(compare(args.records, outs, tuple(args.exclude_gpu)))
        if summary:
            print("errors against measured (%):")
            print_table(summary)
    if args.plot:
        recs = [rec for rec, _ in _records_kept(args.records, tuple(args.exclude_gpu))]
        print(plotting.plot_serving(plotting.serving_curves(recs, outs), args.plot))
    if args.out:
        print(f"wrote {args.out}")
    return 0
