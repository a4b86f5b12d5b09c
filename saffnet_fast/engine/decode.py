"""Heatmaps -> keypoints: argmax with HRNet's quarter-pixel offset (or DARK), then the inverse
affine back to image coordinates; flip test with HRNet's heatmap shift."""
from __future__ import annotations

import cv2
import numpy as np
import torch

from ..data.transforms import affine_points, flip_back, get_affine_transform


def get_max_preds(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax location (N, K, 2) as (x, y) and peak value (N, K, 1); zero where peak <= 0."""
    if heatmaps.ndim != 4:
        raise ValueError(f"heatmaps: expected (N, K, H, W), got shape {heatmaps.shape}")
    n, k, _h, w = heatmaps.shape
    flat = heatmaps.reshape(n, k, -1)
    idx = flat.argmax(axis=2)
    maxvals = flat.max(axis=2)[..., None]
    preds = np.stack([idx % w, idx // w], axis=2).astype(np.float32)
    preds *= (maxvals > 0.0)
    return preds, maxvals.astype(np.float32)


def quarter_offset(coords: np.ndarray, heatmaps: np.ndarray) -> np.ndarray:
    """Shift each argmax a quarter pixel toward the higher neighbour (HRNet)."""
    coords = coords.copy()
    n, k, h, w = heatmaps.shape
    for i in range(n):
        for j in range(k):
            hm = heatmaps[i, j]
            px, py = int(coords[i, j, 0] + 0.5), int(coords[i, j, 1] + 0.5)
            if 1 < px < w - 1 and 1 < py < h - 1:
                diff = np.array([hm[py, px + 1] - hm[py, px - 1], hm[py + 1, px] - hm[py - 1, px]])
                coords[i, j] += np.sign(diff) * 0.25
    return coords


def _gaussian_blur(heatmaps: np.ndarray, kernel: int) -> np.ndarray:
    border = (kernel - 1) // 2
    out = heatmaps.copy()
    n, k, h, w = heatmaps.shape
    for i in range(n):
        for j in range(k):
            peak = heatmaps[i, j].max()
            padded = np.pad(heatmaps[i, j], border, mode="constant")
            blurred = cv2.GaussianBlur(padded, (kernel, kernel), 0)[border:-border, border:-border]
            if blurred.max() > 0:
                blurred = blurred * (peak / blurred.max())
            out[i, j] = blurred
    return out


def dark_refine(coords: np.ndarray, heatmaps: np.ndarray, kernel: int = 11) -> np.ndarray:
    """DARK (Zhang et al. 2020): Taylor expansion of the log of the blurred heatmap around the
    argmax; ``kernel`` is the blur size (11 for 64×48 heatmaps, odd)."""
    coords = coords.copy()
    hm = np.log(np.maximum(_gaussian_blur(heatmaps, kernel), 1e-10))
    n, k, h, w = hm.shape
    for i in range(n):
        for j in range(k):
            px, py = int(coords[i, j, 0]), int(coords[i, j, 1])
            if not (1 < px < w - 2 and 1 < py < h - 2):
                continue
            m = hm[i, j]
            dx = 0.5 * (m[py, px + 1] - m[py, px - 1])
            dy = 0.5 * (m[py + 1, px] - m[py - 1, px])
            dxx = 0.25 * (m[py, px + 2] - 2 * m[py, px] + m[py, px - 2])
            dxy = 0.25 * (m[py + 1, px + 1] - m[py - 1, px + 1] - m[py + 1, px - 1]
                          + m[py - 1, px - 1])
            dyy = 0.25 * (m[py + 2, px] - 2 * m[py, px] + m[py - 2, px])
            det = dxx * dyy - dxy ** 2
            if det != 0:
                hessian = np.array([[dxx, dxy], [dxy, dyy]])
                offset = -np.linalg.inv(hessian) @ np.array([dx, dy])
                if np.all(np.abs(offset) < 1.5):  # a flat or noisy peak: keep the argmax
                    coords[i, j] += offset
    return coords


def heatmap_coords(heatmaps: np.ndarray, method: str = "quarter", dark_kernel: int = 11
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel heatmap coordinates (N, K, 2) and peak values (N, K, 1)."""
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    coords, maxvals = get_max_preds(heatmaps)
    if method == "quarter":
        coords = quarter_offset(coords, heatmaps)
    elif method == "dark":
        coords = dark_refine(coords, heatmaps, dark_kernel)
    elif method != "argmax":
        raise ValueError(f"decode method: expected 'argmax', 'quarter' or 'dark', got {method!r}")
    return coords, maxvals


def heatmap_to_image(coords: np.ndarray, centers, scales, heatmap_size,
                     rotations=None) -> np.ndarray:
    """Map (N, K, 2) heatmap coordinates back to image pixels through each sample's box."""
    out = np.zeros_like(coords, dtype=np.float32)
    for i in range(coords.shape[0]):
        rot = 0.0 if rotations is None else float(rotations[i])
        inverse = get_affine_transform(centers[i], scales[i], rot, heatmap_size, inv=True)
        out[i] = affine_points(coords[i], inverse)
    return out


def decode_heatmaps(heatmaps, centers, scales, method: str = "quarter", dark_kernel: int = 11
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (N, K, h, w) -> image keypoints (N, K, 2) and scores (N, K, 1)."""
    if isinstance(heatmaps, torch.Tensor):
        heatmaps = heatmaps.detach().float().cpu().numpy()
    coords, maxvals = heatmap_coords(heatmaps, method, dark_kernel)
    h, w = heatmaps.shape[2:]
    return heatmap_to_image(coords, np.asarray(centers), np.asarray(scales), (w, h)), maxvals


@torch.no_grad()
def predict_heatmaps(model: torch.nn.Module, images: torch.Tensor, flip_pairs=None,
                     flip_test: bool = True, shift_heatmap: bool = True) -> torch.Tensor:
    """Model heatmaps, averaged with those of the mirrored input when ``flip_test``.

    The flipped prediction is mirrored back, its flip pairs swapped and (``shift_heatmap``)
    moved one pixel right: heatmap pixel j stands for input pixel 4j, so mirroring the input
    moves it to 4j - 3 in the original frame, i.e. 3/4 of a heatmap pixel left (HRNet)."""
    output = model(images)
    if isinstance(output, (list, tuple)):
        output = output[-1]
    if not flip_test:
        return output.float()
    flipped = model(images.flip(3))
    if isinstance(flipped, (list, tuple)):
        flipped = flipped[-1]
    flipped = flip_back(flipped.float(), flip_pairs or [])
    if shift_heatmap:
        flipped[..., 1:] = flipped[..., :-1].clone()
    return (output.float() + flipped) * 0.5
