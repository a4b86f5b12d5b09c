"""pytest-benchmark harness for the fused ops (see benchmarks/README.md).

Two ways to run:
  * the normal test run (pyproject addopts has ``--benchmark-disable``): every benchmark
    runs once as a plain test on the ``smoke`` matrix (batch 1, float32), compile providers
    skipped unless ``SAFFNET_BENCH_COMPILE=1``: a few seconds on 2 CPU cores;
  * ``pytest benchmarks/ --benchmark-only``: real timings. The matrix defaults to ``full``
    on a CUDA machine and ``cpu`` (batch 1 and 8, float32) otherwise.

Options (or environment variables): ``--bench-matrix`` / ``SAFFNET_BENCH_MATRIX``
(smoke, cpu, spec, full), ``--bench-device`` / ``SAFFNET_BENCH_DEVICE`` (cpu, cuda),
``--bench-providers`` / ``SAFFNET_BENCH_PROVIDERS`` (comma list), ``--bench-ops`` /
``SAFFNET_BENCH_OPS`` (comma list of split_resplice, scaff, sawf),
``--bench-summary-json FILE`` (speedup summary with machine info),
``SAFFNET_BENCH_THREADS`` (torch intra-op threads, for a shared CPU).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import pytest
import torch

from saffnet_fast import bench

MATRICES = ("smoke", "cpu", "spec", "full")

# Results of the timed runs of this session, for the speedup summary at the end.
RESULTS_KEY = pytest.StashKey[list]()


@dataclasses.dataclass(frozen=True)
class OpParams:
    case: bench.OpCase
    mode: str
    dtype: str
    batch: int
    provider: str

    @property
    def id(self) -> str:
        return f"{self.case.id}-{self.mode}-{self.dtype}-b{self.batch}-{self.provider}"

    @property
    def group(self) -> str:
        return f"{self.case.id} {self.mode} {self.dtype} b{self.batch}"


def pytest_addoption(parser):
    group = parser.getgroup("saffnet-bench", "saffnet_fast fused-op benchmarks")
    group.addoption("--bench-matrix", choices=MATRICES, default=None,
                    help="parameter matrix (default: smoke when benchmarks are disabled, "
                         "full on CUDA, cpu otherwise); env SAFFNET_BENCH_MATRIX")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None,
                    help="device (default: cuda when available); env SAFFNET_BENCH_DEVICE")
    group.addoption("--bench-providers", default=None,
                    help=f"comma list of {','.join(bench.OP_PROVIDERS)}; "
                         "env SAFFNET_BENCH_PROVIDERS")
    group.addoption("--bench-ops", default=None,
                    help=f"comma list of {','.join(bench.OPS)}; env SAFFNET_BENCH_OPS")
    group.addoption("--bench-summary-json", default=None, metavar="FILE",
                    help="write the speedup summary (with machine info) to FILE")


def pytest_configure(config):
    config.stash[RESULTS_KEY] = _SummaryRecords(config)
    threads = os.environ.get("SAFFNET_BENCH_THREADS")
    if threads:
        # On a CPU shared with other jobs, fewer OpenMP threads avoid barrier stalls.
        if not threads.isdigit() or int(threads) < 1:
            raise pytest.UsageError(f"SAFFNET_BENCH_THREADS: expected a positive int, "
                                    f"got {threads!r}")
        torch.set_num_threads(int(threads))
    # pyproject's addopts carry --benchmark-disable for the normal test run, and
    # pytest-benchmark refuses --benchmark-only together with it: asking for
    # --benchmark-only means "run them for real", so enable them. (Our hook runs before
    # pytest-benchmark's, which is trylast.)
    if config.getoption("benchmark_only", False):
        config.option.benchmark_enable = True


def _benchmarks_enabled(config) -> bool:
    return bool(config.getoption("benchmark_enable", False)
                or not config.getoption("benchmark_disable", False))


def _choice(config, option: str, env: str):
    value = config.getoption(option, None)
    return value if value is not None else os.environ.get(env) or None


def bench_device(config) -> torch.device:
    name = _choice(config, "bench_device", "SAFFNET_BENCH_DEVICE")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise pytest.UsageError(f"SAFFNET_BENCH_DEVICE: expected cpu or cuda, got {name!r}")
    return torch.device(name)


def bench_matrix(config) -> str:
    name = _choice(config, "bench_matrix", "SAFFNET_BENCH_MATRIX")
    if name is None:
        if not _benchmarks_enabled(config):
            return "smoke"
        return "full" if bench_device(config).type == "cuda" else "cpu"
    if name not in MATRICES:
        raise pytest.UsageError(f"SAFFNET_BENCH_MATRIX: expected one of {MATRICES}, got {name!r}")
    return name


def _list_choice(config, option, env, allowed, what):
    text = _choice(config, option, env)
    if text is None:
        return tuple(allowed)
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise pytest.UsageError(f"{what}: expected a comma list of {allowed}, got {text!r}")
    return values


def op_params(config) -> list[OpParams]:
    """The parameter list of the selected matrix.

    smoke: batch 1 (2 for the training modes), float32 (the plain test run). cpu: batch 1 and 8, float32.
    spec: the spec's headline shapes, forward at batch 64 and the training modes at 32,
    float32 and float16. full: batch 1, 8, 32, 64; float32 and float16, plus bfloat16 on
    CUDA.
    """
    matrix = bench_matrix(config)
    cuda = bench_device(config).type == "cuda"
    providers = _list_choice(config, "bench_providers", "SAFFNET_BENCH_PROVIDERS",
                             bench.OP_PROVIDERS, "SAFFNET_BENCH_PROVIDERS")
    ops = _list_choice(config, "bench_ops", "SAFFNET_BENCH_OPS", bench.OPS,
                       "SAFFNET_BENCH_OPS")
    if matrix == "smoke":
        dtypes, batches = ("float32",), (1,)
    elif matrix == "cpu":
        dtypes, batches = ("float32",), (1, 8)
    elif matrix == "spec":
        dtypes, batches = ("float32", "float16"), None
    else:
        dtypes = ("float32", "float16", "bfloat16") if cuda else ("float32", "float16")
        batches = (1, 8, 32, 64)
    params = []
    for case in bench.OP_CASES:
        if case.op not in ops:
            continue
        for mode in bench.OP_MODES:
            mode_batches = batches or ((64,) if mode == "forward" else (32,))
            if mode != "forward":
                # Training-mode BN over AFF's pooled map needs batch ≥ 2: batch 1 becomes 2
                # in the smoke run and is dropped from the timed matrices.
                floor = bench.MIN_TRAINING_BATCH
                mode_batches = ((floor,) if matrix == "smoke"
                                else tuple(b for b in mode_batches if b >= floor))
            for dtype in dtypes:
                for batch in mode_batches:
                    for provider in providers:
                        params.append(OpParams(case, mode, dtype, batch, provider))
    return params


def pytest_generate_tests(metafunc):
    if "op_params" in metafunc.fixturenames:
        params = op_params(metafunc.config)
        metafunc.parametrize("op_params", params, ids=[p.id for p in params])


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    dev = bench_device(pytestconfig)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA device is available")
    return dev


@pytest.fixture(scope="session")
def copy_bandwidth(pytestconfig, device) -> float | None:
    """Device copy bandwidth (bytes/s) measured once per session, on CUDA timed runs."""
    if device.type != "cuda" or not _benchmarks_enabled(pytestconfig):
        return None
    return bench.measure_copy_bandwidth(device)


class _SummaryRecords(list):
    """The timed records; with --bench-summary-json each append rewrites the summary file
    (atomically), so a run stopped by a time limit keeps every benchmark that finished (a
    lent GPU's 10-minute calls cut the first GPU run's op benchmarks off before their end)."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def append(self, record: dict) -> None:
        super().append(record)
        write_summary(self.config, self)


