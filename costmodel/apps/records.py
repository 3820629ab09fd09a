"""Step records (JSON Lines): reading, validation and batched prediction.

Record schema (one JSON object a line, UTF-8): required ``id``, ``model``, ``gpu``, ``tp``, ``steps``;
optional ``measured_us``, ``kind``, ``source``, ``dtype`` (overrides the config's weight dtype), ``moe_ep``
(expert parallelism inside the TP group for a mixture-of-experts model; default 1, vLLM's
``--enable-expert-parallel`` is ``moe_ep = tp``), ``attention_dp`` (attention data parallelism, vLLM's
``--data-parallel-size`` for a mixture-of-experts model: the record's steps are one rank's, the experts
spread over tp x attention_dp GPUs, ``moe_ep`` dividing it; default 1), ``kv_cache_dtype`` (vLLM's
``--kv-cache-dtype``: auto, bf16, fp16 or fp8; default auto, the model's activation dtype), ``moe_weights`` (how its routed experts are stored: bf16,
fp16, fp8, fp8_block, mxfp4, int4_wo; default: the config's quantization, or ``dtype``),
``vllm_version``, ``timing`` and ``async_scheduling`` (see `Record.timed_steps`); ``max_num_batched_tokens``
and ``approx`` are accepted and not used; any other field is ignored with a warning (`unknown_fields`).
Each step is ``{"prefill": [[new, cached], ...], "decode": [ctx, ...]}``.
"""
from __future__ import annotations

import difflib
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .. import memory, ops, sampling
from ..compiled import jit
from ..errors import InputError, warn
from ..hardware import get_gpu
from ..model import MOE_WEIGHTS, load_arch, load_model, normalize_dtype
from ..params import Calibration, Params, engine_key, engine_version
from ..step import (BREAKDOWN, batched_features, bucket, cells_read, combine, make_step_fn, pack_steps, setup,
                    validate_step)
from ..tables import Tables, load_tables


# vLLM schedules step N+1 while step N runs ("async scheduling") by default from v0.14.0 on (its release notes;
# pipeline parallelism excepted).  Older engines schedule each step after the previous one has finished.
ASYNC_SCHEDULING_SINCE = (0, 14)
TIMINGS = ("interval", "own")


def previous_step(step: dict) -> dict:
    """The engine step before ``step``, as far as ``step`` tells (record schema, µs-free).

    Under async scheduling vLLM schedules a request's first decode before its prompt's last chunk has
    produced a token, and step traces list such a request as prefilling one token ([1, cached]); so a
    one-token prefill entry was prefilling in the step before (its chunk length is not recorded: it is priced
    as one token).  Requests prefilling more than one token start in this step and were not in the one before;
    decoding requests were there with one KV token fewer.  A step with nothing left is returned unchanged
    (nothing is known about the step before it)."""
    pre = [[1, int(c)] for n, c in (step.get("prefill") or []) if int(n) == 1]
    dec = [max(int(c) - 1, 0) for c in (step.get("decode") or [])]
    return {"prefill": pre, "decode": dec} if pre or dec else step


