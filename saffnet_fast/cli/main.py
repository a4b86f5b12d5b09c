"""The ``saffnet`` command: one subcommand per module in ``saffnet_fast.cli``.

Each subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their subcommand runs, so
``saffnet complexity`` does not pay for OpenCV or pycocotools.

A user error (a bad argument, a missing or malformed file, an unavailable device or backend)
ends the command with one line on stderr and exit code 2; ``--debug`` anywhere on the command
line, or ``SAFFNET_DEBUG=1``, shows the traceback instead. Any other exception is a bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .checks import UsageError

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


class _Parser(argparse.ArgumentParser):
    """Reports a parse error as a :class:`UsageError` (one line) instead of usage + exit."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _user_error_types() -> tuple[type[BaseException], ...]:
    # Imported here, after an error: the backend module imports torch, which `saffnet --help`
    # and `saffnet complexity --help` should not pay for.
    from saffnet_fast.backend import BackendUnavailableError

    # ValueError covers ConfigError and the data readers' checks; OSError covers
    # MissingFileError and files that cannot be written.
    return UsageError, ValueError, OSError, BackendUnavailableError


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or \
        type(exc).__name__


def _debug_requested(argv: list[str]) -> bool:
    """True when ``--debug`` is anywhere in ``argv`` (removed from it) or SAFFNET_DEBUG is set."""
    flagged = "--debug" in argv
    argv[:] = [arg for arg in argv if arg != "--debug"]
    return flagged or os.environ.get("SAFFNET_DEBUG", "").strip().lower() not in (
        "", "0", "false", "no")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="saffnet", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (or set SAFFNET_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_ in _available():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (2 for a user error, printed as one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    commands = {name: module for name, module, _ in _available()}
    prog = f"saffnet {argv[0]}" if argv and argv[0] in commands else "saffnet"
    try:
        if not argv or argv[0] not in commands:
            parser = build_parser()
            if argv and not argv[0].startswith("-"):
                raise UsageError(f"unknown command {argv[0]!r}; expected one of "
                                 f"{', '.join(commands)}")
            parser.parse_args(argv)
            parser.print_help()
            return 0 if argv else 2
        module = importlib.import_module(commands[argv[0]])
        parser = _Parser(prog=prog, description=module.HELP)
        module.add_arguments(parser)
        parser.add_argument("--debug", action="store_true",
                            help="show the Python traceback of an error (or set SAFFNET_DEBUG=1)")
        # Intermixed: options may follow positional KEY=VALUE overrides.
        args = parser.parse_intermixed_args(argv[1:])
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        # Ctrl-C: training has saved its checkpoint by now (engine.trainer); say so in one line.
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`saffnet info | head`): stop quietly, as other tools do.
        # Python's docs: point stdout at devnull so the interpreter's final flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        if debug or not isinstance(exc, _user_error_types()):
            raise
        print(f"{prog}: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
