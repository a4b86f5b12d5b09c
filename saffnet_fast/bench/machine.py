"""Where a measurement was taken: device, CPU, versions, date and git commit."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["machine_info", "git_commit", "default_results_dir"]


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
