"""``saffnet test CONFIG [KEY=VALUE ...] --checkpoint CKPT``: evaluate a checkpoint on the
config's val set. Exit code 1 when the model's outputs are NaN or infinite (no score)."""
from __future__ import annotations

import json
import sys

from . import checks

HELP = "evaluate a checkpoint on a config's validation set"


def add_arguments(parser):
    parser.add_argument("config", help="YAML config file or packaged config name")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--checkpoint", required=True, type=checks.existing_file,
                        help="training checkpoint or weights")
    parser.add_argument("--device", default="cpu", type=checks.device, help="cpu, cuda, cuda:N")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args) -> int:
    from saffnet_fast.data import build_dataset
    from saffnet_fast.engine.config import load_config
    from saffnet_fast.engine.evaluate import format_coco_stats, format_pckh_table, json_safe
    from saffnet_fast.engine.inference import evaluate_model
    from saffnet_fast.engine.modeling import build_model_from_config
    from saffnet_fast.engine.predictor import load_model_weights

    config = load_config(args.config, args.overrides)
    dataset = build_dataset(config, "val")
    model = build_model_from_config(config)
    load_model_weights(model, args.checkpoint, config)
    metrics = evaluate_model(model, dataset, config, args.device,
                             output_dir=config["output_dir"], progress=True)
    if args.json:
        print(json.dumps(json_safe(metrics), indent=1, allow_nan=False))
    elif "stats" in metrics:
        print(format_coco_stats(metrics["stats"]))
    else:
        print(format_pckh_table(metrics["pckh"]))
    if not metrics["valid"]:
        print(f"saffnet test: no valid score: {metrics['reason']}", file=sys.stderr)
        return 1
    return 0
