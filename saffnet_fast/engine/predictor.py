"""Keypoints on arbitrary images: person boxes in, keypoint JSON and skeleton overlays out."""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from ..data.dataset_info import DatasetInfo
from ..data.topdown import IMAGENET_MEAN, IMAGENET_STD, parse_box, read_image_rgb, read_json
from ..data.transforms import box_to_center_scale, get_affine_transform
from .checkpoint import load_checkpoint, model_state_dict
from .decode import decode_heatmaps, predict_heatmaps
from .evaluate import json_safe


def _key(path: str) -> str:
    return os.path.normpath(path).replace(os.sep, "/")


class PersonBoxes:
    """Person boxes ``[x, y, w, h(, score)]`` per image.

    An image is looked up by its path as given, its path relative to the inputs' common folder
    and its file name, then, for COCO detection results keyed by ``image_id``, by its id: the
    ``file_name`` → ``id`` map of a COCO annotation file when given, else the digits of the
    file name (COCO's ``000000000785.jpg`` is image 785)."""

    def __init__(self, by_name: dict[str, list] | None = None,
                 by_id: dict[int, list] | None = None,
                 id_by_name: dict[str, int] | None = None, source: str = "boxes",
                 skipped_categories: int = 0):
        self.by_name = {_key(name): boxes for name, boxes in (by_name or {}).items()}
        self.by_id = by_id
        self.id_by_name = id_by_name
        self.source = source
        self.skipped_categories = skipped_categories  # boxes of non-person categories

    def image_id(self, path: str, relative: str | None = None) -> int | None:
        if self.id_by_name is not None:
            for key in (_key(relative or path), os.path.basename(path)):
                if key in self.id_by_name:
                    return self.id_by_name[key]
            return None
        stem = os.path.splitext(os.path.basename(path))[0]
        return int(stem) if stem.isdigit() else None

    def lookup(self, path: str, relative: str | None = None) -> tuple[list | None, str]:
        """(boxes or None, how the image was matched: ``path``, ``name`` or ``id``)."""
        for key, how in ((_key(path), "path"), (_key(relative or path), "path"),
                         (os.path.basename(path), "name")):
            if key in self.by_name:
                return self.by_name[key], how
        if self.by_id is not None:
            image_id = self.image_id(path, relative)
            if image_id is not None:
                return self.by_id.get(image_id, []), "id"  # no detection: nobody there
        return None, ""


def _annotation_image_ids(path: str) -> tuple[dict[str, int], set[int]]:
    """``images[].file_name`` → ``id`` and the keypoint category ids of a COCO file."""
    data = read_json(path, "--annotations file")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"--annotations {path}: expected a COCO annotation file with an "
                         "'images' list")
    ids: dict[str, int] = {}
    for i, image in enumerate(images):
        if not isinstance(image, dict) or "file_name" not in image or "id" not in image:
            raise ValueError(f"--annotations {path}: images[{i}]: expected 'file_name' and "
                             "'id'")
        ids[_key(image["file_name"])] = image["id"]
        ids.setdefault(os.path.basename(image["file_name"]), image["id"])
    categories = {c.get("id") for c in data.get("categories", []) or []
                  if isinstance(c, dict) and c.get("keypoints")}
    return ids, categories


