"""``saffnet bench``: whole-model speed, reference vs torch.compile vs the fast backends.

Inference throughput (images/s) of SAFFNet per provider, dtype and batch, a mixed-precision
training step, and HRNet-W32 for context; prints a table with speedups vs eager and vs
torch.compile and saves the JSON record (device, versions, date, git commit).

Presets: default 256×192 at batch 1/32/64 (training at 32); ``--quick`` 128×96 at batch 1
and 8 (training at 8). ``--input``/``--batch``/``--providers``/``--dtypes`` override.
The per-op kernel comparisons live in ``benchmarks/`` (pytest-benchmark).
"""
from __future__ import annotations

import argparse
import json
import sys

HELP = "speed table: reference, torch.compile, fast backends, ONNX Runtime, OpenVINO"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small run: 128x96 input, batch 1 and 8, training at batch 8")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to time (default: cuda when available, else cpu)")
    parser.add_argument("--json", action="store_true",
                        help="print the JSON record on stdout (progress goes to stderr)")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="write the JSON record here (default: benchmarks/results/"
                             "model-<device>-<preset>-<date>.json when run from a checkout)")
    parser.add_argument("--no-save", action="store_true", help="do not write a JSON file")
    parser.add_argument("--providers", default=None,
                        help="comma-separated subset of: eager, compile, compile_freezing, "
                             "fast, fast_optimized, fast_optimized_cudagraphs, "
                             "fast_optimized_compile, onnxruntime, openvino, hrnet_w32 "
                             '(onnxruntime: pip install "saffnet_fast[export]"; openvino: '
                             'pip install "saffnet_fast[openvino]")')
    parser.add_argument("--batch", default=None, metavar="N[,N...]",
                        help="inference batch sizes (comma-separated)")
    parser.add_argument("--train-batch", type=int, default=None, metavar="N",
                        help="training-step batch size")
    parser.add_argument("--input", default=None, metavar="HxW",
                        help="input size, multiples of 32 (e.g. 256x192)")
    parser.add_argument("--dtypes", default=None,
                        help="inference dtypes, comma-separated (float16 on CUDA only)")
    parser.add_argument("--no-train", action="store_true", help="skip the training step")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch intra-op threads (default: torch's choice). On a CPU "
                             "shared with other jobs, 1 avoids OpenMP barrier stalls that "
                             "make many-small-op models 10-100x slower")
    parser.add_argument("--min-time", type=float, default=None, metavar="S",
                        help="minimum timed seconds per measurement")


def _config(args):
    import torch

    from saffnet_fast import bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but no CUDA device is available")
    if args.quick and args.tiny:
        raise ValueError("--quick and --tiny: choose one preset")
    preset = "tiny" if args.tiny else "quick" if args.quick else "full"
    cfg = bench.ModelBenchConfig.preset_config(preset, device)
    if args.providers:
        cfg.providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
        unknown = [p for p in cfg.providers if p not in bench.MODEL_PROVIDERS]
        if unknown:
            raise ValueError(f"--providers: unknown {unknown}; expected some of "
                             f"{', '.join(bench.MODEL_PROVIDERS)}")
    if args.batch:
        cfg.batches = bench.parse_int_list(args.batch, "--batch")
    if args.train_batch is not None:
        if args.train_batch < 1:
            raise ValueError(f"--train-batch: expected a positive int, got {args.train_batch}")
        cfg.train_batch = args.train_batch
    if args.input:
        cfg.input_size = bench.parse_input_size(args.input)
    if args.dtypes:
        cfg.dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
        for name in cfg.dtypes:
            if name not in ("float32", "float16", "bfloat16"):
                raise ValueError(f"--dtypes: expected float32, float16 or bfloat16, got {name!r}")
            if name != "float32" and device != "cuda":
                raise ValueError(f"--dtypes: {name} inference is benchmarked on CUDA only")
    if args.no_train:
        cfg.train = False
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: expected a positive int, got {args.threads}")
        cfg.threads = args.threads
    if args.min_time is not None:
        if args.min_time <= 0:
            raise ValueError(f"--min-time: expected a positive number, got {args.min_time}")
        cfg.min_run_time = args.min_time
    if any(x != cfg.preset_config(preset, device).__dict__[k] for k, x in
           (("input_size", cfg.input_size), ("batches", cfg.batches),
            ("providers", cfg.providers), ("train_batch", cfg.train_batch))):
        cfg.preset = f"{preset}-custom"
    return cfg


def run(args) -> int:
    from saffnet_fast import bench

    try:
        cfg = _config(args)
    except ValueError as exc:
        print(f"saffnet bench: {exc}", file=sys.stderr)
        return 2
    log_stream = sys.stderr if args.json else sys.stdout

    def log(line: str) -> None:
        print(line, file=log_stream, flush=True)

    # With --out, each finished measurement is saved at once (marked partial until the end):
    # a run stopped by a time limit keeps what it measured.
    partial = (lambda result: bench.save_result(result, args.out)) \
        if args.out is not None and not args.no_save else None
    try:
        result = bench.run_model_bench(cfg, log=log, on_partial=partial)
    except (RuntimeError, ValueError) as exc:
        print(f"saffnet bench: {exc}", file=sys.stderr)
        return 1
    out = args.out
    if out is None and not args.no_save and not cfg.preset.startswith("tiny"):
        results_dir = bench.default_results_dir()
        if results_dir is not None:
            out = results_dir / bench.result_filename(result)
    if out is not None and not args.no_save:
        path = bench.save_result(result, out)
        log(f"saved {path}")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print()
        print(bench.format_table(result))
    failed = [r for r in result["results"] if r["status"] == "error"]
    return 1 if failed else 0
