"""Top-down geometry and targets with HRNet's semantics.

A person box is described by ``center`` (x, y) and ``scale`` (w, h) in units of
:data:`PIXEL_STD` pixels, as in HRNet and MMPose. :func:`get_affine_transform` maps that box
(rotated by ``rot`` degrees) onto an output raster of ``output_size`` = (width, height).
Heatmap pixel ``j`` corresponds to input pixel ``stride * j`` (HRNet's target convention),
so decoding with the inverse transform for the heatmap size lands back in image pixels.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

PIXEL_STD = 200.0


def box_to_center_scale(box: Sequence[float], aspect_ratio: float,
                        padding: float = 1.25) -> tuple[np.ndarray, np.ndarray]:
    """(x, y, w, h) box -> (center, scale), widening the short side to ``aspect_ratio``
    (= input width / height) and padding by ``padding`` (HRNet's 1.25)."""
    x, y, w, h = (float(v) for v in box[:4])
    center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float32)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    scale = np.array([w / PIXEL_STD, h / PIXEL_STD], dtype=np.float32) * padding
    return center, scale


def _rotate_point(point: np.ndarray, rot_rad: float) -> np.ndarray:
    sn, cs = np.sin(rot_rad), np.cos(rot_rad)
    return np.array([point[0] * cs - point[1] * sn, point[0] * sn + point[1] * cs],
                    dtype=np.float32)


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    direction = a - b
    return b + np.array([-direction[1], direction[0]], dtype=np.float32)


def get_affine_transform(center, scale, rot: float, output_size, shift=(0.0, 0.0),
                         inv: bool = False) -> np.ndarray:
    """2×3 matrix mapping the box (center, scale×PIXEL_STD, rotated by ``rot`` degrees) to an
    ``output_size`` = (width, height) raster; ``inv`` gives the inverse mapping."""
    center = np.asarray(center, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    if scale.ndim == 0:
        scale = np.array([scale, scale], dtype=np.float32)
    shift = np.asarray(shift, dtype=np.float32)
    scale_px = scale * PIXEL_STD
    src_w = scale_px[0]
    dst_w, dst_h = float(output_size[0]), float(output_size[1])
    rot_rad = np.pi * rot / 180.0
    src_dir = _rotate_point(np.array([0.0, src_w * -0.5], dtype=np.float32), rot_rad)
    dst_dir = np.array([0.0, dst_w * -0.5], dtype=np.float32)
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = center + scale_px * shift
    src[1] = center + src_dir + scale_px * shift
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = dst[0] + dst_dir
    src[2] = _third_point(src[0], src[1])
    dst[2] = _third_point(dst[0], dst[1])
    if inv:
        return cv2.getAffineTransform(dst, src)
    return cv2.getAffineTransform(src, dst)


def affine_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2×3 affine ``matrix`` to an (..., 2) array of points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def warp_image(image: np.ndarray, center, scale, rot: float, output_size) -> np.ndarray:
    """Crop the (rotated) box out of ``image`` into an ``output_size`` = (w, h) raster."""
    matrix = get_affine_transform(center, scale, rot, output_size)
    return cv2.warpAffine(image, matrix, (int(output_size[0]), int(output_size[1])),
                          flags=cv2.INTER_LINEAR)


def flip_joints(joints: np.ndarray, joints_vis: np.ndarray, image_width: int,
                flip_pairs) -> tuple[np.ndarray, np.ndarray]:
    """Mirror joints horizontally in an image of ``image_width`` and swap the flip pairs."""
    joints = joints.copy()
    joints_vis = joints_vis.copy()
    joints[:, 0] = image_width - joints[:, 0] - 1
    for a, b in flip_pairs:
        joints[[a, b]] = joints[[b, a]]
        joints_vis[[a, b]] = joints_vis[[b, a]]
    return joints * (joints_vis[:, :1] > 0), joints_vis


def flip_back(heatmaps, flip_pairs):
    """Heatmaps predicted on a mirrored input -> heatmaps for the original input
    (mirror the width axis and swap the flip pairs). Works on numpy arrays and torch tensors
    shaped (N, K, H, W)."""
    if hasattr(heatmaps, "flip"):  # torch
        out = heatmaps.flip(-1).clone()
    else:
        out = heatmaps[..., ::-1].copy()
    for a, b in flip_pairs:
        tmp = out[:, a].clone() if hasattr(out, "clone") else out[:, a].copy()
        out[:, a] = out[:, b]
        out[:, b] = tmp
    return out


def half_body_box(joints: np.ndarray, joints_vis: np.ndarray, upper_body_ids,
                  aspect_ratio: float, rng: np.random.Generator,
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """HRNet's half-body augmentation: a box around the visible upper (or lower) body joints,
    scaled by 1.5; None when too few joints are visible."""
    upper_set = set(int(i) for i in upper_body_ids)
    upper, lower = [], []
    for joint_id in range(joints.shape[0]):
        if joints_vis[joint_id, 0] > 0:
            (upper if joint_id in upper_set else lower).append(joints[joint_id])
    if rng.standard_normal() < 0.5 and len(upper) > 2:
        selected = upper
    else:
        selected = lower if len(lower) > 2 else upper
    if len(selected) < 2:
        return None
    selected = np.array(selected, dtype=np.float32)
    center = selected.mean(axis=0)[:2]
    left_top = selected.min(axis=0)
    right_bottom = selected.max(axis=0)
    w = right_bottom[0] - left_top[0]
    h = right_bottom[1] - left_top[1]
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    scale = np.array([w / PIXEL_STD, h / PIXEL_STD], dtype=np.float32) * 1.5
    return center.astype(np.float32), scale


def gaussian_targets(joints: np.ndarray, joints_vis: np.ndarray, heatmap_size,
                     stride: tuple[float, float], sigma: float = 2.0,
                     unbiased: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian heatmaps (K, H, W) and target weights (K, 1).

    ``joints`` are in input-image pixels; ``stride`` = input size / heatmap size (x, y).
    HRNet rounds the centre to the nearest heatmap pixel and truncates at 3σ; ``unbiased``
    keeps the sub-pixel centre (DARK's unbiased encoding). A joint whose 3σ window falls
    entirely outside the heatmap gets weight 0.
    """
    num_joints = joints.shape[0]
    width, height = int(heatmap_size[0]), int(heatmap_size[1])
    target = np.zeros((num_joints, height, width), dtype=np.float32)
    weight = (joints_vis[:, 0] > 0).astype(np.float32).reshape(num_joints, 1)
    radius = sigma * 3
    xs = np.arange(width, dtype=np.float32)[None, :]
    ys = np.arange(height, dtype=np.float32)[:, None]
    for k in range(num_joints):
        if weight[k, 0] == 0:
            continue
        mu_x = joints[k, 0] / stride[0]
        mu_y = joints[k, 1] / stride[1]
        if not unbiased:
            mu_x = float(int(mu_x + 0.5))
            mu_y = float(int(mu_y + 0.5))
        ul = (int(mu_x - radius), int(mu_y - radius))
        br = (int(mu_x + radius + 1), int(mu_y + radius + 1))
        if ul[0] >= width or ul[1] >= height or br[0] < 0 or br[1] < 0:
            weight[k, 0] = 0
            continue
        gauss = np.exp(-((xs - mu_x) ** 2 + (ys - mu_y) ** 2) / (2 * sigma ** 2))
        window = (np.abs(xs - mu_x) <= radius) & (np.abs(ys - mu_y) <= radius)
        target[k] = np.where(window, gauss, 0.0)
    return target, weight
