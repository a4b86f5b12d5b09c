"""SAFFNet's fused ops: tensor in, tensor out, no knowledge of nn.Module.

One vocabulary, one schema per function (the op families: :mod:`.coord`, :mod:`.aff`,
:mod:`.split_resplice`, :mod:`.pooled_linear`), registered once per backend:

* ``native``: ``torch.ops.saffnet_fast.*``, defined in C++ (``csrc/<op>.cpp`` holds each
  op's schema; CPU and CUDA kernels); this package adds their fake kernels and their
  autograd formulas when the extension loaded;
* ``triton``: ``torch.ops.saffnet_fast_triton.*``, the Triton kernels of :mod:`.triton`
  registered under the same names and schemas (imported on first use: it imports triton).

Which callable computes an op on a backend is :data:`OPS`, looked up with :func:`kernel`.
An op one backend lacks is either an ATen composite with the same signature in that
backend's row (plane_mean for native) or absent, and the block algorithms
(:mod:`saffnet_fast.fast.blocks`) then take their other form.

Autograd: a Python registration (``torch.library.register_autograd``, in the family's
module) unless the op is called so often that its ~60 µs per call matter; then in C++
(pooled_linear, see :mod:`.pooled_linear`).
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from .._native import has_native, require_native
from . import aff, coord, pooled_linear, split_resplice

__all__ = ["NATIVE_OPS", "OPS", "kernel", "has_kernel", "load_backend"]

# Every op the extension defines (qualified names); the CUDA build check and the tests walk
# this list.
NATIVE_OPS = (
    "saffnet_fast::coord_pool",
    "saffnet_fast::coord_pool_out",
    "saffnet_fast::coord_pool_backward",
    "saffnet_fast::aff_fuse",
    "saffnet_fast::aff_fuse_out",
    "saffnet_fast::aff_fuse_backward",
    "saffnet_fast::coord_scale",
    "saffnet_fast::coord_scale_out",
    "saffnet_fast::coord_scale_backward",
    "saffnet_fast::split_resplice",
    "saffnet_fast::split_resplice_out",
    "saffnet_fast::split_resplice_tiled",
    "saffnet_fast::aff_moments",
    "saffnet_fast::aff_moments_backward",
    "saffnet_fast::split_resplice_train",
    "saffnet_fast::split_resplice_train_backward",
    "saffnet_fast::aff_pair",
    "saffnet_fast::aff_pair_backward",
    "saffnet_fast::aff_input",
    "saffnet_fast::aff_input_backward",
    "saffnet_fast::aff_combine",
    "saffnet_fast::aff_combine_backward",
    "saffnet_fast::aff_pair_combine",
    "saffnet_fast::aff_pair_combine_backward",
    "saffnet_fast::pooled_linear",
    "saffnet_fast::pooled_linear_backward",
)


def _native_rows() -> Dict[Tuple[str, str], Callable]:
    n = torch.ops.saffnet_fast
    return {
        ("coord_pool", "native"): n.coord_pool,
        ("coord_scale", "native"): n.coord_scale,
        ("plane_mean", "native"): coord.plane_mean,  # ATen: a sum and a scale
        ("aff_fuse", "native"): n.aff_fuse,
        ("aff_pair", "native"): n.aff_pair,
        ("aff_moments", "native"): n.aff_moments,
        ("aff_input", "native"): n.aff_input,
        ("aff_combine", "native"): n.aff_combine,
        ("aff_pair_combine", "native"): n.aff_pair_combine,
        ("pooled_linear", "native"): n.pooled_linear,
        ("pooled_conv1x1", "native"): pooled_linear.pooled_conv1x1,  # ATen: a matmul
        ("split_resplice", "native"): n.split_resplice,
        ("split_resplice_tiled", "native"): n.split_resplice_tiled,
        ("split_resplice_train", "native"): n.split_resplice_train,
    }


def _triton_rows() -> Dict[Tuple[str, str], Callable]:
    from . import triton as _  # noqa: F401  registers torch.ops.saffnet_fast_triton.*
    t = torch.ops.saffnet_fast_triton
    return {
        ("coord_pool", "triton"): t.coord_pool,
        ("coord_scale", "triton"): t.coord_scale,
        ("plane_mean", "triton"): t.plane_mean,
        ("weighted_mean", "triton"): t.weighted_mean,
        ("aff_fuse", "triton"): t.aff_fuse,
        ("aff_pair", "triton"): t.aff_pair,
        ("aff_moments", "triton"): t.aff_moments,
        ("split_resplice", "triton"): t.split_resplice,
        ("split_resplice_tiled", "triton"): t.split_resplice_tiled,  # one launch, tensor cores
        ("split_resplice_train", "triton"): t.split_resplice_train,
    }


# (op, backend) -> the callable with the op's schema: the native rows once the extension
# loaded, the Triton rows once a Triton kernel was asked for.
OPS: Dict[Tuple[str, str], Callable] = {}
_LOADED: set = set()


def load_backend(backend: str) -> None:
    """Fill ``backend``'s rows of :data:`OPS` (for ``triton``: import the Triton kernels and
    register them); NativeUnavailableError saying why for ``native`` without the
    extension."""
    if backend in _LOADED:
        return
    if backend == "native":
        require_native()
    elif backend == "triton":
        OPS.update(_triton_rows())
        _LOADED.add("triton")


def kernel(op: str, backend: str) -> Callable:
    """The callable computing ``op`` on ``backend`` (its row of :data:`OPS`); LookupError when
    the backend has none."""
    if backend not in _LOADED:
        load_backend(backend)
    fn = OPS.get((op, backend))
    if fn is None:
        raise LookupError(f"no {backend} kernel for op {op!r}")
    return fn


def has_kernel(op: str, backend: str) -> bool:
    """Whether ``backend`` has ``op`` (a kernel or an ATen composite with its schema)."""
    if backend not in _LOADED:
        load_backend(backend)
    return (op, backend) in OPS


if has_native():
    pooled_linear.register_native()
    coord.register_native()
    aff.register_native()
    split_resplice.register_native()
    OPS.update(_native_rows())
    _LOADED.add("native")

