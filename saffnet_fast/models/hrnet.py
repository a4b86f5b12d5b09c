"""HRNet for top-down pose estimation, and SAFFNet as the same network with four switches.

The layout and every state-dict name follow the official HRNet pose network
(leoxiaobin/deep-high-resolution-net.pytorch, ``lib/models/pose_hrnet.py``), so an official
HRNet-W32 checkpoint loads into ``HRNet(HRNET_W32)`` with ``strict=True``:

    conv1 bn1 conv2 bn2          stem, two 3×3 stride-2 convs (1/4 resolution)
    layer1                       4 Bottlenecks, 64 → 256 channels
    transition1 stage2           branches [32, 64], 1 HR module
    transition2 stage3           branches [32, 64, 128], 4 HR modules
    transition3 stage4           branches [32, 64, 128, 256], 3 HR modules   (HRNet-W32 only)
    final_layer                  1×1 conv to K heatmaps on branch 0

HRNet-DF drops transition3 and stage4 (head on stage3's branch 0). SAFFNet is HRNet-DF with
the four changes of the paper, each a switch of :class:`HRNetConfig`:

    scbottle      layer1 blocks 1–3 become SCBottle (3×3 conv → separation and re-splicing)
    safuse        every HR module's fuse layers become SAFuseBlock (SAWF in each fuse path)
    satransition  every transition branch gets SCAFF after it (SATransitionBlock)
    sastem        SCAFF after the stem (SAStem)

The blocks live in :mod:`saffnet_fast.nn.sa_blocks`; the reasons behind each reading are in
``docs/architecture.md``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import torch
from torch import nn

from ..nn.reference import DEFAULT_DROPOUT, DEFAULT_NEGATIVE_SLOPE, SCAFF, _check_input
from ..nn.sa_blocks import (BN_MOMENTUM, DEFAULT_SAWF_AFF_R, DEFAULT_SAWF_PLACEMENT,
                            DEFAULT_SAWF_SE_REDUCTION, SAFuseBlock, SATransitionBlock,
                            SCBottle, fuse_branches)

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "HighResolutionModule",
    "StageConfig",
    "HRNetConfig",
    "HRNet",
    "HRNET_W32",
    "HRNET_DF",
    "HRNET_SF",
    "SAFuseOptions",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual (HRNet's branch block)."""

    expansion = 1
    # (conv, bn) pairs whose forward is bn(conv(x)): fold_batchnorm folds them
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    """1×1 → 3×3 → 1×1 (expansion 4) with a residual (HRNet's layer1 block)."""

    expansion = 4
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


def _plain_fuse_layers(channels: Sequence[int], multi_scale_output: bool) -> nn.ModuleList:
    """HRNet's fuse layers: ``[i][j]`` maps branch j to branch i.

    j > i: conv1×1 + BN + nearest upsampling ×2^(j−i); j == i: None (identity);
    j < i: (i − j) stride-2 conv3×3 + BN, ReLU after all but the last.
    """
    rows = []
    for i in range(len(channels) if multi_scale_output else 1):
        row: List[nn.Module | None] = []
        for j in range(len(channels)):
            if j > i:
                row.append(nn.Sequential(
                    nn.Conv2d(channels[j], channels[i], 1, 1, 0, bias=False),
                    nn.BatchNorm2d(channels[i], momentum=BN_MOMENTUM),
                    nn.Upsample(scale_factor=2 ** (j - i), mode="nearest"),
                ))
            elif j == i:
                row.append(None)
            else:
                steps = []
                for k in range(i - j):
                    last = k == i - j - 1
                    out_channels = channels[i] if last else channels[j]
                    layers: List[nn.Module] = [
                        nn.Conv2d(channels[j], out_channels, 3, 2, 1, bias=False),
                        nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM),
                    ]
                    if not last:
                        layers.append(nn.ReLU(inplace=True))
                    steps.append(nn.Sequential(*layers))
                row.append(nn.Sequential(*steps))
        rows.append(nn.ModuleList(row))
    return nn.ModuleList(rows)


@dataclass(frozen=True)
class SAFuseOptions:
    """How SAWF sits in the fuse paths (see :class:`saffnet_fast.nn.sa_blocks.SAFuseBlock`)."""

    placement: str = DEFAULT_SAWF_PLACEMENT
    se_reduction: int = DEFAULT_SAWF_SE_REDUCTION
    aff_r: int = DEFAULT_SAWF_AFF_R


