"""The one-launch tensor-core SR kernel (saffnet_fast/ops/triton/split_resplice_tc.py) on a GPU:
parity first, then time against eager and the native tiled kernel, each figure beside its
floor, and a sweep of the kernel's tile / chunk / warps / stages for the float16 case.

    python benchmarks/bench_split_resplice_tc.py [--out FILE.json]     # SR(64), batch 64,
        64×48: float16 / bfloat16 / float32, channels_last and NCHW, ~4 minutes on an H100
        (mostly Triton compiles: one per configuration)
    python benchmarks/bench_split_resplice_tc.py --quick                # auto config only
    python benchmarks/bench_split_resplice_tc.py --device cpu --batch 1 --size 5 7 --quick
        (a dry run under TRITON_INTERPRET=1: checks the script, times nothing useful)

Every configuration's output is checked against the float32 reference (the module in eval,
BN from random running statistics) before it is timed: ‖out − ref‖/‖ref‖ under the dtype's
bound (float16 / bfloat16 1e-2, float32 1e-5). Times are CUDA-event medians of REPEAT calls
in a row (one launch each, so launch latency is included as a model would pay it). Floor:
x read once + out written once at the copy bandwidth measured here (a 1 GiB clone), and
the 2.31 GMAC (SR(64) at batch 64) at 800 TF/s dense fp16.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (tile_h, tile_w, block_m, num_warps, num_stages); 0 = the launcher's choice
SWEEP = [(0, 0, 0, 0, 0),
         (32, 48, 128, 4, 1), (32, 48, 256, 8, 1), (32, 48, 128, 4, 2), (32, 48, 64, 4, 1),
         (16, 48, 128, 4, 1), (16, 48, 256, 8, 1),
         (64, 48, 128, 4, 1), (64, 48, 256, 8, 1),
         (16, 24, 128, 4, 1), (32, 24, 128, 4, 1)]
BOUNDS = {"float16": 1e-2, "bfloat16": 1e-2, "float32": 1e-5}
PEAK_FLOPS = 800e12  # H100 dense fp16 / bf16, the gpu.md figure


def rel_err(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def time_us(fn, device: str, reps: int, repeat: int = 20) -> float:
    for _ in range(3):
        fn()
    if device != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / repeat)
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a 1 GiB device clone (read + write), the bandwidth floors use."""
    if device != "cuda":
        return float("nan")
    x = torch.empty(2 ** 29, dtype=torch.float16, device=device)
    us = time_us(lambda: x.clone(), device, 10, repeat=5)
    return 2 * x.numel() * 2 / (us * 1e-6)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, nargs=2, default=[64, 48], metavar=("H", "W"))
    parser.add_argument("--dtypes", default="float16,bfloat16,float32")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="the automatic config only")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device (use --device cpu for a dry run)")
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    import saffnet_fast
    from saffnet_fast.fast.blocks import fold_split_resplice
    from saffnet_fast.nn.reference import SplitResplice
    from saffnet_fast.ops.triton import split_resplice_tc as tc

    torch.backends.cudnn.benchmark = True
    h, w = args.size
    n, c = args.batch, args.channels
    bandwidth = copy_bandwidth(args.device)
    macs = n * h * w * sum(9 * cj * cj for cj in tc.sr_widths(c, 7))
    print(f"device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}; "
          f"copy {bandwidth / 1e12:.2f} TB/s; SR({c}) {n}×{h}×{w}: {macs / 1e9:.2f} GMAC")
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator().manual_seed(0)
        module = SplitResplice(c).eval()
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
        reference = module.to(args.device)
        block = SplitResplice(c).eval()
        block.load_state_dict(module.state_dict())
        block = block.to(args.device, dtype)
        with torch.no_grad():
            weights, biases = (list(t) for t in fold_split_resplice(block))
        slope = float(block.steps[0].negative_slope)
        x32 = torch.randn(n, c, h, w, device=args.device)
        floor_bytes = 2 * x32.numel() * dtype.itemsize
        floor_us = max(floor_bytes / bandwidth * 1e6, 2 * macs / PEAK_FLOPS * 1e6)
        for layout in ("channels_last", "nchw"):
            x = x32.to(dtype)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                ref = reference(x.float())
                eager_block = block.to(memory_format=torch.channels_last
                                       if layout == "channels_last" else torch.contiguous_format)
                eager_us = time_us(lambda: eager_block(x), args.device, args.reps)
            found = [("eager", None, eager_us, rel_err(eager_block(x), ref))]
            if saffnet_fast.has_native() and args.device == "cuda":
                native = torch.ops.saffnet_fast.split_resplice_tiled
                out = native(x, weights, biases, slope, 0, 0, False)[0]
                found.append(("native tiled", None,
                              time_us(lambda: native(x, weights, biases, slope, 0, 0, False),
                                      args.device, args.reps), rel_err(out, ref)))
            sweep = SWEEP[:1] if args.quick or (dtype_name, layout) != ("float16",
                                                                        "channels_last") \
                else SWEEP
            for th, tw, bm, warps, stages in sweep:
                def run():
                    return tc.launch_split_resplice_tc(
                        x, weights, biases, slope, th, tw, False, block_m=bm or None,
                        num_warps=warps or None, num_stages=stages or None)
                try:
                    err = rel_err(run()[0], ref)
                except Exception as exc:  # e.g. out of resources for one config
                    print(f"  {dtype_name} {layout} {(th, tw, bm, warps, stages)}: "
                          f"{type(exc).__name__}: {str(exc)[:200]}")
                    continue
                if not err < BOUNDS[dtype_name]:
                    print(f"  {dtype_name} {layout} {(th, tw, bm, warps, stages)}: PARITY "
                          f"FAILED {err:.2e} (bound {BOUNDS[dtype_name]}): not timed")
                    found.append(("triton tc", (th, tw, bm, warps, stages), None, err))
                    continue
                found.append(("triton tc", (th, tw, bm, warps, stages),
                              time_us(run, args.device, args.reps), err))
            for name, config, us, err in found:
                row = {"dtype": dtype_name, "layout": layout, "provider": name,
                       "config": config, "us": us, "rel_err": err,
                       "floor_us": floor_us, "min_bytes": floor_bytes,
                       "bandwidth_pct": (floor_bytes / bandwidth / (us * 1e-6) * 100
                                         if us else None),
                       "vs_eager": eager_us / us if us else None}
                rows.append(row)
                print(f"{dtype_name:9s} {layout:13s} {name:13s} {str(config or ''):24s} "
                      f"{'' if us is None else f'{us:9.1f} µs'}  floor {floor_us:6.1f} µs  "
                      f"err {err:.1e}" + (f"  {row['vs_eager']:.2f}× eager, "
                                          f"{row['bandwidth_pct']:.0f}% of copy bw"
                                          if us else ""))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "python": platform.python_version(), "shape": [n, c, h, w],
            "copy_bandwidth_Bps": bandwidth, "macs": macs, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
