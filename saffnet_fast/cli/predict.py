"""``saffnet predict IMAGES... --checkpoint CKPT --out DIR``: keypoint JSON + overlay PNGs."""
from __future__ import annotations

HELP = "predict keypoints on images"


def add_arguments(parser):
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--checkpoint", required=True, help="training checkpoint")
    parser.add_argument("--config", default=None,
                        help="config (default: the one stored in the checkpoint)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--boxes", metavar="FILE",
                       help='person boxes JSON: {"img.jpg": [[x, y, w, h(, score)], ...]} or '
                            '[{"file_name", "bbox", "score"}, ...]')
    where.add_argument("--whole-image", action="store_true",
                       help="treat each whole image as one person box")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-flip", action="store_true", help="disable the flip test")
    parser.add_argument("--decode", default="quarter", choices=("argmax", "quarter", "dark"))


def run(args) -> int:
    from saffnet_fast.engine.config import load_config
    from saffnet_fast.engine.predictor import Predictor, load_boxes

    config = load_config(args.config) if args.config else None
    predictor = Predictor.from_checkpoint(args.checkpoint, config, args.device,
                                          flip_test=not args.no_flip, decode=args.decode)
    boxes = load_boxes(args.boxes) if args.boxes else None
    for item in predictor.predict_files(args.images, args.out, boxes, args.whole_image):
        print(f"{item['image']}: {item['people']} people -> {item['json']}, {item['overlay']}")
    return 0
