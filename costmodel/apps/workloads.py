"""Serving workloads as request arrays for `scheduler.simulate` (host side, numpy).

* **Closed loop** (``{"type": "closed", "concurrency": C, "input_tokens": ISL, "output_tokens": OSL}``):
  C clients; each sends its next request as soon as it has read the last token of the previous one (the
  client-side time ``client_ms`` after the engine sampled it).  Every prompt is ISL fresh tokens (random
  prompts: no prefix-cache hits across requests), every answer exactly OSL tokens.  Each client sends
  ``rounds`` requests; statistics skip each client's first ``warmup_rounds`` and last ``cooldown_rounds``
  (default 0, as a benchmark counts its drain; 1 gives the steady state, as `search` runs it).  ``start``:
  how the clients' first requests go out.  ``"random"`` (default): at independent uniformly random times within one
  request's duration (`serve` estimates it from the step model), the steady state of clients that have
  lost step with each other; ``"spread"``: evenly over that duration (no two clients ever collide: the
  least queueing); ``"together"``: all at t = 0, after which identical requests stay in lockstep cohorts
  (all prefill, then all decode: the most queueing).  The simulation itself is deterministic, so cohorts
  that form never split again.  ``benchmark_rounds`` R (default `BENCHMARK_ROUNDS`; 0: off): the latency
  statistics are those of a benchmark of R requests per client whose first round is a burst, as aiperf
  runs one (AIConfigurator's benchmark: a warm-up that is drained first, then C × R requests, the first C
  sent at once): a one-round simulation with every client together (`burst_round`) weighs 1/R of them, the
  simulation's last round (the drain) 1/R and its other measured rounds (R − 2)/R (`serve.statistics`).
  Only with a ``"random"`` or ``"spread"`` start.

* **inference-perf shared prefix** (``{"type": "inference_perf_shared_prefix", "stages": [{"rate",
  "duration_s"}], "num_unique_system_prompts", "num_users_per_system_prompt", "system_prompt_len",
  "question_len", "output_len", "enable_multi_turn_chat", "seed"}``), as inference-perf's load generator
  and shared-prefix generator send it:

  - a stage sends ``int(rate · duration_s)`` requests, the first 1 s after the stage starts, at times
    drawn by the load type's timer: ``"constant"`` (inference-perf's default load type) draws exponential
    gaps and rescales them to fill the stage's duration (a Poisson process given its count);
    ``"poisson"`` draws each second's count from Poisson(rate) and spreads that second's requests by
    exponential gaps rescaled to fill it;
  - the next stage starts when every request of the previous one has been answered, after the load
    generator's pause between stages (``interval``, 1 s by default) and the same 1 s offset;
  - request k of a stage belongs to user k mod N (N = groups × users per group), and users are shuffled
    over groups; the user's prompt is its group's system prompt followed by its own question;
  - with ``enable_multi_turn_chat`` a user's turns are serialised: a turn is sent only once the user's
    previous turn was answered (inference-perf holds a per-user lock, and starts the request timer after
    taking it, so the wait is not part of the measured latency);
  - ``multi_turn``: what a later turn's prompt is.  ``"repeat"`` (default): the same prompt again, so after
    the first turn its full 16-token blocks hit the prefix cache.  ``"accumulate"``: the previous turn's
    prompt and answer followed by the question (``sys + r·(question + output) + question`` tokens in turn
    r), whose earlier sequence hits the cache; turns whose prompt and answer exceed ``max_model_len`` are
    refused by the server and dropped (inference-perf counts them as failures, outside the statistics), as
    are the user's later turns.  inference-perf's source (v0.4) builds a user's next prompt from its
    previous prompt and response, but the measured runs answered every request of both stages with the
    configured output length, which that construction cannot do with a 4,096-token ``max_model_len``
    (users would fail from their sixth turn on); per-request traces of runs of the same study show constant
    prompt lengths.  Hence ``repeat``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace

import numpy as np

from ..errors import InputError


@dataclass
class Requests:
    """Request arrays in dispatch order (`scheduler.Workload` fields, unpadded) plus what statistics need."""

    offset_s: np.ndarray
    stage: np.ndarray
    gate: np.ndarray
    succ: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    user: np.ndarray
    group: np.ndarray
    sys_tokens: np.ndarray
    reuse: np.ndarray
    measured: np.ndarray  # bool: counted in the statistics (not warm-up)
    stage_requests: np.ndarray
    n_users: int
    n_groups: int
    rejected: int = 0  # requests the server refuses (too long), not simulated
    kind: str = "closed"
    start: str = "together"  # closed loop: how the clients' first requests go out
    benchmark_rounds: int = 0  # closed loop: rounds of the benchmark whose first is a burst (0: none)
    notes: list = field(default_factory=list)
    preloaded: np.ndarray | None = None  # int32: prompt tokens whose KV arrives computed (None: none)

    def __len__(self):
        return len(self.prompt_tokens)


def _count(w: dict, key: str, where: str, minimum: int = 1) -> int:
    v = w.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < minimum:
        raise InputError(f"must be an integer >= {minimum}, got {v!r}", where, f"workload.{key}")
    return int(v)


START = ("random", "spread", "together")
BENCHMARK_ROUNDS = 20  # requests per client of AIConfigurator's benchmark (aiperf, C x 20 after a warm-up)


def closed_loop(w: dict, where: str, rounds: int = 10, warmup_rounds: int = 1, start: str = "random",
                benchmark_rounds: int = BENCHMARK_ROUNDS, cooldown_rounds: int = 0) -> Requests:
    """The requests of a closed loop; with ``start`` "random" or "spread" the first requests' offsets are
    set by `stagger_start` once a request's duration is known.  The statistics count the rounds after the
    first ``warmup_rounds`` and before the last ``cooldown_rounds`` (the drain: clients that have sent their
    last request leave the others a lighter engine), at least one round (warm-up first, then cool-down,
    give way; a note says so)."""
    if start not in START:
        raise InputError(f"must be one of {', '.join(START)}, got {start!r}", where, "start")
    for name, v in (("benchmark_rounds", benchmark_rounds), ("cooldown_rounds", cooldown_rounds)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InputError(f"must be an integer >= 0, got {v!r}", where, name)
    C = _count(w, "concurrency", where)
    isl, osl = _count(w, "input_tokens", where), _count(w, "output_tokens", where)
    n = C * rounds
    i = np.arange(n)
    client = i % C
    succ = np.where(i + C < n, i + C, -1)
    warm = min(warmup_rounds, rounds - 1)
    cool = min(cooldown_rounds, rounds - 1 - warm)
    notes = [] if cool == cooldown_rounds else [
        f"{rounds} rounds per client leave {rounds - warm - cool} to measure after {warm} of warm-up: "
        f"{cool} of cool-down, not {cooldown_rounds}"]
    return Requests(
        offset_s=np.zeros(n, np.float32), stage=np.zeros(n, np.int32), gate=i >= C, succ=succ.astype(np.int32),
        prompt_tokens=np.full(n, isl, np.int32), output_tokens=np.full(n, osl, np.int32),
        user=client.astype(np.int32), group=np.full(n, -1, np.int32), sys_tokens=np.zeros(n, np.int32),
        reuse=np.zeros(n, bool), measured=(i >= C * warm) & (i < C * (rounds - cool)),
        stage_requests=np.array([n], np.int32), n_users=C, n_groups=0, kind="closed", start=start,
        benchmark_rounds=benchmark_rounds if start != "together" else 0, notes=notes)


def burst_round(r: Requests) -> Requests:
    """One round of a closed loop's clients, all sent at t = 0 and all measured: the first round of a
    benchmark that starts its clients together (``benchmark_rounds``)."""
    C = r.n_users
    return dataclass_replace(
        r, offset_s=np.zeros(C, np.float32), stage=r.stage[:C], gate=np.zeros(C, bool), succ=np.full(C, -1, np.int32),
        prompt_tokens=r.prompt_tokens[:C], output_tokens=r.output_tokens[:C], user=r.user[:C], group=r.group[:C],
        sys_tokens=r.sys_tokens[:C], reuse=r.reuse[:C], measured=np.ones(C, bool),
        stage_requests=np.array([C], np.int32), start="together", benchmark_rounds=0,
        preloaded=None if r.preloaded is None else r.preloaded[:C], notes=[])


def stagger_start(r: Requests, cycle_s: float, seed: int = 0) -> Requests:
    """A closed loop whose C clients send their first requests within ``cycle_s`` (one request's duration):
    evenly (``start="spread"``, client c at c · cycle_s / C) or at independent uniform times (``"random"``,
    seeded)."""
    C = r.n_users
    offset = np.zeros(len(r), np.float32)
    if r.start == "spread":
        offset[:C] = np.arange(C) * (cycle_s / C)
    else:
        # sorted: clients are alike, and request order then follows send order, so the simulation's window
        # (the oldest unfinished request on) holds every client's current request
        offset[:C] = np.sort(np.random.default_rng(seed).uniform(0.0, cycle_s, C))
    return dataclass_replace(r, offset_s=offset)


def poisson_times(rng: np.random.Generator, rate: float, n: int) -> np.ndarray:
    """inference-perf's Poisson timer: per second, Poisson(rate) requests spread over that second by
    exponential gaps scaled to sum to one second; the first ``n`` times (seconds from the timer start)."""
    out, t = [], 0.0
    while len(out) < n:
        k = int(rng.poisson(rate))
        if k < 1:
            t += 1.0
            continue
        gaps = rng.exponential(1.0 / rate, k)
        out.extend((t + np.cumsum(gaps / gaps.sum())).tolist())
        t += 1.0
    return np.asarray(out[:n], np.float64)


def constant_times(rng: np.random.Generator, rate: float, n: int) -> np.ndarray:
    """inference-perf's constant-rate timer: ``n`` exponential gaps rescaled to sum to ``n / rate`` seconds."""
    if n == 0:
        return np.zeros(0)
    gaps = rng.exponential(1.0 / rate, n)
    return np.cumsum(gaps * ((n / rate) / gaps.sum()))


def shared_prefix(w: dict, where: str, max_model_len: int | None = None, multi_turn: str = "repeat",
                  seed: int | None = None, arrivals: str = "constant") -> Requests:
    stages = w.get("stages")
    if not isinstance(stages, list) or not stages:
        raise InputError("must be a non-empty list of {rate, duration_s}", where, "workload.stages")
    groups = _count(w, "num_unique_system_prompts", where)
    per = _count(w, "num_users_per_system_prompt", where)
    sys_len = _count(w, "system_prompt_len", where, 0)
    q_len, o_len = _count(w, "question_len", where), _count(w, "output_len", where)
    chat = bool(w.get("enable_multi_turn_chat", False))
    if multi_turn not in ("repeat", "accumulate"):
        raise InputError(f"must be 'repeat' or 'accumulate', got {multi_turn!r}", where, "multi_turn")
    if arrivals not in ("constant", "poisson"):
        raise InputError(f"must be 'constant' or 'poisson', got {arrivals!r}", where, "arrivals")
    timer = constant_times if arrivals == "constant" else poisson_times
    rng = np.random.default_rng(w.get("seed", 0) if seed is None else seed)
    n_users = groups * per
    group_of_user = rng.permutation(np.repeat(np.arange(groups), per))  # users shuffled over groups
    cols = {k: [] for k in ("offset", "stage", "gate", "succ", "prompt", "user", "turn")}
    stage_n = []
    turns_done = np.zeros(n_users, int)  # turns sent before this stage (sessions persist across stages)
    base = 0
    for s, st in enumerate(stages):
        sw = f"{where}: stage {s}"
        rate = st.get("rate") if isinstance(st, dict) else None
        dur = st.get("duration_s", st.get("duration")) if isinstance(st, dict) else None
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
            raise InputError(f"must be a positive number, got {rate!r}", sw, "rate")
        if isinstance(dur, bool) or not isinstance(dur, (int, float)) or not dur > 0:
            raise InputError(f"must be a positive number, got {dur!r}", sw, "duration_s")
        n = int(rate * dur)
        k = np.arange(n)
        users = k % n_users
        turn = turns_done[users] + k // n_users
        cols["offset"].append(1.0 + timer(rng, float(rate), n))
        cols["stage"].append(np.full(n, s))
        cols["gate"].append(chat & (k >= n_users))
        cols["succ"].append(np.where(chat & (k + n_users < n), base + k + n_users, -1))
        cols["user"].append(users)
        cols["turn"].append(turn)
        turns_done += np.bincount(users, minlength=n_users)
        stage_n.append(n)
        base += n
    user = np.concatenate(cols["user"])
    turn = np.concatenate(cols["turn"])
    if chat and multi_turn == "accumulate":
        prompt = sys_len + turn * (q_len + o_len) + q_len
    else:
        prompt = np.full(len(user), sys_len + q_len)
    valid = np.ones(len(user), bool)
    if max_model_len is not None:
        valid = prompt + o_len <= max_model_len
    rejected = int((~valid).sum())
    succ = np.concatenate(cols["succ"])
    keep = np.flatnonzero(valid)
    new_index = np.full(len(valid) + 1, -1)
    new_index[keep] = np.arange(len(keep))
    succ = new_index[np.where(succ >= 0, succ, len(valid))]
    stage = np.concatenate(cols["stage"])
    stage_requests = np.bincount(stage[keep], minlength=len(stages)).astype(np.int32)
    notes = []
    if rejected:
        notes.append(f"{rejected} requests longer than max_model_len={max_model_len} are refused by the server")
    return Requests(
        offset_s=np.concatenate(cols["offset"])[keep].astype(np.float32), stage=stage[keep].astype(np.int32),
        gate=np.concatenate(cols["gate"])[keep], succ=succ[keep].astype(np.int32),
        prompt_tokens=prompt[keep].astype(np.int32), output_tokens=np.full(len(keep), o_len, np.int32),
        user=user[keep].astype(np.int32), group=group_of_user[user[keep]].astype(np.int32),
        sys_tokens=np.full(len(keep), sys_len, np.int32), reuse=np.ones(len(keep), bool),
        measured=np.ones(len(keep), bool), stage_requests=stage_requests, n_users=n_users, n_groups=groups,
        rejected=rejected, kind="open", notes=notes)


def from_record(w, where: str, max_model_len: int | None = None, **options) -> Requests:
    """The requests of a record's ``workload``."""
    if not isinstance(w, dict) or "type" not in w:
        raise InputError("must be an object with a 'type'", where, "workload")
    if w["type"] == "closed":
        return closed_loop(w, where, **{k: v for k, v in options.items()
                                        if k in ("rounds", "warmup_rounds", "start", "benchmark_rounds",
                                                 "cooldown_rounds")})
    if w["type"] == "inference_perf_shared_prefix":
        return shared_prefix(w, where, max_model_len,
                             **{k: v for k, v in options.items() if k in ("multi_turn", "seed", "arrivals")})
    raise InputError(f"unknown workload type {w['type']!r} (closed, inference_perf_shared_prefix)", where,
                     "workload.type")
