#!/usr/bin/env python
"""Kernel launches of one CUDA forward of SAFFNet (and of one training step), computed on a
CPU machine, no GPU needed (issues #21 and #22; spec/gpu.md §2 gave a static estimate that
this script replaces with a count).

    python benchmarks/count_launches.py [--json] [--out FILE] [--markdown FILE]
        [--input 256x192] [--batch 64] [--dtype float16|float32|bfloat16]
        [--train-amp bfloat16|none] [--no-training] [--providers eager,optimized,...]
        [--check] [--budget FILE] [--update-budget]

Providers (inference: eval mode, no_grad; training: forward under autocast, JointsMSELoss,
backward, fused Adam step, as the Trainer runs a step on an H100, ``train.amp=auto``):

  eager        build_model("saffnet"), reference backend, NCHW
  eager_cl     the same in channels_last (the issue's "best setting" for eager)
  fast_native  build_model("saffnet", backend="native"), NCHW, as a CUDA build runs it
  fast_triton  build_model("saffnet", backend="triton"), NCHW
  optimized    saffnet_fast.optimize_for_inference of the model (backend auto: native first
               on CUDA; channels_last; BN folded; dtype= when its signature has it); the
               kernels one CUDA-graph replay would hold (cuda_graph=False here: the graph
               replays the same kernels). Inference only.
  hrnet_w32    build_model("hrnet_w32"), NCHW, for context

How it counts:
  1. A CUDA device that is not there. The model is built on the CPU; its parameters and
     buffers become FakeTensors on "cuda" (torch._subclasses.fake_tensor.FakeTensorMode:
     shapes, dtypes, strides, no data). On a CPU-only torch that is not quite enough: Python
     indexing and autograd ask for a CUDA device guard and for the accelerator's streams, so
     a tiny C++ shim (compiled once with the system compiler against the installed torch's
     headers, cached, loaded *before* torch is imported) registers c10's FakeGuardImpl for
     CUDA and CUDA hooks that say "built with CUDA and cuDNN". Nothing executes on it: fake
     tensors never reach a kernel. With those hooks PyTorch's own composite code takes the
     branches a CUDA build takes (cudnn_batch_norm, native_dropout, ...).
  2. saffnet_fast's backend selection is told it is on a CUDA build (fake_cuda_build():
     native_build_info()["with_cuda"] and torch.cuda.is_available() patched while a count
     runs); which backend each fast block gets is printed from
     saffnet_fast.fast.dispatch.select_implementation.
  3. A TorchDispatchMode (LaunchCounter) sees every ATen op below autograd and autocast, and
     every custom op. ATen ops: ATEN_LAUNCHES maps each overload to its launches (0 for
     views and allocation, 1 for an elementwise op / reduction / copy / GEMM, rules for
     convolution, cat, batch norm, the multi-tensor optimizer ops); an overload that is not
     in the table is an error naming it, so the table cannot drift silently. Native ops
     (saffnet_fast::*): NATIVE_LAUNCHERS mirrors each CUDA launcher's host code
     (csrc/cuda/*.cu): its ATen calls (casts, contiguous copies, zero fills, sums) run on the
     fake tensors under the counter, plus its own <<<...>>> launches. Triton ops
     (saffnet_fast_triton::*): the op's Python body runs under the counter, its ATen calls
     counted by the table and each wrap_triton launch (a triton_kernel_wrapper_mutation
     higher-order op) counted as one launch.
  4. One warm-up forward (or training step) first, then the counted one: the steady state
     (folded-parameter caches filled, Adam's state allocated).

What the numbers are: launches of kernels (and memcpys) the CPU issues for one forward /
step. Lower bounds where a library may launch more than one kernel per call (cuDNN
convolutions with internal layout transforms or split-K, cuBLAS GEMMs with a split-K
reduction or a separate bias copy, cuDNN batch norm in NHWC): counted as one each (plus
PyTorch's own visible bias add and layout copies). The host-code mirrors of the native
launchers are a reading of csrc/ (fingerprinted: a launcher whose launch-relevant tokens
changed since the mirror was written is reported as stale).

--check: fails (exit 1) when a provider's count exceeds benchmarks/launch_budget.json
(today's counts + 2%, a regression guard; --update-budget rewrites it). The issue's target
(at most 300 launches per inference forward of the optimized model) is printed beside it,
not enforced: it is not met yet. About 20-40 s on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import datetime
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- fake CUDA shim
# c10's FakeGuardImpl for CUDA (what torch itself installs for fake tensors on a CUDA build
# without devices) and CUDA hooks reporting a CUDA + cuDNN build. Registered from a static
# initializer, so the library must be loaded before torch first asks for its CUDA hooks
# (torch's import does): the reason this module imports torch only after _install_fake_cuda.
_SHIM_SOURCE = r"""
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>

C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);

