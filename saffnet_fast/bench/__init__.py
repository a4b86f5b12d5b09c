"""Speed measurement for saffnet_fast: fused-op providers, timing, result records.

Two users:
  * ``benchmarks/`` (pytest-benchmark) times each fused op (split-resplice, SCAFF, SAWF, AFF)
    at SAFFNet's own shapes with every *provider* that can run here: the eager reference,
    the reference under ``torch.compile``, the native extension and the Triton kernels
    (:mod:`.ops`, :func:`make_op_workload`);
  * ``saffnet bench`` times the whole model (:mod:`.models`, :func:`run_model_bench`):
    inference throughput and a mixed-precision training step, reference eager vs
    ``torch.compile`` vs the fast model, with HRNet-W32 for context, and prints speedup
    ratios (:func:`format_table`).

Both share :mod:`.timing` (median times, warm-up, peak memory, copy bandwidth),
:mod:`.machine` (where a measurement was taken) and :mod:`.results` (the record schema,
table and JSON file). Nothing here asserts a speed: it measures and records (device, dtype,
shape, versions, date, git commit) so that results under ``benchmarks/results/`` say where
they came from.
"""
from .machine import default_results_dir, git_commit, machine_info
from .models import MODEL_PROVIDERS, ModelBenchConfig, calibrate_batchnorm_, run_model_bench
from .ops import (MIN_TRAINING_BATCH, OP_CASES, OP_MODES, OP_PROVIDERS, OPS, OpCase,
                  OpWorkload, make_op_workload, make_reference_op, op_function, op_min_bytes)
from .results import (RESULT_SCHEMA, ProviderUnavailable, format_table, parse_dtype,
                      parse_input_size, parse_int_list, result_filename, save_result)
from .timing import (measure_copy_bandwidth, measure_peak_memory, raise_compile_limits,
                     synchronize, time_callable)

__all__ = [
    # fused ops
    "OpCase",
    "OP_CASES",
    "OPS",
    "OP_MODES",
    "OP_PROVIDERS",
    "MIN_TRAINING_BATCH",
    "OpWorkload",
    "make_reference_op",
    "make_op_workload",
    "op_function",
    "op_min_bytes",
    # whole model
    "MODEL_PROVIDERS",
    "ModelBenchConfig",
    "run_model_bench",
    "calibrate_batchnorm_",
    # timing
    "synchronize",
    "time_callable",
    "measure_peak_memory",
    "measure_copy_bandwidth",
    "raise_compile_limits",
    # machine
    "machine_info",
    "git_commit",
    "default_results_dir",
    # results
    "RESULT_SCHEMA",
    "ProviderUnavailable",
    "format_table",
    "save_result",
    "result_filename",
    "parse_dtype",
    "parse_int_list",
    "parse_input_size",
]
