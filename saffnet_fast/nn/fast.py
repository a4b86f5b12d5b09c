"""Drop-in fast versions of SAFFNet's blocks.

Each ``Fast*`` class subclasses its reference class in :mod:`saffnet_fast.nn.reference`:
same constructor arguments (plus a keyword ``backend=``), same submodules, so the same
``state_dict`` keys and the official parameter names. Only ``forward`` differs: it picks a
backend for the input's device and runs

* ``reference``: the reference ``forward`` (plain PyTorch, traceable, ONNX-exportable);
* ``native``: ``saffnet_fast.ops.native.native_<op>(module, x)`` (the compiled extension);
* ``triton``: ``saffnet_fast.ops.triton.<op>.triton_<op>(module, x)`` (CUDA tensors, or any
  tensor under ``TRITON_INTERPRET=1``).

``backend=None`` (the default) follows :func:`saffnet_fast.use_backend` / ``SAFFNET_BACKEND``
/ ``auto``. ``auto`` takes the first implementation that can serve this call (the device, the
dtype, the module's mode; each backend says what it cannot serve in its
``unsupported_reason``) and otherwise falls back to the reference with one warning line per
distinct reason. An explicitly requested backend that cannot serve the call raises
:class:`~saffnet_fast.backend.BackendUnavailableError` saying why.

Under autocast (``torch.autocast`` for the input's device) a fused implementation runs as
autocast runs an op on its float32 list: its inputs are cast to the parameters' dtype
(float32 in mixed-precision training), autocast is off inside, and the output is cast back
to the dtype the reference would return. The fused kernels then need no reduced-precision
variant on the CPU, where they have none, and are more accurate than the reference's
bfloat16 / float16 convolutions.

Tracing (``torch.jit.trace``, ONNX export) always takes the reference path so exported graphs
contain only standard operators.
"""
from __future__ import annotations

import functools
import importlib
import itertools
import warnings
import weakref
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from .. import backend as _backend
from ..backend import BackendUnavailableError
from .reference import (AFF, DEFAULT_DROPOUT, DEFAULT_NEGATIVE_SLOPE, SAWF, SCAFF,
                        CoordAttention, SplitResplice, _check_input)

__all__ = [
    "FastAFF",
    "FastCoordAttention",
    "FastSCAFF",
    "FastSAWF",
    "FastSplitResplice",
    "FAST_FROM_REFERENCE",
    "REFERENCE_FROM_FAST",
    "select_implementation",
    "run_op",
]

_warned_fallbacks: set[str] = set()


def _warn_fallback_once(key: str, message: str) -> None:
    if key not in _warned_fallbacks:
        _warned_fallbacks.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _native_lookup(op: str, module: nn.Module, x: torch.Tensor) -> Tuple[Optional[Callable], str]:
    """The native function for ``op`` or (None, why not). Looked up at call time: the native
    module may not define every op."""
    try:
        native = importlib.import_module("saffnet_fast.ops.native")
    except Exception as exc:  # the module may not exist in this build yet
        return None, f"saffnet_fast.ops.native is not importable ({type(exc).__name__}: {exc})"
    fn = getattr(native, f"native_{op}", None)
    if fn is None:
        return None, f"saffnet_fast.ops.native has no native_{op} (op not implemented natively)"
    # What the native kernels cannot serve (a dtype, a mode), as Triton's unsupported_reason
    unsupported = getattr(native, "unsupported_reason", None)
    if callable(unsupported):
        reason = unsupported(module, x)
        if reason is not None:
            return None, reason
    return fn, ""


def _triton_lookup(op: str, module: nn.Module, x: torch.Tensor) -> Tuple[Optional[Callable], str]:
    try:
        impl = importlib.import_module(f"saffnet_fast.ops.triton.{op}")
    except Exception as exc:
        return None, f"saffnet_fast.ops.triton.{op} is not importable ({type(exc).__name__}: {exc})"
    reason = impl.unsupported_reason(module, x)
    if reason is not None:
        return None, reason
    fn = getattr(impl, f"triton_{op}", None)
    if fn is None:
        return None, f"saffnet_fast.ops.triton.{op} has no triton_{op}"
    return fn, ""


