"""``saffnet eval-keypoints``: the ten COCO keypoint statistics of a results file."""
from __future__ import annotations

import json

from . import checks

HELP = "COCO keypoint AP of a results file"


def add_arguments(parser):
    parser.add_argument("--gt", required=True, metavar="ANN.json", type=checks.existing_file,
                        help="ground truth in the COCO keypoints annotation format")
    parser.add_argument("--results", required=True, metavar="RES.json", type=checks.existing_file,
                        help="results in the COCO format: [{image_id, category_id, keypoints, "
                             "score}, ...]")
    parser.add_argument("--sigmas", type=checks.positive_number, nargs="+", default=None,
                        help="OKS sigma per keypoint (default: COCO's, for 17 keypoints)")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")


def run(args) -> int:
    from saffnet_fast.engine.evaluate import coco_keypoint_eval, format_coco_stats, json_safe

    stats = coco_keypoint_eval(args.gt, args.results, sigmas=args.sigmas)
    print(json.dumps(json_safe(stats), indent=1, allow_nan=False) if args.json
          else format_coco_stats(stats))
    return 0
