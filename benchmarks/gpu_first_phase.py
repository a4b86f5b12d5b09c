#!/usr/bin/env python
"""The first phase of a GPU run (spec/gpu.md §5): what the device can do, then SAFFNet's
inference at batch 64 in half precision against its floor, every provider checked against
the float32 reference before it is timed, the kernel profile of the best eager and of the
fast model, and per-block timings. Prints its summary table last.

    python benchmarks/gpu_first_phase.py --out OUT_DIR          # on an H100: ~2-3 minutes
    python benchmarks/gpu_first_phase.py --device cpu --dtype float32 --batch 2 \\
        --size 64 48 --out /tmp/dry        # dry run of the script on a CPU (times nothing)

Steps, each recorded in OUT_DIR/first-phase.json (written after every step, so a run cut
short keeps what it measured):
  1. ceilings: device copy bandwidth (1 GiB clone, read + write) and a dense fp16 matmul
     (8192³), both measured here;
  2. the model: SAFFNet (paper config) at 256×192, BN calibrated on a random batch (fresh
     init otherwise decays activations to subnormals), float32 reference output with TF32
     off; FLOPs of one forward (torch.utils.flop_counter); floors: FLOPs at the measured
     matmul rate and the model's minimum bytes (input, output, weights) at the copy rate;
  3. providers, each checked (relative L2 against the float32 output < 2e-2) then timed
     (CUDA-synchronised median over ≥ 1 s): eager NCHW as shipped; eager channels_last +
     cudnn.benchmark; torch.compile of the latter (default mode; --compile-mode); the fast
     model (convert, auto backend); optimize_for_inference(dtype, cuda_graph=True);
  4. kernels per forward (torch.profiler: CUDA kernel + memcpy/memset events of one forward)
     for the best eager and the fast model, and their top-25 kernels by device time
     (OUT_DIR/profile-top25.txt);
  5. per block: each distinct SAFFNet block shape, the reference against the fast block
     with auto's choice and with each backend pinned (native, triton), same dtype and
     layout, each checked first, beside the floor of reading x and writing out once: the
     measurements fast.dispatch's routing tables wait for.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import saffnet_fast  # noqa: E402
from saffnet_fast.bench.machine import machine_info  # noqa: E402
from saffnet_fast.bench.models import calibrate_batchnorm_  # noqa: E402
from saffnet_fast.bench.timing import measure_copy_bandwidth, synchronize  # noqa: E402
from saffnet_fast.models import build_model  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PARITY_BOUND = {torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float32: 1e-2}


def rel_l2(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def median_time(fn, device, min_time: float = 1.0) -> dict:
    """Median seconds per call: warm-up (cuDNN search, autotune) then blocks of calls, each
    block synchronised, for at least ``min_time`` seconds."""
    for _ in range(3):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    one = max(time.perf_counter() - t0, 1e-6)
    per_block = max(1, int(0.05 / one))
    samples, start = [], time.perf_counter()
    while time.perf_counter() - start < min_time or len(samples) < 5:
        t0 = time.perf_counter()
        for _ in range(per_block):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) / per_block)
    return {"median_s": statistics.median(samples), "samples": len(samples),
            "calls_per_sample": per_block}


def matmul_rate(device, dtype) -> float:
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median_time(lambda: a @ b, device, min_time=0.5)["median_s"]
    return 2 * n ** 3 / t


def model_flops(model, x) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def kernel_events(fn, device) -> tuple[int, str]:
    """(device kernels + memcpy/memset of one call, top-25 table by device time)."""
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return 0, "(no CUDA device: no kernel profile)"
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    return len(events), table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, nargs=2, default=(256, 192), metavar=("H", "W"))
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode of the compile provider (default, max-autotune, "
                        "none to skip it)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds timed per provider")
    args = p.parse_args(argv)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (use --device cpu for a dry run)")
    torch.manual_seed(0)
    result = {"script": "benchmarks/gpu_first_phase.py", "argv": sys.argv[1:],
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine_info(device), "batch": args.batch,
              "input_size": list(args.size), "dtype": args.dtype, "providers": {},
              "blocks": [], "errors": []}
    path = out_dir / "first-phase.json"

    def save():
        path.write_text(json.dumps(result, indent=1) + "\n")

    # 1. ceilings
    copy_bw = measure_copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 64 << 20)
    mm = matmul_rate(device, torch.float16 if device.type == "cuda" else torch.float32)
    result["ceilings"] = {"copy_bytes_per_s": copy_bw, "matmul_flops_per_s": mm}
    print(f"ceilings: copy {copy_bw / 1e9:.0f} GB/s, matmul {mm / 1e12:.1f} TFLOP/s", flush=True)
    save()

    # 2. the model, its reference output and floors
    reference = build_model("saffnet", backend="reference", input_size=tuple(args.size)).to(device)
    calibrate_batchnorm_(reference, tuple(args.size))
    reference.eval().requires_grad_(False)
    x32 = torch.randn(args.batch, 3, *args.size, device=device)
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        expected = reference(x32).float()
    torch.backends.cudnn.allow_tf32 = cudnn_tf32
    flops = model_flops(reference, x32[:1]) * args.batch
    params = sum(t.numel() for t in reference.parameters())
    min_bytes = (x32.numel() + expected.numel() + params) * torch.finfo(dtype).bits // 8
    floor_s = max(flops / mm, min_bytes / copy_bw)
    result["model"] = {"flops": flops, "parameters": params, "min_bytes": min_bytes,
                       "floor_s": floor_s}
    print(f"model: {flops / 1e9:.1f} GFLOP per batch, floor {floor_s * 1e3:.2f} ms", flush=True)
    save()
    x = x32.to(dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    # 3. providers
    def eager_nchw():
        torch.backends.cudnn.benchmark = False
        m = copy.deepcopy(reference).to(dtype)
        return lambda: m(x), m

    def eager_cl():
        torch.backends.cudnn.benchmark = True
        m = copy.deepcopy(reference).to(dtype).to(memory_format=torch.channels_last)
        return lambda: m(x_cl), m

    def compiled():
        torch.backends.cudnn.benchmark = True
        m = copy.deepcopy(reference).to(dtype).to(memory_format=torch.channels_last)
        c = torch.compile(m, mode=None if args.compile_mode == "default" else args.compile_mode)
        return lambda: c(x_cl), m

    def fast():
        torch.backends.cudnn.benchmark = True
        m = saffnet_fast.convert(copy.deepcopy(reference), "auto").to(dtype)
        m.to(memory_format=torch.channels_last)
        return lambda: m(x_cl), m

    def fast_optimized():
        m = copy.deepcopy(reference)
        graph = device.type == "cuda"
        g = saffnet_fast.optimize_for_inference(m, dtype=dtype, example_input=x32,
                                                cuda_graph=graph)
        return lambda: g(x_cl), m

    providers = [("eager_nchw", eager_nchw), ("eager_cl", eager_cl)]
    if args.compile_mode != "none":
        providers.append(("compile_cl", compiled))
    providers += [("fast_cl", fast), ("fast_optimized_graph", fast_optimized)]
    fns = {}
    for name, make in providers:
        record = result["providers"].setdefault(name, {})
        try:
            t0 = time.perf_counter()
            fn, _ = make()
            with torch.no_grad():
                out = fn()
                synchronize(device)
                record["first_call_s"] = time.perf_counter() - t0
                record["rel_l2_vs_fp32"] = err = rel_l2(out.float(), expected)
                if not err < PARITY_BOUND[dtype]:
                    raise RuntimeError(f"output off the float32 reference by {err:.3g} "
                                       f"(bound {PARITY_BOUND[dtype]:g}): not timed")
                record.update(median_time(fn, device, args.min_time))
            record["images_per_s"] = args.batch / record["median_s"]
            record["x_floor"] = record["median_s"] / floor_s
            fns[name] = fn
            print(f"{name}: {record['median_s'] * 1e3:.2f} ms ({record['x_floor']:.1f}× floor), "
                  f"rel L2 {err:.2e}", flush=True)
        except Exception as exc:  # recorded, the run goes on
            record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            result["errors"].append(f"{name}: {traceback.format_exc()[-1500:]}")
            print(f"{name}: ERROR {record['error'][:300]}", flush=True)
        save()
    eager_ms = result["providers"].get("eager_nchw", {}).get("median_s")
    for rec in result["providers"].values():
        if eager_ms and "median_s" in rec:
            rec["speedup_vs_eager_nchw"] = eager_ms / rec["median_s"]
    save()

    # 4. kernels per forward and the top-25 profile
    tables = []
    for name in ("eager_cl", "fast_cl"):
        if name in fns:
            try:
                with torch.no_grad():
                    count, table = kernel_events(fns[name], device)
                result["providers"][name]["kernels_per_forward"] = count
                tables.append(f"== {name}: {count} device kernels / copies per forward ==\n{table}")
            except Exception as exc:
                result["errors"].append(f"profile {name}: {exc}")
    (out_dir / "profile-top25.txt").write_text("\n\n".join(tables) or "(none)\n")
    save()

    # 5. per block
    from saffnet_fast.fast import FAST_FROM_REFERENCE

    seen, blocks = set(), []

    def record_input(module, inputs):
        key = (type(module).__name__, tuple(inputs[0].shape[1:]))
        if key not in seen:
            seen.add(key)
            blocks.append((module, tuple(t.detach() for t in inputs)))

    hooks = [m.register_forward_pre_hook(record_input) for m in reference.modules()
             if type(m) in FAST_FROM_REFERENCE]
    with torch.no_grad():
        reference(x32[:1])
    for h in hooks:
        h.remove()
    for module, inputs in blocks:
        name = f"{type(module).__name__}{tuple(inputs[0].shape[1:])}"
        row = {"block": name}
        try:
            ref_m = copy.deepcopy(module).to(dtype).to(memory_format=torch.channels_last)
            xs = tuple(t.expand(args.batch, *t.shape[1:]).to(dtype).contiguous(
                memory_format=torch.channels_last) for t in inputs)
            with torch.no_grad():
                want = ref_m(*xs)
                row["reference_s"] = median_time(lambda: ref_m(*xs), device, 0.2)["median_s"]
                # auto's choice, and each backend pinned (the data for dispatch's
                # CUDA_TRITON_FIRST_INFERENCE and CUDA_UNROUTED choices)
                for backend in ("auto", "native", "triton"):
                    try:
                        fast_m = saffnet_fast.convert(copy.deepcopy(ref_m), backend)
                        err = rel_l2(fast_m(*xs), want)
                        row[f"{backend}_rel_l2"] = err
                        if not err < PARITY_BOUND[dtype]:
                            raise RuntimeError(f"off the reference by {err:.3g}")
                        row[f"{backend}_s"] = median_time(lambda: fast_m(*xs), device,
                                                          0.2)["median_s"]
                    except Exception as exc:
                        row[f"{backend}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            nbytes = (sum(t.numel() for t in xs) + want.numel()) * torch.finfo(dtype).bits // 8
            row["floor_s"] = nbytes / copy_bw
            if "auto_s" in row:
                row["speedup"] = row["reference_s"] / row["auto_s"]
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        result["blocks"].append(row)
        save()

    # summary, last
    lines = [f"SAFFNet {args.size[0]}x{args.size[1]} batch {args.batch} {args.dtype} on "
             f"{result['machine'].get('device_name', device)}; floor {floor_s * 1e3:.2f} ms "
             f"({flops / 1e9:.1f} GFLOP at {mm / 1e12:.2f} TFLOP/s; copy {copy_bw / 1e9:.0f} GB/s)",
             f"{'provider':<22}{'ms':>9}{'img/s':>9}{'x floor':>9}{'vs eager':>9}"
             f"{'kernels':>9}  rel L2 / error"]
    for name, rec in result["providers"].items():
        if "median_s" in rec:
            lines.append(f"{name:<22}{rec['median_s'] * 1e3:>9.2f}{rec['images_per_s']:>9.0f}"
                         f"{rec['x_floor']:>9.1f}{rec.get('speedup_vs_eager_nchw', 0):>9.2f}"
                         f"{rec.get('kernels_per_forward', ''):>9}  {rec['rel_l2_vs_fp32']:.1e}")
        else:
            lines.append(f"{name:<22}{'-':>9}{'-':>9}{'-':>9}{'-':>9}{'':>9}  "
                         f"{rec.get('error', '?')[:70]}")
    lines.append(f"{'block (ms; - = refused or failed)':<34}{'ref':>8}{'auto':>8}{'native':>8}"
                 f"{'triton':>8}{'floor':>8}{'auto x':>8}")

    def ms(row, key):
        return f"{row[key] * 1e3:>8.3f}" if key in row else f"{'-':>8}"

    for row in result["blocks"]:
        if "reference_s" in row:
            speedup = f"{row['speedup']:>8.2f}" if "speedup" in row else f"{'-':>8}"
            lines.append(f"{row['block']:<34}{ms(row, 'reference_s')}{ms(row, 'auto_s')}"
                         f"{ms(row, 'native_s')}{ms(row, 'triton_s')}{ms(row, 'floor_s')}"
                         f"{speedup}")
        else:
            lines.append(f"{row['block']:<34}  {row.get('error', '?')[:60]}")
    summary = "\n".join(lines)
    result["summary"] = summary
    save()
    (out_dir / "first-phase-summary.txt").write_text(summary + "\n")
    print(summary)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
