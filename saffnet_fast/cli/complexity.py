"""``saffnet complexity``: params and GFLOPs of every Table IV / Table V row, beside the paper's.

Counting follows HRNet's ``get_model_summary`` (see :mod:`saffnet_fast.models.complexity`):
"GFLOPs" = multiply-adds / 1024³; plain GMACs (/1e9) are printed too.
"""
from __future__ import annotations

import argparse
import json
import re
import warnings

HELP = "params and GFLOPs of every paper row"

_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
_SHORT = {"scbottle": "SCB", "safuse": "SAF", "satransition": "SAT", "sastem": "SAS"}


def parse_size(text: str):
    """``HxW`` with positive multiples of 32 (HRNet-W32's lowest branch is 1/32 of the input)."""
    match = _SIZE.match(text or "")
    if not match:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 256x192, got {text!r}")
    size = int(match.group(1)), int(match.group(2))
    if min(size) < 32 or size[0] % 32 or size[1] % 32:
        raise argparse.ArgumentTypeError(
            f"expected a height and width that are positive multiples of 32 (HRNet-W32's lowest "
            f"branch is 1/32 of the input), got {text!r}")
    return size


def add_arguments(parser):
    parser.add_argument("--input", default="256x192", metavar="HxW", type=parse_size,
                        help="input height x width (default 256x192; the paper also reports "
                             "SAFFNet at 256x256 and 384x288)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def collect(input_size=(256, 192)):
    """One dict per paper row: measured and paper params/GFLOPs at ``input_size``."""
    from saffnet_fast.models import PAPER_ROWS, PAPER_SAFFNET_GFLOPS_AT
    from saffnet_fast.models.complexity import measure

    cache = {}
    rows = []
    for row in PAPER_ROWS:
        key = (row.model, tuple(sorted(row.switches.items())))
        if key not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = row.build(input_size=(256, 192))
            cache[key] = measure(model, input_size)
        measured = cache[key]
        if tuple(input_size) == (256, 192):
            paper_gflops = row.paper_gflops
        elif row.model == "saffnet":
            paper_gflops = PAPER_SAFFNET_GFLOPS_AT.get(tuple(input_size))
        else:
            paper_gflops = None  # the paper gives this row at 256x192 only
        rows.append({
            "table": row.table,
            "name": row.name,
            "model": row.model,
            "switches": dict(row.switches),
            "input_size": list(input_size),
            "params": measured.params,
            "params_m": round(measured.params_m, 4),
            "macs": measured.macs,
            "gflops": round(measured.gflops, 4),
            "gmacs": round(measured.gmacs, 4),
            "paper_params_m": row.paper_params_m,
            "paper_gflops": paper_gflops,
            "params_diff_m": round(measured.params_m - row.paper_params_m, 4),
            "gflops_diff": None if paper_gflops is None
            else round(measured.gflops - paper_gflops, 4),
        })
    return rows


def format_table(rows) -> str:
    h, w = rows[0]["input_size"]
    lines = [f"Input 1x3x{h}x{w}. GFLOPs = multiply-adds / 1024^3 (HRNet convention); "
             "GMACs = multiply-adds / 1e9.",
             f"{'tab':3} {'row':28} {'switches':15} {'params M':>9} {'paper':>6} {'diff':>7}  "
             f"{'GFLOPs':>7} {'paper':>6} {'diff':>7}  {'GMACs':>7}"]
    for r in rows:
        switches = "+".join(_SHORT[k] for k, v in r["switches"].items() if v) or "-"
        pg = "-" if r["paper_gflops"] is None else f"{r['paper_gflops']:.2f}"
        dg = "-" if r["gflops_diff"] is None else f"{r['gflops_diff']:+.3f}"
        lines.append(f"{r['table']:3} {r['name']:28} {switches:15} {r['params_m']:9.3f} "
                     f"{r['paper_params_m']:6.2f} {r['params_diff_m']:+7.3f}  "
                     f"{r['gflops']:7.3f} {pg:>6} {dg:>7}  {r['gmacs']:7.3f}")
    return "\n".join(lines)


def run(args) -> int:
    rows = collect(args.input)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    return 0
