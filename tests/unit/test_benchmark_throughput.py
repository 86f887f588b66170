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
        (["--sequence-parallel", "0"], "--sequence-parallel 0: must be 1 or more"),
        (["--expert-parallel", "2", "--ranks", "2", "3"], "--expert-parallel 2: --ranks 3 does not divide into groups"),
    ],
)
def test_bad_options_are_one_line_errors(argv, message):
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_parallel_variants_their_layouts_and_process_counts():
    bench = load_benchmark()
    args = bench.parse_args(
        ["--stages", "1", "--ranks", "2", "4", "--tensor-parallel", "2", "--sequence-parallel", "2",
         "--expert-parallel", "2", "--compile", "both"]
    )  # fmt: skip
    assert bench.variants(args) == [
        "plain", "plain+compile", "zero1", "zero1+compile", "tp2", "tp2+compile", "sp2", "sp2+compile", "ep2",
        "ep2+compile",
    ]  # fmt: skip
    assert bench.layout("sp2+compile") == {"stages": 1, "tensor": 1, "sequence": 2, "experts": 1}
    assert bench.layout("ep4") == {"stages": 1, "tensor": 1, "sequence": 1, "experts": 4}
    assert bench.layout("zero2_offload") == {"stages": 1, "tensor": 1, "sequence": 1, "experts": 1}
    # spN adds N ranks per replica; epN splits the experts over the replicas it has (the plain loop: one process)
    variants = ("plain", "zero1", "pp2", "tp2", "sp2", "ep2")
    assert [bench.processes(v, 2) for v in variants] == [1, 2, 4, 4, 4, 2]
    assert [bench.ds_config_name(v) for v in ("plain+compile", "zero3", "sp2", "ep2+compile")] == [
        "zero0", "zero3", "zero1", "zero1",
    ]  # fmt: skip
    assert {"sequence_parallel", "expert_parallel"} <= set(bench.SETTINGS)


def fake_trial(point, variant, tokens_per_second, world_size, comm_ops=None):
    """A worker's result as benchmarks/throughput_measure.summary shapes it (numbers made up: the report's input)."""
    per_rank = {
        "tokens_per_second": tokens_per_second / world_size,
        "peak_memory_gib": 0.5,
        "baseline_memory_gib": 0.25,
        "model_state_gib": 0.1,
        "first_step_seconds": 1.0,
        "cpu_seconds": 2.0,
        "comm_seconds_per_step": sum(comm_ops.values()) if comm_ops else None,
        "comm_op_seconds_per_step": comm_ops,
    }
    return {
        **point,
        "variant": variant,
        "world_size": world_size,
        "tokens_per_second": tokens_per_second,
        "tokens_per_cpu_second": tokens_per_second / world_size,
        "median_step_seconds": 0.5,
        "threads": 1,
        "optimizer": "DeepSpeedZeroOptimizer(FusedAdam)",
        "per_rank": [{**per_rank, "rank": rank} for rank in range(world_size)],
        "load_average_before": 1.0,
        "load_average_after": 1.5,
        "trial": 0,
    }


