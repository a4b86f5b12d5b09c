"""Inference under inductor with freezing: :func:`compile_frozen`, the PyTorch-native CPU
serving path (``saffnet bench`` provider ``compile_freezing``).

Freezing turns the weights into constants, so inductor folds BN into the convolutions,
prepacks every convolution weight for oneDNN once and fuses ReLU / the residual add into the
convolution as post-ops. What ``torch.compile(model, options={"freezing": True})`` leaves on
the table, each measured on SAFFNet at 256×192, batch 1, 2 threads (AMD EPYC, AVX2; A/B in
one process against OpenVINO f32, benchmarks/results/model-cpu-runtimes-20261207T1645.md):

* the option reaches inductor too late: on torch 2.13 the graph compiles unfrozen (plain
  ``aten.convolution`` calls, BN unfolded; seen in the output code), so :class:`FrozenCompiled`
  sets ``torch._inductor.config.freezing`` around each call instead (22 µs a call);
* every oneDNN convolution called from PyTorch costs some 40 µs more than oneDNN's own
  execution (the primitive set-up in ATen's ideep layer and the call itself): a 15→15-channel
  3×3 convolution on SAFFNet's 64×48 map takes 174 µs a call, 110–133 µs of it executing per
  ``ONEDNN_VERBOSE``; an 8→8-channel one on a 4×4 map still takes 47 µs. A prepacked MKL
  linear costs 4–7 µs a call. SAFFNet's SE, AFF and coordinate-attention layers are ~200
  small 1×1 convolutions: :class:`PointwiseConvToLinear` rewrites them to ``addmm`` before
  freezing, which packs them as linears (77.9 → 73.8 ms);
* SCBottle's split / re-splice concatenates channel slices; inductor lays the concatenation
  out channels-first and transposes both ways around every 8–15-channel slice (3.4 ms in 18
  kernels). :class:`ChannelsLastCat` concatenates along the innermost (channel) dimension of
  the channels_last tensors instead (70.5 → 66.3 ms, with the two below);
* the Python wrapper around ~520 kernel and library calls: ``cpp_wrapper`` (built apart from
  the kernels, the wrapper at -O1, so it compiles in about the time the Python one does:
  ~110 s against ~90 s for SAFFNet on 2 cores) (71.5 → 66.7 ms);
* dynamo's guards (one per parameter: 3.3 ms a call): once an input signature has compiled,
  :class:`FrozenCompiled` runs it with only the guards that tell its compiled graphs apart
  (``skip_guard_eval_unsafe``); a new signature takes the full check (77.9 → 75.1 ms).
"""
from __future__ import annotations

import hashlib
import inspect
import itertools
import types
import warnings
from typing import Any, Sequence

import torch
import torch._inductor.config as inductor_config
from torch import nn
from torch._guards import detect_fake_mode

__all__ = ["PointwiseConvToLinear", "ChannelsLastCat", "FrozenCompiled", "compile_frozen",
           "cpu_has_amx", "BFLOAT16_RTOL", "POINTWISE_LINEAR_MAX_MACS"]

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass as _CustomGraphPass
except ImportError:  # older torch: a plain callable pass (no FX graph cache for it)
    _CustomGraphPass = object

_aten = torch.ops.aten

# 1×1 convolutions on full maps up to this many multiply-adds become linears: that is every
# SE / AFF / coordinate-attention layer of SAFFNet at 256×192 (the largest, 64→16 channels at
# 64×48, is 3.1 M), while the nine SCBottle expansions and reductions (12.6–50 M, where
# oneDNN fuses the residual sum and ReLU) stay convolutions. Converting those too measured the
# same at batch 1 (69.4 against 69.7 ms, one A/B run), so the limit keeps oneDNN's fusions.
POINTWISE_LINEAR_MAX_MACS = 4_000_000


def _source_digest(*objects) -> str:
    # The FX graph cache keys on a pass's uuid(): it changes whenever the pass's code does.
    return hashlib.sha256("".join(inspect.getsource(o) for o in objects).encode()).hexdigest()


