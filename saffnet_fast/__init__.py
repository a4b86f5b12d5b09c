"""saffnet_fast: SAFFNet human pose estimation, fast.

Reference PyTorch models (SAFFNet, HRNet-W32/DF/SF and every ablation row), fused kernels
for SAFFNet's hot paths (C++ CPU, CUDA, Triton), drop-in fast modules, and the training /
evaluation / inference toolkit.
"""
__version__ = "0.1.0"

from ._native import has_native, native_build_info, native_load_error  # noqa: E402

if has_native():
    # Register the fake kernels and autograd formulas of torch.ops.saffnet_fast.* now, so
    # code that calls the ops directly (not through saffnet_fast.ops) gets them too.
    try:
        from . import ops as _ops  # noqa: F401
    except Exception as _exc:  # a stale build whose ops do not match this Python code
        from . import _native
        _native._disable(f"registering its ops failed: {type(_exc).__name__}: {_exc}"
                         .splitlines()[0])
from .backend import (BACKENDS, BackendUnavailableError, available_backends,  # noqa: E402
                      get_backend, has_triton, resolve_backend, use_backend)

__all__ = [
    "__version__",
    "has_native",
    "has_triton",
    "native_build_info",
    "native_load_error",
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "get_backend",
    "resolve_backend",
    "use_backend",
    "convert",
    "optimize_for_inference",
    "compile_frozen",
]


def __getattr__(name):
    # convert / optimize_for_inference / compile_frozen (saffnet_fast.fast) load on first
    # use, so `import saffnet_fast` does not import the fast modules.
    if name in ("convert", "optimize_for_inference"):
        from .fast import convert as conversion
        return getattr(conversion, name)
    if name == "compile_frozen":
        from .fast.inductor import compile_frozen
        return compile_frozen
    raise AttributeError(f"module 'saffnet_fast' has no attribute {name!r}")
