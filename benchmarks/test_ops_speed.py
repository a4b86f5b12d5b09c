"""Fused-op speed: reference (eager), reference under torch.compile, native, triton.

Each test times one (op shape, mode, dtype, batch, provider); pytest-benchmark groups the
providers of one shape side by side and conftest prints the speedup ratios at the end.
With benchmarks disabled (the normal test run) each runs once as a plain test and checks
that the provider produces finite results.
"""
from __future__ import annotations

import os

import pytest
import torch

from saffnet_fast import bench

WARMUP_CALLS = 5


def _finite(result) -> bool:
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    return all(t is not None and bool(torch.isfinite(t).all()) for t in tensors)


def test_op_speed(benchmark, op_params, device, copy_bandwidth, bench_results):
    p = op_params
    if (p.provider == "compile" and not benchmark.enabled
            and os.environ.get("SAFFNET_BENCH_COMPILE") != "1"):
        pytest.skip("compile provider: torch.compile takes tens of seconds per shape on a "
                    "small CPU; skipped when benchmarks are disabled (set "
                    "SAFFNET_BENCH_COMPILE=1 to include it)")
    if p.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("bfloat16: not supported by this CUDA device")
    try:
        work = bench.make_op_workload(p.case, p.provider, p.mode, p.batch, p.dtype, device)
    except bench.ProviderUnavailable as exc:
        pytest.skip(str(exc))

    benchmark.group = p.group
    benchmark.extra_info.update(work.info)
    if benchmark.enabled:
        for _ in range(WARMUP_CALLS):
            work.step()
        benchmark.extra_info.update(bench.measure_peak_memory(work.step, device))

    result = benchmark(work.step)
    assert _finite(result), f"{p.id}: non-finite values in the output or gradients"

    if benchmark.enabled and benchmark.stats is not None:
        median = benchmark.stats.stats.median
        record = dict(work.info, group=p.group, median_s=median)
        if device.type == "cuda":
            achieved = work.min_bytes / median
            record["achieved_bytes_per_s"] = achieved
            benchmark.extra_info["achieved_bytes_per_s"] = achieved
            if copy_bandwidth:
                record["copy_bytes_per_s"] = copy_bandwidth
                record["fraction_of_copy"] = achieved / copy_bandwidth
                benchmark.extra_info["copy_bytes_per_s"] = copy_bandwidth
                benchmark.extra_info["fraction_of_copy"] = achieved / copy_bandwidth
        record["peak_bytes"] = benchmark.extra_info.get("peak_bytes")
        bench_results.append(record)
