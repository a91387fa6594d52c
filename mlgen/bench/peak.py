"""``mlgen bench peak``: the peak FLOP/s that MFU is measured against, on this machine.

Prints one JSON line: the measured CPU probe (a float32 ``n x n`` matmul, GFLOP/s, the
host's practical peak: its simulated devices share it) and, for the local devices, their
platform, kind, count, the ``mlgen.train.throughput.CHIPS`` entry if there is one, and
``peak_flops`` of them all with its source.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax

from mlgen.train import throughput


def run(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="mlgen bench peak")
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="the matmul dtype whose chip peak to report (the CPU probe is float32)",
    )
    a = ap.parse_args(argv)
    devices = jax.local_devices()
    chip = throughput.chip_of(devices[0])
    peak, source = throughput.peak_flops(devices, a.dtype)
    n = throughput.cpu_probe_shape()
    print(
        json.dumps(
            {
                "bench": "mlgen-peak",
                "cpu_gflops": throughput.measured_cpu_peak() / 1e9,
                "cpu_probe": f"float32 {n}x{n} @ {n}x{n}, median of 7",
                "platform": devices[0].platform,
                "device_kind": devices[0].device_kind,
                "devices": len(devices),
                "chip": dataclasses.asdict(chip) if chip else None,
                "dtype": a.dtype,
                "peak_flops": peak,
                "peak_source": source,
            }
        )
    )