_LOOKUPS = {"native": _native_lookup, "triton": _triton_lookup}


def _exporting() -> bool:
    # Exported graphs (TorchScript tracing, ONNX) must hold standard operators only.
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    onnx = getattr(torch, "onnx", None)
    is_in_export = getattr(onnx, "is_in_onnx_export", None)
    return bool(is_in_export()) if is_in_export is not None else False


def _autocast_on(device: torch.device) -> bool:
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def _kernel_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype a fused implementation computes in: x's, or under autocast the parameters'
    (see the module docstring)."""
    if not _autocast_on(x.device):
        return x.dtype
    param = next(module.parameters(), None)
    return x.dtype if param is None else param.dtype


def _run_kernel(fn: Callable, module: nn.Module, x: torch.Tensor, x_run: torch.Tensor, inputs):
    """``fn(module, x_run, *inputs)``, ``x_run`` being ``x`` in :func:`_kernel_dtype`; under
    autocast with the other inputs in that dtype too, autocast off inside, and the output
    in the dtype the reference returns (x's, promoted with the other inputs')."""
    if not _autocast_on(x.device):
        return fn(module, x_run, *inputs)
    out_dtype = x.dtype
    for t in inputs:
        out_dtype = torch.promote_types(out_dtype, t.dtype)
    with torch.autocast(x.device.type, enabled=False):
        out = fn(module, x_run, *(t.to(x_run.dtype) for t in inputs))
    return out.to(out_dtype)


def _requested(backend: Optional[str]) -> str:
    return _backend.get_backend() if backend is None else backend


def _candidates(op: str, backend: Optional[str], module: nn.Module, x: torch.Tensor):
    """(explicit, [(name, fn)...], reasons): the implementations to try in order; ``x`` in
    the dtype they would compute in (:func:`_kernel_dtype`)."""
    requested = _requested(backend)
    if requested == "reference" or _exporting():
        return True, [], []
    device = x.device
    if requested in _LOOKUPS:
        # Raises BackendUnavailableError when the backend as a whole cannot run here.
        _backend.resolve_backend(requested, device)
        fn, reason = _LOOKUPS[requested](op, module, x)
        if fn is None:
            raise BackendUnavailableError(
                f"backend={requested!r} cannot run {type(module).__name__} ({op}) on "
                f"{device.type} {x.dtype} input: {reason}. Pass backend='auto' or "
                "backend='reference'.")
        return True, [(requested, fn)], []
    # auto
    order = _backend.CUDA_AUTO_ORDER if device.type == "cuda" else ("native", "reference")
    found, reasons = [], []
    for candidate in order:
        if candidate == "reference":
            break
        reason = _backend.backend_unavailable_reason(candidate, device)
        if reason is None:
            fn, reason = _LOOKUPS[candidate](op, module, x)
            if fn is not None:
                found.append((candidate, fn))
                continue
        reasons.append(f"{candidate}: {reason}")
    return False, found, reasons


def _warn_fallback(op: str, x: torch.Tensor, reasons) -> None:
    """One warning line per distinct reason (the same reason stops every block of a model)."""
    why = "; ".join(reasons)
    _warn_fallback_once(why, (
        f"saffnet_fast: backend='auto' runs {op} with the reference PyTorch path on "
        f"{x.device.type} {x.dtype} input ({why}); other blocks falling back for this reason "
        "are not reported again"))


def select_implementation(op: str, backend: Optional[str], module: nn.Module,
                          x: torch.Tensor) -> Tuple[str, Optional[Callable]]:
    """The implementation ``auto``/``backend`` picks for this call: ``(backend_name, fn)``;
    ``fn`` is None for the reference path. ``x`` is the input as the implementation would
    get it (under autocast: in the parameters' dtype, see :func:`run_op`)."""
    explicit, found, reasons = _candidates(op, backend, module, x)
    if found:
        return found[0]
    if not explicit:
        _warn_fallback(op, x, reasons)
    return "reference", None


def run_op(op: str, backend: Optional[str], module: nn.Module, x: torch.Tensor, *inputs):
    """Run ``op`` with the selected implementation; None means "run the reference forward".
    ``x`` decides the device and dtype; ``inputs`` are the op's further tensors (AFF's
    residual). Under autocast the implementations get their inputs in the parameters' dtype
    (see the module docstring).

    An implementation that raises NotImplementedError (a kernel not written yet for this
    case) counts as unavailable: auto moves on to the next one, an explicit request raises
    BackendUnavailableError."""
    if _requested(backend) == "reference":
        return None
    dtype = _kernel_dtype(module, x)
    x_run = x.to(dtype)
    explicit, found, reasons = _candidates(op, backend, module, x_run)
    for name, fn in found:
        try:
            return _run_kernel(fn, module, x, x_run, inputs)
        except NotImplementedError as exc:
            if explicit:
                raise BackendUnavailableError(
                    f"backend={name!r} cannot run {type(module).__name__} ({op}) on "
                    f"{x_run.device.type} {x_run.dtype} input: {exc}. Pass backend='auto' or "
                    "backend='reference'.") from exc
            reasons.append(f"{name}: {exc}")
    if not explicit:
        _warn_fallback(op, x_run, reasons)
    return None


# Fast modules by a plain-int key. A function marked constant for torch.compile must get
# only Python constants: torch 2.13 accepts the module itself there, but torch 2.11 raises
# "UnspecializedNNModuleVariable(...) is not a constant" (seen on the lent H100's torch
# 2.11), so the traced code passes the module's key and the selection looks the module up.
_FAST_MODULES: "weakref.WeakValueDictionary[int, nn.Module]" = weakref.WeakValueDictionary()
_NEXT_FAST_KEY = itertools.count()


def register_fast_module(module: nn.Module) -> None:
    """Give ``module`` its own compile-time key (at construction, on a copy or unpickling,
    and when convert() swaps a reference block's class)."""
    key = next(_NEXT_FAST_KEY)
    module.__dict__["_fast_key"] = key
    _FAST_MODULES[key] = module


def _compile_time_choice(op: str, backend: Optional[str], module_key: int, device: str,
                         dtype: torch.dtype, training: bool, requires_grad: bool,
                         grad_enabled: bool) -> str:
    """select_implementation for torch.compile: evaluated while tracing, its result (a
    backend name) is a constant of the compiled graph. Under torch.compile the backend is
    therefore fixed at compile time: a later use_backend() does not recompile. Selecting
    imports the implementation's module, which _run_traced then finds loaded."""
    module = _FAST_MODULES[module_key]
    x_like = torch.empty(0, device=device, dtype=dtype).requires_grad_(requires_grad)
    with torch.set_grad_enabled(grad_enabled):
        return select_implementation(op, backend, module, x_like)[0]


# What torch.compiler.assume_constant_result does (it only sets this attribute), without
# importing torch._dynamo (and with it triton) when saffnet_fast.nn is imported;
# tests/test_convert.py checks that the decorator still works this way.
_compile_time_choice._dynamo_marked_constant = True


def _run_traced(name: str, op: str, module: nn.Module, x: torch.Tensor,
                *inputs) -> torch.Tensor:
    # import statements of already-loaded modules, which torch.compile can trace
    if name == "native":
        from ..ops import native as native_ops
        return getattr(native_ops, f"native_{op}")(module, x, *inputs)
    from ..ops import triton as triton_ops
    return getattr(getattr(triton_ops, op), f"triton_{op}")(module, x, *inputs)


def _validate_backend(backend: Optional[str]) -> Optional[str]:
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected None or one of {_backend.BACKENDS}, got "
                        f"{type(backend).__name__} {backend!r}")
    if backend.lower() not in _backend.BACKENDS:
        raise ValueError(f"backend: expected None or one of {_backend.BACKENDS}, got {backend!r}")
    return backend.lower()


