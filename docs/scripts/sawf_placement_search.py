"""Enumerate readings of SAFuseBlock (where SAWF sits, SE+ reduction, AFF r) and score them
against the paper's Table V rows that contain SAFuse.

Each reading is a list of SAWF instances (width, branch level) per HR module; its cost is
added to the measured model without SAFuse (same counting as ``saffnet complexity``).
Run:  python docs/scripts/sawf_placement_search.py  [--top 25]
"""
from __future__ import annotations

import argparse
import itertools
import warnings

import torch
from torch import nn

from saffnet_fast.models import build_model
from saffnet_fast.models.complexity import count_macs, count_params
from saffnet_fast.nn.reference import SAWF

H, W = 256, 192
# stage2: 1 module [32, 64]; stage3: 4 modules [32, 64, 128]  (HRNet-DF)
STAGES = [(1, [32, 64]), (4, [32, 64, 128])]
# rows with SAFuse: (name, switches without safuse, paper params M, paper GFLOPs)
ROWS = [("DF+SAFuse", {}, 8.07, 4.40),
        ("DF+SCBottle+SAFuse", {"scbottle": True}, 8.00, 4.19),
        ("DF+SCBottle+SAFuse+SATrans", {"scbottle": True, "satransition": True}, 8.02, 4.19),
        ("SAFFNet", {"scbottle": True, "satransition": True, "sastem": True}, 8.03, 4.20)]


class _AtLevel(nn.Module):
    def __init__(self, block, level):
        super().__init__()
        self.block, self.level = block, level

    def forward(self, x):  # x is the 1×3×H×W probe: make the level's feature map instead
        c = self.block.channels
        return self.block(torch.zeros(1, c, H // 4 >> self.level, W // 4 >> self.level))


_cache = {}


def sawf_cost(c, level, se, r):
    key = (c, level, se, r)
    if key not in _cache:
        m = _AtLevel(SAWF(c, se, r), level)
        _cache[key] = (count_params(m), count_macs(m, (H, W)))
    return _cache[key]


def instances(reading):
    """(width, level) of every SAWF in the network for one reading."""
    kind, up, down = reading
    out = []
    for modules, ch in STAGES:
        n = len(ch)
        per_module = []
        if kind == "per_path":
            for i in range(n):
                for j in range(n):
                    if j > i:
                        per_module.append({"source": (ch[j], j), "low_res": (ch[i], j),
                                           "target": (ch[i], i)}[up])
                    elif j < i:
                        if down == "source":
                            per_module.append((ch[j], j))
                        elif down == "target":
                            per_module.append((ch[i], i))
                        else:  # after every strided step
                            per_module += [(ch[j], j + k + 1) for k in range(i - j - 1)]
                            per_module.append((ch[i], i))
        elif kind == "per_branch_before_fuse":
            per_module = [(ch[j], j) for j in range(n)]
        elif kind == "per_target_after_sum":
            per_module = [(ch[i], i) for i in range(n)]
        out += per_module * modules
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    bases = []
    for name, sw, pp, pg in ROWS:
        m = build_model("hrnet_df", safuse=False, **sw)
        bases.append((name, count_params(m), count_macs(m, (H, W)), pp, pg))
    readings = [("per_path", u, d) for u in ("source", "low_res", "target")
                for d in ("source", "target", "each")]
    readings += [("per_branch_before_fuse", "-", "-"), ("per_target_after_sum", "-", "-")]
    results = []
    for reading, se, r in itertools.product(readings, (4, 8, 16), (2, 4, 8, 16)):
        inst = instances(reading)
        dp = sum(sawf_cost(c, lv, se, r)[0] for c, lv in inst)
        dm = sum(sawf_cost(c, lv, se, r)[1] for c, lv in inst)
        errs = []
        for name, p, m, pp, pg in bases:
            errs.append(((p + dp) / 1e6 - pp, (m + dm) / 1024 ** 3 - pg))
        worst = max(max(abs(a), abs(b)) for a, b in errs)
        results.append((worst, reading, se, r, dp, dm, errs))
    results.sort(key=lambda t: t[0])
    print(f"{'worst':>6} {'reading':40s} {'se':>3} {'r':>3} {'+params':>9} {'+GFLOPs':>8}  "
          "row errors (params M, GFLOPs): " + ", ".join(b[0] for b in bases))
    for worst, reading, se, r, dp, dm, errs in results[:args.top]:
        label = reading[0] if reading[0] != "per_path" else f"per_path up={reading[1]} down={reading[2]}"
        e = "  ".join(f"{a:+.3f}/{b:+.3f}" for a, b in errs)
        print(f"{worst:6.3f} {label:40s} {se:3d} {r:3d} {dp / 1e6:9.4f} {dm / 1024 ** 3:8.4f}  {e}")
    print("default SE+ reduction 16, AFF r 4:")
    for worst, reading, se, r, dp, dm, errs in results:
        if se == 16 and r == 4:
            label = reading[0] if reading[0] != "per_path" else f"per_path up={reading[1]} down={reading[2]}"
            e = "  ".join(f"{a:+.3f}/{b:+.3f}" for a, b in errs)
            print(f"{worst:6.3f} {label:40s} {se:3d} {r:3d} {dp / 1e6:9.4f} {dm / 1024 ** 3:8.4f}  {e}")


if __name__ == "__main__":
    main()