def _fake(node) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _inserter(graph: torch.fx.Graph, like: Sequence[torch.Tensor]):
    """``call(op, *args)``: a new node with its fake value, which later passes (the pattern
    matcher, freezing) read."""
    fake_mode = detect_fake_mode(list(like))

    def call(op, *args):
        new = graph.call_function(op, args)
        values = torch.fx.node.map_arg(args, lambda a: a.meta["val"])
        with fake_mode:
            new.meta["val"] = op(*values)
        return new
    return call


def _replace(graph: torch.fx.Graph, node: torch.fx.Node, out: torch.fx.Node) -> None:
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in node.meta:
            out.meta[key] = node.meta[key]
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _pointwise_conv_as_linear(node: torch.fx.Node, max_macs: int) -> bool:
    """A 2-D convolution that is a matrix product over the channels: 1×1 kernel, no padding,
    one group, and either a pooled ``(N, C, 1, 1)`` input (stride and dilation then change
    nothing) or a stride-1 input with the channels innermost (channels_last: ``(N·H·W, C)`` is
    then a view) of at most ``max_macs`` multiply-adds."""
    if node.op != "call_function" or node.target is not _aten.convolution.default:
        return False
    xv, wv = _fake(node.args[0]), _fake(node.args[1])
    stride, padding, transposed, groups = node.args[3], node.args[4], node.args[6], node.args[8]
    if xv is None or wv is None or xv.dim() != 4 or wv.dim() != 4 or xv.dtype != wv.dtype:
        return False
    if transposed or groups != 1 or any(p != 0 for p in padding) or tuple(wv.shape[2:]) != (1, 1):
        return False
    n, c, h, w = xv.shape
    # The rewrite writes C, O, H and W into the graph as numbers: under dynamic shapes they
    # must not be symbolic (the batch is written as -1, and bounds the full-map case below).
    if not all(type(size) is int for size in (c, wv.shape[0], h, w)):
        return False
    if (h, w) == (1, 1):
        return True
    return (type(n) is int and all(s == 1 for s in stride)
            and xv.is_contiguous(memory_format=torch.channels_last)
            and n * h * w * c * wv.shape[0] <= max_macs)


class PointwiseConvToLinear(_CustomGraphPass):
    """Inductor graph pass (``joint_custom_pre_pass``): a 1×1 convolution that is a matrix
    product (:func:`_pointwise_conv_as_linear`) becomes ``addmm`` (``mm`` without bias) on the
    ``(N·H·W, C)`` view of its channels_last input, viewed back as ``(N, O, H, W)``
    channels_last. Same product, same summation length; under freezing the weight becomes a
    prepacked linear instead of a oneDNN convolution. ``max_macs=0`` keeps it to the pooled
    ``(N, C, 1, 1)`` maps."""

    def __init__(self, max_macs: int = POINTWISE_LINEAR_MAX_MACS):
        if isinstance(max_macs, bool) or not isinstance(max_macs, int) or max_macs < 0:
            raise ValueError(f"max_macs: expected an int >= 0, got {max_macs!r}")
        self.max_macs = max_macs

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if not _pointwise_conv_as_linear(node, self.max_macs):
                continue
            x, w, b = node.args[0], node.args[1], node.args[2]
            _, c, h, wd = x.meta["val"].shape
            o = w.meta["val"].shape[0]
            call = _inserter(graph, [x.meta["val"], w.meta["val"]])
            with graph.inserting_before(node):
                rows = call(_aten.reshape.default, call(_aten.permute.default, x, [0, 2, 3, 1]),
                            [-1, c])
                wt = call(_aten.permute.default, call(_aten.reshape.default, w, [o, c]), [1, 0])
                y = call(_aten.mm.default, rows, wt) if b is None else call(
                    _aten.addmm.default, b, rows, wt)
                out = call(_aten.permute.default, call(_aten.reshape.default, y, [-1, h, wd, o]),
                           [0, 3, 1, 2])
            _replace(graph, node, out)
        graph.lint()

    def uuid(self) -> Any:
        return _source_digest(PointwiseConvToLinear, _pointwise_conv_as_linear) + str(
            self.max_macs)


