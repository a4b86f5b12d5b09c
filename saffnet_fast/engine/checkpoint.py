"""Atomic, resumable checkpoints loadable with ``torch.load(weights_only=True)``.

RNG states are stored as tensors and plain Python types (no numpy objects), so the safe
unpickler accepts them.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": int(py_version), "state": list(py_state),
                   "gauss": None if py_gauss is None else float(py_gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str) -> None:
    """Write ``obj`` to a temporary file beside ``path`` and rename it into place, so a crash
    never leaves a truncated checkpoint."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    from ..data.topdown import MissingFileError

    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise MissingFileError(f"checkpoint file is unreadable ({type(exc).__name__}: {exc}): "
                               f"{path}") from exc


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Model weights from a training checkpoint (``model``), a checkpoint that nests them
    under ``state_dict`` (MMPose, Lightning) or a bare state dict (official HRNet), without
    DataParallel's ``module.`` prefixes."""
    state = checkpoint
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()
            if isinstance(v, torch.Tensor)}


def load_weights(path: str, argument: str = "weights") -> dict[str, torch.Tensor]:
    """The model weights in ``path``: a ``.safetensors`` file, or a ``.pth`` / ``.pt`` training
    checkpoint or state dict as :func:`model_state_dict` reads it. ``argument`` names the
    setting the path came from, in error messages."""
    from ..data.topdown import MissingFileError

    if not os.path.isfile(path):
        raise MissingFileError(f"{argument}: file not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ImportError(f"{argument}: reading {path} needs the safetensors package "
                              "(pip install safetensors)") from exc
        try:
            return load_file(path)
        except Exception as exc:
            raise MissingFileError(f"{argument}: unreadable safetensors file "
                                   f"({type(exc).__name__}: {exc}): {path}") from exc
    state = load_checkpoint(path)
    if not isinstance(state, dict):
        raise ValueError(f"{argument}: expected a checkpoint or state dict in {path}, got "
                         f"{type(state).__name__}")
    return model_state_dict(state)


def save_safetensors(model: torch.nn.Module, path: str, metadata: dict[str, str] | None = None
                     ) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