def write_summary(config, records: list) -> Optional[Path]:
    path = config.getoption("bench_summary_json", None)
    if not path or not records:
        return None
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": bench.RESULT_SCHEMA, "kind": "ops",
           "meta": bench.machine_info(torch.device(records[0]["device"])),
           "matrix": bench_matrix(config), "results": speedup_table(records)}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


@pytest.fixture
def bench_results(pytestconfig) -> list:
    """Append one record per timed benchmark; summarised at the end of the session."""
    return pytestconfig.stash[RESULTS_KEY]


def pytest_terminal_summary(terminalreporter, config):
    collected = config.stash.get(RESULTS_KEY, [])
    if not collected:
        return
    terminalreporter.section("saffnet_fast fused-op speedups")
    for line in format_speedups(speedup_table(collected)):
        terminalreporter.write_line(line)
    out = write_summary(config, collected)
    if out is not None:
        terminalreporter.write_line(f"summary written to {out}")


def speedup_table(records: list[dict]) -> list[dict]:
    """Per record, its speedup over the eager reference and over torch.compile in its group."""
    groups: dict[str, dict[str, dict]] = {}
    for rec in records:
        groups.setdefault(rec["group"], {})[rec["provider"]] = rec
    rows = []
    for group in groups.values():
        for rec in group.values():
            row = dict(rec)
            for base, key in (("reference", "speedup_vs_eager"),
                              ("compile", "speedup_vs_compile")):
                ref = group.get(base)
                row[key] = ref["median_s"] / rec["median_s"] if ref else None
            rows.append(row)
    return rows


def format_speedups(rows: list[dict]) -> list[str]:
    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    header = (f"{'group':42s} {'provider':10s} {'median us':>10s} {'x eager':>8s} "
              f"{'x compile':>9s} {'GB/s':>8s} {'of copy':>7s}")
    lines = [header, "-" * len(header)]
    for r in rows:
        gbps = r.get("achieved_bytes_per_s")
        lines.append(
            f"{r['group']:42s} {r['provider']:10s} {r['median_s'] * 1e6:10.1f} "
            f"{f(r['speedup_vs_eager'], '.2f'):>8s} {f(r['speedup_vs_compile'], '.2f'):>9s} "
            f"{f(gbps / 1e9 if gbps else None, '.1f'):>8s} "
            f"{f(r.get('fraction_of_copy'), '.0%'):>7s}")
    return lines
