"""One call interface over the runtimes a model is served with: PyTorch, ONNX Runtime and
OpenVINO.

``load_runtime(kind, model_or_onnx_path)`` returns a callable that takes images (N, 3, H, W)
float32, as a NumPy array or a tensor, and returns the heatmaps in the same kind (a tensor
comes back on the input's device), so it can stand in for the model wherever the toolkit
calls one (:func:`saffnet_fast.engine.decode.predict_heatmaps`, the predictor, the bench).

ONNX Runtime and OpenVINO are optional extras: a missing package raises
:class:`RuntimeUnavailable` (an ImportError) whose one line names the pip command. They run
on the CPU, in float32 (OpenVINO is given an f32 precision hint: on CPUs with bf16 or AMX it
would otherwise pick bf16 on its own, and its outputs would no longer match PyTorch's).
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from typing import Callable

import numpy as np
import torch

__all__ = ["RUNTIMES", "RuntimeUnavailable", "Runtime", "load_runtime", "export_onnx_file",
           "require"]

RUNTIMES = ("torch", "onnxruntime", "openvino")

# package -> the extra that installs it
_EXTRA = {"onnx": "export", "onnxruntime": "export", "openvino": "openvino"}


class RuntimeUnavailable(ImportError):
    """A runtime's package is not installed; the message says which and the pip command."""


def require(package: str, why: str = ""):
    """Import ``package`` (onnx, onnxruntime or openvino) or raise :class:`RuntimeUnavailable`
    naming the extra that installs it."""
    try:
        if package == "onnx":
            import onnx as module
        elif package == "onnxruntime":
            import onnxruntime as module
        elif package == "openvino":
            import openvino as module
        else:
            raise ValueError(f"package: expected onnx, onnxruntime or openvino, got {package!r}")
    except ImportError:
        reason = f" ({why})" if why else ""
        raise RuntimeUnavailable(f"{package} is not installed{reason}; install with: "
                                 f'pip install "saffnet_fast[{_EXTRA[package]}]"') from None
    return module


def export_onnx_file(model: torch.nn.Module, input_size, path: str, opset: int = 17) -> str:
    """Export ``model`` (eval mode, on the CPU) to ONNX with a dynamic batch axis: input
    ``image`` (N, 3, H, W), output ``heatmaps``. Export the reference modules: the fused
    kernels are not ONNX operators."""
    require("onnx", "needed to export the model to ONNX")
    model = model.eval()
    example = torch.randn(2, 3, int(input_size[0]), int(input_size[1]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # dynamo=False: the TorchScript exporter, which writes plain opset-17 graphs that both
    # ONNX Runtime and OpenVINO read (the dynamo exporter needs onnxscript, not an extra).
    with warnings.catch_warnings():
        # The tracer warns at the modules' input checks (channel count, size multiples):
        # they pass for the traced shape and are not part of the graph, which is what it says.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model, (example,), path, dynamo=False, input_names=["image"],
                          output_names=["heatmaps"], opset_version=opset,
                          dynamic_axes={"image": {0: "batch"}, "heatmaps": {0: "batch"}})
    return path


class Runtime:
    """``runtime(images) -> heatmaps`` for one backend; ``kind``, ``input_size`` (H, W, when
    known) and ``description`` say what it runs."""

    def __init__(self, kind: str, run: Callable[[np.ndarray], np.ndarray] | None = None,
                 model: torch.nn.Module | None = None, input_size=None,
                 description: str = ""):
        self.kind = kind
        self._run = run
        self._model = model
        self.input_size = tuple(input_size) if input_size else None
        self.description = description or kind

    def __call__(self, images):
        if self._model is not None:
            tensor = images if isinstance(images, torch.Tensor) else torch.from_numpy(
                np.ascontiguousarray(images, dtype=np.float32))
            with torch.inference_mode():
                out = self._model(tensor)
            if isinstance(out, (list, tuple)):
                out = out[-1]
            return out if isinstance(images, torch.Tensor) else out.float().cpu().numpy()
        if isinstance(images, torch.Tensor):
            array = np.ascontiguousarray(images.detach().float().cpu().numpy())
            return torch.from_numpy(self._run(array)).to(images.device)
        return self._run(np.ascontiguousarray(images, dtype=np.float32))

    def __repr__(self) -> str:
        return f"Runtime({self.description})"


def _input_shape_check(where: str, shape, input_size) -> None:
    """Refuse an ONNX file made for another input size, in one line, before the first call
    fails deep inside the runtime."""
    if input_size is None:
        return
    dims = list(shape)[1:]
    want = [3, int(input_size[0]), int(input_size[1])]
    if len(dims) == 3 and all(isinstance(d, int) for d in dims) and dims != want:
        raise ValueError(f"{where}: the ONNX model takes {'x'.join(map(str, dims))} images, "
                         f"expected {'x'.join(map(str, want))} (the model's input size); "
                         "export it from this checkpoint")


def _onnxruntime(path: str, threads: int | None, input_size) -> Runtime:
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0]
    _input_shape_check(path, first.shape, input_size)
    name = first.name

    def run(array: np.ndarray) -> np.ndarray:
        return session.run(None, {name: array})[0]

    return Runtime("onnxruntime", run, input_size=input_size,
                   description=f"onnxruntime {ort.__version__} CPUExecutionProvider")


