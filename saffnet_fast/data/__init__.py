"""Datasets, augmentation and targets for top-down keypoint estimation."""
from .build import build_dataset, resolve_data_paths
from .coco import CocoKeypoints
from .dataset_info import DatasetInfo, build_dataset_info, coco_info, mpii_info
from .mpii import MPIIKeypoints
from .registry import DATASET_TYPES, DatasetType, dataset_type
from .synthetic import SyntheticParams, ensure_synthetic_dataset
from .topdown import MissingFileError, TopDownDataset

__all__ = ["build_dataset", "resolve_data_paths", "CocoKeypoints", "DatasetInfo",
           "build_dataset_info", "coco_info", "mpii_info", "MPIIKeypoints", "DATASET_TYPES",
           "DatasetType", "dataset_type", "SyntheticParams",
           "ensure_synthetic_dataset", "MissingFileError", "TopDownDataset"]
