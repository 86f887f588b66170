"""Context extension, the README's recipe: pretrain a Llama-shaped model at 64 tokens, start a run from its weights
(`--init`) with YaRN over 4x the context at 256 tokens, export it, and transformers' LlamaForCausalLM gives the
same logits on 256-token rows."""

import json

import pytest
from runs import SMALL_MODEL, exported_logit_diff, pretrain, train_records

LLAMA = (*SMALL_MODEL, "--model.tie_embeddings", "false")  # RoPE, RMSNorm, SwiGLU, GQA, untied: LlamaForCausalLM
QUIET = ("--sample-tokens", 0, "--eval-windows", 4)
EXTEND = (
    "--model.rope_scaling",
    "yarn",
    "--model.rope_scaling_factor",
    4,
    "--model.rope_original_max_seq_len",
    64,
    "--model.max_seq_len",
    256,
    "--seq-len",
    256,
    "--micro-batch-size",
    2,
    "--max-steps",
    4,
    "--lr",
    "1e-3",
    *QUIET,
)


@pytest.mark.slow  # about 30 s on 2 CPU cores: three short runs and an export
def test_train_at_64_then_extend_to_256_with_yarn(dataset_dir, tmp_path):
    base, extended = tmp_path / "base", tmp_path / "extended"
    pretrain(dataset_dir, base, "--seq-len", 64, "--micro-batch-size", 8, "--max-steps", 30, *QUIET, model=LLAMA)
    proc = pretrain(dataset_dir, extended, "--init", base, *EXTEND, model=())
    assert f"starting from the weights of {base}, with a fresh optimizer and schedule" in proc.stdout
    record = json.loads((extended / "config.json").read_text())
    assert record["train"]["init"] == str(base) and record["run"]["seq_len"] == 256
    assert {k: record["model"][k] for k in ("rope_scaling", "rope_scaling_factor", "max_seq_len")} == {
        "rope_scaling": "yarn",
        "rope_scaling_factor": 4.0,
        "max_seq_len": 256,
    }
    # the first step of the extended run already has the trained model's loss, far below a fresh model's
    fresh, trained, first = train_records(base)[1]["loss"], train_records(base)[30]["loss"], train_records(extended)
    assert sorted(first) == [1, 2, 3, 4] and first[1]["loss"] < fresh - 1.5, (fresh, trained, first[1]["loss"])

    assert exported_logit_diff(extended, tmp_path / "hf", seq_len=256) < 1e-4
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"] and hf_config["max_position_embeddings"] == 256
    assert hf_config["rope_parameters"] == {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    }

    # the same command again resumes the run's own checkpoint (at its last step), not the weights of --init
    again = pretrain(dataset_dir, extended, "--init", base, *EXTEND, model=())
    assert "resumed from" in again.stdout and "at step 4 " in again.stdout and "starting from" not in again.stdout
