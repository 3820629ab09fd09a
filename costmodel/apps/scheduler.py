"""vLLM V1's scheduler under load, as one jitted loop over engine steps priced by the step model.

The engine state lives in fixed-size arrays: read-only request columns (one row per request of the workload,
padded) and the state of a window of ``window`` requests from the oldest unfinished one on, so a whole
serving experiment is one `jax.lax.while_loop` that `jax.vmap` maps over deployments and workloads of the
same shapes.  Each iteration is an idle jump to the next arrival, or one engine step followed by up to
``decode_steps - 1`` decode-only steps that vLLM would run next (step 6 below):

1. **Arrivals.** A request is visible to the scheduler ``ingress_s`` after its client sent it.  With
   synchronous scheduling the step starting at ``now`` sees every request that arrived by ``now``; with
   async scheduling (vLLM >= 0.14 by default) step k+1 is scheduled while step k runs, so it sees only the
   requests that arrived by the start of step k (when the engine was idle, by ``now``).
2. **Running requests first**, in order: each gets ``min(its remaining tokens, the token budget left)``
   (a decode needs one token; a chunked prefill its remaining prompt).  When their new KV blocks do not fit,
   vLLM preempts the last running request (recompute: its KV is dropped, it goes back to the front of the
   waiting queue) until they fit: the kept requests are the longest prefix whose new blocks fit in the free
   blocks plus the blocks of the requests after it.
3. **Waiting requests** (only when nothing was preempted this step), first come first served: prefix-cache
   hit in whole 16-token blocks (never the last token of the prompt), then a chunk of what is left under the
   remaining token budget, while fewer than ``max_seqs`` requests run and their blocks fit; the first one
   that does not fit stops admission.
4. **The step** is summarised as `step.Batch` (decodes and their keys; prefill chunks, their tokens and
   query-key pairs) and priced by `step.batch_features` and `step.combine` through the deployment's lookup,
   plus the host's per-request work that the engine does not overlap with the GPU (`host_step_us`).
5. **Outputs**: a request samples a token when its computed tokens reach prompt + output so far; the first
   one is its first token, the last one (``output_tokens``) finishes it and frees its blocks.  A finished
   request releases the request it gates (a closed-loop client's next request, a chat user's next turn)
   at its client-side finish time, and the last request of a load stage starts the next stage.

6. **Decode-only steps.**  When the step preempted and finished nothing and every request running after it
   decodes next within the token budget, the next steps are those decodes one token further each, until a
   request finishes (its step is the last), a request becomes visible to the scheduler, a decode's new
   block does not fit, or a waiting request could be admitted (waiting requests only when the running
   limit is reached).  Each is priced on its own contexts; the iteration ends after the last of them.

Prefix cache: each request names a *user* (the identity of its prompt's reusable prefix: its own earlier
turns, or the same prompt sent again) and a *group* (a shared system prompt of ``sys_tokens`` tokens).  A
user's cache holds the full blocks of its last sequence; a group's its system prompt's full blocks.  Cached
blocks are free blocks in vLLM (evictable); when the blocks held by running requests plus the cached ones
exceed the KV capacity, caches are evicted least recently used first (users before their group's shared
system prompt).  Requests with ``reuse`` false hit only their own cache entry (their blocks from before a
preemption), as with random prompts.

A request's ``preloaded`` prompt tokens arrive with their KV already computed (the decode worker of a
disaggregated deployment receives them from a prefill worker): they count as a hit in whole blocks, with or
without prefix caching, until a preemption drops them (vLLM then recomputes the prompt on the decode worker).

Time is float32 seconds with a compensated (Kahan) sum for the engine clock; per-request times are float32
(0.1 ms resolution at 1,000 s).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import ops
from ..compiled import jit, programs
from ..step import Batch, batch_features, combine

INF = np.float32(np.inf)
DONE, WAITING, RUNNING = 2, 0, 1


class Engine(NamedTuple):
    """One engine's settings (numbers, so that deployments vmap)."""

    max_batched_tokens: jax.Array  # int32: token budget of one step
    max_seqs: jax.Array  # int32: running requests at most
    kv_blocks: jax.Array  # int32: KV-cache blocks of ``block_tokens`` tokens
    block_tokens: jax.Array  # int32: 16 in vLLM
    prefix_caching: jax.Array  # bool
    async_scheduling: jax.Array  # bool
    ingress_s: jax.Array  # float32: client send -> visible to the scheduler (HTTP, tokenization, hand-off)
    client_s: jax.Array  # float32: client-side time added to TTFT and E2E (HTTP, streaming, client work)
    stage_gap_s: jax.Array  # float32: pause of the load generator between a stage's last answer and the next stage
    request_host_us: jax.Array  # float32: host time per scheduled request per step (`host_step_us`)