class HighResolutionModule(nn.Module):
    """Parallel branches of BasicBlocks, then multi-resolution fusion (sum + ReLU).

    ``safuse`` (a :class:`SAFuseOptions`) swaps the plain fuse layers for :class:`SAFuseBlock`;
    the names stay ``branches.b.n...`` and ``fuse_layers.i.j...``.
    """

    def __init__(self, num_blocks: Sequence[int], channels: Sequence[int],
                 multi_scale_output: bool = True, safuse: SAFuseOptions | None = None):
        super().__init__()
        if len(num_blocks) != len(channels):
            raise ValueError(f"num_blocks: expected {len(channels)} entries (one per branch), "
                             f"got {len(num_blocks)}")
        self.num_branches = len(channels)
        self.channels = list(channels)
        self.multi_scale_output = multi_scale_output
        # BasicBlock keeps the width, so no branch needs a downsample (as in HRNet-W32).
        self.branches = nn.ModuleList(
            nn.Sequential(*[BasicBlock(c, c) for _ in range(n)])
            for n, c in zip(num_blocks, channels))
        if self.num_branches == 1:
            self.fuse_layers = None
        elif safuse is not None:
            self.fuse_layers = SAFuseBlock(channels, multi_scale_output,
                                           placement=safuse.placement,
                                           se_reduction=safuse.se_reduction,
                                           aff_r=safuse.aff_r)
        else:
            self.fuse_layers = _plain_fuse_layers(channels, multi_scale_output)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        if len(xs) != self.num_branches:
            raise ValueError(f"xs: expected {self.num_branches} branch tensors, got {len(xs)}")
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return xs
        return [self.relu(y) for y in fuse_branches(self.fuse_layers, xs)]


@dataclass(frozen=True)
class StageConfig:
    num_modules: int
    num_blocks: Tuple[int, ...]
    channels: Tuple[int, ...]


@dataclass(frozen=True)
class HRNetConfig:
    """Everything that tells HRNet-W32, HRNet-DF, HRNet-SF and the SAFFNet rows apart.

    ``stages`` are stage2, stage3[, stage4]; the last stage's last module keeps only branch 0
    when ``last_multi_scale`` is False (HRNet-W32's stage4 does this).
    """

    stages: Tuple[StageConfig, ...]
    last_multi_scale: bool = False
    scbottle: bool = False
    safuse: bool = False
    satransition: bool = False
    sastem: bool = False
    num_joints: int = 17
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE
    dropout: float = DEFAULT_DROPOUT
    fuse_options: SAFuseOptions = field(default_factory=SAFuseOptions)

    def replace(self, **changes) -> "HRNetConfig":
        return dataclasses.replace(self, **changes)


_W32_STAGE2 = StageConfig(1, (4, 4), (32, 64))
_W32_STAGE3 = StageConfig(4, (4, 4, 4), (32, 64, 128))
_W32_STAGE4 = StageConfig(3, (4, 4, 4, 4), (32, 64, 128, 256))

# HRNet-W32 (w32_256x192_adam_lr1e-3.yaml): stage4's last module outputs branch 0 only.
HRNET_W32 = HRNetConfig(stages=(_W32_STAGE2, _W32_STAGE3, _W32_STAGE4), last_multi_scale=False)
# HRNet-DF: no transition3/stage4; every stage3 module keeps all fuse targets, as HRNet builds
# stage3 (this reproduces the paper's 7.8M / 4.41, see docs/architecture.md).
HRNET_DF = HRNetConfig(stages=(_W32_STAGE2, _W32_STAGE3), last_multi_scale=True)
# HRNet-SF (Table IV, "shallow four-stage"): stage3 with 3 modules, stage4 with 1.
HRNET_SF = HRNetConfig(stages=(_W32_STAGE2, StageConfig(3, (4, 4, 4), (32, 64, 128)),
                               StageConfig(1, (4, 4, 4, 4), (32, 64, 128, 256))),
                       last_multi_scale=False)


