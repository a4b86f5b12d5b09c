"""``saffnet train CONFIG [key=value ...] [--force]``: train a model from a config file."""
from __future__ import annotations

import json

HELP = "train a model from a config file"

EPILOG = """\
Start from weights: model.pretrained=PATH loads a training checkpoint, a state dict, an official
HRNet .pth (with or without module. prefixes) or a .safetensors file by name, with shape checks:
an HRNet-W32 checkpoint loads fully into hrnet_w32 and its shared parts (stem, stages,
transitions, final layer) into the other models; one line reports what loaded and what was
skipped. It is ignored when the run resumes from its own checkpoint.

Resume: with train.resume (the default) a run continues from OUTPUT_DIR/checkpoint.pth.
Changed settings that can apply to a running run (train.lr, train.lr_steps, train.lr_factor,
train.epochs, train.weight_decay, logging, evaluation) are applied with one line each; others
(the model, input size, batch size, optimizer, seed, training data) are refused. Ctrl-C or
SIGTERM saves a checkpoint after the current step before exiting.
"""


def add_arguments(parser):
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("config", help="YAML config file, or the name of a packaged one "
                        "(coco_256x192, coco_384x288, mpii_256x256, synthetic_quick)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.epochs=2 model.name=hrnet_df "
                             "model.pretrained=pose_hrnet_w32_256x192.pth")
    parser.add_argument("--force", action="store_true",
                        help="replace the run already in output_dir (checkpoint, best "
                             "checkpoint, weights, logs) with a new one instead of resuming it "
                             "or refusing")


def run(args) -> int:
    from saffnet_fast.data import build_dataset
    from saffnet_fast.engine.config import load_config
    from saffnet_fast.engine.modeling import build_model_from_config
    from saffnet_fast.engine.trainer import Trainer, distributed_context, seed_everything

    config = load_config(args.config, args.overrides)
    rank, _world, _local = distributed_context()
    train_set = build_dataset(config, "train")
    val_set = build_dataset(config, "val") if rank == 0 else None
    # Seeded right before the model is built: its initial weights follow `seed`.
    seed_everything(int(config["seed"]), bool(config["train"]["deterministic"]))
    model = build_model_from_config(config)
    with Trainer(config, model, train_set, val_set, overwrite=args.force) as trainer:
        result = trainer.fit()
    if rank == 0:
        print(json.dumps({"global_step": result["global_step"],
                          "final_loss": result["losses"][-1] if result["losses"] else None,
                          "metrics": result["metrics"], "checkpoint": result["checkpoint"]},
                         indent=1, default=str))
    return 0