class Workload(NamedTuple):
    """Requests in dispatch order (index = order of the load generator), padded with ``valid`` false."""

    offset_s: jax.Array  # float32 [R]: client send time relative to its stage's start
    stage: jax.Array  # int32 [R]
    gate: jax.Array  # bool [R]: sent only after its predecessor finished (``succ`` of that one)
    succ: jax.Array  # int32 [R]: the request this one gates (-1: none)
    prompt_tokens: jax.Array  # int32 [R]
    output_tokens: jax.Array  # int32 [R]
    user: jax.Array  # int32 [R]: prefix-cache identity of the prompt (-1: none)
    group: jax.Array  # int32 [R]: shared system prompt (-1: none)
    sys_tokens: jax.Array  # int32 [R]: tokens of the shared system prompt
    reuse: jax.Array  # bool [R]: the user's cached sequence is a prefix of this prompt
    valid: jax.Array  # bool [R]
    stage_requests: jax.Array  # int32 [S]: requests per stage
    preloaded: jax.Array  # int32 [R]: prompt tokens whose KV arrives computed (a disaggregated decode worker's)


class StepModel(NamedTuple):
    """What prices a step: a lookup (`fastlookup.FastLookup` or `step.TableLookup`), the `step.ModelOnGPU`
    and the residual `params.Params` (all pytrees)."""

    lookup: object
    on: object
    params: object


class Result(NamedTuple):
    send_s: jax.Array  # [R] client send time
    first_s: jax.Array  # [R] engine time the first token was sampled (end of its step)
    done_s: jax.Array  # [R] engine time the last token was sampled
    generated: jax.Array  # [R] output tokens sampled
    hit_tokens: jax.Array  # [R] prefix-cache hit at first admission
    preemptions: jax.Array  # [R]
    stage_start_s: jax.Array  # [S] client time each stage started
    end_s: jax.Array  # engine clock at the end
    busy_s: jax.Array  # time spent in steps
    steps: jax.Array  # engine steps run
    iterations: jax.Array  # loop iterations (steps + idle jumps)
    kv_block_s: jax.Array  # integral of KV blocks held over time
    kv_peak_blocks: jax.Array
    prefill_tokens: jax.Array  # tokens computed as prefill (incl. recompute)
    decode_tokens: jax.Array
    complete: jax.Array  # bool: every request finished
    overflow: jax.Array  # bool: more requests were waiting than the simulation window holds


def _excl(x):
    return jnp.cumsum(x) - x


