"""The GPU suite's CPU side: benchmarks/gpu_suite.sh and gpu_check.py stop with one line without CUDA (and write
nothing else), gpu_check's rehearsal names the SDPA op our Attention dispatches to, export_parity.py passes an
export and fails a wrong one, and throughput's memory prediction is `dsllm plan`'s own."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_user_error

from dsllm.export import export_hf
from dsllm.model import GPT
from dsllm.model_config import ModelConfig, resolve_model_config
from dsllm.model_dir import save_model_dir

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA answers")


def run(*argv, **env):
    return subprocess.run([*argv], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_suite_without_cuda_stops_at_once_with_one_line(tmp_path):
    proc = run("bash", "benchmarks/gpu_suite.sh", str(tmp_path / "results"), PYTHON=sys.executable)
    assert_user_error(proc, "no CUDA device here (torch", "run it on a GPU machine, or benchmarks/cpu_suite.sh")
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["gpu_suite.log"]


def test_gpu_check_without_cuda_and_its_cpu_rehearsal(tmp_path):
    assert_user_error(run(sys.executable, "benchmarks/gpu_check.py"), "no CUDA device", "cpu_suite.sh")
    proc = run(sys.executable, "benchmarks/gpu_check.py", "--allow-cpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["versions"]["torch"] == torch.__version__ and report["matmul_bf16_tflops"] > 0
    cases = report["attention"]
    assert len(cases) == 3 and [c["mask"] for c in cases.values()] == [False, False, True]
    for case in cases.values():  # the op SDPA dispatched to, read off the profiler: CPU has its own flash kernel
        assert case["backend"] == "flash", case
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in case["aten_ops"]
    assert cases["llama (GQA, RoPE, causal)"]["kv_heads"] < cases["llama (GQA, RoPE, causal)"]["heads"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir):
    """A random llama-shaped model folder and its Hugging Face export; a second export of another model."""
    root = tmp_path_factory.mktemp("parity")
    fields = dict(vocab_size=300, max_seq_len=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, mlp_multiple_of=32)
    fields |= dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    for seed, name in ((0, "run"), (1, "other")):
        torch.manual_seed(seed)
        model = GPT(ModelConfig(**fields)).eval()
        save_model_dir(model, root / name, tokenizer_dir / "tokenizer.json")
        export_hf(model, tokenizer_dir / "tokenizer.json", root / f"{name}-hf")
    return root


def test_export_parity_passes_an_export_and_fails_another_models(exported, tmp_path):
    parity = [sys.executable, "benchmarks/export_parity.py", "--checkpoint", str(exported / "run"), "--seq-len", "32"]
    proc = run(*parity, "--hf", str(exported / "run-hf"), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "export_parity.json").read_text())
    assert result["fp32_max_abs_diff"] < 1e-4 and result["greedy_tokens_equal"] and result["ok"]
    wrong = run(*parity, "--hf", str(exported / "other-hf"))
    assert wrong.returncode == 1 and json.loads(wrong.stdout.splitlines()[-1])["fp32_max_abs_diff"] > 1e-2
    assert_user_error(run(*parity, "--hf", str(tmp_path)), "no config.json there")


@pytest.mark.parametrize("variant, config", [("plain", "zero0"), ("zero1+compile", "zero1"), ("zero3", "zero3")])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_throughput_memory_prediction_is_plans(variant, config, checkpointing):
    from dsllm.plan import GPU, plan

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from throughput_report import plan_prediction
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    model = resolve_model_config("gpt2-124m")
    point = {"model": "gpt2-124m", "seq_len": 1024, "micro_batch_size": 16, "checkpointing": checkpointing, "ranks": 1}
    planned = plan(model, 1, GPU("H200", 140.4, 989.0), micro_batch=16, seq_len=1024, host_ram_gib=1e6)
    row = next(r for r in planned["configs"] if r["config"] == config)
    column = row["checkpointing" if checkpointing else "no_checkpointing"]
    assert plan_prediction(model, point, variant) == pytest.approx(column["gib_per_gpu"], rel=1e-12)