@dataclass
class Record:
    id: str
    model: str
    gpu: str
    tp: int
    steps: list
    where: str  # file:line
    measured_us: float | None = None
    kind: str | None = None
    source: str | None = None
    dtype: str | None = None
    timing: str | None = None  # "interval" or "own"; None: "interval" for kind "step", else "own"
    async_scheduling: bool | None = None  # None: from vllm_version (`ASYNC_SCHEDULING_SINCE`)
    extra: dict = field(default_factory=dict)
    moe_ep: int = 1  # GPUs of the expert group (tp x attention_dp) the routed experts are spread over
    moe_weights: str | None = None  # storage of the routed experts (`model.MOE_WEIGHTS`); None: the model's
    attention_dp: int = 1  # attention data-parallel ranks (the steps are one rank's); experts over tp x this
    kv_cache_dtype: str = "auto"  # `KV_CACHE_DTYPES`: the KV cache's precision (auto: the model's bf16/fp16)
    pp: int = 1  # pipeline stages: a step is one batch's pass through all of them (`step.setup`)
    sampling: dict | None = None  # the requests' sampling parameters (`sampling.parse`) over the model's defaults

    @property
    def setup_key(self) -> tuple:
        """What picks the record's `step.setup` (and its KV-cache capacity)."""
        return (self.model, get_gpu(self.gpu).name, self.tp, self.dtype, self.moe_ep, self.moe_weights,
                self.attention_dp, self.kv_cache_dtype, self.pp, tuple(sorted((self.sampling or {}).items())))

    @property
    def engine(self) -> str | None:
        """The engine version (``major.minor`` of ``vllm_version``) that picks a calibration's parameters."""
        return engine_key(self.extra.get("vllm_version"))

    @property
    def times_previous_step(self) -> bool:
        """Whether ``measured_us`` times the steps before the listed ones: a ``kind: "step"`` record timed as
        step intervals (this step's start to the next one's, the default for step records) on an engine
        with async scheduling.  With the scheduler one step ahead, step N+1 starts once step N-1's output is
        back, so in steady state the interval from the start of N to that of N+1 is step N-1's GPU time."""
        timing = self.timing or ("interval" if self.kind == "step" else "own")
        if self.async_scheduling is not None:
            is_async = self.async_scheduling
        else:
            v = engine_version(self.extra.get("vllm_version"))
            is_async = v is not None and v >= ASYNC_SCHEDULING_SINCE
        return self.kind == "step" and timing == "interval" and is_async

    @property
    def timed_steps(self) -> list:
        """The steps whose times add up to ``measured_us``: ``steps``, or, when the record
        `times_previous_step`, the step before the first (`previous_step`) and all but the last."""
        if not self.times_previous_step:
            return self.steps
        return [previous_step(self.steps[0])] + self.steps[:-1]


def previous_step_note(records: list[Record]) -> tuple[int, str | None]:
    """How many records `Record.times_previous_step`, and a line saying so (None when none do)."""
    n = sum(r.times_previous_step for r in records)
    return n, (f"  {n} step records timed as intervals under async scheduling: each priced as the step before "
               "it (records.previous_step)" if n else None)


# Fields a record may carry: used ones, and ``max_num_batched_tokens`` and ``approx`` (written by the step
# tracers, accepted and not used).  Others are reported by `read_records`.
RECORD_FIELDS = ("id", "model", "gpu", "tp", "steps", "measured_us", "kind", "source", "dtype", "timing",
                 "async_scheduling", "vllm_version", "max_num_batched_tokens", "approx", "moe_ep", "moe_weights",
                 "attention_dp", "kv_cache_dtype", "pp", "dp", "moe_tp", "sampling")
KV_CACHE_DTYPES = ("auto", "bf16", "fp16", "fp8")  # the record field ``kv_cache_dtype``
STEP_FIELDS = ("prefill", "decode")