def load_boxes(path: str, annotations: str | None = None) -> PersonBoxes:
    """Person boxes from a JSON file in one of three layouts:

    * ``{"img.jpg": [[x, y, w, h(, score)], ...]}``;
    * ``[{"file_name", "bbox", "score"}, ...]``;
    * COCO detection results ``[{"image_id", "category_id", "bbox", "score"}, ...]`` (what
      ``saffnet test`` takes as ``data.detection_file``); ``image_id`` is matched through
      ``annotations`` (a COCO file's ``images[].file_name``) or the image file's digits, and
      only the person category is kept (the annotation file's keypoint category, else 1).

    A malformed entry or a box with a non-finite value or a non-positive size raises
    ValueError naming it."""
    data = read_json(path, "--boxes file")
    where = f"--boxes {path}"
    if isinstance(data, dict):
        by_name = {}
        for name, items in data.items():
            if not isinstance(items, list):
                raise ValueError(f"{where}: {name!r}: expected a list of boxes, got "
                                 f"{items!r:.80}")
            by_name[name] = [parse_box(b, f"{where}: {name!r} box {j}")
                             for j, b in enumerate(items)]
        result = PersonBoxes(by_name=by_name, source=path)
    elif isinstance(data, list):
        if data and isinstance(data[0], dict) and "image_id" in data[0]:
            result = _coco_detections(data, path, annotations)
        else:
            by_name = {}
            for i, entry in enumerate(data):
                if not isinstance(entry, dict) or "file_name" not in entry or "bbox" not in entry:
                    raise ValueError(f"{where}: entry {i}: expected an object with 'file_name' "
                                     "and 'bbox' (or COCO detection results with 'image_id')")
                box = parse_box(entry["bbox"], f"{where}: entry {i} ({entry['file_name']})",
                                entry.get("score", 1.0))
                by_name.setdefault(entry["file_name"], []).append(box)
            result = PersonBoxes(by_name=by_name, source=path)
    else:
        raise ValueError(f"{where}: expected a JSON object or list, got {type(data).__name__}")
    if annotations and result.by_id is None:
        raise ValueError(f"--annotations: only used with COCO detection results (entries with "
                         f"'image_id'); {path} is keyed by file name")
    return result


def _coco_detections(data: list, path: str, annotations: str | None) -> PersonBoxes:
    id_by_name, categories = (_annotation_image_ids(annotations) if annotations
                              else (None, set()))
    person = categories or {1}
    by_id: dict[int, list[list[float]]] = {}
    skipped = 0
    for i, det in enumerate(data):
        if not isinstance(det, dict) or "image_id" not in det or "bbox" not in det:
            raise ValueError(f"--boxes {path}: entry {i}: expected COCO detection results "
                             f"{{image_id, category_id, bbox, score}}, got {det!r:.80}")
        if det.get("category_id") not in (None, *person):
            skipped += 1
            continue
        box = parse_box(det["bbox"], f"--boxes {path}: entry {i} (image_id {det['image_id']})",
                        det.get("score", 1.0))
        by_id.setdefault(det["image_id"], []).append(box)
    return PersonBoxes(by_id=by_id, id_by_name=id_by_name, source=path,
                       skipped_categories=skipped)


def plan_outputs(images: Sequence[str], out_dir: str) -> list[dict[str, str]]:
    """Where each image's results go: ``<out_dir>/<path relative to the inputs' common
    folder without its extension>.keypoints.json`` and ``.overlay.png``.

    Repeated inputs are predicted once. Two inputs that would write the same file, or an
    output that is one of the inputs, raise ValueError before anything is written."""
    unique, seen = [], set()
    for path in images:
        real = os.path.normcase(os.path.realpath(path))
        if real not in seen:
            seen.add(real)
            unique.append(path)
    if not unique:
        return []
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in unique])
    plans, writers = [], {}
    for path in unique:
        relative = os.path.relpath(os.path.abspath(path), root)
        stem = os.path.join(out_dir, os.path.splitext(relative)[0])
        plan = {"image": path, "relative": relative, "json": stem + ".keypoints.json",
                "overlay": stem + ".overlay.png"}
        for key in ("json", "overlay"):
            target = os.path.normcase(os.path.realpath(plan[key]))
            if target in seen:
                raise ValueError(f"--out {out_dir}: the output {plan[key]} of {path} would "
                                 f"overwrite the input image of that name; choose another "
                                 "--out")
            if target in writers:
                raise ValueError(f"--out {out_dir}: inputs {writers[target]} and {path} would "
                                 f"both write {plan[key]} (same folder and name without the "
                                 "extension); predict them in separate calls")
            writers[target] = path
        plans.append(plan)
    return plans


