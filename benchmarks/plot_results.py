"""Plot speedups from benchmark result JSONs (``saffnet bench`` records and the fused-op
summaries written with ``--bench-summary-json``).

    python benchmarks/plot_results.py benchmarks/results/model-cpu-quick-*.json
    python benchmarks/plot_results.py --out-dir benchmarks/results results/*.json

One PNG per input file, next to it (or in ``--out-dir``): bars of speedup over the eager
reference per provider, one bar group per (section or op shape, mode, dtype, batch), with
the 1.0 line. Needs matplotlib; without it, says so and exits 0 (plots are optional).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _groups(result: dict):
    """(labels, providers, {provider: [speedup or None per label]}, title)."""
    ok = [r for r in result["results"] if r.get("median_s")]
    if result.get("kind") == "model":
        def label(r):
            size = "x".join(str(s) for s in r["input_size"])
            return f"{r['section']}\n{r['dtype']} b{r['batch']}\n{size}"
        baseline = "eager"
    else:
        def label(r):
            return (f"{r['op']}\n{r['channels']}x{r['height']}x{r['width']}\n{r['mode']}\n"
                    f"{r['dtype']} b{r['batch']}")
        baseline = "reference"
    labels, providers = [], []
    for r in ok:
        if label(r) not in labels:
            labels.append(label(r))
        if r["provider"] not in providers and r["provider"] != baseline:
            providers.append(r["provider"])
    values = {p: [None] * len(labels) for p in providers}
    for r in ok:
        if r["provider"] in values:
            values[r["provider"]][labels.index(label(r))] = r.get("speedup_vs_eager")
    # Keep only the groups where something other than the baseline ran.
    keep = [j for j in range(len(labels)) if any(values[p][j] is not None for p in providers)]
    labels = [labels[j] for j in keep]
    values = {p: [v[j] for j in keep] for p, v in values.items()}
    meta = result["meta"]
    load = meta.get("load_average_1m")
    title = (f"saffnet_fast {result.get('kind', 'ops')} speedup over eager reference\n"
             f"{meta['device_name']}, {meta.get('torch_threads')} torch thread(s), "
             f"load {load:.1f}, torch {meta['torch']}, {meta['date'][:10]}"
             if load is not None else
             f"saffnet_fast {result.get('kind', 'ops')} speedup over eager reference\n"
             f"{meta['device_name']}, torch {meta['torch']}, {meta['date'][:10]}")
    return labels, providers, values, title


def plot(path: Path, out_dir: Path | None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(path.read_text())
    if "results" not in result or "meta" not in result:
        return None
    labels, providers, values, title = _groups(result)
    if not labels or not providers:
        return None
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.5))
    for i, provider in enumerate(providers):
        xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(labels))]
        ys = [v if v is not None else 0.0 for v in values[provider]]
        bars = ax.bar(xs, ys, width, label=provider)
        for bar, v in zip(bars, values[provider]):
            if v is not None:
                ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v),
                            ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("speedup vs eager reference (x)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    target = (out_dir or path.parent) / (path.stem + ".png")
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def markdown_table(result: dict) -> str:
    """The records of a result file as a Markdown table (for benchmarks/README.md)."""
    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    if result.get("kind") == "model":
        lines = ["| section | dtype | batch | input | provider | backend | median ms | img/s "
                 "| × eager | × compile |", "|---|---|---|---|---|---|---|---|---|---|"]
        skipped = []
        for r in result["results"]:
            size = "×".join(str(s) for s in r["input_size"])
            if r["status"] != "ok":
                line = f"{r['provider']} {r['status']}: {r['reason']}"
                if line not in skipped:
                    skipped.append(line)
                continue
            lines.append(f"| {r['section']} | {r['dtype']} | {r['batch']} | {size} | "
                         f"{r['provider']} | {r['backend']} | {r['median_s'] * 1e3:.1f} | "
                         f"{r['images_per_s']:.1f} | {f(r.get('speedup_vs_eager'), '.2f')} | "
                         f"{f(r.get('speedup_vs_compile'), '.2f')} |")
        return "\n".join(lines + [""] + [f"- {line}" for line in skipped])
    lines = ["| op | C×H×W | mode | dtype | batch | provider | median µs | × eager | × compile |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        lines.append(f"| {r['op']} | {r['channels']}×{r['height']}×{r['width']} | {r['mode']} | "
                     f"{r['dtype']} | {r['batch']} | {r['provider']} | {r['median_s'] * 1e6:.0f} | "
                     f"{f(r.get('speedup_vs_eager'), '.2f')} | "
                     f"{f(r.get('speedup_vs_compile'), '.2f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="result JSON files")
    parser.add_argument("--out-dir", type=Path, default=None, help="where to write PNGs")
    parser.add_argument("--markdown", action="store_true",
                        help="print each file's records as a Markdown table instead of plotting")
    args = parser.parse_args(argv)
    if args.markdown:
        for path in args.files:
            print(markdown_table(json.loads(path.read_text())))
        return 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot_results: matplotlib is not installed; no plot written "
              "(pip install matplotlib)", file=sys.stderr)
        return 0
    for path in args.files:
        if not path.is_file():
            print(f"plot_results: files: {path} does not exist", file=sys.stderr)
            return 2
        try:
            target = plot(path, args.out_dir)
        except (json.JSONDecodeError, KeyError) as exc:
            print(f"plot_results: {path}: not a result file ({exc})", file=sys.stderr)
            continue
        if target is not None:
            print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
