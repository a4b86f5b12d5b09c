"""COCO-format keypoint datasets (COCO itself or any dataset in its layout)."""
from __future__ import annotations

import contextlib
import io
import os

import numpy as np

from .dataset_info import DatasetInfo, build_dataset_info
from .topdown import (AugmentConfig, MissingFileError, PersonRecord, TopDownDataset, parse_box,
                       read_json)
from .transforms import box_to_center_scale


def load_coco(annotation_file: str):
    """pycocotools COCO object; a missing or malformed file raises an error naming it."""
    from pycocotools.coco import COCO

    dataset = read_json(annotation_file, "annotation file")
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise ValueError(f"annotation file {annotation_file}: missing COCO key {key!r}")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def keypoint_category(coco, category_id: int | None = None) -> dict:
    cats = [c for c in coco.loadCats(coco.getCatIds()) if c.get("keypoints")]
    if category_id is not None:
        cats = [c for c in cats if c["id"] == category_id]
    if not cats:
        raise ValueError("annotation file has no category with a 'keypoints' list"
                         + (f" and id {category_id}" if category_id is not None else ""))
    return cats[0]


def _image_path(image_dir: str, image: dict) -> str:
    return os.path.join(image_dir, image["file_name"])


def gt_box_records(coco, image_dir: str, info: DatasetInfo, aspect_ratio: float,
                   category_id: int) -> list[PersonRecord]:
    """One record per non-crowd person with at least one labelled keypoint (HRNet's cleaning:
    boxes clipped to the image, zero-area boxes dropped)."""
    records = []
    num_joints = info.num_joints
    for image_id in sorted(coco.getImgIds()):
        image = coco.loadImgs(image_id)[0]
        width, height = image["width"], image["height"]
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, catIds=[category_id],
                                                iscrowd=False)):
            x, y, w, h = ann["bbox"]
            x1, y1 = max(0.0, x), max(0.0, y)
            x2 = min(width - 1.0, x1 + max(0.0, w - 1))
            y2 = min(height - 1.0, y1 + max(0.0, h - 1))
            if ann.get("area", w * h) <= 0 or x2 < x1 or y2 < y1:
                continue
            keypoints = np.asarray(ann.get("keypoints", []), dtype=np.float32)
            if keypoints.size != num_joints * 3:
                raise ValueError(f"annotation {ann.get('id')}: expected {num_joints} keypoints "
                                 f"(x, y, v triples), got {keypoints.size / 3:g}")
            keypoints = keypoints.reshape(num_joints, 3)
            vis = np.minimum(1.0, keypoints[:, 2]).astype(np.float32)
            if vis.max() <= 0:
                continue
            center, scale = box_to_center_scale([x1, y1, x2 - x1, y2 - y1], aspect_ratio)
            records.append(PersonRecord(
                image_path=_image_path(image_dir, image), center=center, scale=scale,
                joints=keypoints[:, :2].copy(), joints_vis=vis, image_id=image_id, score=1.0,
                extra={"annotation_id": ann.get("id"), "area": float(ann.get("area", w * h))}))
    return records


def load_detections(detection_file: str) -> list[dict]:
    detections = read_json(detection_file, "person detection file")
    if not isinstance(detections, list):
        raise ValueError(f"person detection file {detection_file}: expected a JSON list of "
                         "{image_id, category_id, bbox, score} entries")
    for i, det in enumerate(detections):
        where = f"person detection file {detection_file}: entry {i}"
        if not isinstance(det, dict) or not {"image_id", "bbox", "score"} <= det.keys():
            raise ValueError(f"{where}: expected {{image_id, category_id, bbox, score}}, got "
                             f"{det!r:.80}")
        # Zero-size boxes pass: detectors emit a few, and HRNet's loader keeps them.
        parse_box(det["bbox"], where, det["score"], positive=False)
    return detections


def detection_records(coco, detections: list[dict], image_dir: str, num_joints: int,
                      aspect_ratio: float, category_id: int,
                      score_threshold: float = 0.0) -> list[PersonRecord]:
    """HRNet's ``_load_coco_person_detection_results``: keep boxes of the person category
    scoring at least ``score_threshold`` on images present in the annotation file."""
    records = []
    known_images = set(coco.getImgIds())
    for det in detections:
        if det.get("category_id", category_id) != category_id:
            continue
        if float(det["score"]) < score_threshold:
            continue
        image_id = det["image_id"]
        if image_id not in known_images:
            continue
        image = coco.loadImgs(image_id)[0]
        center, scale = box_to_center_scale(det["bbox"], aspect_ratio)
        records.append(PersonRecord(
            image_path=_image_path(image_dir, image), center=center, scale=scale,
            joints=np.zeros((num_joints, 2), np.float32),
            joints_vis=np.ones(num_joints, np.float32), image_id=image_id,
            score=float(det["score"])))
    return records


class CocoKeypoints(TopDownDataset):
    """Top-down samples from a COCO-format keypoint annotation file.

    Training uses the ground-truth boxes; testing uses either those or a person detection
    results file (``detection_file``) filtered by ``detection_score_threshold``.
    """

    def __init__(self, annotation_file: str, image_dir: str, input_size, is_train: bool,
                 dataset_info: dict | DatasetInfo | None = None,
                 detection_file: str | None = None, detection_score_threshold: float = 0.0,
                 augment: AugmentConfig | dict | None = None, sigma: float = 2.0,
                 unbiased_encoding: bool = False, seed: int = 0, category_id: int | None = None):
        self.annotation_file = annotation_file
        self.image_dir = image_dir
        if not os.path.isdir(image_dir):
            raise MissingFileError(f"image directory not found: {image_dir}")
        self.coco = load_coco(annotation_file)
        category = keypoint_category(self.coco, category_id)
        self.category_id = category["id"]
        info = dataset_info if isinstance(dataset_info, DatasetInfo) else build_dataset_info(
            dataset_info, category)
        height, width = int(input_size[0]), int(input_size[1])
        aspect_ratio = width / height
        if detection_file:
            records = detection_records(self.coco, load_detections(detection_file), image_dir,
                                        info.num_joints, aspect_ratio, self.category_id,
                                        detection_score_threshold)
        else:
            records = gt_box_records(self.coco, image_dir, info, aspect_ratio, self.category_id)
        if not isinstance(augment, AugmentConfig):
            augment = AugmentConfig.from_config(augment)
        super().__init__(records, info, input_size, is_train, augment, sigma,
                         unbiased_encoding=unbiased_encoding, seed=seed)
