"""Swap SAFFNet's reference blocks for their fast versions inside any model, and prepare a
model for inference.

* :func:`convert` changes, in place, the class of every *exact* reference block
  (AFF, CoordAttention, SCAFF, SAWF, SplitResplice) to its ``Fast*`` subclass. Nothing else
  changes: the same parameter and buffer objects (so an optimizer built before still holds
  them), hooks, ``requires_grad`` flags and train/eval state. ``backend="reference"`` swaps
  them back.
* :func:`fold_batchnorm` folds every Conv2d+BatchNorm2d pair whose composition it can prove
  (consecutive in a plain ``nn.Sequential``, or a pair declared by the block) into the conv
  and replaces the BatchNorm by ``nn.Identity``.
* :func:`optimize_for_inference` = eval + convert + fold + channels_last (+ a CUDA graph).

``from saffnet_fast import convert, optimize_for_inference`` gives the two functions.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import backend as _backend
from . import dispatch as _dispatch
from .bn import fold_bn
from .modules import FAST_FROM_REFERENCE, REFERENCE_FROM_FAST

__all__ = [
    "convert",
    "fold_batchnorm",
    "fold_conv_bn_",
    "optimize_for_inference",
    "register_conv_bn_pairs",
    "CUDAGraphModule",
]


def _check_module(model, name: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: expected a torch.nn.Module, got {type(model).__name__}")


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Swap SAFFNet's reference blocks inside ``model`` (the root included) for the fast ones,
    in place, and return ``model``.

    ``backend="auto"`` leaves the choice to :func:`saffnet_fast.use_backend` /
    ``SAFFNET_BACKEND`` / auto at each call; ``"native"`` or ``"triton"`` pins it (an error is
    raised at the forward call when it cannot serve the input); ``"reference"`` swaps every
    fast block back to its reference class. Blocks nested inside a converted block (the
    CoordAttention and AFF inside a SCAFF) stay reference: the fused op covers the whole
    block.
    """
    _check_module(model)
    backend = _backend.validate_backend(backend)
    if backend == "reference":
        for module in model.modules():
            ref_cls = REFERENCE_FROM_FAST.get(type(module))
            if ref_cls is not None:
                module.__class__ = ref_cls
                module.__dict__.pop("backend", None)
                module.__dict__.pop("_bn_folded", None)
                module.__dict__.pop("_fast_key", None)
        return model
    stored = None if backend == "auto" else backend

    def visit(module: nn.Module) -> None:
        fast_cls = FAST_FROM_REFERENCE.get(type(module))
        if fast_cls is not None:
            # The fast class is a subclass adding only ``backend``: swapping the class keeps
            # every parameter, buffer and hook object as it is.
            module.__class__ = fast_cls
            module.backend = stored
            _dispatch.register_fast_module(module)
            return
        if type(module) in REFERENCE_FROM_FAST:
            module.backend = stored
            return
        for child in module.children():
            visit(child)

    visit(model)
    return model


# --------------------------------------------------------------------------- BN folding

# Blocks whose forward applies ``bn`` directly to ``conv``'s output (and uses the conv's
# output nowhere else), so conv+bn folds, declare it with a class attribute
# ``conv_bn_pairs = (("conv1", "bn1"), ...)`` (SAFFNet's and HRNet's blocks do), or, for
# classes one cannot edit, with register_conv_bn_pairs. Attribute names alone prove nothing
# (pre-activation blocks apply bn1 *before* conv1), so nothing is folded by name guessing.
_CONV_BN_PAIRS: Dict[type, Tuple[Tuple[str, str], ...]] = {}