class _FastMixin:
    """Shared dispatch of the fast modules; ``_op`` names the fused op."""

    _op: str = ""
    backend: Optional[str] = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        register_fast_module(self)

    def __setstate__(self, state):  # copy.deepcopy and pickle: a new module, a new key
        super().__setstate__(state)
        register_fast_module(self)

    def _dispatch(self, x: torch.Tensor, *inputs):
        _check_input(x, self.channels)
        if torch.compiler.is_compiling():
            # The selection itself (imports, warnings, context variables) is not traceable:
            # it runs once per compilation; what it depends on is read here, in traced code,
            # so torch.compile guards on it (mode, device, dtype, grad) and recompiles.
            dtype = _kernel_dtype(self, x)
            name = _compile_time_choice(self._op, self.backend, self._fast_key, str(x.device),
                                        dtype, self.training, x.requires_grad,
                                        torch.is_grad_enabled())
            if name == "reference":
                return None
            try:
                return _run_kernel(functools.partial(_run_traced, name, self._op), self, x,
                                   x.to(dtype), inputs)
            except NotImplementedError:  # a kernel not written for this case: reference
                return None
        return run_op(self._op, self.backend, self, x, *inputs)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        extra = f"backend={self.backend!r}"
        return f"{base}, {extra}" if base else extra


