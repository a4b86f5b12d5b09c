"""The dataset types a config's ``data.type`` can name, one entry each.

Read by the data builder (:func:`saffnet_fast.data.build_dataset`), the config validation
(``saffnet_fast.engine.config.validate_config``) and the predictor (the keypoint names,
flip pairs and skeleton a checkpoint's dataset has by default). A new type is one entry.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from .coco import CocoKeypoints
from .mpii import MPIIKeypoints
from .synthetic import SyntheticParams, ensure_synthetic_dataset, split_paths
from .topdown import TopDownDataset


@dataclasses.dataclass(frozen=True)
class DatasetType:
    """What one ``data.type`` means."""

    # build(annotations, images, detection_file, data, **common): the dataset of one split;
    # detection_file is the val split's data.detection_file (else None), data the config's
    # data section, common the keyword arguments every TopDownDataset takes.
    build: Callable[..., TopDownDataset]
    # build_dataset_info's default ("coco" or "mpii"): the keypoint names, flip pairs,
    # skeleton and OKS sigmas when data.dataset_info does not give them.
    default_info: str
    # Fills in the data section's paths before a split is built (a generated set), or None.
    prepare: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None


def _coco_format(annotations: str, images: str, detection_file: str | None,
                 data: dict[str, Any], **common) -> CocoKeypoints:
    return CocoKeypoints(annotations, images, detection_file=detection_file,
                         detection_score_threshold=float(data["detection_score_threshold"]),
                         **common)


def _mpii(annotations: str, images: str, detection_file: str | None, data: dict[str, Any],
          **common) -> MPIIKeypoints:
    # MPII's person boxes are its annotations' centre and scale: no detection file.
    return MPIIKeypoints(annotations, images, **common)


def synthetic_params(data: dict[str, Any]) -> SyntheticParams:
    fields = SyntheticParams.__dataclass_fields__
    cfg = dict(data.get("synthetic") or {})
    unknown = set(cfg) - set(fields)
    if unknown:
        raise ValueError(f"data.synthetic: unknown keys {sorted(unknown)}; expected {sorted(fields)}")
    return SyntheticParams(**cfg).validate()


def _generate_synthetic(data: dict[str, Any]) -> dict[str, Any]:
    """Generate the synthetic set (once: cached by its parameters) and point data at it."""
    root = ensure_synthetic_dataset(synthetic_params(data), data.get("cache_dir"))
    data = dict(data, root=root)
    data["train_annotations"], data["train_images"] = split_paths(root, "train")
    data["val_annotations"], data["val_images"] = split_paths(root, "val")
    return data


DATASET_TYPES: dict[str, DatasetType] = {
    "coco": DatasetType(_coco_format, "coco"),
    "mpii": DatasetType(_mpii, "mpii"),
    # COCO-format files generated from data.synthetic (saffnet demo, the tests)
    "synthetic": DatasetType(_coco_format, "coco", prepare=_generate_synthetic),
}


def dataset_type(name: str) -> DatasetType:
    """The entry of ``data.type`` ``name``; ValueError naming the choices otherwise."""
    if not isinstance(name, str) or name not in DATASET_TYPES:
        *rest, last = DATASET_TYPES
        raise ValueError(f"data.type: expected {', '.join(rest)} or {last}, got {name!r}")
    return DATASET_TYPES[name]
