"""``saffnet info``: what this install can do."""
from __future__ import annotations

import json
import platform

HELP = "library, torch, extension and backend information"


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print JSON")


def collect() -> dict:
    import torch

    import saffnet_fast as sf

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "saffnet_fast": sf.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "native_loaded": sf.has_native(),
        "native_load_error": sf.native_load_error(),
        "native_build": sf.native_build_info(),
        "default_backend": sf.get_backend(),
        "available_backends": {d: sf.available_backends(d) for d in devices},
    }


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:20s} {value}")
    return 0
