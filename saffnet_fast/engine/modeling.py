"""Model construction from a run configuration and from checkpoints."""
from __future__ import annotations

from typing import Any

import torch


def build_model_from_config(config: dict[str, Any], backend: str | None = None
                            ) -> torch.nn.Module:
    """``saffnet_fast.models.build_model`` with the config's model section (``tiny``: the
    toolkit's stand-in network)."""
    model_cfg = config["model"]
    if model_cfg["name"] == "tiny":  # the toolkit's stand-in network, for smoke runs
        from .tiny import TinyPoseNet

        return TinyPoseNet(int(model_cfg["num_joints"]),
                           dropout=float(model_cfg.get("dropout") or 0.0))
    try:
        from ..models import build_model
    except ImportError as exc:  # the model factory lives in saffnet_fast.models
        raise ImportError(f"saffnet_fast.models.build_model is not importable ({exc})") from exc
    kwargs = dict(model_cfg.get("extra") or {})
    if model_cfg.get("dropout") is not None:
        kwargs["dropout"] = float(model_cfg["dropout"])
    return build_model(model_cfg["name"], num_joints=int(model_cfg["num_joints"]),
                       input_size=tuple(int(v) for v in model_cfg["input_size"]),
                       backend=backend if backend is not None else model_cfg.get("backend"),
                       **kwargs)


def first_names(names: list[str], count: int = 3) -> str:
    """`` (a, b, c, ...)``: the first few of a list of tensor names, for one-line reports."""
    shown = ", ".join(names[:count])
    return f" ({shown}{', ...' if len(names) > count else ''})" if names else ""


def load_pretrained(model: torch.nn.Module, path: str) -> str:
    """Copy the tensors of ``path`` whose names and shapes match into ``model`` and return a
    one-line report of what loaded and what was skipped.

    ``path``: a training checkpoint, a bare state dict, an official HRNet ``.pth`` (with or
    without ``module.`` prefixes) or a ``.safetensors`` file. Names follow the official HRNet,
    so an HRNet-W32 checkpoint loads fully into ``hrnet_w32`` and its shared parts (stem,
    stages, transitions, final layer) into the other models; a head for another joint count
    is skipped as shape-mismatched. Nothing matching at all is an error (a checkpoint of some
    other network, or names under a prefix such as MMPose's ``backbone.``).
    """
    from .checkpoint import load_weights

    source = load_weights(path, argument="model.pretrained")
    target = model.state_dict()
    matched = {k: v for k, v in source.items() if k in target and v.shape == target[k].shape}
    mismatched = [k for k, v in source.items() if k in target and v.shape != target[k].shape]
    unexpected = [k for k in source if k not in target]
    not_in_file = [k for k in target if k not in source]
    if not matched:
        raise ValueError(f"model.pretrained: none of the {len(source)} tensors in {path} "
                         f"matches the model by name and shape{first_names(list(source))}; "
                         f"expected names like{first_names(list(target))}")
    model.load_state_dict(matched, strict=False)
    return (f"model.pretrained {path}: loaded {len(matched)} of {len(target)} tensors; "
            f"skipped {len(not_in_file)} missing{first_names(not_in_file)} / {len(unexpected)} "
            f"unexpected{first_names(unexpected)} / {len(mismatched)} shape-mismatched"
            f"{first_names(mismatched)}")
