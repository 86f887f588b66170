"""python -m dsllm plan: DeepSpeed's estimators for model states (GPU and host), activations, the fitting config with
its margin, the largest micro batch, the GPU table, the Chinchilla budget; bad input is one line and exit 2."""

import io
import json
import math
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from conftest import ROOT

from dsllm import plan as plan_module
from dsllm import plan_layouts
from dsllm.errors import run_cli
from dsllm.metrics import GPU_KINDS, gpu_kind_of, peak_tflops
from dsllm.model_config import resolve_model_config
from dsllm.plan import GPU, activation_gib, model_for, parse_gpus


def plan(*args, expect=0):
    proc = subprocess.run(
        [sys.executable, "-m", "dsllm", "plan", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert proc.returncode == expect, proc.stderr
    return proc


def plan_here(*args) -> str:
    """stdout of `python -m dsllm plan ARGS` run in this process (DeepSpeed's import is paid once)."""
    out = io.StringIO()
    with redirect_stdout(out):
        assert run_cli(plan_module.main, list(args)) == 0
    return out.getvalue()


def rows_of(result: dict) -> dict:
    return {r["config"]: r for r in result["configs"]}


def test_plan_gpt2_on_eight_a100s():
    result = json.loads(plan("--model", "gpt2-124m", "--gpus", "8xA100-80GB", "--host-ram-gib", "64", "--json").stdout)
    params = 124_439_808
    assert result["parameters"] == params and result["seq_len"] == 1024 and result["gpus_per_node"] == 8
    rows = {r["config"]: r for r in result["configs"]}
    # DeepSpeed's ZeRO-2 formula: 2 bytes of 16-bit params + 18 bytes of grads/master/Adam over the 8 GPUs
    assert rows["zero2"]["model_states_gib"] == pytest.approx((2 * params + int(18 * params / 8)) / 2**30)
    assert rows["zero0"]["model_states_gib"] == pytest.approx(20 * params / 2**30, rel=1e-6)
    assert rows["zero2_offload"]["model_states_gib"] == pytest.approx(2 * params / 2**30)
    assert rows["zero0"]["model_states_gib"] > rows["zero2"]["model_states_gib"] > rows["zero3"]["model_states_gib"]
    for row in rows.values():  # checkpointing keeps less, so more samples fit
        assert row["checkpointing"]["gib_per_gpu"] < row["no_checkpointing"]["gib_per_gpu"]
        assert row["checkpointing"]["largest_micro_batch"] > row["no_checkpointing"]["largest_micro_batch"] > 1
    assert result["recommended"]["config"] == "zero0"  # everything fits: the fastest config, without checkpointing
    assert result["recommended"]["activation_checkpointing"] is False and result["too_tight"] == []
    # the largest micro batch leaves the 5% headroom: (usable - headroom - states) / activations of one sample
    usable = 80.0 - 2.5
    per_sample = activation_gib(resolve_model_config("gpt2-124m"), 1, 1024, False)
    largest = math.floor((0.95 * usable - rows["zero0"]["model_states_gib"]) / per_sample)
    assert rows["zero0"]["no_checkpointing"]["largest_micro_batch"] == largest == 91
    assert result["chinchilla_tokens"] == 20 * params
    flops = 6 * params + 12 * 12 * 768 * 1024
    assert result["tokens_per_second"] == pytest.approx(0.4 * 312e12 * 8 / flops)
    assert result["chinchilla_days"] == pytest.approx(20 * params / result["tokens_per_second"] / 86400)
    text = plan("--model", "gpt2-124m", "--gpus", "8xA100-80GB", "--host-ram-gib", "64").stdout
    assert "recommended: zero0.json, micro batch up to 91 (the first config that fits" in text
    assert "host 5.6 of 64.0 GiB per node" in text and "Chinchilla budget 2.5B tokens" in text


def test_seven_billion_on_one_4090_needs_offload():
    result = json.loads(
        plan_here("--model", "llama-7b", "--gpus", "4090", "--seq-len", "2048", "--host-ram-gib", "256", "--json")
    )
    fits = {r["config"]: r["no_checkpointing"]["fits"] or r["checkpointing"]["fits"] for r in result["configs"]}
    assert not any(fits[c] for c in ("zero0", "zero1", "zero2", "zero3")) and fits["zero3_offload"]
    assert result["recommended"]["config"] == "zero2_offload" and result["gpus_per_node"] == 1
    assert result["recommended"]["activation_checkpointing"] is True  # 22.6 GiB without: over the 21.5 usable
    offload = next(r for r in result["configs"] if r["config"] == "zero3_offload")
    assert offload["host_gib_per_node"] > 100  # the optimizer states moved to host memory


def test_parameter_counts_become_llama_shapes():
    for spec, target in (("1.3e9", 1.3e9), ("7B", 7e9), ("350M", 3.5e8)):
        model = model_for(spec)
        assert abs(model.num_parameters() / target - 1) < 0.1, (spec, model.num_parameters())
        assert model.positions == "rope" and model.mlp == "swiglu"


def test_activations_scale_with_batch_and_sequence():
    model = resolve_model_config("gpt2-124m")
    one = activation_gib(model, 1, 1024, False)
    assert activation_gib(model, 2, 1024, False) == pytest.approx(2 * one)
    sbh = 1024 * 768  # checkpointing keeps each block's input (2 bytes) and recomputes one block (34 bytes)
    saved = (12 * 34 - (12 * 2 + 34)) * sbh / 2**30
    assert activation_gib(model, 1, 1024, True) == pytest.approx(one - saved)
    logits = 1024 * model.vocab_size * (2 + 4 + 4) / 2**30  # bf16 logits, the fp32 copy for the loss, its gradient
    assert one == pytest.approx(12 * 34 * sbh / 2**30 + logits)


def test_only_the_checkpointed_column_fits_so_the_recommendation_says_checkpointing():
    """7B on 8x4090: ZeRO-3 fits only with activation checkpointing; the recommendation names it and its flag."""
    text = plan_here("--model", "llama-7b", "--gpus", "8x4090", "--host-ram-gib", "512")
    assert (
        "recommended: zero3.json with activation checkpointing (--model.activation_checkpointing deepspeed), "
        "micro batch up to 1 (the first config that fits, in order of speed)"
    ) in text
    assert "at micro batch 1: 18.4 of 21.5 usable GiB per GPU, 3.1 GiB spare; host 5.9 of 512.0 GiB per node" in text
    assert "zero3                15.7           5.9   yes       33.9    no       0       18.4   yes       1" in text
    result = json.loads(plan_here("--model", "llama-7b", "--gpus", "8x4090", "--host-ram-gib", "512", "--json"))
    zero3 = rows_of(result)["zero3"]
    assert not zero3["no_checkpointing"]["fits"] and zero3["checkpointing"]["fits"]
    assert result["recommended"] == {"config": "zero3", "activation_checkpointing": True, **zero3["checkpointing"]} | {
        "host_gib_per_node": zero3["host_gib_per_node"]
    }


def test_a_few_hundred_mib_to_spare_is_too_tight_to_count():
    """7B on one H200: ZeRO-0/1/2 with checkpointing leave 0.3 GiB of 137.9 usable, under the 5% (6.9 GiB) headroom;
    ZeRO-3 with checkpointing (13.3 GiB spare) is recommended, and the near misses are named with their margin."""
    result = json.loads(plan_here("--model", "llama-7b", "--gpus", "H200", "--host-ram-gib", "1024", "--json"))
    assert result["usable_gib"] == pytest.approx(137.9) and result["headroom_gib"] == pytest.approx(0.05 * 137.9)
    zero0 = rows_of(result)["zero0"]["checkpointing"]
    assert 0 < zero0["spare_gib"] < 0.5 and not zero0["fits"] and zero0["largest_micro_batch"] == 0
    assert [(t["config"], t["activation_checkpointing"]) for t in result["too_tight"]] == [
        ("zero0", True),
        ("zero1", True),
        ("zero2", True),
    ]
    assert result["recommended"]["config"] == "zero3" and result["recommended"]["activation_checkpointing"]
    assert result["recommended"]["spare_gib"] == pytest.approx(13.3, abs=0.05)
    text = plan_here("--model", "llama-7b", "--gpus", "H200", "--host-ram-gib", "1024")
    assert "recommended: zero3.json with activation checkpointing" in text
    assert (
        "too tight: zero0, zero1, zero2 with activation checkpointing leave 0.3 GiB spare per GPU, under the "
        "6.9 GiB (5%) a config needs to count as fitting"
    ) in text
    assert "a config fits with at least 6.9 GiB (5%) spare per GPU" in text


def test_host_memory_is_checked():
    """Offload keeps the optimizer states in host memory: 13B with ZeRO-2 offload on 2 nodes x 8 GPUs needs DeepSpeed's
    64 bytes x 1.5 per parameter per node (1,154 GiB), which 1 TiB nodes do not have."""
    result = json.loads(
        plan_here("--model", "13B", "--gpus", "8x4090", "--nodes", "2", "--host-ram-gib", "1024", "--json")
    )
    rows = rows_of(result)
    params = result["parameters"]
    assert rows["zero2_offload"]["host_gib_per_node"] == pytest.approx(params * 64 * 1.5 / 2**30)
    assert rows["zero2_offload"]["host_gib_per_node"] == pytest.approx(1154.5, abs=0.05)
    assert not rows["zero2_offload"]["host_fits"] and rows["zero3_offload"]["host_fits"]  # 577 GiB: 4 x 8 x 1.5
    # one GPU: only offload fits the GPU, and its host memory does not fit 256 GiB: nothing is recommended
    result = json.loads(plan_here("--model", "13B", "--gpus", "4090", "--host-ram-gib", "256", "--json"))
    offload = rows_of(result)["zero3_offload"]
    assert offload["checkpointing"]["fits"] and not offload["host_fits"] and result["recommended"] is None
    text = plan_here("--model", "13B", "--gpus", "4090", "--host-ram-gib", "256")
    assert (
        "recommended: none fits: zero3_offload fits the GPUs but needs 324.7 GiB of host memory per node, more than "
        "256.0 GiB (--host-ram-gib)"
    ) in text
    assert "zero3_offload         0.5         324.7    no" in text
    # with enough host memory the same plan fits
    assert json.loads(plan_here("--model", "13B", "--gpus", "4090", "--host-ram-gib", "400", "--json"))["recommended"]


def test_host_memory_defaults_to_this_machines(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       33554432 kB\nMemFree:        1000 kB\n")  # 32 GiB
    monkeypatch.setattr(plan_module, "MEMINFO", meminfo)
    result = json.loads(plan_here("--model", "llama-1.3b", "--gpus", "8xA100", "--json"))
    assert result["host_ram_gib"] == 32.0 and "this machine" in result["host_ram_source"]
    assert not rows_of(result)["zero0"]["host_fits"]  # 8 ranks x fp32 copy x 1.5 = 56 GiB
    text = plan_here("--model", "llama-1.3b", "--gpus", "8xA100")
    assert f"host memory 32.0 GiB per node (this machine's {meminfo}; --host-ram-gib for others)" in text
    monkeypatch.setattr(plan_module, "MEMINFO", tmp_path / "absent")  # not Linux: the physical page count
    real = float(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) / 2**20
    assert plan_module.this_machine_ram_gib() == pytest.approx(real, rel=0.01)


def test_gpu_table_and_your_own_gpu():
    expected = {  # total GiB, dense bf16 TFLOPS
        "A10": (22.5, 125.0),
        "A40": (45.0, 149.7),
        "L4": (22.5, 121.0),
        "L40S": (45.0, 362.0),
        "A100-40GB": (40.0, 312.0),
        "A100-80GB": (80.0, 312.0),
        "H100-PCIe": (79.6, 756.0),
        "H100-SXM": (79.6, 989.0),
        "H200": (140.4, 989.0),
        "B200": (179.1, 2250.0),
        "RTX3090": (24.0, 71.0),
        "RTX4090": (24.0, 165.2),
        "RTX5090": (31.8, 209.5),
        "MI250X": (64.0, 191.5),
        "MI300X": (191.7, 1307.4),
    }
    for kind, (memory, peak) in expected.items():
        assert parse_gpus(f"2x{kind}") == (2, GPU(kind, memory, peak)), kind
    assert parse_gpus("8xA100-80GB")[1].name == "A100-80GB" and parse_gpus("h100") == (1, GPU("H100-SXM", 79.6, 989.0))
    assert parse_gpus("4X4090")[0] == 4 and parse_gpus("rtx-4090")[1].name == "RTX4090"
    # your own GPU: both values; or one value overriding a known kind's
    assert parse_gpus("8xMYGPU", 96.0, 400.0) == (8, GPU("MYGPU", 96.0, 400.0))
    assert parse_gpus("A100", 40.0, None) == (1, GPU("A100-80GB", 40.0, 312.0))
    result = json.loads(
        plan_here(
            "--model",
            "gpt2-124m",
            "--gpus",
            "4xMYGPU",
            "--gpu-memory-gib",
            "96",
            "--peak-tflops",
            "400",
            "--host-ram-gib",
            "64",
            "--json",
        )
    )
    assert result["gpu"] == "MYGPU" and result["usable_gib"] == 93.5
    flops = 6 * result["parameters"] + 12 * 12 * 768 * 1024
    assert result["tokens_per_second"] == pytest.approx(0.4 * 400e12 * 4 / flops)
    # the trainer's MFU reads the same table by the name torch reports
    names = {
        "NVIDIA A100-SXM4-40GB": "A100-40GB",
        "NVIDIA A100 80GB PCIe": "A100-80GB",
        "NVIDIA H100 80GB HBM3": "H100-SXM",
        "NVIDIA H100 PCIe": "H100-PCIe",
        "NVIDIA H100 NVL": "H100-NVL",
        "NVIDIA H200": "H200",
        "NVIDIA B200": "B200",
        "NVIDIA A10": "A10",
        "NVIDIA L4": "L4",
        "NVIDIA L40S": "L40S",
        "NVIDIA GeForce RTX 4090": "RTX4090",
        "AMD Instinct MI250X/MI250": "MI250X",
        "AMD Instinct MI300X": "MI300X",
        "NVIDIA A10G": None,  # not "A10": a different part
        "NVIDIA GH200 480GB": None,
    }
    assert {name: gpu_kind_of(name) for name in names} == names
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("Tesla V100-SXM2-16GB") is None
    help_text = plan("--help").stdout
    for kind, gpu in GPU_KINDS.items():
        assert f"  {kind:<10} {gpu.memory_gib:>6.1f} GiB" in help_text, kind
    assert "llama-7b" in help_text and "--gpu-memory-gib" in help_text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "gpt2-124m", "--gpus", "8xV100"], "unknown GPU kind 'V100'; use one of A10, A40"),
        (["--model", "gpt2-124m", "--gpus", "8xV100", "--peak-tflops", "125"], "give its --gpu-memory-gib and"),
        (
            ["--model", "gpt2-124m", "--gpus", "8xV100", "--gpu-memory-gib", "2", "--peak-tflops", "1"],
            "not above the 2.5",
        ),
        (["--model", "gpt2-124m", "--gpus", "A100", "--host-ram-gib", "0"], "--host-ram-gib 0: must be above 0"),
        (["--model", "gpt2-124m", "--gpus", "A100", "--host-ram-gib", "nan"], "not a finite number"),
        (["--model", "gpt2-124m", "--gpus", "8 x"], "expected COUNTxKIND"),
        (["--model", "gpt2-124m", "--gpus", "0xA100"], "the count must be 1 or more"),
        (["--model", "gpt9", "--gpus", "A100"], "unknown preset"),
        (["--model", "1000", "--gpus", "A100"], "below 1M"),
        (["--model", "gpt2-124m", "--gpus", "A100", "--seq-len", "4096"], "4096"),
        (["--model", "gpt2-124m", "--gpus", "A100", "--mfu", "2"], "--mfu 2.0: must be in (0, 1]"),
        (["--model", "gpt2-124m"], "--gpus"),
    ],
)
def test_bad_input_is_one_line(args, message):
    proc = plan(*args, expect=2)
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_layouts_over_pcie_prefer_pipeline_stages_and_over_nvlink_tensor_parallelism():
    """llama-7B on 2 nodes of 8 x RTX 4090: ZeRO-0/1/2 do not fit; over PCIe the recommendation is 2 pipeline
    stages x 8 replicas (with activation checkpointing), over NVLink tensor parallelism inside the node."""
    args = ("--model", "llama-7b", "--gpus", "8x4090", "--nodes", "2", "--host-ram-gib", "512")
    result = json.loads(plan_here(*args, "--json"))
    assert result["interconnect"] == "pcie" and result["recommended"]["config"] == "zero3"
    best = result["recommended_layout"]
    assert (best["kind"], best["pipeline_parallel"], best["data_parallel"], best["config"]) == (
        "pipeline",
        2,
        8,
        "zero1",
    )
    assert best["activation_checkpointing"] is True and best["fits"]
    kinds = {(r["tensor_parallel"], r["pipeline_parallel"]) for r in result["layouts"]}
    assert {(2, 1), (4, 1), (8, 1), (1, 2), (1, 16)} <= kinds and not any(t > 8 for t, _ in kinds)  # TP in a node
    text = plan_here(*args)
    assert "layout: --pipeline-parallel 2 (2 stages x 8 data-parallel) with ds_configs/zero1.json and " in text
    assert "--grad-accum 8 or more (1F1B bubble (P-1)/(M+P-1) = 11% at M = 8)" in text
    nvlink = json.loads(plan_here(*args, "--interconnect", "nvlink", "--json"))["recommended_layout"]
    assert (nvlink["kind"], nvlink["tensor_parallel"], nvlink["data_parallel"]) == ("tensor", 2, 8)
    small = json.loads(plan_here("--model", "gpt2-124m", "--gpus", "8xA100", "--host-ram-gib", "64", "--json"))
    assert small["recommended_layout"] == {
        "kind": "data",
        "tensor_parallel": 1,
        "pipeline_parallel": 1,
        "config": "zero0",
    }


def test_layout_memory_splits_what_each_layout_splits():
    model = resolve_model_config("llama-1.3b")
    plain_states, plain = plan_layouts.layout_gib(model, 1, 1, 8, 1, 2048, False)
    assert plain == pytest.approx(activation_gib(model, 1, 2048, False))  # one way: the data-parallel estimate
    states, activations = plan_layouts.layout_gib(model, 2, 1, 4, 1, 2048, False)
    sbh = 2048 * model.d_model
    logits = 2048 * model.vocab_size * 10 / 2**30
    assert activations == pytest.approx(model.n_layers * 22 * sbh / 2**30 + logits / 2)  # 10 + 24/2 per block
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    half = estimate_zero2_model_states_mem_needs(model.num_parameters() // 2, 4, 1, cpu_offload=False)[1]
    assert states == pytest.approx(half / 2**30, rel=1e-6) and states < plain_states
    # a pipeline's first stage keeps P micro batches of its L/P blocks in flight: the whole model's activations
    _, first = plan_layouts.layout_gib(model, 1, 4, 2, 1, 2048, False)
    assert first == pytest.approx(model.n_layers * 34 * sbh / 2**30)
