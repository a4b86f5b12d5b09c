"""Which implementation a fast module runs for a call, and running it.

Three explicit tables decide it:

* :data:`BLOCKS`: the block algorithm of each fast module's ``_op`` (one per block, for
  every backend: :mod:`.blocks`);
* :data:`SUPPORT`: per (block, backend), why that backend's kernels cannot run this
  module on this input (dtype, parameters, the module's mode and layers); a pair that is
  absent is a block the backend has no kernels for;
* :func:`saffnet_fast.backend.backend_unavailable_reason`: whether the backend runs on
  the device at all (the extension loaded and has kernels for it; triton importable and a
  CUDA device, or the interpreter).

``backend`` (a module's own, else :func:`saffnet_fast.use_backend` / ``SAFFNET_BACKEND``
/ ``auto``): ``reference`` runs the reference forward; ``native`` / ``triton`` run that
backend or raise :class:`~saffnet_fast.backend.BackendUnavailableError` saying why not;
``auto`` tries the backends in order (CPU: native; CUDA: ``backend.CUDA_AUTO_ORDER``),
stops at the first that serves the call, and otherwise runs the reference with one
warning line per distinct reason. On CUDA, ``auto`` hands each block the ops to avoid
(:data:`CUDA_UNROUTED`: kernels that fail the compiled-kernel bar), and the block takes its
other form or declines. An algorithm raising NotImplementedError (a case its
kernels do not cover) counts as unavailable.

Under autocast (``torch.autocast`` for the input's device) a fused implementation runs as
autocast runs an op on its float32 list: its inputs are cast to the parameters' dtype
(float32 in mixed-precision training), autocast is off inside, and the output is cast back
to the dtype the reference would return. The fused kernels then need no reduced-precision
variant on the CPU, where they have none, and are more accurate than the reference's
bfloat16 / float16 convolutions.

Tracing (``torch.jit.trace``, ONNX export) always takes the reference path so exported graphs
contain only standard operators. Under ``torch.compile`` the selection runs once per
compilation (:func:`_compile_time_choice`) and the traced code calls the same table.
"""
from __future__ import annotations

import functools
import itertools
import weakref
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from .. import backend as _backend
from ..backend import BackendUnavailableError
from ..ops import load_backend
from . import blocks

__all__ = ["BLOCKS", "SUPPORT", "KERNEL_DTYPES", "CUDA_UNROUTED", "avoided_ops",
           "unsupported_reason", "select_implementation", "run_op", "register_fast_module"]

# A fast module's ``_op`` -> its block algorithm, f(module, x, *inputs, backend=...).
BLOCKS: Dict[str, Callable[..., torch.Tensor]] = {
    "coordinate_attention": blocks.coordinate_attention,
    "scaff": blocks.scaff,
    "sawf": blocks.sawf,
    "aff": blocks.aff,
    "split_resplice": blocks.split_resplice,
}


