"""``saffnet bench``: the JSON record's shape on a tiny configuration (never its speed)."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest
import torch

from saffnet_fast.cli.main import main

pytest.importorskip("saffnet_fast.models", reason="saffnet bench times models.build_model")

EXPECTED_META = {"device", "device_name", "cpu_model", "cpu_cores", "torch", "saffnet_fast",
                 "date", "git_commit", "available_backends"}
EXPECTED_RECORD = {"section", "model", "provider", "backend", "dtype", "batch", "input_size",
                   "status", "reason", "median_s", "images_per_s", "speedup_vs_eager",
                   "speedup_vs_compile"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run (64×64, batch 1 and 2, training at 2) shared by the assertions."""
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    buffer = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with redirect_stdout(buffer):
            # One thread: on a shared 2-core machine OpenMP barriers stall many-small-op
            # models badly; the test checks the record, not the speed.
            code = main(["bench", "--tiny", "--device", "cpu", "--json", "--threads", "1",
                         "--providers", "eager,fast,fast_optimized_cudagraphs",
                         "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return code, buffer.getvalue(), out


def test_bench_json_has_expected_keys_and_positive_throughputs(tiny_run):
    code, stdout, out = tiny_run
    assert code == 0, stdout
    result = json.loads(stdout)  # stdout is the JSON alone (progress went to stderr)
    assert result["schema"] == "saffnet_fast.bench/1"
    assert EXPECTED_META <= set(result["meta"]), set(result["meta"])
    assert result["meta"]["device"] == "cpu"
    assert result["config"]["input_size"] == [64, 64]
    assert result["meta"]["torch_threads"] == 1

    records = result["results"]
    for rec in records:
        assert EXPECTED_RECORD <= set(rec), set(rec)
    ok = [r for r in records if r["status"] == "ok"]
    inference = {(r["provider"], r["batch"]) for r in ok if r["section"] == "inference"}
    assert inference == {("eager", 1), ("eager", 2), ("fast", 1), ("fast", 2)}
    assert {r["provider"] for r in ok if r["section"] == "training"} == {"eager", "fast"}
    for rec in ok:
        assert rec["median_s"] > 0 and rec["images_per_s"] > 0
        assert rec["images_per_s"] == pytest.approx(rec["batch"] / rec["median_s"])
        if rec["provider"] == "eager":
            assert rec["speedup_vs_eager"] == pytest.approx(1.0)
        assert rec["speedup_vs_compile"] is None  # compile was not requested

    # CUDA graphs cannot run on the CPU: recorded as skipped with the reason, not dropped.
    skipped = [r for r in records if r["provider"] == "fast_optimized_cudagraphs"]
    assert skipped and all(r["status"] == "skipped" and "CUDA" in r["reason"]
                           for r in skipped)

    assert json.loads(out.read_text()) == result


@pytest.mark.parametrize("argv, needle", [
    (["--input", "65x48"], "--input"),
    (["--providers", "eager,warp_drive"], "--providers"),
    (["--batch", "0"], "--batch"),
    (["--dtypes", "float16", "--device", "cpu"], "--dtypes"),
])
def test_bench_rejects_bad_arguments(argv, needle, capsys):
    assert main(["bench", "--tiny", "--no-save", *argv]) == 2
    assert needle in capsys.readouterr().err
