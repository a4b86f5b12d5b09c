"""The ``saffnet`` command: one subcommand per module in ``saffnet_fast.cli``.

Each subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their subcommand runs, so
``saffnet complexity`` does not pay for OpenCV or pycocotools.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help); the module is imported lazily.
SUBCOMMANDS = {
    "demo": ("saffnet_fast.cli.demo", "generate the synthetic set, train briefly, evaluate, predict"),
    "train": ("saffnet_fast.cli.train", "train a model from a config file"),
    "test": ("saffnet_fast.cli.test", "evaluate a checkpoint on a config's validation set"),
    "eval-keypoints": ("saffnet_fast.cli.eval_keypoints", "COCO keypoint AP of a results file"),
    "predict": ("saffnet_fast.cli.predict", "predict keypoints on images"),
    "export": ("saffnet_fast.cli.export", "export a model (ONNX, safetensors)"),
    "complexity": ("saffnet_fast.cli.complexity", "params and GFLOPs of every paper row"),
    "bench": ("saffnet_fast.cli.bench", "speed table: reference, torch.compile, fast backends"),
    "info": ("saffnet_fast.cli.info", "library, torch, extension and backend information"),
}


def _available():
    for name, (module, help_) in SUBCOMMANDS.items():
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            spec = None
        if spec is not None:
            yield name, module, help_


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saffnet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_ in _available():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {name: module for name, module, _ in _available()}
    if not argv or argv[0] not in commands:
        parser = build_parser()
        if argv and not argv[0].startswith("-"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(commands)}")
        parser.parse_args(argv)
        parser.print_help()
        return 0 if argv else 2
    module = importlib.import_module(commands[argv[0]])
    parser = argparse.ArgumentParser(prog=f"saffnet {argv[0]}", description=module.HELP)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
