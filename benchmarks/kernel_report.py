#!/usr/bin/env python
"""Compiled-kernel report: every GPU kernel of saffnet_fast as an H100 (sm_90) would get it,
built on a CPU machine, no GPU needed (issue #21, spec/gpu.md §4).

    python benchmarks/kernel_report.py [--json] [--out FILE] [--check] [--full]
                                       [--require-cuda] [--no-cuda] [--no-triton] [--jobs N]

Triton part (needs triton; any torch):
  1. every module under TRITON_PACKAGES is imported with the interpreter off (so the
     launchers make their GPU choices and the autotune lists are the real ones), and each
     block of WORKLOADS runs on CPU tensors at every shape and setting SAFFNet gives it (the
     reference model is walked once at 256×192), in each dtype of DTYPES and mode of MODES.
     Each kernel launch is intercepted before it runs: triton's own argument binder, built
     for GPUTarget("cuda", 90, 32), turns it into the (signature, constexprs, divisibility
     attributes, options) JITFunction would compile on an H100; an autotuned launch becomes
     one launch per config;
  2. the specialisations are compiled ahead of time with triton.compile(ASTSource(...),
     target=GPUTarget("cuda", 90, 32), options=...) and read: registers, spills, stack
     (ptxas -v, as triton ran it), shared memory (metadata.shared), the TTIR's tl.dot's
     (operand types, input precision) and the PTX's tensor-core instructions (mma, wgmma).
     By default one specialisation per kernel, pointer types, non-tile constexprs and
     launch config is compiled, the one with the largest tile (see representatives());
     --full compiles every one, float64 included (about 4x longer).
CUDA part (needs a CUDA build of torch and nvcc; reported as skipped otherwise): each
csrc/cuda/*.cu is compiled to PTX for sm_90 with setup.py's defines and torch's CUDA
headers, then ``ptxas -arch=sm_90a -v``: registers, spills, stack frame and static shared
memory per kernel instantiation, and whether its PTX holds mma / wgmma.

Each kernel is classified once, in MATRIX_KERNELS (does it contract channels per pixel?).
``--check`` exits 1 on any spill, on a matrix kernel without tensor-core instructions, on
shared memory beyond an H100 block's 227 KB, on a kernel missing from MATRIX_KERNELS, on a
Triton kernel no workload launches, on a workload or compile error; kernels in NOT_ROUTED
and float64-only instantiations are reported as waived. Every failure is printed with its
reason, then a summary line, then the table; ``--json`` writes everything (plus versions
and date) to ``--out`` (default: stdout).

Cost: about 470 CPU seconds (2026-12, triton 3.8 / CUDA 13: Triton compiles ~250, nvcc and
ptxas ~165, recording ~60), about 4 minutes on two idle cores; the JSON records wall and CPU
time. Nothing is cached between runs: triton compiles into a temporary directory, removed
at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import glob
import importlib
import io
import json
import logging
import multiprocessing
import os
import pkgutil
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]

# Packages whose modules hold @triton.jit kernels (every module under each is imported).
TRITON_PACKAGES = ("saffnet_fast.ops.triton",)
# The CUDA sources, relative to the repository root.
CUDA_SOURCES = "csrc/cuda/*.cu"
# The model whose blocks give every op its shapes and hyper-parameters, at its input size.
MODEL, INPUT_SIZE = "saffnet", (256, 192)
# Batch of the inference benchmark (issue #21) and of the training recipe.
EVAL_BATCH, TRAIN_BATCH = 64, 32
DTYPES = ("float32", "float16", "bfloat16")
# float64 (the ops take it for parity tests) only with --full: it adds a third to the compiles.
FULL_EXTRA_DTYPES = ("float64",)
# float64 is the parity-test dtype: the model never runs in it on the GPU and an H100's fp64
# throughput is no target, so kernels instantiated only for it (the CUDA sources' float64
# instantiations, Triton's with --full) are reported but never fail --check.
UNGATED_DTYPES = ("float64",)
SM = 90  # H100
PTXAS_ARCH = "sm_90a"  # what triton compiles capability 90 for (wgmma needs the "a")
# An H100 block can use at most 227 KB of shared memory: a kernel that needs more compiles,
# but its launch fails ("out of resource: shared memory").
SHARED_MEMORY_LIMIT = 227 * 1024

# ------------------------------------------------------------------------------------------
# Which kernels do matrix work: a channel contraction per pixel (a 1×1 or 3×3 convolution,
# or its gradient), the work tensor cores are for. One entry per kernel name, Triton and
# CUDA alike; a kernel missing here fails --check until it is classified.
MATRIX_KERNELS: Dict[str, Tuple[bool, str]] = {
    # --- Triton: split-resplice (ops/triton/split_resplice.py, _common.conv3x3_tile)
    "_sr_step_kernel": (True, "SR eval step: 3×3 conv as an implicit GEMM (9 taps × tl.dot)"),
    "_sr_tc_kernel": (True, "SR eval in one launch (split_resplice_tc.py): 7 chained 3×3 "
                            "implicit GEMMs per tile, f16/bf16 (tf32x3 for float32) tl.dot"),
    "_conv_stats_kernel": (True, "SR training step: the same 3×3 implicit GEMM + tile moments"),
    "_conv_input_backward_kernel": (True, "SR dL/dinput: transposed 3×3 implicit GEMM"),
    "_conv_weight_backward_kernel": (True, "SR dL/dW: per-tap contraction over pixels"),
    "_act_kernel": (False, "SR BN apply + LeakyReLU + dropout: elementwise"),
    "_act_backward_kernel": (False, "SR activation backward + per-tile sums: elementwise"),
    "_bn_input_grad_kernel": (False, "SR BN input gradient: elementwise per channel"),
    "_merge_moments_kernel": (False, "merges per-tile moments: a reduction over rows"),
    # --- Triton: pooling and coordinate scaling (ops/triton/coord.py)
    "_plane_reduce_kernel": (False, "row/column/plane means: a reduction per (n, c) plane"),
    "_coord_scale_kernel": (False, "x·a_h·a_w: elementwise"),
    "_coord_scale_backward_kernel": (False, "its gradient: elementwise + per-plane sums"),
    # --- Triton: AFF's per-pixel pass (ops/triton/aff.py)
    "_aff_fuse_kernel": (True, "AFF local bottleneck C→C/r→C per pixel (two tl.dot)"),
    "_aff_fuse_backward_kernel": (True, "its gradient: bottleneck recomputed + 4 tl.dot"),
    "_aff_moments_kernel": (True, "bottleneck recomputed per pixel for BN batch statistics"),
    "_aff_moments_backward_kernel": (True, "gradient of those statistics through the dots"),
    "_aff_pair_kernel": (True, "AFF(x, residual): the same local bottleneck per pixel"),
    "_aff_pair_backward_kernel": (True, "its gradient: bottleneck recomputed + 4 tl.dot"),
    # --- CUDA: csrc/cuda/
    "split_resplice_tiled_kernel": (True, "SR in one launch: every 3×3 step per tile"),
    "split_resplice_step_kernel": (True, "SR fallback step: direct 3×3 convolution"),
    "channel_moments_kernel": (False, "SR training: per-channel batch moments (reduction)"),
    "bn_act_dropout_apply_kernel": (False, "SR training: BN + LeakyReLU + dropout"),
    "bn_act_dropout_backward_kernel": (False, "its gradient: elementwise + channel sums"),
    "aff_fuse_forward_kernel": (True, "AFF local bottleneck per pixel (aff_local.cuh)"),
    "aff_fuse_backward_kernel": (True, "its gradient through the per-pixel bottleneck"),
    "aff_pair_forward_kernel": (True, "AFF(x, residual): local bottleneck per pixel"),
    "aff_pair_backward_kernel": (True, "its gradient through the per-pixel bottleneck"),
    "aff_moments_forward_kernel": (True, "bottleneck per pixel for BN batch statistics"),
    "aff_moments_backward_kernel": (True, "gradient of those statistics per pixel"),
    "aff_moments_finish_kernel": (False, "one thread per channel: mean, variance"),
    "aff_combine_forward_kernel": (False, "sigmoid weighting of precomputed logits"),
    "aff_combine_backward_kernel": (False, "its gradient: elementwise + plane sums"),
    "aff_pair_combine_forward_kernel": (False, "sigmoid weighting of precomputed logits"),
    "aff_pair_combine_backward_kernel": (False, "its gradient: elementwise + plane sums"),
    "coord_pool_forward_kernel": (False, "row and column means per plane"),
    "coord_pool_backward_kernel": (False, "broadcast of the pooled gradients"),
    "coord_scale_forward_kernel": (False, "x·a_h·a_w: elementwise"),
    "coord_scale_backward_kernel": (False, "its gradient: elementwise + plane sums"),
}

# Kernels that backend='auto' never picks on the GPU: --check reports their failures but
# does not fail on them. Derived from saffnet_fast.fast.dispatch.CUDA_UNROUTED (the ops auto
# avoids on CUDA, each with the kernels they launch and why), so the routing and the gate
# cannot disagree: a kernel is waived here exactly when auto does not route to it.
def not_routed_kernels() -> Dict[str, str]:
    if str(ROOT) not in sys.path:  # run as a script from a venv without the package
        sys.path.insert(0, str(ROOT))
    from saffnet_fast.fast.dispatch import CUDA_UNROUTED

    waived: Dict[str, str] = {}
    for (backend, op), (kernels, why) in CUDA_UNROUTED.items():
        for name in kernels:
            waived.setdefault(name, f"auto does not route {backend} {op} on CUDA: {why}")
    return waived


NOT_ROUTED: Dict[str, str] = not_routed_kernels()


# ------------------------------------------------------------------------------------------
# How each block is driven: `reference` names the class of saffnet_fast.nn.reference whose
# instances in MODEL give the shapes and hyper-parameters (nested ones too: SCAFF's AFF is
# an AFF); `inputs(x)` gives the block's further inputs (AFF's residual). Each runs through
# the block algorithm the fast modules use (saffnet_fast.fast.dispatch.BLOCKS) with
# backend="triton", so every Triton op it reaches is covered; a refactor of the ops only
# has to keep this table right.


@dataclasses.dataclass(frozen=True)
class Workload:
    reference: str
    inputs: Callable = lambda x: ()
    # What the block runs instead on a CUDA tensor where its path depends on the device
    # (these CPU tensors take the other one): f(module, x), called after the block.
    on_cuda: Optional[Callable] = None


def _residual(x):
    return (x.detach().clone().requires_grad_(x.requires_grad),)


def _split_resplice_tiled(module, x):
    """What blocks.split_resplice runs on a CUDA tensor in eval without autograd: one
    split_resplice_tiled launch (Triton: ops/triton/split_resplice_tc.py)."""
    import torch
    from saffnet_fast.fast.blocks import fold_split_resplice
    from saffnet_fast.ops import kernel

    if module.training or torch.is_grad_enabled():
        return None
    weights, biases = fold_split_resplice(module)
    slope = float(module.steps[0].negative_slope)
    return kernel("split_resplice_tiled", "triton")(x, weights, biases, slope, 0, 0, False)


WORKLOADS: Dict[str, Workload] = {
    "coordinate_attention": Workload("CoordAttention"),
    "scaff": Workload("SCAFF"),
    "sawf": Workload("SAWF"),
    "aff": Workload("AFF", _residual),
    "split_resplice": Workload("SplitResplice", on_cuda=_split_resplice_tiled),
}


def run_block(op: str, module, x):
    """Block ``op`` of ``module`` on ``x`` through its Triton kernels."""
    from saffnet_fast.fast.dispatch import BLOCKS

    out = BLOCKS[op](module, x, *WORKLOADS[op].inputs(x), backend="triton")
    if WORKLOADS[op].on_cuda is not None:
        WORKLOADS[op].on_cuda(module, x)
    return out


# (name, module.training, gradients, batch): inference; training; eval with autograd
# (SR then runs its inference kernels; backward is ATen convolution gradients).
MODES = (("inference", False, False, EVAL_BATCH), ("training", True, True, TRAIN_BATCH),
         ("eval+grad", False, True, TRAIN_BATCH))


# ------------------------------------------------------------------------------------------
# Parsing ptxas -v and PTX / TTIR text (shared by both parts; tested on their own).

_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?"
                         r"(?:, (\d+) bytes smem)?")


def parse_ptxas_log(log: str) -> Dict[str, dict]:
    """{mangled kernel: {registers, stack_bytes, spill_store_bytes, spill_load_bytes,
    static_smem_bytes}} from ``ptxas -v`` output."""
    out: Dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            current = out.setdefault(m.group(1), {"registers": None, "stack_bytes": 0,
                                                  "spill_store_bytes": 0,
                                                  "spill_load_bytes": 0,
                                                  "static_smem_bytes": 0})
            continue
        if current is None:
            continue
        m = _PTXAS_FRAME.search(line)
        if m:
            current.update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                           spill_load_bytes=int(m.group(3)))
            continue
        m = _PTXAS_USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            current["static_smem_bytes"] = int(m.group(3) or 0)
    return out


_MMA = re.compile(r"^\s*(wgmma\.mma_async|mma\.sync)\S*", re.MULTILINE)
_MMA_TYPES = re.compile(r"\.(f16|bf16|tf32|e4m3|e5m2|f64|s8|u8)\b")


def ptx_tensor_core_ops(ptx: str) -> Dict[str, object]:
    """Tensor-core instructions of a PTX body: counts of wgmma / mma and operand types."""
    wgmma = mma = 0
    types = set()
    for m in _MMA.finditer(ptx):
        instr = m.group(0).strip()
        if instr.startswith("wgmma"):
            wgmma += 1
        else:
            mma += 1
        # the accumulator type comes first (f32/f16); the operand types follow it
        types.update(_MMA_TYPES.findall(instr.split(".aligned", 1)[-1]))
    return {"wgmma": wgmma, "mma": mma, "operand_types": sorted(types)}


def ptx_entries(ptx: str) -> Dict[str, str]:
    """{entry name: its PTX body} (device functions are inlined into entries in practice)."""
    parts = re.split(r"^\s*\.(?:visible\s+)?\.entry\s+", ptx, flags=re.MULTILINE)
    out = {}
    for part in parts[1:]:
        name = re.match(r"([\w$]+)", part).group(1)
        out[name] = part
    return out


_TT_DOT = re.compile(r"tt\.dot\s[^\n]*")


def ttir_dots(ttir: str) -> List[str]:
    """One description per tl.dot of the TTIR: 'f32 ieee', 'f16', 'f32 tf32', ..."""
    dots = []
    for line in _TT_DOT.findall(ttir):
        precision = re.search(r"inputPrecision\s*=\s*(\w+)", line)
        operand = re.search(r":\s*tensor<[\dx]+x(\w+)", line)
        ty = operand.group(1) if operand else "?"
        # input precision matters only for f32 operands; the TTIR omits the default, ieee
        prec = (precision.group(1) if precision else "ieee") if ty == "f32" else ""
        dots.append(f"{ty} {prec}".strip())
    return dots


def ptxas_path() -> Optional[str]:
    """The ptxas bundled with triton (the one it compiles with), else the CUDA toolkit's."""
    try:
        import triton.backends.nvidia as nv

        bundled = Path(nv.__file__).parent / "bin" / "ptxas"
        if bundled.exists():
            return str(bundled)
    except Exception:
        pass
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for candidate in (Path(cuda_home) / "bin" / "ptxas", shutil.which("ptxas")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


def run_ptxas(ptx: str, ptxas: str, extra: Sequence[str] = ()) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([ptxas, f"-arch={PTXAS_ARCH}", "-v", *extra, str(src), "-o",
                               str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout + done.stderr


# ------------------------------------------------------------------------------------------
# Triton: recording launches

# Constexpr parameters named like this size a tile; the others (MODE, STAGE, PRECISION,
# HAS_CARRY, ...) choose what the kernel computes.
TILE_CONSTEXPR = re.compile(r"^(BLOCK|TILE)_")


@dataclasses.dataclass
class Launch:
    """One specialisation JITFunction would compile on an H100, and where it came from."""
    fn: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config: str  # autotune config and launch options, for the report
    uses: set = dataclasses.field(default_factory=set)  # (op, mode, dtype, block shape)
    dtypes: set = dataclasses.field(default_factory=set)

    @property
    def key(self):
        return (qualname(self.fn), tuple(sorted(self.signature.items())),
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
                tuple(sorted((k, repr(v)) for k, v in self.attrs.items())),
                tuple(sorted((k, repr(v)) for k, v in self.options.items())))

    def named_constexprs(self, tiles: Optional[bool] = None) -> Dict[str, object]:
        """Constexpr values by parameter name: the declared tl.constexpr ones (tile sizes
        only, or all but tile sizes), or with tiles=None also the integers triton
        specialised to constants (arguments equal to 1)."""
        out = {}
        for (index, *_), value in self.constexprs.items():
            param = self.fn.params[index]
            if tiles is None or (param.is_constexpr
                                 and bool(TILE_CONSTEXPR.match(param.name)) == tiles):
                out[param.name] = value
        return out

    @property
    def group(self):
        """What a representative stands for: the kernel, its pointer types, what it computes
        (non-tile constexprs) and its launch config; not the tile sizes and integer
        specialisations that the shapes choose."""
        pointers = tuple((k, v) for k, v in self.signature.items() if v.startswith("*"))
        return (qualname(self.fn), pointers,
                tuple(sorted((k, repr(v)) for k, v in self.named_constexprs(False).items())),
                self.config)

    @property
    def tile_elements(self) -> int:
        size = 1
        for value in self.named_constexprs(True).values():
            size *= int(value)
        return size

    def job(self) -> tuple:
        """A picklable description for a compile worker."""
        return (self.fn.fn.__module__, self.fn.fn.__name__, self.signature, self.constexprs,
                self.attrs, self.options)


def qualname(fn) -> str:
    return f"{fn.fn.__module__}.{fn.fn.__qualname__}"


def base_jit_function(obj):
    """The JITFunction under an autotune / heuristics wrapper, else None."""
    from triton.runtime.jit import JITFunction

    for _ in range(5):
        if isinstance(obj, JITFunction):
            return obj
        obj = getattr(obj, "fn", None)
    return None


def discover_triton_kernels(packages: Sequence[str]) -> Dict[str, object]:
    """{qualified name: JITFunction} of every @triton.jit function defined in a module under
    ``packages`` (helpers called by other kernels included)."""
    found = {}
    for package in packages:
        pkg = importlib.import_module(package)
        names = [package] + [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")]
        for name in names:
            module = importlib.import_module(name)
            for value in vars(module).values():
                fn = base_jit_function(value)
                if fn is not None and fn.fn.__module__ == name:
                    found[qualname(fn)] = fn
    return found


def helper_names(kernels: Dict[str, object]) -> set:
    """Kernels called from another kernel's body (device helpers, never launched)."""
    helpers = set()
    for name, fn in kernels.items():
        call = re.compile(rf"(?<![\w.]){re.escape(fn.fn.__name__)}\s*\(")
        if any(call.search(other.src.split(":", 1)[-1]) for other_name, other in kernels.items()
               if other_name != name):
            helpers.add(name)
    return helpers


class LaunchRecorder:
    """While active, a Triton kernel launch is recorded instead of run: triton's argument
    binder for the sm_90 backend gives what JITFunction.run would compile on an H100
    (pointer types, i32/i64, integers equal to 1 as constants, multiples of 16 and 16-byte
    aligned pointers as divisibility attributes, do_not_specialize honoured); an autotuned
    launch becomes one launch per config. Outputs stay uninitialised: nothing reads them
    but later launches, which are recorded too."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        self.backend = make_backend(GPUTarget("cuda", SM, 32))
        self.launches: Dict[tuple, Launch] = {}
        self.context: Tuple = ("-", "-", "-", "-")  # (op, mode, dtype, block shape)
        self._binders: dict = {}
        self._config: Optional[dict] = None

    def record(self, fn, args, kwargs):
        from triton.runtime.jit import create_function_from_signature

        binder = self._binders.get(fn)
        if binder is None:
            binder = create_function_from_signature(fn.signature, fn.params, self.backend)
            self._binders[fn] = binder
        bound, specialization, options = binder(*args, **kwargs)
        opts, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound,
                                                           specialization, options)
        label = " ".join([f"{k}={v}" for k, v in (self._config or {}).items()]
                         + [f"warps={opts.num_warps}", f"stages={opts.num_stages}"])
        launch = Launch(fn, signature, constexprs, attrs, dict(opts.__dict__), label)
        launch = self.launches.setdefault(launch.key, launch)
        launch.uses.add(self.context)
        launch.dtypes.add(self.context[2])

    @contextlib.contextmanager
    def active(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        recorder = self

        def jit_run(fn, *args, grid, warmup, **kwargs):
            recorder.record(fn, args, kwargs)

        def autotune_run(tuner, *args, **kwargs):
            # as Autotuner.run does before pruning: the early_config_prune hooks read the
            # launch's arguments by name
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
            for config in configs:
                recorder._config = dict(config.kwargs)
                try:
                    tuner.fn.run(*args, **kwargs, **config.all_kwargs())
                finally:
                    recorder._config = None

        saved = JITFunction.run, Autotuner.run
        JITFunction.run, Autotuner.run = jit_run, autotune_run
        try:
            yield self
        finally:
            JITFunction.run, Autotuner.run = saved


def model_blocks(workloads: Dict[str, Workload]) -> List[Tuple[str, object, Tuple[int, ...]]]:
    """(op, module, input shape without the batch) for each distinct block of MODEL (its
    repr: hyper-parameters) and input shape, from one forward of the reference model."""
    import torch
    from saffnet_fast.models import build_model
    from saffnet_fast.nn import reference

    classes = {op: getattr(reference, w.reference) for op, w in workloads.items()}
    model = build_model(MODEL, input_size=INPUT_SIZE, backend="reference").eval()
    seen: Dict[tuple, Tuple[str, object, tuple]] = {}

    def hook(op):
        def fn(module, inputs, _output):
            shape = tuple(inputs[0].shape[1:])
            seen.setdefault((op, repr(module), shape), (op, module, shape))
        return fn

    handles = [m.register_forward_hook(hook(op)) for m in model.modules()
               for op, cls in classes.items() if type(m) is cls]
    with torch.no_grad():
        model(torch.zeros(1, 3, *INPUT_SIZE))
    for h in handles:
        h.remove()
    return list(seen.values())


def block_hyperparameters(module) -> str:
    """The integer settings of a block (channels, r, splits, ...), for the report."""
    return ", ".join(f"{k}={v}" for k, v in sorted(vars(module).items())
                     if type(v) is int and not k.startswith("_"))


def record_triton_launches(workloads: Dict[str, Workload], dtypes: Sequence[str]):
    """Drive every op at every block shape, dtype and mode: (launches, errors, blocks)."""
    import torch

    recorder = LaunchRecorder()
    errors = []
    blocks = model_blocks(workloads)
    with recorder.active():
        for op, block, shape in blocks:
            for dtype_name in dtypes:
                dtype = getattr(torch, dtype_name)
                for mode, training, grad, batch in MODES:
                    recorder.context = (op, mode, dtype_name, "x".join(map(str, shape)))
                    module = copy.deepcopy(block).to(dtype).train(training)
                    x = torch.zeros((batch, *shape), dtype=dtype).requires_grad_(grad)
                    try:
                        with torch.set_grad_enabled(grad):
                            out = run_block(op, module, x)
                            if grad:
                                out.backward(torch.zeros_like(out))
                    except Exception as exc:  # reported, and fails --check
                        errors.append(f"{op} {mode} {dtype_name} {shape}: "
                                      f"{type(exc).__name__}: {exc}")
    return list(recorder.launches.values()), errors, blocks


def representatives(launches: List[Launch], full: bool) -> List[Tuple[Launch, List[Launch]]]:
    """(launch to compile, the launches it stands for). With ``full`` every specialisation
    is compiled. Otherwise one per group (kernel, pointer types, non-tile constexprs, launch
    config): the one with the largest tile, which needs the most registers, so the first
    to spill; the dot instructions (tensor cores or not) follow from the operand types and
    precision, which the group fixes."""
    if full:
        return [(launch, [launch]) for launch in launches]
    groups: Dict[tuple, List[Launch]] = {}
    for launch in launches:
        groups.setdefault(launch.group, []).append(launch)
    return [(max(group, key=lambda l: (l.tile_elements, len(l.uses))), group)
            for group in groups.values()]


# ------------------------------------------------------------------------------------------
# Triton: compiling (in worker processes)


def compile_jit(fn, signature: dict, constexprs: dict, attrs: Optional[dict] = None,
                options: Optional[dict] = None) -> dict:
    """Compile one @triton.jit function for sm_90 and read its resources and instructions:
    registers, spills, stack (ptxas -v), shared memory, the TTIR's dots, mma/wgmma in the
    PTX. ``signature``/``constexprs`` as triton.compile takes them."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start, cpu_start = time.time(), cpu_seconds()
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs or {})
    log = io.StringIO()
    # triton runs ptxas -v itself; with dump_ptxas_log it prints that log, read here, so the
    # figures are those of the cubin triton built (same ptxas, same flags)
    with contextlib.ExitStack() as stack:
        if hasattr(getattr(knobs, "nvidia", None), "dump_ptxas_log"):
            stack.enter_context(knobs.nvidia.scope())
            knobs.nvidia.dump_ptxas_log = True
        stack.enter_context(contextlib.redirect_stdout(log))
        kernel = triton.compile(src, target=GPUTarget("cuda", SM, 32), options=options or {})
    ptx = kernel.asm["ptx"]
    name = kernel.metadata.name
    stats = parse_ptxas_log(log.getvalue()).get(name)
    stats_from = "triton's ptxas -v"
    if stats is None or stats["registers"] is None:  # a cache hit, or no such knob
        stats = parse_ptxas_log(run_ptxas(ptx, ptxas_path())).get(name)
        stats_from = "ptxas -v on the PTX"
    tc = ptx_tensor_core_ops(ptx)
    return {
        "registers": stats["registers"],
        "spill_store_bytes": stats["spill_store_bytes"],
        "spill_load_bytes": stats["spill_load_bytes"],
        "stack_bytes": stats["stack_bytes"],
        "shared_bytes": int(kernel.metadata.shared),
        "num_warps": int(kernel.metadata.num_warps),
        "num_stages": int(kernel.metadata.num_stages),
        "dots": ttir_dots(kernel.asm.get("ttir", "")),
        "wgmma": tc["wgmma"], "mma": tc["mma"], "mma_operand_types": tc["operand_types"],
        "stats_from": stats_from,
        "compile_s": round(time.time() - start, 2),
        "compile_cpu_s": round(cpu_seconds() - cpu_start, 2),
    }


def _triton_job(index_and_job) -> Tuple[int, dict]:
    index, (module_name, fn_name, signature, constexprs, attrs, options) = index_and_job
    try:
        fn = base_jit_function(getattr(importlib.import_module(module_name), fn_name))
        return index, compile_jit(fn, signature, constexprs, attrs, options)
    except Exception as exc:
        return index, {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}


# ------------------------------------------------------------------------------------------
# CUDA: nvcc → PTX → ptxas -v


def cuda_unavailable_reason() -> Optional[str]:
    import torch

    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU build: the CUDA sources need torch's CUDA "
                "headers (run with a CUDA build of torch, e.g. CI stage 4's .ci-cuda-venv)")
    if nvcc_path() is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def nvcc_path() -> Optional[str]:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for candidate in (Path(cuda_home) / "bin" / "nvcc", shutil.which("nvcc")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


def nvcc_command(source: Path, out: Path) -> List[str]:
    """nvcc -ptx for sm_90 with setup.py's defines and flags and torch's CUDA include dirs
    (plus the CUDA headers of the nvidia-* wheels, as .ci/cuda_build_check.sh sets CPATH)."""
    import sysconfig

    # as .ci/cuda_build_check.sh: torch would otherwise guess it from nvcc's PATH entry
    os.environ.setdefault("CUDA_HOME", str(Path(nvcc_path()).resolve().parents[1]))
    # "No CUDA runtime is found": expected here, nothing runs on a GPU
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch
    from torch.utils import cpp_extension

    try:
        includes = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6
        includes = cpp_extension.include_paths(cuda=True)
    site = Path(sysconfig.get_paths()["purelib"])
    includes += [str(p) for p in sorted(site.glob("nvidia/cu1*/include"))]
    includes += [str(p) for p in sorted(site.glob("nvidia/*/include"))]
    defines = [f'-DSAFFNET_TORCH_VERSION="{torch.__version__}"', "-DNDEBUG=1", "-DWITH_CUDA=1",
               f'-DSAFFNET_CUDA_VERSION="{torch.version.cuda}"',
               '-DSAFFNET_CUDA_ARCH_LIST="9.0"', "-DTORCH_API_INCLUDE_EXTENSION_H",
               "-DTORCH_EXTENSION_NAME=_C",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    std = "-std=c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 14) \
        else "-std=c++17"
    return [nvcc_path(), "-ptx", f"-arch=sm_{SM}", "-O3", "--expt-relaxed-constexpr",
            "-lineinfo", std, *cpp_extension.COMMON_NVCC_FLAGS, *defines,
            f"-I{ROOT / 'csrc'}", *[f"-I{p}" for p in includes], str(source), "-o", str(out)]


def demangle(names: Sequence[str]) -> Dict[str, str]:
    tool = shutil.which("cu++filt") or str(Path(nvcc_path()).parent / "cu++filt")
    if not Path(tool).exists():
        tool = shutil.which("c++filt")
    if not tool:
        return {n: n for n in names}
    done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = done.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


_CUDA_DTYPES = {"float": "float32", "double": "float64", "c10::Half": "float16",
                "c10::BFloat16": "bfloat16", "at::Half": "float16",
                "at::BFloat16": "bfloat16"}


def cuda_kernel_name(demangled: str) -> Tuple[str, str, str]:
    """(kernel name, dtype, template arguments) of a demangled kernel signature."""
    # "void saffnet_fast::(anonymous namespace)::name<c10::Half, float>(c10::Half const*, ...)"
    text = demangled.replace("(anonymous namespace)::", "")
    head = text.split("(", 1)[0]
    if head.startswith("void "):
        head = head[len("void "):]
    name = head.split("<", 1)[0].split("::")[-1].strip()
    template = head[len(head.split("<", 1)[0]):].strip()
    first = template[1:].split(",")[0].strip(" >") if template else ""
    return name, _CUDA_DTYPES.get(first, first or "-"), template


def _cuda_job(source: str) -> Tuple[str, dict]:
    start, cpu_start = time.time(), cpu_seconds()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ptx_file = Path(tmp) / (Path(source).stem + ".ptx")
            done = subprocess.run(nvcc_command(ROOT / source, ptx_file), capture_output=True,
                                  text=True)
            if done.returncode != 0:
                return source, {"error": f"nvcc failed: {done.stderr[-3000:]}"}
            ptx = ptx_file.read_text()
        nvcc_s = time.time() - start
        stats = parse_ptxas_log(run_ptxas(ptx, nvcc_ptxas()))
        bodies = ptx_entries(ptx)
        names = demangle(list(stats))
        kernels = []
        for mangled, st in stats.items():
            name, dtype, template = cuda_kernel_name(names[mangled])
            tc = ptx_tensor_core_ops(bodies.get(mangled, ""))
            kernels.append({"kernel": name, "dtype": dtype, "template": template,
                            "mangled": mangled, "registers": st["registers"],
                            "spill_store_bytes": st["spill_store_bytes"],
                            "spill_load_bytes": st["spill_load_bytes"],
                            "stack_bytes": st["stack_bytes"],
                            "shared_bytes": st["static_smem_bytes"], "wgmma": tc["wgmma"],
                            "mma": tc["mma"], "mma_operand_types": tc["operand_types"]})
        return source, {"kernels": kernels, "nvcc_s": round(nvcc_s, 1),
                        "total_s": round(time.time() - start, 1),
                        "cpu_s": round(cpu_seconds() - cpu_start, 1)}
    except Exception as exc:
        return source, {"error": f"{type(exc).__name__}: {exc}"}


def nvcc_ptxas() -> str:
    """ptxas of the CUDA toolkit that nvcc belongs to (its PTX version matches)."""
    beside = Path(nvcc_path()).resolve().parent / "ptxas"
    return str(beside) if beside.exists() else (shutil.which("ptxas") or "ptxas")


# ------------------------------------------------------------------------------------------
# Rows, check, table


def triton_rows(chosen: List[Tuple[Launch, List[Launch]]], results: Dict[int, dict],
                dtypes: Sequence[str]) -> List[dict]:
    rows = []
    for i, (launch, group) in enumerate(chosen):
        fn = launch.fn
        res = results.get(i, {"error": "not compiled"})
        all_dtypes = set().union(*(l.dtypes for l in group))
        rows.append({
            "backend": "triton",
            "kernel": fn.fn.__name__,
            "source": os.path.relpath(fn.fn.__code__.co_filename, ROOT),
            "dtype": ",".join(d for d in dtypes if d in all_dtypes),
            "config": launch.config,
            "signature": {k: v for k, v in launch.signature.items() if v != "constexpr"},
            "constexprs": launch.named_constexprs(),
            # the declared constexprs and one block that launches it, to name it in --check
            "specialisation": " ".join(
                [f"{k}={v}" for k, v in {**launch.named_constexprs(False),
                                          **launch.named_constexprs(True)}.items()]
                + ["at " + min(f"{op} {shape} {mode}" for op, mode, _, shape in launch.uses)]),
            "divisible_by_16": [fn.arg_names[k[0]] for k, v in launch.attrs.items() if v],
            # the specialisations this compile stands for (itself included): their tiles
            # and where the model launches them
            "covers": [{"tiles": l.named_constexprs(True),
                        "uses": sorted(" ".join(u) for u in l.uses)} for l in group],
            **res,
        })
    return rows


def cuda_rows(per_source: Dict[str, dict]) -> List[dict]:
    rows = []
    for source, res in sorted(per_source.items()):
        if "error" in res:
            rows.append({"backend": "cuda", "kernel": Path(source).stem, "source": source,
                         "dtype": "-", "config": "-", "error": res["error"]})
            continue
        for k in res["kernels"]:
            rows.append({"backend": "cuda", "source": source, "config": k["template"], **k})
    return rows


def has_tensor_cores(row: dict) -> bool:
    return row.get("wgmma", 0) + row.get("mma", 0) > 0


def check_failures(rows: List[dict], matrix: Dict[str, Tuple[bool, str]] = MATRIX_KERNELS,
                   not_routed: Dict[str, str] = NOT_ROUTED) -> Tuple[List[str], List[str]]:
    """(failures, waived): one line per kernel specialisation that breaks a rule, and why."""
    failures, waived = [], []
    for row in rows:
        what = (f"{row['backend']} {row['kernel']} "
                f"[{row.get('dtype', '-')}; {row.get('config', '-')}"
                + (f"; {row['specialisation']}]" if row.get("specialisation") else "]"))
        problems = []
        if "error" in row:
            problems.append(f"did not compile: {row['error'].splitlines()[0][:300]}")
        else:
            if row.get("shared_bytes", 0) > SHARED_MEMORY_LIMIT:
                problems.append(f"needs {row['shared_bytes']} B of shared memory, above the "
                                f"H100's {SHARED_MEMORY_LIMIT} B per block: its launch fails")
            spills = row["spill_store_bytes"] + row["spill_load_bytes"]
            if spills:
                problems.append(f"spills ({row['spill_store_bytes']} B stored, "
                                f"{row['spill_load_bytes']} B loaded; {row['registers']} "
                                "registers)")
            entry = matrix.get(row["kernel"])
            if entry is None:
                problems.append("not classified: add it to MATRIX_KERNELS (matrix or not, why)")
            elif entry[0] and not has_tensor_cores(row):
                dots = ", ".join(sorted(set(row.get("dots", [])))) or "scalar loops"
                problems.append(f"matrix kernel ({entry[1]}) without tensor-core "
                                f"instructions (no mma/wgmma in its PTX; dots: {dots})")
        ungated = set(str(row.get("dtype", "")).split(",")) <= set(UNGATED_DTYPES)
        for problem in problems:
            line = f"{what}: {problem}"
            if row["kernel"] in not_routed:
                waived.append(f"{line} (waived, not routed: {not_routed[row['kernel']]})")
            elif ungated:
                waived.append(f"{line} (waived: {row['dtype']} is not gated)")
            else:
                failures.append(line)
    return failures, waived


def summary_table(rows: List[dict]) -> str:
    """One line per (backend, kernel, dtype, config); resources as min–max over the shapes."""
    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        key = (row["backend"], row["source"], row["kernel"], row.get("dtype", "-"),
               row.get("config", "-"))
        groups.setdefault(key, []).append(row)

    def span(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        lo, hi = min(values), max(values)
        return str(lo) if lo == hi else f"{lo}-{hi}"

    header = ("backend", "kernel", "source", "dtype", "config", "n", "regs", "spills",
              "smem", "tensor cores", "matrix")
    lines = []
    for (backend, source, kernel, dtype, config), group in sorted(groups.items()):
        ok = [r for r in group if "error" not in r]
        tc = [has_tensor_cores(r) for r in ok]
        kinds = sorted({f"{'wgmma' if r['wgmma'] else 'mma'}." + "/".join(r["mma_operand_types"])
                        for r in ok if has_tensor_cores(r)})
        tc_text = ("yes " + ",".join(kinds)) if tc and all(tc) else \
            ("some" if any(tc) else ("no" if ok else "ERROR"))
        if ok and not any(tc) and any(r.get("dots") for r in ok):
            tc_text += " (" + ",".join(sorted({d for r in ok for d in r.get("dots", [])})) + ")"
        matrix = MATRIX_KERNELS.get(kernel)
        short_config = config if len(config) <= 28 else config[:25] + "..."
        lines.append((backend, kernel, Path(source).name, dtype, short_config, str(len(group)),
                      span([r.get("registers") for r in ok]),
                      span([r["spill_store_bytes"] + r["spill_load_bytes"] for r in ok]),
                      span([r.get("shared_bytes") for r in ok]), tc_text,
                      "?" if matrix is None else ("yes" if matrix[0] else "no")))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*line) for line in lines])


def cpu_seconds() -> float:
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def versions() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "machine": platform.machine(),
            "cpus": os.cpu_count()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"unavailable: {exc}"
    if nvcc_path():
        out = subprocess.run([nvcc_path(), "--version"], capture_output=True, text=True).stdout
        info["nvcc"] = (re.findall(r"release ([\d.]+)", out) or ["?"])[0]
    ptxas = ptxas_path()
    if ptxas:
        out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
        info["triton_ptxas"] = (re.findall(r"release ([\d.]+)", out) or ["?"])[0]
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT,
                                            capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return info


# ------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="write the full report as JSON")
    parser.add_argument("--out", help="file for the JSON (default: stdout, before the table)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on a spill, a matrix kernel without tensor cores, ...")
    parser.add_argument("--full", action="store_true",
                        help="compile every Triton specialisation (each shape's tiles and "
                             "integer specialisations), float64 included: ~4x longer")
    parser.add_argument("--require-cuda", action="store_true",
                        help="fail when the CUDA part cannot run (CI's CUDA stage)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA part")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton part")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile processes (default: one per CPU)")
    args = parser.parse_args(argv)

    start = time.time()
    # the kernels are compiled, never run: the C++ extension is not needed, and a build for
    # another torch (CI's CUDA venv against an in-place CPU build) would warn in each process
    warnings.filterwarnings("ignore", message="saffnet_fast: native extension not loaded")
    dtypes = DTYPES + FULL_EXTRA_DTYPES if args.full else DTYPES
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["benchmarks/kernel_report.py", *(argv or sys.argv[1:])]),
              "target": {"ptxas_arch": PTXAS_ARCH, "triton": f"GPUTarget('cuda', {SM}, 32)"},
              "model": {"name": MODEL, "input_size": list(INPUT_SIZE),
                        "eval_batch": EVAL_BATCH, "train_batch": TRAIN_BATCH},
              "dtypes": list(dtypes), "modes": [m[0] for m in MODES],
              "triton_selection": "every specialisation" if args.full else
              "per kernel, pointer types, non-tile constexprs and launch config: the largest tile",
              "not_routed": NOT_ROUTED,
              "matrix_kernels": {k: {"matrix": v[0], "why": v[1]}
                                 for k, v in MATRIX_KERNELS.items()}}
    problems: List[str] = []  # failures of the report itself, not of one kernel

    triton_reason = "--no-triton" if args.no_triton else None
    cache_dir = None
    if triton_reason is None:
        # the interpreter would hide the launchers' GPU choices and the autotune lists
        os.environ.pop("TRITON_INTERPRET", None)
        # nothing cached between runs (and the ptxas logs need a real compile)
        cache_dir = tempfile.mkdtemp(prefix="kernel_report_")
        os.environ["TRITON_CACHE_DIR"] = cache_dir
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        try:
            import triton  # noqa: F401
        except Exception as exc:
            triton_reason = f"triton is not importable: {type(exc).__name__}: {exc}"
    cuda_reason = "--no-cuda" if args.no_cuda else cuda_unavailable_reason()
    cuda_sources = [] if cuda_reason else sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / CUDA_SOURCES)))

    results: Dict[int, dict] = {}
    cuda_results: Dict[str, dict] = {}
    chosen: List[Tuple[Launch, List[Launch]]] = []
    record_s = 0.0
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
        # the nvcc runs (~20 s each) need no recording: they start first and overlap it
        cuda_async = [pool.apply_async(_cuda_job, (s,)) for s in cuda_sources]
        if triton_reason is None:
            try:
                t0 = time.time()
                kernels = discover_triton_kernels(TRITON_PACKAGES)
                helpers = helper_names(kernels)
                launches, errors, blocks = record_triton_launches(WORKLOADS, dtypes)
                record_s = time.time() - t0
                problems += [f"workload failed: {e}" for e in errors]
                launched = {qualname(launch.fn) for launch in launches}
                for name in sorted(set(kernels) - helpers - launched):
                    problems.append(f"triton kernel {name} is launched by no workload: add a "
                                    "block that reaches it to WORKLOADS")
                report["triton_blocks"] = sorted(f"{op} {'x'.join(map(str, shape))} "
                                                 f"{block_hyperparameters(block)}"
                                                 for op, block, shape in blocks)
                report["triton_kernels"] = sorted(set(kernels) - helpers)
                chosen = representatives(launches, args.full)
                report["triton_specialisations"] = len(launches)
                # longest compiles (large tiles, backward kernels) first: none ends last alone
                order = sorted(range(len(chosen)), key=lambda i: -chosen[i][0].tile_elements
                               * (3 if "backward" in chosen[i][0].fn.fn.__name__ else 1))
                for index, result in pool.imap_unordered(
                        _triton_job, [(i, chosen[i][0].job()) for i in order]):
                    results[index] = result
            except Exception as exc:  # e.g. an op module that no longer imports
                problems.append(f"Triton part failed: {type(exc).__name__}: {exc}\n"
                                + traceback.format_exc(limit=-3))
        for job in cuda_async:
            source, result = job.get()
            cuda_results[source] = result

    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    rows = triton_rows(chosen, results, dtypes) + cuda_rows(cuda_results)
    failures, waived = check_failures(rows)
    failures = problems + failures
    if cuda_reason and args.require_cuda:
        failures.insert(0, f"CUDA part skipped ({cuda_reason}) but --require-cuda was given")
    compile_s = [r["compile_s"] for r in rows if "compile_s" in r]
    report.update({
        "versions": versions(),
        "triton": {"skipped": triton_reason, "compiled": len(chosen),
                   "record_s": round(record_s, 1), "compile_job_s": round(sum(compile_s), 1)},
        "cuda": {"skipped": cuda_reason,
                 "sources": {s: {k: v for k, v in r.items() if k != "kernels"}
                             for s, r in cuda_results.items()}},
        "total_s": round(time.time() - start, 1),
        # CPU seconds of this process and its workers: what the run costs, however busy the
        # machine was (an idle machine needs about cpu_s / jobs of wall time)
        "cpu_s": round(cpu_seconds(), 1),
        "jobs": args.jobs,
        "failures": failures, "waived": waived, "kernels": rows,
    })
    if args.json:
        text = json.dumps(report, indent=1, default=str)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
        else:
            print(text)

    if args.check or failures:
        for line in waived:
            print(f"WAIVED {line}")
        for line in failures:
            print(f"FAIL {line}")
    triton_note = (f"skipped ({triton_reason})" if triton_reason else
                   f"{len(chosen)} compiled for {report.get('triton_specialisations', 0)} "
                   f"specialisations")
    cuda_note = (f"skipped ({cuda_reason})" if cuda_reason else
                 f"{len(cuda_sources)} sources through nvcc and ptxas")
    print(f"Triton: {triton_note}. CUDA: {cuda_note}. {report['total_s']:.0f} s "
          f"({report['cpu_s']:.0f} CPU s, {args.jobs} processes). {len(failures)} failure(s), "
          f"{len(waived)} waived." + (f" JSON: {args.out}" if args.json and args.out else ""))
    print(summary_table(rows))
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