def _openvino(path: str, threads: int | None, input_size) -> Runtime:
    ov = require("openvino")
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = ov.Core().compile_model(path, "CPU", config)
    shape = compiled.input(0).get_partial_shape()
    dims = [d.get_length() if d.is_static else None for d in shape]
    _input_shape_check(path, dims, input_size)
    request = compiled.create_infer_request()

    def run(array: np.ndarray) -> np.ndarray:
        # share_inputs: read the caller's array in place instead of copying it in (the
        # outputs are copied out by default: the request reuses its buffers).
        return request.infer({0: array}, share_inputs=True)[0]

    return Runtime("openvino", run, input_size=input_size,
                   description=f"openvino {ov.__version__} CPU f32")


def load_runtime(kind: str, source, *, input_size=None, threads: int | None = None,
                 opset: int = 17) -> Runtime:
    """A callable ``images -> heatmaps`` running ``source`` with ``kind``.

    ``kind``: ``torch`` (``source`` is the model), ``onnxruntime`` or ``openvino``
    (``source`` is an ONNX file, or a model: exported to a temporary ONNX file first, at
    ``input_size`` or the model's ``input_size`` attribute, then deleted). ``threads``: the
    runtime's intra-op threads (default: its own choice). Missing packages raise
    :class:`RuntimeUnavailable` naming the pip command."""
    if kind not in RUNTIMES:
        raise ValueError(f"runtime: expected one of {', '.join(RUNTIMES)}, got {kind!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads: expected a positive int or None, got {threads!r}")
    is_path = isinstance(source, (str, os.PathLike))
    if not is_path and not isinstance(source, torch.nn.Module):
        raise TypeError(f"source: expected an ONNX file path or a torch.nn.Module, got "
                        f"{type(source).__name__}")
    if input_size is None and not is_path:
        input_size = getattr(source, "input_size", None)
    if kind == "torch":
        if is_path:
            raise ValueError(f"runtime torch: expected a model, got the file {source}; run an "
                             "ONNX file with onnxruntime or openvino")
        return Runtime("torch", model=source.eval(), input_size=input_size,
                       description=f"torch {torch.__version__} {type(source).__name__}")
    # The package first: a missing runtime is reported before an export that takes a minute.
    require(kind)
    load = _onnxruntime if kind == "onnxruntime" else _openvino
    if is_path:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX file not found: {path}")
        return load(path, threads, input_size)
    if input_size is None:
        raise ValueError("input_size: needed to export a model without an input_size "
                         "attribute to ONNX")
    # Exported on the CPU; a copy, so that a model on a GPU stays where the caller put it.
    model = copy.deepcopy(source).cpu() if any(
        p.device.type != "cpu" for p in source.parameters()) else source
    with tempfile.TemporaryDirectory(prefix="saffnet-onnx-") as folder:
        path = export_onnx_file(model, input_size, os.path.join(folder, "model.onnx"), opset)
        # Both runtimes hold the graph and weights in memory once loaded: the file can go.
        return load(path, threads, input_size)
