"""Tile sizes of the single-launch split_resplice (``split_resplice_tiled``) against the eager
SR module and the automatic choice, inference, one shape per run.

    python benchmarks/tune_split_resplice_tiles.py                      # CUDA, SR(64) at
        batch 64, 64×48 (SCBottle's shape), float32 and float16, every tile in TILES
    python benchmarks/tune_split_resplice_tiles.py --device cpu --batch 1 --size 9 7
        (a dry run on the CPU emulation: checks the script, times nothing useful)

Prints, per dtype, the median time of each tile and of eager, and writes them to --out
(JSON with device, dtype, shape, library version and date). The automatic tile
(csrc/common/split_resplice_tile.h, kSrAutoTiles) was chosen without a GPU; this is the run
that should confirm or change it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch

import saffnet_fast
from saffnet_fast.nn.reference import SplitResplice
from saffnet_fast.fast.blocks import fold_split_resplice

TILES = [(0, 0), (8, 8), (8, 16), (16, 8), (16, 16), (8, 32), (32, 8), (16, 32), (32, 32)]


def time_ms(fn, device: str, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, nargs=2, default=[64, 48], metavar=("H", "W"))
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device (use --device cpu for a dry run)")
    if not saffnet_fast.has_native():
        parser.error("saffnet_fast._C is not built")
    ops = torch.ops.saffnet_fast
    h, w = args.size
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        module = SplitResplice(args.channels).to(args.device, dtype).eval()
        weights, biases = (list(t) for t in fold_split_resplice(module))
        slope = float(module.steps[0].negative_slope)
        x = torch.randn(args.batch, args.channels, h, w, device=args.device, dtype=dtype)
        with torch.no_grad():
            eager = time_ms(lambda: module(x), args.device, args.reps)
            ref = module(x).float()
            print(f"{dtype_name} SR({args.channels}) {args.batch}×{h}×{w}: eager {eager:.3f} ms")
            for tile in TILES:
                try:
                    out, _ = ops.split_resplice_tiled(x, weights, biases, slope, *tile, False)
                except ValueError as exc:  # over the device's shared memory
                    print(f"  tile {tile[0]}×{tile[1]}: {str(exc).splitlines()[0]}")
                    continue
                err = ((out.float() - ref).norm() / ref.norm()).item()
                ms = time_ms(lambda: ops.split_resplice_tiled(x, weights, biases, slope, *tile,
                                                              False), args.device, args.reps)
                name = "auto" if tile == (0, 0) else f"{tile[0]}×{tile[1]}"
                print(f"  tile {name}: {ms:.3f} ms, {eager / ms:.2f}× eager, rel err {err:.1e}")
                rows.append({"dtype": dtype_name, "tile": list(tile), "median_ms": ms,
                             "eager_ms": eager, "speedup_vs_eager": eager / ms,
                             "rel_err": err})
    if args.out:
        device_name = (torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
        record = {"kind": "split_resplice_tiles", "device": device_name,
                  "shape": [args.batch, args.channels, h, w],
                  "torch": torch.__version__, "saffnet_fast": saffnet_fast.__version__,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  "results": rows}
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
