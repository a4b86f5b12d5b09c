"""Batched top-down inference and dataset evaluation (COCO AP or MPII PCKh)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.coco import CocoKeypoints
from ..data.mpii import MPIIKeypoints
from ..data.topdown import TopDownDataset, box_area_from_scale
from .decode import decode_heatmaps, predict_heatmaps
from .evaluate import (COCO_STAT_NAMES, MPII_TABLE_COLUMNS, coco_keypoint_eval,
                       head_sizes_from_boxes, json_safe, mpii_pckh, rescore_and_nms)


def resolve_amp(amp: str | None, device: torch.device | str) -> str | None:
    """``train.amp`` for ``device``: ``auto`` is bfloat16 on a CUDA device that supports it
    (no loss scaling needed), float16 on an older one, and off on the CPU, where
    reduced-precision convolutions are slower than float32 without AMX."""
    if amp != "auto":
        return amp
    if torch.device(device).type != "cuda":
        return None
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def resolve_flag(value: bool | str, device: torch.device | str) -> bool:
    """A true/false/auto setting (``model.channels_last``, ``train.cudnn_benchmark``):
    ``auto`` is on for CUDA. cuDNN's fp16/bf16 tensor-core convolutions take NHWC, and
    benchmark mode picks the fastest algorithm per shape."""
    return torch.device(device).type == "cuda" if value == "auto" else bool(value)


def autocast_context(device: torch.device, amp: str | None):
    amp = resolve_amp(amp, device)
    if not amp:
        return contextlib.nullcontext()
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _collate(batch):
    images = torch.stack([b[0] for b in batch])
    metas = [b[3] for b in batch]
    return images, metas


@torch.no_grad()
def run_inference(model: torch.nn.Module, dataset: TopDownDataset, batch_size: int = 32,
                  device: torch.device | str = "cpu", flip_test: bool = True,
                  shift_heatmap: bool = True, decode: str = "quarter", dark_kernel: int = 11,
                  amp: str | None = None, num_workers: int = 0, channels_last: bool = False,
                  progress: bool = False) -> dict[str, np.ndarray]:
    """Predict every sample of ``dataset``; keypoints come back in image pixels. ``finite``
    says, per sample, whether the model's heatmaps were all finite."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="inference", leave=False)
    keypoints, centers, scales, image_ids, scores, indices, finite = [], [], [], [], [], [], []
    try:
        for images, metas in loader:
            images = images.to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, amp):
                heatmaps = predict_heatmaps(model, images, dataset.info.flip_pairs, flip_test,
                                            shift_heatmap)
            finite.append(torch.isfinite(heatmaps).flatten(1).all(1).cpu().numpy())
            center = np.stack([m["center"].numpy() for m in metas])
            scale = np.stack([m["scale"].numpy() for m in metas])
            coords, maxvals = decode_heatmaps(heatmaps, center, scale, decode, dark_kernel)
            keypoints.append(np.concatenate([coords, maxvals], axis=2))
            centers.append(center)
            scales.append(scale)
            image_ids.extend(m["image_id"] for m in metas)
            scores.extend(m["score"] for m in metas)
            indices.extend(m["index"] for m in metas)
    finally:
        model.train(was_training)
    k = dataset.info.num_joints
    return {
        "keypoints": np.concatenate(keypoints) if keypoints else np.zeros((0, k, 3), np.float32),
        "centers": np.concatenate(centers) if centers else np.zeros((0, 2), np.float32),
        "scales": np.concatenate(scales) if scales else np.zeros((0, 2), np.float32),
        "image_ids": np.asarray(image_ids, dtype=np.int64),
        "box_scores": np.asarray(scores, dtype=np.float64),
        "indices": np.asarray(indices, dtype=np.int64),
        "finite": np.concatenate(finite) if finite else np.zeros(0, bool),
    }


def coco_results(predictions: dict[str, np.ndarray], dataset: CocoKeypoints,
                 test_cfg: dict[str, Any]) -> list[dict]:
    people = [{"image_id": int(image_id), "keypoints": kpts, "area": float(area),
               "box_score": float(score), "category_id": dataset.category_id}
              for image_id, kpts, area, score in zip(
                  predictions["image_ids"], predictions["keypoints"],
                  box_area_from_scale(predictions["scales"]), predictions["box_scores"])]
    return rescore_and_nms(people, dataset.info.require_sigmas(),
                           in_vis_thre=float(test_cfg["in_vis_thre"]),
                           oks_thre=float(test_cfg["oks_thre"]), soft=bool(test_cfg["soft_nms"]))


