"""How the tests run the project's commands, the way a user does: a small pretraining run (one rank or several
under the `deepspeed` launcher), a run killed at a step, a rank of a running job, a verb of `python -m dsllm`,
and what a run wrote. tests/ is on sys.path (pytest.ini `pythonpath`), so every test file imports this one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT

SMALL_MODEL = [
    "--model",
    "tiny",
    "--model.n_layers",
    "2",
    "--model.d_model",
    "64",
    "--model.n_heads",
    "4",
    "--model.n_kv_heads",
    "2",
    "--model.max_seq_len",
    "64",
    "--model.mlp_multiple_of",
    "32",
]
VENV_BIN = Path(sys.executable).parent
# the runs each parallel layout (tensor, 3D, sequence) must reproduce: the `single` fixture (tests/conftest.py)
LAYOUT_STEPS = 20
LAYOUT_RUN = ["--max-steps", LAYOUT_STEPS, "--micro-batch-size", 4, "--grad-accum", 2, "--precision", "fp32"]
LAYOUT_RUN += ["--seq-len", 32, "--eval-interval", 10, "--save-interval", 4, "--sample-tokens", 8]
LAYOUT_MODELS = {
    "tied": [],
    "llama": [
        *("--model.tie_embeddings", "false", "--model.mlp", "swiglu", "--model.positions", "rope"),
        *("--model.norm", "rmsnorm", "--model.bias", "false"),
    ],
}

# a run killed mid-way and resumed (test_pretrain.py, test_faults.py): the uninterrupted one is the session's
# `shared_run(*KILL_ARGS, ranks=...)` (tests/conftest.py), one per world size
KILL_ARGS = ["--max-steps", 12, "--micro-batch-size", 4, "--save-interval", 3, "--eval-interval", 100]
KILL_ARGS += ["--precision", "fp32"]

# 8 steps, a checkpoint at step 4: the runs of one global batch (8) on other world sizes and ZeRO stages
# (test_pretrain.py, test_resume_world_size.py), with "--micro-batch-size", 8 // ranks
SAME_BATCH_ARGS = ["--max-steps", 8, "--save-interval", 4, "--eval-interval", 100, "--precision", "fp32"]

# the multi-host launch paths (tests/multinode), each against the session's `shared_run(*MULTINODE_ARGS, ranks=2)`
MULTINODE_ARGS = ["--max-steps", 4, "--micro-batch-size", 4, "--precision", "fp32", "--save-interval", 4]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    """CPU, one thread per rank. TORCH_EXTENSIONS_DIR passes through as it is: unset, every command points DeepSpeed
    at its virtualenv's own built ops (dsllm/ops.py, use_venv_extensions_dir), as a user's run does."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def command(data, out, *args, ranks=1, ds="zero2.json", model=tuple(SMALL_MODEL)):
    """`model`: the --model options (none for a run whose model comes from --init)."""
    train_args = [
        "launch/pretrain.py",
        "--ds_config",
        f"ds_configs/{ds}",
        "--data",
        str(data),
        "--out",
        str(out),
        *model,
        "--seq-len",
        "32",
        "--lr",
        "3e-3",
        "--eval-windows",
        "8",
        "--sample-tokens",
        "8",
        "--loader-workers",
        "0",
        "--log-interval",
        "1",
        *map(str, args),
    ]
    if ranks == 1:
        return [sys.executable, *train_args]
    return [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), *train_args]


def pretrain(data, out, *args, ranks=1, ds="zero2.json", expect=0, model=tuple(SMALL_MODEL)):
    proc = subprocess.run(
        command(data, out, *args, ranks=ranks, ds=ds, model=model),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if expect is not None:
        assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def script_result(script: str, *args, extra_env: dict | None = None):
    """Run `script` (python -c, the tests' environment) with `args`: the JSON it printed after "RESULT "."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=ROOT,
        env={**env(), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def same_curve(out, reference, first=1):
    """A layout run's loss and learning rate at every step are the reference's (LAYOUT_RUN), loss to 1e-5."""
    import pytest

    ours, theirs = train_records(out), train_records(reference)
    assert sorted(ours) == list(range(1, LAYOUT_STEPS + 1))
    for step in range(first, LAYOUT_STEPS + 1):
        assert ours[step]["loss"] == pytest.approx(theirs[step]["loss"], rel=1e-5), step
        assert ours[step]["lr"] == pytest.approx(theirs[step]["lr"], rel=1e-9)


def train_records(out):
    """{step: record} of the training lines (a resumed run's later lines win)."""
    records = {}
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            records[record["step"]] = record
    return records


def run_until_killed(cmd, out, kill_after_step, **popen):
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=popen.pop("env", env()),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        **popen,
    )
    deadline = time.time() + 300
    metrics = Path(out) / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(
            json.loads(line).get("step", 0) >= kill_after_step and "loss" in line
            for line in metrics.read_text().splitlines()
        ):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    return proc


def killed_then_resumed(
    data, out, *args, ranks=1, ds="zero2.json", model=tuple(SMALL_MODEL)
) -> subprocess.CompletedProcess:
    """A pretraining run killed (-9) after step 9, then started again with --resume auto (the default); checks the
    run was killed before its end and says it resumed from a checkpoint before the kill (saves every 4 steps: step 8,
    or 12 when the kill came late). Returns the resumed run's process."""
    proc = run_until_killed(command(data, out, *args, ranks=ranks, ds=ds, model=model), out, kill_after_step=9)
    assert proc.returncode != 0, "the run finished before it could be killed"
    resumed = pretrain(data, out, *args, ranks=ranks, ds=ds, model=model)
    assert "resumed from" in resumed.stdout and ("at step 8 " in resumed.stdout or "at step 12 " in resumed.stdout)
    return resumed


def rank_process(proc: subprocess.Popen, local_rank: int):
    """The rank among the descendants of a process this test started (never a process found by name)."""
    import psutil

    ranks = [
        p for p in psutil.Process(proc.pid).children(recursive=True) if f"--local_rank={local_rank}" in p.cmdline()
    ]
    assert len(ranks) == 1, f"expected one rank {local_rank} under pid {proc.pid}, found {ranks}"
    return ranks[0]


def dsllm(*args, **kwargs) -> subprocess.CompletedProcess:
    """`python -m dsllm ARGS`; the caller checks the exit code."""
    return subprocess.run(
        [sys.executable, "-m", "dsllm", *map(str, args)], cwd=ROOT, env=env(), capture_output=True, text=True, **kwargs
    )


def exported_logit_diff(run, hf_dir, seq_len=32) -> float:
    """`dsllm export` of a run folder to `hf_dir`, then the largest difference between its logits in transformers
    and the run's own model on a fixed random batch of two `seq_len`-token rows."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsllm.model_dir import load_model_dir

    exported = dsllm("export", "--checkpoint", run, "--output", hf_dir)
    assert exported.returncode == 0, exported.stderr
    ours, hf = load_model_dir(run).eval(), AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (ours(idx)[0] - hf(idx).logits).abs().max().item()


def report(*args, expect=0):
    """`python -m dsllm report ARGS`, which must exit with `expect`."""
    proc = subprocess.run(
        [sys.executable, "-m", "dsllm", "report", *map(str, args)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def write_ds(tmp_path, name="ds.json", **changes):
    """ds_configs/zero2.json with `changes` (nested keys joined by "__") written to tmp_path/name."""
    config = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path
