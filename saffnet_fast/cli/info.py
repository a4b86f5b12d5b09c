"""``saffnet info``: what this install can do, and why any part of it is missing."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform

HELP = "library, torch, devices, backends and optional packages of this install"

# Optional packages: what each adds and how to install it.
OPTIONAL_PACKAGES = {
    "triton": ("Triton GPU kernels", 'pip install "saffnet_fast[triton]"'),
    "onnx": ("saffnet export --onnx", 'pip install "saffnet_fast[export]"'),
    "onnxruntime": ("checking exported ONNX models", 'pip install "saffnet_fast[export]"'),
    "tensorboard": ("TensorBoard training logs", 'pip install "saffnet_fast[logging]"'),
}


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print JSON")


def _cuda_reason(torch) -> str | None:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if not torch.cuda.is_available():
        return f"torch is built with CUDA {torch.version.cuda} but no CUDA device is visible"
    return None


def _optional_packages() -> dict[str, dict]:
    found = {}
    for name, (purpose, command) in OPTIONAL_PACKAGES.items():
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        found[name] = {"version": version, "for": purpose,
                       "install": None if version else command}
    return found


def collect() -> dict:
    import torch

    import saffnet_fast as sf
    from saffnet_fast.backend import backend_unavailable_reason

    cuda_reason = _cuda_reason(torch)
    devices = {"cpu": f"{torch.get_num_threads()} torch threads"}
    if cuda_reason is None:
        devices["cuda"] = ", ".join(torch.cuda.get_device_name(i)
                                    for i in range(torch.cuda.device_count()))
    backend_status = {
        device: {name: backend_unavailable_reason(name, device)
                 for name in ("reference", "native", "triton")}
        for device in devices}
    return {
        "saffnet_fast": sf.__version__,
        "package_path": os.path.dirname(os.path.abspath(sf.__file__)),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "native_loaded": sf.has_native(),
        "native_load_error": sf.native_load_error(),
        "native_build": sf.native_build_info(),
        "devices": devices,
        "cuda_unavailable_reason": cuda_reason,
        "default_backend": sf.get_backend(),
        "available_backends": {d: sf.available_backends(d) for d in devices},
        "backend_status": backend_status,
        "optional_packages": _optional_packages(),
    }


def format_info(info: dict) -> str:
    build = info["native_build"]
    if info["native_loaded"]:
        extension = (f"loaded: CPU kernels{' + CUDA kernels' if build.get('with_cuda') else ''}"
                     f", built for torch {build.get('torch_version', '?')}")
    else:
        extension = f"not loaded: {info['native_load_error']}"
    lines = [
        f"saffnet_fast  {info['saffnet_fast']} ({info['package_path']})",
        f"torch         {info['torch']}, python {info['python']}",
        f"extension     saffnet_fast._C {extension}",
        "devices       " + "; ".join(f"{d}: {what}" for d, what in info["devices"].items())
        + ("" if "cuda" in info["devices"]
           else f"; cuda: unavailable ({info['cuda_unavailable_reason']})"),
        f"backend       default {info['default_backend']!r} (auto: the fastest available "
        "per call, the reference otherwise)",
    ]
    for device, status in info["backend_status"].items():
        for name, reason in status.items():
            state = "yes" if reason is None else f"no: {reason}"
            lines.append(f"  {device:<5} {name:<10} {state}")
    lines.append("optional")
    for name, entry in info["optional_packages"].items():
        state = entry["version"] or f"missing ({entry['install']})"
        lines.append(f"  {name:<12} {state:<42} {entry['for']}")
    return "\n".join(lines)


def run(args) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