def assign_boxes(plans: list[dict], boxes: PersonBoxes | dict[str, list] | None,
                 score_threshold: float = 0.0) -> None:
    """Give each of :func:`plan_outputs`' entries its ``boxes`` (those scoring at least
    ``score_threshold``; a box without a score counts as 1) and the count ``dropped``.
    An image without boxes, or one matched only by a file name that several inputs share,
    raises ValueError."""
    if boxes is None:
        raise ValueError("no person boxes: give --boxes FILE or --whole-image")
    if not isinstance(boxes, PersonBoxes):
        boxes = PersonBoxes(by_name=boxes)
    names = Counter(os.path.basename(plan["image"]) for plan in plans)
    for plan in plans:
        name = os.path.basename(plan["image"])
        found, how = boxes.lookup(plan["image"], plan["relative"])
        if found is None:
            raise ValueError(
                f"--boxes {boxes.source}: no boxes for image {name!r} (looked up as "
                f"{_key(plan['relative'])!r} and {name!r}"
                + (" and by its COCO image id" if boxes.by_id is not None else "")
                + "); give them in --boxes or use --whole-image")
        if how in ("name", "id") and names[name] > 1:
            raise ValueError(
                f"--boxes {boxes.source}: boxes for {name!r} are ambiguous: several inputs "
                f"have that file name; key the boxes by the path relative to the inputs' "
                f"common folder ({_key(plan['relative'])!r})")
        plan["boxes"] = [b for b in found if (b[4] if len(b) > 4 else 1.0) >= score_threshold]
        plan["dropped"] = len(found) - len(plan["boxes"])


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
        if not person.get("valid", True):
            continue  # non-finite keypoints: only the box is drawn
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


