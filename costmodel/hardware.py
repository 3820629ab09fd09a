"""GPU specifications: dense peak FLOP/s, HBM bandwidth and capacity, NVLink bandwidth.

All figures are dense (no 2:4 sparsity) vendor peaks.  Sources, in the order of the fields:
* H100-SXM5-80GB: NVIDIA H100 Tensor Core GPU datasheet (2023): BF16 989.4 TFLOP/s, FP8 1978.9 TFLOP/s,
  HBM3 3.35 TB/s, 80 GB, NVLink 4 900 GB/s bidirectional per GPU (450 GB/s each way).
* H200-SXM-141GB: NVIDIA H200 datasheet (2024): same Hopper compute as H100-SXM, HBM3e 4.8 TB/s, 141 GB,
  NVLink 900 GB/s.
* H800-SXM-80GB: NVIDIA H800 product brief: H100 compute, 3.35 TB/s, 80 GB, NVLink 400 GB/s bidirectional.
* H20-96GB: NVIDIA H20 product brief: BF16 148 TFLOP/s, FP8 296 TFLOP/s, 4.0 TB/s, 96 GB, NVLink 900 GB/s.
* A100-SXM4-80GB: NVIDIA A100 datasheet (2021): BF16 312 TFLOP/s, no FP8 tensor cores, 2.039 TB/s, 80 GB,
  NVLink 3 600 GB/s bidirectional.
* B200 (HGX B200, 180 GB): NVIDIA DGX/HGX B200 datasheet (2024), per GPU: BF16 2.25 PFLOP/s, FP8 4.5 PFLOP/s
  dense, HBM3e 8 TB/s, 180 GB, NVLink 5 1.8 TB/s bidirectional.
* A100-SXM4-40GB: NVIDIA A100 datasheet (2021): as the 80 GB part with HBM2 1.555 TB/s, 40 GB.
* L40S (PCIe, 48 GB): NVIDIA L40S datasheet (2023): BF16 362 TFLOP/s, FP8 733 TFLOP/s dense, GDDR6 864 GB/s,
  48 GB, no NVLink: GPU-to-GPU traffic goes over PCIe 4.0 x16, 32 GB/s each way.  AIConfigurator's
  `systems/l40s.yaml` (aiconfigurator-core 0.12.0), which its L40S tables were measured against, gives the
  same: BF16 362.05 TFLOP/s, FP8 733 TFLOP/s, 864 GB/s, PCIe 4.0 32 GB/s per direction as the intra-node link.

`memory_bytes` is the device memory the CUDA driver reports as total (`cudaMemGetInfo`, what
`torch.cuda.mem_get_info()` returns and what vLLM multiplies by `gpu_memory_utilization`): the marketing
capacity less what the driver and ECC keep.  Values as PyTorch reports them (`total_memory` of the device
properties, MiB): H100 80GB HBM3 81,089 (vLLM logs "79.19 GiB"); H200 143,156; B200 182,642 (vLLM logs
"178.36 GiB"); H20 97,285; A100-SXM4-80GB 81,050 ("79.15 GiB total capacity" in PyTorch's OOM message);
A100-SXM4-40GB 40,536; L40S 45,589.  H800 is taken as the H100's 80 GB HBM3 stack, 81,089.
"""
from __future__ import annotations

import re
from typing import NamedTuple

from .errors import InputError