class HRNet(nn.Module):
    """HRNet / SAFFNet pose network: image N×3×H×W → heatmaps N×K×H/4×W/4."""

    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"))  # the stem

    def __init__(self, config: HRNetConfig):
        super().__init__()
        self.config = config
        scaff_or_none = (lambda c: SCAFF(c)) if config.sastem else (lambda c: None)

        # stem: two stride-2 convs to 1/4 resolution (+ SCAFF with SAStem, see SAStem)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.stem_scaff = scaff_or_none(64)

        # layer1: Bottleneck with downsample, then 3 Bottlenecks (or SCBottles)
        self.layer1 = self._make_layer1(config)

        # transitions and stages, named as in HRNet
        channels_before = [256]
        for index, stage in enumerate(config.stages):
            transition = self._make_transition(channels_before, list(stage.channels),
                                               config.satransition)
            is_last = index == len(config.stages) - 1
            modules = []
            for m in range(stage.num_modules):
                multi_scale = not (is_last and m == stage.num_modules - 1
                                   and not config.last_multi_scale)
                modules.append(HighResolutionModule(
                    stage.num_blocks, stage.channels, multi_scale,
                    config.fuse_options if config.safuse else None))
            setattr(self, f"transition{index + 1}", transition)
            setattr(self, f"stage{index + 2}", nn.Sequential(*modules))
            channels_before = list(stage.channels)

        self.final_layer = nn.Conv2d(channels_before[0], config.num_joints, kernel_size=1,
                                     stride=1, padding=0)
        self.num_stages = len(config.stages)
        # stem 1/4, then each further branch halves: the fuse paths need exact ×2 sizes.
        self.input_multiple = 4 * 2 ** (len(config.stages[-1].channels) - 1)
        self.init_weights()

    # -- construction --------------------------------------------------------------------
    @staticmethod
    def _make_layer1(config: HRNetConfig) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(64, 256, kernel_size=1, stride=1, bias=False),
            nn.BatchNorm2d(256, momentum=BN_MOMENTUM),
        )
        blocks: List[nn.Module] = [Bottleneck(64, 64, 1, downsample)]
        for _ in range(3):
            if config.scbottle:
                blocks.append(SCBottle(256, 64, negative_slope=config.negative_slope,
                                       dropout=config.dropout))
            else:
                blocks.append(Bottleneck(256, 64))
        return nn.Sequential(*blocks)

    @staticmethod
    def _make_transition(channels_before: List[int], channels_after: List[int],
                         satransition: bool) -> nn.ModuleList:
        """HRNet's transition: existing branches change width with a 3×3 conv (None when the
        width already matches); each new branch is a stride-2 3×3 conv from the lowest branch.
        With ``satransition`` every branch, existing ones included, is a SATransitionBlock."""
        layers: List[nn.Module | None] = []
        for i, out_channels in enumerate(channels_after):
            if i < len(channels_before):
                in_channels = channels_before[i]
                if satransition:
                    layers.append(SATransitionBlock(in_channels, out_channels, 1))
                elif in_channels != out_channels:
                    layers.append(nn.Sequential(
                        nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
                        nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM),
                        nn.ReLU(inplace=True)))
                else:
                    layers.append(None)
            else:
                steps: List[nn.Module] = []
                for k in range(i + 1 - len(channels_before)):
                    in_channels = channels_before[-1]
                    width = out_channels if k == i - len(channels_before) else in_channels
                    if satransition:
                        steps.append(SATransitionBlock(in_channels, width, 2))
                    else:
                        steps.append(nn.Sequential(
                            nn.Conv2d(in_channels, width, 3, 2, 1, bias=False),
                            nn.BatchNorm2d(width, momentum=BN_MOMENTUM),
                            nn.ReLU(inplace=True)))
                layers.append(nn.Sequential(*steps))
        return nn.ModuleList(layers)

    def init_weights(self) -> None:
        """As HRNet: convs normal(std=0.001) with zero bias, BN weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, 3, "x")
        if x.shape[2] % self.input_multiple or x.shape[3] % self.input_multiple:
            raise ValueError(
                f"x: expected height and width that are multiples of {self.input_multiple} "
                f"(the lowest-resolution branch is 1/{self.input_multiple} of the input), "
                f"got shape {tuple(x.shape)}")
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        if self.stem_scaff is not None:
            x = self.stem_scaff(x)
        x = self.layer1(x)

        branches = [x]
        for index in range(self.num_stages):
            transition = getattr(self, f"transition{index + 1}")
            inputs = []
            for i, layer in enumerate(transition):
                # existing branch i keeps its own input; a new branch starts from the lowest
                source = branches[i] if i < len(branches) else branches[-1]
                inputs.append(source if layer is None else layer(source))
            branches = getattr(self, f"stage{index + 2}")(inputs)
        return self.final_layer(branches[0])
