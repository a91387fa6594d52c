"""Throughput accounting: model FLOPs per token, the peak FLOP/s of the devices, MFU.

MFU (model FLOPs utilisation, PaLM appendix B) = model FLOPs of the steps run / wall time /
the peak FLOP/s of every device of the run. Model FLOPs are the matmul FLOPs the model needs
for one training step by the family's formula (``Family.flops_per_token``, e.g.
``mlgen.models.transformer.transformer_flops_per_token``), not what the compiled
program happens to do: rematerialisation, padding and kernels that skip masked blocks do not
change them, so MFU compares runs, meshes and backends on one scale.

Peaks (:data:`CHIPS`) are the vendors' published per-chip numbers, dense (no 2:4 sparsity),
for the bf16 matrix units; MFU is always against them, whatever dtype a model computes in,
as MaxText and PaLM report it. On CPU nothing is published: :func:`measured_cpu_peak` times a
float32 matmul on the host. XLA:CPU's simulated devices
(``--xla_force_host_platform_device_count``) share the host's cores, so a CPU run's peak is
that of its hosts (one probe per process), not of each simulated device.

Pure Python + jax: this module imports nothing else of mlgen, and reads model configs by
their attribute names (``d_model``, ``num_heads``, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
    "CHIPS",
    "Chip",
    "chip_of",
    "measured_cpu_peak",
    "peak_flops",
]

_T, _G = 1e12, 1e9
_GIB = 2**30


@dataclasses.dataclass(frozen=True, kw_only=True)
class Chip:
    """One accelerator chip's published numbers.

    Attributes:
      name: short name (``"v5p"``, ``"H100 SXM"``).
      bf16_flops: peak dense bf16 matmul FLOP/s.
      f32_flops: peak float32 FLOP/s where published (NVIDIA's non-tensor-core FP32), else None.
      tf32_flops: peak dense TF32 tensor-core FLOP/s (NVIDIA; what float32 matmuls run at
        under JAX's default matmul precision on Ampere and later), else None.
      hbm_bytes: HBM capacity in bytes, as published (GB = 1e9, GiB = 2**30).
      hbm_bytes_per_s: HBM bandwidth in bytes/s (GB/s = 1e9).
      source: where the numbers come from.
    """

    name: str
    bf16_flops: float
    hbm_bytes: float
    hbm_bytes_per_s: float
    source: str
    f32_flops: float | None = None
    tf32_flops: float | None = None


_TPU_DOCS = "cloud.google.com/tpu/docs/"
_A100 = "NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4)"
_H100 = "NVIDIA H100 datasheet (h100-datasheet-2430615)"
_H200 = "NVIDIA H200 datasheet (hpc-datasheet-sc23-h200)"

# Keyed by ``device.device_kind`` exactly as jax reports it. TPU strings were read from
# libtpu's topologies (``jax.experimental.topologies.get_topology_desc``): "TPU v5" is v5p,
# the "lite" chips are the e(fficiency) parts. NVIDIA's are the CUDA device names. NVIDIA's
# datasheets print tensor-core peaks "with sparsity" (2:4); the dense peaks are half of them.
CHIPS: dict[str, Chip] = {
    # TPU v4 page, "System architecture": 275 TFLOPs per chip (bf16), HBM2 32 GiB, 1200 GBps.
    # One jax device per chip (megacore); libtpu's topology lists both TensorCores.
    "TPU v4": Chip(
        name="v4",
        bf16_flops=275 * _T,
        hbm_bytes=32 * _GIB,
        hbm_bytes_per_s=1200 * _G,
        source=_TPU_DOCS + "v4",
    ),
    # TPU v5e page, "System architecture": 197 TFLOPs (bf16), HBM2 16 GB, 819 GBps.
    "TPU v5 lite": Chip(
        name="v5e",
        bf16_flops=197 * _T,
        hbm_bytes=16 * _G,
        hbm_bytes_per_s=819 * _G,
        source=_TPU_DOCS + "v5e",
    ),
    # TPU v5p page, "System architecture": 459 TFLOPs (bf16), HBM2e 95 GB, 2765 GBps.
    "TPU v5": Chip(
        name="v5p",
        bf16_flops=459 * _T,
        hbm_bytes=95 * _G,
        hbm_bytes_per_s=2765 * _G,
        source=_TPU_DOCS + "v5p",
    ),
    # TPU v6e (Trillium) page, "System architecture": 918 TFLOPs (bf16), HBM 32 GB, 1640 GBps.
    "TPU v6 lite": Chip(
        name="v6e",
        bf16_flops=918 * _T,
        hbm_bytes=32 * _G,
        hbm_bytes_per_s=1640 * _G,
        source=_TPU_DOCS + "v6e",
    ),
    # A100: BF16 tensor core 312 TFLOPS (624 sparse), TF32 156 (312 sparse), FP32 19.5 TFLOPS;
    # 40GB HBM2 1,555 GB/s (SXM and PCIe); 80GB HBM2e 2,039 GB/s (SXM), 1,935 GB/s (PCIe).
    "NVIDIA A100-SXM4-40GB": Chip(
        name="A100 SXM 40GB",
        bf16_flops=312 * _T,
        f32_flops=19.5 * _T,
        tf32_flops=156 * _T,
        hbm_bytes=40 * _G,
        hbm_bytes_per_s=1555 * _G,
        source=_A100,
    ),
    "NVIDIA A100-SXM4-80GB": Chip(
        name="A100 SXM 80GB",
        bf16_flops=312 * _T,
        f32_flops=19.5 * _T,
        tf32_flops=156 * _T,
        hbm_bytes=80 * _G,
        hbm_bytes_per_s=2039 * _G,
        source=_A100,
    ),
    "NVIDIA A100-PCIE-40GB": Chip(
        name="A100 PCIe 40GB",
        bf16_flops=312 * _T,
        f32_flops=19.5 * _T,
        tf32_flops=156 * _T,
        hbm_bytes=40 * _G,
        hbm_bytes_per_s=1555 * _G,
        source=_A100,
    ),
    "NVIDIA A100 80GB PCIe": Chip(
        name="A100 PCIe 80GB",
        bf16_flops=312 * _T,
        f32_flops=19.5 * _T,
        tf32_flops=156 * _T,
        hbm_bytes=80 * _G,
        hbm_bytes_per_s=1935 * _G,
        source=_A100,
    ),
    # H100 SXM: BF16 1,979 TFLOPS sparse (989.5 dense), TF32 989 sparse, FP32 67 TFLOPS;
    # 80 GB HBM3, 3.35 TB/s. H100 PCIe: BF16 1,513 sparse, TF32 756 sparse, FP32 51; 80 GB,
    # 2 TB/s. H100 NVL: BF16 1,671 sparse, TF32 835 sparse, FP32 60; 94 GB, 3.9 TB/s.
    "NVIDIA H100 80GB HBM3": Chip(
        name="H100 SXM",
        bf16_flops=1979 / 2 * _T,
        f32_flops=67 * _T,
        tf32_flops=989 / 2 * _T,
        hbm_bytes=80 * _G,
        hbm_bytes_per_s=3350 * _G,
        source=_H100,
    ),
    "NVIDIA H100 PCIe": Chip(
        name="H100 PCIe",
        bf16_flops=1513 / 2 * _T,
        f32_flops=51 * _T,
        tf32_flops=756 / 2 * _T,
        hbm_bytes=80 * _G,
        hbm_bytes_per_s=2000 * _G,
        source=_H100,
    ),
    "NVIDIA H100 NVL": Chip(
        name="H100 NVL",
        bf16_flops=1671 / 2 * _T,
        f32_flops=60 * _T,
        tf32_flops=835 / 2 * _T,
        hbm_bytes=94 * _G,
        hbm_bytes_per_s=3900 * _G,
        source=_H100,
    ),
    # H200 SXM: BF16 1,979 TFLOPS sparse, TF32 989 sparse, FP32 67 TFLOPS; 141 GB HBM3e,
    # 4.8 TB/s. H200 NVL: BF16 1,671 sparse, TF32 835 sparse, FP32 60; 141 GB, 4.8 TB/s.
    "NVIDIA H200": Chip(
        name="H200 SXM",
        bf16_flops=1979 / 2 * _T,
        f32_flops=67 * _T,
        tf32_flops=989 / 2 * _T,
        hbm_bytes=141 * _G,
        hbm_bytes_per_s=4800 * _G,
        source=_H200,
    ),
    "NVIDIA H200 NVL": Chip(
        name="H200 NVL",
        bf16_flops=1671 / 2 * _T,
        f32_flops=60 * _T,
        tf32_flops=835 / 2 * _T,
        hbm_bytes=141 * _G,
        hbm_bytes_per_s=4800 * _G,
        source=_H200,
    ),
}


def chip_of(device: Any) -> Chip | None:
    """The :data:`CHIPS` entry of a jax device (by ``device.device_kind``), or None (CPU, or
    a chip not in the table)."""
    return CHIPS.get(device.device_kind)


# -- the CPU probe ---------------------------------------------------------------------------

_PROBE_SIZES = (1024, 2048, 4096)
_PROBE_MIN_S = 0.02  # a size is used once one matmul takes this long (timer and dispatch noise)
_PROBE_RUNS = 7


@functools.cache
def _cpu_probe() -> tuple[float, int]:
    dev = jax.devices("cpu")[0]
    matmul = jax.jit(lambda a, b: a @ b)

    def seconds(a) -> float:
        t = time.perf_counter()
        matmul(a, a).block_until_ready()
        return time.perf_counter() - t

    for n in _PROBE_SIZES:
        a = jax.device_put(np.random.default_rng(0).random((n, n), np.float32), dev)
        matmul(a, a).block_until_ready()  # compile
        first = seconds(a)
        if first < _PROBE_MIN_S and n != _PROBE_SIZES[-1]:
            continue  # too short to time well: the next size
        times = [first] + [seconds(a) for _ in range(_PROBE_RUNS - 1)]
        return 2 * n**3 / float(np.median(times)), n
    raise AssertionError("unreachable: the last size is always timed")


def measured_cpu_peak() -> float:
    """FLOP/s of this host's CPU on a float32 matmul, measured once per process.

    A jit'd ``[n, n] @ [n, n]`` float32 product (``n`` = 1024, or 2048 / 4096 on a host fast
    enough that 1024 takes under 20 ms), the median of 7 runs after a compile: about 0.3-0.5 s
    the first time, cached after. It times XLA:CPU's own matmul (Eigen, every core of the
    host): the practical peak of the host, shared by all its simulated devices.
    """
    return _cpu_probe()[0]


def cpu_probe_shape() -> int:
    """The matrix side ``n`` :func:`measured_cpu_peak` used."""
    return _cpu_probe()[1]


# -- peaks -----------------------------------------------------------------------------------


def _chip_peak(chip: Chip, dtype: str) -> tuple[float, str]:
    if dtype in ("bfloat16", "float16"):
        return chip.bf16_flops, "bf16"
    if dtype != "float32":
        raise ValueError(f"peak_flops: dtype must be bfloat16, float16 or float32, got {dtype!r}")
    precision = str(jax.config.jax_default_matmul_precision or "default").lower()
    exact = precision in ("highest", "float32")
    if chip.tf32_flops is not None and not exact:
        return chip.tf32_flops, "tf32 (float32 matmuls at default precision)"
    if chip.f32_flops is not None:
        return chip.f32_flops, "fp32"
    # TPUs publish no float32 peak; at default precision their float32 matmuls run on the
    # bf16 units (one pass), so the bf16 peak is the ceiling.
    return chip.bf16_flops, "bf16 (no published float32 peak)"


def _chips(devices: Sequence[Any]) -> int:
    """Chips under ``devices``: a TPU chip can show as two devices (one per TensorCore,
    without megacore), so TPU devices count by their (slice, coordinates)."""
    tpu = [d for d in devices if d.platform == "tpu"]
    chips = {(getattr(d, "slice_index", 0), tuple(d.coords)) for d in tpu}
    return len(chips) + len(devices) - len(tpu)


def peak_flops(devices: Sequence[Any], dtype: str = "bfloat16") -> tuple[float, str]:
    """The peak FLOP/s of ``devices`` together, and where the number comes from.

    Accelerators: the :data:`CHIPS` entry's peak for ``dtype`` times the number of chips
    (``bfloat16``/``float16``: the bf16 matrix units; ``float32``: TF32 on NVIDIA unless
    ``jax_default_matmul_precision`` asks for full float32, else the published FP32, else
    the bf16 peak for TPUs, which publish none). CPU: :func:`measured_cpu_peak` (float32,
    whatever ``dtype``) times the number of processes the devices live on: simulated CPU
    devices of one process share its host's cores, so eight of them have one host's peak.

    Returns:
      ``(flop/s, source)``; ``(0.0, why)`` when a device's chip is not in the table.
    """
    if not devices:
        return 0.0, "no devices"
    by_kind: dict[str, list] = {}
    for d in devices:
        by_kind.setdefault(d.device_kind if d.platform != "cpu" else "cpu", []).append(d)
    total, parts = 0.0, []
    for kind, devs in by_kind.items():
        if kind == "cpu":
            hosts = len({d.process_index for d in devs})
            peak = measured_cpu_peak()
            total += hosts * peak
            n = cpu_probe_shape()
            shared = f"; {len(devs)} devices share it" if len(devs) > hosts else ""
            parts.append(
                f"{hosts} x CPU host {peak / _G:.1f} GFLOP/s "
                f"(measured: float32 {n}x{n} matmul{shared})"
            )
            continue
        chip = CHIPS.get(kind)
        if chip is None:
            return 0.0, f"no published peak for {kind!r} (mlgen.train.throughput.CHIPS)"
        n = _chips(devs)
        peak, which = _chip_peak(chip, dtype)
        total += n * peak
        parts.append(f"{n} x {chip.name} {peak / _T:.1f} TFLOP/s {which} ({chip.source})")
    return total, " + ".join(parts)
