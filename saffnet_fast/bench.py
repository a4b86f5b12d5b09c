"""Speed measurement for saffnet_fast: fused-op providers, timing, result records.

Two users:
  * ``benchmarks/`` (pytest-benchmark) times each fused op (split-resplice, SCAFF, SAWF) at
    SAFFNet's own shapes with every *provider* that can run here: the eager reference,
    the reference under ``torch.compile``, the native extension and the Triton kernels.
    :func:`make_op_workload` builds one timed step; providers that have not landed or cannot
    run on this device raise :class:`ProviderUnavailable` with the reason, so the harness
    works on any install and picks the fast paths up as soon as they exist.
  * ``saffnet bench`` times the whole model (:func:`run_model_bench`): inference throughput
    and a mixed-precision training step, reference eager vs ``torch.compile`` vs the fast
    model, with HRNet-W32 for context, and prints speedup ratios (:func:`format_table`).

Nothing here asserts a speed: it measures and records (device, dtype, shape, versions, date,
git commit) so that results under ``benchmarks/results/`` say where they came from.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import importlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = [
    "OpCase",
    "OP_CASES",
    "OPS",
    "OP_MODES",
    "OP_PROVIDERS",
    "MODEL_PROVIDERS",
    "ProviderUnavailable",
    "OpWorkload",
    "make_reference_op",
    "make_op_workload",
    "op_min_bytes",
    "measure_copy_bandwidth",
    "measure_peak_memory",
    "synchronize",
    "raise_compile_limits",
    "machine_info",
    "time_callable",
    "ModelBenchConfig",
    "run_model_bench",
    "format_table",
    "save_result",
    "default_results_dir",
]

RESULT_SCHEMA = "saffnet_fast.bench/1"


# --------------------------------------------------------------------------------------
# Machine and provenance
# --------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit of the checkout holding ``path`` (default: this package), or None."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=where, capture_output=True, text=True, timeout=5)
        if dirty.returncode == 0 and dirty.stdout.strip():
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return commit


def machine_info(device: torch.device | str = "cpu") -> dict:
    """Where a measurement was taken: device name, CPU, versions, date, git commit."""
    import saffnet_fast as sf

    dev = torch.device(device)
    info = {
        "device": dev.type,
        "cpu_model": _cpu_model(),
        "cpu_cores": _cpu_cores(),
        "torch_threads": torch.get_num_threads(),
        # Other work on the machine during the run (the CPU figures depend on it).
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "saffnet_fast": sf.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "native_loaded": sf.has_native(),
        "native_build": sf.native_build_info(),
        "available_backends": sf.available_backends(dev),
    }
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info["device_name"] = torch.cuda.get_device_name(index)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_bytes"] = int(props.total_memory)
        info["gpu_sm_count"] = int(props.multi_processor_count)
    else:
        info["device_name"] = f"{info['cpu_model']} ({info['cpu_cores']} cores)"
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # triton is optional
        info["triton"] = None
    return info


def default_results_dir() -> Path | None:
    """``benchmarks/results`` of the checkout in the current directory, if there is one."""
    candidate = Path.cwd() / "benchmarks" / "results"
    return candidate if candidate.parent.is_dir() else None


# --------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------

def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], object], device: torch.device | str, *,
                  warmup: int = 3, min_run_time: float = 1.0, max_warmup: int = 30) -> dict:
    """Median time of ``fn()`` via ``torch.utils.benchmark.Timer.blocked_autorange``.

    At least ``warmup`` calls run first, more until the call time settles (lazy
    initialisation, compilation, autotuning, cuDNN algorithm search: see
    :func:`_warm_up`). The Timer synchronises CUDA around each block, so the median is of
    complete work, not of kernel launches.
    """
    from torch.utils import benchmark as tb

    warmup_calls = _warm_up(fn, device, warmup, max(warmup, max_warmup))
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return {
        "median_s": float(m.median),
        "iqr_s": float(m.iqr),
        "samples": len(m.times),
        "calls_per_sample": int(m.number_per_run),
        "warmup_calls": warmup_calls,
    }


def _warm_up(fn: Callable[[], object], device, min_calls: int, max_calls: int = 30,
             settle: float = 0.25, budget_s: float = 120.0) -> int:
    """Call ``fn`` until its time settles; return the number of calls.

    The first calls of a model are not representative and not only the very first one:
    oneDNN creates a primitive per new convolution shape (the first training step of SAFFNet
    on the CPU takes ~100× a settled one), cuDNN searches algorithms, compile autotunes.
    Stop after ``min_calls`` once two consecutive calls agree within ``settle``, after
    ``max_calls``, or once ``budget_s`` seconds were spent.
    """
    start = time.perf_counter()
    previous = None
    calls = 0
    while calls < max_calls:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        elapsed = time.perf_counter() - t0
        calls += 1
        settled = previous is not None and abs(elapsed - previous) <= settle * previous
        if calls >= min_calls and (settled or time.perf_counter() - start > budget_s):
            break
        previous = elapsed
    return calls


def measure_peak_memory(fn: Callable[[], object], device: torch.device | str) -> dict:
    """Peak allocator memory of one ``fn()`` call.

    CUDA: ``torch.cuda.max_memory_allocated`` around the call (``peak_bytes``) and its
    excess over what was allocated before (``peak_over_baseline_bytes``). CPU: not measured
    (tracemalloc sees Python allocations only, not ATen's), ``None`` with the reason.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return {"peak_bytes": None, "peak_over_baseline_bytes": None,
                "peak_note": "not measured on CPU: tracemalloc does not see ATen allocations"}
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    baseline = torch.cuda.memory_allocated(dev)
    fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    return {"peak_bytes": int(peak), "peak_over_baseline_bytes": int(peak - baseline)}