def register_conv_bn_pairs(cls: type, pairs: Iterable[Tuple[str, str]]) -> None:
    """Declare that ``cls.forward`` computes ``bn(conv(...))`` for each ``(conv, bn)`` pair of
    attribute names, with the conv output used nowhere else."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"cls: expected an nn.Module subclass, got {cls!r}")
    _CONV_BN_PAIRS[cls] = tuple((str(c), str(b)) for c, b in pairs)


def _pairs_of(module: nn.Module) -> Sequence[Tuple[str, str]]:
    declared = getattr(type(module), "conv_bn_pairs", None)
    if declared is not None:
        return declared
    return _CONV_BN_PAIRS.get(type(module), ())


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


@torch.no_grad()
def fold_conv_bn_(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode ``bn`` into ``conv`` in place: bn(conv(x)) == conv'(x). The folding is
    computed in float32 (float64 for float64 weights) and stored in the weights' dtype."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn: expected a BatchNorm with running statistics "
                         "(track_running_stats=True) to fold")
    if conv.out_channels != bn.num_features:
        raise ValueError(f"bn: expected {conv.out_channels} features to match the conv, "
                         f"got {bn.num_features}")
    w = conv.weight
    weight, bias = fold_bn(conv, bn, torch.float64 if w.dtype == torch.float64 else torch.float32)
    conv.weight = nn.Parameter(weight.to(w.dtype), requires_grad=w.requires_grad)
    conv.bias = nn.Parameter(bias.to(w.dtype), requires_grad=w.requires_grad)


def _can_fold(conv, bn) -> bool:
    return (type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d)
            and bn.running_mean is not None and conv.out_channels == bn.num_features)


def fold_batchnorm(model: nn.Module, skip: Optional[Callable[[nn.Module], bool]] = None) -> int:
    """Fold every provable Conv2d+BatchNorm2d pair of ``model`` (in eval semantics) and
    replace the BatchNorm with ``nn.Identity``. Returns the number of pairs folded.

    ``skip(module)`` returning True leaves that module's subtree untouched. Blocks that
    contain a folded BN get ``_bn_folded = True`` set on the nearest fast block above them.
    """
    _check_module(model)
    if model.training:
        raise ValueError("model: fold_batchnorm needs a model in eval mode (call model.eval(); "
                         "a folded BatchNorm no longer uses batch statistics)")
    folded = 0

    def visit(module: nn.Module, owner: Optional[nn.Module]) -> None:
        nonlocal folded
        if skip is not None and skip(module):
            return
        if type(module) in REFERENCE_FROM_FAST:
            owner = module
        count_before = folded
        if _is_plain_sequential(module):
            names = list(module._modules.keys())
            for a, b in zip(names, names[1:]):
                conv, bn = module._modules[a], module._modules[b]
                if _can_fold(conv, bn):
                    fold_conv_bn_(conv, bn)
                    module._modules[b] = nn.Identity().train(bn.training)
                    folded += 1
        for conv_name, bn_name in _pairs_of(module):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if _can_fold(conv, bn):
                fold_conv_bn_(conv, bn)
                setattr(module, bn_name, nn.Identity().train(bn.training))
                folded += 1
        if owner is not None and folded > count_before:
            owner._bn_folded = True
        for child in module.children():
            visit(child, owner)

    visit(model, None)
    return folded


# --------------------------------------------------------------------------- inference


def _first_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 2e-2)


class CUDAGraphModule(nn.Module):
    """A model captured in a CUDA graph for one input shape; calling it copies the input into
    the captured buffer, replays the graph and returns a copy of the output."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, warmup: int = 3):
        super().__init__()
        self.model = model
        self.static_input = example_input.detach().clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(warmup):  # lets lazy init, autotuning and cudnn choices settle
                model(self.static_input)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.static_output = model(self.static_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.static_input.shape or not x.is_floating_point():
            raise ValueError(
                f"x: the CUDA graph was captured for shape {tuple(self.static_input.shape)} "
                f"(floating point), got {tuple(x.shape)} {x.dtype}")
        self.static_input.copy_(x)  # also casts to the captured dtype and memory format
        self.graph.replay()
        return self.static_output.clone()


_INFERENCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def optimize_for_inference(model: nn.Module, *, channels_last: bool = True,
                           cuda_graph: bool = False,
                           example_input: Optional[torch.Tensor] = None,
                           backend: str = "auto", compile: bool = False,
                           dtype: Optional[torch.dtype] = None,
                           cudnn_benchmark: bool = True):
    """Prepare ``model`` (in place) for inference and return it.

    Steps: eval mode; :func:`convert` to the fast blocks with ``backend``; fold Conv+BN pairs
    (inside a fused block only when the native backend will not serve it, since the native
    kernels fold BN themselves and read the BatchNorm modules); parameters frozen
    (``requires_grad=False``); channels_last memory format.
    With ``example_input`` the result is checked against the eval-mode model before the
    changes (a mismatch raises). ``cuda_graph=True`` (needs ``example_input`` on a CUDA
    device) captures the model and returns a :class:`CUDAGraphModule` for that input shape.
    ``compile=True`` returns ``torch.compile`` of the optimized model: the fused ops stay
    opaque custom ops and inductor compiles everything around them (SAFFNet at 128×96 on 2
    CPU cores: 1.75× eager at batch 1, against 1.17× without and 1.46× for torch.compile of
    the reference; benchmarks/README.md).

    ``dtype`` (float16 / bfloat16 on a GPU): the parameters cast after BN folding (folded in
    float32); the model then takes inputs of that dtype (a CUDA-graph module casts what it is
    given); the check compares with the float32 model at that dtype's tolerance (2e-2
    relative L2). ``cudnn_benchmark``: on a CUDA model, set torch.backends.cudnn.benchmark
    (a process-wide switch: cuDNN times its algorithms once per input shape, which is what
    fixed-shape inference wants).
    """
    _check_module(model)
    backend = _backend.validate_backend(backend)
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input: expected a torch.Tensor or None, got "
                        f"{type(example_input).__name__}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile: expected a bool, got {type(compile).__name__}")
    if dtype is not None and dtype not in _INFERENCE_DTYPES:
        raise ValueError(f"dtype: expected one of {[str(d) for d in _INFERENCE_DTYPES]} or None, "
                         f"got {dtype!r}")
    if compile and cuda_graph:
        raise ValueError("compile, cuda_graph: choose one (torch.compile(mode='reduce-overhead') "
                         "of the result captures CUDA graphs itself)")
    if cuda_graph:
        if example_input is None:
            raise ValueError("example_input: cuda_graph=True needs an example input (the "
                             "graph is captured for its shape)")
        if example_input.device.type != "cuda":
            raise ValueError(f"example_input: cuda_graph=True needs a CUDA tensor and a model "
                             f"on CUDA, got a {example_input.device.type} tensor")
    model.eval()
    expected = None
    if example_input is not None:
        with torch.no_grad(), _full_float32_precision():
            expected = model(example_input)

    convert(model, backend)
    device = _first_device(model)

    def served_natively(module: nn.Module) -> bool:
        if type(module) not in REFERENCE_FROM_FAST:
            return False
        requested = module.backend or _backend.get_backend()
        if requested == "native":
            return True
        if requested != "auto":
            return False
        if _backend.backend_unavailable_reason("native", device) is not None:
            return False
        return _dispatch.unsupported_reason(module._op, "native", module,
                                           torch.empty(0, device=device)) is None

    fold_batchnorm(model, skip=served_natively)
    # inference only: no autograd bookkeeping, and the kernels' no-grad paths apply
    model.requires_grad_(False)
    if dtype is not None:
        model.to(dtype)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if cudnn_benchmark and device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def prepared(x: torch.Tensor) -> torch.Tensor:
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    if expected is not None:
        with torch.no_grad(), _full_float32_precision():
            got = model(prepared(example_input))
        _check_same(expected, got, dtype)
    if cuda_graph:
        return CUDAGraphModule(model, prepared(example_input))
    if compile:
        return torch.compile(model)
    return model


@contextlib.contextmanager
def _full_float32_precision():
    """TF32 off for the check's two forward passes. cuDNN convolutions default to TF32 on
    Ampere and later GPUs (10-bit mantissa), and the models before and after folding round
    differently under it: the check failed at 1.8e-2 relative L2 for a whole SAFFNet on an
    H100 (256×192, batch 64, float32, TF32 on). The check is there for the transformation,
    so both passes run in full float32."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def _check_same(expected, got, dtype: Optional[torch.dtype] = None) -> None:
    if isinstance(expected, torch.Tensor):
        err = (got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)
        tol = max(_tolerance(expected.dtype), _tolerance(dtype or expected.dtype))
        if not bool(err <= tol):
            raise RuntimeError(f"optimize_for_inference: the optimized model's output differs "
                               f"from the original by {float(err):.3g} (relative L2 > {tol})")
    elif isinstance(expected, (list, tuple)):
        for e, g in zip(expected, got):
            _check_same(e, g, dtype)
    elif isinstance(expected, dict):
        for k in expected:
            _check_same(expected[k], got[k], dtype)
