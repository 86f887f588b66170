"""Faults: a rank killed with SIGKILL ends the whole job quickly with a message naming the rank, and
launch/supervise.py restarts the job, which resumes from its last checkpoint to the same losses (one supervised
job shows both)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from runs import KILL_ARGS, command, env, rank_process, train_records

pytestmark = pytest.mark.multirank  # every test kills or restarts a rank of a 2-rank job

ARGS = KILL_ARGS  # 12 steps, a checkpoint every 3


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


@pytest.mark.slow
def test_a_dead_rank_ends_the_job_the_log_names_it_and_the_supervisor_resumes_exactly(
    dataset_dir, tmp_path, shared_run
):
    """One supervised job: rank 1 killed with SIGKILL ends the whole job within a minute, the launcher's log names
    the rank, and the supervisor's restart resumes from the last checkpoint to the uninterrupted run's losses."""
    whole = shared_run(*ARGS, ranks=2)  # also test_pretrain.py's sigkill-then-resume reference
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
    killed, before_restart = time.time(), []
    for line in proc.stdout:  # the launcher's and the supervisor's lines, as they come
        before_restart.append(line)
        if "supervise: the job failed (exit code" in line:
            break
    ended = time.time() - killed
    output = "".join(before_restart)
    assert ended < 60, output[-3000:]  # the job ended (and the supervisor saw it) quickly
    assert "--local_rank=1" in output and "exits with return code = -9" in output  # the launcher names the rank
    rest, _ = proc.communicate(timeout=600)
    output += rest
    assert proc.returncode == 0, output[-3000:]
    assert "supervise: the job failed (exit code" in output and "restart 1/2" in output
    assert "resumed from" in output and ("at step 6 " in output or "at step 9 " in output)
    reference, resumed = train_records(whole), train_records(out)
    for step in range(1, 13):
        assert resumed[step]["loss"] == reference[step]["loss"], step