def measure_copy_bandwidth(device: torch.device | str, nbytes: int = 512 << 20,
                           repeats: int = 20) -> float:
    """Device copy bandwidth in bytes/s: ``x.clone()`` of ``nbytes``, read + write counted.

    The yardstick of the ops' achieved bandwidth, measured in the same run on the same
    device. CUDA events time each clone; the median is reported.
    """
    dev = torch.device(device)
    numel = nbytes // 4
    x = torch.empty(numel, dtype=torch.float32, device=dev).fill_(1.0)
    moved = 2 * numel * 4
    if dev.type == "cuda":
        for _ in range(3):
            x.clone()
        times = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            y = x.clone()
            end.record()
            torch.cuda.synchronize(dev)
            times.append(start.elapsed_time(end) / 1e3)
            del y
        return moved / statistics.median(times)
    x.clone()
    times = []
    for _ in range(max(3, repeats // 4)):
        t0 = time.perf_counter()
        y = x.clone()
        times.append(time.perf_counter() - t0)
        del y
    return moved / statistics.median(times)


def raise_compile_limits() -> None:
    """Let torch.compile keep one graph per benchmarked shape and dtype.

    The benchmarks compile the same module classes at many shapes; past dynamo's default
    recompile limit (8) it would silently run eager and the "compile" figures would lie.
    Raise the limit, and fail loudly if it is ever hit anyway.
    """
    import torch._dynamo.config as dcfg

    for name, value in (("recompile_limit", 1024), ("cache_size_limit", 1024),
                        ("accumulated_recompile_limit", 8192),
                        ("accumulated_cache_size_limit", 8192),
                        ("fail_on_recompile_limit_hit", True)):
        if hasattr(dcfg, name):
            setattr(dcfg, name, value)


# --------------------------------------------------------------------------------------
# Fused ops at SAFFNet's shapes
# --------------------------------------------------------------------------------------

OPS = ("split_resplice", "scaff", "sawf", "aff")
OP_MODES = ("forward", "backward", "forward_backward")
OP_PROVIDERS = ("reference", "compile", "native", "triton")
# In training mode BatchNorm on AFF's globally pooled N×C×1×1 map needs N ≥ 2.
MIN_TRAINING_BATCH = 2


@dataclasses.dataclass(frozen=True)
class OpCase:
    """One fused op at one of SAFFNet's feature-map shapes (256×192 input)."""

    op: str
    channels: int
    height: int
    width: int
    site: str

    @property
    def id(self) -> str:
        return f"{self.op}-{self.channels}x{self.height}x{self.width}"


OP_CASES: tuple[OpCase, ...] = (
    OpCase("split_resplice", 64, 64, 48, "SCBottle (layer1)"),
    OpCase("scaff", 64, 64, 48, "SAStem"),
    OpCase("scaff", 32, 64, 48, "SATransition branch 1"),
    OpCase("scaff", 64, 32, 24, "SATransition branch 2"),
    OpCase("scaff", 128, 16, 12, "SATransition branch 3"),
    OpCase("sawf", 32, 64, 48, "SAFuse 1/4"),
    OpCase("sawf", 64, 32, 24, "SAFuse 1/8"),
    OpCase("sawf", 128, 16, 12, "SAFuse 1/16"),
    OpCase("aff", 64, 64, 48, "drop-in AFF(x, residual), any model"),
)

# Names of the fast implementations, looked up at run time (they land independently).
_FUNCTION_MODULES = {"native": ("saffnet_fast.ops.native",),
                     "triton": ("saffnet_fast.ops.triton",)}
_FAST_MODULE_CLASSES = {"split_resplice": "FastSplitResplice", "scaff": "FastSCAFF",
                        "sawf": "FastSAWF", "aff": "FastAFF"}
# Further full-size inputs of an op besides x (AFF's residual).
_EXTRA_INPUTS = {"aff": 1}


class ProviderUnavailable(RuntimeError):
    """A provider cannot run here; the message says why (used as the pytest skip reason)."""


def make_reference_op(op: str, channels: int, seed: int = 0) -> nn.Module:
    """The reference module of ``op`` with deterministic, non-trivial parameters.

    BN running statistics and affine parameters are randomised so that inference-mode BN
    folding does real work and no gate saturates trivially.
    """
    from .nn import reference as ref

    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    gen = torch.Generator().manual_seed(seed)
    module = {"split_resplice": ref.SplitResplice, "scaff": ref.SCAFF,
              "sawf": ref.SAWF, "aff": ref.AFF}[op](channels)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return module


def _find_op_function(provider: str, op: str) -> tuple[Callable | None, Callable | None]:
    """(``<provider>_<op>``, its module's ``unsupported_reason`` or None), found at run time."""
    name = f"{provider}_{op}"
    for module_name in _FUNCTION_MODULES[provider]:
        for candidate in (f"{module_name}.{op}", module_name):
            try:
                mod = importlib.import_module(candidate)
            except ImportError:
                continue
            fn = getattr(mod, name, None)
            if callable(fn):
                reason = getattr(mod, "unsupported_reason", None)
                return fn, reason if callable(reason) else None
    return None, None


def _fast_module(provider: str, op: str, module: nn.Module) -> nn.Module | None:
    """``saffnet_fast.nn.fast.Fast*`` with ``backend=provider`` and the reference weights."""
    try:
        fast = importlib.import_module("saffnet_fast.nn.fast")
    except ImportError:
        return None
    cls = getattr(fast, _FAST_MODULE_CLASSES[op], None)
    if cls is None:
        return None
    from_reference = getattr(cls, "from_reference", None)
    if callable(from_reference):
        return from_reference(module, backend=provider)
    instance = cls(module.channels, backend=provider)
    instance.load_state_dict(module.state_dict())
    return instance


def op_function(provider: str, op: str, module: nn.Module,
                device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable ``f(x, *extra)`` computing ``op`` with ``module``'s weights through
    ``provider`` (``extra``: AFF's residual).

    Raises :class:`ProviderUnavailable` (with the reason) when the provider cannot run here.
    """
    from . import backend as be

    dev = torch.device(device)
    if provider == "reference":
        return module
    if provider == "compile":
        raise_compile_limits()
        return torch.compile(module, dynamic=False)
    if provider not in ("native", "triton"):
        raise ValueError(f"provider: expected one of {OP_PROVIDERS}, got {provider!r}")
    if provider == "triton" and dev.type != "cuda":
        # The interpreter (TRITON_INTERPRET=1) runs Triton kernels on the CPU for testing;
        # its speed means nothing.
        raise ProviderUnavailable("triton: Triton kernels are timed on CUDA devices only")
    unavailable = getattr(be, "backend_unavailable_reason", None)
    if unavailable is not None:
        reason = unavailable(provider, dev)
    else:  # older backend.py
        reason = be._native_reason(dev) if provider == "native" else be._triton_reason(dev)
    if reason is not None:
        raise ProviderUnavailable(f"{provider}: {reason}")
    fn, _ = _find_op_function(provider, op)
    if fn is not None:
        return functools.partial(fn, module)
    fast = _fast_module(provider, op, module)
    if fast is not None:
        return fast.to(dev)
    raise ProviderUnavailable(
        f"{provider}: neither {_FUNCTION_MODULES[provider][0]}.{provider}_{op} nor "
        f"saffnet_fast.nn.fast.{_FAST_MODULE_CLASSES[op]} exists in this install")


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def op_min_bytes(activation_bytes: int, param_bytes: int, mode: str, inputs: int = 1) -> int:
    """Minimum memory traffic of one call: each input read once, each output written once.

    Every op maps ``inputs`` N×C×H×W tensors (1; AFF: x and residual) to one N×C×H×W output
    (``activation_bytes`` each).
      * forward: read the inputs and the weights, write y;
      * backward: read the inputs (saved), dy and the weights, write the input and weight
        gradients;
      * forward_backward: both of the above.
    """
    if mode == "forward":
        return (inputs + 1) * activation_bytes + param_bytes
    if mode == "backward":
        return (2 * inputs + 1) * activation_bytes + 2 * param_bytes
    if mode == "forward_backward":
        return (3 * inputs + 2) * activation_bytes + 3 * param_bytes
    raise ValueError(f"mode: expected one of {OP_MODES}, got {mode!r}")


@dataclasses.dataclass
class OpWorkload:
    """One timed step: ``step()`` runs the op's forward, backward or both, synchronised."""

    case: OpCase
    provider: str
    mode: str
    batch: int
    dtype: torch.dtype
    device: torch.device
    step: Callable[[], object]
    min_bytes: int
    info: dict


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def make_op_workload(case: OpCase, provider: str, mode: str, batch: int,
                     dtype: torch.dtype | str, device: torch.device | str,
                     seed: int = 0) -> OpWorkload:
    """Build the module, input (and output gradient) and the timed step for one benchmark.

    ``forward`` runs in inference mode (module.eval(), no_grad: BN folded, Dropout off);
    ``backward`` and ``forward_backward`` run in training mode and compute the gradients of
    the input and every parameter (``torch.autograd.grad``, so nothing accumulates between
    calls). ``backward`` alone re-uses one recorded graph (``retain_graph=True``).
    One untimed call checks that the provider runs at all; a provider that fails raises
    :class:`ProviderUnavailable` with the error, so it is skipped with the reason.
    """
    if mode not in OP_MODES:
        raise ValueError(f"mode: expected one of {OP_MODES}, got {mode!r}")
    if batch < 1:
        raise ValueError(f"batch: expected a positive int, got {batch}")
    if mode != "forward" and batch < MIN_TRAINING_BATCH:
        raise ValueError(f"batch: training modes need batch ≥ {MIN_TRAINING_BATCH} (AFF's "
                         f"global branch batch-normalises pooled 1×1 maps), got {batch}")
    dtype = parse_dtype(dtype)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProviderUnavailable("device cuda requested but no CUDA device is available")
    torch.manual_seed(seed)
    module = make_reference_op(case.op, case.channels, seed).to(device=dev, dtype=dtype)
    module.train(mode != "forward")
    fn = op_function(provider, case.op, module, dev)
    x = torch.randn(batch, case.channels, case.height, case.width, device=dev, dtype=dtype)
    extra = [torch.randn_like(x) for _ in range(_EXTRA_INPUTS.get(case.op, 0))]
    if provider in ("native", "triton"):
        # Checked once here, not inside the timed call.
        _, unsupported_reason = _find_op_function(provider, case.op)
        reason = unsupported_reason(module, x) if unsupported_reason is not None else None
        if reason:
            raise ProviderUnavailable(f"{provider}: {reason}")
    params = [p for p in module.parameters() if p.requires_grad]
    activation_bytes = x.numel() * x.element_size()
    min_bytes = op_min_bytes(activation_bytes, _param_bytes(module), mode, 1 + len(extra))

    def guarded(call: Callable[[], object]) -> None:
        try:
            call()
            synchronize(dev)
        except ProviderUnavailable:
            raise
        except Exception as exc:  # not implemented for this dtype/mode, or missing kernel
            if provider == "reference":  # the oracle must run: a failure here is a bug
                raise
            text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            raise ProviderUnavailable(f"{provider} failed on {case.id} {mode} "
                                      f"{str(dtype).replace('torch.', '')}: {text}") from exc

    if mode == "forward":
        def step():
            with torch.no_grad():
                y = fn(x, *extra)
            synchronize(dev)
            return y
        guarded(step)
    else:
        for t in (x, *extra):
            t.requires_grad_(True)
        inputs = [x, *extra, *params]
        grad_out = torch.randn_like(x)
        if mode == "forward_backward":
            def step():
                y = fn(x, *extra)
                grads = torch.autograd.grad(y, inputs, grad_out)
                synchronize(dev)
                return grads
            guarded(step)
        else:
            graph: dict = {}

            def record():
                graph["y"] = fn(x, *extra)
            guarded(record)

            def step():
                grads = torch.autograd.grad(graph["y"], inputs, grad_out, retain_graph=True)
                synchronize(dev)
                return grads
            guarded(step)

    info = {
        "op": case.op, "site": case.site, "channels": case.channels,
        "height": case.height, "width": case.width, "batch": batch,
        "shape": [batch, case.channels, case.height, case.width],
        "dtype": str(dtype).replace("torch.", ""), "mode": mode, "provider": provider,
        "device": dev.type, "min_bytes": min_bytes,
    }
    return OpWorkload(case, provider, mode, batch, dtype, dev, step, min_bytes, info)


# --------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------

# eager: reference modules, eager; compile: the same under torch.compile; fast: backend
# 'auto' (native / triton where they run); fast_optimized: fast after
# optimize_for_inference; fast_optimized_cudagraphs: the same with CUDA graphs (GPU only);
# fast_optimized_compile: fast_optimized under torch.compile (the fused ops stay opaque
# custom ops, inductor compiles the HRNet convolutions and everything between them);
# hrnet_w32: the baseline HRNet-W32, eager, for context.
MODEL_PROVIDERS = ("eager", "compile", "fast", "fast_optimized", "fast_optimized_cudagraphs",
                   "fast_optimized_compile", "hrnet_w32")
_COMPILED_PROVIDERS = ("compile", "fast_optimized_compile")
_TRAIN_PROVIDERS = ("eager", "compile", "fast", "hrnet_w32")


@dataclasses.dataclass
class ModelBenchConfig:
    device: str = "cpu"
    input_size: tuple[int, int] = (256, 192)
    batches: tuple[int, ...] = (1, 32, 64)
    dtypes: tuple[str, ...] = ("float32", "float16")
    providers: tuple[str, ...] = MODEL_PROVIDERS
    train: bool = True
    train_batch: int = 32
    min_run_time: float = 1.0
    warmup: int = 3
    max_warmup: int = 30
    model: str = "saffnet"
    num_joints: int = 17
    threads: int | None = None
    preset: str = "full"

    @classmethod
    def preset_config(cls, preset: str, device: str) -> "ModelBenchConfig":
        """``full`` (256×192, batch 1/32/64, training at 32), ``quick`` (128×96, batch 1 and
        8, training at 8) and ``tiny`` (64×64, batch 1 and 2: for the tests)."""
        cuda = torch.device(device).type == "cuda"
        dtypes = ("float32", "float16") if cuda else ("float32",)
        if preset == "full":
            return cls(device=device, dtypes=dtypes, preset=preset)
        if preset == "quick":
            return cls(device=device, input_size=(128, 96), batches=(1, 8), dtypes=dtypes,
                       train_batch=8, min_run_time=0.5, warmup=2, preset=preset)
        if preset == "tiny":
            return cls(device=device, input_size=(64, 64), batches=(1, 2), dtypes=dtypes,
                       train_batch=2, min_run_time=0.05, warmup=1, max_warmup=3,
                       preset=preset)
        raise ValueError(f"preset: expected full, quick or tiny, got {preset!r}")


def _require_models():
    try:
        return importlib.import_module("saffnet_fast.models")
    except ImportError as exc:
        raise RuntimeError(
            "saffnet bench needs saffnet_fast.models.build_model, which is not importable "
            f"in this install ({exc})") from exc


def _build(models, name: str, backend: str | None, cfg: ModelBenchConfig) -> nn.Module:
    return models.build_model(name, backend=backend, input_size=tuple(cfg.input_size),
                              num_joints=cfg.num_joints)


def calibrate_batchnorm_(model: nn.Module, input_size: tuple[int, int], batch: int = 4,
                         seed: int = 0) -> nn.Module:
    """Set every BN's running statistics to those of one random batch (in place).

    Why: freshly built models use the paper's init (conv weights with std 0.001) and BN
    running statistics (0, 1), so in eval mode each conv shrinks activations ~1000×: within
    a few layers they are subnormal floats, which x86 CPUs process 10-100× slower, and the
    timings would measure that artefact instead of the model. A trained model's BN statistics
    match its activations; calibrating them on one batch restores activations of order 1.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: exactly this batch's statistics
    was_training = model.training
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *input_size, generator=gen).to(device)
    model.train()
    with torch.no_grad():
        model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return model


def _calibrated_weights(models, name: str, cfg: ModelBenchConfig) -> dict:
    """State dict of the reference ``name`` with calibrated BN (shared by all providers)."""
    model = _build(models, name, "reference", cfg)
    return calibrate_batchnorm_(model, tuple(cfg.input_size)).state_dict()


def _optimize(model: nn.Module, example: torch.Tensor, cuda_graphs: bool) -> nn.Module:
    """Call ``saffnet_fast.convert.optimize_for_inference`` with the arguments it takes."""
    try:
        convert = importlib.import_module("saffnet_fast.convert")
    except ImportError as exc:
        raise ProviderUnavailable(f"saffnet_fast.convert is not importable ({exc})") from exc
    optimize = getattr(convert, "optimize_for_inference", None)
    if optimize is None:
        raise ProviderUnavailable("saffnet_fast.convert.optimize_for_inference does not exist")
    params = inspect.signature(optimize).parameters
    kwargs = {}
    graph_names = [n for n in ("cuda_graphs", "cuda_graph", "use_cuda_graphs") if n in params]
    if graph_names:
        kwargs[graph_names[0]] = cuda_graphs
    elif cuda_graphs:
        raise ProviderUnavailable("optimize_for_inference takes no cuda_graphs argument")
    for name in ("example_input", "example_inputs", "sample_input"):
        if name in params:
            kwargs[name] = example if name != "example_inputs" else (example,)
            break
    return optimize(model, **kwargs)


def _model_factory(provider: str, models, cfg: ModelBenchConfig, dev: torch.device,
                   dtype: torch.dtype, example: torch.Tensor, training: bool,
                   weights: dict):
    """(model, resolved backend) for one provider; raises ProviderUnavailable.

    ``weights`` maps a model name to its calibrated state dict: every provider of one model
    runs the same weights.
    """
    from .backend import resolve_backend

    def build(name, backend):
        if name not in weights:
            weights[name] = _calibrated_weights(models, name, cfg)
        model = _build(models, name, backend, cfg)
        model.load_state_dict(weights[name])
        return model.to(dev, dtype)

    if provider == "hrnet_w32":
        return build("hrnet_w32", "reference"), "reference"
    if provider in ("eager", "compile"):
        model = build(cfg.model, "reference")
        if provider == "compile":
            raise_compile_limits()
            model = torch.compile(model)
        return model, "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # auto's fallback note: recorded below
        resolved = resolve_backend("auto", dev)
    model = build(cfg.model, "auto")
    if provider == "fast":
        return model, resolved
    if training:
        raise ProviderUnavailable(f"{provider}: inference only")
    if provider == "fast_optimized_cudagraphs" and dev.type != "cuda":
        raise ProviderUnavailable("CUDA graphs need a CUDA device")
    model.eval()
    model = _optimize(model, example, provider == "fast_optimized_cudagraphs")
    if provider == "fast_optimized_compile":  # what optimize_for_inference(compile=True) does
        raise_compile_limits()
        model = torch.compile(model)
    return model, resolved


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def _record(section, provider, backend, dtype_name, batch, cfg, timing=None, memory=None,
            status="ok", reason=None) -> dict:
    rec = {
        "section": section,
        "model": "hrnet_w32" if provider == "hrnet_w32" else cfg.model,
        "provider": provider,
        "backend": backend,
        "dtype": dtype_name,
        "batch": batch,
        "input_size": list(cfg.input_size),
        "status": status,
        "reason": reason,
        "median_s": None,
        "iqr_s": None,
        "samples": None,
        "images_per_s": None,
    }
    if timing is not None:
        rec.update(timing)
        rec["images_per_s"] = batch / timing["median_s"]
    if memory is not None:
        rec["peak_bytes"] = memory.get("peak_bytes")
    return rec


def _measure(section, provider, precision, batch, cfg, dev, log, label, prepare) -> dict:
    """Time the callable that ``prepare(found)`` builds (it may set ``found["backend"]``) and
    return its record; a provider that cannot run is recorded as skipped, any other failure
    as an error. Compiled graphs are freed afterwards so the next provider starts clean."""
    found = {"backend": None}
    try:
        call = prepare(found)
        timing = time_callable(call, dev, warmup=cfg.warmup, min_run_time=cfg.min_run_time,
                               max_warmup=cfg.max_warmup)
        memory = measure_peak_memory(call, dev)
    except ProviderUnavailable as exc:
        log(f"  skip {section} {label}: {exc}")
        return _record(section, provider, found["backend"], precision, batch, cfg,
                       status="skipped", reason=str(exc))
    except Exception as exc:
        log(f"  error {section} {label}: {_error_text(exc)}")
        return _record(section, provider, found["backend"], precision, batch, cfg,
                       status="error", reason=_error_text(exc))
    finally:
        if provider in _COMPILED_PROVIDERS:  # free the compiled graphs before the next one
            torch._dynamo.reset()
    log(f"  {section:9s} {provider:26s} {precision:8s} b{batch:<3d} "
        f"{timing['median_s'] * 1e3:10.2f} ms  {batch / timing['median_s']:9.1f} img/s")
    return _record(section, provider, found["backend"], precision, batch, cfg, timing, memory)


def _bench_inference(models, cfg, dev, dtype_name, batch, provider, log, weights) -> dict:
    dtype = parse_dtype(dtype_name)
    h, w = cfg.input_size

    def prepare(found):
        x = torch.randn(batch, 3, h, w, device=dev, dtype=dtype)
        if provider.startswith("fast_optimized"):
            # optimize_for_inference switches the model to channels_last: feed it that way.
            x = x.contiguous(memory_format=torch.channels_last)
        model, found["backend"] = _model_factory(provider, models, cfg, dev, dtype, x,
                                                 training=False, weights=weights)
        model.eval()

        def call():
            with torch.inference_mode():
                return model(x)
        return call

    return _measure("inference", provider, dtype_name, batch, cfg, dev, log,
                    f"{provider} {dtype_name} b{batch}", prepare)


def _bench_training(models, cfg, dev, provider, log, weights) -> dict:
    """One optimiser step (Adam) on MSE to random heatmaps, mixed precision.

    CUDA: float16 autocast + GradScaler ("amp_float16"). CPU: float32 (bfloat16 autocast
    on CPU is optional in the spec and not timed here).
    """
    import torch.nn.functional as F

    batch = cfg.train_batch
    h, w = cfg.input_size
    cuda = dev.type == "cuda"
    precision = "amp_float16" if cuda else "float32"
    x = torch.randn(batch, 3, h, w, device=dev)

    def prepare(found):
        model, found["backend"] = _model_factory(provider, models, cfg, dev, torch.float32,
                                                 x, training=True, weights=weights)
        model.train()
        with torch.no_grad():
            target = torch.rand_like(model(x).float())
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cuda") if cuda else None

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=cuda):
                out = model(x)
            loss = F.mse_loss(out.float(), target)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            return loss
        return step

    return _measure("training", provider, precision, batch, cfg, dev, log, provider, prepare)


def _add_speedups(records: list[dict]) -> None:
    """speedup_vs_eager / speedup_vs_compile within each (section, dtype, batch) group."""
    groups: dict[tuple, dict[str, dict]] = {}
    for rec in records:
        groups.setdefault((rec["section"], rec["dtype"], rec["batch"]), {})[rec["provider"]] = rec
    for group in groups.values():
        for rec in group.values():
            for base, key in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
                ref = group.get(base)
                ok = rec["status"] == "ok" and ref is not None and ref["status"] == "ok"
                rec[key] = ref["median_s"] / rec["median_s"] if ok else None


def run_model_bench(cfg: ModelBenchConfig, log: Callable[[str], None] | None = None,
                    on_partial: Callable[[dict], None] | None = None) -> dict:
    """Time every requested provider; return ``{"schema", "meta", "config", "results"}``.

    ``on_partial`` gets the result so far (``"partial": True``) after each measurement, so a
    caller can keep what finished when a time limit stops the run."""
    # cfg.threads sets process-wide torch state: give the caller back its own thread count.
    threads_before = torch.get_num_threads()
    try:
        return _run_model_bench(cfg, log, on_partial)
    finally:
        torch.set_num_threads(threads_before)


def _run_model_bench(cfg: ModelBenchConfig, log: Callable[[str], None] | None = None,
                     on_partial: Callable[[dict], None] | None = None) -> dict:
    log = log or (lambda line: None)
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' requested but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu or cuda, got {cfg.device!r}")
    unknown = [p for p in cfg.providers if p not in MODEL_PROVIDERS]
    if unknown:
        raise ValueError(f"providers: unknown {unknown}; expected some of {MODEL_PROVIDERS}")
    for name in cfg.dtypes:
        parse_dtype(name)
        if name == "float16" and dev.type != "cuda":
            raise ValueError("dtypes: float16 inference is benchmarked on CUDA only")
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise ValueError(f"threads: expected a positive int, got {cfg.threads}")
        torch.set_num_threads(cfg.threads)
    models = _require_models()
    meta = machine_info(dev)
    log(f"saffnet bench on {meta['device_name']} (torch {meta['torch']}, "
        f"saffnet_fast {meta['saffnet_fast']}, backends {meta['available_backends']})")
    records = []
    weights: dict = {}
    config = dataclasses.asdict(cfg)

    def record(rec: dict) -> None:
        records.append(rec)
        if on_partial is not None:
            rows = [dict(r) for r in records]
            _add_speedups(rows)
            on_partial({"schema": RESULT_SCHEMA, "kind": "model", "partial": True,
                        "meta": meta, "config": config, "results": rows})

    torch.manual_seed(0)
    # The fast modules warn (once per process) when a block falls back to the reference
    # path; keep those lines in the record: they say what "fast" actually ran.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for dtype_name in cfg.dtypes:
            for batch in cfg.batches:
                for provider in cfg.providers:
                    record(_bench_inference(models, cfg, dev, dtype_name, batch, provider,
                                            log, weights))
        if cfg.train:
            for provider in cfg.providers:
                if provider in _TRAIN_PROVIDERS:
                    record(_bench_training(models, cfg, dev, provider, log, weights))
    notes = []
    for w in caught:
        text = str(w.message).splitlines()[0][:400]
        if issubclass(w.category, RuntimeWarning) and text not in notes:
            notes.append(text)
    meta["fallback_warnings"] = notes
    for text in notes:
        log(f"  note: {text}")
    _add_speedups(records)
    return {"schema": RESULT_SCHEMA, "kind": "model", "meta": meta, "config": config,
            "results": records}


def format_table(result: dict) -> str:
    """A plain-text table: median, throughput and speedups per (section, dtype, batch)."""
    meta = result["meta"]
    lines = [f"device: {meta['device_name']} | torch {meta['torch']} | saffnet_fast "
             f"{meta['saffnet_fast']} | {meta['date']} | commit {meta.get('git_commit')}"]
    header = (f"{'section':9s} {'dtype':11s} {'batch':>5s} {'input':>7s} {'provider':26s} "
              f"{'backend':9s} {'median ms':>10s} {'img/s':>9s} {'x eager':>7s} "
              f"{'x compile':>9s}")
    lines += [header, "-" * len(header)]

    def ratio(v):
        return f"{v:.2f}" if v is not None else "-"

    for rec in result["results"]:
        size = "x".join(str(s) for s in rec["input_size"])
        if rec["status"] != "ok":
            lines.append(f"{rec['section']:9s} {rec['dtype']:11s} {rec['batch']:5d} {size:>7s} "
                         f"{rec['provider']:26s} {rec['status']}: {rec['reason']}")
            continue
        lines.append(
            f"{rec['section']:9s} {rec['dtype']:11s} {rec['batch']:5d} {size:>7s} "
            f"{rec['provider']:26s} {str(rec['backend']):9s} {rec['median_s'] * 1e3:10.2f} "
            f"{rec['images_per_s']:9.1f} {ratio(rec.get('speedup_vs_eager')):>7s} "
            f"{ratio(rec.get('speedup_vs_compile')):>9s}")
    return "\n".join(lines)


def save_result(result: dict, path: str | os.PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # atomic: a reader never sees half a file
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def result_filename(result: dict) -> str:
    meta = result["meta"]
    stamp = meta["date"].replace(":", "").replace("-", "")[:15]
    return f"model-{meta['device']}-{result['config'].get('preset', 'custom')}-{stamp}.json"


def parse_int_list(text: str, argument: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{argument}: expected comma-separated positive ints, got {text!r}")
    return values


def parse_input_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--input: expected HxW such as 256x192, got {text!r}") from None
    if h < 32 or w < 32 or h % 32 or w % 32:
        raise ValueError(f"--input: expected H and W multiples of 32 (≥ 32), got {text!r}")
    return h, w
