"""SCAFF = AFF(CA(x), x) in Triton, training and eval.

pass 1 ``coord_pool``: row and column means of x (one read);
middle: coordinate attention's vectors a_h, a_w on N×C×(H+W) with the module's own layers;
pass 2 ``weighted_mean``: the global pool of xa = x + x·a_h·a_w (one read);
middle: AFF's global branch xg on the N×C pooled vector (the module's own layers, so its
BNs use batch statistics over N in training, as in the reference);
training only, ``local_stats`` stage 1 and 2: batch statistics of the local bottleneck's two
BNs over N×H×W (one read each), folded into its weights; running statistics updated as
nn.BatchNorm2d does (momentum or cumulative average, unbiased running variance);
pass 3 ``aff_fuse``: per pixel, AFF's local bottleneck (BN folded, tl.dot), the sigmoid
weighting and the output (one read, one write).
Backward: aff_fuse and local_stats have fused Triton backward passes; the pooling backward
is a broadcast in PyTorch; the vector-sized middles and the BN folding are differentiated
by autograd, so every parameter (convs, BN affine) gets its gradient, through the batch
statistics in training.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._common import (acc_dtype, aff_structure_reason, common_unsupported_reason,
                      conv_bn_affine, update_bn_running_stats)
from .aff_fuse import aff_fuse, local_stats
from .coord_pool import coord_pool, weighted_mean
from .coordinate_attention import ca_structure_reason, ca_vectors


def _uses_batch_stats(bn: nn.Module) -> bool:
    return isinstance(bn, nn.BatchNorm2d) and (bn.training or bn.running_mean is None)


def _fold_batch_stats(weight, bias, bn, mean, var):
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(scale.dtype)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(scale.dtype)
    return weight * scale[:, None], bias * scale + shift


def aff_local_weights(aff: nn.Module, x, a_h, a_w, acc: torch.dtype):
    """(w1, b1, w2, b2) of the local branch with both BNs folded in: running statistics in
    eval, batch statistics over N×H×W (computed by local_stats) in training."""
    local = aff.local_att
    conv1, bn1, conv2, bn2 = local[0], local[1], local[3], local[4]
    n, c, h, w = x.shape
    count = n * h * w
    if count <= 1 and (_uses_batch_stats(bn1) or _uses_batch_stats(bn2)):
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {tuple(x.shape)}")

    def raw(conv):
        weight = conv.weight.reshape(conv.out_channels, conv.in_channels).to(acc)
        bias = (conv.bias.to(acc) if conv.bias is not None
                else weight.new_zeros(conv.out_channels))
        return weight, bias

    def folded(conv, bn, stage, first=None):
        """(W, b) of conv + bn; ``first``: the folded (w1, b1) that stage 2's input needs."""
        if not _uses_batch_stats(bn):
            return tuple(t.to(acc).contiguous() for t in conv_bn_affine(conv, bn))
        weight, bias = raw(conv)
        wc, bc = weight.contiguous(), bias.contiguous()
        mean, var = local_stats(x, a_h, a_w, *(first or (wc, bc)), wc, bc, stage)
        update_bn_running_stats(bn, mean, var, count)
        weight, bias = _fold_batch_stats(weight, bias, bn, mean, var)
        return weight.contiguous(), bias.contiguous()

    w1, b1 = folded(conv1, bn1, 1)
    w2, b2 = folded(conv2, bn2, 2, (w1, b1))
    return w1, b1, w2, b2


def aff_global(aff: nn.Module, pooled: torch.Tensor, acc: torch.dtype, dtype: torch.dtype):
    """AFF's global branch on the pooled N×C vector of xa, through the module's own layers."""
    return aff.global_att[1:](pooled.to(dtype)[:, :, None, None]).flatten(1).to(acc).contiguous()


def unsupported_reason(module: nn.Module, x: torch.Tensor) -> Optional[str]:
    return (common_unsupported_reason(module, x) or ca_structure_reason(module.ca)
            or aff_structure_reason(module.aff))


def triton_scaff(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    acc = acc_dtype(x.dtype)
    rows, cols = coord_pool(x)
    a_h, a_w = ca_vectors(module.ca, rows, cols)
    a_h, a_w = a_h.to(acc).contiguous(), a_w.to(acc).contiguous()
    xg = aff_global(module.aff, weighted_mean(x, a_h, a_w), acc, x.dtype)
    w1, b1, w2, b2 = aff_local_weights(module.aff, x, a_h, a_w, acc)
    return aff_fuse(x, a_h, a_w, xg, w1, b1, w2, b2)
