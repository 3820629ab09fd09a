"""Closed-loop steady state: a mean-field estimate of what C clients measure on one engine, from the step
model alone — thousands of deployments per second, for screening a search's space before the scheduler
simulation (`scheduler.simulate`) prices the promising ones.

A client sends a request of ``P`` prompt and ``O`` output tokens, waits for its last token, spends the
client- and ingress-side time ``c`` and sends the next.  In the steady state the engine completes ``X``
requests per second and runs ``n`` of them at once; a step (mean duration ``T``) carries ``d = X (O - 1) T``
decodes and ``p = X P T`` prefill tokens.  A prompt is computed in ``k = max(1, P / (B - d))`` chunks under
the token budget ``B``.  Steps with prefill tokens and decode-only steps are priced apart by the step model
(`step.batch_features` / `step.combine`: their fixed costs differ): a fraction ``min(1, p / chunk)`` of the
steps carries the prefill tokens; every step adds the host's per-request work as the simulation does
(`scheduler.host_step_us`).  One request sees the others' share ``(n - 1) / n`` of that flow: its prefill
steps carry its chunk beside the others' decodes, its decode steps (TPOT) itself, the others' decodes and
their prefill tokens.  It spends ``E = wait + k T_prefill + (O - 1) TPOT`` in the engine, ``wait`` being
half a step (and one step more under async scheduling) when others run.  ``n = C E / (E + c)``, capped by
``max_num_seqs`` and by the KV cache (requests hold ``P + O / 2`` tokens on average); ``X = n / E``, at most
the prompts per second the budget leaves room for, ``(B - d) / (P T)``; when a cap binds, clients queue for
``C / X - E - c`` (Little's law).  (T, d, p, n) is the damped fixed point
of these relations (`ITERATIONS` updates).

Outputs: TPOT (the mean step while a request decodes); TTFT = ingress + queue + wait + k T_prefill + client;
E2E = TTFT + (O - 1) TPOT; throughput ``X O`` output tokens/s.
A mean field has no bursts, lockstep cohorts or preemptions: it screens, the simulation decides
(docs/search.md gives its agreement with the simulation and with measurements).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..compiled import jit, programs
from ..step import Batch, batch_features, combine, decode_keys_of_means, prefill_of_means
from . import scheduler as sch

# Damped fixed-point updates: 60 reach the fixed point within 3e-5 (relative TPOT, largest of 20,000 random
# closed loops of one engine); 40 left up to 0.3 % where the token budget binds, enough to break TPOT's order
# in clients.  Answers of a few tokens and tiny budgets at ~1,000 clients can circle instead (docs/serving.md).
ITERATIONS = 60
DAMPING = 0.5  # weight of the new values in each update


class ClosedLoop(NamedTuple):
    """Closed-loop points (arrays of one shape, the engine's fields too; `closed_loop` broadcasts one
    engine): clients, prompt and output tokens, and the engine as the simulation takes it (`scheduler.Engine`:
    token budget, running limit, KV blocks, scheduling mode, ingress, client and host terms)."""

    clients: jax.Array  # C
    prompt_tokens: jax.Array  # P
    output_tokens: jax.Array  # O
    engine: sch.Engine


def closed_loop(engine: sch.Engine, clients, prompt_tokens, output_tokens) -> ClosedLoop:
    """`ClosedLoop` points of one engine for arrays (or scalars) of clients, prompt and output tokens."""
    c, p, o = np.broadcast_arrays(*(np.asarray(x, np.float32) for x in (clients, prompt_tokens, output_tokens)))
    return ClosedLoop(c, p, o, jax.tree_util.tree_map(lambda a: np.broadcast_to(np.asarray(a), c.shape), engine))


class Estimate(NamedTuple):
    ttft_s: jax.Array  # mean TTFT at the client
    tpot_s: jax.Array  # mean time per output token after the first
    e2e_s: jax.Array
    requests_per_s: jax.Array
    output_tokens_per_s: jax.Array
    running: jax.Array  # mean running requests
    queue_s: jax.Array  # mean wait of a request for a running slot (clients beyond the caps)


def _step_s(sm, static, d, decode_ctx, n_chunks, chunk, cached, host_us, is_async):
    """Seconds of a step of ``d`` decodes at ``decode_ctx`` and ``n_chunks`` prefill chunks of ``chunk`` new
    tokens after ``cached`` ones (all may be fractional: means)."""
    dims = sm.on.dims
    tok, pairs = prefill_of_means(dims, n_chunks, chunk, cached)
    b = Batch(jnp.maximum(d, 0.0), decode_keys_of_means(dims, jnp.maximum(d, 0.0), decode_ctx), n_chunks, tok, pairs)
    gpu_us = combine(batch_features(sm.lookup, sm.on, b, static), sm.on, sm.params, static)[0]
    return sch.host_step_us(gpu_us, d + n_chunks, host_us, is_async) * 1e-6


def _share(p, chunk):
    """(fraction of steps with prefill tokens, chunks in such a step) of ``p`` prefill tokens per step on
    average in chunks of ``chunk``."""
    q = jnp.clip(p / chunk, 1e-6, 1.0)
    return q, jnp.maximum(p / chunk, q) / q


def estimate(sm, static, cl: ClosedLoop) -> Estimate:
    """The steady state of one closed loop (module docstring); `jax.vmap` maps it over points."""
    f32 = jnp.float32
    e = cl.engine
    C, P, O = (jnp.asarray(x, f32) for x in (cl.clients, cl.prompt_tokens, cl.output_tokens))
    B, S, K = (jnp.asarray(x, f32) for x in (e.max_batched_tokens, e.max_seqs, e.kv_blocks * e.block_tokens))
    c = jnp.asarray(e.ingress_s, f32) + jnp.asarray(e.client_s, f32)
    cap = jnp.maximum(jnp.minimum(S, K / (P + O / 2)), 1.0)
    ctx = P + O / 2
    step = functools.partial(_step_s, sm, static, host_us=e.request_host_us, is_async=e.async_scheduling)
    extra_wait = jnp.where(e.async_scheduling, 1.0, 0.0)

    def relations(T, d, p, n):
        """From the mean step time T, decodes d and prefill tokens p per step and running requests n:
        (E, X, n, k, T_prefill, TPOT, wait, and the new T, d, p).  The five steps it prices go to the step
        model as one batch (one copy of it in the compiled program)."""
        others = jnp.clip((n - 1) / jnp.maximum(n, 1e-6), 0.0, 1.0)  # share of the flow not this request's
        room = jnp.maximum(B - d, 1.0)  # a prompt's chunks: what the budget leaves next to the decodes
        k = jnp.maximum(1.0, P / room)
        chunk = P / k
        cached = chunk * (k - 1) / 2
        q_o, chunks_o = _share(p * others, chunk)  # the others' prefill, seen while it decodes
        q, chunks = _share(p, chunk)
        mine = 1.0 + d * others
        # a step carrying one of its chunks beside the others' decodes; a step while it decodes, without and
        # with the others' prefill chunks; the mean step, without and with prefill chunks
        t = jax.vmap(step, in_axes=(0, None, 0, None, None))(
            jnp.stack([d * others, mine, mine, d, d]), ctx, jnp.stack([jnp.ones_like(P), 0 * P, chunks_o, 0 * P,
                                                                        chunks]), chunk, cached)
        T_pre, tpot, T_new = t[0], (1 - q_o) * t[1] + q_o * t[2], (1 - q) * t[3] + q * t[4]
        wait = (0.5 + extra_wait) * T * jnp.clip(n - 1, 0.0, 1.0)  # an idle engine starts it at once
        E = wait + k * T_pre + (O - 1) * tpot
        # at most `cap` running, and no more prompt tokens per step than the budget leaves beside the decodes
        X = jnp.minimum(jnp.minimum(C * E / (E + c), cap) / E, room / (P * T))
        return E, X, X * E, k, T_pre, tpot, wait, T_new, X * (O - 1) * T, X * P * T

    n0 = jnp.minimum(C, cap)
    T0 = step(n0, ctx, jnp.zeros_like(P), P, jnp.zeros_like(P))

    def body(_, state):
        *_, n_new, _, _, _, _, T_new, d_new, p_new = relations(*state)
        return tuple((1 - DAMPING) * old + DAMPING * new for old, new in zip(state, (T_new, d_new, p_new, n_new)))

    state = jax.lax.fori_loop(0, ITERATIONS, body, (T0, n0, jnp.zeros_like(P), n0))
    E, X, n, k, T_pre, tpot, wait, *_ = relations(*state)
    queue = jnp.maximum(C / X - E - c, 0.0)
    ttft = e.ingress_s + queue + wait + k * T_pre + e.client_s
    e2e = ttft + (O - 1) * tpot
    return Estimate(ttft, tpot, e2e, X, X * O, n, queue)


@programs
def compiled(static):
    """`estimate` jitted and mapped over points, one program per step-model ``static``."""
    return jit(jax.vmap(lambda sm, cl: estimate(sm, static, cl), in_axes=(None, 0)))