namespace at {
namespace {
// Registered under the name ATen looks up ("CUDAHooks"). Only what decides code paths:
// nothing here touches a device.
struct CUDAHooks : CUDAHooksInterface {
  explicit CUDAHooks(CUDAHooksArgs) {}
  bool isBuilt() const override { return true; }  // at::accelerator: CUDA is the accelerator
  bool hasCUDA() const override { return true; }
  bool hasCuDNN() const override { return true; }
  bool compiledWithCuDNN() const override { return true; }
  long versionCuDNN() const override { return 91000; }
  long versionRuntimeCuDNN() const override { return 91000; }
  double batchnormMinEpsilonCuDNN() const override { return 0.0; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return false; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  int getNumGPUs() const override { return 1; }
  c10::DeviceIndex current_device() const override { return 0; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
};
}  // namespace
REGISTER_CUDA_HOOKS(CUDAHooks);
}  // namespace at
"""


def _torch_dir() -> Path:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("torch is not importable")
    return Path(list(spec.submodule_search_locations)[0])


def _compile_shim() -> Path:
    """The shim's shared library, compiled on first use into a cache keyed by its source, the
    torch installation and the compiler."""
    tdir = _torch_dir()
    lib = tdir / "lib"
    cxx = os.environ.get("CXX", "c++")
    stamp = []
    for name in ("libc10.so", "libtorch_cpu.so"):
        st = (lib / name).stat()
        stamp.append(f"{name}:{st.st_size}:{int(st.st_mtime)}")
    key = hashlib.sha256("\n".join([_SHIM_SOURCE, str(tdir), cxx, *stamp]).encode())
    cache = Path(os.environ.get("SAFFNET_CACHE_DIR")
                 or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "saffnet_fast")
    target = cache / f"fake_cuda_shim-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src = Path(tmp) / "shim.cpp"
        src.write_text(_SHIM_SOURCE)
        out = Path(tmp) / "shim.so"
        cmd = [cxx, "-O1", "-std=c++17", "-w", "-shared", "-fPIC", f"-I{tdir / 'include'}",
               str(src), "-o", str(out), f"-L{lib}", "-lc10", "-ltorch_cpu",
               f"-Wl,-rpath,{lib}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling the fake-CUDA shim failed ({' '.join(cmd)}):\n"
                               f"{proc.stderr[-2000:]}")
        os.replace(out, target)  # atomic: concurrent runs never load a half-written file
    return target


_FAKE_CUDA_ERROR: str | None = None


def _install_fake_cuda() -> str | None:
    """Load the shim; None when done, else why not (the counts then cannot run)."""
    if "torch" in sys.modules:
        import torch as _t  # noqa: F401  (already imported: can the hooks still be right?)
        if _t.accelerator.current_accelerator() is not None:
            return None
        return ("torch was imported before benchmarks/count_launches.py could register its "
                "fake CUDA hooks; run it as a script (or import it before torch)")
    try:
        ctypes.CDLL(str(_compile_shim()), mode=ctypes.RTLD_GLOBAL)
    except Exception as exc:  # no compiler, an ABI mismatch: say so when counting
        return f"fake-CUDA shim unavailable: {type(exc).__name__}: {exc}"
    return None


_FAKE_CUDA_ERROR = _install_fake_cuda()

import torch  # noqa: E402  (after the shim, see above)
import torch.nn.functional as F  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(ROOT))
import saffnet_fast  # noqa: E402
from saffnet_fast import backend as _backend  # noqa: E402
from saffnet_fast._native import native_build_info  # noqa: E402
from saffnet_fast.fast import dispatch as _dispatch  # noqa: E402
from saffnet_fast.fast.modules import REFERENCE_FROM_FAST  # noqa: E402

# FakeTensor.data_ptr() (read by the folded-parameter cache's key) returns 0 with a warning
warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")

# --------------------------------------------------------------------------- ATen table
# Multi-tensor apply (aten/src/ATen/native/cuda/MultiTensorApply.cuh, read at
# pytorch/pytorch 008356c): one launch per group of tensors/chunks. Per depth (number of
# tensor lists), the most tensors and blocks (65536-element chunks) one launch takes. With
# CUDA >= 12.1 and a driver >= 12.1 on sm >= 70 (an H100 with torch's CUDA 12/13 wheels)
# the kernels take 32 KB of arguments and the larger limits apply; the 4 KB ones are the
# issue's {1:110, 2:64, 3:48, 4:36, 5:30}.
MTA_CHUNK = 65536
MTA_LIMITS = {
    # large_kernel_arg: (max tensors by depth, max tensors with a scalar list, max blocks)
    False: ((110, 64, 48, 36, 30), (96, 64, 48, 36, 30), 320),
    True: ((770, 448, 336, 252, 210), (672, 448, 336, 252, 210), 2240),
}
MTA_LARGE_KERNEL_ARGS = True  # --mta-4kb switches (a CUDA < 12.1 build or an old driver)


def multi_tensor_launches(numels, depth: int, scalar_list: bool = False,
                          large: bool | None = None) -> int:
    """Launches of multi_tensor_apply / multi_tensor_apply_for_fused_optimizer over tensors of
    ``numels`` elements (the same loop: a launch when the tensors or the blocks are full, and
    one for what is left)."""
    large = MTA_LARGE_KERNEL_ARGS if large is None else large
    max_tensors, max_tensors_sl, max_blocks = MTA_LIMITS[large]
    tensor_cap = (max_tensors_sl if scalar_list else max_tensors)[depth - 1]
    launches = blocks = tensors = 0
    for numel in numels:
        if numel == 0:
            continue
        tensors += 1
        chunks = -(-numel // MTA_CHUNK)
        for chunk in range(chunks):
            blocks += 1
            if (tensors == tensor_cap and chunk == chunks - 1) or blocks == max_blocks:
                launches += 1
                blocks = 0
                tensors = 0 if chunk == chunks - 1 else 1
    return launches + (1 if blocks else 0)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _on_gpu(args, kwargs, out) -> bool:
    return any(t.device.type == "cuda" for t in _tensors((args, kwargs, out)))


def _memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The layout cuDNN / cat pick for t: channels_last when t is (and is not also plainly
    contiguous), else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
            memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _conv_format(inp: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    # cudnn_conv_suggest_memory_format: channels_last when the input or the weight is
    if inp.dim() == 4 and (_memory_format_of(inp) == torch.channels_last
                           or _memory_format_of(weight) == torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _layout_copies(fmt, *tensors) -> int:
    """Copies cuDNN's entry makes: .contiguous(fmt) of each tensor not already in it."""
    return sum(1 for t in tensors if t is not None and t.dim() == 4
               and not t.is_contiguous(memory_format=fmt))


def _convolution(args, kwargs, out) -> int:
    # aten.convolution on CUDA: cuDNN (1 launch counted; see the module docstring), the bias
    # as a separate add_ (ATen's _convolution), and the input / weight made contiguous in the
    # suggested memory format first (a copy each when they are not).
    inp, weight, bias = args[0], args[1], args[2]
    fmt = _conv_format(inp, weight)
    return 1 + (bias is not None) + _layout_copies(fmt, inp, weight)


def _convolution_backward(args, kwargs, out) -> int:
    # (grad_out, input, weight, bias_sizes, ..., output_mask): one cuDNN call per gradient
    # asked (data, filter; the bias gradient a reduction), plus layout copies as forward
    grad, inp, weight = args[0], args[1], args[2]
    mask = args[-1]
    fmt = _conv_format(inp, weight)
    return sum(bool(m) for m in mask) + _layout_copies(fmt, grad, inp, weight)


def _cat(args, kwargs, out) -> int:
    # Shape.cu cat_out_cuda (read at pytorch/pytorch main): inputs of the output's dtype, at
    # most 4-D: all contiguous in the output's memory format -> parallel_cat, 128 inputs per
    # launch; otherwise, for a contiguous-format output, the strided parallel_cat, 64 per
    # launch; otherwise (a channels_last output of non-dense inputs) one copy per input
    tensors = [t for t in args[0] if t.numel() > 0]
    if not tensors:
        return 0
    if len(args[0]) > 1 and out.dim() <= 4 and all(t.dtype == out.dtype for t in tensors):
        fmt = _memory_format_of(out)
        if all(t.is_contiguous(memory_format=fmt) for t in tensors):
            return -(-len(tensors) // 128)
        if fmt == torch.contiguous_format:
            return -(-len(tensors) // 64)
    return len(tensors)


def _batch_norm_native(args, kwargs, out) -> int:
    # Normalization.cuh (native_batch_norm on CUDA): eval 1 elementwise pass; training the
    # statistics reduction, the running-statistics update (when tracked) and the pass
    training = args[5]
    if not training:
        return 1
    return 2 + (args[3] is not None)


def _batch_norm_native_backward(args, kwargs, out) -> int:
    # (grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, train,
    # eps, output_mask): training: the reduction (dgamma, dbeta, the sums) and the input
    # gradient pass; eval: the input gradient pass (+ a reduction for dgamma / dbeta)
    train, mask = args[7], args[9]
    if train:
        return 1 + bool(mask[0])
    return bool(mask[0]) + bool(mask[1] or mask[2])


def _fused_adam(args, kwargs, out) -> int:
    # _fused_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, ...):
    # multi_tensor_apply_for_fused_optimizer at depth 4 (5 with amsgrad)
    params, max_sq = args[0], args[4]
    depth = 5 if len(max_sq) else 4
    return multi_tensor_launches([p.numel() for p in params], depth)


def _foreach(depth_extra: int, scalar_list: bool = False):
    """A _foreach_* op: depth = its tensor lists (+1 for an out-of-place result); the fast
    path (one multi_tensor_apply) assumed: dense tensors of one dtype on one device, as the
    optimizers' grouped lists are."""
    def rule(args, kwargs, out) -> int:
        lists = [a for a in args if isinstance(a, (list, tuple)) and a
                 and isinstance(a[0], torch.Tensor)]
        depth = len(lists) + depth_extra
        return multi_tensor_launches([t.numel() for t in lists[0]], depth, scalar_list)
    return rule


# 0 launches: views, metadata, allocation (the caching allocator launches nothing).
ZERO_LAUNCH = {
    "aten.view.default", "aten._unsafe_view.default", "aten.permute.default",
    "aten.transpose.int", "aten.t.default", "aten.expand.default", "aten.slice.Tensor",
    "aten.select.int", "aten.split.Tensor", "aten.split_with_sizes.default",
    "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default",
    "aten.as_strided.default", "aten.as_strided_.default", "aten.alias.default",
    "aten.detach.default",
    "aten.detach_.default", "aten.unbind.int", "aten.narrow.default",
    "aten.empty.memory_format", "aten.empty_like.default", "aten.empty_strided.default",
    "aten.new_empty.default", "aten.new_empty_strided.default", "aten.lift_fresh.default",
    "aten.set_.source_Tensor", "aten.resize_.default",
    "prim.device.default", "aten.sym_size.int", "aten.sym_stride.int", "aten.sym_numel.default",
    "aten.is_contiguous.default", "aten.is_contiguous.memory_format",
    "aten._has_compatible_shallow_copy_type.default", "aten.is_same_size.default",
    # profiler ranges (optimizer.step / zero_grad record_function): host-side only
    "profiler._record_function_enter_new.default", "profiler._record_function_exit._RecordFunction",
}

# 1 launch: one elementwise / reduction / copy / fill / GEMM kernel per call (an op on an
# empty tensor, or with no CUDA tensor at all, launches nothing: see launches_of).
ONE_LAUNCH = {
    # elementwise (TensorIterator: one kernel, any strides)
    "aten.add.Tensor", "aten.add_.Tensor", "aten.add.Scalar", "aten.add_.Scalar",
    "aten.sub.Tensor", "aten.sub_.Tensor", "aten.rsub.Scalar", "aten.rsub.Tensor",
    "aten.mul.Tensor", "aten.mul_.Tensor", "aten.mul.Scalar", "aten.mul_.Scalar",
    "aten.div.Tensor", "aten.div_.Tensor", "aten.div.Scalar", "aten.div_.Scalar",
    "aten.neg.default", "aten.reciprocal.default", "aten.rsqrt.default", "aten.sqrt.default",
    "aten.exp.default", "aten.pow.Tensor_Scalar", "aten.pow.Tensor_Tensor",
    "aten.addcmul.default", "aten.addcmul_.default", "aten.addcdiv.default",
    "aten.addcdiv_.default", "aten.lerp_.Scalar", "aten.clamp.default", "aten.clamp_.default",
    "aten.clamp_min.default", "aten.clamp_min_.default", "aten.where.self",
    "aten.logical_and.default", "aten.bitwise_and.Scalar", "aten.gt.Scalar", "aten.lt.Scalar", "aten.ge.Scalar",
    "aten.le.Scalar", "aten.masked_fill.Scalar", "aten.masked_fill_.Scalar",
    "aten.relu.default", "aten.relu_.default", "aten.sigmoid.default", "aten.sigmoid_.default",
    "aten.tanh.default", "aten.hardtanh.default", "aten.hardtanh_.default",
    "aten.hardswish.default", "aten.hardsigmoid.default", "aten.leaky_relu.default",
    "aten.leaky_relu_.default", "aten.threshold_backward.default",
    "aten.sigmoid_backward.default", "aten.tanh_backward.default",
    "aten.hardtanh_backward.default", "aten.leaky_relu_backward.default",
    "aten.hardswish_backward.default", "aten.native_dropout.default",
    "aten.native_dropout_backward.default",
    # copies, casts, fills
    "aten.copy_.default", "aten._to_copy.default", "aten.clone.default",
    "aten.zeros.default", "aten.zeros_like.default", "aten.ones.default",
    "aten.ones_like.default", "aten.new_zeros.default", "aten.new_ones.default",
    "aten.full.default", "aten.full_like.default", "aten.new_full.default",
    "aten.fill_.Scalar", "aten.zero_.default", "aten.scalar_tensor.default",
    # reductions (one reduce kernel, global-memory combine included)
    "aten.sum.dim_IntList", "aten.sum.default", "aten.mean.dim", "aten.mean.default",
    "aten.var_mean.correction", "aten.var.correction", "aten.amax.default",
    # GEMMs (cuBLAS / cuBLASLt; see the module docstring on split-K and bias copies)
    "aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default",
    "aten._addmm_activation.default",  # cuBLASLt with the bias + ReLU epilogue
    # resampling
    "aten.upsample_nearest2d.default", "aten.upsample_nearest2d.vec",
    "aten.upsample_nearest2d_backward.default",
    # cuDNN batch norm: one cuDNN call each (cudnnBatchNormalizationForward{Inference,
    # Training}Ex / Backward), counted as one kernel
    "aten.cudnn_batch_norm.default", "aten.cudnn_batch_norm_backward.default",
    # CPU-side random seed drawn as a tensor (counted 0 by the CPU rule; listed so it is known)
    "aten.randint.low", "aten.randint.default",
}

# Rules: launches as a function of (args, kwargs, output).
RULES = {
    "aten.convolution.default": _convolution,
    "aten.convolution_backward.default": _convolution_backward,
    "aten.cat.default": _cat,
    "aten.native_batch_norm.default": _batch_norm_native,
    "aten._native_batch_norm_legit.default": lambda a, k, o: 2 + (a[3] is not None),
    "aten._native_batch_norm_legit_no_training.default": lambda a, k, o: 1,
    "aten.native_batch_norm_backward.default": _batch_norm_native_backward,
    # slice_backward / select_backward: a zero-filled gradient and a copy into the slice
    "aten.slice_backward.default": lambda a, k, o: 2,
    "aten.select_backward.default": lambda a, k, o: 2,
    "aten._fused_adam_.default": _fused_adam,
    "aten._fused_adamw_.default": _fused_adam,
    "aten._fused_adam_.tensor_lr": _fused_adam,
    "aten._fused_adamw_.tensor_lr": _fused_adam,
    "aten._foreach_add_.Scalar": _foreach(0),
    "aten._foreach_add_.List": _foreach(0),
    "aten._foreach_add_.ScalarList": _foreach(0, scalar_list=True),
    "aten._foreach_sub_.List": _foreach(0),
    "aten._foreach_mul_.Scalar": _foreach(0),
    "aten._foreach_zero_.default": _foreach(0),
}


_UNKNOWN: set = set()


class UnknownOpError(RuntimeError):
    """An op the launch tables do not know: add it (with its launches and why) to the table."""


def launches_of(name: str, args, kwargs, out) -> int:
    """Kernel launches of ATen op ``name`` (an overload, e.g. "aten.add.Tensor") on CUDA for
    these arguments; raises UnknownOpError for an op not in the tables."""
    if name in ZERO_LAUNCH:
        return 0
    if name not in ONE_LAUNCH and name not in RULES:
        if os.environ.get("_COUNT_LAUNCHES_COLLECT"):  # development: list them all at once
            _UNKNOWN.add(name)
            return 1
        raise UnknownOpError(f"{name}: not in count_launches' ATen tables (ZERO_LAUNCH, "
                             "ONE_LAUNCH, RULES); add it with the kernels it launches on CUDA")
    if not _on_gpu(args, kwargs, out):
        return 0  # a CPU op (the dropout seed): nothing on the GPU
    if name in RULES:
        return int(RULES[name](args, kwargs, out))
    outs = list(_tensors(out))
    if name.endswith("_.default") or name.endswith("_.Tensor") or name.endswith("_.Scalar"):
        outs = outs or [args[0]]
    if outs and all(t.numel() == 0 for t in outs):
        return 0  # TensorIterator / copy_ / fill_ return before launching on empty tensors
    return 1


# --------------------------------------------------------------------------- native launchers
# The CUDA host functions of csrc/cuda/*.cu, mirrored: each runs, on the fake tensors and
# under the counter, the ATen calls its host code makes (attributed to the op as its glue),
# and returns the number of its own <<<...>>> launches. Cases assumed are the ones SAFFNet
# passes; they are decided from the actual arguments where the host code decides on them.

def _acc(dtype):  # at::acc_type<scalar_t, true>: float for half / bfloat16 / float
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dense(x):  # layout.h dense_nchw_or_nhwc: a copy unless NCHW- or NHWC-dense
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _dense_local(local):  # layout.h dense_local_logit
    if (local.stride(3) == 1 and local.stride(2) == local.size(3)) or local.is_contiguous(
            memory_format=torch.channels_last):
        return local
    return local.contiguous()


def _acc_weights(acc, *ts):  # w.to(acc_dtype).contiguous(): a cast for 16-bit weights
    return [None if t is None else t.to(acc).contiguous() for t in ts]


def _zeros(acc, like, *shapes):  # at::zeros: a fill each
    return [torch.zeros(s, dtype=acc, device=like.device) for s in shapes]


def _coord_pool(x):
    # coord_pool_kernel.cu coord_pool_cuda: two empties, coord_pool_forward_kernel (strided x)
    return 1


def _coord_pool_backward(grad_h, grad_w):
    # an empty, coord_pool_backward_kernel; nothing for an empty gradient
    n, c, h = grad_h.shape
    return 1 if n * c * h * grad_w.shape[2] else 0


def _coord_scale(x, a_h, a_w, out=None):
    # coord_scale_kernel.cu: dense_nchw_or_nhwc(x), empty, coord_scale_forward_kernel
    _dense(x)
    return 1


def _coord_scale_backward(grad, x, a_h, a_w):
    _dense(x)
    return 1  # coord_scale_backward_kernel


def _aff_input(x, a_h, a_w):
    # aff_input_kernel.cu: the coord_scale kernel with offset 1 into a channel-major t, then
    # t.sum({2, 3}) (an ATen reduction: the plane sums)
    x = _dense(x)
    t = torch.empty((x.shape[1], x.shape[0], *x.shape[2:]), dtype=x.dtype,
                    device=x.device).permute(1, 0, 2, 3)
    t.sum((2, 3))
    return 1


def _aff_input_backward(grad_t, grad_sum, x, a_h, a_w):
    if grad_sum is not None:
        grad_sum.contiguous()
    _dense(x)
    return 1


def _aff_fuse(x, a_h, a_w, logit, w1, b1, w2, b2, out=None):
    # aff_fuse_kernel.cu: dense x, the four weights cast to acc_t (casts in fp16 / bf16),
    # aff_fuse_forward_kernel
    x = _dense(x)
    _acc_weights(_acc(x.dtype), w1, b1, w2, b2)
    return 1


def _aff_fuse_backward(grad, x, a_h, a_w, logit, w1, b1, w2, b2):
    # weights to acc_t, seven zero-filled acc_t accumulators, aff_fuse_backward_kernel, then
    # each accumulator cast to x's dtype (a cast in fp16 / bf16, nothing in fp32)
    x = _dense(x)
    acc = _acc(x.dtype)
    _acc_weights(acc, w1, b1, w2, b2)
    n, c, h, w = x.shape
    ci = w1.shape[0]
    grads = _zeros(acc, x, (n, c, h), (n, c, w), (n, c), (ci, c), (ci,), (c, ci), (c,))
    for g in grads:
        g.to(x.dtype)
    return 1


def _aff_pair(x, residual, logit, w1, b1, w2, b2):
    x = _dense(x)
    _dense(residual)
    _acc_weights(_acc(x.dtype), w1, b1, w2, b2)
    return 1


def _aff_pair_backward(grad, x, residual, logit, w1, b1, w2, b2):
    x = _dense(x)
    _dense(residual)
    acc = _acc(x.dtype)
    _acc_weights(acc, w1, b1, w2, b2)
    n, c = x.shape[:2]
    ci = w1.shape[0]
    for g in _zeros(acc, x, (n, c), (ci, c), (ci,), (c, ci), (c,)):
        g.to(x.dtype)
    return 1


def _aff_moments(x, a_h, a_w, w1, b1, w2, b2):
    # aff_moments_kernel.cu: zero-filled float64 sums, weights to acc_t,
    # aff_moments_forward_kernel + aff_moments_finish_kernel
    x = _dense(x)
    co = x.shape[1] if w2 is not None else w1.shape[0]
    torch.zeros((2, co), dtype=torch.float64, device=x.device)
    _acc_weights(_acc(x.dtype), w1, b1, w2, b2)
    return 2


def _aff_moments_backward(grad_mean, grad_var, x, a_h, a_w, w1, b1, w2, b2, mean):
    x = _dense(x)
    acc = _acc(x.dtype)
    _acc_weights(acc, w1, b1, w2, b2, grad_mean, grad_var, mean)
    n, c, h, w = x.shape
    ci = w1.shape[0]
    shapes = [(n, c, h), (n, c, w), (ci, c), (ci,)]
    grads = _zeros(acc, x, *shapes)
    if w2 is not None:
        grads += _zeros(acc, x, (c, ci), (c,))
    for g in grads:
        g.to(x.dtype)
    return 1


def _aff_combine(x, a_h, a_w, local, glob):
    _dense(x)
    _dense_local(local)
    return 1


def _aff_combine_backward(grad, x, a_h, a_w, local, glob):
    _dense(x)
    _dense_local(local)
    return 1


def _aff_pair_combine(x, residual, local, glob):
    _dense(x)
    _dense(residual)
    _dense_local(local)
    return 1


def _aff_pair_combine_backward(grad, x, residual, local, glob):
    return _aff_pair_combine(x, residual, local, glob)


def _pooled_linear(y, weight, bias, bn_weight, bn_bias, batch_norm, eps, act):
    # pooled_linear.cpp: the CUDA kernel *is* this composite of ATen calls (no kernel of its
    # own): addmm / mm, cast to the opmath dtype, BN on the batch statistics, activation
    acc = torch.float32 if y.dtype in (torch.float16, torch.bfloat16) else y.dtype
    z = torch.addmm(bias, y, weight.t()) if bias is not None else torch.mm(y, weight.t())
    z = z.to(acc)
    if batch_norm:
        var, mean = torch.var_mean(z, 0, correction=0)
        pre = (z - mean) * torch.rsqrt(var + eps)
        if bn_weight is not None:
            pre = pre * bn_weight.to(acc)
        if bn_bias is not None:
            pre = pre + bn_bias.to(acc)
    else:
        pre = z
    _pooled_act(pre, act).to(y.dtype)
    return 0


def _pooled_act(pre, act):
    if act == 1:
        return torch.relu(pre)
    if act == 2:  # the reference's HSwish: x·hardtanh(x + 3, 0, 6)/6
        return pre * F.hardtanh(pre + 3.0, 0.0, 6.0) / 6.0
    if act == 3:
        return torch.sigmoid(pre)
    return pre


def _pooled_linear_backward(grad_out, y, weight, bias, bn_weight, bn_bias, batch_norm, eps,
                            act, out, normalised, var):
    acc = torch.float32 if y.dtype in (torch.float16, torch.bfloat16) else y.dtype
    g = grad_out.to(acc)
    gamma = bn_weight.to(acc) if bn_weight is not None else None
    if act == 1:
        g_pre = torch.ops.aten.threshold_backward(g, out.to(acc), 0)
    elif act == 3:
        g_pre = torch.ops.aten.sigmoid_backward(g, out.to(acc))
    elif act == 2:
        p = normalised
        if batch_norm:
            p = normalised * gamma if gamma is not None else normalised
            p = p + bn_bias.to(acc) if bn_bias is not None else p
        inside = torch.logical_and(p > -3.0, p < 3.0)
        g_pre = g * (F.hardtanh(p + 3.0, 0.0, 6.0) + p * inside) / 6.0
    else:
        g_pre = g
    if batch_norm:
        g_pre.sum(0)
        (g_pre * normalised).sum(0).to(y.dtype)
        g_norm = g_pre * gamma if gamma is not None else g_pre
        g_z = torch.rsqrt(var + eps) * (g_norm - g_norm.mean(0)
                                        - normalised * (g_norm * normalised).mean(0))
        g_pre.sum(0).to(y.dtype)
    else:
        g_z = g_pre
    g_z = g_z.to(y.dtype)
    torch.mm(g_z, weight)
    torch.mm(g_z.t(), y)
    g_z.sum(0)
    return 0


# split_resplice: the plan of csrc/common/split_resplice.h and the tile choice of
# split_resplice_checks.h (kSrAutoTiles, kSrAutoTileBudgetBytes; an H100 block may use
# 227 KB of shared memory).
SR_TILE_MAX_STEPS = 15
SR_AUTO_TILES = ((16, 16), (8, 16), (8, 8))
SR_AUTO_TILE_BUDGET = 64 * 1024
SHARED_LIMIT_H100 = 227 * 1024


def _sr_plan(c: int, widths):
    steps = len(widths)
    w0 = c // (steps + 1)
    plan, out_offset = [], w0
    for j, width in enumerate(widths):
        keep = width if j == steps - 1 else (width + 1) // 2
        plan.append(dict(width=width, x_offset=(j + 1) * w0, keep=keep, out_offset=out_offset))
        out_offset += keep
    return w0, plan


def _sr_auto_tile(c: int, widths, acc_bytes: int):
    """split_resplice_tiled's automatic tile, or None when none fits (the per-step kernels)."""
    if len(widths) > SR_TILE_MAX_STEPS:
        return None
    steps = len(widths)
    for th, tw in SR_AUTO_TILES:
        buffer = 0
        for j, width in enumerate(widths[:-1]):
            halo = steps - 1 - j
            buffer = max(buffer, (width // 2) * (th + 2 * halo) * (tw + 2 * halo))
        if 2 * buffer * acc_bytes <= min(SHARED_LIMIT_H100, SR_AUTO_TILE_BUDGET):
            return th, tw
    return None


def _sr_pack(x, weights, biases):
    # setup_split_resplice_tiled: every weight and bias cast to acc_t (a cast each in fp16 /
    # bf16, nothing in fp32) and packed with one cat
    acc = _acc(x.dtype)
    flat = []
    for w, b in zip(weights, biases):
        flat += [w.to(acc).reshape(-1), b.to(acc).reshape(-1)]
    torch.cat(flat).contiguous()


def _sr_launches(x, weights, biases) -> int:
    """split_resplice_out_cuda on a contiguous x: the tiled kernel (one launch per 65535
    images) when a tile fits, else the slice-0 copy and one step kernel per step."""
    widths = [int(w.shape[0]) for w in weights]
    acc = _acc(x.dtype)
    if _sr_auto_tile(x.shape[1], widths, torch.empty((), dtype=acc).element_size()):
        _sr_pack(x, weights, biases)
        return -(-x.shape[0] // 65535)
    w0 = x.shape[1] // (len(widths) + 1)
    out = torch.empty_like(x)
    out.narrow(1, 0, w0).copy_(x.narrow(1, 0, w0))
    for w, b in zip(weights, biases):
        _acc_weights(acc, w, b)
    return len(widths)


def _split_resplice(x, weights, biases, slope, out=None, carries=None):
    # split_resplice_kernel.cu: x.contiguous() (a copy for a channels_last x), then as above
    return _sr_launches(x.contiguous(), weights, biases)


def _split_resplice_tiled(x, weights, biases, slope, tile_h=0, tile_w=0, write_carries=True):
    # split_resplice_tiled_cuda: the setup (casts + cat) on x as given, then x.contiguous()
    widths = [int(w.shape[0]) for w in weights]
    acc_bytes = torch.empty((), dtype=_acc(x.dtype)).element_size()
    if (tile_h, tile_w) == (0, 0) and not _sr_auto_tile(x.shape[1], widths, acc_bytes):
        return _split_resplice(x, weights, biases, slope)  # split_resplice_untiled
    _sr_pack(x, weights, biases)
    x.contiguous()
    return -(-x.shape[0] // 65535)


def _split_resplice_train(x, weights, gammas, betas, eps, slope, p, seed):
    # split_resplice_train.h (CudaKernels of split_resplice_train_kernel.cu): per step a cuDNN
    # 3x3 convolution (ATen), channel_moments_kernel, the next step's input slice copied
    # (ATen copy_), bn_act_dropout_apply_kernel; the slice-0 copy first. The seed is read on
    # the host (seed.item(): a CPU tensor here, no device sync).
    x = x.contiguous()
    widths = [int(w.shape[0]) for w in weights]
    w0, plan = _sr_plan(x.shape[1], widths)
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    out.narrow(1, 0, w0).copy_(x.narrow(1, 0, w0))
    inp = x.narrow(1, plan[0]["x_offset"], w0)
    for j, step in enumerate(plan):
        F.conv2d(inp, weights[j], None, 1, 1).contiguous()
        if j + 1 < len(plan):
            nxt = torch.empty((n, widths[j + 1], h, w), dtype=x.dtype, device=x.device)
            nxt.narrow(1, 0, w0).copy_(x.narrow(1, plan[j + 1]["x_offset"], w0))
            inp = nxt
        gammas[j].contiguous()
        betas[j].contiguous()
    return 2 * len(plan)


def _split_resplice_train_backward(grad_out, x, weights, gammas, betas, pre, inputs, mean, var,
                                   eps, slope, p, seed):
    # per step (last first): bn_act_dropout_backward_kernel, then ATen's convolution_backward
    # (input and weight gradients), the input gradient made contiguous and its slice copied
    x = x.contiguous()
    grad_out = grad_out.contiguous()
    widths = [int(w.shape[0]) for w in weights]
    w0, plan = _sr_plan(x.shape[1], widths)
    grad_x = torch.empty_like(x)
    grad_x.narrow(1, 0, w0).copy_(grad_out.narrow(1, 0, w0))
    for j in reversed(range(len(plan))):
        pre[j].contiguous()
        gammas[j].contiguous()
        betas[j].contiguous()
        grad_v = torch.empty_like(pre[j], memory_format=torch.contiguous_format)
        inp = x.narrow(1, plan[j]["x_offset"], w0) if j == 0 else inputs[j - 1]
        gi, _, _ = torch.ops.aten.convolution_backward(
            grad_v, inp, weights[j], None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
            [True, True, False])
        gi = gi.contiguous()
        grad_x.narrow(1, plan[j]["x_offset"], w0).copy_(gi.narrow(1, 0, w0))
    return len(plan)


# op name -> (mirror, the files its host code was read from)
NATIVE_LAUNCHERS = {
    "coord_pool": (_coord_pool, ["csrc/cuda/coord_pool_kernel.cu"]),
    "coord_pool_out": (_coord_pool, ["csrc/cuda/coord_pool_kernel.cu"]),
    "coord_pool_backward": (_coord_pool_backward, ["csrc/cuda/coord_pool_kernel.cu"]),
    "coord_scale": (_coord_scale, ["csrc/cuda/coord_scale_kernel.cu"]),
    "coord_scale_out": (_coord_scale, ["csrc/cuda/coord_scale_kernel.cu"]),
    "coord_scale_backward": (_coord_scale_backward, ["csrc/cuda/coord_scale_kernel.cu"]),
    "aff_input": (_aff_input, ["csrc/cuda/aff_input_kernel.cu", "csrc/cuda/coord_scale_kernel.cu"]),
    "aff_input_backward": (_aff_input_backward,
                           ["csrc/cuda/aff_input_kernel.cu", "csrc/cuda/coord_scale_kernel.cu"]),
    "aff_fuse": (_aff_fuse, ["csrc/cuda/aff_fuse_kernel.cu"]),
    "aff_fuse_out": (_aff_fuse, ["csrc/cuda/aff_fuse_kernel.cu"]),
    "aff_fuse_backward": (_aff_fuse_backward, ["csrc/cuda/aff_fuse_kernel.cu"]),
    "aff_pair": (_aff_pair, ["csrc/cuda/aff_pair_kernel.cu"]),
    "aff_pair_backward": (_aff_pair_backward, ["csrc/cuda/aff_pair_kernel.cu"]),
    "aff_moments": (_aff_moments, ["csrc/cuda/aff_moments_kernel.cu"]),
    "aff_moments_backward": (_aff_moments_backward, ["csrc/cuda/aff_moments_kernel.cu"]),
    "aff_combine": (_aff_combine, ["csrc/cuda/aff_combine_kernel.cu"]),
    "aff_combine_backward": (_aff_combine_backward, ["csrc/cuda/aff_combine_kernel.cu"]),
    "aff_pair_combine": (_aff_pair_combine, ["csrc/cuda/aff_pair_combine_kernel.cu"]),
    "aff_pair_combine_backward": (_aff_pair_combine_backward,
                                  ["csrc/cuda/aff_pair_combine_kernel.cu"]),
    "pooled_linear": (_pooled_linear, ["csrc/pooled_linear.cpp"]),
    "pooled_linear_backward": (_pooled_linear_backward, ["csrc/pooled_linear.cpp"]),
    "split_resplice": (_split_resplice, ["csrc/cuda/split_resplice_kernel.cu",
                                         "csrc/common/split_resplice_checks.h"]),
    "split_resplice_out": (_split_resplice, ["csrc/cuda/split_resplice_kernel.cu",
                                             "csrc/common/split_resplice_checks.h"]),
    "split_resplice_tiled": (_split_resplice_tiled, ["csrc/cuda/split_resplice_kernel.cu",
                                                     "csrc/common/split_resplice_checks.h",
                                                     "csrc/common/split_resplice_tile.h"]),
    "split_resplice_train": (_split_resplice_train, ["csrc/common/split_resplice_train.h",
                                                     "csrc/cuda/split_resplice_train_kernel.cu"]),
    "split_resplice_train_backward": (_split_resplice_train_backward,
                                      ["csrc/common/split_resplice_train.h",
                                       "csrc/cuda/split_resplice_train_kernel.cu"]),
}

# Fingerprints of the launch-relevant tokens of each file above (comments stripped): kernel
# launches, ATen calls, copies and casts. Written with the mirrors; a file whose fingerprint
# differs has changed in a way that may change its launches: re-read it, update the mirror,
# then `--print-fingerprints` gives the new values.
LAUNCHER_FINGERPRINTS = {  # mirrors read against these sources on 2026-12-07
    "csrc/common/split_resplice_checks.h": "dd5c6da5ae7a",
    "csrc/common/split_resplice_tile.h": "edfabe2f69cf",
    "csrc/common/split_resplice_train.h": "2bbe45c46503",
    "csrc/cuda/aff_combine_kernel.cu": "07125d7a6793",
    "csrc/cuda/aff_fuse_kernel.cu": "c15ca2cdc20e",
    "csrc/cuda/aff_input_kernel.cu": "db501901d874",
    "csrc/cuda/aff_moments_kernel.cu": "c7d76d7fc8ef",
    "csrc/cuda/aff_pair_combine_kernel.cu": "b024193bface",
    "csrc/cuda/aff_pair_kernel.cu": "cfc6360d98b6",
    "csrc/cuda/coord_pool_kernel.cu": "69f6c8151278",
    "csrc/cuda/coord_scale_kernel.cu": "547a5e1a9fb7",
    "csrc/cuda/split_resplice_kernel.cu": "657a2e0b8690",
    "csrc/cuda/split_resplice_train_kernel.cu": "d4f47d802fe0",
    "csrc/pooled_linear.cpp": "3eee3a04ae50",
}

_TOKEN = re.compile(r"<<<|at::\w+|\.contiguous\(|\.to\(|\.copy_\(|\.narrow\(|\.sum\(|"
                    r"\bfor \(|\bif \(|Kernels::\w+|\w+_kernel\b")


def launcher_fingerprint(path: str) -> str:
    text = (ROOT / path).read_text()
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    tokens = _TOKEN.findall(text)
    return hashlib.sha256(" ".join(tokens).encode()).hexdigest()[:12]


def stale_launchers() -> list[str]:
    files = sorted({f for _, fs in NATIVE_LAUNCHERS.values() for f in fs})
    return [f for f in files if LAUNCHER_FINGERPRINTS.get(f) != launcher_fingerprint(f)]


# --------------------------------------------------------------------------- the counter
_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd


class LaunchCounter(TorchDispatchMode):
    """Counts CUDA kernel launches of everything dispatched under it (see the module
    docstring). ``records``: (scope, op) -> [calls, launches]; scope is "aten" for ops the
    model issues itself, "fused" for a custom op's own kernels and the ATen calls inside
    it (its host glue). ``fused_calls``: custom op -> calls."""

    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.records = collections.defaultdict(lambda: [0, 0])
        self.fused_calls = collections.Counter()
        self._scope = []

    def _add(self, op: str, launches: int, fused: bool | None = None):
        scope = "fused" if (self._scope if fused is None else fused) else "aten"
        rec = self.records[(scope, op)]
        rec[0] += 1
        rec[1] += launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if isinstance(func, torch._ops.HigherOrderOperator):
            if func.name() in ("triton_kernel_wrapper_mutation", "triton_kernel_wrapper_functional"):
                self._add(f"triton:{self._scope[-1] if self._scope else '?'}", 1)
                return func(*args, **kwargs)
            raise UnknownOpError(f"higher-order op {func.name()}: not counted by count_launches")
        namespace = name.split(".", 1)[0]
        if namespace == "saffnet_fast":
            op = func._schema.name.split("::", 1)[1]
            if op not in NATIVE_LAUNCHERS:
                raise UnknownOpError(f"{name}: no entry in NATIVE_LAUNCHERS")
            out = func(*args, **kwargs)  # the fake kernel: the outputs
            self.fused_calls[f"saffnet_fast::{op}"] += 1
            self._scope.append(op)
            try:
                with self:
                    own = NATIVE_LAUNCHERS[op][0](*args, **kwargs)
            finally:
                self._scope.pop()
            self._add(f"native:{op}", own, fused=True)
            return out
        if namespace == "saffnet_fast_triton":
            from torch._library.custom_ops import OPDEFS
            qualname = func._schema.name
            self.fused_calls[qualname] += 1
            body = OPDEFS[qualname]._abstract_fn  # triton_op registers its body as the fake
            self._scope.append(qualname.split("::", 1)[1])
            try:
                with self:
                    return body(*args, **kwargs)
            finally:
                self._scope.pop()
        # Inside a custom op (the mirrors, the Triton bodies) calls arrive below autograd,
        # before their CompositeImplicitAutograd decomposition (at the model level that
        # happened above this mode): decompose them as the C++ / eager call would, so
        # x.to(x.dtype) or .contiguous() of a contiguous tensor stay free.
        # (The C++ composite, as eager runs it: func.decompose() would prefer torch._decomp's
        # Python decompositions, which eager does not use.)
        if (namespace == "aten" and name not in ZERO_LAUNCH
                and torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _COMPOSITE)):
            with self:
                return func._op_dk(_COMPOSITE, *args, **kwargs)
        out = func(*args, **kwargs)
        self._add(name, launches_of(name, args, kwargs, out))
        return out

    # ---- summaries
    def total(self, scope: str | None = None) -> int:
        return sum(v[1] for (s, _), v in self.records.items() if scope is None or s == scope)

    def zero_launch_ops(self) -> int:
        return sum(v[0] for (s, _), v in self.records.items() if s == "aten" and v[1] == 0)

    def top(self, scope: str = "aten", k: int = 10):
        rows = [(op, v[1], v[0]) for (s, op), v in self.records.items() if s == scope and v[1]]
        return sorted(rows, key=lambda r: (-r[1], r[0]))[:k]


# --------------------------------------------------------------------------- fake CUDA build
@contextlib.contextmanager
def fake_cuda_build():
    """saffnet_fast and torch.autocast believe they run on a CUDA build with a device: the
    one function saffnet_fast.backend reads for the native kernels
    (native_build_info()["with_cuda"]), torch.cuda.is_available (Triton's check, autocast's)
    and torch.cuda.is_bf16_supported (autocast bfloat16). Restored on exit."""
    if _FAKE_CUDA_ERROR:
        raise RuntimeError(_FAKE_CUDA_ERROR)
    saved = (_backend.native_build_info, torch.cuda.is_available, torch.cuda.is_bf16_supported,
             torch.nn.Module._apply)
    _backend.native_build_info = lambda: {**native_build_info(), "with_cuda": True}
    torch.cuda.is_available = lambda: True
    torch.cuda.is_bf16_supported = lambda *a, **k: True
    torch.nn.Module._apply = _fake_aware_apply
    try:
        yield
    finally:
        (_backend.native_build_info, torch.cuda.is_available, torch.cuda.is_bf16_supported,
         torch.nn.Module._apply) = saved


_ORIGINAL_APPLY = torch.nn.Module._apply


def _fake_aware_apply(self, fn, recurse=True):
    """nn.Module._apply for a model whose tensors are already fake (model.to(dtype),
    .to(memory_format=...), inside optimize_for_inference too): torch swaps a FakeTensor
    parameter in place (torch.utils.swap_tensors), which refuses tensors the fake mode holds
    weak references to; the converted tensor replaces the parameter object instead. Only how
    the fake model stores its converted tensors differs: no op of the counted forward."""
    own = [t for t in (*self._parameters.values(), *self._buffers.values()) if t is not None]
    from torch._subclasses.fake_tensor import FakeTensor
    if not any(isinstance(t, FakeTensor) for t in own):
        return _ORIGINAL_APPLY(self, fn, recurse)
    if recurse:
        for child in self.children():
            child._apply(fn)
    for key, param in self._parameters.items():
        if param is not None:
            with torch.no_grad():
                applied = fn(param)
            self._parameters[key] = torch.nn.Parameter(applied,
                                                       requires_grad=param.requires_grad)
    for key, buf in self._buffers.items():
        if buf is not None:
            self._buffers[key] = fn(buf)
    return self


def to_fake_cuda(module: torch.nn.Module, dtype: torch.dtype | None = None,
                 channels_last: bool = False) -> torch.nn.Module:
    """``module`` (real CPU tensors) with every parameter and buffer a fake CUDA tensor of the
    same shape, floating tensors in ``dtype`` when given, 4-D ones channels_last when asked
    (call under the FakeTensorMode). One pass: converting a fake model again is slow."""
    def convert(t):
        dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if channels_last and t.dim() == 4:
            fake = torch.empty(t.shape, dtype=dt, device="cuda",
                               memory_format=torch.channels_last)
        else:
            fake = torch.empty_strided(t.shape, t.stride(), dtype=dt, device="cuda")
        return fake
    return module._apply(convert)


def selection(model: torch.nn.Module, inputs: dict, context=contextlib.nullcontext) -> dict:
    """For each fast block (its class): the backend select_implementation picks for the
    block's recorded input, in ``context`` (autocast for a training step: the input then as
    run_op hands it to the kernels, in the parameters' dtype); {class: {backend: count}}."""
    out: dict = {}
    for module in model.modules():
        if type(module) not in REFERENCE_FROM_FAST or module not in inputs:
            continue
        with context():
            x = inputs[module]
            x = x.to(_dispatch._kernel_dtype(module, x))
            name, _ = _dispatch.select_implementation(module._op, module.backend, module, x)
        row = out.setdefault(type(module).__name__, {})
        row[name] = row.get(name, 0) + 1
    return out


def _record_fast_inputs(model):
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda m, a: inputs.__setitem__(m, a[0]))
               for m in model.modules() if type(m) in REFERENCE_FROM_FAST]
    return inputs, handles


# --------------------------------------------------------------------------- providers
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

PROVIDERS = {
    "eager": dict(model="saffnet", backend="reference", channels_last=False),
    "eager_cl": dict(model="saffnet", backend="reference", channels_last=True),
    "fast_native": dict(model="saffnet", backend="native", channels_last=False),
    "fast_triton": dict(model="saffnet", backend="triton", channels_last=False),
    "optimized": dict(model="saffnet", backend="reference", channels_last=True, optimize=True,
                      inference_only=True),
    "hrnet_w32": dict(model="hrnet_w32", backend="reference", channels_last=False),
}

# spec/gpu.md §2, a static reading of the code at 5b79a7f (what this script replaces)
STATIC_ESTIMATES = {
    "inference": {"eager": 1590, "fast_native": {"float32": 980, "float16": 1150},
                  "hrnet_w32": 1035},
    "training": {},
}
# issue #21: at most 300 kernel launches per inference forward of the optimized fast model
TARGETS = {"inference": {"optimized": 300}, "training": {}}


def _static_estimate(mode: str, provider: str, dtype: str):
    est = STATIC_ESTIMATES[mode].get(provider)
    return est.get(dtype) if isinstance(est, dict) else est


def _build_cpu(spec: dict, training: bool) -> torch.nn.Module:
    """The provider's model on the CPU (real initialisation: a model built under the fake
    mode has fake CPU parameters that cannot be swapped for fake CUDA ones)."""
    from saffnet_fast.models import build_model
    torch.manual_seed(0)
    backend = None if spec["backend"] == "reference" else spec["backend"]
    return build_model(spec["model"], backend=backend).train(training)


def _to_device_model(spec: dict, model, dtype: torch.dtype, training: bool):
    """The CPU model as the provider runs it on CUDA, in fake CUDA tensors (call under
    FakeTensorMode and fake_cuda_build). Training keeps float32 parameters (AMP)."""
    if spec.get("optimize"):
        from saffnet_fast.fast.convert import optimize_for_inference
        kwargs = dict(backend="auto", channels_last=spec["channels_last"])
        has_dtype = "dtype" in inspect.signature(optimize_for_inference).parameters
        if has_dtype:
            kwargs["dtype"] = dtype
        model = optimize_for_inference(to_fake_cuda(model), **kwargs)
        if not has_dtype and dtype != torch.float32:
            # optimize first, then cast: optimize_for_inference decides which fused blocks
            # keep their BN modules (those the native kernels serve) with a float32 probe
            # input, so on a float16 model it folds them all and auto then serves them with
            # Triton (native refuses folded BNs); the dtype= argument is meant to do this
            model = model.to(dtype)
            kwargs["cast_after"] = dtype
        return model, kwargs
    return to_fake_cuda(model, None if training else dtype, spec["channels_last"]), None


def count_inference(provider: str, input_hw, batch: int, dtype: str) -> dict:
    spec = PROVIDERS[provider]
    dt = DTYPES[dtype]
    cpu_model = _build_cpu(spec, training=False)
    with fake_cuda_build(), FakeTensorMode():
        model, opt_kwargs = _to_device_model(spec, cpu_model, dt, training=False)
        x = torch.empty((batch, 3, *input_hw), dtype=dt, device="cuda")
        if spec["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        inputs, handles = _record_fast_inputs(model)
        if handles:
            with torch.no_grad():
                model(x)  # warm-up: the fast blocks' folded-parameter caches
        for h in handles:
            h.remove()
        with torch.no_grad():
            chosen = selection(model, inputs)
        counter = LaunchCounter()
        with torch.no_grad(), counter:
            model(x)
    return _summary(counter, chosen, opt_kwargs)


def count_training(provider: str, input_hw, batch: int, amp: str) -> dict:
    """One training step as Trainer.train_step runs it on CUDA without a CUDA graph: forward
    under autocast (``amp``), JointsMSELoss with target weights in float32, zero_grad(set_to_none),
    backward, fused Adam step. Not counted: float(loss) (a device-to-host copy and sync, no
    kernel) and, with float16 AMP, the GradScaler (bfloat16 is the H100 default)."""
    from saffnet_fast.engine.loss import JointsMSELoss
    spec = PROVIDERS[provider]
    joints, hh, ww = 17, input_hw[0] // 4, input_hw[1] // 4
    cpu_model = _build_cpu(spec, training=True)
    with fake_cuda_build(), FakeTensorMode():
        model, _ = _to_device_model(spec, cpu_model, torch.float32, training=True)
        criterion = JointsMSELoss(use_target_weight=True)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
        x = torch.empty((batch, 3, *input_hw), device="cuda")
        if spec["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        target = torch.empty((batch, joints, hh, ww), device="cuda")
        weight = torch.empty((batch, joints, 1), device="cuda")
        autocast = (contextlib.nullcontext if amp == "none" else
                    functools.partial(torch.autocast, "cuda", dtype=DTYPES[amp]))
        inputs, handles = _record_fast_inputs(model)

        def step():
            with autocast():
                out = model(x)
            loss = criterion(out.float(), target, weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step()  # warm-up: Adam's state allocated
        for h in handles:
            h.remove()
        chosen = selection(model, inputs, autocast)
        counter = LaunchCounter()
        with counter:
            step()
    return _summary(counter, chosen, None)


def _summary(counter: LaunchCounter, chosen: dict, opt_kwargs) -> dict:
    out = {
        "launches": counter.total(),
        "fused_op_launches": counter.total("fused"),
        "aten_launches": counter.total("aten"),
        "zero_launch_aten_calls": counter.zero_launch_ops(),
        "fused_op_calls": dict(sorted(counter.fused_calls.items())),
        "top_aten": [dict(op=op, launches=n, calls=c) for op, n, c in counter.top("aten", 10)],
        "fused_breakdown": [dict(op=op, launches=n, calls=c)
                            for op, n, c in counter.top("fused", 50)],
        "selection": chosen,
    }
    if opt_kwargs is not None:
        out["optimize_for_inference_kwargs"] = {k: str(v) for k, v in opt_kwargs.items()}
    return out


# --------------------------------------------------------------------------- output
def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return None


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "saffnet_fast": getattr(saffnet_fast, "__version__", None)}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    return out


def format_table(result: dict) -> str:
    lines = []
    settings = result["settings"]
    for mode in ("inference", "training"):
        rows = result.get(mode) or {}
        if not rows:
            continue
        what = (f"one inference forward, {settings['dtype']}" if mode == "inference" else
                f"one training step (forward + loss + backward + fused Adam), AMP "
                f"{settings['train_amp']}")
        lines.append(f"{mode.upper()}: {what}, batch {settings['batch']}, "
                     f"{settings['input'][0]}x{settings['input'][1]}")
        header = (f"{'provider':<12} {'launches':>8} {'fused ops':>9} {'ATen':>6} "
                  f"{'0-launch':>8} {'budget':>7} {'target':>6} {'gpu.md est.':>11}")
        lines.append(header)
        lines.append("-" * len(header))
        for provider, r in rows.items():
            def cell(v):
                return "-" if v is None else str(v)
            lines.append(
                f"{provider:<12} {r['launches']:>8} {r['fused_op_launches']:>9} "
                f"{r['aten_launches']:>6} {r['zero_launch_aten_calls']:>8} "
                f"{cell(r.get('budget')):>7} {cell(r.get('target')):>6} "
                f"{cell(r.get('static_estimate')):>11}")
        lines.append("")
        for provider, r in rows.items():
            top = ", ".join(f"{t['op'].replace('aten.', '')} {t['launches']}"
                            for t in r["top_aten"])
            lines.append(f"  {provider} top ATen: {top}")
            if r["fused_op_calls"]:
                calls = ", ".join(f"{k.split('::')[1]}×{v}" for k, v in
                                  r["fused_op_calls"].items())
                lines.append(f"  {provider} fused ops: {calls}")
            if r["selection"]:
                sel = "; ".join(f"{cls}: " + ", ".join(f"{b} {n}" for b, n in row.items())
                                for cls, row in r["selection"].items())
                lines.append(f"  {provider} selected: {sel}")
        lines.append("")
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    s = result["settings"]
    md = [f"# Kernel launches per CUDA forward / training step ({result['date'][:10]})", "",
          f"`python benchmarks/count_launches.py` at commit {result['commit']}, computed on a "
          f"CPU machine (fake CUDA tensors; see the script's docstring). Batch {s['batch']}, "
          f"{s['input'][0]}×{s['input'][1]}, inference in {s['dtype']}, training with AMP "
          f"{s['train_amp']}; torch {result['versions']['torch']}.", ""]
    for mode in ("inference", "training"):
        rows = result.get(mode) or {}
        if not rows:
            continue
        md += [f"## {mode.capitalize()}", "",
               "| provider | launches | fused ops' own | ATen | budget | target | gpu.md estimate |",
               "|---|---:|---:|---:|---:|---:|---:|"]
        for p, r in rows.items():
            def cell(v):
                return "–" if v is None else str(v)
            md.append(f"| {p} | {r['launches']} | {r['fused_op_launches']} | "
                      f"{r['aten_launches']} | {cell(r.get('budget'))} | "
                      f"{cell(r.get('target'))} | {cell(r.get('static_estimate'))} |")
        md.append("")
        for p, r in rows.items():
            top = ", ".join(f"{t['op'].replace('aten.', '')} {t['launches']}"
                            for t in r["top_aten"])
            md.append(f"- **{p}** top ATen ops: {top}")
        md.append("")
    md += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(md)


NOTES = [
    "Counts are launches the CPU issues (kernels and memcpys), computed from the ops "
    "dispatched on fake CUDA tensors; nothing ran on a GPU.",
    "One cuDNN / cuBLAS call counts as one kernel (plus PyTorch's visible bias add and "
    "layout copies): cuDNN may add layout transforms or split-K reductions, cuBLAS a bias "
    "copy or a split-K reduction, so convolution and GEMM counts are lower bounds.",
    "Native ops: their CUDA host code mirrored (NATIVE_LAUNCHERS); Triton ops: their Python "
    "bodies run, one launch per wrap_triton call (autotuned kernels: one launch per call in "
    "the steady state).",
    "The optimized model is counted without cuda_graph: a graph replays the same kernels "
    "(one graph launch on the CPU side).",
    "Training: Trainer's CUDA step without a CUDA graph; float(loss) (a device-to-host copy "
    "and sync) not counted; the multi-tensor optimizer launches use the 32 KB-argument limits "
    "of CUDA >= 12.1 (--mta-4kb for the 4 KB ones).",
]


# --------------------------------------------------------------------------- budget
def load_budget(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def budget_from(result: dict, slack: float = 0.02) -> dict:
    return {
        "note": ("Regression guard for benchmarks/count_launches.py --check: each provider's "
                 "launch count when this file was written, plus 2%. Rewrite with "
                 "--update-budget when a change lowers (or knowingly raises) the counts. The "
                 "issue's target (optimized inference <= 300) is printed beside it, not "
                 "enforced."),
        "slack": slack,
        "settings": result["settings"],
        "commit": result["commit"],
        "inference": {p: math.ceil(r["launches"] * (1 + slack))
                      for p, r in (result.get("inference") or {}).items()},
        "training": {p: math.ceil(r["launches"] * (1 + slack))
                     for p, r in (result.get("training") or {}).items()},
    }


def check(result: dict, budget: dict) -> list[str]:
    failures = []
    if not budget:
        return ["no budget file (write one with --update-budget)"]
    if budget.get("settings") != result["settings"]:
        return [f"the budget was written for {budget.get('settings')}, this run used "
                f"{result['settings']}: run --check with the budget's settings"]
    for mode in ("inference", "training"):
        for provider, r in (result.get(mode) or {}).items():
            limit = budget.get(mode, {}).get(provider)
            if limit is None:
                failures.append(f"{mode} {provider}: no budget entry")
            elif r["launches"] > limit:
                failures.append(f"{mode} {provider}: {r['launches']} launches, over the "
                                f"budget of {limit}")
    return failures


# --------------------------------------------------------------------------- main
def _parse_hw(text: str):
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected HxW such as 256x192, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def run(providers, input_hw, batch, dtype, train_amp, training=True) -> dict:
    t0 = time.time()
    result = {
        "tool": "benchmarks/count_launches.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "versions": _versions(),
        "settings": {"input": list(input_hw), "batch": batch, "dtype": dtype,
                     "train_amp": train_amp if training else None,
                     "providers": list(providers),
                     "mta_large_kernel_args": MTA_LARGE_KERNEL_ARGS},
        "inference": {}, "training": {},
        "notes": NOTES,
        "stale_launchers": stale_launchers(),
    }
    for p in providers:
        r = count_inference(p, input_hw, batch, dtype)
        r["static_estimate"] = _static_estimate("inference", p, dtype)
        r["target"] = TARGETS["inference"].get(p)
        result["inference"][p] = r
    if training:
        for p in providers:
            if PROVIDERS[p].get("inference_only"):
                continue
            r = count_training(p, input_hw, batch, train_amp)
            r["static_estimate"] = _static_estimate("training", p, train_amp)
            r["target"] = TARGETS["training"].get(p)
            result["training"][p] = r
    result["seconds"] = round(time.time() - t0, 1)
    return result


def main(argv=None) -> int:
    global MTA_LARGE_KERNEL_ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="write the full result as JSON")
    ap.add_argument("--out", help="JSON file (default: stdout, after the table)")
    ap.add_argument("--markdown", help="also write the table as markdown to this file")
    ap.add_argument("--input", type=_parse_hw, default=(256, 192), help="HxW (256x192)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16",
                    help="inference dtype (default float16, the issue's setting)")
    ap.add_argument("--train-amp", choices=["bfloat16", "none"], default="bfloat16",
                    help="training autocast dtype (Trainer's default on an H100)")
    ap.add_argument("--no-training", action="store_true", help="inference only")
    ap.add_argument("--providers", default=",".join(PROVIDERS),
                    help=f"comma list of {', '.join(PROVIDERS)}")
    ap.add_argument("--check", action="store_true", help="exit 1 when over the budget")
    ap.add_argument("--budget", default=str(ROOT / "benchmarks" / "launch_budget.json"))
    ap.add_argument("--update-budget", action="store_true",
                    help="rewrite the budget file from this run (counts + 2%%)")
    ap.add_argument("--mta-4kb", action="store_true",
                    help="multi-tensor apply with 4 KB kernel arguments (CUDA < 12.1)")
    ap.add_argument("--print-fingerprints", action="store_true",
                    help="print the launcher-file fingerprints and exit")
    args = ap.parse_args(argv)
    if args.print_fingerprints:
        files = sorted({f for _, fs in NATIVE_LAUNCHERS.values() for f in fs})
        print(json.dumps({f: launcher_fingerprint(f) for f in files}, indent=2))
        return 0
    if _FAKE_CUDA_ERROR:
        print(f"count_launches: {_FAKE_CUDA_ERROR}", file=sys.stderr)
        return 2
    MTA_LARGE_KERNEL_ARGS = not args.mta_4kb
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        ap.error(f"--providers: unknown {unknown}; choose from {list(PROVIDERS)}")
    result = run(providers, args.input, args.batch, args.dtype, args.train_amp,
                 training=not args.no_training)
    budget_path = Path(args.budget)
    if args.update_budget:
        budget_path.write_text(json.dumps(budget_from(result), indent=2) + "\n")
    budget = load_budget(budget_path)
    for mode in ("inference", "training"):
        for p, r in result[mode].items():
            r["budget"] = budget.get(mode, {}).get(p) if budget.get(
                "settings") == result["settings"] else None
    failures = check(result, budget) if args.check else []
    if args.check:  # a launcher changed since its mirror was read: the counts may be wrong
        failures += [f"stale launcher mirror: {f} (re-read it, update NATIVE_LAUNCHERS, then "
                     "LAUNCHER_FINGERPRINTS from --print-fingerprints)"
                     for f in result["stale_launchers"]]
    result["check_failures"] = failures
    print(format_table(result))
    if result["stale_launchers"]:
        print("WARNING: launcher sources changed since their mirrors were written (re-read "
              "them, update NATIVE_LAUNCHERS, then LAUNCHER_FINGERPRINTS): "
              + ", ".join(result["stale_launchers"]))
    print(f"({result['seconds']} s)")
    if args.markdown:
        Path(args.markdown).write_text(format_markdown(result))
    if args.json:
        text = json.dumps(result, indent=2) + "\n"
        if args.out:
            Path(args.out).write_text(text)
        else:
            print(text)
    for f in failures:
        print(f"CHECK FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