# --------------------------------------------------------------------------- GPU routing
# Ops whose GPU kernels backend='auto' does not use on CUDA, and why: every kernel listed
# fails the compiled-kernel bar of benchmarks/kernel_report.py --check (sm_90: a matrix
# kernel must use tensor cores, no kernel may spill; results/kernel-report-20261207.md).
# A block needing one of them takes its other form (SCAFF / SAWF / AFF inference: the local
# bottleneck as two cuBLAS GEMMs between the elementwise aff_input and aff_combine kernels;
# SR without autograd: Triton's tensor-core split_resplice_tiled) or the next backend, else
# the reference (cuDNN). An explicit backend='native' / 'triton' still runs them (for
# benchmarks and parity tests). kernel_report.py's NOT_ROUTED is this table's kernels: remove
# an entry when its kernels pass, and the report gates them again.
# (backend, op) -> (its GPU kernels, why they are not routed)
CUDA_UNROUTED: Dict[Tuple[str, str], Tuple[Tuple[str, ...], str]] = {
    ("native", "aff_fuse"): (
        ("aff_fuse_forward_kernel", "aff_fuse_backward_kernel"),
        "the per-pixel C→C/r→C bottleneck as scalar FMA loops: no tensor cores"),
    ("native", "aff_pair"): (
        ("aff_pair_forward_kernel", "aff_pair_backward_kernel"),
        "the per-pixel bottleneck as scalar FMA loops: no tensor cores"),
    ("native", "aff_moments"): (
        ("aff_moments_forward_kernel", "aff_moments_backward_kernel"),
        "the per-pixel bottleneck recomputed as scalar FMA loops: no tensor cores"),
    ("native", "split_resplice"): (
        ("split_resplice_step_kernel",), "direct 3×3 convolution in scalar FMA: no tensor cores"),
    ("native", "split_resplice_tiled"): (
        ("split_resplice_tiled_kernel",), "direct 3×3 convolutions in scalar FMA: no tensor cores"),
    # ("<op>.backward": the op's backward kernels only; its forward is routed)
    ("triton", "aff_fuse.backward"): (
        ("_aff_fuse_backward_kernel",),
        "tl.dot on float32 operands (tf32 / ieee); spills at C = 128; the float32 backward "
        "needs 235 KB of shared memory"),
    ("triton", "aff_pair.backward"): (
        ("_aff_pair_backward_kernel",),
        "tl.dot on float32 operands (tf32 / ieee); spills at C = 128"),
    ("triton", "aff_moments"): (
        ("_aff_moments_kernel", "_aff_moments_backward_kernel"),
        "tl.dot on float32 operands (tf32 / ieee); spills at C = 128"),
    ("triton", "split_resplice"): (
        ("_sr_step_kernel", "_conv_input_backward_kernel", "_conv_weight_backward_kernel"),
        "tl.dot with ieee precision on float32 operands: no tensor cores"),
    ("triton", "split_resplice_train"): (
        ("_conv_stats_kernel", "_conv_input_backward_kernel", "_conv_weight_backward_kernel"),
        "tl.dot with ieee precision on float32 operands: no tensor cores"),
}


def avoided_ops(backend: str, device: torch.device) -> frozenset:
    """The ops backend='auto' does not use for ``backend`` on ``device`` (CUDA_UNROUTED)."""
    if device.type != "cuda":
        return frozenset()
    return _AVOIDED_ON_CUDA.get(backend, frozenset())


_AVOIDED_ON_CUDA = {
    name: frozenset(op for (b, op) in CUDA_UNROUTED if b == name) for name in ("native", "triton")
}

# Blocks whose inference (eval mode, no autograd) auto runs on Triton first on CUDA. Their
# Triton form is one pass per tile with the local bottleneck on tensor cores (aff_fuse /
# aff_pair: x, and the residual, read once, the output written once), where the native
# form writes and rereads t and the logits around two cuBLAS GEMMs: about 4 passes over the
# N×C×H×W tensor against 8.5 (SCAFF, counting coord_pool and the global mean). A prediction
# from the traffic, not yet measured: benchmarks/gpu_first_phase.py times both per block.
CUDA_TRITON_FIRST_INFERENCE = frozenset({"scaff", "sawf", "aff"})


def _cuda_order(op: str, module: nn.Module, x: torch.Tensor) -> Tuple[str, ...]:
    if op in CUDA_TRITON_FIRST_INFERENCE and not module.training and not (
            torch.is_grad_enabled() and (x.requires_grad or _trainable(module))):
        return ("triton",) + tuple(b for b in _backend.CUDA_AUTO_ORDER if b != "triton")
    return _backend.CUDA_AUTO_ORDER


def _trainable(module: nn.Module) -> bool:
    first = next(module.parameters(), None)
    return first is not None and first.requires_grad


# --------------------------------------------------------------------------- support
# Input dtypes of the native kernels per device type (csrc/common/checks.h:
# check_cpu_dtype, check_cuda_dtype); parameters must have the input's dtype (check_like).
# Under autocast the dispatch hands the kernels inputs of the parameters' dtype.
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


