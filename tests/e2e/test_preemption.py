"""Runs that survive preemption, hangs and crashes mid-save (real launcher, real ranks, CPU):
SIGTERM to the launcher, to supervise.py or to one rank saves a checkpoint at the current step and leaves
no process behind, and the resumed run reproduces the uninterrupted one; a SIGSTOPped rank ends the job
within --collective-timeout + 30 s; SIGKILL during a save never leaves a checkpoint that --resume auto
trusts; a rollback starts a branch that --resume auto follows; a diverging run never writes or names a
checkpoint with non-finite weights; a second trainer on the same --out is refused."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT
from runs import command, env, pretrain, rank_process, train_records

STEPS = 30
ARGS = [
    "--max-steps",
    STEPS,
    "--micro-batch-size",
    4,
    "--save-interval",
    1000,
    "--eval-interval",
    1000,
    "--precision",
    "fp32",
    "--stop-grace",
    60,
]
# The SIGTERM runs: 4x the tokens per step, so that the stop (the ranks poll their launcher every 0.5 s, then agree
# at a step's end) always lands before the last step (CI once saw 15 ms steps of ARGS finish all 30 first). Longer
# runs are no fix: two identical 2-rank runs drift apart by an ulp or so after ~35 steps (not a resume effect).
SIGTERM_ARGS = [*ARGS[:2], "--micro-batch-size", 16, *ARGS[4:]]


def start(cmd, **kwargs) -> subprocess.Popen:
    """In a session of its own, so the test can tell when every process of the job is gone."""
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**env(), **kwargs.pop("env", {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, limit: float = 300) -> None:
    deadline = time.time() + limit
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never came: {proc.poll()}")


def session_processes(sid: int) -> list[psutil.Process]:
    """Live (not zombie) processes of a session: everything a job started stays in its session."""
    left = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE:
                left.append(process)
        except (OSError, psutil.Error):
            pass
    return left


def finish(proc: subprocess.Popen, limit: float) -> tuple[str, float]:
    """Output and seconds until the job's last process is gone; nothing of it may be left behind."""
    began = time.time()
    output, _ = proc.communicate(timeout=limit)
    while session_processes(proc.pid) and time.time() - began < limit:
        time.sleep(0.2)
    left = session_processes(proc.pid)
    for process in left:  # clean up before failing
        process.kill()
    assert not left, f"processes left behind: {[p.cmdline() for p in left]}"
    return output, time.time() - began


def complete_steps(out: Path) -> list[int]:
    checkpoints = out / "checkpoints"
    return sorted(
        int(p.name[4:]) for p in checkpoints.iterdir() if p.name[4:].isdigit() and (p / "dsllm_complete.json").is_file()
    )


def assert_same_curve(whole: Path, resumed: Path) -> None:
    reference, records = train_records(whole), train_records(resumed)
    assert sorted(records) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert records[step]["loss"] == reference[step]["loss"], step


@pytest.fixture(scope="module")
def whole_2_ranks(dataset_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    pretrain(dataset_dir, out, *SIGTERM_ARGS, ranks=2)
    return out


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "supervise", "rank"])
def test_sigterm_saves_the_current_step_leaves_no_process_and_resumes_exactly(
    target, dataset_dir, whole_2_ranks, tmp_path
):
    out = tmp_path / "run"
    cmd = command(dataset_dir, out, *SIGTERM_ARGS, ranks=2)
    if target == "supervise":
        cmd = [sys.executable, "launch/supervise.py", "--max-restarts", "3", "--restart-delay", "0", "--", *cmd]
    proc = start(cmd)
    wait_for_step(out, 2, proc)
    if target == "rank":
        rank_process(proc, 1).send_signal(signal.SIGTERM)
    else:  # `deepspeed` itself passes SIGTERM on to nobody: the ranks notice that their launcher is gone
        proc.send_signal(signal.SIGTERM)
    output, seconds = finish(proc, 120)
    assert seconds < 60, output[-3000:]  # --stop-grace
    stopped_at = max(complete_steps(out))
    assert 2 <= stopped_at < STEPS, output[-3000:]
    assert "stopped by SIGTERM" in output and f"at step {stopped_at}; checkpoint" in output
    if target == "rank":
        assert proc.returncode == 75  # the launcher passes the ranks' exit code on
    if target == "supervise":
        assert "not restarting" in output and output.count(" parameters on ") == 1
    assert "Traceback" not in output, output[-3000:]
    resumed = pretrain(dataset_dir, out, *SIGTERM_ARGS, ranks=2)
    assert f"at step {stopped_at} " in resumed.stdout
    assert_same_curve(whole_2_ranks, out)