def _mpii_head_sizes(dataset: MPIIKeypoints, head_boxes: str | None) -> tuple[np.ndarray, str]:
    if head_boxes:
        if head_boxes.endswith(".npy"):
            boxes = np.load(head_boxes)
        else:
            with open(head_boxes, encoding="utf-8") as handle:
                boxes = np.asarray(json.load(handle), dtype=np.float64)
        return head_sizes_from_boxes(boxes), f"head boxes from {head_boxes}"
    # Without the official head boxes, approximate the head size by the head-top to
    # upper-neck distance (the head segment; close to 0.6 × the head-box diagonal).
    joints = np.stack([r.joints for r in dataset.records])
    sizes = np.linalg.norm(joints[:, 9] - joints[:, 8], axis=1)
    sizes = np.where(sizes > 0, sizes, np.median(sizes[sizes > 0]) if np.any(sizes > 0) else 1.0)
    warnings.warn("MPII PCKh: test.head_boxes not given; head sizes approximated by the "
                  "head-top to upper-neck distance", RuntimeWarning, stacklevel=2)
    return sizes, "head sizes approximated from head-top/upper-neck distance"


def _nonfinite_reason(predictions: dict[str, np.ndarray]) -> str | None:
    """Why the predictions cannot be scored (non-finite heatmaps or keypoints), or None."""
    keypoints = np.asarray(predictions["keypoints"])
    finite = np.isfinite(keypoints).reshape(len(keypoints), -1).all(axis=1)
    if "finite" in predictions:
        finite &= np.asarray(predictions["finite"], dtype=bool)
    bad = int((~finite).sum())
    if bad == 0:
        return None
    return (f"the model's heatmaps or keypoints are NaN or infinite for {bad} of "
            f"{len(finite)} people (NaN weights, or overflow under AMP); no score computed")


def evaluate_predictions(predictions: dict[str, np.ndarray], dataset: TopDownDataset,
                         test_cfg: dict[str, Any], output_dir: str | None = None
                         ) -> dict[str, Any]:
    """COCO keypoint stats (COCO-format sets) or the PCKh table (MPII), with ``valid``.

    Non-finite predictions are never scored: one warning, ``valid`` False, ``reason`` and
    every statistic NaN (null in JSON), so a broken model cannot pass for AP 0 or 1."""
    reason = _nonfinite_reason(predictions)
    if reason is not None:
        warnings.warn(f"evaluation: {reason}", RuntimeWarning, stacklevel=2)
    if isinstance(dataset, MPIIKeypoints):
        if reason is not None:
            return {"metric": "PCKh", "valid": False, "reason": reason,
                    "pckh": {name: float("nan") for name in MPII_TABLE_COLUMNS}}
        sizes, how = _mpii_head_sizes(dataset, test_cfg.get("head_boxes"))
        order = predictions["indices"]
        gt = np.stack([dataset.records[i].joints for i in order])
        vis = np.stack([dataset.records[i].joints_vis for i in order])
        table = mpii_pckh(predictions["keypoints"][:, :, :2], gt, vis, sizes[order],
                          float(test_cfg["pckh_threshold"]))
        return {"metric": "PCKh", "valid": True, "pckh": table, "head_sizes": how}
    if not isinstance(dataset, CocoKeypoints):
        raise TypeError(f"dataset: expected CocoKeypoints or MPIIKeypoints, got "
                        f"{type(dataset).__name__}")
    results = coco_results(predictions, dataset, test_cfg)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "keypoint_results.json"), "w", encoding="utf-8") as f:
            json.dump([_flag_nonfinite(r) for r in results], f, allow_nan=False)
    if reason is not None:
        stats = {name: float("nan") for name in COCO_STAT_NAMES}
        return {"metric": "AP", "valid": False, "reason": reason, "stats": stats,
                "AP": stats["AP"], "num_results": len(results)}
    stats = coco_keypoint_eval(dataset.coco.dataset, results, dataset.info.require_sigmas())
    return {"metric": "AP", "valid": True, "stats": stats, "AP": stats["AP"],
            "num_results": len(results)}


def _flag_nonfinite(result: dict) -> dict:
    """A COCO result ready for JSON: non-finite values become null and the record gets
    ``"valid": false`` (COCO tools then refuse it instead of misreading it)."""
    values = [result["score"], *result["keypoints"]]
    if all(math.isfinite(v) for v in values):
        return result
    return {**json_safe(result), "valid": False}


def evaluate_model(model: torch.nn.Module, dataset: TopDownDataset, config: dict[str, Any],
                   device: torch.device | str = "cpu", output_dir: str | None = None,
                   progress: bool = False) -> dict[str, Any]:
    test = config["test"]
    predictions = run_inference(
        model, dataset, int(test["batch_size"]), device, bool(test["flip_test"]),
        bool(test["shift_heatmap"]), test["decode"], int(test["dark_kernel"]),
        config["train"].get("amp"), num_workers=int(config["data"]["num_workers"]),
        channels_last=resolve_flag(config["model"]["channels_last"], device), progress=progress)
    return evaluate_predictions(predictions, dataset, test, output_dir)