def _channels_innermost(v: torch.Tensor | None) -> bool:
    # channels_last tensors and channel slices of them; a 1×1 map says nothing of its layout
    return (v is not None and v.dim() == 4 and v.shape[1] > 1 and v.stride(1) == 1
            and v.shape[2] * v.shape[3] > 1)


class ChannelsLastCat(_CustomGraphPass):
    """Inductor graph pass: ``cat(tensors, dim=1)`` of 4-D tensors whose channels are
    innermost in memory (channels_last, or channel slices of it) becomes a concatenation
    along the last dimension of their ``(N, H, W, C)`` permutations, permuted back. The same
    values; inductor then writes the result channels_last, where its own lowering picks a
    channels-first buffer and transposes every input into it and the result back out."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not _aten.cat.default:
                continue
            tensors = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            values = [_fake(t) for t in tensors]
            if dim not in (1, -3) or len(values) < 2 or not all(map(_channels_innermost, values)):
                continue
            call = _inserter(graph, values)
            with graph.inserting_before(node):
                nhwc = [call(_aten.permute.default, t, [0, 2, 3, 1]) for t in tensors]
                out = call(_aten.permute.default, call(_aten.cat.default, nhwc, 3), [0, 3, 1, 2])
            _replace(graph, node, out)
        graph.lint()

    def uuid(self) -> Any:
        return _source_digest(ChannelsLastCat, _channels_innermost)


class _PassChain(_CustomGraphPass):
    """Several graph passes in one inductor hook, keyed on all of their uuids."""

    def __init__(self, passes: Sequence[Any]):
        self.passes = tuple(passes)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)

    def uuid(self) -> Any:
        return hashlib.sha256("".join(str(p.uuid()) for p in self.passes).encode()).hexdigest()


class _CastAround(nn.Module):
    """Runs ``model`` (whose parameters are ``dtype``) on inputs cast to ``dtype`` and casts
    floating outputs back to the input's dtype: inside the compiled graph, so inductor fuses
    the casts into the first and last kernels."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x):
        out = self.model(x.to(self.dtype))
        return out.to(x.dtype) if out.is_floating_point() else out


_entry_points = itertools.count()


def _own_entry_point(model: nn.Module):
    """``model(*args)`` behind a code object of its own. Dynamo keeps its compiled graphs per
    code object, guarded on the parameters' shapes, not their values: through
    ``torch.compile(model)``, a second ``compile_frozen`` of the same model (new weights loaded,
    other options) would find the first one's graph, with the old weights frozen in, and run
    it. A fresh code object gives every :class:`FrozenCompiled` its own graphs (and its own
    recompilation limit)."""
    def frozen_forward(*args, **kwargs):
        return model(*args, **kwargs)
    code = frozen_forward.__code__
    code = code.replace(co_name=f"{code.co_name}_{next(_entry_points)}")
    return types.FunctionType(code, frozen_forward.__globals__, code.co_name,
                              frozen_forward.__defaults__, frozen_forward.__closure__)


