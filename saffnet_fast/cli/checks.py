"""Argument types for the ``saffnet`` commands: each checks its value where it enters and says
what was expected and what was given (argparse prefixes the argument's name).

``UsageError`` is the one exception a command raises for a mistake in its command line or
inputs that argparse cannot see; :func:`saffnet_fast.cli.main.main` prints it as one line
and exits with code 2.
"""
from __future__ import annotations

import argparse
import math
import os


class UsageError(Exception):
    """A mistake in a command's arguments or inputs (printed as one line, exit code 2)."""


def device(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` (or another torch device type) that exists here."""
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected a torch device such as cpu, cuda or cuda:0, got {text!r}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise argparse.ArgumentTypeError(f"expected cpu here ({why}), got {text!r}")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise argparse.ArgumentTypeError(
                f"expected a CUDA index below {count} (devices visible: {count}), got {text!r}")
    elif parsed.type not in ("cpu", "mps", "xpu"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def existing_file(text: str) -> str:
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"expected an existing file, got {text!r} (not found)")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"expected a file, got {text!r} (a directory)")
    return text


def output_dir(text: str) -> str:
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"expected a directory, got {text!r} (an existing file)")
    return text


def output_file(text: str) -> str:
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"expected a file path, got {text!r} (a directory)")
    return text


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1] (a score or probability threshold)."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def positive_number(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
