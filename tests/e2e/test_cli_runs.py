"""One command line, run for real: a recipe sets a run and the command line overrides it, and --max-time stops
at a step boundary with a checkpoint that the next run resumes (the parsing is in tests/unit/test_cli.py)."""

import json

import yaml
from runs import dsllm, pretrain, train_records


def test_a_recipe_sets_the_run_and_the_command_line_overrides_it(dataset_dir, tmp_path):
    recipe = tmp_path / "run.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "ds_config": "ds_configs/zero0.json",
                "model": {"preset": "tiny", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2},
                "max_steps": 50,
                "lr": 2e-3,
                "seq_len": 32,
                "micro_batch_size": 2,
                "eval_windows": 4,
                "sample_tokens": 4,
                "loader_workers": 0,
            }
        )
    )
    out = tmp_path / "run"
    args = ["--recipe", recipe, "--data", dataset_dir, "--out", out, "--max-steps", 3, "--model.max_seq_len", 64]
    proc = dsllm("pretrain", *args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["max_steps"] == 3 and config["train"]["lr"] == 2e-3  # the flag wins, the recipe fills
    assert config["model"]["n_layers"] == 2 and config["model"]["max_seq_len"] == 64
    assert config["run"]["zero_stage"] == 0 and config["run"]["micro_batch_size"] == 2
    # the end-of-run sample marks where the validation prompt ends and the model's continuation begins
    prompt_line = next(i for i, line in enumerate(proc.stdout.splitlines()) if line.startswith("sample: prompt ("))
    assert "sample: the model's continuation (4 tokens" in "\n".join(proc.stdout.splitlines()[prompt_line + 1 :])


def test_max_time_stops_at_a_step_boundary_with_a_checkpoint_and_resume_continues(dataset_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--max-steps", 100000, "--micro-batch-size", 2, "--save-interval", 100000, "--eval-interval", 100000]
    proc = pretrain(dataset_dir, out, *args, "--max-time", "3s", ds="zero0.json")
    stopped = max(train_records(out))
    assert 1 <= stopped < 100000
    assert f"stopped at --max-time 0:00:03 after step {stopped}; checkpoint" in proc.stderr
    assert (out / "checkpoints" / f"step{stopped:08d}" / "dsllm_complete.json").is_file()
    assert "final validation loss" not in proc.stdout
    again = pretrain(dataset_dir, out, *args[:1], stopped + 2, *args[2:], ds="zero0.json")
    assert f"at step {stopped} " in again.stdout and max(train_records(out)) == stopped + 2
