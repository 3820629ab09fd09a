"""Step records timed as intervals under async scheduling: the interval from a step's start to the next one's
is the previous step's time, rebuilt from the record (`records.previous_step`, `Record.timed_steps`)."""
import numpy as np
import pytest

from costmodel.errors import InputError
from costmodel.params import Params
from costmodel.apps.records import parse_record, previous_step

STEP = {"prefill": [[1, 0], [37, 0], [1, 500]], "decode": [640, 0, 12]}


def _rec(**kw):
    obj = {"id": "r", "model": "llama-2-7b", "gpu": "H100", "tp": 1, "steps": [STEP], "kind": "step",
           "vllm_version": "0.15.1 (a fork)"}
    obj.update(kw)
    return parse_record({k: v for k, v in obj.items() if v is not None}, "t.jsonl:1")


def test_previous_step_by_hand():
    # the one-token entries were prefilling (their last chunk, priced as one token); the 37-token prefill starts
    # in this step; every decode had one KV token fewer (never below zero)
    assert previous_step(STEP) == {"prefill": [[1, 0], [1, 500]], "decode": [639, 0, 11]}
    assert previous_step({"prefill": [[64, 0]]}) == {"prefill": [[64, 0]]}  # nothing known: unchanged
    assert previous_step({"decode": [5]}) == {"prefill": [], "decode": [4]}


@pytest.mark.parametrize("kw,lagged", [
    ({}, True),  # step record of vLLM 0.15: async scheduling by default, timed as intervals by default
    ({"vllm_version": "0.14.0"}, True),
    ({"vllm_version": "v0.13.2"}, False),  # before async scheduling was the default
    ({"vllm_version": None}, False),  # engine unknown: the listed steps
    ({"vllm_version": "0.11.0", "async_scheduling": True}, True),  # the record says so
    ({"async_scheduling": False}, False),
    ({"timing": "own"}, False),  # timed per step (e.g. CUDA events)
    ({"timing": "interval"}, True),
    ({"kind": "decode"}, False),  # request traces are not step intervals
    ({"kind": "decode", "timing": "interval"}, False),
])
def test_which_records_time_the_previous_step(kw, lagged):
    r = _rec(**kw)
    assert r.times_previous_step is lagged
    assert r.timed_steps == ([previous_step(STEP)] if lagged else [STEP])


def test_several_steps_shift_by_one():
    s2 = {"decode": [641, 1, 13, 20]}
    r = _rec(steps=[STEP, s2])
    assert r.timed_steps == [previous_step(STEP), STEP]


@pytest.mark.parametrize("kw,field", [({"timing": "cuda"}, "timing"), ({"async_scheduling": 1}, "async_scheduling")])
def test_bad_timing_fields(kw, field):
    with pytest.raises(InputError) as e:
        _rec(**kw)
    assert str(e.value).startswith(f"t.jsonl:1: field '{field}'")


def test_prediction_is_that_of_the_timed_steps(predictor):
    pred = predictor
    lagged, own = _rec(), _rec(timing="own", steps=[previous_step(STEP)])
    t, parts = pred.predict([lagged, own], Params())
    assert t[0] == pytest.approx(t[1], rel=1e-6) and t[0] > 0
    assert all(np.isclose(v[0], v[1], rtol=1e-6) for v in parts.values())
    assert pred.predict([_rec(timing="own")], Params())[0][0] > t[0]  # the 37-token prefill costs something
