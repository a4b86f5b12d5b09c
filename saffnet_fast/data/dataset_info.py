"""Keypoint set descriptions: names, flip pairs, OKS sigmas, upper-body ids, skeleton.

A config describes any COCO-format dataset with ``data.dataset_info`` (keys of
:class:`DatasetInfo`); keys left out come from the annotation file's category (names,
skeleton) and from the names themselves (flip pairs by ``left_``/``right_`` prefixes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
    "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
COCO_SIGMAS = (np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07,
                         .87, .87, .89, .89]) / 10.0).tolist()
# 1-based pairs, as in the COCO annotation files.
COCO_SKELETON = ((16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7),
                 (6, 8), (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5),
                 (4, 6), (5, 7))

MPII_KEYPOINTS = (
    "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle", "pelvis",
    "thorax", "upper_neck", "head_top", "right_wrist", "right_elbow", "right_shoulder",
    "left_shoulder", "left_elbow", "left_wrist")
MPII_SKELETON = ((1, 2), (2, 3), (3, 7), (7, 4), (4, 5), (5, 6), (7, 8), (8, 9), (9, 10),
                 (11, 12), (12, 13), (13, 9), (9, 14), (14, 15), (15, 16))

_UPPER_WORDS = ("nose", "eye", "ear", "shoulder", "elbow", "wrist", "head", "neck", "thorax",
                "mouth", "chin", "hand", "finger")


@dataclass
class DatasetInfo:
    keypoints: list[str]
    flip_pairs: list[tuple[int, int]] = field(default_factory=list)
    sigmas: list[float] | None = None
    upper_body_ids: list[int] = field(default_factory=list)
    skeleton: list[tuple[int, int]] = field(default_factory=list)  # 1-based, COCO style

    @property
    def num_joints(self) -> int:
        return len(self.keypoints)

    def require_sigmas(self) -> np.ndarray:
        if self.sigmas is None:
            raise ValueError(
                "data.dataset_info.sigmas: OKS needs one sigma per keypoint for "
                f"{self.keypoints}; add them to the config")
        return np.asarray(self.sigmas, dtype=np.float64)

    def validate(self) -> "DatasetInfo":
        k = self.num_joints
        for a, b in self.flip_pairs:
            if not (0 <= a < k and 0 <= b < k):
                raise ValueError(f"data.dataset_info.flip_pairs: index out of range 0..{k - 1} "
                                 f"in pair {[a, b]}")
        if self.sigmas is not None and len(self.sigmas) != k:
            raise ValueError(f"data.dataset_info.sigmas: expected {k} values (one per keypoint), "
                             f"got {len(self.sigmas)}")
        return self


def infer_flip_pairs(names: Sequence[str]) -> list[tuple[int, int]]:
    """Pairs (i, j) where names differ only by a left/right prefix (``left_``, ``l_``...)."""
    index = {n: i for i, n in enumerate(names)}
    pairs = []
    for i, name in enumerate(names):
        for left, right in (("left_", "right_"), ("left", "right"), ("l_", "r_")):
            if name.startswith(left):
                other = right + name[len(left):]
                if other in index:
                    pairs.append((i, index[other]))
                break
    return pairs


def coco_info() -> DatasetInfo:
    return DatasetInfo(keypoints=list(COCO_KEYPOINTS), flip_pairs=infer_flip_pairs(COCO_KEYPOINTS),
                       sigmas=list(COCO_SIGMAS), upper_body_ids=list(range(11)),
                       skeleton=[tuple(p) for p in COCO_SKELETON])


def mpii_info() -> DatasetInfo:
    # MPII has no OKS sigmas; it is scored with PCKh.
    return DatasetInfo(keypoints=list(MPII_KEYPOINTS),
                       flip_pairs=[(0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13)],
                       sigmas=None, upper_body_ids=[7, 8, 9, 10, 11, 12, 13, 14, 15],
                       skeleton=[tuple(p) for p in MPII_SKELETON])


def build_dataset_info(config: dict[str, Any] | None, category: dict | None = None,
                       default: str = "coco") -> DatasetInfo:
    """DatasetInfo from a config mapping, falling back to a COCO category entry and then to
    the named default (``coco`` or ``mpii``)."""
    config = dict(config or {})
    base = mpii_info() if default == "mpii" else coco_info()
    names = config.get("keypoints") or (category or {}).get("keypoints") or base.keypoints
    names = [str(n) for n in names]
    same_as_base = names == base.keypoints
    skeleton = config.get("skeleton") or (category or {}).get("skeleton") or (
        base.skeleton if same_as_base else [])
    flip_pairs = config.get("flip_pairs")
    if flip_pairs is None:
        flip_pairs = base.flip_pairs if same_as_base else infer_flip_pairs(names)
    sigmas = config.get("sigmas")
    if sigmas is None and same_as_base:
        sigmas = base.sigmas
    upper = config.get("upper_body_ids")
    if upper is None:
        upper = base.upper_body_ids if same_as_base else [
            i for i, n in enumerate(names) if any(w in n.lower() for w in _UPPER_WORDS)]
    return DatasetInfo(keypoints=names, flip_pairs=[tuple(int(v) for v in p) for p in flip_pairs],
                       sigmas=None if sigmas is None else [float(s) for s in sigmas],
                       upper_body_ids=[int(i) for i in upper],
                       skeleton=[tuple(int(v) for v in p) for p in skeleton]).validate()