class FrozenCompiled(nn.Module):
    """``model`` under ``torch.compile`` with inductor's freezing, for inference.

    Each call runs without autograd (freezing compiles only graphs traced without grad) and
    with inductor's ``freezing`` (plus the graph passes and ``cpp_wrapper`` asked for) set for
    that call, so the compilation for each new input shape (static shapes by default:
    ``dynamic=False``) freezes too and the process-wide inductor settings stay as they were.

    The model is read once per input signature (shapes, strides, dtype, device,
    requires_grad), when it
    compiles: its weights become constants and, after that first call, only the guards that
    tell the compiled signatures apart run (dynamo's per-parameter guards cost 3.3 ms a call
    on SAFFNet). Change the weights or the module's state and build a new one: each instance
    compiles its own graphs (the old one is then undefined: freezing copies the weights it
    folds or packs and keeps the others by reference).
    """

    def __init__(self, model: nn.Module, *, graph_passes: Sequence[Any] = (),
                 cpp_wrapper: bool = False, **compile_kwargs):
        super().__init__()
        self.model = model
        # Static shapes unless asked otherwise: each batch size compiles its own graph, as
        # serving at fixed batch sizes wants. A dynamic-batch recompilation under freezing
        # failed a stride check on torch 2.13 (a padded 1x1 conv on a pooled map;
        # tests/test_inductor_freezing.py).
        compile_kwargs.setdefault("dynamic", False)
        self._compiled = torch.compile(_own_entry_point(model), **compile_kwargs)
        self._patches: dict[str, Any] = {"freezing": True}
        if graph_passes:
            self._patches["joint_custom_pre_pass"] = _PassChain(graph_passes)
        if cpp_wrapper:
            # The wrapper compiled apart from the kernels, at -O1: in one -O3 translation unit
            # SAFFNet's wrapper was still compiling after 11 minutes on 2 cores.
            self._patches.update(cpp_wrapper=True, cpp_wrapper_build_separate=True)
        self._compiled_signatures: set = set()

    @staticmethod
    def _signature(args, kwargs):
        if kwargs or not all(isinstance(a, torch.Tensor) for a in args):
            return None  # anything else: dynamo's full guard check on every call
        return tuple((a.shape, a.stride(), a.dtype, a.device, a.requires_grad) for a in args)

    def forward(self, *args, **kwargs):
        signature = self._signature(args, kwargs)
        with torch.no_grad(), inductor_config.patch(self._patches):
            if signature is not None and signature in self._compiled_signatures:
                try:
                    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                        return self._compiled(*args, **kwargs)
                except RuntimeError as error:
                    # a guard the signature does not see (dynamo refuses to recompile under
                    # this stance, before running anything): take the full check below
                    if "skip_guard_eval_unsafe" not in str(error):
                        raise
            out = self._compiled(*args, **kwargs)
        if signature is not None:
            self._compiled_signatures.add(signature)
        return out


BFLOAT16_RTOL = 2e-2  # relative L2 error bound of dtype=torch.bfloat16 against float32


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (where oneDNN's bfloat16 convolutions beat float32)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def compile_frozen(model: nn.Module, *, channels_last: bool = True,
                   pointwise_linear: bool = True, channels_last_cat: bool = True,
                   cpp_wrapper: bool = True, dtype: torch.dtype | None = None,
                   **compile_kwargs) -> FrozenCompiled:
    """``model`` in eval mode (channels_last by default), compiled with inductor's freezing:
    the PyTorch-native way to serve a SAFFNet-family model on the CPU. Inference only; the
    first call for each input shape compiles (about two minutes for SAFFNet at 256×192 on 2
    cores). ``compile_kwargs`` go to ``torch.compile``.

    ``pointwise_linear`` (:class:`PointwiseConvToLinear`), ``channels_last_cat``
    (:class:`ChannelsLastCat`) and ``cpp_wrapper`` switch off the three things this adds to
    inductor's freezing (the module docstring has what each gains on SAFFNet).

    ``dtype=torch.bfloat16`` (a flag for CPUs with AMX: :func:`cpu_has_amx`) casts the
    weights to bfloat16 (BN included: freezing folds it in the compiled graph, in bfloat16)
    and runs the model in bfloat16 on float32 inputs, returning float32; its output is within
    ``BFLOAT16_RTOL`` (2e-2 relative L2) of float32 (tests/test_inductor_freezing.py).
    Without AMX oneDNN's bfloat16 convolutions are slower than float32: it warns."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    flags = {"channels_last": channels_last, "pointwise_linear": pointwise_linear,
             "channels_last_cat": channels_last_cat, "cpp_wrapper": cpp_wrapper}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    if dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"dtype: expected None, torch.float32 or torch.bfloat16, got {dtype!r}")
    model = model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dtype == torch.bfloat16:
        if not cpu_has_amx():
            warnings.warn("compile_frozen(dtype=torch.bfloat16): this CPU has no AMX, where "
                          "oneDNN's bfloat16 convolutions are slower than float32",
                          RuntimeWarning, stacklevel=2)
        model = _CastAround(model.to(torch.bfloat16), torch.bfloat16)
    # the concatenations first: their channels_last results then qualify as linear inputs
    passes = ([ChannelsLastCat()] if channels_last_cat else []) + (
        [PointwiseConvToLinear()] if pointwise_linear else [])
    return FrozenCompiled(model, graph_passes=passes, cpp_wrapper=cpp_wrapper,
                          **compile_kwargs)
