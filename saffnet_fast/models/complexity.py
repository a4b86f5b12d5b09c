"""Params and "GFLOPs" counted the way HRNet's ``get_model_summary`` counts them.

* params: parameters of Conv2d, BatchNorm2d and Linear layers (BN running statistics are
  buffers, not parameters, so they are excluded);
* MACs: for every Conv2d and Linear call, ``Cout · Cin/groups · kh · kw · Hout · Wout``
  (Linear: ``in · out`` per output row), measured with forward hooks on one 1×3×H×W input;
  BN, activations, pooling, upsampling and additions are not counted;
* "GFLOPs" (the paper's and HRNet's column) = MACs / 1024³; ``gmacs`` = MACs / 1e9.

HRNet-W32 at 256×192 counts 28,536,113 params and 7,645,003,776 MACs (7.12 "GFLOPs").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

__all__ = ["Complexity", "count_params", "count_macs", "measure"]

_COUNTED_PARAM_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


@dataclass(frozen=True)
class Complexity:
    params: int
    macs: int

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gflops(self) -> float:
        """HRNet convention: multiply-adds / 1024³."""
        return self.macs / 1024 ** 3

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def count_params(model: nn.Module) -> int:
    """Parameters of the Conv2d, BatchNorm2d and Linear layers (each counted once)."""
    seen = set()
    total = 0
    for module in model.modules():
        if isinstance(module, _COUNTED_PARAM_LAYERS):
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
    return total


def _parse_size(input_size) -> Tuple[int, int]:
    if (not isinstance(input_size, (tuple, list)) or len(input_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                       for v in input_size)):
        raise ValueError(f"input_size: expected (height, width) positive ints, got {input_size!r}")
    return int(input_size[0]), int(input_size[1])


def count_macs(model: nn.Module, input_size=(256, 192)) -> int:
    """Multiply-adds of every Conv2d and Linear call in one forward pass of a 1×3×H×W input."""
    height, width = _parse_size(input_size)
    total = 0

    def conv_hook(module: nn.Conv2d, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        out_h, out_w = output.shape[-2:]
        total += (output.shape[0] * module.out_channels * (module.in_channels // module.groups)
                  * kh * kw * out_h * out_w)

    def linear_hook(module: nn.Linear, inputs, output):
        nonlocal total
        total += output.numel() // module.out_features * module.in_features * module.out_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros(1, 3, height, width, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return total


def measure(model: nn.Module, input_size=(256, 192)) -> Complexity:
    return Complexity(params=count_params(model), macs=count_macs(model, input_size))