def _parameters_reason(module: nn.Module, x: torch.Tensor) -> Optional[str]:
    """Why the parameters cannot meet x in a kernel (dtype or device), else None. Cached per
    module for (x's dtype, x's device, the module's conversion count): walking a block's
    parameters on every call cost ~20 µs per block, ~1 ms per SAFFNet forward. The fast
    modules count their conversions (.to / .half / .cuda, here or on a parent, all pass
    through nn.Module._apply); a parameter converted on its own, outside that, is still
    caught by the kernels' own dtype and device checks."""
    key = (x.dtype, x.device, module.__dict__.get("_conversions", 0))
    cached = module.__dict__.get("_parameters_check")
    if cached is not None and cached[0] == key:
        return cached[1]
    reason = None
    for name, p in module.named_parameters():
        if p.dtype != x.dtype or p.device != x.device:
            reason = (f"parameter {name} is {p.dtype} on {p.device} but the input is "
                      f"{x.dtype} on {x.device}")
            break
    module.__dict__["_parameters_check"] = (key, reason)
    return reason


def _native(module: nn.Module, x: torch.Tensor) -> Optional[str]:
    """The native kernels: x's dtype against :data:`KERNEL_DTYPES` and the parameters', and
    the BatchNorm modules (they fold BN themselves)."""
    if getattr(module, "_bn_folded", False):
        # optimize_for_inference folds BN inside a fused block only when the native backend
        # does not serve it
        return ("its BatchNorm layers were folded by optimize_for_inference and the native "
                "kernels expect the BatchNorm modules")
    allowed = KERNEL_DTYPES.get(x.device.type)
    if allowed is not None and x.dtype not in allowed:
        names = [str(d).replace("torch.", "") for d in allowed]
        return (f"the {x.device.type.upper()} kernels take {', '.join(names[:-1])} or "
                f"{names[-1]}, got {x.dtype}")
    return _parameters_reason(module, x)


def _native_split_resplice(module: nn.Module, x: torch.Tensor) -> Optional[str]:
    slopes = {float(step.negative_slope) for step in module.steps}
    if min(slopes) < 0:
        return f"needs negative_slope ≥ 0 for all steps, got {sorted(slopes)}"
    return _native(module, x) or blocks.split_resplice_reason(module, x)


def _triton_common(module: nn.Module, x: torch.Tensor) -> Optional[str]:
    load_backend("triton")  # imports triton, registers the kernels, fills their table rows
    from ..ops.triton import _common

    if x.device.type != "cuda" and not _common.INTERPRET:
        return "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import)"
    if x.dtype not in _common.SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not supported (expected one of {_common.SUPPORTED_DTYPES})"
    if x.numel() >= 2 ** 31:
        return "inputs of 2**31 elements or more are not supported (32-bit indexing)"
    return _parameters_reason(module, x)


def _bn_or_identity(m: nn.Module) -> bool:
    # exactly BatchNorm2d: SyncBatchNorm's training statistics span processes
    return isinstance(m, nn.Identity) or type(m) is nn.BatchNorm2d


def _ca_layout(ca: nn.Module) -> Optional[str]:
    ok = all(blocks.is_1x1_conv(getattr(ca, name, None)) for name in ("conv1", "conv_h", "conv_w"))
    return None if ok else "the CoordAttention layers do not have the reference layout"


def _aff_layout(aff: nn.Module) -> Optional[str]:
    """AFF's layers as the reference builds them (BNs possibly folded into Identity)."""
    local, glob = aff.local_att, aff.global_att
    ok = (len(local) == 5 and blocks.is_1x1_conv(local[0]) and _bn_or_identity(local[1])
          and isinstance(local[2], nn.ReLU) and blocks.is_1x1_conv(local[3])
          and _bn_or_identity(local[4])
          and len(glob) == 6 and isinstance(glob[0], nn.AdaptiveAvgPool2d))
    return None if ok else "the AFF submodules do not have the reference layout"


def _se_layout(se: nn.Module) -> Optional[str]:
    ok = all(blocks.is_1x1_conv(getattr(se, name, None)) for name in ("fc1", "fc2", "fc_avg"))
    return None if ok else "the SE+ layers do not have the reference layout"


def _triton_coordinate_attention(module, x):
    return _triton_common(module, x) or _ca_layout(module)


def _triton_scaff(module, x):
    return _triton_common(module, x) or _ca_layout(module.ca) or _aff_layout(module.aff)


def _triton_sawf(module, x):
    return _triton_common(module, x) or _se_layout(module.se) or _aff_layout(module.aff)


def _triton_aff(module, x):
    return _triton_common(module, x) or _aff_layout(module)


