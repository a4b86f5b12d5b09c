"""Reference (plain PyTorch) definitions of SAFFNet's building blocks.

These modules are the *definition* of every block: the fast backends (native C++/CUDA
extension, Triton) are tested against them, and they are what ONNX export and any machine
without the extension run. Keep them readable and traceable: no custom ops in here.

Parameter names follow the official implementations where one exists, so published weights
load unchanged:
  * CoordAttention: houqb/CoordAttention ``CoordAtt`` (``conv1, bn1, conv_h, conv_w``)
  * AFF: YimianDai/open-aff ``aff_pytorch/aff_net/fusion.py`` (``local_att, global_att``)

Interpretations of the paper (SAFFNet, "Feature Fusion Based on Stacked Attention
Lightweight Human Pose Estimation") are explained in ``docs/architecture.md``.
"""
from __future__ import annotations

import math
import numbers
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FC",
    "SplitResplice",
    "split_resplice_widths",
    "HSwish",
    "CoordAttention",
    "AFF",
    "SEPlus",
    "SAWF",
    "SCAFF",
    "DEFAULT_NEGATIVE_SLOPE",
    "DEFAULT_DROPOUT",
]

# The paper names LeakyReLU and Dropout in its function module but gives neither value.
# 0.1 is the slope common in detection backbones (YOLO, HS-ResNet-style necks): large enough
# to keep gradients alive through 7 chained steps. Dropout 0.1: the paper includes Dropout
# in every function module for regularisation but gives no rate; 0.1 is the usual light rate
# for conv features. Short runs (the synthetic demo) set it to 0 in their config; the fused
# kernels draw its mask from a counter-based RNG and regenerate it in backward.
DEFAULT_NEGATIVE_SLOPE = 0.1
DEFAULT_DROPOUT = 0.1


