"""Fused ops of SAFFNet: the native extension's ops (``torch.ops.saffnet_fast.*``) and the
module-level entry points that the fast modules call.

Importing this package registers the fake (meta) kernels and autograd formulas of the
native ops, but only when the extension ``saffnet_fast._C`` loaded.
"""
from .native import (NATIVE_OPS, native_coord_pool, native_coordinate_attention,  # noqa: F401
                     native_sawf, native_scaff, native_split_resplice)

__all__ = [
    "NATIVE_OPS",
    "native_coord_pool",
    "native_coordinate_attention",
    "native_scaff",
    "native_sawf",
    "native_split_resplice",
]