class GPU(NamedTuple):
    """One GPU model.  Rates are per GPU, dense."""

    name: str
    bf16_flops: float  # FLOP/s, dense BF16/FP16 tensor core peak
    fp8_flops: float  # FLOP/s, dense FP8 tensor core peak (0 where the GPU has none)
    hbm_bytes_per_s: float  # HBM bandwidth, bytes/s
    hbm_capacity_bytes: float
    nvlink_bytes_per_s: float  # NVLink bandwidth per GPU, one direction, bytes/s
    table_dirs: tuple[str, ...]  # bench_data sub-folder names, most preferred first
    memory_bytes: float = 0.0  # device memory the CUDA driver reports as total, bytes (see module doc)

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s of the tensor cores for a GEMM input dtype."""
        if dtype in ("bf16", "fp16"):
            return self.bf16_flops
        if dtype == "fp8":
            if self.fp8_flops <= 0:
                raise InputError(f"{self.name} has no FP8 tensor cores", field="dtype")
            return self.fp8_flops
        raise InputError(f"unknown dtype '{dtype}' (expected bf16, fp16 or fp8)", field="dtype")

    def dense_peaks(self) -> dict[str, float]:
        """Dense tensor-core peak FLOP/s by GEMM input dtype: "bf16", and "fp8" where the GPU has FP8 tensor
        cores (the denominators of the tables' ``mfu`` columns)."""
        return {"bf16": self.bf16_flops, **({"fp8": self.fp8_flops} if self.fp8_flops > 0 else {})}


T, G, MiB = 1e12, 1e9, 2.0**20
GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU("H100-SXM", 989.4 * T, 1978.9 * T, 3350 * G, 80 * G, 450 * G, ("h100_sxm", "h100"), 81089 * MiB),
        GPU("H200-SXM", 989.4 * T, 1978.9 * T, 4800 * G, 141 * G, 450 * G, ("h200_sxm", "h200"), 143156 * MiB),
        GPU("H800-SXM", 989.4 * T, 1978.9 * T, 3350 * G, 80 * G, 200 * G, ("h800_sxm", "h800"), 81089 * MiB),
        GPU("H20", 148 * T, 296 * T, 4000 * G, 96 * G, 450 * G, ("h20",), 97285 * MiB),
        GPU("A100-SXM-80GB", 312 * T, 0.0, 2039 * G, 80 * G, 300 * G, ("a100_sxm", "a100"), 81050 * MiB),
        GPU("A100-SXM-40GB", 312 * T, 0.0, 1555 * G, 40 * G, 300 * G, ("a100_sxm_40gb", "a100_40gb"),
            40536 * MiB),
        GPU("L40S", 362 * T, 733 * T, 864 * G, 48 * G, 32 * G, ("l40s",), 45589 * MiB),
        GPU("B200", 2250 * T, 4500 * T, 8000 * G, 180 * G, 900 * G, ("b200_sxm", "b200"), 182642 * MiB),
    )
}

_ALIASES = {
    "h100": "H100-SXM", "h100sxm": "H100-SXM", "h100sxm5": "H100-SXM", "h10080gb": "H100-SXM",
    "h100sxm80gb": "H100-SXM", "h200": "H200-SXM", "h200sxm": "H200-SXM", "h200sxm141gb": "H200-SXM",
    "h800": "H800-SXM", "h800sxm": "H800-SXM", "h20": "H20", "a100": "A100-SXM-80GB",
    "a100sxm": "A100-SXM-80GB", "a10080gb": "A100-SXM-80GB", "a100sxm80gb": "A100-SXM-80GB",
    "a100sxm480gb": "A100-SXM-80GB", "a10040gb": "A100-SXM-40GB", "a100sxm40gb": "A100-SXM-40GB",
    "a100sxm440gb": "A100-SXM-40GB", "l40s": "L40S", "l40s48gb": "L40S", "b200": "B200", "b200sxm": "B200",
}


def find_gpu(name: str) -> GPU | None:
    """The GPU a name means, case-insensitively, ignoring '-', '_' and spaces (`H100`, `h100_sxm`,
    `H100-SXM`; table folder names too), or None when it is not one of `GPUS`."""
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    return GPUS[_ALIASES[key]] if key in _ALIASES else None


def get_gpu(name: str) -> GPU:
    """`find_gpu`, refusing a name it does not know."""
    gpu = find_gpu(name)
    if gpu is None:
        raise InputError(f"unknown GPU '{name}' (known: {', '.join(GPUS)})", field="gpu")
    return gpu
