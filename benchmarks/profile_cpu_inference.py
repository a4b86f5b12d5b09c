"""Where the CPU inference time of the optimized fast SAFFNet (or, ``--model
compile_frozen``, of the frozen compiled reference) goes: convolutions, the fused ops,
everything else.

The model is ``optimize_for_inference(build_model("saffnet", backend="auto"),
example_input=x)`` with the weights every ``saffnet bench`` provider runs (random, BN
statistics calibrated on one random batch: see ``saffnet_fast.bench.calibrate_batchnorm_``),
fed channels_last float32 under ``inference_mode``. ``torch.profiler`` records the CPU ops of
a few forwards; each op's *self* time goes to one category:

* ``fused ops``: a ``saffnet_fast::*`` op, or any op it calls;
* ``convolutions``: an op with ``conv`` in its name (``aten::conv2d`` down to
  ``aten::mkldnn_convolution``, which holds the oneDNN kernel), outside the fused ops;
* ``everything else``: batch norm, activations, adds, copies and layout conversions,
  pooling, upsampling, ... (the largest listed);

and ``outside ops`` is the forward's wall time that no op accounts for (the Python of the
modules' forward methods). Intra-op threads run inside the op that starts them, so self times
add up to wall time. Run from the checkout::

    python benchmarks/profile_cpu_inference.py --threads 2 --batch 1 8 \\
        --out benchmarks/results/profile-cpu-inference-<date>.json

It prints a table and writes the JSON (with the command line, machine, load average before
and after). The profiler adds some overhead per op; ``unprofiled ms`` is the median forward
without it. On a shared machine the absolute times vary with the load; the split is the
point.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections import defaultdict

import torch

import saffnet_fast
from saffnet_fast.bench import (calibrate_batchnorm_, machine_info, parse_input_size,
                                save_result)
from saffnet_fast.models import build_model

CATEGORIES = ("convolutions", "fused ops", "everything else")
FORWARD = "saffnet_forward"


MODELS = {
    "fast_optimized": "optimize_for_inference(build_model('saffnet', backend='auto'))",
    # the Python wrapper: the C++ one (the default) calls the same kernels past the
    # dispatcher, where the profiler does not see them
    "compile_frozen": "compile_frozen(build_model('saffnet'), cpp_wrapper=False)",
}


def build(input_size, batch: int, kind: str = "fast_optimized"):
    """The model (``MODELS``) and a channels_last input of ``batch`` images."""
    torch.manual_seed(0)
    reference = calibrate_batchnorm_(build_model("saffnet", input_size=input_size), input_size)
    x = torch.randn(batch, 3, *input_size).contiguous(memory_format=torch.channels_last)
    if kind == "compile_frozen":  # the first (warm-up) call compiles
        return saffnet_fast.compile_frozen(reference, cpp_wrapper=False), x
    model = build_model("saffnet", backend="auto", input_size=input_size)
    model.load_state_dict(reference.state_dict())
    model = saffnet_fast.optimize_for_inference(model.eval(), example_input=x)
    return model, x


def category(event) -> str:
    node = event
    while node is not None:
        if node.name.startswith("saffnet_fast::"):
            return "fused ops"
        node = node.cpu_parent
    return "convolutions" if "conv" in event.name else "everything else"


def profile(model, x, iters: int, warmup: int) -> dict:
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                with torch.profiler.record_function(FORWARD):
                    model(x)
    events = prof.events()
    wall = sum(e.cpu_time_total for e in events if e.name == FORWARD) / iters / 1e3
    split = dict.fromkeys(CATEGORIES, 0.0)
    by_op = {c: defaultdict(lambda: [0.0, 0]) for c in CATEGORIES}
    for e in events:
        if e.name == FORWARD:
            continue
        where = category(e)
        ms = e.self_cpu_time_total / iters / 1e3
        split[where] += ms
        by_op[where][e.name][0] += ms
        by_op[where][e.name][1] += 1
    ops_ms = sum(split.values())
    top = {c: [{"op": name, "self_ms": round(ms, 3), "calls": calls // iters}
               for name, (ms, calls) in sorted(by_op[c].items(), key=lambda kv: -kv[1][0])[:12]]
           for c in CATEGORIES}
    return {
        "iters": iters,
        "unprofiled_ms": statistics.median(times) * 1e3,
        "profiled_forward_ms": wall,
        "self_ms": {c: split[c] for c in CATEGORIES},
        "outside_ops_ms": max(wall - ops_ms, 0.0),
        "op_calls_per_forward": sum(v[1] for c in CATEGORIES
                                    for v in by_op[c].values()) // iters,
        "top_ops": top,
    }


def table(rows) -> str:
    head = (f"{'batch':>5} {'thr':>3} {'unprofiled ms':>13} {'profiled ms':>11} "
            + " ".join(f"{c:>22}" for c in CATEGORIES) + f" {'outside ops':>16}")
    lines = [head, "-" * len(head)]
    for r in rows:
        wall = r["profiled_forward_ms"]
        cells = " ".join(f"{r['self_ms'][c]:9.1f} ms ({100 * r['self_ms'][c] / wall:4.1f} %)"
                         for c in CATEGORIES)
        lines.append(f"{r['batch']:5d} {r['threads']:3d} {r['unprofiled_ms']:13.1f} "
                     f"{wall:11.1f} {cells} {r['outside_ops_ms']:6.1f} ms "
                     f"({100 * r['outside_ops_ms'] / wall:4.1f} %)")
    for r in rows:
        lines.append(f"\nbatch {r['batch']}: largest ops by self time (ms per forward, calls)")
        for c in CATEGORIES:
            ops = ", ".join(f"{o['op']} {o['self_ms']:.1f} ({o['calls']})"
                            for o in r["top_ops"][c][:6])
            lines.append(f"  {c}: {ops}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="256x192", metavar="HxW")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=tuple(MODELS), default="fast_optimized",
                        help="what to profile (compile_frozen: the bench's compile_freezing; "
                             "inductor's C++ kernels then count in the compiled graph's own "
                             "'## Call CompiledFxGraph' self time, under everything else)")
    parser.add_argument("--iters", type=int, default=None,
                        help="profiled forwards per batch (default: 10 at batch 1, 3 above)")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="write the JSON here")
    args = parser.parse_args(argv)
    input_size = parse_input_size(args.input)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    meta = machine_info("cpu")
    rows = []
    for batch in args.batch:
        model, x = build(input_size, batch, args.model)
        iters = args.iters or (10 if batch == 1 else 3)
        row = {"batch": batch, "threads": args.threads, "input_size": list(input_size),
               **profile(model, x, iters, warmup=3)}
        rows.append(row)
        print(f"batch {batch}: {row['unprofiled_ms']:.1f} ms unprofiled", flush=True)
    load_after = os.getloadavg()
    print(table(rows))
    print(f"\nload average (1, 5, 15 min) before {load_before}, after {load_after} on "
          f"{meta['cpu_cores']} cores")
    if args.out:
        record = {"command": "python benchmarks/profile_cpu_inference.py "
                             + shlex.join(sys.argv[1:] if argv is None else argv),
                  "model": MODELS[args.model],
                  "dtype": "float32", "layout": "channels_last",
                  "load_average_before": load_before, "load_average_after": load_after,
                  "meta": meta, "results": rows}
        print(f"saved {save_result(record, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
