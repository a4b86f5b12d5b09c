"""Result records: their schema, the skip reason, the text table, the JSON file, and the
parsing of the command line's lists, sizes and dtypes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["RESULT_SCHEMA", "ProviderUnavailable", "format_table", "save_result",
           "result_filename", "parse_dtype", "parse_int_list", "parse_input_size"]

RESULT_SCHEMA = "saffnet_fast.bench/1"


class ProviderUnavailable(RuntimeError):
    """A provider cannot run here; the message says why (a pytest skip reason in
    ``benchmarks/``, a ``skipped`` record in ``saffnet bench``)."""


def error_text(exc: BaseException) -> str:
    """The first line of an exception, for a record's ``reason`` or a skip message."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def format_table(result: dict) -> str:
    """A plain-text table: median, throughput and speedups per (section, dtype, batch)."""
    meta = result["meta"]
    lines = [f"device: {meta['device_name']} | torch {meta['torch']} | saffnet_fast "
             f"{meta['saffnet_fast']} | {meta['date']} | commit {meta.get('git_commit')}"]
    header = (f"{'section':9s} {'dtype':11s} {'batch':>5s} {'input':>7s} {'provider':26s} "
              f"{'backend':9s} {'median ms':>10s} {'img/s':>9s} {'x eager':>7s} "
              f"{'x compile':>9s}")
    lines += [header, "-" * len(header)]

    def ratio(v):
        return f"{v:.2f}" if v is not None else "-"

    for rec in result["results"]:
        size = "x".join(str(s) for s in rec["input_size"])
        if rec["status"] != "ok":
            lines.append(f"{rec['section']:9s} {rec['dtype']:11s} {rec['batch']:5d} {size:>7s} "
                         f"{rec['provider']:26s} {rec['status']}: {rec['reason']}")
            continue
        lines.append(
            f"{rec['section']:9s} {rec['dtype']:11s} {rec['batch']:5d} {size:>7s} "
            f"{rec['provider']:26s} {str(rec['backend']):9s} {rec['median_s'] * 1e3:10.2f} "
            f"{rec['images_per_s']:9.1f} {ratio(rec.get('speedup_vs_eager')):>7s} "
            f"{ratio(rec.get('speedup_vs_compile')):>9s}")
    return "\n".join(lines)


def save_result(result: dict, path: str | os.PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # atomic: a reader never sees half a file
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def result_filename(result: dict) -> str:
    meta = result["meta"]
    stamp = meta["date"].replace(":", "").replace("-", "")[:15]
    return f"model-{meta['device']}-{result['config'].get('preset', 'custom')}-{stamp}.json"


def parse_int_list(text: str, argument: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{argument}: expected comma-separated positive ints, got {text!r}")
    return values


def parse_input_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--input: expected HxW such as 256x192, got {text!r}") from None
    if h < 32 or w < 32 or h % 32 or w % 32:
        raise ValueError(f"--input: expected H and W multiples of 32 (≥ 32), got {text!r}")
    return h, w
