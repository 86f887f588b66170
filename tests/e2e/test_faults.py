"""Faults: a rank killed with SIGKILL ends the whole job quickly with a message naming the rank, and
launch/supervise.py restarts the job, which resumes from its last checkpoint to the same losses."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from runs import command, env, pretrain, rank_process, train_records

pytestmark = pytest.mark.multirank  # every test kills or restarts a rank of a 2-rank job

ARGS = ["--max-steps", 12, "--micro-batch-size", 4, "--save-interval", 3, "--eval-interval", 100, "--precision", "fp32"]


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, limit: float = 300) -> None:
    deadline = time.time() + limit
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(
            "loss" in line and json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never came")


def kill_rank(proc: subprocess.Popen, local_rank: int, sig: int = 9) -> None:
    rank_process(proc, local_rank).send_signal(sig)


def test_a_dead_rank_ends_the_job_and_the_log_names_it(dataset_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        command(dataset_dir, out, *ARGS[:1], 100000, *ARGS[2:], ranks=2),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_step(out, 3, proc)
    killed = time.time()
    kill_rank(proc, 1)
    output, _ = proc.communicate(timeout=120)
    assert time.time() - killed < 60
    assert proc.returncode != 0
    assert "--local_rank=1" in output and "exits with return code = -9" in output  # the launcher names the rank


@pytest.mark.slow
def test_supervisor_restarts_and_the_run_resumes_exactly(dataset_dir, tmp_path):
    pretrain(dataset_dir, tmp_path / "whole", *ARGS, ranks=2)
    out = tmp_path / "run"
    supervised = [
        sys.executable,
        "launch/supervise.py",
        "--max-restarts",
        "2",
        "--restart-delay",
        "0.5",
        "--",
        *command(dataset_dir, out, *ARGS, ranks=2),
    ]
    proc = subprocess.Popen(
        supervised, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for_step(out, 7, proc)
    kill_rank(proc, 1)  # the injected failure
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    assert "supervise: the job failed (exit code" in output and "restart 1/2" in output
    assert "resumed from" in output and ("at step 6 " in output or "at step 9 " in output)
    whole, resumed = train_records(tmp_path / "whole"), train_records(out)
    for step in range(1, 13):
        assert resumed[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-6, abs=0), step
