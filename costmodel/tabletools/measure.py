"""Measure GEMM and attention kernels on the local GPU and write bench_data tables.

    python -m costmodel.tabletools.measure --out DIR --gpu-name NAME [--grid tiny|small|full]
                                   [--shapes-of MODEL:TP[,TP]]... [--gemm-backend auto|jax|torch-graph]
                                   [--hot-weights] [--attn-backend auto|jax|flash-attn]
                                   [--kernels gemm,decode,prefill]
                                   [--repeats N] [--allow-cpu]

Writes, in the schema `costmodel.tables.load_tables` reads (see bench_data/README.md):

* ``DIR/gemm/NAME/data.csv``  ``m,k,n,latency_us,mfu,dtype`` — y[m,n] = x[m,k]·W[k,n]; ``bf16`` always,
  ``fp8`` (e4m3 × e4m3 -> bf16, unit scales, no activation quantization) on GPUs with FP8 tensor cores
  (compute capability >= 8.9).  ``--gemm-backend auto`` (default) uses PyTorch (cuBLAS(Lt):
  ``F.linear``, ``torch._scaled_mm``) timed from CUDA-graph replays with weights rotated past the L2 cache
  (`TorchGraphGemm`, `time_graph`) when torch sees a GPU — the conditions of vLLM's decode steps;
  otherwise JAX (``jnp.dot(..., preferred_element_type=bfloat16)`` through XLA), dispatched eagerly.
* ``DIR/mha/decode/NAME/{hq}-{hkv}-{d}.csv``  ``dtype,kv_dtype,batch_size,kv_len,latency_us,mfu`` — one
  query token per sequence attending over ``kv_len`` keys (per-GPU head counts, bf16, contiguous KV).
* ``DIR/mha/prefill/NAME/{hq}-{hkv}-{d}.csv``  ``dtype,batch_size,seq_len,latency_us,mfu`` — causal
  self-attention over ``seq_len`` new tokens per sequence, no cached prefix.
* ``DIR/SOURCE_NAME.md`` — device, software versions, kernels, timing method, grid, skipped cells.

Attention kernels: PyTorch + flash-attn (``flash_attn_with_kvcache`` / ``flash_attn_func``) when both are
importable and CUDA is available (``--attn-backend auto``, the default, or ``flash-attn``); otherwise
``jax.nn.dot_product_attention(implementation='cudnn')`` on GPU, falling back to the plain XLA
implementation where cuDNN refuses a shape (and always on CPU).

Timing, eager (`time_call`; JAX and flash-attn kernels): the first calls compile and warm up; then
``repeats`` times, ``number`` back-to-back calls are issued and the device is synchronized once after the
last one; ``number`` is chosen so that one repeat lasts about 2 ms.  The table value is the median over
repeats of the time per call, in µs.  A JAX call is one jitted program running the kernel on up to
``MAX_REPLICAS`` distinct input sets (`replicas`), so the host dispatch cost is shared by that many kernels
and inputs are not re-read from L2; the value is per kernel.  flash-attn calls are single kernels, so
kernels shorter than the host dispatch cost (a few µs) read as that cost.

Timing, CUDA graph (`time_graph`; the PyTorch GEMM backend): ``number`` calls captured in one graph and
replayed between CUDA events; no host cost is included, as under vLLM's CUDA graphs.

Without a GPU nothing is measured: the command prints "no GPU found, nothing measured" and exits 0;
``--allow-cpu`` runs the tiny grid on the CPU instead (to test the writer; the numbers mean nothing).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .. import ops
from ..errors import InputError
from ..hardware import find_gpu
from ..io import write_provenance, write_text
from ..model import ModelConfig, load_model

NO_GPU_MESSAGE = "no GPU found, nothing measured"
PROG = "python -m costmodel.tabletools.measure"


# ---------------------------------------------------------------- grids

@dataclass(frozen=True)
class Grid:
    """What to measure.  Head layouts are per-GPU (hq, hkv, head_dim)."""

    gemm_m: tuple[int, ...]
    gemm_kn: tuple[tuple[int, int], ...]
    decode_layouts: tuple[tuple[int, int, int], ...]
    decode_batch: tuple[int, ...]
    decode_kv: tuple[int, ...]
    prefill_layouts: tuple[tuple[int, int, int], ...]
    prefill_batch: tuple[int, ...]
    prefill_seq: tuple[int, ...]


def _dense_gemm_shapes(m: ModelConfig, tps) -> list[tuple[int, int]]:
    """(k, n) of the QKV, O, gate_up and down projections (`ops.layer_gemms`) of a dense model at each TP
    degree."""
    return [(int(g.k), int(g.n)) for tp in tps for g in ops.layer_gemms(ops.dims(m, tp), 1.0).values()]


def _heads(m: ModelConfig) -> tuple[int, int, int]:
    return m.num_heads, m.num_kv_heads, m.head_dim


def parse_shapes_of(value: str):
    """``MODEL:TP[,TP...]`` -> (ModelConfig, (tp, ...)); MODEL is a config.json, its folder or a packaged name."""
    name, _, tps = value.rpartition(":")
    if not name:
        name, tps = value, "1"
    try:
        tp = tuple(int(t) for t in tps.split(","))
    except ValueError:
        raise ValueError(f"TP degrees must be integers, got {tps!r} in {value!r}") from None
    if not tp or min(tp) < 1:
        raise ValueError(f"TP degrees must be >= 1, got {tps!r} in {value!r}")
    return load_model(name), tp


def grid_for_models(grid: Grid, models) -> Grid:
    """``grid`` with the GEMM (k, n) shapes and head layouts of ``models`` [(ModelConfig, tps)]."""
    kn, layouts = set(), set()
    for m, tps in models:
        kn |= set(_dense_gemm_shapes(m, tps))
        layouts |= set(ops.per_gpu_layouts([_heads(m)], tps))
    layouts = tuple(sorted(layouts))
    return replace(grid, gemm_kn=tuple(sorted(kn)), decode_layouts=layouts, prefill_layouts=layouts)


def _dense_model(name, hidden, inter, heads, kv_heads, head_dim) -> ModelConfig:
    """The shapes the grids need of a dense model (one layer, no vocabulary)."""
    return ModelConfig(name=name, arch="LlamaForCausalLM", hidden_size=hidden, num_layers=1, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=inter, vocab_size=1,
                       tie_embeddings=False, dtype="bf16")


_MODELS = (_dense_model("Llama-3-8B", 4096, 14336, 32, 8, 128), _dense_model("Llama-3-70B", 8192, 28672, 64, 8, 128),
           _dense_model("Qwen2.5-32B", 5120, 27648, 40, 8, 128))
_FULL_KN = tuple(sorted(set(s for m in _MODELS for s in _dense_gemm_shapes(m, (1, 2, 4, 8)))))
_FULL_LAYOUTS = ops.per_gpu_layouts([_heads(m) for m in _MODELS], (1, 2, 4, 8))

GRIDS: dict[str, Grid] = {
    # for testing the writer on a CPU: seconds
    "tiny": Grid(gemm_m=(1, 8, 32), gemm_kn=((64, 128), (128, 64)),
                 decode_layouts=((4, 2, 32),), decode_batch=(1, 2), decode_kv=(16, 64),
                 prefill_layouts=((4, 2, 32),), prefill_batch=(1, 2), prefill_seq=(16, 64)),
    # Llama-3-8B at TP1: a few minutes on an H100
    "small": Grid(gemm_m=(1, 4, 16, 64, 256, 1024, 4096, 16384),
                  gemm_kn=tuple(_dense_gemm_shapes(_MODELS[0], (1,))),
                  decode_layouts=((32, 8, 128), (8, 1, 128)), decode_batch=(1, 8, 32, 128),
                  decode_kv=(128, 1024, 4096, 16384),
                  prefill_layouts=((32, 8, 128), (8, 1, 128)), prefill_batch=(1, 4),
                  prefill_seq=(128, 512, 2048, 8192)),
    # three dense models at TP 1-8
    "full": Grid(gemm_m=tuple(sorted({2 ** j for j in range(17)} | {3 * 2 ** j for j in range(15)})),
                 gemm_kn=_FULL_KN,
                 decode_layouts=_FULL_LAYOUTS, decode_batch=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
                 decode_kv=tuple(2 ** j for j in range(4, 18)),
                 prefill_layouts=_FULL_LAYOUTS, prefill_batch=(1, 2, 4, 8, 16),
                 prefill_seq=tuple(2 ** j for j in range(4, 16))),
}


# ---------------------------------------------------------------- timing

def time_call(fn: Callable, args=(), *, sync: Callable | None = None, repeats: int = 7, warmup: int = 2,
              target_s: float = 2e-3, max_number: int = 200) -> float:
    """Median time of one call ``fn(*args)`` in µs (see the module docstring for the method).

    ``sync(out)`` waits until the device has finished ``out`` (default ``jax.block_until_ready``)."""
    if sync is None:
        import jax
        sync = jax.block_until_ready
    for _ in range(1 + warmup):  # the first call compiles
        sync(fn(*args))
    t0 = time.perf_counter()
    sync(fn(*args))
    one = time.perf_counter() - t0
    number = int(min(max_number, max(1, target_s / max(one, 1e-7))))
    per_call = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        for _ in range(number):
            out = fn(*args)
        sync(out)
        per_call.append((time.perf_counter() - t0) / number)
        del out
    return statistics.median(per_call) * 1e6


# ---------------------------------------------------------------- kernels

MAX_REPLICAS = 8
REPLICA_BYTES = 2 ** 30


def replicas(copy_bytes: float) -> int:
    """Input sets one JAX timing program rotates over: up to ``MAX_REPLICAS`` within ``REPLICA_BYTES``."""
    return int(min(MAX_REPLICAS, max(1, REPLICA_BYTES // max(copy_bytes, 1))))


class JaxKernels:
    """GEMM and attention with JAX on one device."""

    def __init__(self, device, attn_impl: str | None):
        import jax
        import jax.numpy as jnp
        self.jax, self.jnp, self.device = jax, jnp, device
        self.attn_impl = attn_impl  # 'cudnn' (with XLA fallback) or None (XLA only)
        self.used_impl: dict[str, set] = {"decode": set(), "prefill": set()}
        self._key = jax.random.PRNGKey(0)

    def _rand(self, shape, dtype):
        jax, jnp = self.jax, self.jnp
        if self.device.platform == "cpu":  # numpy: jax.random would compile once per shape
            self._rng = getattr(self, "_rng", None) or np.random.default_rng(0)
            return jax.device_put(self._rng.standard_normal(shape, dtype=np.float32).astype(dtype), self.device)
        self._key, k = jax.random.split(self._key)
        with jax.default_device(self.device):
            x = jax.random.normal(k, shape, dtype=jnp.bfloat16)
            return x.astype(dtype) if dtype != jnp.bfloat16 else x

    def _timed_replicas(self, op, make_inputs, copy_bytes, repeats):
        """Median µs of one ``op(*inputs)``: ``R`` calls on ``R`` distinct input sets run in one jitted
        program, so the host dispatch cost is shared by ``R`` kernels and inputs are not re-read from L2."""
        r = replicas(copy_bytes)
        sets = tuple(make_inputs() for _ in range(r))
        fn = self.jax.jit(lambda sets: tuple(op(*xs) for xs in sets))
        return time_call(fn, (sets,), repeats=repeats) / r

    def gemm(self, m, k, n, dtype, repeats):
        dt = {"bf16": self.jnp.bfloat16, "fp8": self.jnp.float8_e4m3fn}[dtype]
        el = 1 if dtype == "fp8" else 2
        return self._timed_replicas(self._dot_op, lambda: (self._rand((m, k), dt), self._rand((k, n), dt)),
                                    (m * k + k * n) * el + 2 * m * n, repeats)

    def _dot_op(self, x, w):
        return self.jnp.dot(x, w, preferred_element_type=self.jnp.bfloat16)

    def _attention(self, kind, q_shape, kv_shape, causal, repeats):
        jax, bf16 = self.jax, self.jnp.bfloat16
        impls = [self.attn_impl, "xla"] if self.attn_impl else ["xla"]
        copy_bytes = 2 * (2 * math.prod(q_shape) + 2 * math.prod(kv_shape))
        err = None
        for impl in impls:
            def op(q, k, v, impl=impl):
                return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
            try:
                t = self._timed_replicas(op, lambda: (self._rand(q_shape, bf16), self._rand(kv_shape, bf16),
                                                      self._rand(kv_shape, bf16)), copy_bytes, repeats)
            except Exception as e:  # cuDNN refuses some shapes/versions: fall back to XLA
                err = e
                continue
            self.used_impl[kind].add(f"jax.nn.dot_product_attention(implementation='{impl}')")
            return t
        raise err

    def decode(self, b, kv, hq, hkv, d, repeats):
        # a single query row attends to every key: the causal mask is irrelevant
        return self._attention("decode", (b, 1, hq, d), (b, kv, hkv, d), False, repeats)

    def prefill(self, b, s, hq, hkv, d, repeats):
        return self._attention("prefill", (b, s, hq, d), (b, s, hkv, d), True, repeats)

    def materializes_scores(self):
        return self.attn_impl is None


def time_graph(fn: Callable[[int], object], *, repeats: int = 7, warmup: int = 3, target_s: float = 2e-3,
               max_number: int = 200, max_out_bytes: float = 4 * 2 ** 30, out_bytes: float = 0.0) -> float:
    """Median time of one call ``fn(i)`` in µs, replayed from a CUDA graph (PyTorch).

    ``number`` calls ``fn(0) … fn(number-1)`` are captured into one graph (``fn`` may use ``i`` to rotate
    among input buffers); the graph is replayed ``repeats`` times between CUDA events and the table value is
    the median replay time over ``number``.  No host dispatch cost is included, as under vLLM's CUDA graphs.
    ``out_bytes`` (per call) caps ``number`` so that the graph's outputs stay under ``max_out_bytes``."""
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (cuBLAS handles, autotuning) off the capture stream
        for i in range(warmup):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(0)
    end.record()
    end.synchronize()
    one_s = start.elapsed_time(end) * 1e-3
    number = int(min(max_number, max(1, target_s / max(one_s, 1e-7))))
    if out_bytes > 0:
        number = int(max(1, min(number, max_out_bytes // out_bytes)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(number):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(max(repeats, 1)):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1e-3 / number)
    del graph
    return statistics.median(per_call) * 1e6


class TorchGraphGemm:
    """GEMM with PyTorch on the current CUDA device, timed from CUDA-graph replays (`time_graph`).

    y = x W^T as in ``torch.nn.functional.linear`` (bf16) or ``torch._scaled_mm`` with unit per-tensor scales
    (fp8 e4m3, bf16 output).  Weights rotate among enough copies that together they exceed twice the L2
    cache, because in the engine consecutive GEMMs read different layers' weights from HBM."""

    def __init__(self, hot_weights: bool = False):
        import torch
        self.torch, self.hot = torch, hot_weights
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        self.l2_bytes = float(getattr(props, "L2_cache_size", 50 * 2 ** 20) or 50 * 2 ** 20)
        weights = ("one weight matrix per shape (hot: L2-resident where it fits)" if hot_weights else
                   f"weights rotated over >= 2x L2 ({self.l2_bytes / 2 ** 20:.0f} MiB)")
        self.kernel = ("torch.nn.functional.linear (bf16), torch._scaled_mm (fp8, unit per-tensor scales); "
                       f"CUDA-graph replay, {weights}")

    def gemm(self, m, k, n, dtype, repeats):
        torch = self.torch
        if dtype == "fp8" and m % 16:
            raise ValueError(f"torch._scaled_mm needs m % 16 == 0 (m={m})")
        el = 1 if dtype == "fp8" else 2
        n_w = 1 if self.hot else int(min(64, max(1, math.ceil(2 * self.l2_bytes / (k * n * el)))))
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_w)]
        if dtype == "fp8":
            x = x.to(torch.float8_e4m3fn)
            ws = [w.to(torch.float8_e4m3fn) for w in ws]
            one = torch.ones((), device="cuda", dtype=torch.float32)

            def fn(i):
                return torch._scaled_mm(x, ws[i % n_w].t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        else:
            def fn(i):
                return torch.nn.functional.linear(x, ws[i % n_w])
        t = time_graph(fn, repeats=repeats, out_bytes=2.0 * m * n)
        del x, ws
        return t


def _torch_cuda_available(*also: str) -> bool:
    """PyTorch sees a CUDA device (and the modules ``also`` import)."""
    try:
        import importlib

        import torch
        for mod in also:
            importlib.import_module(mod)
        return bool(torch.cuda.is_available())
    except Exception:
        return False


class FlashAttnKernels:
    """Attention with PyTorch + flash-attn on the current CUDA device."""

    def __init__(self):
        import torch
        from flash_attn import flash_attn_func, flash_attn_with_kvcache
        self.torch, self.func, self.kvcache = torch, flash_attn_func, flash_attn_with_kvcache
        self.used_impl = {"decode": {"flash_attn_with_kvcache"}, "prefill": {"flash_attn_func"}}

    def _sync(self, _out):
        self.torch.cuda.synchronize()

    def _rand(self, *shape):
        return self.torch.randn(*shape, device="cuda", dtype=self.torch.bfloat16)

    def decode(self, b, kv, hq, hkv, d, repeats):
        q, kc, vc = self._rand(b, 1, hq, d), self._rand(b, kv, hkv, d), self._rand(b, kv, hkv, d)
        lens = self.torch.full((b,), kv, dtype=self.torch.int32, device="cuda")
        return time_call(lambda: self.kvcache(q, kc, vc, cache_seqlens=lens, causal=True), sync=self._sync,
                         repeats=repeats)

    def prefill(self, b, s, hq, hkv, d, repeats):
        q, k, v = self._rand(b, s, hq, d), self._rand(b, s, hkv, d), self._rand(b, s, hkv, d)
        return time_call(lambda: self.func(q, k, v, causal=True), sync=self._sync, repeats=repeats)

    def materializes_scores(self):
        return False


# ---------------------------------------------------------------- measuring

@dataclass
class Results:
    gemm: list[dict] = field(default_factory=list)
    decode: dict[tuple[int, int, int], list[dict]] = field(default_factory=dict)
    prefill: dict[tuple[int, int, int], list[dict]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kernels: dict[str, str] = field(default_factory=dict)


def _peaks(gpu_name: str) -> dict[str, float] | None:
    """Dense peak FLOP/s by dtype of the GPU a table folder name means (`hardware.GPU.dense_peaks`), or None."""
    g = find_gpu(gpu_name)
    return None if g is None else g.dense_peaks()


def _mfu(flops, t_us, peak):
    return flops / (t_us * 1e-6 * peak) if peak else float("nan")


def _fp8_supported(device) -> bool:
    if device.platform != "gpu" and device.platform != "cuda":
        return False
    cc = getattr(device, "compute_capability", None)
    try:
        major, minor = (int(x) for x in str(cc).split(".")[:2])
    except (TypeError, ValueError):
        return False
    return (major, minor) >= (8, 9)


def _memory_budget(device) -> float:
    """Bytes one benchmark's tensors may take: 30 % of the device memory (16 GiB when unknown)."""
    try:
        limit = float(device.memory_stats()["bytes_limit"])
    except Exception:
        limit = 0.0
    return 0.3 * limit if limit > 0 else 16 * 2 ** 30


def run_benchmarks(grid: Grid, device, *, gpu_name: str, attn_backend: str = "auto", gemm_backend: str = "auto",
                   hot_weights: bool = False, repeats: int = 7, dtypes: tuple[str, ...] | None = None,
                   kinds: tuple[str, ...] = ("gemm", "decode", "prefill"), log=print) -> Results:
    """Measure every cell of ``grid`` of the kernel ``kinds`` on ``device`` (a JAX device)."""
    import jax
    res = Results()
    on_gpu = device.platform in ("gpu", "cuda")
    jk = JaxKernels(device, "cudnn" if on_gpu else None)
    if gemm_backend == "torch-graph" or (gemm_backend == "auto" and on_gpu and _torch_cuda_available()):
        gk = TorchGraphGemm(hot_weights)
        gemm_kernel = gk.kernel
    else:
        gk = jk
        gemm_kernel = ("jnp.dot(x, w, preferred_element_type=bfloat16), up to "
                       f"{MAX_REPLICAS} independent calls per jitted program, dispatched eagerly")
    if attn_backend == "flash-attn" or (attn_backend == "auto" and on_gpu and _torch_cuda_available("flash_attn")):
        attn = FlashAttnKernels()
    else:
        attn = jk
    peaks = _peaks(gpu_name) or {}
    budget = _memory_budget(device)
    if dtypes is None:
        dtypes = ("bf16", "fp8") if _fp8_supported(device) else ("bf16",)
        if "fp8" not in dtypes:
            res.notes.append(f"fp8 GEMM not measured: {device.device_kind} has no FP8 tensor cores "
                             f"(or this is not a CUDA device)")

    # GEMM
    for dtype in (dtypes if "gemm" in kinds else ()):
        for k, n in grid.gemm_kn:
            for m in grid.gemm_m:
                nbytes = (m * k + k * n) * (1 if dtype == "fp8" else 2) + 2 * m * n
                if nbytes > budget:
                    res.skipped.append(f"gemm {dtype} m={m} k={k} n={n}: {nbytes / 2**30:.1f} GiB > budget")
                    continue
                try:
                    t = gk.gemm(m, k, n, dtype, repeats)
                except Exception as e:  # e.g. an fp8 dot XLA cannot lower, or out of memory
                    res.skipped.append(f"gemm {dtype} m={m} k={k} n={n}: {_first_line(e)}")
                    continue
                res.gemm.append(dict(m=m, k=k, n=n, latency_us=t, mfu=_mfu(2.0 * m * k * n, t, peaks.get(dtype)),
                                     dtype=dtype))
            log(f"  gemm {dtype} k={k} n={n}: {len(grid.gemm_m)} m values")
    # attention
    bf16 = peaks.get("bf16")
    for kind, layouts, batches, lengths in (("decode", grid.decode_layouts, grid.decode_batch, grid.decode_kv),
                                            ("prefill", grid.prefill_layouts, grid.prefill_batch,
                                             grid.prefill_seq)):
        for hq, hkv, d in (layouts if kind in kinds else ()):
            rows = []
            for b in batches:
                for L in lengths:
                    q_len = 1 if kind == "decode" else L
                    nbytes = 2 * (b * q_len * hq * d * 2 + 2 * b * L * hkv * d)  # q, out, k, v in bf16
                    if attn.materializes_scores():
                        nbytes += 4 * b * hq * q_len * L * 2  # fp32 logits and probabilities
                    if nbytes > budget:
                        res.skipped.append(f"{kind} {hq}-{hkv}-{d} batch={b} len={L}: "
                                           f"{nbytes / 2**30:.1f} GiB > budget")
                        continue
                    try:
                        t = getattr(attn, kind)(b, L, hq, hkv, d, repeats)
                    except Exception as e:  # out of memory, or no implementation accepts the shape
                        res.skipped.append(f"{kind} {hq}-{hkv}-{d} batch={b} len={L}: {_first_line(e)}")
                        continue
                    if kind == "decode":
                        rows.append(dict(dtype="bf16", kv_dtype="bf16", batch_size=b, kv_len=L, latency_us=t,
                                         mfu=_mfu(4.0 * hq * d * L * b, t, bf16)))
                    else:
                        rows.append(dict(dtype="bf16", batch_size=b, seq_len=L, latency_us=t,
                                         mfu=_mfu(4.0 * hq * d * L * L / 2.0 * b, t, bf16)))
            if rows:
                getattr(res, kind)[(hq, hkv, d)] = rows
            log(f"  {kind} {hq}-{hkv}-{d}: {len(rows)} cells")
    res.kernels = {
        "gemm": f"{gemm_kernel}; dtypes {', '.join(dtypes)} (fp8 = float8_e4m3fn x float8_e4m3fn, unit scales)",
        "decode": ", ".join(sorted(attn.used_impl["decode"])) or "-",
        "prefill": ", ".join(sorted(attn.used_impl["prefill"])) or "-",
        "attention backend": type(attn).__name__,
        "jax": jax.__version__,
    }
    if isinstance(attn, FlashAttnKernels) or isinstance(gk, TorchGraphGemm):
        import torch
        res.kernels["torch"] = torch.__version__
    if isinstance(attn, FlashAttnKernels):
        import flash_attn
        res.kernels["flash_attn"] = flash_attn.__version__
    _fp8_check(res)
    return res


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _fp8_check(res: Results) -> None:
    """Flag an FP8 GEMM no faster than BF16 at large m: XLA may have run it as a BF16 GEMM."""
    big = {}
    for r in res.gemm:
        key = (r["m"], r["k"], r["n"])
        big.setdefault(key, {})[r["dtype"]] = r["latency_us"]
    ratios = [v["bf16"] / v["fp8"] for (m, k, n), v in big.items() if "fp8" in v and "bf16" in v and m >= 4096]
    if ratios:
        med = statistics.median(ratios)
        res.notes.append(f"fp8/bf16 GEMM speed-up at m >= 4096: median {med:.2f}x over {len(ratios)} shapes"
                         + ("" if med > 1.2 else " — WARNING: FP8 is not faster; XLA may not have used FP8 "
                                                "tensor cores, do not use the fp8 rows"))


# ---------------------------------------------------------------- writing

def _num(v: float) -> str:
    if v is None or not math.isfinite(v):
        return ""
    return f"{float(f'{v:.4g}'):.10g}"


def _write_csv(path: Path, cols: list[str], rows: list[dict]) -> None:
    lines = [",".join(cols)]
    for r in rows:
        lines.append(",".join(_num(r[c]) if isinstance(r[c], float) else str(r[c]) for c in cols))
    write_text(path, "\n".join(lines) + "\n")


def write_tables(out: Path, gpu_name: str, res: Results, *, device_desc: str, grid_name: str, grid: Grid,
                 repeats: int, command: str) -> list[Path]:
    """Write ``res`` under ``out`` in the bench_data schema; returns the files written."""
    out = Path(out)
    written = []
    if res.gemm:
        p = out / "gemm" / gpu_name / "data.csv"
        _write_csv(p, ["m", "k", "n", "latency_us", "mfu", "dtype"], res.gemm)
        written.append(p)
    for kind, cols in (("decode", ["dtype", "kv_dtype", "batch_size", "kv_len", "latency_us", "mfu"]),
                       ("prefill", ["dtype", "batch_size", "seq_len", "latency_us", "mfu"])):
        for (hq, hkv, d), rows in sorted(getattr(res, kind).items()):
            p = out / "mha" / kind / gpu_name / f"{hq}-{hkv}-{d}.csv"
            _write_csv(p, cols, rows)
            written.append(p)
    src = write_provenance(out, gpu_name, _provenance_lines(res, device_desc=device_desc, grid_name=grid_name,
                                                            grid=grid, repeats=repeats, command=command,
                                                            files=written, out=out))
    return written + [src]


def _provenance_lines(res: Results, *, device_desc, grid_name, grid, repeats, command, files, out) -> list[str]:
    """The lines of the provenance note (`io.write_provenance`) below its title."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Measured on {now} by `{command}` (`costmodel/tabletools/measure.py`).",
        "",
        f"* Device: {device_desc}",
        f"* Host: {platform.node() or '?'}, {platform.platform()}, Python {platform.python_version()}",
    ]
    lines += [f"* {k}: {v}" for k, v in res.kernels.items()]
    lines += [
        "",
        "## Method",
        "",
        "* One call of the kernel on random bf16 (or fp8) inputs already on the device.",
        f"* Timing (eager: JAX and flash-attn kernels): compile + 2 warm-up calls, then {repeats} repeats of N "
        "back-to-back calls followed by one device synchronization (N chosen for about 2 ms per repeat); "
        "`latency_us` = median over repeats of the time per kernel.  A JAX call runs the kernel on up to "
        f"{MAX_REPLICAS} distinct input sets (within {REPLICA_BYTES / 2 ** 30:.0f} GiB) in one jitted program, "
        "sharing the host dispatch cost; a flash-attn call is one kernel, so kernels shorter than the host "
        "dispatch cost read as that cost.",
        f"* Timing (CUDA graph: the PyTorch GEMM backend): N calls captured in one graph, {repeats} replays "
        "between CUDA events, `latency_us` = median replay time / N; weights rotate over at least twice the L2 "
        "cache so that each call reads its weights from HBM, as consecutive layers do in the engine.",
        "* GEMM: y[m,n] = x[m,k] W[k,n], output bf16, fp32 accumulation; `mfu` = 2mkn / (t * peak[dtype]).",
        "* Decode: one query token per sequence over `kv_len` keys in a contiguous (not paged) bf16 KV cache; "
        "`mfu` = 4 hq d kv_len batch / (t * bf16 peak).",
        "* Prefill: causal attention over `seq_len` new tokens per sequence, no cached prefix; "
        "`mfu` = 4 hq d (seq_len^2 / 2) batch / (t * bf16 peak).",
        "* Head counts in file names are per GPU.  Values are rounded to 4 significant digits.",
        "* `mfu` is empty when the GPU name is not one `costmodel.hardware` knows (no peak).",
        "",
        f"## Grid `{grid_name}`",
        "",
        f"* GEMM m: {', '.join(map(str, grid.gemm_m))}",
        f"* GEMM (k, n): {', '.join(f'({k}, {n})' for k, n in grid.gemm_kn)}",
        f"* decode layouts: {', '.join('-'.join(map(str, h)) for h in grid.decode_layouts)}; batch "
        f"{', '.join(map(str, grid.decode_batch))}; kv_len {', '.join(map(str, grid.decode_kv))}",
        f"* prefill layouts: {', '.join('-'.join(map(str, h)) for h in grid.prefill_layouts)}; batch "
        f"{', '.join(map(str, grid.prefill_batch))}; seq_len {', '.join(map(str, grid.prefill_seq))}",
        "",
        "## Files",
        "",
    ]
    lines += [f"* `{p.relative_to(out)}`" for p in files]
    if res.notes:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in res.notes]
    if res.skipped:
        lines += ["", f"## Skipped cells ({len(res.skipped)}: over the memory budget or failed)", ""]
        lines += [f"* {s}" for s in res.skipped]
    return lines


# ---------------------------------------------------------------- command line

def gpu_devices():
    """The JAX GPU devices, or [] when there is no GPU backend."""
    import jax
    try:
        return list(jax.devices("gpu"))
    except RuntimeError:
        return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description="Measure GEMM and attention kernels on the local GPU "
                                 "and write bench_data tables (gemm/, mha/decode/, mha/prefill/, SOURCE_<gpu>.md).")
    ap.add_argument("--out", required=True, help="bench_data folder to write into (created if needed)")
    ap.add_argument("--gpu-name", required=True,
                    help="table folder name, e.g. h100_sxm (must be one of costmodel.hardware's table_dirs "
                         "for the loader to find it)")
    ap.add_argument("--grid", choices=sorted(GRIDS), default="small")
    ap.add_argument("--shapes-of", action="append", default=[], metavar="MODEL:TP[,TP...]",
                    help="measure the GEMM shapes and per-GPU head layouts of this model (config.json folder or "
                         "packaged name) at these TP degrees instead of the grid's (repeatable); the grid still "
                         "gives m, batch and lengths")
    ap.add_argument("--attn-backend", choices=("auto", "jax", "flash-attn"), default="auto",
                    help="auto: PyTorch + flash-attn when importable, else JAX (cuDNN, XLA fallback)")
    ap.add_argument("--gemm-backend", choices=("auto", "jax", "torch-graph"), default="auto",
                    help="auto: PyTorch timed from CUDA-graph replays when torch sees a GPU, else JAX (eager)")
    ap.add_argument("--hot-weights", action="store_true",
                    help="torch-graph GEMMs reuse one weight matrix (L2-hot where it fits) instead of rotating "
                         "weights past the L2 cache, as many isolated benchmarks do")
    ap.add_argument("--kernels", default="gemm,decode,prefill",
                    help="comma-separated kernel types to measure (default: gemm,decode,prefill)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--allow-cpu", action="store_true",
                    help="without a GPU, run the tiny grid on the CPU (tests the writer; numbers are meaningless)")
    args = ap.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kernels.split(",") if k.strip())
    if not kinds or set(kinds) - {"gemm", "decode", "prefill"}:
        ap.error(f"--kernels takes gemm, decode and/or prefill, got {args.kernels!r}")
    if not args.gpu_name or "/" in args.gpu_name or args.gpu_name.startswith("."):
        ap.error(f"--gpu-name must be a plain folder name, got {args.gpu_name!r}")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory to PyTorch / big cells
    import jax

    gpus = gpu_devices()
    grid_name = args.grid
    if gpus:
        device = gpus[0]
    elif not args.allow_cpu:
        print(f"{PROG}: {NO_GPU_MESSAGE} (jax.devices('gpu') is empty; --allow-cpu runs the tiny grid on the "
              f"CPU to test the writer)")
        return 0
    else:
        device = jax.devices("cpu")[0]
        if grid_name != "tiny":
            print(f"{PROG}: no GPU found; --allow-cpu runs the tiny grid on the CPU (not {grid_name})")
        grid_name = "tiny"
    if args.attn_backend == "flash-attn" and not (gpus and _torch_cuda_available("flash_attn")):
        print(f"{PROG}: error: --attn-backend flash-attn needs torch, flash_attn and CUDA", file=sys.stderr)
        return 2
    if _peaks(args.gpu_name) is None:
        print(f"{PROG}: warning: '{args.gpu_name}' is not a GPU costmodel.hardware knows: mfu left empty and "
              f"the loader will not find these tables under that name", file=sys.stderr)
    desc = f"{device.device_kind} ({device.platform}, {device})"
    grid = GRIDS[grid_name]
    if args.shapes_of:
        try:
            grid = grid_for_models(grid, [parse_shapes_of(v) for v in args.shapes_of])
        except (InputError, ValueError) as e:
            print(f"{PROG}: error: --shapes-of: {e}", file=sys.stderr)
            return 2
        grid_name += " + " + " ".join(args.shapes_of)
    print(f"{PROG}: measuring grid '{grid_name}' on {desc} -> {args.out} (gpu folder {args.gpu_name})")
    t0 = time.perf_counter()
    if args.gemm_backend == "torch-graph" and not (gpus and _torch_cuda_available()):
        print(f"{PROG}: error: --gemm-backend torch-graph needs torch with CUDA", file=sys.stderr)
        return 2
    res = run_benchmarks(grid, device, gpu_name=args.gpu_name, attn_backend=args.attn_backend,
                         gemm_backend=args.gemm_backend, hot_weights=args.hot_weights, repeats=args.repeats,
                         kinds=kinds, log=lambda s: print(s, flush=True))
    command = " ".join([PROG] + (argv if argv is not None else sys.argv[1:]))
    files = write_tables(Path(args.out), args.gpu_name, res, device_desc=desc, grid_name=grid_name, grid=grid,
                         repeats=args.repeats, command=command)
    for n in res.notes:
        print(f"  note: {n}")
    print(f"{PROG}: wrote {len(files)} files under {args.out} in {time.perf_counter() - t0:.0f} s "
          f"({len(res.gemm)} GEMM points, {sum(map(len, res.decode.values()))} decode, "
          f"{sum(map(len, res.prefill.values()))} prefill; {len(res.skipped)} cells skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
