"""SAWF = AFF(SE+(x), x) in Triton, training and eval.

SE+'s gate depends on x only through the plane means s, and the global pool of
xa = x + x·gate is s·(1 + gate), so two passes suffice:
pass 1 ``plane_mean``: s (one read);
middle: the SE+ gate and AFF's global branch on N×C vectors, with the module's own layers;
pass 2 ``aff_fuse`` with a_h = gate (broadcast over H) and a_w = 1: AFF's local bottleneck,
weighting and output (one read, one write).
In training, two more passes give the local bottleneck's BN batch statistics (see scaff.py).
Backward: pass 2 and the statistics passes fused in Triton, pass 1 a broadcast in PyTorch,
the middle by autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._common import (acc_dtype, aff_structure_reason, common_unsupported_reason,
                      is_1x1_conv)
from .aff_fuse import aff_fuse
from .coord_pool import plane_mean
from .scaff import aff_global, aff_local_weights


def se_structure_reason(se: nn.Module) -> Optional[str]:
    ok = all(is_1x1_conv(getattr(se, name, None)) for name in ("fc1", "fc2", "fc_avg"))
    return None if ok else "the SE+ layers do not have the reference layout"


def unsupported_reason(module: nn.Module, x: torch.Tensor) -> Optional[str]:
    return (common_unsupported_reason(module, x) or se_structure_reason(module.se)
            or aff_structure_reason(module.aff))


def triton_sawf(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    acc = acc_dtype(x.dtype)
    se = module.se
    s = plane_mean(x)  # N×C
    s_in = s.to(x.dtype)[:, :, None, None]
    gate = torch.sigmoid(se.fc2(F.relu(se.fc1(s_in))) + se.fc_avg(s_in)).flatten(1).to(acc)
    xg = aff_global(module.aff, s * (1 + gate), acc, x.dtype)
    a_h = gate[:, :, None].expand(n, c, h).contiguous()
    a_w = torch.ones((n, c, w), dtype=acc, device=x.device)
    w1, b1, w2, b2 = aff_local_weights(module.aff, x, a_h, a_w, acc)
    return aff_fuse(x, a_h, a_w, xg, w1, b1, w2, b2)
