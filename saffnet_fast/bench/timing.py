"""Timing, memory and bandwidth measurement shared by the op and model benchmarks."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["synchronize", "time_callable", "measure_peak_memory", "measure_copy_bandwidth",
           "raise_compile_limits"]


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], object], device: torch.device | str, *,
                  warmup: int = 3, min_run_time: float = 1.0, max_warmup: int = 30) -> dict:
    """Median time of ``fn()`` via ``torch.utils.benchmark.Timer.blocked_autorange``.

    At least ``warmup`` calls run first, more until the call time settles (lazy
    initialisation, compilation, autotuning, cuDNN algorithm search: see
    :func:`_warm_up`). The Timer synchronises CUDA around each block, so the median is of
    complete work, not of kernel launches.
    """
    from torch.utils import benchmark as tb

    warmup_calls = _warm_up(fn, device, warmup, max(warmup, max_warmup))
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return {
        "median_s": float(m.median),
        "iqr_s": float(m.iqr),
        "samples": len(m.times),
        "calls_per_sample": int(m.number_per_run),
        "warmup_calls": warmup_calls,
    }


def _warm_up(fn: Callable[[], object], device, min_calls: int, max_calls: int = 30,
             settle: float = 0.25, budget_s: float = 120.0) -> int:
    """Call ``fn`` until its time settles; return the number of calls.

    The first calls of a model are not representative and not only the very first one:
    oneDNN creates a primitive per new convolution shape (the first training step of SAFFNet
    on the CPU takes ~100× a settled one), cuDNN searches algorithms, compile autotunes.
    Stop after ``min_calls`` once two consecutive calls agree within ``settle``, after
    ``max_calls``, or once ``budget_s`` seconds were spent.
    """
    start = time.perf_counter()
    previous = None
    calls = 0
    while calls < max_calls:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        elapsed = time.perf_counter() - t0
        calls += 1
        settled = previous is not None and abs(elapsed - previous) <= settle * previous
        if calls >= min_calls and (settled or time.perf_counter() - start > budget_s):
            break
        previous = elapsed
    return calls


def measure_peak_memory(fn: Callable[[], object], device: torch.device | str) -> dict:
    """Peak allocator memory of one ``fn()`` call.

    CUDA: ``torch.cuda.max_memory_allocated`` around the call (``peak_bytes``) and its
    excess over what was allocated before (``peak_over_baseline_bytes``). CPU: not measured
    (tracemalloc sees Python allocations only, not ATen's), ``None`` with the reason.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return {"peak_bytes": None, "peak_over_baseline_bytes": None,
                "peak_note": "not measured on CPU: tracemalloc does not see ATen allocations"}
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    baseline = torch.cuda.memory_allocated(dev)
    fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    return {"peak_bytes": int(peak), "peak_over_baseline_bytes": int(peak - baseline)}


def measure_copy_bandwidth(device: torch.device | str, nbytes: int = 512 << 20,
                           repeats: int = 20) -> float:
    """Device copy bandwidth in bytes/s: ``x.clone()`` of ``nbytes``, read + write counted.

    The yardstick of the ops' achieved bandwidth, measured in the same run on the same
    device. CUDA events time each clone; the median is reported.
    """
    dev = torch.device(device)
    numel = nbytes // 4
    x = torch.empty(numel, dtype=torch.float32, device=dev).fill_(1.0)
    moved = 2 * numel * 4
    if dev.type == "cuda":
        for _ in range(3):
            x.clone()
        times = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            y = x.clone()
            end.record()
            torch.cuda.synchronize(dev)
            times.append(start.elapsed_time(end) / 1e3)
            del y
        return moved / statistics.median(times)
    x.clone()
    times = []
    for _ in range(max(3, repeats // 4)):
        t0 = time.perf_counter()
        y = x.clone()
        times.append(time.perf_counter() - t0)
        del y
    return moved / statistics.median(times)


def raise_compile_limits() -> None:
    """Let torch.compile keep one graph per benchmarked shape and dtype.

    The benchmarks compile the same module classes at many shapes; past dynamo's default
    recompile limit (8) it would silently run eager and the "compile" figures would lie.
    Raise the limit, and fail loudly if it is ever hit anyway.
    """
    import torch._dynamo.config as dcfg

    for name, value in (("recompile_limit", 1024), ("cache_size_limit", 1024),
                        ("accumulated_recompile_limit", 8192),
                        ("accumulated_cache_size_limit", 8192),
                        ("fail_on_recompile_limit_hit", True)):
        if hasattr(dcfg, name):
            setattr(dcfg, name, value)