class FastCoordAttention(_FastMixin, CoordAttention):
    """:class:`CoordAttention` with native/Triton backends (op ``coordinate_attention``)."""

    _op = "coordinate_attention"

    def __init__(self, inp: int, oup: int | None = None, reduction: int = 32, *,
                 backend: Optional[str] = None):
        super().__init__(inp, oup, reduction)
        self.backend = _validate_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._dispatch(x)
        return CoordAttention.forward(self, x) if out is None else out


class FastSCAFF(_FastMixin, SCAFF):
    """:class:`SCAFF` = AFF(CA(x), x) with native/Triton backends (op ``scaff``)."""

    _op = "scaff"

    def __init__(self, channels: int, ca_reduction: int = 32, aff_r: int = 4, *,
                 backend: Optional[str] = None):
        super().__init__(channels, ca_reduction, aff_r)
        self.backend = _validate_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._dispatch(x)
        return SCAFF.forward(self, x) if out is None else out


class FastSAWF(_FastMixin, SAWF):
    """:class:`SAWF` = AFF(SE+(x), x) with native/Triton backends (op ``sawf``)."""

    _op = "sawf"

    def __init__(self, channels: int, se_reduction: int = 16, aff_r: int = 4, *,
                 backend: Optional[str] = None):
        super().__init__(channels, se_reduction, aff_r)
        self.backend = _validate_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._dispatch(x)
        return SAWF.forward(self, x) if out is None else out


class FastAFF(_FastMixin, AFF):
    """:class:`AFF`, the official ``AFF(channels=64, r=4)`` fusing ``x`` and ``residual``,
    with native/Triton backends (op ``aff``): one fused pass over both tensors instead of
    eager AFF's dozen full-size intermediates. ``forward(x, residual)`` as the official AFF."""

    _op = "aff"

    def __init__(self, channels: int = 64, r: int = 4, *, backend: Optional[str] = None):
        super().__init__(channels, r)
        self.backend = _validate_backend(backend)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out = self._dispatch(x, residual)
        return AFF.forward(self, x, residual) if out is None else out


class FastSplitResplice(_FastMixin, SplitResplice):
    """:class:`SplitResplice` with native/Triton backends (op ``split_resplice``)."""

    _op = "split_resplice"

    def __init__(self, channels: int, splits: int = 8,
                 negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
                 dropout: float = DEFAULT_DROPOUT, *, backend: Optional[str] = None):
        super().__init__(channels, splits, negative_slope, dropout)
        self.backend = _validate_backend(backend)

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