def _cumsum0(x):
    """Inclusive cumulative sum over axis 0 of length n in two levels: within blocks of about sqrt(n), then over
    the blocks' totals.  XLA:CPU runs `jnp.cumsum` as a reduce-window, n^2 additions; this is about 2 n^1.5."""
    n = x.shape[0]
    b = 1 << (max(n - 1, 1).bit_length() + 1) // 2
    if n % b or n <= b:
        return jnp.cumsum(x, 0)
    blocks = jnp.cumsum(x.reshape((n // b, b) + x.shape[1:]), 1)
    before = jnp.cumsum(blocks[:, -1], 0) - blocks[:, -1]
    return (blocks + before[:, None]).reshape(x.shape)


def _ceil_div(a, b):
    return (a + b - 1) // b


def _step_us(sm: StepModel, static, n_dec, keys, n_pre, tokens, pairs):
    f = batch_features(sm.lookup, sm.on, Batch(n_dec, keys, n_pre, tokens, pairs), static)
    return combine(f, sm.on, sm.params, static)[0]


def host_step_us(gpu_us, n_requests, request_host_us, async_scheduling):
    """A step's duration (µs) from the step model's time ``gpu_us`` and the host's work for its
    ``n_requests`` scheduled requests (``request_host_us`` each: scheduling, input preparation, output
    processing and serialization to the API server).  Synchronous scheduling runs that work between GPU
    steps, so it adds; async scheduling runs it while the GPU computes, so the step lasts the longer of the
    two."""
    host = request_host_us * n_requests
    return jnp.where(async_scheduling, jnp.maximum(gpu_us, host), gpu_us + host)


DECODE_STEPS = 16  # engine steps one loop iteration can run: a step and the decode-only steps after it


def simulate(sm: StepModel, engine: Engine, wl: Workload, *, static, window: int, n_users: int, n_groups: int,
             max_iterations: int, decode_steps: int = DECODE_STEPS) -> Result:
    """Run ``wl`` on one engine until every request finished (or ``max_iterations`` loop iterations).

    ``window`` requests (from the oldest unfinished one) are scheduled per step (`Result.overflow` says
    when more were waiting); ``n_users`` and ``n_groups`` size the prefix-cache tables (at least 1).  One
    loop iteration runs up to ``decode_steps`` engine steps: a step and the decode-only steps after it (see the
    module docstring); the result does not depend on it beyond float32 rounding of the clock.
    Jitted (one compilation per static arguments and shapes); `jax.vmap` maps it over deployments."""
    return _compiled(static, window, n_users, n_groups, max_iterations, decode_steps)(sm, engine, wl)


@programs
def _compiled(static, window, n_users, n_groups, max_iterations, decode_steps=DECODE_STEPS):
    fn = functools.partial(_simulate, static=static, window=window, n_users=n_users, n_groups=n_groups,
                           max_iterations=max_iterations, decode_steps=decode_steps)
    return jit(fn)


def _simulate(sm: StepModel, engine: Engine, wl: Workload, *, static, window: int, n_users: int, n_groups: int,
              max_iterations: int, decode_steps: int = DECODE_STEPS) -> Result:
    R = wl.prompt_tokens.shape[0]
    S = wl.stage_requests.shape[0]
    W = window
    K = max(int(decode_steps), 1)
    N = R + 2 * W + 1  # the window and the requests entering it never leave the arrays; the last row is a sink
    U, G = max(n_users, 1), max(n_groups, 1)
    d = sm.on.dims
    f32, i32 = jnp.float32, jnp.int32
    B = engine.block_tokens.astype(i32)
    budget = engine.max_batched_tokens.astype(i32)
    kv = engine.kv_blocks.astype(i32)
    jj = jnp.arange(K, dtype=i32)
    slot = jnp.arange(W, dtype=i32)
    price = jax.vmap(lambda n_dec, keys, n_pre, tokens, pairs: _step_us(sm, static, n_dec, keys, n_pre, tokens,
                                                                       pairs))

    def pad(a, fill):
        a = jnp.asarray(a)
        return jnp.concatenate([a, jnp.full((N - R,), fill, a.dtype)])

    # read-only request columns, one row per request: prompt, output, user, group, system prompt, reuse,
    # successor, stage, preloaded
    reqi = jnp.stack([pad(wl.prompt_tokens.astype(i32), 1), pad(wl.output_tokens.astype(i32), 1),
                      pad(wl.user.astype(i32), -1), pad(wl.group.astype(i32), -1), pad(wl.sys_tokens.astype(i32), 0),
                      pad(wl.reuse.astype(i32), 0), pad(jnp.where(wl.valid, wl.succ, -1).astype(i32), -1),
                      pad(wl.stage.astype(i32), 0), pad(wl.preloaded.astype(i32), 0)], 1)
    offset = pad(wl.offset_s.astype(f32), INF)
    valid = pad(wl.valid, False)
    n_valid = jnp.sum(wl.valid).astype(i32)  # valid requests come first
    g_sys = jnp.zeros(G + 1, i32).at[jnp.where(wl.group >= 0, wl.group, G)].max(wl.sys_tokens.astype(i32) // B)
    u_sys = jnp.zeros(U + 1, i32).at[jnp.where(wl.user >= 0, wl.user, U)].max(
        jnp.where(wl.group >= 0, wl.sys_tokens.astype(i32) // B, 0))
    n_stage = jnp.concatenate([wl.stage_requests.astype(i32), jnp.zeros(1, i32)])

    def fresh(start):
        """Window state of requests ``start`` .. ``start + W - 1`` before they were ever scheduled: status,
        computed and generated tokens, blocks, prefix hit, preemptions; first and last token times."""
        st = jnp.where(start + slot < n_valid, WAITING, DONE).astype(i32)
        return (jnp.concatenate([st[:, None], jnp.zeros((W, 5), i32)], 1), jnp.full((W, 2), INF, f32))

    wi0, wf0 = fresh(i32(0))
    state = dict(
        wi=wi0, wf=wf0,  # the window's requests (rows base .. base + W - 1)
        out_i=jnp.zeros((N, 3), i32), out_f=jnp.full((N, 2), INF, f32),  # generated, hit, preemptions; first, done
        gate=jnp.where(pad(wl.gate, False) & valid, INF, -INF).astype(f32),
        stage_start=jnp.full(S + 1, INF, f32).at[0].set(0.0),
        stage_done=jnp.zeros(S + 1, i32),
        utab=jnp.concatenate([jnp.zeros((U + 1, 1), i32), jnp.full((U + 1, 1), -1, i32)], 1),  # cached tokens, owner
        ulast=jnp.full(U + 1, -INF, f32),
        gtab=jnp.concatenate([jnp.zeros((G + 1, 1), f32), jnp.full((G + 1, 1), -INF, f32)], 1),  # cached, last use
        base=i32(0), now=f32(0.0), comp=f32(0.0), prev_start=f32(0.0), busy=jnp.bool_(False),
        it=i32(0), steps=i32(0), busy_s=f32(0.0), kv_block_s=f32(0.0), kv_peak=i32(0),
        pre_tok=f32(0.0), dec_tok=f32(0.0), overflow=jnp.bool_(False), stuck=jnp.bool_(False))

    def cond(s):
        return (s["base"] < n_valid) & (s["it"] < max_iterations) & ~s["stuck"]

    def body(s):
        base = s["base"]
        c = jax.lax.dynamic_slice_in_dim(reqi, base, W)
        P, O, user, group, sysT, reuse, succ, stage, pre = (c[:, j] for j in range(9))
        wi, wf = s["wi"], s["wf"]
        st, comp, gen, blk, hit0, npre = (wi[:, j] for j in range(6))
        first, done = wf[:, 0], wf[:, 1]
        idx = base + slot
        now = s["now"]
        send = jnp.maximum(s["stage_start"][stage] + jax.lax.dynamic_slice_in_dim(offset, base, W),
                           jax.lax.dynamic_slice_in_dim(s["gate"], base, W))
        arrive = send + engine.ingress_s
        cutoff = jnp.where(engine.async_scheduling & s["busy"], s["prev_start"], now)
        waiting = st == WAITING
        arrived = waiting & (arrive <= cutoff)
        future = waiting & (arrive > cutoff) & jnp.isfinite(arrive)
        run = st == RUNNING

        # prefix-cache hit of a waiting request: whole blocks of its own cached sequence (its user's, or its own
        # from before a preemption) or of its group's system prompt, never its last token
        u_ix, g_ix = jnp.where(user >= 0, user, U), jnp.where(group >= 0, group, G)
        ut = s["utab"][u_ix]
        own = jnp.where((user >= 0) & ((reuse > 0) | (ut[:, 1] == idx)), ut[:, 0], 0)
        grp = jnp.where((group >= 0) & (s["gtab"][g_ix, 0] > 0), (sysT // B) * B, 0)
        hit = jnp.where(engine.prefix_caching, jnp.maximum(own, grp), 0)
        # KV received from a prefill worker counts as a hit in whole blocks until a preemption drops it
        hit = jnp.minimum(jnp.maximum(hit, jnp.where(npre == 0, (pre // B) * B, 0)), ((P + gen - 1) // B) * B)

        # 1. running requests, in order, under the token budget; preempt from the tail when blocks run out.
        # 2. waiting requests, first come first served, while the running limit and the blocks allow (none in a
        # step that preempted).  The budget the running requests leave is min(budget, what they need).
        need = jnp.where(run, P + gen - comp, 0)
        held_run = jnp.where(run, blk, 0)
        need_w = jnp.where(arrived, P + gen - hit, 0)
        cs1 = _cumsum0(jnp.stack([need, held_run, need_w, arrived.astype(i32)], 1))
        tok_r = jnp.where(run, jnp.clip(budget - (cs1[:, 0] - need), 0, need), 0)
        new_b = jnp.where(tok_r > 0, jnp.maximum(_ceil_div(comp + tok_r, B) - blk, 0), 0)
        held = cs1[-1, 1]
        free = kv - held
        remaining = budget - jnp.minimum(budget, cs1[-1, 0])
        tok_w = jnp.where(arrived, jnp.clip(remaining - (cs1[:, 2] - need_w), 0, need_w), 0)
        blk_w = _ceil_div(hit + tok_w, B)
        cs2 = _cumsum0(jnp.stack([new_b, jnp.where(arrived, blk_w, 0)], 1))
        keep = run & (cs2[:, 0] <= free + held - cs1[:, 1])
        preempted = run & ~keep
        r3 = jnp.sum(jnp.stack([jnp.where(preempted, blk, 0), jnp.where(keep, new_b, 0), keep.astype(i32),
                                preempted.astype(i32)], 1), 0)
        any_pre = r3[3] > 0
        free_after = free + r3[0] - r3[1]
        slots = engine.max_seqs.astype(i32) - r3[2]
        cand = arrived & ~any_pre
        admit = cand & (tok_w > 0) & (cs1[:, 3] - arrived < slots) & (cs2[:, 1] <= free_after)
        tok = jnp.where(keep, tok_r, 0) + jnp.where(admit, tok_w, 0)
        st = jnp.where(preempted, WAITING, st)
        comp = jnp.where(preempted, 0, comp)
        blk = jnp.where(preempted, 0, blk)
        npre = npre + preempted
        hit0 = jnp.where(admit & (npre == 0), hit, hit0)
        comp = jnp.where(admit, hit, comp)
        blk = jnp.where(admit, blk_w, blk) + jnp.where(keep, new_b, 0)
        st = jnp.where(admit, RUNNING, st)

        # 3. the step as the step model's batch summary, and the decode-only steps that may follow it: entry 0
        # of the K entries is this step, entry j >= 1 the requests running after it decoding at j - 1 more
        # tokens of context, nothing else
        sched = tok > 0
        is_dec = sched & (gen >= 1) & (comp == P + gen - 1)
        is_pre = sched & ~is_dec
        comp1 = comp + tok  # after entry 0
        emit = sched & (comp1 == P + gen)
        gen1 = gen + emit
        fin0 = emit & (gen1 >= O)
        run1 = (st == RUNNING) & ~fin0
        dec1 = run1 & (gen1 >= 1) & (comp1 == P + gen1 - 1)
        # sums over the window by a cumulative sum, which XLA materialises: the per-request values of the
        # [W, K] arrays below are read back from it (as differences), else XLA recomputes the scheduling above
        # for every one of their elements
        cs4 = _cumsum0(jnp.stack([is_dec, is_pre, jnp.where(is_pre, tok, 0), sched, blk, cand & ~admit, fin0,
                                    run1, dec1, jnp.where(dec1, comp1, 0)], 1).astype(i32))
        each = cs4 - jnp.concatenate([jnp.zeros((1, 10), i32), cs4[:-1]])
        d1_i, c1_i = each[:, 8] > 0, each[:, 9]
        ctx_j = c1_i[:, None] + jj[None, :] - 1  # [W, K]: context of a decode at entry j >= 1
        keys_j = jnp.sum(jnp.where(d1_i[:, None] & (jj[None, :] >= 1), ops.decode_keys(d, ctx_j.astype(f32)), 0.0), 0)
        # blocks held during entry j: a decode holding c = qB + m tokens (0 < m <= B) holds q + 1 blocks, and
        # floor((m + j - 1) / B) more at entry j
        m_j = ((c1_i - 1) % B + 1)[:, None] + jj[None, :] - 1
        held_j = cs4[-1, 4] + jnp.sum(jnp.where(d1_i[:, None], m_j, 0) // B, 0)
        n_dec, n_pre, tokens = (cs4[-1, j].astype(f32) for j in range(3))
        any_sched, waiting_left, any_fin0 = cs4[-1, 3] > 0, cs4[-1, 5] > 0, cs4[-1, 6] > 0
        n_run1, n_dec1 = cs4[-1, 7], cs4[-1, 8]
        keys = jnp.sum(jnp.where(is_dec, ops.decode_keys(d, comp.astype(f32)), 0.0))
        pairs = jnp.sum(jnp.where(is_pre, ops.prefill_pairs_tiled(d, tok.astype(f32), comp.astype(f32)), 0.0))
        mins = jnp.min(jnp.stack([jnp.where(future, arrive, INF), jnp.where(dec1, O - gen1, K).astype(f32)], 1), 0)
        nxt, fin_left = mins[0], mins[1]
        dummy = ~any_sched
        first_j = jj == 0
        t_us = price(jnp.where(first_j, jnp.where(dummy, 1.0, n_dec), jnp.maximum(n_dec1, 1).astype(f32)),
                     jnp.where(first_j, jnp.where(dummy, 1.0, keys), jnp.maximum(keys_j, 1.0)),
                     jnp.where(first_j, n_pre, 0.0), jnp.where(first_j, tokens, 0.0), jnp.where(first_j, pairs, 0.0))
        t_us = host_step_us(t_us, jnp.where(first_j, n_dec + n_pre, n_dec1.astype(f32)), engine.request_host_us,
                            engine.async_scheduling)
        dt_j = (t_us * 1e-6).astype(f32)

        # nothing ran: after a preemption of every running request, or (async) with arrivals since the
        # previous step's start, schedule again at `now`; otherwise jump to the next arrival
        rescan = ~any_sched & (any_pre | (engine.async_scheduling & s["busy"]))
        jump = ~any_sched & ~rescan
        stuck = jump & ~jnp.isfinite(nxt)  # nothing runs, nothing will arrive, requests remain

        # entries 1.. are what vLLM runs next while every running request decodes (none preempted or finished
        # in entry 0, none still prefilling, all within the token budget), no request finishes before the last
        # entry, nothing new becomes visible to the scheduler (the cutoff of entry j is its start, or under
        # async scheduling the start of the entry before), every decode's new block fits, and nothing waits
        # that could be admitted (waiting requests only when the running limit is reached)
        start_j = now + jnp.sum(jnp.where(jj[None, :] < jj[:, None], dt_j[None, :], 0.0), 1)  # [K]
        cutoff_j = jnp.where(engine.async_scheduling, jnp.concatenate([now[None], start_j[:-1]]), start_j)
        repeat = (any_sched & ~any_pre & ~any_fin0 & (n_dec1 > 0) & (n_dec1 == n_run1) & (n_dec1 <= budget)
                  & (~waiting_left | (engine.max_seqs.astype(i32) - n_run1 <= 0)))
        ok_j = first_j | (repeat & (jj <= fin_left) & (cutoff_j < nxt) & (held_j <= kv))
        k = jnp.sum(ok_j).astype(i32)  # each condition is monotone in j
        in_k = jj < k
        dt = jnp.where(any_sched, jnp.sum(jnp.where(in_k, dt_j, 0.0)), 0.0).astype(f32)
        last_start = now + jnp.sum(jnp.where(jj < k - 1, dt_j, 0.0))
        held_last = jnp.sum(jnp.where(jj == k - 1, held_j, 0))
        held_mid = jnp.sum(jnp.where(jj == k - 2, held_j, 0))
        kv_block_s = jnp.where(any_sched, jnp.sum(jnp.where(in_k, dt_j * held_j.astype(f32), 0.0)), 0.0)
        # Kahan sum of the engine clock
        y = dt - s["comp"]
        t_new = now + y
        kcomp = (t_new - now) - y
        t_new = jnp.where(jump & jnp.isfinite(nxt), jnp.maximum(now, nxt), t_new)
        kcomp = jnp.where(jump, 0.0, kcomp)
        t_0 = jnp.where(k > 1, now + dt_j[0], t_new)  # end of entry 0

        # 4. outputs (each decode of entries 1.. samples one token per entry)
        extra = jnp.where(dec1, k - 1, 0)
        comp = comp1 + extra
        gen = gen1 + extra
        first = jnp.where(emit & (gen1 == 1), t_0, first)
        blk = jnp.where(extra > 0, _ceil_div(comp, B), blk)
        fin = (emit | (extra > 0)) & (gen >= O)
        done = jnp.where(fin, t_new, done)
        running = st == RUNNING
        st = jnp.where(fin, DONE, st)
        r5 = jnp.sum(jnp.where(fin, blk, 0))
        blk = jnp.where(fin, 0, blk)

        # prefix-cache bookkeeping: admitted prompts are cached as allocated (end of entry 0), finished
        # sequences on completion, preempted requests' freed blocks stay cached (most recently freed); what the
        # entries before the last evicted comes between (they only add blocks: the last of them evicts most)
        touched = admit | preempted
        utab = s["utab"].at[jnp.concatenate([jnp.where(admit & (user >= 0), user, U)] * 2),
                            jnp.concatenate([jnp.zeros(W, i32), jnp.ones(W, i32)])].set(
            jnp.concatenate([(P // B) * B, idx]))
        ulast = s["ulast"].at[jnp.where(touched & (user >= 0), user, U)].max(jnp.where(touched, t_0, -INF))
        gtab = s["gtab"].at[jnp.where(admit & (group >= 0), group, G)].set(jnp.stack([jnp.ones(W, f32),
                                                                                      jnp.full(W, t_0)], 1))
        utab, gtab, ulast = _evict(utab, gtab, ulast, running, user, group, u_sys, g_sys, B,
                                   jnp.where(k >= 2, kv - held_mid, 2**30), U, G)
        utab = utab.at[jnp.where(fin & (user >= 0), user, U), 0].set(((P + O - 1) // B) * B)
        ulast = ulast.at[jnp.where(fin & (user >= 0), user, U)].max(jnp.where(fin, t_new, -INF))
        gtab = gtab.at[jnp.where(fin & (group >= 0), group, G)].set(jnp.stack([jnp.ones(W, f32),
                                                                               jnp.full(W, t_new)], 1))
        utab, gtab, ulast = _evict(utab, gtab, ulast, st == RUNNING, user, group, u_sys, g_sys, B,
                                   kv - (held_last - r5), U, G)

        # 5. a finished request releases the one it gates; a stage's last answer starts the next stage
        done_client = t_new + engine.client_s
        gate = s["gate"].at[jnp.where(fin & (succ >= 0), succ, N - 1)].set(done_client)
        stage_done = s["stage_done"].at[jnp.where(fin, stage, S)].add(1)
        complete_stage = (stage_done[:S] >= n_stage[:S]) & (n_stage[:S] > 0)
        nxt_start = jnp.concatenate([jnp.zeros(1, f32), jnp.where(complete_stage, done_client + engine.stage_gap_s,
                                                                  INF)])
        stage_start = jnp.where(jnp.isfinite(s["stage_start"]), s["stage_start"], nxt_start)

        # the window moves past its leading finished requests
        new_i = jnp.stack([st, comp, gen, blk, hit0, npre], 1)
        new_f = jnp.stack([first, done], 1)
        lead = jnp.min(jnp.where(st != DONE, slot, W))
        fi, ff = fresh(base + W)
        # a request past the window that is already visible waits for the window to reach it: the run is
        # redone with a larger window.  Only the next W requests can be: a gated request past them has its
        # predecessor past the window too, unfinished (closed loops of at most W clients; chat users)
        ahead = lambda a: jax.lax.dynamic_slice_in_dim(a, base + W, W)  # noqa: E731
        overflow = s["overflow"] | jnp.any(ahead(valid) & (
            jnp.maximum(stage_start[ahead(reqi)[:, 7]] + ahead(offset), ahead(gate)) + engine.ingress_s <= t_new))
        return dict(
            wi=jax.lax.dynamic_slice_in_dim(jnp.concatenate([new_i, fi]), lead, W),
            wf=jax.lax.dynamic_slice_in_dim(jnp.concatenate([new_f, ff]), lead, W),
            out_i=jax.lax.dynamic_update_slice(s["out_i"], jnp.stack([gen, hit0, npre], 1), (base, i32(0))),
            out_f=jax.lax.dynamic_update_slice(s["out_f"], new_f, (base, i32(0))),
            gate=gate, stage_start=stage_start, stage_done=stage_done, utab=utab, ulast=ulast, gtab=gtab,
            base=base + lead.astype(i32), now=t_new, comp=kcomp,
            prev_start=jnp.where(any_sched, last_start, t_new), busy=any_sched,
            it=s["it"] + 1, steps=s["steps"] + k * any_sched, busy_s=s["busy_s"] + dt,
            kv_block_s=s["kv_block_s"] + kv_block_s, kv_peak=jnp.maximum(s["kv_peak"], held_last),
            pre_tok=s["pre_tok"] + tokens, dec_tok=s["dec_tok"] + (n_dec + n_dec1 * (k - 1)) * any_sched,
            overflow=overflow, stuck=s["stuck"] | stuck)

    s = jax.lax.while_loop(cond, body, state)
    send = jnp.maximum(s["stage_start"][reqi[:, 7]] + offset, s["gate"])
    keep = slice(0, R)
    return Result(send_s=send[keep], first_s=s["out_f"][keep, 0], done_s=s["out_f"][keep, 1],
                  generated=s["out_i"][keep, 0], hit_tokens=s["out_i"][keep, 1], preemptions=s["out_i"][keep, 2],
                  stage_start_s=s["stage_start"][:S], end_s=s["now"], busy_s=s["busy_s"], steps=s["steps"],
                  iterations=s["it"], kv_block_s=s["kv_block_s"], kv_peak_blocks=s["kv_peak"],
                  prefill_tokens=s["pre_tok"], decode_tokens=s["dec_tok"], complete=s["base"] >= n_valid,
                  overflow=s["overflow"])


def _evict(utab, gtab, ulast, running, user, group, u_sys, g_sys, B, capacity, U, G):
    """Drop cached prefixes, least recently used first, until running requests' blocks plus the cached ones
    fit ``capacity`` (the blocks not held by running requests).  A user's entry (``utab[:, 0]`` tokens, last
    use ``ulast``) counts the blocks beyond its group's shared system prompt (``u_sys``); a group's entry
    (``gtab[:, 0]`` cached, last use ``gtab[:, 1]``) the system prompt's full blocks (``g_sys``).  Entries of
    users and groups with a running request are held, not evictable; the last rows are scatter sinks."""
    u_blocks = jnp.where(jnp.arange(U + 1) < U, jnp.maximum(utab[:, 0] // B - u_sys, 0), 0)
    g_blocks = jnp.where((jnp.arange(G + 1) < G) & (gtab[:, 0] > 0), g_sys, 0)
    bound = jnp.sum(u_blocks) + jnp.sum(g_blocks)

    def drop(tabs, held):
        (utab, gtab), (running, user, group, u_blocks, g_blocks, ulast, capacity) = tabs, held
        u_run = jnp.zeros(U + 1, bool).at[jnp.where(running & (user >= 0), user, U)].set(True)
        g_run = jnp.zeros(G + 1, bool).at[jnp.where(running & (group >= 0), group, G)].set(True)
        ub = jnp.where(u_run, 0, u_blocks)
        gb = jnp.where(g_run, 0, g_blocks)
        deficit = jnp.sum(ub) + jnp.sum(gb) - capacity
        blocks = jnp.concatenate([ub, gb])
        last = jnp.where(blocks > 0, jnp.concatenate([ulast, gtab[:, 1]]), jnp.inf)
        order = jnp.argsort(last, stable=True)  # users come first on ties
        before = jnp.cumsum(blocks[order]) - blocks[order]
        gone = jnp.zeros_like(blocks, bool).at[order].set((before < deficit) & (blocks[order] > 0))
        return (utab.at[:, 0].set(jnp.where(gone[:U + 1], 0, utab[:, 0])),
                gtab.at[:, 0].set(jnp.where(gone[U + 1:], 0.0, gtab[:, 0])))

    # the cached entries (running ones included) bound what is evictable: only look closer when it overflows
    utab, gtab = _cond_rows(bound > capacity, drop, (utab, gtab),
                            (running, user, group, u_blocks, g_blocks, ulast, jnp.asarray(capacity)))
    return utab, gtab, ulast


def _cond_rows(pred, fn, carry, held):
    """``fn(carry, held)`` where ``pred``, else ``carry`` (a `jax.lax.cond`).  Under `jax.vmap` a cond on a
    per-row predicate runs both branches for every row; here the mapped form runs ``fn`` on all rows only
    when some row's ``pred`` holds (one scalar cond) and keeps the other rows' ``carry``: the same values,
    without the cost of ``fn`` in the iterations where no row needs it."""

    @jax.custom_batching.custom_vmap
    def one(pred, carry, held):
        return jax.lax.cond(pred, fn, lambda c, h: c, carry, held)

    @one.def_vmap
    def mapped(axis_size, in_batched, pred, carry, held):
        def full(x, batched):
            return x if batched else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))
        pred, carry, held = jax.tree_util.tree_map(full, (pred, carry, held), tuple(in_batched))

        def run(c):
            new = jax.vmap(fn)(c, held)
            return jax.tree_util.tree_map(
                lambda n, o: jnp.where(pred.reshape((axis_size,) + (1,) * (n.ndim - 1)), n, o), new, c)
        out = jax.lax.cond(jnp.any(pred), run, lambda c: c, carry)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return one(pred, carry, held)
