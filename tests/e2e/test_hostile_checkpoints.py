"""Loading a checkpoint never runs code. A pickle whose payload would create a file, put in place of a checkpoint
file, is refused by every command that reads that file (exit 2, one line naming it) and the payload never runs;
the untouched checkpoints still load through every command."""

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_user_error
from runs import command, env, pretrain

STEP = "step00000002"
TRAIN = ("--save-interval", 2, "--eval-interval", 2, "--precision", "fp32")
MODEL_STATES, OPTIM_STATES = "mp_rank_00_model_states.pt", "*_optim_states.pt"  # ZeRO 0-2


class Payload:
    """What a crafted checkpoint holds: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset_dir):
    """{ZeRO stage: a 2-step run folder (1 rank, fp32) with one checkpoint and no final weights}, so every
    command reads the checkpoint."""
    folders = {}
    for stage in (0, 2):
        out = tmp_path_factory.mktemp(f"zero{stage}") / "run"
        pretrain(dataset_dir, out, "--max-steps", 2, *TRAIN, ds=f"zero{stage}.json")
        (out / "model.safetensors").unlink()
        folders[stage] = out
    return folders


def record_in_marker(tag, name, remove=False):
    """Make the marker's manifest agree with the file as it is now (whoever crafts files can rewrite it too)."""
    marker_file = tag / "dsllm_complete.json"
    marker = json.loads(marker_file.read_text())
    if name in marker.get("files", {}):
        if remove:
            del marker["files"][name]
        else:
            data = (tag / name).read_bytes()
            marker["files"][name] = [len(data), hashlib.sha256(data).hexdigest()]
        marker_file.write_text(json.dumps(marker))


