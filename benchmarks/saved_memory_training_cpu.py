"""Activation memory kept for backward by one training forward of each attention block:
eager reference against the native stored and recompute local branches.

Counts the bytes of every distinct storage autograd saves (torch.autograd.graph
saved_tensors_hooks), i.e. what stays alive between forward and backward; the inputs
themselves are included (every variant saves x). Batch 8, float32, CPU.

    python benchmarks/saved_memory_training_cpu.py
"""
from __future__ import annotations

import functools

import torch

from saffnet_fast.fast import blocks
from saffnet_fast.nn.reference import AFF, SAWF, SCAFF

CASES = [("SCAFF", SCAFF, functools.partial(blocks.scaff, backend="native"), 128, 16, 12, 1),
         ("SCAFF", SCAFF, functools.partial(blocks.scaff, backend="native"), 64, 64, 48, 1),
         ("SAWF", SAWF, functools.partial(blocks.sawf, backend="native"), 32, 64, 48, 1),
         ("AFF", AFF, functools.partial(blocks.aff, backend="native"), 64, 64, 48, 2)]


def saved_mib(forward) -> float:
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values()) / 2**20


def main() -> None:
    previous = blocks.TRAINING_LOCAL_BRANCH
    try:
        for name, cls, native, c, h, w, inputs in CASES:
            torch.manual_seed(0)
            module = cls(c).train()
            xs = [torch.randn(8, c, h, w, requires_grad=True) for _ in range(inputs)]
            result = {"eager": saved_mib(lambda: module(*xs))}
            for mode in ("stored", "recompute"):
                blocks.TRAINING_LOCAL_BRANCH = mode
                result[mode] = saved_mib(lambda: native(module, *xs))
            x_mib = xs[0].numel() * 4 / 2**20
            print(f"{name}({c}) 8×{c}×{h}×{w} (x {x_mib:.1f} MiB), saved for backward: "
                  + ", ".join(f"{k} {v:.1f} MiB" for k, v in result.items()))
    finally:
        blocks.TRAINING_LOCAL_BRANCH = previous


if __name__ == "__main__":
    main()
