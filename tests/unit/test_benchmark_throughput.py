"""benchmarks/throughput.py: the sweep's points and variants, and bad options as one-line errors. Its --quick run
on 1 and 2 ranks is in tests/e2e/test_benchmark_throughput_runs.py."""

import importlib.util
import subprocess
import sys

import pytest
from conftest import ROOT


def load_benchmark():
    """benchmarks/throughput.py as a module; its sibling modules (throughput_measure, throughput_report) are
    imported from benchmarks/, as when it runs as a script."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("throughput_benchmark", ROOT / "benchmarks" / "throughput.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_sweep_points_and_variants():
    bench = load_benchmark()
    args = bench.parse_args(
        [
            "--model",
            "tiny",
            "gpt2-124m",
            "--seq-len",
            "64",
            "128",
            "--micro-batch-size",
            "2",
            "--checkpointing",
            "both",
            "--ranks",
            "1",
            "2",
            "--stages",
            "2",
            "0",
            "--compile",
            "both",
            "--offload",
        ]
    )
    points = bench.points(args)
    assert len(points) == 2 * 2 * 1 * 2 * 2
    assert {(p["model"], p["seq_len"], p["checkpointing"], p["ranks"]) for p in points} == {
        (m, t, c, r) for m in ("tiny", "gpt2-124m") for t in (64, 128) for c in (False, True) for r in (1, 2)
    }
    assert bench.variants(args) == [
        "plain",
        "plain+compile",
        "zero0",
        "zero0+compile",
        "zero2",
        "zero2+compile",
        "zero2_offload",
        "zero2_offload+compile",
        "zero3_offload",
        "zero3_offload+compile",
    ]
    args = bench.parse_args(["--quick", "--no-plain", "--compile", "on"])
    assert bench.variants(args) == ["zero0+compile", "zero2+compile"]
    assert args.seq_len == [32] and args.model_overrides == bench.QUICK_MODEL


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seq-len", "0"], "--seq-len 0: must be 1 or more"),
        (["--tag", "a b"], "--tag 'a b': use letters"),
        (["--checkpointing", "maybe"], "--checkpointing: invalid choice"),
    ],
)
def test_bad_options_are_one_line_errors(argv, message):
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
