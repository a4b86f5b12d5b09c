"""Eager reference vs native CPU forward of SCAFF, SAWF and split-resplice on SAFFNet's shapes.

Inference form (module.eval(), under torch.inference_mode), float32, batch 1 and 8, with
torch.utils.benchmark.Timer medians at the requested thread counts. Rerun with

    /work/venv/bin/python benchmarks/profile_native_cpu.py                 # timings
    /work/venv/bin/python benchmarks/profile_native_cpu.py --threads 2 --batch 1
    /work/venv/bin/python benchmarks/profile_native_cpu.py --profile       # op breakdown

The speedup column is reference median / native median (> 1: native faster). On a shared
machine, repeat and compare medians; the script prints the Timer's IQR too.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import pstats

import torch
from torch.utils import benchmark

from saffnet_fast.nn.reference import SAWF, SCAFF, SplitResplice
from saffnet_fast.fast import blocks

# (name, module factory, channels, H, W) on SAFFNet's 256×192 input.
CASES = [
    ("SCAFF", lambda c: SCAFF(c, aff_r=4), 64, 64, 48),
    ("SCAFF", lambda c: SCAFF(c, aff_r=4), 32, 64, 48),
    ("SCAFF", lambda c: SCAFF(c, aff_r=4), 64, 32, 24),
    ("SCAFF", lambda c: SCAFF(c, aff_r=4), 128, 16, 12),
    ("SAWF", lambda c: SAWF(c, aff_r=16), 32, 64, 48),
    ("SAWF", lambda c: SAWF(c, aff_r=16), 64, 32, 24),
    ("SAWF", lambda c: SAWF(c, aff_r=16), 128, 16, 12),
    ("SR", lambda c: SplitResplice(c), 64, 64, 48),
]

NATIVE = {"SCAFF": functools.partial(blocks.scaff, backend="native"),
          "SAWF": functools.partial(blocks.sawf, backend="native"),
          "SR": functools.partial(blocks.split_resplice, backend="native")}


def _randomise_bn(module: torch.nn.Module) -> None:
    """Non-trivial running statistics, so BN folding does real work."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)


def build(name, factory, c, h, w, n):
    torch.manual_seed(0)
    module = factory(c).eval()
    _randomise_bn(module)
    x = torch.randn(n, c, h, w)
    return module, x, NATIVE[name]


def time_case(module, x, fn, threads: int, min_run_time: float):
    stmt_ref = "with torch.inference_mode(): module(x)"
    stmt_nat = "with torch.inference_mode(): fn(module, x)"
    env = {"module": module, "x": x, "fn": fn, "torch": torch}
    results = []
    for stmt in (stmt_ref, stmt_nat):
        t = benchmark.Timer(stmt, globals=env, num_threads=threads)
        results.append(t.blocked_autorange(min_run_time=min_run_time))
    return results


def check_parity(module, x, fn) -> float:
    with torch.inference_mode():
        ref, out = module(x), fn(module, x)
    return float((out - ref).norm() / ref.norm())


def profile_case(module, x, fn, label: str, grad_mode: str) -> None:
    ctx = torch.inference_mode if grad_mode == "inference_mode" else torch.no_grad
    with ctx():
        for _ in range(5):
            fn(module, x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                fn(module, x)
        print(f"\n=== {label} under {grad_mode} (20 calls) ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            fn(module, x)
        pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--only", default=None, help="SCAFF, SAWF or SR")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler + cProfile breakdown at batch 1 instead of timings")
    args = parser.parse_args()

    cases = [c for c in CASES if args.only is None or c[0] == args.only]
    if args.profile:
        torch.set_num_threads(args.threads[0])
        seen = set()
        for name, factory, c, h, w in cases:
            if name in seen:
                continue
            seen.add(name)
            module, x, fn = build(name, factory, c, h, w, 1)
            for mode in ("inference_mode", "no_grad"):
                profile_case(module, x, fn, f"{name} C={c} {h}x{w} b1", mode)
        return

    print(f"torch {torch.__version__}, float32, eval, inference_mode; median µs (IQR µs)")
    print(f"{'op':6} {'C':>4} {'HxW':>7} {'N':>2} {'thr':>3} {'eager':>16} {'native':>16} "
          f"{'speedup':>7} {'rel.err':>8}")
    for threads in args.threads:
        for n in args.batch:
            for name, factory, c, h, w in cases:
                module, x, fn = build(name, factory, c, h, w, n)
                err = check_parity(module, x, fn)
                ref, nat = time_case(module, x, fn, threads, args.min_run_time)
                print(f"{name:6} {c:4d} {f'{h}x{w}':>7} {n:2d} {threads:3d} "
                      f"{ref.median * 1e6:9.1f} ({ref.iqr * 1e6:5.1f}) "
                      f"{nat.median * 1e6:9.1f} ({nat.iqr * 1e6:5.1f}) "
                      f"{ref.median / nat.median:7.2f} {err:8.1e}", flush=True)


if __name__ == "__main__":
    main()
