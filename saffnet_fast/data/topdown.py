"""Top-down keypoint dataset base: one sample per person box.

Each record holds the image path, the box as (center, scale), joints (K, 2) and joint
visibility (K,). :meth:`TopDownDataset.__getitem__` accepts an index or ``(index, seed)``:
the seed drives this sample's augmentation, so a run is reproducible regardless of
data-loader workers (see :class:`saffnet_fast.data.sampler.ResumableSampler`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .dataset_info import DatasetInfo
from .transforms import (PIXEL_STD, flip_joints, gaussian_targets, get_affine_transform,
                         affine_points, half_body_box)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass
class AugmentConfig:
    """HRNet's training augmentation (paper: rotation ±45°, scale 0.65–1.35, flip, half-body)."""
    flip: bool = True
    scale_factor: float = 0.35
    rotation_factor: float = 45.0
    rotation_prob: float = 0.6
    half_body_prob: float = 0.3
    half_body_min_joints: int = 8

    @classmethod
    def from_config(cls, cfg: dict | None) -> "AugmentConfig":
        cfg = dict(cfg or {})
        unknown = set(cfg) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"data.augment: unknown keys {sorted(unknown)}; expected "
                             f"{sorted(cls.__dataclass_fields__)}")
        return cls(**cfg)


class MissingFileError(FileNotFoundError):
    """A dataset image or annotation file is missing or unreadable."""


def read_json(path: str, what: str):
    """Parsed JSON of ``path``; a missing or unreadable file raises :class:`MissingFileError`
    naming ``what`` (e.g. "annotation file") and the path."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MissingFileError(f"{what} is unreadable ({exc}): {path}") from exc


def parse_box(value, where: str, score=None, positive: bool = True) -> list[float]:
    """A person box ``[x, y, w, h]`` or ``[x, y, w, h, score]`` (or ``[x, y, w, h]`` and
    ``score`` apart) as floats, finite and, when ``positive``, with a positive width and
    height; anything else raises ValueError starting with ``where`` (the file and entry)."""
    try:
        box = [float(v) for v in value] + ([] if score is None else [float(score)])
    except (TypeError, ValueError):
        box = []
    if len(box) not in ((4, 5) if score is None else (5,)):
        expected = ("[x, y, w, h] or [x, y, w, h, score] numbers" if score is None
                    else "a bbox of 4 numbers [x, y, w, h] and a numeric score")
        raise ValueError(f"{where}: expected {expected}, got {value!r:.80}"
                         + ("" if score is None else f" and score {score!r}"))
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"{where}: expected finite numbers, got {value!r:.80}"
                         + ("" if score is None else f" with score {score!r}"))
    if positive and (box[2] <= 0 or box[3] <= 0):
        raise ValueError(f"{where}: expected a positive width and height, got w={box[2]:g}, "
                         f"h={box[3]:g}")
    return box


def read_image_rgb(path: str) -> np.ndarray:
    """Read an image as RGB uint8, raising :class:`MissingFileError` naming the file."""
    if not os.path.isfile(path):
        raise MissingFileError(f"image file not found: {path}")
    image = cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise MissingFileError(f"image file is unreadable (not a decodable image): {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@dataclass
class PersonRecord:
    image_path: str
    center: np.ndarray
    scale: np.ndarray
    joints: np.ndarray       # (K, 2) float32, image pixels, 0-based
    joints_vis: np.ndarray   # (K,) float32 in {0, 1}
    image_id: int = 0
    score: float = 1.0
    extra: dict = field(default_factory=dict)


class TopDownDataset(Dataset):
    def __init__(self, records: list[PersonRecord], info: DatasetInfo, input_size,
                 is_train: bool, augment: AugmentConfig | None = None, sigma: float = 2.0,
                 heatmap_stride: int = 4, unbiased_encoding: bool = False, seed: int = 0):
        self.records = records
        self.info = info
        self.input_h, self.input_w = int(input_size[0]), int(input_size[1])
        self.aspect_ratio = self.input_w / self.input_h
        self.heatmap_w = self.input_w // heatmap_stride
        self.heatmap_h = self.input_h // heatmap_stride
        self.is_train = is_train
        self.augment = augment or AugmentConfig()
        self.sigma = sigma
        self.unbiased_encoding = unbiased_encoding
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def _augment(self, record: PersonRecord, image: np.ndarray, rng: np.random.Generator):
        joints = record.joints.copy()
        vis = np.repeat(record.joints_vis[:, None], 2, axis=1).astype(np.float32)
        center = record.center.copy()
        scale = record.scale.copy()
        rot = 0.0
        aug = self.augment
        if (vis[:, 0].sum() > aug.half_body_min_joints and rng.random() < aug.half_body_prob):
            box = half_body_box(joints, vis, self.info.upper_body_ids, self.aspect_ratio, rng)
            if box is not None:
                center, scale = box
        sf, rf = aug.scale_factor, aug.rotation_factor
        scale = scale * np.clip(rng.standard_normal() * sf + 1, 1 - sf, 1 + sf)
        if rng.random() <= aug.rotation_prob:
            rot = float(np.clip(rng.standard_normal() * rf, -rf, rf))
        if aug.flip and rng.random() <= 0.5:
            image = image[:, ::-1]
            joints, vis = flip_joints(joints, vis, image.shape[1], self.info.flip_pairs)
            center = center.copy()
            center[0] = image.shape[1] - center[0] - 1
        return image, joints, vis[:, 0], center, scale.astype(np.float32), rot

    def __getitem__(self, key):
        index, seed = (key if isinstance(key, tuple) else (key, None))
        record = self.records[int(index)]
        image = read_image_rgb(record.image_path)
        if self.is_train:
            rng = np.random.default_rng(
                [self.seed, int(index)] if seed is None else [int(seed)])
            image, joints, vis, center, scale, rot = self._augment(record, image, rng)
        else:
            joints, vis = record.joints, record.joints_vis
            center, scale, rot = record.center, record.scale, 0.0
        matrix = get_affine_transform(center, scale, rot, (self.input_w, self.input_h))
        crop = cv2.warpAffine(np.ascontiguousarray(image), matrix, (self.input_w, self.input_h),
                              flags=cv2.INTER_LINEAR)
        joints_in = affine_points(joints, matrix).astype(np.float32)
        vis = vis.astype(np.float32).copy()
        target, weight = gaussian_targets(
            joints_in, vis[:, None], (self.heatmap_w, self.heatmap_h),
            (self.input_w / self.heatmap_w, self.input_h / self.heatmap_h), self.sigma,
            self.unbiased_encoding)
        tensor = (crop.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        meta = {
            "index": int(index),
            "image_id": int(record.image_id),
            "center": torch.as_tensor(np.asarray(center, dtype=np.float32)),
            "scale": torch.as_tensor(np.asarray(scale, dtype=np.float32)),
            "rotation": float(rot),
            "score": float(record.score),
            "joints": torch.as_tensor(joints_in),
            "joints_vis": torch.as_tensor(vis),
        }
        return (torch.from_numpy(tensor.transpose(2, 0, 1).copy()), torch.from_numpy(target),
                torch.from_numpy(weight), meta)


def box_area_from_scale(scale: np.ndarray) -> np.ndarray:
    """HRNet's person area for OKS-NMS: prod(scale × PIXEL_STD)."""
    return np.prod(np.asarray(scale) * PIXEL_STD, axis=-1)
