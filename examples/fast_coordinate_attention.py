"""Drop SAFFNet's fast blocks into your own model.

A small CNN that uses the reference CoordAttention, AFF and SCAFF blocks is converted in place
with ``saffnet_fast.convert`` (same weights, same state_dict), checked against the original,
then timed eagerly before and after; ``optimize_for_inference`` (BN folding, channels_last)
is timed too. Runs on the CPU in seconds:

    python examples/fast_coordinate_attention.py [--batch 8] [--size 64] [--repeat 20]

Which backend runs depends on the machine: the native extension when it is built (CPU or
CUDA), Triton on CUDA, else the reference path (auto prints one line saying why).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import saffnet_fast
from saffnet_fast.nn.reference import AFF, SCAFF, CoordAttention


class TinyNet(nn.Module):
    def __init__(self, channels: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.attention = CoordAttention(channels)
        self.merge = AFF(channels, r=4)  # the official AFF(x, residual)
        self.fuse = SCAFF(channels)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))

    def forward(self, x):
        s = self.stem(x)
        return self.head(self.fuse(self.merge(self.attention(s), s)))


def best_times(fns, inputs, repeat: int):
    """Best of ``repeat`` runs of each fn in ms, run round-robin so that load from other
    processes hits them alike (the minimum is the least noisy statistic on a shared CPU)."""
    best = [float("inf")] * len(fns)
    with torch.no_grad():
        for fn, x in zip(fns, inputs):
            fn(x)  # warm-up: lazy init, autotuning
        for _ in range(repeat):
            for i, (fn, x) in enumerate(zip(fns, inputs)):
                if x.is_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn(x)
                if x.is_cuda:
                    torch.cuda.synchronize()
                best[i] = min(best[i], 1e3 * (time.perf_counter() - start))
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = TinyNet().to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    reference = copy.deepcopy(model)

    saffnet_fast.convert(model)  # in place; backend="auto"
    print("converted:", type(model.attention).__name__, type(model.merge).__name__,
          type(model.fuse).__name__,
          "| backends available on", device.type, ":",
          saffnet_fast.available_backends(device))
    with torch.no_grad():
        expected, got = reference(x), model(x)
    error = float((got - expected).norm() / expected.norm())
    print(f"relative L2 difference vs reference: {error:.2e}")
    assert error < 1e-4, "the converted model does not match the reference"

    optimized = saffnet_fast.optimize_for_inference(copy.deepcopy(reference), example_input=x)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    t_ref, t_fast, t_opt = best_times([reference, model, optimized], [x, x, x_cl], args.repeat)
    print(f"device {device}, input {tuple(x.shape)}, float32, best of {args.repeat}:")
    print(f"  eager reference          {t_ref:8.3f} ms")
    print(f"  converted (fast blocks)  {t_fast:8.3f} ms   speedup {t_ref / t_fast:5.2f}x")
    print(f"  optimize_for_inference   {t_opt:8.3f} ms   speedup {t_ref / t_opt:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