def load_model_weights(model: torch.nn.Module, checkpoint: str, config: dict | None = None
                       ) -> None:
    """Load a training checkpoint's (or bare state dict's) weights into ``model``; weights made
    for another model raise ValueError saying how they differ instead of listing every key."""
    state = model_state_dict(load_checkpoint(checkpoint))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape)
                != tuple(expected[k].shape)]
    if missing or unexpected or reshaped:
        name = (config or {}).get("model", {}).get("name", type(model).__name__)
        parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
                 ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape"))
                 if keys]
        raise ValueError(f"--checkpoint {checkpoint}: expected weights of the config's model "
                         f"{name!r}, got {len(state)} tensors that do not fit it: "
                         f"{', '.join(parts)}; pass the config it was trained with")
    model.load_state_dict(state)


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
        self.forward = self.model  # what predict() calls: the model, or a runtime (use_runtime)
        self._warned_nonfinite = False

    @classmethod
    def from_checkpoint(cls, checkpoint: str, config: dict | None = None,
                        device: str | torch.device = "cpu", backend: str | None = None,
                        **kwargs) -> "Predictor":
        from ..data.dataset_info import build_dataset_info
        from ..data.registry import dataset_type
        from .modeling import build_model_from_config

        state = load_checkpoint(checkpoint)
        config = config or (state.get("config") if isinstance(state, dict) else None)
        if config is None:
            raise ValueError(f"--checkpoint {checkpoint}: stores no config; pass --config")
        model = build_model_from_config(config, backend=backend)
        load_model_weights(model, checkpoint, config)
        default = dataset_type(config["data"]["type"]).default_info
        info = build_dataset_info(config["data"].get("dataset_info") or None, None, default)
        return cls(model, info, config["model"]["input_size"], device, **kwargs)

    def use_runtime(self, kind: str, onnx: str | None = None, threads: int | None = None
                    ) -> "Predictor":
        """Run the heatmaps through ``kind`` (``torch``, ``onnxruntime`` or ``openvino``; see
        :func:`saffnet_fast.engine.runtime.load_runtime`): the ONNX file ``onnx``, else this
        predictor's model exported to a temporary one. The rest of the pipeline (boxes,
        affine crop, flip test, decoding) is unchanged. Returns self."""
        from .runtime import load_runtime

        if kind != "torch" and self.device.type != "cpu":
            raise ValueError(f"runtime {kind}: runs on the CPU, got device {self.device}")
        self.forward = load_runtime(kind, onnx if onnx else self.model,
                                    input_size=(self.input_h, self.input_w), threads=threads)
        return self

    @torch.no_grad()
    def predict(self, image_rgb: np.ndarray, boxes: Sequence[Sequence[float]]) -> list[dict]:
        """People in ``image_rgb`` for the given (x, y, w, h[, score]) boxes.

        A person whose heatmaps hold NaN or infinity (a broken model) gets ``"valid": False``
        and its non-finite values become None; the first such person warns."""
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
        heatmaps = predict_heatmaps(self.forward, batch, self.info.flip_pairs, self.flip_test)
        finite = torch.isfinite(heatmaps).flatten(1).all(1).cpu().numpy()
        coords, maxvals = decode_heatmaps(heatmaps, np.stack(centers), np.stack(scales),
                                          self.decode)
        people = []
        for box, c, m, ok in zip(boxes, coords, maxvals, finite):
            keypoints = np.concatenate([c, m], axis=1)
            valid = bool(ok) and bool(np.isfinite(keypoints).all())
            people.append(json_safe({
                "box": [float(v) for v in box[:4]],
                "box_score": float(box[4]) if len(box) > 4 else 1.0,
                "score": float(m.mean()),
                "keypoints": [[round(float(x), 2), round(float(y), 2), round(float(s), 4)]
                              for x, y, s in keypoints],
                "valid": valid}))
        if not self._warned_nonfinite and not all(p["valid"] for p in people):
            self._warned_nonfinite = True
            warnings.warn("predict: the model's heatmaps are NaN or infinite (NaN weights, or "
                          "overflow in reduced precision); those people are marked "
                          '"valid": false with null scores', RuntimeWarning, stacklevel=2)
        return people

    def predict_files(self, images: Sequence[str], out_dir: str,
                      boxes: PersonBoxes | dict[str, list] | None = None,
                      whole_image: bool = False, box_score_threshold: float = 0.0
                      ) -> list[dict[str, Any]]:
        """Write ``<stem>.keypoints.json`` and ``<stem>.overlay.png`` per image under
        ``out_dir``, keeping the images' folders relative to their common parent (see
        :func:`plan_outputs`). ``boxes`` (a :class:`PersonBoxes` or a dict keyed by image
        path or file name) scoring below ``box_score_threshold`` are dropped."""
        plans = plan_outputs(images, out_dir)
        if not whole_image:
            assign_boxes(plans, boxes, box_score_threshold)
        written = []
        for plan in plans:
            path = plan["image"]
            image = read_image_rgb(path)
            if whole_image:
                image_boxes = [[0.0, 0.0, float(image.shape[1]), float(image.shape[0])]]
            else:
                image_boxes = plan["boxes"]
            people = self.predict(image, image_boxes)
            valid = all(p["valid"] for p in people)
            os.makedirs(os.path.dirname(plan["json"]) or ".", exist_ok=True)
            with open(plan["json"], "w", encoding="utf-8") as handle:
                json.dump({"image": os.path.abspath(path), "width": int(image.shape[1]),
                           "height": int(image.shape[0]), "keypoint_names": self.info.keypoints,
                           "valid": valid, "people": people}, handle, indent=1, allow_nan=False)
            overlay = draw_skeleton(image, people, self.info)
            if not cv2.imwrite(plan["overlay"], cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR)):
                raise OSError(f"could not write the overlay image {plan['overlay']}")
            written.append({"image": path, "json": plan["json"], "overlay": plan["overlay"],
                            "people": len(people), "dropped_boxes": plan.get("dropped", 0),
                            "valid": valid})
        return written
