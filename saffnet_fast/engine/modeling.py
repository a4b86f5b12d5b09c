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