def hostile_copy(run, kind, tmp_path):
    """(a copy of the run whose `kind` file is a crafted pickle, that file, the file its payload would create)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    target = next((copy / "checkpoints" / STEP).glob(kind))
    marker = tmp_path / "payload-ran"
    torch.save({"module": Payload(marker), "optimizer_state_dict": {}}, target)
    record_in_marker(target.parent, target.name)
    return copy, target, marker


def sft_data(path):
    rng = random.Random(0)
    words = "the model reads tokens from memory mapped files".split()
    with open(path, "w") as f:
        for _ in range(16):
            example = {"prompt": " ".join(rng.sample(words, 3)), "response": " ".join(rng.sample(words, 2))}
            f.write(json.dumps(example) + "\n")
    return path


def run(cmd):
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


def dsllm(*args):
    return [sys.executable, "-m", "dsllm", *args]


COMMANDS = ["evaluate", "generate", "export", "consolidate", "report", "finetune"]


def user_command(name, run_dir, data, tmp):
    """Each command as a user runs it on a run folder or its checkpoint, writing under `tmp`."""
    tag = run_dir / "checkpoints" / STEP
    if name == "finetune":
        return [
            sys.executable,
            "launch/finetune.py",
            "--ds_config",
            "ds_configs/zero0.json",
            "--init",
            tag,
            "--data",
            sft_data(tmp / "sft.jsonl"),
            "--out",
            tmp / "sft",
            "--precision",
            "fp32",
            "--max-steps",
            1,
            "--val-fraction",
            0,
            "--micro-batch-size",
            2,
            "--seq-len",
            32,
        ]
    return dsllm(
        *{
            "evaluate": ("evaluate", "--checkpoint", tag, "--data", data, "--max-windows", 2),
            "generate": ("generate", "--checkpoint", tag, "--prompt", "doc", "--max-new-tokens", 2, "--seed", 0),
            "export": ("export", "--checkpoint", tag, "--output", tmp / "hf"),
            "consolidate": ("consolidate", "--checkpoint", run_dir, "--output", tmp / "model"),
            "report": ("report", run_dir, "--out", tmp / "report"),
        }[name]
    )


LIGHT = ["evaluate", "generate", "export", "consolidate", "report"]  # each reads the whole checkpoint in one process


def resume(run_dir, data, stage):
    return command(data, run_dir, "--max-steps", 4, *TRAIN, "--resume", "auto", ds=f"zero{stage}.json")


def assert_refused(proc, target, marker):
    assert not marker.exists(), "the payload ran"
    assert_user_error(proc, str(target), "objects other than tensors", "not loaded")


# -- crafted files: refused, never run -----------------------------------------------------------------
@pytest.mark.parametrize("stage, kind", [(0, MODEL_STATES), (2, MODEL_STATES), (2, OPTIM_STATES)])
@pytest.mark.parametrize("name", LIGHT)
def test_commands_refuse_a_crafted_file(runs, dataset_dir, tmp_path, name, stage, kind):
    copy, target, marker = hostile_copy(runs[stage], kind, tmp_path)
    assert_refused(run(user_command(name, copy, dataset_dir, tmp_path)), target, marker)


def test_finetune_init_refuses_a_crafted_file(runs, dataset_dir, tmp_path):
    copy, target, marker = hostile_copy(runs[2], OPTIM_STATES, tmp_path)
    assert_refused(run(user_command("finetune", copy, dataset_dir, tmp_path)), target, marker)


@pytest.mark.parametrize("kind", [MODEL_STATES, OPTIM_STATES])
@pytest.mark.parametrize("resume_stage", [2, 1], ids=["same-stage", "universal"])
def test_resume_refuses_a_crafted_file(runs, dataset_dir, tmp_path, kind, resume_stage):
    """`--resume auto` on ZeRO-2 (DeepSpeed's engine loads it) and on ZeRO-1 (ds_to_universal converts it first)."""
    copy, target, marker = hostile_copy(runs[2], kind, tmp_path)
    assert_refused(run(resume(copy, dataset_dir, resume_stage)), target, marker)


def test_missing_model_states_is_named(runs, dataset_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(runs[2], copy)
    tag = copy / "checkpoints" / STEP
    (tag / MODEL_STATES).unlink()
    record_in_marker(tag, MODEL_STATES, remove=True)  # so the marker's manifest does not report it first
    for proc in (run(user_command("evaluate", copy, dataset_dir, tmp_path)), run(resume(copy, dataset_dir, 2))):
        assert_user_error(proc, f"{tag / MODEL_STATES}: missing")


# -- untouched checkpoints: no false refusals ----------------------------------------------------------
@pytest.mark.parametrize("name, stage", [(name, 2) for name in COMMANDS] + [("evaluate", 0)])
def test_commands_load_an_untouched_checkpoint(runs, dataset_dir, tmp_path, name, stage):
    proc = run(user_command(name, runs[stage], dataset_dir, tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("stage", [0, 2])
def test_resume_loads_an_untouched_checkpoint(runs, dataset_dir, tmp_path, stage):
    copy = tmp_path / "run"
    shutil.copytree(runs[stage], copy)
    proc = run(resume(copy, dataset_dir, stage))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {copy / 'checkpoints' / STEP} at step 2" in proc.stdout
    assert [p.name for p in (copy / "checkpoints" / STEP).glob("rng_rank*")] == ["rng_rank00000.safetensors"]


def test_universal_conversion_loads_and_its_cache_is_checked_too(runs, dataset_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(runs[2], copy)
    proc = run(resume(copy, dataset_dir, 1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "through a universal checkpoint" in proc.stdout
    # the converted folder is cached next to the checkpoint and loaded as it is next time: a crafted file there too
    checkpoints = copy / "checkpoints"
    target = checkpoints / f"{STEP}-universal" / "zero" / "norm.weight" / "fp32.pt"
    marker = tmp_path / "payload-ran"
    torch.save({"param": Payload(marker)}, target)
    again = command(dataset_dir, copy, "--max-steps", 4, *TRAIN, "--resume", checkpoints / STEP, ds="zero1.json")
    assert_refused(run(again), target, marker)


# -- our own RNG file is not a pickle ------------------------------------------------------------------
def test_rng_file_round_trips_and_is_not_unpickled(tmp_path):
    from dsllm.checkpoint.states import load_rng, rng_file, save_rng
    from dsllm.errors import UserError

    random.gauss(0, 1), np.random.standard_normal()  # cached gaussians are part of the state
    save_rng(tmp_path, 3)
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    torch.rand(5), random.random(), np.random.rand()
    assert load_rng(tmp_path, 3) and not load_rng(tmp_path, 4)
    again = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert expected[:4] == again[:4] and torch.equal(expected[4], again[4])

    marker = tmp_path / "payload-ran"
    torch.save(Payload(marker), rng_file(tmp_path, 3))
    with pytest.raises(UserError, match="not an RNG state written by dsllm"):
        load_rng(tmp_path, 3)
    assert not marker.exists()
