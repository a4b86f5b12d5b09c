"""A synthetic COCO-format keypoint dataset: the embedded default for quick runs and tests.

Each image shows one to a few front-facing stick figures (filled torso, limbs of varying
width and colour, a head with eyes, nose and ears) with the 17 COCO keypoints, over noise,
gradient or clutter backgrounds, with occluders. The figures are made to be learnable at a
low input resolution (64×48): they fill most of the image height, every limb joint carries a
visible cap (elbow and knee patches, hands, shoes) and the figure's left side is lit brighter
than its right, so left and right differ in appearance as well as in position.
Visibility follows COCO: v=2 visible, v=1 labelled but hidden (by an occluder or a person in
front), v=0 outside the image (x = y = 0).

``bbox`` is the bounding box of the visible figure. ``area`` (the OKS scale s²) is the box
area w·h: a stated choice, the common convention for COCO-format keypoint sets without
segmentation masks. It is looser than COCO's own (the segmentation's pixel count, about a
third of the box for these figures), so the same error scores a higher OKS here.

Generation is deterministic per (parameters, seed): every image draws from its own
``numpy`` generator seeded by (seed, split, index). The set is written once into a cache
directory named by a hash of the parameters, atomically (built in a temporary directory and
renamed), so concurrent processes (DDP ranks) can call :func:`ensure_synthetic_dataset`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from .dataset_info import COCO_KEYPOINTS, COCO_SKELETON

GENERATOR_VERSION = 2
SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SyntheticParams:
    num_train: int = 400
    num_val: int = 60
    image_height: int = 160
    image_width: int = 160
    max_people: int = 3
    seed: int = 0
    image_format: str = "jpg"

    def digest(self) -> str:
        payload = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def validate(self) -> "SyntheticParams":
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError("data.synthetic.num_train / num_val: expected positive counts, got "
                             f"{self.num_train} / {self.num_val}")
        if not (64 <= self.image_height <= 1024 and 64 <= self.image_width <= 1024):
            raise ValueError("data.synthetic.image_height / image_width: expected 64..1024, got "
                             f"{self.image_height}×{self.image_width}")
        if self.max_people < 1:
            raise ValueError(f"data.synthetic.max_people: expected >= 1, got {self.max_people}")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"data.synthetic.image_format: expected 'jpg' or 'png', got "
                             f"{self.image_format!r}")
        return self


def default_cache_root() -> str:
    return os.environ.get("SAFFNET_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "saffnet_fast")


def synthetic_dir(params: SyntheticParams, cache_root: str | None = None) -> str:
    return os.path.join(cache_root or default_cache_root(), f"synthetic-{params.digest()}")


def split_paths(root: str, split: str) -> tuple[str, str]:
    """(annotation file, image directory) of a split inside a generated dataset."""
    return (os.path.join(root, "annotations", f"person_keypoints_{split}.json"),
            os.path.join(root, "images", split))


# ---------------------------------------------------------------- drawing

def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:  # smoothed colour noise
        small = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3)).astype(np.uint8)
        image = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        noise = rng.normal(0, 12, size=(h, w, 3))
        return np.clip(image + noise, 0, 255).astype(np.uint8)
    c0 = rng.integers(0, 256, size=3).astype(np.float32)
    c1 = rng.integers(0, 256, size=3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    image = (c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.uint8)
    if kind == 2:  # clutter: shapes and lines that look a little like limbs
        for _ in range(int(rng.integers(2, 6))):
            color = tuple(int(v) for v in rng.integers(0, 256, size=3))
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            shape = rng.integers(3)
            if shape == 0:
                cv2.circle(image, (x, y), int(rng.integers(3, max(4, w // 6))), color, -1)
            elif shape == 1:
                cv2.rectangle(image, (x, y), (x + int(rng.integers(5, w // 3)),
                                              y + int(rng.integers(5, h // 3))), color, -1)
            else:
                cv2.line(image, (x, y), (int(rng.integers(0, w)), int(rng.integers(0, h))),
                         color, int(rng.integers(1, max(2, w // 30))))
    return image


def _unit(angle_deg: float) -> np.ndarray:
    """Direction for an angle measured from straight down, positive toward image +x."""
    a = np.deg2rad(angle_deg)
    return np.array([np.sin(a), np.cos(a)])


def _figure(rng: np.random.Generator, h: int, w: int):
    """Keypoints (17, 2) of one figure plus its drawing parameters."""
    # Large figures: the head spans ~15% of the height, so the face keypoints stay a few
    # input pixels apart at 64×48.
    height = rng.uniform(0.6, 0.95) * h
    lean = rng.normal(0, 8)
    down = _unit(lean)
    side = np.array([down[1], -down[0]])  # toward image +x (the figure's left)
    hip_mid = np.array([rng.uniform(0.2, 0.8) * w, 0])
    # The figure spans ~0.49 height above the hips and ~0.47 below; allow a little cut-off.
    hip_mid[1] = rng.uniform(0.45 * height, max(0.45 * height + 1, h - 0.40 * height))
    torso = 0.30 * height
    neck = hip_mid - down * torso
    shoulder_half = rng.uniform(0.09, 0.13) * height
    hip_half = rng.uniform(0.06, 0.08) * height
    k = np.zeros((17, 2))
    k[5] = neck + side * shoulder_half   # left shoulder (image right)
    k[6] = neck - side * shoulder_half
    k[11] = hip_mid + side * hip_half
    k[12] = hip_mid - side * hip_half
    upper_arm, forearm = 0.17 * height, 0.15 * height
    thigh, shin = 0.24 * height, 0.23 * height
    for shoulder, elbow, wrist, sign in ((5, 7, 9, 1), (6, 8, 10, -1)):
        a1 = lean + sign * rng.uniform(-10, 150)
        a2 = a1 + sign * rng.uniform(-20, 130)
        k[elbow] = k[shoulder] + _unit(a1) * upper_arm
        k[wrist] = k[elbow] + _unit(a2) * forearm
    for hip, knee, ankle, sign in ((11, 13, 15, 1), (12, 14, 16, -1)):
        a1 = lean + sign * rng.uniform(-15, 60)
        a2 = a1 - sign * rng.uniform(-10, 70)
        k[knee] = k[hip] + _unit(a1) * thigh
        k[ankle] = k[knee] + _unit(a2) * shin
    head_r = rng.uniform(0.065, 0.085) * height
    head_c = neck - down * (head_r * 1.25)
    yaw = rng.uniform(-0.35, 0.35)  # turns the face: features shift sideways
    k[0] = head_c + side * yaw * head_r + down * 0.25 * head_r
    k[1] = head_c + side * (yaw + 0.38) * head_r - down * 0.2 * head_r
    k[2] = head_c + side * (yaw - 0.38) * head_r - down * 0.2 * head_r
    k[3] = head_c + side * 0.98 * head_r
    k[4] = head_c - side * 0.98 * head_r
    style = {
        "shirt": tuple(int(v) for v in rng.integers(40, 216, size=3)),
        "trousers": tuple(int(v) for v in rng.integers(40, 216, size=3)),
        "shoes": tuple(int(v) for v in rng.integers(0, 70, size=3)),
        "skin": tuple(int(v) for v in (rng.uniform(120, 255), rng.uniform(80, 200),
                                       rng.uniform(60, 170))),
        "arm_w": max(2, int(rng.uniform(0.045, 0.075) * height)),
        "leg_w": max(2, int(rng.uniform(0.06, 0.09) * height)),
        "head_r": head_r, "head_c": head_c, "yaw": yaw,
    }
    return k, style


def _draw_figure(canvas: np.ndarray, k: np.ndarray, style: dict, color: bool = True) -> None:
    """Draw on a colour canvas, or (``color=False``) fill 255 into a mask."""
    def c(name):
        return style[name] if color else 255

    def p(v):
        return (int(round(v[0])), int(round(v[1])))

    def lit(name, left):
        """The figure's left (odd COCO joints) lit brighter than its right, so the two
        sides differ in appearance, not only in position."""
        if not color:
            return 255
        factor = 1.3 if left else 0.7
        return tuple(int(min(255, v * factor)) for v in style[name])

    def cap(point, radius, fill):
        cv2.circle(canvas, p(point), max(1, int(round(radius))), fill, -1, cv2.LINE_AA)

    arm_w, leg_w = style["arm_w"], style["leg_w"]
    torso = np.array([k[5], k[6], k[12], k[11]]).round().astype(np.int32)
    for a, b, c_, left in ((11, 13, 15, True), (12, 14, 16, False)):
        cv2.line(canvas, p(k[a]), p(k[b]), lit("trousers", left), leg_w, cv2.LINE_AA)
        cv2.line(canvas, p(k[b]), p(k[c_]), lit("trousers", left), leg_w, cv2.LINE_AA)
        cap(k[b], 0.6 * leg_w, 255 if not color else (30, 30, 30))  # knee patch
        cap(k[c_], 0.75 * leg_w, c("shoes"))  # shoe
    cv2.fillConvexPoly(canvas, torso, c("shirt"), cv2.LINE_AA)
    for a, b, c_, left in ((5, 7, 9, True), (6, 8, 10, False)):
        cv2.line(canvas, p(k[a]), p(k[b]), lit("shirt", left), arm_w, cv2.LINE_AA)
        cv2.line(canvas, p(k[b]), p(k[c_]), c("skin"), max(2, arm_w - 1), cv2.LINE_AA)
        cap(k[b], 0.6 * arm_w, 255 if not color else (30, 30, 30))  # elbow patch
        cap(k[c_], 0.75 * arm_w, lit("skin", left))  # hand
    for shoulder, left in ((5, True), (6, False)):
        cap(k[shoulder], 0.55 * arm_w, lit("shirt", left))
    neck_mid = (k[5] + k[6]) / 2
    cv2.line(canvas, p(neck_mid), p(style["head_c"]), c("skin"), style["arm_w"], cv2.LINE_AA)
    r = int(round(style["head_r"]))
    for ear in (3, 4):
        cv2.circle(canvas, p(k[ear]), max(1, r // 3), c("skin"), -1, cv2.LINE_AA)
    cv2.circle(canvas, p(style["head_c"]), r, c("skin"), -1, cv2.LINE_AA)
    if color:
        for eye in (1, 2):
            cv2.circle(canvas, p(k[eye]), max(1, r // 5), (20, 20, 20), -1, cv2.LINE_AA)
        cv2.circle(canvas, p(k[0]), max(1, r // 5), (150, 40, 40), -1, cv2.LINE_AA)


def _occluder(rng: np.random.Generator, h: int, w: int):
    color = tuple(int(v) for v in rng.integers(0, 256, size=3))
    cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
    ax, ay = int(rng.uniform(0.05, 0.14) * w), int(rng.uniform(0.05, 0.14) * h)
    return color, cx, cy, ax, ay, int(rng.integers(2))


def render_image(rng: np.random.Generator, h: int, w: int, max_people: int):
    """One image and its people as (keypoints (17, 3), visible mask)."""
    image = _background(rng, h, w)
    people = [_figure(rng, h, w) for _ in range(int(rng.integers(1, max_people + 1)))]
    masks = []
    for k, style in people:  # back to front
        _draw_figure(image, k, style)
        mask = np.zeros((h, w), np.uint8)
        _draw_figure(mask, k, style, color=False)
        masks.append(mask > 0)
    occluded = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(0, 2))):  # moderate occlusion: at most one occluder
        color, cx, cy, ax, ay, round_ = _occluder(rng, h, w)
        shape = np.zeros((h, w), np.uint8)
        if round_:
            cv2.ellipse(image, (cx, cy), (ax, ay), 0, 0, 360, color, -1)
            cv2.ellipse(shape, (cx, cy), (ax, ay), 0, 0, 360, 255, -1)
        else:
            cv2.rectangle(image, (cx - ax, cy - ay), (cx + ax, cy + ay), color, -1)
            cv2.rectangle(shape, (cx - ax, cy - ay), (cx + ax, cy + ay), 255, -1)
        occluded |= shape > 0
    image = cv2.GaussianBlur(image, (3, 3), 0)
    out = []
    for i, (k, _style) in enumerate(people):
        in_front = occluded.copy()
        for later in masks[i + 1:]:
            in_front |= later
        visible_mask = masks[i] & ~in_front
        kps = np.zeros((17, 3))
        for j in range(17):
            x, y = k[j]
            xi, yi = int(round(x)), int(round(y))
            if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
                continue  # v = 0: outside the image
            kps[j] = (x, y, 1 if in_front[yi, xi] else 2)
        out.append((kps, visible_mask))
    return image, out


def _annotation(kps: np.ndarray, mask: np.ndarray, image_id: int, ann_id: int) -> dict:
    ys, xs = np.nonzero(mask)
    if len(xs):
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        bbox = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
    else:
        bbox = [0.0, 0.0, 0.0, 0.0]
    return {
        "id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
        "keypoints": [round(float(v), 2) for v in kps.reshape(-1)],
        "num_keypoints": int((kps[:, 2] > 0).sum()),
        # The box area as OKS scale (see the module docstring), not the mask's pixel count.
        "area": float(bbox[2] * bbox[3]), "bbox": bbox,
    }


def _write_split(root: str, params: SyntheticParams, split: str) -> None:
    count = params.num_train if split == "train" else params.num_val
    ann_file, image_dir = split_paths(root, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.dirname(ann_file), exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for index in range(count):
        rng = np.random.default_rng([params.seed, SPLITS[split], index])
        image, people = render_image(rng, params.image_height, params.image_width,
                                     params.max_people)
        image_id = index + 1
        file_name = f"{split}_{index:06d}.{params.image_format}"
        encoded_ok = cv2.imwrite(os.path.join(image_dir, file_name),
                                 cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                 [cv2.IMWRITE_JPEG_QUALITY, 95] if params.image_format == "jpg"
                                 else [])
        if not encoded_ok:
            raise OSError(f"could not write synthetic image {os.path.join(image_dir, file_name)}")
        images.append({"id": image_id, "file_name": file_name, "height": params.image_height,
                       "width": params.image_width})
        for kps, mask in people:
            annotations.append(_annotation(kps, mask, image_id, ann_id))
            ann_id += 1
    dataset = {
        "info": {"description": "saffnet_fast synthetic keypoints",
                 "generator_version": GENERATOR_VERSION, "params": asdict(params)},
        "licenses": [],
        "images": images, "annotations": annotations,
        "categories": [{"id": 1, "name": "person", "supercategory": "person",
                        "keypoints": list(COCO_KEYPOINTS),
                        "skeleton": [list(p) for p in COCO_SKELETON]}],
    }
    with open(ann_file, "w", encoding="utf-8") as handle:
        json.dump(dataset, handle)


def generate_synthetic_dataset(directory: str, params: SyntheticParams) -> str:
    """Write both splits into ``directory`` (which must not exist yet)."""
    params.validate()
    for split in SPLITS:
        _write_split(directory, params, split)
    with open(os.path.join(directory, "done.json"), "w", encoding="utf-8") as handle:
        json.dump({"generator_version": GENERATOR_VERSION, "params": asdict(params)}, handle)
    return directory


def ensure_synthetic_dataset(params: SyntheticParams | None = None,
                             cache_root: str | None = None) -> str:
    """The dataset's directory, generating it on first use."""
    params = (params or SyntheticParams()).validate()
    final = synthetic_dir(params, cache_root)
    if os.path.isfile(os.path.join(final, "done.json")):
        return final
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=parent)
    try:
        generate_synthetic_dataset(staging, params)
        try:
            os.replace(staging, final)
        except OSError:
            # Another process finished first; its copy is identical (deterministic).
            if not os.path.isfile(os.path.join(final, "done.json")):
                raise
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return final
