"""``saffnet train CONFIG [key=value ...]``: train a model from a config file."""
from __future__ import annotations

import json

HELP = "train a model from a config file"


def add_arguments(parser):
    parser.add_argument("config", help="YAML config file, or the name of a packaged one "
                        "(coco_256x192, coco_384x288, mpii_256x256, synthetic_quick)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.epochs=2 model.name=hrnet_df")


def run(args) -> int:
    from saffnet_fast.data import build_dataset
    from saffnet_fast.engine.config import load_config
    from saffnet_fast.engine.modeling import build_model_from_config
    from saffnet_fast.engine.trainer import Trainer, distributed_context

    config = load_config(args.config, args.overrides)
    rank, _world, _local = distributed_context()
    train_set = build_dataset(config, "train")
    val_set = build_dataset(config, "val") if rank == 0 else None
    model = build_model_from_config(config)
    with Trainer(config, model, train_set, val_set) as trainer:
        result = trainer.fit()
    if rank == 0:
        print(json.dumps({"global_step": result["global_step"],
                          "final_loss": result["losses"][-1] if result["losses"] else None,
                          "metrics": result["metrics"], "checkpoint": result["checkpoint"]},
                         indent=1, default=str))
    return 0
