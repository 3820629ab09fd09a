"""Sampling parameters of the requests, as vLLM applies them: which filter its sampler runs over the vocabulary.

vLLM (``--generation-config auto``, its default) takes ``temperature``, ``top_p`` and ``top_k`` from the model's
``generation_config.json`` for every request that does not set them itself; benchmark clients that send no
sampling parameters (aiperf, inference-perf) therefore run with the checkpoint's defaults.  A record's
``sampling`` object (the same three keys) overrides them key by key, as a request's own parameters do.

What the sampler does per step, for the requests it samples (vLLM V1's PyTorch sampler, the default up to
vLLM 0.15; later versions' Triton or FlashInfer filters are faster, and are priced as this one all the same):

* ``temperature`` 0 (greedy): the argmax; no filter.
* ``top_p`` < 1 (with or without ``top_k``): the logits are sorted over the whole vocabulary, then masked
  (`FILTERS` "top_p").
* ``top_k`` alone (1 <= k < vocabulary): a top-k selection, no sort ("top_k").
* neither: a softmax sample over the whole vocabulary, no filter ("none").

``repetition_penalty`` and ``min_p`` are not modelled (a record that sets them is refused).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import NamedTuple

from .errors import InputError, json_type
from .io import read_json

KEYS = ("temperature", "top_p", "top_k")
FILTERS = ("none", "top_k", "top_p")


class Sampling(NamedTuple):
    """vLLM's sampling parameters that decide the sampler's filter; defaults are vLLM's (no filter)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off

    def filter(self, vocab: int) -> str:
        """The filter vLLM's sampler runs for these parameters over a vocabulary of ``vocab`` entries
        (`FILTERS`)."""
        if self.temperature == 0:
            return "none"
        if self.top_p < 1.0:
            return "top_p"
        return "top_k" if 0 < self.top_k < vocab else "none"


def parse(obj, where: str | None, field: str = "sampling") -> dict:
    """The sampling parameters an object gives (only `KEYS`; a subset), checked: ``temperature`` >= 0,
    0 < ``top_p`` <= 1, ``top_k`` an integer >= -1.  InputError naming the field otherwise."""
    if not isinstance(obj, dict):
        raise InputError(f"must be an object with some of {', '.join(KEYS)}, got {json_type(obj)}", where, field)
    unknown = sorted(set(obj) - set(KEYS))
    if unknown:
        raise InputError(f"unknown key(s) {', '.join(unknown)}: the sampler is modelled from "
                         f"{', '.join(KEYS)} only", where, field)
    out = {}
    for k, v in obj.items():
        name = f"{field}.{k}" if field else k
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InputError(f"must be a number, got {v!r}", where, name)
        if k == "temperature" and v < 0:
            raise InputError(f"must be >= 0, got {v!r}", where, name)
        if k == "top_p" and not 0 < v <= 1:
            raise InputError(f"must be in (0, 1], got {v!r}", where, name)
        if k == "top_k" and (v != int(v) or v < -1):
            raise InputError(f"must be an integer >= -1, got {v!r}", where, name)
        out[k] = int(v) if k == "top_k" else float(v)
    return out


def parse_option(text: str) -> dict:
    """The command line's ``--sampling`` value, ``KEY=VALUE[,KEY=VALUE...]`` of `KEYS` (``top_p=0.95,top_k=20``),
    checked as `parse` checks a record's object; a bad value is argparse's one-line error naming the option."""
    obj = {}
    try:
        for item in str(text).split(","):
            key, sep, value = item.partition("=")
            try:
                obj[key.strip()] = float(value)
            except ValueError:
                sep = ""
            if not sep:
                raise InputError(f"must be KEY=VALUE pairs of {', '.join(KEYS)} separated by commas, got {text!r}")
        return parse(obj, None, "")
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_argument(sp) -> None:
    """--sampling, for every command that prices records (step or serving)."""
    sp.add_argument("--sampling", type=parse_option, default=None, metavar="KEY=VALUE[,...]",
                    help="the requests' temperature, top_p, top_k where a record's own sampling leaves them out "
                         "(default: the model folder's generation_config.json; docs/model.md)")


def generation_defaults(config_json: Path) -> dict | None:
    """The sampling defaults vLLM takes from the ``generation_config.json`` beside ``config_json`` (`KEYS`
    it sets), None when there is no such file.  Its other keys are the checkpoint's and ignored, as vLLM does."""
    path = Path(config_json).parent / "generation_config.json"
    if not path.is_file():
        return None
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise InputError(f"a generation config must be a JSON object, got {json_type(cfg)}", str(path))
    return parse({k: cfg[k] for k in KEYS if k in cfg}, str(path), "generation_config")


def fill(own: dict | None, given: dict | None) -> dict:
    """A record's ``own`` parameters, with ``given`` ones (the command line's --sampling) for the keys it leaves
    out."""
    return {**(given or {}), **(own or {})}


def merged(defaults, given: dict | None) -> Sampling:
    """The parameters a request runs with: ``given`` over the model's ``defaults`` (a dict or its items; None:
    none)."""
    return Sampling(**{**dict(defaults or ()), **(given or {})})
