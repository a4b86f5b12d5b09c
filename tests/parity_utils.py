"""Shared by the parity tests: the error measure, BN randomisation, NaN-filled allocations."""
from __future__ import annotations

import contextlib

import torch


def native_block(name: str):
    """Block ``name``'s algorithm (saffnet_fast.fast.blocks) on the native kernels:
    f(module, x[, residual])."""
    import functools

    from saffnet_fast.fast import blocks

    return functools.partial(getattr(blocks, name), backend="native")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖, computed in float64 on detached tensors."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def randomize_batchnorm(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial running statistics and affine parameters for every BatchNorm2d of
    `module` (in place, in module order, from one seeded generator), so BN folding and
    batch-statistics mistakes show."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return module


@contextlib.contextmanager
def nan_filled_empty(device="cpu"):
    """Deterministic fill: every new tensor starts as NaN, so a value a kernel skips shows."""
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(4, device=device)).all()  # the poison is on
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0])
        torch.utils.deterministic.fill_uninitialized_memory = prev[1]
