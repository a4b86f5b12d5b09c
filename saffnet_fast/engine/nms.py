"""OKS-based non-maximum suppression for top-down person results (HRNet's oks_nms and
soft_oks_nms)."""
from __future__ import annotations

import numpy as np


def oks_iou(g: np.ndarray, d: np.ndarray, area_g: float, area_d: np.ndarray, sigmas,
            in_vis_thre: float | None = None) -> np.ndarray:
    """OKS between one keypoint vector ``g`` (K*3) and rows of ``d`` (M, K*3)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    variances = (sigmas * 2) ** 2
    xg, yg, vg = g[0::3], g[1::3], g[2::3]
    ious = np.zeros(d.shape[0])
    for n in range(d.shape[0]):
        xd, yd, vd = d[n, 0::3], d[n, 1::3], d[n, 2::3]
        e = ((xd - xg) ** 2 + (yd - yg) ** 2) / variances / ((area_g + area_d[n]) / 2 + np.spacing(1)) / 2
        if in_vis_thre is not None:
            e = e[(vg > in_vis_thre) & (vd > in_vis_thre)]
        ious[n] = np.sum(np.exp(-e)) / e.shape[0] if e.shape[0] != 0 else 0.0
    return ious


def _unpack(people: list[dict]):
    scores = np.array([p["score"] for p in people], dtype=np.float64)
    keypoints = np.array([np.asarray(p["keypoints"], np.float64).reshape(-1) for p in people])
    areas = np.array([p["area"] for p in people], dtype=np.float64)
    return scores, keypoints, areas


def oks_nms(people: list[dict], threshold: float, sigmas, in_vis_thre: float | None = None
            ) -> list[int]:
    """Greedy NMS: indices of kept ``people`` (dicts with score, keypoints (K*3), area),
    dropping any whose OKS with a higher-scoring kept one exceeds ``threshold``."""
    if not people:
        return []
    scores, keypoints, areas = _unpack(people)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        ious = oks_iou(keypoints[i], keypoints[order[1:]], areas[i], areas[order[1:]], sigmas,
                       in_vis_thre)
        order = order[np.where(ious <= threshold)[0] + 1]
    return keep


def soft_oks_nms(people: list[dict], threshold: float, sigmas,
                 in_vis_thre: float | None = None, max_dets: int = 20) -> list[int]:
    """Soft-NMS (Gaussian-free, linear rescoring as in HRNet): overlapping people have their
    score multiplied by (1 - OKS) where OKS >= ``threshold``; keeps at most ``max_dets``.
    Rescored values are written back to each kept dict's ``score``."""
    if not people:
        return []
    scores, keypoints, areas = _unpack(people)
    order = scores.argsort()[::-1]
    scores = scores[order]
    keep = []
    while order.size > 0 and len(keep) < max_dets:
        i = order[0]
        keep.append(int(i))
        people[i]["score"] = float(scores[0])
        ious = oks_iou(keypoints[i], keypoints[order[1:]], areas[i], areas[order[1:]], sigmas,
                       in_vis_thre)
        order, scores = order[1:], scores[1:]
        overlap = ious >= threshold
        scores[overlap] = scores[overlap] * (1 - ious[overlap])
        resort = scores.argsort()[::-1]
        order, scores = order[resort], scores[resort]
    return keep