def _triton_split_resplice(module, x):
    reason = _triton_common(module, x)
    if reason is not None:
        return reason
    steps = module.steps
    bn_folded = all(isinstance(step.bn, nn.Identity) for step in steps)
    if module.training:
        if bn_folded:
            return ("training needs the BatchNorm layers, which optimize_for_inference folded "
                    "into the convolutions")
        if not all(type(step.bn) is nn.BatchNorm2d and step.bn.affine for step in steps):
            return "training needs affine nn.BatchNorm2d layers in every FC step"
        if not all(step.bn.training and step.drop.training for step in steps):
            return "training with some FC steps in eval mode is not supported"
    elif any(step.bn.training or step.drop.training for step in steps):
        return "eval mode with some FC steps in training mode is not supported"
    for step in steps:
        conv, bn, act = step.conv, step.bn, step.act
        if not (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
                and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
                and (isinstance(bn, nn.Identity)
                     or (type(bn) is nn.BatchNorm2d and bn.running_mean is not None))
                and isinstance(act, nn.LeakyReLU)):
            return "the FC steps do not have the reference layout"
    return blocks.split_resplice_reason(module, x)


# (block, backend) -> why that backend's kernels cannot run the module on x (None: they
# can). Asked after backend.backend_unavailable_reason found the backend usable here.
SUPPORT: Dict[Tuple[str, str], Callable[[nn.Module, torch.Tensor], Optional[str]]] = {
    ("coordinate_attention", "native"): _native,
    ("scaff", "native"): _native,
    ("sawf", "native"): _native,
    ("aff", "native"): _native,
    ("split_resplice", "native"): _native_split_resplice,
    ("coordinate_attention", "triton"): _triton_coordinate_attention,
    ("scaff", "triton"): _triton_scaff,
    ("sawf", "triton"): _triton_sawf,
    ("aff", "triton"): _triton_aff,
    ("split_resplice", "triton"): _triton_split_resplice,
}


def unsupported_reason(op: str, backend: str, module: nn.Module,
                       x: torch.Tensor) -> Optional[str]:
    """Why ``backend``'s kernels cannot run block ``op`` of ``module`` on ``x`` (its dtype,
    its parameters, the module's mode and layers); None when they can. Whether the backend
    runs on x's device at all is :func:`saffnet_fast.backend.backend_unavailable_reason`'s
    answer."""
    check = SUPPORT.get((op, backend))
    if check is None:
        return f"no {backend} implementation of {op}"
    return check(module, x)


# --------------------------------------------------------------------------- selection
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


def _implementation(op: str, backend: str, avoid: frozenset = frozenset()
                    ) -> Callable[..., torch.Tensor]:
    if avoid:
        return functools.partial(BLOCKS[op], backend=backend, avoid=avoid)
    return functools.partial(BLOCKS[op], backend=backend)


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


def _cannot(op: str, requested: str, module: nn.Module, x: torch.Tensor, reason: str):
    return BackendUnavailableError(
        f"backend={requested!r} cannot run {type(module).__name__} ({op}) on "
        f"{x.device.type} {x.dtype} input: {reason}. Pass backend='auto' or "
        "backend='reference'.")


def _servers(op: str, requested: str, module: nn.Module, x: torch.Tensor,
             reasons: list) -> Iterator[str]:
    """The backends that can serve this call, in order, each checked only when the one
    before did not serve it (a native hit never asks Triton); why the others cannot is
    appended to ``reasons``. An explicit backend that cannot raises."""
    if requested != "auto":
        # Raises BackendUnavailableError when the backend as a whole cannot run here.
        _backend.resolve_backend(requested, x.device)
        reason = unsupported_reason(op, requested, module, x)
        if reason is not None:
            raise _cannot(op, requested, module, x, reason)
        yield requested
        return
    order = _cuda_order(op, module, x) if x.device.type == "cuda" else ("native", "reference")
    for candidate in order:
        if candidate == "reference":
            return
        reason = (_backend.backend_unavailable_reason(candidate, x.device)
                  or unsupported_reason(op, candidate, module, x))
        if reason is None:
            yield candidate
        else:
            reasons.append(f"{candidate}: {reason}")