# Constructor argument checks (the fast modules inherit them; nn/sa_blocks.py uses them too):
# each error names the argument, what was expected and what was given.
def _int_arg(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        wanted = "a positive int" if minimum == 1 else f"an int ≥ {minimum}"
        raise ValueError(f"{name}: expected {wanted}, got {value}")
    return int(value)


def _real_arg(name: str, value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _dropout_arg(value) -> float:
    p = _real_arg("dropout", value)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {value}")
    return p


def _slope_arg(value) -> float:
    slope = _real_arg("negative_slope", value)
    if not math.isfinite(slope):
        raise ValueError(f"negative_slope: expected a finite number, got {value}")
    return slope


def _reduction_arg(name: str, value, channels: int) -> int:
    """A reduction r of a bottleneck of channels // r hidden channels: at most channels."""
    r = _int_arg(name, value)
    if channels // r < 1:
        raise ValueError(f"{name}: expected at most channels ({channels}) so that the hidden "
                         f"width channels // {name} is ≥ 1, got {value}")
    return r


def _check_input(x: torch.Tensor, channels: int, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D N×C×H×W tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(
            f"{name}: expected {channels} channels (dim 1), got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty batch (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")


class FC(nn.Sequential):
    """Function module FC(c): conv3×3 c→c (no bias) + BN + LeakyReLU + Dropout."""

    def __init__(self, channels: int, negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
                 dropout: float = DEFAULT_DROPOUT):
        _int_arg("channels", channels)
        _slope_arg(negative_slope)
        _dropout_arg(dropout)
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.LeakyReLU(negative_slope)
        self.drop = nn.Dropout(dropout)
        self.channels = channels
        self.negative_slope = negative_slope
        self.dropout = dropout


def split_resplice_widths(channels: int, splits: int = 8) -> List[int]:
    """Widths of the FC steps of SR(channels, splits).

    Step 1 sees S2 (w channels); step j ≥ 2 sees cat(S(j+1), carry(j-1)) where carry is the
    second floor(c/2) channels of the previous step's output. For 64 channels, s = 8:
    [8, 12, 14, 15, 15, 15, 15].
    """
    _int_arg("channels", channels)
    _int_arg("splits", splits, minimum=2)
    if channels % splits != 0:
        raise ValueError(
            f"channels: expected a multiple of splits={splits}, got {channels}")
    w = channels // splits
    widths = [w]
    for _ in range(2, splits):
        widths.append(w + widths[-1] // 2)
    return widths


class SplitResplice(nn.Module):
    """Separation and re-splicing module SR(C, s) (paper eqs. 1–6).

    Input split into S1..Ss of w = C/s channels. S1 goes straight to the output. Step 1:
    y1 = FC(S2); step j ≥ 2: yj = FC(cat(S(j+1), carry(j-1))). Every yj but the last is
    split: its first ceil(c/2) channels go to the output, the rest are carried on. The last
    step's whole output goes to the output. Output = cat(S1, out1, ..., out(s-2), y(s-1)).
    """

    def __init__(self, channels: int, splits: int = 8,
                 negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
                 dropout: float = DEFAULT_DROPOUT):
        super().__init__()
        self.widths = split_resplice_widths(channels, splits)  # checks channels, splits
        self.channels = channels
        self.splits = splits
        self.steps = nn.ModuleList(
            [FC(c, negative_slope, dropout) for c in self.widths])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.channels)
        parts = torch.split(x, self.channels // self.splits, dim=1)
        outputs = [parts[0]]
        carry = None
        last = len(self.steps) - 1
        for j, step in enumerate(self.steps):
            inp = parts[1] if j == 0 else torch.cat([parts[j + 1], carry], dim=1)
            y = step(inp)
            if j == last:
                outputs.append(y)
            else:
                keep = math.ceil(y.shape[1] / 2)
                outputs.append(y[:, :keep])
                carry = y[:, keep:]
        return torch.cat(outputs, dim=1)


class HSwish(nn.Module):
    """h_swish(x) = x · ReLU6(x + 3) / 6 (as in the official CoordAtt)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


class CoordAttention(nn.Module):
    """Coordinate attention, exactly the official ``CoordAtt(inp, oup, reduction=32)``.

    out = x · a_h · a_w with a_h = σ(conv_h(·)) over rows and a_w = σ(conv_w(·)) over columns.
    """

    # (conv, bn) pairs whose forward is bn(conv(x)): fold_batchnorm folds them
    conv_bn_pairs = (("conv1", "bn1"),)

    def __init__(self, inp: int, oup: int | None = None, reduction: int = 32):
        super().__init__()
        _int_arg("inp", inp)
        oup = inp if oup is None else _int_arg("oup", oup)
        _int_arg("reduction", reduction)  # mip = max(8, inp // reduction) ≥ 8 for any
        if oup != inp:
            # out = identity · a_w · a_h needs oup == inp (as the official code does).
            raise ValueError(f"oup: expected oup == inp ({inp}), got {oup}")
        self.channels = inp
        self.reduction = reduction
        mip = max(8, inp // reduction)
        self.mip = mip
        self.conv1 = nn.Conv2d(inp, mip, kernel_size=1, stride=1, padding=0)
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = HSwish()
        self.conv_h = nn.Conv2d(mip, oup, kernel_size=1, stride=1, padding=0)
        self.conv_w = nn.Conv2d(mip, oup, kernel_size=1, stride=1, padding=0)

    def attention(self, x: torch.Tensor):
        """Return (a_h N×C×H×1, a_w N×C×1×W)."""
        _check_input(x, self.channels)
        n, c, h, w = x.shape
        x_h = x.mean(dim=3, keepdim=True)                      # N×C×H×1 (pool over W)
        x_w = x.mean(dim=2, keepdim=True).permute(0, 1, 3, 2)  # N×C×W×1 (pool over H)
        y = torch.cat([x_h, x_w], dim=2)
        y = self.act(self.bn1(self.conv1(y)))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        y_w = y_w.permute(0, 1, 3, 2)
        return self.conv_h(y_h).sigmoid(), self.conv_w(y_w).sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_h, a_w = self.attention(x)
        return x * a_w * a_h


def _check_aff_inputs(x: torch.Tensor, residual: torch.Tensor, channels: int,
                      same_dtype_device: bool = False) -> None:
    """AFF's input checks; the fused kernels (``same_dtype_device``) also need residual in
    x's dtype and on x's device, where eager PyTorch would promote or raise later."""
    _check_input(x, channels, "x")
    _check_input(residual, channels, "residual")
    if x.shape != residual.shape:
        raise ValueError(
            f"residual: expected the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    if same_dtype_device and (residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(f"residual: expected x's dtype and device ({x.dtype}, {x.device}), "
                         f"got {residual.dtype}, {residual.device}")


class AFF(nn.Module):
    """Attentional feature fusion, exactly the official ``AFF(channels=64, r=4)``.

    xa = x + residual; wei = σ(local_att(xa) + global_att(xa));
    out = 2·x·wei + 2·residual·(1 − wei).
    """

    def __init__(self, channels: int = 64, r: int = 4):
        super().__init__()
        _int_arg("channels", channels)
        inter_channels = channels // _reduction_arg("r", r, channels)
        self.channels = channels
        self.r = r
        self.local_att = nn.Sequential(
            nn.Conv2d(channels, inter_channels, kernel_size=1, stride=1, padding=0),
            nn.BatchNorm2d(inter_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(inter_channels, channels, kernel_size=1, stride=1, padding=0),
            nn.BatchNorm2d(channels),
        )
        self.global_att = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, inter_channels, kernel_size=1, stride=1, padding=0),
            nn.BatchNorm2d(inter_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(inter_channels, channels, kernel_size=1, stride=1, padding=0),
            nn.BatchNorm2d(channels),
        )
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        _check_aff_inputs(x, residual, self.channels)
        xa = x + residual
        xl = self.local_att(xa)
        xg = self.global_att(xa)
        wei = self.sigmoid(xl + xg)
        return 2 * x * wei + 2 * residual * (1 - wei)


class SEPlus(nn.Module):
    """Improved squeeze-and-excitation, SE+(C).

    Reading chosen (the paper's Fig. 6 did not survive): SE with an additional
    average-pooling branch. Both branches start from the global average pool s = mean_hw(x):
      * the classic SE excitation: fc2(ReLU(fc1(s))), C → C/r → C (``fc1``, ``fc2``);
      * the additional branch: a full-rank linear map of the pooled vector, C → C
        (``fc_avg``), which keeps the global channel information that the SE bottleneck
        squeezes out.
    gate = σ(excitation + additional);  out = x · gate.
    The gate is per (sample, channel) and depends on x only through mean_hw(x): the fused
    SE+AFF kernels rely on that.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        _int_arg("channels", channels)
        _int_arg("reduction", reduction)  # hidden = max(channels // reduction, 4) ≥ 4 for any
        hidden = max(channels // reduction, 4)
        self.channels = channels
        self.reduction = reduction
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=True)
        self.fc_avg = nn.Conv2d(channels, channels, 1, bias=True)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel gate σ(...) of shape N×C×1×1."""
        _check_input(x, self.channels)
        s = x.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(s))) + self.fc_avg(s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class SAWF(nn.Module):
    """Stacked attention weight fusion: SAWF(x) = AFF(SE+(x), x)."""

    def __init__(self, channels: int, se_reduction: int = 16, aff_r: int = 4):
        super().__init__()
        _int_arg("channels", channels)
        _int_arg("se_reduction", se_reduction)
        _reduction_arg("aff_r", aff_r, channels)
        self.channels = channels
        self.se = SEPlus(channels, se_reduction)
        self.aff = AFF(channels, aff_r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aff(self.se(x), x)


class SCAFF(nn.Module):
    """Stacked coordinate-attention feature fusion: SCAFF(x) = AFF(CA(x), x) (eqs. 7–8)."""

    def __init__(self, channels: int, ca_reduction: int = 32, aff_r: int = 4):
        super().__init__()
        _int_arg("channels", channels)
        _int_arg("ca_reduction", ca_reduction)
        _reduction_arg("aff_r", aff_r, channels)
        self.channels = channels
        self.ca = CoordAttention(channels, channels, ca_reduction)
        self.aff = AFF(channels, aff_r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aff(self.ca(x), x)
