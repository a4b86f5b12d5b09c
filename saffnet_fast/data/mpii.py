"""MPII in the JSON layout used by HRNet and MMPose: a list of
``{image, center, scale, joints (16×2), joints_vis (16)}`` entries, MATLAB 1-based joints."""
from __future__ import annotations

import os

import numpy as np

from .dataset_info import DatasetInfo, build_dataset_info
from .topdown import AugmentConfig, MissingFileError, PersonRecord, TopDownDataset, read_json


def load_mpii_records(annotation_file: str, image_dir: str, num_joints: int = 16
                      ) -> list[PersonRecord]:
    entries = read_json(annotation_file, "annotation file")
    if not isinstance(entries, list):
        raise ValueError(f"MPII annotation file {annotation_file}: expected a JSON list")
    records = []
    for i, entry in enumerate(entries):
        for key in ("image", "center", "scale"):
            if key not in entry:
                raise ValueError(f"MPII annotation file {annotation_file}: entry {i} lacks {key!r}")
        center = np.array(entry["center"], dtype=np.float32)
        scale = float(entry["scale"])
        # HRNet: move the centre down and enlarge the box a little to avoid cropping limbs.
        if center[0] != -1:
            center[1] = center[1] + 15 * scale
            scale = scale * 1.25
        joints = np.zeros((num_joints, 2), np.float32)
        vis = np.zeros(num_joints, np.float32)
        if "joints" in entry:
            raw = np.asarray(entry["joints"], dtype=np.float32)
            if raw.shape != (num_joints, 2):
                raise ValueError(f"MPII annotation file {annotation_file}: entry {i} joints "
                                 f"shape {raw.shape}, expected ({num_joints}, 2)")
            joints = raw - 1.0  # MATLAB 1-based -> 0-based pixels
            vis = np.asarray(entry.get("joints_vis", np.ones(num_joints)), dtype=np.float32)
        records.append(PersonRecord(
            image_path=os.path.join(image_dir, entry["image"]), center=center,
            scale=np.array([scale, scale], np.float32), joints=joints, joints_vis=vis,
            image_id=i, extra={"image": entry["image"]}))
    return records


class MPIIKeypoints(TopDownDataset):
    def __init__(self, annotation_file: str, image_dir: str, input_size, is_train: bool,
                 dataset_info: dict | DatasetInfo | None = None,
                 augment: AugmentConfig | dict | None = None, sigma: float = 2.0,
                 unbiased_encoding: bool = False, seed: int = 0):
        if not os.path.isdir(image_dir):
            raise MissingFileError(f"image directory not found: {image_dir}")
        info = dataset_info if isinstance(dataset_info, DatasetInfo) else build_dataset_info(
            dataset_info, None, default="mpii")
        self.annotation_file = annotation_file
        records = load_mpii_records(annotation_file, image_dir, info.num_joints)
        if not isinstance(augment, AugmentConfig):
            augment = AugmentConfig.from_config(augment)
        super().__init__(records, info, input_size, is_train, augment, sigma,
                         unbiased_encoding=unbiased_encoding, seed=seed)