def _warn_fallback(op: str, x: torch.Tensor, reasons) -> None:
    """One warning line per distinct reason (the same reason stops every block of a model)."""
    why = "; ".join(reasons)
    _backend.warn_once(
        f"saffnet_fast: backend='auto' runs {op} with the reference PyTorch path on "
        f"{x.device.type} {x.dtype} input ({why}); other blocks falling back for this reason "
        "are not reported again", key=why, stacklevel=3)


def select_implementation(op: str, backend: Optional[str], module: nn.Module,
                          x: torch.Tensor) -> Tuple[str, Optional[Callable]]:
    """The implementation ``auto``/``backend`` picks for this call: ``(backend_name, fn)``
    with ``fn(module, x, *inputs)``; ``fn`` is None for the reference path. ``x`` is the
    input as the implementation would get it (under autocast: in the parameters' dtype,
    see :func:`run_op`)."""
    requested = _requested(backend)
    if requested == "reference" or _exporting():
        return "reference", None
    reasons: list = []
    for name in _servers(op, requested, module, x, reasons):
        avoid = avoided_ops(name, x.device) if requested == "auto" else frozenset()
        return name, _implementation(op, name, avoid)
    _warn_fallback(op, x, reasons)
    return "reference", None


def run_op(op: str, backend: Optional[str], module: nn.Module, x: torch.Tensor, *inputs):
    """Run block ``op`` with the selected implementation; None means "run the reference
    forward". ``x`` decides the device and dtype; ``inputs`` are the block's further tensors
    (AFF's residual). Under autocast the implementations get their inputs in the
    parameters' dtype (see the module docstring).

    An implementation that raises NotImplementedError (a kernel not written yet for this
    case) counts as unavailable: auto moves on to the next one, an explicit request raises
    BackendUnavailableError."""
    requested = _requested(backend)
    if requested == "reference" or _exporting():
        return None
    x_run = x.to(_kernel_dtype(module, x))
    reasons: list = []
    for name in _servers(op, requested, module, x_run, reasons):
        avoid = avoided_ops(name, x.device) if requested == "auto" else frozenset()
        try:
            return _run_kernel(_implementation(op, name, avoid), module, x, x_run, inputs)
        except NotImplementedError as exc:
            if requested != "auto":
                raise _cannot(op, name, module, x_run, str(exc)) from exc
            reasons.append(f"{name}: {exc}")
    _warn_fallback(op, x_run, reasons)
    return None


# --------------------------------------------------------------------------- torch.compile
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
    backend name, suffixed "+routed" when auto chose it, so the block avoids the ops of
    CUDA_UNROUTED) is a constant of the compiled graph. Under torch.compile the backend is
    therefore fixed at compile time: a later use_backend() does not recompile."""
    module = _FAST_MODULES[module_key]
    x_like = torch.empty(0, device=device, dtype=dtype).requires_grad_(requires_grad)
    with torch.set_grad_enabled(grad_enabled):
        name = select_implementation(op, backend, module, x_like)[0]
    routed = name != "reference" and _requested(backend) == "auto"
    return name + "+routed" if routed else name


# What torch.compiler.assume_constant_result does (it only sets this attribute), without
# importing torch._dynamo (and with it triton) when the fast modules are imported;
# tests/test_convert.py checks that the decorator still works this way.
_compile_time_choice._dynamo_marked_constant = True


def dispatch(module: nn.Module, x: torch.Tensor, *inputs) -> Optional[torch.Tensor]:
    """The fast module's output for this call, or None for "run the reference forward"."""
    if torch.compiler.is_compiling():
        # The selection itself (warnings, context variables) is not traceable: it runs once
        # per compilation; what it depends on is read here, in traced code, so
        # torch.compile guards on it (mode, device, dtype, grad) and recompiles.
        dtype = _kernel_dtype(module, x)
        name = _compile_time_choice(module._op, module.backend, module._fast_key,
                                    str(x.device), dtype, module.training, x.requires_grad,
                                    torch.is_grad_enabled())
        if name == "reference":
            return None
        name, _, routed = name.partition("+")
        avoid = avoided_ops(name, x.device) if routed else frozenset()
        try:
            return _run_kernel(_implementation(module._op, name, avoid), module, x,
                               x.to(dtype), inputs)
        except NotImplementedError:  # a case the kernels do not cover: reference
            return None
    return run_op(module._op, module.backend, module, x, *inputs)
