"""Pre-flight: every mismatch between data, model and DeepSpeed JSON is one line naming the field and
the fix, exit 2, before any rank starts work (nothing is written to --out); under the launcher with two ranks
in tests/e2e/test_preflight_runs.py."""

import subprocess

import pytest
from conftest import ROOT
from runs import SMALL_MODEL, VENV_BIN, env, write_ds

from dsllm.pretrain import main


def run_main(capsys, tmp_path, dataset_dir, *args, ds=None):
    out = tmp_path / "out"
    argv = [
        "--ds_config",
        str(ds or ROOT / "ds_configs" / "zero2.json"),
        "--data",
        str(dataset_dir),
        "--out",
        str(out),
        *SMALL_MODEL,
        "--seq-len",
        "32",
        *map(str, args),
    ]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert not out.exists()
    return err[0]


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("missing_json", ["--ds_config", "nope.json: no such file"]),
        ("bad_json", ["bad.json:1:", "invalid JSON"]),
        (
            "batch",
            [
                "batch arithmetic: train_batch_size 10 != train_micro_batch_size_per_gpu 4 x "
                "gradient_accumulation_steps 1 x data-parallel world size 1"
            ],
        ),
        ("cli_vs_json", ["--micro-batch-size 2 contradicts train_micro_batch_size_per_gpu = 4"]),
        ("offload_param_stage2", ["offload_param needs stage 3", "zero3_offload.json"]),
        ("offload_optimizer_stage0", ["offload_optimizer needs stage 1, 2 or 3"]),
        ("offload_sgd", ["optimizer.type", "CPU Adam"]),
        ("fp16_cpu", ["fp16 is not supported on CPU", "use bf16 or fp32"]),
        ("precision_vs_json", ["--precision bf16 contradicts", "sets fp32"]),
        ("auto_unsupported", ['"auto" is not supported for zero_optimization.allgather_bucket_size']),
    ],
)
def test_deepspeed_json_errors(capsys, tmp_path, dataset_dir, case, fragments):
    args, ds = [], None
    if case == "missing_json":
        ds = tmp_path / "nope.json"
    elif case == "bad_json":
        ds = tmp_path / "bad.json"
        ds.write_text('{"train_batch_size": 8,,}')
    elif case == "batch":
        ds = write_ds(tmp_path, train_batch_size=10, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1)
    elif case == "cli_vs_json":
        ds, args = write_ds(tmp_path, train_micro_batch_size_per_gpu=4), ["--micro-batch-size", 2]
    elif case == "offload_param_stage2":
        ds = write_ds(tmp_path, zero_optimization__offload_param={"device": "cpu"})
    elif case == "offload_optimizer_stage0":
        ds = write_ds(tmp_path, zero_optimization={"stage": 0, "offload_optimizer": {"device": "cpu"}})
    elif case == "offload_sgd":
        ds = write_ds(
            tmp_path,
            zero_optimization__offload_optimizer={"device": "cpu"},
            optimizer={"type": "SGD", "params": {"lr": 0.1}},
        )
    elif case == "fp16_cpu":
        args = ["--precision", "fp16"]
    elif case == "precision_vs_json":
        ds, args = write_ds(tmp_path, bf16={"enabled": False}, fp16={"enabled": False}), ["--precision", "bf16"]
    else:
        ds = write_ds(tmp_path, zero_optimization__allgather_bucket_size="auto")
    line = run_main(capsys, tmp_path, dataset_dir, *args, ds=ds)
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--model", "gpt5"], ["--model 'gpt5': unknown preset"]),
        (["--model.n_layer", "3"], ["--model.n_layer: unknown model field"]),
        (["--model.vocab_size", "100"], ["--model.vocab_size 100 is smaller than the dataset's vocabulary (300)"]),
        (["--seq-len", "100"], ["seq_len 100 is longer than model.max_seq_len = 64", "--seq-len 64"]),
        (["--model.n_kv_heads", "3"], ["model.n_kv_heads = 3 does not divide model.n_heads = 4"]),
        (["--max-steps", "0"], ["--max-steps 0: must be 1 or more"]),
        (["--resume", "/nowhere"], ["--resume /nowhere: no complete checkpoint there"]),
    ],
)
def test_model_and_run_errors(capsys, tmp_path, dataset_dir, args, fragments):
    line = run_main(capsys, tmp_path, dataset_dir, *args)
    for fragment in fragments:
        assert fragment in line, line


def test_data_errors(capsys, tmp_path, dataset_dir):
    line = run_main(capsys, tmp_path, tmp_path / "absent")
    assert "not a prepared dataset (no meta.json)" in line
    sequence_too_long = run_main(capsys, tmp_path, dataset_dir, "--model.max_seq_len", "100000", "--seq-len", "99999")
    assert "the train split has" in sequence_too_long and "use a shorter --seq-len" in sequence_too_long


def test_init_takes_the_trained_model_and_its_weights(tmp_path, dataset_dir):
    """--init: the model of the folder with the overrides its weights allow (one equal to the trained value is
    harmless), and its weights checked in pre-flight, then read by the names of the run's model."""
    import torch

    from dsllm.model import GPT
    from dsllm.model_config import ModelConfig
    from dsllm.model_dir import save_model_dir
    from dsllm.pretrain import preflight
    from dsllm.train_config import TrainConfig
    from dsllm.world import World

    shape = dict(vocab_size=320, max_seq_len=64, n_layers=1, d_model=32, n_heads=2, positions="rope", norm="rmsnorm")
    trained = GPT(ModelConfig(**shape, mlp="swiglu", mlp_multiple_of=32, bias=False, tie_embeddings=False))
    save_model_dir(trained, tmp_path / "base", dataset_dir / "tokenizer.json")
    extend = {"rope_scaling": "yarn", "rope_scaling_factor": "4", "rope_original_max_seq_len": "64"}
    config = TrainConfig(
        ds_config=str(ROOT / "ds_configs" / "zero2.json"),
        data=str(dataset_dir),
        out=str(tmp_path / "extended"),
        init=str(tmp_path / "base"),
        model_overrides={**extend, "max_seq_len": "256", "n_layers": "1", "dropout": "0.1"},
        seq_len=128,
    )
    plan = preflight(config, World(rank=0, local_rank=0, size=1))
    changed = {k: v for k, v in plan.spec.model.to_dict().items() if v != trained.config.to_dict()[k]}
    assert changed == {
        "rope_scaling": "yarn",
        "rope_scaling_factor": 4.0,
        "rope_original_max_seq_len": 64,
        "max_seq_len": 256,
        "dropout": 0.1,
    }
    model = GPT(plan.spec.model, seed=plan.init_weights)  # each parameter's value read by its name
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())
    assert not (tmp_path / "extended").exists()


def test_plain_python_exit_code_and_help():
    proc = subprocess.run(
        ["python", "launch/pretrain.py", "--ds_config", "ds_configs/zero2.json", "--model", "gpt5"],
        cwd=ROOT,
        env={**env(), "PATH": f"{VENV_BIN}:{env()['PATH']}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --model 'gpt5': unknown preset; use one of tiny, gpt2-124m, gpt2-350m, gpt2-774m, gpt2-1.5b, "
        "llama-125m, llama-350m, llama-1.3b, llama-3b, llama-7b, tiny-moe, mixtral-8x7b or a JSON file"
    ]
    help_text = subprocess.run(
        ["python", "launch/pretrain.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**env(), "PATH": f"{VENV_BIN}:{env()['PATH']}"},
    ).stdout
    assert "--ds_config" in help_text and "--max-steps" in help_text and "--model.FIELD" in help_text
