"""launch/pretrain.py on the real DeepSpeed engine (CPU, gloo): every config, 1 and 2 ranks, equal
losses across world sizes, bit-exact resume after SIGKILL (also during a save), pre-flight errors."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from runs import KILL_ARGS, SAME_BATCH_ARGS, command, env, pretrain, run_until_killed, train_records

CONFIGS = ["zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero2_offload.json", "zero3_offload.json"]


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.multirank)])
@pytest.mark.parametrize("ds", CONFIGS)
def test_every_config_trains(dataset_dir, tmp_path, ds, ranks):
    out = tmp_path / "run"
    precision = "bf16" if ranks == 2 else "fp32"  # auto is fp32 on CPU: both precisions on every config
    args = ["--max-steps", 12, "--micro-batch-size", 4, "--eval-interval", 6, "--save-interval", 6]
    cmd = command(dataset_dir, out, *args, "--precision", precision, ranks=ranks, ds=ds)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if ranks == 2:
        # DeepSpeed's CPU all-reduce maps a 69 MB /dev/shm file per rank and never unlinks it; the trainer does, once
        # every rank has mapped them all (before: every 2-rank run leaked 138 MB of RAM until the OOM killer)
        port = cmd[cmd.index("--master_port") + 1]
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    records = train_records(out)
    assert sorted(records) == list(range(1, 13))
    assert all(0 <= r["data_wait_fraction"] < 1 for r in records.values())
    first, last = records[1]["loss"], sum(records[s]["loss"] for s in (10, 11, 12)) / 3
    assert last < first - 0.5, (first, last)
    stage = json.loads((ROOT / "ds_configs" / ds).read_text())["zero_optimization"]["stage"]
    assert f"on {ranks} rank(s), ZeRO-{stage}, {precision}," in proc.stdout
    assert "final validation loss" in proc.stdout and "sample:" in proc.stdout
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert [e["step"] for e in evals] == [6, 12] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert all(e["bits_per_byte"] > 0 and e["perplexity"] > 1 for e in evals)
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))
    assert checkpoints == ["step00000006", "step00000012"]
    assert (out / "model.safetensors").is_file() and json.loads((out / "config.json").read_text())["run"][
        "world_size"
    ] == ranks


@pytest.mark.multirank
@pytest.mark.slow
def test_two_ranks_zero2_equal_one_rank_zero0(dataset_dir, tmp_path, shared_run):
    """Same global batch (8): 1 rank x 8 on ZeRO-0 vs 2 ranks x 4 on ZeRO-2 (and ZeRO-3), fp32. Tolerance 1e-5 relative
    (all-reduce order changes float summation; measured ~5e-7 absolute). The 2-rank ZeRO-2 run is the session's
    (test_resume_world_size.py resumes it on other world sizes)."""
    args = SAME_BATCH_ARGS
    one = tmp_path / "one"
    pretrain(dataset_dir, one, *args, "--micro-batch-size", 8, ds="zero0.json")
    two = shared_run(*args, "--micro-batch-size", 4, ranks=2)
    a, b = train_records(one), train_records(two)
    for step in range(1, 9):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
        assert b[step]["lr"] == pytest.approx(a[step]["lr"], rel=1e-9)
    # gradient accumulation: 1 rank x 4 micro x 2 steps is the same global batch too
    acc = tmp_path / "acc"
    pretrain(dataset_dir, acc, *args, "--micro-batch-size", 4, "--grad-accum", 2, ds="zero1.json")
    c = train_records(acc)
    assert all(c[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5) for s in range(1, 9))
    # ZeRO-3 on 2 ranks builds the model inside deepspeed.zero.Init (each rank only ever holds its half):
    # the same initial weights, so the same curve
    three = tmp_path / "three"
    pretrain(dataset_dir, three, *args, "--micro-batch-size", 4, ranks=2, ds="zero3.json")
    d = train_records(three)
    assert all(d[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5) for s in range(1, 9))


def test_compile_trains_like_eager_and_saves_eager_names(dataset_dir, tmp_path):
    """--compile: engine.compile() (inductor on CPU) gives the eager losses to float tolerance, and the
    checkpoint and final weights carry the eager parameter names (no `_orig_mod.`): they load uncompiled."""
    from safetensors import safe_open

    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        pretrain(
            dataset_dir,
            tmp_path / name,
            "--max-steps",
            4,
            "--save-interval",
            4,
            "--precision",
            "fp32",
            *extra,
            ds="zero2.json",
        )
        runs[name] = train_records(tmp_path / name)
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as weights:
            runs[name + "_keys"] = sorted(weights.keys())
    assert all(runs["compiled"][s]["loss"] == pytest.approx(runs["eager"][s]["loss"], rel=1e-4) for s in range(1, 5))
    assert runs["compiled_keys"] == runs["eager_keys"] and not any("_orig_mod" in k for k in runs["compiled_keys"])
    config = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert config["train"]["compile"] is True


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=[pytest.mark.multirank, pytest.mark.slow])])
def test_sigkill_then_resume_auto_is_exact(dataset_dir, tmp_path, shared_run, ranks):
    args = KILL_ARGS
    reference = train_records(shared_run(*args, ranks=ranks))  # on 2 ranks test_faults.py's reference too
    out = tmp_path / "killed"
    proc = run_until_killed(command(dataset_dir, out, *args, ranks=ranks), out, kill_after_step=7)
    assert proc.returncode != 0, "the run finished before it could be killed"
    killed_at = max(train_records(out))
    assert 7 <= killed_at < 12
    proc = pretrain(dataset_dir, out, *args, "--resume", "auto", ranks=ranks)
    assert "resumed from" in proc.stdout and ("at step 6 " in proc.stdout or "at step 9 " in proc.stdout)
    resumed = train_records(out)
    for step in range(1, 13):
        assert resumed[step]["loss"] == reference[step]["loss"], step
        assert resumed[step]["lr"] == reference[step]["lr"]
        assert resumed[step]["samples"] == reference[step]["samples"]


def test_kill_during_save_resumes_from_the_last_complete_checkpoint(dataset_dir, tmp_path):
    args = ["--max-steps", 9, "--micro-batch-size", 4, "--save-interval", 3, "--precision", "fp32"]
    pretrain(dataset_dir, tmp_path / "whole", *args)
    out = tmp_path / "run"
    proc = subprocess.run(
        command(dataset_dir, out, *args),
        cwd=ROOT,
        env={**env(), "DSLLM_FAULT": "kill_in_save:6"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL
    staging = out / "checkpoints" / "step00000006.staging"  # DeepSpeed's files are there, our marker is not
    assert staging.is_dir() and not (staging / "dsllm_complete.json").exists()
    assert not (out / "checkpoints" / "step00000006").exists()  # never under the name of a checkpoint
    proc = pretrain(dataset_dir, out, *args)
    assert "resumed from" in proc.stdout and "step00000003 at step 3" in proc.stdout
    whole, resumed = train_records(tmp_path / "whole"), train_records(out)
    assert all(resumed[s]["loss"] == whole[s]["loss"] for s in range(1, 10))
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))
    assert names == ["step00000003", "step00000006", "step00000009"]  # the torn step-6 save was cleared and redone


def test_resume_refuses_another_dataset(dataset_dir, tmp_path, corpus_jsonl, tokenizer_dir):
    from dsllm.data.prepare import PrepareConfig, prepare

    out = tmp_path / "run"
    pretrain(dataset_dir, out, "--max-steps", 3, "--micro-batch-size", 4, "--save-interval", 3)
    other = tmp_path / "other"
    prepare(
        PrepareConfig(
            inputs=[str(corpus_jsonl)],
            tokenizer=str(tokenizer_dir),
            output=str(other),
            val_fraction=0.2,
            seed=99,
            workers=1,
            progress=False,
        )
    )
    proc = pretrain(other, out, "--max-steps", 6, "--micro-batch-size", 4, expect=2)
    assert "trained on dataset" in proc.stderr and "resuming would silently change the data" in proc.stderr


@pytest.mark.slow
def test_make_pretrain_runs_the_main_job(tmp_path):
    """`make pretrain` is the README's first command: the deepspeed launcher on the default corpus."""
    venv = Path(sys.executable).parent.parent
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            "make",
            "pretrain",
            f"VENV={venv}",
            f"PRETRAIN_ARGS=--max-steps 6 --warmup-steps 1 --log-interval 3 --eval-interval 6 --eval-windows 4 "
            f"--out {out} --sample-tokens 16",  # (the recipe's 12 warmup steps are for its ~250 in 300 CPU-s)
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "deepspeed launch/pretrain.py --recipe launch/recipes/default.yaml" in proc.stdout
    assert "final validation loss" in proc.stdout and "sample:" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["dir"].endswith("/data") and "default-corpus" in config["data"]["dir"]
    assert config["environment"]["GLIBC_TUNABLES"].startswith("glibc.malloc.mmap_threshold=")  # the Makefile's
    assert (out / "model.safetensors").is_file()


def test_deepspeed_csv_monitor_gets_loss_and_eval(dataset_dir, tmp_path):
    """DeepSpeed's monitor, enabled in the JSON, receives our loss (the engine itself logs only the lr)."""
    config = json.loads((ROOT / "ds_configs" / "zero1.json").read_text())
    config["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "run"}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    cmd = command(dataset_dir, tmp_path / "run", "--max-steps", 4, "--micro-batch-size", 4, "--eval-interval", 4)
    cmd[cmd.index("ds_configs/zero2.json")] = str(tmp_path / "ds.json")
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = {p.name: p.read_text() for p in (tmp_path / "csv" / "run").iterdir()}
    assert "Train_loss.csv" in files and len(files["Train_loss.csv"].strip().splitlines()) == 5  # header + 4 steps
    assert "Train_val_loss.csv" in files
