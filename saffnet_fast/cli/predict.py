"""``saffnet predict IMAGES... --checkpoint CKPT (--boxes FILE | --whole-image) --out DIR``:
keypoint JSON + overlay PNG per image.

Outputs keep the images' folders relative to their common parent under ``--out`` and are
named ``<stem>.keypoints.json`` / ``<stem>.overlay.png``, so they never replace an input or
each other (a clash is refused before anything is written). Exit code 1 when the model's
outputs are NaN or infinite (those people are written with ``"valid": false``).
"""
from __future__ import annotations

import sys

from . import checks

HELP = "predict keypoints on images"


def add_arguments(parser):
    parser.add_argument("images", nargs="+", type=checks.existing_file, help="image files")
    parser.add_argument("--checkpoint", required=True, type=checks.existing_file,
                        help="training checkpoint")
    parser.add_argument("--config", default=None,
                        help="config (default: the one stored in the checkpoint)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--boxes", metavar="FILE", type=checks.existing_file,
                       help='person boxes JSON: COCO detection results [{"image_id", '
                            '"category_id", "bbox", "score"}, ...] (as saffnet test takes; '
                            "image_id is the image file's number, 000000000785.jpg -> 785, or "
                            'comes from --annotations), {"img.jpg": [[x, y, w, h(, score)], '
                            '...]} or [{"file_name", "bbox", "score"}, ...]')
    where.add_argument("--whole-image", action="store_true",
                       help="treat each whole image as one person box")
    parser.add_argument("--annotations", metavar="ANN.json", type=checks.existing_file,
                        help="COCO annotation file whose images[].file_name / id match the "
                             "image_id of COCO detection results in --boxes")
    parser.add_argument("--box-score-threshold", type=checks.fraction, default=0.3,
                        metavar="T",
                        help="drop boxes scoring below T (default 0.3, as MMPose's top-down "
                             "demo --bbox-thr: detector boxes below it are mostly duplicates and "
                             "false positives, which would be drawn as people; saffnet test "
                             "keeps them, data.detection_score_threshold 0, since COCO AP "
                             "rewards recall)")
    parser.add_argument("--out", required=True, metavar="DIR", type=checks.output_dir,
                        help="output directory: <stem>.keypoints.json and <stem>.overlay.png "
                             "per image, in the images' folders relative to their common "
                             "parent")
    parser.add_argument("--device", default="cpu", type=checks.device, help="cpu, cuda, cuda:N")
    parser.add_argument("--no-flip", action="store_true", help="disable the flip test")
    parser.add_argument("--decode", default="quarter", choices=("argmax", "quarter", "dark"))
    parser.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime", "openvino"),
                        help="what runs the model (default torch); onnxruntime and openvino run "
                             "the checkpoint's model exported to ONNX (or --onnx) on the CPU: "
                             'pip install "saffnet_fast[export]" / "saffnet_fast[openvino]"')
    parser.add_argument("--onnx", metavar="FILE", type=checks.existing_file,
                        help="with --runtime onnxruntime|openvino: this ONNX file (saffnet "
                             "export --onnx) instead of exporting the checkpoint's model")


def _check_runtime(args) -> None:
    """A missing package or a GPU device is refused in one line before the model loads."""
    import importlib.util

    if args.device != "cpu":
        raise checks.UsageError(f"--runtime {args.runtime}: runs on the CPU; drop --device "
                                f"{args.device}")
    needed = [(args.runtime, "export" if args.runtime == "onnxruntime" else "openvino")]
    if not args.onnx:  # exporting the checkpoint's model needs onnx
        needed.append(("onnx", "export"))
    for package, extra in needed:
        if importlib.util.find_spec(package) is None:
            raise checks.UsageError(f"--runtime {args.runtime}: {package} is not installed; "
                                    f'install with: pip install "saffnet_fast[{extra}]"')


def run(args) -> int:
    from saffnet_fast.engine.config import load_config
    from saffnet_fast.engine.predictor import Predictor, assign_boxes, load_boxes, plan_outputs

    if args.annotations and not args.boxes:
        raise checks.UsageError("--annotations: only used with --boxes (COCO detection "
                                "results), got --whole-image")
    if args.onnx and args.runtime == "torch":
        raise checks.UsageError("--onnx: only used with --runtime onnxruntime or openvino")
    if args.runtime != "torch":
        _check_runtime(args)
    # Clashing outputs and missing or malformed boxes are refused before the model loads.
    plans = plan_outputs(args.images, args.out)
    boxes = load_boxes(args.boxes, args.annotations) if args.boxes else None
    if boxes is not None:
        assign_boxes(plans, boxes, args.box_score_threshold)
    config = load_config(args.config) if args.config else None
    # Another runtime runs the ONNX export of the plain PyTorch modules (the fused kernels
    # are not ONNX operators).
    predictor = Predictor.from_checkpoint(args.checkpoint, config, args.device,
                                          backend=None if args.runtime == "torch" else "reference",
                                          flip_test=not args.no_flip, decode=args.decode)
    if args.runtime != "torch":
        predictor.use_runtime(args.runtime, args.onnx)
    written = predictor.predict_files(args.images, args.out, boxes, args.whole_image,
                                      box_score_threshold=args.box_score_threshold)
    for item in written:
        flag = "" if item["valid"] else " (invalid: non-finite model outputs)"
        print(f"{item['image']}: {item['people']} people{flag} -> {item['json']}, "
              f"{item['overlay']}")
    if boxes is not None:
        kept = sum(item["people"] for item in written)
        dropped = sum(item["dropped_boxes"] for item in written)
        other = (f"; {boxes.skipped_categories} boxes of other categories ignored"
                 if boxes.skipped_categories else "")
        print(f"boxes: {kept + dropped} for these images, {dropped} below "
              f"--box-score-threshold {args.box_score_threshold:g} dropped, {kept} kept{other}")
    if not all(item["valid"] for item in written):
        print("saffnet predict: some outputs are invalid: the model's heatmaps are NaN or "
              "infinite", file=sys.stderr)
        return 1
    return 0