def test_expert_parallel_rows_report_the_all_to_all_and_a_dense_model_is_skipped():
    bench = load_benchmark()
    moe, dense = (
        {"model": m, "seq_len": 256, "micro_batch_size": 8, "checkpointing": False, "ranks": 2}
        for m in ("tiny-moe", "tiny-dense-2x.json")
    )
    ops = {"all_to_all_single": 0.1, "all_reduce": 0.05}
    trials = [
        fake_trial(moe, "plain", 1000.0, 1),
        fake_trial(moe, "ep2", 1500.0, 2, ops),
        fake_trial(dense, "plain", 2000.0, 1),
        {**dense, "variant": "ep2", "skipped": "tiny-dense-2x.json is dense: no experts to split over ranks"},
    ]
    shapes = {bench.point_label({**p, "ranks": 1}): (256, 4e7, 7_000_000) for p in (moe, dense)}
    estimates = {(p["model"], 2): {"per_variant": {}} for p in (moe, dense)}
    rows = bench.summarize(trials, [moe, dense], ["plain", "ep2"], estimates, shapes, None)
    ep2 = rows[1]
    assert ep2["ratio_to_plain"] == 1.5 and ep2["comm_seconds_per_step"] == pytest.approx(0.15)
    assert ep2["comm_fraction"] == pytest.approx(0.3) and ep2["comm_op_seconds_per_step"] == ops
    assert ep2["all_to_all_seconds_per_step"] == 0.1 and ep2["all_to_all_fraction"] == pytest.approx(0.2)
    assert rows[3]["skipped"].endswith("no experts to split over ranks") and "error" not in rows[3]
    lines = bench.table(rows)
    assert "| 1.500; 150.0 ms/step in collectives (30%), all-to-all 100.0 ms (20%) |" in lines[3]
    assert lines[5].startswith("| tiny-dense-2x.json T256 mb8 x2 | ep2 | skipped: tiny-dense-2x.json is dense")
    assert bench.memory_scaling(rows) == []  # (no 1-rank rows; the skipped one is not a measurement)
    [ratio] = bench.model_ratios(rows)  # the first model against the other, where both have a measurement
    assert (ratio["variant"], ratio["model"], ratio["other"], ratio["tokens_per_second_ratio"]) == (
        "plain", "tiny-moe", "tiny-dense-2x.json", 0.5,
    )  # fmt: skip
    markdown = sys.modules["throughput_report"].markdown(
        {
            "date": "2026-11-30T10:00:00",
            "command": "benchmarks/throughput.py --expert-parallel 2",
            "git_revision": "abc",
            "versions": {},
            "hardware": {"cpu": "CPU", "cores": 2, "slug": "cpu-2c"},
            "settings": {
                "model_overrides": {},
                "steps": 8,
                "warmup_steps": 2,
                "repeats": 1,
                "precision": "fp32",
                "data": "data",
                "models": {
                    "tiny-moe": {"parameters": 11_540_736, "active_parameters": 7_215_360},
                    "tiny-dense-2x.json": {"parameters": 7_211_264, "active_parameters": 7_211_264},
                },
            },
            "rows": rows,
            "memory_scaling": [],
            "model_ratios": [ratio],
            "trials": trials,
            "ds_estimates": {},
        }
    )
    models = "- models: `tiny-moe` 11,540,736 parameters (7,215,360 active per token); `tiny-dense-2x.json` 7,211,264"
    assert models + " parameters\n" in markdown
    assert "- epN: the experts of every sparse block split over N" in markdown and "- spN:" not in markdown
    assert "by op, slowest rank: tiny-moe T256 mb8 x2 ep2 all_reduce 50.0 ms, all_to_all_single 100.0 ms" in markdown
    assert "`tiny-moe` vs `tiny-dense-2x.json` * T256 mb8 x2 plain: 0.500 s vs 0.500 s a step, 0.500x" in markdown
    assert "failed" not in markdown  # a skip is no failure


def test_plan_predictions_of_the_new_variants():
    from dsllm.model_config import resolve_model_config
    from dsllm.plan import GPU, plan

    bench = load_benchmark()
    model = resolve_model_config("tiny-moe")
    point = {"model": "tiny-moe", "seq_len": 256, "micro_batch_size": 8, "checkpointing": False, "ranks": 2}
    planned = plan(model, 2, GPU("H200", 140.4, 989.0), micro_batch=8, seq_len=256, host_ram_gib=1e6, expert_parallel=2)
    zero1 = next(r for r in planned["configs"] if r["config"] == "zero1")["no_checkpointing"]["gib_per_gpu"]
    assert bench.plan_prediction(model, point, "ep2") == pytest.approx(zero1, rel=1e-12)  # `dsllm plan`'s own
    assert bench.plan_prediction(model, point, "ep2") < bench.plan_prediction(model, point, "zero1")
    assert bench.plan_prediction(resolve_model_config("tiny"), point, "sp2") is None  # plan has no Ulysses model
