"""A tiny stand-in pose network (a few strided convolutions) for smoke runs and tests of the
toolkit: maps N×3×H×W to N×K×H/4×W/4 like every model of ``build_model``."""
from __future__ import annotations

import torch
from torch import nn


class TinyPoseNet(nn.Module):
    def __init__(self, num_joints: int = 17, width: int = 16, dropout: float = 0.0):
        super().__init__()

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(3, width, 2), *block(width, width * 2, 2),
                                      *block(width * 2, width * 2, 1), nn.Dropout2d(dropout))
        self.head = nn.Conv2d(width * 2, num_joints, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
