"""Where OpenVINO's CPU time goes on SAFFNet: its per-node performance counters summed by
node type and implementation (the counterpart of profile_cpu_inference.py for the fastest
runtime on the same weights).

The reference SAFFNet with the weights every ``saffnet bench`` provider runs (random, BN
statistics calibrated on one random batch), exported to ONNX (opset 17) and compiled by
OpenVINO's CPU plugin with an f32 precision hint, a latency hint and ``PERF_COUNT``. Run from
the checkout (needs ``pip install "saffnet_fast[export,openvino]"``)::

    python benchmarks/profile_openvino.py --threads 2 --batch 1 8 \\
        --out benchmarks/results/profile-openvino-<date>.json
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch

from saffnet_fast.bench import (calibrate_batchnorm_, machine_info, parse_input_size,
                                save_result)
from saffnet_fast.engine.runtime import export_onnx_file, require
from saffnet_fast.models import build_model


def profile(compiled, batch: int, input_size, iters: int) -> dict:
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal((batch, 3, *input_size), dtype=np.float32)
    for _ in range(3):
        request.infer({0: x})
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        request.infer({0: x})
        times.append(time.perf_counter() - t0)
    by_kind = defaultdict(lambda: [0.0, 0])
    for node in request.get_profiling_info():  # the counters of the last request
        ms = node.real_time.total_seconds() * 1e3
        if ms > 0:
            key = f"{node.node_type} [{node.exec_type}]"
            by_kind[key][0] += ms
            by_kind[key][1] += 1
    return {"batch": batch, "iters": iters, "median_ms": statistics.median(times) * 1e3,
            "counted_ms": sum(v[0] for v in by_kind.values()),
            "by_node_type": [{"node": k, "ms": round(v[0], 3), "nodes": v[1]}
                             for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1][0])]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="256x192", metavar="HxW")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--out", default=None, metavar="FILE.json")
    args = parser.parse_args(argv)
    require("openvino")
    import openvino as ov
    input_size = parse_input_size(args.input)
    torch.manual_seed(0)
    model = calibrate_batchnorm_(build_model("saffnet", input_size=input_size), input_size)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx_file(model.eval(), input_size, os.path.join(folder, "saffnet.onnx"))
        compiled = ov.Core().compile_model(path, "CPU", {
            "INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
        for batch in args.batch:
            rows.append(profile(compiled, batch, input_size, args.iters))
    for r in rows:
        print(f"batch {r['batch']}: {r['median_ms']:.1f} ms (counters sum to "
              f"{r['counted_ms']:.1f} ms)")
        for row in r["by_node_type"][:8]:
            print(f"  {row['node']:42s} {row['ms']:8.2f} ms  {row['nodes']:4d} nodes")
    if args.out:
        record = {"command": "python benchmarks/profile_openvino.py "
                             + shlex.join(sys.argv[1:] if argv is None else argv),
                  "openvino": ov.__version__, "load_average_before": load_before,
                  "load_average_after": os.getloadavg(), "meta": machine_info("cpu"),
                  "results": rows}
        print(f"saved {save_result(record, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