@pytest.mark.multirank
@pytest.mark.slow
# ZeRO-2 (its bucketed reductions); the watchdog is the process group's timeout, the same on every stage (a ZeRO-0 case
# cost 25 s of the suite's 40 minutes for no other path)
@pytest.mark.parametrize("ds", ["zero2.json"])
def test_a_stopped_rank_ends_the_job_within_the_collective_timeout(ds, dataset_dir, tmp_path):
    timeout = 15
    out = tmp_path / "run"
    proc = start(
        command(dataset_dir, out, *ARGS[:1], 100000, *ARGS[2:], "--collective-timeout", timeout, ranks=2, ds=ds)
    )
    wait_for_step(out, 3, proc)
    rank = rank_process(proc, 1)
    rank.send_signal(signal.SIGSTOP)
    stopped = time.time()
    try:
        output, _ = finish(proc, 180)
    finally:
        if rank.is_running():
            rank.kill()
    assert time.time() - stopped < timeout + 30, output[-3000:]
    assert proc.returncode != 0
    # whichever comes first says so: our watchdog (no step for the timeout) or gloo's own collective timeout
    assert (
        "no progress for" in output or "a collective failed because another rank died, hung past" in output
    ) and "--collective-timeout" in output, output[-3000:]


def test_a_second_trainer_on_the_same_run_is_refused_and_a_dead_ones_lock_is_not(dataset_dir, tmp_path):
    out = tmp_path / "run"
    first = start(command(dataset_dir, out, *ARGS[:1], 100000, *ARGS[2:]))
    wait_for_step(out, 1, first)
    second = subprocess.run(
        command(dataset_dir, out, *ARGS), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "another trainer is using this run folder" in lines[0], second.stderr
    assert f"pid {first.pid}" in lines[0]
    first.kill()  # a crash: the lock dies with its process
    finish(first, 60)
    pretrain(dataset_dir, out, "--max-steps", 2, "--micro-batch-size", 4, "--precision", "fp32", "--resume", "none")


@pytest.mark.slow
def test_kill_during_saves_and_resaves_after_a_rollback_never_loses_the_branch(dataset_dir, tmp_path):
    """SIGKILL at each moment of the save protocol (files written / marker in / old folder moved aside): the
    torn save is never resumed from, and after a rollback --resume auto stays on the branch the user chose."""
    args = [
        "--max-steps",
        12,
        "--micro-batch-size",
        4,
        "--save-interval",
        4,
        "--eval-interval",
        1000,
        "--precision",
        "fp32",
        "--keep-checkpoints",
        5,
    ]
    whole = tmp_path / "whole"
    pretrain(dataset_dir, whole, *args)
    out = tmp_path / "run"
    for phase in ("written", "marked"):  # a first save of step 8 dies; its staging folder is never trusted
        proc = start(command(dataset_dir, out, *args), env={"DSLLM_FAULT": f"kill_in_save:8:{phase}"})
        finish(proc, 300)
        assert proc.returncode == -9 and complete_steps(out) == [4]
    pretrain(dataset_dir, out, *args)
    assert complete_steps(out) == [4, 8, 12]
    # roll back to step 4; the re-save of step 8 (over the abandoned branch's) dies as the old folder moves aside
    proc = start(
        command(dataset_dir, out, *args, "--resume", out / "checkpoints" / "step00000004"),
        env={"DSLLM_FAULT": "kill_in_save:8:replaced"},
    )
    output, _ = finish(proc, 300)
    assert "starts a new branch" in output
    assert complete_steps(out) == [4, 12]  # the abandoned step 12 stays for the user; auto must not take it
    resumed = pretrain(dataset_dir, out, *args)
    assert "resumed from" in resumed.stdout and "step00000004 at step 4 " in resumed.stdout
    assert complete_steps(out) == [4, 8, 12]
    reference, records = train_records(whole), train_records(out)
    for step in range(1, 13):
        assert records[step]["loss"] == reference[step]["loss"], step
    marker = json.loads((out / "checkpoints" / "step00000012" / "dsllm_complete.json").read_text())
    lineage = json.loads((out / "checkpoints" / "lineage.json").read_text())["branches"]
    assert marker["branch"] == lineage[-1]["id"] and lineage[-1]["forked_from"] == "step00000004"


def test_a_damaged_newest_checkpoint_gives_way_to_the_one_before(dataset_dir, tmp_path):
    args = [
        "--max-steps",
        8,
        "--micro-batch-size",
        4,
        "--save-interval",
        4,
        "--eval-interval",
        1000,
        "--precision",
        "fp32",
    ]
    out = tmp_path / "run"
    pretrain(dataset_dir, out, *args)
    states = out / "checkpoints" / "step00000008" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, caught by the checksum
    states.write_bytes(bytes(data))
    explicit = pretrain(dataset_dir, out, *args[:1], 10, *args[2:], "--resume", states.parent, expect=2)
    assert "damaged checkpoint" in explicit.stderr and len(explicit.stderr.strip().splitlines()) == 1
    proc = pretrain(dataset_dir, out, *args[:1], 10, *args[2:])
    assert "step00000008 is damaged (mp_rank_00_model_states.pt does not match its recorded sha256" in proc.stdout
    assert "step00000004 at step 4 " in proc.stdout


def test_a_diverging_run_never_writes_or_names_a_non_finite_checkpoint_and_supervise_stops(dataset_dir, tmp_path):
    from dsllm.model_dir import load_model_dir

    out = tmp_path / "run"
    cmd = command(
        dataset_dir,
        out,
        "--max-steps",
        20,
        "--micro-batch-size",
        4,
        "--save-interval",
        1,
        "--eval-interval",
        1,
        "--precision",
        "fp32",
        "--lr",
        "1e8",
        "--warmup-steps",
        0,
        ds="zero0.json",
    )
    proc = start([sys.executable, "launch/supervise.py", "--max-restarts", "3", "--restart-delay", "0", "--", *cmd])
    output, _ = finish(proc, 300)
    assert proc.returncode == 3, output[-3000:]
    assert "Last healthy checkpoint:" in output and "not restarting" in output and output.count(" parameters on ") == 1
    named = output.split("Last healthy checkpoint: ")[1].split(". ")[0]
    assert (
        f"supervise: the run diverged (exit code 3); not restarting, since resuming would diverge again. "
        f"Last healthy checkpoint: {named}" in output
    )
    for step in complete_steps(out):
        model = load_model_dir(out / "checkpoints" / f"step{step:08d}")
        assert all(p.isfinite().all() for p in model.parameters()), step
    assert named == "none" or Path(named).name == f"step{max(complete_steps(out)):08d}"


@pytest.mark.slow
def test_sigkill_at_random_moments_during_saves(dataset_dir, tmp_path):
    """kill -9 at random moments of a run that saves every step (most of its time is saving): every time
    --resume auto resumes from a complete checkpoint and the loss curve is the uninterrupted one.
    DSLLM_KILL_TRIALS sets the number of kills (3 here; the issue's 20 were run by hand)."""
    trials = int(os.environ.get("DSLLM_KILL_TRIALS", 3))
    args = [
        "--max-steps",
        STEPS,
        "--micro-batch-size",
        4,
        "--save-interval",
        1,
        "--eval-interval",
        1000,
        "--precision",
        "fp32",
        "--keep-checkpoints",
        2,
    ]
    whole = tmp_path / "whole"
    pretrain(dataset_dir, whole, *args)
    out = tmp_path / "run"
    rng = random.Random(int(os.environ.get("DSLLM_KILL_SEED", 0)))
    metrics = out / "metrics.jsonl"
    for _ in range(trials):
        logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        proc = start(command(dataset_dir, out, *args))
        while proc.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < logged + 2):
            time.sleep(0.02)  # this attempt has trained (and saved) at least two steps
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        finish(proc, 120)
    pretrain(dataset_dir, out, *args)
    assert_same_curve(whole, out)


