"""COCO keypoint AP (COCOeval, iouType 'keypoints', with the dataset's sigmas) and MPII PCKh."""
from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from .nms import oks_nms, soft_oks_nms

COCO_STAT_NAMES = ("AP", "AP .5", "AP .75", "AP (M)", "AP (L)",
                   "AR", "AR .5", "AR .75", "AR (M)", "AR (L)")


def _coco_classes():
    """(COCO, COCOeval, backend name): faster-coco-eval when importable, else pycocotools."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster  # type: ignore

        return COCO, COCOeval_faster, "faster_coco_eval"
    except Exception:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval, "pycocotools"


def _load_json(path: str, what: str):
    from ..data.topdown import read_json

    return read_json(path, what)


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars and arrays made plain and every non-finite float replaced
    by None: JSON has no NaN or infinity (write with ``json.dump(..., allow_nan=False)``)."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


# What pycocotools' keypoint COCOeval reads from every ground-truth annotation.
_GT_ANNOTATION_KEYS = ("id", "image_id", "category_id", "keypoints", "num_keypoints", "area",
                       "bbox", "iscrowd")
_RESULT_KEYS = ("image_id", "category_id", "keypoints", "score")


def check_sigmas(sigmas, num_joints: int | None) -> np.ndarray:
    """OKS sigmas as a float64 vector: one positive finite value per keypoint."""
    values = np.asarray(sigmas, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"sigmas: expected one OKS sigma per keypoint, got shape {values.shape}")
    bad = ~np.isfinite(values) | (values <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"sigmas: expected positive finite values, got {values[i]!r} at "
                         f"index {i}")
    if num_joints is not None and values.size != num_joints:
        raise ValueError(f"sigmas: expected {num_joints} values (one per keypoint of the "
                         f"ground truth), got {values.size}")
    return values


def _check_ground_truth(gt: Any) -> tuple[set, set, int | None]:
    """(image ids, keypoint category ids, keypoints per person) of a COCO keypoints
    annotation dict, refusing one COCOeval would score as all −1 or fail on."""
    if not isinstance(gt, dict):
        raise ValueError(f"ground truth: expected a COCO annotation object, got "
                         f"{type(gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise ValueError(f"ground truth: expected the COCO key {key!r} holding a list (a "
                             f"keypoints annotation file has images, annotations and "
                             f"categories), got "
                             f"{'no such key' if key not in gt else type(gt[key]).__name__}")
    categories = [c for c in gt["categories"] if isinstance(c, dict) and c.get("keypoints")]
    if not categories:
        raise ValueError("ground truth: expected a category with a 'keypoints' list, got none")
    category_ids = {c.get("id") for c in categories}
    num_joints = len(categories[0]["keypoints"])
    image_ids = {image.get("id") for image in gt["images"] if isinstance(image, dict)}
    labelled = 0
    for i, ann in enumerate(gt["annotations"]):
        missing = [k for k in _GT_ANNOTATION_KEYS if not isinstance(ann, dict) or k not in ann]
        if missing:
            raise ValueError(f"ground truth annotations[{i}]: expected the keys "
                             f"{', '.join(_GT_ANNOTATION_KEYS)}; missing {', '.join(missing)}")
        if (ann["category_id"] in category_ids and not ann["iscrowd"]
                and ann["num_keypoints"] > 0):
            labelled += 1
    if labelled == 0:
        raise ValueError(f"ground truth: expected at least one non-crowd annotation with "
                         f"labelled keypoints in category {sorted(category_ids)}, got none "
                         f"({len(gt['annotations'])} annotations); nothing to evaluate against")
    return image_ids, category_ids, num_joints


def _check_results(results: Any, image_ids: set, category_ids: set, num_values: int) -> None:
    if not isinstance(results, list):
        raise ValueError(f"results: expected a JSON list of {{image_id, category_id, keypoints, "
                         f"score}} entries, got {type(results).__name__}")
    for i, r in enumerate(results):
        missing = [k for k in _RESULT_KEYS if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"results[{i}]: expected the keys {', '.join(_RESULT_KEYS)}; "
                             f"missing {', '.join(missing)}")
        try:
            keypoints = np.asarray(r["keypoints"], dtype=np.float64).reshape(-1)
            score = float(r["score"])
        except (TypeError, ValueError):
            raise ValueError(f"results[{i}]: expected numbers in 'keypoints' and 'score', got "
                             f"{r['keypoints']!r:.80} and {r['score']!r}") from None
        if keypoints.size != num_values:
            raise ValueError(f"results[{i}]: expected {num_values} keypoint values, got "
                             f"{keypoints.size}")
        if not (np.isfinite(keypoints).all() and math.isfinite(score)):
            raise ValueError(f"results[{i}] (image_id {r['image_id']}): expected finite "
                             f"keypoints and score, got NaN or infinity (a model with "
                             f"non-finite outputs cannot be scored)")
        if r["image_id"] not in image_ids:
            raise ValueError(f"results[{i}]: image_id {r['image_id']!r} is not an image of "
                             f"the ground truth")
        if r["category_id"] not in category_ids:
            raise ValueError(f"results[{i}]: expected category_id in {sorted(category_ids)} "
                             f"(the ground truth's keypoint categories), got "
                             f"{r['category_id']!r}")


def coco_keypoint_eval(ground_truth: str | dict, results: str | list[dict],
                       sigmas: Sequence[float] | None = None, verbose: bool = False
                       ) -> dict[str, float]:
    """The ten COCO keypoint statistics of ``results`` (list or JSON file in the COCO results
    format) against ``ground_truth`` (annotation file or dict). ``sigmas`` default to the
    COCO ones when the category has 17 keypoints.

    Ground truth without labelled annotations, results with NaN or infinite values, and
    non-positive sigmas raise ValueError: COCOeval would report -1 or a perfect score."""
    COCO, COCOeval, _backend = _coco_classes()
    gt_dict = _load_json(ground_truth, "ground-truth annotation file") if isinstance(
        ground_truth, str) else ground_truth
    res_list = _load_json(results, "keypoint results file") if isinstance(results, str) else results
    image_ids, category_ids, num_joints = _check_ground_truth(gt_dict)
    if sigmas is None:
        if num_joints != 17:
            raise ValueError(f"sigmas: the ground truth has {num_joints} keypoints; pass one OKS "
                             "sigma per keypoint (COCO's defaults only fit 17)")
        from ..data.dataset_info import COCO_SIGMAS

        sigmas = COCO_SIGMAS
    sigmas = check_sigmas(sigmas, num_joints)
    _check_results(res_list, image_ids, category_ids, len(sigmas) * 3)
    if not res_list:
        return {name: 0.0 for name in COCO_STAT_NAMES}
    try:
        return _run_cocoeval(COCO, COCOeval, gt_dict, res_list, sigmas, verbose)
    except Exception as exc:
        if _backend == "pycocotools":
            raise
        warnings.warn(f"faster_coco_eval failed ({type(exc).__name__}: {exc}); using "
                      "pycocotools", RuntimeWarning, stacklevel=2)
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return _run_cocoeval(COCO, COCOeval, gt_dict, res_list, sigmas, verbose)


def _run_cocoeval(COCO, COCOeval, gt_dict, res_list, sigmas, verbose) -> dict[str, float]:
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(res_list)
        evaluator = COCOeval(coco_gt, coco_dt, "keypoints")
        evaluator.params.useSegm = None
        evaluator.params.kpt_oks_sigmas = sigmas
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) for name, v in zip(COCO_STAT_NAMES, evaluator.stats[:10])}


def rescore_and_nms(people: list[dict], sigmas, in_vis_thre: float = 0.2,
                    oks_thre: float = 0.9, soft: bool = False) -> list[dict]:
    """HRNet's COCO post-processing. Each person dict has ``image_id``, ``keypoints`` (K, 3)
    with per-joint confidence, ``area`` and ``box_score``. The person score becomes
    box_score × mean confidence of joints above ``in_vis_thre``; then OKS-NMS per image
    (``oks_thre`` >= 1 disables it). Returns COCO result dicts (category 1)."""
    by_image: dict[Any, list[dict]] = defaultdict(list)
    for person in people:
        kpts = np.asarray(person["keypoints"], dtype=np.float64)
        confident = kpts[:, 2][kpts[:, 2] > in_vis_thre]
        keypoint_score = confident.mean() if confident.size else 0.0
        by_image[person["image_id"]].append({
            "image_id": person["image_id"], "keypoints": kpts, "area": float(person["area"]),
            "score": float(person.get("box_score", 1.0)) * float(keypoint_score),
            "category_id": int(person.get("category_id", 1)),
        })
    results = []
    for image_id, candidates in by_image.items():
        if oks_thre < 1.0:
            nms = soft_oks_nms if soft else oks_nms
            keep = nms(candidates, oks_thre, sigmas, in_vis_thre)
            candidates = [candidates[i] for i in keep]
        for c in candidates:
            results.append({"image_id": c["image_id"], "category_id": c["category_id"],
                            "keypoints": [round(float(v), 3) for v in c["keypoints"].reshape(-1)],
                            "score": round(float(c["score"]), 6)})
    return results


# ------------------------------------------------------------------------------- MPII

MPII_TABLE_COLUMNS = ("Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean")
# MPII joint order: 0 r-ankle, 1 r-knee, 2 r-hip, 3 l-hip, 4 l-knee, 5 l-ankle, 6 pelvis,
# 7 thorax, 8 upper neck, 9 head top, 10 r-wrist, 11 r-elbow, 12 r-shoulder, 13 l-shoulder,
# 14 l-elbow, 15 l-wrist.
_MPII_GROUPS = {"Head": (9,), "Shoulder": (12, 13), "Elbow": (11, 14), "Wrist": (10, 15),
                "Hip": (2, 3), "Knee": (1, 4), "Ankle": (0, 5)}
MPII_SC_BIAS = 0.6  # head-box diagonal -> head size, as in the MPII toolkit and HRNet


def head_sizes_from_boxes(head_boxes: np.ndarray) -> np.ndarray:
    """(N, 2, 2) head boxes [[x1, y1], [x2, y2]] -> head sizes (diagonal × 0.6)."""
    head_boxes = np.asarray(head_boxes, dtype=np.float64)
    if head_boxes.ndim != 3 or head_boxes.shape[1:] != (2, 2):
        raise ValueError(f"head_boxes: expected shape (N, 2, 2), got {head_boxes.shape}")
    return np.linalg.norm(head_boxes[:, 1] - head_boxes[:, 0], axis=1) * MPII_SC_BIAS


def mpii_pckh(preds: np.ndarray, gt: np.ndarray, visible: np.ndarray, head_sizes: np.ndarray,
              threshold: float = 0.5) -> dict[str, float]:
    """PCKh@threshold (percent) per joint group and the Mean over all joints but pelvis and
    thorax, weighted by visible-joint counts (HRNet's MPII evaluation).

    preds, gt: (N, 16, 2) in the same pixel convention; visible: (N, 16); head_sizes: (N,).
    """
    preds = np.asarray(preds, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    visible = np.asarray(visible, dtype=np.float64) > 0
    head_sizes = np.asarray(head_sizes, dtype=np.float64)
    if preds.shape != gt.shape or preds.ndim != 3 or preds.shape[1:] != (16, 2):
        raise ValueError(f"preds/gt: expected equal shapes (N, 16, 2), got {preds.shape} and "
                         f"{gt.shape}")
    if visible.shape != preds.shape[:2] or head_sizes.shape != preds.shape[:1]:
        raise ValueError(f"visible {visible.shape} / head_sizes {head_sizes.shape}: expected "
                         f"{preds.shape[:2]} / {preds.shape[:1]}")
    if np.any(head_sizes <= 0):
        raise ValueError("head_sizes: expected positive values")
    scaled = np.linalg.norm(preds - gt, axis=2) / head_sizes[:, None]
    correct = (scaled <= threshold) & visible
    joint_count = visible.sum(axis=0)
    per_joint = 100.0 * correct.sum(axis=0) / np.maximum(joint_count, 1)
    table = {}
    for name, joints in _MPII_GROUPS.items():
        table[name] = float(np.mean([per_joint[j] for j in joints]))
    mask = np.ones(16, bool)
    mask[6:8] = False
    counts = joint_count * mask
    table["Mean"] = float((per_joint * counts).sum() / max(counts.sum(), 1))
    return table


def format_pckh_table(table: dict[str, float]) -> str:
    head = " | ".join(f"{c:>8}" for c in MPII_TABLE_COLUMNS)
    row = " | ".join(f"{table[c]:8.2f}" for c in MPII_TABLE_COLUMNS)
    return f"{head}\n{row}"


def format_coco_stats(stats: dict[str, float]) -> str:
    return "\n".join(f"{name:>7}: {value:.4f}" for name, value in stats.items())
