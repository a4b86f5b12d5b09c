"""Helpers shared by the training-engine tests: a tiny synthetic run and its model."""
import torch

from saffnet_fast.engine.config import load_config
from saffnet_fast.engine.tiny import TinyPoseNet


def synthetic_overrides(tmp_path, name):
    """Overrides for a run of a few seconds: 6 synthetic images, the tiny model, 2 epochs."""
    return [
        "data.type=synthetic", f"data.cache_dir={tmp_path / 'cache'}",
        "data.synthetic={num_train: 6, num_val: 2, image_height: 96, image_width: 96}",
        "model.input_size=[32,24]", "model.name=tiny", "train.batch_size=4", "train.epochs=2",
        "train.lr_steps=[1]", "data.num_workers=0", "train.progress=false",
        f"output_dir={tmp_path / name}", "seed=5"]


def tiny_config(tmp_path, name, *extra):
    return load_config(None, synthetic_overrides(tmp_path, name) + list(extra))


def tiny_model(dropout=0.2):
    torch.manual_seed(0)
    return TinyPoseNet(17, width=8, dropout=dropout)


def steps_per_epoch(samples: int, batch: int) -> int:
    """The Trainer's batches per epoch: a trailing batch of one sample is dropped (BatchNorm
    cannot train on it), any other remainder kept."""
    if batch > 1 and samples % batch == 1:
        return samples // batch
    return -(-samples // batch)