@pytest.mark.multirank
@pytest.mark.slow
def test_a_fault_after_start_is_printed_once_by_the_rank_that_saw_it(dataset_dir, tmp_path):
    """A fault every rank finds (a damaged checkpoint) is one line, not one per rank; a fault only rank 1 finds
    (its RNG file) is one line from rank 1, not silence."""
    from dsllm.checkpoint.store import file_digests

    args = ["--max-steps", 2, "--micro-batch-size", 4, "--save-interval", 2, "--precision", "fp32"]
    out = tmp_path / "run"
    pretrain(dataset_dir, out, *args, ranks=2)
    tag = out / "checkpoints" / "step00000002"
    marker_path = tag / "dsllm_complete.json"
    marker = json.loads(marker_path.read_text())
    rng = tag / "rng_rank00001.safetensors"
    rng.write_bytes(b"\0" * rng.stat().st_size)  # damaged, same size: only the checksum knows
    proc = pretrain(dataset_dir, out, *args[:1], 4, *args[2:], "--resume", tag, ranks=2, expect=2)
    errors = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "damaged checkpoint" in errors[0] and "rng_rank00001" in errors[0], errors
    marker["files"].update(file_digests(tag, [rng.name]))  # as if it had been saved so: only rank 1 reads it
    marker_path.write_text(json.dumps(marker))
    proc = pretrain(dataset_dir, out, *args[:1], 4, *args[2:], "--resume", tag, ranks=2, expect=2)
    errors = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 1: ") and "not an RNG state" in errors[0], errors
