"""``saffnet export --checkpoint CKPT --onnx OUT.onnx --safetensors OUT.safetensors``."""
from __future__ import annotations

import importlib.util

from . import checks

HELP = "export a model (ONNX, safetensors)"


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, type=checks.existing_file,
                        help="training checkpoint")
    parser.add_argument("--config", default=None,
                        help="config (default: the one stored in the checkpoint)")
    parser.add_argument("--onnx", metavar="OUT.onnx", type=checks.output_file,
                        help="write an ONNX model (reference path; needs onnx and onnxruntime: "
                             'pip install "saffnet_fast[export]")')
    parser.add_argument("--safetensors", metavar="OUT.safetensors", type=checks.output_file,
                        help="write the weights")
    parser.add_argument("--opset", type=checks.positive_int, default=17,
                        help="ONNX opset version (default 17)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip comparing the ONNX model with PyTorch in onnxruntime")


def export_onnx(model, input_size, path: str, opset: int = 17, check: bool = True) -> dict:
    """Export with a dynamic batch axis; when onnxruntime is importable, compare its output
    with PyTorch's on a random batch and return the largest difference."""
    import numpy as np
    import torch

    from saffnet_fast.engine.runtime import export_onnx_file

    model = model.eval()
    example = torch.randn(2, 3, int(input_size[0]), int(input_size[1]))
    export_onnx_file(model, input_size, path, opset)
    report = {"onnx": path, "checked": False}
    if check:
        try:
            import onnxruntime
        except ImportError:
            return report
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {"image": example.numpy()})
        with torch.no_grad():
            want = model(example).numpy()
        diff = float(np.abs(got - want).max())
        scale = float(np.abs(want).max()) or 1.0
        if diff > 1e-3 * max(1.0, scale):
            raise RuntimeError(f"ONNX check failed: onnxruntime differs from PyTorch by {diff:g}")
        report.update(checked=True, max_abs_diff=diff)
    return report


def _opset_range() -> tuple[int, int] | None:
    """The opsets torch's TorchScript exporter writes, or None if this torch does not say."""
    try:
        from torch.onnx import _constants
    except ImportError:
        return None
    low = getattr(_constants, "ONNX_MIN_OPSET", None)
    high = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", None)
    return (low, high) if low is not None and high is not None else None


def run(args) -> int:
    from saffnet_fast.engine.checkpoint import save_safetensors
    from saffnet_fast.engine.config import load_config
    from saffnet_fast.engine.predictor import Predictor

    if not args.onnx and not args.safetensors:
        raise checks.UsageError("expected --onnx OUT.onnx and/or --safetensors OUT.safetensors, "
                                "got neither")
    if args.onnx:
        needed = ("onnx",) if args.no_check else ("onnx", "onnxruntime")
        missing = [name for name in needed if importlib.util.find_spec(name) is None]
        if missing:
            raise checks.UsageError(f"--onnx: {' and '.join(missing)} not installed; install "
                                    f'with: pip install "saffnet_fast[export]"')
        supported = _opset_range()
        if supported and not supported[0] <= args.opset <= supported[1]:
            raise checks.UsageError(f"--opset: expected {supported[0]} to {supported[1]} (what "
                                    f"torch's ONNX exporter writes), got {args.opset}")
    config = load_config(args.config) if args.config else None
    # ONNX traces the plain PyTorch modules: the fused kernels are not ONNX operators.
    predictor = Predictor.from_checkpoint(args.checkpoint, config, backend="reference")
    model = predictor.model.cpu().eval()
    if args.safetensors:
        save_safetensors(model, args.safetensors)
        print(f"weights -> {args.safetensors}")
    if args.onnx:
        report = export_onnx(model, (predictor.input_h, predictor.input_w), args.onnx, args.opset,
                             check=not args.no_check)
        checked = (f" (onnxruntime max |diff| {report['max_abs_diff']:.2e})"
                   if report["checked"] else " (not checked: --no-check)")
        print(f"onnx -> {args.onnx}{checked}")
    return 0
