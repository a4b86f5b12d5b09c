"""Checks on the layers a fused path takes over, shared by the native and Triton paths (this
module imports neither the extension nor Triton)."""
from __future__ import annotations

from torch import nn


def is_1x1_conv(m: nn.Module) -> bool:
    """A plain 1×1 convolution (a per-pixel matrix product): exactly nn.Conv2d, stride 1,
    no padding or dilation, one group."""
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1)
            and m.padding == (0, 0) and m.dilation == (1, 1) and m.groups == 1)
