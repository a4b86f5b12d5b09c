"""Datasets from a run configuration (see :mod:`saffnet_fast.engine.config`)."""
from __future__ import annotations

import os
from typing import Any

from .coco import CocoKeypoints
from .mpii import MPIIKeypoints
from .synthetic import SyntheticParams, ensure_synthetic_dataset, split_paths
from .topdown import TopDownDataset


def _join(root: str, path: str | None) -> str | None:
    if path is None:
        return None
    return path if os.path.isabs(path) else os.path.join(root, path)


def synthetic_params(data_cfg: dict[str, Any]) -> SyntheticParams:
    fields = SyntheticParams.__dataclass_fields__
    cfg = dict(data_cfg.get("synthetic") or {})
    unknown = set(cfg) - set(fields)
    if unknown:
        raise ValueError(f"data.synthetic: unknown keys {sorted(unknown)}; expected {sorted(fields)}")
    return SyntheticParams(**cfg).validate()


def resolve_data_paths(config: dict[str, Any]) -> dict[str, Any]:
    """For ``data.type: synthetic``, generate the set (once) and fill in its paths."""
    data = dict(config["data"])
    if data["type"] == "synthetic":
        root = ensure_synthetic_dataset(synthetic_params(data), data.get("cache_dir"))
        data["root"] = root
        data["train_annotations"], data["train_images"] = split_paths(root, "train")
        data["val_annotations"], data["val_images"] = split_paths(root, "val")
    return data


def build_dataset(config: dict[str, Any], split: str, is_train: bool | None = None
                  ) -> TopDownDataset:
    """The ``train`` or ``val`` dataset of a config; ``is_train`` defaults to split == train.
    The val split of a COCO-type set uses ``data.detection_file`` when given."""
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    is_train = (split == "train") if is_train is None else is_train
    data = resolve_data_paths(config)
    root = data["root"]
    common = dict(input_size=config["model"]["input_size"], is_train=is_train,
                  dataset_info=data.get("dataset_info") or None, augment=data.get("augment"),
                  sigma=float(data["sigma"]), unbiased_encoding=bool(data["unbiased_encoding"]),
                  seed=int(config["seed"]))
    annotations = _join(root, data[f"{split}_annotations"])
    images = _join(root, data[f"{split}_images"])
    if data["type"] == "mpii":
        return MPIIKeypoints(annotations, images, **common)
    detection_file = _join(root, data["detection_file"]) if split == "val" else None
    return CocoKeypoints(annotations, images, detection_file=detection_file,
                         detection_score_threshold=float(data["detection_score_threshold"]),
                         **common)