def read_records(path: str | Path) -> list[Record]:
    """Parse and validate a JSONL file (UTF-8); raises InputError naming file:line and field.  Fields the
    schema does not know are ignored with one `errors.InputWarning` naming them (`unknown_fields`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", str(path))
    out, seen, unknown = [], set(), {}
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column {e.start + 1} (save the "
                                 "file as UTF-8)", where) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as e:
                raise InputError(f"malformed JSON: {e.msg} (column {e.colno})", where) from None
            except _DuplicateKey as e:
                raise InputError("appears twice in one object (JSON keeps only the last)", where, str(e)) from None
            out.append(parse_record(obj, where))
            if out[-1].id in seen:
                raise InputError(f"duplicate id {out[-1].id!r}", where, "id")
            seen.add(out[-1].id)
            for name in unknown_fields(obj):
                unknown.setdefault(name, []).append(lineno)
    if not out:
        raise InputError("no records", str(path))
    if unknown:
        warn(unknown_fields_message(unknown), str(path))
    return out


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def unknown_fields(obj: dict) -> list[str]:
    """Names of the fields of a record (and of its steps, as ``steps[].NAME``) that the schema does not know."""
    names = [k for k in obj if k not in RECORD_FIELDS]
    for s in obj.get("steps") or []:
        names += [f"steps[].{k}" for k in s if k not in STEP_FIELDS and f"steps[].{k}" not in names]
    return names


def unknown_fields_message(unknown: dict, shown: int = 3) -> str:
    """One line naming the unknown fields (name -> line numbers), with the likely intended name."""
    parts = []
    for name, lines in unknown.items():
        known = STEP_FIELDS if name.startswith("steps[].") else RECORD_FIELDS
        close = difflib.get_close_matches(name.removeprefix("steps[]."), known, n=1, cutoff=0.75)
        at = ", ".join(map(str, lines[:shown])) + (f" and {len(lines) - shown} more" if len(lines) > shown else "")
        hint = f"; did you mean '{close[0]}'?" if close else ""
        parts.append(f"'{name}' (line{'s' if len(lines) > 1 else ''} {at}{hint})")
    return f"unknown field(s) ignored: {', '.join(parts)}"


def _optional_str(obj, key, where):
    v = obj.get(key)
    if v is not None and not isinstance(v, str):
        raise InputError(f"must be a string, got {v!r}", where, key)
    return v


def parse_record(obj, where: str) -> Record:
    if not isinstance(obj, dict):
        raise InputError("a record must be a JSON object", where)
    for key in ("id", "model", "gpu", "tp", "steps"):
        if key not in obj:
            raise InputError("missing required field", where, key)
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise InputError(f"must be a non-empty string or an integer, got {rid!r}", where, "id")
    for key in ("model", "gpu"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise InputError(f"must be a non-empty string, got {obj[key]!r}", where, key)
    tp = obj["tp"]
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise InputError(f"must be a positive integer, got {tp!r}", where, "tp")
    moe_ep = obj.get("moe_ep", 1)
    if isinstance(moe_ep, bool) or not isinstance(moe_ep, int) or moe_ep < 1:
        raise InputError(f"must be a positive integer, got {moe_ep!r}", where, "moe_ep")
    attention_dp = obj.get("attention_dp", 1)
    if isinstance(attention_dp, bool) or not isinstance(attention_dp, int) or attention_dp < 1:
        raise InputError(f"must be a positive integer, got {attention_dp!r}", where, "attention_dp")
    for key in ("pp", "dp"):
        v = obj.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"must be a positive integer, got {v!r}", where, key)
    pp = obj.get("pp", 1)
    moe_tp = obj.get("moe_tp")
    if moe_tp is not None and (isinstance(moe_tp, bool) or not isinstance(moe_tp, int) or moe_tp < 0):
        raise InputError(f"must be a non-negative integer, got {moe_tp!r}", where, "moe_tp")
    kv_cache_dtype = obj.get("kv_cache_dtype", "auto")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise InputError(f"must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}", where, "kv_cache_dtype")
    moe_weights = _optional_str(obj, "moe_weights", where)
    if moe_weights is not None and moe_weights not in MOE_WEIGHTS:
        raise InputError(f"must be one of {', '.join(MOE_WEIGHTS)}, got {moe_weights!r}", where, "moe_weights")
    steps = obj["steps"]
    if not isinstance(steps, list) or not steps:
        raise InputError("must be a non-empty list of steps", where, "steps")
    for i, s in enumerate(steps):
        validate_step(s, f"{where} step {i}")
    measured = obj.get("measured_us")
    if measured is not None:
        if isinstance(measured, bool) or not isinstance(measured, (int, float)) or not math.isfinite(measured) \
                or measured <= 0:
            raise InputError(f"must be a positive number, got {measured!r}", where, "measured_us")
    dtype = normalize_dtype(obj["dtype"], where) if obj.get("dtype") is not None else None
    kind, source = _optional_str(obj, "kind", where), _optional_str(obj, "source", where)
    version = obj.get("vllm_version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, (str, int, float))):
        raise InputError(f"must be a version string like \"0.15.1\", got {version!r}", where, "vllm_version")
    try:
        get_gpu(obj["gpu"])
    except InputError as e:
        raise InputError(str(e), where) from None
    timing = obj.get("timing")
    if timing is not None and timing not in TIMINGS:
        raise InputError(f"must be one of {', '.join(TIMINGS)}, got {timing!r}", where, "timing")
    is_async = obj.get("async_scheduling")
    if is_async is not None and not isinstance(is_async, bool):
        raise InputError(f"must be true or false, got {is_async!r}", where, "async_scheduling")
    samp = sampling.parse(obj["sampling"], where) if obj.get("sampling") is not None else None
    known = {"id", "model", "gpu", "tp", "steps", "measured_us", "kind", "source", "dtype", "timing",
             "async_scheduling", "moe_ep", "moe_weights", "attention_dp", "kv_cache_dtype", "pp", "dp", "sampling"}
    return Record(id=str(rid), model=obj["model"], gpu=obj["gpu"], tp=tp, steps=steps,
                  where=where, measured_us=None if measured is None else float(measured),
                  kind=kind, source=source, dtype=dtype, timing=timing,
                  async_scheduling=is_async, extra={k: v for k, v in obj.items() if k not in known}, moe_ep=moe_ep,
                  moe_weights=moe_weights, attention_dp=attention_dp, kv_cache_dtype=kv_cache_dtype, pp=pp,
                  sampling=samp)


def with_sampling(records: list[Record], given: dict | None) -> list[Record]:
    """``records`` with ``given`` sampling parameters (`sampling.parse_option`) where their own ``sampling``
    leaves a key out (the command line's --sampling)."""
    for r in records if given else ():
        r.sampling = sampling.fill(r.sampling, given)
    return records


def max_context(steps: list) -> int:
    """The longest context any request of ``steps`` holds: cached + new tokens of a prefill chunk, the cached
    tokens + 1 of a decode."""
    return max([int(n) + int(c) for st in steps for n, c in (st.get("prefill") or [])]
               + [int(c) + 1 for st in steps for c in (st.get("decode") or [])] + [0])


@functools.lru_cache(maxsize=None)
def _step_fn(static):
    return make_step_fn(static)


PAD_BUDGET = 1 << 22  # request slots of padding a prediction may add beyond what its steps hold


def _power_of_4_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 4
    return p


def width_classes(widths: np.ndarray) -> list[tuple[tuple[int, int], np.ndarray]]:
    """Steps of (prefill, decode) request counts ``widths`` [S, 2] in classes of padded widths, powers of 4
    (at least 1), so that no step is padded to more than 4x its requests: [((prefill, decode), indices)]."""
    cls = np.asarray([_power_of_4_at_least(int(v)) for v in widths.reshape(-1)], np.int64).reshape(-1, 2)
    keys, inv = np.unique(cls, axis=0, return_inverse=True)
    return [((int(k[0]), int(k[1])), np.flatnonzero(inv.reshape(-1) == j)) for j, k in enumerate(keys)]


class Predictor:
    """Caches models, tables and compiled functions across records."""

    def __init__(self, model_configs=None, bench_data=None):
        if model_configs is not None and not Path(model_configs).is_dir():  # not silently the packaged ones
            raise InputError(f"model configs folder {model_configs} does not exist or is not a folder",
                             field="model_configs")
        self.model_configs, self.bench_data = model_configs, bench_data
        self._tables: dict[str, Tables] = {}
        self._setups, self._capacity = {}, {}
        self._warned: set = set()  # records and table points already named in a warning

    def tables(self, gpu_name: str, where: str | None = None) -> Tables:
        try:
            gpu = get_gpu(gpu_name)
        except InputError as e:
            raise InputError(str(e), where) from None
        if gpu.name not in self._tables:
            self._tables[gpu.name] = load_tables(self.bench_data, gpu)
        return self._tables[gpu.name]

    def setup_for(self, r: Record):
        key = r.setup_key
        if key not in self._setups:
            try:
                m = load_model(r.model, self.model_configs)
                if r.dtype:
                    m = m.with_dtype(r.dtype)
                if r.moe_weights:
                    m = m.with_expert_dtype(r.moe_weights)
                self._setups[key] = setup(m, self.tables(r.gpu, r.where), r.tp, r.moe_ep,
                                          attention_dp=r.attention_dp, kv_cache_dtype=r.kv_cache_dtype, pp=r.pp,
                                          sampling=r.sampling)
            except InputError as e:
                raise InputError(str(e), r.where) from None
        try:
            ops.check_moe_tp(self._setups[key].model, r.tp, r.moe_ep, r.attention_dp, r.extra.get("moe_tp"))
        except InputError as e:
            raise InputError(str(e), r.where) from None
        return self._setups[key]

    def sampler_note(self, records: list[Record]) -> str | None:
        """A line saying how many records' requests run the sampler's top-k/top-p filter (`ops.sampler_filter`),
        None when none do."""
        n = sum(float(self.setup_for(r).on_gpu.dims.filter_bytes) > 0 for r in records)
        return (f"  sampler: {n} records sample with a top-k/top-p filter over the vocabulary (their `sampling` or "
                "their model's generation_config.json; docs/model.md)") if n else None

    def kv_capacity(self, r: Record):
        """The KV-cache capacity (`memory.KVCapacity`) of ``r``'s model on its GPU at its TP degree, with vLLM's
        defaults (`KV_CHECK`), or None where the memory model does not describe the model."""
        key = r.setup_key
        if key not in self._capacity:
            try:
                self._capacity[key] = memory.kv_capacity_tokens(
                    load_arch(r.model, self.model_configs), memory.Layout(tp=r.tp, pp=r.pp, attention_dp=r.attention_dp,
                                                                      moe_ep=r.moe_ep), get_gpu(r.gpu),
                    weights=r.dtype, moe_weights=r.moe_weights, kv_cache_dtype=r.kv_cache_dtype, **KV_CHECK)
            except InputError:
                self._capacity[key] = None
        return self._capacity[key]

    def group_inputs(self, records: list[Record]):
        """Group records by (model, GPU, TP, dtype): yields (setup, steps in the record schema, record index
        per step).  The steps are each record's `Record.timed_steps`."""
        groups: dict = {}
        for i, r in enumerate(records):
            groups.setdefault(id(self.setup_for(r)), (self.setup_for(r), []))[1].append(i)
        for su, idx in groups.values():
            flat, owner = [], []
            for i in idx:
                steps = records[i].timed_steps
                flat += steps
                owner += [i] * len(steps)
            yield su, flat, np.asarray(owner)

    def features(self, records: list[Record]):
        """Per (model, GPU, TP, dtype) group: (setup, parameter-free step features, record index per step),
        in fixed chunks and common widths so that one compilation serves every group of a GPU — unless
        padding every step to the widest would take more than `PAD_BUDGET` request slots beyond 4x what the
        steps hold: then steps are evaluated in width classes (`width_classes`), so memory follows the input."""
        groups = list(self.group_inputs(records))
        widths = [np.array([[len(x.get("prefill") or []), len(x.get("decode") or [])] for x in steps] or
                           np.zeros((0, 2), int)).reshape(-1, 2) for _, steps, _ in groups]
        wp = bucket(max(int(w[:, 0].max(initial=1)) for w in widths))
        wd = bucket(max(int(w[:, 1].max(initial=1)) for w in widths))
        n_steps = sum(len(w) for w in widths)
        held = sum(int(w.sum()) for w in widths)
        common = n_steps * (wp + wd) <= 4 * held + PAD_BUDGET
        out = []
        for (su, steps, owner), w in zip(groups, widths):
            classes = [((wp, wd), np.arange(len(steps)))] if common else width_classes(w)
            parts, owners = [], []
            for (cp, cd), sel in classes:
                chunk = int(min(4096, max(1, (1 << 22) // (cp + cd))))
                parts.append(batched_features(su.arrays, su.on_gpu, pack_steps([steps[i] for i in sel]), su.static,
                                              cp, cd, chunk))
                owners.append(owner[sel])
            f = parts[0] if len(parts) == 1 else jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *parts)
            out.append((su, f, np.concatenate(owners)))
        self.warn_inputs(records, out)
        return out

    def warn_inputs(self, records: list[Record], groups) -> None:
        """Warn about records priced but physically implausible: contexts longer than the model's
        ``max_position_embeddings`` (`context_warning`), and table points these records read that the noise
        policy moved by more than `NOISE_WARN_BOUND` or dropped (`noise_warning`).  Each record and each
        point is named once per Predictor (fits price subsets of the records again)."""
        for msg in (context_warning(records, [self.setup_for(r).model for r in records], seen=self._warned),
                    kv_fit_warning(records, self.kv_capacity, seen=self._warned),
                    noise_warning(groups, self._tables, seen=self._warned)):
            if msg:
                warn(msg)

    def predict(self, records: list[Record], params=None, with_floor: bool = False):
        """Per record: (total µs, breakdown dict of µs), summed over its steps.  ``params``: one `Params` or
        `Calibration` for all records, or a dict GPU name -> either (GPUs not in it get the physical
        defaults); a `Calibration` gives each record the parameters of its engine version.
        ``with_floor`` appends `roofline_floor_us` of each record.

        Steps are evaluated as parameter-free features in fixed-size chunks (one compilation per GPU
        table set), then combined with the parameters."""
        total = np.zeros(len(records))
        parts = {k: np.zeros(len(records)) for k in BREAKDOWN}
        groups = self.features(records)
        for su, f, owner in groups:
            spec = params.get(su.gpu.name, Params()) if isinstance(params, dict) else (params or Params())
            cal = spec if isinstance(spec, Calibration) else Calibration(spec, {})
            sets = np.array([cal.set_for(records[i].engine) or "" for i in owner])
            for key in np.unique(sets):  # "" = pooled
                sel = sets == key
                fs = f if sel.all() else jax.tree_util.tree_map(lambda a: a[sel], f)
                p = (cal.by_engine[key] if key else cal.pooled).validated(f"parameters for {su.gpu.name}")
                t, br = _combine_fn(su.static)(fs, su.on_gpu, p)
                t = np.asarray(t, dtype=np.float64)
                own = owner[sel]
                if not np.all(np.isfinite(t)) or np.any(t <= 0):
                    bad = int(own[np.argmax(~np.isfinite(t) | (t <= 0))])
                    raise InputError("model produced a non-finite or non-positive time", records[bad].where)
                np.add.at(total, own, t)
                for k in br:
                    np.add.at(parts.setdefault(k, np.zeros(len(records))), own, np.asarray(br[k], dtype=np.float64))
        return (total, parts, roofline_floor_us(groups, len(records))) if with_floor else (total, parts)


def _some(items: list[str], shown: int) -> str:
    """The first ``shown`` of ``items``, comma-separated, and how many more there are."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


# The engine settings under which `kv_fit_warning` asks whether a step's KV cache fits (vLLM's defaults).
KV_CHECK = {"gpu_memory_utilization": 0.9, "max_num_batched_tokens": 8192, "max_num_seqs": 256}


def kv_fit_warning(records: list[Record], capacity_of, shown: int = 3, seen: set | None = None) -> str | None:
    """One line naming the records with a step whose requests' KV cache (cached + new tokens of each, in
    whole blocks) exceeds what their GPU holds for it (`memory.kv_capacity_tokens` at `KV_CHECK`; priced all
    the same), or None."""
    seen = set() if seen is None else seen
    bad = []
    for r in records:
        cap = None if ("kv", r.where) in seen else capacity_of(r)
        if cap is None:
            continue
        for st in r.steps:
            held = [c + 1 for c in st.get("decode") or []] + [n + c for n, c in st.get("prefill") or []]
            if not memory.batch_fits(cap, held):
                bad.append((r, sum(held), cap.tokens))
                seen.add(("kv", r.where))
                break
    if not bad:
        return None
    listed = _some([f"{r.where} ({n} tokens > {t} at TP {r.tp})" for r, n, t in bad], shown)
    return (f"{len(bad)} record(s) hold more KV cache in one step than their GPUs keep for it at "
            f"gpu_memory_utilization {KV_CHECK['gpu_memory_utilization']} (priced all the same): {listed}")


def context_warning(records: list[Record], models: list, shown: int = 3, seen: set | None = None) -> str | None:
    """One line naming the records whose contexts exceed their model's ``max_position_embeddings`` (priced
    all the same: the model has no such limit), or None.  Records in ``seen`` are left out; those named
    are added to it."""
    seen = set() if seen is None else seen
    bad = [(r, m, c) for r, m in zip(records, models)
           if ("context", r.where) not in seen and (c := max_context(r.steps)) > m.max_position_embeddings]
    seen.update(("context", r.where) for r, _, _ in bad)
    if not bad:
        return None
    listed = _some([f"{r.where} ({c} > {m.max_position_embeddings:.0f} for {m.name})" for r, m, c in bad], shown)
    return (f"{len(bad)} record(s) hold contexts longer than their model's max_position_embeddings (priced "
            f"all the same): {listed}")


# `noise_warning` names the table points a prediction read that the noise policy lowered by more than this
# fraction of their measured time (a few percent is ordinary noise in the launch-bound corner of a table).
NOISE_WARN_BOUND = 0.25


def noise_warning(groups, tables: dict[str, Tables], bound: float = NOISE_WARN_BOUND, shown: int = 3,
                  seen: set | None = None) -> str | None:
    """One line naming the table points that the steps of ``groups`` ((setup, features, owner) as
    `Predictor.features` returns) read (`step.cells_read`) and that the noise policy lowered by more than
    ``bound`` of their measured time or dropped as measurement errors, or None.  Points in ``seen`` are left
    out; those named are added to it."""
    seen = set() if seen is None else seen
    hits = {}
    for su, f, _ in groups:
        t = tables[su.gpu.name]
        if not any(a.reason != "envelope" or a.measured_us > a.used_us * (1.0 + bound) for a in t.adjustments):
            continue
        for table, cells in cells_read(su, f).items():
            for cell in cells:
                a = t.adjustment_at(table, cell)
                if a is not None and (a.reason != "envelope" or a.measured_us > a.used_us * (1.0 + bound)):
                    hits[(su.gpu.name, table, a.where)] = a
    hits = {k: a for k, a in hits.items() if ("noise", k) not in seen}
    seen.update(("noise", k) for k in hits)
    if not hits:
        return None
    worst = sorted(hits.items(), key=lambda kv: -abs(math.log(kv[1].measured_us / kv[1].used_us)))
    listed = _some([f"{g} {tab} {a.where} ({a.measured_us:.4g} -> {a.used_us:.4g} µs"
                    f"{', dropped: ' + a.reason if a.reason != 'envelope' else ''})" for (g, tab, _), a in worst], shown)
    return (f"these predictions read {len(hits)} table point(s) that the noise policy lowered by more than "
            f"{bound:.0%} or dropped: {listed} (costmodel tables lists every adjusted point)")


def roofline_floor_us(groups, n_records: int) -> np.ndarray:
    """Per record: the least time (µs) its GEMMs alone can take — each GEMM at its roofline with the GPU's
    peak FLOP/s and peak HBM bandwidth, summed over layers and steps.  No kernel beats its roofline and a
    step's GEMMs run one after another, so a measured time below this is physically impossible (a
    mis-timed or mis-attributed record).  ``groups``: `Predictor.features` of the records."""
    floor = np.zeros(n_records)
    for su, f, owner in groups:
        hw = su.on_gpu.hw
        g = np.maximum(np.asarray(f.gemm.flops, np.float64) / float(hw.peak_flops),
                       np.asarray(f.gemm.bytes, np.float64) / float(hw.hbm_bytes_per_s)) * 1e6  # [steps, 5]
        np.add.at(floor, owner, float(su.on_gpu.dims.layers) * g[:, :4].sum(axis=1) + g[:, 4])
    return floor


def below_floor_warning(records: list[Record], floor: np.ndarray, shown: int = 5) -> str | None:
    """One line naming the records measured faster than `roofline_floor_us`, or None."""
    bad = [(r, fl) for r, fl in zip(records, floor) if r.measured_us is not None and r.measured_us < fl]
    if not bad:
        return None
    listed = _some([f"{r.where} ({r.measured_us:.0f} < {fl:.0f} µs)" for r, fl in bad], shown)
    return (f"warning: {len(bad)} record(s) measured faster than their GEMMs' roofline at peak, which is "
            f"physically impossible (mis-timed or mis-attributed steps?): {listed}")


@functools.lru_cache(maxsize=None)
def _combine_fn(static):
    return jit(jax.vmap(lambda f, lay, p: combine(f, lay, p, static), in_axes=(0, None, None)))


def mape_table(records: list[Record], predicted: np.ndarray) -> list[dict]:
    """MAPE (%) against measured_us per (source file/run, kind), plus 'all'."""
    rows, groups = [], {}
    for r, p in zip(records, predicted):
        if r.measured_us is None:
            continue
        err = abs(p - r.measured_us) / r.measured_us * 100
        for key in ((r.where.rsplit(":", 1)[0].rsplit("/", 1)[-1], r.kind or "-"), ("all", r.kind or "-"),
                    ("all", "all")):
            groups.setdefault(key, []).append(err)
    for (src, kind), errs in sorted(groups.items()):
        e = np.asarray(errs)
        rows.append({"file": src, "kind": kind, "n": len(e), "mape_pct": float(e.mean()),
                     "p90_pct": float(np.percentile(e, 90))})
    return rows
