"""Drop-in fast versions of SAFFNet's blocks.

Each ``Fast*`` class subclasses its reference class in :mod:`saffnet_fast.nn.reference`:
same constructor arguments (plus a keyword ``backend=``), same submodules, so the same
``state_dict`` keys and the official parameter names. Only ``forward`` differs: it runs
the block's algorithm (:mod:`.blocks`) on the backend :mod:`.dispatch` selects, or the
reference ``forward`` (plain PyTorch, traceable, ONNX-exportable).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backend import validate_backend
from ..nn.reference import (AFF, DEFAULT_DROPOUT, DEFAULT_NEGATIVE_SLOPE, SAWF, SCAFF,
                            CoordAttention, SplitResplice, _check_input)
from .dispatch import dispatch, register_fast_module

__all__ = [
    "FastAFF",
    "FastCoordAttention",
    "FastSCAFF",
    "FastSAWF",
    "FastSplitResplice",
    "FAST_FROM_REFERENCE",
    "REFERENCE_FROM_FAST",
]


class _FastMixin:
    """What the fast modules share; ``_op`` names the block (a key of dispatch.BLOCKS)."""

    _op: str = ""
    backend: Optional[str] = None

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = validate_backend(backend, allow_none=True)
        register_fast_module(self)

    def __setstate__(self, state):  # copy.deepcopy and pickle: a new module, a new key
        super().__setstate__(state)
        register_fast_module(self)

    def _apply(self, fn, *args, **kwargs):
        # counted so the dispatch's cached parameter check (dispatch._parameters_reason)
        # sees a conversion of the parameters' dtype or device
        self.__dict__["_conversions"] = self.__dict__.get("_conversions", 0) + 1
        return super()._apply(fn, *args, **kwargs)

    def _dispatch(self, x: torch.Tensor, *inputs):
        _check_input(x, self.channels)
        return dispatch(self, x, *inputs)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        extra = f"backend={self.backend!r}"
        return f"{base}, {extra}" if base else extra


class FastCoordAttention(_FastMixin, CoordAttention):
    """:class:`CoordAttention` with native/Triton backends (block ``coordinate_attention``)."""

    _op = "coordinate_attention"

    def __init__(self, inp: int, oup: int | None = None, reduction: int = 32, *,
                 backend: Optional[str] = None):
        super().__init__(inp, oup, reduction, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._dispatch(x)
        return CoordAttention.forward(self, x) if out is None else out


class FastSCAFF(_FastMixin, SCAFF):
    """:class:`SCAFF` = AFF(CA(x), x) with native/Triton backends (block ``scaff``)."""

    _op = "scaff"

    def __init__(self, channels: int, ca_reduction: int = 32, aff_r: int = 4, *,
                 backend: Optional[str] = None):
        super().__init__(channels, ca_reduction, aff_r, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._dispatch(x)
        return SCAFF.forward(self, x) if out is None else out


class FastSAWF(_FastMixin, SAWF):
    """:class:`SAWF` = AFF(SE+(x), x) with native/Triton backends (block ``sawf``)."""

    _op = "sawf"

    def __init__(self, channels: int, se_reduction: int = 16, aff_r: int = 4, *,
                 backend: Optional[str] = None):
        super().__init__(channels, se_reduction, aff_r, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._dispatch(x)
        return SAWF.forward(self, x) if out is None else out


class FastAFF(_FastMixin, AFF):
    """:class:`AFF`, the official ``AFF(channels=64, r=4)`` fusing ``x`` and ``residual``,
    with native/Triton backends (block ``aff``): one fused pass over both tensors instead of
    eager AFF's dozen full-size intermediates. ``forward(x, residual)`` as the official AFF."""

    _op = "aff"

    def __init__(self, channels: int = 64, r: int = 4, *, backend: Optional[str] = None):
        super().__init__(channels, r, backend=backend)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out = self._dispatch(x, residual)
        return AFF.forward(self, x, residual) if out is None else out


class FastSplitResplice(_FastMixin, SplitResplice):
    """:class:`SplitResplice` with native/Triton backends (block ``split_resplice``)."""

    _op = "split_resplice"

    def __init__(self, channels: int, splits: int = 8,
                 negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
                 dropout: float = DEFAULT_DROPOUT, *, backend: Optional[str] = None):
        super().__init__(channels, splits, negative_slope, dropout, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._dispatch(x)
        return SplitResplice.forward(self, x) if out is None else out


# Exact reference class -> fast class; convert() swaps only these exact classes.
FAST_FROM_REFERENCE = {
    AFF: FastAFF,
    CoordAttention: FastCoordAttention,
    SCAFF: FastSCAFF,
    SAWF: FastSAWF,
    SplitResplice: FastSplitResplice,
}
REFERENCE_FROM_FAST = {fast: ref for ref, fast in FAST_FROM_REFERENCE.items()}
