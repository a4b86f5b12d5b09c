"""The fused ops at SAFFNet's shapes, each timed through every provider that runs here.

``benchmarks/`` (pytest-benchmark) times each fused op (split-resplice, SCAFF, SAWF, AFF) at
SAFFNet's own shapes with every *provider*: the eager reference, the reference under
``torch.compile``, the native extension and the Triton kernels. :func:`make_op_workload`
builds one timed step; a provider that cannot run on this device or dtype raises
:class:`ProviderUnavailable` with the reason, so the harness works on any install.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
from torch import nn

from ..backend import BackendUnavailableError, backend_unavailable_reason
from ..nn import reference as ref
from ..fast import FAST_FROM_REFERENCE, select_implementation
from .results import ProviderUnavailable, error_text, parse_dtype
from .timing import raise_compile_limits, synchronize

__all__ = ["OPS", "OP_MODES", "OP_PROVIDERS", "MIN_TRAINING_BATCH", "OpCase", "OP_CASES",
           "OpWorkload", "make_reference_op", "op_function", "op_min_bytes", "make_op_workload"]


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

# Further full-size inputs of an op besides x (AFF's residual).
_EXTRA_INPUTS = {"aff": 1}


def make_reference_op(op: str, channels: int, seed: int = 0) -> nn.Module:
    """The reference module of ``op`` with deterministic, non-trivial parameters.

    BN running statistics and affine parameters are randomised so that inference-mode BN
    folding does real work and no gate saturates trivially.
    """
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


def op_function(provider: str, op: str, module: nn.Module,
                x: torch.Tensor) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    """``(timed_module, f)``: ``f(x, *extra)`` computes ``op`` with ``module``'s weights
    through ``provider`` (``extra``: AFF's residual); ``timed_module`` holds the parameters
    ``f`` uses (``module`` itself, or the fast module built from it).

    native / triton: the implementation that the fast module with ``backend=provider``
    selects for ``x``, called directly. The selection (which asks the backend whether it
    can serve this module and input) is made once here instead of on every timed call, so
    the figures are those of the implementation; ``saffnet bench`` times the whole model
    with its per-call dispatch. Raises :class:`ProviderUnavailable` (with the reason) when
    the provider cannot run here.
    """
    dev = x.device
    if provider == "reference":
        return module, module
    if provider == "compile":
        raise_compile_limits()
        return module, torch.compile(module, dynamic=False)
    if provider not in ("native", "triton"):
        raise ValueError(f"provider: expected one of {OP_PROVIDERS}, got {provider!r}")
    if provider == "triton" and dev.type != "cuda":
        # The interpreter (TRITON_INTERPRET=1) runs Triton kernels on the CPU for testing;
        # its speed means nothing.
        raise ProviderUnavailable("triton: Triton kernels are timed on CUDA devices only")
    reason = backend_unavailable_reason(provider, dev)
    if reason is not None:
        raise ProviderUnavailable(f"{provider}: {reason}")
    # Construction draws initial weights that load_state_dict replaces: keep the global
    # generator where it was, so every provider gets the same output gradient.
    with torch.random.fork_rng(devices=[]):
        fast = FAST_FROM_REFERENCE[type(module)](module.channels, backend=provider)
    fast.load_state_dict(module.state_dict())
    fast.to(device=dev, dtype=x.dtype).train(module.training)
    try:
        _, implementation = select_implementation(op, provider, fast, x)
    except BackendUnavailableError as exc:
        raise ProviderUnavailable(f"{provider}: {exc}") from exc
    return fast, functools.partial(implementation, fast)


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
    x = torch.randn(batch, case.channels, case.height, case.width, device=dev, dtype=dtype)
    extra = [torch.randn_like(x) for _ in range(_EXTRA_INPUTS.get(case.op, 0))]
    module, fn = op_function(provider, case.op, module, x)
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
            raise ProviderUnavailable(f"{provider} failed on {case.id} {mode} "
                                      f"{str(dtype).replace('torch.', '')}: "
                                      f"{error_text(exc)}") from exc

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
