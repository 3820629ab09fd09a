"""Calibrations: the files `costmodel fit` writes, and which parameters a record gets from one.

A calibration file (JSON) holds the GPU it was fitted on (``gpu``), the tables and data it was fitted on,
the pooled parameters (``params``) and, where the fit had records of two or more engine versions, one set
per version (``by_engine``, keyed by `params.engine_key`).  `resolve_calibration` turns a choice as
``--calibration`` takes it (``none`` | ``default`` | PATH, each optionally ``@VERSION``) into a
`params.Calibration` per GPU; `load_calibration` gives the one parameter set a record of one GPU and engine
version gets from it, as `costmodel predict` does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .hardware import GPUS, find_gpu, get_gpu
from .io import read_json
from .params import FIELDS, HOST_FIELDS, Calibration, Params, engine_key
from .tables import default_bench_data, load_tables

DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "data" / "calibration_h100_vllm.json"


def params_to_dict(p: Params) -> dict:
    return {k: float(v) for k, v in zip(FIELDS, p)}


def params_from_dict(d: dict, where: str, field: str = "params") -> Params:
    if not isinstance(d, dict):
        raise InputError(f"must map parameter names to numbers, got {type(d).__name__}", where, field)
    unknown = set(d) - set(FIELDS)
    if unknown:
        raise InputError(f"unknown parameter(s) {sorted(unknown)}", where, field)
    vals = {}
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
            raise InputError(f"must be a positive number, got {v!r}", where, f"{field}.{k}")
        vals[k] = float(v)
    return Params(**vals)


def calibration_to_dict(c: Calibration) -> dict:
    return {"params": params_to_dict(c.pooled), "by_engine": {e: params_to_dict(p) for e, p in c.by_engine.items()}}


def read_calibration(path: str | Path) -> dict:
    """A calibration JSON with its parameters parsed into ``cal["_calibration"]`` (a `Calibration`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such calibration file", str(path))
    cal = read_json(path)
    if not isinstance(cal, dict) or "params" not in cal or "gpu" not in cal:
        raise InputError("a calibration needs 'gpu' and 'params'", str(path))
    if isinstance(cal["gpu"], list):
        raise InputError(f"fitted on several GPUs at once ({', '.join(map(str, cal['gpu']))}); fit each GPU's "
                         "records into its own calibration", str(path), "gpu")
    gpu = find_gpu(cal["gpu"]) if isinstance(cal["gpu"], str) else None
    if gpu is None:
        raise InputError(f"unknown GPU {cal['gpu']!r} (known: {', '.join(GPUS)})", str(path), "gpu")
    cal["gpu"] = gpu.name  # the same names as records' (h100, H100-SXM, h100_sxm: H100-SXM)
    by_engine = cal.get("by_engine") or {}
    if not isinstance(by_engine, dict):
        raise InputError("must map engine versions to parameters", str(path), "by_engine")
    for e in by_engine:
        if engine_key(e) != e:
            raise InputError(f"engine version must be major.minor (e.g. 0.15), got {e!r}", str(path), "by_engine")
    cal["_calibration"] = Calibration(params_from_dict(cal["params"], str(path)),
                                      {e: params_from_dict(v, str(path), f"by_engine.{e}") for e, v in by_engine.items()})
    return cal


def _split_choice(choice) -> tuple[str, str | None]:
    """``CHOICE[@VERSION]`` -> (CHOICE, VERSION or None); an ``@`` not followed by a major.minor version
    belongs to the choice (a path may hold one)."""
    choice = str(choice)
    base, _, suffix = choice.rpartition("@")
    if base and engine_key(suffix) == suffix:
        return base, suffix
    return choice, None


def calibration_path(choice) -> Path | None:
    """The file a ``--calibration`` choice reads: None for ``none``/``default`` (with or without ``@VERSION``)."""
    base, _ = _split_choice(choice)
    return None if base in ("none", "default") else Path(base)


def _select_engine(c: Calibration, engine: str | None, where: str) -> Calibration:
    """``c`` as is, or with one engine version's parameters for every record (``CHOICE@VERSION``)."""
    if engine is None:
        return c
    if engine not in c.by_engine:
        have = ", ".join(sorted(c.by_engine)) or "none"
        raise InputError(f"no parameters for engine version {engine} (has: {have})", where, "calibration")
    return Calibration(c.by_engine[engine], {})


def _describe(c: Calibration) -> str:
    return f"; per engine version: {', '.join(sorted(c.by_engine))} (others pooled)" if c.by_engine else ""


def parameter_sets_used(records, cals: dict) -> dict[str, int]:
    """How many records get each parameter set of ``cals`` ({GPU name: Calibration}, as from
    `resolve_calibration`): keys 'GPU: vLLM X.Y', 'GPU: pooled' or 'GPU: physical defaults', with
    ', host-side terms only' for a calibration carried from another GPU."""
    used: dict[str, int] = {}
    for r in records:
        g = get_gpu(r.gpu).name
        c = cals.get(g)
        key = c.set_for(r.engine) if c is not None else None
        kind = "physical defaults" if c is None else f"vLLM {key}" if key else "pooled"
        if c is not None and c.host_side_only:
            kind += ", host-side terms only"
        used[f"{g}: {kind}"] = used.get(f"{g}: {kind}", 0) + 1
    return used


def _table_kinds(sources: dict) -> dict:
    """Which table set each kind came from: 'repo' for the repo's bench_data, else the folder's name."""
    repo = str(default_bench_data())
    return {k: "repo" if str(v).startswith(repo) else str(v) for k, v in sources.items()}


def portable_sources(sources: dict) -> dict:
    """Table sources as a calibration file records them: the repo's own tables relative to the repo
    (``bench_data/...``, the same on every machine), others as given."""
    root = default_bench_data().parent
    full = {k: Path(v).resolve() for k, v in sources.items()}
    return {k: str(p.relative_to(root)) if p.is_relative_to(root) else str(sources[k]) for k, p in full.items()}


def resolve_calibration(choice: str, gpus: list[str], allow_other_gpu: bool = False,
                        table_sources: dict | None = None):
    """({GPU name: Calibration}, description) for --calibration none | default | PATH, each optionally
    followed by ``@VERSION`` (e.g. ``default@0.15``) to use that engine version's parameters for every
    record instead of each record's own ``vllm_version``.

    ``default`` and a calibration file named by PATH apply in full to the records of the GPU they were fitted
    on; records of other GPUs get only their host-side terms (`params.HOST_FIELDS`; the physical defaults for
    the kernel-side ones), and the description says so.  ``allow_other_gpu`` applies the whole calibration
    to every GPU.  ``default`` gives the physical defaults to all when ``table_sources`` {GPU name:
    `tables.Tables.sources`} says its GPU's tables are not the repo's, which it was fitted on."""
    choice, engine = _split_choice(choice)
    at = f" @ engine {engine}" if engine else ""
    if choice == "none":
        if engine:
            raise InputError("'none' has no engine versions", choice, "calibration")
        return {}, "none (physical defaults)"
    if choice == "default":
        if not DEFAULT_CALIBRATION.is_file():
            return {}, "default = none (no calibration shipped)"
        cal = read_calibration(DEFAULT_CALIBRATION)
        c = _select_engine(cal["_calibration"], engine, str(DEFAULT_CALIBRATION))
        name = f"default ({DEFAULT_CALIBRATION.name}){at}"
        if allow_other_gpu:
            return {g: c for g in gpus}, f"{name} on all GPUs{_describe(c)}"
        here = _table_kinds((table_sources or {}).get(cal["gpu"], {}))
        if any(v != "repo" for v in here.values()):  # fitted on the repo's tables: meaningless on others
            return {}, (f"none (the default calibration was fitted on the repo's bench_data; "
                        f"{cal['gpu']} tables here come from elsewhere)")
        cals, note = _carried(c, cal["gpu"], gpus)
        return cals, f"{name} for {cal['gpu']}{_describe(c)}{note}"
    cal = read_calibration(choice)
    c = _select_engine(cal["_calibration"], engine, choice)
    if allow_other_gpu:
        return {g: c for g in gpus}, f"{choice}{at} (fitted on {cal['gpu']}; on all GPUs){_describe(c)}"
    cals, note = _carried(c, cal["gpu"], gpus)
    return cals, f"{choice}{at} (fitted on {cal['gpu']}){_describe(c)}{note}"


def _carried(c: Calibration, fitted_on: str, gpus: list[str]) -> tuple[dict, str]:
    """({GPU: Calibration}: ``c`` for its own GPU, its host-side terms for the others; the note saying so)."""
    other = [g for g in gpus if g != fitted_on]
    cals = {g: c if g == fitted_on else c.host_only() for g in gpus}
    cals.setdefault(fitted_on, c)
    note = (f"; on {', '.join(other)} only its host-side terms ({', '.join(HOST_FIELDS)}), physical "
            "defaults for the kernel-side ones" if other else "")
    return cals, note


SERVING_TERMS = {"request_host_us": 0.0}  # the serving simulation's host-side terms and their physical defaults


def serving_terms(choice: str) -> tuple[dict, str]:
    """(terms, description): the serving simulation's host-side terms (`SERVING_TERMS`) of a --calibration
    choice — a calibration file's ``serving`` block, fitted on serving records (`costmodel fit-serving`);
    the physical defaults for ``none`` and for a file without one.  Host-side, so they apply on every GPU."""
    base, _ = _split_choice(choice)
    path = DEFAULT_CALIBRATION if base == "default" else calibration_path(choice)
    if path is None or not path.is_file():
        return dict(SERVING_TERMS), "physical defaults"
    block = read_json(path).get("serving")
    if block is None:
        return dict(SERVING_TERMS), "physical defaults"
    if not isinstance(block, dict):
        raise InputError("must be an object", str(path), "serving")
    out = dict(SERVING_TERMS)
    for k in SERVING_TERMS:
        v = block.get(k, SERVING_TERMS[k])
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
            raise InputError(f"must be a number >= 0, got {v!r}", str(path), f"serving.{k}")
        out[k] = float(v)
    return out, f"fitted ({path.name}: " + ", ".join(f"{k} {v:g}" for k, v in out.items()) + ")"


def load_calibration(name: str = "default", gpu: str = "H100", *, vllm_version=None, allow_other_gpu: bool = False,
                     bench_data=None) -> Params:
    """The parameters `costmodel predict --calibration NAME` gives a record on ``gpu`` with ``vllm_version``
    (its ``major.minor`` picks the engine version's set where the calibration has one; None: the pooled set).

    ``name``: ``none`` (physical defaults), ``default`` (the shipped calibration; physical defaults when
    ``bench_data``'s tables for its GPU are not the repo's), or a calibration file's path, each optionally
    with ``@VERSION`` (``default@0.15``: that version's set whatever ``vllm_version``).  On a GPU the
    calibration was not fitted on, only its host-side terms (`params.HOST_FIELDS`) unless
    ``allow_other_gpu``."""
    g = get_gpu(gpu)
    sources = None
    if _split_choice(name)[0] == "default" and bench_data is not None and not allow_other_gpu:
        sources = {g.name: load_tables(bench_data, g).sources}
    cals, _ = resolve_calibration(name, [g.name], allow_other_gpu=allow_other_gpu, table_sources=sources)
    c = cals.get(g.name)
    return Params() if c is None else c.params_for(engine_key(vllm_version))
