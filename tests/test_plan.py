"""python -m dsllm plan: DeepSpeed's estimators for model states, activations, the fitting config, the largest
micro batch, the Chinchilla budget; bad input is one line and exit 2."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from dsllm.model_config import resolve_model_config
from dsllm.plan import activation_gib, model_for, parse_gpus


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


def test_plan_gpt2_on_eight_a100s():
    result = json.loads(plan("--model", "gpt2-124m", "--gpus", "8xA100-80GB", "--json").stdout)
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
    assert result["recommended"] == "zero0"  # everything fits: the fastest config
    assert result["chinchilla_tokens"] == 20 * params
    flops = 6 * params + 12 * 12 * 768 * 1024
    assert result["tokens_per_second"] == pytest.approx(0.4 * 312e12 * 8 / flops)
    assert result["chinchilla_days"] == pytest.approx(20 * params / result["tokens_per_second"] / 86400)
    text = plan("--model", "gpt2-124m", "--gpus", "8xA100-80GB").stdout
    assert "recommended: zero0.json" in text and "Chinchilla budget 2.5B tokens" in text


def test_seven_billion_on_one_4090_needs_offload():
    result = json.loads(plan("--model", "llama-7b", "--gpus", "4090", "--seq-len", "2048", "--json").stdout)
    fits = {r["config"]: r["no_checkpointing"]["fits"] or r["checkpointing"]["fits"] for r in result["configs"]}
    assert not any(fits[c] for c in ("zero0", "zero1", "zero2", "zero3")) and fits["zero3_offload"]
    assert result["recommended"] in ("zero2_offload", "zero3_offload") and result["gpus_per_node"] == 1
    offload = next(r for r in result["configs"] if r["config"] == "zero3_offload")
    assert offload["host_gib_per_node"] > 100  # the optimizer states moved to host memory


def test_parameter_counts_become_llama_shapes():
    for spec, target in (("1.3e9", 1.3e9), ("7B", 7e9), ("350M", 3.5e8)):
        model = model_for(spec)
        assert abs(model.num_parameters() / target - 1) < 0.1, (spec, model.num_parameters())
        assert model.positions == "rope" and model.mlp == "swiglu"
    assert parse_gpus("8xA100-80GB") == (8, "A100-80GB") and parse_gpus("h100") == (1, "H100-SXM")
    assert parse_gpus("4X4090") == (4, "4090")


def test_activations_scale_with_batch_and_sequence():
    model = resolve_model_config("gpt2-124m")
    one = activation_gib(model, 1, 1024, False)
    assert activation_gib(model, 2, 1024, False) == pytest.approx(2 * one)
    sbh = 1024 * 768  # checkpointing keeps each block's input (2 bytes) and recomputes one block (34 bytes)
    saved = (12 * 34 - (12 * 2 + 34)) * sbh / 2**30
    assert activation_gib(model, 1, 1024, True) == pytest.approx(one - saved)
    logits = 1024 * model.vocab_size * (2 + 4 + 4) / 2**30  # bf16 logits, the fp32 copy for the loss, its gradient
    assert one == pytest.approx(12 * 34 * sbh / 2**30 + logits)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "gpt2-124m", "--gpus", "8xV100"], "--gpus '8xV100': unknown GPU kind"),
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
