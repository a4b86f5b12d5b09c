"""Heatmap regression loss."""
from __future__ import annotations

import torch
from torch import nn


class JointsMSELoss(nn.Module):
    """HRNet's JointsMSELoss: 0.5 × MSE per joint, averaged over joints; with
    ``use_target_weight`` each joint's prediction and target are multiplied by its weight
    (0 for unlabelled joints) first."""

    def __init__(self, use_target_weight: bool = True):
        super().__init__()
        self.use_target_weight = use_target_weight

    def forward(self, output: torch.Tensor, target: torch.Tensor,
                target_weight: torch.Tensor | None = None) -> torch.Tensor:
        if output.shape != target.shape:
            raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)}: "
                             "expected equal (N, K, H, W) shapes")
        n, k = output.shape[:2]
        pred = output.float().reshape(n, k, -1)
        gt = target.float().reshape(n, k, -1)
        if self.use_target_weight:
            if target_weight is None:
                raise ValueError("target_weight: required when use_target_weight=True")
            w = target_weight.float().reshape(n, k, 1)
            pred, gt = pred * w, gt * w
        # mean over pixels and batch per joint, then over joints == mean over everything
        return 0.5 * torch.mean((pred - gt) ** 2)
