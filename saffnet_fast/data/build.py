"""Datasets from a run configuration (see :mod:`saffnet_fast.engine.config`); each
``data.type`` is an entry of :data:`saffnet_fast.data.registry.DATASET_TYPES`."""
from __future__ import annotations

import os
from typing import Any

from .registry import dataset_type
from .topdown import TopDownDataset


def _join(root: str, path: str | None) -> str | None:
    if path is None:
        return None
    return path if os.path.isabs(path) else os.path.join(root, path)


def resolve_data_paths(config: dict[str, Any]) -> dict[str, Any]:
    """The config's data section with its paths filled in (``data.type: synthetic``:
    the set generated once)."""
    data = dict(config["data"])
    prepare = dataset_type(data["type"]).prepare
    return prepare(data) if prepare is not None else data


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
    detection_file = _join(root, data["detection_file"]) if split == "val" else None
    return dataset_type(data["type"]).build(annotations, images, detection_file, data, **common)
