"""Keypoints on arbitrary images: person boxes in, keypoint JSON and skeleton overlays out."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from ..data.dataset_info import DatasetInfo
from ..data.topdown import IMAGENET_MEAN, IMAGENET_STD, read_image_rgb
from ..data.transforms import box_to_center_scale, get_affine_transform
from .checkpoint import load_checkpoint, model_state_dict
from .decode import decode_heatmaps, predict_heatmaps


def load_boxes(path: str) -> dict[str, list[list[float]]]:
    """Person boxes per image from JSON: either ``{"name.jpg": [[x, y, w, h(, score)], ...]}``
    or a list of ``{"file_name": ..., "bbox": [x, y, w, h], "score": s}`` entries. Keys are
    matched against image base names."""
    from ..data.topdown import read_json

    data = read_json(path, "boxes file")
    boxes: dict[str, list[list[float]]] = {}
    if isinstance(data, dict):
        for name, items in data.items():
            boxes[os.path.basename(name)] = [list(map(float, b)) for b in items]
    elif isinstance(data, list):
        for i, entry in enumerate(data):
            if "file_name" not in entry or "bbox" not in entry:
                raise ValueError(f"boxes file {path}: entry {i} needs 'file_name' and 'bbox'")
            boxes.setdefault(os.path.basename(entry["file_name"]), []).append(
                list(map(float, entry["bbox"])) + [float(entry.get("score", 1.0))])
    else:
        raise ValueError(f"boxes file {path}: expected a JSON object or list")
    for name, items in boxes.items():
        for b in items:
            if len(b) not in (4, 5) or b[2] <= 0 or b[3] <= 0:
                raise ValueError(f"boxes file {path}: box {b} for {name}: expected "
                                 "[x, y, w, h] or [x, y, w, h, score] with positive w and h")
    return boxes


def _palette(n: int) -> list[tuple[int, int, int]]:
    hsv = np.stack([np.linspace(0, 179, max(n, 1), endpoint=False),
                    np.full(max(n, 1), 220), np.full(max(n, 1), 255)], axis=1).astype(np.uint8)
    return [tuple(int(v) for v in c) for c in cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]]


def draw_skeleton(image_rgb: np.ndarray, people: Sequence[dict], info: DatasetInfo,
                  min_score: float = 0.2) -> np.ndarray:
    """Overlay keypoints and skeleton links (COCO 1-based pairs) on an RGB image."""
    canvas = image_rgb.copy()
    colors = _palette(len(info.skeleton))
    radius = max(2, int(round(min(canvas.shape[:2]) / 160)))
    for person in people:
        kpts = np.asarray(person["keypoints"], dtype=np.float64)
        x, y, w, h = person["box"][:4]
        cv2.rectangle(canvas, (int(x), int(y)), (int(x + w), int(y + h)), (255, 255, 255), 1)
        for color, (a, b) in zip(colors, info.skeleton):
            a, b = a - 1, b - 1
            if kpts[a, 2] >= min_score and kpts[b, 2] >= min_score:
                cv2.line(canvas, (int(kpts[a, 0]), int(kpts[a, 1])),
                         (int(kpts[b, 0]), int(kpts[b, 1])), color, max(1, radius // 2 + 1),
                         cv2.LINE_AA)
        for j in range(kpts.shape[0]):
            if kpts[j, 2] >= min_score:
                cv2.circle(canvas, (int(kpts[j, 0]), int(kpts[j, 1])), radius, (255, 0, 0), -1,
                           cv2.LINE_AA)
    return canvas


class Predictor:
    """A trained model plus its input size and dataset info, ready for images."""

    def __init__(self, model: torch.nn.Module, info: DatasetInfo, input_size,
                 device: str | torch.device = "cpu", flip_test: bool = True,
                 decode: str = "quarter"):
        self.model = model.to(device).eval()
        self.info = info
        self.input_h, self.input_w = int(input_size[0]), int(input_size[1])
        self.device = torch.device(device)
        self.flip_test = flip_test
        self.decode = decode

    @classmethod
    def from_checkpoint(cls, checkpoint: str, config: dict | None = None,
                        device: str | torch.device = "cpu", backend: str | None = None,
                        **kwargs) -> "Predictor":
        from ..data.dataset_info import build_dataset_info
        from .modeling import build_model_from_config

        state = load_checkpoint(checkpoint)
        config = config or state.get("config")
        if config is None:
            raise ValueError(f"checkpoint {checkpoint} stores no config; pass --config")
        model = build_model_from_config(config, backend=backend)
        model.load_state_dict(model_state_dict(state))
        default = "mpii" if config["data"]["type"] == "mpii" else "coco"
        info = build_dataset_info(config["data"].get("dataset_info") or None, None, default)
        return cls(model, info, config["model"]["input_size"], device, **kwargs)

    @torch.no_grad()
    def predict(self, image_rgb: np.ndarray, boxes: Sequence[Sequence[float]]) -> list[dict]:
        """People in ``image_rgb`` for the given (x, y, w, h[, score]) boxes."""
        if len(boxes) == 0:
            return []
        crops, centers, scales = [], [], []
        for box in boxes:
            center, scale = box_to_center_scale(box[:4], self.input_w / self.input_h)
            matrix = get_affine_transform(center, scale, 0.0, (self.input_w, self.input_h))
            crop = cv2.warpAffine(image_rgb, matrix, (self.input_w, self.input_h),
                                  flags=cv2.INTER_LINEAR)
            crops.append(((crop.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)
                         .transpose(2, 0, 1))
            centers.append(center)
            scales.append(scale)
        batch = torch.from_numpy(np.stack(crops)).to(self.device)
        heatmaps = predict_heatmaps(self.model, batch, self.info.flip_pairs, self.flip_test)
        coords, maxvals = decode_heatmaps(heatmaps, np.stack(centers), np.stack(scales),
                                          self.decode)
        people = []
        for box, c, m in zip(boxes, coords, maxvals):
            people.append({"box": [float(v) for v in box[:4]],
                           "box_score": float(box[4]) if len(box) > 4 else 1.0,
                           "score": float(m.mean()),
                           "keypoints": [[round(float(x), 2), round(float(y), 2),
                                          round(float(s), 4)] for (x, y), (s,) in zip(c, m)]})
        return people

    def predict_files(self, images: Sequence[str], out_dir: str,
                      boxes: dict[str, list[list[float]]] | None = None,
                      whole_image: bool = False) -> list[dict[str, Any]]:
        """Write ``<stem>.json`` and ``<stem>.png`` (overlay) per image into ``out_dir``."""
        os.makedirs(out_dir, exist_ok=True)
        written = []
        for path in images:
            image = read_image_rgb(path)
            name = os.path.basename(path)
            if whole_image:
                image_boxes = [[0.0, 0.0, float(image.shape[1]), float(image.shape[0])]]
            else:
                if boxes is None or name not in boxes:
                    raise ValueError(f"no boxes for image {name!r}: give them in --boxes or "
                                     "use --whole-image")
                image_boxes = boxes[name]
            people = self.predict(image, image_boxes)
            stem = os.path.splitext(name)[0]
            json_path = os.path.join(out_dir, stem + ".json")
            png_path = os.path.join(out_dir, stem + ".png")
            with open(json_path, "w", encoding="utf-8") as handle:
                json.dump({"image": os.path.abspath(path), "width": int(image.shape[1]),
                           "height": int(image.shape[0]), "keypoint_names": self.info.keypoints,
                           "people": people}, handle, indent=1)
            overlay = draw_skeleton(image, people, self.info)
            cv2.imwrite(png_path, cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
            written.append({"image": path, "json": json_path, "overlay": png_path,
                            "people": len(people)})
        return written
