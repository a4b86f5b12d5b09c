"""``saffnet test CONFIG --checkpoint CKPT``: evaluate a checkpoint on the config's val set."""
from __future__ import annotations

import json

HELP = "evaluate a checkpoint on a config's validation set"


def add_arguments(parser):
    parser.add_argument("config", help="YAML config file or packaged config name")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--checkpoint", required=True, help="training checkpoint or weights")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args) -> int:
    from saffnet_fast.data import build_dataset
    from saffnet_fast.engine.checkpoint import load_checkpoint, model_state_dict
    from saffnet_fast.engine.config import load_config
    from saffnet_fast.engine.evaluate import format_coco_stats, format_pckh_table
    from saffnet_fast.engine.inference import evaluate_model
    from saffnet_fast.engine.modeling import build_model_from_config

    config = load_config(args.config, args.overrides)
    dataset = build_dataset(config, "val")
    model = build_model_from_config(config)
    model.load_state_dict(model_state_dict(load_checkpoint(args.checkpoint)))
    metrics = evaluate_model(model, dataset, config, args.device,
                             output_dir=config["output_dir"], progress=True)
    if args.json:
        print(json.dumps(metrics, indent=1))
    elif "stats" in metrics:
        print(format_coco_stats(metrics["stats"]))
    else:
        print(format_pckh_table(metrics["pckh"]))
    return 0
