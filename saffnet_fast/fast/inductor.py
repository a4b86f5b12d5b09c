"""Inference under inductor with freezing: :func:`compile_frozen`, the PyTorch-native CPU
serving path (``saffnet bench`` provider ``compile_freezing``).

Freezing turns the weights into constants, so inductor folds BN into the convolutions,
prepacks every convolution weight for oneDNN once and fuses ReLU / the residual add into the
convolution as post-ops. Two things it needs that ``torch.compile(model,
options={"freezing": True})`` does not give:

* the option reaches inductor too late: on torch 2.13 the graph compiles unfrozen (plain
  ``aten.convolution`` calls, BN unfolded; seen in the output code), so :class:`FrozenCompiled`
  sets ``torch._inductor.config.freezing`` around each call instead (22 µs a call, measured);
* freezing sends *every* convolution to oneDNN, including the 1×1 convolutions that SE and
  AFF's global branch apply to pooled ``(N, C, 1, 1)`` maps: there oneDNN costs 45 µs a call
  for at most 16 K multiply-adds, against 4 µs for the same product as a prepacked MKL
  linear (AMD EPYC, 2 threads, ``[1, 64, 1, 1]`` → 4 channels), and SAFFNet makes about 110
  such calls per forward. :class:`PooledConvToLinear` rewrites them to ``addmm`` before
  freezing, which then packs them as linears.
"""
from __future__ import annotations

import hashlib
import inspect
import warnings
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch import nn
from torch._guards import detect_fake_mode

__all__ = ["PooledConvToLinear", "FrozenCompiled", "compile_frozen", "cpu_has_amx",
           "BFLOAT16_RTOL"]

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass as _CustomGraphPass
except ImportError:  # older torch: a plain callable pass (no FX graph cache for it)
    _CustomGraphPass = object

_aten = torch.ops.aten


def _is_pooled_pointwise_conv(node: torch.fx.Node) -> bool:
    """A 2-D convolution that is a matrix product: 1×1 kernel, no padding, one group, on a
    ``(N, C, 1, 1)`` input (stride and dilation then change nothing)."""
    if node.op != "call_function" or node.target is not _aten.convolution.default:
        return False
    x, w = node.args[0], node.args[1]
    padding, transposed, groups = node.args[4], node.args[6], node.args[8]
    xv = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    wv = w.meta.get("val") if isinstance(w, torch.fx.Node) else None
    if xv is None or wv is None or xv.dim() != 4 or wv.dim() != 4:
        return False
    return (not transposed and groups == 1 and all(p == 0 for p in padding)
            and tuple(xv.shape[2:]) == (1, 1) and tuple(wv.shape[2:]) == (1, 1)
            and xv.dtype == wv.dtype)


class PooledConvToLinear(_CustomGraphPass):
    """Inductor graph pass (``joint_custom_pre_pass``): every 1×1 convolution on a
    ``(N, C, 1, 1)`` input becomes ``addmm`` (``mm`` without bias) on the ``(N, C)`` view,
    reshaped back to ``(N, O, 1, 1)``. Same product, same summation length; under freezing
    the weight becomes a prepacked linear instead of a oneDNN convolution."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if not _is_pooled_pointwise_conv(node):
                continue
            x, w, b = node.args[0], node.args[1], node.args[2]
            # The weight's sizes are static; the batch may be symbolic (a recompilation for
            # a new batch size), so it is left to reshape as -1.
            o, c = w.meta["val"].shape[:2]
            fake_mode = detect_fake_mode([x.meta["val"], w.meta["val"]])

            def call(op, *args):
                # Later passes (the pattern matcher, freezing) read each node's fake value.
                new = graph.call_function(op, args)
                values = torch.fx.node.map_arg(args, lambda a: a.meta["val"])
                with fake_mode:
                    new.meta["val"] = op(*values)
                return new

            with graph.inserting_before(node):
                x2 = call(_aten.reshape.default, x, [-1, c])
                w2 = call(_aten.reshape.default, w, [o, c])
                wt = call(_aten.permute.default, w2, [1, 0])
                y = call(_aten.mm.default, x2, wt) if b is None else call(
                    _aten.addmm.default, b, x2, wt)
                out = call(_aten.reshape.default, y, [-1, o, 1, 1])
            for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
                if key in node.meta:
                    out.meta[key] = node.meta[key]
            node.replace_all_uses_with(out)
            graph.erase_node(node)
        graph.lint()

    def uuid(self) -> Any:
        # The FX graph cache keys on this: it changes whenever this pass's code does.
        source = inspect.getsource(PooledConvToLinear) + inspect.getsource(
            _is_pooled_pointwise_conv)
        return hashlib.sha256(source.encode()).hexdigest()


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


class FrozenCompiled(nn.Module):
    """``model`` under ``torch.compile`` with inductor's freezing, for inference.

    Each call runs without autograd (freezing compiles only graphs traced without grad) and
    with inductor's ``freezing`` (and, with ``pooled_linear``, :class:`PooledConvToLinear`)
    set for that call, so the compilation for each new input shape (static shapes by
    default: ``dynamic=False``) freezes too and the process-wide inductor settings stay as
    they were. The weights are read once, when a
    shape first compiles: change them and build a new one.
    """

    def __init__(self, model: nn.Module, *, pooled_linear: bool = True, **compile_kwargs):
        super().__init__()
        self.model = model
        # Static shapes unless asked otherwise: each batch size compiles its own graph, as
        # serving at fixed batch sizes wants. A dynamic-batch recompilation under freezing
        # failed a stride check on torch 2.13 (a padded 1x1 conv on a pooled map, with or
        # without PooledConvToLinear; tests/test_inductor_freezing.py).
        compile_kwargs.setdefault("dynamic", False)
        self._compiled = torch.compile(model, **compile_kwargs)
        self._patches = {"freezing": True}
        if pooled_linear:
            self._patches["joint_custom_pre_pass"] = PooledConvToLinear()

    def forward(self, *args, **kwargs):
        with torch.no_grad(), inductor_config.patch(self._patches):
            return self._compiled(*args, **kwargs)


BFLOAT16_RTOL = 2e-2  # relative L2 error bound of dtype=torch.bfloat16 against float32


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (where oneDNN's bfloat16 convolutions beat float32)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def compile_frozen(model: nn.Module, *, channels_last: bool = True,
                   pooled_linear: bool = True, dtype: torch.dtype | None = None,
                   **compile_kwargs) -> FrozenCompiled:
    """``model`` in eval mode (channels_last by default), compiled with inductor's freezing:
    the PyTorch-native way to serve a SAFFNet-family model on the CPU. Inference only; the
    first call for each input shape compiles (about a minute for SAFFNet at 256×192 on 2
    cores). ``compile_kwargs`` go to ``torch.compile``.

    ``dtype=torch.bfloat16`` (a flag for CPUs with AMX: :func:`cpu_has_amx`) casts the
    weights to bfloat16 (BN included: freezing folds it in the compiled graph, in bfloat16)
    and runs the model in bfloat16 on float32 inputs, returning float32; its output is within
    ``BFLOAT16_RTOL`` (2e-2 relative L2) of float32 (tests/test_inductor_freezing.py).
    Without AMX oneDNN's bfloat16 convolutions are slower than float32: it warns."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last: expected a bool, got {type(channels_last).__name__}")
    if not isinstance(pooled_linear, bool):
        raise TypeError(f"pooled_linear: expected a bool, got {type(pooled_linear).__name__}")
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
    return FrozenCompiled(model, pooled_linear=pooled_linear, **compile_kwargs)
