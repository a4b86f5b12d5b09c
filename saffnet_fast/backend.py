"""Backend selection: ``reference`` (plain PyTorch), ``native`` (the compiled extension),
``triton`` (Triton kernels for CUDA tensors), and ``auto``.

The default comes from, in order: the innermost :func:`use_backend` context, the environment
variable ``SAFFNET_BACKEND``, then ``auto``. Every fast module and ``build_model`` also take
``backend=`` explicitly.

``auto`` resolves per device:
  * CPU: native when the extension loaded, else reference.
  * CUDA: the order in :data:`CUDA_AUTO_ORDER` (see its comment for why), skipping what is
    unavailable.
A fallback taken by ``auto`` emits one warning line saying why; an explicitly requested
backend that is unavailable raises :class:`BackendUnavailableError` saying what is missing.

This module answers for a device as a whole. Per call, the fast modules'
dispatch (:mod:`saffnet_fast.fast.dispatch`, its ``SUPPORT`` table) also asks each backend
whether it takes the input's dtype, the parameters and the module's mode and layers, and
``auto`` falls back the same way.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from typing import Iterator

import torch

from ._native import NativeUnavailableError, has_native, native_build_info, native_load_error

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "get_backend",
    "use_backend",
    "resolve_backend",
    "has_native",
    "has_triton",
    "available_backends",
    "backend_unavailable_reason",
    "validate_backend",
    "warn_once",
]

BACKENDS = ("auto", "reference", "native", "triton")

# On CUDA, auto prefers the native CUDA kernels and then Triton. Measured on an H100
# (benchmarks/results/gpu-h100-20261124.md): SR forward at batch 64 took native 1.32 ms
# and Triton 3.57 ms in float32, 1.44 and 4.24 ms in float16; forward + backward at batch 32
# 5.56 and 10.03 ms. SCAFF and SAWF have no GPU figure yet.
CUDA_AUTO_ORDER = ("native", "triton", "reference")

_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "saffnet_backend", default=None)
_warned: set[str] = set()


class BackendUnavailableError(NativeUnavailableError):
    """An explicitly requested backend cannot run here."""


def validate_backend(name, argument: str = "backend", *, allow_none: bool = False):
    """``name`` lower-cased when it is one of :data:`BACKENDS` (or None with ``allow_none``);
    otherwise a TypeError (not a string) or ValueError (an unknown name) naming
    ``argument``. The one check of a backend name: use_backend, SAFFNET_BACKEND, the fast
    modules' ``backend=``, convert and optimize_for_inference."""
    if name is None and allow_none:
        return None
    expected = f"None or one of {BACKENDS}" if allow_none else f"one of {BACKENDS}"
    if not isinstance(name, str):
        raise TypeError(f"{argument}: expected {expected}, got {type(name).__name__} {name!r}")
    if name.lower() not in BACKENDS:
        raise ValueError(f"{argument}: expected {expected}, got {name!r}")
    return name.lower()


def warn_once(message: str, key: str | None = None, stacklevel: int = 2) -> None:
    """``message`` as a RuntimeWarning, once per ``key`` (the message itself by default) in
    this process: auto's fallbacks are told once, not at every block and call."""
    key = message if key is None else key
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def get_backend() -> str:
    """The current default backend name (may be ``auto``)."""
    ctx = _context_backend.get()
    if ctx is not None:
        return ctx
    env = os.environ.get("SAFFNET_BACKEND")
    if env:
        return validate_backend(env, "SAFFNET_BACKEND")
    return "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager setting the default backend: ``with use_backend("reference"): ...``."""
    token = _context_backend.set(validate_backend(name))
    try:
        yield name
    finally:
        _context_backend.reset(token)


def has_triton(device: torch.device | str | None = None) -> bool:
    """True when Triton kernels can run on ``device`` (CUDA, or any device under the
    interpreter ``TRITON_INTERPRET=1``)."""
    return _triton_reason(device) is None


def _triton_reason(device) -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda":
        return ("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to run them on the "
                "CPU through the interpreter)")
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def _native_reason(device) -> str | None:
    if not has_native():
        from . import __version__
        return (f"the compiled extension saffnet_fast._C did not load ({native_load_error()}); "
                f"saffnet_fast {__version__} expects it built against torch {torch.__version__}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and not native_build_info().get("with_cuda", False):
        return "saffnet_fast._C was built without CUDA kernels (rebuild with FORCE_CUDA=1)"
    if dev.type not in ("cpu", "cuda", "meta"):
        return f"no native kernels for device type {dev.type!r}"
    return None


def backend_unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend ``name`` ('native' or 'triton') cannot run on ``device``; None when it can.
    'reference' always can; 'auto' is not a concrete backend."""
    name = validate_backend(name)
    if name == "reference":
        return None
    if name == "native":
        return _native_reason(device)
    if name == "triton":
        return _triton_reason(device)
    raise ValueError("backend: 'auto' is not a concrete backend; resolve it with resolve_backend")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    out = ["reference"]
    if _native_reason(device) is None:
        out.append("native")
    if _triton_reason(device) is None:
        out.append("triton")
    return out


def resolve_backend(backend: str | None = None,
                    device: torch.device | str | None = None) -> str:
    """Turn ``backend`` (or the current default) into a concrete backend for ``device``."""
    name = get_backend() if backend is None else validate_backend(backend)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if name == "reference":
        return name
    if name == "native":
        reason = _native_reason(dev)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend='native' is unavailable for {dev.type} tensors: {reason}. "
                "Build the extension with `pip install --no-build-isolation -e .`, or pass "
                "backend='reference'.")
        return name
    if name == "triton":
        reason = _triton_reason(dev)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend='triton' is unavailable for {dev.type} tensors: {reason}.")
        return name
    # auto
    order = CUDA_AUTO_ORDER if dev.type == "cuda" else ("native", "reference")
    reasons = []
    for candidate in order:
        if candidate == "reference":
            break
        reason = _native_reason(dev) if candidate == "native" else _triton_reason(dev)
        if reason is None:
            return candidate
        reasons.append(f"{candidate}: {reason}")
    warn_once("saffnet_fast: backend='auto' falls back to 'reference' on "
               f"{dev.type} ({'; '.join(reasons)})")
    return "reference"
