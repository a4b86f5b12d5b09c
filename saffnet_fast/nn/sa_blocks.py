"""SAFFNet's four structural changes, built from the reference blocks.

* :class:`SCBottle` – a Bottleneck whose 3×3 conv is the separation and re-splicing module
  SR(planes) (paper §III-B-1).
* :class:`SAStem` – the HRNet stem (two 3×3 stride-2 convs, unchanged) followed by SCAFF.
* :class:`SATransitionBlock` – one transition branch (conv3×3 + BN + ReLU, or the identity for a
  branch that keeps its width) followed by SCAFF.
* :class:`SAUpSample` / :class:`SADownSample` – HRNet's fuse paths with SAWF added, and
  :class:`SAFuseBlock`, the fuse layers of one HR module built from them.

Every block keeps the official HRNet sub-module indices for the layers it shares with HRNet
(``0`` = conv, ``1`` = BN in fuse and transition paths), so HRNet weights load into the shared
parts of SAFFNet by name. Where the paper is silent (placement of SAWF inside the fuse paths,
of SCAFF in the stem, ...) the choice and the alternatives measured are documented in
``docs/architecture.md``.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from .reference import (DEFAULT_DROPOUT, DEFAULT_NEGATIVE_SLOPE, SAWF, SCAFF, SplitResplice,
                        _check_input, _int_arg)

__all__ = [
    "BN_MOMENTUM",
    "SAWF_PLACEMENTS",
    "DEFAULT_SAWF_PLACEMENT",
    "DEFAULT_SAWF_SE_REDUCTION",
    "DEFAULT_SAWF_AFF_R",
    "SCBottle",
    "SAStem",
    "SATransitionBlock",
    "SAUpSample",
    "SADownSample",
    "SAFuseBlock",
]

BN_MOMENTUM = 0.1  # as HRNet

# Where SAWF sits in a fuse path (see docs/architecture.md, "SAFuseBlock"):
#   "low_res"  – at the low-resolution end on the width that enters the sum: in SAUpSample after
#                the 1×1 conv + BN and before the upsampling, in SADownSample after the last
#                strided conv + BN.  (the default: it lands on every Table V row)
#   "target"   – on the target width at the target resolution (up: after the upsampling).
#   "source"   – on the source branch before any resampling (source width and resolution).
SAWF_PLACEMENTS = ("low_res", "target", "source")
DEFAULT_SAWF_PLACEMENT = "low_res"
# SAWF inside the fuse paths uses SE+ with the usual SE reduction 16 and an AFF bottleneck of
# r = 16 (the official AFF default is 4). With r = 4 no per-path placement lands within ±0.05M
# of the paper's SAFuse rows (0.12M or 0.40M added instead of ≈0.24M); r = 16 adds 0.26M.
DEFAULT_SAWF_SE_REDUCTION = 16
DEFAULT_SAWF_AFF_R = 16


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int,
             relu: bool) -> List[nn.Module]:
    layers: List[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


def _check_placement(placement) -> None:
    if not isinstance(placement, str) or placement not in SAWF_PLACEMENTS:
        raise ValueError(f"placement: expected one of {SAWF_PLACEMENTS}, got {placement!r}")


class SCBottle(nn.Module):
    """Bottleneck (1×1 → SR(planes) → 1×1, expansion 4) with HRNet's Bottleneck names.

    ``conv2`` is :class:`~saffnet_fast.nn.reference.SplitResplice`; ``bn2`` and the ReLU after
    it stay as in the Bottleneck so the block is a drop-in replacement.
    """

    expansion = 4
    # (conv, bn) pairs whose forward is bn(conv(x)): saffnet_fast.fast.convert.fold_batchnorm folds
    # them for inference. bn2 follows SR, not a conv, so it stays.
    conv_bn_pairs = (("conv1", "bn1"), ("conv3", "bn3"))

    def __init__(self, inplanes: int, planes: int = 64, stride: int = 1,
                 downsample: nn.Module | None = None, *, splits: int = 8,
                 negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
                 dropout: float = DEFAULT_DROPOUT):
        super().__init__()
        _int_arg("inplanes", inplanes)
        _int_arg("planes", planes)
        if _int_arg("stride", stride) != 1:
            # SAFFNet uses SCBottle only inside layer1, at stride 1
            raise ValueError(f"stride: expected 1 (SCBottle's SR steps are stride-1 convs), "
                             f"got {stride}")
        if downsample is not None and not isinstance(downsample, nn.Module):
            raise TypeError(f"downsample: expected None or an nn.Module, got "
                            f"{type(downsample).__name__}")
        self.inplanes = inplanes
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv2 = SplitResplice(planes, splits, negative_slope, dropout)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        if downsample is None and inplanes != planes * self.expansion:
            raise ValueError(
                f"downsample: needed when inplanes ({inplanes}) != planes*4 ({planes * 4})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.inplanes)
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class SAStem(nn.Module):
    """HRNet stem (conv3×3 s2 + BN + ReLU, twice) followed by SCAFF on its 1/4-resolution output.

    The convs keep HRNet's names (``conv1, bn1, conv2, bn2``); the network
    (:class:`saffnet_fast.models.HRNet`) registers the same layers at its top level, under the
    official names, and the SCAFF as ``stem_scaff``.
    """

    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, in_channels: int = 3, channels: int = 64, *, ca_reduction: int = 32,
                 aff_r: int = 4):
        super().__init__()
        self.in_channels = _int_arg("in_channels", in_channels)
        _int_arg("channels", channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(channels, channels, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.scaff = SCAFF(channels, ca_reduction, aff_r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_channels)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.scaff(x)


class SATransitionBlock(nn.Sequential):
    """One transition branch followed by SCAFF.

    With ``in_channels != out_channels`` or ``stride == 2``: conv3×3 + BN + ReLU (indices 0, 1, 2,
    the official transition names) then SCAFF (index 3). A branch that HRNet passes through
    unchanged (same width, stride 1) gets SCAFF only (index 0): the paper counts three
    SATransitionBlocks in transition2, so the two existing branches get one too.
    """

    conv_bn_pairs = (("0", "1"),)  # only when index 0 is the conv (fold checks the types)

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *,
                 ca_reduction: int = 32, aff_r: int = 4):
        _int_arg("in_channels", in_channels)
        _int_arg("out_channels", out_channels)
        if _int_arg("stride", stride) not in (1, 2):
            raise ValueError(f"stride: expected 1 or 2, got {stride!r}")
        layers: List[nn.Module] = []
        if in_channels != out_channels or stride != 1:
            layers += _conv_bn(in_channels, out_channels, 3, stride, relu=True)
        layers.append(SCAFF(out_channels, ca_reduction, aff_r))
        super().__init__(*layers)
        self.in_channels = in_channels
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_channels)
        return super().forward(x)


def _sawf(channels: int, se_reduction: int, aff_r: int) -> SAWF:
    return SAWF(channels, se_reduction=se_reduction, aff_r=aff_r)


class SAUpSample(nn.Module):
    """Fuse path from a lower-resolution branch: conv1×1 + BN, SAWF, nearest upsampling ×2^k.

    Sub-modules ``0`` (conv) and ``1`` (BN) keep the official HRNet names; ``sawf`` is SAWF at the
    width given by ``placement`` (see :data:`SAWF_PLACEMENTS`).
    """

    conv_bn_pairs = (("0", "1"),)

    def __init__(self, in_channels: int, out_channels: int, scale_factor: int, *,
                 placement: str = DEFAULT_SAWF_PLACEMENT,
                 se_reduction: int = DEFAULT_SAWF_SE_REDUCTION,
                 aff_r: int = DEFAULT_SAWF_AFF_R):
        super().__init__()
        _int_arg("in_channels", in_channels)
        _int_arg("out_channels", out_channels)
        _int_arg("scale_factor", scale_factor, minimum=2)
        _check_placement(placement)
        self.in_channels = in_channels
        self.placement = placement
        self.add_module("0", nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False))
        self.add_module("1", nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM))
        self.upsample = nn.Upsample(scale_factor=scale_factor, mode="nearest")
        width = in_channels if placement == "source" else out_channels
        self.sawf = _sawf(width, se_reduction, aff_r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_channels)
        conv, bn = self._modules["0"], self._modules["1"]
        if self.placement == "source":
            x = self.sawf(x)
        x = bn(conv(x))
        if self.placement == "low_res":
            x = self.sawf(x)
        x = self.upsample(x)
        if self.placement == "target":
            x = self.sawf(x)
        return x


class SADownSample(nn.Sequential):
    """Fuse path to a lower-resolution branch: ``steps`` stride-2 conv3×3 + BN (ReLU after all
    but the last; indices ``0..steps-1`` as in HRNet, each a Sequential of conv, BN[, ReLU]),
    with SAWF on the source (``placement="source"``) or on the result (``"low_res"`` and
    ``"target"``, which coincide for a downsampling path).
    """

    def __init__(self, in_channels: int, out_channels: int, steps: int, *,
                 placement: str = DEFAULT_SAWF_PLACEMENT,
                 se_reduction: int = DEFAULT_SAWF_SE_REDUCTION,
                 aff_r: int = DEFAULT_SAWF_AFF_R):
        _int_arg("in_channels", in_channels)
        _int_arg("out_channels", out_channels)
        _int_arg("steps", steps)
        _check_placement(placement)
        layers = []
        for k in range(steps):
            last = k == steps - 1
            layers.append(nn.Sequential(*_conv_bn(
                in_channels, out_channels if last else in_channels, 3, 2, relu=not last)))
        super().__init__(*layers)
        self.in_channels = in_channels
        self.steps = steps
        self.placement = placement
        width = in_channels if placement == "source" else out_channels
        self.sawf = _sawf(width, se_reduction, aff_r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_channels)
        if self.placement == "source":
            x = self.sawf(x)
        for k in range(self.steps):
            x = self._modules[str(k)](x)
        if self.placement != "source":
            x = self.sawf(x)
        return x


class SAFuseBlock(nn.ModuleList):
    """The fuse layers of one HR module with SAUpSample / SADownSample paths.

    ``self[i][j]`` maps branch j to branch i (``None`` for i == j), exactly the layout of HRNet's
    ``fuse_layers``, so state-dict names read ``fuse_layers.i.j...``. ``forward`` takes the
    branch outputs and returns, for each target i, ``Σ_j path_ij(x_j)`` (ReLU applied by the
    HR module, as in HRNet). With ``multi_scale_output=False`` only target 0 is built.
    """

    def __init__(self, channels: Sequence[int], multi_scale_output: bool = True, *,
                 placement: str = DEFAULT_SAWF_PLACEMENT,
                 se_reduction: int = DEFAULT_SAWF_SE_REDUCTION,
                 aff_r: int = DEFAULT_SAWF_AFF_R):
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
            raise TypeError(f"channels: expected a sequence of branch widths, got "
                            f"{type(channels).__name__} {channels!r}")
        channels = list(channels)
        if len(channels) < 2:
            raise ValueError(f"channels: expected the widths of ≥ 2 branches, got {channels}")
        for c in channels:
            _int_arg("channels", c)
        if not isinstance(multi_scale_output, bool):
            raise TypeError(f"multi_scale_output: expected a bool, got "
                            f"{type(multi_scale_output).__name__} {multi_scale_output!r}")
        _check_placement(placement)
        rows = []
        for i in range(len(channels) if multi_scale_output else 1):
            row: List[nn.Module | None] = []
            for j in range(len(channels)):
                if j > i:
                    row.append(SAUpSample(channels[j], channels[i], 2 ** (j - i),
                                          placement=placement, se_reduction=se_reduction,
                                          aff_r=aff_r))
                elif j == i:
                    row.append(None)
                else:
                    row.append(SADownSample(channels[j], channels[i], i - j,
                                            placement=placement, se_reduction=se_reduction,
                                            aff_r=aff_r))
            rows.append(nn.ModuleList(row))
        super().__init__(rows)
        self.channels = channels

    def forward(self, xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:  # type: ignore[override]
        return fuse_branches(self, xs)


def fuse_branches(fuse_layers: nn.ModuleList, xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Σ_j fuse_layers[i][j](x_j) for every built target i (identity where the entry is None).

    Shared by HRNet's plain fuse and :class:`SAFuseBlock`; the caller applies the ReLU.
    """
    if len(xs) != len(fuse_layers[0]):
        raise ValueError(f"xs: expected {len(fuse_layers[0])} branch tensors, got {len(xs)}")
    fused = []
    for row in fuse_layers:
        y = None
        for j, path in enumerate(row):
            term = xs[j] if path is None else path(xs[j])
            y = term if y is None else y + term
        fused.append(y)
    return fused
