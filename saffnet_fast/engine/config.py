"""Run configuration: YAML files merged over :data:`DEFAULTS`, plus ``a.b=value`` overrides.

Keys are checked: a misspelt key in a file or override is an error naming it, except inside
the free-form sections listed in :data:`FREE_FORM` (validated by their own readers).
"""
from __future__ import annotations

import copy
import os
from importlib import resources
from typing import Any, Iterable

import yaml

from ..data.registry import dataset_type

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "output_dir": "outputs/run",
    "model": {
        "name": "saffnet",
        "num_joints": 17,
        "input_size": [256, 192],      # height, width
        "backend": "auto",
        "dropout": None,               # None: the model's own default
        "channels_last": "auto",       # auto: on CUDA (cuDNN's fp16/bf16 tensor-core convs are NHWC)
        "extra": {},                   # passed to build_model as keyword arguments
        "pretrained": None,            # weights to start from (see engine.modeling.load_pretrained)
    },
    "data": {
        "type": "coco",                # coco | mpii | synthetic
        "root": "data/coco",
        "train_annotations": "annotations/person_keypoints_train2017.json",
        "train_images": "images/train2017",
        "val_annotations": "annotations/person_keypoints_val2017.json",
        "val_images": "images/val2017",
        "detection_file": None,        # person detections for testing; None: ground-truth boxes
        "detection_score_threshold": 0.0,
        "dataset_info": {},
        "sigma": 2.0,
        "unbiased_encoding": False,
        "augment": {},
        "synthetic": {},
        "cache_dir": None,
        "num_workers": 2,
    },
    "train": {
        "epochs": 210,
        "batch_size": 32,
        "optimizer": "adam",
        "lr": 1.0e-3,
        "weight_decay": 0.0,
        "lr_steps": [170, 200],
        "lr_factor": 0.1,
        "amp": "auto",                 # auto | null | float16 | bfloat16 (auto: bfloat16 on a
                                       # CUDA device that has it, else float16; null on the CPU)
        "cudnn_benchmark": "auto",     # auto: on for CUDA unless train.deterministic
        "compile": False,              # torch.compile the model (the fused ops stay custom ops)
        "cuda_graph": False,           # capture the whole training step in one CUDA graph
        "deterministic": False,
        "device": "auto",              # auto | cpu | cuda | cuda:N
        "checkpoint_every_steps": 0,   # 0: at the end of each epoch only
        "eval_every_epochs": 0,        # 0: only after the last epoch
        "log_every_steps": 20,
        "max_steps": None,             # stop early (quick runs)
        "resume": True,                # continue from output_dir/checkpoint.pth when present
        "progress": True,
        "tensorboard": True,
    },
    "test": {
        "batch_size": 64,
        "flip_test": True,
        "shift_heatmap": True,
        "decode": "quarter",           # argmax | quarter | dark
        "dark_kernel": 11,
        "in_vis_thre": 0.2,
        "oks_thre": 0.9,
        "soft_nms": False,
        "pckh_threshold": 0.5,
        "head_boxes": None,            # MPII: .npy/.json (N, 2, 2) head boxes
    },
}
FREE_FORM = {("data", "dataset_info"), ("data", "augment"), ("data", "synthetic"),
             ("model", "extra")}


class ConfigError(ValueError):
    pass


def _merge(base: dict, update: dict, path: tuple = (), source: str = "config",
           free: bool = False) -> dict:
    for key, value in (update or {}).items():
        here = path + (key,)
        if not free and key not in base:
            raise ConfigError(f"{source}: unknown key {'.'.join(here)!r}; expected one of "
                              f"{sorted(base)}")
        inner_free = free or here in FREE_FORM
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, here, source, inner_free)
        elif not inner_free and isinstance(base.get(key), dict):
            raise ConfigError(f"{source}: {'.'.join(here)} must be a mapping, got {value!r}")
        else:
            base[key] = copy.deepcopy(value if value is not None or not inner_free
                                      or not isinstance(base.get(key), dict) else {})
    return base


def packaged_config(name: str) -> str:
    """Path of a config shipped with the package (``coco_256x192`` or ``coco_256x192.yaml``)."""
    file = name if name.endswith(".yaml") else name + ".yaml"
    return str(resources.files("saffnet_fast") / "configs" / file)


def packaged_configs() -> list[str]:
    folder = resources.files("saffnet_fast") / "configs"
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> str:
    if os.path.isfile(name_or_path):
        return name_or_path
    packaged = packaged_config(os.path.basename(name_or_path))
    if os.path.isfile(packaged):
        return packaged
    raise FileNotFoundError(f"config file not found: {name_or_path} (packaged configs: "
                            f"{', '.join(packaged_configs())})")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=2")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | None = None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """DEFAULTS ⊕ YAML file ⊕ overrides."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = resolve_config_path(path)
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        _merge(config, data, source=f"config file {path}")
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        _merge(config, nested, source=f"override {text!r}")
    return validate_config(config)


def validate_config(config: dict) -> dict:
    model, data, train, test = config["model"], config["data"], config["train"], config["test"]
    size = model["input_size"]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or any(int(v) % 4 or int(v) <= 0 for v in size)):
        raise ConfigError(f"model.input_size: expected [height, width], positive multiples of 4, "
                          f"got {size!r}")
    try:
        dataset_type(data["type"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if train["amp"] not in (None, "auto", "float16", "bfloat16"):
        raise ConfigError(f"train.amp: expected auto, null, float16 or bfloat16, got "
                          f"{train['amp']!r}")
    for section, key in (("model", "channels_last"), ("train", "cudnn_benchmark")):
        if not (isinstance(config[section][key], bool) or config[section][key] == "auto"):
            raise ConfigError(f"{section}.{key}: expected true, false or auto, got "
                              f"{config[section][key]!r}")
    for key in ("compile", "cuda_graph"):
        if not isinstance(train[key], bool):
            raise ConfigError(f"train.{key}: expected true or false, got {train[key]!r}")
    if test["decode"] not in ("argmax", "quarter", "dark"):
        raise ConfigError(f"test.decode: expected argmax, quarter or dark, got {test['decode']!r}")
    if int(train["batch_size"]) < 1 or int(train["epochs"]) < 1:
        raise ConfigError("train.batch_size and train.epochs: expected positive integers")
    if train["optimizer"] not in ("adam", "adamw", "sgd"):
        raise ConfigError(f"train.optimizer: expected adam, adamw or sgd, got "
                          f"{train['optimizer']!r}")
    return config


def dump_config(config: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)


_MISSING = object()


def _flatten(config: dict, defaults: dict = DEFAULTS, prefix: tuple = ()):
    """(``a.b`` key, value) for every setting; a free-form section is one value."""
    for key, default in defaults.items():
        here = prefix + (key,)
        value = config.get(key, _MISSING) if isinstance(config, dict) else _MISSING
        if isinstance(default, dict) and here not in FREE_FORM and isinstance(value, dict):
            yield from _flatten(value, default, here)
        else:
            yield ".".join(here), value


def _comparable(value: Any) -> Any:
    """``1e-3`` (which YAML reads as a string), ``0.001`` and ``1.0e-3`` compare equal."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, (list, tuple)):
        return tuple(_comparable(v) for v in value)
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    return value


def changed_settings(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for every setting of :data:`DEFAULTS` whose value
    differs between two configs; a key absent from either (an older config) is skipped."""
    ours = dict(_flatten(new))
    changes = []
    for key, before in _flatten(old):
        after = ours.get(key, _MISSING)
        if before is not _MISSING and after is not _MISSING and (
                _comparable(before) != _comparable(after)):
            changes.append((key, before, after))
    return changes
