"""Loading of the compiled extension ``saffnet_fast._C``.

The extension is optional: a pure-Python install (or a build that failed) still imports,
with one warning line giving the reason, and runs the reference path. Asking explicitly for
the native backend then raises :class:`NativeUnavailableError` naming what was expected.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

__all__ = ["has_native", "native_load_error", "require_native", "NativeUnavailableError",
           "native_build_info"]

_C = None
_LOAD_ERROR: str | None = None


class NativeUnavailableError(RuntimeError):
    """The native backend was requested but ``saffnet_fast._C`` is not usable."""


def _load() -> None:
    global _C, _LOAD_ERROR
    if os.environ.get("SAFFNET_DISABLE_NATIVE", "0") == "1":
        _LOAD_ERROR = "disabled by SAFFNET_DISABLE_NATIVE=1"
    else:
        try:
            _C = importlib.import_module("saffnet_fast._C")
        except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
            _C = None
            _LOAD_ERROR = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if _C is None:
        warnings.warn(
            f"saffnet_fast: native extension not loaded ({_LOAD_ERROR}); "
            "using the reference PyTorch path",
            RuntimeWarning,
            stacklevel=3,
        )


_load()


def _disable(reason: str) -> None:
    """Mark a loaded extension unusable (e.g. a stale build whose ops do not match the
    Python registrations): one warning line, then the reference path."""
    global _C, _LOAD_ERROR
    _C = None
    _LOAD_ERROR = reason
    warnings.warn(f"saffnet_fast: native extension not used ({reason}); "
                  "using the reference PyTorch path", RuntimeWarning, stacklevel=3)


def has_native() -> bool:
    """True when the compiled extension loaded and its ops are registered."""
    return _C is not None


def native_load_error() -> str | None:
    return _LOAD_ERROR


def native_build_info() -> dict:
    """What the extension was built with (empty when it is not loaded)."""
    if _C is None:
        return {}
    info = getattr(_C, "build_info", None)
    return dict(info()) if callable(info) else {}


def require_native(device: torch.device | str | None = None) -> None:
    """Raise a clear error when the native backend cannot serve ``device``."""
    from . import __version__

    if _C is None:
        raise NativeUnavailableError(
            "backend='native' requested but the compiled extension saffnet_fast._C is not "
            f"available ({_LOAD_ERROR}). saffnet_fast {__version__} expects an extension built "
            f"against torch {torch.__version__}; rebuild it with "
            "`pip install --no-build-isolation -e .` (add FORCE_CUDA=1 for CUDA kernels), "
            "or use backend='reference'.")
    if device is not None and torch.device(device).type == "cuda":
        info = native_build_info()
        if not info.get("with_cuda", False):
            raise NativeUnavailableError(
                "backend='native' requested for a CUDA tensor but saffnet_fast._C was built "
                "without CUDA kernels (torch "
                f"{info.get('torch_version', '?')}); rebuild with FORCE_CUDA=1 on a machine "
                "with nvcc, or use backend='triton' or 'reference'.")
